"""A run built from its config: the one place that turns a config into what train, evaluate and
export work on.

`build_run(config)` gives a `Run`: the mesh, the config's model placed on it and split into the
trainable and the frozen part (LoRA adapters added for `param.kind == 'lora'`), the tokenizer,
the maximum sequence length, the task and, with `dpo.reference_path`, the DPO reference model.
Every problem a user can fix raises a `UserError` before anything is written.
`abstract_model(config)` is the same model as shapes only, for planning (`jaxsftdpo.plan`).

`load_run(workdir, step)` builds the `Run` of the config a training run saved in its workdir
(`config.json`) and restores a checkpoint's trainable state into it: the whole model for full
fine-tuning, the adapters for LoRA (the frozen base comes back from the model source, as in
training). `initial` keeps the trainable state before training (the starting weights; for LoRA
adapters with B = 0, i.e. the base model).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import ml_collections as mlc
from flax import nnx

from jaxsftdpo import checkpoint as ckpt
from jaxsftdpo import lora, sharding
from jaxsftdpo.config import DTYPES, base_config, describe_differences, stage, validate
from jaxsftdpo.data.tokenizer import Tokenizer, load_tokenizer
from jaxsftdpo.errors import UserError
from jaxsftdpo.models import FAMILIES, from_pretrained, load_config
from jaxsftdpo.models.family import ModelConfig, ModelFamily
from jaxsftdpo.policy import Policy
from jaxsftdpo.tasks import ClozeTask, JsonlTask, SonnetTask, make_task

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
DIVERGED_FILE = "diverged.json"  # written by a run that diverged: step, stage, why
RESULTS_FILE = "results.json"    # written last, by a run that finished


@dataclasses.dataclass
class ReferenceModel:
    """A DPO reference other than the policy at the hand-off (`dpo.reference_path`): another
    model's whole state, placed on the run's mesh by its own family's rules."""

    source: str
    graphdef: nnx.GraphDef
    params: nnx.State
    rest: nnx.State           # its non-trainable variables (none for most models)

    @property
    def state(self) -> tuple:
        return self.params, self.rest


@dataclasses.dataclass
class Run:
    config: mlc.ConfigDict
    mesh: jax.sharding.Mesh
    family: ModelFamily
    model_config: ModelConfig
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    tokenizer: Tokenizer
    max_length: int
    initial: nnx.State | None       # the trainable state before training
    task: ClozeTask | SonnetTask | JsonlTask | None = None
    reference: ReferenceModel | None = None
    workdir: Path | None = None     # load_run: the workdir, checkpoint step and position
    step: int | None = None
    position: ckpt.Position | None = None

    @property
    def rules(self):
        return self.family.PARTITION_RULES

    @property
    def finished(self) -> bool:
        """Whether the restored checkpoint is after the last stage."""
        return self.position is not None and self.position.stage >= len(self.config.stages)

    def model(self, trainable=None) -> nnx.Module:
        """The model with `trainable` (default: the current state) merged with the frozen part."""
        return nnx.merge(self.graphdef, self.trainable if trainable is None else trainable,
                         self.frozen)

    def policy(self, trainable=None) -> Policy:
        """The model with `trainable` (default: the current state) as tasks use it."""
        return Policy(self.graphdef, self.trainable if trainable is None else trainable,
                      self.frozen, self.tokenizer, self.mesh, self.max_length)

    def reference_policy(self) -> Policy | None:
        """The DPO reference model of `dpo.reference_path` as tasks use it, or None."""
        if self.reference is None:
            return None
        return Policy(self.reference.graphdef, self.reference.params, self.reference.rest,
                      self.tokenizer, self.mesh, self.max_length)


# ---- building -----------------------------------------------------------------------------

def build_run(config: mlc.ConfigDict, devices=None, *, mesh=None, tokenizer=None,
              task: bool = True, reference: bool = True) -> Run:
    """The run of `config` on a mesh over `devices` (default: all; or the given `mesh`), with
    `tokenizer` (default: the config's); with `task`, the task's data read and checked; with
    `reference`, the model of `dpo.reference_path` loaded."""
    validate(config)
    mesh = sharding.make_mesh(config.mesh, devices) if mesh is None else mesh
    family, model_config, graphdef, trainable, frozen = build_model(config, mesh)
    tokenizer = tokenizer or load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    max_length = max_length_of(config, model_config)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_config.vocab_size}; use the model's own tokenizer")
    run = Run(config, mesh, family, model_config, graphdef, trainable, frozen, tokenizer,
              max_length, initial=trainable)
    if task:
        run.task = make_task(config.data, tokenizer, max_length, config.seed)
    if reference and config.dpo.reference_path:
        run.reference = load_reference(config.dpo.reference_path, config, mesh, tokenizer)
    return run


