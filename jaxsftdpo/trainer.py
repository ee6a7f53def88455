"""The training loop: stages, epochs, evaluation, checkpoints, logging.

`train_and_evaluate(config, workdir)` builds the run (`runs.build_run`) and its stages' data
(`stage_data`), which checks everything it can (config, model, data, mesh, batch sizes) before a
file is written, takes the workdir's lock (`jaxsftdpo.lock`), then runs the stages in order. A
workdir that already holds checkpoints of the same config is resumed from the newest one that
restores, mid-epoch if need be: the data order is a function of (seed, stage, epoch) and the
checkpoint stores the position; the run's first line says where it goes on (`resuming DIR from
step N (stage k: dpo, epoch e)`). A workdir whose run finished (its results.json written) is
left as it is, with one line saying so. A step whose loss or gradient norm is not finite (or
whose loss passes `config.max_loss`) ends the run before anything of it is saved.
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
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxsftdpo import checkpoint as ckpt
from jaxsftdpo import flops, lock, lora, runs, sharding, stage_data, steps
from jaxsftdpo.config import validate
from jaxsftdpo.data import batching
from jaxsftdpo.errors import Diverged, Stopped, UserError
from jaxsftdpo.reporting import MetricsWriter, plot_losses, results_table, write_atomically
from jaxsftdpo.runs import CHECKPOINT_DIR, CONFIG_FILE, DIVERGED_FILE, RESULTS_FILE, Run

METRICS_FILE = "metrics.jsonl"


def train_and_evaluate(config, workdir: str, *, stop_after_steps: int = 0, devices=None):
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
    run = runs.build_run(config, devices)
    data = stage_data.tokenize_stages(run)
    with _workdir_lock(workdir), ckpt.quiet_absl():
        return _Training(run, data, workdir, stop_after_steps).train()


# ---- before training ------------------------------------------------------------------------

def _check_workdir(workdir: Path, config):
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; give a directory (new, or a run's)")
    saved = workdir / CONFIG_FILE
    if not saved.exists():
        return
    try:
        changed = runs.config_changes(workdir, config)
    except OSError as e:
        raise UserError(f"{saved} cannot be read ({e}); use a new --workdir") from e
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
        if multihost_utils.broadcast_one_to_all(np.int32(error is not None)) and error is None:
            error = UserError(f"process 0 could not lock {workdir}; see its output")
    if error is not None:
        raise error
    try:
        yield
    finally:
        held.release()


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


# ---- a stage ----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Stage:
    index: int
    kind: str
    items: list
    state: steps.TrainState
    total: int
    steps_per_epoch: int
    schedule: object
    step_fn: object
    feed: object             # (batch, its rows' indices) -> (the step's `ref`, batch)
    saved_reference: object  # what checkpoints keep of the reference: the hand-off policy's
                             # copy, precomputed log-probs, or None


def _start_stage(run: Run, data: stage_data.StageData, stage_idx: int, workdir: Path,
                 resume: ckpt.Resume | None = None) -> _Stage:
    """The stage's optimizer, reference and step function; mid-stage, with the optimizer state
    and reference of checkpoint `resume`."""
    stage = run.config.stages[stage_idx]
    if data.items[stage_idx] is None:
        data.items[stage_idx] = stage_data.policy_pairs(run, data, stage_idx, workdir)
    items = data.items[stage_idx]
    steps_per_epoch = batching.num_batches(len(items), stage.batch_size)
    total = stage.steps or stage.epochs * steps_per_epoch
    tx, schedule = steps.make_optimizer(stage, total)
    state = steps.init_train_state(tx, run.trainable)  # optimizer state sharded like params
    scored_tokens = batching.scored_tokens_bound(items)
    settings = _objective_settings(run, stage.kind)
    dpo = settings if stage.kind == "dpo" else None  # the only kind with a reference
    saved = None
    if dpo is not None and dpo.reference == "precomputed":
        saved = (_zero_logps(len(items)) if resume is not None
                 else _precompute_reference(run, items, stage.batch_size // stage.grad_accum))
    elif dpo is not None and run.reference is None:
        # The reference is the policy at the hand-off: a copy of the trainable part only (for
        # LoRA just the adapters; the frozen base is shared).
        saved = jax.tree.map(jnp.copy, run.trainable)
    if resume is not None:
        state, saved = resume.stage_state(state, saved)
    step_fn = _make_step(run, stage.kind, tx, settings, state, scored_tokens)
    return _Stage(stage_idx, stage.kind, items, state, total, steps_per_epoch, schedule,
                  step_fn, _feed(run, dpo, saved), saved)


def _objective_settings(run: Run, kind: str) -> steps.Settings:
    """The train step's settings of a stage `kind` (`steps.loss_function`), from the config."""
    c = run.config
    if kind == "dpo":
        return steps.DPOSettings(
            beta=c.dpo.beta, loss_type=c.dpo.loss_type, label_smoothing=c.dpo.label_smoothing,
            sft_weight=c.dpo.sft_weight, reference=c.dpo.reference,
            reference_graphdef=None if run.reference is None else run.reference.graphdef)
    if kind == "orpo":
        return steps.ORPOSettings(beta=c.orpo.beta)
    if kind == "simpo":
        return steps.SimPOSettings(beta=c.simpo.beta, gamma=c.simpo.gamma,
                                   label_smoothing=c.simpo.label_smoothing)
    return None


