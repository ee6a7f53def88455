"""The study's tasks end to end on tiny models (byte tokenizer, 2-layer GPT-2 from its config):
paraphrase SFT-only and DPO-only beat the majority class, the sonnet pipeline runs SFT ->
sampled rejected answers -> DPO -> chrF, and JSONL data is scored on its dev rows."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxsftdpo.config import stage
from jaxsftdpo.data import sonnets
from jaxsftdpo.policy import Policy
from jaxsftdpo import stage_data
from jaxsftdpo.runs import build_run
from jaxsftdpo.trainer import train_and_evaluate
from test_data import chat_tokenizer  # noqa: F401 - a fixture
from testing import task_config

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py

QUESTIONS = ["How do I learn Python?", "What is the best phone?", "Why is the sky blue?",
             "Where can I buy a bike?"]
VARIANTS = [str.upper, str.lower, lambda q: q.replace("?", " ?"), lambda q: "  " + q]


def write_quora(path, n, seed, labelled=True):
    """A paraphrase-like course file: duplicates are case/spacing variants of the same question
    (equal after the course's normalisation), about a third of the rows; the rest pair two
    different questions."""
    rng = np.random.default_rng(seed)
    lines = ["id\tsentence1\tsentence2" + "\tis_duplicate" * labelled]
    for i in range(n):
        first, label = rng.integers(len(QUESTIONS)), int(rng.random() < 0.35)
        second = first if label else (first + 1 + rng.integers(len(QUESTIONS) - 1)) % len(
            QUESTIONS)
        variant = VARIANTS[rng.integers(len(VARIANTS))](QUESTIONS[second])
        lines.append(f"{i} {seed:04x}-{i:04x}\t{QUESTIONS[first]}\t{variant}" +
                     f"\t{label:.1f}" * labelled)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def majority_accuracy(path) -> float:
    labels = [line.rsplit("\t", 1)[1] == "1.0" for line in path.read_text().splitlines()[1:]]
    return max(np.mean(labels), 1 - np.mean(labels))


@pytest.fixture(scope="module")
def quora(tmp_path_factory):
    d = tmp_path_factory.mktemp("quora")
    return {"train": write_quora(d / "quora-train.csv", 256, 0),
            "dev": write_quora(d / "quora-dev.csv", 64, 1),
            "test": write_quora(d / "quora-test-student.csv", 10, 2, labelled=False),
            "majority": majority_accuracy(d / "quora-dev.csv")}


def test_paraphrase_sft_only_beats_majority_and_writes_submissions(quora, tmp_path):
    config = task_config("paraphrase", [stage("sft", epochs=8, learning_rate=3e-3,
                                              batch_size=32)],
                         train=quora["train"], dev=quora["dev"], test=quora["test"])
    results = train_and_evaluate(config, str(tmp_path))
    assert results["final"]["accuracy"] >= quora["majority"] + 0.1
    dev = (tmp_path / "para-dev-output.csv").read_text().splitlines()
    test = (tmp_path / "para-test-output.csv").read_text().splitlines()
    assert dev[0] == test[0] == "id \t Predicted_Is_Paraphrase "
    assert len(dev) == 65 and len(test) == 11
    # Byte tokenizer: the answers' first tokens are the bytes of "y" and "n".
    assert dev[1].startswith("0 0001-0000, ") and dev[1][-5:] in (" 121 ", " 110 ")


def test_paraphrase_dpo_only_beats_majority(quora, tmp_path):
    config = task_config("paraphrase", [stage("dpo", epochs=8, learning_rate=3e-3,
                                              batch_size=32)],
                         train=quora["train"], dev=quora["dev"])
    results = train_and_evaluate(config, str(tmp_path))
    assert results["evals"][0]["after"] == "start"
    assert results["final"]["accuracy"] >= quora["majority"] + 0.1


LINES = ["Shall I compare thee,", "Thou art more lovely,", "Rough winds do shake,",
         "And summer's lease,", "Sometime too hot,", "So long as men,", "When in disgrace,",
         "I all alone beweep,"]


def sonnet_file(path, texts, header="Sonnets\nby W. S.\n\n\n", newline="\n", first=1):
    body = "".join(f"\n{first + i}\n\n{text}\n" for i, text in enumerate(texts))
    path.write_bytes((header + body).replace("\n", newline).encode())
    return str(path)


def test_sonnet_pipeline_sft_sampled_pairs_dpo_chrf(tmp_path):
    rng = np.random.default_rng(0)
    train = ["\n".join(LINES[j] for j in rng.permutation(len(LINES))[:5]) for _ in range(8)]
    true_dev = ["\n".join(LINES[j] for j in rng.permutation(len(LINES))[:5]) for _ in range(2)]
    data = tmp_path / "data"
    data.mkdir()
    config = task_config(
        "sonnets",
        [stage("sft", epochs=4, learning_rate=3e-3, batch_size=8),
         stage("dpo", epochs=1, learning_rate=1e-3, batch_size=8)],
        train=sonnet_file(data / "sonnets.txt", train, newline="\r\n"),
        dev=sonnet_file(data / "dev.txt", [sonnets.prompt_of(t) for t in true_dev], first=20),
        dev_references=sonnet_file(data / "true_dev.txt", true_dev, first=20),
        test=sonnet_file(data / "test.txt", [sonnets.prompt_of(t) for t in train[:3]],
                         newline="\r\n"),
        max_new_tokens=24, temperature=1.0, top_p=0.9, eval_seeds=(0, 1),
        eval_temperatures=(1.0, 2.0),
        pairing="worst_of_k", pairing_k=2, eval_batch_size=8)
    run_dir = tmp_path / "run"
    results = train_and_evaluate(config, str(run_dir))

    assert [e["after"] for e in results["evals"]] == ["start", "1:sft", "2:dpo"]
    final = results["final"]
    assert 0 < final["chrf"] <= 100
    assert final["chrf"] == pytest.approx((final["chrf_seed0"] + final["chrf_seed1"]) / 2)
    assert final["chrf_T1"] == final["chrf"] and 0 < final["chrf_T2"] <= 100
    assert final["chrf_T2"] != final["chrf"]  # sampled at another temperature
    pairs = [json.loads(line) for line in (run_dir / "pairs_stage2.jsonl").read_text()
             .splitlines()]
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [
        (sonnets.prompt_of(t), sonnets.continuation_of(t)) for t in train]
    assert all(p["rejected"] != p["chosen"] for p in pairs)
    dpo_logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                  .splitlines()]
    assert any(r.get("kind") == "dpo" and "rewards/accuracies" in r for r in dpo_logged)
    for seed in (0, 1):
        generated = sonnets.parse_generated(
            (run_dir / f"generated_sonnets_dev_seed{seed}.txt").read_text())
        assert len(generated) == 2
        assert all(g.startswith(sonnets.prompt_of(t)) for g, t in zip(generated, true_dev))
    test_out = (run_dir / "generated_sonnets_test.txt").read_text()
    assert test_out.startswith("--Generated Sonnets-- \n\n\n0\n")
    assert len(sonnets.parse_generated(test_out)) == 3
    examples = [json.loads(line) for line in (run_dir / "dev_predictions.jsonl").read_text()
                .splitlines()]
    assert [(e["id"], len(e["generated"]), len(e["chrf"])) for e in examples] == [
        ("20", 2, 2), ("21", 2, 2)]


def test_jsonl_task_trains_sft_and_dpo_rows_and_scores_dev(tmp_path):
    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "x" * 200, "completion": "long"},
            *({"prompt": f"Q{i}: ", "chosen": "good", "rejected": "bad"} for i in range(8))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    config = task_config("jsonl", [stage("sft", epochs=1, batch_size=8),
                                   stage("dpo", epochs=1, batch_size=8)],
                         train=str(tmp_path / "train.jsonl"), dev=str(tmp_path / "dev.jsonl"),
                         truncate=True)
    run = build_run(config)
    data = stage_data.tokenize_stages(run)
    assert [len(items) for items in data.items] == [10, 8]
    assert any("1 examples had their prompt cut from the left" in n for n in data.notes)
    policy = Policy(run.graphdef, run.trainable, run.frozen, run.tokenizer, run.mesh,
                    run.max_length)
    evaluation = run.task.evaluate(policy, 8)
    assert evaluation.scores["nll"] == pytest.approx(np.log(257), rel=0.2)
    assert 0 <= evaluation.scores["pair_accuracy"] <= 1
    assert [e["id"] for e in evaluation.examples] == [0, 1, 2]
    assert "correct" in evaluation.examples[2] and "correct" not in evaluation.examples[0]


def test_paraphrase_dev_limit_scores_the_first_dev_pairs(quora):
    from jaxsftdpo.data.tokenizer import ByteTokenizer
    from jaxsftdpo.tasks import make_task

    config = task_config("paraphrase", [stage("sft", steps=1)], train=quora["train"],
                         dev=quora["dev"], dev_limit=10)
    task = make_task(config.data, ByteTokenizer(), 128, 0)
    everything = make_task(task_config("paraphrase", [stage("sft", steps=1)],
                                       train=quora["train"], dev=quora["dev"]).data,
                           ByteTokenizer(), 128, 0)
    assert [e["id"] for e in task.dev] == [e["id"] for e in everything.dev[:10]]
    assert len(everything.dev) == 64


def test_paraphrase_chat_template_wraps_every_prompt(quora, chat_tokenizer):
    from jaxsftdpo.data.tokenizer import ByteTokenizer
    from jaxsftdpo.errors import UserError
    from jaxsftdpo.tasks import make_task

    def task(tokenizer, chat):
        config = task_config("paraphrase", [stage("sft", steps=1)], train=quora["train"],
                             dev=quora["dev"], test=quora["test"], chat_template=chat)
        return make_task(config.data, tokenizer, 512, 0)

    plain, chat = task(chat_tokenizer, False), task(chat_tokenizer, True)
    for got, raw in ((chat.train, plain.train), (chat.dev, plain.dev), (chat.test, plain.test)):
        assert [e["prompt"] for e in got] == [chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": e["prompt"]}], tokenize=False,
            add_generation_prompt=True) for e in raw]
    assert chat.train[0]["prompt"].endswith("<|assistant|>")
    assert [e["completion"] for e in chat.train] == [e["completion"] for e in plain.train]
    assert [list(ids) for ids in chat.dev_prompts[:3]] == [
        chat_tokenizer.prefix_ids + chat_tokenizer.encode(e["prompt"]) for e in chat.dev[:3]]
    with pytest.raises(UserError, match="chat_template=False"):
        task(ByteTokenizer(), True)


def test_dev_from_train_holds_out_the_last_rows_and_stages_may_be_empty(quora, tmp_path):
    from jaxsftdpo.data import paraphrase
    from jaxsftdpo.errors import UserError

    rows = paraphrase.read(quora["train"])
    config = task_config("paraphrase", [], train=quora["train"], dev="missing.csv",
                         dev_from_train=40)
    run = build_run(config)
    assert [e["id"] for e in run.task.dev] == [e["id"] for e in rows[-40:]]
    assert [e["id"] for e in run.task.train] == [e["id"] for e in rows[:-40]]
    # no stages: the run only evaluates, once
    results = train_and_evaluate(config, str(tmp_path / "zero_shot"))
    assert [e["after"] for e in results["evals"]] == ["start"] and "accuracy" in results["final"]
    # eval_at_start=False: the first evaluation is the first stage's
    config = task_config("paraphrase", [stage("sft", steps=2, batch_size=8)],
                         train=quora["train"], dev_from_train=40)
    config.eval_at_start = False
    results = train_and_evaluate(config, str(tmp_path / "no_start"))
    assert [e["after"] for e in results["evals"]] == ["1:sft"]
    with pytest.raises(UserError, match="leaves nothing to train on"):
        build_run(task_config("paraphrase", [], train=quora["train"], dev_from_train=len(rows)))


def test_prompt_logits_in_length_order_come_back_in_the_prompts_order():
    config = task_config("yes_no", [stage("sft", steps=1)], n_train=16, n_dev=8)
    run = build_run(config)
    policy = Policy(run.graphdef, run.trainable, run.frozen, run.tokenizer, run.mesh, 64)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=n).astype(np.int32) for n in (30, 3, 17, 9, 41, 5)]
    together = policy.prompt_logits(prompts, batch_size=4)
    alone = np.concatenate([policy.prompt_logits([p], batch_size=1) for p in prompts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("balance", ["pairs", "all"])
def test_balance_keeps_as_many_of_each_answer_as_the_rarest_has(quora, balance):
    from jaxsftdpo.data.tokenizer import ByteTokenizer
    from jaxsftdpo.tasks import make_task

    def task(balance, seed=0):
        config = task_config("paraphrase", [stage("dpo", steps=1)], train=quora["train"],
                             dev=quora["dev"], balance=balance)
        return make_task(config.data, ByteTokenizer(), 512, seed)

    plain, balanced = task("none"), task(balance)
    yes = sum(e["label"] for e in plain.train)
    assert 0 < yes < len(plain.train) / 2
    pairs = balanced.preference_pairs()
    assert [p["chosen"] for p in pairs].count("yes") == [p["chosen"] for p in pairs].count("no")
    assert len(pairs) == 2 * yes
    # every positive is kept, in file order; the negatives are a seeded subset
    kept = [e["prompt"] for e in plain.train if e["label"] == 1]
    assert [p["prompt"] for p in pairs if p["chosen"] == "yes"] == kept
    assert pairs == task(balance).preference_pairs()
    assert pairs != task(balance, seed=1).preference_pairs()
    sft = balanced.sft_examples()
    assert sft == (plain.train if balance == "pairs" else balanced.pair_examples)


def test_balance_errors_name_the_fix(quora, tmp_path):
    from jaxsftdpo.config import validate
    from jaxsftdpo.errors import UserError

    with pytest.raises(UserError, match="use one of"):
        validate(task_config("paraphrase", [stage("sft", steps=1)], train=quora["train"],
                             balance="yes"))
    with pytest.raises(UserError, match="task 'sonnets' has none"):
        validate(task_config("sonnets", [stage("sft", steps=1)], train=quora["train"],
                             balance="pairs"))
    one_label = tmp_path / "one.csv"
    lines = Path(quora["train"]).read_text().splitlines()
    one_label.write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.endswith("0.0")]))
    with pytest.raises(UserError, match="one label only"):
        build_run(task_config("paraphrase", [stage("dpo", steps=1)], train=str(one_label),
                              dev=quora["dev"], balance="pairs"))


def test_a_dev_set_of_one_class_is_one_line_naming_why(quora, tmp_path):
    from jaxsftdpo.errors import UserError

    lines = Path(quora["dev"]).read_text().splitlines()
    one_class = tmp_path / "dev.csv"
    one_class.write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.endswith("0.0")]))
    with pytest.raises(UserError, match="all answered 'no': macro F1 is undefined"):
        build_run(task_config("paraphrase", [stage("sft", steps=1)], train=quora["train"],
                              dev=str(one_class)))
