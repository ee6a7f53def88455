"""Compiled train and eval steps for SFT and the preference stages (DPO, ORPO, SimPO).

One pure loss function per stage kind serves every execution mode: `make_train_step` wraps it in
gradient accumulation and an optimizer update for `jax.jit` over a mesh; the pmap mode calls the
same function. The preference kinds share one (`preference_loss`: chosen and rejected rows in one
forward) and differ in their objective (`OBJECTIVES`); only DPO has a reference. Losses come as
sums divided by a normaliser computed from the whole accumulated global batch up front, so
accumulating micro-batches or splitting over devices gives exactly the loss of one big batch.

Batch arrays carry a leading micro-batch axis `[grad_accum, micro_batch, T]`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsftdpo import losses, sharding
from jaxsftdpo.errors import UserError


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
    reference: str       # "frozen_copy": a reference model is the step's `ref`; "precomputed":
                         # its log-probs are in the batch; "none": zeros
    # frozen_copy: None when `ref` is a policy-shaped trainable state over the policy's frozen
    # part (the policy at the hand-off); another model's graphdef when `ref` is that model's
    # whole state `(params, rest)` (`dpo.reference_path`).
    reference_graphdef: Any = None


@dataclasses.dataclass(frozen=True)
class ORPOSettings:
    beta: float          # the odds-ratio term's weight: the paper's lambda, TRL's ORPOConfig.beta


@dataclasses.dataclass(frozen=True)
class SimPOSettings:
    beta: float
    gamma: float         # the target reward margin, TRL's simpo_gamma
    label_smoothing: float


def _pair_rows(batch: dict) -> tuple:
    # Each pair's chosen row, then its rejected row: a device's block of pairs becomes a block
    # of rows on the same device. Concatenating all chosen rows before all rejected ones instead
    # moves rows between devices, and over 64 chips at one pair each the TPU compiler
    # replicated the whole batch's forward on every chip (Llama-3.1-8B, plan).
    rows = lambda name: jnp.stack([batch[f"chosen_{name}"], batch[f"rejected_{name}"]],
                                  1).reshape(-1, batch[f"chosen_{name}"].shape[-1])
    return rows("input_ids"), rows("attention_mask"), rows("loss_mask")


def normalisers(kind: str, batch: dict, axis_name: str | None = None) -> dict:
    """Token and pair counts of the whole global batch (all micro-batches, all devices).

    Under pmap (`axis_name`) `batch` holds one device's rows; the counts are summed over the
    axis so every device divides by the global count, as the jit step does.
    """
    if kind == "sft":
        counts = {"tokens": batch["loss_mask"][..., 1:].sum()}
    else:
        chosen = batch["chosen_loss_mask"]
        counts = {"pairs": chosen.any(-1).sum(), "chosen_tokens": chosen[..., 1:].sum(),
                  "rejected_tokens": batch["rejected_loss_mask"][..., 1:].sum()}
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
    return {name: jnp.maximum(n, 1).astype(jnp.float32) for name, n in counts.items()}


def completion_scores(model, input_ids, attention_mask, loss_mask, scored_tokens=None,
                      dropout_rng=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(logps, valid, mean_logits)`, all `[B, K]`: log-probs of the tokens `loss_mask` scores,
    which entries are real, and the vocabulary mean of the logits that predict them (for the
    `logits/*` metrics; under jit it costs nothing where unused).

    With `scored_tokens` (at least as many as any row scores) and fewer than the sequence
    length, the LM head runs only at the K = `scored_tokens` positions that predict them: a
    large share of the step when completions are short (a paraphrase answer is one token,
    and GPT-2's LM head is a third of its forward). Otherwise at every position, K = T.
    """
    chunk = model.config.logits_chunk
    if scored_tokens is None or scored_tokens >= input_ids.shape[1] - 1:
        hidden = model(input_ids, attention_mask, dropout_rng=dropout_rng, head=False)
        logps, mean_logits = losses.head_scores(hidden[:, :-1], input_ids[:, 1:],
                                                model.logits_function(), chunk)
        first = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731  (position 0: no logit)
        return first(logps), losses.scored_mask(loss_mask), first(mean_logits)
    index, valid = losses.scored_token_index(loss_mask, scored_tokens)
    hidden = model(input_ids, attention_mask, dropout_rng=dropout_rng, logits_at=index - 1,
                   head=False)
    logps, mean_logits = losses.head_scores(hidden, jnp.take_along_axis(input_ids, index, 1),
                                            model.logits_function(), chunk)
    return logps, valid, mean_logits


