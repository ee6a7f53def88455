"""Shakespeare's sonnets as the CS224N default project splits, prompts and writes them.

A file is split on lines holding only a number (regex `\\n\\s*\\d+\\s*\\n`, which also spans the
`\\r` of CRLF files); the first piece (the header) is dropped and each sonnet stripped. An
evaluation prompt is a sonnet's first 3 lines; the output is prompt + continuation, written after
a `--Generated Sonnets-- ` line, each under its 0-based position, so the same splitter reads it.
"""

from __future__ import annotations

import re

from jaxsftdpo.data import jsonl
from jaxsftdpo.errors import UserError

SEPARATOR = re.compile(r"\n\s*(\d+)\s*\n")
PROMPT_LINES = 3
GENERATED_HEADER = "--Generated Sonnets-- \n\n"


def split(text: str) -> list[tuple[str, str]]:
    """`(number, sonnet)` for every piece after the header, each sonnet stripped."""
    pieces = SEPARATOR.split(text)
    return [(pieces[i], pieces[i + 1].strip()) for i in range(1, len(pieces) - 1, 2)]


def read(path: str, what: str) -> list[dict]:
    """Sonnets `{"id": number label, "text"}` of a course file (LF or CRLF)."""
    sonnets = [{"id": number, "text": text}
               for number, text in split(jsonl.read_text(path, what))]
    if not sonnets:
        raise UserError(f"{path} ({what}) holds no sonnet; give a file where each sonnet "
                        f"follows a line with only its number on it, after a header")
    return sonnets


def prompt_of(sonnet: str) -> str:
    """The first 3 lines, as the course's prompt files hold them."""
    return "\n".join(sonnet.split("\n")[:PROMPT_LINES])


def continuation_of(sonnet: str) -> str:
    """What follows the prompt: the newline after line 3 and the remaining lines."""
    return sonnet[len(prompt_of(sonnet)):]


def format_generated(sonnets: list[str]) -> str:
    """The course's generated-sonnets file."""
    return GENERATED_HEADER + "".join(f"\n{i}\n{text}\n\n" for i, text in enumerate(sonnets))


def parse_generated(text: str) -> list[str]:
    """Sonnets as the course's scorer reads a generated file back (by the same splitter)."""
    return [sonnet for _, sonnet in split(text)]
