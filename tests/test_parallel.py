"""Past one device: the pmap step equals the jit step, FSDP divides memory, remat, logits
at scored positions only and logits in chunks change nothing.

Eight CPU devices (tests/conftest.py); tiny GPT-2s so every case compiles in seconds.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsftdpo import runs, sharding, steps, trainer
from jaxsftdpo.config import stage
from jaxsftdpo.errors import UserError
from testing import ONE_LAYER, tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py

N = 4  # devices of the data-parallel comparisons


def quickstart_config(**model):
    """The one-layer quickstart, 2 SFT and 2 DPO steps; `model` changes `config.model.init`."""
    return tiny_config(2, 2, batch_size=8, grad_accum=2, **{
        **ONE_LAYER, "model.dropout": False, **{f"model.init.{k}": v for k, v in model.items()}})


def random_batch(kind, accum=2, rows=8, length=16, seed=0):
    """`[accum, rows, length]` arrays with right padding and a prompt before each completion."""
    rng = np.random.default_rng(seed)

    def side():
        ids = rng.integers(0, 257, (accum, rows, length), dtype=np.int32)
        lengths = rng.integers(6, length + 1, (accum, rows))
        prompt = rng.integers(2, 5, (accum, rows))
        pos = np.arange(length)
        mask = pos < lengths[..., None]
        return ids, mask, mask & (pos >= prompt[..., None])

    if kind == "sft":
        return dict(zip(("input_ids", "attention_mask", "loss_mask"), side()))
    batch = {}
    for name in ("chosen", "rejected"):
        for key, value in zip(("input_ids", "attention_mask", "loss_mask"), side()):
            batch[f"{name}_{key}"] = value
    return batch


def build(param, mesh_shape, devices, logits_chunk=0, **model):
    config = quickstart_config(**model)
    config.param.kind = param
    config.model.logits_chunk = logits_chunk
    mesh = sharding.make_mesh(mesh_shape, devices)
    _, _, graphdef, trainable, frozen = runs.build_model(config, mesh)
    if param == "lora":  # B = 0 at init would make the adapters' first gradients trivial
        trainable = jax.tree.map(lambda x: x + 0.01, trainable)
    return config, mesh, graphdef, trainable, frozen


# Each stage kind's train-step settings; DPO with its SFT term and a frozen-copy reference.
SETTINGS = {"sft": None,
            "dpo": steps.DPOSettings(beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                                     sft_weight=0.5, reference="frozen_copy"),
            "orpo": steps.ORPOSettings(beta=0.1),
            "simpo": steps.SimPOSettings(beta=2.0, gamma=0.5, label_smoothing=0.1)}


def run_steps(make, kind, graphdef, trainable, frozen, mesh, batches):
    st = stage(kind, steps=10, learning_rate=1e-2, max_grad_norm=0.0)
    tx, _ = steps.make_optimizer(st, 10)
    trainable = jax.tree.map(jnp.copy, trainable)
    ref = jax.tree.map(jnp.copy, trainable) if kind == "dpo" else None
    state = steps.TrainState(jnp.zeros((), jnp.int32), trainable, jax.jit(tx.init)(trainable))
    # Every leaf on the whole mesh (scalars start on one device), and the jit step told to
    # return the same shardings, so neither mode compiles its step twice.
    shardings = jax.tree.map(lambda x: x.sharding if len(x.sharding.device_set) == mesh.size
                             else sharding.replicated(mesh), state)
    state = jax.device_put(state, shardings)
    step = make(kind, graphdef, tx, SETTINGS[kind], shardings)
    history = []
    for batch in batches:
        state, metrics = step(state, frozen, ref, sharding.place_batch(batch, mesh, leading=1),
                              None)
        history.append(jax.device_get(metrics))
    return history, jax.device_get(state.trainable)


# The reference-free kinds share DPO's step but for their objective: one parameterization each.
@pytest.mark.parametrize("kind,param", [(kind, param) for kind in ("sft", "dpo")
                                        for param in ("fft", "lora")]
                         + [("orpo", "fft"), ("simpo", "lora")])
def test_pmap_step_equals_jit_step(kind, param):
    devices = jax.devices()[:N]
    _, mesh, graphdef, trainable, frozen = build(param, dict(data=N, fsdp=1, tensor=1), devices)
    # Uneven masks: a device's share of tokens differs from 1/N, so only global normalisers
    # give the jit losses.
    batches = [random_batch(kind, seed=s) for s in range(2)]
    pmap = lambda *a: steps.make_pmap_train_step(*a[:4], devices=devices)
    jit_hist, jit_params = run_steps(steps.make_train_step, kind, graphdef, trainable, frozen,
                                     mesh, batches)
    pmap_hist, pmap_params = run_steps(pmap, kind, graphdef, trainable, frozen, mesh, batches)
    for j, p in zip(jit_hist, pmap_hist):
        assert set(j) == set(p)
        for name in j:
            # Rewards are beta times differences of log-prob sums of a few hundred nats, so
            # float32 rounds them to about 1e-6 absolute, however small the difference.
            np.testing.assert_allclose(p[name], j[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert jit_hist[1]["loss"] != jit_hist[0]["loss"]  # the second step saw updated weights
    # Adam turns a gradient that is zero up to rounding (a key bias: softmax ignores it) into
    # a step of +-lr whose sign is noise, so parameters agree to a small fraction of lr = 1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5),
                 jit_params, pmap_params)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
@pytest.mark.parametrize("param", ["fft", "lora"])
def test_logits_at_scored_positions_only_change_nothing(kind, param):
    """The LM head run only where completion tokens are scored (`scored_tokens`: the most
    that a row of the batches scores, fewer than T - 1 = 15) gives the losses, metrics and
    updates of the full head, on a mesh that shards rows and parameters."""
    devices = jax.devices()[:4]
    _, mesh, graphdef, trainable, frozen = build(param, dict(data=2, fsdp=2, tensor=1), devices)
    batches = [random_batch(kind, seed=s) for s in range(2)]
    most = max(int(v[..., 1:].sum(-1).max()) for batch in batches
               for k, v in batch.items() if k.endswith("loss_mask"))
    assert most < 15
    full_hist, full_params = run_steps(steps.make_train_step, kind, graphdef, trainable, frozen,
                                       mesh, batches)
    scored = lambda *a: steps.make_train_step(*a, scored_tokens=most)
    hist, params = run_steps(scored, kind, graphdef, trainable, frozen, mesh, batches)
    # The second step starts from Adam's first update, g / (|g| + eps): where a gradient is
    # near eps the two heads' rounding (1e-7) moves a weight by up to a few percent of lr =
    # 1e-2, and the second step's gradient norm by about 1e-4 (on one device too).
    for (rtol, atol), want, got in zip(((1e-5, 1e-6), (1e-3, 1e-5)), full_hist, hist):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3),
                 full_params, params)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
@pytest.mark.parametrize("param", ["fft", "lora"])
@pytest.mark.parametrize("scored_only", [False, True])
def test_logits_in_chunks_give_the_loss_metrics_and_gradients_of_the_whole(kind, param,
                                                                          scored_only):
    """`model.logits_chunk` = 4, which does not divide the T - 1 = 15 scored positions, alone
    and with `scored_tokens`, on a mesh that shards rows and parameters. Gradients are
    compared, not updates: Adam divides each entry by its own size, so it turns the rounding
    of a gradient entry near zero into a visible difference."""
    devices = jax.devices()[:4]
    mesh_shape = dict(data=2, fsdp=2, tensor=1)
    _, mesh, graphdef, trainable, frozen = build(param, mesh_shape, devices)
    chunked = build(param, mesh_shape, devices, logits_chunk=4)[2]
    host_batch = random_batch(kind, seed=1)
    most = max(int(v[..., 1:].sum(-1).max()) for k, v in host_batch.items()
               if k.endswith("loss_mask"))
    assert most < 15
    scored_tokens = most if scored_only else None
    batch = sharding.place_batch(host_batch, mesh, leading=1)
    ref = trainable if kind == "dpo" else None

    def grads(graphdef):
        loss_fn = steps.loss_function(kind, graphdef, SETTINGS[kind], scored_tokens)
        norm = steps.normalisers(kind, batch)
        run = jax.jit(lambda t: steps.accumulated_grads(loss_fn, t, frozen, ref, batch, None,
                                                        norm))
        return jax.device_get(run(trainable))

    (want_grads, want), (got_grads, got) = grads(graphdef), grads(chunked)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale),
                 want_grads, got_grads)


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "loss" in r]


def test_trainer_pmap_mode_matches_jit_mode(tmp_path):
    """SFT then DPO (frozen-copy reference) through train_and_evaluate in both modes."""
    out = {}
    for mode in ("jit", "pmap"):
        config = quickstart_config()
        config.parallel.mode = mode
        trainer.train_and_evaluate(config, tmp_path / mode, devices=jax.devices()[:N])
        out[mode] = _losses(tmp_path / mode)
    assert [r[:2] for r in out["jit"]] == [r[:2] for r in out["pmap"]] and len(out["jit"]) == 4
    np.testing.assert_allclose([r[2] for r in out["pmap"]], [r[2] for r in out["jit"]],
                               rtol=1e-5)
    assert abs(out["jit"][2][2] - np.log(2)) < 1e-5  # DPO starts at log 2


def test_pmap_bad_input(tmp_path):
    config = quickstart_config()
    config.parallel.mode = "pmap"
    config.mesh.update(data=-1, fsdp=2)
    with pytest.raises(UserError, match="fsdp=1") as e:
        trainer.train_and_evaluate(config, tmp_path / "a", devices=jax.devices()[:N])
    assert "\n" not in str(e.value)
    config.mesh.update(data=-1, fsdp=1)
    config.stages[0].batch_size = 6
    config.stages[0].grad_accum = 1
    with pytest.raises(UserError, match="multiple of 4"):
        trainer.train_and_evaluate(config, tmp_path / "b", devices=jax.devices()[:N])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    step = steps.make_pmap_train_step("sft", None, None, None, devices=jax.devices()[:N])
    with pytest.raises(UserError, match="multiple of 4"):
        step(None, None, None, random_batch("sft", rows=6), None)


def _bytes_per_device(tree):
    out = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@pytest.mark.parametrize("param", ["fft", "lora"])
def test_fsdp_divides_params_and_optimizer_state(param):
    config, mesh, graphdef, trainable, frozen = build(
        param, dict(data=1, fsdp=8, tensor=1), jax.devices(), n_embd=128, vocab_size=256)
    st = stage("sft", steps=2, learning_rate=1e-3)
    tx, _ = steps.make_optimizer(st, 2)
    state = steps.TrainState(jnp.zeros((), jnp.int32), trainable, jax.jit(tx.init)(trainable))
    step = steps.make_train_step("sft", graphdef, tx, None)
    state, _ = step(state, frozen, None,
                    sharding.place_batch(random_batch("sft", rows=8), mesh, leading=1), None)
    params = {"fft": state.trainable, "lora": (state.trainable, frozen)}[param]
    for name, tree in (("params", params), ("optimizer state", state.opt_state)):
        total = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
        per_device = _bytes_per_device(tree)
        assert len(per_device) == 8
        worst = max(per_device.values())
        assert worst <= 1.15 * total / 8, (name, worst, total / 8)


@pytest.mark.parametrize("param", ["fft", "lora"])
def test_remat_gives_same_loss_and_gradients(param):
    """Remat on/off inside gradient accumulation (2 micro-batches), with dropout on; with LoRA
    the frozen base weights are constants of the outer trace inside the recomputed block."""
    devices = jax.devices()[:2]
    out = []
    for remat in (False, True):
        config = quickstart_config()
        config.model.remat = remat
        config.param.kind = param
        mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1), devices)
        _, _, graphdef, trainable, frozen = runs.build_model(config, mesh)
        batch = sharding.place_batch(random_batch("sft"), mesh, leading=1)
        loss_fn = lambda *a: steps.sft_loss(*a, graphdef=graphdef)
        fn = jax.jit(lambda t, f, b, r: steps.accumulated_grads(
            loss_fn, t, f, None, b, r, steps.normalisers("sft", b)))
        grads, metrics = fn(trainable, frozen, batch, jax.random.key(3))
        text = str(jax.make_jaxpr(fn)(trainable, frozen, batch, jax.random.key(3)))
        out.append((jax.device_get(grads), jax.device_get(metrics), text.count("remat")))
    (g0, m0, r0), (g1, m1, r1) = out
    assert r0 == 0 and r1 > 0  # the blocks really are rematerialised
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_pmap_step_runs_with_dropout():
    """Dropout under pmap: each device folds its index into the key (masks differ from jit's)."""
    devices = jax.devices()[:2]
    _, mesh, graphdef, trainable, frozen = build("fft", dict(data=2, fsdp=1, tensor=1), devices)
    tx, _ = steps.make_optimizer(stage("sft", steps=2), 2)
    state = steps.init_train_state(tx, trainable)
    step = steps.make_pmap_train_step("sft", graphdef, tx, None, devices=devices)
    batch = random_batch("sft", rows=4)
    state, a = step(state, frozen, None, batch, jax.random.key(0))
    assert np.isfinite(float(a["loss"])) and int(state.step) == 1


def test_distributed_is_initialized_only_when_asked(monkeypatch):
    config = quickstart_config()
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    assert not sharding.distributed_requested(config)
    assert not sharding.maybe_initialize_distributed(config)  # a no-op on one process
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert not sharding.distributed_requested(config)  # a single-host TPU VM
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1")
    assert sharding.distributed_requested(config)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert sharding.distributed_requested(config)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    config.parallel.distributed = True
    assert sharding.distributed_requested(config)
    config.parallel.distributed = False
    config.parallel.mode = "pjit"
    with pytest.raises(UserError, match="parallel.mode"):
        runs.build_run(config)
