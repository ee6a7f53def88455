"""Losses against plain-math transcriptions, numpy log-softmax, torch cross-entropy and TRL's own
ORPO and SimPO loss functions."""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from jaxsftdpo import steps  # noqa: E402
from jaxsftdpo.errors import UserError  # noqa: E402
from jaxsftdpo.losses import (chosen_nll, dpo_loss, nll, odds_ratio_loss,  # noqa: E402
                              scored_mask, scored_token_index, sequence_sums, simpo_loss,
                              split_chosen_rejected, token_logprobs)

B, T, V = 4, 7, 11
BETA = 0.3


def sft_loss(logits, ids, loss_mask):
    """The SFT loss as the train step composes it (over every position)."""
    return nll(token_logprobs(logits, ids), scored_mask(loss_mask))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


# Per-pair loss and its derivative in z = (pc - pr) - (rc - rr), written out by hand.
# (ipo divides by completion lengths, so it has its own test below.)
def _reference(loss_type, z, b, ls):
    if loss_type == "sigmoid":
        loss = -_log_sigmoid(b * z)
        dz = -b * _sigmoid(-b * z)
    elif loss_type == "cdpo":  # the smoothed sigmoid, which loss_type sigmoid was before
        loss = -_log_sigmoid(b * z) * (1 - ls) - _log_sigmoid(-b * z) * ls
        dz = -b * (1 - ls) * _sigmoid(-b * z) + b * ls * _sigmoid(b * z)
    elif loss_type == "robust":
        loss = (-_log_sigmoid(b * z) * (1 - ls) + _log_sigmoid(-b * z) * ls) / (1 - 2 * ls)
        dz = -b * ((1 - ls) * _sigmoid(-b * z) + ls * _sigmoid(b * z)) / (1 - 2 * ls)
    else:
        assert loss_type == "hinge"
        loss = np.maximum(0.0, 1 - b * z)
        dz = np.where(1 - b * z > 0, -b, 0.0)
    return loss, dz


def _logps():
    rng = np.random.default_rng(0)
    # Large spread so hinge has pairs on both sides of its kink.
    return [(-rng.uniform(5, 40, size=8)).astype(np.float32) for _ in range(4)]


