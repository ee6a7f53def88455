"""A DPO reference taken from another model (`dpo.reference_path`): another run's workdir or a
Hugging Face directory, held in memory or its log-probs precomputed; and its one-line errors."""

import json
import math

import pytest
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel

from jaxsftdpo import trainer
from jaxsftdpo.export import export_run
from test_data import chat_tokenizer  # noqa: F401 - a fixture
from testing import cli_exit, tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py


def first_dpo_row(workdir) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return next(r for r in rows if r.get("kind") == "dpo" and "loss" in r)


def dpo_only(reference_path, reference="frozen_copy", **changes):
    """Two DPO steps of the quickstart's data against `reference_path`."""
    return tiny_config(0, 2, **{"dpo.reference_path": str(reference_path),
                                "dpo.reference": reference, "eval_at_start": False,
                                **changes})


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A short SFT run (the reference) and its export as a Hugging Face directory."""
    root = tmp_path_factory.mktemp("reference")
    trainer.train_and_evaluate(tiny_config(4, 0), root / "sft")
    return root / "sft", export_run(root / "sft", root / "sft_hf")


@pytest.mark.parametrize("reference", ["frozen_copy", "precomputed"])
def test_the_policys_own_weights_from_elsewhere_start_dpo_at_log2(sft_run, tmp_path, reference):
    """The policy starts from the SFT run's export and the reference is that run's workdir:
    the same weights, read two ways, so DPO's first loss is log 2 and its rewards 0."""
    workdir, exported = sft_run
    config = dpo_only(workdir, reference, **{"model.name_or_path": str(exported),
                                             "model.tokenizer": str(exported)})
    trainer.train_and_evaluate(config, tmp_path)
    row = first_dpo_row(tmp_path)
    assert abs(row["loss"] - math.log(2)) < 1e-5
    assert abs(row["rewards/chosen"]) < 1e-5 and abs(row["rewards/rejected"]) < 1e-5


def test_a_reference_other_than_the_policy_is_the_one_used(sft_run, tmp_path):
    """From scratch against the SFT run: the first rewards are not 0 (the hand-off reference
    would give 0), and equal whether the reference is the workdir or its export, held in
    memory or precomputed; evaluate scores the run against the same reference."""
    workdir, exported = sft_run
    rows = {}
    for name, source, reference in (("workdir", workdir, "frozen_copy"),
                                    ("precomputed", workdir, "precomputed"),
                                    ("hf", exported, "frozen_copy")):
        trainer.train_and_evaluate(dpo_only(source, reference), tmp_path / name)
        rows[name] = first_dpo_row(tmp_path / name)
    assert abs(rows["workdir"]["rewards/chosen"]) > 1e-3
    for name in ("precomputed", "hf"):
        for metric in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert rows[name][metric] == pytest.approx(rows["workdir"][metric], abs=1e-5), name


def test_a_reference_with_another_tokenizer_is_one_line(tmp_path, capsys, chat_tokenizer):
    other = tmp_path / "other"
    GPT2LMHeadModel(HFGPT2Config(vocab_size=chat_tokenizer.vocab_size, n_positions=64, n_embd=16,
                                 n_layer=1, n_head=2)).save_pretrained(other)
    chat_tokenizer.save(str(other))
    workdir = tmp_path / "run"
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(dpo_only(other), workdir))
    assert status == 2 and "config.dpo.reference_path=" in line, line
    assert f"its tokenizer is not the policy's ({chat_tokenizer.vocab_size} tokens there, 257 " \
           f"in the policy's)" in line
    assert not workdir.exists()


def test_a_missing_reference_is_one_line(tmp_path, capsys):
    workdir = tmp_path / "run"
    status, line = cli_exit(capsys, lambda: trainer.train_and_evaluate(
        dpo_only(tmp_path / "nowhere"), workdir))
    assert status == 2 and str(tmp_path / "nowhere") in line, line
    assert not workdir.exists()
