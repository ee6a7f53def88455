"""Nothing lost, nothing silent: bad values, divergence, unreadable checkpoints, storage
failures, the workdir lock and bad data each end in one line, with the last good checkpoint kept.

In-process runs of a one-layer quickstart model; a persistent compilation cache makes every run
after the first compile nothing. The CLI's subprocess cases (a second `train` on a busy workdir,
SIGTERM, bad flags) are in test_cli_errors.py.
"""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxsftdpo import checkpoint, lock, runs, study, tasks, trainer
from jaxsftdpo.data import batching, jsonl, paraphrase
from jaxsftdpo.data.tokenizer import ByteTokenizer
from jaxsftdpo.errors import Diverged, Stopped, UserError
from jaxsftdpo.evaluate import evaluate_workdir
from jaxsftdpo.export import export_run
from testing import cli_exit, tiny_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py


def small(sft_steps=6, dpo_steps=0, **changes):
    config = tiny_config(sft_steps, dpo_steps, **{"model.init.n_embd": 32,
                                                   "model.init.n_layer": 1, **changes})
    config.checkpoint_every = 2
    config.keep_checkpoints = 3
    return config


def final_params(config, workdir):
    return checkpoint.Manager(Path(workdir) / "checkpoints", keep=3).latest().params(
        runs.build_run(config).trainable)


def metric_rows(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]


def truncate_largest(directory: Path) -> None:
    biggest = max(directory.rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)


# ---- bad values: one line, exit 2, nothing written ---------------------------------------------

BAD_VALUES = {
    "checkpoint_every": ({"checkpoint_every": 0}, "checkpoint_every=0"),
    "log_every": ({"log_every": 0}, "log_every=0"),
    "eval_every": ({"eval_every": -1}, "eval_every=-1"),
    "eval_batch_size": ({"data.eval_batch_size": 0}, "eval_batch_size=0"),
    "logits_chunk": ({"model.logits_chunk": -1}, "logits_chunk=-1; use 0"),
    "keep_checkpoints": ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
    "lora dropout 1": ({"param.kind": "lora", "param.dropout": 1.0}, "dropout=1.0"),
    "lora dropout < 0": ({"param.kind": "lora", "param.dropout": -0.1}, "dropout=-0.1"),
    "warmup_steps": ({"stages[0].warmup_steps": -1}, "stages[0].warmup_steps=-1"),
    "target_modules regex": ({"param.kind": "lora", "param.target_modules": "c_(attn"},
                             "not a valid regex"),
    "max_loss": ({"max_loss": -1.0}, "max_loss=-1.0"),
    "dev_limit": ({"data.dev_limit": -5}, "dev_limit=-5"),
    "dev_from_train": ({"data.dev_from_train": -1}, "dev_from_train=-1"),
    "eval_temperatures": ({"data.eval_temperatures": (1.0, 0.0)}, "eval_temperatures=(1.0, 0.0)"),
    "nothing to do": ({"stages": [], "eval_at_start": False}, "the run would do nothing"),
}


@pytest.mark.parametrize("name", BAD_VALUES)
def test_bad_values_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, name):
    changes, fragment = BAD_VALUES[name]
    config = small()
    for key, value in changes.items():
        study.apply_override(config, key, value)
    workdir = tmp_path / "run"
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(config, workdir))
    assert status == 2 and line.startswith("error: ") and fragment in line, line
    assert not workdir.exists()


