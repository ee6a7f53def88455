"""Any user's data: JSON lines (or a Hugging Face hub dataset) for SFT and DPO.

A row is one of
- `{"prompt": str, "completion": str}`: an SFT example (loss on the completion only);
- `{"messages": [{"role", "content"}, ...]}` ending in an assistant turn: an SFT example, the
  conversation rendered by the tokenizer's chat template, the last turn being the completion;
- `{"prompt": str, "chosen": str, "rejected": str}`: a preference pair, which also serves SFT
  with `chosen` as the completion.
An optional `id` names the row in per-example results. Rows of none of these shapes (bad JSON,
missing or empty fields) are skipped and counted; a source without a usable row is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxsftdpo.errors import UserError, first_line


def load(path: str, tokenizer, *, hub_dataset: str = "", hub_split: str = "",
         what: str = "config.data.train") -> list[dict]:
    """Examples `{"id", "prompt", "completion"}` (+ `"chosen"`, `"rejected"` for pairs) from a
    JSONL file, or from split `hub_split` of `hub_dataset` when that is set."""
    if hub_dataset:
        numbered = list(enumerate(load_hub_rows(hub_dataset, hub_split)))
        source, unit = f"{hub_dataset}[{hub_split}]", "row"
    else:
        numbered, source, unit = read_jsonl(path, what), path, "line"
    examples, malformed = [], []
    for index, (number, row) in enumerate(numbered):
        example = to_example(row, tokenizer)
        if example is None:
            malformed.append(number)
            continue
        examples.append({"id": _row_id(row, index), **example})
    report_skipped(source, malformed, "not prompt/completion, messages or prompt/chosen/rejected",
                   unit)
    if not examples:
        raise UserError(f"{source} ({what}) has no usable row; give JSON lines with prompt/"
                        f"completion, messages, or prompt/chosen/rejected")
    return examples


def read_jsonl(path: str, what: str) -> list[tuple[int, object]]:
    """`(line number, parsed value)` per non-blank line; a line that is not JSON gives None."""
    text = read_text(path, what)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError:
            rows.append((number, None))
    return rows


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file in universal-newline mode (CRLF reads as LF)."""
    if not path:
        raise UserError(f"{what} is not set; pass --{what}=PATH")
    if not Path(path).is_file():
        raise UserError(f"{what}: file {path!r} does not exist; pass --{what}=PATH to an "
                        f"existing file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(_not_utf8(path, what)) from e


def _not_utf8(path: str, what: str) -> str:
    """Where a file stops being UTF-8 (the decoder's own offset is into a chunk of it)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        where = f"byte 0x{data[e.start]:02x} at line {line}, column {column}"
    return (f"{what}: {path} is not UTF-8 text ({where}); re-save it as UTF-8, e.g. iconv -f "
            f"latin1 -t utf-8 {path} > fixed")


def report_skipped(source: str, numbers: list[int], why: str, unit: str = "line") -> None:
    """One line: how many rows were skipped, the first few by line (or row) number, and why."""
    if numbers:
        shown = ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")
        print(f"{source}: skipped {len(numbers)} malformed row{'s' * (len(numbers) != 1)} "
              f"({unit}{'s' * (len(numbers) != 1)} {shown}: {why})")


def to_example(row, tokenizer) -> dict | None:
    """`{"prompt", "completion"[, "chosen", "rejected"]}`, or None for a malformed row."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return chat_example(row["messages"], tokenizer)
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        return None
    if "chosen" in row or "rejected" in row:
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not (_text(chosen) and _text(rejected)):
            return None
        return {"prompt": prompt, "completion": chosen, "chosen": chosen, "rejected": rejected}
    completion = row.get("completion")
    return {"prompt": prompt, "completion": completion} if _text(completion) else None


def chat_example(messages, tokenizer) -> dict | None:
    """The conversation before the last (assistant) turn, rendered with the generation prompt,
    is the prompt; what the full rendering adds to it is the completion."""
    if not (isinstance(messages, list) and len(messages) >= 2
            and all(isinstance(m, dict) and _text(m.get("role")) and isinstance(
                m.get("content"), str) for m in messages)
            and messages[-1]["role"] == "assistant" and messages[-1]["content"]):
        return None
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt = _render(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _render(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise UserError("the tokenizer's chat template does not render a conversation as its "
                        "earlier turns followed by the last one; give prompt/completion rows")
    return {"prompt": prompt, "completion": full[len(prompt):]}


def chat_prompt(prompt: str, tokenizer) -> str:
    """`prompt` as the user turn of the tokenizer's chat template, with the generation prompt
    after it (`config.data.chat_template`)."""
    text = _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                   instead="set config.data.chat_template=False")
    bos = getattr(getattr(tokenizer, "tokenizer", None), "bos_token", None)
    if bos and tokenizer.prefix_ids and text.startswith(bos):  # tokenizing adds it again
        text = text[len(bos):]
    return text


def _render(tokenizer, messages, add_generation_prompt: bool,
            instead: str = "give prompt/completion rows") -> str:
    if not hasattr(tokenizer, "apply_chat_template"):
        raise UserError(f"a chat template needs a Hugging Face tokenizer that has one; set "
                        f"config.model.tokenizer to one, or {instead}")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except ValueError as e:  # transformers: the tokenizer defines no chat template
        raise UserError(f"cannot render a chat ({first_line(e)}); use a tokenizer with a chat "
                        f"template, or {instead}") from e


def load_hub_rows(spec: str, split: str) -> list[dict]:
    """Rows of split `split` of hub dataset `spec` ("name" or "name:subset"); needs network (or
    the local cache) and the `datasets` package."""
    try:
        import datasets
    except ImportError as e:
        raise UserError("config.data.hub_dataset needs the `datasets` package; pip install "
                        "datasets, or give local files") from e
    name, _, subset = spec.partition(":")
    try:
        dataset = datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:  # datasets raises many types: unknown name/split, no network, ...
        raise UserError(f"cannot load hub dataset {spec!r} split {split!r} ({first_line(e)}); "
                        f"check the name and split, and that you are online") from e
    return [dict(row) for row in dataset]


def _text(value) -> bool:
    return isinstance(value, str) and bool(value)


def _row_id(row: dict, index: int):
    value = row.get("id", index)
    return value if isinstance(value, (str, int)) else index
