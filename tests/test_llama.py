"""The Llama-style family (llama, mistral, qwen2, qwen3): logits, saving, generation, LoRA and
PEFT, meshes and the one-line errors, against tiny random transformers models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxsftdpo import generate as gen
from jaxsftdpo import lora, peft_export, runs, trainer
from jaxsftdpo.errors import UserError
from jaxsftdpo.models import from_pretrained, llama, save_pretrained
from testing import quickstart_config

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-untied-llama3-rope": (transformers.LlamaConfig,
                                 dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-linear-rope-biases": (transformers.LlamaConfig,
                                 dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                      attention_bias=True, mlp_bias=True)),
    "mistral-sliding-window": (transformers.MistralConfig, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),
}


def hf_model(name, seed=0):
    config_class, changes = CASES[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config_class(**SMALL, **changes), attn_implementation="eager").eval()
    with torch.no_grad():  # move norms off 1 and biases off 0 so a mixed-up mapping shows
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, its directory, our model loaded from it)."""
    reference = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory)
    return reference, directory, from_pretrained(directory)


def batch(padded: bool, shape=(3, 12), seed=0):
    ids = np.random.default_rng(seed).integers(0, VOCAB, shape)
    mask = np.ones(shape, np.int64)
    if padded:
        mask[1, :4] = 0  # left padding
        mask[2, 9:] = 0  # right padding
    return ids, mask


def hf_logits(model, ids, mask):
    position_ids = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(position_ids)).logits.float().numpy()


def assert_same_logits(got, want, mask):
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(pair, padded):
    reference, _, model = pair
    ids, mask = batch(padded)
    assert_same_logits(model(jnp.asarray(ids), jnp.asarray(mask)), hf_logits(reference, ids, mask),
                       mask)


def test_saved_model_loads_in_transformers_with_the_same_logits(pair, tmp_path):
    reference, _, model = pair
    save_pretrained(model, tmp_path / "out")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert type(reloaded) is type(reference)
    ids, mask = batch(True)
    assert_same_logits(hf_logits(reloaded.eval(), ids, mask), hf_logits(reference, ids, mask),
                       mask)


def test_sharded_checkpoint_loads(pair, tmp_path):
    reference, _, model = pair
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids, mask = batch(True)
    np.testing.assert_array_equal(from_pretrained(tmp_path)(ids, mask), model(ids, mask))


def test_greedy_generation_matches_transformers(pair):
    reference, _, model = pair
    lengths = [5, 9, 3]
    ids = np.zeros((3, 9), np.int64)
    mask = np.zeros((3, 9), np.int64)
    rng = np.random.default_rng(1)
    for row, n in enumerate(lengths):
        ids[row, 9 - n:], mask[row, 9 - n:] = rng.integers(3, VOCAB, n), 1
    eos = SMALL["eos_token_id"]  # transformers pads a finished row with pad = eos, as we do
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                      do_sample=False, max_new_tokens=32, eos_token_id=eos,
                                      pad_token_id=eos).numpy()[:, ids.shape[1]:]
    expected = np.pad(expected, ((0, 0), (0, 32 - expected.shape[1])), constant_values=eos)
    tokens = gen.generate(model, ids, mask, max_new_tokens=32, eos_token_id=eos)
    np.testing.assert_array_equal(tokens, expected)
    assert len(np.unique(tokens)) >= 4


