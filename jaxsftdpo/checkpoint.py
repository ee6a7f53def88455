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

import json
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

    def __init__(self, manager: ocp.CheckpointManager, step: int, meta: dict):
        self.manager, self.step, self.meta = manager, step, meta

    def _restore(self, **targets):
        args = {name: ocp.args.StandardRestore(_abstract(t)) for name, t in targets.items()}
        try:
            return self.manager.restore(self.step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint {self.step} in {self.manager.directory} does not fit "
                            f"the model of this config ({first}); use a new --workdir") from e

    def params(self, trainable):
        return self._restore(params=trainable).params

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
