"""Batched sampling with a KV cache: greedy, temperature, top-k and top-p, one compile per shape.

The prompt is prefilled in one call, then the whole decode loop runs inside one `jax.jit` as a
`lax.while_loop` that stops when every sequence has emitted `eos_token_id`. Prompts are re-padded
on the left to a multiple of `prompt_bucket`, so prompts of nearby lengths share a compile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsftdpo.errors import UserError
from jaxsftdpo.models.layers import default_position_ids


def generate(model: nnx.Module, input_ids, attention_mask=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, seed: int = 0, prompt_bucket: int = 64):
    """New tokens `[batch, max_new_tokens]` (int32 numpy) continuing each prompt.

    Prompts may be padded on either side (`attention_mask` marks real tokens). Greedy when
    `temperature` is 0. After a sequence emits `eos_token_id` the rest of its row is
    `eos_token_id`. The same `seed` gives the same samples.
    """
    ids, mask = _left_pad(np.asarray(input_ids), attention_mask, prompt_bucket,
                          pad_id=0 if eos_token_id is None else eos_token_id)
    _check_request(model, int(mask.sum(-1).max()), max_new_tokens, temperature, top_k, top_p)
    graphdef, state = nnx.split(model)
    greedy = temperature == 0.0
    tokens = _generate_jit(
        graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
        jnp.float32(temperature if not greedy else 1.0),
        jnp.float32(1.0 if top_p is None else top_p), jax.random.key(seed),
        max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, use_top_p=top_p is not None,
        eos_token_id=eos_token_id)
    return np.asarray(tokens)


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
    """Set to -inf every logit outside the top-k set and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`.
    """
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def first_argmax(logits):
    """`argmax` over the last axis (the first of tied maxima), as a max and a min: XLA on CPU
    runs `jnp.argmax`'s paired (value, index) reduction several times slower, and over a
    50k vocabulary it is a large part of a greedy decoding step."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    vocab = logits.shape[-1]
    index = jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(index, vocab - 1)  # a row of NaNs matches nothing; keep the id valid


def sample_token(logits, key, temperature, top_p, *, greedy: bool, top_k, use_top_p: bool):
    if greedy:
        return first_argmax(logits)
    logits = filter_logits(logits / temperature, top_k=top_k,
                           top_p=top_p if use_top_p else None)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p", "eos_token_id"))
def _generate_jit(graphdef, state, ids, mask, temperature, top_p, key, *, max_new_tokens, greedy,
                  top_k, use_top_p, eos_token_id):
    model = nnx.merge(graphdef, state)
    batch, width = ids.shape
    positions = default_position_ids(mask)
    cache = model.init_cache(batch, width + max_new_tokens)
    # Prompts are left-padded: only the last position's logits are needed.
    last = jnp.full((batch, 1), width - 1, jnp.int32)
    logits, cache = model.decode(ids, positions, mask, cache, logits_at=last)
    eos = -1 if eos_token_id is None else eos_token_id
    fill = 0 if eos_token_id is None else eos_token_id
    sample = functools.partial(sample_token, temperature=temperature, top_p=top_p, greedy=greedy,
                               top_k=top_k, use_top_p=use_top_p)

    def not_finished(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(carry):
        step, last_logits, cache, next_pos, done, out = carry
        token = sample(last_logits, jax.random.fold_in(key, step))
        token = jnp.where(done, fill, token)
        out = out.at[:, step].set(token)
        done = done | (token == eos)
        logits, cache = model.decode(token[:, None], next_pos[:, None],
                                     jnp.ones((batch, 1), bool), cache)
        return step + 1, logits[:, -1], cache, next_pos + 1, done, out

    out = jnp.full((batch, max_new_tokens), fill, jnp.int32)
    carry = (jnp.int32(0), logits[:, -1], cache, positions[:, -1] + 1,
             jnp.zeros((batch,), bool), out)
    return jax.lax.while_loop(not_finished, step_fn, carry)[-1]
