"""Model FLOPs per token against hand counts, the MFU ratio, and the peak FLOP/s lookup."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from jaxsftdpo import flops
from jaxsftdpo.models import gpt2, llama


def test_gpt2_flops_per_token_by_hand():
    config = gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    per_layer = (32 * 96       # c_attn: q, k, v
                 + 32 * 32     # attn.c_proj
                 + 32 * 128    # mlp.c_fc (4 x 32 wide)
                 + 128 * 32)   # mlp.c_proj
    weights = 2 * per_layer + 64 * 32            # + the (tied) LM head; wte / wpe lookups not
    assert weights == 26_624
    attention = 2 * 2 * 2 * 4 * 8 * 16           # 2 * 2 * layers * heads * head dim * 16
    assert flops.model_flops_per_token(config, 16) == 6 * weights + 3 * attention == 172_032
    assert flops.model_flops_per_token(config, 16, training=False) == 2 * weights + attention


def test_llama_flops_per_token_by_hand():
    """Grouped queries make k and v narrower; the gated MLP has three matrices."""
    config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=32)
    per_layer = (32 * 32           # q_proj: 4 heads x 8
                 + 2 * 32 * 16     # k_proj, v_proj: 2 heads x 8
                 + 32 * 32         # o_proj
                 + 3 * 32 * 48)    # gate_proj, up_proj, down_proj
    weights = 2 * per_layer + 64 * 32            # + the untied lm_head
    assert weights == 17_408
    attention = 2 * 2 * 2 * 4 * 8 * 16
    assert flops.model_flops_per_token(config, 16) == 6 * weights + 3 * attention == 116_736


def test_mfu_is_achieved_over_peak():
    assert flops.mfu(tokens_per_s=1000.0, flops_per_token=2e9, peak=1e13) == pytest.approx(0.2)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12)])
def test_peak_of_known_accelerators(monkeypatch, kind, peak):
    monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(device_kind=kind)])
    assert flops.device_peak_flops() == peak
    assert flops.device_peak_flops(override=1e12) == 1e12


def test_cpu_peak_is_measured_once_for_all_its_devices():
    """conftest's 8 CPU devices share the process's cores: their peak is the one measured rate."""
    measured = flops.device_peak_flops()
    assert measured > 0
    assert flops.measured_matmul_flops() == measured        # cached, not measured again
    assert jax.device_count() > 1 and flops.peak_flops() == measured


def test_cpu_peak_is_measured_in_the_compute_dtype(monkeypatch):
    """A bfloat16 run's MFU is over a bfloat16 matmul's rate, which AMX CPUs run several times
    faster than float32's."""
    rates = {jnp.dtype(jnp.float32): 1e11, jnp.dtype(jnp.bfloat16): 4e11}
    monkeypatch.setattr(flops, "measured_matmul_flops", lambda dtype: rates[jnp.dtype(dtype)])
    assert flops.device_peak_flops() == 1e11
    assert flops.peak_flops(dtype=jnp.bfloat16) == 4e11
    assert flops.peak_flops(override=2e12, dtype=jnp.bfloat16) == 2e12
