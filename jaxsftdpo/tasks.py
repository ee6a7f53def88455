"""Tasks: where a run's examples come from and how its model is scored.

A task gives SFT examples (`sft_examples()`: `prompt`/`completion` dicts), preference pairs
(`preference_pairs(policy)`: `prompt`/`chosen`/`rejected` dicts; `policy` is the model at the
hand-off, for tasks whose rejected answers are sampled from it, which say so with
`PAIRS_NEED_POLICY = True`) and `evaluate(policy, batch_size) -> Evaluation`; `APPEND_EOS`
says whether training sequences end with the end-of-text token. `policy` is a
`jaxsftdpo.policy.Policy`. Cloze tasks (the quickstart's yes/no task, the study's paraphrase
task) predict the answer whose first token has the larger logit after the prompt, and report
accuracy and macro F1. The sonnet task samples continuations and reports chrF; the JSONL task
(any user's data) reports the dev completions' NLL and how often chosen beats rejected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxsftdpo import chrf
from jaxsftdpo.data import batching, jsonl, paraphrase, sonnets, synthetic
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
    APPEND_EOS = False    # the completion is the answer alone; eos after it would add a target
                          # that DPO could push apart instead of the answer

    def __init__(self, train: list[dict], dev: list[dict], answers: dict[int, str], tokenizer,
                 max_length: int, chat_template: bool = False, balance: str = "none",
                 seed: int = 0):
        if not train:
            raise UserError(f"the {self.name} training data has no usable example; check "
                            f"config.data.train")
        self.chat_template = chat_template
        train, dev = self.rendered(train, tokenizer), self.rendered(dev, tokenizer)
        balanced = class_balanced(train, seed) if balance != "none" else train
        self.train = balanced if balance == "all" else train
        self.pair_examples = balanced
        self.dev, self.tokenizer = dev, tokenizer
        self.labels = sorted(answers)
        self.answer_ids = batching.first_token_ids(tokenizer, [answers[k] for k in self.labels])
        self.answers = answers
        self.dev_prompts = _prompt_items([e["prompt"] for e in dev], tokenizer, max_length,
                                         "dev")
        self.dev_labels = np.array([e["label"] for e in dev])
        if len(dev) and len(set(self.dev_labels.tolist())) < 2:
            raise UserError(f"the {self.name} dev data's {len(dev)} examples are all answered "
                            f"{answers[int(self.dev_labels[0])]!r}: macro F1 is undefined with "
                            f"one class; give dev data with both answers (a larger "
                            f"data.dev_limit or data.dev_from_train, or another dev file)")

    def rendered(self, examples: list[dict], tokenizer) -> list[dict]:
        """The examples with their prompts in the chat template, with `data.chat_template`."""
        if not self.chat_template:
            return examples
        return [{**e, "prompt": jsonl.chat_prompt(e["prompt"], tokenizer)} for e in examples]

    def sft_examples(self) -> list[dict]:
        return self.train

    def preference_pairs(self, policy=None) -> list[dict]:
        return self._pairs(self.pair_examples)

    def dev_preference_pairs(self) -> list[dict]:
        """Held-out pairs for the DPO metrics of `evaluate`."""
        return self._pairs(self.dev)

    def _pairs(self, examples: list[dict]) -> list[dict]:
        """Chosen = the correct answer, rejected = each other answer."""
        return [{"prompt": e["prompt"], "chosen": self.answers[e["label"]],
                 "rejected": self.answers[other]}
                for e in examples for other in self.labels if other != e["label"]]

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

    def write_predictions(self, evaluation: Evaluation, workdir: Path, policy,
                          batch_size: int) -> None:
        """The evaluation's per-example results; `policy` (the one evaluated) predicts what
        else a task writes."""
        write_examples(evaluation, Path(workdir) / "dev_predictions.jsonl")


def _prompt_items(prompts: list[str], tokenizer, max_length: int, what: str) -> list:
    """Tokenized prompts, those cut from the left to fit `max_length` counted in one line."""
    tokenized = batching.tokenize_prompts(prompts, tokenizer, max_length)
    if tokenized.truncated:
        print(f"{what} data: {tokenized.truncated} of {len(prompts)} prompts had their start cut "
              f"to fit max_length={max_length}")
    return tokenized.items


class YesNoTask(ClozeTask):
    """The quickstart's synthetic task (jaxsftdpo.data.synthetic): no files, no network."""

    name = "yes_no"

    def __init__(self, data_config, tokenizer, max_length: int, seed: int):
        train, dev = synthetic.make_yes_no_task(data_config.n_train, data_config.n_dev, seed)
        super().__init__(train, dev, synthetic.LABEL_COMPLETIONS, tokenizer, max_length,
                         data_config.chat_template, data_config.balance, seed)


