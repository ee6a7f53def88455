"""Loaders of the study's data and of any user's data: every format quirk of the course files,
the course's prompts verbatim, chrF as the course computes it, and each user-facing error.

No model here; the files are written by the tests in the real formats."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import ml_collections as mlc
import pytest
from sacrebleu.metrics import CHRF
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jaxsftdpo import chrf, tasks
from jaxsftdpo.config import base_config
from jaxsftdpo.data import batching, jsonl, paraphrase, sonnets
from jaxsftdpo.data.tokenizer import ByteTokenizer, HFTokenizer
from jaxsftdpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HEADER = "id\tsentence1\tsentence2\tis_duplicate\n"


def write(path, text, newline="\n"):
    path.write_bytes(text.replace("\n", newline).encode())
    return str(path)


# ---- Quora ----------------------------------------------------------------------------------

def test_quora_file_reads_as_the_course_does(tmp_path):
    path = write(tmp_path / "quora-train.csv", HEADER +
                 "65977 641BC8DE-b905\tWhat's  the BEST way?\tHow do I, well, learn.\t1.0\n"
                 '12 ab-cd\t"He said ""hi""\tthere?"\tWhy?\t0.0\n')
    first, second = paraphrase.read(path)
    assert first == {
        "id": "65977 641bc8de-b905",
        "prompt": 'Question 1: "what \'s the best way ?"\nQuestion 2: "how do i , well , learn .'
                  '\nAre these questions asking the same thing?\n',
        "completion": "yes", "label": 1}
    # A quoted field keeps its tab (then collapsed like any whitespace) and its doubled quote.
    assert second["prompt"].startswith('Question 1: "he said "hi" there ?"\nQuestion 2: "why ?\n')
    assert (second["completion"], second["label"]) == ("no", 0)


def test_quora_test_file_has_no_label_and_its_own_prompt(tmp_path):
    path = write(tmp_path / "quora-test.csv", "id\tsentence1\tsentence2\n"
                 " 7 X-Y \tIs it OK?\tIt's fine.\n")
    assert paraphrase.read(path, labelled=False) == [{
        "id": "7 x-y",
        "prompt": 'Is "is it ok ?" a paraphrase of "it \'s fine ."? Answer "yes" or "no": '}]


def test_normalisation():
    assert paraphrase.normalize("  Hello,World. Isn't it?\tYes ") == \
        "hello ,world . isn 't it ? yes"


def test_malformed_quora_rows_are_skipped_and_counted(tmp_path, capsys):
    rows = ["1 a\tgood?\tgood!\t1.0",
            "2 b\tno label?\tat all",              # missing field
            "3 c\tbad label?\tx\tmaybe",           # label does not parse
            "4 d\tlabel two?\tx\t2.0",             # not 0/1
            "5 e\textra?\tx\t0.0\tsurplus",        # extra field
            '6 f\t"stray quote\tx\t0.0',           # the quote swallows the lines below
            "7 g\tswallowed?\tx\t1.0"]
    path = write(tmp_path / "q.csv", HEADER + "\n".join(rows) + "\n")
    examples = paraphrase.read(path)
    assert [e["id"] for e in examples] == ["1 a"]
    assert "skipped 5 malformed rows" in capsys.readouterr().out


@pytest.mark.parametrize("text,fragment", [
    (HEADER + "1 a\tq?\tq?\tnan\n", "no usable row"),
    ("id,sentence1,sentence2,is_duplicate\n1,a,b,1.0\n", "tab-separated"),
    ("", "no column id"),
])
def test_quora_files_without_a_usable_row_are_errors(tmp_path, text, fragment):
    with pytest.raises(UserError, match=fragment):
        paraphrase.read(write(tmp_path / "q.csv", text))


def test_missing_file_and_unset_path_are_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        paraphrase.read(str(tmp_path / "nope.csv"), what="config.data.train")
    with pytest.raises(UserError, match="not set"):
        sonnets.read("", "config.data.train")


def test_submission_file_format(tmp_path):
    paraphrase.write_submission(tmp_path / "out.csv", ["1 a", "2 b"], [8505, 3919])
    assert (tmp_path / "out.csv").read_text() == \
        "id \t Predicted_Is_Paraphrase \n1 a, 8505 \n2 b, 3919 \n"


def fake_datasets(monkeypatch, splits):
    def load_dataset(name, subset, split):
        if split not in splits:
            raise ValueError(f'Unknown split "{split}".\nmore text')
        return splits[split]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_qqp_rows_become_course_prompts(monkeypatch):
    fake_datasets(monkeypatch, {"train": [
        {"question1": "A?", "question2": "B.", "label": 1, "idx": 3},
        {"question1": "C?", "question2": "D.", "label": -1, "idx": 4}]})
    examples = paraphrase.from_hub(jsonl.load_hub_rows("nyu-mll/glue:qqp", "train"),
                                   source="hub", what="x")
    assert examples == [{"id": "3", "prompt": paraphrase.prompt("A?", "B."),
                         "completion": "yes", "label": 1}]
    with pytest.raises(UserError, match="split 'test' .*Unknown split"):
        jsonl.load_hub_rows("nyu-mll/glue:qqp", "test")


def test_hub_without_datasets_package_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="pip install datasets"):
        jsonl.load_hub_rows("x", "train")


# ---- sonnets --------------------------------------------------------------------------------

SONNET_FILE = ("Sonnets\nby Someone\n\n\n\n 1\n\nLine one,\nline two,\nline three,\nline four.\n"
               "\n  2 \n\nA,\nB,\nC,\nD,\nE.\n")


def test_crlf_sonnets_split_like_the_course(tmp_path):
    for newline in ("\n", "\r\n"):
        path = write(tmp_path / "s.txt", SONNET_FILE, newline)
        assert sonnets.read(path, "x") == [
            {"id": "1", "text": "Line one,\nline two,\nline three,\nline four."},
            {"id": "2", "text": "A,\nB,\nC,\nD,\nE."}]


def test_prompt_continuation_and_generated_format():
    text = "A,\nB,\nC,\nD,\nE."
    assert sonnets.prompt_of(text) == "A,\nB,\nC,"
    assert sonnets.continuation_of(text) == "\nD,\nE."
    written = sonnets.format_generated(["A,\nB", "C\nD"])
    assert written == "--Generated Sonnets-- \n\n\n0\nA,\nB\n\n\n1\nC\nD\n\n"
    assert sonnets.parse_generated(written) == ["A,\nB", "C\nD"]


def test_file_without_sonnets_is_an_error(tmp_path):
    with pytest.raises(UserError, match="holds no sonnet"):
        sonnets.read(write(tmp_path / "s.txt", "just a header\nno numbers\n"), "x")


def test_chrf_is_sacrebleus_default_corpus_score_over_the_shorter_list():
    generated = ["Shall I compare thee", "to a summer's day", "extra"]
    references = ["Shall I compare thee to", "a summer's day?"]
    expected = CHRF().corpus_score(generated[:2], [references]).score
    assert chrf.corpus_chrf(generated, references) == pytest.approx(expected)
    assert chrf.corpus_chrf(references, references) == pytest.approx(100.0)
    assert "nc:6|nw:0|space:no" in chrf.signature()


def test_check_course_data_script_prints_counts_and_prompt_chrf(tmp_path, capsys):
    write(tmp_path / "sonnets.txt", SONNET_FILE, "\r\n")
    write(tmp_path / "sonnets_held_out_dev.txt", "H\n\n1\n\nA,\nB,\nC,\n")
    write(tmp_path / "TRUE_sonnets_held_out_dev.txt", "H\n\n1\n\nA,\nB,\nC,\nD.\n")
    write(tmp_path / "quora-dev.csv", HEADER + "1 a\tq?\tq?\t1.0\n")
    spec = importlib.util.spec_from_file_location("check", ROOT / "scripts/check_course_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    expected = CHRF().corpus_score(["A,\nB,\nC,"], [["A,\nB,\nC,\nD."]]).score
    assert "quora-dev.csv: 1 rows (0 labelled 0, 1 labelled 1)" in out
    assert "sonnets.txt: 2 sonnets" in out
    assert f"true dev sonnets: {expected:.2f}" in out
    assert script.main(["check", str(tmp_path / "missing")]) == 2


# ---- JSONL ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_tokenizer():
    """A byte-level BPE `transformers` tokenizer with a small chat template, built offline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return HFTokenizer(fast)


