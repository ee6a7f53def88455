"""`python -m jaxsftdpo.export --workdir DIR --out OUT [--peft] [--step N] [--overwrite]`.

Writes the run's newest (or step N's) checkpoint as a Hugging Face model:

- default: the merged model (LoRA adapters folded into the weights), `config.json` +
  `model.safetensors`, plus the run's tokenizer; `AutoModelForCausalLM.from_pretrained(OUT)`
  loads it (a byte-level run's tokenizer is `byte_tokenizer.json`, which
  `jaxsftdpo.data.tokenizer.load_tokenizer(OUT)` reads; transformers has no such tokenizer).
- `--peft` (LoRA runs only): the adapters in PEFT's format, `adapter_config.json` +
  `adapter_model.safetensors`, plus the tokenizer. `base_model_name_or_path` is the run's
  `model.name_or_path` (a relative local directory made absolute). A run whose model was built
  from scratch (`model.name_or_path == ""`) has no base anyone else can load, so the untrained
  base is written to `OUT/base` and `base_model_name_or_path` is that directory's absolute path.

Everything is written to a temporary directory beside OUT and moved into place at the end, so a
failure leaves no half-written OUT. An existing non-empty OUT is an error unless `--overwrite`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from jaxsftdpo.errors import UserError

BASE_DIR = "base"


def export_run(workdir, out, *, peft: bool = False, step: int | None = None,
               overwrite: bool = False, devices=None) -> Path:
    """Export the run in `workdir` to `out` (see the module doc); returns `out`."""
    from jaxsftdpo import runs

    out = Path(out).absolute()
    workdir = runs.check_workdir(workdir)
    config = runs.read_config(workdir)
    if peft and config.param.kind != "lora":
        raise UserError(f"--peft exports LoRA adapters, but {workdir} fine-tuned all weights "
                        f"(param.kind={config.param.kind!r}); drop --peft to export the whole "
                        f"model")
    _check_out(out, overwrite)
    runs.pick_step(workdir, step)  # no checkpoint / unknown step fail before the model is built
    from jaxsftdpo import lora
    from jaxsftdpo.models import save_pretrained
    run = runs.load_run(workdir, step, devices=devices)
    if not run.finished:
        print(f"note: checkpoint {run.step} is mid-run (stage {run.meta.get('stage', 0) + 1} of "
              f"{len(config.stages)} not finished)")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        if peft:
            base = config.model.name_or_path
            if base and Path(base).expanduser().is_dir():
                base = str(Path(base).expanduser().absolute())
            if not base:
                base_model = run.model(run.initial)
                _drop_adapters(base_model)
                save_pretrained(base_model, staging / BASE_DIR)
                _write_tokenizer(run, staging / BASE_DIR)
                base = str(out / BASE_DIR)
            p = config.param
            lora.save_peft_adapters(run.model(), staging, alpha=p.alpha, dropout=p.dropout,
                                    use_rslora=p.use_rslora, base_model_name_or_path=base)
        else:
            run.initial = None  # not needed here: free the copy of the starting weights
            model = lora.merge_lora(run.model())
            save_pretrained(model, staging)
        _write_tokenizer(run, staging)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {'PEFT adapters' if peft else 'merged model'} of {workdir} at step "
          f"{run.step} to {out}")
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; choose a new directory or pass "
                        f"--overwrite")


def _drop_adapters(model) -> None:
    from jaxsftdpo.lora import linear_modules
    for linear in linear_modules(model).values():
        linear.lora = None


def _write_tokenizer(run, directory: Path) -> None:
    from jaxsftdpo.runs import TOKENIZER_DIR
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
    from absl import flags

    flags.DEFINE_string("workdir", None, "the training run's --workdir")
    flags.DEFINE_string("out", None, "directory to write the Hugging Face model or adapters to")
    flags.DEFINE_bool("peft", False, "write the LoRA adapters in PEFT's format instead of the "
                                     "merged model")
    flags.DEFINE_integer("step", None, "checkpoint step to export (default: the newest)")
    flags.DEFINE_bool("overwrite", False, "replace a non-empty --out")
    f = flags.FLAGS

    def export():
        export_run(f.workdir, f.out, peft=f.peft, step=f.step, overwrite=f.overwrite)

    from jaxsftdpo.cli import run_cli
    run_cli(export, required={"workdir": "the training run to export, e.g. --workdir runs/quick",
                              "out": "where to write it, e.g. --out hf/quick"})


if __name__ == "__main__":
    main()
