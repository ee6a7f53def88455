"""Any user's data: JSON lines (or a Hugging Face hub dataset) for SFT and DPO, in TRL's formats.

A row is one of, as TRL's trainers read them (standard = strings, conversational = lists of
`{"role", "content"}` messages rendered by the tokenizer's chat template):
- language modelling: `{"text": str}` (every token trained) or `{"messages": [...]}` ending in
  an assistant turn (the last turn is the completion);
- prompt-completion: `{"prompt", "completion"}`, both strings or both message lists;
- preference: `{"prompt", "chosen", "rejected"}`, or with the prompt implicit (`{"chosen",
  "rejected"}` sharing a beginning, which becomes the prompt, as trl.extract_prompt does; also
  when a string `prompt` sits beside conversational chosen/rejected). A pair also serves SFT with
  `chosen` as the completion.
The chat template is applied once: a BOS it renders is dropped when the tokenizer adds one
anyway, and a completion whose turn the template closed with the eos token gets no second one.
An optional `id` names the row in per-example results. Rows of none of these shapes (bad JSON,
missing or empty fields) are skipped and counted, and so are pairs whose chosen equals rejected;
a source without a usable row is an error.
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
    examples, malformed, identical = [], [], []
    for index, (number, row) in enumerate(numbered):
        example = to_example(row, tokenizer)
        if _same_answers(row, example):
            identical.append(number)
        elif example is None:
            malformed.append(number)
        else:
            examples.append({"id": _row_id(row, index), **example})
    report_skipped(source, malformed, "not text, messages, prompt/completion or "
                   "[prompt/]chosen/rejected", unit)
    report_skipped(source, identical, "chosen equals rejected, nothing to prefer", unit,
                   kind="preference")
    if not examples:
        raise UserError(f"{source} ({what}) has no usable row; give JSON lines with text, "
                        f"messages, prompt/completion, or [prompt/]chosen/rejected")
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


def report_skipped(source: str, numbers: list[int], why: str, unit: str = "line",
                   kind: str = "malformed") -> None:
    """One line: how many rows were skipped, the first few by line (or row) number, and why."""
    if numbers:
        shown = ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")
        print(f"{source}: skipped {len(numbers)} {kind} row{'s' * (len(numbers) != 1)} "
              f"({unit}{'s' * (len(numbers) != 1)} {shown}: {why})")


def to_example(row, tokenizer) -> dict | None:
    """`{"prompt", "completion"[, "chosen", "rejected"][, "closed"]}`, or None for a malformed
    row; `closed`: the chat template ended the completion's turn with the eos token."""
    if not isinstance(row, dict):
        return None
    if "chosen" in row or "rejected" in row:
        return preference_example(row, tokenizer)
    if "messages" in row:
        return chat_example(row["messages"], tokenizer)
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is None and completion is None and _text(row.get("text")):
        return {"prompt": "", "completion": row["text"]}
    if _is_conversation(prompt) and _is_conversation(completion):
        return _completion(rendered_answers(tokenizer, prompt, [completion]))
    return {"prompt": prompt, "completion": completion} if (
        isinstance(prompt, str) and _text(completion)) else None


def preference_example(row: dict, tokenizer) -> dict | None:
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    conversational = _is_conversation(chosen) and _is_conversation(rejected)
    if not (conversational or (_text(chosen) and _text(rejected))):
        return None
    if prompt is None or _is_conversation(prompt) != conversational:
        prompt, chosen, rejected = shared_prompt(chosen, rejected)
    if conversational:
        rendered = rendered_answers(tokenizer, prompt, [chosen, rejected])
        if rendered is None:
            return None
        prompt, (chosen, rejected), closed = rendered
    elif not isinstance(prompt, str):
        return None
    if not (chosen and rejected):
        return None
    return {"prompt": prompt, "completion": chosen, "chosen": chosen, "rejected": rejected,
            **({"closed": True} if conversational and closed else {})}