def write_jsonl(path, rows):
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl_rows_of_every_shape(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "prompt": "P", "completion": "C"},
        {"prompt": "P2", "chosen": "good", "rejected": "bad"},
        {"messages": [{"role": "system", "content": "be kind"},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ])
    assert jsonl.load(path, chat_tokenizer) == [
        {"id": "a", "prompt": "P", "completion": "C"},
        {"id": 1, "prompt": "P2", "completion": "good", "chosen": "good", "rejected": "bad"},
        {"id": 2, "prompt": "<|system|>be kind\n<|user|>hi\n<|assistant|>",
         "completion": "hello\n"}]


def chatml_tokenizer():
    """SmolLM2's shape: the tokenizer adds a BOS, the template renders one too and closes every
    turn with the eos token `<|im_end|>`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                          "{{ m['content'] }}{% if not (continue_final_message and loop.last) %}"
                          "<|im_end|>\n{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return HFTokenizer(fast)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


TRL_ROWS = [  # TRL's formats (trl.data_utils): standard and conversational
    {"text": "hello world"},
    {"messages": [user("hi"), assistant("hello")]},
    {"prompt": [user("hi")], "completion": [assistant("hello")]},
    {"prompt": [user("hi"), assistant("hel")], "completion": [assistant("lo")]},
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},   # implicit prompt
    {"prompt": [user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("red")]},
    {"chosen": [user("sky?"), assistant("blue")], "rejected": [user("sky?"), assistant("red")]},
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt beside whole conversations
    {"prompt": "sky?", "chosen": [user("sky?"), assistant("blue")],
     "rejected": [user("sky?"), assistant("red")], "messages": [user("sky?"), assistant("blue")]},
]


@pytest.mark.parametrize("row", TRL_ROWS, ids=lambda r: "+".join(sorted(r)))
def test_trl_formats_read_as_trl_reads_them(row):
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt
    tokenizer = chatml_tokenizer()
    example = jsonl.to_example(row, tokenizer)
    if "text" in row:
        assert example == {"prompt": "", "completion": "hello world"}
        return
    trl_row = {k: v for k, v in row.items() if k != "messages" or "chosen" not in row}
    expected = maybe_apply_chat_template(maybe_extract_prompt(trl_row), tokenizer.tokenizer)
    if "text" in expected:  # TRL keeps a conversation whole; its last turn is ours to train
        expected = maybe_apply_chat_template({"prompt": row["messages"][:-1],
                                              "completion": row["messages"][-1:]},
                                             tokenizer.tokenizer)
    bos = "<s>" if any(isinstance(v, list) for v in row.values()) else ""
    assert bos + example["prompt"] == expected["prompt"]   # the tokenizer adds the BOS itself
    for key in ("completion", "chosen", "rejected"):
        if key in expected:
            assert example[key] == expected[key]


def test_chat_template_applied_once_no_doubled_bos_or_eos():
    tokenizer = chatml_tokenizer()
    bos, eos = tokenizer.tokenizer.bos_token_id, tokenizer.eos_token_id
    sft = jsonl.to_example({"messages": [user("hi"), assistant("hello")]}, tokenizer)
    pair = jsonl.to_example({"chosen": [user("hi"), assistant("yes")],
                             "rejected": [user("hi"), assistant("no")]}, tokenizer)
    assert sft["closed"] and pair["closed"]
    (row,), _, _ = batching.tokenize_sft([sft], tokenizer, 64)
    ids = list(row.ids)
    assert ids.count(bos) == 1 and ids[0] == bos
    assert tokenizer.tokenizer.decode(ids).endswith("hello<|im_end|>\n") and ids.count(eos) == 2
    ((chosen, rejected),), _, _ = batching.tokenize_preferences([pair], tokenizer, 64)
    for side, answer in ((chosen, "yes"), (rejected, "no")):
        assert list(side.ids).count(bos) == 1
        assert tokenizer.tokenizer.decode(side.ids).endswith(f"{answer}<|im_end|>\n")
    # standard rows still end with eos: nothing closed them
    (plain,), _, _ = batching.tokenize_sft([{"prompt": "hi", "completion": "yo"}], tokenizer, 64)
    assert list(plain.ids)[-1] == eos


def test_pairs_whose_chosen_equals_rejected_are_counted_and_skipped(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "P", "chosen": "a", "rejected": "b"},
        {"prompt": "P", "chosen": "same", "rejected": "same"},
        {"chosen": [user("q"), assistant("x")], "rejected": [user("q"), assistant("x")]}])
    assert len(jsonl.load(path, chatml_tokenizer())) == 1
    assert "skipped 2 preference rows (lines 2, 3: chosen equals rejected" in (
        capsys.readouterr().out)


def test_malformed_jsonl_rows_are_counted(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "P", "completion": "C"}, "{not json", "[1, 2]", "",
        {"prompt": "P"}, {"prompt": "P", "chosen": "c"}, {"completion": "C"},
        {"messages": [{"role": "user", "content": "no answer"}]}])
    assert len(jsonl.load(path, ByteTokenizer())) == 1
    assert "skipped 6 malformed rows" in capsys.readouterr().out


def test_jsonl_errors(tmp_path):
    with pytest.raises(UserError, match="no usable row"):
        jsonl.load(write_jsonl(tmp_path / "e.jsonl", ["{bad", {"x": 1}]), ByteTokenizer())
    with pytest.raises(UserError, match="does not exist"):
        jsonl.load(str(tmp_path / "none.jsonl"), ByteTokenizer())
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(UserError, match="chat template"):
        jsonl.load(chat, ByteTokenizer())


# ---- configs and task settings --------------------------------------------------------------

def load_config(name, arg):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_paraphrase_config_cells():
    c = load_config("paraphrase", "schedule=sft9_dpo6,param=lora8,scale=0.1")
    assert [(s.kind, s.epochs) for s in c.stages] == [("sft", 9), ("dpo", 6)]
    assert (c.param.kind, c.param.r, c.data.scale, c.dpo.beta) == ("lora", 8, 0.1, 0.2)
    default = load_config("paraphrase", "")
    assert [(s.kind, s.epochs, s.learning_rate) for s in default.stages] == [("sft", 15, 1e-5)]
    assert (default.param.kind, default.data.task) == ("fft", "paraphrase")
    for bad in ("schedule=sft0", "param=lora", "size=1", "schedule"):
        with pytest.raises(UserError):
            load_config("paraphrase", bad)


def test_sonnets_config_cells():
    c = load_config("sonnets", "schedule=sft10_dpo3,temperature=1.5,pairing=worst_of_k,k=3")
    assert [(s.kind, s.epochs) for s in c.stages] == [("sft", 10), ("dpo", 3)]
    assert (c.data.temperature, c.data.pairing, c.data.pairing_k, c.data.max_new_tokens) == \
        (1.5, "worst_of_k", 3, 128)


def test_subsample_is_a_seeded_fraction_in_file_order():
    kept = tasks.subsample(list(range(100)), 0.1, seed=3)
    assert len(kept) == 10 and kept == sorted(kept)
    assert kept == tasks.subsample(list(range(100)), 0.1, seed=3)
    assert kept != tasks.subsample(list(range(100)), 0.1, seed=4)
    with pytest.raises(UserError, match="scale"):
        tasks.subsample([1], 0.0, seed=0)


class ScriptedPolicy:
    """Continuations by seed: `answer(prompt, seed)`."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, prompts, *, seed, **sampling):
        self.calls.append((seed, sampling))
        return [self.answer(p, seed) for p in prompts]


