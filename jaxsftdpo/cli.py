"""What every command-line entry point shares: flags, and turning bad input into one line."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from jaxsftdpo.errors import UserError


def config_flag():
    return config_flags.DEFINE_config_file(
        "config", None, "config file, e.g. configs/quickstart.py or configs/paraphrase.py:ARG",
        lock_config=True)


def workdir_flag():
    return flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and results")


def _parse_flags(argv, required):
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(f"{_one_line(e)}; see --helpfull for the flags") from e
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for unknown or mistyped --config.* keys.
        raise UserError(f"bad --config override ({_one_line(e)}): no such key, or a value of "
                        f"the wrong type; jaxsftdpo/config.py lists every key and its type") from e
    for name, why in required.items():
        if flags.FLAGS[name].value is None:
            raise UserError(f"--{name} is required: {why}")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).replace("\\n", " ").split())
    if " " not in text:  # a bare key name, as KeyError and AttributeError give it: 'foo'
        text = text.strip("'\"")
    return text or type(error).__name__


def _print_help(argv) -> None:
    f = flags.FLAGS
    shown = (f.get_help() if "--helpfull" in argv else
             "\n".join(h for h in (f.main_module_help(), f.module_help(__name__)) if h.strip()))
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n\nflags:\n" + shown)


def run_cli(main, argv=None, *, required: dict | None = None) -> None:
    """Parse flags, run `main()`, and exit 2 with one line for a UserError.

    `required` maps flag names that must be given to what they are for.
    """
    argv = sys.argv if argv is None else argv
    if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
        _print_help(argv)
        return
    try:
        _parse_flags(argv, required or {})
        main()
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
