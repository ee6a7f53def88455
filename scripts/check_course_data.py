"""`python scripts/check_course_data.py DATA_DIR`: parse the CS224N course files the way the
paraphrase and sonnet tasks do, print their counts, and print the chrF of the dev prompts alone
(the 3-line prompts, no continuation) against the true dev sonnets: 24.77 on the course's files.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from jaxsftdpo import chrf
from jaxsftdpo.data import paraphrase, sonnets
from jaxsftdpo.errors import UserError

SONNET_FILES = ("sonnets.txt", "sonnets_held_out_dev.txt", "TRUE_sonnets_held_out_dev.txt",
                "sonnets_held_out.txt")


def check_quora(data_dir: Path) -> None:
    for path in sorted(data_dir.glob("quora-*.csv")):
        labelled = "test" not in path.name
        examples = paraphrase.read(str(path), labelled=labelled, what=path.name)
        labels = collections.Counter(e["label"] for e in examples) if labelled else {}
        print(f"{path.name}: {len(examples)} rows" +
              (f" ({labels[0]} labelled 0, {labels[1]} labelled 1)" if labelled else ""))


def check_sonnets(data_dir: Path) -> None:
    read = {name: sonnets.read(str(data_dir / name), name) for name in SONNET_FILES
            if (data_dir / name).is_file()}
    for name, items in read.items():
        lines = collections.Counter(len(s["text"].split("\n")) for s in items)
        print(f"{name}: {len(items)} sonnets, numbered {items[0]['id']}-{items[-1]['id']}, "
              f"lines per sonnet {dict(sorted(lines.items()))}")
    prompts, truth = read.get(SONNET_FILES[1]), read.get(SONNET_FILES[2])
    if prompts and truth:
        same = all(p["text"] == sonnets.prompt_of(t["text"]) for p, t in zip(prompts, truth))
        print(f"dev prompts are the first 3 lines of the true dev sonnets: {same}")
        score = chrf.corpus_chrf([p["text"] for p in prompts], [t["text"] for t in truth])
        print(f"chrF of the dev prompts alone vs the true dev sonnets: {score:.2f} "
              f"({chrf.signature()})")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    data_dir = Path(argv[1])
    try:
        if not data_dir.is_dir():
            raise UserError(f"{data_dir} is not a directory; give the course's data directory")
        check_quora(data_dir)
        check_sonnets(data_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
