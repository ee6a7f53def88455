"""GGUF checkpoints (llama.cpp's format) in: a transformers config.json dict and the tensors,
dequantised to float32, under Hugging Face's names and in its layout.

`jaxsftdpo.models.hf` loads those like any Hugging Face checkpoint, so a GGUF file goes through
the same key matching and the same errors. What llama.cpp's `convert_hf_to_gguf.py` changed is
undone here:

- tensor names: `blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight`;
- for architecture `llama` (which is also what llama.cpp writes for Mistral), the rows of the q
  and k projections are permuted so that rotary pairs are adjacent; Qwen2/Qwen3 are not;
- the config lives in metadata keys (`llama.block_count`, ...), and Llama 3's rope scaling only
  as a `rope_freqs.weight` tensor of per-frequency divisors, from which its parameters are
  recovered.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from jaxsftdpo.errors import UserError, first_line

GGUF_SUFFIX = ".gguf"
_HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class _Architecture:
    model_type: str
    hf_class: str
    permuted_qk: bool  # llama.cpp permuted the q/k projection rows


ARCHITECTURES = {
    "llama": _Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    # llama.cpp converts Mistral as `llama`; this is for files that name it themselves.
    "mistral": _Architecture("mistral", "MistralForCausalLM", permuted_qk=True),
    "qwen2": _Architecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
    "qwen3": _Architecture("qwen3", "Qwen3ForCausalLM", permuted_qk=False),
}

# ggml type names this loader dequantises (with the gguf package's own code).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                    "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, read into the config: not a parameter

# llama.cpp computes `rope_freqs` with these when config.json does not say (all Llama 3.x do).
_LLAMA3_LOW_FREQ_FACTOR, _LLAMA3_HIGH_FREQ_FACTOR, _LLAMA3_CONTEXT = 1.0, 4.0, 8192


# ---- public API -----------------------------------------------------------------------------

def gguf_file(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file `name_or_path` names: itself if it is a `.gguf` file, or the one `.gguf`
    file of a directory without config.json; None when it is not a GGUF checkpoint."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX and not path.is_dir():
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist; check the path")
        return path
    if not path.is_dir() or (path / _HF_CONFIG_FILE).is_file():
        return None
    found = sorted(file for file in path.iterdir()
                   if file.suffix.lower() == GGUF_SUFFIX and file.is_file())
    if len(found) > 1:
        names = ", ".join(file.name for file in found)
        raise UserError(f"{path} holds {len(found)} GGUF files ({names}); pass the path of the "
                        f"one to load")
    return found[0] if found else None


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """`(transformers config.json dict, every tensor by Hugging Face key as float32)`."""
    checkpoint = GGUFCheckpoint(path)
    return checkpoint.hf_config(), checkpoint.tensors()


def gguf_tokenizer(path: str | os.PathLike):
    """The `transformers` tokenizer that the GGUF file's metadata describes."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot build a tokenizer from {path} ({first_line(e)}); give a "
                        f"tokenizer directory or hub name instead") from e


