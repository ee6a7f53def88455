"""`python -m jaxsftdpo.train --config configs/FILE.py[:ARG] --workdir DIR [--config.KEY=VALUE]`.

Runs (or resumes) the stages of the config in DIR. Bad input ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

from jaxsftdpo.cli import config_flag, run_cli, workdir_flag

_CONFIG = config_flag()
_WORKDIR = workdir_flag()


def main() -> None:
    from jaxsftdpo.trainer import train_and_evaluate
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if "stopped_at_step" in results:
        print(f"stopped at step {results['stopped_at_step']} with a checkpoint; rerun the same "
              f"command to resume")


if __name__ == "__main__":
    run_cli(main, required={"config": "a config file, e.g. --config configs/quickstart.py",
                            "workdir": "the directory for this run's outputs"})
