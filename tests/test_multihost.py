"""Multi-host on one machine: two processes x 2 CPU devices, gloo collectives over loopback.

The two processes train the same config as one process with 4 devices and give the same
losses; their checkpoint (written by both) restores in one process on 1 device and the run
continues as the uninterrupted 4-device run does.

This file is also the worker: `python tests/test_multihost.py WORKDIR PORT PROCESS_ID STEPS`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import testing

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, LOCAL_DEVICES, STOP_AFTER = 2, 2, 2
TIMEOUT_S = 300

pytestmark = pytest.mark.slow  # two processes, each compiling its own steps


def tiny_config():
    # SFT with dropout (the masks do not depend on how the batch is split over devices), then
    # DPO; the 2-process run stops mid-SFT so the restore picks up optimizer state mid-stage.
    return testing.tiny_config(3, 2, batch_size=8, grad_accum=2, **testing.ONE_LAYER,
                               **{"model.dropout": True, "checkpoint_every": 100})


def worker(workdir: str, port: int, process_id: int, stop_after: int) -> None:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=PROCESSES, process_id=process_id,
                               local_device_ids=list(range(LOCAL_DEVICES)),
                               initialization_timeout=120)
    assert jax.process_count() == PROCESSES and jax.device_count() == PROCESSES * LOCAL_DEVICES
    from jaxsftdpo import sharding
    from jaxsftdpo.trainer import train_and_evaluate
    # Each process feeds its devices only its own half of every global batch.
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    half = 8 // PROCESSES
    assert sharding.process_rows(mesh, 8) == slice(process_id * half, (process_id + 1) * half)
    out = train_and_evaluate(tiny_config(), workdir, stop_after_steps=stop_after)
    assert out == {"stopped_at_step": stop_after}, out
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir: Path) -> list:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "loss" in r]


def test_two_processes_match_one_and_restore_on_one_device(tmp_path):
    import jax
    import numpy as np

    from jaxsftdpo.trainer import train_and_evaluate

    multi = tmp_path / "two_processes"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(multi), str(port), str(i),
                               str(STOP_AFTER)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(PROCESSES)]
    # Meanwhile, the reference: one process, 4 devices, uninterrupted.
    reference = tmp_path / "one_process"
    train_and_evaluate(tiny_config(), reference, devices=jax.devices()[:4])
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-4000:]}"

    ref = _losses(reference)
    two = _losses(multi)
    assert [r[:2] for r in two] == [r[:2] for r in ref[:STOP_AFTER]]
    np.testing.assert_allclose([r[2] for r in two], [r[2] for r in ref[:STOP_AFTER]], rtol=1e-5)
    # Written once: one metrics line per step although two processes trained.
    assert len(two) == STOP_AFTER

    out = train_and_evaluate(tiny_config(), multi, devices=jax.devices()[:1])
    resumed = _losses(multi)
    assert [r[:2] for r in resumed] == [r[:2] for r in ref]
    np.testing.assert_allclose([r[2] for r in resumed], [r[2] for r in ref], rtol=1e-5)
    assert out["global_step"] == len(ref)
    ref_results = json.loads((reference / "results.json").read_text())
    assert out["evals"] == ref_results["evals"]


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
