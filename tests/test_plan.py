"""`python -m jaxsftdpo.plan`: tiny GPT-2 and Llama steps compiled by the real TPU compiler
(libtpu's compile-only client, no TPU) for v5e and v4 slices over data, FSDP and tensor meshes;
a step too big for HBM is an answer, bad input one line and exit 2."""

import json
import subprocess
import sys

import ml_collections as mlc
import pytest

pytest.importorskip("libtpu", reason='libtpu, the TPU compiler, is not installed: '
                                     'pip install -e ".[test,tpu]"')

from jaxsftdpo import plan  # noqa: E402
from jaxsftdpo.config import stage  # noqa: E402
from jaxsftdpo.errors import UserError  # noqa: E402
from testing import ROOT, set_keys, tiny_config  # noqa: E402

STEP_FIELDS = {"name", "stage", "kind", "fits", "peak_bytes_per_chip", "argument_bytes",
               "output_bytes", "temp_bytes", "flops_per_chip", "estimated_seconds",
               "compile_seconds"}
TINY_LLAMA = dict(model_type="llama", vocab_size=257, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False)


def _config(model: str, param: str, stages: list, **changes):
    config = tiny_config(**{"param.kind": param, "data.max_length": 64})
    if model == "llama":
        config.model.init = mlc.ConfigDict(TINY_LLAMA)
    config.stages = stages
    return set_keys(config, changes)


CASES = {
    "gpt2-fft-v5e-data": ("v5e:2x2", _config(
        "gpt2", "fft", [stage("sft", steps=1, batch_size=8), stage("dpo", steps=1, batch_size=8)],
        **{"mesh.data": 4}), ["sft train_step", "dpo train_step"]),
    "llama-lora-v5e-fsdp-precomputed": ("v5e:2x2", _config(
        "llama", "lora", [stage("sft", steps=1, batch_size=8),
                          stage("dpo", steps=1, batch_size=8, grad_accum=2)],
        **{"mesh.data": 1, "mesh.fsdp": 4, "dpo.reference": "precomputed", "model.remat": True,
           "model.logits_chunk": 16}),
        ["sft train_step", "dpo reference_pass", "dpo train_step"]),
    "llama-fft-v4-tensor-reference-free": ("v4:2x2x1", _config(
        "llama", "fft", [stage("dpo", steps=1, batch_size=4), stage("orpo", steps=1, batch_size=4)],
        **{"mesh.data": 2, "mesh.tensor": 2, "dpo.reference": "none"}),
        ["dpo train_step", "orpo train_step"]),
    "gpt2-lora-v4-fsdp-tensor-accum": ("v4:2x2x1", _config(
        "gpt2", "lora", [stage("simpo", steps=1, batch_size=4),
                         stage("sft", steps=1, batch_size=8, grad_accum=2)],
        **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2, "model.dropout": True}),
        ["simpo train_step", "sft train_step"]),
}


@pytest.mark.parametrize("case", CASES)
def test_every_step_compiles_for_the_slice_and_fits(case):
    topology, config, expected = CASES[case]
    report = plan.plan(config, topology)
    assert report["topology"] == topology and report["chips"] == 4
    assert report["device_kind"].startswith("TPU v")
    assert [f"{s['kind']} {s['name']}" for s in report["steps"]] == expected
    for step in report["steps"]:
        assert STEP_FIELDS <= set(step)
        assert step["fits"] is True
        assert 0 < step["peak_bytes_per_chip"] < report["hbm_bytes_per_chip"]
        assert step["argument_bytes"] > 0 and step["flops_per_chip"] > 0
        assert 0 < step["estimated_seconds"] < 1 and 0 < step["mfu_bound"] <= 1
        assert step["compile_seconds"] > 0
        if step["name"] == "reference_pass":  # as the trainer runs it: the micro-batch
            assert step["micro_batch"] == 4


def _run_plan(*args):
    return subprocess.run([sys.executable, "-m", "jaxsftdpo.plan",
                           "--config", str(ROOT / "configs/quickstart.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_a_step_too_big_for_hbm_is_an_answer_in_the_json(tmp_path):
    out = tmp_path / "plan.json"
    done = _run_plan("--topology", "v5e:2x2", "--json", str(out),
                     "--config.stages[0].batch_size=1048576",
                     "--config.stages[1].batch_size=524288")
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert {"topology", "device_kind", "chips", "hbm_bytes_per_chip", "steps"} <= set(report)
    assert report["hbm_bytes_per_chip"] == 16 * 2**30
    for step in report["steps"]:
        assert STEP_FIELDS <= set(step)
        assert step["fits"] is False
        assert step["peak_bytes_per_chip"] > report["hbm_bytes_per_chip"]
    assert "NO" in done.stdout and "roofline" in done.stdout


@pytest.mark.parametrize("args, says", [
    (["--topology", "v9:2x2"], "--topology 'v9:2x2' is not a TPU slice"),
    (["--topology", "v5e:2x2", "--config.mesh.data=8"], "v5e:2x2 has 4 chips: mesh"),
    (["--topology", "v5e:2x2", "--config.stages[0].batch_size=6"], "does not divide over the 4"),
])
def test_bad_input_is_one_line_and_exit_2(args, says):
    done = _run_plan(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert says in lines[0]


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch):
    found = plan.importlib.util.find_spec
    monkeypatch.setattr(plan.importlib.util, "find_spec",
                        lambda name: None if name == "libtpu" else found(name))
    with pytest.raises(UserError, match=r'pip install -e "\.\[tpu\]"'):
        plan.tpu_slice("v5e:2x2")


@pytest.mark.parametrize("largest, start", [(44, 16), (44, 64), (4, 4), (8, 4), (0, 8),
                                            (1000, 4)])
def test_largest_fitting_doubles_or_halves_then_bisects(largest, start):
    asked = []

    def fits(rows):
        asked.append(rows)
        return rows <= largest
    assert plan.largest_fitting(fits, start, 4) == largest // 4 * 4
    assert all(rows % 4 == 0 for rows in asked) and len(asked) == len(set(asked))


def test_collective_bytes_counts_each_collective_by_its_largest_array():
    hlo = "\n".join([
        "  %ag = (bf16[64,8]{1,0}, bf16[256,8]{1,0}) all-gather-start(%p), dimensions={0}",
        "  %ar.1 = f32[10]{0} all-reduce(%x), to_apply=%add",
        "  %done = bf16[256,8]{1,0} all-gather-done(%ag)",
        "  %dot = f32[4,4]{1,0} dot(%a, %b)"])
    assert plan.collective_bytes(hlo) == 256 * 8 * 2 + 10 * 4


@pytest.mark.slow
def test_max_batch_fits_and_twice_it_does_not():
    """Several compiles near the memory limit, each slow on two cores."""
    config = _config("gpt2", "fft", [stage("sft", steps=1, batch_size=96)],
                     **{"model.init.n_positions": 4096, "model.init.n_embd": 32,
                        "model.init.n_layer": 1, "data.max_length": 4096, "mesh.data": 4})
    report = plan.plan(config, "v5e:2x2", max_batch=True)
    largest = report["steps"][0]["max_micro_batch"]
    assert largest >= 96
    assert report["steps"][0]["at_max_micro_batch"]["fits"]
    assert f"1x{largest}x4096  yes" in plan.table(report)
    config.stages[0].batch_size = largest
    assert plan.plan(config, "v5e:2x2")["steps"][0]["fits"]
    config.stages[0].batch_size = 2 * largest
    assert not plan.plan(config, "v5e:2x2")["steps"][0]["fits"]