def build_model(config: mlc.ConfigDict, mesh):
    """`(family, model config, graphdef, trainable, frozen)` of the config's model on the mesh,
    with LoRA adapters when `config.param.kind == 'lora'` (fresh ones: B = 0)."""
    family, model = _load_model(config, mesh)
    graphdef, trainable, frozen = lora.split_trainable(_adapt(model, config), config.param.kind)
    trainable = sharding.place_state(trainable, mesh, family.PARTITION_RULES)
    frozen = sharding.place_state(frozen, mesh, family.PARTITION_RULES)
    return family, model.config, graphdef, trainable, frozen


def abstract_model(config: mlc.ConfigDict):
    """`(family, model config, graphdef, trainable, frozen)` as `build_model` gives them, the
    states as `jax.ShapeDtypeStruct`s: nothing allocated and no weight read (of a pretrained
    model only its config.json or GGUF metadata)."""
    m = config.model
    family, model_config = model_family_config(m.name_or_path, m.init, m.dtype,
                                               **_runtime_fields(config))
    model = nnx.eval_shape(lambda: _adapt(family.build(model_config, m.init_seed), config))
    graphdef, trainable, frozen = lora.split_trainable(model, config.param.kind)
    return family, model.config, graphdef, trainable, frozen


def _adapt(model: nnx.Module, config: mlc.ConfigDict) -> nnx.Module:
    """`model` with the config's LoRA adapters (fresh ones: B = 0), in place."""
    if config.param.kind == "lora":
        p = config.param
        lora.apply_lora(model, r=p.r, alpha=p.alpha, dropout=p.dropout,
                        target_modules=_targets(p.target_modules), use_rslora=p.use_rslora,
                        seed=config.seed)
    return model


def _runtime_fields(config: mlc.ConfigDict) -> dict:
    """The model config's fields that `config.model` sets for training, beside the dtype."""
    return dict(remat=bool(config.model.remat), logits_chunk=int(config.model.logits_chunk))


def _targets(target_modules):
    return list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules


def model_family_config(name_or_path: str, init, dtype: str, **overrides):
    """`(family, model config)` of a model source as `config.model` gives one: a Hugging Face
    directory, hub id or GGUF file (`name_or_path`: its config.json or metadata, no weight), or
    else the `init` dict of a model built from scratch; `dtype` is the compute dtype's name, the
    other `overrides` go to the model config (`remat`, `logits_chunk`)."""
    if name_or_path:
        return load_config(name_or_path, dtype=DTYPES[dtype], **overrides)
    init = dict(init)
    model_type = init["model_type"]
    if model_type not in FAMILIES:
        raise UserError(f"config.model.init.model_type={model_type!r} is not supported; use one "
                        f"of {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    return family, family.Config.from_hf(init, dtype=DTYPES[dtype], **overrides)


def _load_model(config, mesh):
    runtime = _runtime_fields(config)
    if config.model.name_or_path:
        return _pretrained(config.model.name_or_path, mesh, DTYPES[config.model.dtype],
                           config.model.allow_pickle, **runtime)
    family, model_config = model_family_config("", config.model.init, config.model.dtype,
                                               **runtime)
    sharding.check_heads(model_config, mesh)
    abstract = nnx.eval_shape(lambda: family.build(model_config, config.model.init_seed))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abstract_state, mesh, family.PARTITION_RULES)

    def init_params():
        return nnx.state(family.build(model_config, config.model.init_seed))

    state = jax.jit(init_params, out_shardings=shardings)()
    return family, nnx.merge(graphdef, state)


def _pretrained(name_or_path: str, mesh, dtype, allow_pickle: bool, **overrides):
    """`(family, model)` of a Hugging Face directory, hub id or GGUF file, loaded straight into
    the shardings its family's partition rules give; `overrides` go to the model config."""
    family, model_config = load_config(name_or_path)
    sharding.check_heads(model_config, mesh)
    model = from_pretrained(name_or_path, dtype=dtype,
                            shardings=sharding.sharding_fn(mesh, family.PARTITION_RULES),
                            allow_pickle=allow_pickle, **overrides)
    return family, model


def max_length_of(config, model_config) -> int:
    """The longest sequence of a run: `data.max_length` (0: the model's own limit), within the
    model's positions."""
    limit = model_config.max_length
    max_length = config.data.max_length or limit
    if max_length > limit:
        raise UserError(f"config.data.max_length={max_length} exceeds the model's {limit} "
                        f"positions; lower it to at most {limit}")
    return max_length


# ---- the DPO reference of dpo.reference_path ----------------------------------------------

