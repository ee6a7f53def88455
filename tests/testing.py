"""What the tests share: the configs they build (the quickstart shrunk to seconds, a tiny run of a
task) and `cli_exit`, a command's exit status and one-line report.

Changes are given as `{"dotted.key": value}`, as `--config.KEY=VALUE` gives them.
"""

import importlib.util
from pathlib import Path

import pytest

from jaxsftdpo import cli
from jaxsftdpo.config import base_config, finalize, stage

ROOT = Path(__file__).resolve().parents[1]

# A one-layer width-32 model and little data: for tests about devices, meshes and processes.
ONE_LAYER = {"model.init.n_positions": 64, "model.init.n_embd": 32, "model.init.n_layer": 1,
             "model.init.n_head": 4, "data.n_train": 32, "data.n_dev": 8,
             "data.eval_batch_size": 8}


def set_keys(config, changes: dict):
    """`config.a.b = value` for every `"a.b": value` of `changes`; returns `config`."""
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def quickstart_config(**changes):
    """configs/quickstart.py as `--config` loads it, without the progress bar, then `changes`."""
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "configs/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.progress = False
    return set_keys(config, changes)


def tiny_config(sft_steps=4, dpo_steps=3, *, batch_size=16, grad_accum=1, **changes):
    """The quickstart shrunk to seconds: a 2-layer width-64 GPT-2, `sft_steps` of SFT then
    `dpo_steps` of DPO (a stage of 0 steps is left out), a metrics row every step."""
    config = quickstart_config(**{"data.n_train": 64, "data.n_dev": 32, "log_every": 1,
                                  "checkpoint_every": 1000})
    config.stages = [stage(kind, steps=n, batch_size=batch_size, grad_accum=grad_accum,
                           learning_rate=1e-3)
                     for kind, n in (("sft", sft_steps), ("dpo", dpo_steps)) if n]
    return set_keys(config, changes)


def task_config(task, stages, **data):
    """A tiny run of `task` on the byte tokenizer: base_config's 2-layer GPT-2 (SFT dropout on,
    no BOS/EOS ids), `stages`, and `data` (`config.data` keys) for the task's files."""
    config = set_keys(base_config(), {
        "model.tokenizer": "bytes", "model.init.n_positions": 128, "model.init.n_embd": 64,
        "model.init.n_layer": 2, "model.init.n_head": 4, "data.task": task, "dpo.beta": 0.2,
        "progress": False, "log_every": 1000, "checkpoint_every": 10_000})
    config.data.update(data)
    config.stages = stages
    return finalize(config)


def cli_exit(capsys, fn) -> tuple[int, str]:
    """`(exit status, the one stderr line)` of `fn` run as the CLIs run their main."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        cli.run_cli(fn, argv=["train"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return ended.value.code, lines[0]
