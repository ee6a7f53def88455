"""The decoder-only skeleton every family shares: embeddings -> blocks -> final norm -> LM head,
for training (`__call__`) and for cached decoding (`init_cache` / `decode`).

A family subclasses `DecoderLM` and provides `embed`, `rotary`, `blocks`, `final_norm` and
`head_weight`; its blocks are called as `block(x, mask, cache_kv, rng, rotary)` and carry a
`window` attribute (None, or the sliding-window size of that layer's attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsftdpo.models.layers import (KVCache, attention_mask_for, default_position_ids,
                                     project, split_rng)
from jaxsftdpo.sharding import rows_on_batch_devices


class DecoderLM(nnx.Module):
    """`model(input_ids, attention_mask)` gives float32 logits; `decode` runs on a KV cache."""

    def embed(self, input_ids, position_ids, rng):
        """Token (and absolute position) embeddings `[B,T,d]`, in the compute dtype."""
        raise NotImplementedError

    def rotary(self, position_ids):
        """What the blocks need about positions (rotary tables), or None."""
        return None

    def head_weight(self) -> jax.Array:
        """The output embedding `[vocab, d]` (the input embedding when tied)."""
        raise NotImplementedError

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, dropout_rng=None,
                 logits_at=None, head: bool = True):
        """Logits `[B, T, vocab]` (float32). Padding may be on either side.

        Without `position_ids`, positions count only real tokens (0 at each sequence's first),
        which is what left-padded batches need. With `logits_at` `[B, K]` (int positions) the
        logits are `[B, K, vocab]`, those positions' only: the LM head runs on K, not T.
        Without the `head`, the final hidden states `[B, T (or K), d]` that `logits_function()`
        maps to those logits.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        out, _ = self._forward(input_ids, position_ids, attention_mask, 0, None, dropout_rng,
                               logits_at, head)
        return out

    def init_cache(self, batch: int, length: int) -> KVCache:
        c = self.config
        return KVCache.create(layers=c.num_layers, batch=batch, length=length,
                              heads=c.num_kv_heads, head_dim=c.head_dim, dtype=c.dtype)

    def decode(self, input_ids, position_ids, valid, cache: KVCache, logits_at=None, *,
               head: bool = True):
        """Run `input_ids` `[B,T]` at cache slots `cache.index ...`; `valid` marks real tokens.

        Returns float32 logits `[B,T,vocab]` (`[B,K,vocab]` at `logits_at` `[B,K]`, as in
        `__call__`), or without the `head` the final hidden states `[B,T,d]` that `logits`
        maps to them, and the cache with these tokens appended.
        """
        t = input_ids.shape[1]
        slots_valid = jax.lax.dynamic_update_slice(cache.valid, valid.astype(bool),
                                                   (0, cache.index))
        out, (keys, values) = self._forward(input_ids, position_ids, slots_valid,
                                            cache.index, cache, None, logits_at, head)
        return out, KVCache(keys, values, slots_valid, cache.index + t)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits of final hidden states `[..., d]` (what `decode(head=False)` gives)."""
        return self.logits_function()(hidden)

    def logits_function(self):
        """`logits` as a function of arrays only (the head weight read once), for JAX
        transforms that must not see the module, such as the loss's chunked LM head."""
        dtype = self.config.dtype
        head = self.head_weight().astype(dtype)
        return lambda hidden: project(hidden.astype(dtype), head,
                                      transposed=True).astype(jnp.float32)

    def _forward(self, input_ids, position_ids, valid_keys, offset, cache, rng, logits_at,
                 head=True):
        c = self.config
        rngs = split_rng(rng, c.num_layers + 1)
        x = rows_on_batch_devices(self.embed(input_ids, position_ids, rngs[-1]))
        rotary = self.rotary(position_ids)
        t = input_ids.shape[1]
        masks = {window: attention_mask_for(valid_keys, t, offset, window)
                 for window in {block.window for block in self.blocks}}
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            mask = masks[block.window]
            if c.remat and cache is None:
                x = _remat_block(block, x, mask, rngs[i], rotary)
            else:
                cache_kv = (None if cache is None else
                            (cache.keys[i], cache.values[i], cache.index))
                x, new_kv = block(x, mask, cache_kv, rngs[i], rotary)
                if cache is not None:
                    keys.append(new_kv[0])
                    values.append(new_kv[1])
            x = rows_on_batch_devices(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        x = self.final_norm(x)
        return (self.logits(x) if head else x), (tuple(keys), tuple(values))


def _remat_block(block, x, mask, rng, rotary):
    """A block whose inner activations are recomputed in the backward pass, not stored: only
    its input stays in memory. Dropout keys are explicit, so the recomputation draws the same
    masks.

    `jax.checkpoint` over the block's state as arrays, not `nnx.remat`: that writes the state
    back into the block afterwards, and with LoRA the frozen base weights, constants of the
    outer trace, cannot be written from inside the gradient's (flax's TraceContextError)."""
    graphdef, state = nnx.split(block)

    def forward(state, x, mask, rng, rotary):
        return nnx.merge(graphdef, state)(x, mask, None, rng, rotary)[0]

    return jax.checkpoint(forward)(state, x, mask, rng, rotary)
