"""Building blocks shared by every model family: linear layer, norms, rotary embeddings,
attention, dropout, KV cache, and the decoder skeleton (`DecoderLM`) every family fills in.

Models know nothing of devices or of training: they map arrays to arrays. Dropout takes an
explicit key so a train step stays a pure function of (state, batch, key).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsftdpo.errors import UserError

ACTIVATIONS = {  # Hugging Face's `hidden_act` / `activation_function` names
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """`x @ w` over the last axis of `x` for `w` `[in, out]`; `x @ w.T` with `transposed`
    (`w` `[out, in]`, as a tied embedding is stored). `x` and `w` share a dtype.

    The gradients are written out as plain products over the flattened tokens. JAX's own
    transpose rule reaches XLA:CPU with transposes that layout assignment folds into the fusion
    producing the output gradient, which then writes a second, transposed copy of it, element
    by element: that took 30% of a GPT-2-small full fine-tuning step and half of a LoRA step.

    Products of half-precision operands are summed in float32 (`_dot`) and rounded once.
    """
    return _project_fwd(x, w, transposed)[0]


def _dot(a, b, dimension_numbers):
    """`dot_general` accumulating in float32 and returning `a`'s dtype: what GPUs and TPUs do
    for bfloat16, and on CPUs with bfloat16 matrix units (AMX) XLA's fast path, which a
    bfloat16-out product misses (4x slower at GPT-2 small's shapes on a Sapphire Rapids core)."""
    return jax.lax.dot_general(a, b, dimension_numbers,
                               preferred_element_type=jnp.float32).astype(a.dtype)


def _project_fwd(x, w, transposed):
    x2 = x.reshape(-1, x.shape[-1])
    y = _dot(x2, w, (((1,), (1 if transposed else 0,)), ((), ())))
    return y.reshape(*x.shape[:-1], y.shape[-1]), (x, w)


def _project_bwd(transposed, residuals, dy):
    x, w = residuals
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = _dot(dy2, w, (((1,), (0 if transposed else 1,)), ((), ())))
    dw = _sum_over_tokens(dy2, x2) if transposed else _sum_over_tokens(x2, dy2)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


def _sum_over_tokens(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a.T @ b` for `a` `[tokens, m]` and `b` `[tokens, n]`: a weight gradient.

    On CPU a half-precision `a` is first copied to `[m, tokens]` in memory: XLA:CPU widens both
    operands of a product that sums over its left operand's leading axis to float32, and with
    the copy its AMX path runs the product at 1.2 instead of 0.26 TFLOP/s (GPT-2 small's MLP,
    1024 tokens; a bfloat16 full fine-tuning step 1.4x faster). The copy is a gather, because
    layout assignment folds a plain transpose back into the product."""
    if a.dtype.itemsize == 2 and jax.default_backend() == "cpu":
        a_t = jnp.take(a.T, jnp.arange(a.shape[1]), axis=0)
        return _dot(a_t, b, (((1,), (0,)), ((), ())))
    return _dot(a, b, (((0,), (0,)), ((), ())))


project.defvjp(_project_fwd, _project_bwd)


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel stored `[in, out]` in `param_dtype`, computed in `dtype`.

    `lora` is None until `jaxsftdpo.lora` attaches adapters; then it adds `(x @ A) @ B * scale`
    without forming `A @ B`, so the frozen kernel needs no weight gradient.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 stddev: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.lora = None
        self.dtype = dtype
        self.in_features = in_features
        self.out_features = out_features

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = project(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, dropout_rng).astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with statistics in float32 whatever the compute dtype."""

    def __init__(self, features: int, *, epsilon: float, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `rng` is None (evaluation) or the rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_rng(rng: jax.Array | None, n: int) -> list:
    return [None] * n if rng is None else list(jax.random.split(rng, n))


ATTENTION_SETTINGS = ("auto", "einsum", "fused")  # a model config's `attention`


def check_attention_setting(setting: str) -> None:
    if setting not in ATTENTION_SETTINGS:
        raise UserError(f"attention {setting!r} is not supported; use one of "
                        f"{list(ATTENTION_SETTINGS)}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              scale: float, dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
              implementation: str = "auto") -> jax.Array:
    """Softmax attention. q `[B,H,T,D]`, k/v `[B,K,S,D]`, mask `[B,T,S]` bool (True = attend).

    Returns `[B,H,T,D]`. With K < H key/value heads (grouped-query attention) each group of
    H / K consecutive query heads shares one key/value head, as in Hugging Face's `repeat_kv`.

    `implementation` (one of `ATTENTION_SETTINGS`) picks `einsum_attention` or
    `fused_attention`; "auto" takes the fused one where cuDNN's flash attention takes the call
    (`_cudnn_takes`) and the einsum one elsewhere, where `jax.nn.dot_product_attention` is the
    same computation in XLA plus transposes into its layout. Only the einsum one has dropout on
    the attention weights, so a call with that dropout active takes it whatever the setting.
    """
    fused = implementation == "fused" or (implementation == "auto" and _cudnn_takes(q, k))
    if not fused or (dropout_rng is not None and dropout_rate > 0.0):
        return einsum_attention(q, k, v, mask, scale=scale, dropout_rate=dropout_rate,
                                dropout_rng=dropout_rng)
    return fused_attention(q, k, v, mask, scale=scale)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     scale: float, dropout_rate: float = 0.0,
                     dropout_rng: jax.Array | None = None) -> jax.Array:
    """`attention` as two einsums with the mask in between.

    The key/value groups are an axis of the products, so k and v are never repeated. Heads lead
    so both products are plain batched matmuls (XLA on CPU is several times slower on the
    `[B,S,H,D]` layout during decoding).

    Scores and softmax are in float32, and both products sum in float32 (see `project`). A
    query row with nothing to attend (a left-padding position) gets uniform weights instead of
    NaN; its output is never used.
    """
    b, h, t, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, kv_heads, h // kv_heads, t, d)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_rng).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype).reshape(b, h, t, d)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                    scale: float) -> jax.Array:
    """`attention` through `jax.nn.dot_product_attention`, without dropout: cuDNN's flash
    attention where it takes the call (`_cudnn_takes`), XLA's otherwise.

    JAX leaves `implementation=None` to XLA (0.10: "currently falls back to xla"), so cuDNN is
    asked for by name. The boolean mask goes in whole (cuDNN adds it as a bias), so padding on
    either side, sliding windows and a KV cache's offset queries need nothing more. Masked
    logits become one large finite negative number, so a query row with nothing to attend gets
    uniform weights, as in `einsum_attention`.
    """
    def btnh(x):  # JAX's layout; in training XLA cancels these transposes with the callers'
        return x.transpose(0, 2, 1, 3)

    y = jax.nn.dot_product_attention(
        btnh(q), btnh(k), btnh(v), mask=mask[:, None], scale=scale,
        implementation="cudnn" if _cudnn_takes(q, k) else None)
    return btnh(y)


def _cudnn_takes(q: jax.Array, k: jax.Array) -> bool:
    """What cuDNN's flash attention accepts (JAX checks it as it traces the call and raises
    otherwise): an NVIDIA GPU, half precision, a head dim that is a multiple of 8 up to 128, and,
    with a mask in training, even query and key lengths."""
    _, _, t, d = q.shape
    return ("cuda" in jax.extend.backend.get_backend().platform_version
            and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128
            and t % 2 == 0 and k.shape[2] % 2 == 0)


def write_cache(cache_kv, k: jax.Array, v: jax.Array):
    """Write this step's k/v `[B,K,T,D]` into a layer's cache `(keys, values, index)` at
    `index`; returns the whole cached `(keys, values)`, which the attention then reads."""
    keys, values, index = cache_kv
    keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, 0, index, 0))
    values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, 0, index, 0))
    return keys, values


class RMSNorm(nnx.Module):
    """Root-mean-square norm as Llama's: statistics in float32, the weight applied after the
    cast back to the compute dtype."""

    def __init__(self, features: int, *, epsilon: float, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def rotary_tables(position_ids: jax.Array, inverse_frequencies: np.ndarray):
    """`(cos, sin)` `[B,T,D]` of rotary embeddings at `position_ids` `[B,T]` (float32)."""
    angles = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` `[B,H,T,D]` by the tables of `rotary_tables`, pairing dimension i with
    i + D/2 (Hugging Face's `rotate_half` layout, not the interleaved one of the paper)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, None].astype(x.dtype), sin[:, None].astype(x.dtype)
    return x * cos + rotated * sin


class KVCache(NamedTuple):
    """Keys and values, one `[B, H, S, D]` array per layer, and which slots hold a token.

    Per-layer arrays (not one stacked array) let XLA update each in place inside a loop.

    `index` is the next slot to write; `valid[b, s]` is False for padding slots, so left-padded
    prompts and finished sequences need no special casing in the attention.
    """

    keys: tuple
    values: tuple
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, *, layers: int, batch: int, length: int, heads: int, head_dim: int,
               dtype) -> "KVCache":
        shape = (batch, heads, length, head_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
                   jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def attention_mask_for(valid_keys: jax.Array, query_len: int, offset,
                       window: int | None = None) -> jax.Array:
    """Causal mask `[B,T,S]`: query t (at absolute slot offset+t) sees valid slots <= its own,
    and with a sliding `window` only the `window` newest of them (its own included)."""
    slots = jnp.arange(valid_keys.shape[1])
    queries = offset + jnp.arange(query_len)
    causal = slots[None, :] <= queries[:, None]
    if window is not None:
        causal &= slots[None, :] > queries[:, None] - window
    return valid_keys[:, None, :] & causal[None]


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip padding: 0 at each sequence's first real token, left or right padded."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def head_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def linear_partition_rules(column: str, row: str) -> tuple:
    """Partition rules of the `Linear` layers whose paths match `column` (into attention and
    the MLP: column-parallel) and `row` (out of them: row-parallel), Megatron style, each
    weight's other dimension over 'fsdp'. A LoRA adapter shares its kernel's input split
    (lora_a) or output split (lora_b), keeps the small rank dimension whole, and splits its
    other dimension over 'fsdp' too (within each tensor shard), so FSDP divides adapters and
    their optimizer state as well."""
    return (
        (column + r"\.kernel", P("fsdp", "tensor")),
        (column + r"\.bias", P("tensor")),
        (column + r"\.lora\.lora_a", P("fsdp", None)),
        (column + r"\.lora\.lora_b", P(None, ("tensor", "fsdp"))),
        (row + r"\.kernel", P("tensor", "fsdp")),
        (row + r"\.bias", P(None)),
        (row + r"\.lora\.lora_a", P(("tensor", "fsdp"), None)),
        (row + r"\.lora\.lora_b", P(None, "fsdp")),
    )
