"""Export to Hugging Face's format: a training run, or any model `from_pretrained` reads.

`python -m jaxsftdpo.export --workdir DIR --out OUT [--peft] [--step N] [--overwrite]` writes
the run's newest (or step N's) checkpoint:

- default: the merged model (LoRA adapters folded into the weights), `config.json` +
  `model.safetensors`, plus the run's tokenizer; `AutoModelForCausalLM.from_pretrained(OUT)`
  loads it (a byte-level run's tokenizer is `byte_tokenizer.json`, which
  `jaxsftdpo.data.tokenizer.load_tokenizer(OUT)` reads; transformers has no such tokenizer).
- `--peft` (LoRA runs only): the adapters in PEFT's format, `adapter_config.json` +
  `adapter_model.safetensors`, plus the tokenizer. `base_model_name_or_path` is the run's
  `model.name_or_path` (a relative local directory made absolute). Where that is nothing
  transformers loads by name alone, namely a model built from scratch (`model.name_or_path ==
  ""`) or a GGUF file (transformers needs `gguf_file=`), the base the run started from (for
  GGUF: dequantised to float32) is written as a Hugging Face directory to `OUT/base`, with the
  tokenizer, and `base_model_name_or_path` is that directory's absolute path.

`python -m jaxsftdpo.export --model PATH --out OUT [--overwrite]` converts a model that
`jaxsftdpo.models.from_pretrained` reads, notably a GGUF file (or a directory holding exactly
one `.gguf`), dequantised to float32, into `config.json` + `model.safetensors` plus its tokenizer
(`jaxsftdpo.data.tokenizer.load_tokenizer(PATH)`), so that `AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained(OUT)` load it without `gguf_file=`. `--model` and `--workdir`
exclude each other.

Everything is written to a temporary directory beside OUT and moved into place at the end, so a
failure leaves no half-written OUT. An existing non-empty OUT is an error unless `--overwrite`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from absl import flags

from jaxsftdpo import lora, peft_export, runs
from jaxsftdpo.cli import run_cli
from jaxsftdpo.data.tokenizer import load_tokenizer
from jaxsftdpo.errors import UserError
from jaxsftdpo.models import from_pretrained, load_config, save_pretrained
from jaxsftdpo.models.gguf import GGUF_SUFFIX, gguf_file
from jaxsftdpo.runs import TOKENIZER_DIR

BASE_DIR = "base"


def export_run(workdir, out, *, peft: bool = False, step: int | None = None,
               overwrite: bool = False, devices=None) -> Path:
    """Export the run in `workdir` to `out` (see the module doc); returns `out`."""
    out = Path(out).absolute()
    workdir = runs.check_workdir(workdir)
    config = runs.read_config(workdir)
    if peft and config.param.kind != "lora":
        raise UserError(f"--peft exports LoRA adapters, but {workdir} fine-tuned all weights "
                        f"(param.kind={config.param.kind!r}); drop --peft to export the whole "
                        f"model")
    _check_out(out, overwrite)
    runs.pick_step(workdir, step)  # no checkpoint / unknown step fail before the model is built
    run = runs.load_run(workdir, step, devices=devices)
    if not run.finished:
        print(f"note: checkpoint {run.step} is mid-run (stage {run.position.stage + 1} of "
              f"{len(config.stages)} not finished)")

    with _staged(out) as staging:
        if peft:
            base = config.model.name_or_path
            if _base_written_beside(base):
                _write_base(run, staging / BASE_DIR)
                base = str(out / BASE_DIR)
            elif Path(base).expanduser().is_dir():
                base = str(Path(base).expanduser().absolute())
            p = config.param
            peft_export.save_peft_adapters(run.model(), staging, alpha=p.alpha,
                                           dropout=p.dropout, use_rslora=p.use_rslora,
                                           base_model_name_or_path=base)
        else:
            run.initial = None  # not needed here: free the copy of the starting weights
            model = lora.merge_lora(run.model())
            save_pretrained(model, staging)
        _write_tokenizer(run, staging)
    print(f"wrote {'PEFT adapters' if peft else 'merged model'} of {workdir} at step "
          f"{run.step} to {out}")
    return out


def export_model(model, out, *, overwrite: bool = False) -> Path:
    """Write the model `jaxsftdpo.models.from_pretrained(model)` reads (a GGUF file, a directory
    holding one, a Hugging Face directory or hub id) and its tokenizer as a Hugging Face
    directory at `out` (see the module doc); returns `out`."""
    out = Path(out).absolute()
    _check_model_path(model)
    load_config(model)  # an unsupported architecture fails before any weight is read
    _check_out(out, overwrite)
    tokenizer = load_tokenizer(str(model))
    loaded = from_pretrained(model)
    with _staged(out) as staging:
        save_pretrained(loaded, staging)
        tokenizer.save(str(staging))
    print(f"wrote {model} as a Hugging Face model to {out}")
    return out


def _check_model_path(model) -> None:
    """A local path that is not there (a hub id such as `gpt2` is left to `from_pretrained`)."""
    name = str(model)
    path = Path(name).expanduser()
    looks_local = (path.is_absolute() or name.startswith((".", "~"))
                   or path.suffix.lower() == GGUF_SUFFIX)
    if looks_local and not path.exists():
        raise UserError(f"--model {name} does not exist; pass a .gguf file, a directory holding "
                        f"one, a Hugging Face model directory or a hub id")


def _base_written_beside(name_or_path: str) -> bool:
    """Whether a PEFT export's base must be written to OUT/base: the run's model was built from
    scratch, or is a GGUF file, which transformers does not load by its path alone."""
    return not name_or_path or gguf_file(name_or_path) is not None


def _write_base(run, directory: Path) -> None:
    """The model the run started from, without adapters, and the run's tokenizer."""
    base_model = run.model(run.initial)
    _drop_adapters(base_model)
    save_pretrained(base_model, directory)
    _write_tokenizer(run, directory)


