"""Orbax checkpoints of a run: trainable params, optimizer state, DPO reference, data position.

Items of one checkpoint: `params` (the trainable state: for LoRA the adapters alone; the frozen
base comes back from the model source), `optimizer` (step and optimizer state), `reference`
(the DPO reference: a frozen copy of the trainable state at the hand-off, or precomputed
log-probs) when the stage has one, and `meta` (JSON: stage, step within the stage, which fixes
the data position because the data order is a function of seed, stage and epoch, global step,
evaluations so far). Restoring takes the shardings of the given targets, so a checkpoint
restores onto a different mesh or number of devices.

A checkpoint whose files cannot be read back (truncated, partly deleted) raises `Unreadable`;
`newest_restorable` reports it in one line and goes on to the one before. A checkpoint that
does not fit the model is a `UserError`: an older one would not fit either. A save that fails
(a full disk) removes its temporary directory and raises a `StorageError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsftdpo.errors import StorageError, UserError, first_line

UNREADABLE_DIR = "unreadable_checkpoints"  # beside checkpoints/: those a resumed run set aside


class Unreadable(Exception):
    """A checkpoint whose files cannot be read back; the message says what failed."""


@dataclasses.dataclass
class Position:
    """Where a run stands, saved with each of its checkpoints: the stage it is in (the number
    of stages once the last is done), the optimizer steps taken in that stage and in all, the
    tokens trained on (TRL's `num_tokens`), and the evaluations so far."""

    stage: int = 0
    stage_step: int = 0
    global_step: int = 0
    num_tokens: int = 0
    evals: list = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, meta) -> Position:
        """The position a checkpoint's meta holds (keys added since it was written default)."""
        if not isinstance(meta, dict) or "global_step" not in meta:
            raise Unreadable("meta: not a run's position")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})


def _abstract(tree):
    def spec(x):
        if isinstance(x, np.ndarray):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.tree.map(spec, tree)


class Resume:
    """One checkpoint of a workdir (its position read), restored on demand into given
    targets."""

    FIX = "use a new --workdir, or the model this run was trained with"

    def __init__(self, manager: ocp.CheckpointManager, step: int, position: Position):
        self.manager, self.step, self.position = manager, step, position

    def _misfit(self, detail: str, fix: str) -> UserError:
        return UserError(f"checkpoint {self.step} in {self.manager.directory} does not fit the "
                         f"model of this config ({detail}); {fix}")

    def _restore(self, **targets):
        """Restore items into targets whose shapes were checked, so any failure is the files'."""
        args = {name: ocp.args.StandardRestore(_abstract(t)) for name, t in targets.items()}
        try:
            with quiet_absl():  # orbax warns about every item a partial restore leaves out
                return self.manager.restore(self.step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - tensorstore raises bare Exceptions
            raise Unreadable(_reason(e)) from e

    def params(self, trainable, fix: str = FIX):
        """The trainable state of the checkpoint, in the shardings of `trainable`.

        Shapes are compared first: a failed Orbax restore leaves reads pending that print
        tracebacks when the process exits, so a misfit must be caught before restoring.
        """
        stored = _stored_shapes(Path(self.manager.directory) / str(self.step) / "params")
        if stored is not None:
            want = _shapes(trainable)
            if set(stored) != set(want):
                missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
                raise self._misfit(f"the model has {missing[0]}, the checkpoint does not"
                                   if missing else
                                   f"the checkpoint has {extra[0]}, the model does not", fix)
            wrong = [f"{name} is {stored[name]} in the checkpoint, {want[name]} in the model"
                     for name in sorted(want) if stored[name] != want[name]]
            if wrong:
                raise self._misfit(wrong[0], fix)
        return self._restore(params=trainable).params

    def stage_state(self, state, reference):
        """The optimizer state, step and reference of a checkpoint taken mid-stage, into the
        shapes and shardings of `state` (a `steps.TrainState`) and `reference`."""
        targets = {"params": state.trainable,
                   "optimizer": {"step": state.step, "opt_state": state.opt_state}}
        if reference is not None:
            targets["reference"] = reference
        restored = self._restore(**targets)
        state = state._replace(step=restored.optimizer["step"], trainable=restored.params,
                               opt_state=restored.optimizer["opt_state"])
        return state, (restored.reference if reference is not None else None)


def _stored_shapes(item_dir: Path) -> dict | None:
    """`{dotted path: shape}` of a saved item, or None when its metadata cannot be read;
    Unreadable when the item's metadata file is cut short (a partial tree would look like a
    model mismatch)."""
    try:
        json.loads((item_dir / "_METADATA").read_text())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise Unreadable(f"{item_dir.name}/_METADATA: {_reason(e)}") from e
    try:
        with quiet_absl(), ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(item_dir)
        stored = getattr(stored, "item_metadata", stored)
        return _shapes(stored, is_leaf=lambda x: hasattr(x, "shape"))
    except Exception:  # noqa: BLE001 - only a pre-check; the restore reports what is wrong
        return None


def _shapes(tree, is_leaf=None) -> dict:
    """`{dotted parameter path: shape}` of a state or of Orbax's tree metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out[".".join(n for n in names if n != "value")] = tuple(leaf.shape)
    return out


def _drop_abandoned_io() -> None:
    """A failed restore or save leaves orbax's other reads or writes in flight; as they end,
    on the event loop orbax has closed, Python reports each as an unraisable exception
    (hundreds of lines of tracebacks around the one line `Manager` gives). Those reports are
    dropped; any other goes to the hook there was."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_io", False):
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if (str(unraisable.exc_value) == "Event loop is closed"
                or (code is not None and "orbax" in code.co_filename)):
            return
        previous(unraisable)

    hook.drops_abandoned_io = True
    sys.unraisablehook = hook


