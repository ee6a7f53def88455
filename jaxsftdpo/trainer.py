"""The training loop: stages, epochs, evaluation, checkpoints, logging.

`train_and_evaluate(config, workdir)` validates everything it can (config, model, data, mesh,
batch sizes) before it writes a file, takes the workdir's lock (`jaxsftdpo.lock`), then runs the
stages in order. A workdir that already holds checkpoints of the same config is resumed from the
newest one that restores, mid-epoch if need be: the data order is a function of (seed, stage,
epoch) and the checkpoint stores the position; the run's first line says where it goes on
(`resuming DIR from step N (stage k: dpo, epoch e)`). A workdir whose run finished (its
results.json written) is left as it is, with one line saying so. A step whose loss or gradient
norm is not finite (or whose loss passes `config.max_loss`) ends the run before anything of it
is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxsftdpo import checkpoint as ckpt
from jaxsftdpo import lock, lora, sharding, steps
from jaxsftdpo.config import describe_differences, validate
from jaxsftdpo.data import batching
from jaxsftdpo.data.tokenizer import load_tokenizer
from jaxsftdpo.errors import Diverged, Stopped, UserError
from jaxsftdpo.reporting import MetricsWriter, plot_losses, results_table, write_atomically
from jaxsftdpo.runs import DIVERGED_FILE, RESULTS_FILE
from jaxsftdpo.models import FAMILIES, from_pretrained
from jaxsftdpo.policy import Policy
from jaxsftdpo.tasks import make_task

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Run:
    """Everything a run needs, built and checked before anything is written."""

    config: mlc.ConfigDict
    mesh: jax.sharding.Mesh
    family: object
    graphdef: object
    trainable: nnx.State
    frozen: nnx.State
    tokenizer: object
    task: object
    stage_data: list          # per stage: tokenized SFT sequences or preference pairs
    max_length: int
    data_notes: list

    @property
    def rules(self):
        return self.family.PARTITION_RULES


def prepare(config: mlc.ConfigDict, devices=None) -> Run:
    """Build and check everything; `devices` (default: all) is what the mesh spans."""
    validate(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    family, model_config, graphdef, trainable, frozen = build_model(config, mesh)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    limit = model_config.max_length
    max_length = config.data.max_length or limit
    if max_length > limit:
        raise UserError(f"config.data.max_length={max_length} exceeds the model's {limit} "
                        f"positions; lower it to at most {limit}")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_config.vocab_size}; use the model's own tokenizer")
    task = make_task(config.data, tokenizer, max_length, config.seed)
    stage_data, notes = _tokenize_stages(config, task, tokenizer, max_length, mesh)
    return Run(config, mesh, family, graphdef, trainable, frozen, tokenizer, task, stage_data,
               max_length, notes)


def build_model(config: mlc.ConfigDict, mesh):
    """`(family, model config, graphdef, trainable, frozen)` of the config's model on the mesh,
    with LoRA adapters when `config.param.kind == 'lora'` (fresh ones: B = 0)."""
    family, model = _load_model(config, mesh)
    if config.param.kind == "lora":
        p = config.param
        lora.apply_lora(model, r=p.r, alpha=p.alpha, dropout=p.dropout,
                        target_modules=_targets(p.target_modules), use_rslora=p.use_rslora,
                        seed=config.seed)
    if config.model.remat:
        model.config = dataclasses.replace(model.config, remat=True)
    graphdef, trainable, frozen = lora.split_trainable(model, config.param.kind)
    trainable = sharding.place_state(trainable, mesh, family.PARTITION_RULES)
    frozen = sharding.place_state(frozen, mesh, family.PARTITION_RULES)
    return family, model.config, graphdef, trainable, frozen


def _targets(target_modules):
    return list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules


def _load_model(config, mesh):
    dtype = DTYPES[config.model.dtype]
    if config.model.name_or_path:
        # Load straight into the shardings the partition rules give.
        from jaxsftdpo.models import load_config
        family, model_config = load_config(config.model.name_or_path)
        sharding.check_heads(model_config, mesh)
        model = from_pretrained(config.model.name_or_path, dtype=dtype,
                                shardings=sharding.sharding_fn(mesh, family.PARTITION_RULES),
                                allow_pickle=config.model.allow_pickle)
        return family, model
    init = dict(config.model.init)
    model_type = init["model_type"]
    if model_type not in FAMILIES:
        raise UserError(f"config.model.init.model_type={model_type!r} is not supported; use one "
                        f"of {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    model_config = family.Config.from_hf(init, dtype=dtype)
    sharding.check_heads(model_config, mesh)
    abstract = nnx.eval_shape(lambda: family.build(model_config, config.model.init_seed))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abstract_state, mesh, family.PARTITION_RULES)

    def init_params():
        return nnx.state(family.build(model_config, config.model.init_seed))

    state = jax.jit(init_params, out_shardings=shardings)()
    return family, nnx.merge(graphdef, state)


def _tokenize_stages(config, task, tokenizer, max_length, mesh):
    notes, data = [], []
    cache = {}
    for i, stage in enumerate(config.stages):
        where = f"config.stages[{i}] ({stage.kind})"
        sharding.check_batch_size(stage.batch_size // stage.grad_accum, mesh,
                                  f"{where} micro-batch (batch_size / grad_accum)")
        if stage.batch_size % stage.grad_accum:
            raise UserError(f"{where}: batch_size {stage.batch_size} is not divisible by "
                            f"grad_accum {stage.grad_accum}")
        if stage.kind == "dpo" and task.PAIRS_NEED_POLICY:
            data.append(None)  # sampled from the policy at the hand-off (`_policy_pairs`)
            continue
        if stage.kind not in cache:
            if stage.kind == "sft":
                examples = task.sft_examples()
                tokenized = batching.tokenize_sft(examples, tokenizer, max_length,
                                                  strict=not config.data.truncate,
                                                  append_eos=task.APPEND_EOS)
            else:
                examples = task.preference_pairs()
                if not examples:
                    raise UserError(f"{where} needs preference pairs but task "
                                    f"{config.data.task!r} gave none; provide prompt/chosen/"
                                    f"rejected data or drop the DPO stage")
                tokenized = batching.tokenize_preferences(examples, tokenizer, max_length,
                                                          strict=not config.data.truncate,
                                                          append_eos=task.APPEND_EOS)
            if tokenized.truncated or tokenized.dropped:
                notes.append(f"{stage.kind} data: {tokenized.truncated} examples had their "
                             f"prompt cut from the left, {tokenized.dropped} were dropped "
                             f"(longer than max_length={max_length})")
            cache[stage.kind] = tokenized.items
        _check_enough(cache[stage.kind], stage, where)
        data.append(cache[stage.kind])
    return data, notes


def _check_enough(items, stage, where):
    if batching.num_batches(len(items), stage.batch_size) == 0:
        raise UserError(f"{where}: {len(items)} examples are fewer than batch_size "
                        f"{stage.batch_size}; lower the batch size or add data")


def _policy_pairs(run: Run, stage_idx: int, workdir: Path) -> list:
    """Preference pairs whose rejected side the task samples from the hand-off policy.

    They are written to the workdir once, so a resumed run trains on the very same pairs.
    """
    path = workdir / f"pairs_stage{stage_idx + 1}.jsonl"
    if path.exists():
        pairs = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        pairs = run.task.preference_pairs(_policy(run, run.trainable))
        if jax.process_index() == 0:
            write_atomically(path, "".join(json.dumps(p) + "\n" for p in pairs))
    where = f"config.stages[{stage_idx}] (dpo)"
    if not pairs:
        raise UserError(f"{where}: the task produced no preference pairs from the policy")
    tokenized = batching.tokenize_preferences(pairs, run.tokenizer, run.max_length,
                                              strict=False, append_eos=run.task.APPEND_EOS)
    if tokenized.truncated or tokenized.dropped:
        run.data_notes.append(f"dpo pairs: {tokenized.truncated} had their prompt cut from the "
                              f"left, {tokenized.dropped} were dropped (longer than "
                              f"max_length={run.max_length})")
    _check_enough(tokenized.items, run.config.stages[stage_idx], where)
    return tokenized.items


# ---- the loop -------------------------------------------------------------------------------

class _StopRequested(Exception):
    pass


class _DivergedAt(Exception):
    """Training diverged at `step` of stage `stage_idx`; `why` says how."""

    def __init__(self, step: int, stage_idx: int, why: str):
        super().__init__(why)
        self.step, self.stage_idx, self.why = step, stage_idx, why


@contextlib.contextmanager
def _stop_on_signal():
    """SIGTERM/SIGINT finish the current step, checkpoint, and stop (preemption-safe)."""
    requested = {"signal": None}

    def handler(signum, frame):
        requested["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train_and_evaluate(config: mlc.ConfigDict, workdir: str, *, stop_after_steps: int = 0,
                       devices=None):
    """Run (or resume) every stage; returns the results dict also written to results.json.

    `stop_after_steps > 0` checkpoints and returns after that many optimizer steps in this call
    (used to test that resuming reproduces an uninterrupted run). Raises `errors.Stopped` after
    checkpointing when SIGTERM or SIGINT stops the run, `errors.Diverged` when training
    diverges (the last checkpoint kept holds finite weights), `errors.StorageError` when a
    checkpoint cannot be written.
    """
    sharding.maybe_initialize_distributed(config)  # multi-host: before JAX touches a device
    validate(config)
    workdir = Path(workdir)
    _check_workdir(workdir, config)
    if jax.process_count() == 1:  # multi-host: process 0 decides, in `_workdir_lock`
        lock.check_free(workdir)
    run = prepare(config, devices)
    with _workdir_lock(workdir), ckpt.quiet_absl():
        return _train(run, workdir, stop_after_steps)


def _train(run: Run, workdir: Path, stop_after_steps: int) -> dict:
    """`train_and_evaluate` in a workdir this process holds the lock of."""
    config = run.config
    manager = ckpt.Manager(workdir / "checkpoints", keep=config.keep_checkpoints, writer=True)
    resume, first_stage = _resume(run, manager, workdir)
    finished = _finished_results(run, workdir, resume)
    if finished is not None:
        return finished
    if resume and jax.process_index() == 0:
        print(_resuming(run, workdir, resume.meta, first_stage))
    if jax.process_index() == 0:  # files once; Orbax checkpoints are saved by every process
        write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
        run.tokenizer.save(str(workdir / "tokenizer"))
        _drop_replayed_rows(workdir / "metrics.jsonl", resume.step if resume else 0)
    writer = MetricsWriter(workdir, is_main=jax.process_index() == 0)
    _print_notes(run)

    meta = resume.meta if resume else {"stage": 0, "stage_step": 0, "global_step": 0,
                                       "evals": []}
    final = None
    if not resume and config.eval_at_start:
        final = _evaluate(run, run.trainable)
        meta["evals"].append({"after": "start", **final.scores})
    steps_this_call, stop = 0, {"signal": None}
    try:
        with _stop_on_signal() as stop:
            for stage_idx in range(meta["stage"], len(config.stages)):
                stage_state = (first_stage if first_stage is not None
                               else _stage_start(run, stage_idx, workdir))
                first_stage = None
                _print_notes(run)
                done = _run_stage(run, stage_idx, stage_state, meta, manager, writer, stop,
                                  stop_after_steps - steps_this_call if stop_after_steps else 0)
                steps_this_call += done
                if meta["stage_step"] < stage_state.total:
                    raise _StopRequested
                run.trainable = stage_state.state.trainable
                final = _evaluate(run, run.trainable)
                meta["evals"].append({"after": f"{stage_idx + 1}:{config.stages[stage_idx].kind}",
                                      **final.scores})
                meta.update(stage=stage_idx + 1, stage_step=0)
                _save(manager, stage_state, meta, stage_idx)
    except _StopRequested:
        manager.wait()
        writer.close()
        if stop["signal"]:
            raise Stopped(f"{signal.Signals(stop['signal']).name} at step {meta['global_step']}, "
                          f"after saving a checkpoint; rerun the same command to resume",
                          stop["signal"]) from None
        return {"stopped_at_step": meta["global_step"]}
    except _DivergedAt as e:
        writer.close()
        raise _diverged(run, workdir, manager, e) from None
    manager.wait()
    results = {"evals": meta["evals"], "final": meta["evals"][-1],
               "global_step": meta["global_step"],
               "trainable_params": lora.count_params(run.trainable),
               "total_params": lora.count_params(run.trainable) + lora.count_params(run.frozen)}
    if jax.process_index() == 0:
        if final is None:  # resumed after the last stage had finished
            final = _evaluate(run, run.trainable)
        run.task.write_predictions(final, workdir)
        write_atomically(workdir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        table = results_table(meta["evals"])
        (workdir / "results.md").write_text(table + "\n")
        print(table)
        plot_losses(workdir / "metrics.jsonl", workdir / "loss_curve.png")
    writer.close()
    return results


def _print_notes(run: Run) -> None:
    """Print the data notes not printed yet (a resumed run prints them after saying so)."""
    for note in run.data_notes:
        print(note)
    run.data_notes.clear()


def _finished_results(run: Run, workdir: Path, resume) -> dict | None:
    """The results of a run that had finished (its results.json written after the last stage),
    after one line saying so; None when training or the final evaluation is left to do."""
    results = _read_results(workdir / RESULTS_FILE)
    finished = results is not None and (resume is None
                                        or resume.meta["stage"] == len(run.config.stages))
    if jax.process_count() > 1:  # process 0 decides: the others may not see its files
        from jax.experimental import multihost_utils
        finished = bool(multihost_utils.broadcast_one_to_all(np.int32(finished)))
    if not finished:
        return None
    if jax.process_index() == 0:
        print(f"{workdir} is finished (step {results.get('global_step')}): nothing to train or "
              f"evaluate, nothing written; its results are in {workdir / RESULTS_FILE}; use a "
              f"new --workdir to train again")
    return results or {}


def _read_results(path: Path) -> dict | None:
    """A run's results.json, or None when there is none (or it cannot be read)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def _resuming(run: Run, workdir: Path, meta: dict, stage: _Stage | None) -> str:
    """`resuming WORKDIR from step N (stage k: KIND, epoch e)`: where a resumed run goes on."""
    stages = run.config.stages
    if meta["stage"] >= len(stages):
        where = f"stage {len(stages)}: {stages[-1].kind} done; the final evaluation"
    else:
        epoch = meta["stage_step"] // stage.steps_per_epoch + 1 if stage is not None else 1
        where = f"stage {meta['stage'] + 1}: {stages[meta['stage']].kind}, epoch {epoch}"
    return f"resuming {workdir} from step {meta['global_step']} ({where})"


