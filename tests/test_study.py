"""The study runner: a 2-cell × 2-seed grid end to end, skip-and-resume, statistics, counts."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxsftdpo import stats, study, study_report
from jaxsftdpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.py"
N_EMBD, N_LAYER, VOCAB, POSITIONS, R = 32, 2, 257, 64, 4

GRID = f'''
from jaxsftdpo.config import stage

def get_grid():
    tiny = {{"model.init.n_embd": {N_EMBD}, "model.init.n_layer": {N_LAYER},
             "model.init.n_head": 2, "model.init.n_positions": {POSITIONS},
             "data.n_train": 64, "data.n_dev": 32, "data.eval_batch_size": 32,
             "stages": [stage("sft", epochs=2, learning_rate=3e-3, batch_size=16),
                        stage("dpo", epochs=1, learning_rate=5e-4, batch_size=16)],
             "log_every": 1, "checkpoint_every": 3, "progress": False}}
    cell = lambda name, param, **o: {{"name": name, "config": {str(QUICKSTART)!r},
                                     "overrides": o, "reference": {{"accuracy": 50.0}},
                                     "labels": {{"schedule": "sft2_dpo1", "param": param}}}}
    return {{"name": "test", "seeds": 2, "overrides": tiny, "n_boot": 200,
             "cells": [cell("fft", "fft"), cell("lora", "lora{R}", **{{"param.kind": "lora",
                                                                    "param.r": {R}}})],
             "compare": [("lora", "fft")]}}
'''

PNGS = ("grid.png", "curves.png", "loss_curves.png", "dpo_rewards.png", "wall_clock.png")


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "configs" / "study" / "test_grid.py"
    path.parent.mkdir(parents=True)
    path.write_text(GRID)
    return path


@pytest.fixture(scope="module")
def uninterrupted(grid_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study_full")
    grid = study.load_grid(grid_file)
    records = study.run_grid(grid, workdir, progress=False)
    return grid, workdir, records


def test_grid_runs_end_to_end(uninterrupted):
    grid, workdir, records = uninterrupted
    assert len(records) == 4 and all(r["finished"] for r in records)
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["cell"], r["seed"]) for r in rows] == [("fft", "0"), ("fft", "1"),
                                                      ("lora", "0"), ("lora", "1")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and float(r["wall_s"]) > 0 for r in rows)
    md = (workdir / "results.md").read_text()
    assert "| fft | sft2_dpo1 | fft |" in md and "| lora | sft2_dpo1 | lora4 |" in md
    assert "accuracy (study)" in md and "## Paired differences of accuracy" in md
    # mean ± std in the table equal a direct computation on the csv
    acc = [float(r["accuracy"]) * 100 for r in rows if r["cell"] == "fft"]
    assert f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f}" in md
    for png in PNGS:
        assert (workdir / png).stat().st_size > 1000, png
    # the curves read eval rows at each epoch end of both stages
    curve = study_report_curve(records[0])
    assert [x for x, _ in curve] == [0.0, 1.0, 2.0, 3.0]


def study_report_curve(record):
    from jaxsftdpo.study_report import eval_curve
    return eval_curve(record, "accuracy")


def test_trainable_params_match_hand_count(uninterrupted):
    grid, workdir, records = uninterrupted
    d, L = N_EMBD, N_LAYER
    # LoRA on every GPT-2 linear: c_attn d->3d, attn c_proj d->d, c_fc d->4d, mlp c_proj 4d->d
    lora = L * R * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    per_layer = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * 4 * d + 4 * d) \
        + (4 * d * d + d)
    fft = VOCAB * d + POSITIONS * d + L * per_layer + 2 * d
    md = (workdir / "results.md").read_text()
    row = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()
           if " | sft2_dpo1 | " in line}
    assert f" {fft:,} |" in row["fft"] and f" {lora:,} |" in row["lora"]
    for r in records:
        assert r["results"]["trainable_params"] == (fft if r["cell"] == "fft" else lora)
        assert r["results"]["total_params"] == fft + (lora if r["cell"] == "lora" else 0)


class _Interrupt(Exception):
    pass


def test_interrupted_study_skips_finished_runs_and_draws_the_same_table(grid_file,
                                                                        uninterrupted, tmp_path):
    from jaxsftdpo.trainer import train_and_evaluate
    grid = study.load_grid(grid_file)
    trained = []

    def stop_after_first(record):
        raise _Interrupt  # e.g. the machine went away right after the first run finished

    with pytest.raises(_Interrupt):
        study.run_grid(grid, tmp_path, train_fn=counting(train_and_evaluate, trained),
                       after_run=stop_after_first, progress=False)
    assert trained == ["fft/seed0"]

    trained.clear()
    study.run_grid(grid, tmp_path, train_fn=counting(train_and_evaluate, trained),
                   progress=False)
    assert trained == ["fft/seed1", "lora/seed0", "lora/seed1"]  # fft/seed0 not trained again
    _, full_dir, _ = uninterrupted
    assert (tmp_path / "results.md").read_text() == (full_dir / "results.md").read_text()

    trained.clear()  # a third call trains nothing at all
    study.run_grid(grid, tmp_path, train_fn=counting(train_and_evaluate, trained),
                   progress=False)
    assert trained == []


def test_a_stopped_run_is_resumed_in_its_own_workdir(grid_file, tmp_path):
    """The study hands an unfinished run back to the trainer in the same sub-workdir (the
    trainer resumes from its checkpoints, tested in test_train.py) and goes no further after a
    run that stopped early. A fake trainer keeps this test free of compilation."""
    grid = study.load_grid(grid_file)
    calls = []

    def fake(config, workdir):
        calls.append(("/".join(Path(workdir).parts[-2:]), config.seed))
        if len(calls) == 2:
            return {"stopped_at_step": 5}  # preempted (SIGTERM): checkpointed, not finished
        results = {"evals": [{"after": "start", "accuracy": 0.5}, {"after": "1:sft",
                                                                   "accuracy": 0.75}],
                   "final": {"after": "1:sft", "accuracy": 0.75}, "global_step": 10,
                   "trainable_params": 7, "total_params": 9}
        (Path(workdir) / "results.json").write_text(json.dumps(results))
        (Path(workdir) / "config.json").write_text(config.to_json_best_effort())
        return results

    study.run_grid(grid, tmp_path, train_fn=fake, progress=False)
    assert calls == [("fft/seed0", 0), ("fft/seed1", 1)]
    assert "Not finished yet (3): fft/seed1, lora/seed0, lora/seed1" in (
        tmp_path / "results.md").read_text()
    study.run_grid(grid, tmp_path, train_fn=fake, progress=False)
    assert calls[2:] == [("fft/seed1", 1), ("lora/seed0", 0), ("lora/seed1", 1)]
    assert json.loads((tmp_path / "runs/fft/seed1/study_run.json").read_text())["calls"] == 2
    md = (tmp_path / "results.md").read_text()
    assert "| fft | sft2_dpo1 | fft | 75.00 ± 0.00 | 2 | 7 | 50.00 |" in md
    # a finished run whose config the grid no longer gives is not silently reused
    changed = study.load_grid(grid_file, extra_overrides={"data.n_dev": 48})
    with pytest.raises(UserError, match="different config"):
        study.run_grid(changed, tmp_path, train_fn=fake, progress=False)


def counting(train_fn, trained):
    def wrapped(config, workdir):
        trained.append("/".join(Path(workdir).parts[-2:]))
        return train_fn(config, workdir)
    return wrapped


# ---- statistics on known numbers ----------------------------------------------------------------

def test_mean_std_direct():
    mean, std = stats.mean_std([0.80, 0.84, 0.88])
    assert mean == pytest.approx(0.84)
    assert std == pytest.approx(np.sqrt(((-0.04) ** 2 + 0 + 0.04 ** 2) / 2))
    assert np.isnan(stats.mean_std([0.5])[1])


def test_paired_bootstrap_equals_direct_loop():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 2, (3, 11)).astype(float)
    b = rng.integers(0, 2, (3, 11)).astype(float)
    got = stats.paired_bootstrap(a, b, n_boot=300, seed=5)
    # the documented draw order, written as plain loops
    draw = np.random.default_rng(5)
    reps = []
    for _ in range(300):
        seeds = draw.integers(0, 3, 3)
        examples = draw.integers(0, 11, (3, 11))
        total = 0.0
        for k, s in enumerate(seeds):
            for i in examples[k]:
                total += a[s, i] - b[s, i]
        reps.append(total / 33)
    reps = sorted(reps)
    assert got.difference == pytest.approx(a.mean() - b.mean())
    np.testing.assert_allclose(np.sort(got.replicates), reps)
    # numpy's default percentile: linear interpolation between order statistics
    def percentile(q):
        pos = q / 100 * (len(reps) - 1)
        lo = int(np.floor(pos))
        return reps[lo] + (pos - lo) * (reps[min(lo + 1, len(reps) - 1)] - reps[lo])
    assert got.low == pytest.approx(percentile(2.5))
    assert got.high == pytest.approx(percentile(97.5))


def test_paired_bootstrap_matches_exact_distribution():
    # One seed, differences (0, 0, 1): the resampled mean is k/3 with k ~ Binomial(3, 1/3),
    # P(k=0) = 8/27 > 2.5 % and P(k=3) = 1/27 > 2.5 %, so the exact 95% interval is [0, 1].
    got = stats.paired_bootstrap([[1, 0, 1]], [[1, 0, 0]], n_boot=4000, seed=0)
    assert got.difference == pytest.approx(1 / 3)
    assert (got.low, got.high) == (0.0, 1.0)
    exact = {k / 3: p for k, p in zip(range(4), (8 / 27, 12 / 27, 6 / 27, 1 / 27))}
    values, counts = np.unique(np.round(got.replicates, 6), return_counts=True)
    for v, c in zip(values, counts):
        assert c / 4000 == pytest.approx(exact[round(v * 3) / 3], abs=0.03)
    # a constant difference has a zero-width interval
    const = stats.paired_bootstrap(np.ones((2, 5)), np.zeros((2, 5)), n_boot=50)
    assert (const.difference, const.low, const.high) == (1.0, 1.0, 1.0)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    (None, "does not exist"),
    ("X = 1\n", "defines no get_grid"),
    ("def get_grid():\n    return {'cells': [{'name': 'a', 'config': 'configs/quickstart.py',"
     " 'overide': {}}]}\n", "unknown key(s) 'overide'"),
    ("def get_grid():\n    return {'cells': [], 'seed': 3}\n", "unknown key(s) 'seed'"),
    ("def get_grid():\n    return {'cells': [{'name': 'a', 'config': 'configs/quickstart.py',"
     " 'overrides': {'data.n_trian': 5}}]}\n", "has no key 'data.n_trian'"),
    ("def get_grid():\n    return {'cells': [{'name': 'a', 'config': 'configs/quickstart.py',"
     " 'overrides': {'stages[0].epoch': 5}}]}\n", "has no key 'stages[0].epoch'"),
    ("def get_grid():\n    return {'cells': [{'name': 'a', 'config': 'configs/nope.py'}]}\n",
     "configs/nope.py does not exist"),
    ("def get_grid():\n    return {'cells': [{'name': 'a', 'config': 'configs/quickstart.py'}],"
     " 'compare': [('a', 'b')]}\n", "must name two cells"),
    ("def get_grid():\n    return {'cells': [{'name': 'a', 'config': 'configs/quickstart.py'}],"
     " 'metric': 'f1', 'compare': [('a', 'majority_class')]}\n", "a baseline of accuracy"),
])
def test_bad_grid_is_a_user_error(tmp_path, monkeypatch, body, message):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "g.py"
    if body is not None:
        path.write_text(body)
    with pytest.raises(UserError) as error:
        study.load_grid(path)
    assert message in str(error.value)


@pytest.mark.parametrize("args", [
    ["--grid", "configs/study/missing.py"],
    ["--grid", "configs/study/tiny.py", "--config.data.n_trian=5"],
    ["--grid", "configs/study/tiny.py", "--seeds", "x"],
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args):
    proc = subprocess.run([sys.executable, "-m", "jaxsftdpo.study", *args,
                           "--workdir", str(tmp_path / "w")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "w").exists()


def test_majority_class_pairs_each_run_with_the_most_common_dev_label(tmp_path):
    from jaxsftdpo.study_report import MAJORITY_CLASS, majority_class_scores, paired_scores
    labels = [0, 1, 0, 0, 1]
    records = []
    for seed, correct in enumerate(([1, 1, 0, 1, 1], [1, 0, 1, 1, 1])):
        out = tmp_path / f"seed{seed}"
        out.mkdir()
        (out / "dev_predictions.jsonl").write_text("".join(
            json.dumps({"id": f"q{i}", "label": g, "correct": c}) + "\n"
            for i, (g, c) in enumerate(zip(labels, correct))))
        records.append({"cell": "sft", "seed": seed, "finished": True, "workdir": str(out)})
    assert majority_class_scores(tmp_path / "seed0") == {
        '"q0"': 1.0, '"q1"': 0.0, '"q2"': 1.0, '"q3"': 1.0, '"q4"': 0.0}
    a, b = paired_scores(records, "sft", MAJORITY_CLASS, "accuracy")
    assert a.tolist() == [[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]]
    assert b.tolist() == [[1, 0, 1, 1, 0]] * 2


def test_overrides_reach_the_config():
    config = study.load_config(ROOT / "configs/quickstart.py")
    study.apply_override(config, "stages[1].learning_rate", 1e-5)
    study.apply_override(config, "param.kind", "lora")
    assert config.stages[1].learning_rate == 1e-5 and config.param.kind == "lora"
    with pytest.raises(UserError, match="out of range"):
        study.apply_override(config, "stages[5].epochs", 1)
    with pytest.raises(UserError, match="data.n_train"):
        study.apply_override(config, "data.n_train", "many")


def test_shipped_grids_load():
    tiny = study.load_grid(ROOT / "configs/study/tiny.py")
    assert len(tiny.cells) == 6 and {c.labels["param"] for c in tiny.cells} == {"fft", "lora8"}
    # the study's own grids build their configs from configs/paraphrase.py and sonnets.py
    for name, cells, args in (("paraphrase", 48, "schedule=sft9_dpo6,param=lora8,scale=0.1"),
                              ("sonnets", 15, "schedule=sft10_dpo3,param=fft,temperature=1.5,"
                                              "pairing=worst_of_k")):
        if not (ROOT / "configs" / f"{name}.py").exists():
            pytest.skip(f"configs/{name}.py is not there yet")
        grid = study.load_grid(ROOT / "configs/study" / f"{name}.py")
        assert len(grid.cells) == cells and args in {c.arg for c in grid.cells}
        assert any(c.reference for c in grid.cells)


# ---- the SmolLM2 grids, in miniature ----------------------------------------------------------

TINY_LLAMA = dict(model_type="llama", vocab_size=257, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=256, eos_token_id=256,
                  tie_word_embeddings=True)
ON_A_TINY_LLAMA = {"model.name_or_path": "", "model.init": TINY_LLAMA, "model.tokenizer": "bytes"}


def two_cells(grid_arg: str, keep: list[str], overrides: dict, workdir):
    """The shipped grid `grid_arg` cut to the cells `keep`, one seed, on a tiny random Llama."""
    grid = study.load_grid(ROOT / grid_arg, extra_overrides={**ON_A_TINY_LLAMA, **overrides})
    grid.cells = [grid.cell(name) for name in keep]
    grid.compare = [pair for pair in grid.compare
                    if set(pair) <= {*keep, study_report.MAJORITY_CLASS}]
    return grid, study.run_grid(grid, workdir, seeds=1, progress=False)


@pytest.mark.slow
def test_smollm2_paraphrase_grid_runs_end_to_end(tmp_path):
    from test_tasks import write_quora
    data = {"data.train": write_quora(tmp_path / "train.csv", 1200, 0),
            "data.dev": write_quora(tmp_path / "dev.csv", 40, 1)}
    grid, records = two_cells("configs/study/smollm2_paraphrase.py:size=cpu",
                              ["zero_shot", "sft64_dpo16-fft-n1024"], data, tmp_path / "s")
    assert all(r["finished"] for r in records)
    zero, staged = (r["results"] for r in records)
    assert [e["after"] for e in zero["evals"]] == ["start"]
    assert [e["after"] for e in staged["evals"]] == ["1:sft", "2:dpo"]  # eval_at_start off
    assert staged["global_step"] == 80
    md = (tmp_path / "s" / "results.md").read_text()
    assert "| zero_shot |" in md and "| sft64_dpo16-fft-n1024 |" in md
    assert "| sft64_dpo16-fft-n1024 | majority_class | 1 | 40 |" in md
    with open(tmp_path / "s" / "results.csv") as f:  # as the grid names it, no machine's path
        assert {row["config"] for row in csv.DictReader(f)} == {"configs/smollm2.py"}


@pytest.mark.slow
def test_smollm2_dpo_select_grid_trains_dpo_alone_from_the_policy(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from test_tasks import write_quora
    policy = tmp_path / "policy"
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(policy)
    with pytest.raises(UserError, match="policy=DIR"):
        study.load_grid(ROOT / "configs/study/smollm2_paraphrase.py:size=dpo_select")
    data = {"data.train": write_quora(tmp_path / "train.csv", 1200, 0),
            "data.dev": write_quora(tmp_path / "dev.csv", 40, 1), "model.tokenizer": "bytes"}
    grid = study.load_grid(ROOT / f"configs/study/smollm2_paraphrase.py:size=dpo_select,"
                                  f"policy={policy}", extra_overrides=data)
    grid.cells = [grid.cell(name) for name in ("sft_policy", "dpo16-lr5e-6-anchor1")]
    grid.compare = [pair for pair in grid.compare if pair[0] == "dpo16-lr5e-6-anchor1"]
    before, after = (r["results"] for r in study.run_grid(grid, tmp_path / "s", seeds=1,
                                                           progress=False))
    assert [e["after"] for e in before["evals"]] == ["start"]
    assert [e["after"] for e in after["evals"]] == ["1:dpo"] and after["global_step"] == 16
    config = json.loads((tmp_path / "s/runs/dpo16-lr5e-6-anchor1/seed0/config.json").read_text())
    assert config["model"]["name_or_path"] == str(policy) and config["dpo"]["sft_weight"] == 1.0
    assert config["data"]["dev_from_train"] == 400  # held-out training pairs, never the dev file
    assert "| dpo16-lr5e-6-anchor1 | sft_policy | 1 | 400 |" in (tmp_path / "s/results.md"
                                                                 ).read_text()


@pytest.mark.slow
def test_smollm2_sonnet_grid_runs_end_to_end(tmp_path):
    from test_tasks import LINES, sonnet_file
    from jaxsftdpo.data import sonnets
    rng = np.random.default_rng(0)
    train = ["\n".join(LINES[j] for j in rng.permutation(len(LINES))[:5]) for _ in range(16)]
    dev = ["\n".join(LINES[j] for j in rng.permutation(len(LINES))[:5]) for _ in range(2)]
    data = {"data.train": sonnet_file(tmp_path / "sonnets.txt", train),
            "data.dev": sonnet_file(tmp_path / "dev.txt", [sonnets.prompt_of(t) for t in dev],
                                    first=20),
            "data.dev_references": sonnet_file(tmp_path / "true_dev.txt", dev, first=20),
            "data.max_new_tokens": 16}
    grid, records = two_cells("configs/study/smollm2_sonnets.py:size=cpu",
                              ["zero_shot", "sft_dpo-worst_of_k-lora8"], data, tmp_path / "s")
    assert all(r["finished"] for r in records)
    final = records[1]["results"]["final"]
    assert final["chrf_T1"] == final["chrf"] and 0 < final["chrf_T1.5"] <= 100
    assert (tmp_path / "s" / "chrf_temperature.png").stat().st_size > 1000
    assert "24.77" in (tmp_path / "s" / "results.md").read_text()  # the prompts' own chrF


@pytest.mark.slow
def test_gpu_study_script_runs_its_tiny_version_on_a_cpu(tmp_path):
    """scripts/gpu_study.sh TINY=1: the size=gpu grid at depth 6 on a tiny GPT-2, every cell
    finished, the report and the machine's description in OUT."""
    import os
    from test_tasks import write_quora
    data = tmp_path / "data"
    data.mkdir()
    write_quora(data / "quora-minbert-train-12k.csv", 200, 0)
    write_quora(data / "quora-minbert-dev-2k.csv", 40, 1)
    env = {**os.environ, "TINY": "1", "DATA": str(data), "OUT": str(tmp_path / "out"),
           "WORKDIR": str(tmp_path / "study"), "BUDGET_S": "500",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on the GPU machine
    proc = subprocess.run(["bash", "scripts/gpu_study.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    assert {"results.md", "results.csv", "grid.png", "study.log", "environment.txt"} <= {
        p.name for p in out.iterdir()}
    md = (out / "results.md").read_text()
    for cell in ("sft6-fft-all", "dpo6-lora8-all", "sft2_dpo4-fft-all", "sft4_dpo2-lora8-all",
                 "orpo6-lora8-all"):
        assert f"| {cell} |" in md
    assert "Not finished" not in md and "| sft6-fft-all | majority_class | 1 | 40 |" in md
    assert "study: exit 0" in (out / "environment.txt").read_text()
