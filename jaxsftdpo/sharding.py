"""Device mesh, partition rules -> NamedSharding, and batch placement.

The mesh has axes ('data', 'fsdp', 'tensor'). Parameters are sharded by ordered regex rules over
their dotted paths; every leaf must match a rule, so no 2-D weight is replicated by accident.
A batch is split over ('data', 'fsdp'): FSDP devices also take different examples.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsftdpo.errors import UserError

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


def place_state(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    return jax.device_put(state, state_shardings(state, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
    n = batch_divisor(mesh)
    if batch_size % n:
        raise UserError(f"{what} batch size {batch_size} does not divide over the {n} data-parallel "
                        f"devices (mesh data x fsdp); use a multiple of {n}")


def place_batch(batch: dict, mesh: Mesh, leading: int = 0) -> dict:
    """Put a host batch on the mesh, splitting axis `leading` (the example axis) over devices.

    In a multi-process run each process passes its own rows and the global array is assembled
    from every process's part.
    """
    def put(x):
        spec = P(*([None] * leading), BATCH_AXES)
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(put, batch)
