"""Generation: greedy parity with transformers, eos padding, seeded sampling, top-k/top-p sets,
the checked bfloat16 head and the bfloat16 decoding copy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

from jaxsftdpo import generate as gen
from jaxsftdpo.errors import UserError
from jaxsftdpo.lora import apply_lora, linear_modules
from jaxsftdpo.models import from_pretrained

VOCAB = 97


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = HFConfig(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                      initializer_range=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    reference = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("gpt2")
    reference.save_pretrained(path)
    return reference, from_pretrained(str(path))


def left_padded_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(1, VOCAB, n)
        mask[row, width - n:] = 1
    return ids, mask


def test_greedy_matches_transformers_token_for_token(models):
    reference, model = models
    ids, mask = left_padded_prompts([5, 9, 3, 12])
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                      do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                      pad_token_id=0).numpy()[:, ids.shape[1]:]
    tokens = gen.generate(model, ids, mask, max_new_tokens=32)
    assert tokens.shape == (4, 32)
    np.testing.assert_array_equal(tokens, expected)
    assert len(np.unique(tokens)) >= 4  # not one token repeated everywhere


def test_right_padded_prompts_give_the_same_tokens(models):
    _, model = models
    ids, mask = left_padded_prompts([4, 7])
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for row in range(len(ids)):
        n = mask[row].sum()
        right_ids[row, :n], right_mask[row, :n] = ids[row][mask[row] == 1], 1
    np.testing.assert_array_equal(gen.generate(model, ids, mask, max_new_tokens=8),
                                  gen.generate(model, right_ids, right_mask, max_new_tokens=8))


def test_finished_sequences_are_padded_with_eos(models):
    reference, model = models
    ids, mask = left_padded_prompts([5, 9, 3, 12])
    free = gen.generate(model, ids, mask, max_new_tokens=16)
    eos = int(free[0, 3])  # a token that row 0 emits, so at least one row stops early
    tokens = gen.generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos)
    for row in tokens:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            assert (row[hits[0]:] == eos).all()
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                      do_sample=False, max_new_tokens=16, eos_token_id=eos,
                                      pad_token_id=eos).numpy()[:, ids.shape[1]:]
    np.testing.assert_array_equal(tokens[:, :expected.shape[1]], expected)


def test_sampling_is_reproducible_for_a_seed(models):
    _, model = models
    ids, mask = left_padded_prompts([6, 6, 2])
    kwargs = dict(max_new_tokens=24, temperature=1.3, top_p=0.95)
    first = gen.generate(model, ids, mask, seed=7, **kwargs)
    np.testing.assert_array_equal(first, gen.generate(model, ids, mask, seed=7, **kwargs))
    assert (first != gen.generate(model, ids, mask, seed=8, **kwargs)).any()


def test_filter_logits_keeps_exactly_top_k_and_the_nucleus():
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]], np.float32))
    neg = np.finfo(np.float32).min
    kept_k = np.asarray(gen.filter_logits(logits, top_k=2, top_p=None)) > neg
    np.testing.assert_array_equal(kept_k, [[False, True, False, True, False]])
    # 0.4 + 0.3 = 0.7 < 0.75, so the nucleus also needs 0.15.
    kept_p = np.asarray(gen.filter_logits(logits, top_k=None, top_p=0.75)) > neg
    np.testing.assert_array_equal(kept_p, [[False, True, False, True, True]])
    kept_p = np.asarray(gen.filter_logits(logits, top_k=None, top_p=0.7)) > neg
    np.testing.assert_array_equal(kept_p, [[False, True, False, True, False]])


def sorted_nucleus_threshold(logits, top_p):
    """The nucleus's least logit by the definition: sort, keep while the mass before < top_p."""
    ranked = np.sort(logits, -1)[:, ::-1].astype(np.float64)
    probs = np.exp(ranked - ranked[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    kept = np.cumsum(probs, -1) - probs < top_p
    return np.where(kept, ranked, np.inf).min(-1)


@pytest.mark.parametrize("top_p", [1e-4, 0.3, 0.9, 0.999, 1.0])
def test_nucleus_threshold_is_the_sorted_definitions(top_p):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 3000)) * [[0.1], [1], [3], [10], [5], [1]]).astype(np.float32)
    logits[5] = np.round(logits[5] * 4) / 4                       # many ties
    logits[1, :1500] = np.finfo(np.float32).min                  # already filtered out
    got = np.asarray(gen.nucleus_threshold(jnp.asarray(logits), top_p))[:, 0]
    if top_p == 1.0:                                             # every token left is kept
        np.testing.assert_array_equal(got, np.where(logits > -1e30, logits, np.inf).min(-1))
    else:
        np.testing.assert_array_equal(got, sorted_nucleus_threshold(logits, top_p))


