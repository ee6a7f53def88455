"""`python -m jaxsftdpo.plan --config CONFIG --topology NAME [--json PATH] [--max_batch]
[--config.KEY=VALUE]`: will the config's training fit on a TPU slice, before you rent one?

Compiles every step the config would run, with the real TPU compiler of libtpu's compile-only
client (no TPU needed: `pip install -e ".[tpu]"`), for the slice NAME (`v5e:2x4`, `v4:2x2x1`,
`v5p:2x2x1`, `v6e:2x2`, ...): each stage's train step (its micro-batch, batch_size /
grad_accum, padded to `data.max_length`; LoRA or full fine-tuning; DPO with its reference) and,
for `dpo.reference = "precomputed"`, the pass that computes the reference log-probs. The
config's mesh is laid over the slice's chips as a real run lays it over `jax.devices()`. Only
the model's config is read (config.json, GGUF metadata or `model.init`): no weight, tokenizer
or data. The LM head is planned at every position: the most any data can ask.

Per step it reports whether it fits the chips' HBM, its memory per chip
(`compiled.memory_analysis()`), its FLOPs per chip (`compiled.cost_analysis()`), a roofline
estimate of its time and the MFU bound that time implies, and how long it took to compile;
`--max_batch` adds the largest micro-batch that fits. `--json PATH` writes the same as JSON.

Exit status: 0 planned (a step the compiler refuses for memory is an answer: `fits: false`);
2 bad input, libtpu missing, or a step that failed to compile for another reason (one line on
stderr).

`parallel.mode = "pmap"` computes what the jit step over a data mesh computes; that is what is
planned.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsftdpo import flops, lora, runs, sharding, steps
from jaxsftdpo.cli import config_flag, run_cli
from jaxsftdpo.config import PREFERENCE_KINDS, validate
from jaxsftdpo.errors import UserError, first_line, one_line

# Topologies whose chips have two TensorCores that JAX drives as one device.
MEGACORE = ("v4", "v5p")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
ESTIMATE_NOTE = ("estimated_seconds is a roofline, not a measurement: the largest of the "
                 "compiled step's FLOPs over the chip's bf16 peak, its HBM bytes over HBM "
                 "bandwidth and its collective bytes over ICI bandwidth; the MFU bound is the "
                 "model FLOPs utilisation a step that fast would reach")


# ---- the slice ------------------------------------------------------------------------------

@dataclasses.dataclass
class Slice:
    name: str
    chip: flops.TPUChip
    devices: list


def tpu_slice(name: str) -> Slice:
    """The compile-only devices of the TPU slice `name` (`v5e:2x4`)."""
    version, _, shape = name.partition(":")
    if version not in flops.TPU_CHIPS or not re.fullmatch(r"\d+(x\d+)+", shape):
        raise UserError(f"--topology {name!r} is not a TPU slice this knows; give "
                        f"VERSION:SHAPE with VERSION one of {', '.join(flops.TPU_CHIPS)}, "
                        f"e.g. v5e:2x4 or v4:2x2x1")
    if importlib.util.find_spec("libtpu") is None:
        raise UserError('planning for a TPU needs libtpu, its compiler (no TPU needed): '
                        'pip install -e ".[tpu]"')
    # Off a TPU VM there is no metadata server to ask for the attached slice, and libtpu
    # warns on stderr about what it could not find; the topology says what is planned.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Any JAX process on this machine started without JAX_PLATFORMS=cpu loaded libtpu and
    # holds its lock file; compiling uses no chip, so share the library.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=name,
            chip_config_name="megacore" if version in MEGACORE else "default")
    except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
        raise UserError(f"--topology {name}: libtpu has no such slice ({first_line(e)})") from e
    return Slice(name, flops.TPU_CHIPS[version], list(topology.devices))


# ---- what each step takes, as shapes on the mesh --------------------------------------------

def _on(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _placed(state, mesh, rules):
    return _on(state, sharding.state_shardings(state, mesh, rules))


def _batch(kind: str, rows: int, length: int, mesh, leading: tuple = (),
           reference_logps: bool = False) -> dict:
    """A batch as the trainer gives it to a step: `[*leading, rows, length]` token ids and masks
    (with chosen_/rejected_ prefixes for a preference kind), plus precomputed reference
    log-probs `[*leading, rows]`."""
    shape, spec = (*leading, rows, length), sharding.batch_sharding(mesh, len(leading))
    prefixes = ("chosen_", "rejected_") if kind in PREFERENCE_KINDS else ("",)
    batch = {}
    for prefix in prefixes:
        batch[f"{prefix}input_ids"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec)
        for mask in ("attention_mask", "loss_mask"):
            batch[f"{prefix}{mask}"] = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=spec)
    if reference_logps:
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[name] = jax.ShapeDtypeStruct(shape[:-1], jnp.float32, sharding=spec)
    return batch


@dataclasses.dataclass
class Model:
    """A model as shapes on the mesh: what a step merges into a network."""

    config: object
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State


def policy_model(config: mlc.ConfigDict, mesh) -> Model:
    family, model_config, graphdef, trainable, frozen = runs.abstract_model(config)
    sharding.check_heads(model_config, mesh)
    rules = family.PARTITION_RULES
    return Model(model_config, graphdef, _placed(trainable, mesh, rules),
                 _placed(frozen, mesh, rules))


def reference_model(config: mlc.ConfigDict, mesh) -> Model:
    """The model of `dpo.reference_path` as `runs.load_reference` builds it (a training run's
    adapters merged, so the base model's shapes), its parameters as the trainable part."""
    source = config.dpo.reference_path
    model = config.model
    if runs.is_workdir(source):
        model = runs.read_config(source).model
        source = model.name_or_path
    family, model_config = runs.model_family_config(
        source, model.init, model.dtype, logits_chunk=int(config.model.logits_chunk))
    sharding.check_heads(model_config, mesh)
    abstract = nnx.eval_shape(lambda: family.build(model_config))
    graphdef, params, rest = lora.split_trainable(abstract, "fft")
    rules = family.PARTITION_RULES
    return Model(model_config, graphdef, _placed(params, mesh, rules), _placed(rest, mesh, rules))


# ---- the steps a config runs ----------------------------------------------------------------

@dataclasses.dataclass
class Step:
    """One compiled program of the run: `fn(*args(rows))` at a batch of `rows` (the
    micro-batch of a train step; a reference pass's batch)."""

    name: str                 # "train_step" or "reference_pass"
    stage: int
    kind: str                 # the stage's kind
    rows: int
    grad_accum: int
    length: int
    fn: Callable              # jitted
    args: Callable[[int], tuple]
    model_flops: Callable[[int], float]   # model FLOPs of the whole step at `rows`, all chips


def config_steps(config: mlc.ConfigDict, mesh) -> list[Step]:
    """Every program the stages of `config` compile, in the order a run compiles them."""
    policy = policy_model(config, mesh)
    length = runs.max_length_of(config, policy.config)
    reference = (reference_model(config, mesh) if config.dpo.reference_path and
                 any(s.kind == "dpo" for s in config.stages) else None)
    planned = []
    for index, stage in enumerate(config.stages):
        micro_batch = _micro_batch(stage, index, mesh)
        if stage.kind == "dpo" and config.dpo.reference == "precomputed":
            planned.append(_reference_pass(reference or policy, index, micro_batch, length,
                                           mesh))
        planned.append(_train_step(config, policy, reference, index, stage, micro_batch,
                                   length, mesh))
    return planned


def _micro_batch(stage, index: int, mesh) -> int:
    where = f"config.stages[{index}] ({stage.kind})"
    if stage.batch_size % stage.grad_accum:
        raise UserError(f"{where}: batch_size {stage.batch_size} is not divisible by "
                        f"grad_accum {stage.grad_accum}")
    micro_batch = stage.batch_size // stage.grad_accum
    sharding.check_batch_size(micro_batch, mesh, f"{where} micro-batch (batch_size / "
                                                 f"grad_accum)")
    return micro_batch


def _train_step(config, policy: Model, reference: Model | None, index: int, stage,
                micro_batch: int, length: int, mesh) -> Step:
    kind = stage.kind
    tx, _ = steps.make_optimizer(stage, max(stage.steps, 1))  # the schedule's length: no shape
    state = _train_state(tx, policy.trainable)
    settings = steps.objective_settings(config, kind,
                                        None if reference is None else reference.graphdef)
    step_fn = steps.make_train_step(kind, policy.graphdef, tx, settings,
                                    jax.tree.map(lambda x: x.sharding, state))
    ref = None
    if kind == "dpo" and config.dpo.reference == "frozen_copy":
        # The hand-off policy's trainable part, or the other model's whole state.
        ref = policy.trainable if reference is None else (reference.trainable, reference.frozen)
    precomputed = kind == "dpo" and config.dpo.reference == "precomputed"
    rng = _dropout_key(mesh) if kind == "sft" and config.model.dropout else None
    accum = stage.grad_accum

    def args(rows: int):
        batch = _batch(kind, rows, length, mesh, (accum,), precomputed)
        return state, policy.frozen, ref, batch, rng

    sequences = 1 if kind == "sft" else 2  # a pair is two rows of the forward
    per_token = flops.model_flops_per_token(policy.config, length)
    return Step("train_step", index, kind, micro_batch, accum, length, step_fn, args,
                lambda rows: per_token * sequences * rows * accum * length)


def _reference_pass(model: Model, index: int, micro_batch: int, length: int, mesh) -> Step:
    # The trainer's pass goes at the stage's micro-batch, which _micro_batch checked divides
    # the batch devices.
    rows = micro_batch

    def args(rows: int):
        return model.graphdef, model.trainable, model.frozen, _batch("dpo", rows, length,
                                                                      mesh)

    per_token = flops.model_flops_per_token(model.config, length, training=False)
    return Step("reference_pass", index, "dpo", rows, 1, length, steps.pair_logps, args,
                lambda rows: per_token * 2 * rows * length)


def _train_state(tx, trainable) -> steps.TrainState:
    shardings = steps.train_state_shardings(tx, trainable)
    return steps.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                            trainable, _on(jax.eval_shape(tx.init, trainable),
                                           shardings.opt_state))