class GGUFCheckpoint:
    """One open GGUF file: its config from the metadata alone, its tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = _open(self.path)
        self.arch_name = self._metadata("general.architecture")
        if self.arch_name not in ARCHITECTURES:
            raise UserError(f"GGUF architecture {self.arch_name!r} of {self.path} is not "
                            f"supported; supported: {', '.join(ARCHITECTURES)}")
        self.architecture = ARCHITECTURES[self.arch_name]
        self.shapes = {tensor.name: tuple(int(d) for d in reversed(tensor.shape))
                       for tensor in self.reader.tensors}  # numpy (row-major) order

    def hf_config(self) -> dict:
        """The config.json transformers would write for this model (transformers 5 puts the
        rope in `rope_parameters`; `rope_theta` / `rope_scaling` are there for older readers)."""
        heads = self._int("attention.head_count")
        kv_heads = self._int("attention.head_count_kv", default=heads)
        head_dim = self._int("attention.key_length", default=None)
        if head_dim is None:
            head_dim = self._rows("blk.0.attn_q.weight") // heads
        rope_theta = _float32_value(self._metadata(f"{self.arch_name}.rope.freq_base", 10000.0))
        rope_scaling = self._rope_scaling(rope_theta, head_dim)
        config = {
            "model_type": self.architecture.model_type,
            "architectures": [self.architecture.hf_class],
            "vocab_size": self._int("vocab_size", default=None) or self._rows("token_embd.weight"),
            "hidden_size": self._int("embedding_length"),
            "intermediate_size": self._int("feed_forward_length"),
            "num_hidden_layers": self._int("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": _float32_value(self._metadata(
                f"{self.arch_name}.attention.layer_norm_rms_epsilon")),
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_type": "default", **(rope_scaling or {}),
                                "rope_theta": rope_theta},
            "attention_bias": "blk.0.attn_q.bias" in self.shapes,
            "tie_word_embeddings": "output.weight" not in self.shapes,
            "bos_token_id": self._metadata("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._metadata("tokenizer.ggml.eos_token_id", None),
            "pad_token_id": self._metadata("tokenizer.ggml.padding_token_id", None),
        }
        if rope_scaling:
            config["rope_scaling"] = rope_scaling
        context = self._int("context_length", default=None)
        if context is not None:
            config["max_position_embeddings"] = context
        return config

    def tensors(self) -> dict[str, np.ndarray]:
        """Every parameter tensor by Hugging Face key, float32 in torch's `[out, in]` layout.
        Unknown llama.cpp names are kept as they are, for the loader to report."""
        self._check_types()
        heads = self._int("attention.head_count")
        kv_heads = self._int("attention.head_count_kv", default=heads)
        out = {}
        for tensor in self.reader.tensors:
            if tensor.name == _ROPE_FREQS:
                continue
            array = self._dequantize(tensor)
            if self.architecture.permuted_qk and ".attn_q." in tensor.name:
                array = _unpermute_rows(array, heads)
            elif self.architecture.permuted_qk and ".attn_k." in tensor.name:
                array = _unpermute_rows(array, kv_heads)
            out[hf_tensor_name(tensor.name)] = array
        return out

    # ---- metadata ----

    def _metadata(self, key: str, default=...):
        field = self.reader.get_field(key)
        if field is None:
            if default is ...:
                raise UserError(f"GGUF file {self.path} lacks metadata {key}; re-convert the "
                                f"model with llama.cpp's convert_hf_to_gguf.py")
            return default
        return field.contents()

    def _int(self, name: str, default=...) -> int | None:
        value = self._metadata(f"{self.arch_name}.{name}", default)
        if value is not None and not isinstance(value, int):
            raise UserError(f"GGUF metadata {self.arch_name}.{name} of {self.path} is {value!r}, "
                            f"not one number; models with per-layer values are not supported")
        return value

    def _rows(self, tensor_name: str) -> int:
        if tensor_name not in self.shapes:
            raise UserError(f"GGUF file {self.path} has no tensor {tensor_name}; re-convert the "
                            f"model with llama.cpp's convert_hf_to_gguf.py")
        return self.shapes[tensor_name][0]

    def _rope_scaling(self, rope_theta: float, head_dim: int) -> dict | None:
        kind = self._metadata(f"{self.arch_name}.rope.scaling.type", "none")
        if kind == "linear":
            factor = self._metadata(f"{self.arch_name}.rope.scaling.factor")
            return {"rope_type": "linear", "factor": _float32_value(factor)}
        if kind != "none":
            raise UserError(f"rope scaling type {kind!r} of {self.path} is not supported; "
                            f"supported: linear, llama3")
        if _ROPE_FREQS not in self.shapes:
            return None
        context = self._metadata(f"{self.arch_name}.rope.scaling.original_context_length",
                                 _LLAMA3_CONTEXT)
        divisors = self._dequantize(self._tensor(_ROPE_FREQS)).astype(np.float64)
        return _llama3_scaling(divisors, rope_theta, head_dim, context, self.path)

    # ---- tensors ----

    def _tensor(self, name: str):
        return next(tensor for tensor in self.reader.tensors if tensor.name == name)

    def _check_types(self) -> None:
        for tensor in self.reader.tensors:
            if tensor.tensor_type.name not in SUPPORTED_TYPES:
                raise UserError(f"tensor {tensor.name} of {self.path} is quantised as "
                                f"{tensor.tensor_type.name}, which this loader does not read; "
                                f"supported: {', '.join(SUPPORTED_TYPES)} (re-quantise with "
                                f"llama.cpp's llama-quantize)")

    def _dequantize(self, tensor) -> np.ndarray:
        values = dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(values, dtype=np.float32).reshape(self.shapes[tensor.name])


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face key of llama.cpp tensor `gguf_name` (`blk.0.attn_q.weight` ->
    `model.layers.0.self_attn.q_proj.weight`); an unknown name is returned unchanged."""
    stem, _, suffix = gguf_name.rpartition(".")
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if block and block[2] in _BLOCK_NAMES:
        return f"model.layers.{block[1]}.{_BLOCK_NAMES[block[2]]}.{suffix}"
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    return gguf_name