# The smoothed cases that were ("sigmoid", 0.1), ("sigmoid", 0.4) are cdpo now, and ipo (TRL's
# length-normalised definition now) has test_ipo_is_trls_length_normalised_loss.
@pytest.mark.parametrize("loss_type,ls", [
    ("sigmoid", 0.0), ("cdpo", 0.0), ("cdpo", 0.1), ("cdpo", 0.4),
    ("robust", 0.0), ("robust", 0.2), ("robust", 0.45),
    ("hinge", 0.0),
])
def test_dpo_loss_and_grads_match_formula(loss_type, ls):
    pc, pr, rc, rr = _logps()
    z = (pc.astype(np.float64) - pr) - (rc - rr)
    want_loss, dz = _reference(loss_type, z, BETA, ls)

    def total(*logps):
        return dpo_loss(*logps, beta=BETA, loss_type=loss_type, label_smoothing=ls)[0]

    loss = total(pc, pr, rc, rr)
    grads = jax.grad(total, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    np.testing.assert_allclose(loss, want_loss.sum(), rtol=1e-5)
    for g, sign in zip(grads, (1, -1, -1, 1)):
        np.testing.assert_allclose(g, sign * dz, rtol=1e-5, atol=1e-6)
    if loss_type == "hinge":
        assert 0 < (1 - BETA * z > 0).sum() < len(z)


def _trl_ipo(pc, pr, rc, rr, n_chosen, n_rejected, beta):
    """TRL 1.16 `DPOTrainer._compute_loss`, loss_type "ipo", transcribed: each sequence's
    log-ratio to the reference over its completion-token count (clamped to 1), then
    `(delta - 1/(2*beta))**2`, averaged over the pairs."""
    chosen_avg_score = (pc - rc) / np.maximum(n_chosen, 1.0)
    rejected_avg_score = (pr - rr) / np.maximum(n_rejected, 1.0)
    ipo_delta = chosen_avg_score - rejected_avg_score
    return ((ipo_delta - 1 / (2 * beta)) ** 2).mean()


def test_ipo_is_trls_length_normalised_loss():
    # Hand-made: completions of 4, 1, 10 and 0 tokens (an empty one counts as 1, as in TRL).
    pc = np.array([-12.0, -3.5, -40.0, 0.0], np.float32)
    pr = np.array([-9.0, -6.0, -20.0, -2.0], np.float32)
    rc = np.array([-13.0, -3.0, -38.0, 0.0], np.float32)
    rr = np.array([-8.0, -7.5, -25.0, -1.0], np.float32)
    nc = np.array([4, 1, 10, 0], np.int32)
    nr = np.array([3, 2, 5, 1], np.int32)
    f64 = [x.astype(np.float64) for x in (pc, pr, rc, rr, nc, nr)]
    for beta in (0.1, 0.2, 1.0):
        loss, pairs, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo",
                                  chosen_tokens=nc, rejected_tokens=nr)
        np.testing.assert_allclose(loss / pairs, _trl_ipo(*f64, beta), rtol=1e-6)
        # Summed log-ratios (what ipo was before) give a different loss on these lengths.
        assert abs(_trl_ipo(*f64[:4], 1, 1, beta) - float(loss / pairs)) > 0.1

    # Gradients of the transcription (by hand: d/d delta = 2 (delta - 1/(2 beta)), then the
    # counts), and the same numbers from the jitted loss on random log-probs.
    pc, pr, rc, rr = _logps()
    rng = np.random.default_rng(1)
    nc, nr = rng.integers(1, 30, size=(2, len(pc)))
    delta = (pc - rc) / nc.astype(np.float64) - (pr - rr) / nr
    dd = 2 * (delta - 1 / (2 * BETA))
    step = jax.jit(lambda *x: dpo_loss(*x, beta=BETA, loss_type="ipo", chosen_tokens=nc,
                                       rejected_tokens=nr)[0])
    np.testing.assert_allclose(step(pc, pr, rc, rr), len(pc) * _trl_ipo(
        pc, pr, rc, rr, nc, nr, BETA), rtol=1e-5)
    grads = jax.grad(step, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    for g, want in zip(grads, (dd / nc, -dd / nr, -dd / nc, dd / nr)):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)

    # Rewards and log-prob metrics stay on the summed log-probs, as TRL logs them.
    m = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="ipo", chosen_tokens=nc,
                 rejected_tokens=nr)[2]
    np.testing.assert_allclose(m["rewards/chosen"], BETA * (pc - rc).sum(), rtol=1e-5)
    np.testing.assert_allclose(m["logps/rejected"], pr.sum(), rtol=1e-6)


def test_ipo_without_token_counts_is_an_error():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="chosen_tokens and rejected_tokens"):
        dpo_loss(x, x, x, x, beta=BETA, loss_type="ipo")


def test_cdpo_is_the_smoothed_sigmoid_and_sigmoid_refuses_label_smoothing():
    """cdpo is conservative DPO, the label-smoothed sigmoid (what loss_type sigmoid computed
    with label_smoothing > 0 before); at label_smoothing 0 it is sigmoid."""
    pc, pr, rc, rr = _logps()
    z = (pc.astype(np.float64) - pr) - (rc - rr)
    for ls in (0.1, 0.3):
        smoothed = -_log_sigmoid(BETA * z) * (1 - ls) - _log_sigmoid(-BETA * z) * ls
        got = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="cdpo", label_smoothing=ls)[0]
        np.testing.assert_allclose(got, smoothed.sum(), rtol=1e-5)
    np.testing.assert_allclose(dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="cdpo")[0],
                               dpo_loss(pc, pr, rc, rr, beta=BETA)[0], rtol=1e-6)
    with pytest.raises(UserError, match="loss_type=cdpo") as info:
        dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="sigmoid", label_smoothing=0.1)
    assert "\n" not in str(info.value)


def test_sigmoid_with_reference_equal_to_policy_is_log2_and_zero_rewards():
    pc, pr, _, _ = _logps()
    loss, pairs, m = dpo_loss(pc, pr, pc, pr, beta=BETA)
    assert pairs == len(pc)
    assert abs(loss / pairs - math.log(2)) < 1e-6
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[k] == 0.0


