"""SFT and preference losses (DPO, ORPO, SimPO) as pure JAX functions, shared by the jit and the
pmap train steps.

Batch conventions: `input_ids [B,T] int32`; `loss_mask [B,T] bool`, True on completion tokens
(the ones to predict); logits `[B,T,V]` from `model(input_ids, attention_mask)`, where the
logit at position t predicts token t+1. Functions shift internally, so token t is scored by
`logits[:, t-1]` and position 0 is never scored, whatever `loss_mask[:, 0]` says.

Losses return `(sum, count)` pairs, not means: gradient accumulation and data-parallel
reduction add sums and counts separately and divide once, which keeps them exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsftdpo.errors import UserError
from jaxsftdpo.sharding import rows_on_batch_devices

# As TRL 1.16's DPOTrainer defines them (`ipo` length-normalised), plus `cdpo`, the smoothed
# sigmoid TRL does not have under that name (its `sigmoid` takes no `label_smoothing`).
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "cdpo")
_SMOOTHED_LOSS_TYPES = ("cdpo", "robust")


def scored_mask(loss_mask: jax.Array) -> jax.Array:
    """`[B,T]` bool: `loss_mask` with position 0, which has no preceding logit, cleared."""
    return jnp.asarray(loss_mask, bool).at[:, 0].set(False)


def picked_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`[B,K]` float32 log-probability of `targets [B,K]` under `logits [B,K,V]` (any float
    dtype, computed in float32), as `logit[target] - logsumexp(logits)`: no one-hot or
    log-softmax array beyond the float32 logits is materialised."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """`[B,T]` float32 log-probability of each token under the logit before it; 0 at position 0.
    `logits [B,T,V]`, `input_ids [B,T]` int."""
    return jnp.pad(picked_logprobs(logits[:, :-1], input_ids[:, 1:]), ((0, 0), (1, 0)))


def head_scores(hidden: jax.Array, targets: jax.Array, logits_fn, chunk: int = 0
                ) -> tuple[jax.Array, jax.Array]:
    """`(logps, mean_logits)`, both `[B,K]` float32: the `picked_logprobs` of `targets [B,K]`
    and the `vocab_mean_logits` under `logits_fn(hidden)`, for the final hidden states
    `hidden [B,K,d]` that predict them.

    With `chunk` (0 < chunk < K) the LM head runs on `chunk` positions at a time under
    `jax.checkpoint`, so the `[B,K,V]` float32 logits never exist, in the forward or the
    backward pass: only one chunk's, recomputed for its gradient. At a 128k vocabulary they
    are the largest arrays of a training step (2 GiB per 4 x 1024 tokens, several times over
    with their softmax and gradient). The values are the unchunked ones, position by position.
    """
    def scores(h, t):
        logits = rows_on_batch_devices(logits_fn(rows_on_batch_devices(h)))
        return picked_logprobs(logits, t), vocab_mean_logits(logits)

    b, k = targets.shape
    if not chunk or chunk >= k:
        return scores(hidden, targets)
    n = -(-k // chunk)
    pad = n * chunk - k
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    by_chunk = lambda x: x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    logps, means = jax.lax.map(jax.checkpoint(lambda xs: scores(*xs)),
                               (by_chunk(hidden), by_chunk(targets)))
    whole = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :k]  # noqa: E731
    return whole(logps), whole(means)


def scored_token_index(loss_mask: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """`(index, valid)`, both `[B, count]`: the positions of each row's first `count` scored
    tokens (their logits sit one position earlier), and which entries are real. Padding
    entries point at position 1 and are not valid."""
    mask = scored_mask(loss_mask)
    index = jax.vmap(lambda row: jnp.nonzero(row, size=count, fill_value=1)[0])(mask)
    valid = jnp.arange(count)[None, :] < mask.sum(-1, keepdims=True)
    return index.astype(jnp.int32), valid


def nll(logps: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(nll_sum, token_count)`, float32 scalars, of the `valid` entries of token log-probs:
    the SFT loss is `nll(token_logprobs(logits, ids), scored_mask(loss_mask))`. The mean
    cross-entropy is `nll_sum / token_count` once both are summed over all micro-batches and
    devices."""
    return -jnp.where(valid, logps, 0.0).sum(), valid.sum().astype(jnp.float32)