# ---- helpers --------------------------------------------------------------------------------

def _open(path: Path):
    try:
        return GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:  # bad magic, truncated file, ...
        raise UserError(f"{path} is not a readable GGUF file ({first_line(e)}); re-download or "
                        f"re-convert it") from e


def _unpermute_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: within each head it interleaves the two rotary halves
    (rows 0, d, 1, d+1, ... of a head of 2d rows); Hugging Face keeps them as halves."""
    half = array.shape[0] // heads // 2
    interleaved = array.reshape(heads, half, 2, *array.shape[1:])
    return np.ascontiguousarray(interleaved.swapaxes(1, 2)).reshape(array.shape)


def _llama3_scaling(divisors: np.ndarray, rope_theta: float, head_dim: int, context: int,
                    path: Path) -> dict | None:
    """transformers' llama3 rope parameters giving llama.cpp's `rope_freqs` (what each inverse
    frequency is divided by). The file keeps only those divisors; `factor` is their maximum, and
    the two band edges are llama.cpp's defaults or, failing that, fitted to the divisors."""
    if divisors.shape != (head_dim // 2,):
        raise UserError(f"{_ROPE_FREQS} of {path} has shape {divisors.shape}, not "
                        f"({head_dim // 2},); re-convert the model")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0):
        return None
    inverse = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inverse
    candidates = [(_LLAMA3_LOW_FREQ_FACTOR, _LLAMA3_HIGH_FREQ_FACTOR)]
    candidates += _fitted_band(divisors, factor, context / wavelength)
    for low, high in candidates:
        expected = _llama3_divisors(wavelength, factor, low, high, context)
        if np.allclose(expected, divisors, rtol=1e-4, atol=1e-6):
            return {"rope_type": "llama3", "factor": _float32_value(factor),
                    "low_freq_factor": _float32_value(low),
                    "high_freq_factor": _float32_value(high),
                    "original_max_position_embeddings": int(context)}
    raise UserError(f"{_ROPE_FREQS} of {path} is not a llama3 rope scaling this loader can "
                    f"recover; re-convert the model from its Hugging Face checkpoint")


def _llama3_divisors(wavelength, factor, low, high, context) -> np.ndarray:
    """llama.cpp's `rope_freqs` for these llama3 parameters."""
    smooth = (context / wavelength - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < context / high, 1.0,
                    np.where(wavelength > context / low, factor, medium))


def _fitted_band(divisors: np.ndarray, factor: float, position: np.ndarray) -> list[tuple]:
    """`[(low_freq_factor, high_freq_factor)]` fitted to the divisors strictly between 1 and
    `factor`, where `smooth = (position - low) / (high - low)` is linear; [] with fewer than 2."""
    between = (divisors > 1 + 1e-6) & (divisors < factor - 1e-6)
    if between.sum() < 2:
        return []
    smooth = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(position[between], smooth, 1)
    if slope <= 0:
        return []
    low = -intercept / slope
    return [(float(low), float(low + 1 / slope))]


def _float32_value(value: float) -> float:
    """A float32 from the file as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))

