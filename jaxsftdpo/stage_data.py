"""The data each stage of a run trains on, tokenized and checked before anything is written.

An SFT stage trains on the task's sequences, a preference stage (dpo, orpo, simpo) on its
preference pairs; a preference stage whose pairs the task samples from the policy (the sonnets'
rejected continuations) gets them at the hand-off (`policy_pairs`), written to the workdir once
so that a resumed run trains on the very same pairs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from jaxsftdpo import sharding
from jaxsftdpo.config import PREFERENCE_KINDS
from jaxsftdpo.data import batching
from jaxsftdpo.errors import UserError
from jaxsftdpo.reporting import write_atomically


@dataclasses.dataclass
class StageData:
    items: list          # per stage: tokenized sequences or pairs; None until sampled
    notes: list[str]     # what was cut or dropped, not yet reported

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


def tokenize_stages(run) -> StageData:
    """Every stage's data for `run` (a `runs.Run` with its task), batch sizes checked against
    the mesh and the data."""
    config, task = run.config, run.task
    data, tokenized = StageData([], []), {}  # "sft" sequences, "preference" pairs: once each
    for i, stage in enumerate(config.stages):
        where = f"config.stages[{i}] ({stage.kind})"
        sharding.check_batch_size(stage.batch_size // stage.grad_accum, run.mesh,
                                  f"{where} micro-batch (batch_size / grad_accum)")
        if stage.batch_size % stage.grad_accum:
            raise UserError(f"{where}: batch_size {stage.batch_size} is not divisible by "
                            f"grad_accum {stage.grad_accum}")
        pairs = stage.kind in PREFERENCE_KINDS
        if pairs and task.PAIRS_NEED_POLICY:
            data.items.append(None)  # sampled from the policy at the hand-off
            continue
        examples = "preference" if pairs else "sft"
        if examples not in tokenized:
            tokenized[examples] = _tokenize(run, examples, where, data.notes)
        check_enough(tokenized[examples], stage, where)
        data.items.append(tokenized[examples])
    return data


def _tokenize(run, examples: str, where: str, notes: list) -> list:
    """The task's `examples`, "sft" (sequences) or "preference" (pairs), tokenized."""
    strict, task = not run.config.data.truncate, run.task
    if examples == "sft":
        tokenized = batching.tokenize_sft(task.sft_examples(), run.tokenizer, run.max_length,
                                          strict=strict, append_eos=task.APPEND_EOS)
    else:
        pairs = task.preference_pairs()
        if not pairs:
            raise UserError(f"{where} needs preference pairs but task "
                            f"{run.config.data.task!r} gave none; provide prompt/chosen/"
                            f"rejected data or drop the preference stage")
        tokenized = batching.tokenize_preferences(pairs, run.tokenizer, run.max_length,
                                                  strict=strict, append_eos=task.APPEND_EOS)
    if tokenized.truncated or tokenized.dropped:
        notes.append(f"{examples} data: {tokenized.truncated} examples had their prompt cut "
                     f"from the left, {tokenized.dropped} were dropped (longer than "
                     f"max_length={run.max_length})")
    return tokenized.items


def check_enough(items, stage, where: str) -> None:
    if batching.num_batches(len(items), stage.batch_size) == 0:
        raise UserError(f"{where}: {len(items)} examples are fewer than batch_size "
                        f"{stage.batch_size}; lower the batch size or add data")


def policy_pairs(run, data: StageData, stage_idx: int, workdir: Path) -> list:
    """The tokenized pairs of preference stage `stage_idx` whose rejected side the task samples
    from the current policy (`run.trainable`), read back from the workdir when a run before this
    one sampled them."""
    path = Path(workdir) / f"pairs_stage{stage_idx + 1}.jsonl"
    if path.exists():
        pairs = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        pairs = run.task.preference_pairs(run.policy())
        if jax.process_index() == 0:
            write_atomically(path, "".join(json.dumps(p) + "\n" for p in pairs))
    stage = run.config.stages[stage_idx]
    where = f"config.stages[{stage_idx}] ({stage.kind})"
    if not pairs:
        raise UserError(f"{where}: the task produced no preference pairs from the policy")
    tokenized = batching.tokenize_preferences(pairs, run.tokenizer, run.max_length,
                                              strict=False, append_eos=run.task.APPEND_EOS)
    if tokenized.truncated or tokenized.dropped:
        data.notes.append(f"{stage.kind} pairs: {tokenized.truncated} had their prompt cut from "
                          f"the left, {tokenized.dropped} were dropped (longer than "
                          f"max_length={run.max_length})")
    check_enough(tokenized.items, stage, where)
    return tokenized.items
