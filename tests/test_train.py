"""The trainer end to end on tiny models: learning, DPO's start, meshes, LoRA, resume, compiles."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxsftdpo import checkpoint, flops, lora, runs, sharding, stage_data, steps, tasks, trainer
from jaxsftdpo.config import stage
from jaxsftdpo.data import batching
from testing import quickstart_config, tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py

ROOT = Path(__file__).resolve().parents[1]


def metrics(workdir, kind=None):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]
    return [r for r in rows if "loss" in r and (kind is None or r["kind"] == kind)]


def final_params(config, workdir):
    target = runs.build_run(config).trainable
    resume = checkpoint.Manager(Path(workdir) / "checkpoints", keep=2).latest()
    return resume.params(target)


# ---- learning and DPO's first step -----------------------------------------------------------

def test_quickstart_beats_chance_and_dpo_starts_at_log2(tmp_path):
    results = trainer.train_and_evaluate(quickstart_config(), tmp_path)
    accuracy = {e["after"]: e["accuracy"] for e in results["evals"]}
    assert accuracy["start"] < 0.6
    assert accuracy["1:sft"] >= 0.8, accuracy
    assert accuracy["2:dpo"] >= accuracy["1:sft"] - 0.03, accuracy
    first_dpo = metrics(tmp_path, "dpo")[0]
    assert abs(first_dpo["loss"] - math.log(2)) < 1e-5
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first_dpo[name] == 0.0
    for name in ("results.json", "results.md", "loss_curve.png", "config.json",
                 "dev_predictions.jsonl"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize("param,reference", [("lora", "frozen_copy"), ("lora", "precomputed"),
                                             ("fft", "precomputed")])
def test_dpo_after_sft_starts_at_log2(tmp_path, param, reference):
    config = tiny_config(**{"param.kind": param, "dpo.reference": reference})
    trainer.train_and_evaluate(config, tmp_path)
    first_dpo = metrics(tmp_path, "dpo")[0]
    assert abs(first_dpo["loss"] - math.log(2)) < 1e-5
    # Exactly 0 before the shared decoder skeleton; since then the LoRA cases give ~3e-9 (XLA
    # fuses the policy's and the reference's forwards differently); cause not yet pinned down.
    assert abs(first_dpo["rewards/chosen"]) < 1e-7 and abs(first_dpo["rewards/rejected"]) < 1e-7


# ---- LoRA -----------------------------------------------------------------------------------

def sft_batches(run, stage_cfg, n):
    items = stage_data.tokenize_stages(run).items[0]
    buckets = batching.default_buckets(run.max_length)
    out = []
    for batch in batching.batches_for_epoch(items, stage_cfg.batch_size,
                                            run.tokenizer.pad_token_id, buckets):
        batch.pop("index")
        micro = {k: v.reshape(stage_cfg.grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}
        out.append(sharding.place_batch(micro, run.mesh, leading=1))
        if len(out) == n:
            return out
    return out


def test_lora_trains_adapters_only_and_merges_to_the_same_logits():
    config = tiny_config(**{"param.kind": "lora", "param.r": 4})
    run = runs.build_run(config)
    stage_cfg = config.stages[0]
    base = jax.tree.map(np.array, run.frozen)
    initial = jax.tree.map(np.array, run.trainable)
    for path, variable in nnx.to_flat_state(run.trainable):
        assert isinstance(variable, nnx.LoRAParam), path
    tx, _ = steps.make_optimizer(stage_cfg, 10)
    opt_state = tx.init(run.trainable)
    trainable_shapes = {leaf.shape for leaf in jax.tree.leaves(run.trainable)}
    big = [leaf.shape for leaf in jax.tree.leaves(opt_state)
           if leaf.ndim and leaf.shape not in trainable_shapes]
    assert not big, f"optimizer state for frozen weights: {big}"
    state = steps.TrainState(jax.numpy.zeros((), jax.numpy.int32),
                             jax.tree.map(jax.numpy.copy, run.trainable), opt_state)
    step_fn = steps.make_train_step("sft", run.graphdef, tx, None)
    for batch in sft_batches(run, stage_cfg, 3):
        state, _ = step_fn(state, run.frozen, None, batch, None)

    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, run.frozen), base)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.trainable,
                           initial)
    assert all(jax.tree.leaves(changed))

    model = nnx.merge(run.graphdef, state.trainable, run.frozen)
    ids = batching.pad_sequences([s.ids for s in stage_data.tokenize_stages(run).items[0][:4]], 64,
                                 run.tokenizer.pad_token_id, 4, "right")
    unmerged = np.asarray(model(*ids))
    merged = np.asarray(lora.merge_lora(model)(*ids))
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)


# ---- meshes -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    config = tiny_config(sft_steps=3, dpo_steps=3, **{"mesh.data": 1})
    trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return [r["loss"] for r in metrics(workdir)]


def record_train_steps(monkeypatch) -> list:
    """The jitted step functions the trainer makes, to count their compilations."""
    made, original = [], steps.make_train_step

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(steps, "make_train_step", recording)
    return made


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_meshes_give_the_losses_of_one_device(tmp_path, monkeypatch, one_device_losses, shape):
    config = tiny_config(sft_steps=3, dpo_steps=3, **{"mesh.data": shape[0],
                                                      "mesh.fsdp": shape[1],
                                                      "mesh.tensor": shape[2]})
    run = runs.build_run(config)
    rules = run.family.PARTITION_RULES
    for path, variable in nnx.to_flat_state(run.trainable):
        name = sharding.path_name(path)
        expected = jax.sharding.NamedSharding(run.mesh, sharding.spec_for(name, rules))
        assert variable.get_value().sharding.is_equivalent_to(expected, variable.ndim), name
    made = record_train_steps(monkeypatch)
    trainer.train_and_evaluate(config, tmp_path)
    losses = [r["loss"] for r in metrics(tmp_path)]
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5)
    assert [fn._cache_size() for fn in made] == [1, 1]  # sharded state: no recompile at step 2


def test_gradient_accumulation_gives_the_losses_of_one_big_batch(tmp_path, one_device_losses):
    config = tiny_config(sft_steps=3, dpo_steps=3, **{"mesh.data": 1})
    for s in config.stages:
        s.grad_accum = 4
    trainer.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path)], one_device_losses,
                               rtol=1e-5)


# ---- resume ---------------------------------------------------------------------------------

@pytest.mark.parametrize("param,reference", [("fft", "frozen_copy"), ("lora", "precomputed")])
def test_resumed_run_ends_bit_identical(tmp_path, param, reference):
    # Dropout on in SFT, so the resumed run must also restore where its random stream stands.
    config = tiny_config(sft_steps=5, dpo_steps=4, **{"param.kind": param,
                                                      "dpo.reference": reference,
                                                      "model.dropout": True})
    trainer.train_and_evaluate(config, tmp_path / "straight")
    assert trainer.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=3) == {
        "stopped_at_step": 3}
    assert trainer.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=4) == {
        "stopped_at_step": 7}
    results = trainer.train_and_evaluate(config, tmp_path / "resumed")
    assert results["global_step"] == 9
    straight = final_params(config, tmp_path / "straight")
    resumed = final_params(config, tmp_path / "resumed")
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    losses = lambda w: [(r["step"], r["loss"]) for r in metrics(w)]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


# ---- compilation ----------------------------------------------------------------------------

class TwoLengthTask(tasks.ClozeTask):
    """Prompts of two lengths, so batches fall in two length buckets (64 and 128)."""

    name = "two_lengths"

    def __init__(self, data_config, tokenizer, max_length, seed):
        rng = np.random.default_rng(seed)
        examples = []
        for i in range(64):
            length = 90 if i % 4 == 0 else 20
            text = "".join(rng.choice(list("ab"), size=length))
            label = int(text.count("a") > text.count("b"))
            examples.append({"prompt": text + "\n", "completion": ("yes", "no")[1 - label],
                             "label": label})
        super().__init__(examples, examples[:16], {1: "yes", 0: "no"}, tokenizer, max_length)


def test_train_step_compiles_once_per_stage_and_bucket(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, TwoLengthTask.name, TwoLengthTask)
    made = record_train_steps(monkeypatch)
    config = tiny_config(sft_steps=0, dpo_steps=0, **{"data.task": TwoLengthTask.name,
                                                      "model.init.n_positions": 128,
                                                      "mesh.data": 1})
    # Batches of two, a quarter of the examples long: every epoch has batches in both buckets.
    config.stages = [stage("sft", epochs=3, batch_size=2), stage("dpo", epochs=2, batch_size=2)]
    trainer.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    assert len(made) == 2
    assert [fn._cache_size() for fn in made] == [2, 2]


# ---- speed metrics ----------------------------------------------------------------------------

def test_metrics_report_model_flops_utilisation_against_the_configured_peak(tmp_path):
    config = tiny_config(2, 1, **{"peak_flops": 1e12})
    trainer.train_and_evaluate(config, tmp_path)
    model_config = runs.build_run(config, task=False).model_config
    buckets = batching.default_buckets(model_config.max_length)
    for row in metrics(tmp_path):
        assert row["flops_per_token"] in [flops.model_flops_per_token(model_config, length)
                                          for length in buckets]
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / 1e12)
        assert 0 < row["mfu"] < 1