def vocab_mean_logits(logits: jax.Array) -> jax.Array:
    """`[B,K]` float32 mean over the vocabulary of `logits [B,K,V]`, without gradient: at the
    positions that predict completion tokens, what TRL's `logits/chosen` and `logits/rejected`
    average (`completion_logit_sums`)."""
    return jax.lax.stop_gradient(logits.astype(jnp.float32).mean(-1))


def sequence_sums(logps: jax.Array, valid: jax.Array) -> jax.Array:
    """`[B]` float32: each row's sum (not mean, as DPO uses) of its `valid` token log-probs,
    e.g. `sequence_sums(token_logprobs(logits, ids), scored_mask(loss_mask))`."""
    return jnp.where(valid, logps, 0.0).sum(-1)


def split_chosen_rejected(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a `[2B, ...]` array of pairs, each pair's chosen row then its rejected row, into
    `(chosen [B, ...], rejected [B, ...])`."""
    n = x.shape[0]
    if n % 2:
        raise ValueError(f"leading axis {n} is odd; expected chosen and rejected rows, 2B")
    pairs = x.reshape(n // 2, 2, *x.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def chosen_nll(logps: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(nll_sum, chosen_token_count)`: the SFT loss on the chosen half of a pair batch.

    Takes the token log-probs of the `[2B, K]` pair forward (`split_chosen_rejected`), the
    ones the sequence sums come from, and masks out the rejected rows. This is DPO's SFT term
    (TRL's `rpo_alpha`), combined as
    `total = dpo_loss_sum / pairs + weight * nll_sum / chosen_tokens`, and ORPO's NLL term; each
    sum and count reduced over micro-batches and devices first.
    """
    chosen_rows = jnp.arange(valid.shape[0])[:, None] % 2 == 0
    return nll(logps, valid & chosen_rows)


def completion_logit_sums(mean_logits: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """`{"logits/chosen", "logits/rejected"}`: sums over the scored tokens of the chosen and the
    rejected rows of a `[2B, K]` pair batch (`split_chosen_rejected`) of `vocab_mean_logits`.
    Divided by the chosen and the rejected token counts they are TRL's metrics of those names:
    the mean over completion tokens of the mean over the vocabulary of the logit that predicts
    the token."""
    chosen, rejected = split_chosen_rejected(jnp.where(valid, mean_logits, 0.0))
    return {"logits/chosen": chosen.sum(), "logits/rejected": rejected.sum()}


def check_dpo_options(loss_type: str, *, beta: float, label_smoothing: float) -> None:
    """Raise `UserError` unless `loss_type` is known, `beta > 0` and `label_smoothing` suits it.

    Python values only (config time, or trace time inside `dpo_loss`), not traced arrays.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise UserError(f"unknown DPO loss_type {loss_type!r}; choose one of "
                        f"{', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise UserError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type == "sigmoid":
        raise UserError(f"label_smoothing={label_smoothing} with loss_type 'sigmoid': TRL's "
                        f"sigmoid takes no label_smoothing; use loss_type=cdpo for the smoothed "
                        f"(conservative DPO) sigmoid, or set label_smoothing to 0")
    if label_smoothing and loss_type not in _SMOOTHED_LOSS_TYPES:
        raise UserError(f"label_smoothing applies only to loss_type "
                        f"{' or '.join(_SMOOTHED_LOSS_TYPES)}, not {loss_type!r}; set it to 0")


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: jax.Array | None = None, rejected_tokens: jax.Array | None = None,
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """`(loss_sum, pair_count, metrics_sums)` for `[B]` summed sequence log-probabilities
    (`sequence_sums`) and, for ipo, each row's completion-token count `[B]`.

    With `z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)` and
    `ls = label_smoothing`, the per-pair loss is
      sigmoid: `-log_sigmoid(beta*z)`
      cdpo:    `-log_sigmoid(beta*z)*(1-ls) - log_sigmoid(-beta*z)*ls` (conservative DPO)
      robust:  `(-log_sigmoid(beta*z)*(1-ls) + log_sigmoid(-beta*z)*ls) / (1-2*ls)`
      hinge:   `relu(1 - beta*z)`
      ipo:     `(z_ipo - 1/(2*beta))**2`, with each log-ratio divided by its row's number
               of completion tokens (at least 1), as TRL does:
               `z_ipo = (policy_chosen - ref_chosen) / chosen_tokens
                        - (policy_rejected - ref_rejected) / rejected_tokens`
    summed over pairs. All but ipo ignore the token counts; ipo needs them.

    `metrics_sums` holds sums over pairs, named as TRL names them (divide by the pair count):
    `rewards/chosen`, `rewards/rejected` (`beta * (policy - ref)`, summed log-probs for every
    loss type), `rewards/margins`, `rewards/accuracies` (pairs with chosen reward > rejected
    reward), `logps/chosen`, `logps/rejected` (policy, summed). Metrics carry no gradient.

    Raises `UserError` for an unknown `loss_type`, `beta <= 0`, or `label_smoothing` outside
    [0, 0.5) or non-zero for sigmoid (use cdpo), hinge or ipo; `ValueError` for ipo without
    token counts.
    """
    check_dpo_options(loss_type, beta=beta, label_smoothing=label_smoothing)
    ls = label_smoothing
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    z = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * z)
    elif loss_type == "cdpo":
        losses = -jax.nn.log_sigmoid(beta * z) * (1 - ls) - jax.nn.log_sigmoid(-beta * z) * ls
    elif loss_type == "robust":
        losses = ((-jax.nn.log_sigmoid(beta * z) * (1 - ls)
                   + jax.nn.log_sigmoid(-beta * z) * ls) / (1 - 2 * ls))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * z)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type 'ipo' divides each log-ratio by its completion length: "
                             "pass chosen_tokens and rejected_tokens")
        per_token = lambda ratio, n: ratio / jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
        z_ipo = per_token(chosen_ratio, chosen_tokens) - per_token(rejected_ratio, rejected_tokens)
        losses = (z_ipo - 1 / (2 * beta)) ** 2

    metrics = reward_metrics(beta * chosen_ratio, beta * rejected_ratio, policy_chosen_logps,
                             policy_rejected_logps)
    return losses.sum(), _pair_count(z), metrics


def reward_metrics(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                   chosen_logps: jax.Array, rejected_logps: jax.Array) -> dict[str, jax.Array]:
    """Sums over pairs, without gradient, of the metrics every TRL preference trainer logs:
    `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies` (pairs with
    chosen reward > rejected reward), `logps/chosen`, `logps/rejected`; all `[B]` inputs."""
    sg = jax.lax.stop_gradient
    chosen_rewards, rejected_rewards = sg(chosen_rewards), sg(rejected_rewards)
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).sum(),
        "logps/chosen": sg(chosen_logps).sum(),
        "logps/rejected": sg(rejected_logps).sum(),
    }


def _pair_count(per_pair: jax.Array) -> jax.Array:
    return jnp.asarray(per_pair.shape[0], jnp.float32)


# ---- reference-free objectives on length-averaged log-probs: ORPO, SimPO ---------------------

def length_averaged(sums: jax.Array, tokens: jax.Array) -> jax.Array:
    """`[B]` mean completion-token log-prob: `sums` (`sequence_sums`) over each row's token count
    `tokens`, at least 1, as TRL's `get_batch_logps(average_log_prob=True)` for ORPO and SimPO
    (where an empty completion gives 0/0)."""
    return sums / jnp.maximum(jnp.asarray(tokens, jnp.float32), 1.0)


def log1mexp(x: jax.Array) -> jax.Array:
    """`log(1 - exp(x))` for `x < 0`, branching at `-log 2` as TRL's ORPO `log1mexp` does, so
    neither branch loses precision to cancellation."""
    return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def check_orpo_options(*, beta: float) -> None:
    """Raise `UserError` unless ORPO's odds-ratio weight `beta` (the paper's lambda) is > 0."""
    if not beta > 0:
        raise UserError(f"orpo.beta (the odds-ratio term's weight, the paper's lambda) must "
                        f"be > 0, got {beta}")


def odds_ratio_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, *, beta: float
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """`(loss_sum, pair_count, metrics_sums)`: ORPO's odds-ratio term, as TRL 1.16's
    `ORPOTrainer.odds_ratio_loss` defines it, on `[B]` length-averaged log-probs
    (`length_averaged`) `lc`, `lr`:
      `log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))`
      per pair: `-beta * log_sigmoid(log_odds)`
    summed over pairs. The whole ORPO loss adds the chosen completions' NLL per token (the step
    combines `nll_sum / chosen_tokens + loss_sum / pairs`, each reduced over the global batch).

    `metrics_sums` are sums over pairs (divide by the pair count), without gradient:
    `reward_metrics` with rewards `beta * lc`, `beta * lr` and logps `lc`, `lr`, as TRL logs
    them; `log_odds_ratio` (`log_sigmoid(log_odds)`) and `log_odds_chosen` (`log_odds`).

    Raises `UserError` for `beta <= 0`.
    """
    check_orpo_options(beta=beta)
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps)
                                                  - log1mexp(rejected_logps))
    ratio = jax.nn.log_sigmoid(log_odds)
    metrics = reward_metrics(beta * chosen_logps, beta * rejected_logps, chosen_logps,
                             rejected_logps)
    metrics["log_odds_ratio"] = jax.lax.stop_gradient(ratio).sum()
    metrics["log_odds_chosen"] = jax.lax.stop_gradient(log_odds).sum()
    return -beta * ratio.sum(), _pair_count(ratio), metrics


def check_simpo_options(*, beta: float, gamma: float, label_smoothing: float) -> None:
    """Raise `UserError` unless `beta > 0`, the margin `gamma >= 0` and `label_smoothing` is in
    [0, 0.5). Python values only, as `check_dpo_options`."""
    if not beta > 0:
        raise UserError(f"simpo.beta must be > 0, got {beta}")
    if not gamma >= 0:
        raise UserError(f"simpo.gamma (the target reward margin) must be >= 0, got {gamma}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"simpo.label_smoothing must be in [0, 0.5), got {label_smoothing}")


def simpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, *, beta: float,
               gamma: float, label_smoothing: float = 0.0
               ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """`(loss_sum, pair_count, metrics_sums)` of SimPO, as TRL 1.16's `CPOTrainer.cpo_loss`
    defines `loss_type="simpo"` (with `cpo_alpha=0`, `alpha=0`), on `[B]` length-averaged
    log-probs `lc`, `lr`. With `u = beta * (lc - lr) - gamma` (TRL: `beta * (lc - lr -
    simpo_gamma / beta)`, so `gamma` is the margin in reward units, TRL's `simpo_gamma`) and
    `ls = label_smoothing`, the per-pair loss is
      `-(1 - ls) * log_sigmoid(u) - ls * log_sigmoid(-u)`
    summed over pairs. `metrics_sums`: `reward_metrics` with rewards `beta * lc`, `beta * lr`
    and logps `lc`, `lr`, as TRL logs them.

    Raises `UserError` for `beta <= 0`, `gamma < 0` or `label_smoothing` outside [0, 0.5).
    """
    check_simpo_options(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    u = beta * (chosen_logps - rejected_logps) - gamma
    losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(u)
              - label_smoothing * jax.nn.log_sigmoid(-u))
    metrics = reward_metrics(beta * chosen_logps, beta * rejected_logps, chosen_logps,
                             rejected_logps)
    return losses.sum(), _pair_count(losses), metrics