def _check_workdir(workdir: Path, config):
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; give a directory (new, or a run's)")
    saved = workdir / "config.json"
    if not saved.exists():
        return
    try:
        before = json.loads(saved.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{saved} cannot be read ({e}); use a new --workdir") from e
    changed = describe_differences(before, json.loads(config.to_json_best_effort()))
    if changed:
        raise UserError(f"{workdir} holds a run with a different config ({changed}); use a new "
                        f"--workdir, or the same config to resume that run")


@contextlib.contextmanager
def _workdir_lock(workdir: Path):
    """The workdir's lock (`jaxsftdpo.lock`), taken by process 0 for every process."""
    held, error = lock.WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            held.acquire()
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if multihost_utils.broadcast_one_to_all(np.int32(error is not None)) and error is None:
            error = UserError(f"process 0 could not lock {workdir}; see its output")
    if error is not None:
        raise error
    try:
        yield
    finally:
        held.release()


def _resume(run: Run, manager, workdir: Path):
    """`(resume, stage)`: the newest checkpoint that restores, and the stage it stopped in
    restored (None at a stage boundary); `(None, None)` for a new run. Newer checkpoints that
    do not restore are set aside, so their steps can be saved again."""
    initial = run.trainable

    def restore(resume):
        run.trainable = resume.params(initial)  # before anything is written: fails if it does
        if resume.meta["stage_step"] > 0:       # not fit the model
            return _stage_start(run, resume.meta["stage"], workdir, resume)
        return None

    found = ckpt.newest_restorable(manager, restore, f"move {manager.directory} away to start "
                                                    f"over, or use a new --workdir")
    if found is None:
        return None, None
    resume, stage, skipped = found
    if skipped:
        if jax.process_index() == 0:
            manager.set_aside(skipped)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxsftdpo: unreadable checkpoints set aside")
        manager.close()
    return resume, stage


def _drop_replayed_rows(path: Path, step: int) -> None:
    """metrics.jsonl without its rows of steps after `step`: a resumed run logs them again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) < len(lines):
        write_atomically(path, "".join(line + "\n" for line in kept))


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return math.inf


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _save(manager, st, meta: dict, stage_idx: int) -> None:
    """Checkpoint the stage's state; weights that are not finite are never saved."""
    if not bool(_all_finite(st.state.trainable)):
        raise _DivergedAt(meta["global_step"], stage_idx, "the weights after it are not finite")
    manager.save(meta["global_step"], st.state, st.reference, meta)


def _divergence(loss: float, grad_norm: float, max_loss: float) -> str:
    """Why a step's loss and gradient norm mean the run diverged, or ''."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
    if max_loss and loss > max_loss:
        return f"loss {loss:.4g} is above config.max_loss={max_loss:g}"
    return ""


def _diverged(run: Run, workdir: Path, manager, at: _DivergedAt) -> Diverged:
    """The one-line report of a diverged run, also written to WORKDIR/diverged.json."""
    manager.wait()  # the saves before the divergence, all of finite weights
    kept = manager.steps()
    stage = run.config.stages[at.stage_idx]
    if jax.process_index() == 0:
        write_atomically(workdir / DIVERGED_FILE, json.dumps(
            {"step": at.step, "stage": at.stage_idx + 1, "kind": stage.kind, "why": at.why,
             "last_checkpoint": kept[0] if kept else None}) + "\n")
    where = (f"its last checkpoint, step {kept[0]}, holds the finite weights before it" if kept
             else "no checkpoint was saved before it")
    return Diverged(f"training diverged at step {at.step} (stage {at.stage_idx + 1}, "
                    f"{stage.kind}): {at.why}; {where}; lower "
                    f"config.stages[{at.stage_idx}].learning_rate (now {stage.learning_rate:g}) "
                    f"and train in a new --workdir")


@dataclasses.dataclass
class _Stage:
    state: steps.TrainState
    reference: object          # policy-shaped frozen copy, or precomputed logps, or None
    total: int
    steps_per_epoch: int
    schedule: object
    step_fn: object
    dpo: object


def _stage_start(run: Run, stage_idx: int, workdir: Path, resume=None) -> _Stage:
    """The stage's optimizer, reference and step function; mid-stage, with the optimizer state
    and reference of checkpoint `resume`."""
    config, stage = run.config, run.config.stages[stage_idx]
    if run.stage_data[stage_idx] is None:
        run.stage_data[stage_idx] = _policy_pairs(run, stage_idx, workdir)
    items = run.stage_data[stage_idx]
    steps_per_epoch = batching.num_batches(len(items), stage.batch_size)
    total = stage.steps or stage.epochs * steps_per_epoch
    tx, schedule = steps.make_optimizer(stage, total)
    mid_stage = resume is not None
    state = steps.init_train_state(tx, run.trainable)  # optimizer state sharded like params
    dpo, reference = None, None
    if stage.kind == "dpo":
        dpo = steps.DPOSettings(beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                                label_smoothing=config.dpo.label_smoothing,
                                sft_weight=config.dpo.sft_weight,
                                reference=config.dpo.reference)
        # The reference is the policy at the hand-off: a copy of the trainable part only (for
        # LoRA just the adapters; the frozen base is shared), or its log-probs.
        if dpo.reference == "frozen_copy":
            reference = jax.tree.map(jnp.copy, run.trainable)
        elif dpo.reference == "precomputed":
            reference = ({"chosen": np.zeros(len(items), np.float32),
                          "rejected": np.zeros(len(items), np.float32)} if mid_stage
                         else _precompute_reference(run, items, stage))
    if mid_stage:
        state, reference = resume.stage_state(state, reference)
    step_fn = _make_step(run, stage.kind, tx, dpo, state, batching.scored_tokens_bound(items))
    return _Stage(state, reference, total, steps_per_epoch, schedule, step_fn, dpo)


def _make_step(run: Run, kind: str, tx, dpo, state, scored_tokens: int):
    """The train step of `config.parallel.mode`; both take and return the same arrays, the
    state in the shardings it came in with (so the step compiles once per length bucket)."""
    if run.config.parallel.mode == "jit":
        return steps.make_train_step(kind, run.graphdef, tx, dpo,
                                     jax.tree.map(lambda x: x.sharding, state), scored_tokens)
    return steps.make_pmap_train_step(kind, run.graphdef, tx, dpo,
                                      devices=list(run.mesh.devices.flat),
                                      scored_tokens=scored_tokens)


def _precompute_reference(run: Run, items, stage) -> dict:
    """Reference log-probs of every pair, one pass; then no reference weights are kept."""
    chosen, rejected = _policy(run, run.trainable).sequence_logps(items, stage.batch_size)
    return {"chosen": chosen, "rejected": rejected}


def _run_stage(run: Run, stage_idx: int, st: _Stage, meta, manager, writer, stop,
               budget: int) -> int:
    config, stage = run.config, run.config.stages[stage_idx]
    items = run.stage_data[stage_idx]
    buckets = batching.default_buckets(run.max_length)
    seed = config.seed * 1000 + stage_idx
    rng = jax.random.key(config.seed)
    use_dropout = stage.kind == "sft" and config.model.dropout
    done = 0
    bar = tqdm(total=st.total, initial=meta["stage_step"], desc=f"stage {stage_idx + 1} "
               f"{stage.kind}", disable=not config.progress or jax.process_index() != 0)
    last_log, tokens_since = time.perf_counter(), 0.0
    while meta["stage_step"] < st.total:
        epoch, start = divmod(meta["stage_step"], st.steps_per_epoch)
        batches = batching.batches_for_epoch(items, stage.batch_size, run.tokenizer.pad_token_id,
                                             buckets, seed=seed, epoch=epoch, start=start)
        for batch in batches:
            index = batch.pop("index")
            if st.dpo is not None and st.dpo.reference == "precomputed":
                batch["ref_chosen_logps"] = st.reference["chosen"][index]
                batch["ref_rejected_logps"] = st.reference["rejected"][index]
            micro = {k: v.reshape(stage.grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}
            step_rng = jax.random.fold_in(rng, meta["global_step"]) if use_dropout else None
            ref = st.reference if st.dpo is not None and st.dpo.reference == "frozen_copy" \
                else None
            st.state, metrics = st.step_fn(st.state, run.frozen, ref,
                                           sharding.place_batch(micro, run.mesh, leading=1),
                                           step_rng)
            meta["stage_step"] += 1
            meta["global_step"] += 1
            done += 1
            bar.update(1)
            loss, grad_norm, tokens = (float(x) for x in jax.device_get(
                (metrics["loss"], metrics["grad_norm"], metrics["tokens"])))
            why = _divergence(loss, grad_norm, config.max_loss)
            if why:
                bar.close()
                raise _DivergedAt(meta["global_step"], stage_idx, why)
            tokens_since += tokens
            finished_epoch = meta["stage_step"] % st.steps_per_epoch == 0
            if (meta["stage_step"] % config.log_every == 0 or meta["stage_step"] in (1, st.total)):
                now = time.perf_counter()
                record = {k: float(v) for k, v in jax.device_get(metrics).items()
                          if k != "tokens"}
                record.update(stage=stage_idx + 1, kind=stage.kind, step=meta["global_step"],
                              epoch=meta["stage_step"] / st.steps_per_epoch,
                              learning_rate=float(st.schedule(meta["stage_step"] - 1)),
                              tokens_per_s=tokens_since / max(now - last_log, 1e-9))
                writer.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                last_log, tokens_since = now, 0.0
            if (config.eval_every and meta["stage_step"] % config.eval_every == 0) or (
                    not config.eval_every and finished_epoch):
                scores = _evaluate(run, st.state.trainable).scores
                writer.write({"stage": stage_idx + 1, "kind": stage.kind,
                              "step": meta["global_step"],
                              "epoch": meta["stage_step"] / st.steps_per_epoch,
                              **{f"eval/{k}": v for k, v in scores.items()}})
            at_end = meta["stage_step"] == st.total
            out_of_budget = budget and done >= budget
            stopping = stop["signal"] is not None
            if (meta["global_step"] % config.checkpoint_every == 0 or stopping
                    or out_of_budget) and not at_end:
                _save(manager, st, meta, stage_idx)
            if at_end or stopping or out_of_budget:
                bar.close()
                return done
    bar.close()
    return done


def _policy(run: Run, trainable) -> Policy:
    return Policy(run.graphdef, trainable, run.frozen, run.tokenizer, run.mesh, run.max_length)


def _evaluate(run: Run, trainable):
    return run.task.evaluate(_policy(run, trainable), run.config.data.eval_batch_size)
