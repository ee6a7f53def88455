"""Llama-style decoders as one Flax NNX family: Llama 3.x, SmolLM/SmolLM2, TinyLlama
(`llama`), Mistral (`mistral`), Qwen2/2.5 (`qwen2`: q/k/v biases) and Qwen3 (`qwen3`: per-head
RMSNorm of q and k, explicit `head_dim`).

RMSNorm, rotary position embeddings (rope types default, linear and llama3), grouped-query
attention with optional sliding windows, a SiLU-gated MLP, and a tied or untied output
embedding. Parameter names follow Hugging Face's (`layers.3.self_attn.q_proj.kernel` <->
`model.layers.3.self_attn.q_proj.weight`); torch's `nn.Linear` stores `[out, in]`, our kernels
`[in, out]`, so the key map transposes them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsftdpo.errors import UserError
from jaxsftdpo.models.decoder import DecoderLM
from jaxsftdpo.models.layers import (ACTIVATIONS, Linear, RMSNorm, apply_rotary, attention,
                                     check_attention_setting, head_scale,
                                     linear_partition_rules, rotary_tables, split_rng,
                                     write_cache)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
_SLIDING = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None     # None: as many as query heads
    head_dim: int | None = None                # None: hidden_size / num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # (key, value) pairs of the rope scaling (hashable: configs are static under jit); () = none
    rope_scaling: tuple = ()
    attention_bias: bool = False               # q/k/v (and, but for qwen2, o) projection biases
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple = ()                    # per layer "full_attention" / "sliding_attention"
    initializer_range: float = 0.02
    bos_token_id: Any = None
    eos_token_id: Any = None                   # an int, or a tuple (Llama 3 has several)
    pad_token_id: Any = None
    # Not part of config.json: how this process computes and stores the weights.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"   # layers.attention's implementation: auto, einsum or fused
    logits_chunk: int = 0     # positions per LM-head chunk in the loss; 0: all at once

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        check_attention_setting(self.attention)
        if self.model_type not in MODEL_TYPES:
            raise UserError(f"model_type {self.model_type!r} is not a Llama-style family; use "
                            f"one of {MODEL_TYPES}")
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise UserError(f"hidden_size={self.hidden_size} is not divisible by "
                                f"num_attention_heads={self.num_attention_heads}; set head_dim "
                                f"in the model config")
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                            f"of num_key_value_heads={self.num_key_value_heads}; fix the model "
                            f"config")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"hidden_act {self.hidden_act!r} is not supported; use one of "
                            f"{sorted(ACTIVATIONS)}")
        rope_type = dict(self.rope_scaling).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UserError(f"rope scaling type {rope_type!r} is not supported; supported: "
                            f"{', '.join(ROPE_TYPES)}")
        if not self.layer_types:
            set_("layer_types", ("full_attention",) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise UserError(f"layer_types has {len(self.layer_types)} entries for "
                            f"{self.num_hidden_layers} layers; fix the model config")
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(getattr(self, name), list):
                set_(name, tuple(getattr(self, name)))

    # ---- what the rest of the package asks of a family's config ----
    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def output_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == _SLIDING else None

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
        """From a transformers config.json dict, old (`rope_theta`, `rope_scaling`) or new
        (`rope_parameters`) rope format alike."""
        names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
        values = {k: v for k, v in hf.items() if k in names and v is not None}
        model_type = hf.get("model_type", "llama")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "rope_theta" in rope:
            values["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        values["rope_scaling"] = (() if rope_type == "default" else
                                  tuple(sorted({**rope, "rope_type": rope_type}.items())))
        values["layer_types"] = tuple(hf.get("layer_types") or _layer_types(hf, model_type))
        if model_type == "qwen2":
            values["attention_bias"] = True  # Qwen2's q/k/v always have biases
        values.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
        return cls(**values, **overrides)

    def to_hf(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _RUNTIME_FIELDS}
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        rope = dict(self.rope_scaling)
        out["rope_scaling"] = rope or None
        out["rope_parameters"] = {"rope_type": "default", **rope, "rope_theta": self.rope_theta}
        # transformers reads a Mistral config with `layer_types` as Ministral's; Mistral's
        # layers all slide when it has a window, which `_layer_types` rebuilds.
        out["layer_types"] = list(self.layer_types)
        if self.model_type == "mistral":
            del out["layer_types"]
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = _SLIDING in self.layer_types
        out.update(architectures=[ARCHITECTURES[self.model_type]], torch_dtype="float32")
        return out


_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "logits_chunk")


def _layer_types(hf: dict, model_type: str) -> list[str]:
    """Which layers slide, for configs that predate `layer_types`: every Mistral layer when it
    has a window; Qwen's from `max_window_layers` on when `use_sliding_window`."""
    n, window = hf.get("num_hidden_layers", 32), hf.get("sliding_window")
    if model_type == "mistral" and window:
        return [_SLIDING] * n
    if model_type in ("qwen2", "qwen3") and window and hf.get("use_sliding_window"):
        first = hf.get("max_window_layers", n)
        return ["full_attention" if i < first else _SLIDING for i in range(n)]
    return ["full_attention"] * n


