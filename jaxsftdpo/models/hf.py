"""Hugging Face checkpoints <-> our models, for every family in `jaxsftdpo.models.FAMILIES`.

Loading never materialises a randomly initialised model: it takes the model's abstract
structure (`nnx.eval_shape`), memory-maps the checkpoint and creates each parameter directly
with its final sharding, so each device reads only its own slice from disk. A GGUF file
(`jaxsftdpo.models.gguf`) is one more source of a config.json dict and tensors by Hugging Face
key; everything after reading them is shared.

A family module is what `jaxsftdpo.models.family.ModelFamily` describes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from types import ModuleType
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download
from safetensors.numpy import save_file

from jaxsftdpo.errors import UserError, first_line
from jaxsftdpo.models import FAMILIES
from jaxsftdpo.models.gguf import GGUFCheckpoint, gguf_file

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# `shardings` argument of `from_pretrained`: parameter path -> where that parameter lives.
ShardingFn = Callable[[tuple, tuple], jax.sharding.Sharding]

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES_SHOWN = 5


# ---- public API -----------------------------------------------------------------------------

def from_pretrained(name_or_path: str | os.PathLike, *, dtype=jnp.float32,
                    param_dtype=jnp.float32, shardings: ShardingFn | None = None,
                    allow_pickle: bool = False, revision: str | None = None,
                    **overrides) -> nnx.Module:
    """Load a Hugging Face causal LM from a local directory, a hub id or a GGUF file (or a
    directory holding one `.gguf` and no config.json), which is dequantised to float32 first.

    `shardings(path, shape)` gives the `jax.sharding.Sharding` of the parameter at nnx state
    path `path` (e.g. `('h', 0, 'attn', 'c_attn', 'kernel')`) of that shape; without it every parameter goes to
    the first device. Weights are cast to `param_dtype`; `dtype` is the compute dtype; the other
    `overrides` go to the config (e.g. `remat`, `logits_chunk`).
    `allow_pickle` permits `pytorch_model.bin`, which can run code when loaded (needs torch).
    """
    source, hf_config, read_tensors = _open_checkpoint(
        name_or_path, revision=revision, patterns=_weight_patterns(allow_pickle),
        allow_pickle=allow_pickle)
    family, config = _family_config(hf_config, source, dtype=dtype, param_dtype=param_dtype,
                                    **overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: family.build(config)))
    host_arrays = _match_checkpoint(family, nnx.to_flat_state(abstract), read_tensors(), source)
    sharding_of = shardings or _first_device

    def load(path, variable):
        host, target = host_arrays[path], variable.get_value()
        value = jax.make_array_from_callback(
            target.shape, sharding_of(path, target.shape),
            lambda index: np.array(host[index], dtype=target.dtype))
        return variable.replace(value)

    return nnx.merge(graphdef, nnx.map_state(load, abstract))


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, *,
                    max_shard_bytes: int | None = None) -> None:
    """Write `config.json` and the weights (in their parameter dtype) in Hugging Face's format.

    With `max_shard_bytes`, weights go to `model-0000i-of-0000n.safetensors` files plus
    `model.safetensors.index.json`. Files are written to a temporary directory first, so a
    failure leaves `out_dir` as it was.
    """
    family = family_for(model)
    params = {family.hf_name(path): (path, variable.get_value())
              for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    shards = _group_into_shards(params, max_shard_bytes)
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = np.dtype(next(iter(params.values()))[1].dtype).name

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        _write_shards(family, params, shards, staging)
        _move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_config(name_or_path: str | os.PathLike, *, revision: str | None = None,
                **overrides) -> tuple[ModuleType, object]:
    """`(family module, config)` from a checkpoint's config.json, or a GGUF file's metadata;
    `overrides` go to the config (e.g. `dtype`, `param_dtype`). Fetches only config.json for a
    hub id, and dequantises no weight of a GGUF file."""
    source, hf_config, _ = _open_checkpoint(name_or_path, revision=revision,
                                            patterns=[CONFIG_FILE])
    return _family_config(hf_config, source, **overrides)


def family_for(model: nnx.Module) -> ModuleType:
    """The family module that built `model`."""
    for family in FAMILIES.values():
        if isinstance(model.config, family.Config):
            return family
    raise TypeError(f"{type(model).__name__} is not a model of a registered family")


def checkpoint_dir(name_or_path: str | os.PathLike, *, revision: str | None = None,
                   patterns: list[str]) -> Path:
    """A local directory as is, or a hub id downloaded (only files matching `patterns`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise UserError(f"{name} is not a directory; pass a Hugging Face model directory "
                        f"(config.json + model.safetensors), a .gguf file or a hub id such as "
                        f"'gpt2'")
    return _download(name, revision, patterns)


def read_checkpoint(directory: Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Every tensor in `directory`'s weight files by key, memory-mapped: nothing is read yet."""
    files = _weight_files(directory, SAFETENSORS_FILE, SAFETENSORS_INDEX)
    reader = _read_safetensors
    if not files:
        files, reader = _weight_files(directory, PICKLE_FILE, PICKLE_INDEX), _read_pickle
        if files and not allow_pickle:
            raise UserError(f"{directory} has weights only as {files[0].name}, a pickle that can "
                            f"run code when loaded; pass allow_pickle=True if you trust it, or "
                            f"convert the checkpoint to model.safetensors")
    if not files:
        raise UserError(f"no weights in {directory}: expected {SAFETENSORS_FILE} or "
                        f"{SAFETENSORS_INDEX} (pytorch_model.bin needs allow_pickle=True)")
    tensors = {}
    for file in files:
        tensors.update(reader(file))
    return tensors


# ---- reading --------------------------------------------------------------------------------

def _weight_patterns(allow_pickle: bool) -> list[str]:
    patterns = [CONFIG_FILE, "*.safetensors", SAFETENSORS_INDEX]
    return patterns + ["*.bin", PICKLE_INDEX] if allow_pickle else patterns


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (OSError, ValueError) as e:  # hub HTTP, offline-mode and invalid-id errors
        raise UserError(f"could not get {repo_id!r} from the Hugging Face Hub ({first_line(e)}); "
                        f"check the name and your network / HF_HUB_OFFLINE, or pass a local "
                        f"checkpoint directory") from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-download or re-export it") from e


def _open_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None,
                     patterns: list[str], allow_pickle: bool = False
                     ) -> tuple[Path, dict, Callable[[], dict[str, np.ndarray]]]:
    """`(source, config.json dict, read_tensors)` of a GGUF file or of a checkpoint directory
    or hub id (downloading only files matching `patterns`): the one place where the two
    formats differ. `read_tensors()` gives every tensor by Hugging Face key."""
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        checkpoint = GGUFCheckpoint(gguf)
        return gguf, checkpoint.hf_config(), checkpoint.tensors
    directory = checkpoint_dir(name_or_path, revision=revision, patterns=patterns)
    return (directory, _read_hf_config(directory),
            lambda: read_checkpoint(directory, allow_pickle=allow_pickle))


def _read_hf_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"no {CONFIG_FILE} in {directory}; pass a Hugging Face model directory "
                        f"(config.json + model.safetensors)")
    return _read_json(path)


