"""Quora Question Pairs as the CS224N default project reads, normalises and prompts them.

The course files are tab-separated despite `.csv`: a header `id, sentence1, sentence2,
is_duplicate` (no label column in the test file), an `id` holding a number, a space and a UUID,
labels written `0.0` / `1.0`, and standard CSV quoting. Rows with a missing field, an extra field
(e.g. a stray quote that swallowed a tab or the next lines) or a label other than 0 / 1 are
skipped and counted; the course drops bad labels silently.
"""

from __future__ import annotations

import csv
import io

from jaxsftdpo.data import jsonl
from jaxsftdpo.errors import UserError

ANSWERS = {1: "yes", 0: "no"}       # GPT-2 ids 8505 / 3919, no leading space
FIELDS = ("id", "sentence1", "sentence2")
LABEL = "is_duplicate"
SUBMISSION_HEADER = "id \t Predicted_Is_Paraphrase \n"
HUB_KEYS = {"question1": "sentence1", "question2": "sentence2", "label": LABEL, "idx": "id"}


def normalize(text: str) -> str:
    """Lower-case, a space before every `.`, `?`, `,` and `'`, whitespace collapsed."""
    for mark in ".?,'":
        text = text.replace(mark, " " + mark)
    return " ".join(text.lower().split())


def prompt(s1: str, s2: str) -> str:
    """The train/dev prompt; the closing quote after `s2` is missing in the course too."""
    return (f'Question 1: "{normalize(s1)}"\nQuestion 2: "{normalize(s2)}\n'
            f'Are these questions asking the same thing?\n')


def test_prompt(s1: str, s2: str) -> str:
    """The test-set prompt, worded differently in the course."""
    return f'Is "{normalize(s1)}" a paraphrase of "{normalize(s2)}"? Answer "yes" or "no": '


def read(path: str, *, labelled: bool = True, what: str = "config.data.train") -> list[dict]:
    """Examples `{"id", "prompt", "completion", "label"}` (test files: `{"id", "prompt"}`)."""
    reader = csv.DictReader(io.StringIO(jsonl.read_text(path, what), newline=""),
                            delimiter="\t")
    needed = FIELDS + ((LABEL,) if labelled else ())
    missing = [f for f in needed if f not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path} ({what}) has no column {', '.join(missing)} in its header "
                        f"{reader.fieldnames}; give a tab-separated file with the header "
                        f"{' <TAB> '.join(needed)}")
    # reader.line_num, read as each record comes, is the line the record ends on
    return _examples(((reader.line_num, r) for r in reader), labelled, path, what, "line")


def from_hub(rows: list[dict], *, source: str, what: str) -> list[dict]:
    """Labelled examples from hub rows named as the course (`sentence1`...) or as GLUE's QQP
    (`question1`, `question2`, `label`, `idx`)."""
    renamed = [{HUB_KEYS.get(k, k): v for k, v in row.items()} for row in rows]
    return _examples(enumerate(renamed), True, source, what, "row")


def _examples(numbered, labelled: bool, source: str, what: str, unit: str) -> list[dict]:
    """Examples of `(line or row number, record)` pairs; malformed ones reported by number."""
    examples, malformed = [], []
    for number, record in numbered:
        example = _example(record, labelled)
        if example is None:
            malformed.append(number)
        else:
            examples.append(example)
    jsonl.report_skipped(source, malformed, "a missing or extra field, or a label not 0/1",
                         unit)
    if not examples:
        raise UserError(f"{source} ({what}) has no usable row; give the course's tab-separated "
                        f"file with rows id <TAB> sentence1 <TAB> sentence2"
                        f"{' <TAB> is_duplicate' if labelled else ''}")
    return examples


def _example(record: dict, labelled: bool) -> dict | None:
    if None in record or any(not isinstance(record.get(f), (str, int)) for f in FIELDS):
        return None  # DictReader: a None key holds extra fields, a None value a missing one
    s1, s2 = str(record["sentence1"]), str(record["sentence2"])
    example = {"id": str(record["id"]).lower().strip()}
    if not labelled:
        return {**example, "prompt": test_prompt(s1, s2)}
    label = _label(record.get(LABEL))
    if label is None:
        return None
    return {**example, "prompt": prompt(s1, s2), "completion": ANSWERS[label], "label": label}


def _label(value) -> int | None:
    try:
        label = int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return label if label in ANSWERS else None


def write_submission(path, ids: list[str], token_ids: list[int]) -> None:
    """The course's submission file: its header, then `{id}, {token id} ` per line."""
    with open(path, "w") as f:
        f.write(SUBMISSION_HEADER)
        for example_id, token in zip(ids, token_ids):
            f.write(f"{example_id}, {token} \n")