def _dropout_key(mesh):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


# ---- compiling and reading the compiled program ---------------------------------------------

def compile_step(step: Step, rows: int, tpu: Slice) -> dict:
    """The plan of `step` at `rows`: the compiled program's memory, FLOPs and roofline, or
    `fits: false` with the bytes the compiler asked for."""
    args = step.args(rows)
    start = time.perf_counter()
    try:
        compiled = step.fn.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - what the TPU compiler raises varies
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise UserError(f"{step.name} of config.stages[{step.stage}] ({step.kind}) did "
                            f"not compile for {tpu.name}: {one_line(e, 300)}") from e
        return {**_refused(e, _bytes_per_chip(args)),
                "compile_seconds": round(time.perf_counter() - start, 2)}
    seconds = time.perf_counter() - start
    return {"fits": True, **_memory(compiled), **_roofline(compiled, step, rows, tpu),
            "compile_seconds": round(seconds, 2)}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    # Donated inputs (the train state) share their buffers with the outputs they become.
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return {"peak_bytes_per_chip": peak, "argument_bytes": m.argument_size_in_bytes,
            "output_bytes": m.output_size_in_bytes, "temp_bytes": m.temp_size_in_bytes}


def _roofline(compiled, step: Step, rows: int, tpu: Slice) -> dict:
    cost = compiled.cost_analysis()
    # The cost analysis counts a loop's body once, and the micro-batch loop runs grad_accum
    # times; scaling the whole program by it also repeats the optimizer update, a small part.
    repeats = step.grad_accum
    flops_per_chip = repeats * cost.get("flops", 0.0)
    hbm_bytes = repeats * cost.get("bytes accessed", 0.0)
    collective = repeats * collective_bytes(compiled.as_text())
    chip = tpu.chip
    seconds = max(flops_per_chip / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth,
                  collective / chip.ici_bandwidth)
    model_flops = step.model_flops(rows) / len(tpu.devices)
    return {"flops_per_chip": flops_per_chip, "hbm_bytes_accessed": hbm_bytes,
            "collective_bytes": collective, "estimated_seconds": seconds,
            "mfu_bound": model_flops / (seconds * chip.peak_flops) if seconds else None}


