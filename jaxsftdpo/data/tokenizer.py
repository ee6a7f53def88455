"""Tokenizers behind one small interface (`Tokenizer`): a byte-level one for offline runs, and
Hugging Face's. What `save(directory)` writes, `load_tokenizer(directory)` reads back.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

from jaxsftdpo.errors import UserError, first_line

BYTES = "bytes"
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class Tokenizer(Protocol):
    """What the package uses of a tokenizer."""

    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    prefix_ids: list[int]   # what it puts before a text, e.g. a BOS token; empty for GPT-2, bytes

    def encode(self, text: str) -> list[int]: ...     # no special tokens
    def decode(self, ids) -> str: ...
    def vocabulary(self) -> dict[str, int]: ...
    def save(self, directory: str) -> None: ...


class ByteTokenizer:
    """Ids 0..255 are UTF-8 bytes; 256 is end-of-text, used as both eos and pad."""

    vocab_size = 257
    eos_token_id = 256
    pad_token_id = 256
    prefix_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if int(i) != self.eos_token_id)
        return data.decode("utf-8", errors="replace")

    def vocabulary(self) -> dict[str, int]:
        """Each token's name and id; two tokenizers with equal vocabularies read text alike."""
        return {**{f"<0x{i:02X}>": i for i in range(256)}, "<eos>": self.eos_token_id}

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BYTE_TOKENIZER_FILE), "w") as f:
            json.dump({"type": BYTES, "vocab_size": self.vocab_size,
                       "eos_token_id": self.eos_token_id}, f)


class HFTokenizer:
    """A `transformers` tokenizer; pad falls back to eos when the tokenizer has none (as GPT-2)."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-text token; "
                            "choose a tokenizer that defines eos_token")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.vocab_size = len(tokenizer)
        self.prefix_ids = tokenizer("", add_special_tokens=True)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        """Each token's name and id (added tokens included)."""
        return self.tokenizer.get_vocab()

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def save(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)


def load_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """`"bytes"`, a directory written by `save`, a local HF tokenizer directory, a hub name, or
    a GGUF model file (or a directory holding one and no config.json), whose metadata holds its
    tokenizer; `save` writes that as an ordinary HF tokenizer directory."""
    name = os.path.expanduser(name)
    if name == BYTES or os.path.isfile(os.path.join(name, BYTE_TOKENIZER_FILE)):
        return ByteTokenizer()
    # Imported here: jaxsftdpo.models brings in JAX, which plain tokenizing does not need.
    from jaxsftdpo.models.gguf import gguf_file, gguf_tokenizer
    gguf = gguf_file(name)
    if gguf is not None:
        return HFTokenizer(gguf_tokenizer(gguf))
    if _looks_like_path(name) and not os.path.isdir(name):
        raise UserError(f"tokenizer directory {name!r} does not exist; give an existing "
                        f"directory, a Hugging Face hub name, or {BYTES!r}")
    from transformers import AutoTokenizer
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {name!r} ({first_line(e)}); give an existing "
                        f"local directory, a hub name available offline, or {BYTES!r}") from e


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(".") or os.path.exists(name)

