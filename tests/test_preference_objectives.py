"""The reference-free preference stages, `orpo` and `simpo`, end to end on a tiny GPT-2: they train
(full and LoRA) through the trainer with no reference model and no precomputed pass, gradient
accumulation changes none of their numbers, and their bad settings are one-line errors.

Their losses against TRL's own functions are in tests/test_losses.py, pmap against jit in
tests/test_parallel.py.
"""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsftdpo import steps, trainer
from jaxsftdpo.config import stage
from testing import cli_exit, tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py

# What TRL's ORPOTrainer and CPOTrainer log, beside our `loss`, `grad_norm` and speed metrics.
TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
ORPO_METRICS = {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
# ORPO is meant to start from the base model, SimPO from an SFT policy.
SFT_STEPS = {"orpo": 0, "simpo": 2}
LEARNING_RATES = {"orpo": 1e-3, "simpo": 3e-4}


def preference_config(kind, *, sft_steps=0, steps=4, grad_accum=1, **changes):
    """The tiny quickstart (tests/testing.py) on 16 examples of the yes/no task, one device:
    `sft_steps` of SFT, then `steps` of stage `kind`, each a batch of all 16 pairs (so its
    losses can be compared from step to step)."""
    config = tiny_config(sft_steps, 0, **{"mesh.data": 1, "data.n_train": 16, **changes})
    config.stages = [*config.stages, stage(kind, steps=steps, batch_size=16,
                                           grad_accum=grad_accum,
                                           learning_rate=LEARNING_RATES.get(kind, 1e-3))]
    return config


def rows(workdir, kind):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind and "loss" in r]


def train(config, workdir, monkeypatch):
    """`train_and_evaluate` on one device, with any use of a reference an error."""
    def no_reference(*args):
        raise AssertionError("a reference-free stage precomputed reference log-probs")

    monkeypatch.setattr(trainer, "_precompute_reference", no_reference)
    return trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])


# Runs of the FFT cases, shared by the tests that compare against them.
@pytest.fixture(scope="module")
def fft_runs(tmp_path_factory):
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        for kind, sft_steps in SFT_STEPS.items():
            workdir = tmp_path_factory.mktemp(kind)
            config = preference_config(kind, sft_steps=sft_steps, **{
                "dpo.reference": "precomputed"})  # DPO's setting: these stages ignore it
            out[kind] = config, workdir, train(config, workdir, patch)
    return out


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_a_reference_free_stage_trains_and_logs_trls_metrics(fft_runs, kind):
    """ORPO alone from the initial model, SimPO after SFT: on the same 16 pairs every step the
    loss falls and the chosen answers gain on the rejected ones (the reward margin grows); the
    log has TRL's metric names."""
    config, workdir, results = fft_runs[kind]
    assert results["global_step"] == sum(s.steps for s in config.stages)
    assert [e["after"] for e in results["evals"]][-1] == f"{len(config.stages)}:{kind}"
    logged = rows(workdir, kind)
    assert len(logged) == 4
    expected = TRL_METRICS | (ORPO_METRICS if kind == "orpo" else set())
    assert expected <= set(logged[0]), expected - set(logged[0])
    assert not {"dpo_loss", "sft_loss"} & set(logged[0])
    assert all(math.isfinite(r[name]) for r in logged for name in expected | {"loss"})
    losses, margins = ([r[name] for r in logged] for name in ("loss", "rewards/margins"))
    assert losses == sorted(losses, reverse=True) and margins == sorted(margins), logged
    if kind == "orpo":  # the loss is the NLL plus beta times minus the mean log_sigmoid
        first = logged[0]
        assert first["loss"] == pytest.approx(
            first["nll_loss"] - config.orpo.beta * first["log_odds_ratio"], rel=1e-5)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_gradient_accumulation_changes_no_number(fft_runs, tmp_path, monkeypatch, kind):
    """grad_accum 2 gives every step's loss, gradient norm and TRL metrics of grad_accum 1 (each
    step's on the weights all steps before it made), to the float32 rounding of sums taken in
    another order (the absolute 1e-5 is for the logit means: means of logits a hundred times
    larger). The weights are not compared: Adam turns gradients that are zero up to rounding
    (embeddings of tokens the batch barely uses) into steps of a sizeable fraction of lr."""
    config, workdir, _ = fft_runs[kind]
    accumulated = preference_config(kind, sft_steps=SFT_STEPS[kind], grad_accum=2,
                                    **{"dpo.reference": "precomputed"})
    train(accumulated, tmp_path, monkeypatch)
    numbers = lambda row: {name: value for name, value in row.items()
                           if name not in ("tokens_per_s", "mfu") and not isinstance(value, str)}
    for one, two in zip(rows(workdir, kind), rows(tmp_path, kind), strict=True):
        assert numbers(two).keys() == numbers(one).keys()
        for name, value in numbers(one).items():
            np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_lora_trains_a_reference_free_stage_with_no_reference(tmp_path, monkeypatch, kind):
    """LoRA: the step gets no reference (`ref` None) though dpo.reference asks for a frozen copy,
    and the adapters learn (the loss falls)."""
    refs, original = [], steps.make_train_step

    def recording(*args, **kwargs):
        step = original(*args, **kwargs)

        def call(state, frozen, ref, batch, rng):
            refs.append(ref)
            return step(state, frozen, ref, batch, rng)
        return call

    monkeypatch.setattr(steps, "make_train_step", recording)
    config = preference_config(kind, **{"param.kind": "lora", "param.r": 4,
                                        "dpo.reference": "frozen_copy"})
    train(config, tmp_path, monkeypatch)
    assert len(refs) == 4 and all(ref is None for ref in refs)
    logged = rows(tmp_path, kind)
    assert logged[-1]["loss"] < logged[0]["loss"]