def collective_bytes(hlo: str) -> int:
    """Bytes the collectives of a compiled (per-chip) HLO module move: each all-gather,
    all-reduce, reduce-scatter, all-to-all and collective-permute counted by its largest
    array, once (in a loop's body too)."""
    ops = "|".join(COLLECTIVES)
    total = 0
    for line in hlo.splitlines():
        match = re.search(rf"=\s*(.*?)\s(?:{ops})(?:-start)?\(", line)
        if match:
            arrays = re.findall(r"\b(\w+)\[([\d,]*)\]", match[1])
            total += max((_ITEM_BYTES.get(dtype, 4) * math.prod(map(int, filter(None,
                          dims.split(",")))) for dtype, dims in arrays), default=0)
    return total


def _bytes_per_chip(tree) -> int:
    """The bytes one chip holds of the arrays `tree` describes (ShapeDtypeStructs with
    shardings)."""
    def shard(x):
        return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return sum(shard(x) for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct))


def _refused(error: Exception, argument_bytes: int) -> dict:
    """A step the compiler refused for memory: the bytes it asked for, from its message
    ('... HLO temporaries (21.98G) exceeds available HBM (15.75G)'), over its arguments."""
    text = one_line(error)
    sizes = [float(n) * _UNITS[u] for n, u in re.findall(r"\((\d+(?:\.\d+)?)([KMGT]?)\)", text)]
    temp = int(sizes[0]) if sizes else None
    return {"fits": False, "peak_bytes_per_chip": None if temp is None else argument_bytes + temp,
            "argument_bytes": argument_bytes, "output_bytes": None, "temp_bytes": temp,
            "flops_per_chip": None, "estimated_seconds": None, "mfu_bound": None,
            "refusal": text[:300]}


