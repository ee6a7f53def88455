"""`python -m jaxsftdpo.study --grid configs/study/NAME.py[:ARG] --workdir DIR [--seeds N]
[--report_only] [--config.KEY=VALUE ...]`.

Runs every cell of a grid, once per seed, one after another, each an ordinary training run
(`trainer.train_and_evaluate`) in its own sub-workdir `DIR/runs/<cell>/seed<k>`. A run whose
`results.json` exists is finished and skipped; so is one that diverged (its `diverged.json`:
the table flags it and leaves it out of the means); any other is started or resumed (the trainer
resumes from the sub-workdir's newest checkpoint). Then it writes `DIR/results.csv` (one row per
run), `DIR/results.md` (one row per cell, paired differences) and PNGs (`jaxsftdpo.study_report`).
SIGTERM/SIGINT stop the run in progress after its checkpoint, and the study after writing the
report (exit status 143/130).
Trailing `--config.KEY=VALUE` flags override every cell (after the grid's own overrides).

A grid file is a Python file whose `get_grid()` returns a dict; `--grid FILE:ARG` calls
`get_grid(ARG)` instead (e.g. `size=cpu`: the grid file says what it takes).

    name         str, the study's title (default: the file name)
    cells        list of cells (below); names unique, made of letters, digits and `_ . = + -`
    seeds        default number of seeds (seeds 0..N-1; `--seeds` wins); default 3
    seed_keys    config keys set to the seed; default ["seed"]
    overrides    {dotted key: value} applied to every cell before the cell's own
    metric       the score the paired differences and the grid plot use; default "accuracy"
    compare      list of (cell A, cell B) name pairs: the table shows A - B with a bootstrap CI;
                 B = "majority_class" (metric accuracy) is the dev set's most common answer
    n_boot       bootstrap replicates; default 2000
    description  a sentence shown above the table

A cell is a dict:

    name         the sub-workdir's name and the table's row name
    config       config file path (relative to the current directory or a folder above the grid)
    arg          the config file's argument string, as in `--config FILE:ARG` ("" = none)
    overrides    {dotted key: value}, like `--config.KEY=VALUE`: "stages[1].learning_rate": 1e-5
    labels       {axis: value} for the table and plots: schedule, param, scale, temperature, ...
    reference    {metric: number} the study reported for this cell (in the table's units)

Everything is checked (files, keys, overrides, compare names) before the first run starts; bad
input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import json
import re
import sys
import time
from pathlib import Path

import jax
import ml_collections as mlc
from tqdm import tqdm

from jaxsftdpo import study_report
from jaxsftdpo.cli import exit_on_error
from jaxsftdpo.errors import Diverged, Stopped, UserError, one_line
from jaxsftdpo.runs import CONFIG_FILE, DIVERGED_FILE, RESULTS_FILE, config_changes
from jaxsftdpo.trainer import train_and_evaluate

GRID_KEYS = {"name", "cells", "seeds", "seed_keys", "overrides", "metric", "compare", "n_boot",
             "description"}
CELL_KEYS = {"name", "config", "arg", "overrides", "labels", "reference"}
_NAME = re.compile(r"[A-Za-z0-9_.=+-]+")
_KEY_PART = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)")


@dataclasses.dataclass
class Cell:
    name: str
    config: Path            # the config file, resolved
    config_name: str = ""   # the config as the grid file names it: what results record
    arg: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)
    labels: dict = dataclasses.field(default_factory=dict)
    reference: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Grid:
    path: Path
    name: str
    cells: list
    seeds: int = 3
    seed_keys: tuple = ("seed",)
    overrides: dict = dataclasses.field(default_factory=dict)
    metric: str = "accuracy"
    compare: list = dataclasses.field(default_factory=list)
    n_boot: int = 2000
    description: str = ""

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


# ---- grid files --------------------------------------------------------------------------------

def _import_file(path: Path, what: str):
    spec = importlib.util.spec_from_file_location(f"_jaxsftdpo_{what}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's file: any error in it is theirs to fix
        raise UserError(f"{what} file {path} failed to load: {type(e).__name__}: "
                        f"{one_line(e, 300)}") from e
    return module


def load_grid(path, *, extra_overrides: dict | None = None) -> Grid:
    """Read and check a grid file; every cell's config is built once here, so a bad override
    or a missing config file fails before anything trains."""
    path, arg = _split_grid_arg(str(path))
    if not path.is_file():
        raise UserError(f"grid file {path} does not exist; see configs/study/ for examples")
    module = _import_file(path, "grid")
    if not callable(getattr(module, "get_grid", None)):
        raise UserError(f"grid file {path} defines no get_grid(); it must return a dict with "
                        f"'cells' (see jaxsftdpo/study.py)")
    if arg and not inspect.signature(module.get_grid).parameters:
        raise UserError(f"grid file {path} takes no argument; drop :{arg}")
    try:
        spec = module.get_grid(arg) if arg else module.get_grid()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: get_grid() failed: {type(e).__name__}: {one_line(e, 300)}") from e
    if not isinstance(spec, dict):
        raise UserError(f"{path}: get_grid() must return a dict, got {type(spec).__name__}")
    _check_keys(spec, GRID_KEYS, f"{path}: grid")
    if not spec.get("cells"):
        raise UserError(f"{path}: the grid has no cells; give 'cells': [{{'name': ..., "
                        f"'config': ...}}, ...]")
    cells = []
    for i, raw in enumerate(spec["cells"]):
        where = f"{path}: cells[{i}]"
        if not isinstance(raw, dict):
            raise UserError(f"{where} must be a dict with keys {sorted(CELL_KEYS)}")
        _check_keys(raw, CELL_KEYS, where)
        for key in ("name", "config"):
            if not raw.get(key):
                raise UserError(f"{where} needs a '{key}'")
        if not _NAME.fullmatch(str(raw["name"])):
            raise UserError(f"{where}: name {raw['name']!r} may hold only letters, digits and "
                            f"_ . = + -")
        cells.append(Cell(name=str(raw["name"]), config=_find_config(raw["config"], path, where),
                          config_name=str(raw["config"]),
                          arg=str(raw.get("arg", "")), overrides=dict(raw.get("overrides", {})),
                          labels=dict(raw.get("labels", {})),
                          reference=dict(raw.get("reference", {}))))
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"{path}: cell names must be unique; repeated: {', '.join(duplicates)}")
    grid = Grid(path=path, name=str(spec.get("name", path.stem)), cells=cells,
                seeds=int(spec.get("seeds", 3)), seed_keys=tuple(spec.get("seed_keys", ("seed",))),
                overrides={**dict(spec.get("overrides", {})), **(extra_overrides or {})},
                metric=str(spec.get("metric", "accuracy")),
                compare=[tuple(pair) for pair in spec.get("compare", [])],
                n_boot=int(spec.get("n_boot", 2000)),
                description=str(spec.get("description", "")))
    majority = study_report.MAJORITY_CLASS
    for pair in grid.compare:
        if len(pair) != 2 or pair[0] not in names or pair[1] not in [*names, majority]:
            raise UserError(f"{path}: compare entry {pair!r} must name two cells of the grid "
                            f"(or a cell and {majority!r})")
        if pair[1] == majority and grid.metric != "accuracy":
            raise UserError(f"{path}: compare entry {pair!r}: the majority class is a baseline "
                            f"of accuracy, not of metric {grid.metric!r}")
    for cell in grid.cells:
        cell_config(grid, cell, 0)
    return grid


def _split_grid_arg(text: str) -> tuple[Path, str]:
    """`FILE.py:ARG` as `(FILE.py, ARG)`; a path without `:ARG` as `(path, "")`."""
    head, sep, arg = text.partition(".py:")
    return (Path(head + ".py"), arg) if sep else (Path(text), "")


def _check_keys(d: dict, allowed: set, where: str):
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                        f"{', '.join(sorted(allowed))}")


def _find_config(name, grid_path: Path, where: str) -> Path:
    """A config path as given, else relative to a folder above the grid file."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate.resolve()
    if not candidate.is_absolute():
        for folder in grid_path.resolve().parents:
            if (folder / candidate).is_file():
                return folder / candidate
    raise UserError(f"{where}: config file {name} does not exist (looked in the current "
                    f"directory and the folders above {grid_path})")


