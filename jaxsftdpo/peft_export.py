"""LoRA adapters in PEFT's format, for `peft.PeftModel.from_pretrained(base, directory)`.

PEFT saves a LoRA model as `adapter_config.json` plus `adapter_model.safetensors` whose keys
are `base_model.model.<Hugging Face module>.lora_A.weight` `[r, in]` and `.lora_B.weight`
`[out, r]`, without the adapter name, in the layout of `nn.Linear` whatever the base layer
(GPT-2's Conv1D included: its `fan_in_fan_out=True` transposes only the base weight). Our
adapters (`jaxsftdpo.lora`) are the transposes: `lora_a` `[in, r]`, `lora_b` `[r, out]`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxsftdpo.errors import UserError
from jaxsftdpo.lora import linears_with_paths
from jaxsftdpo.models import family_for

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_NO_ADAPTERS = ("the model has no LoRA adapter to export; train with config.param.kind='lora', "
                "or export the merged model instead")


def _hf_module(family, path: tuple) -> str:
    """Hugging Face module name of our `Linear` at `path`, e.g. `transformer.h.0.attn.c_attn`."""
    return family.hf_name(path + ("kernel",)).rsplit(".", 1)[0]


def peft_adapter_tensors(model: nnx.Module) -> dict:
    """`{PEFT key: float32 numpy array}` of every adapter in `model` (a model of a registered
    family), as PEFT writes them in `adapter_model.safetensors`."""
    family = family_for(model)
    tensors = {}
    for path, linear in linears_with_paths(model):
        if linear.lora is None:
            continue
        name = _PEFT_PREFIX + _hf_module(family, path)
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(
            np.asarray(linear.lora.lora_a[...], np.float32).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(
            np.asarray(linear.lora.lora_b[...], np.float32).T)
    if not tensors:
        raise UserError(_NO_ADAPTERS)
    return tensors


def _peft_target_modules(model: nnx.Module, family):
    """PEFT `target_modules` that select exactly the adapted modules: the list of their last
    names when that picks no other linear module (what people write), else a regex that PEFT
    full-matches against module names."""
    linears = [(_hf_module(family, path), linear.lora is not None)
               for path, linear in linears_with_paths(model)]
    adapted = [name for name, has in linears if has]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if all(has for name, has in linears if name.rsplit(".", 1)[-1] in suffixes):
        return suffixes
    return "(" + "|".join(re.escape(name) for name in adapted) + ")"


def _fan_in_fan_out(family, path: tuple) -> bool:
    """True when the family stores this weight `[in, out]` in Hugging Face files (Conv1D)."""
    return tuple(np.shape(family.to_hf(path + ("kernel",), np.zeros((2, 3))))) == (2, 3)


def peft_adapter_config(model: nnx.Module, *, alpha: float, dropout: float = 0.0,
                        use_rslora: bool = False,
                        base_model_name_or_path: str | None = None) -> dict:
    """The `adapter_config.json` PEFT needs to load `model`'s adapters (a `LoraConfig`).

    `alpha`, `dropout` and `use_rslora` are the values the adapters were made with; the rank
    comes from the adapters, and their scale is checked against these values.
    """
    family = family_for(model)
    adapted = [(path, linear) for path, linear in linears_with_paths(model)
               if linear.lora is not None]
    if not adapted:
        raise UserError(_NO_ADAPTERS)
    ranks = {linear.lora.lora_a.shape[1] for _, linear in adapted}
    if len(ranks) != 1:
        raise UserError(f"the adapters have different ranks {sorted(ranks)}; PEFT's format "
                        f"here needs one rank")
    r = ranks.pop()
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    if any(not math.isclose(linear.lora.scale, scale, rel_tol=1e-6) for _, linear in adapted):
        raise UserError(f"the adapters' scale is not alpha={alpha} / "
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
    config = peft_adapter_config(model, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                 base_model_name_or_path=base_model_name_or_path)
    tensors = peft_adapter_tensors(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    (out_dir / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