def subsample(examples: list, scale: float, seed: int) -> list:
    """A seeded `scale` fraction of `examples`, in their original order (the study's data-scale
    axis: runs with the same seed train on the same subset)."""
    if not 0.0 < scale <= 1.0:
        raise UserError(f"config.data.scale={scale}; use a fraction in (0, 1]")
    if scale == 1.0:
        return examples
    keep = max(1, round(scale * len(examples)))
    return [examples[i] for i in np.sort(np.random.default_rng(seed).permutation(
        len(examples))[:keep])]


def class_balanced(examples: list[dict], seed: int) -> list[dict]:
    """A seeded subset of labelled `examples` holding as many of each label as the rarest
    label has, in their original order."""
    by_label: dict = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e["label"], []).append(i)
    if len(by_label) < 2:
        raise UserError(f"config.data.balance: the training data has one label only "
                        f"({next(iter(by_label))}); nothing to balance, set it to none")
    rng = np.random.default_rng(seed)
    fewest = min(map(len, by_label.values()))
    keep = np.sort(np.concatenate([rng.permutation(idx)[:fewest] for idx in by_label.values()]))
    return [examples[i] for i in keep]


class ParaphraseTask(ClozeTask):
    """Quora paraphrase detection as in the course (jaxsftdpo.data.paraphrase), from the
    course's files or a hub dataset. Besides `dev_predictions.jsonl`, writes the course's
    submission files `para-dev-output.csv` and, with `data.test`, `para-test-output.csv`."""

    name = "paraphrase"

    def __init__(self, data_config, tokenizer, max_length: int, seed: int):
        train, dev = _paraphrase_splits(data_config)
        if data_config.dev_limit > 0:
            dev = dev[:data_config.dev_limit]
        super().__init__(subsample(train, data_config.scale, seed), dev, paraphrase.ANSWERS,
                         tokenizer, max_length, data_config.chat_template, data_config.balance,
                         seed)
        self.test = self.rendered(paraphrase.read(data_config.test, labelled=False,
                                                  what="config.data.test")
                                  if data_config.test else [], tokenizer)
        self.max_length = max_length

    def predict(self, policy, prompts: list[str], batch_size: int) -> np.ndarray:
        """The predicted answer's token id after each prompt (GPT-2: 8505 yes, 3919 no)."""
        tokenized = _prompt_items(prompts, self.tokenizer, self.max_length, "test")
        logits = policy.prompt_logits(tokenized, batch_size)[:, self.answer_ids]
        return self.answer_ids[np.argmax(logits, axis=-1)]

    def write_predictions(self, evaluation: Evaluation, workdir: Path, policy,
                          batch_size: int) -> None:
        super().write_predictions(evaluation, workdir, policy, batch_size)
        workdir = Path(workdir)
        if evaluation.examples:
            tokens = [int(self.answer_ids[self.labels.index(e["prediction"])])
                      for e in evaluation.examples]
            paraphrase.write_submission(workdir / "para-dev-output.csv",
                                        [e["id"] for e in evaluation.examples], tokens)
        if self.test:
            tokens = self.predict(policy, [e["prompt"] for e in self.test], batch_size)
            paraphrase.write_submission(workdir / "para-test-output.csv",
                                        [e["id"] for e in self.test], tokens.tolist())