def _reason(error: BaseException) -> str:
    """The error's first line (`errors.first_line`) without tensorstore's dump of its spec,
    after the error's type but for the bare `Exception`s tensorstore raises."""
    text = str(error).split(". See full TensorStore details")[0]
    if not text.strip():
        return type(error).__name__
    first = first_line(text, 200)
    return first if type(error) is Exception else f"{type(error).__name__}: {first}"


@contextlib.contextmanager
def quiet_absl():
    """Orbax logs through absl: warnings about partial restores, and tracebacks from its
    background threads when a save fails, which `Manager` reports itself in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class Manager:
    """Async Orbax CheckpointManager keeping the newest `keep` checkpoints.

    The trainer's manager (`writer=True`, the workdir's lock holder) also removes temporary
    directories a killed run left behind; evaluate's and export's only read.
    """

    def __init__(self, directory: Path, keep: int, *, writer: bool = False):
        self.directory = Path(directory).absolute()
        self._manager = None
        self._keep = keep
        self._writer = writer

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:  # created lazily: a run that fails validation writes nothing
            _drop_abandoned_io()
            options = ocp.CheckpointManagerOptions(max_to_keep=self._keep,
                                                   enable_async_checkpointing=True,
                                                   cleanup_tmp_directories=self._writer)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def steps(self) -> list[int]:
        """The steps of the finished checkpoints, newest first."""
        if not self.directory.exists():
            return []
        with quiet_absl():
            return sorted(self.manager.all_steps(), reverse=True)

    def resume(self, step: int) -> Resume:
        try:
            with quiet_absl():
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - a missing or cut JSON file, ...
            raise Unreadable(f"meta: {_reason(e)}") from e
        return Resume(self.manager, step, Position.from_json(meta))

    def latest(self) -> Resume | None:
        steps = self.steps()
        return self.resume(steps[0]) if steps else None

    def set_aside(self, steps: list[int]) -> None:
        """Move checkpoints out of the way (to UNREADABLE_DIR beside the checkpoints), so the
        steps can be saved again."""
        aside = self.directory.parent / UNREADABLE_DIR
        aside.mkdir(exist_ok=True)
        for step in steps:
            target, n = aside / str(step), 0
            while target.exists():  # set aside before, at an earlier try
                n += 1
                target = aside / f"{step}.{n}"
            os.replace(self.directory / str(step), target)
        self.close()  # orbax caches the steps it has seen

    def save(self, step: int, state, reference, position: Position) -> None:
        """Save `state` (a `steps.TrainState`), the stage's `reference` (None, or what the
        trainer keeps of it) and the run's `position` as checkpoint `step`."""
        meta = json.loads(json.dumps(dataclasses.asdict(position)))
        items = {"params": ocp.args.StandardSave(state.trainable),
                 "optimizer": ocp.args.StandardSave({"step": state.step,
                                                     "opt_state": state.opt_state}),
                 "meta": ocp.args.JsonSave(meta)}
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        try:  # the save also waits for the previous one, whose error surfaces here
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - tensorstore raises bare Exceptions
            self._failed(e)

    def wait(self) -> None:
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                self._failed(e)

    def close(self) -> None:
        """Stop orbax's background threads (a failed read leaves some that print tracebacks
        when the process exits)."""
        if self._manager is not None:
            with quiet_absl(), contextlib.suppress(Exception):
                self._manager.close()
            self._manager = None

    def _failed(self, error: Exception):
        # The run ends here; orbax's threads still finishing the failed save would log the
        # error reported below again, with tracebacks, until the process exits.
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(lambda record: False)
        self.close()
        if jax.process_index() == 0:
            self._remove_temporaries()
        kept = sorted((int(p.name) for p in self.directory.iterdir() if p.name.isdigit()),
                      reverse=True) if self.directory.is_dir() else []
        then = f"it resumes from checkpoint {kept[0]}" if kept else "it starts over"
        raise StorageError(f"cannot write a checkpoint in {self.directory} "
                           f"({_os_reason(error)}); free space and rerun the same command: "
                           f"{then}") from error


    def _remove_temporaries(self) -> None:
        """Remove a failed save's temporary directory. Writes it had in flight still land for
        a moment after orbax gives up, recreating the directory, so first orbax's threads are
        waited for, then the directory is swept until it has stayed away for half a second."""
        for thread in threading.enumerate():
            if type(thread).__module__.startswith("orbax"):
                with contextlib.suppress(Exception):  # orbax's join re-raises the thread's error
                    thread.join(timeout=30)
        last_seen, deadline = time.monotonic(), time.monotonic() + 30
        while time.monotonic() - last_seen < 0.5 and time.monotonic() < deadline:
            for temporary in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(temporary, ignore_errors=True)
                last_seen = time.monotonic()
            time.sleep(0.05)


