"""Export and evaluation of a training run: transformers loads the merged model and PEFT the
adapters, both with jaxsftdpo's logits; evaluate reproduces the run's final scores; a GGUF file
exported with --model loads in transformers with its GGUF logits; bad input is one line on
stderr, exit status 2, and nothing written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from gguf import GGMLQuantizationType as QType
from safetensors.numpy import load_file

from jaxsftdpo import runs
from jaxsftdpo.config import stage
from jaxsftdpo.data.tokenizer import load_tokenizer
from jaxsftdpo.evaluate import evaluate_model, evaluate_workdir
from jaxsftdpo.export import export_model, export_run
from jaxsftdpo.lora import apply_lora, linear_modules
from jaxsftdpo.models import save_pretrained
from jaxsftdpo.models.gpt2 import GPT2, GPT2Config
from jaxsftdpo.peft_export import (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE,
                                   save_peft_adapters)
from testing import quickstart_config
from tiny_gguf import (END_OF_TEXT, EOS_ID, TOKENS, llama_config, random_model,
                       transformers_gguf_model, write_gguf)

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py

REPO = Path(__file__).resolve().parents[1]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def quickstart(kind: str, stages):
    """configs/quickstart.py shrunk to a few steps."""
    config = quickstart_config(**{
        "model.init.n_embd": 32,  # the quickstart model, narrower: the tests are about I/O
        "data.n_train": 64, "data.n_dev": 32, "data.eval_batch_size": 32,
        "param.kind": kind, "param.r": 4})
    config.stages = stages
    return config


def train(config, workdir):
    from jaxsftdpo.trainer import train_and_evaluate
    train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """SFT then DPO with LoRA; checkpoints at the end of each stage (steps 4 and 6)."""
    config = quickstart("lora", [stage("sft", steps=4, learning_rate=1e-2, batch_size=16),
                                 stage("dpo", steps=2, learning_rate=1e-2, batch_size=16)])
    return train(config, tmp_path_factory.mktemp("lora_run"))


@pytest.fixture(scope="module")
def fft_run(tmp_path_factory):
    config = quickstart("fft", [stage("sft", steps=2, learning_rate=1e-2, batch_size=16)])
    return train(config, tmp_path_factory.mktemp("fft_run"))


@pytest.fixture(scope="module")
def lora_loaded(lora_run):
    """The LoRA run as evaluate and export rebuild it (newest checkpoint)."""
    return runs.load_run(lora_run)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """Quantisation type name -> a tiny random Llama (grouped-query attention, tied embeddings)
    as a GGUF file alone in its directory, as llama.cpp writes it (tests/tiny_gguf.py)."""
    model = random_model(transformers.LlamaForCausalLM, llama_config(tie_word_embeddings=True))
    return {qtype.name: write_gguf(tmp_path_factory.mktemp(f"gguf_{qtype.name}") / "tiny.gguf",
                                   model, "llama", qtype)
            for qtype in (QType.F32, QType.Q8_0)}


@pytest.fixture(scope="module")
def gguf_lora_run(tiny_gguf, tmp_path_factory):
    """A few LoRA SFT steps on the quantised GGUF model, with the tokenizer from the file."""
    config = quickstart("lora", [stage("sft", steps=3, learning_rate=1e-2, batch_size=16)])
    with config.unlocked():
        config.model.name_or_path = str(tiny_gguf["Q8_0"])
        config.model.tokenizer = ""
    return train(config, tmp_path_factory.mktemp("gguf_lora_run"))


def token_ids(vocab=257, shape=(3, 12)):
    return np.random.default_rng(0).integers(0, vocab, shape)


def jax_logits(model, ids):
    return np.asarray(model(ids, np.ones_like(ids)))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def test_merged_lora_export_loads_in_transformers(lora_run, lora_loaded, tmp_path):
    out = export_run(lora_run, tmp_path / "merged")
    run = lora_loaded
    ids = token_ids()
    ours = jax_logits(run.model(), ids)  # adapters unmerged, as in training
    assert np.abs(ours - jax_logits(run.model(run.initial), ids)).max() > 1e-3, \
        "training did not move the adapters; the comparison would prove nothing"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(hf, ids), ours, atol=1e-4)
    assert (out / "byte_tokenizer.json").is_file()  # the run's tokenizer travels with it
    assert not list(tmp_path.glob(".*")), "staging directory left behind"


def test_fft_export_loads_in_transformers(fft_run, tmp_path):
    out = export_run(fft_run, tmp_path / "merged")
    run = runs.load_run(fft_run)
    ids = token_ids()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(hf, ids), jax_logits(run.model(), ids), atol=1e-4)


def test_peft_export_loads_in_peft_with_the_base_written_beside(lora_run, lora_loaded,
                                                                 tmp_path):
    out = export_run(lora_run, tmp_path / "adapters", peft=True)
    run = lora_loaded
    config = run.config
    adapter_config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    # A model built from scratch has no base anyone else can load: it is written to OUT/base.
    assert adapter_config["base_model_name_or_path"] == str(out / "base")
    assert {k: adapter_config[k] for k in ("peft_type", "task_type", "r", "lora_alpha",
                                           "lora_dropout", "use_rslora", "fan_in_fan_out",
                                           "bias")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.param.r,
        "lora_alpha": config.param.alpha, "lora_dropout": config.param.dropout,
        "use_rslora": config.param.use_rslora, "fan_in_fan_out": True, "bias": "none"}
    assert sorted(adapter_config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]

    ids = token_ids()
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base").eval()
    # The base is the untrained model the run started from.
    np.testing.assert_allclose(torch_logits(base, ids), jax_logits(run.model(run.initial), ids),
                               atol=1e-4)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    np.testing.assert_allclose(torch_logits(peft_model, ids), jax_logits(run.model(), ids),
                               atol=1e-4)

    # Keys, shapes and dtypes exactly as PEFT itself writes them for GPT-2's Conv1D layers.
    fresh = transformers.AutoModelForCausalLM.from_pretrained(out / "base")
    reference = peft.get_peft_model(fresh, peft.LoraConfig(
        r=config.param.r, lora_alpha=config.param.alpha, fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM"))
    reference.save_pretrained(tmp_path / "peft_own")
    theirs = load_file(tmp_path / "peft_own" / PEFT_WEIGHTS_FILE)
    ours = load_file(out / PEFT_WEIGHTS_FILE)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == \
        {k: (v.shape, v.dtype) for k, v in theirs.items()}


def test_peft_format_with_rslora_and_a_regex_target(tmp_path):
    """Adapters on some modules only (the target list must not over-match), rsLoRA scaling."""
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = GPT2(config, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "base")
    apply_lora(model, r=3, alpha=6.0, use_rslora=True,
               target_modules=r"h\.1\.(attn\.c_attn|mlp\.c_fc)")
    keys = jax.random.split(jax.random.key(1), 2)
    for key, linear in zip(keys, [m for m in linear_modules(model).values() if m.lora]):
        linear.lora.lora_b[...] = 0.2 * jax.random.normal(key, linear.lora.lora_b.shape)
    save_peft_adapters(model, tmp_path / "adapters", alpha=6.0, use_rslora=True,
                       base_model_name_or_path=str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapters" / PEFT_CONFIG_FILE).read_text())
    assert written["use_rslora"] is True and written["r"] == 3 and written["lora_alpha"] == 6
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapters").eval()
    targeted = [name for name, module in loaded.named_modules() if hasattr(module, "lora_A")]
    assert targeted == ["base_model.model.transformer.h.1.attn.c_attn",
                        "base_model.model.transformer.h.1.mlp.c_fc"]
    ids = token_ids(97)
    np.testing.assert_allclose(torch_logits(loaded, ids), jax_logits(model, ids), atol=1e-4)


def test_evaluate_reproduces_the_runs_scores(lora_run, tmp_path):
    results = json.loads((lora_run / "results.json").read_text())
    final = evaluate_workdir(lora_run)
    assert final["source"]["step"] == 6 and final["source"]["finished"]
    for name in ("accuracy", "f1"):
        assert final[name] == results["final"][name]
    written = json.loads((lora_run / "eval" / "step_6" / "results.json").read_text())
    assert written["accuracy"] == final["accuracy"]
    assert (lora_run / "eval" / "step_6" / "dev_predictions.jsonl").read_text() == \
        (lora_run / "dev_predictions.jsonl").read_text()
    # DPO metrics on the held-out (dev) pairs, against the model before training.
    assert final["dpo_pairs"] == 32
    assert np.isclose(final["rewards/margins"],
                      final["rewards/chosen"] - final["rewards/rejected"], atol=1e-5)
    assert 0 <= final["rewards/accuracies"] <= 1 and final["dpo_loss"] > 0
    # A named step: the checkpoint at the end of SFT gives the scores logged after SFT.
    after_sft = evaluate_workdir(lora_run, step=4, out=tmp_path / "sft")
    logged = next(e for e in results["evals"] if e["after"] == "1:sft")
    assert (after_sft["accuracy"], after_sft["f1"]) == (logged["accuracy"], logged["f1"])

    # The merged export evaluated as a plain Hugging Face model gives the same numbers.
    merged = export_run(lora_run, tmp_path / "merged")
    as_hf = evaluate_model(str(merged), runs.read_config(lora_run), tmp_path / "hf_eval")
    assert (as_hf["accuracy"], as_hf["f1"]) == (final["accuracy"], final["f1"])
    for name in ("rewards/chosen", "rewards/margins", "logps/chosen", "dpo_loss"):
        assert np.isclose(as_hf[name], final[name], atol=1e-4), name
    assert (tmp_path / "hf_eval" / "results.json").is_file()


# ---- GGUF models: --model, and PEFT export of a run on one ------------------------------------

GGUF_TEXT = " the cat sat on the mat" + END_OF_TEXT


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_model_export_loads_in_transformers_with_its_gguf_logits(tiny_gguf, tmp_path,
                                                                      qtype):
    path = tiny_gguf[qtype]
    source = path if qtype == "F32" else path.parent  # the file, or the directory holding it
    out = export_model(source, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".*")), "staging directory left behind"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = token_ids(len(TOKENS))
    np.testing.assert_allclose(torch_logits(hf, ids),
                               torch_logits(transformers_gguf_model(path), ids), atol=1e-4)

    # The tokenizer loads without gguf_file= and tokenizes as the file's own does.
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = transformers.AutoTokenizer.from_pretrained(out)
    assert ours(GGUF_TEXT)["input_ids"] == theirs(GGUF_TEXT)["input_ids"]
    assert ours.eos_token_id == EOS_ID
    assert load_tokenizer(str(out)).encode(GGUF_TEXT) == \
        load_tokenizer(str(path)).encode(GGUF_TEXT)


def test_peft_export_of_a_gguf_run_writes_the_dequantised_base_beside(gguf_lora_run, tiny_gguf,
                                                                      tmp_path):
    out = export_run(gguf_lora_run, tmp_path / "adapters", peft=True)
    adapter_config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    # transformers cannot load a .gguf path without gguf_file=: the base is written to OUT/base.
    assert adapter_config["base_model_name_or_path"] == str(out / "base")
    assert sorted(adapter_config["target_modules"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (out / "tokenizer.json").is_file() and (out / "base" / "tokenizer.json").is_file()

    run = runs.load_run(gguf_lora_run)
    ids = token_ids(len(TOKENS))
    ours = jax_logits(run.model(), ids)
    assert np.abs(ours - jax_logits(run.model(run.initial), ids)).max() > 1e-3, \
        "training did not move the adapters; the comparison would prove nothing"
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base").eval()
    # The base is the GGUF model as transformers dequantises it.
    np.testing.assert_allclose(torch_logits(base, ids),
                               torch_logits(transformers_gguf_model(tiny_gguf["Q8_0"]), ids),
                               atol=1e-4)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    np.testing.assert_allclose(torch_logits(peft_model, ids), ours, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "base")
    assert tokenizer(GGUF_TEXT)["input_ids"] == run.tokenizer.encode(GGUF_TEXT)

    # The merged export of the same run, for good measure.
    merged = export_run(gguf_lora_run, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    np.testing.assert_allclose(torch_logits(hf, ids), ours, atol=1e-4)


# ---- bad input: one line on stderr, exit status 2, nothing written --------------------------

def test_commands_and_bad_input_one_line_exit_2(lora_run, fft_run, tmp_path):
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(lora_run / "config.json", no_checkpoint / "config.json")
    # config.json edited after training: the checkpoint's adapters have rank 4, not 2.
    edited = tmp_path / "edited"
    shutil.copytree(lora_run, edited, ignore=shutil.ignore_patterns("eval"))
    config = json.loads((edited / "config.json").read_text())
    config["param"]["r"] = 2
    (edited / "config.json").write_text(json.dumps(config))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")

    out = tmp_path / "outputs"
    cases = {
        "missing workdir": ("export", "--workdir", str(tmp_path / "nowhere"), "--out"),
        "no checkpoint": ("export", "--workdir", str(no_checkpoint), "--out"),
        "unknown step": ("export", "--workdir", str(lora_run), "--step", "5", "--out"),
        "peft of fft": ("export", "--workdir", str(fft_run), "--peft", "--out"),
        "does not fit": ("export", "--workdir", str(edited), "--out"),
        "evaluate missing": ("evaluate", "--workdir", str(tmp_path / "nowhere"), "--out"),
        "evaluate unknown step": ("evaluate", "--workdir", str(lora_run), "--step", "3",
                                  "--out"),
    }
    expected = {"missing workdir": "does not exist", "no checkpoint": "no checkpoint",
                "unknown step": "available steps: 4, 6", "peft of fft": "drop --peft",
                "does not fit": "does not fit", "evaluate missing": "does not exist",
                "evaluate unknown step": "available steps: 4, 6"}
    # All at once: most of the time is interpreter start-up.
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", f"jaxsftdpo.{args[0]}", *args[1:], str(out / name)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for name, args in cases.items()}
    procs["out not empty"] = subprocess.Popen(
        [sys.executable, "-m", "jaxsftdpo.export", "--workdir", str(lora_run), "--out",
         str(occupied)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    expected["out not empty"] = "--overwrite"
    # And the happy paths of both commands, alongside.
    good = {"export": subprocess.Popen(
        [sys.executable, "-m", "jaxsftdpo.export", "--workdir", str(lora_run), "--peft",
         "--step", "4", "--out", str(tmp_path / "cli_peft")], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=REPO),
        "evaluate": subprocess.Popen(
        [sys.executable, "-m", "jaxsftdpo.evaluate", "--workdir", str(lora_run), "--out",
         str(tmp_path / "cli_eval")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=REPO)}
    for name, proc in good.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, stderr)
    assert {p.name for p in (tmp_path / "cli_peft").iterdir()} == {
        PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, "base", "byte_tokenizer.json"}
    results = json.loads((lora_run / "results.json").read_text())["final"]
    cli_results = json.loads((tmp_path / "cli_eval" / "results.json").read_text())
    assert (cli_results["accuracy"], cli_results["f1"]) == (results["accuracy"], results["f1"])

    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert expected[name] in lines[0], (name, lines[0])
    assert not out.exists(), list(out.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cli_eval", "cli_peft", "edited", "no_checkpoint", "occupied"]
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert not (lora_run / "eval" / "step_3").exists()


def test_model_export_cli_and_bad_input_one_line_exit_2(lora_run, tiny_gguf, tmp_path):
    gguf_path = tiny_gguf["F32"]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    out = tmp_path / "outputs"
    cases = {
        "both": (["--workdir", str(lora_run), "--model", str(gguf_path), "--out",
                  str(out / "both")], "exclude each other"),
        "neither": (["--out", str(out / "neither")], "--workdir or --model is required"),
        "missing gguf": (["--model", str(tmp_path / "nowhere.gguf"), "--out",
                          str(out / "missing_gguf")], "does not exist"),
        "missing directory": (["--model", str(tmp_path / "nowhere"), "--out",
                               str(out / "missing_dir")], "does not exist"),
        "peft of a model": (["--model", str(gguf_path), "--peft", "--out", str(out / "peft")],
                            "--peft and --step"),
        "out not empty": (["--model", str(gguf_path), "--out", str(occupied)], "--overwrite"),
    }

    def start(args):
        return subprocess.Popen([sys.executable, "-m", "jaxsftdpo.export", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)

    # All at once: most of the time is interpreter start-up.
    procs = {name: start(args) for name, (args, _) in cases.items()}
    good = start(["--model", str(gguf_path.parent), "--out", str(tmp_path / "cli_hf")])
    _, stderr = good.communicate(timeout=120)
    assert good.returncode == 0, stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "cli_hf").iterdir()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert cases[name][1] in lines[0], (name, lines[0])
    assert not out.exists(), list(out.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli_hf", "occupied"]
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