def completion_logps(model, input_ids, attention_mask, loss_mask, scored_tokens=None,
                     dropout_rng=None) -> tuple[jax.Array, jax.Array]:
    """`(logps, valid)` of `completion_scores`."""
    return completion_scores(model, input_ids, attention_mask, loss_mask, scored_tokens,
                             dropout_rng)[:2]


def pair_completion_logps(model, batch: dict, scored_tokens=None):
    """Token log-probs `[2B, K]` of each pair's chosen and rejected rows (one forward), their
    mask, the summed completion log-probs `(chosen [B], rejected [B])`, and the vocabulary mean
    logits `[2B, K]` at the scored positions."""
    logps, valid, mean_logits = completion_scores(model, *_pair_rows(batch), scored_tokens)
    return (logps, valid, losses.split_chosen_rejected(losses.sequence_sums(logps, valid)),
            mean_logits)


class PairScores(NamedTuple):
    """The policy's scores of a micro-batch of pairs, each pair's chosen row then its rejected
    row (`pair_completion_logps`)."""

    logps: jax.Array        # [2B, K] token log-probs at the scored positions
    valid: jax.Array        # [2B, K] which of them are real
    sums: tuple             # (chosen [B], rejected [B]) summed completion log-probs
    mean_logits: jax.Array  # [2B, K] vocabulary-mean logits there

    def token_counts(self) -> tuple[jax.Array, jax.Array]:
        """Completion-token counts `(chosen [B], rejected [B])`."""
        return losses.split_chosen_rejected(self.valid.sum(-1))

    def length_averaged(self) -> tuple[jax.Array, jax.Array]:
        """Mean completion-token log-probs `(chosen [B], rejected [B])`, ORPO's and SimPO's."""
        return tuple(map(losses.length_averaged, self.sums, self.token_counts()))


def reference_function(graphdef, dpo: DPOSettings, scored_tokens=None):
    """`reference(frozen, ref, batch) -> (chosen [B], rejected [B])`: the reference's summed
    completion log-probs of a micro-batch's pairs, never differentiated. Where they come from
    (`dpo.reference`) is decided here, once for the step function."""
    if dpo.reference == "precomputed":
        return lambda frozen, ref, batch: (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    if dpo.reference == "none":
        def zeros(frozen, ref, batch):
            z = jnp.zeros(batch["chosen_input_ids"].shape[0], jnp.float32)
            return z, z
        return zeros
    if dpo.reference_graphdef is None:
        merge = lambda frozen, ref: nnx.merge(graphdef, ref, frozen)
    else:
        merge = lambda frozen, ref: nnx.merge(dpo.reference_graphdef, *ref)

    def model_logps(frozen, ref, batch):
        model = merge(frozen, jax.lax.stop_gradient(ref))
        logps = pair_completion_logps(model, batch, scored_tokens)[2]
        return jax.tree.map(jax.lax.stop_gradient, logps)
    return model_logps


def sft_loss(trainable, frozen, ref, batch, rng, norm, *, graphdef, scored_tokens=None):
    """Mean completion cross-entropy of the global batch, contributed by this micro-batch."""
    del ref
    model = nnx.merge(graphdef, trainable, frozen)
    logps, valid = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                    batch["loss_mask"], scored_tokens, rng)
    nll_sum, _ = losses.nll(logps, valid)
    # Non-padding tokens, prompts included: what the step reads (tokens_per_s, num_tokens).
    tokens = batch["attention_mask"].sum().astype(jnp.float32)
    return nll_sum / norm["tokens"], {"loss": nll_sum / norm["tokens"], "tokens": tokens}