def _paraphrase_splits(data_config) -> tuple[list[dict], list[dict]]:
    """`(train, dev)`: the training and dev files (or hub splits); with `data.dev_from_train`
    = N, the training data but its last N examples, and those."""
    train, dev = _paraphrase_files(data_config)
    held_out = data_config.dev_from_train
    if held_out:
        if held_out >= len(train):
            raise UserError(f"config.data.dev_from_train={held_out} leaves nothing to train on: "
                            f"the training data has {len(train)} usable examples")
        return train[:-held_out], train[-held_out:]
    return train, dev


def _paraphrase_files(data_config) -> tuple[list[dict], list[dict]]:
    hub = data_config.hub_dataset
    if hub:
        def split(name, what):
            return paraphrase.from_hub(jsonl.load_hub_rows(hub, name), source=f"{hub}[{name}]",
                                       what=what)
        return (split(data_config.hub_train_split, "config.data.hub_train_split"),
                split(data_config.hub_dev_split, "config.data.hub_dev_split")
                if data_config.hub_dev_split else [])
    return (paraphrase.read(data_config.train, what="config.data.train"),
            paraphrase.read(data_config.dev, what="config.data.dev")
            if data_config.dev and not data_config.dev_from_train else [])


PAIRINGS = ("one_sample", "worst_of_k")