def _family_config(hf: dict, source: Path, **overrides) -> tuple[ModuleType, object]:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        origin = source / CONFIG_FILE if source.is_dir() else source
        raise UserError(f"model_type {model_type!r} in {origin} is not supported; supported: "
                        f"{', '.join(sorted(FAMILIES))}")
    family = FAMILIES[model_type]
    return family, family.Config.from_hf(hf, **overrides)


def _weight_files(directory: Path, single: str, index: str) -> list[Path]:
    if (directory / single).is_file():
        return [directory / single]
    if not (directory / index).is_file():
        return []
    weight_map = _read_json(directory / index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{directory / index} has no weight_map; re-download or re-export it")
    files = [directory / name for name in sorted(set(weight_map.values()))]
    absent = [file.name for file in files if not file.is_file()]
    if absent:
        raise UserError(f"{index} in {directory} names {_listing(absent)} that are not there; "
                        f"download the whole checkpoint")
    return files


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    # The format: 8-byte little-endian header length, a JSON header, then raw tensor bytes.
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        header_len = int.from_bytes(data[:8].tobytes(), "little")
        header = json.loads(data[8:8 + header_len].tobytes())
    except ValueError as e:  # an empty file, or a header that is not JSON
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-download or "
                        f"re-export it") from e
    header.pop("__metadata__", None)
    start = 8 + header_len
    tensors = {}
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {key} has dtype {info['dtype']}, which this loader "
                            f"does not read; convert the checkpoint to float32 or bfloat16")
        begin, end = info["data_offsets"]
        raw = data[start + begin:start + end]
        tensors[key] = raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise UserError(f"reading {path.name} needs torch: pip install torch, or convert the "
                        f"checkpoint to model.safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def to_numpy(tensor):
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    return {key: to_numpy(tensor) for key, tensor in state.items()}


def _match_checkpoint(family: ModuleType, abstract: list, tensors: dict,
                      directory: Path) -> dict[tuple, np.ndarray]:
    """Each parameter path -> its (lazy) checkpoint array in our layout, after checking that
    the checkpoint holds exactly the parameters the config asks for, in the right shapes."""
    names = {path: family.hf_name(path) for path, _ in abstract}
    sources = {path: _checkpoint_key(name, tensors) for path, name in names.items()}
    missing = [names[path] for path, key in sources.items() if key is None]
    if missing:
        raise UserError(f"checkpoint {directory} lacks {_listing(missing)}; config.json and "
                        f"the weights do not match, re-export or re-download the checkpoint")
    used = set(sources.values())
    unexpected = [key for key in tensors if key not in used
                  and not any(re.fullmatch(pattern, key) for pattern in family.HF_IGNORED)]
    if unexpected:
        raise UserError(f"checkpoint {directory} has {_listing(unexpected)} that a "
                        f"{family.__name__.rsplit('.', 1)[-1]} model does not have; check that config.json "
                        f"matches the weights")
    arrays = {path: family.from_hf(path, tensors[key]) for path, key in sources.items()}
    needed = {path: tuple(variable.get_value().shape) for path, variable in abstract}
    wrong = [f"{names[path]} {tuple(array.shape)} (needs {needed[path]})"
             for path, array in arrays.items() if tuple(array.shape) != needed[path]]
    if wrong:
        raise UserError(f"checkpoint {directory} has {_listing(wrong)} of the wrong shape; "
                        f"check that config.json matches the weights")
    return arrays


def _checkpoint_key(name: str, tensors: dict) -> str | None:
    """The key holding HF parameter `name`; old checkpoints lack the base-model prefix
    (`h.0.attn.c_attn.weight` for `transformer.h.0.attn.c_attn.weight`)."""
    if name in tensors:
        return name
    unprefixed = name.split(".", 1)[-1]
    return unprefixed if unprefixed in tensors else None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return f"{len(names)} tensor(s): {shown}{more}"


def _first_device(path: tuple, shape: tuple) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# ---- writing --------------------------------------------------------------------------------

def _group_into_shards(params: dict, max_shard_bytes: int | None) -> list[list[str]]:
    """HF keys split into consecutive groups of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own)."""
    shards, size = [[]], 0
    for name, (_, value) in params.items():
        if max_shard_bytes is not None and shards[-1] and size + value.nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += value.nbytes
    return shards


def _write_shards(family: ModuleType, params: dict, shards: list[list[str]],
                  directory: Path) -> None:
    if len(shards) == 1:
        files = [SAFETENSORS_FILE]
    else:
        files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(1, len(shards) + 1)]
    for file, names in zip(files, shards):
        arrays = {name: np.ascontiguousarray(family.to_hf(params[name][0],
                                                          np.asarray(params[name][1])))
                  for name in names}  # one shard at a time on the host
        save_file(arrays, directory / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(value.nbytes for _, value in params.values())},
                 "weight_map": {name: file for file, names in zip(files, shards)
                                for name in names}}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _move_into(staging: Path, out_dir: Path) -> None:
    """Put the staged files in `out_dir`, dropping weight files of an earlier save there."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    written = {file.name for file in staging.iterdir()}
    for file in staging.iterdir():
        os.replace(file, out_dir / file.name)
    for stale in out_dir.glob("model*.safetensors*"):
        if stale.name not in written:
            stale.unlink()