_CONFIG_MODULES: dict = {}


def load_config(path: Path, arg: str = "") -> mlc.ConfigDict:
    """A fresh config from a config file, as `--config FILE[:ARG]` would give it."""
    path = Path(path).resolve()
    if path not in _CONFIG_MODULES:
        _CONFIG_MODULES[path] = _import_file(path, "config")
    module = _CONFIG_MODULES[path]
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"config file {path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}:{arg}: get_config failed: {type(e).__name__}: "
                        f"{one_line(e, 300)}") from e


def apply_override(config: mlc.ConfigDict, key: str, value, where: str = "") -> None:
    """`config.<key> = value` for a dotted key with list indices, e.g. `stages[1].epochs`;
    a key the config does not have is an error (also inside list items, which stay unlocked)."""
    label = f"{where}override {key!r}"
    parts = key.split(".")
    target = config
    for n, part in enumerate(parts):
        match = _KEY_PART.fullmatch(part)
        if not match:
            raise UserError(f"{label}: {part!r} is not a key (use a.b[1].c)")
        name, indices = match.group(1), [int(i) for i in re.findall(r"\d+", match.group(2))]
        last = n == len(parts) - 1
        if not isinstance(target, mlc.ConfigDict) or name not in target:
            raise UserError(f"{label}: the config has no key {'.'.join(parts[:n + 1])!r}")
        if last and not indices:
            _assign(label, lambda: setattr(target, name, value))
            return
        target = target[name]
        for j, index in enumerate(indices):
            if not isinstance(target, (list, tuple)) or index >= len(target):
                raise UserError(f"{label}: index [{index}] is out of range")
            if last and j == len(indices) - 1:
                container = target
                _assign(label, lambda: container.__setitem__(index, value))
                return
            target = target[index]


