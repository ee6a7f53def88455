"""Quora paraphrase detection; the argument string picks a cell of the study:

    --config configs/paraphrase.py:schedule=sft9_dpo6,param=lora8,scale=0.1

- schedule: stages `sftK` / `dpoK` (K epochs each) joined by `_`, run in order; a DPO stage after
  SFT uses the hand-off policy as its reference. The study's: sft15, dpo15, sft3_dpo12, sft9_dpo6.
- param: `fft`, or `loraR` with rank R (lora4, lora8, lora16; alpha = 2R, every linear layer).
- scale: the fraction of the training pairs kept (1, 0.1, 0.01), a subset fixed by the seed.

Settings of the course starter (gpt2, batch 8, AdamW without weight decay, SFT learning rate
1e-5) and of the study (DPO sigmoid loss, beta 0.2, learning rate 5e-6). LoRA trains at 10x
those rates: an assumption, the study does not give its LoRA rates. Data paths default to
`data/quora-{train,dev}.csv`; set `--config.data.test` to also write the test predictions.
"""

from jaxsftdpo.config import apply_study_training, base_config, finalize, parse_cell_arg

DEFAULTS = {"schedule": "sft15", "param": "fft", "scale": "1"}


def get_config(arg: str = ""):
    cell = parse_cell_arg(arg, DEFAULTS)
    c = base_config()
    c.model.name_or_path = "gpt2"
    c.data.task = "paraphrase"
    c.data.train = "data/quora-train.csv"
    c.data.dev = "data/quora-dev.csv"
    c.data.scale = float(cell["scale"])
    apply_study_training(c, cell)
    c.log_every = 50
    c.checkpoint_every = 2000
    return finalize(c)