@contextlib.contextmanager
def _staged(out: Path):
    """A fresh directory beside `out` to write into, moved to `out` when the block finishes and
    removed if it fails, so `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        yield staging
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; choose a new directory or pass "
                        f"--overwrite")


def _drop_adapters(model) -> None:
    for linear in lora.linear_modules(model).values():
        linear.lora = None


def _write_tokenizer(run, directory: Path) -> None:
    saved = run.workdir / TOKENIZER_DIR
    if saved.is_dir() and any(saved.iterdir()):
        shutil.copytree(saved, directory, dirs_exist_ok=True)
    else:
        run.tokenizer.save(str(directory))


def _replace(staging: Path, out: Path) -> None:
    """Move the staged directory to `out`; an existing `out` (--overwrite) goes only after."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    flags.DEFINE_string("workdir", None, "the training run's --workdir")
    flags.DEFINE_string("model", None, "instead of a run: a model to convert, e.g. a .gguf file "
                                       "(anything jaxsftdpo.models.from_pretrained reads)")
    flags.DEFINE_string("out", None, "directory to write the Hugging Face model or adapters to")
    flags.DEFINE_bool("peft", False, "write the LoRA adapters in PEFT's format instead of the "
                                     "merged model")
    flags.DEFINE_integer("step", None, "checkpoint step to export (default: the newest)")
    flags.DEFINE_bool("overwrite", False, "replace a non-empty --out")
    f = flags.FLAGS

    def export():
        if f.workdir is not None and f.model is not None:
            raise UserError("--workdir and --model exclude each other: export a training run "
                            "(--workdir) or convert a model (--model), not both")
        if f.model is not None:
            if f.peft or f.step is not None:
                raise UserError("--peft and --step apply to a training run (--workdir), not to "
                                "--model; drop them")
            export_model(f.model, f.out, overwrite=f.overwrite)
        elif f.workdir is not None:
            export_run(f.workdir, f.out, peft=f.peft, step=f.step, overwrite=f.overwrite)
        else:
            raise UserError("--workdir or --model is required: the training run to export "
                            "(--workdir runs/quick) or a model to convert (--model model.gguf)")

    run_cli(export, required={"out": "where to write it, e.g. --out hf/quick"})


if __name__ == "__main__":
    main()
