"""`python -m jaxsftdpo.train --config configs/FILE.py[:ARG] --workdir DIR [--config.KEY=VALUE]`.

Runs (or resumes) the stages of the config in DIR. Exit status: 0 finished; 2 bad input or a
workdir another run holds (one line on stderr, nothing written); 3 training diverged; 1 the
workdir's storage failed (e.g. a full disk); 143 / 130 stopped by SIGTERM / SIGINT after a
checkpoint (rerun the command to resume).
"""

from __future__ import annotations

from jaxsftdpo.cli import config_flag, run_cli, workdir_flag
from jaxsftdpo.trainer import train_and_evaluate

_CONFIG = config_flag()
_WORKDIR = workdir_flag()


def main() -> None:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    run_cli(main, required={"config": "a config file, e.g. --config configs/quickstart.py",
                            "workdir": "the directory for this run's outputs"})
