"""`layers.project`: the matmul every linear layer and LM head goes through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsftdpo.models.layers import project


def operands(dtype, transposed):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 5, 48), dtype)
    w = jax.random.normal(keys[1], (24, 48) if transposed else (48, 24), dtype)
    dy = jax.random.normal(keys[2], (2, 5, 24), dtype)
    return x, w, dy


@pytest.mark.parametrize("transposed", [False, True])
def test_project_and_its_hand_written_gradients_equal_autodiff_of_matmul(transposed):
    x, w, dy = operands(jnp.float32, transposed)
    plain = lambda x, w: x @ (w.T if transposed else w)
    ours, ours_vjp = jax.vjp(lambda x, w: project(x, w, transposed), x, w)
    want, want_vjp = jax.vjp(plain, x, w)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours_vjp(dy), want_vjp(dy)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_half_precision_products_are_summed_in_float32_and_rounded_once(transposed):
    x, w, dy = operands(jnp.bfloat16, transposed)
    out, vjp = jax.vjp(lambda x, w: project(x, w, transposed), x, w)
    exact, exact_vjp = jax.vjp(lambda x, w: project(x, w, transposed),
                               x.astype(jnp.float32), w.astype(jnp.float32))
    for got, want in zip((out, *vjp(dy)), (exact, *exact_vjp(dy.astype(jnp.float32)))):
        assert got.dtype == jnp.bfloat16
        # Within one bfloat16 rounding of the float32 result (2^-8 relative).
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8, atol=1e-6)
    # The speed half of the promise: every product (forward, both gradients) comes out of
    # the dot in float32, the form XLA:CPU runs on AMX and GPUs and TPUs expect.
    loss = lambda x, w: project(x, w, transposed).astype(jnp.float32).sum()
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    results = [line.split("->")[-1].strip() for line in dots]
    assert len(results) == 3 and all(r.endswith("xf32>") for r in results), results
    # And on CPU none sums over its left operand's leading axis (the weight gradient's tokens),
    # the product XLA:CPU would widen to float32 before multiplying.
    assert all("contracting_dims = [1] x" in line for line in dots), dots
