"""Device mesh, partition rules -> NamedSharding, and batch placement.

The mesh has axes ('data', 'fsdp', 'tensor'). Parameters are sharded by ordered regex rules over
their dotted paths; every leaf must match a rule, so no 2-D weight is replicated by accident.
A batch is split over ('data', 'fsdp'): FSDP devices also take different examples.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsftdpo.errors import UserError, first_line

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: dict, devices=None) -> Mesh:
    """A mesh of `shape` ({'data': d, 'fsdp': f, 'tensor': t}, one of them may be -1)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = [int(shape[a]) for a in AXES]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if devices.size % known:
            raise UserError(f"mesh {dict(zip(AXES, sizes))} does not divide the {devices.size} "
                            f"devices; pick sizes whose product divides {devices.size}")
        sizes[sizes.index(-1)] = devices.size // known
    if int(np.prod(sizes)) != devices.size:
        raise UserError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices but "
                        f"{devices.size} are present; make the product of config.mesh sizes "
                        f"{devices.size} (use -1 for one axis to take the rest)")
    return Mesh(devices.reshape(sizes), AXES)


def path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def spec_for(name: str, rules) -> P:
    for pattern, spec in rules:
        if re.fullmatch(pattern, name):
            return spec
    raise UserError(f"no partition rule matches parameter {name!r}; add a rule for it to the "
                    f"model family's PARTITION_RULES")


def _fit(spec: P, shape: tuple, mesh: Mesh, name: str) -> P:
    """The spec, checked against the shape: each sharded dimension must divide evenly."""
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            continue
        size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
        if dim % size:
            raise UserError(f"parameter {name} of shape {shape} cannot be split {size} ways over "
                            f"mesh axes {axes}; choose a config.mesh whose fsdp/tensor sizes "
                            f"divide the model's dimensions")
    return spec


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """A State of NamedShardings with the structure of `state` (arrays or ShapeDtypeStructs)."""
    flat = nnx.to_flat_state(state)
    out = []
    for path, var in flat:
        name = path_name(path)
        value = var.value if hasattr(var, "value") else var
        spec = _fit(spec_for(name, rules), value.shape, mesh, name)
        out.append((path, var.replace(NamedSharding(mesh, spec))
                    if hasattr(var, "replace") else NamedSharding(mesh, spec)))
    return nnx.from_flat_state(out)


def sharding_fn(mesh: Mesh, rules):
    """`(path, shape) -> NamedSharding`, the form `models.from_pretrained(shardings=...)` takes."""
    def shard(path: tuple, shape: tuple) -> NamedSharding:
        name = path_name(path)
        return NamedSharding(mesh, _fit(spec_for(name, rules), shape, mesh, name))
    return shard


def check_heads(model_config, mesh: Mesh) -> None:
    """The 'tensor' axis splits attention by heads: it must divide the query heads and the
    key/value heads (with grouped queries there are fewer of those), or a head's rows would be
    cut across devices."""
    tensor = mesh.shape["tensor"]
    for what, heads in (("attention", model_config.num_heads),
                        ("key/value", model_config.num_kv_heads)):
        if heads % tensor:
            raise UserError(f"config.mesh.tensor={tensor} does not divide the model's {heads} "
                            f"{what} heads; use a tensor size that divides {heads}")