def _assign(label: str, assign):
    try:
        assign()
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{label}: {one_line(e, 200)}") from e


def cell_config(grid: Grid, cell: Cell, seed: int) -> mlc.ConfigDict:
    """The cell's config for one seed: file + arg, the grid's overrides, the cell's, the seed."""
    config = load_config(cell.config, cell.arg)
    if not isinstance(config, mlc.ConfigDict):
        raise UserError(f"{cell.config}: get_config() must return an ml_collections ConfigDict")
    where = f"cell {cell.name}: "
    for key, value in {**grid.overrides, **cell.overrides}.items():
        apply_override(config, key, value, where)
    for key in grid.seed_keys:
        apply_override(config, key, seed, where + "seed_keys ")
    return config


# ---- running -----------------------------------------------------------------------------------

def run_dir(workdir, cell: Cell, seed: int) -> Path:
    return Path(workdir) / "runs" / cell.name / f"seed{seed}"


def run_grid(grid: Grid, workdir, *, seeds: int | None = None, train_fn=None, after_run=None,
             progress: bool = True) -> list[dict]:
    """Run every (cell, seed) not finished yet, then write the report; returns the run records.

    `train_fn(config, workdir)` defaults to `trainer.train_and_evaluate`; `after_run(record)` is
    called after each run that trained in this call (tests use both to interrupt and to count).
    """
    train_fn = train_fn or train_and_evaluate
    workdir = Path(workdir)
    seeds = grid.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    jobs = [(cell, seed) for cell in grid.cells for seed in range(seeds)]
    bar = tqdm(jobs, desc=f"study {grid.name}", unit="run", disable=not progress)
    signalled = None
    for cell, seed in bar:
        out = run_dir(workdir, cell, seed)
        bar.set_postfix_str(f"{cell.name} seed {seed}")
        config = cell_config(grid, cell, seed)
        if (out / RESULTS_FILE).exists() or (out / DIVERGED_FILE).exists():
            _check_same_config(out, config, cell, seed)  # a diverged run would diverge again
            continue
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            result = train_fn(config, str(out))
        except UserError as e:
            raise UserError(f"cell {cell.name} seed {seed}: {e}") from e
        except Diverged as e:
            print(f"study: {cell.name} seed {seed}: {e}; flagged in results.md, left out of "
                  f"its means", file=sys.stderr)
            continue
        except Stopped as e:  # SIGTERM/SIGINT: the report of what finished, then stop
            signalled = e
            break
        finally:
            _add_wall_clock(out, time.perf_counter() - start)
        if not (out / RESULTS_FILE).exists():
            stopped = (result or {}).get("stopped_at_step", "?")
            print(f"study: {cell.name} seed {seed} stopped at step {stopped}; rerun the same "
                  f"command to resume", file=sys.stderr)
            break
        if after_run is not None:
            after_run(_record(cell, seed, out))
    bar.close()
    records = collect(grid, workdir, seeds)
    study_report.write_report(grid, records, workdir)
    if signalled is not None:
        raise signalled
    return records