def sonnet_task(tmp_path, **data):
    c = base_config().data
    c.update(task="sonnets", train=write(tmp_path / "s.txt", SONNET_FILE, "\r\n"), **data)
    return tasks.make_task(c, ByteTokenizer(), 128, seed=0)


def test_sonnet_pairs_one_sample_and_worst_of_k(tmp_path):
    task = sonnet_task(tmp_path)
    far = "\nzzz"
    assert task.preference_pairs() == []
    pairs = task.preference_pairs(ScriptedPolicy(lambda prompt, seed: far))
    assert pairs == [{"prompt": "Line one,\nline two,\nline three,", "chosen": "\nline four.",
                      "rejected": far},
                     {"prompt": "A,\nB,\nC,", "chosen": "\nD,\nE.", "rejected": far}]
    worst = sonnet_task(tmp_path, pairing="worst_of_k", pairing_k=2)
    truth = {p["prompt"]: p["chosen"] for p in pairs}
    for far_seed in (0, 1):  # one sample is the true continuation, the other is kept
        policy = ScriptedPolicy(lambda prompt, seed: far if seed == far_seed else truth[prompt])
        assert [p["rejected"] for p in worst.preference_pairs(policy)] == [far, far]
        assert sorted(seed for seed, _ in policy.calls) == [0, 1]
        assert policy.calls[0][1]["max_new_tokens"] == 128


def test_sonnet_task_settings_errors(tmp_path):
    with pytest.raises(UserError, match="pairing"):
        sonnet_task(tmp_path, pairing="best")
    with pytest.raises(UserError, match="dev_references"):
        sonnet_task(tmp_path, dev=str(tmp_path / "s.txt"))
    with pytest.raises(UserError, match="eval_seeds"):
        sonnet_task(tmp_path, eval_seeds=())
    unknown = mlc.ConfigDict({"task": "nope"})
    with pytest.raises(UserError, match="not a known task"):
        tasks.make_task(unknown, ByteTokenizer(), 128, seed=0)
