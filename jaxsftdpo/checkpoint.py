"""Orbax checkpoints of a run: trainable params, optimizer state, DPO reference, data position.

Items of one checkpoint: `params` (the trainable state: for LoRA the adapters alone; the frozen
base comes back from the model source), `optimizer` (step and optimizer state), `reference`
(the DPO reference: a frozen copy of the trainable state at the hand-off, or precomputed
log-probs) when the stage has one, and `meta` (JSON: stage, step within the stage, which fixes
the data position because the data order is a function of seed, stage and epoch, global step,
evaluations so far). Restoring takes the shardings of the given targets, so a checkpoint
restores onto a different mesh or number of devices.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsftdpo.errors import UserError
from jaxsftdpo.steps import TrainState


def _abstract(tree):
    def spec(x):
        if isinstance(x, np.ndarray):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.tree.map(spec, tree)


class Resume:
    """The newest checkpoint of a workdir, restored on demand into given targets."""

    FIX = "use a new --workdir, or the model this run was trained with"

    def __init__(self, manager: ocp.CheckpointManager, step: int, meta: dict):
        self.manager, self.step, self.meta = manager, step, meta

    def _misfit(self, detail: str, fix: str) -> UserError:
        return UserError(f"checkpoint {self.step} in {self.manager.directory} does not fit the "
                         f"model of this config ({detail}); {fix}")

    def _restore(self, fix: str = FIX, **targets):
        args = {name: ocp.args.StandardRestore(_abstract(t)) for name, t in targets.items()}
        try:
            with _quiet_absl():  # orbax warns about every item a partial restore leaves out
                return self.manager.restore(self.step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise self._misfit(first, fix) from e

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
        return self._restore(fix, params=trainable).params

    def stage_state(self, state: TrainState, reference):
        """The optimizer state, step and reference of a checkpoint taken mid-stage."""
        targets = {"params": state.trainable,
                   "optimizer": {"step": state.step, "opt_state": state.opt_state}}
        if reference is not None:
            targets["reference"] = reference
        restored = self._restore(**targets)
        state = TrainState(restored.optimizer["step"], restored.params,
                           restored.optimizer["opt_state"])
        return state, (restored.reference if reference is not None else None)


def _stored_shapes(item_dir: Path) -> dict | None:
    """`{dotted path: shape}` of a saved item, or None when its metadata cannot be read."""
    try:
        with _quiet_absl(), ocp.StandardCheckpointer() as checkpointer:
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


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Manager:
    """Async Orbax CheckpointManager keeping the newest `keep` checkpoints."""

    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory).absolute()
        self._manager = None
        self._keep = keep

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:  # created lazily: a run that fails validation writes nothing
            options = ocp.CheckpointManagerOptions(max_to_keep=self._keep,
                                                   enable_async_checkpointing=True)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def latest(self) -> Resume | None:
        if not self.directory.exists():
            return None
        step = self.manager.latest_step()
        if step is None:
            return None
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        return Resume(self.manager, step, meta)

    def save(self, step: int, state: TrainState, reference, meta: dict) -> None:
        items = {"params": ocp.args.StandardSave(state.trainable),
                 "optimizer": ocp.args.StandardSave({"step": state.step,
                                                     "opt_state": state.opt_state}),
                 "meta": ocp.args.JsonSave(json.loads(json.dumps(meta)))}
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