# ---- bad settings: one line, exit 2, nothing written ------------------------------------------

BAD_SETTINGS = {
    "orpo beta 0": ("orpo", {"orpo.beta": 0.0}, "orpo.beta (the odds-ratio term's weight, the "
                                                "paper's lambda) must be > 0, got 0.0"),
    "orpo beta < 0": ("orpo", {"orpo.beta": -0.5}, "orpo.beta"),
    "simpo beta 0": ("simpo", {"simpo.beta": 0.0}, "simpo.beta must be > 0, got 0.0"),
    "simpo beta < 0": ("simpo", {"simpo.beta": -2.0}, "simpo.beta must be > 0, got -2.0"),
    "simpo gamma < 0": ("simpo", {"simpo.gamma": -0.5},
                        "simpo.gamma (the target reward margin) must be >= 0, got -0.5"),
    "simpo label_smoothing": ("simpo", {"simpo.label_smoothing": 0.5},
                              "simpo.label_smoothing must be in [0, 0.5), got 0.5"),
    "unknown kind": ("kto", {}, "stages[0].kind='kto'; use one of ('sft', 'dpo', 'orpo', "
                                "'simpo')"),
    "dpo's checks stay": ("dpo", {"dpo.beta": 0.0}, "DPO beta must be > 0"),
}


@pytest.mark.parametrize("name", BAD_SETTINGS)
def test_bad_settings_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, name):
    kind, changes, fragment = BAD_SETTINGS[name]
    config = preference_config(kind, **changes)
    workdir = tmp_path / "run"
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(config, workdir))
    assert status == 2 and line.startswith("error: ") and fragment in line, line
    assert not workdir.exists()


def test_settings_of_a_kind_no_stage_uses_are_not_checked(tmp_path):
    """As for dpo: an SFT-only run does not care what orpo.beta or simpo.gamma say."""
    config = tiny_config(1, 0, **{"orpo.beta": 0.0, "simpo.gamma": -1.0, "mesh.data": 1,
                                  "eval_at_start": False})
    assert trainer.train_and_evaluate(config, tmp_path,
                                      devices=jax.devices()[:1])["global_step"] == 1