def test_config_round_trips_through_config_json():
    hf = transformers.LlamaConfig(**SMALL, rope_scaling=LLAMA3_ROPE).to_dict()
    config = llama.LlamaConfig.from_hf(hf)
    assert dict(config.rope_scaling)["rope_type"] == "llama3"
    assert llama.LlamaConfig.from_hf(config.to_hf()) == config
    # the pre-transformers-5 layout: top-level rope_theta and rope_scaling with `type`
    old = {**SMALL, "model_type": "llama", "rope_theta": 5e5,
           "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert llama.LlamaConfig.from_hf(old).rope_scaling == (("factor", 4.0), ("rope_type", "linear"))
    assert llama.LlamaConfig.from_hf(old).rope_theta == 5e5


# ---- LoRA and PEFT --------------------------------------------------------------------------

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_adapter_b(model, seed=2):
    adapted = [m.lora for m in lora.linear_modules(model).values() if m.lora is not None]
    for key, adapter in zip(jax.random.split(jax.random.key(seed), len(adapted)), adapted):
        adapter.lora_b[...] = 0.1 * jax.random.normal(key, adapter.lora_b.shape)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    reference = hf_model("llama-untied-llama3-rope")
    directory = tmp_path_factory.mktemp("untied")
    reference.save_pretrained(directory)
    return reference, directory


def test_all_linear_adapts_attention_and_mlp_never_the_head(untied):
    _, directory = untied
    model = from_pretrained(directory)
    adapted = lora.apply_lora(model, r=4, alpha=8)
    assert sorted(adapted) == sorted(
        f"layers.{i}.{part}.{name}" for i in range(2)
        for part, names in (("self_attn", ALL_LINEAR[:4]), ("mlp", ALL_LINEAR[4:]))
        for name in names)


def test_lora_matches_peft_and_its_export_loads_in_peft(untied, tmp_path):
    peft = pytest.importorskip("peft")
    reference, directory = untied
    model = from_pretrained(directory)
    lora.apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    randomize_adapter_b(model)
    peft_export.save_peft_adapters(model, tmp_path / "adapters", alpha=8)
    config = json.loads((tmp_path / "adapters/adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ALL_LINEAR)
    assert config["fan_in_fan_out"] is False
    peft_model = peft.PeftModel.from_pretrained(hf_model("llama-untied-llama3-rope"),
                                                tmp_path / "adapters", is_trainable=True).eval()
    ids, mask = batch(False)
    logits = peft_model(torch.tensor(ids)).logits
    np.testing.assert_allclose(model(ids), logits.detach().numpy(), atol=1e-4)

    logits.logsumexp(-1).sum().backward()
    graphdef, trainable, frozen = lora.split_trainable(model, "lora")
    grads = nnx.merge(graphdef, jax.grad(
        lambda t: jax.nn.logsumexp(nnx.merge(graphdef, t, frozen)(ids), -1).sum())(trainable),
        frozen)
    inner = peft_model.base_model.model.model
    for path, linear in lora.linear_modules(grads).items():
        peft_layer = inner.get_submodule(path)
        for ours, theirs in ((linear.lora.lora_a, peft_layer.lora_A["default"]),
                             (linear.lora.lora_b, peft_layer.lora_B["default"])):
            np.testing.assert_allclose(ours[...].T, theirs.weight.grad, rtol=1e-4, atol=1e-6,
                                       err_msg=path)


# ---- the trainer on meshes ------------------------------------------------------------------

TINY_INIT = dict(model_type="llama", vocab_size=257, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, bos_token_id=256, eos_token_id=256,
                 tie_word_embeddings=False)


def tiny_llama_config(**mesh):
    c = quickstart_config(**{"model.init": mlc.ConfigDict(TINY_INIT), "data.n_train": 64,
                             "data.n_dev": 16, "data.eval_batch_size": 16, "log_every": 1})
    for stage in c.stages:
        stage.update(epochs=0, steps=2, batch_size=16, warmup_steps=0)
    c.mesh.update(**mesh)
    return c


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("llama_one_device")
    trainer.train_and_evaluate(tiny_llama_config(data=1), workdir, devices=jax.devices()[:1])
    return losses(workdir)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_meshes_give_the_losses_of_one_device(tmp_path, one_device_losses, shape):
    config = tiny_llama_config(data=shape[0], fsdp=shape[1], tensor=shape[2])
    trainer.train_and_evaluate(config, tmp_path)
    got = losses(tmp_path)
    assert len(got) == len(one_device_losses) == 4  # 2 SFT + 2 DPO steps
    np.testing.assert_allclose(got, one_device_losses, rtol=1e-5)


# ---- one-line errors ------------------------------------------------------------------------

def test_unsupported_rope_type_is_one_line(tmp_path):
    config = {**SMALL, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope scaling type 'yarn' is not supported"):
        from_pretrained(tmp_path)


def test_tensor_axis_must_divide_the_key_value_heads():
    config = tiny_llama_config(data=1, tensor=4)  # 4 query heads but 2 key/value heads
    with pytest.raises(UserError, match="tensor=4 does not divide the model's 2 key/value"):
        runs.build_run(config, devices=jax.devices()[:4])


def test_train_cli_mesh_error_exits_2_and_writes_nothing(tmp_path):
    config_file = tmp_path / "tiny_llama.py"
    config_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_llama import tiny_llama_config\n"
        "def get_config():\n"
        "    return tiny_llama_config(data=1, tensor=4)\n")
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "jaxsftdpo.train", f"--config={config_file}",
         f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ,
             "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "key/value heads" in lines[0], result.stderr
    assert not workdir.exists()
