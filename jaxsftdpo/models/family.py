"""The model-family contract: what `hf.py`, the steps, LoRA, generation and the trainer rely on.

A family is a module (`gpt2.py`, `llama.py`) registered in `jaxsftdpo.models.FAMILIES` under
each `model_type` it serves. Adding one (Gemma, Phi) means one module satisfying `ModelFamily`,
whose model subclasses `decoder.DecoderLM` with `Linear` layers for everything LoRA may adapt,
plus one line in the registry, which checks each module's names (`check_family`) on import.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from jaxsftdpo.models.layers import KVCache


@runtime_checkable
class ModelConfig(Protocol):
    """A family's frozen (hashable: it is static under `jit`) config dataclass."""

    vocab_size: int
    dtype: Any          # compute dtype
    param_dtype: Any    # storage dtype of the parameters
    remat: bool         # recompute each block in the backward pass
    attention: str      # `layers.attention`'s implementation: "auto", "einsum" or "fused"
    logits_chunk: int   # positions whose logits the loss computes at a time (0: all)

    @property
    def max_length(self) -> int: ...        # positions the model can take
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...         # query heads
    @property
    def num_kv_heads(self) -> int: ...      # key/value heads (fewer under grouped queries)
    @property
    def head_dim(self) -> int: ...

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "ModelConfig":
        """From a transformers `config.json` dict; `overrides` set runtime fields (dtype)."""

    def to_hf(self) -> dict:
        """The `config.json` transformers reads back as the same model."""


@runtime_checkable
class LanguageModel(Protocol):
    """What training (`steps.py`), evaluation (`policy.py`) and `generate.py` call."""

    config: ModelConfig

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *, dropout_rng: jax.Array | None = None,
                 logits_at: jax.Array | None = None) -> jax.Array:
        """float32 logits `[B, T, vocab]`, or `[B, K, vocab]` at positions `logits_at`."""

    def init_cache(self, batch: int, length: int) -> KVCache: ...

    def decode(self, input_ids: jax.Array, position_ids: jax.Array, valid: jax.Array,
               cache: KVCache, logits_at: jax.Array | None = None, *, head: bool = True
               ) -> tuple[jax.Array, KVCache]:
        """Logits (or, without the `head`, final hidden states) and the extended cache."""

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits of final hidden states."""

    def head_weight(self) -> jax.Array:
        """The output embedding `[vocab, d]`."""


class ModelFamily(Protocol):
    """The module-level names of a family module."""

    MODEL_TYPES: tuple[str, ...]    # the config.json `model_type`s it serves
    Config: type[ModelConfig]
    # Regexes of checkpoint keys that hold no parameter (a tied head saved anyway, buffers).
    HF_IGNORED: tuple[str, ...]
    # Ordered (regex over the dotted parameter path, PartitionSpec); every leaf must match one,
    # LoRA adapters (`<linear>.lora.lora_a` / `lora_b`) included.
    PARTITION_RULES: tuple

    def build(self, config: ModelConfig, seed: int = 0) -> LanguageModel:
        """A randomly initialised model (used under `nnx.eval_shape` when loading)."""

    def hf_name(self, path: tuple) -> str:
        """nnx state path of a parameter -> its Hugging Face state-dict key; for a `Linear`'s
        kernel, the module part is also the name PEFT's adapter files use."""

    def to_hf(self, path: tuple, array: Any) -> Any:
        """Our layout -> Hugging Face's (e.g. transpose `[in, out]` kernels)."""

    def from_hf(self, path: tuple, array: Any) -> Any:
        """Hugging Face's layout -> ours; lazy arrays (memory maps) must stay lazy."""


def check_family(module) -> None:
    """Raise TypeError naming what `module` lacks of `ModelFamily`."""
    names = [name for name in ModelFamily.__annotations__] + [
        "build", "hf_name", "to_hf", "from_hf"]
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise TypeError(f"model family {module.__name__} lacks {', '.join(missing)}")

