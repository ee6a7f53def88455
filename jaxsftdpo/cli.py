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


def _parse_flags(argv):
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(f"{_one_line(e)}; see --helpfull for the flags") from e
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for unknown or mistyped --config.* keys.
        raise UserError(f"bad --config override: {_one_line(e)}; check the key against the "
                        f"config file") from e
    if flags.FLAGS["config"].value is None:
        raise UserError("--config is required, e.g. --config configs/quickstart.py")
    if "workdir" in flags.FLAGS and flags.FLAGS["workdir"].value is None:
        raise UserError("--workdir is required: the directory for this run's outputs")


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).replace("\\n", " ").split())
    return text.strip("'\"") or type(error).__name__


def run_cli(main, argv=None) -> None:
    """Parse flags, run `main()`, and exit 2 with one line for a UserError."""
    try:
        _parse_flags(sys.argv if argv is None else argv)
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
