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

The DPO reference is the model before any training: the config's model (`model.name_or_path`,
or `model.init` built with `model.init_seed`), for LoRA the base without adapters. That is the
reference of a DPO-only run; a staged SFT->DPO run trained against the policy at the hand-off
instead, so its rewards here measure the whole change from the base. With `--model`, the
reference is the config's model too, or `--reference PATH_OR_ID`; `--reference none` skips
the DPO metrics.
"""

from __future__ import annotations

import json
from pathlib import Path


from jaxsftdpo.errors import UserError
from jaxsftdpo.reporting import write_atomically

RESULTS_FILE = "results.json"


# ---- held-out preference pairs and their DPO metrics ----------------------------------------

def held_out_pairs(task) -> list[dict]:
    """The task's held-out `prompt`/`chosen`/`rejected` pairs (`dev_preference_pairs()`), or
    `[]` for a task without them."""
    return list(task.dev_preference_pairs()) if hasattr(task, "dev_preference_pairs") else []


def dpo_metrics(policy, reference, pairs: list[dict], dpo_config, batch_size: int,
                append_eos: bool = True) -> dict:
    """Mean DPO metrics of `policy` against `reference` (both `Policy`s) over `pairs`."""
    import jax.numpy as jnp

    from jaxsftdpo import losses
    from jaxsftdpo.data import batching

    tokenized = batching.tokenize_preferences(pairs, policy.tokenizer, policy.max_length,
                                              strict=False, append_eos=append_eos)
    items = tokenized.items
    if not items:
        return {}
    logps = (*policy.sequence_logps(items, batch_size),
             *reference.sequence_logps(items, batch_size))
    loss_sum, count, sums = losses.dpo_loss(
        *(jnp.asarray(x) for x in logps),
        beta=dpo_config.beta, loss_type=dpo_config.loss_type,
        label_smoothing=dpo_config.label_smoothing)
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


def _write(results: dict, evaluation, task, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    task.write_predictions(evaluation, out)
    write_atomically(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out / RESULTS_FILE}")


def _policy(graphdef, trainable, frozen, tokenizer, mesh, max_length):
    from jaxsftdpo.policy import Policy
    return Policy(graphdef, trainable, frozen, tokenizer, mesh, max_length)


def _max_length(config, model_config) -> int:
    limit = model_config.max_length
    max_length = config.data.max_length or limit
    if max_length > limit:
        raise UserError(f"config.data.max_length={max_length} exceeds the model's {limit} "
                        f"positions; lower it to at most {limit}")
    return max_length


# ---- entry points ---------------------------------------------------------------------------

def evaluate_workdir(workdir, *, step: int | None = None, out=None, devices=None) -> dict:
    """Scores of the run in `workdir` at checkpoint `step` (default: the newest), written to
    `out` (default `workdir/eval/step_N`)."""
    from jaxsftdpo import runs

    run = runs.load_run(workdir, step, devices=devices)
    from jaxsftdpo.tasks import make_task
    config = run.config
    max_length = _max_length(config, run.model_config)
    task = make_task(config.data, run.tokenizer, max_length, config.seed)
    policy = _policy(run.graphdef, run.trainable, run.frozen, run.tokenizer, run.mesh,
                     max_length)
    reference = _policy(run.graphdef, run.initial, run.frozen, run.tokenizer, run.mesh,
                        max_length)
    results, evaluation = _evaluate(config, task, policy, reference)
    results["source"] = {"workdir": str(run.workdir.absolute()), "step": run.step,
                         "finished": run.finished,
                         "dpo_reference": "the model before training"}
    if not run.finished:
        print(f"note: checkpoint {run.step} is mid-run; the run's stages are not all done")
    _write(results, evaluation, task, Path(out) if out else
           run.workdir / "eval" / f"step_{run.step}")
    return results


def evaluate_model(model: str, config, out, *, reference: str = "", devices=None) -> dict:
    """Scores of the Hugging Face model `model` (a directory or hub id), used as is, on the task
    of `config`; DPO reference: `reference`, or the config's own model when empty, none when
    `'none'`."""
    from jaxsftdpo import sharding
    from jaxsftdpo.config import validate
    from jaxsftdpo.data.tokenizer import load_tokenizer
    from jaxsftdpo.tasks import make_task
    from jaxsftdpo.trainer import build_model

    if not out:
        raise UserError("--out is required with --model: the directory for results.json")
    validate(config)
    mesh = sharding.make_mesh(config.mesh, devices)

    def build(name_or_path):
        # The same config with this model, evaluated as is: no adapters, nothing to train.
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.model.name_or_path = name_or_path
            c.param.kind = "fft"
        _, model_config, graphdef, trainable, frozen = build_model(c, mesh)
        return model_config, graphdef, trainable, frozen

    model_config, graphdef, trainable, frozen = build(model)
    tokenizer = load_tokenizer(config.model.tokenizer or model)
    max_length = _max_length(config, model_config)
    task = make_task(config.data, tokenizer, max_length, config.seed)
    policy = _policy(graphdef, trainable, frozen, tokenizer, mesh, max_length)
    ref_policy, ref_name = None, None
    if reference != "none":
        ref_name = reference or config.model.name_or_path
        _, ref_graphdef, ref_trainable, ref_frozen = build(ref_name)
        ref_policy = _policy(ref_graphdef, ref_trainable, ref_frozen, tokenizer, mesh,
                             max_length)
    results, evaluation = _evaluate(config, task, policy, ref_policy)
    results["source"] = {"model": str(model), "dpo_reference":
                         None if ref_policy is None else (ref_name or "config.model.init")}
    _write(results, evaluation, task, Path(out))
    return results


def main() -> None:
    from absl import flags

    from jaxsftdpo.cli import config_flag, run_cli

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