def _check_same_config(out: Path, config, cell: Cell, seed: int):
    """A finished run is reused only if the grid still asks for the very same config."""
    changed = (out / CONFIG_FILE).exists() and config_changes(out, config)
    if changed:
        raise UserError(f"cell {cell.name} seed {seed}: {out} ended with a different config "
                        f"than the grid now gives ({changed}); use a new --workdir or delete "
                        f"that run")


def _add_wall_clock(out: Path, seconds: float):
    """Seconds spent training this run, summed over the calls that resumed it."""
    path = out / "study_run.json"
    info = json.loads(path.read_text()) if path.exists() else {"wall_s": 0.0, "calls": 0}
    info["wall_s"] += seconds
    info["calls"] += 1
    path.write_text(json.dumps(info) + "\n")


def _record(cell: Cell, seed: int, out: Path) -> dict:
    """A run's record; `diverged` holds the trainer's diverged.json of a run that diverged."""
    results_path = out / RESULTS_FILE
    timing = out / "study_run.json"
    finished = results_path.exists()
    diverged = out / DIVERGED_FILE
    return {"cell": cell.name, "seed": seed, "labels": cell.labels, "config": cell.config_name,
            "arg": cell.arg, "overrides": cell.overrides, "workdir": str(out),
            "finished": finished,
            "results": json.loads(results_path.read_text()) if finished else None,
            "diverged": (json.loads(diverged.read_text())
                         if not finished and diverged.exists() else None),
            "wall_s": json.loads(timing.read_text())["wall_s"] if timing.exists() else None}


def collect(grid: Grid, workdir, seeds: int) -> list[dict]:
    """One record per (cell, seed) of the grid, finished or not, in grid order."""
    return [_record(cell, seed, run_dir(workdir, cell, seed))
            for cell in grid.cells for seed in range(seeds)]


# ---- command line ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}; usage: python -m jaxsftdpo.study --grid FILE --workdir DIR "
                        f"[--seeds N] [--report_only] [--config.KEY=VALUE ...]")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv):
    parser = _Parser(prog="python -m jaxsftdpo.study", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", required=True, help="grid file, e.g. configs/study/tiny.py")
    parser.add_argument("--workdir", required=True, help="directory for the runs and the report")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (0..N-1)")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing; redraw the report from the finished runs")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        match = re.fullmatch(r"--config\.([^=]+)=(.*)", item)
        if not match:
            raise UserError(f"unknown argument {item!r}; overrides look like "
                            f"--config.data.n_train=512")
        overrides[match.group(1)] = _parse_value(match.group(2))
    return args, overrides


def use_compilation_cache(workdir) -> None:
    """Runs of a cell differ only in the seed, so they compile the same programs: keep them in
    a persistent cache under the study's workdir (unless JAX_COMPILATION_CACHE_DIR is set)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(workdir).absolute() / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv=None) -> None:
    """The command; bad input and a stopped study raise their `ExitError` (`cli.exit_on_error`
    prints it and exits with its status)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    grid = load_grid(args.grid, extra_overrides=overrides)
    use_compilation_cache(args.workdir)
    if args.report_only:
        seeds = grid.seeds if args.seeds is None else args.seeds
        study_report.write_report(grid, collect(grid, args.workdir, seeds), args.workdir)
    else:
        run_grid(grid, args.workdir, seeds=args.seeds, progress=not args.no_progress)
    print(f"study: wrote {Path(args.workdir) / 'results.md'}")


if __name__ == "__main__":
    exit_on_error(main)
