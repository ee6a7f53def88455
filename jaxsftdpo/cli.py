"""What every command-line entry point shares: flags, and turning bad input into one line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from jaxsftdpo.errors import ExitError, UserError, one_line

KEYS_HELP = "jaxsftdpo/config.py lists every key and its type"


def config_flag():
    return config_flags.DEFINE_config_file(
        "config", None, "config file, e.g. configs/quickstart.py or configs/paraphrase.py:ARG",
        lock_config=True)


def workdir_flag():
    return flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and results")


def _parse_flags(argv, required):
    try:
        flags.FLAGS(argv)
    except ExitError:
        raise
    except flags.Error as e:
        raise UserError(_flag_error(e)) from e
    except OSError as e:  # overrides of a config file that did not load
        raise UserError(_unloadable_config(argv)) from e
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        # ml_collections raises these for unknown or mistyped --config.* keys.
        raise UserError(_override_error(argv, e)) from e
    except Exception as e:  # noqa: BLE001 - the config file's own code: a syntax error, ...
        raise UserError(f"--config file failed to load ({type(e).__name__}: "
                        f"{_one_line(e)})") from e
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        try:
            flags.FLAGS["config"].value.get  # noqa: B018 - a file that did not load raises here
        except OSError as e:
            raise UserError(_unloadable_config(argv)) from e
    for name, why in required.items():
        if flags.FLAGS[name].value is None:
            raise UserError(f"--{name} is required: {why}")


def _flag_error(error: flags.Error) -> str:
    text = str(error)
    if "Error whilst parsing config file" in text:  # get_config raised; its last line says why
        flag = text.split(": Error whilst", 1)[0].removeprefix("flag ")
        return f"{flag}: get_config failed ({text.strip().splitlines()[-1]})"
    return f"{_one_line(error)}; see --helpfull for the flags"


def _unloadable_config(argv) -> str:
    path = _flag_value(argv, "config").split(":", 1)[0]
    why = "does not exist" if not Path(path).exists() else "cannot be read"
    return f"--config file {path} {why}; give a config file, e.g. configs/quickstart.py"


def _flag_value(argv, name: str) -> str:
    """The value of `--name=VALUE` or `--name VALUE` in argv (the last one given)."""
    value = ""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _overrides(argv) -> list[str]:
    """The `config.a.b[1].c` keys of the --config.* overrides in argv."""
    return [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]


def _override_error(argv, error: Exception) -> str:
    text = str(error.args[0]) if error.args else ""
    names = re.findall(r"[A-Za-z_]\w*", text)
    if isinstance(error, IndexError):
        return _index_error(argv)
    key = next((k for k in _overrides(argv) if names and names[0] in re.split(r"[.\[\]]", k)),
               None)
    if key is None:
        return (f"bad --config override ({_one_line(error)}): no such key, or a value of the "
                f"wrong type; {KEYS_HELP}")
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    hint = f" (did you mean {suggestion[1]}?)" if suggestion else ""
    return f"--{key}: the config has no key {names[0]}{hint}; {KEYS_HELP}"


def _index_error(argv) -> str:
    """Which `--config.LIST[i]...` override is past the end of the config file's list."""
    try:
        config = flags.FLAGS["config"].parser.parse(_flag_value(argv, "config"))
    except Exception:  # noqa: BLE001 - it loaded a moment ago; the generic message will do
        config = None
    for key in _overrides(argv):
        match = re.match(r"config\.(\w+)\[(\d+)\]", key)
        if match and config is not None and match[1] in config:
            items = len(config[match[1]])
            if int(match[2]) >= items:
                return (f"--{key}: {match[1]} has {items} item{'s' * (items != 1)} in the "
                        f"config file, [0] to [{items - 1}]")
    return f"an index in a --config override is past the end of its list; {KEYS_HELP}"


def _one_line(error: BaseException) -> str:
    """`errors.one_line` for what absl and ml_collections raise: also the `\\n` of a repr'd
    message breaks the line, and a bare key name loses its quotes."""
    text = one_line(str(error).replace("\\n", " "))
    if " " not in text:  # a bare key name, as KeyError and AttributeError give it: 'foo'
        text = text.strip("'\"")
    return text or type(error).__name__


def _print_help(argv) -> None:
    f = flags.FLAGS
    shown = (f.get_help() if "--helpfull" in argv else
             "\n".join(h for h in (f.main_module_help(), f.module_help(__name__)) if h.strip()))
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n\nflags:\n" + shown)


def run_cli(main, argv=None, *, required: dict | None = None) -> None:
    """Parse flags, run `main()`, and end an `ExitError` with one line and its exit status
    (2 for a UserError; see jaxsftdpo/errors.py).

    `required` maps flag names that must be given to what they are for.
    """
    argv = sys.argv if argv is None else argv
    if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
        _print_help(argv)
        return

    def parse_and_run():
        _parse_flags(argv, required or {})
        main()

    exit_on_error(parse_and_run)


def exit_on_error(main) -> None:
    """Run `main()`; an `ExitError` ends the process with one line on stderr,
    `{prefix}: message`, and its exit status. Every command ends this way (`python -m
    jaxsftdpo.study` too, whose arguments argparse parses)."""
    try:
        main()
    except ExitError as e:
        print(f"{e.prefix}: {_one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_status)
