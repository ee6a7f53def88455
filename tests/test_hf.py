"""Hugging Face I/O: logits parity with transformers, the checkpoint layouts, sharded loading
and the one-line errors."""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel
from transformers import GPT2Config as HFGPT2Config

from jaxsftdpo.errors import UserError
from jaxsftdpo.models import from_pretrained, gpt2, hf, load_config, save_pretrained

TINY = dict(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=99, eos_token_id=99)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(HFGPT2Config(**TINY)).eval()
    with torch.no_grad():  # move layer norms off 1/0 so a mixed-up mapping shows
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(directory)
    return directory


def padded_batch():
    """Row 0 full, row 1 left-padded, row 2 right-padded."""
    input_ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, :4] = 0
    mask[2, 7:] = 0
    return input_ids, mask


def hf_logits(model, input_ids, mask):
    position_ids = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(position_ids))
    return out.logits.float().numpy()


def assert_same_logits(ours, hf_model):
    input_ids, mask = padded_batch()
    got = np.asarray(ours(jnp.asarray(input_ids), jnp.asarray(mask)))
    want = hf_logits(hf_model, input_ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4)


def params_by_hf_name(model):
    return {gpt2.hf_name(path): variable.get_value()
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def write_checkpoint(directory, hf_dir, tensors, **config_changes):
    """A checkpoint with `hf_dir`'s config.json (changed as asked) and `tensors`."""
    directory.mkdir()
    config = json.loads((hf_dir / "config.json").read_text()) | config_changes
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def assert_transformers_loads_cleanly(directory):
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


# ---- parity and layouts ---------------------------------------------------------------------

def test_logits_match_transformers_with_left_and_right_padding(hf_model, hf_dir):
    model = from_pretrained(hf_dir)
    assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32
    assert_same_logits(model, hf_model)


def test_gradients_match_transformers(hf_model, hf_dir):
    """Every parameter's gradient of a padded batch's cross-entropy (the tied embedding's
    included) equals transformers': the matmuls' hand-written gradients are right."""
    input_ids, mask = padded_batch()
    # Tokens predicted from a real position: a padding query's output is unspecified.
    scored = (mask[:, 1:] & mask[:, :-1]).astype(bool)
    graphdef, params = nnx.split(from_pretrained(hf_dir))

    def loss(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(input_ids), jnp.asarray(mask))
        logps = jax.nn.log_softmax(logits[:, :-1])
        picked = jnp.take_along_axis(logps, jnp.asarray(input_ids)[:, 1:, None], -1)[..., 0]
        return -(picked * scored).sum()

    grads = jax.jit(jax.grad(loss))(params)
    reference = copy.deepcopy(hf_model)
    logits = reference(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits
    logps = torch.log_softmax(logits[:, :-1], -1)
    picked = torch.gather(logps, 2, torch.tensor(input_ids)[:, 1:, None])[..., 0]
    (-(picked * torch.tensor(scored)).sum()).backward()
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(expected)
    for path, grad in flat:
        name = gpt2.hf_name(path)
        np.testing.assert_allclose(grad[...], expected[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_saved_model_loads_in_transformers(hf_model, hf_dir, tmp_path):
    save_pretrained(from_pretrained(hf_dir), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    assert_same_logits(from_pretrained(tmp_path / "out"), hf_model)
    reloaded = assert_transformers_loads_cleanly(tmp_path / "out")
    input_ids, mask = padded_batch()
    np.testing.assert_allclose(hf_logits(reloaded, input_ids, mask),
                               hf_logits(hf_model, input_ids, mask), rtol=0, atol=1e-5)


def test_own_sharded_save_loads_in_transformers_and_back(hf_model, hf_dir, tmp_path):
    out = tmp_path / "out"
    save_pretrained(from_pretrained(hf_dir), out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 1 and all((out / f).is_file() for f in shard_files)
    assert not (out / "model.safetensors").exists()
    assert_transformers_loads_cleanly(out)
    assert_same_logits(from_pretrained(out), hf_model)


def test_saving_over_a_sharded_save_drops_stale_shards(hf_dir, tmp_path):
    model = from_pretrained(hf_dir)
    save_pretrained(model, tmp_path / "out", max_shard_bytes=20_000)
    save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


def test_failed_save_leaves_nothing_behind(hf_dir, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(hf, "save_file", disk_full)
    with pytest.raises(OSError):
        save_pretrained(from_pretrained(hf_dir), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_sharded_transformers_checkpoint_loads(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_logits(from_pretrained(tmp_path), hf_model)


def test_keys_without_transformer_prefix_load(hf_model, hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    old_style = {key.removeprefix("transformer."): value for key, value in tensors.items()}
    assert "h.0.attn.c_attn.weight" in old_style
    assert_same_logits(from_pretrained(write_checkpoint(tmp_path / "old", hf_dir, old_style)),
                       hf_model)


def test_bf16_checkpoint_loads_as_its_values_in_param_dtype(hf_model, tmp_path):
    bf16_model = copy.deepcopy(hf_model).to(torch.bfloat16)
    bf16_model.save_pretrained(tmp_path / "bf16")
    want = {key: tensor.float().numpy() for key, tensor in bf16_model.state_dict().items()}
    for name, value in params_by_hf_name(from_pretrained(tmp_path / "bf16")).items():
        assert value.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(value), want[name])

    model = from_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16)
    assert {v.dtype for v in params_by_hf_name(model).values()} == {jnp.dtype(jnp.bfloat16)}
    save_pretrained(model, tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved/config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {str(t.dtype) for t in load_file(tmp_path / "resaved/model.safetensors").values()} \
        == {"bfloat16"}


def test_sharded_load_places_each_param_as_asked(hf_model, hf_dir):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    def sharding_of(path, shape):
        matrix = path[-1] in ("kernel", "embedding")
        return NamedSharding(mesh, PartitionSpec("data", "model") if matrix
                             else PartitionSpec("model"))

    model = from_pretrained(hf_dir, shardings=sharding_of)
    reference = params_by_hf_name(from_pretrained(hf_dir))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(sharding_of(path, value.shape), value.ndim), path
        assert len(value.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(value), reference[gpt2.hf_name(path)])
    assert_same_logits(model, hf_model)


def test_pytorch_bin_needs_allow_pickle(hf_model, hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="allow_pickle=True"):
        from_pretrained(tmp_path)
    assert_same_logits(from_pretrained(tmp_path, allow_pickle=True), hf_model)


def test_load_config_gives_family_and_config(hf_dir):
    family, config = load_config(hf_dir, param_dtype=jnp.bfloat16)
    assert family is gpt2
    assert (config.n_embd, config.n_layer, config.param_dtype) == (32, 2, jnp.bfloat16)


@pytest.mark.parametrize("name, expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_named_sizes_have_hf_parameter_counts(name, expected):
    abstract = nnx.eval_shape(lambda: gpt2.build(gpt2.GPT2Config.named(name)))
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(p, jax.ShapeDtypeStruct) for p in params)  # nothing allocated
    assert sum(p.size for p in params) == expected


# ---- errors ---------------------------------------------------------------------------------

def assert_user_error(call, *fragments):
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_directory_config_or_weights(hf_dir, tmp_path):
    assert_user_error(lambda: from_pretrained(tmp_path / "nope"), "nope", "not a directory")
    assert_user_error(lambda: from_pretrained(tmp_path), "no config.json")
    shutil.copy(hf_dir / "config.json", tmp_path)
    assert_user_error(lambda: from_pretrained(tmp_path), "no weights", "model.safetensors")


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_user_error(lambda: from_pretrained("no-such-org/no-such-model"),
                      "no-such-org/no-such-model", "Hugging Face Hub")


def test_unsupported_model_type(hf_dir, tmp_path):
    directory = write_checkpoint(tmp_path / "bert", hf_dir, load_file(hf_dir / "model.safetensors"),
                                 model_type="bert")
    assert_user_error(lambda: from_pretrained(directory), "'bert'", "gpt2")


def test_missing_key_is_named(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    directory = write_checkpoint(tmp_path / "ckpt", hf_dir, tensors)
    assert_user_error(lambda: from_pretrained(directory), "transformer.h.1.mlp.c_fc.bias",
                      "1 tensor(s)")


def test_unexpected_key_is_named(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["transformer.h.0.attn.q_norm.weight"] = np.ones(32, np.float32)
    directory = write_checkpoint(tmp_path / "ckpt", hf_dir, tensors)
    assert_user_error(lambda: from_pretrained(directory), "transformer.h.0.attn.q_norm.weight")


def test_wrong_shape_is_named(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((32, 31), np.float32)
    directory = write_checkpoint(tmp_path / "ckpt", hf_dir, tensors)
    assert_user_error(lambda: from_pretrained(directory), "transformer.h.0.attn.c_proj.weight",
                      "(32, 31)", "(32, 32)")
