"""Shakespearean sonnet continuation; the argument string picks a cell of the study:

    --config configs/sonnets.py:schedule=sft10_dpo3,param=fft,temperature=1.5,pairing=worst_of_k

- schedule, param: as in configs/paraphrase.py (e.g. sft10, sft10_dpo3, dpo10; fft, lora8).
- temperature, top_p: sampling of the dev continuations and of the rejected answers.
- pairing: `one_sample` (one continuation sampled per training sonnet from the hand-off policy
  is the rejected answer) or `worst_of_k` (of `k` samples, the one with the lowest chrF).

Settings of the course starter (gpt2, batch 8, SFT learning rate 1e-5, top-p 0.9, at most 128
new tokens) and of the study (DPO sigmoid loss, beta 0.2, learning rate 5e-6); chrF is averaged
over three sampling seeds. Data paths default to the course's file names under `data/`.
"""

from jaxsftdpo.config import apply_study_training, base_config, finalize, parse_cell_arg

DEFAULTS = {"schedule": "sft10", "param": "fft", "temperature": "1.2", "top_p": "0.9",
            "pairing": "one_sample", "k": "4"}


def get_config(arg: str = ""):
    cell = parse_cell_arg(arg, DEFAULTS)
    c = base_config()
    c.model.name_or_path = "gpt2"
    c.data.task = "sonnets"
    c.data.train = "data/sonnets.txt"
    c.data.dev = "data/sonnets_held_out_dev.txt"
    c.data.dev_references = "data/TRUE_sonnets_held_out_dev.txt"
    c.data.temperature = float(cell["temperature"])
    c.data.top_p = float(cell["top_p"])
    c.data.max_new_tokens = 128
    c.data.eval_seeds = (0, 1, 2)
    c.data.eval_batch_size = 12
    c.data.pairing = cell["pairing"]
    c.data.pairing_k = int(cell["k"])
    apply_study_training(c, cell)
    c.log_every = 10
    c.checkpoint_every = 500
    return finalize(c)
