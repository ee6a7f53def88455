"""The quickstart's task, generated here so the quickstart needs no download.

A yes/no task shaped like the study's paraphrase detection: the prompt shows two short "questions"
and asks whether they are the same; they are (completion `yes`) when the second repeats the
first, and are not (`no`) when one of its words was replaced by another word of the vocabulary,
so the answer needs a position-by-position comparison of the two questions, the kind of
copy-and-compare attention a two-layer model learns in a few hundred steps. The prompt ends in a newline and the completions start with
different bytes, so the answer is read from the logits of one token, as in the study.
"""

from __future__ import annotations

import numpy as np

WORDS = ("cat", "dog", "sun", "map", "red", "big", "owl", "kit", "tea", "jam", "pen", "fig")
WORDS_PER_QUESTION = 3
YES, NO = "yes", "no"
LABEL_COMPLETIONS = {1: YES, 0: NO}


def make_yes_no_task(n_train: int, n_dev: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`(train, dev)`, lists of `{"prompt", "completion", "label"}` with labels balanced in each.

    The same seed gives the same examples; no prompt appears twice, so dev is unseen in train.
    """
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    return (_balanced_examples(n_train, rng, seen), _balanced_examples(n_dev, rng, seen))


def to_preference_pairs(examples: list[dict]) -> list[dict]:
    """`{"prompt", "chosen", "rejected"}`: chosen is the correct answer, rejected the other."""
    return [{"prompt": e["prompt"], "chosen": LABEL_COMPLETIONS[e["label"]],
             "rejected": LABEL_COMPLETIONS[1 - e["label"]]} for e in examples]


def format_prompt(first: list[str], second: list[str]) -> str:
    return f"Q1: {' '.join(first)}?\nQ2: {' '.join(second)}?\nSame?\n"


def _balanced_examples(n: int, rng: np.random.Generator, seen: set[str]) -> list[dict]:
    labels = rng.permutation([1] * (n // 2) + [0] * (n - n // 2))
    examples = []
    for label in labels:
        while (prompt := _prompt(int(label), rng)) in seen:
            pass
        seen.add(prompt)
        examples.append({"prompt": prompt, "completion": LABEL_COMPLETIONS[int(label)],
                         "label": int(label)})
    return examples


def _prompt(label: int, rng: np.random.Generator) -> str:
    chosen = rng.choice(len(WORDS), size=WORDS_PER_QUESTION + 1, replace=False)
    first = [WORDS[i] for i in chosen[:-1]]
    second = list(first)
    if label == 0:
        second[rng.integers(WORDS_PER_QUESTION)] = WORDS[chosen[-1]]
    return format_prompt(first, second)
