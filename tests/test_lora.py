import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsftdpo.errors import UserError
from jaxsftdpo.lora import (LoRA, apply_lora, count_params, linear_modules, lora_state,
                            merge_lora, split_trainable)
from jaxsftdpo.models.gpt2 import GPT2, GPT2Config, hf_name

CONFIG = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
ALL_LINEAR = ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj",
              "h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]


def tiny_gpt2() -> GPT2:
    return GPT2(CONFIG, rngs=nnx.Rngs(0))


def input_ids(seed=1, shape=(2, 16)):
    return jax.random.randint(jax.random.key(seed), shape, 0, CONFIG.vocab_size)


def adapters(model) -> dict[str, LoRA]:
    return {path: linear.lora for path, linear in linear_modules(model).items()
            if linear.lora is not None}


def randomize_adapter_b(model, seed=2):
    """Give every B nonzero values so the adapters change the output."""
    keys = jax.random.split(jax.random.key(seed), len(adapters(model)))
    for key, lora in zip(keys, adapters(model).values()):
        lora.lora_b[...] = 0.1 * jax.random.normal(key, lora.lora_b.shape)


def test_adapters_start_as_identity():
    model = tiny_gpt2()
    ids = input_ids()
    before = model(ids)
    apply_lora(model, r=4, alpha=8)
    np.testing.assert_array_equal(model(ids), before)


def test_a_init_matches_peft_kaiming_uniform():
    model = tiny_gpt2()
    apply_lora(model, r=8, alpha=16)
    for path, lora in adapters(model).items():
        bound = 1.0 / math.sqrt(linear_modules(model)[path].in_features)
        a = np.abs(np.asarray(lora.lora_a[...]))
        assert a.max() <= bound and a.max() > 0.8 * bound, path
        assert not np.any(lora.lora_b[...])