def _feed(run: Run, dpo: steps.DPOSettings | None, saved):
    """`feed(batch, index) -> (ref, batch)`: what the step gets of the reference, decided once
    for the stage (nothing but a DPO stage has one)."""
    if dpo is None:
        return lambda batch, index: (None, batch)
    if dpo.reference == "precomputed":
        return lambda batch, index: (None, {**batch,
                                            "ref_chosen_logps": saved["chosen"][index],
                                            "ref_rejected_logps": saved["rejected"][index]})
    reference = saved if run.reference is None else run.reference.state
    return lambda batch, index: (reference, batch)


def _zero_logps(n: int) -> dict:
    """The shape of precomputed reference log-probs, for a checkpoint to restore into."""
    return {"chosen": np.zeros(n, np.float32), "rejected": np.zeros(n, np.float32)}


def _precompute_reference(run: Run, items, batch_size: int) -> dict:
    """Reference log-probs of every pair, one pass at the stage's micro-batch (what the user
    said fits); then no reference weights are needed."""
    reference = run.reference_policy() or run.policy()  # another model, or the hand-off policy
    chosen, rejected = reference.sequence_logps(items, batch_size)
    return {"chosen": chosen, "rejected": rejected}


def _make_step(run: Run, kind: str, tx, settings, state, scored_tokens: int):
    """The train step of `config.parallel.mode`; both take and return the same arrays, the
    state in the shardings it came in with (so the step compiles once per length bucket)."""
    if run.config.parallel.mode == "jit":
        return steps.make_train_step(kind, run.graphdef, tx, settings,
                                     jax.tree.map(lambda x: x.sharding, state), scored_tokens)
    return steps.make_pmap_train_step(kind, run.graphdef, tx, settings,
                                      devices=list(run.mesh.devices.flat),
                                      scored_tokens=scored_tokens)


# ---- the loop -------------------------------------------------------------------------------

class _StopRequested(Exception):
    pass


class _DivergedAt(Exception):
    """Training diverged at `step` of stage `stage_idx`; `why` says how."""

    def __init__(self, step: int, stage_idx: int, why: str):
        super().__init__(why)
        self.step, self.stage_idx, self.why = step, stage_idx, why


class _Throughput:
    """Tokens per second since the last logged step."""

    def __init__(self):
        self.since, self.tokens = time.perf_counter(), 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.since, self.tokens = now, 0.0
        return rate