class SonnetTask:
    """Sonnet continuation as in the course (jaxsftdpo.data.sonnets).

    SFT on whole training sonnets. Evaluation samples a continuation of each dev prompt (its
    first 3 lines) once per seed of `data.eval_seeds` and scores prompt + continuation with corpus
    chrF against `data.dev_references`, read back through the course's generated-file format:
    `chrf` (mean over seeds), `chrf_std` and `chrf_seed{s}`. DPO pairs: chosen = the true
    continuation of a training sonnet's first 3 lines, rejected = a continuation sampled from
    the hand-off policy (`one_sample`) or the lowest-chrF one of `pairing_k` (`worst_of_k`).
    """

    name = "sonnets"
    PAIRS_NEED_POLICY = True
    APPEND_EOS = True

    def __init__(self, data_config, tokenizer, max_length: int, seed: int):
        self.train = subsample(sonnets.read(data_config.train, "config.data.train"),
                               data_config.scale, seed)
        self.dev = _sonnets_or_none(data_config.dev, "config.data.dev")
        self.references = _sonnets_or_none(data_config.dev_references,
                                           "config.data.dev_references")
        if self.dev and not self.references:
            raise UserError("config.data.dev_references is not set; pass the full dev sonnets "
                            "(e.g. TRUE_sonnets_held_out_dev.txt) that chrF scores against")
        self.test = _sonnets_or_none(data_config.test, "config.data.test")
        self.sampling = dict(max_new_tokens=data_config.max_new_tokens,
                             temperature=data_config.temperature, top_p=data_config.top_p)
        self.seeds = tuple(int(s) for s in data_config.eval_seeds)
        self.temperatures = tuple(float(t) for t in data_config.eval_temperatures)
        if not self.seeds:
            raise UserError("config.data.eval_seeds is empty; give at least one, e.g. (0,)")
        if data_config.pairing not in PAIRINGS:
            raise UserError(f"config.data.pairing={data_config.pairing!r}; use one of {PAIRINGS}")
        if data_config.pairing_k < 1:
            raise UserError(f"config.data.pairing_k={data_config.pairing_k}; use at least 1")
        self.k = data_config.pairing_k if data_config.pairing == "worst_of_k" else 1
        self.seed, self.batch_size = seed, data_config.eval_batch_size

    def sft_examples(self) -> list[dict]:
        return [{"prompt": "", "completion": s["text"]} for s in self.train]

    def preference_pairs(self, policy=None) -> list[dict]:
        """Pairs for the training sonnets longer than their prompt; none without a policy."""
        if policy is None:
            return []
        texts = [s["text"] for s in self.train if sonnets.continuation_of(s["text"])]
        prompts = [sonnets.prompt_of(t) for t in texts]
        samples = zip(*(policy.generate(prompts, seed=self.seed * self.k + j,
                                        batch_size=self.batch_size, **self.sampling)
                        for j in range(self.k)))
        return [{"prompt": p, "chosen": sonnets.continuation_of(t),
                 "rejected": min(options, key=lambda c: chrf.sentence_chrf(p + c, t))}
                for p, t, options in zip(prompts, texts, samples)]

    def complete(self, policy, prompts: list[str], seed: int, batch_size: int,
                 temperature: float | None = None) -> list[str]:
        """Each prompt followed by its sampled continuation (at `data.temperature`, or at
        `temperature`)."""
        sampling = {**self.sampling, **({} if temperature is None else
                                        {"temperature": temperature})}
        continuations = policy.generate(prompts, seed=seed, batch_size=batch_size, **sampling)
        return [p + c for p, c in zip(prompts, continuations)]

    def evaluate(self, policy, batch_size: int) -> Evaluation:
        """`chrf` (mean over the seeds), `chrf_std` and `chrf_seed{s}` at `data.temperature`;
        with `data.eval_temperatures`, `chrf_T{t}` (mean over the seeds) at each of them."""
        if not self.dev:
            return Evaluation({}, [])
        prompts = [s["text"] for s in self.dev]
        references = [s["text"] for s in self.references]

        def chrf_per_seed(temperature=None):
            generated = [self.complete(policy, prompts, seed, batch_size, temperature)
                         for seed in self.seeds]
            return generated, [chrf.corpus_chrf(sonnets.parse_generated(
                sonnets.format_generated(texts)), references) for texts in generated]

        generated, per_seed = chrf_per_seed()
        scores = {"chrf": float(np.mean(per_seed)),
                  "chrf_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                  **{f"chrf_seed{s}": v for s, v in zip(self.seeds, per_seed)}}
        for t in self.temperatures:
            same = t == self.sampling["temperature"]
            scores[f"chrf_T{t:g}"] = (scores["chrf"] if same
                                      else float(np.mean(chrf_per_seed(t)[1])))
        examples = [{"id": sonnet["id"], "position": i, "seeds": list(self.seeds),
                     "generated": [texts[i] for texts in generated],
                     "chrf": [chrf.sentence_chrf(texts[i], reference) for texts in generated]}
                    for i, (sonnet, reference) in enumerate(zip(self.dev, references))]
        return Evaluation(scores, examples)

    def write_predictions(self, evaluation: Evaluation, workdir: Path, policy,
                          batch_size: int) -> None:
        """`dev_predictions.jsonl`, `generated_sonnets_dev_seed{s}.txt` per seed and, with
        `data.test`, `generated_sonnets_test.txt` (first seed), in the course's format."""
        workdir = Path(workdir)
        write_examples(evaluation, workdir / "dev_predictions.jsonl")
        for j, seed in enumerate(self.seeds if evaluation.examples else ()):
            (workdir / f"generated_sonnets_dev_seed{seed}.txt").write_text(
                sonnets.format_generated([e["generated"][j] for e in evaluation.examples]))
        if self.test:
            texts = self.complete(policy, [s["text"] for s in self.test], self.seeds[0],
                                  batch_size)
            (workdir / "generated_sonnets_test.txt").write_text(sonnets.format_generated(texts))


def _sonnets_or_none(path: str, what: str) -> list[dict]:
    return sonnets.read(path, what) if path else []


class JsonlTask:
    """Any user's data (jaxsftdpo.data.jsonl): JSON lines or a hub dataset.

    Every row serves SFT (completion-only loss); rows with `chosen`/`rejected` also serve DPO.
    Dev scores: `nll`, the mean negative log-likelihood per completion token, and, when dev has
    preference rows, `pair_accuracy`: how often the policy gives chosen the larger log-prob.
    """

    name = "jsonl"
    APPEND_EOS = True
    PAIRS_NEED_POLICY = False

    def __init__(self, data_config, tokenizer, max_length: int, seed: int):
        hub = data_config.hub_dataset

        def load(path, split, what):
            return jsonl.load(path, tokenizer, hub_dataset=hub, hub_split=split, what=what)

        self.train = subsample(load(data_config.train, data_config.hub_train_split,
                                    "config.data.train"), data_config.scale, seed)
        has_dev = data_config.hub_dev_split if hub else data_config.dev
        dev = load(data_config.dev, data_config.hub_dev_split, "config.data.dev") \
            if has_dev else []
        self.dev = _tokenize_dev(dev, tokenizer, max_length)

    def sft_examples(self) -> list[dict]:
        return self.train

    def preference_pairs(self, policy=None) -> list[dict]:
        return [e for e in self.train if "chosen" in e]

    def evaluate(self, policy, batch_size: int) -> Evaluation:
        if not self.dev:
            return Evaluation({}, [])
        logps, counts = completion_logps(policy, [d["sequence"] for d in self.dev], batch_size)
        scores = {"nll": float(-logps.sum() / max(counts.sum(), 1))}
        examples = [{"id": d["id"], "nll": float(-lp / max(n, 1))}
                    for d, lp, n in zip(self.dev, logps, counts)]
        with_pairs = [i for i, d in enumerate(self.dev) if d["pair"] is not None]
        if with_pairs:
            chosen, _ = completion_logps(policy, [self.dev[i]["pair"].chosen
                                                  for i in with_pairs], batch_size)
            rejected, _ = completion_logps(policy, [self.dev[i]["pair"].rejected
                                                    for i in with_pairs], batch_size)
            scores["pair_accuracy"] = float(np.mean(chosen > rejected))
            for i, c, r in zip(with_pairs, chosen, rejected):
                examples[i].update(logp_chosen=float(c), logp_rejected=float(r),
                                   correct=int(c > r))
        return Evaluation(scores, examples)

    def write_predictions(self, evaluation: Evaluation, workdir: Path, policy,
                          batch_size: int) -> None:
        """The evaluation's per-example results; `policy` (the one evaluated) predicts what
        else a task writes."""
        write_examples(evaluation, Path(workdir) / "dev_predictions.jsonl")


def _tokenize_dev(examples: list[dict], tokenizer, max_length: int) -> list[dict]:
    """`{"id", "sequence", "pair"}` per dev example that fits `max_length` (prompts cut from the
    left as in training); the rest are left out with a count."""
    kept, left_out = [], 0
    for example in examples:
        try:
            sequence = batching.tokenize_sft([example], tokenizer, max_length).items[0]
            pair = (batching.tokenize_preferences([example], tokenizer, max_length).items[0]
                    if "chosen" in example else None)
        except UserError:  # its completion alone does not fit
            left_out += 1
            continue
        kept.append({"id": example["id"], "sequence": sequence, "pair": pair})
    if left_out:
        print(f"dev data: left out {left_out} examples whose completion does not fit "
              f"max_length={max_length}")
    return kept


def completion_logps(policy, sequences: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probs of `batching.Sequence`s under `policy`, and their token counts
    (the first token, which has no logit before it, is not counted)."""
    counts = np.array([s.loss_mask[1:].sum() for s in sequences], np.int64)
    return policy.sequence_logps(sequences, batch_size), counts


TASKS = {task.name: task for task in (YesNoTask, ParaphraseTask, SonnetTask, JsonlTask)}


def make_task(data_config, tokenizer, max_length: int, seed: int):
    if data_config.task not in TASKS:
        raise UserError(f"config.data.task={data_config.task!r} is not a known task; use one of "
                        f"{sorted(TASKS)}")
    return TASKS[data_config.task](data_config, tokenizer, max_length, seed)
