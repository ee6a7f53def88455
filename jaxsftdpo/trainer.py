"""The training loop: stages, epochs, evaluation, checkpoints, logging.

`train_and_evaluate(config, workdir)` validates everything it can (config, model, data, mesh,
batch sizes) before it writes a file, then runs the stages in order. A workdir that already holds
checkpoints of the same config is resumed from the newest one, mid-epoch if need be: the data
order is a function of (seed, stage, epoch) and the checkpoint stores the position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
from jaxsftdpo import lora, sharding, steps
from jaxsftdpo.config import validate
from jaxsftdpo.data import batching
from jaxsftdpo.data.tokenizer import load_tokenizer
from jaxsftdpo.errors import UserError
from jaxsftdpo.reporting import MetricsWriter, plot_losses, results_table, write_atomically
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
        print(f"dpo pairs: {tokenized.truncated} had their prompt cut from the left, "
              f"{tokenized.dropped} were dropped (longer than max_length={run.max_length})")
    _check_enough(tokenized.items, run.config.stages[stage_idx], where)
    return tokenized.items


# ---- the loop -------------------------------------------------------------------------------

class _StopRequested(Exception):
    pass


@contextlib.contextmanager
def _stop_on_signal():
    """SIGTERM/SIGINT finish the current step, checkpoint, and stop (preemption-safe)."""
    requested = {"flag": False}

    def handler(signum, frame):
        requested["flag"] = True

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
    (used to test that resuming reproduces an uninterrupted run).
    """
    sharding.maybe_initialize_distributed(config)  # multi-host: before JAX touches a device
    run = prepare(config, devices)
    workdir = Path(workdir)
    _check_workdir(workdir, config)
    manager = ckpt.Manager(workdir / "checkpoints", keep=config.keep_checkpoints)
    resume = manager.latest()
    if resume is not None:  # before anything is written: fails if it does not fit the model
        run.trainable = resume.params(run.trainable)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # files once; Orbax checkpoints are saved by every process
        write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
        run.tokenizer.save(str(workdir / "tokenizer"))
    writer = MetricsWriter(workdir, is_main=jax.process_index() == 0)
    for note in run.data_notes:
        print(note)

    meta = resume.meta if resume else {"stage": 0, "stage_step": 0, "global_step": 0,
                                       "evals": []}
    if not resume:
        meta["evals"].append({"after": "start", **_evaluate(run, run.trainable).scores})
    steps_this_call, final = 0, None
    try:
        with _stop_on_signal() as stop:
            for stage_idx in range(meta["stage"], len(config.stages)):
                stage_state = _stage_start(run, stage_idx, resume, meta, workdir)
                resume = None
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
                manager.save(meta["global_step"], stage_state.state, stage_state.reference, meta)
    except _StopRequested:
        manager.wait()
        writer.close()
        return {"stopped_at_step": meta["global_step"]}
    manager.wait()
    results = {"evals": meta["evals"], "final": meta["evals"][-1],
               "global_step": meta["global_step"],
               "trainable_params": lora.count_params(run.trainable),
               "total_params": lora.count_params(run.trainable) + lora.count_params(run.frozen)}
    if jax.process_index() == 0:
        if final is None:  # resumed after the last stage had finished
            final = _evaluate(run, run.trainable)
        run.task.write_predictions(final, workdir)
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        table = results_table(meta["evals"])
        (workdir / "results.md").write_text(table + "\n")
        print(table)
        plot_losses(workdir / "metrics.jsonl", workdir / "loss_curve.png")
    writer.close()
    return results


def _check_workdir(workdir: Path, config):
    saved = workdir / "config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(
            config.to_json_best_effort()):
        raise UserError(f"{workdir} holds a run with a different config; use a new --workdir, "
                        f"or the same config to resume that run")


@dataclasses.dataclass
class _Stage:
    state: steps.TrainState
    reference: object          # policy-shaped frozen copy, or precomputed logps, or None
    total: int
    steps_per_epoch: int
    schedule: object
    step_fn: object
    dpo: object


def _stage_start(run: Run, stage_idx: int, resume, meta, workdir: Path) -> _Stage:
    config, stage = run.config, run.config.stages[stage_idx]
    if run.stage_data[stage_idx] is None:
        run.stage_data[stage_idx] = _policy_pairs(run, stage_idx, workdir)
    items = run.stage_data[stage_idx]
    steps_per_epoch = batching.num_batches(len(items), stage.batch_size)
    total = stage.steps or stage.epochs * steps_per_epoch
    tx, schedule = steps.make_optimizer(stage, total)
    mid_stage = resume is not None and meta["stage_step"] > 0
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
            tokens_since += float(metrics["tokens"])
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
            if (meta["global_step"] % config.checkpoint_every == 0 or stop["flag"]
                    or out_of_budget) and not at_end:
                manager.save(meta["global_step"], st.state, st.reference, meta)
            if at_end or stop["flag"] or out_of_budget:
                bar.close()
                return done
    bar.close()
    return done


def _policy(run: Run, trainable) -> Policy:
    return Policy(run.graphdef, trainable, run.frozen, run.tokenizer, run.mesh, run.max_length)


def _evaluate(run: Run, trainable):
    return run.task.evaluate(_policy(run, trainable), run.config.data.eval_batch_size)