def largest_fitting(fits: Callable[[int], bool], start: int, unit: int) -> int:
    """The largest multiple of `unit` for which `fits`: doubling (or halving) from `start`, a
    multiple of `unit`, then bisection; 0 if not even `unit` fits."""
    k = start // unit
    if fits(k * unit):
        lo, hi = k, 2 * k
        while fits(hi * unit):
            lo, hi = hi, 2 * hi
    else:
        lo, hi = k // 2, k
        while lo and not fits(lo * unit):
            lo, hi = lo // 2, lo
        if not lo:
            return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * unit) else (lo, mid)
    return lo * unit


# ---- the plan -------------------------------------------------------------------------------

def plan(config: mlc.ConfigDict, topology: str, *, max_batch: bool = False) -> dict:
    """The plan of `config` on the TPU slice `topology` (the module doc; the JSON written)."""
    validate(config)
    tpu = tpu_slice(topology)
    try:
        mesh = sharding.make_mesh(config.mesh, tpu.devices)
    except UserError as e:
        raise UserError(f"--topology {topology} has {len(tpu.devices)} chips: {e}") from e
    with sharding.tracing_on(mesh):  # how the trainer traces its passes
        rows = [_planned(step, config, tpu, mesh, max_batch)
                for step in config_steps(config, mesh)]
    return {"topology": topology, "device_kind": tpu.devices[0].device_kind,
            "chips": len(tpu.devices), "hbm_bytes_per_chip": tpu.chip.hbm_bytes,
            "mesh": dict(mesh.shape), "note": ESTIMATE_NOTE, "steps": rows}