class _Training:
    """One call of `train_and_evaluate`, in a workdir whose lock this process holds."""

    def __init__(self, run: Run, data: stage_data.StageData, workdir: Path,
                 stop_after_steps: int):
        self.run, self.data, self.workdir = run, data, workdir
        self.config = run.config
        self.manager = ckpt.Manager(workdir / CHECKPOINT_DIR, keep=self.config.keep_checkpoints,
                                    writer=True)
        self.position = ckpt.Position()
        self.budget, self.steps_taken = stop_after_steps, 0
        self.stop = {"signal": None}
        self.writer = None
        self.evaluation = None  # the newest evaluation of this call
        self.sequence_length = 0  # of the newest step's batch
        self.peak_flops = None    # measured at the first log on CPU, so found then
        self.is_main = jax.process_index() == 0

    def train(self) -> dict:
        resume, stage = self._resume()
        finished = self._finished_results(resume)
        if finished is not None:
            return finished
        if resume:
            self.position = resume.position
            if self.is_main:
                print(self._resuming(stage))
        self._start_files(resume)
        if not resume and self.config.eval_at_start:
            self._evaluate("start")
        try:
            with _stop_on_signal() as self.stop:
                for stage_idx in range(self.position.stage, len(self.config.stages)):
                    stage = stage or _start_stage(self.run, self.data, stage_idx, self.workdir)
                    self._print_notes()
                    self._train_stage(stage)
                    self._hand_off(stage)
                    stage = None
        except _StopRequested:
            return self._stopped()
        except _DivergedAt as e:
            self.writer.close()
            raise self._diverged(e) from None
        return self._finish()

    # -- resuming --

    def _resume(self):
        """`(resume, stage)`: the newest checkpoint that restores, and the stage it stopped in
        restored (None at a stage boundary); `(None, None)` for a new run. Newer checkpoints
        that do not restore are set aside, so their steps can be saved again."""
        run, initial = self.run, self.run.trainable

        def restore(resume):
            run.trainable = resume.params(initial)  # before anything is written: fails if it
            if resume.position.stage_step > 0:      # does not fit the model
                return _start_stage(run, self.data, resume.position.stage, self.workdir, resume)
            return None

        found = ckpt.newest_restorable(self.manager, restore,
                                       f"move {self.manager.directory} away to start over, or "
                                       f"use a new --workdir")
        if found is None:
            return None, None
        resume, stage, skipped = found
        if skipped:
            if self.is_main:
                self.manager.set_aside(skipped)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("jaxsftdpo: unreadable checkpoints set aside")
            self.manager.close()
        return resume, stage

    def _finished_results(self, resume) -> dict | None:
        """The results of a run that had finished (its results.json written after the last
        stage), after one line saying so; None when training or the final evaluation is left."""
        results = _read_results(self.workdir / RESULTS_FILE)
        finished = results is not None and (
            resume is None or resume.position.stage == len(self.config.stages))
        if jax.process_count() > 1:  # process 0 decides: the others may not see its files
            finished = bool(multihost_utils.broadcast_one_to_all(np.int32(finished)))
        if not finished:
            return None
        if self.is_main:
            print(f"{self.workdir} is finished (step {results.get('global_step')}): nothing to "
                  f"train or evaluate, nothing written; its results are in "
                  f"{self.workdir / RESULTS_FILE}; use a new --workdir to train again")
        return results or {}

    def _resuming(self, stage: _Stage | None) -> str:
        """`resuming WORKDIR from step N (stage k: KIND, epoch e)`: where a resumed run goes."""
        stages, position = self.config.stages, self.position
        if position.stage >= len(stages):
            where = f"stage {len(stages)}: {stages[-1].kind} done; the final evaluation"
        else:
            epoch = position.stage_step // stage.steps_per_epoch + 1 if stage else 1
            where = f"stage {position.stage + 1}: {stages[position.stage].kind}, epoch {epoch}"
        return f"resuming {self.workdir} from step {position.global_step} ({where})"

    def _start_files(self, resume) -> None:
        if self.is_main:  # files once; Orbax checkpoints are saved by every process
            write_atomically(self.workdir / CONFIG_FILE,
                             self.config.to_json_best_effort(indent=2) + "\n")
            self.run.tokenizer.save(str(self.workdir / runs.TOKENIZER_DIR))
            _drop_replayed_rows(self.workdir / METRICS_FILE, resume.step if resume else 0)
        self.writer = MetricsWriter(self.workdir, is_main=self.is_main)
        self._print_notes()

    def _print_notes(self) -> None:
        for note in self.data.take_notes():
            print(note)

    # -- training a stage --

    def _train_stage(self, st: _Stage) -> None:
        """Train `st` to its end; `_StopRequested` after a checkpoint when a signal or this
        call's step budget stops it first."""
        stage = self.config.stages[st.index]
        bar = tqdm(total=st.total, initial=self.position.stage_step,
                   desc=f"stage {st.index + 1} {st.kind}",
                   disable=not self.config.progress or not self.is_main)
        throughput = _Throughput()
        with contextlib.closing(bar):
            while self.position.stage_step < st.total:
                epoch, start = divmod(self.position.stage_step, st.steps_per_epoch)
                for batch in batching.batches_for_epoch(
                        st.items, stage.batch_size, self.run.tokenizer.pad_token_id,
                        batching.default_buckets(self.run.max_length),
                        stream=(self.config.seed, st.index), epoch=epoch, start=start):
                    metrics = self._step(st, batch)
                    bar.update(1)
                    throughput.add(float(metrics["tokens"]))
                    self._log(st, metrics, throughput, bar)
                    self._evaluate_if_due(st)
                    if self.position.stage_step == st.total:
                        return
                    self._checkpoint_if_due(st)

    def _step(self, st: _Stage, batch: dict) -> dict:
        """One optimizer step; `_DivergedAt` when its loss or gradient norm says so."""
        stage = self.config.stages[st.index]
        ref, batch = st.feed(batch, batch.pop("index"))
        micro = {k: v.reshape(stage.grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}
        self.sequence_length = next(v.shape[-1] for k, v in batch.items() if "input_ids" in k)
        st.state, metrics = st.step_fn(st.state, self.run.frozen, ref,
                                       sharding.place_batch(micro, self.run.mesh, leading=1),
                                       self._dropout_key(st))
        self.position.stage_step += 1
        self.position.global_step += 1
        self.steps_taken += 1
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.position.num_tokens += int(metrics["tokens"])
        why = _divergence(metrics["loss"], metrics["grad_norm"], self.config.max_loss)
        if why:
            raise _DivergedAt(self.position.global_step, st.index, why)
        return metrics

    def _dropout_key(self, st: _Stage):
        """The step's dropout key, a function of (seed, stage, step); None without dropout."""
        if st.kind != "sft" or not self.config.model.dropout:
            return None
        key = jax.random.fold_in(jax.random.key(self.config.seed), st.index)
        return jax.random.fold_in(key, self.position.global_step)

    def _log(self, st: _Stage, metrics: dict, throughput: _Throughput, bar) -> None:
        stage_step = self.position.stage_step
        if stage_step % self.config.log_every and stage_step not in (1, st.total):
            return
        record = {k: v for k, v in metrics.items() if k != "tokens"}
        record.update(self._where(st), learning_rate=float(st.schedule(stage_step - 1)),
                      num_tokens=self.position.num_tokens, **self._speed(throughput))
        self.writer.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")

    def _speed(self, throughput: _Throughput) -> dict:
        """Tokens per second since the last log, the model FLOPs per token of the newest batch's
        length (a DPO reference's forward not counted) and the model FLOPs utilisation."""
        if self.peak_flops is None:
            self.peak_flops = flops.peak_flops(self.config.peak_flops,
                                               self.run.model_config.dtype)
        tokens_per_s = throughput.take()
        per_token = flops.model_flops_per_token(self.run.model_config, self.sequence_length)
        return {"tokens_per_s": tokens_per_s, "flops_per_token": per_token,
                "mfu": flops.mfu(tokens_per_s, per_token, self.peak_flops)}

    def _where(self, st: _Stage) -> dict:
        return {"stage": st.index + 1, "kind": st.kind, "step": self.position.global_step,
                "epoch": self.position.stage_step / st.steps_per_epoch}

    def _evaluate_if_due(self, st: _Stage) -> None:
        every, stage_step = self.config.eval_every, self.position.stage_step
        due = stage_step % every == 0 if every else stage_step % st.steps_per_epoch == 0
        if due:
            scores = self._evaluation(st.state.trainable).scores
            self.writer.write({**self._where(st), **{f"eval/{k}": v for k, v in scores.items()}})

    def _checkpoint_if_due(self, st: _Stage) -> None:
        """Checkpoint every `checkpoint_every` steps; checkpoint and stop when a signal came or
        this call's step budget is spent."""
        stopping = self._stopping()
        if stopping or self.position.global_step % self.config.checkpoint_every == 0:
            self._save(st)
        if stopping:
            raise _StopRequested

    def _stopping(self) -> bool:
        """Whether a signal came or this call's step budget is spent."""
        return self.stop["signal"] is not None or bool(self.budget
                                                       and self.steps_taken >= self.budget)

    def _save(self, st: _Stage) -> None:
        """Checkpoint the stage's state; weights that are not finite are never saved."""
        if not bool(_all_finite(st.state.trainable)):
            raise _DivergedAt(self.position.global_step, st.index,
                              "the weights after it are not finite")
        self.manager.save(self.position.global_step, st.state, st.saved_reference,
                          self.position)

    def _hand_off(self, st: _Stage) -> None:
        """The end of a stage: its policy evaluated, becoming the next stage's start (and its
        DPO reference), and checkpointed."""
        self.run.trainable = st.state.trainable
        self._evaluate(f"{st.index + 1}:{st.kind}")
        self.position.stage, self.position.stage_step = st.index + 1, 0
        self._save(st)
        if self._stopping() and st.index + 1 < len(self.config.stages):
            raise _StopRequested

    def _evaluate(self, after: str) -> None:
        self.evaluation = self._evaluation()
        self.position.evals.append({"after": after, **self.evaluation.scores})

    def _evaluation(self, trainable=None):
        """The task's evaluation of the run's policy (with `trainable`, of those weights)."""
        return self.run.task.evaluate(self.run.policy(trainable),
                                      self.config.data.eval_batch_size)

    # -- endings --

    def _stopped(self) -> dict:
        self.manager.wait()
        self.writer.close()
        signum = self.stop["signal"]
        if signum:
            raise Stopped(f"{signal.Signals(signum).name} at step {self.position.global_step}, "
                          f"after saving a checkpoint; rerun the same command to resume",
                          signum) from None
        return {"stopped_at_step": self.position.global_step}

    def _finish(self) -> dict:
        self.manager.wait()
        run, position = self.run, self.position
        trainable = lora.count_params(run.trainable)
        results = {"evals": position.evals, "final": position.evals[-1],
                   "global_step": position.global_step, "trainable_params": trainable,
                   "total_params": trainable + lora.count_params(run.frozen)}
        if self.is_main:
            if self.evaluation is None:  # resumed after the last stage had finished
                self.evaluation = self._evaluation()
            run.task.write_predictions(self.evaluation, self.workdir, run.policy(),
                                       self.config.data.eval_batch_size)
            write_atomically(self.workdir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
            table = results_table(position.evals)
            (self.workdir / "results.md").write_text(table + "\n")
            print(table)
            plot_losses(self.workdir / METRICS_FILE, self.workdir / "loss_curve.png")
        self.writer.close()
        return results

    def _diverged(self, at: _DivergedAt) -> Diverged:
        """The one-line report of a diverged run, also written to WORKDIR/diverged.json."""
        self.manager.wait()  # the saves before the divergence, all of finite weights
        kept = self.manager.steps()
        stage = self.config.stages[at.stage_idx]
        if self.is_main:
            write_atomically(self.workdir / DIVERGED_FILE, json.dumps(
                {"step": at.step, "stage": at.stage_idx + 1, "kind": stage.kind, "why": at.why,
                 "last_checkpoint": kept[0] if kept else None}) + "\n")
        where = (f"its last checkpoint, step {kept[0]}, holds the finite weights before it"
                 if kept else "no checkpoint was saved before it")
        return Diverged(f"training diverged at step {at.step} (stage {at.stage_idx + 1}, "
                        f"{stage.kind}): {at.why}; {where}; lower "
                        f"config.stages[{at.stage_idx}].learning_rate (now "
                        f"{stage.learning_rate:g}) and train in a new --workdir")


def _read_results(path: Path) -> dict | None:
    """A run's results.json, or None when there is none (or it cannot be read)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


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


def _divergence(loss: float, grad_norm: float, max_loss: float) -> str:
    """Why a step's loss and gradient norm mean the run diverged, or ''."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
    if max_loss and loss > max_loss:
        return f"loss {loss:.4g} is above config.max_loss={max_loss:g}"
    return ""