def _os_reason(error: Exception) -> str:
    """`No space left on device` for tensorstore's `...[os_error_code='28']`, an OSError's
    strerror, else the error's first line."""
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
        return os.strerror(int(code[1]))
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _reason(error)


def newest_restorable(manager: Manager, restore, fix: str):
    """`(resume, restore(resume), skipped steps)` of the newest checkpoint that `restore` reads
    without `Unreadable`, after one line naming those skipped and the one used. None when there
    is no checkpoint; a UserError ending in `fix` when none restores."""
    reasons = {}
    for step in manager.steps():
        try:
            resume = manager.resume(step)
            value = restore(resume)
        except Unreadable as e:
            manager.close()
            reasons[step] = str(e)
            continue
        if reasons:
            print(f"{_skipped(manager, reasons)}; using checkpoint {step}", file=sys.stderr)
        return resume, value, list(reasons)
    if reasons:
        raise UserError(f"{_skipped(manager, reasons)}, and no other checkpoint does; {fix}")
    return None


def _skipped(manager: Manager, reasons: dict) -> str:
    steps = list(reasons)
    return (f"checkpoint{'s' * (len(steps) > 1)} {', '.join(map(str, steps))} in "
            f"{manager.directory} cannot be restored ({steps[0]}: {reasons[steps[0]]})")