def test_dpo_metrics_on_known_inputs():
    pc = jnp.array([-1.0, -2.0, -3.0])
    pr = jnp.array([-2.0, -1.0, -3.0])
    zero = jnp.zeros(3)
    _, pairs, m = dpo_loss(pc, pr, zero, zero, beta=0.5)
    want = {
        "rewards/chosen": 0.5 * -6.0,
        "rewards/rejected": 0.5 * -6.0,
        "rewards/margins": 0.0,
        "rewards/accuracies": 1.0,  # only the first pair has chosen reward > rejected
        "logps/chosen": -6.0,
        "logps/rejected": -6.0,
    }
    assert set(m) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, err_msg=k)
    assert m["rewards/accuracies"] / pairs == pytest.approx(1 / 3)


def test_dpo_metrics_carry_no_gradient():
    pc, pr, rc, rr = _logps()
    g = jax.grad(lambda x: sum(dpo_loss(x, pr, rc, rr, beta=BETA)[2].values()))(pc)
    assert not np.any(g)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    # Rows: prompt then completion then padding; row 0 claims position 0 as completion.
    loss_mask = np.zeros((B, T), bool)
    for b, (start, end) in enumerate([(0, 4), (2, 7), (3, 5), (1, 6)]):
        loss_mask[b, start:end] = True
    return logits, ids, loss_mask


def _np_token_logprobs(logits, ids):
    x = logits.astype(np.float64)
    logsm = x - x.max(-1, keepdims=True)
    logsm = logsm - np.log(np.exp(logsm).sum(-1, keepdims=True))
    out = np.zeros(ids.shape)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            out[b, t] = logsm[b, t - 1, ids[b, t]]
    return out


def test_token_and_sequence_logprobs_match_numpy():
    logits, ids, mask = _batch()
    want = _np_token_logprobs(logits, ids)
    got = token_logprobs(jnp.asarray(logits), ids)
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.any(got[:, 0])
    scored = mask.copy()
    scored[:, 0] = False
    np.testing.assert_allclose(sequence_sums(got, scored_mask(mask)),
                               (want * scored).sum(-1), rtol=1e-5)


def test_bf16_logits_are_scored_in_float32():
    logits, ids, _ = _batch()
    got = token_logprobs(jnp.asarray(logits, jnp.bfloat16), ids)
    want = _np_token_logprobs(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), ids)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sft_loss_matches_numpy_and_ignores_prompt_padding_and_position_0():
    logits, ids, mask = _batch()
    nll, count = sft_loss(logits, ids, mask)
    scored = mask.copy()
    scored[:, 0] = False
    assert count.dtype == jnp.float32 and count == scored.sum()
    np.testing.assert_allclose(nll, -(_np_token_logprobs(logits, ids) * scored).sum(), rtol=1e-5)

    # Changing anything the mask does not score (prompt/padding targets, the logits that
    # predict them, and token 0) leaves the loss unchanged.
    rng = np.random.default_rng(1)
    unscored_target = ~scored
    ids2 = np.where(unscored_target, rng.integers(0, V, size=ids.shape), ids).astype(np.int32)
    unused_logit = np.zeros((B, T), bool)
    unused_logit[:, :-1] = unscored_target[:, 1:]
    unused_logit[:, -1] = True
    logits2 = np.where(unused_logit[..., None], rng.normal(size=logits.shape) * 5, logits)
    nll2, count2 = sft_loss(logits2.astype(np.float32), ids2, mask)
    np.testing.assert_allclose(nll2, nll, rtol=1e-6)
    assert count2 == count


def test_sft_loss_half_batches_add_up_to_full_batch():
    logits, ids, mask = _batch()
    full = sft_loss(logits, ids, mask)
    a = sft_loss(logits[:2], ids[:2], mask[:2])
    b = sft_loss(logits[2:], ids[2:], mask[2:])
    np.testing.assert_allclose(a[0] + b[0], full[0], rtol=1e-6)
    assert a[1] + b[1] == full[1]

    # The same reduction inside a pmap step over two devices.
    shard = lambda x: x.reshape(2, B // 2, *x.shape[1:])
    step = jax.pmap(lambda *x: jax.lax.psum(sft_loss(*x), "d"), axis_name="d",
                    devices=jax.devices()[:2])
    nll, count = step(shard(logits), shard(ids), shard(mask))
    np.testing.assert_allclose(nll[0], full[0], rtol=1e-6)
    assert count[0] == full[1]


def test_sft_loss_matches_torch_cross_entropy():
    logits, ids, mask = _batch()
    nll, count = sft_loss(logits, ids, mask)
    sel = torch.from_numpy(mask[:, 1:])  # targets 1..T-1; token 0 is never a target
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:, :-1])[sel],
                                             torch.from_numpy(ids[:, 1:]).long()[sel])
    np.testing.assert_allclose(nll / count, want.item(), rtol=1e-5)