def place_state(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    return jax.device_put(state, state_shardings(state, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def rows_on_batch_devices(x: jax.Array) -> jax.Array:
    """`x` with its rows (axis 0) split over the batch axes of the mesh it is traced for
    (`tracing_on`), as the batch came in; unchanged without one (one device, pmap).

    The partitioner otherwise weighs each FSDP-sharded weight's all-gather against gathering
    the activations, and may gather the whole batch onto every chip: Llama-3.1-8B at one pair
    per chip of a v5e-64 needed 24 GiB of temporaries for a forward pass.
    """
    mesh = jax.sharding.get_abstract_mesh()  # pmap's has only its own axis
    if not set(BATCH_AXES) <= set(mesh.axis_names) or x.shape[0] % batch_divisor(mesh):
        return x
    # The other dimensions stay the partitioner's choice (the tensor axis may split them).
    return jax.lax.with_sharding_constraint(
        x, P(BATCH_AXES, *[P.UNCONSTRAINED] * (x.ndim - 1)))


def tracing_on(mesh: Mesh):
    """Context in which jitted functions are traced for `mesh` (`rows_on_batch_devices`)."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
    n = batch_divisor(mesh)
    if batch_size % n:
        raise UserError(f"{what} batch size {batch_size} does not divide over the {n} data-parallel "
                        f"devices (mesh data x fsdp); use a multiple of {n}")


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """How a batch array lies on the mesh: axis `leading` (the example axis) split over the
    batch axes, the rest whole."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def place_batch(batch: dict, mesh: Mesh, leading: int = 0) -> dict:
    """Put a host batch on the mesh, splitting axis `leading` (the example axis) over devices.

    `batch` is the global batch, the same on every process (batches are a function of seed and
    epoch). In a multi-process run each process hands its devices only its own rows
    (`process_rows`) and the global array is assembled from every process's part.
    """
    sharding = batch_sharding(mesh, leading)

    def put(x):
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        rows = process_rows(mesh, x.shape[leading])
        if rows is None:  # this process's devices hold scattered rows: let JAX pick them out
            return jax.make_array_from_process_local_data(sharding, x, x.shape)
        local = x[(slice(None),) * leading + (rows,)]
        return jax.make_array_from_process_local_data(sharding, local, x.shape)
    return jax.tree.map(put, batch)


def process_rows(mesh: Mesh, rows: int) -> slice | None:
    """The rows of a global batch of `rows` examples that this process's devices hold.

    One contiguous block when the mesh keeps each process's devices together along the batch
    axes (what `make_mesh` gives for `jax.devices()`), else None.
    """
    index = NamedSharding(mesh, P(BATCH_AXES)).addressable_devices_indices_map((rows,))
    blocks = sorted({(i[0].start or 0, rows if i[0].stop is None else i[0].stop)
                     for i in index.values()})
    if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])):
        return None
    return slice(blocks[0][0], blocks[-1][1])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# Environment variables that mean "this process is one of several": a coordinator given by hand
# (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), or a launcher whose layout
# `jax.distributed.initialize()` detects by itself (multi-host Cloud TPU, mpirun). Under SLURM
# (whose variables are also set outside srun) ask with config.parallel.distributed=true.
_COUNT_VARS = ("JAX_NUM_PROCESSES", "OMPI_COMM_WORLD_SIZE")
_HOSTS_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


def distributed_requested(config=None) -> bool:
    """True when the config (`parallel.distributed`) or the environment asks for several
    processes."""
    env = os.environ
    if config is not None and config.parallel.distributed:
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if any(env.get(v, "1").isdigit() and int(env.get(v, "1")) > 1 for v in _COUNT_VARS):
        return True
    return any("," in env.get(v, "") for v in _HOSTS_VARS)


def maybe_initialize_distributed(config=None) -> bool:
    """`jax.distributed.initialize()` once, before JAX is used, when asked; True if several
    processes take part.

    With no arguments JAX finds the coordinator and this process's rank on Cloud TPU VMs, SLURM
    (srun) and Open MPI; elsewhere set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on every process. Already initialized (e.g. by the caller): nothing to do.
    """
    if not jax.distributed.is_initialized() and distributed_requested(config):
        _initialize()
    several = jax.distributed.is_initialized() and jax.process_count() > 1
    if several and config is not None and config.parallel.mode == "pmap":
        raise UserError("config.parallel.mode=pmap runs over one process's devices; use "
                        "parallel.mode=jit (the default) for a multi-host run")
    return several


def _initialize() -> None:
    env = os.environ
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
        kwargs = dict(num_processes=int(env["JAX_NUM_PROCESSES"]),
                      process_id=int(env["JAX_PROCESS_ID"]))
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"jax.distributed.initialize() failed ({first_line(e, 200)}); start "
                        f"every process with the same command before JAX is used, and set "
                        f"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID where "
                        f"no cluster manager provides them") from e
