"""Evaluate a run's checkpoint, or a Hugging Face model as is, on a config's task.

    python -m jaxsftdpo.evaluate --workdir DIR [--step N] [--out OUT]
    python -m jaxsftdpo.evaluate --model PATH_OR_ID --config configs/FILE.py[:ARG] --out OUT \
        [--reference PATH_OR_ID|none] [--config.KEY=VALUE ...]

Writes `results.json` (default `DIR/eval/step_N/`) and the task's per-example predictions, and
prints the scores. `results.json` holds the task's scores (`accuracy` and `f1`, or `chrf`, ...)
as the trainer computes them, and, when the task has held-out preference pairs (a cloze task's
dev examples: chosen = the correct answer, rejected = each other answer), the DPO metrics on them
under TRL's names (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies`, `logps/chosen`, `logps/rejected`) and `dpo_loss`, with the run's
`dpo.beta` and `dpo.loss_type`.

The DPO reference is the run's `dpo.reference_path` model when it had one, else the model before
any training: the config's model (`model.name_or_path`, or `model.init` built with
`model.init_seed`), for LoRA the base without adapters. That is the
reference of a DPO-only run; a staged SFT->DPO run trained against the policy at the hand-off
instead, so its rewards here measure the whole change from the base. With `--model`, the
reference is the config's model too, or `--reference PATH_OR_ID`; `--reference none` skips
the DPO metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
from absl import flags

from jaxsftdpo import losses, runs
from jaxsftdpo.cli import config_flag, run_cli
from jaxsftdpo.data import batching
from jaxsftdpo.errors import UserError
from jaxsftdpo.reporting import write_atomically
from jaxsftdpo.runs import RESULTS_FILE


# ---- held-out preference pairs and their DPO metrics ----------------------------------------

def held_out_pairs(task) -> list[dict]:
    """The task's held-out `prompt`/`chosen`/`rejected` pairs (`dev_preference_pairs()`), or
    `[]` for a task without them."""
    return list(task.dev_preference_pairs()) if hasattr(task, "dev_preference_pairs") else []


def dpo_metrics(policy, reference, pairs: list[dict], dpo_config, batch_size: int,
                append_eos: bool = True) -> dict:
    """Mean DPO metrics of `policy` against `reference` (both `Policy`s) over `pairs`."""
    tokenized = batching.tokenize_preferences(pairs, policy.tokenizer, policy.max_length,
                                              strict=False, append_eos=append_eos)
    items = tokenized.items
    if not items:
        return {}
    logps = (*policy.sequence_logps(items, batch_size),
             *reference.sequence_logps(items, batch_size))
    counts = {f"{side}_tokens": jnp.asarray([batching.completion_tokens(getattr(pair, side))
                                              for pair in items])
              for side in ("chosen", "rejected")}
    loss_sum, count, sums = losses.dpo_loss(
        *(jnp.asarray(x) for x in logps),
        beta=dpo_config.beta, loss_type=dpo_config.loss_type,
        label_smoothing=dpo_config.label_smoothing, **counts)
    out = {name: float(value) / float(count) for name, value in sums.items()}
    out["dpo_loss"] = float(loss_sum) / float(count)
    out["dpo_pairs"] = len(items)
    if tokenized.truncated or tokenized.dropped:
        print(f"held-out pairs: {tokenized.truncated} had their prompt cut from the left, "
              f"{tokenized.dropped} were dropped (longer than {policy.max_length} tokens)")
    return out


def _evaluate(config, task, policy, reference) -> tuple[dict, object]:
    evaluation = task.evaluate(policy, config.data.eval_batch_size)
    results = dict(evaluation.scores)
    pairs = held_out_pairs(task) if reference is not None else []
    if pairs:
        results.update(dpo_metrics(policy, reference, pairs, config.dpo,
                                   config.data.eval_batch_size, task.APPEND_EOS))
    return results, evaluation


def _write(results: dict, evaluation, task, out: Path, policy, batch_size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    task.write_predictions(evaluation, out, policy, batch_size)
    write_atomically(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out / RESULTS_FILE}")


# ---- entry points ---------------------------------------------------------------------------

def evaluate_workdir(workdir, *, step: int | None = None, out=None, devices=None) -> dict:
    """Scores of the run in `workdir` at checkpoint `step` (default: the newest), written to
    `out` (default `workdir/eval/step_N`)."""
    run = runs.load_run(workdir, step, devices=devices, task=True, reference=True)
    reference = run.reference_policy()
    results, evaluation = _evaluate(run.config, run.task, run.policy(),
                                    reference or run.policy(run.initial))
    results["source"] = {"workdir": str(run.workdir.absolute()), "step": run.step,
                         "finished": run.finished,
                         "dpo_reference": run.reference.source if reference
                         else "the model before training"}
    if not run.finished:
        print(f"note: checkpoint {run.step} is mid-run; the run's stages are not all done")
    _write(results, evaluation, run.task, Path(out) if out else
           run.workdir / "eval" / f"step_{run.step}", run.policy(),
           run.config.data.eval_batch_size)
    return results


def evaluate_model(model: str, config, out, *, reference: str = "", devices=None) -> dict:
    """Scores of the Hugging Face model `model` (a directory or hub id), used as is, on the task
    of `config`; DPO reference: `reference`, or the config's own model when empty, none when
    `'none'`."""
    if not out:
        raise UserError("--out is required with --model: the directory for results.json")

    def as_is(name_or_path):
        # The config with this model, evaluated as is: no adapters, nothing to train.
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.model.name_or_path = name_or_path
            c.param.kind = "fft"
            c.dpo.reference_path = ""
        return c

    run = runs.build_run(as_is(model), devices,
                         tokenizer=runs.load_tokenizer(config.model.tokenizer or model))
    ref_policy, ref_name = None, None
    if reference != "none":
        ref_name = reference or config.model.name_or_path
        ref_run = runs.build_run(as_is(ref_name), mesh=run.mesh, tokenizer=run.tokenizer,
                                 task=False)
        ref_policy = ref_run.policy()
    results, evaluation = _evaluate(config, run.task, run.policy(), ref_policy)
    results["source"] = {"model": str(model), "dpo_reference":
                         None if ref_policy is None else (ref_name or "config.model.init")}
    _write(results, evaluation, run.task, Path(out), run.policy(), config.data.eval_batch_size)
    return results


def main() -> None:
    config = config_flag()
    flags.DEFINE_string("workdir", None, "a training run's --workdir to evaluate")
    flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the newest)")
    flags.DEFINE_string("model", None, "a Hugging Face model directory or hub id to evaluate as "
                                       "is, on the task of --config")
    flags.DEFINE_string("reference", "", "with --model: the DPO reference model (default: the "
                                         "config's model); 'none' skips the DPO metrics")
    flags.DEFINE_string("out", None, "directory for results.json (default with --workdir: "
                                     "WORKDIR/eval/step_N)")
    f = flags.FLAGS

    def evaluate():
        if bool(f.workdir) == bool(f.model):
            raise UserError("give either --workdir DIR (a training run) or --model PATH_OR_ID "
                            "with --config FILE and --out DIR")
        if f.workdir:
            if config.value is not None:
                raise UserError("--config does not go with --workdir: a run is evaluated with "
                                "the config in its config.json")
            evaluate_workdir(f.workdir, step=f.step, out=f.out)
        else:
            if config.value is None:
                raise UserError("--model needs --config FILE: the task to evaluate it on")
            evaluate_model(f.model, config.value, f.out, reference=f.reference)

    run_cli(evaluate)


if __name__ == "__main__":
    main()