def _planned(step: Step, config: mlc.ConfigDict, tpu: Slice, mesh, max_batch: bool) -> dict:
    """The JSON row of `step`: its plan at its micro-batch, and with `max_batch` the largest
    micro-batch that fits and the plan there."""
    result = compile_step(step, step.rows, tpu)
    row = {"name": step.name, "stage": step.stage, "kind": step.kind,
           "param": config.param.kind, "micro_batch": step.rows,
           "grad_accum": step.grad_accum, "length": step.length, **result}
    if max_batch:
        tried = {step.rows: result}

        def fits(rows):
            if rows not in tried:
                tried[rows] = compile_step(step, rows, tpu)
            return tried[rows]["fits"]
        largest = largest_fitting(fits, step.rows, sharding.batch_divisor(mesh))
        row["max_micro_batch"] = largest
        row["at_max_micro_batch"] = tried.get(largest)
    return row


def table(report: dict) -> str:
    """The plan as text: a line per step, and with --max_batch one at its largest
    micro-batch that fits."""
    head = (f"{report['topology']}: {report['chips']} x {report['device_kind']}, "
            f"{_gib(report['hbm_bytes_per_chip'])} GiB HBM per chip, mesh "
            f"{report['mesh']}")
    columns = ["stage", "step", "batch", "fits", "peak GiB", "args GiB", "temp GiB",
               "TFLOP/chip", "est. s", "MFU bound", "compile s"]
    lines = []
    for s in report["steps"]:
        where = [f"{s['stage']} {s['kind']} {s['param']}", s["name"]]
        lines.append(where + _cells(s, s["micro_batch"], s))
        if s.get("at_max_micro_batch"):
            lines.append(["", "largest that fits"]
                         + _cells(s, s["max_micro_batch"], s["at_max_micro_batch"]))
        elif "max_micro_batch" in s:
            lines.append(["", "largest that fits", "none"] + [""] * (len(columns) - 3))
    widths = [max(len(str(c)) for c in column) for column in zip(columns, *lines)]
    render = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa
    return "\n".join([head, render(columns), *map(render, lines), report["note"] + "."])


def _cells(step: dict, rows: int, result: dict) -> list[str]:
    return [f"{step['grad_accum']}x{rows}x{step['length']}", "yes" if result["fits"] else "NO",
            _gib(result["peak_bytes_per_chip"]), _gib(result["argument_bytes"]),
            _gib(result["temp_bytes"]), _number(result["flops_per_chip"], 1e12, ".3f"),
            _number(result["estimated_seconds"], 1, ".4f"),
            _number(result["mfu_bound"], 0.01, ".0f", "%"), f"{result['compile_seconds']:.1f}"]


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _number(value, scale: float, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value / scale:{spec}}{suffix}"


def main() -> None:
    config = config_flag()
    flags.DEFINE_string("topology", None, "the TPU slice, VERSION:SHAPE, e.g. v5e:2x4, "
                                          "v4:2x2x1, v5p:2x2x1, v6e:2x2")
    flags.DEFINE_string("json", None, "also write the plan as JSON to this file")
    flags.DEFINE_bool("max_batch", False, "find each step's largest micro-batch that fits "
                                          "(several compiles per step)")
    f = flags.FLAGS

    def plan_command():
        report = plan(config.value, f.topology, max_batch=f.max_batch)
        print(table(report))
        if f.json:
            Path(f.json).parent.mkdir(parents=True, exist_ok=True)
            Path(f.json).write_text(json.dumps(report, indent=2) + "\n")

    run_cli(plan_command, required={
        "config": "a config file, e.g. --config configs/smollm2.py",
        "topology": "the TPU slice to plan for, e.g. --topology v5e:2x4"})


if __name__ == "__main__":
    main()
