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
        return layers.project(h, self.lora_b[...].astype(x.dtype)) * self.scale

    def delta(self) -> jax.Array:
        """`A @ B * scale` in float32: what merging adds to the kernel."""
        return (self.lora_a[...] @ self.lora_b[...]) * self.scale


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
    """Every `Linear` in `model` by dotted path (`h.0.attn.c_attn`), in graph order."""
    return {".".join(str(p) for p in path): module for path, module in nnx.iter_graph(model)
            if isinstance(module, Linear)}


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


# ---- PEFT's format ----------------------------------------------------------------------------
# PEFT saves a LoRA model as `adapter_config.json` plus `adapter_model.safetensors` whose keys
# are `base_model.model.<Hugging Face module>.lora_A.weight` `[r, in]` and `.lora_B.weight`
# `[out, r]`, without the adapter name, in the layout of `nn.Linear` whatever the base layer
# (GPT-2's Conv1D included: its `fan_in_fan_out=True` transposes only the base weight).

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _linears_with_paths(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    return [(tuple(path), module) for path, module in nnx.iter_graph(model)
            if isinstance(module, Linear)]


def _hf_module(family, path: tuple) -> str:
    """Hugging Face module name of our `Linear` at `path`, e.g. `transformer.h.0.attn.c_attn`."""
    return family.hf_name(path + ("kernel",)).rsplit(".", 1)[0]


def peft_adapter_tensors(model: nnx.Module) -> dict:
    """`{PEFT key: float32 numpy array}` of every adapter in `model` (a model of a registered
    family), as PEFT writes them in `adapter_model.safetensors`."""
    import numpy as np
    from jaxsftdpo.models import family_for

    family = family_for(model)
    tensors = {}
    for path, linear in _linears_with_paths(model):
        if linear.lora is None:
            continue
        name = _PEFT_PREFIX + _hf_module(family, path)
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(
            np.asarray(linear.lora.lora_a[...], np.float32).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(
            np.asarray(linear.lora.lora_b[...], np.float32).T)
    if not tensors:
        raise UserError("the model has no LoRA adapter to export; train with "
                        "config.param.kind='lora', or export the merged model instead")
    return tensors


def _peft_target_modules(model: nnx.Module, family):
    """PEFT `target_modules` that select exactly the adapted modules: the list of their last
    names when that picks no other linear module (what people write), else a regex that PEFT
    full-matches against module names."""
    linears = [(_hf_module(family, path), linear.lora is not None)
               for path, linear in _linears_with_paths(model)]
    adapted = [name for name, has in linears if has]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if all(has for name, has in linears if name.rsplit(".", 1)[-1] in suffixes):
        return suffixes
    return "(" + "|".join(re.escape(name) for name in adapted) + ")"


def _fan_in_fan_out(family, path: tuple) -> bool:
    """True when the family stores this weight `[in, out]` in Hugging Face files (Conv1D)."""
    import numpy as np
    return tuple(np.shape(family.to_hf(path + ("kernel",), np.zeros((2, 3))))) == (2, 3)


def peft_adapter_config(model: nnx.Module, *, alpha: float, dropout: float = 0.0,
                        use_rslora: bool = False,
                        base_model_name_or_path: str | None = None) -> dict:
    """The `adapter_config.json` PEFT needs to load `model`'s adapters (a `LoraConfig`).

    `alpha`, `dropout` and `use_rslora` are the values the adapters were made with; the rank
    comes from the adapters, and their scale is checked against these values.
    """
    from jaxsftdpo.models import family_for

    family = family_for(model)
    adapted = [(path, linear) for path, linear in _linears_with_paths(model)
               if linear.lora is not None]
    if not adapted:
        raise UserError("the model has no LoRA adapter to export; train with "
                        "config.param.kind='lora', or export the merged model instead")
    ranks = {linear.lora.lora_a.shape[1] for _, linear in adapted}
    if len(ranks) != 1:
        raise UserError(f"the adapters have different ranks {sorted(ranks)}; PEFT's format "
                        f"here needs one rank")
    r = ranks.pop()
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    if any(not math.isclose(linear.lora.scale, scale, rel_tol=1e-6) for _, linear in adapted):
        raise ValueError(f"the adapters' scale is not alpha={alpha} / "
                         f"{'sqrt(r)' if use_rslora else 'r'} with r={r}; pass the alpha and "
                         f"use_rslora they were made with")
    fan_in_fan_out = {_fan_in_fan_out(family, path) for path, _ in adapted}
    if len(fan_in_fan_out) != 1:
        raise UserError("the adapted modules mix weight layouts; PEFT's fan_in_fan_out is one "
                        "flag for all of them")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": float(dropout),
        "use_rslora": bool(use_rslora),
        "target_modules": _peft_target_modules(model, family),
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def save_peft_adapters(model: nnx.Module, out_dir, *, alpha: float, dropout: float = 0.0,
                       use_rslora: bool = False, base_model_name_or_path: str | None = None
                       ) -> None:
    """Write `model`'s adapters in PEFT's format into `out_dir` (created if needed), so that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads them onto the Hugging Face base."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    config = peft_adapter_config(model, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                 base_model_name_or_path=base_model_name_or_path)
    tensors = peft_adapter_tensors(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    (out_dir / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
