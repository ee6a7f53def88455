"""Tasks: where a run's examples come from and how its model is scored.

A task gives SFT examples (`sft_examples()`: `prompt`/`completion` dicts), preference pairs
(`preference_pairs(policy)`: `prompt`/`chosen`/`rejected` dicts; `policy` is the model at the
hand-off, for tasks whose rejected answers are sampled from it, which say so with
`PAIRS_NEED_POLICY = True`) and `evaluate(policy, batch_size) -> Evaluation`. `policy` is a
`jaxsftdpo.policy.Policy`. Cloze tasks (the quickstart's yes/no task, the study's paraphrase
task) predict the answer whose first token has the larger logit after the prompt, and report
accuracy and macro F1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

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


class Evaluation(NamedTuple):
    scores: dict          # name -> float, e.g. accuracy and f1, or chrf
    examples: list        # one JSON-able dict per dev example (id, prediction, label, correct...)


def write_examples(evaluation: Evaluation, path: Path) -> None:
    """The per-example results of an evaluation as JSON lines (the study bootstraps over them)."""
    with open(path, "w") as f:
        for row in evaluation.examples:
            f.write(json.dumps(row) + "\n")


class ClozeTask:
    """Examples whose completion is one of a few answers, read from one token's logits."""

    name = "cloze"
    PAIRS_NEED_POLICY = False

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

    def sft_examples(self) -> list[dict]:
        return self.train

    def preference_pairs(self, policy=None) -> list[dict]:
        return [{"prompt": e["prompt"], "chosen": self.answers[e["label"]],
                 "rejected": self.answers[self._other(e["label"])]} for e in self.train]

    def _other(self, label: int) -> int:
        return next(k for k in self.labels if k != label)

    def evaluate(self, policy, batch_size: int) -> Evaluation:
        """Predict the answer whose first token has the larger logit after each dev prompt."""
        if not self.dev_prompts:
            return Evaluation({}, [])
        logits = policy.prompt_logits(self.dev_prompts, batch_size)[:, self.answer_ids]
        predicted = np.asarray(self.labels)[np.argmax(logits, axis=-1)]
        examples = [{"id": self.dev[i].get("id", i), "prediction": int(p),
                     "label": int(g), "correct": int(p == g)}
                    for i, (p, g) in enumerate(zip(predicted, self.dev_labels))]
        return Evaluation(accuracy_and_macro_f1(predicted, self.dev_labels), examples)

    def write_predictions(self, evaluation: Evaluation, workdir: Path) -> None:
        write_examples(evaluation, Path(workdir) / "dev_predictions.jsonl")


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