def test_forward_computes_in_input_dtype_and_drops_input():
    lora = LoRA(16, 8, r=4, alpha=8, dropout=0.5, rngs=nnx.Rngs(0))
    lora.lora_b[...] = jnp.ones((4, 8))
    x = jax.random.normal(jax.random.key(0), (3, 16))
    expected = x @ lora.lora_a[...] @ lora.lora_b[...] * 2.0
    np.testing.assert_allclose(lora(x), expected, rtol=1e-6)
    assert not np.allclose(lora(x, jax.random.key(1)), expected)
    assert lora(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_merge_matches_unmerged_and_removes_adapters():
    model = tiny_gpt2()
    apply_lora(model, r=4, alpha=8)
    randomize_adapter_b(model)
    ids = input_ids()
    unmerged = model(ids)
    assert merge_lora(model) is model
    np.testing.assert_allclose(model(ids), unmerged, atol=1e-5)
    assert not adapters(model)
    assert not jax.tree.leaves(lora_state(model))


def to_torch(array):
    import torch
    return torch.from_numpy(np.array(array))


def hf_gpt2(model: GPT2):
    """The same weights in transformers' GPT2LMHeadModel."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(**CONFIG.to_hf(), attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    params = hf.state_dict()
    copied = set()
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = hf_name(path)
        params[name].copy_(to_torch(value[...]))
        copied.add(name)
    assert copied == {name for name, _ in hf.named_parameters()}
    return hf


@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_and_adapter_gradients_match_peft(use_rslora):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = tiny_gpt2()
    hf = hf_gpt2(model)
    targets = ["c_attn", "c_proj", "c_fc"]
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, lora_dropout=0.0,
        use_rslora=use_rslora)).eval()
    apply_lora(model, r=4, alpha=8, target_modules=targets, use_rslora=use_rslora)
    randomize_adapter_b(model)
    transformer = peft_model.base_model.model.transformer
    for path, lora in adapters(model).items():
        peft_layer = transformer.get_submodule(path)
        assert lora.scale == peft_layer.scaling["default"]
        with torch.no_grad():
            # PEFT keeps nn.Linear layouts: lora_A.weight [r, in], lora_B.weight [out, r].
            peft_layer.lora_A["default"].weight.copy_(to_torch(lora.lora_a[...].T))
            peft_layer.lora_B["default"].weight.copy_(to_torch(lora.lora_b[...].T))
    ids = input_ids()
    logits = peft_model(to_torch(ids).long()).logits
    np.testing.assert_allclose(model(ids), logits.detach().numpy(), atol=1e-4)

    logits.logsumexp(-1).sum().backward()
    graphdef, trainable, frozen = split_trainable(model, "lora")
    grads = nnx.merge(graphdef, jax.grad(
        lambda t: jax.nn.logsumexp(nnx.merge(graphdef, t, frozen)(ids), -1).sum())(trainable),
        frozen)
    for path, grad in adapters(grads).items():
        peft_layer = transformer.get_submodule(path)
        np.testing.assert_allclose(grad.lora_a[...].T, peft_layer.lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(grad.lora_b[...].T, peft_layer.lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6, err_msg=path)


def test_lora_training_updates_only_adapters():
    model = tiny_gpt2()
    base = nnx.state(model, nnx.Param)
    adapted = apply_lora(model, r=4, alpha=8)
    graphdef, trainable, frozen = split_trainable(model, "lora")
    assert count_params(frozen) == count_params(base)
    for path, variable in nnx.to_flat_state(trainable):
        assert isinstance(variable, nnx.LoRAParam) and path[-1] in ("lora_a", "lora_b")
    ids = input_ids()

    def loss(trainable):
        logits = nnx.merge(graphdef, trainable, frozen)(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    grads = jax.jit(jax.grad(loss))(trainable)
    assert len(jax.tree.leaves(grads)) == 2 * len(adapted)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(trainable)
    # Adam keeps two moments per trainable leaf, plus one step count.
    assert len(jax.tree.leaves(opt_state)) == 2 * len(jax.tree.leaves(trainable)) + 1
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trained = nnx.merge(graphdef, optax.apply_updates(trainable, updates), frozen)

    jax.tree.map(np.testing.assert_array_equal, nnx.state(trained, nnx.Not(nnx.LoRAParam)),
                 base)
    assert any(np.any(lora.lora_b[...]) for lora in adapters(trained).values())


def test_fft_trains_every_param():
    model = tiny_gpt2()
    _, trainable, frozen = split_trainable(model, "fft")
    assert count_params(trainable) == count_params(nnx.state(model, nnx.Param))
    assert not jax.tree.leaves(frozen)


def test_split_rejects_unknown_mode_and_lora_without_adapters():
    with pytest.raises(UserError, match="qlora"):
        split_trainable(tiny_gpt2(), "qlora")
    with pytest.raises(UserError, match="apply_lora"):
        split_trainable(tiny_gpt2(), "lora")


@pytest.mark.parametrize("target_modules, expected", [
    ("all-linear", ALL_LINEAR),
    (r"h\.\d+\.attn\.c_attn", ["h.0.attn.c_attn", "h.1.attn.c_attn"]),
    (r"h\.1\..*", ALL_LINEAR[4:]),
    (["c_proj"], ["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"]),
    (["attn.c_proj", "c_fc"], ["h.0.attn.c_proj", "h.0.mlp.c_fc", "h.1.attn.c_proj",
                               "h.1.mlp.c_fc"]),
])
def test_target_modules_select_paths(target_modules, expected):
    model = tiny_gpt2()
    assert apply_lora(model, r=2, alpha=4, target_modules=target_modules) == expected
    assert list(adapters(model)) == expected


@pytest.mark.parametrize("target_modules", ["c_attn", ["attn"], ["q_proj"]])
def test_target_matching_nothing_is_a_user_error(target_modules):
    # A string is a full-match regex (as in PEFT), so a bare "c_attn" matches no path.
    with pytest.raises(UserError, match=r"matches no linear module.*h\.0\.attn\.c_attn"):
        apply_lora(tiny_gpt2(), r=2, alpha=4, target_modules=target_modules)


def test_adapting_an_adapted_module_is_a_user_error():
    model = tiny_gpt2()
    apply_lora(model, r=2, alpha=4, target_modules=["c_fc"])
    with pytest.raises(UserError, match="already has a LoRA adapter"):
        apply_lora(model, r=2, alpha=4, target_modules=["c_fc"])


def test_trainable_count_is_r_times_in_plus_out():
    model = tiny_gpt2()
    apply_lora(model, r=8, alpha=16)
    d = CONFIG.n_embd
    per_layer = (d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d)  # c_attn, c_proj, c_fc, c_proj
    _, trainable, _ = split_trainable(model, "lora")
    assert count_params(trainable) == 8 * per_layer * CONFIG.n_layer