def test_split_chosen_rejected_and_chosen_nll():
    logits, ids, mask = _batch()
    chosen, rejected = split_chosen_rejected(jnp.arange(2 * 3 * 5).reshape(6, 5))
    rows = np.arange(30).reshape(6, 5)  # each pair's chosen row, then its rejected row
    np.testing.assert_array_equal(chosen, rows[0::2])
    np.testing.assert_array_equal(rejected, rows[1::2])
    with pytest.raises(ValueError):
        split_chosen_rejected(jnp.zeros((3, 2)))

    got = chosen_nll(token_logprobs(logits, ids), scored_mask(mask))
    want = sft_loss(*(split_chosen_rejected(jnp.asarray(x))[0] for x in (logits, ids, mask)))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert got[1] == want[1]


def test_scored_token_index_lists_each_rows_scored_tokens_first():
    mask = np.array([[1, 0, 1, 1, 0],     # position 0 has no logit before it: never scored
                     [0, 0, 0, 0, 1],
                     [0, 0, 0, 0, 0]], bool)
    index, valid = scored_token_index(mask, 3)
    np.testing.assert_array_equal(np.where(valid, index, -1), [[2, 3, -1], [4, -1, -1],
                                                               [-1, -1, -1]])
    assert (np.asarray(index) >= 1).all()  # padding entries still point at a real logit


def test_dpo_loss_jit():
    pc, pr, rc, rr = _logps()
    step = jax.jit(lambda *x: dpo_loss(*x, beta=BETA, loss_type="robust", label_smoothing=0.1))
    np.testing.assert_allclose(step(pc, pr, rc, rr)[0],
                               dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="robust",
                                        label_smoothing=0.1)[0], rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="kto"), "sigmoid, robust, hinge, ipo"),
    (dict(label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(label_smoothing=-0.1), r"\[0, 0.5\)"),
    (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(loss_type="hinge", label_smoothing=0.1), "applies only"),
    (dict(loss_type="ipo", label_smoothing=0.1), "applies only"),
    (dict(label_smoothing=0.1), "TRL's sigmoid takes no label_smoothing; use loss_type=cdpo"),
    (dict(beta=0.0), "beta"),
])
def test_bad_dpo_options_raise_user_error(kwargs, match):
    x = jnp.zeros(2)
    kwargs = {"beta": BETA, **kwargs}
    with pytest.raises(UserError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


# ---- ORPO and SimPO against TRL 1.16's own functions -------------------------------------------

def _trl_self(**attributes):
    """What TRL's `odds_ratio_loss` and `cpo_loss` read of their trainer: settings, a device."""
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), **attributes)


def _pair_batch():
    """Logits `[2B, T, V]`, ids and loss masks of B = 4 pairs, chosen rows first. Rows 0 and 5
    have their completion tokens made likely, so some length-averaged log-probs fall above
    -log 2 and some below: both branches of ORPO's `log1mexp`."""
    logits, ids, mask = (np.concatenate(halves) for halves in zip(_batch(0), _batch(1)))
    scored = scored_mask(mask)
    for row, boost in ((0, 12.0), (5, 4.0)):
        for t in np.flatnonzero(scored[row]):
            logits[row, t - 1, ids[row, t]] += boost
    return logits, ids, mask


def _trl_scores(logits, ids, mask):
    """TRL's view of a `[2B, T, V]` pair batch: torch logits that take gradients, the
    length-averaged log-probs `(chosen [B], rejected [B])` of `get_batch_logps(
    average_log_prob=True)` on labels that are the completion tokens (-100 elsewhere), and the
    chosen completions' token-mean cross-entropy as CPOTrainer's `cross_entropy_loss` takes it
    (ORPOTrainer's counts the prompt tokens too: a delta README "jaxsftdpo vs TRL" names)."""
    logits = torch.tensor(logits, requires_grad=True)
    labels = torch.from_numpy(np.where(mask, ids, -100)).long()
    averaged = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    half = len(ids) // 2
    nll_loss = torch.nn.functional.cross_entropy(logits[:half, :-1].reshape(-1, V),
                                                 labels[:half, 1:].reshape(-1))
    return logits, averaged[:half], averaged[half:], nll_loss


