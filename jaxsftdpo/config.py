"""The run configuration: every key with its default, and validation that fails fast.

Config files (`configs/*.py`) start from `base_config()`, change what they need, and return the
locked result, so `--config.some.key=value` overrides of a key that does not exist fail at once.
"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import ml_collections as mlc

from jaxsftdpo.errors import UserError
from jaxsftdpo.losses import check_dpo_options, check_orpo_options, check_simpo_options

# Preference stages train on pairs (chosen and rejected rows in one forward); of them only dpo
# has a reference model.
PREFERENCE_KINDS = ("dpo", "orpo", "simpo")
STAGE_KINDS = ("sft", *PREFERENCE_KINDS)
PARAMS = ("fft", "lora")
REFERENCES = ("frozen_copy", "precomputed", "none")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PARALLEL_MODES = ("jit", "pmap")
BALANCES = ("none", "pairs", "all")
CLOZE_TASKS = ("yes_no", "paraphrase")


def stage(kind: str, *, epochs: int = 0, steps: int = 0, learning_rate: float = 1e-4,
          schedule: str = "constant", warmup_steps: int = 0, batch_size: int = 8,
          grad_accum: int = 1, weight_decay: float = 0.0, max_grad_norm: float = 1.0
          ) -> mlc.ConfigDict:
    """One training stage; it runs `steps` optimizer steps if > 0, else `epochs` epochs."""
    return mlc.ConfigDict(dict(
        kind=kind, epochs=epochs, steps=steps, learning_rate=learning_rate, schedule=schedule,
        warmup_steps=warmup_steps, batch_size=batch_size, grad_accum=grad_accum,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm))


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0

    c.model = mlc.ConfigDict()
    c.model.name_or_path = ""          # local HF dir or hub id; "" builds `model.init` from scratch
    c.model.init = mlc.ConfigDict(dict(model_type="gpt2", vocab_size=257, n_positions=128,
                                       n_embd=64, n_layer=2, n_head=4))
    c.model.init_seed = 0
    c.model.dtype = "float32"          # compute dtype; parameters and optimizer stay float32
    c.model.tokenizer = ""             # "" = the model's own; "bytes" = byte-level
    c.model.dropout = True             # the checkpoint's dropout in SFT; none in preference stages
    c.model.allow_pickle = False
    c.model.remat = False              # recompute each transformer block's activations in backward
    # positions whose logits the loss computes at a time (0: all): the [B,T,vocab] float32
    # logits never exist whole, the memory of large-vocabulary models (Llama 3: 128k)
    c.model.logits_chunk = 0

    c.data = mlc.ConfigDict()
    c.data.task = "yes_no"             # yes_no: the package's own synthetic task
    c.data.train = ""
    c.data.dev = ""
    c.data.n_train = 2048
    c.data.n_dev = 256
    c.data.max_length = 0              # 0 = the model's limit
    c.data.truncate = False            # False: a too-long sequence is an error
    c.data.eval_batch_size = 64
    # paraphrase / sonnets / jsonl (jaxsftdpo.tasks):
    c.data.test = ""                   # test inputs: predictions written, never scored
    c.data.dev_references = ""         # sonnets: the full dev sonnets that chrF scores against
    c.data.hub_dataset = ""            # "name" or "name:subset" on the hub instead of files
    c.data.hub_train_split = "train"
    c.data.hub_dev_split = "validation"
    c.data.scale = 1.0                 # fraction of the training examples kept (seeded subset)
    c.data.dev_limit = 0               # paraphrase: score only the first N dev pairs; 0 = all
    # paraphrase: N > 0 scores the last N rows of the training file instead of the dev file and
    # trains on the rest (to tune hyper-parameters without looking at the dev numbers)
    c.data.dev_from_train = 0
    # paraphrase / yes_no: each prompt becomes a user turn of the tokenizer's chat template,
    # followed by the generation prompt (as an Instruct model was trained); the answer follows
    c.data.chat_template = False
    # paraphrase / yes_no: keep as many training examples of each answer as the rarest has (a
    # seeded subset) for the preference pairs ("pairs") or for every stage ("all"). DPO on
    # one-token answers weighs every pair alike, so with more "no" pairs than "yes" its first
    # steps move the label prior; balanced pairs leave the prior out of the gradient.
    c.data.balance = "none"
    c.data.temperature = 1.2           # sonnets: sampling for evaluation and rejected answers
    c.data.top_p = 0.9
    c.data.max_new_tokens = 128
    c.data.eval_seeds = (0, 1, 2)      # sonnets: chrF is averaged over these sampling seeds
    c.data.eval_temperatures = ()      # sonnets: also chrF at these temperatures, `chrf_T{t}`
    c.data.pairing = "one_sample"      # sonnets: "one_sample" or "worst_of_k" (lowest chrF of k)
    c.data.pairing_k = 4

    c.stages = [stage("sft", epochs=1)]

    c.param = mlc.ConfigDict(dict(kind="fft", r=8, alpha=16.0, dropout=0.0,
                                  target_modules="all-linear", use_rslora=False))

    # loss_type: sigmoid, hinge, robust, ipo (length-normalised) as TRL's DPOTrainer defines
    # them, or cdpo (sigmoid with label_smoothing); label_smoothing only for cdpo and robust.
    # README "jaxsftdpo vs TRL" has the formulas.
    c.dpo = mlc.ConfigDict(dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                                sft_weight=0.0, reference="frozen_copy", reference_path=""))
    # The reference-free preference stages, on length-averaged completion log-probs, as TRL's
    # ORPOTrainer and CPOTrainer(loss_type="simpo", cpo_alpha=0) define them (README "jaxsftdpo
    # vs TRL"). orpo: the chosen completions' NLL + beta * the odds-ratio term (beta is the
    # paper's lambda, TRL's ORPOConfig.beta). simpo: -log_sigmoid(beta * (lc - lr) - gamma),
    # gamma the target reward margin (TRL's simpo_gamma), label_smoothing as cdpo's.
    c.orpo = mlc.ConfigDict(dict(beta=0.1))
    c.simpo = mlc.ConfigDict(dict(beta=2.0, gamma=0.5, label_smoothing=0.0))

    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # mode: "jit" (one program over the mesh) or "pmap" (data parallel over the local devices,
    # same losses); distributed: call jax.distributed.initialize() (multi-host; also done when
    # the environment asks for it, see sharding.maybe_initialize_distributed)
    c.parallel = mlc.ConfigDict(dict(mode="jit", distributed=False))

    c.log_every = 10
    c.eval_at_start = True             # score the model before training (the `start` row)
    c.eval_every = 0                   # 0 = at the end of every epoch
    c.checkpoint_every = 100           # steps; a checkpoint is also written at each stage's end
    c.keep_checkpoints = 2
    # A step whose loss or gradient norm is not finite stops the run (exit status 3); > 0: so
    # does a loss above max_loss.
    c.max_loss = 0.0
    # Peak FLOP/s of all the run's devices for the `mfu` metric; 0: the devices' known dense
    # bf16 peak (jaxsftdpo/flops.py), on CPU a measured float32 matmul rate.
    c.peak_flops = 0.0
    c.progress = True
    return c


def validate(c: mlc.ConfigDict) -> None:
    """Raise UserError on contradictory or out-of-range settings (types are checked by flags)."""
    def need(ok: bool, message: str):
        if not ok:
            raise UserError(message)

    need(len(c.stages) > 0 or c.eval_at_start,
         "config.stages is empty and config.eval_at_start is False: the run would do nothing; "
         "give a stage, e.g. [stage('sft', epochs=1)], or eval_at_start=True to only evaluate")
    for i, s in enumerate(c.stages):
        where = f"config.stages[{i}]"
        need(s.kind in STAGE_KINDS, f"{where}.kind={s.kind!r}; use one of {STAGE_KINDS}")
        need((s.epochs > 0) != (s.steps > 0),
             f"{where} needs exactly one of epochs > 0 or steps > 0 (got epochs={s.epochs}, "
             f"steps={s.steps})")
        need(s.batch_size > 0 and s.grad_accum > 0,
             f"{where}.batch_size and grad_accum must be positive")
        need(s.schedule in SCHEDULES, f"{where}.schedule={s.schedule!r}; use one of {SCHEDULES}")
        need(s.learning_rate > 0, f"{where}.learning_rate must be positive")
        need(s.warmup_steps >= 0, f"{where}.warmup_steps={s.warmup_steps}; use 0 or more")
    need(c.param.kind in PARAMS, f"config.param.kind={c.param.kind!r}; use one of {PARAMS}")
    if c.param.kind == "lora":
        need(c.param.r > 0, f"config.param.r must be positive; got {c.param.r}")
        need(0 <= c.param.dropout < 1,
             f"config.param.dropout={c.param.dropout}; use a probability in [0, 1)")
        _check_target_modules(c.param.target_modules)
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        need(c[key] >= 1, f"config.{key}={c[key]}; use 1 or more")
    need(c.eval_every >= 0, f"config.eval_every={c.eval_every}; use 0 (at the end of every "
                            f"epoch) or a number of steps")
    need(c.model.logits_chunk >= 0,
         f"config.model.logits_chunk={c.model.logits_chunk}; use 0 (all positions at once) or "
         f"the positions per chunk, e.g. 256")
    need(c.data.eval_batch_size >= 1,
         f"config.data.eval_batch_size={c.data.eval_batch_size}; use 1 or more")
    for key in ("dev_limit", "dev_from_train"):
        need(c.data[key] >= 0, f"config.data.{key}={c.data[key]}; use 0 (off) or a count")
    need(all(t > 0 for t in c.data.eval_temperatures),
         f"config.data.eval_temperatures={tuple(c.data.eval_temperatures)}; use positive "
         f"temperatures")
    need(c.max_loss >= 0, f"config.max_loss={c.max_loss}; use 0 (off) or a positive bound")
    need(c.peak_flops >= 0, f"config.peak_flops={c.peak_flops}; use 0 (the devices' own peak) or "
                            f"the FLOP/s of all the run's devices")
    need(c.data.balance in BALANCES,
         f"config.data.balance={c.data.balance!r}; use one of {BALANCES}")
    need(c.data.balance == "none" or c.data.task in CLOZE_TASKS,
         f"config.data.balance={c.data.balance!r} balances the answers of a cloze task "
         f"({', '.join(CLOZE_TASKS)}); task {c.data.task!r} has none, set it to none")
    need(c.dpo.reference in REFERENCES,
         f"config.dpo.reference={c.dpo.reference!r}; use one of {REFERENCES}")
    need(c.model.dtype in DTYPES,
         f"config.model.dtype={c.model.dtype!r}; use one of {tuple(DTYPES)}")
    for axis in ("data", "fsdp", "tensor"):
        size = c.mesh[axis]
        need(size == -1 or size > 0, f"config.mesh.{axis}={size}; use a positive size or -1")
    need(sum(c.mesh[a] == -1 for a in ("data", "fsdp", "tensor")) <= 1,
         "at most one config.mesh axis may be -1 (the rest of the devices)")
    need(c.parallel.mode in PARALLEL_MODES,
         f"config.parallel.mode={c.parallel.mode!r}; use one of {PARALLEL_MODES}")
    if c.parallel.mode == "pmap":
        need(c.mesh.fsdp == 1 and c.mesh.tensor == 1,
             f"config.parallel.mode=pmap is data parallel only but config.mesh has fsdp="
             f"{c.mesh.fsdp}, tensor={c.mesh.tensor}; set config.mesh.fsdp=1 and "
             f"config.mesh.tensor=1, or use parallel.mode=jit to shard parameters")
    need(c.model.name_or_path or c.model.init.get("model_type"),
         "set config.model.name_or_path, or config.model.init for a model built from scratch")
    kinds = {s.kind for s in c.stages}
    if "dpo" in kinds:
        check_dpo_options(c.dpo.loss_type, beta=c.dpo.beta, label_smoothing=c.dpo.label_smoothing)
    if "orpo" in kinds:
        check_orpo_options(beta=c.orpo.beta)
    if "simpo" in kinds:
        check_simpo_options(beta=c.simpo.beta, gamma=c.simpo.gamma,
                            label_smoothing=c.simpo.label_smoothing)


def _check_target_modules(target_modules) -> None:
    """`all-linear`, a regex over module paths, or a list of module names."""
    where = f"config.param.target_modules={target_modules!r}"
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise UserError(f"{where} is not a valid regex ({e}); use all-linear, a regex "
                            f"such as '.*attn.*', or a list of module names") from e
    elif not (isinstance(target_modules, (list, tuple)) and target_modules
              and all(isinstance(n, str) and n for n in target_modules)):
        raise UserError(f"{where}; use all-linear, a regex, or a list of module names")


def _differences(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: A -> B` for every dotted key (list items as `stages[1]`) whose value differs
    between two configs as JSON, `saved` first."""
    if isinstance(saved, dict) and isinstance(new, dict):
        keys = list(saved) + [k for k in new if k not in saved]
        return [d for k in keys for d in _differences(saved.get(k), new.get(k),
                                                       f"{prefix}.{k}" if prefix else k)]
    if isinstance(saved, list) and isinstance(new, list) and len(saved) == len(new):
        return [d for i, (a, b) in enumerate(zip(saved, new))
                for d in _differences(a, b, f"{prefix}[{i}]")]
    return [] if saved == new else [f"{prefix}: {json.dumps(saved)} -> {json.dumps(new)}"]