def rope_inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies `[head_dim / 2]` with the config's scaling, as transformers'
    `ROPE_INIT_FUNCTIONS` compute them."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = (scaling["factor"], scaling["low_freq_factor"],
                             scaling["high_freq_factor"])
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv
        scaled = np.where(wavelength > context / low, inv / factor, inv)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        d, h, kv, hd = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim)
        kw = dict(stddev=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  rngs=rngs)
        self.q_proj = Linear(d, h * hd, use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(d, kv * hd, use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(d, kv * hd, use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(h * hd, d, use_bias=cfg.output_bias, **kw)
        norm = dict(epsilon=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.q_norm = RMSNorm(hd, **norm) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, **norm) if cfg.qk_norm else None
        self.heads, self.kv_heads, self.head_dim = h, kv, hd
        self.dropout_rate = cfg.attention_dropout
        self.implementation = cfg.attention

    def __call__(self, x, mask, cache_kv, rng, rotary):
        """`cache_kv` is None, or this layer's `(keys, values, index)` to write k/v into."""
        b, t, _ = x.shape
        rngs = split_rng(rng, 5)
        q = self.q_proj(x, rngs[0]).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x, rngs[1]).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x, rngs[2]).reshape(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary
        q = apply_rotary(q.transpose(0, 2, 1, 3), cos, sin)
        k = apply_rotary(k.transpose(0, 2, 1, 3), cos, sin)
        v = v.transpose(0, 2, 1, 3)
        if cache_kv is not None:
            k, v = cache_kv = write_cache(cache_kv, k, v)
        y = attention(q, k, v, mask, scale=head_scale(self.head_dim),
                      dropout_rate=self.dropout_rate, dropout_rng=rngs[3],
                      implementation=self.implementation)
        y = y.transpose(0, 2, 1, 3).reshape(b, t, self.heads * self.head_dim)
        return self.o_proj(y, rngs[4]), cache_kv


class MLP(nnx.Module):
    """`down(act(gate(x)) * up(x))`."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, inner = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, stddev=cfg.initializer_range, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, inner, **kw)
        self.up_proj = Linear(d, inner, **kw)
        self.down_proj = Linear(inner, d, **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x, rng):
        rngs = split_rng(rng, 3)
        h = self.act(self.gate_proj(x, rngs[0])) * self.up_proj(x, rngs[1])
        return self.down_proj(h, rngs[2])


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        norm = dict(epsilon=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, layer, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs)
        self.window = cfg.window(layer)

    def __call__(self, x, mask, cache_kv, rng, rotary):
        r_attn, r_mlp = split_rng(rng, 2)
        a, cache_kv = self.self_attn(self.input_layernorm(x), mask, cache_kv, r_attn, rotary)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x), r_mlp)
        return x, cache_kv


class Llama(DecoderLM):
    """A Llama-style language model; `model(input_ids, attention_mask)` gives float32 logits."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = jax.nn.initializers.normal(config.initializer_range)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size,
                                      embedding_init=init, dtype=config.dtype,
                                      param_dtype=config.param_dtype, rngs=rngs)
        self.layers = nnx.List([Block(config, i, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, dtype=config.dtype,
                            param_dtype=config.param_dtype)
        # Stored `[vocab, d]` like the embedding, so tied or not the head is one product; not a
        # `Linear`, so LoRA's "all-linear" never adapts it (as PEFT's does not).
        self.lm_head = (None if config.tie_word_embeddings else nnx.Param(
            init(rngs.params(), (config.vocab_size, config.hidden_size), config.param_dtype)))

    @property
    def blocks(self):
        return self.layers

    def final_norm(self, x):
        return self.norm(x)

    def embed(self, input_ids, position_ids, rng):
        return self.embed_tokens(input_ids)

    def rotary(self, position_ids):
        return rotary_tables(position_ids, rope_inverse_frequencies(self.config))

    def head_weight(self):
        head = self.embed_tokens.embedding if self.lm_head is None else self.lm_head
        return head[...]


def build(config: LlamaConfig, seed: int = 0) -> Llama:
    return Llama(config, rngs=nnx.Rngs(seed))


# ---- Hugging Face key map -------------------------------------------------------------------

Config = LlamaConfig

_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Keys a checkpoint may hold that carry no parameter of ours: a tied head saved anyway, and the
# rotary tables old checkpoints stored.
HF_IGNORED = (r"lm_head\.weight", r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def hf_name(path: tuple) -> str:
    """Our parameter path -> the Hugging Face `*ForCausalLM` state-dict key."""
    if tuple(path) == ("lm_head",):
        return "lm_head.weight"
    *mods, leaf = (str(p) for p in path)
    return "model." + ".".join(mods + [_HF_LEAF[leaf]])


def _is_kernel(path: tuple) -> bool:
    return str(path[-1]) == "kernel"


def to_hf(path: tuple, array):
    return array.T if _is_kernel(path) else array


def from_hf(path: tuple, array):
    return array.T if _is_kernel(path) else array


# ---- Partition rules ------------------------------------------------------------------------
# As GPT-2's: column-parallel into attention and the MLP, row-parallel out of them, the other
# dimension of every weight over 'fsdp', adapters following their kernel. The 'tensor' axis
# splits q/k/v by heads, so it must divide the key/value heads (`sharding.check_heads`).
_COLUMN = r"layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)"
_ROW = r"layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)"
PARTITION_RULES = (
    (r"embed_tokens\.embedding", P(None, ("fsdp", "tensor"))),
    (r"lm_head", P(None, ("fsdp", "tensor"))),
    *linear_partition_rules(_COLUMN, _ROW),
    (r"(layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)|norm)"
     r"\.scale", P(None)),
)
