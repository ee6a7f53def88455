"""The quickstart's task, generated here so the quickstart needs no download.

Tiny "reviews" of five words, each word positive or negative; the question is whether the
review is positive (more positive than negative words). As in the study's paraphrase task the
answer is one token (`y` or `n`), read from its logits after the prompt. Reviews with four
or five words of one kind are easy; three against two are the hard cases that separate a
well-trained model from a rough one. (Tasks that compare two halves of the prompt, closer to
paraphrase detection, leave a two-layer byte-level model at chance for thousands of steps: the
two halves look alike to attention until position-specific heads form.)
"""

from __future__ import annotations

import numpy as np

POSITIVE = ("good", "great", "nice", "fun", "love")
NEGATIVE = ("bad", "awful", "poor", "dull", "hate")
WORDS_PER_REVIEW = 7
LABEL_COMPLETIONS = {1: "y", 0: "n"}   # one byte each: the answer is one token, as in the study


def make_yes_no_task(n_train: int, n_dev: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`(train, dev)`, lists of `{"prompt", "completion", "label"}` with labels balanced in each.

    The same seed gives the same examples; no prompt appears twice, so dev is unseen in train.
    """
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    return (_balanced_examples(n_train, rng, seen), _balanced_examples(n_dev, rng, seen))


def format_prompt(words: list[str]) -> str:
    return f"Review: {' '.join(words)}\nGood? "


def _balanced_examples(n: int, rng: np.random.Generator, seen: set[str]) -> list[dict]:
    words = POSITIVE + NEGATIVE
    examples = []
    for label in rng.permutation([1] * (n // 2) + [0] * (n - n // 2)):
        while True:
            chosen = rng.integers(len(words), size=WORDS_PER_REVIEW)
            positive = int(np.sum(chosen < len(POSITIVE)) > WORDS_PER_REVIEW // 2)
            prompt = format_prompt([words[i] for i in chosen])
            if positive == label and prompt not in seen:
                break
        seen.add(prompt)
        examples.append({"prompt": prompt, "completion": LABEL_COMPLETIONS[int(label)],
                         "label": int(label)})
    return examples