def preference_loss(trainable, frozen, ref, batch, rng, norm, *, graphdef, objective,
                    reference=None, scored_tokens=None):
    """The loss of a preference stage's global batch contributed by this micro-batch: chosen and
    rejected rows in one forward, scored by `objective(scores, norm, reference_logps) ->
    (loss, metrics)` (`OBJECTIVES`), where `reference(frozen, ref, batch)` gives DPO's reference
    log-probs and None (reference-free) computes none. Metrics as TRL names them, each over the
    whole global batch: the objective's, `logits/chosen` and `logits/rejected` per completion
    token of their half (`losses.completion_logit_sums`), `loss` and `tokens`."""
    del rng  # preference stages run without dropout, so policy and reference see one network
    reference_logps = None if reference is None else reference(frozen, ref, batch)
    model = nnx.merge(graphdef, trainable, frozen)
    scores = PairScores(*pair_completion_logps(model, batch, scored_tokens))
    loss, metrics = objective(scores, norm, reference_logps)
    logit_sums = losses.completion_logit_sums(scores.mean_logits, scores.valid)
    metrics["logits/chosen"] = logit_sums["logits/chosen"] / norm["chosen_tokens"]
    metrics["logits/rejected"] = logit_sums["logits/rejected"] / norm["rejected_tokens"]
    metrics["loss"] = loss
    # Non-padding tokens, prompts included, of chosen and rejected rows: the amount TRL adds
    # to its running `num_tokens` each step.
    tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
    metrics["tokens"] = tokens.astype(jnp.float32)
    return loss, metrics


def _per_pair(metric_sums: dict, norm: dict) -> dict:
    return {name: value / norm["pairs"] for name, value in metric_sums.items()}


def dpo_objective(scores: PairScores, norm, reference_logps, *, settings: DPOSettings):
    """DPO (`losses.dpo_loss`) per pair, plus `settings.sft_weight` times the chosen
    completions' NLL per token; metrics: `losses.dpo_loss`'s per pair, `dpo_loss`, and
    `sft_loss` with an SFT term."""
    chosen_tokens, rejected_tokens = scores.token_counts()
    loss_sum, _, metric_sums = losses.dpo_loss(
        *scores.sums, *reference_logps, beta=settings.beta, loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing, chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens)
    metrics = _per_pair(metric_sums, norm)
    loss = loss_sum / norm["pairs"]
    metrics["dpo_loss"] = loss
    if settings.sft_weight:
        nll_sum, _ = losses.chosen_nll(scores.logps, scores.valid)
        metrics["sft_loss"] = nll_sum / norm["chosen_tokens"]
        loss = loss + settings.sft_weight * metrics["sft_loss"]
    return loss, metrics


def orpo_objective(scores: PairScores, norm, reference_logps, *, settings: ORPOSettings):
    """ORPO: the chosen completions' NLL per token plus the odds-ratio term per pair
    (`losses.odds_ratio_loss`, on length-averaged log-probs); metrics: the odds-ratio term's
    per pair and `nll_loss`, as TRL's ORPOTrainer logs them."""
    del reference_logps  # None: reference-free
    or_sum, _, metric_sums = losses.odds_ratio_loss(*scores.length_averaged(),
                                                    beta=settings.beta)
    metrics = _per_pair(metric_sums, norm)
    nll_sum, _ = losses.chosen_nll(scores.logps, scores.valid)
    metrics["nll_loss"] = nll_sum / norm["chosen_tokens"]
    return metrics["nll_loss"] + or_sum / norm["pairs"], metrics


def simpo_objective(scores: PairScores, norm, reference_logps, *, settings: SimPOSettings):
    """SimPO (`losses.simpo_loss`, on length-averaged log-probs) per pair; its metrics per
    pair."""
    del reference_logps  # None: reference-free
    loss_sum, _, metric_sums = losses.simpo_loss(
        *scores.length_averaged(), beta=settings.beta, gamma=settings.gamma,
        label_smoothing=settings.label_smoothing)
    return loss_sum / norm["pairs"], _per_pair(metric_sums, norm)


OBJECTIVES = {"dpo": dpo_objective, "orpo": orpo_objective, "simpo": simpo_objective}


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


