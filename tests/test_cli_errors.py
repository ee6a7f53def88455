"""Bad input to `python -m jaxsftdpo.train`: one line naming the problem and the fix, exit status
2, and nothing half-written in the workdir."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs/quickstart.py")
FAST = ["--config.progress=False", "--config.data.n_train=64", "--config.data.n_dev=16",
        "--config.stages[0].epochs=0", "--config.stages[0].steps=2",
        "--config.stages[1].epochs=0", "--config.stages[1].steps=1"]


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(compilation_cache_dir):
    """conftest's persistent compilation cache for this module's `train` processes, through
    the environment (their jax is not this process's): a run that repeats another's programs
    (a resume, the same config in another workdir) compiles nothing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache_dir))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield


def start(workdir, *overrides, config=QUICK):
    # The environment of the tests (conftest): 8 CPU devices, no hub access.
    return subprocess.Popen(
        [sys.executable, "-m", "jaxsftdpo.train", "--config", config, "--workdir", str(workdir),
         *FAST, *overrides], cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def assert_one_line_error(returncode, err, *fragments):
    assert returncode == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
    sft_only = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    unparsable = tmp_path / "unparsable.py"
    unparsable.write_text("def get_config(:\n")
    cases = {
        "unknown key": (["--config.lerning_rate=1"], ["lerning_rate", "config.py"]),
        "unknown stage key": (["--config.stages[0].lerning_rate=1"],
                              ["--config.stages[0].lerning_rate: the config has no key "
                               "lerning_rate (did you mean learning_rate?)"]),
        "stage past the list": (["--config.stages[5].learning_rate=1"],
                                ["--config.stages[5].learning_rate: stages has 2 items in the "
                                 "config file, [0] to [1]"]),
        "missing config file": ([], ["--config file /no/such.py does not exist"]),
        "unparsable config file": ([], ["SyntaxError"]),
        "cell argument type": ([], ["'scale=abc': scale takes a number"]),
        "mistyped value": (["--config.seed=abc"], ["seed", "abc"]),
        "missing model": (["--config.model.name_or_path=/no/such/model"], ["/no/such/model"]),
        "missing data file": (["--config.data.task=jsonl", "--config.data.train=/no/such.jsonl"],
                              ["/no/such.jsonl"]),
        "empty dataset": (["--config.data.task=jsonl", f"--config.data.train={empty}"],
                          ["no usable row"]),
        "empty generated dataset": (["--config.data.n_train=0"], ["no usable example"]),
        "sequence too long": (["--config.model.init.n_positions=32"], ["longer than", "32"]),
        "max_length over the model": (["--config.data.max_length=100"], ["100", "64"]),
        "batch over devices": (["--config.stages[0].batch_size=12"], ["12", "multiple of 8"]),
        "mesh over devices": (["--config.mesh.data=3"], ["mesh", "8"]),
        "lora target": (["--config.param.kind=lora", "--config.param.target_modules=q_proj"],
                        ["q_proj"]),
        "dpo without pairs": (["--config.data.task=jsonl", f"--config.data.train={sft_only}"],
                              ["stages[1]", "preference"]),
        "unknown stage kind": (["--config.stages[0].kind=ppo"], ["ppo", "sft"]),
        # Only simpo's loss has a margin; orpo's and dpo's keys have no place for one.
        "margin for a loss without one": (["--config.stages[1].kind=orpo",
                                           "--config.orpo.gamma=0.5"],
                                          ["--config.orpo.gamma: the config has no key gamma"]),
    }
    configs = {"missing config file": "/no/such.py", "unparsable config file": str(unparsable),
               "cell argument type": str(ROOT / "configs/paraphrase.py") + ":scale=abc"}
    running = {name: (start(tmp_path / name.replace(" ", "_"), *args,
                            config=configs.get(name, QUICK)), fragments)
               for name, (args, fragments) in cases.items()}
    for name, (process, fragments) in running.items():
        returncode, _, err = finish(process)
        assert_one_line_error(returncode, err, *fragments)
        assert not (tmp_path / name.replace(" ", "_")).exists(), name


def hf_gpt2(directory, n_embd):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=257, n_positions=64, n_embd=n_embd, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(directory)


def snapshot(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns
            for p in sorted(Path(directory).rglob("*"))}


def test_checkpoint_that_does_not_fit_the_model(tmp_path):
    model_dir = tmp_path / "model"
    hf_gpt2(model_dir, 32)
    workdir = tmp_path / "run"
    first = ["--config.model.name_or_path=" + str(model_dir), "--config.model.tokenizer=bytes"]
    returncode, _, err = finish(start(workdir, *first, "--config.stages[1].steps=3"))
    assert returncode == 0, err
    # The model directory now holds a wider model; the run's checkpoint no longer fits it.
    hf_gpt2(model_dir, 64)
    before = snapshot(workdir)
    returncode, _, err = finish(start(workdir, *first, "--config.stages[1].steps=3"))
    assert_one_line_error(returncode, err, "checkpoint", "does not fit")
    assert snapshot(workdir) == before

    returncode, _, err = finish(start(workdir, *first, "--config.seed=7"))
    assert_one_line_error(returncode, err,
                          "different config (seed: 0 -> 7; stages[1].steps: 3 -> 1)")
    assert snapshot(workdir) == before


def test_busy_workdir_and_sigterm(tmp_path):
    """A second `train` on a workdir whose lock a live process holds stops at once and leaves
    that workdir alone; SIGTERM checkpoints and exits 143; the same command then resumes the run,
    which ends as the uninterrupted one, every step logged once."""
    import signal
    import time

    import jax
    import numpy as np

    from jaxsftdpo import lock, runs

    longer = ["--config.data.n_train=256", "--config.stages[0].steps=100",
              "--config.checkpoint_every=100000"]
    busy, straight, stopped = tmp_path / "busy", tmp_path / "straight", tmp_path / "stopped"
    # This process holds the lock as a running trainer would (tests/test_robustness.py covers
    # the lock itself), so the refused run cannot race a short run to its end.
    with lock.WorkdirLock(busy):
        before = snapshot(busy)
        refused = start(busy, *longer)
        first, second = start(straight, *longer), start(stopped, *longer)
        returncode, _, err = finish(refused)
        assert snapshot(busy) == before
    assert_one_line_error(returncode, err, f"{busy} is in use by another training run "
                                           f"(pid {os.getpid()} on host")

    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.1)
    second.send_signal(signal.SIGTERM)
    returncode, _, err = finish(second)
    assert returncode == 128 + signal.SIGTERM, err
    assert err.strip().startswith("stopped: SIGTERM at step ") and \
        err.strip().endswith("rerun the same command to resume"), err
    assert not (stopped / "results.json").exists() and not (stopped / "train.lock").exists()
    assert runs.checkpoint_steps(stopped)

    assert finish(first)[0] == 0
    returncode, _, err = finish(start(stopped, *longer))
    assert returncode == 0, err

    def logged(workdir):
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]

    assert logged(stopped) == logged(straight)
    assert json.loads((stopped / "results.json").read_text())["global_step"] == 101
    jax.tree.map(np.testing.assert_array_equal, runs.load_run(stopped).trainable,
                 runs.load_run(straight).trainable)
