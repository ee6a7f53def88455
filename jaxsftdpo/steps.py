"""Compiled train and eval steps for SFT and DPO.

One pure loss function per stage kind serves every execution mode: `make_train_step` wraps it in
gradient accumulation and an optimizer update for `jax.jit` over a mesh; the pmap mode calls the
same function. Losses come as sums divided by a normaliser computed from the whole accumulated
global batch up front, so accumulating micro-batches or splitting over devices gives exactly the
loss of one big batch.

Batch arrays carry a leading micro-batch axis `[grad_accum, micro_batch, T]`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsftdpo import losses


class TrainState(NamedTuple):
    """What the optimizer changes. Frozen parameters travel separately and are never donated."""

    step: jax.Array
    trainable: nnx.State
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    beta: float
    loss_type: str
    label_smoothing: float
    sft_weight: float
    reference: str       # "frozen_copy" (policy-shaped `ref` params), "zero_adapters" (LoRA:
                         # the frozen base alone), "precomputed" (logps in the batch), "none"


def _concat_pairs(batch: dict) -> tuple:
    cat = lambda name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], 0)
    return cat("input_ids"), cat("attention_mask"), cat("loss_mask")


def normalisers(kind: str, batch: dict) -> dict:
    """Token and pair counts of the whole global batch (all micro-batches, all devices)."""
    if kind == "sft":
        return {"tokens": jnp.maximum(batch["loss_mask"][..., 1:].sum(), 1).astype(jnp.float32)}
    chosen = batch["chosen_loss_mask"]
    return {"pairs": jnp.maximum(chosen.any(-1).sum(), 1).astype(jnp.float32),
            "chosen_tokens": jnp.maximum(chosen[..., 1:].sum(), 1).astype(jnp.float32)}


def sequence_logps_of_pairs(model, batch: dict):
    """Summed completion log-probs of the chosen and rejected rows, one forward for both."""
    ids, mask, loss_mask = _concat_pairs(batch)
    logits = model(ids, mask)
    return logits, losses.split_chosen_rejected(losses.sequence_logprobs(logits, ids, loss_mask))


def reference_logps(graphdef, trainable, frozen, ref, batch, dpo: DPOSettings):
    """Reference log-probs of a micro-batch, never differentiated."""
    if dpo.reference == "precomputed":
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    if dpo.reference == "none":
        zeros = jnp.zeros(batch["chosen_input_ids"].shape[0], jnp.float32)
        return zeros, zeros
    if dpo.reference == "zero_adapters":
        ref = jax.tree.map(jnp.zeros_like, trainable)
    model = nnx.merge(graphdef, jax.lax.stop_gradient(ref), frozen)
    _, logps = sequence_logps_of_pairs(model, batch)
    return jax.tree.map(jax.lax.stop_gradient, logps)


def sft_loss(trainable, frozen, ref, batch, rng, norm, *, graphdef, dpo=None):
    """Mean completion cross-entropy of the global batch, contributed by this micro-batch."""
    del ref, dpo
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(batch["input_ids"], batch["attention_mask"], dropout_rng=rng)
    nll_sum, tokens = losses.sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    return nll_sum / norm["tokens"], {"loss": nll_sum / norm["tokens"], "tokens": tokens}


def dpo_loss(trainable, frozen, ref, batch, rng, norm, *, graphdef, dpo: DPOSettings):
    """DPO loss of the global batch contributed by this micro-batch; metrics as TRL names them."""
    del rng  # DPO runs without dropout, so policy and reference see the same network
    ref_chosen, ref_rejected = reference_logps(graphdef, trainable, frozen, ref, batch, dpo)
    model = nnx.merge(graphdef, trainable, frozen)
    logits, (chosen, rejected) = sequence_logps_of_pairs(model, batch)
    loss_sum, _, metric_sums = losses.dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=dpo.beta, loss_type=dpo.loss_type,
        label_smoothing=dpo.label_smoothing)
    loss = loss_sum / norm["pairs"]
    metrics = {name: value / norm["pairs"] for name, value in metric_sums.items()}
    metrics["dpo_loss"] = loss
    if dpo.sft_weight:
        ids, _, loss_mask = _concat_pairs(batch)
        nll_sum, _ = losses.dpo_sft_term(logits, ids, loss_mask)
        metrics["sft_loss"] = nll_sum / norm["chosen_tokens"]
        loss = loss + dpo.sft_weight * metrics["sft_loss"]
    metrics["loss"] = loss
    tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
    metrics["tokens"] = tokens.astype(jnp.float32)
    return loss, metrics


LOSSES = {"sft": sft_loss, "dpo": dpo_loss}


def accumulated_grads(loss_fn, trainable, frozen, ref, batch, rng, norm):
    """Gradients and metrics summed over the leading micro-batch axis with `lax.scan`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = jax.tree.leaves(batch)[0].shape[0]
    rngs = None if rng is None else jax.random.split(rng, accum)  # None: no dropout

    def micro(carry, inputs):
        grads, metrics = carry
        micro_batch, key = inputs
        (_, m), g = grad_fn(trainable, frozen, ref, micro_batch, key, norm)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

    first_metrics = jax.eval_shape(lambda: grad_fn(
        trainable, frozen, ref, jax.tree.map(lambda x: x[0], batch), rng, norm)[0][1])
    zeros = (jax.tree.map(jnp.zeros_like, trainable),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_metrics))
    (grads, metrics), _ = jax.lax.scan(micro, zeros, (batch, rngs))
    return grads, metrics


def make_optimizer(stage, total_steps: int) -> optax.GradientTransformation:
    """AdamW with warmup then a constant, linear or cosine schedule, after norm clipping."""
    lr, warmup = stage.learning_rate, min(stage.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    after = {"constant": optax.constant_schedule(lr),
             "linear": optax.linear_schedule(lr, 0.0, decay_steps),
             "cosine": optax.cosine_decay_schedule(lr, decay_steps)}[stage.schedule]
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
    parts = [optax.clip_by_global_norm(stage.max_grad_norm)] if stage.max_grad_norm else []
    parts.append(optax.adamw(schedule, weight_decay=stage.weight_decay))
    return optax.chain(*parts), schedule


def train_step(state: TrainState, frozen, ref, batch, rng, *, loss_fn, kind, tx):
    norm = normalisers(kind, batch)
    grads, metrics = accumulated_grads(loss_fn, state.trainable, frozen, ref, batch, rng, norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return TrainState(state.step + 1, trainable, opt_state), metrics


def make_train_step(kind: str, graphdef, tx, dpo: DPOSettings | None, state_shardings=None):
    """`step(state, frozen, ref, batch, rng) -> (state, metrics)`, jitted, state donated.

    Compiles once per batch shape (length bucket) for the stage it was made for.
    """
    loss_fn = functools.partial(LOSSES[kind], graphdef=graphdef, dpo=dpo)
    step = functools.partial(train_step, loss_fn=loss_fn, kind=kind, tx=tx)
    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def pair_logps(graphdef, trainable, frozen, batch):
    """Summed completion log-probs `(chosen, rejected)` of a pair batch (no micro-batch axis)."""
    model = nnx.merge(graphdef, trainable, frozen)
    return sequence_logps_of_pairs(model, batch)[1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def last_token_logits(graphdef, trainable, frozen, batch):
    """Logits `[B, V]` at each row's `last_index` (the position that predicts the answer)."""
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(batch["input_ids"], batch["attention_mask"])
    return jnp.take_along_axis(logits, batch["last_index"][:, None, None], axis=1)[:, 0]