def train_state_shardings(tx: optax.GradientTransformation, trainable) -> TrainState:
    """Shardings of a TrainState over `trainable` (arrays, or ShapeDtypeStructs that carry a
    sharding): each optimizer moment sharded like its parameter, so FSDP divides it as it
    divides the parameters; the step and other scalars replicated on the same devices."""
    first = jax.tree.leaves(trainable)[0].sharding
    everywhere = NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first
    params = jax.tree.map(lambda x: x.sharding, trainable)
    opt_state = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, trainable),
                                      params, transform_non_params=lambda _: everywhere)
    return TrainState(everywhere, params, opt_state)


def init_train_state(tx: optax.GradientTransformation, trainable) -> TrainState:
    """Step 0, the optimizer state created directly in its shardings (`train_state_shardings`).
    Every leaf has an explicit sharding, so the train step sees the same ones at every call."""
    shardings = train_state_shardings(tx, trainable)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), trainable,
                      opt_state)


def train_step(state: TrainState, frozen, ref, batch, rng, *, loss_fn, kind, tx,
               axis_name: str | None = None):
    """One optimizer step on a global batch: the body of the jit step and of the pmap step.

    With `axis_name` (pmap) `batch` holds this device's rows; normalisers, gradients and metrics
    are summed over the axis, so every device applies the update of the whole global batch.
    Dropout keys are folded with the device index there: the masks differ from the jit step's
    (which draws them for the global batch), so with dropout the two modes agree in
    distribution, not bit for bit.
    """
    norm = normalisers(kind, batch, axis_name)
    if axis_name is not None and rng is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    grads, metrics = accumulated_grads(loss_fn, state.trainable, frozen, ref, batch, rng, norm)
    if axis_name is not None:
        grads, metrics = jax.lax.psum((grads, metrics), axis_name)
    metrics["grad_norm"] = optax.global_norm(grads)
    return optimizer_update(tx, state, grads), metrics


def optimizer_update(tx: optax.GradientTransformation, state: TrainState, grads) -> TrainState:
    """`state` after one update of `tx` with `grads`."""
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    return TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state)


Settings = DPOSettings | ORPOSettings | SimPOSettings | None


def objective_settings(config, kind: str, reference_graphdef=None) -> Settings:
    """The settings of a stage `kind` (`loss_function`) from the run's config;
    `reference_graphdef` is the graphdef of the `dpo.reference_path` model, None without one."""
    if kind == "dpo":
        d = config.dpo
        return DPOSettings(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                           sft_weight=d.sft_weight, reference=d.reference,
                           reference_graphdef=reference_graphdef)
    if kind == "orpo":
        return ORPOSettings(beta=config.orpo.beta)
    if kind == "simpo":
        return SimPOSettings(beta=config.simpo.beta, gamma=config.simpo.gamma,
                             label_smoothing=config.simpo.label_smoothing)
    return None


def loss_function(kind: str, graphdef, settings: Settings, scored_tokens: int | None):
    """`loss_fn(trainable, frozen, ref, batch, rng, norm) -> (loss, metrics)` of a stage kind;
    `settings` are a preference kind's (`DPOSettings` for dpo, ...), None for sft."""
    if kind == "sft":
        return functools.partial(sft_loss, graphdef=graphdef, scored_tokens=scored_tokens)
    reference = reference_function(graphdef, settings, scored_tokens) if kind == "dpo" else None
    return functools.partial(preference_loss, graphdef=graphdef, scored_tokens=scored_tokens,
                             objective=functools.partial(OBJECTIVES[kind], settings=settings),
                             reference=reference)