def load_reference(source: str, config, mesh, tokenizer) -> ReferenceModel:
    """The model at `source` (a Hugging Face directory or hub id, a GGUF file, or another
    training run's workdir: its newest checkpoint, LoRA adapters merged) as a DPO reference on
    `mesh`; its tokenizer must be the policy's `tokenizer`."""
    where = f"config.dpo.reference_path={source!r}"
    logits_chunk = int(config.model.logits_chunk)
    if is_workdir(source):
        other = load_run(source, devices=list(mesh.devices.flat))
        _check_same_vocabulary(other.tokenizer, tokenizer, where)
        family, model = other.family, lora.merge_lora(other.model())
        # built by the other run's config; it scores with this run's logits chunk
        model.config = dataclasses.replace(model.config, logits_chunk=logits_chunk)
    else:
        _check_same_vocabulary(load_tokenizer(source), tokenizer, where)
        family, model = _pretrained(source, mesh, DTYPES[config.model.dtype],
                                    config.model.allow_pickle, logits_chunk=logits_chunk)
    graphdef, params, rest = lora.split_trainable(model, "fft")
    return ReferenceModel(source, graphdef,
                          sharding.place_state(params, mesh, family.PARTITION_RULES),
                          sharding.place_state(rest, mesh, family.PARTITION_RULES))


def _check_same_vocabulary(reference, policy, where: str) -> None:
    """DPO compares log-probs of the same token ids under both models, so both must read text
    into the same ids."""
    ours, theirs = policy.vocabulary(), reference.vocabulary()
    if ours == theirs:
        return
    if len(ours) != len(theirs):
        detail = f"{len(theirs)} tokens there, {len(ours)} in the policy's"
    else:
        token = next(t for t in sorted(ours) if theirs.get(t) != ours[t])
        detail = f"token {token!r} is id {theirs.get(token)} there, {ours[token]} in the policy's"
    raise UserError(f"{where}: its tokenizer is not the policy's ({detail}); DPO compares "
                    f"log-probs of the same token ids, so give a reference with the policy's "
                    f"tokenizer")


# ---- a run saved in its workdir -----------------------------------------------------------

def is_workdir(path) -> bool:
    """Whether `path` is a training run's workdir (its config.json beside checkpoints/)."""
    path = Path(path).expanduser()
    return (path / CONFIG_FILE).is_file() and (path / CHECKPOINT_DIR).is_dir()


def check_workdir(workdir) -> Path:
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist; pass the --workdir a training run "
                        f"wrote (python -m jaxsftdpo.train ... --workdir DIR)")
    if not (workdir / CONFIG_FILE).is_file():
        raise UserError(f"{workdir} has no {CONFIG_FILE}, so it is not a training run's workdir; "
                        f"pass the --workdir given to python -m jaxsftdpo.train")
    return workdir


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


def read_config(workdir) -> mlc.ConfigDict:
    """The run's resolved config from `workdir/config.json`, locked like a config file's."""
    path = check_workdir(workdir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file the trainer "
                        f"wrote") from e
    config = base_config()
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a config; restore the file the trainer wrote")
    _merge(config, data)
    config.lock()
    return config


def config_changes(workdir, config: mlc.ConfigDict) -> str:
    """How `config` differs from the one the run in `workdir` saved ('' when it does not); a
    key added to jaxsftdpo since the run was saved counts as its default value."""
    saved = json.loads(read_config(workdir).to_json_best_effort())
    return describe_differences(saved, json.loads(config.to_json_best_effort()))


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


def saved_tokenizer(workdir: Path):
    """The tokenizer the trainer saved in the workdir, or None (then the config's is used)."""
    saved = workdir / TOKENIZER_DIR
    return load_tokenizer(str(saved)) if saved.is_dir() and any(saved.iterdir()) else None


def _mesh(config, devices):
    try:
        return sharding.make_mesh(config.mesh, devices)
    except UserError as e:
        # The run may have trained on more devices than this machine has: shard over the data
        # axis only, which fits any device count (checkpoints restore onto any mesh).
        print(f"note: {e}; using a data-parallel mesh over the devices present instead",
              file=sys.stderr)
        return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)


def _restore(workdir: Path, step: int | None, trainable):
    """`(step, trainable restored from checkpoint `step`, its position)`; with `step` None, of
    the newest checkpoint that restores (those that do not are named in one line)."""
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
    return resume.step, restored, resume.position


def load_run(workdir, step: int | None = None, *, devices=None, task: bool = False,
             reference: bool = False) -> Run:
    """The run in `workdir` at checkpoint `step` (default: the newest that restores); with
    `task`, its task's data read, with `reference`, its `dpo.reference_path` model loaded."""
    workdir = check_workdir(workdir)
    config = read_config(workdir)
    pick_step(workdir, step)  # no checkpoint, or no such step: before the model is built
    try:
        validate(config)
    except UserError as e:
        raise UserError(f"{workdir / CONFIG_FILE}: {e}") from e
    run = build_run(config, mesh=_mesh(config, devices),
                    tokenizer=saved_tokenizer(workdir), task=task, reference=reference)
    run.step, run.trainable, run.position = _restore(workdir, step, run.initial)
    run.workdir = workdir
    return run