def shared_prompt(chosen, rejected) -> tuple:
    """The implicit prompt of a pair: the longest common beginning of chosen and rejected
    (messages, or characters with a space before the difference left to the answers), as
    trl.extract_prompt takes it."""
    index = 0
    while index < min(len(chosen), len(rejected)) and chosen[index] == rejected[index]:
        index += 1
    if isinstance(chosen, str) and index and chosen[index - 1] == " ":
        index -= 1
    return chosen[:index], chosen[index:], rejected[index:]


def chat_example(messages, tokenizer) -> dict | None:
    """The conversation before the last (assistant) turn is the prompt; that turn, as the
    template renders it after the prompt, is the completion."""
    if not (_is_conversation(messages) and len(messages) >= 2
            and messages[-1]["role"] == "assistant" and messages[-1]["content"]):
        return None
    return _completion(rendered_answers(tokenizer, messages[:-1], [messages[-1:]]))


def _completion(rendered: tuple | None) -> dict | None:
    if rendered is None or not rendered[1][0]:
        return None
    prompt, (completion,), closed = rendered
    return {"prompt": prompt, "completion": completion, **({"closed": True} if closed else {})}


def rendered_answers(tokenizer, prompt: list, answers: list[list]) -> tuple | None:
    """`(prompt text, [answer text], closed)` of a conversational prompt and its answers, as
    TRL renders them: the prompt with the generation prompt (or continuing its last assistant
    message), each answer as what the whole conversation's rendering adds to it. `closed`: every
    answer ends with the eos token, so none gets another."""
    if not (prompt and _is_conversation(prompt) and all(map(_is_conversation, answers))):
        return None
    prompt = [_message(m) for m in prompt]
    continues = prompt[-1]["role"] == "assistant"
    text = _render(tokenizer, prompt, add_generation_prompt=not continues,
                   continue_final_message=continues)
    full = [_render(tokenizer, prompt + [_message(m) for m in a], add_generation_prompt=False)
            for a in answers]
    for whole in full:  # as TRL: templates that add a token after the generation prompt
        text = text[:next((i for i, (x, y) in enumerate(zip(text, whole)) if x != y),
                          min(len(text), len(whole)))]
    eos = _special(tokenizer, "eos_token")
    rendered = [whole[len(text):] for whole in full]
    return text, rendered, bool(eos) and all(r.rstrip().endswith(eos) for r in rendered)


def chat_prompt(prompt: str, tokenizer) -> str:
    """`prompt` as the user turn of the tokenizer's chat template, with the generation prompt
    after it (`config.data.chat_template`)."""
    return _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                   instead="set config.data.chat_template=False")


def _render(tokenizer, messages, add_generation_prompt: bool, continue_final_message=False,
            instead: str = "give string prompt/completion rows") -> str:
    """The template's text, without a leading BOS that tokenizing adds again."""
    if not hasattr(tokenizer, "apply_chat_template"):
        raise UserError(f"conversational data needs a Hugging Face tokenizer with a chat "
                        f"template; this one has none: set config.model.tokenizer to one, or "
                        f"{instead}")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
    except ValueError as e:  # transformers: the tokenizer defines no chat template
        raise UserError(f"cannot render a chat ({first_line(e)}); use a tokenizer with a chat "
                        f"template, or {instead}") from e
    bos = _special(tokenizer, "bos_token")
    if bos and tokenizer.prefix_ids and text.startswith(bos):
        text = text[len(bos):]
    return text


def _special(tokenizer, name: str) -> str | None:
    return getattr(getattr(tokenizer, "tokenizer", None), name, None)


def _is_conversation(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and _text(m.get("role"))
                    and isinstance(m.get("content"), str) for m in value))


def _message(m: dict) -> dict:
    return {"role": m["role"], "content": m["content"]}


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


def _same_answers(row, example) -> bool:
    """A pair with nothing to prefer: chosen equals rejected, as given or once rendered."""
    if example is not None:
        return "chosen" in example and example["chosen"] == example["rejected"]
    return (isinstance(row, dict) and row.get("chosen") == row.get("rejected")
            and (_text(row.get("chosen")) or _is_conversation(row.get("chosen"))))


def _text(value) -> bool:
    return isinstance(value, str) and bool(value)


def _row_id(row: dict, index: int):
    value = row.get("id", index)
    return value if isinstance(value, (str, int)) else index
