"""A training run rebuilt from its workdir, for `evaluate` and `export`.

`load_run(workdir, step)` reads `workdir/config.json` (the resolved config the trainer wrote),
builds that config's model on a mesh (`trainer.build_model`), and restores the trainable state of
the named checkpoint, or of the newest one that restores, into it: the whole model for full
fine-tuning, the LoRA adapters for LoRA (the frozen base comes back from the model source, as in
training). It also keeps the trainable state as it was before training (`initial`: the starting
weights, or for LoRA adapters with B = 0, i.e. the base model), which evaluation uses as the DPO
reference.

Every problem a user can fix (no such workdir, no checkpoint, unknown step, a checkpoint that
does not fit the config) is a `UserError` raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import ml_collections as mlc

from jaxsftdpo.errors import UserError

# jax, flax and the model code are imported where needed, so that a mistyped workdir or step
# fails in a fraction of a second.

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
DIVERGED_FILE = "diverged.json"  # written by a run that diverged: step, stage, why
RESULTS_FILE = "results.json"    # written last, by a run that finished


@dataclasses.dataclass
class LoadedRun:
    workdir: Path
    config: mlc.ConfigDict
    step: int                 # global step of the restored checkpoint
    meta: dict                # the checkpoint's meta (stage, stage_step, evals so far)
    mesh: jax.sharding.Mesh
    family: object
    model_config: object
    graphdef: object
    trainable: nnx.State      # restored from the checkpoint
    initial: nnx.State        # the same leaves before training (LoRA: B = 0, i.e. the base)
    frozen: nnx.State
    tokenizer: object

    @property
    def finished(self) -> bool:
        return self.meta.get("stage", 0) >= len(self.config.stages)

    def model(self, trainable=None):
        """The model with `trainable` (default: the restored state) merged with the frozen part."""
        from flax import nnx
        return nnx.merge(self.graphdef, self.trainable if trainable is None else trainable,
                         self.frozen)


# ---- config and checkpoints -----------------------------------------------------------------

def _config_dict(value):
    """JSON -> ConfigDict, lists of dicts (the stages) included, so `stage.kind` works."""
    if isinstance(value, dict):
        return mlc.ConfigDict({k: _config_dict(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_config_dict(v) for v in value]
    return value


# Dict-valued keys taken as they are, not merged into the defaults: a model built from scratch
# is exactly the `model.init` it was trained with.
_WHOLE = {"model.init"}


def _merge(config: mlc.ConfigDict, data: dict, prefix: str = "") -> None:
    """`data` (config.json) over `config` (today's defaults), in place: a run saved before a key
    existed gets that key's default, so the code that reads it finds it."""
    from jaxsftdpo.config import stage
    with config.ignore_type():  # JSON has lists where the defaults may have tuples
        for key, value in data.items():
            name = prefix + key
            if key == "stages" and not prefix and isinstance(value, list):
                stages = []
                for item in value:
                    merged = stage(item.get("kind", "sft"))
                    _merge(merged, item)
                    stages.append(merged)
                config[key] = stages
            elif (isinstance(value, dict) and name not in _WHOLE and key in config
                  and isinstance(config[key], mlc.ConfigDict)):
                _merge(config[key], value, name + ".")
            else:
                config[key] = _config_dict(value)


def check_workdir(workdir) -> Path:
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist; pass the --workdir a training run "
                        f"wrote (python -m jaxsftdpo.train ... --workdir DIR)")
    if not (workdir / CONFIG_FILE).is_file():
        raise UserError(f"{workdir} has no {CONFIG_FILE}, so it is not a training run's workdir; "
                        f"pass the --workdir given to python -m jaxsftdpo.train")
    return workdir


def read_config(workdir) -> mlc.ConfigDict:
    """The run's resolved config from `workdir/config.json`, locked like a config file's."""
    path = check_workdir(workdir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file the trainer "
                        f"wrote") from e
    from jaxsftdpo.config import base_config
    config = base_config()
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a config; restore the file the trainer wrote")
    _merge(config, data)
    config.lock()
    return config


def checkpoint_steps(workdir) -> list[int]:
    """The global steps of the checkpoints in `workdir/checkpoints`, oldest first."""
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    # Orbax names finished checkpoints by their step; unfinished ones carry a tmp suffix.
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def pick_step(workdir, step: int | None = None) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise UserError(f"no checkpoint in {Path(workdir) / CHECKPOINT_DIR}; the run has not "
                        f"saved one yet: train it (python -m jaxsftdpo.train) or check --workdir")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UserError(f"no checkpoint at step {step} in {Path(workdir) / CHECKPOINT_DIR}; "
                        f"available steps: {', '.join(map(str, steps))}")
    return step


def _mesh(config, devices):
    from jaxsftdpo import sharding
    try:
        return sharding.make_mesh(config.mesh, devices)
    except UserError as e:
        # The run may have trained on more devices than this machine has: shard over the data
        # axis only, which fits any device count (checkpoints restore onto any mesh).
        print(f"note: {e}; using a data-parallel mesh over the devices present instead",
              file=sys.stderr)
        return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)


def _restore(workdir: Path, step: int | None, trainable):
    """`(step, trainable restored from checkpoint `step`, its meta)`; with `step` None, of the
    newest checkpoint that restores (those that do not are named in one line)."""
    from jaxsftdpo import checkpoint as ckpt

    fix = (f"restore the run's original {CONFIG_FILE}, or pass the workdir this checkpoint "
           f"belongs to")
    manager = ckpt.Manager(workdir / CHECKPOINT_DIR, keep=max(len(checkpoint_steps(workdir)), 1))
    try:
        if step is None:
            resume, restored, _ = ckpt.newest_restorable(
                manager, lambda r: r.params(trainable, fix),
                "retrain the run, or copy its checkpoints back from a backup")
        else:
            resume = manager.resume(step)
            restored = resume.params(trainable, fix)
    except ckpt.Unreadable as e:
        raise UserError(f"checkpoint {step} in {workdir / CHECKPOINT_DIR} cannot be restored "
                        f"({e}); pass another --step (available: "
                        f"{', '.join(map(str, checkpoint_steps(workdir)))})") from e
    finally:
        manager.close()  # stops orbax's background threads before the process exits
    return resume.step, restored, resume.meta


# ---- the run --------------------------------------------------------------------------------

def run_tokenizer(workdir: Path, config):
    """The tokenizer the trainer saved in the workdir, else the config's."""
    from jaxsftdpo.data.tokenizer import load_tokenizer
    saved = workdir / TOKENIZER_DIR
    if saved.is_dir() and any(saved.iterdir()):
        return load_tokenizer(str(saved))
    return load_tokenizer(config.model.tokenizer or config.model.name_or_path)


def load_run(workdir, step: int | None = None, *, devices=None) -> LoadedRun:
    """Rebuild the run in `workdir` at checkpoint `step` (default: the newest that restores)."""
    workdir = check_workdir(workdir)
    config = read_config(workdir)
    pick_step(workdir, step)  # no checkpoint, or no such step: before the model is built
    from jaxsftdpo.config import validate
    from jaxsftdpo.trainer import build_model
    try:
        validate(config)
    except UserError as e:
        raise UserError(f"{workdir / CONFIG_FILE}: {e}") from e
    mesh = _mesh(config, devices)
    family, model_config, graphdef, initial, frozen = build_model(config, mesh)
    step, trainable, meta = _restore(workdir, step, initial)
    tokenizer = run_tokenizer(workdir, config)
    return LoadedRun(workdir, config, step, meta, mesh, family, model_config, graphdef,
                     trainable, initial, frozen, tokenizer)