def test_samples_follow_the_probabilities():
    vocab, draws = 150, 40_000                  # 150: the last 64-token block partly padding
    rng = np.random.default_rng(0)
    logits = rng.normal(size=vocab).astype(np.float32) * 2
    logits[[0, 63, 64, 149]] = np.finfo(np.float32).min          # filtered: never drawn
    tokens = np.asarray(gen.sample_categorical(jax.random.key(0),
                                               jnp.broadcast_to(logits, (draws, vocab))))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[[0, 63, 64, 149]].sum() == 0
    spread = np.sqrt(draws * probs * (1 - probs))
    assert (np.abs(counts - draws * probs) <= 5 * spread + 1).all()


def test_samples_are_where_the_uniform_falls_in_the_running_sum():
    """The token is the inverse CDF of one uniform number per row, in vocabulary order."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 1000)).astype(np.float32)
    key = jax.random.key(3)
    tokens = np.asarray(gen.sample_categorical(key, jnp.asarray(logits)))
    uniform = np.asarray(jax.random.uniform(key, (500, 1)), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float64)
    running = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    expected = (running <= uniform).sum(-1)
    assert (tokens == expected).mean() > 0.99          # rounding may move a rare boundary draw
    assert (np.abs(tokens - expected) <= 1).all()


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.5), (5, 0.8)])
def test_samples_never_leave_the_allowed_set(models, top_k, top_p):
    _, model = models
    ids, mask = left_padded_prompts([6, 3, 8, 5])
    tokens = gen.generate(model, ids, mask, max_new_tokens=20, temperature=2.0, top_k=top_k,
                          top_p=top_p, seed=3)
    # Teacher-force the sampled continuation and check each token against the filter applied
    # to the logits that chose it.
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    logits = np.asarray(model(full_ids, full_mask))[:, ids.shape[1] - 1:-1] / 2.0
    allowed = np.asarray(gen.filter_logits(logits, top_k=top_k, top_p=top_p))
    chosen = np.take_along_axis(allowed, tokens[..., None], axis=-1)[..., 0]
    assert (chosen > np.finfo(np.float32).min).all()


def test_compiles_once_per_prompt_bucket(models):
    _, model = models
    gen._generate_jit.clear_cache()
    for lengths in ([5, 9], [3, 12], [7, 7]):  # all in the 64-token bucket
        gen.generate(model, *left_padded_prompts(lengths), max_new_tokens=4)
    assert gen._generate_jit._cache_size() == 1
    gen.generate(model, *left_padded_prompts([70, 2]), max_new_tokens=4)
    assert gen._generate_jit._cache_size() == 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=124), "exceeds the model's 128 positions"),
    (dict(max_new_tokens=4, top_k=0), "top_k"),
    (dict(max_new_tokens=4, top_p=1.5), "top_p"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
])
def test_bad_requests_raise_one_line_errors(models, kwargs, message):
    _, model = models
    with pytest.raises(UserError, match=message):
        gen.generate(model, *left_padded_prompts([5]), **kwargs)


def test_first_argmax_is_argmax_with_ties_to_the_first():
    logits = np.random.default_rng(0).normal(size=(16, 50)).astype(np.float32)
    logits[3, [7, 20]] = 10.0          # a tie: the first index wins, as in jnp.argmax
    np.testing.assert_array_equal(gen.first_argmax(logits), np.argmax(logits, -1))


def greedy_cases(seed=0, rows=64, vocab=500, width=48):
    """Hidden states and a float32 head whose best logits the bfloat16 copy cannot tell apart:
    some rows equal in bfloat16 but not in float32, some exactly equal (ties)."""
    rng = np.random.default_rng(seed)
    head = rng.normal(0, 0.3, (vocab, width)).astype(np.float32)
    hidden = rng.normal(0, 1, (rows, width)).astype(np.float32)
    winners = np.argmax(hidden @ head.T, -1)
    for row, winner in enumerate(winners[:8]):
        twin = (winner + 1 + row) % vocab
        head[twin] = head[winner] * (1 + 2.0 ** -12)      # the same in bfloat16, larger in fp32
        if row % 2:
            head[twin] = head[winner]                      # an exact tie: the lower id wins
    return hidden, head


@pytest.mark.parametrize("case", ["spread", "one_chunk", "negative"])
def test_best_candidates_are_top_k_and_bound_every_column_left_out(case):
    vocab, chunk, k = 5000, 64, 16                   # 79 chunks, the last one partly padding
    rng = np.random.default_rng(0)
    approx = rng.normal(size=(4, vocab)).astype(np.float32)
    if case == "one_chunk":                          # the 16 best all in chunk 7
        approx[:, 7 * chunk:7 * chunk + 20] += 10.0
    if case == "negative":                           # the zero padding outranks every logit
        approx = -np.abs(approx) - 1.0
    padded = np.pad(approx, ((0, 0), (0, -vocab % chunk)))
    ids, left_out = gen.best_candidates(jnp.asarray(padded), vocab, k, chunk)
    ranked = np.sort(approx, -1)[:, ::-1]
    np.testing.assert_array_equal(np.sort(np.asarray(ids), -1),
                                  np.sort(np.argsort(-approx, -1)[:, :k], -1))
    np.testing.assert_array_equal(left_out, ranked[:, k])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checked_bfloat16_head_gives_float32_greedy_tokens(seed):
    hidden, head = greedy_cases(seed)
    logits = lambda h: h @ jnp.asarray(head).T
    tokens = gen.greedy_token(jnp.asarray(hidden), gen.CheckedHead.of(jnp.asarray(head)), logits)
    # The reference in float64, where the exact ties stay ties: a float32 BLAS matmul can round
    # two equal columns differently (it did on an AMD EPYC), which is not what ties test.
    exact = hidden.astype(np.float64) @ head.T.astype(np.float64)
    np.testing.assert_array_equal(tokens, gen.first_argmax(exact))


def test_checked_head_finds_a_winner_the_bfloat16_ranking_leaves_out():
    # Rows 0-19 and the winner, row 20, are one row in bfloat16, so the copy's 16 candidates
    # can all be copies, whose float32 logits beat every approximate one; only the error bound
    # tells that a token left out may still be better.
    rng = np.random.default_rng(0)
    base = np.asarray(jnp.asarray(rng.normal(size=32), jnp.bfloat16), np.float32)
    head = rng.normal(0, 0.01, (100, 32)).astype(np.float32)
    head[:20] = base
    head[20] = base * (1 + 2.0 ** -11)
    hidden = base[None] * (1 + 2.0 ** -12)    # rounds to `base` in bfloat16 too
    tokens = gen.greedy_token(jnp.asarray(hidden), gen.CheckedHead.of(jnp.asarray(head)),
                              lambda h: h @ jnp.asarray(head).T)
    np.testing.assert_array_equal(tokens, [20])


def test_checked_head_falls_back_when_the_bound_cannot_decide():
    # Every row of the head the same: every logit ties, no candidate set is provably complete.
    head = np.tile(np.random.default_rng(0).normal(size=(1, 16)), (40, 1)).astype(np.float32)
    hidden = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    tokens = gen.greedy_token(jnp.asarray(hidden), gen.CheckedHead.of(jnp.asarray(head)),
                              lambda h: h @ jnp.asarray(head).T)
    np.testing.assert_array_equal(tokens, [0, 0, 0])


def test_checked_head_and_float32_head_generate_the_same_tokens(models):
    _, model = models
    ids, mask = left_padded_prompts([5, 9, 3, 12])
    np.testing.assert_array_equal(
        gen.generate(model, ids, mask, max_new_tokens=24),
        gen.generate(model, ids, mask, max_new_tokens=24, checked_head=False))


def test_bfloat16_decoding_copy_folds_adapters_and_leaves_the_model_alone(models):
    _, model = models
    adapted = nnx.clone(model)
    apply_lora(adapted, r=4, alpha=8)
    for i, linear in enumerate(linear_modules(adapted).values()):
        linear.lora.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i),
                                                           linear.lora.lora_b.shape)
    ids, mask = left_padded_prompts([5, 9])
    want = np.asarray(adapted(ids, mask))
    copy = gen.decoding_copy(adapted, jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(copy))} == {jnp.dtype(jnp.bfloat16)}
    assert not any(linear.lora is None for linear in linear_modules(adapted).values())
    np.testing.assert_allclose(copy(ids, mask), want, atol=0.05 * np.abs(want).max())
    np.testing.assert_array_equal(
        gen.generate(adapted, ids, mask, max_new_tokens=8, decode_dtype=jnp.bfloat16),
        gen.generate(copy, ids, mask, max_new_tokens=8))