def test_workdir_that_is_a_file_or_another_config(tmp_path, capsys):
    config = small()
    path = tmp_path / "file"
    path.write_text("x")
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(config, path))
    assert status == 2 and "is a file" in line
    workdir = tmp_path / "other"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    config.seed, config.stages[0].learning_rate = 7, 0.5
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(config, workdir))
    assert status == 2 and "different config (seed: 0 -> 7; stages[0].learning_rate: 0.001 " \
                           "-> 0.5)" in line, line
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no write goes into: chmod for a user, a read-only tmpfs for root (whom
    permissions do not stop)."""
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip("root without mount: no read-only directory to test with")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_read_only_workdir_is_one_line(read_only_dir, capsys):
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(small(), read_only_dir))
    assert status == 2 and f"cannot write in --workdir {read_only_dir}" in line, line


# ---- divergence ---------------------------------------------------------------------------------

def test_divergence_exits_3_keeps_the_last_finite_checkpoint_and_export_uses_it(tmp_path,
                                                                                 capsys):
    # SFT ends at step 2 (a checkpoint); DPO's first step at 1e30 blows the weights up and its
    # second step's loss is NaN. One checkpoint kept: rotation must not lose the finite one.
    config = small(2, 3)
    config.stages[1].learning_rate = 1e30
    config.checkpoint_every, config.keep_checkpoints = 1000, 1
    workdir = tmp_path / "run"
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(config, workdir))
    assert status == 3, line
    assert line.startswith("error: training diverged at step 4 (stage 2, dpo): loss nan"), line
    assert "last checkpoint, step 2" in line and "stages[1].learning_rate" in line
    assert runs.checkpoint_steps(workdir) == [2]
    assert not (workdir / "results.json").exists()
    assert json.loads((workdir / "diverged.json").read_text())["step"] == 4

    out = export_run(workdir, tmp_path / "hf")
    weights = load_file(out / "model.safetensors")
    assert all(np.isfinite(w).all() for w in weights.values())
    assert "at step 2" in capsys.readouterr().out


def test_divergence_reasons():
    assert trainer._divergence(1.0, 2.0, 0.0) == ""
    assert "loss nan" in trainer._divergence(float("nan"), 2.0, 0.0)
    assert "gradient norm inf" in trainer._divergence(1.0, float("inf"), 0.0)
    assert "above config.max_loss=100" in trainer._divergence(1e4, 2.0, 100.0)
    assert trainer._divergence(1e4, 2.0, 0.0) == ""


STUDY_GRID = f'''
def get_grid():
    cell = lambda name: {{"name": name, "config": {str(ROOT / "configs/quickstart.py")!r},
                         "labels": {{"schedule": "sft1", "param": "fft"}}}}
    return {{"name": "t", "seeds": 2, "cells": [cell("a"), cell("b")],
             "overrides": {{"progress": False}}}}
'''


def test_a_diverged_study_run_is_flagged_and_not_averaged(tmp_path):
    grid_path = tmp_path / "grid.py"
    grid_path.write_text(STUDY_GRID)
    grid = study.load_grid(grid_path)
    calls = []

    def fake(config, workdir):
        workdir = Path(workdir)
        calls.append("/".join(workdir.parts[-2:]))
        (workdir / "config.json").write_text(config.to_json_best_effort())
        if calls[-1] == "b/seed1":
            (workdir / runs.DIVERGED_FILE).write_text(json.dumps(
                {"step": 7, "stage": 1, "kind": "sft", "why": "loss nan, gradient norm nan"}))
            raise Diverged("training diverged at step 7")
        accuracy = 0.5 if calls[-1] == "b/seed0" else 0.75
        results = {"evals": [{"after": "1:sft", "accuracy": accuracy}],
                   "final": {"after": "1:sft", "accuracy": accuracy}, "global_step": 8,
                   "trainable_params": 7, "total_params": 7}
        (workdir / "results.json").write_text(json.dumps(results))
        return results

    study.run_grid(grid, tmp_path / "s", train_fn=fake, progress=False)
    md = (tmp_path / "s/results.md").read_text()
    assert "| b | sft1 | fft | 50.00 ± — | 1 (1 diverged) |" in md, md
    assert "Diverged, left out of the means (1): b/seed1 at step 7 (stage 1, sft: loss nan" in md
    assert "Not finished" not in md
    study.run_grid(grid, tmp_path / "s", train_fn=fake, progress=False)
    assert calls == ["a/seed0", "a/seed1", "b/seed0", "b/seed1"]  # nothing trained again


def test_a_signal_stops_the_study_after_its_report(tmp_path):
    grid_path = tmp_path / "grid.py"
    grid_path.write_text(STUDY_GRID)

    def preempted(config, workdir):
        raise Stopped("SIGTERM at step 3, after saving a checkpoint", signal.SIGTERM)

    with pytest.raises(Stopped) as stopped:
        study.run_grid(study.load_grid(grid_path), tmp_path / "s", train_fn=preempted,
                       progress=False)
    assert stopped.value.exit_status == 143
    assert "Not finished yet (4)" in (tmp_path / "s/results.md").read_text()


# ---- unreadable checkpoints ---------------------------------------------------------------------

def test_truncated_newest_checkpoint_falls_back_and_ends_as_an_uninterrupted_run(tmp_path,
                                                                                  capsys):
    config = small()
    trainer.train_and_evaluate(config, tmp_path / "straight")
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(config, workdir, stop_after_steps=4)  # checkpoints 2 and 4
    truncate_largest(workdir / "checkpoints/4/optimizer")
    capsys.readouterr()
    results = trainer.train_and_evaluate(config, workdir)
    said = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert len(said) == 1 and said[0].startswith(f"checkpoint 4 in {workdir / 'checkpoints'} "
                                                 f"cannot be restored (") and \
        said[0].endswith("; using checkpoint 2"), said
    assert results["global_step"] == 6 and (workdir / "unreadable_checkpoints/4").is_dir()
    jax.tree.map(np.testing.assert_array_equal, final_params(config, workdir),
                 final_params(config, tmp_path / "straight"))
    # the rows of steps 3 and 4 logged before the kill are there once, as the replay logged them
    assert metric_rows(workdir) == metric_rows(tmp_path / "straight")

    # evaluate and export fall back too: a cut array file, then cut metadata
    truncate_largest(workdir / "checkpoints/6/params")
    assert evaluate_workdir(workdir)["source"]["step"] == 4
    metadata = workdir / "checkpoints/4/params/_METADATA"
    os.truncate(metadata, metadata.stat().st_size // 2)
    capsys.readouterr()
    export_run(workdir, tmp_path / "hf")
    captured = capsys.readouterr()
    assert "checkpoints 6, 4 in" in captured.err and "; using checkpoint 2" in captured.err
    assert "at step 2" in captured.out


def test_no_checkpoint_that_restores_is_one_line(tmp_path, capsys):
    config = small(2)
    trainer.train_and_evaluate(config, tmp_path)
    truncate_largest(tmp_path / "checkpoints/2/params")
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(config, tmp_path))
    assert status == 2 and "checkpoint 2 in" in line and "no other checkpoint does" in line
    assert runs.checkpoint_steps(tmp_path) == [2]  # nothing set aside, nothing started over


# ---- reruns -------------------------------------------------------------------------------------

def test_a_rerun_says_where_it_resumes(tmp_path, capsys):
    config = small(6, 2)  # 4 SFT steps an epoch
    capsys.readouterr()
    trainer.train_and_evaluate(config, tmp_path, stop_after_steps=5)  # checkpoints 2, 4, 5
    assert "resuming" not in capsys.readouterr().out
    for budget, where in ((2, "step 5 (stage 1: sft, epoch 2)"),  # on to 6, the hand-off, 7
                          (0, "step 7 (stage 2: dpo, epoch 1)")):
        trainer.train_and_evaluate(config, tmp_path, stop_after_steps=budget)
        assert capsys.readouterr().out.splitlines()[0] == f"resuming {tmp_path} from {where}"


def test_a_run_saved_before_a_key_existed_resumes_with_its_default(tmp_path, capsys):
    config = small(4)
    trainer.train_and_evaluate(config, tmp_path, stop_after_steps=2)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["peak_flops"], saved["dpo"]["reference_path"]  # keys added after some runs
    (tmp_path / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    trainer.train_and_evaluate(config, tmp_path)
    assert capsys.readouterr().out.startswith(f"resuming {tmp_path} from step 2")
    changed = dict(saved, seed=7)
    (tmp_path / "config.json").write_text(json.dumps(changed))
    with pytest.raises(UserError, match=r"different config \(seed: 7 -> 0\)"):
        trainer.train_and_evaluate(config, tmp_path)


def snapshot(directory):
    """`{path: (mtime, bytes)}` of everything below `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.is_file() and p.read_bytes())
            for p in sorted(Path(directory).rglob("*"))}


def test_a_rerun_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys, monkeypatch):
    config = small(2)
    results = trainer.train_and_evaluate(config, tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    with monkeypatch.context() as patched:
        patched.setattr(trainer._Training, "_evaluate", lambda *args: pytest.fail("it evaluated"))
        assert trainer.train_and_evaluate(config, tmp_path) == results
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path} is finished (step 2): nothing to train or evaluate, nothing written; its "
        f"results are in {tmp_path / 'results.json'}; use a new --workdir to train again"]
    assert snapshot(tmp_path) == before
    # Without its results.json (a kill before it was written) the run is not finished: the
    # rerun resumes after the last stage and does the final evaluation.
    (tmp_path / "results.json").unlink()
    assert trainer.train_and_evaluate(config, tmp_path) == results
    assert capsys.readouterr().out.splitlines()[0] == (
        f"resuming {tmp_path} from step 2 (stage 1: sft done; the final evaluation)")
    assert json.loads((tmp_path / "results.json").read_text()) == results


# ---- storage ------------------------------------------------------------------------------------

@pytest.fixture
def small_files():
    """Writes past 20 kB fail (EFBIG) as on a full disk: the checkpoints' array files do."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, previous)


def test_failed_checkpoint_write_is_one_line_and_keeps_the_last_one(tmp_path, capsys,
                                                                     small_files):
    config = small()
    config.keep_checkpoints = 1
    trainer.train_and_evaluate(config, tmp_path, stop_after_steps=2)
    small_files()
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(
        config, tmp_path, stop_after_steps=2))
    assert status == 1, line
    assert line == (f"error: cannot write a checkpoint in {tmp_path / 'checkpoints'} (File too "
                    f"large); free space and rerun the same command: it resumes from "
                    f"checkpoint 2")
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]  # no temporary
    assert trainer.train_and_evaluate(config, tmp_path)["global_step"] == 6


# ---- the workdir lock ---------------------------------------------------------------------------

def test_lock_is_exclusive_and_a_dead_holder_is_stale(tmp_path):
    with lock.WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / lock.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError, match=f"in use by another training run \\(pid "
                                            f"{os.getpid()} on host"):
            lock.WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / lock.LOCK_FILE).exists()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / lock.LOCK_FILE).write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match=f"pid {sleeper.pid}"):
            lock.check_free(tmp_path)  # a live process here: busy, before any work
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.check_free(tmp_path)  # its holder is gone: stale
    with lock.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()


# ---- data ---------------------------------------------------------------------------------------

def test_non_utf8_bytes_name_the_file_line_and_fix(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", '
                     b'"completion": "b"}\n')
    with pytest.raises(UserError) as error:
        jsonl.load(str(path), ByteTokenizer())
    assert (f"config.data.train: {path} is not UTF-8 text (byte 0xe9 at line 2, column 16); "
            f"re-save it as UTF-8") in str(error.value)
    csv = tmp_path / "q.csv"
    csv.write_bytes(b"id\tsentence1\tsentence2\tis_duplicate\n1\ta\xff\tb\t1\n")
    with pytest.raises(UserError, match="line 2, column 4"):
        paraphrase.read(str(csv))


def test_skipped_jsonl_rows_are_named_by_line(tmp_path, capsys):
    rows = ['{"prompt": "p", "completion": "c"}', "", "{bad", '{"prompt": "p"}'] + ["[1]"] * 5
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    jsonl.load(str(path), ByteTokenizer())
    assert (f"{path}: skipped 7 malformed rows (lines 3, 4, 5, 6, 7, ...: not text, messages, "
            "prompt/completion or [prompt/]chosen/rejected)" in capsys.readouterr().out)


def test_too_long_rows_point_at_data_truncate():
    with pytest.raises(UserError, match="set data.truncate=true"):
        batching.tokenize_sft([{"prompt": "p" * 40, "completion": "c"}], ByteTokenizer(), 16,
                              strict=True)


def test_dev_prompts_cut_to_fit_are_reported(capsys):
    dev = [{"prompt": "x" * 50, "completion": "yes", "label": 1},
           {"prompt": "short", "completion": "no", "label": 0}]
    tasks.ClozeTask(dev, dev, {1: "yes", 0: "no"}, ByteTokenizer(), 16)
    assert "dev data: 1 of 2 prompts had their start cut to fit max_length=16" in \
        capsys.readouterr().out