def describe_differences(saved: dict, new: dict, most: int = 3) -> str:
    """The first `most` differences of two configs, for a one-line message."""
    found = _differences(saved, new)
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return "; ".join(found[:most]) + more


def finalize(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """Lock a config file's result so unknown override keys fail."""
    c.lock()
    return c


# ---- the study's cells: `configs/paraphrase.py:schedule=sft9_dpo6,param=lora8` ------------------

# The course starter's SFT rate and the study's DPO rate (GPT-2 small, batch 8). LoRA trains at
# 10x those: an assumption, the study does not give its LoRA rates.
STUDY_LEARNING_RATES = {"sft": 1e-5, "dpo": 5e-6}
LORA_LEARNING_RATE_FACTOR = 10.0


def parse_cell_arg(arg: str, defaults: dict) -> dict:
    """`key=value,key=value` over `defaults`; an unknown key is an error."""
    cell = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise UserError(f"config argument {item!r}: use key=value with keys "
                            f"{sorted(defaults)}")
        if _is_number(defaults[key]) and not _is_number(value):
            raise UserError(f"config argument {item!r}: {key} takes a number (default "
                            f"{defaults[key]})")
        cell[key] = value
    return cell


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def parse_schedule(schedule: str) -> list[tuple[str, int]]:
    """`sft9_dpo6` -> [("sft", 9), ("dpo", 6)]."""
    parts = [re.fullmatch(r"(sft|dpo)(\d+)", p) for p in schedule.split("_")]
    if not all(parts) or any(int(p[2]) < 1 for p in parts):
        raise UserError(f"schedule={schedule!r}: use stages like sft15, dpo15 or sft9_dpo6")
    return [(p[1], int(p[2])) for p in parts]


def apply_study_training(c: mlc.ConfigDict, cell: dict) -> None:
    """The study's training of a cell (`param`, `schedule`): the parameterization, stages at
    the study's learning rates with batch 8, and DPO's sigmoid loss at beta 0.2."""
    factor = set_param(c, cell["param"])
    c.stages = [stage(kind, epochs=epochs, learning_rate=STUDY_LEARNING_RATES[kind] * factor,
                      batch_size=8) for kind, epochs in parse_schedule(cell["schedule"])]
    c.dpo.beta = 0.2
    c.dpo.loss_type = "sigmoid"


def set_param(c, param: str) -> float:
    """Full fine-tuning or LoRA of rank R; returns the learning-rate factor."""
    if param == "fft":
        c.param.kind = "fft"
        return 1.0
    match = re.fullmatch(r"lora(\d+)", param)
    if not match or int(match[1]) < 1:
        raise UserError(f"param={param!r}: use fft or loraR, e.g. lora8")
    c.param.update(kind="lora", r=int(match[1]), alpha=2.0 * int(match[1]))
    return LORA_LEARNING_RATE_FACTOR
