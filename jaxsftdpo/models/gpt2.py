"""GPT-2 (gpt2 ... gpt2-xl) as a Flax NNX module, with its Hugging Face key map.

Parameter names follow Hugging Face's (`h.3.attn.c_attn.kernel` <-> `transformer.h.3.attn.
c_attn.weight`); GPT-2's Conv1D stores weights `[in, out]` like our kernels, so no transposes.
The output embedding is tied to `wte`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsftdpo.errors import UserError
from jaxsftdpo.models.decoder import DecoderLM
from jaxsftdpo.models.layers import (ACTIVATIONS, LayerNorm, Linear, attention,
                                     check_attention_setting, dropout, head_scale,
                                     linear_partition_rules, split_rng, write_cache)

MODEL_TYPES = ("gpt2",)

# Hugging Face's published sizes; everything else comes from config.json.
NAMED_SIZES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # Not part of config.json: how this process computes and stores the weights.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False   # recompute each block's activations in the backward pass (training)
    attention: str = "auto"   # layers.attention's implementation: auto, einsum or fused
    logits_chunk: int = 0     # positions per LM-head chunk in the loss; 0: all at once

    def __post_init__(self):
        check_attention_setting(self.attention)
        if self.activation_function not in ACTIVATIONS:
            raise UserError(f"GPT-2 activation_function {self.activation_function!r} is not "
                            f"supported; use one of {sorted(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise UserError(f"GPT-2 n_embd={self.n_embd} is not divisible by "
                            f"n_head={self.n_head}; fix the model config")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_length(self) -> int:
        return self.n_positions

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def num_heads(self) -> int:
        return self.n_head

    @property
    def num_kv_heads(self) -> int:
        return self.n_head

    @classmethod
    def named(cls, name: str, **overrides) -> "GPT2Config":
        if name not in NAMED_SIZES:
            raise UserError(f"unknown GPT-2 size {name!r}; use one of {sorted(NAMED_SIZES)}")
        return cls(**{**NAMED_SIZES[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "GPT2Config":
        names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
        if not hf.get("tie_word_embeddings", True):
            raise UserError("GPT-2 checkpoints with untied output embeddings are not supported")
        return cls(**{k: v for k, v in hf.items() if k in names}, **overrides)

    def to_hf(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _RUNTIME_FIELDS}
        out.update(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                   tie_word_embeddings=True, torch_dtype="float32")
        return out


# How this process runs, not config.json.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "logits_chunk")


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        d = cfg.n_embd
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.c_attn = Linear(d, 3 * d, stddev=cfg.initializer_range, **kw)
        self.c_proj = Linear(d, d, stddev=cfg.initializer_range / math.sqrt(2 * cfg.n_layer),
                             **kw)
        scale = head_scale(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.n_head = cfg.n_head
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_pdrop = cfg.resid_pdrop
        self.implementation = cfg.attention

    def __call__(self, x, mask, cache_kv, rng):
        """`cache_kv` is None, or this layer's `(keys, values, index)` to write k/v into."""
        b, t, d = x.shape
        rngs = split_rng(rng, 4)
        q, k, v = jnp.split(self.c_attn(x, rngs[0]), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.n_head, d // self.n_head).transpose(0, 2, 1, 3)
                   for a in (q, k, v))
        if cache_kv is not None:
            k, v = cache_kv = write_cache(cache_kv, k, v)
        y = attention(q, k, v, mask, scale=self.scale, dropout_rate=self.attn_pdrop,
                      dropout_rng=rngs[1], implementation=self.implementation)
        y = self.c_proj(y.transpose(0, 2, 1, 3).reshape(b, t, d), rngs[2])
        return dropout(y, self.resid_pdrop, rngs[3]), cache_kv


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        d, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.c_fc = Linear(d, inner, stddev=cfg.initializer_range, **kw)
        self.c_proj = Linear(inner, d,
                             stddev=cfg.initializer_range / math.sqrt(2 * cfg.n_layer), **kw)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.resid_pdrop = cfg.resid_pdrop

    def __call__(self, x, rng):
        rngs = split_rng(rng, 3)
        h = self.act(self.c_fc(x, rngs[0]))
        return dropout(self.c_proj(h, rngs[1]), self.resid_pdrop, rngs[2])


class Block(nnx.Module):
    window = None  # GPT-2 attends to every earlier position

    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        ln = dict(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.ln_1 = LayerNorm(cfg.n_embd, **ln)
        self.attn = Attention(cfg, layer_idx, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.n_embd, **ln)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, mask, cache_kv, rng, rotary=None):
        r_attn, r_mlp = split_rng(rng, 2)
        a, cache_kv = self.attn(self.ln_1(x), mask, cache_kv, r_attn)
        x = x + a
        x = x + self.mlp(self.ln_2(x), r_mlp)
        return x, cache_kv


class GPT2(DecoderLM):
    """GPT-2 language model; `model(input_ids, attention_mask)` gives float32 logits."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        init = jax.nn.initializers.normal(config.initializer_range)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, embedding_init=init,
                             dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, embedding_init=init,
                             dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.h = nnx.List([Block(config, i, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon,
                              dtype=config.dtype, param_dtype=config.param_dtype)

    @property
    def blocks(self):
        return self.h

    def final_norm(self, x):
        return self.ln_f(x)

    def embed(self, input_ids, position_ids, rng):
        x = self.wte(input_ids) + self.wpe(position_ids)
        return dropout(x, self.config.embd_pdrop, rng)

    def head_weight(self):
        return self.wte.embedding[...]


# ---- Hugging Face key map -------------------------------------------------------------------

Config = GPT2Config  # the family's config class, as `jaxsftdpo.models.hf` looks it up

_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Keys a GPT-2 checkpoint may hold that carry no parameter of ours.
HF_IGNORED = (r"lm_head\.weight", r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias")


def hf_name(path: tuple) -> str:
    """Our parameter path -> the Hugging Face `GPT2LMHeadModel` state-dict key."""
    *mods, leaf = (str(p) for p in path)
    return "transformer." + ".".join(mods + [_HF_LEAF[leaf]])


def to_hf(path: tuple, array):
    return array


def from_hf(path: tuple, array):
    return array


def build(config: GPT2Config, seed: int = 0) -> GPT2:
    return GPT2(config, rngs=nnx.Rngs(seed))


# ---- Partition rules: (regex over the dotted parameter path, PartitionSpec) -----------------
# The linear layers' as `layers.linear_partition_rules` gives them; embeddings split their
# width, norms are replicated.
_COLUMN = r"h\.\d+\.(attn\.c_attn|mlp\.c_fc)"
_ROW = r"h\.\d+\.(attn\.c_proj|mlp\.c_proj)"
PARTITION_RULES = (
    (r"wte\.embedding", P(None, ("fsdp", "tensor"))),
    (r"wpe\.embedding", P(None, ("fsdp", "tensor"))),
    *linear_partition_rules(_COLUMN, _ROW),
    (r"(h\.\d+\.ln_[12]|ln_f)\.(scale|bias)", P(None)),
)