def _objective(kind, settings, logits, ids, mask):
    """`(loss, metrics)` of the train step's objective `kind` (`steps.OBJECTIVES`) on a
    `[2B, T, V]` pair batch that is the whole global batch, chosen rows first as TRL lays it
    out; the step's own layout (each pair's chosen row, then its rejected row) is made here."""
    half = len(ids) // 2
    logits, ids, mask = (jnp.stack([x[:half], x[half:]], 1).reshape(x.shape)
                         for x in (logits, ids, mask))
    logps, valid = token_logprobs(logits, ids), scored_mask(mask)
    scores = steps.PairScores(logps, valid, split_chosen_rejected(sequence_sums(logps, valid)),
                              jnp.zeros(valid.shape))
    chosen, rejected = split_chosen_rejected(valid)
    norm = {"pairs": jnp.float32(len(ids) // 2), "chosen_tokens": chosen.sum(dtype=jnp.float32),
            "rejected_tokens": rejected.sum(dtype=jnp.float32)}
    return steps.OBJECTIVES[kind](scores, norm, None, settings=settings)


def _trl_reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """The metrics ORPOTrainer and CPOTrainer both log, as they compute them."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}


def _assert_matches_trl(kind, settings, trl_loss, trl_logits, want_metrics, logits, ids, mask):
    """Our objective's loss, its gradient in the logits and its metrics equal TRL's."""
    trl_loss.backward()
    loss, metrics = _objective(kind, settings, logits, ids, mask)
    grads = jax.grad(lambda x: _objective(kind, settings, x, ids, mask)[0])(logits)
    np.testing.assert_allclose(loss, trl_loss.item(), rtol=1e-5)
    assert np.abs(trl_logits.grad.numpy()).max() > 1e-3
    np.testing.assert_allclose(grads, trl_logits.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert set(metrics) == set(want_metrics)
    for name, want in want_metrics.items():
        np.testing.assert_allclose(metrics[name], float(want), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_gradients_and_metrics_are_trls(beta):
    """ORPO = the chosen completions' NLL + TRL's `odds_ratio_loss` term (`-mean(beta *
    log_sigmoid(log_odds))`), from the logits on; metrics under TRL's names and values."""
    logits, ids, mask = _pair_batch()
    trl_logits, lc, lr, trl_nll = _trl_scores(logits, ids, mask)
    both = torch.cat([lc, lr]).detach()
    assert (both > -math.log(2)).any() and (both < -math.log(2)).any()  # both log1mexp branches
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = (
        ORPOTrainer.odds_ratio_loss(_trl_self(beta=beta), lc, lr))
    want = {**_trl_reward_metrics(chosen_rewards, rejected_rewards, lc, lr),
            "nll_loss": trl_nll, "log_odds_ratio": log_odds_ratio,
            "log_odds_chosen": log_odds_chosen}
    assert 0 < want["rewards/accuracies"] < 1
    _assert_matches_trl("orpo", steps.ORPOSettings(beta=beta), trl_nll - losses.mean(),
                        trl_logits, want, logits, ids, mask)


@pytest.mark.parametrize("beta,gamma,label_smoothing", [
    (2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (1.0, 0.0, 0.0), (2.0, 0.5, 0.2)])
def test_simpo_loss_gradients_and_metrics_are_trls(beta, gamma, label_smoothing):
    """SimPO is TRL's `CPOTrainer.cpo_loss` with `loss_type="simpo"` (AlphaPO's alpha 0, no
    `cpo_alpha` NLL term), `simpo_gamma` = gamma, from the logits on."""
    logits, ids, mask = _pair_batch()
    trl_logits, lc, lr, _ = _trl_scores(logits, ids, mask)
    trainer = _trl_self(beta=beta, loss_type="simpo", simpo_gamma=gamma,
                        label_smoothing=label_smoothing, alpha=0.0)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, lc, lr)
    settings = steps.SimPOSettings(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    _assert_matches_trl("simpo", settings, losses.mean(), trl_logits,
                        _trl_reward_metrics(chosen_rewards, rejected_rewards, lc, lr),
                        logits, ids, mask)


def test_simpo_gamma_is_the_margin_in_reward_units():
    """A reward margin `beta * (lc - lr)` of exactly gamma costs log 2; TRL's `gamma / beta` is
    the same margin in log-prob units."""
    chosen, rejected = jnp.array([-1.0, -0.3]), jnp.array([-1.25, -0.55])
    loss, pairs, metrics = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    np.testing.assert_allclose(loss / pairs, math.log(2), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"] / pairs, 0.5, rtol=1e-6)


def test_orpo_metrics_carry_no_gradient():
    chosen, rejected = jnp.array([-0.2, -1.5]), jnp.array([-0.9, -0.4])
    g = jax.grad(lambda x: sum(odds_ratio_loss(x, rejected, beta=0.1)[2].values()))(chosen)
    assert not np.any(g)


@pytest.mark.parametrize("loss,kwargs,match", [
    (odds_ratio_loss, dict(beta=0.0), r"orpo.beta .* must be > 0, got 0.0"),
    (odds_ratio_loss, dict(beta=-0.1), r"orpo.beta .* must be > 0, got -0.1"),
    (simpo_loss, dict(beta=0.0, gamma=0.5), r"simpo.beta must be > 0, got 0.0"),
    (simpo_loss, dict(beta=2.0, gamma=-0.5), r"simpo.gamma .* must be >= 0, got -0.5"),
    (simpo_loss, dict(beta=2.0, gamma=0.5, label_smoothing=0.5), r"\[0, 0.5\)"),
])
def test_bad_orpo_and_simpo_options_raise_user_error(loss, kwargs, match):
    x = jnp.full(2, -1.0)
    with pytest.raises(UserError, match=match):
        loss(x, x, **kwargs)


# ---- the DPO step's metrics on a tiny GPT-2 -------------------------------------------------

def _tiny_dpo_setup(accum=2, rows=4, length=12, vocab=61):
    from jaxsftdpo import lora
    from jaxsftdpo.models import gpt2
    model = gpt2.build(gpt2.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=16,
                                       n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    graphdef, trainable, frozen = lora.split_trainable(model, "fft")
    rng = np.random.default_rng(3)
    batch = {}
    for name in ("chosen", "rejected"):
        ids = rng.integers(0, vocab, (accum, rows, length), dtype=np.int32)
        lengths = rng.integers(5, length + 1, (accum, rows))
        prompt = rng.integers(1, 4, (accum, rows))
        pos = np.arange(length)
        attention = pos < lengths[..., None]
        batch.update({f"{name}_input_ids": ids, f"{name}_attention_mask": attention,
                      f"{name}_loss_mask": attention & (pos >= prompt[..., None])})
    return model, graphdef, trainable, frozen, batch


def _direct_scores(model, batch, name):
    """Per row, from the model's full `[rows, T, V]` logits in numpy: the summed completion
    log-prob, the completion-token count, and the sum over completion tokens of the vocabulary
    mean of the logit that predicts each one."""
    ids = batch[f"{name}_input_ids"].reshape(-1, batch[f"{name}_input_ids"].shape[-1])
    attention = batch[f"{name}_attention_mask"].reshape(ids.shape)
    scored = batch[f"{name}_loss_mask"].reshape(ids.shape).copy()
    scored[:, 0] = False
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(attention)), np.float64)
    logps = _np_token_logprobs(logits, ids)
    predicting = np.zeros_like(scored)  # the logit at t - 1 predicts token t
    predicting[:, :-1] = scored[:, 1:]
    return ((logps * scored).sum(-1), scored.sum(-1),
            (logits.mean(-1) * predicting).sum(-1))


@pytest.mark.parametrize("scored_only", [False, True])
def test_dpo_step_logs_trls_logit_means_and_length_normalised_ipo(scored_only):
    """Through the train step (two micro-batches, the LM head on every position or only where
    tokens are scored): `logits/chosen`, `logits/rejected` are TRL's mean over completion
    tokens of the vocabulary-mean logit; `tokens` counts every non-padding token of chosen and
    rejected rows (TRL's per-step `num_tokens` increment); ipo gets each row's own completion
    length."""
    from jaxsftdpo.config import stage
    model, graphdef, trainable, frozen, batch = _tiny_dpo_setup()
    most = max(int(batch[f"{n}_loss_mask"][..., 1:].sum(-1).max()) for n in ("chosen", "rejected"))
    assert most < batch["chosen_input_ids"].shape[-1] - 1
    scored_tokens = most if scored_only else None
    beta = 0.2
    dpo = steps.DPOSettings(beta=beta, loss_type="ipo", label_smoothing=0.0, sft_weight=0.0,
                            reference="none")
    tx, _ = steps.make_optimizer(stage("dpo", steps=1, learning_rate=0.0), 1)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; `model` keeps its own
    state = steps.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
    step = steps.make_train_step("dpo", graphdef, tx, dpo, scored_tokens=scored_tokens)
    _, metrics = step(state, frozen, None, jax.tree.map(jnp.asarray, batch), None)

    chosen, n_chosen, chosen_logits = _direct_scores(model, batch, "chosen")
    rejected, n_rejected, rejected_logits = _direct_scores(model, batch, "rejected")
    np.testing.assert_allclose(metrics["logits/chosen"], chosen_logits.sum() / n_chosen.sum(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["logits/rejected"],
                               rejected_logits.sum() / n_rejected.sum(), rtol=1e-5, atol=1e-7)
    assert metrics["logits/chosen"] != metrics["logits/rejected"]
    assert metrics["tokens"] == (batch["chosen_attention_mask"].sum()
                                 + batch["rejected_attention_mask"].sum())
    zero = np.zeros_like(chosen)  # reference "none": log-probs 0
    np.testing.assert_allclose(metrics["loss"], _trl_ipo(chosen, rejected, zero, zero,
                                                         n_chosen, n_rejected, beta), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/chosen"], chosen.mean(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_step_is_trls_loss_over_the_global_batch(kind):
    """Through the train step (two micro-batches, no reference): the loss and metrics are
    TRL's, computed on the model's own logits with TRL's functions over the whole global batch
    (the NLL a token mean over all its chosen completions, the rest means over its pairs);
    `logits/*` the completion-token means, as for DPO."""
    from jaxsftdpo.config import stage
    model, graphdef, trainable, frozen, batch = _tiny_dpo_setup()
    settings = (steps.ORPOSettings(beta=0.2) if kind == "orpo"
                else steps.SimPOSettings(beta=2.0, gamma=0.5, label_smoothing=0.1))
    tx, _ = steps.make_optimizer(stage(kind, steps=1, learning_rate=0.0), 1)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; `model` keeps its own
    state = steps.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
    step = steps.make_train_step(kind, graphdef, tx, settings)
    _, metrics = step(state, frozen, None, jax.tree.map(jnp.asarray, batch), None)

    rows = lambda name, key: batch[f"{name}_{key}"].reshape(-1, batch[f"{name}_{key}"].shape[-1])
    logits = np.concatenate([np.asarray(model(jnp.asarray(rows(n, "input_ids")),
                                              jnp.asarray(rows(n, "attention_mask"))))
                             for n in ("chosen", "rejected")])
    ids, mask = (np.concatenate([rows(n, key) for n in ("chosen", "rejected")])
                 for key in ("input_ids", "loss_mask"))
    labels = torch.from_numpy(np.where(mask, ids, -100)).long()
    with torch.no_grad():
        logits_t = torch.from_numpy(logits)
        averaged = ORPOTrainer.get_batch_logps(logits_t, labels, average_log_prob=True)
        lc, lr = averaged.chunk(2)
        half = len(ids) // 2
        trl_nll = torch.nn.functional.cross_entropy(
            logits_t[:half, :-1].reshape(-1, logits.shape[-1]), labels[:half, 1:].reshape(-1))
        if kind == "orpo":
            losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = (
                ORPOTrainer.odds_ratio_loss(_trl_self(beta=settings.beta), lc, lr))
            trl_loss = trl_nll - losses.mean()
            extra = {"nll_loss": trl_nll, "log_odds_ratio": log_odds_ratio,
                     "log_odds_chosen": log_odds_chosen}
        else:
            losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(_trl_self(
                beta=settings.beta, loss_type="simpo", simpo_gamma=settings.gamma,
                label_smoothing=settings.label_smoothing, alpha=0.0), lc, lr)
            trl_loss, extra = losses.mean(), {}
    want = {"loss": trl_loss, **extra,
            **_trl_reward_metrics(chosen_rewards, rejected_rewards, lc, lr)}
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], float(value), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    _, n_chosen, chosen_logits = _direct_scores(model, batch, "chosen")
    np.testing.assert_allclose(metrics["logits/chosen"], chosen_logits.sum() / n_chosen.sum(),
                               rtol=1e-5, atol=1e-7)
    assert set(metrics) == {*want, "logits/chosen", "logits/rejected", "tokens", "grad_norm"}