def make_train_step(kind: str, graphdef, tx, settings: Settings, state_shardings=None,
                    scored_tokens: int | None = None):
    """`step(state, frozen, ref, batch, rng) -> (state, metrics)`, jitted, state donated.

    Compiles once per batch shape (length bucket) for the stage it was made for, with the
    stage kind's `settings` (`loss_function`).
    `scored_tokens`, a bound on the completion tokens of any row of the stage's data, lets the
    LM head run only where it is needed (`completion_logps`).
    """
    loss_fn = loss_function(kind, graphdef, settings, scored_tokens)
    step = functools.partial(train_step, loss_fn=loss_fn, kind=kind, tx=tx)
    out_shardings = None if state_shardings is None else (state_shardings, None)
    meshes = {s.mesh for s in jax.tree.leaves(state_shardings) if isinstance(s, NamedSharding)}
    if len(meshes) == 1:
        step = _traced_on(*meshes, step)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def _traced_on(mesh: Mesh, fn):
    """`fn`, traced for `mesh` (`sharding.tracing_on`) whenever it is traced."""
    def on_mesh(*args):
        with sharding.tracing_on(mesh):
            return fn(*args)
    return on_mesh


PMAP_AXIS = "devices"


def make_pmap_train_step(kind: str, graphdef, tx, settings: Settings, devices=None,
                         scored_tokens: int | None = None):
    """The pmap (data-parallel) counterpart of `make_train_step`, same call and same numbers.

    `step(state, frozen, ref, batch, rng) -> (state, metrics)` takes what the jit step takes:
    state, frozen and reference as replicated arrays (a mesh with data = all devices), the batch
    `[grad_accum, micro_batch, ...]` as host arrays or placed on that mesh. Each of the
    `devices` (default: all local devices) gets `micro_batch / n` rows of every micro-batch
    (the rows the jit step gives it), runs `train_step` on them and psums; the replicated state
    goes in and comes out unmapped (`in_axes=None`, `out_axes=None`), so the trainer, its
    checkpoints and evaluation see the same arrays in both modes. State is donated.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)
    loss_fn = loss_function(kind, graphdef, settings, scored_tokens)
    body = functools.partial(train_step, loss_fn=loss_fn, kind=kind, tx=tx, axis_name=PMAP_AXIS)
    mapped = jax.pmap(body, axis_name=PMAP_AXIS, in_axes=(None, None, None, 1, None),
                      out_axes=None, donate_argnums=(0,), devices=devices)

    def per_device(x):
        x = np.asarray(x)  # a few KB of token ids: the host copy costs nothing next to a step
        if x.shape[1] % n:
            raise UserError(f"parallel.mode=pmap: micro-batch of {x.shape[1]} rows does not "
                            f"split over {n} devices; use a batch_size / grad_accum that is a "
                            f"multiple of {n}")
        return x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:])

    everywhere = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P())

    def replicated(x):  # e.g. a fresh step counter on the default device
        full = x.sharding.is_fully_replicated and x.sharding.device_set == set(devices)
        return x if full else jax.device_put(x, everywhere)

    def step(state, frozen, ref, batch, rng):
        state = jax.tree.map(replicated, state)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        state, metrics = mapped(state, frozen, ref, jax.tree.map(per_device, batch), rng)
        # pmap returns the state on its own 1-D mesh; relabelling it (same buffers, no copy)
        # with the shardings it came in with keeps the next call on the compiled program.
        return jax.device_put(state, shardings), metrics

    return step


@functools.partial(jax.jit, static_argnames=("graphdef", "scored_tokens"))
def pair_logps(graphdef, trainable, frozen, batch, scored_tokens=None):
    """Summed completion log-probs `(chosen, rejected)` of a pair batch (no micro-batch axis)."""
    model = nnx.merge(graphdef, trainable, frozen)
    return pair_completion_logps(model, batch, scored_tokens)[2]


@functools.partial(jax.jit, static_argnames=("graphdef", "scored_tokens"))
def sequence_logps(graphdef, trainable, frozen, batch, scored_tokens=None):
    """Summed completion log-probs `[B]` of a sequence batch (no micro-batch axis)."""
    model = nnx.merge(graphdef, trainable, frozen)
    logps, valid = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                    batch["loss_mask"], scored_tokens)
    return losses.sequence_sums(logps, valid)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def last_token_logits(graphdef, trainable, frozen, batch):
    """Logits `[B, V]` at each row's `last_index` (the position that predicts the answer)."""
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(batch["input_ids"], batch["attention_mask"],
                   logits_at=batch["last_index"][:, None])
    return logits[:, 0]
