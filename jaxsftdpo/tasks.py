"""Tasks: where a run's examples come from and how its model is scored.

A task gives SFT examples (`prompt`/`completion`), preference pairs (`prompt`/`chosen`/
`rejected`) and `evaluate(logits_fn)`. Cloze tasks (the quickstart's yes/no task; the study's
paraphrase task follows the same shape) predict the answer whose first token has the larger
logit after the prompt, and report accuracy and macro F1.
"""

from __future__ import annotations

import numpy as np

from jaxsftdpo.data import batching, synthetic
from jaxsftdpo.errors import UserError


def accuracy_and_macro_f1(predicted: np.ndarray, gold: np.ndarray) -> dict:
    """Accuracy and the unweighted mean of the per-class F1 over the classes present."""
    predicted, gold = np.asarray(predicted), np.asarray(gold)
    f1s = []
    for cls in np.union1d(predicted, gold):
        tp = np.sum((predicted == cls) & (gold == cls))
        fp = np.sum((predicted == cls) & (gold != cls))
        fn = np.sum((predicted != cls) & (gold == cls))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predicted == gold)), "f1": float(np.mean(f1s))}


class ClozeTask:
    """Examples whose completion is one of a few answers, read from one token's logits."""

    name = "cloze"

    def __init__(self, train: list[dict], dev: list[dict], answers: dict[int, str], tokenizer,
                 max_length: int):
        if not train:
            raise UserError(f"the {self.name} training data has no usable example; check "
                            f"config.data.train")
        self.train, self.dev, self.tokenizer = train, dev, tokenizer
        self.labels = sorted(answers)
        self.answer_ids = batching.first_token_ids(tokenizer, [answers[k] for k in self.labels])
        self.answers = answers
        prompts = batching.tokenize_prompts([e["prompt"] for e in dev], tokenizer, max_length)
        self.dev_prompts = prompts.items
        self.dev_labels = np.array([e["label"] for e in dev])
        self.buckets = batching.default_buckets(max_length)

    def sft_examples(self) -> list[dict]:
        return self.train

    def preference_pairs(self) -> list[dict]:
        return [{"prompt": e["prompt"], "chosen": self.answers[e["label"]],
                 "rejected": self.answers[self._other(e["label"])]} for e in self.train]

    def _other(self, label: int) -> int:
        return next(k for k in self.labels if k != label)

    def evaluate(self, logits_fn, batch_size: int) -> dict:
        """`logits_fn(batch) -> [B, V]` logits at each row's last prompt token."""
        if not self.dev_prompts:
            return {}
        predicted = []
        for start in range(0, len(self.dev_prompts), batch_size):
            rows = self.dev_prompts[start:start + batch_size]
            batch = batching.prompt_batch(rows, batch_size, self.tokenizer.pad_token_id,
                                          self.buckets, side="left")
            logits = np.asarray(logits_fn(batch))[:len(rows)]
            predicted.append(np.asarray(self.labels)[
                np.argmax(logits[:, self.answer_ids], axis=-1)])
        return accuracy_and_macro_f1(np.concatenate(predicted), self.dev_labels)


class YesNoTask(ClozeTask):
    """The quickstart's synthetic task (jaxsftdpo.data.synthetic): no files, no network."""

    name = "yes_no"

    def __init__(self, data_config, tokenizer, max_length: int, seed: int):
        train, dev = synthetic.make_yes_no_task(data_config.n_train, data_config.n_dev, seed)
        super().__init__(train, dev, synthetic.LABEL_COMPLETIONS, tokenizer, max_length)


TASKS = {YesNoTask.name: YesNoTask}


def make_task(data_config, tokenizer, max_length: int, seed: int):
    if data_config.task not in TASKS:
        raise UserError(f"config.data.task={data_config.task!r} is not a known task; use one of "
                        f"{sorted(TASKS)}")
    return TASKS[data_config.task](data_config, tokenizer, max_length, seed)
