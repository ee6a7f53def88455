"""LoRA as a parameterization of `Linear`: adapters live inside the model, training picks them.

`apply_lora` attaches a `LoRA` to each targeted `Linear` (its `lora` attribute), `merge_lora`
folds the adapters into the kernels, and `split_trainable` splits a model into the trainable
and frozen states a pure train step works on.

Layout: `lora_a` is `[in, r]` and `lora_b` is `[r, out]`, the transposes of PEFT's
`lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` (PEFT's `fan_in_fan_out` only
transposes the base weight, never the adapters).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsftdpo.errors import UserError
from jaxsftdpo.models import layers
from jaxsftdpo.models.layers import Linear

# What each fine-tuning mode trains. Filter order matters in `nnx.split`: LoRAParam subclasses
# Param, so an `nnx.Param` filter alone would also take the adapters.
TRAINABLE = {"fft": nnx.Param, "lora": nnx.LoRAParam}


class LoRA(nnx.Module):
    """Low-rank update `(dropout(x) @ A) @ B * scale` for a `Linear` of shape `[in, out]`."""

    def __init__(self, in_features: int, out_features: int, *, r: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False, rngs: nnx.Rngs):
        # PEFT's default: kaiming_uniform_(a=sqrt(5)) on A's [r, in] weight, which is
        # uniform(-1/sqrt(in), 1/sqrt(in)). Adapters stay float32 whatever the base dtype,
        # like PEFT's autocast_adapter_dtype, so small updates are not rounded away.
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = nnx.LoRAParam(jax.random.uniform(
            rngs.params(), (in_features, r), jnp.float32, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((r, out_features), jnp.float32))
        self.scale = alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout_rate = dropout

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = layers.dropout(x, self.dropout_rate, dropout_rng)
        h = layers.project(x, self.lora_a[...].astype(x.dtype))
        # The scale multiplies B `[r, out]`, not the `[tokens, out]` product: in the backward
        # pass that spares a pass over the output gradient per adapter.
        return layers.project(h, (self.lora_b[...] * self.scale).astype(x.dtype))

    def delta(self) -> jax.Array:
        """`A @ B * scale` in float32: what merging adds to the kernel."""
        return (self.lora_a[...] @ self.lora_b[...]) * self.scale


def linears_with_paths(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """`(graph path, Linear)` for every `Linear` in `model` (`("h", 0, "attn", "c_attn")`), in
    graph order."""
    return [(tuple(path), module) for path, module in nnx.iter_graph(model)
            if isinstance(module, Linear)]


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
    """Every `Linear` in `model` by dotted path (`h.0.attn.c_attn`), in graph order."""
    return {".".join(str(p) for p in path): module for path, module in linears_with_paths(model)}


def _matches(path: str, target_modules: str | list[str]) -> bool:
    """PEFT's rules: a string is a regex matched against the whole path, a list names suffixes."""
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == name or path.endswith("." + name) for name in target_modules)


def apply_lora(model: nnx.Module, *, r: int, alpha: float, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear", use_rslora: bool = False,
               seed: int = 0) -> list[str]:
    """Attach a LoRA adapter to every targeted `Linear`, in place; returns the adapted paths."""
    linears = linear_modules(model)
    targets = [path for path in linears if _matches(path, target_modules)]
    if not targets:
        available = ", ".join(list(linears)[:6])
        raise UserError(f"LoRA target_modules {target_modules!r} matches no linear module; "
                        f"available modules include {available}")
    rngs = nnx.Rngs(seed)
    for path in targets:
        linear = linears[path]
        if linear.lora is not None:
            raise UserError(f"{path} already has a LoRA adapter; merge_lora before adding another")
        # `lora` starts as None, which nnx records as static; wrapping marks it as data.
        linear.lora = nnx.data(LoRA(linear.in_features, linear.out_features, r=r, alpha=alpha,
                                    dropout=dropout, use_rslora=use_rslora, rngs=rngs))
    return targets


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel (in float32) and remove it, in place."""
    for linear in linear_modules(model).values():
        if linear.lora is None:
            continue
        kernel = linear.kernel[...]
        linear.kernel[...] = (kernel.astype(jnp.float32) + linear.lora.delta()).astype(kernel.dtype)
        linear.lora = None
    return model


def split_trainable(model: nnx.Module, param: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, trainable, frozen)` for fine-tuning mode `param` ("fft" or "lora").

    `nnx.merge(graphdef, trainable, frozen)` rebuilds the model.
    """
    if param not in TRAINABLE:
        raise UserError(f"unknown fine-tuning mode {param!r}; use one of {sorted(TRAINABLE)}")
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE[param], ...)
    if not jax.tree.leaves(trainable):
        raise UserError(f"nothing to train in mode {param!r}"
                        + ("; attach adapters with apply_lora first" if param == "lora" else ""))
    return graphdef, trainable, frozen


def lora_state(model: nnx.Module) -> nnx.State:
    """Only the adapters' parameters, e.g. to save them apart from the base model."""
    return nnx.state(model, nnx.LoRAParam)


def count_params(state) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(state))
