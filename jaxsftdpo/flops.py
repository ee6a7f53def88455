"""Model FLOPs utilisation: model FLOPs per token, the peak FLOP/s of the devices, their ratio.

    flops_per_token = model_flops_per_token(model_config, seq_len)
    utilisation = mfu(tokens_per_s, flops_per_token, peak_flops())

`TPU_CHIPS` holds each Cloud TPU chip's peak compute, memory and bandwidths, for the roofline
of `jaxsftdpo.plan`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsftdpo.models import FAMILIES
from jaxsftdpo.models.layers import Linear

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class TPUChip:
    """One Cloud TPU chip as its documentation gives it (cloud.google.com/tpu/docs/v4, v5e,
    v5p, v6e: "key specifications")."""

    device_kind: str        # what `jax.Device.device_kind` says
    peak_flops: float       # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float    # bytes/s
    ici_bandwidth: float    # bytes/s, bidirectional, all the chip's inter-chip links together


# By the version part of a topology name ("v5e" of "v5e:2x4"), in the order PEAK_FLOPS needs.
TPU_CHIPS = {
    # The v4 page lists no per-chip ICI figure: twice its pod's all-reduce bandwidth (1.1 PB/s)
    # per chip, the ratio v5e's page has between the two (400 GB/s and 51.2 TB/s per 256).
    "v4": TPUChip("TPU v4", 275e12, 32 * GiB, 1200e9, 2 * 1.1e15 / 4096),
    "v5e": TPUChip("TPU v5 lite", 197e12, 16 * GiB, 819e9, 400e9),
    "v5p": TPUChip("TPU v5", 459e12, 95 * GiB, 2765e9, 1200e9),    # "TPU v5p" or "TPU v5"
    "v6e": TPUChip("TPU v6 lite", 918e12, 32 * GiB, 1638e9, 800e9),  # Trillium
}

# Dense bf16 peak FLOP/s of one chip, by the first key found in `device.device_kind`
# ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...): more specific keys come first.
PEAK_FLOPS = {
    **{chip.device_kind: chip.peak_flops for chip in TPU_CHIPS.values()},
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,          # SXM
    "H200": 989e12,
}


def model_flops_per_token(config, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token of a `seq_len`-token sequence, PaLM's convention (appendix B).

    The forward is 2N + 4LHQT: N counts the weights of every matmul a token goes through (each
    `Linear` kernel and the LM head, tied or not; embedding lookups excluded), at 2 FLOPs per
    multiply-add; 4LHQT is attention's QK^T and AV products, 2 * 2 * T * H * Q per layer, for L
    layers, H query heads, head dim Q and T = `seq_len` keys (all T: not halved for the causal
    mask, nor cut to a sliding window). Training counts forward + backward as three forwards:
    6N + 12LHQT.

    It is the model's count, not the hardware's: a LoRA run has the same model FLOPs as full
    fine-tuning (its frozen kernels need no weight gradient, so it computes less), recomputed
    activations are not counted, and neither is a DPO frozen reference's forward. Every token
    counts the LM head, though the train step runs it only where tokens are scored.
    """
    passes = 3 if training else 1
    attention = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return passes * (2 * matmul_weights(config) + attention)


@functools.cache  # configs are frozen dataclasses
def matmul_weights(config) -> int:
    """N: the weights a token is multiplied by, from the shapes of an abstract model of `config`
    (nothing allocated): every `Linear` kernel, and the output embedding."""
    family = next(f for f in FAMILIES.values() if isinstance(config, f.Config))

    def shapes():
        model = family.build(config)
        kernels = [m.kernel[...] for _, m in nnx.iter_graph(model) if isinstance(m, Linear)]
        return kernels, model.head_weight()

    kernels, head = jax.eval_shape(shapes)
    return sum(math.prod(k.shape) for k in kernels) + math.prod(head.shape)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: the model FLOP/s achieved over the `peak` FLOP/s available."""
    return tokens_per_s * flops_per_token / peak


def device_peak_flops(override: float = 0.0, dtype=jnp.float32) -> float:
    """Peak FLOP/s of one device: `override` when > 0; the table's dense bf16 peak for a known
    accelerator; otherwise (CPU, an unknown chip) the measured rate of a matmul of `dtype`
    operands, the compute dtype's (a CPU with bfloat16 matrix units multiplies bfloat16
    several times faster than float32, so a float32 peak would put bfloat16 runs over 100%)."""
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind
    for key, peak in PEAK_FLOPS.items():
        if key in kind:
            return peak
    return measured_matmul_flops(dtype)


def peak_flops(override: float = 0.0, dtype=jnp.float32) -> float:
    """Peak FLOP/s of all the devices a run computes on, every process's: `device_peak_flops`
    times the device count, except on CPU, whose devices (however many
    `--xla_force_host_platform_device_count` makes) share the process's cores, which the
    measured rate already counts."""
    devices = 1 if jax.default_backend() == "cpu" else jax.device_count()
    return device_peak_flops(override, dtype) * devices


def measured_matmul_flops(dtype=jnp.float32, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted `size` x `size` matmul of `dtype` operands summing in float32 (as the
    models' products do) on the default device, best of `repeats` after 50 ms of warm-up (a
    bfloat16 product takes 1.5 ms on an AMX core, whose first milliseconds run at half the
    rate); measured once per process."""
    return _measured_matmul_flops(jnp.dtype(dtype).name, size, repeats)


@functools.cache
def _measured_matmul_flops(dtype: str, size: int, repeats: int) -> float:
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
    warm_until = time.perf_counter() + 0.05
    while time.perf_counter() < warm_until:
        matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
