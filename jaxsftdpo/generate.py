"""Batched sampling with a KV cache: greedy, temperature, top-k and top-p, one compile per shape.

The prompt is prefilled in one call, then the whole decode loop runs inside one `jax.jit` as a
`lax.while_loop` that stops when every sequence has emitted `eos_token_id`. Prompts are re-padded
on the left to a multiple of `prompt_bucket`, so prompts of nearby lengths share a compile.

A float32 model's greedy decoding reads the LM head, most of a small model's bytes, in bfloat16
and checks the winner in float32 (`CheckedHead`): the tokens are float32 greedy's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsftdpo.errors import UserError
from jaxsftdpo.lora import merge_lora
from jaxsftdpo.models import family_for
from jaxsftdpo.models.layers import default_position_ids


def generate(model: nnx.Module, input_ids, attention_mask=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, seed: int = 0, prompt_bucket: int = 64,
             checked_head: bool = True, decode_dtype=None):
    """New tokens `[batch, max_new_tokens]` (int32 numpy) continuing each prompt.

    Prompts may be padded on either side (`attention_mask` marks real tokens). Greedy when
    `temperature` is 0. After a sequence emits `eos_token_id` the rest of its row is
    `eos_token_id`. The same `seed` gives the same samples. `checked_head=False` makes a
    float32 model's greedy decoding compute every logit in float32 (`CheckedHead` explains the
    default; the tokens are the same). `decode_dtype` (e.g. `jnp.bfloat16`) decodes with a
    copy of the model in that dtype (`decoding_copy`): half the bytes to read per token, and
    tokens that may differ from the model's own where its logits are close.
    """
    ids, mask = _left_pad(np.asarray(input_ids), attention_mask, prompt_bucket,
                          pad_id=0 if eos_token_id is None else eos_token_id)
    _check_request(model, int(mask.sum(-1).max()), max_new_tokens, temperature, top_k, top_p)
    if decode_dtype is not None and jnp.dtype(decode_dtype) != jnp.dtype(model.config.dtype):
        model = decoding_copy(model, decode_dtype)
    graphdef, state = nnx.split(model)
    greedy = temperature == 0.0
    tokens = _generate_jit(
        graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
        jnp.float32(temperature if not greedy else 1.0),
        jnp.float32(1.0 if top_p is None else top_p), jax.random.key(seed),
        max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, use_top_p=top_p is not None,
        eos_token_id=eos_token_id,
        checked=checked_head and greedy and jnp.dtype(model.config.dtype) == jnp.float32)
    return np.asarray(tokens)


def decoding_copy(model: nnx.Module, dtype) -> nnx.Module:
    """A copy of `model` (LoRA adapters folded in) that stores its floating-point weights in
    `dtype` and computes in it; `model` is left as it is. Matrix products still sum in float32
    (`layers.project`), so bfloat16 costs the weights' rounding, not the sums'."""
    family = family_for(model)
    merged = merge_lora(nnx.clone(model))
    config = dataclasses.replace(model.config, dtype=jnp.dtype(dtype),
                                 param_dtype=jnp.dtype(dtype))
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: family.build(config)))
    state = jax.tree.map(lambda shape, x: jnp.asarray(x, shape.dtype), shapes, nnx.state(merged))
    return nnx.merge(graphdef, state)


def _left_pad(ids: np.ndarray, attention_mask, bucket: int, pad_id: int):
    """Move every prompt to the right edge of a `[B, ceil(P / bucket) * bucket]` array."""
    if ids.ndim != 2:
        raise UserError(f"input_ids must be [batch, length]; got shape {ids.shape}")
    mask = (np.ones(ids.shape, bool) if attention_mask is None
            else np.asarray(attention_mask).astype(bool))
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise UserError("a prompt in the batch has no tokens; give every row at least one token")
    width = -(-int(lengths.max()) // bucket) * bucket
    out_ids = np.full((ids.shape[0], width), pad_id, np.int32)
    out_mask = np.zeros((ids.shape[0], width), bool)
    for row, (row_ids, row_mask, n) in enumerate(zip(ids, mask, lengths)):
        out_ids[row, width - n:] = row_ids[row_mask]
        out_mask[row, width - n:] = True
    return out_ids, out_mask


def _check_request(model, longest_prompt, max_new_tokens, temperature, top_k, top_p):
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0; got {temperature}")
    if top_k is not None and not 0 < top_k <= model.config.vocab_size:
        raise UserError(f"top_k must be in [1, vocab_size={model.config.vocab_size}]; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1]; got {top_p}")
    limit = model.config.max_length
    if longest_prompt + max_new_tokens > limit:
        raise UserError(f"the longest prompt ({longest_prompt} tokens) + max_new_tokens "
                        f"({max_new_tokens}) exceeds the model's {limit} positions; shorten the "
                        f"prompt or ask for fewer new tokens")


def filter_logits(logits, *, top_k: int | None, top_p):
    """Set to the lowest float every logit outside the top-k set and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`
    (ties with its least likely token kept too). Neither is found by sorting the vocabulary:
    XLA's sort on CPU took 80 ms per step for 8 rows of 50k logits, 20x a decoding step.
    """
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k is not None:
        # min, not [..., -1]: XLA runs a sort as its fast TopK only when nothing else slices
        # its output (68 ms vs 0.9 ms per step for 8 rows of 50k logits).
        kth = jax.lax.top_k(logits, top_k)[0].min(-1, keepdims=True)
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        logits = jnp.where(logits < nucleus_threshold(logits, top_p), neg_inf, logits)
    return logits


def nucleus_threshold(logits, top_p):
    """The top-p nucleus's least logit `[..., 1]` of `logits` `[..., vocab]`: the least logit
    v whose more likely tokens (logits > v) hold less than `top_p` of the probability, i.e.
    whose own and less likely tokens hold more than `1 - top_p` (summed from the tail, as
    transformers' top-p does, so `top_p=1` keeps every token of nonzero probability).

    That mass rises with v, so v is found by bisection over the 2^32 float32 values, in 32
    passes over the logits instead of a sort.
    """
    logits32 = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits32, axis=-1)
    keys = _ordered_int32(logits32)

    def halve(_, bounds):                   # the answer stays in [low, high]
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + (low & high & 1)   # floor((low + high) / 2)
        below = jnp.sum(jnp.where(keys <= middle[..., None], probs, 0.0), axis=-1)
        inside = below > 1.0 - top_p
        return jnp.where(inside, low, middle + 1), jnp.where(inside, middle, high)

    _, high = jax.lax.fori_loop(0, 32, halve, (keys.min(-1), keys.max(-1)))
    return jnp.min(jnp.where(keys >= high[..., None], logits, jnp.inf), axis=-1, keepdims=True)


def _ordered_int32(x: jax.Array) -> jax.Array:
    """float32 -> int32 preserving order (negative floats' magnitude bits reversed)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def sample_categorical(key, logits, chunk: int = 64) -> jax.Array:
    """A token per row `[B]` (int32) drawn with probability `softmax(logits)`.

    One uniform number per row is located in the running sum of the probabilities: first among
    the sums of `chunk`-token blocks, then inside the block it falls in. `jax.random.categorical`
    draws Gumbel noise for every logit instead, 5.6 ms of an 8-row step over 50k logits on CPU.
    """
    batch, vocab = logits.shape
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    blocks = jnp.pad(weights, ((0, 0), (0, -vocab % chunk))).reshape(batch, -1, chunk)
    block_mass = blocks.sum(-1)
    block_ends = jnp.cumsum(block_mass, axis=-1)
    point = jax.random.uniform(key, (batch, 1)) * block_ends[:, -1:]
    block = _first_passing(block_ends, point, block_mass > 0)
    block_start = jnp.where(block > 0, jnp.take_along_axis(
        block_ends, jnp.maximum(block - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    offset = _first_passing(jnp.cumsum(inside, axis=-1), point - block_start[:, None],
                            inside > 0)
    return (block * chunk + offset).astype(jnp.int32)


def _first_passing(running_sum, point, positive):
    """Per row, the first index of positive weight whose running sum exceeds `point`, or,
    where rounding put `point` at or past the total, the last index of positive weight (so a
    token of weight 0 is never drawn)."""
    passing = (running_sum > point) & positive
    last = running_sum.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.where(passing.any(-1), jnp.argmax(passing, axis=-1), last)


def first_argmax(logits):
    """`argmax` over the last axis (the first of tied maxima), as a max and a min: XLA on CPU
    runs `jnp.argmax`'s paired (value, index) reduction several times slower, and over a
    50k vocabulary it is a large part of a greedy decoding step."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    vocab = logits.shape[-1]
    index = jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(index, vocab - 1)  # a row of NaNs matches nothing; keep the id valid


class CheckedHead(NamedTuple):
    """A float32 LM head `[vocab, d]` with a bfloat16 copy that greedy decoding reads instead.

    On CPUs with bfloat16 matrix units XLA multiplies bfloat16 operands into float32 several
    times faster than float32 ones, and the head is most of what a small model reads per token.
    `greedy_token` ranks the vocabulary with the copy, recomputes the best `CANDIDATES` in
    float32, and keeps that winner only where a bound on the copy's error proves that no other
    token can beat it; otherwise that step computes every logit in float32. Either way the
    token is float32 greedy's (up to the summation order of float32 products, as between any
    two float32 implementations).

    The copy's rows are padded with zeros to a multiple of `CHUNK`, so that its logits split
    into chunks whose maxima narrow the search for the candidates (`best_candidates`).
    """

    weight: jax.Array          # [V, d] float32
    low: jax.Array             # [ceil(V / CHUNK) * CHUNK, d] bfloat16, zero rows past V
    weight_norm: jax.Array     # max over rows of |w_i|
    rounding_norm: jax.Array   # max over rows of |w_i - low_i|

    CANDIDATES = 16
    CHUNK = 64

    @classmethod
    def of(cls, weight: jax.Array) -> "CheckedHead":
        low = weight.astype(jnp.bfloat16)
        row_norm = lambda w: jnp.sqrt(jnp.max(jnp.sum(jnp.square(w), axis=-1)))
        padded = jnp.pad(low, ((0, -weight.shape[0] % cls.CHUNK), (0, 0)))
        return cls(weight, padded, row_norm(weight), row_norm(weight - low.astype(weight.dtype)))


def best_candidates(approx: jax.Array, vocab: int, k: int, chunk: int):
    """The ids `[B, k]` of the `k` largest of `approx` `[B, n * chunk]`'s first `vocab`
    columns, and for each row the largest value among the columns left out.

    Equivalent to `lax.top_k`, whose sort of the whole vocabulary is most of a decoding step's
    non-matmul time on CPU: the `k` best lie in the `k` chunks with the largest maxima, so
    the sorts run on chunk maxima and on those chunks' `k * chunk` values. (Each `top_k` is
    used whole: XLA runs a sort as its fast TopK only when nothing else slices its output.)
    """
    batch, width = approx.shape
    column = jnp.arange(width).reshape(width // chunk, chunk)
    by_chunk = approx.reshape(batch, width // chunk, chunk)
    # The padding masked where it is read, so that no masked copy of `approx` is written.
    chunk_max = jnp.where(column < vocab, by_chunk, -jnp.inf).max(-1)
    kept = min(k, chunk_max.shape[1])
    chunk_ids = jax.lax.top_k(chunk_max, kept)[1]
    inside = jnp.where(column[chunk_ids] < vocab,
                       jnp.take_along_axis(by_chunk, chunk_ids[:, :, None], axis=1),
                       -jnp.inf).reshape(batch, -1)
    slots = jax.lax.top_k(inside, k)[1]
    ids = jnp.take_along_axis(chunk_ids, slots // chunk, axis=1) * chunk + slots % chunk
    chosen = lambda n, picked: (jnp.arange(n)[None, :, None] == picked[:, None, :]).any(-1)
    left_out = jnp.maximum(
        jnp.max(jnp.where(chosen(chunk_max.shape[1], chunk_ids), -jnp.inf, chunk_max), -1),
        jnp.max(jnp.where(chosen(inside.shape[1], slots), -jnp.inf, inside), -1))
    return ids, left_out


def greedy_token(hidden: jax.Array, head: CheckedHead, logits) -> jax.Array:
    """float32 greedy's next token `[B]` for final hidden states `[B, d]` (`CheckedHead`);
    `logits(hidden)` gives every float32 logit, for the steps the bound does not settle.

    For each row, |x.w_i - bf16(x).bf16(w_i)| <= |x - bf16(x)| max|w_i| + |bf16(x)| max|w_i -
    bf16(w_i)| + the float32 accumulation's d 2^-24 |bf16(x)| max|bf16(w_i)| (Cauchy-Schwarz),
    call it eps. A token outside the candidates has float32 logit <= (the largest approximate
    logit left out) + eps; when the best candidate's float32 logit is above that, it wins.
    """
    x = hidden.astype(jnp.float32)
    x_low = x.astype(jnp.bfloat16)
    approx = jax.lax.dot_general(x_low, head.low, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    vocab = head.weight.shape[0]
    candidates, left_out = best_candidates(approx, vocab, min(CheckedHead.CANDIDATES, vocab),
                                           CheckedHead.CHUNK)
    exact = jnp.einsum("bd,bkd->bk", x, head.weight[candidates])
    best = exact.max(-1)
    x_low32 = x_low.astype(jnp.float32)
    low_norm = jnp.linalg.norm(x_low32, axis=-1)
    accumulation = x.shape[-1] * 2.0 ** -24 * (head.weight_norm + head.rounding_norm)
    eps = (jnp.linalg.norm(x - x_low32, axis=-1) * head.weight_norm
           + low_norm * (head.rounding_norm + accumulation))
    proven = jnp.all(best > left_out + eps)
    token = jnp.min(jnp.where(exact == best[:, None], candidates, vocab), axis=-1)
    return jax.lax.cond(proven, lambda: token.astype(jnp.int32),
                        lambda: first_argmax(logits(hidden)))


def sample_token(logits, key, temperature, top_p, *, greedy: bool, top_k, use_top_p: bool):
    if greedy:
        return first_argmax(logits)
    logits = filter_logits(logits / temperature, top_k=top_k,
                           top_p=top_p if use_top_p else None)
    return sample_categorical(key, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p", "eos_token_id", "checked"))
def _generate_jit(graphdef, state, ids, mask, temperature, top_p, key, *, max_new_tokens, greedy,
                  top_k, use_top_p, eos_token_id, checked):
    model = nnx.merge(graphdef, state)
    batch, width = ids.shape
    positions = default_position_ids(mask)
    cache = model.init_cache(batch, width + max_new_tokens)
    # Prompts are left-padded: only the last position's hidden state is needed.
    last = jnp.full((batch, 1), width - 1, jnp.int32)
    hidden, cache = model.decode(ids, positions, mask, cache, logits_at=last, head=False)
    eos = -1 if eos_token_id is None else eos_token_id
    fill = 0 if eos_token_id is None else eos_token_id
    if checked:
        head = CheckedHead.of(model.head_weight().astype(jnp.float32))
        pick = lambda hidden, key: greedy_token(hidden, head, model.logits)
    else:
        pick = lambda hidden, key: sample_token(
            model.logits(hidden), key, temperature, top_p, greedy=greedy, top_k=top_k,
            use_top_p=use_top_p)

    def not_finished(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(carry):
        step, last_hidden, cache, next_pos, done, out = carry
        token = pick(last_hidden, jax.random.fold_in(key, step))
        token = jnp.where(done, fill, token)
        out = out.at[:, step].set(token)
        done = done | (token == eos)
        hidden, cache = model.decode(token[:, None], next_pos[:, None],
                                     jnp.ones((batch, 1), bool), cache, head=False)
        return step + 1, hidden[:, -1], cache, next_pos + 1, done, out

    out = jnp.full((batch, max_new_tokens), fill, jnp.int32)
    carry = (jnp.int32(0), hidden[:, -1], cache, positions[:, -1] + 1,
             jnp.zeros((batch,), bool), out)
    return jax.lax.while_loop(not_finished, step_fn, carry)[-1]
