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

import re

from jaxsftdpo.config import base_config, finalize, stage
from jaxsftdpo.errors import UserError

DEFAULTS = {"schedule": "sft15", "param": "fft", "scale": "1"}
LEARNING_RATES = {"sft": 1e-5, "dpo": 5e-6}
LORA_RATE_FACTOR = 10.0


def get_config(arg: str = ""):
    cell = parse_arg(arg, DEFAULTS)
    c = base_config()
    c.model.name_or_path = "gpt2"
    c.data.task = "paraphrase"
    c.data.train = "data/quora-train.csv"
    c.data.dev = "data/quora-dev.csv"
    c.data.scale = float(cell["scale"])
    factor = set_param(c, cell["param"])
    c.stages = [stage(kind, epochs=epochs, learning_rate=LEARNING_RATES[kind] * factor,
                      batch_size=8) for kind, epochs in parse_schedule(cell["schedule"])]
    c.dpo.beta = 0.2
    c.dpo.loss_type = "sigmoid"
    c.log_every = 50
    c.checkpoint_every = 2000
    return finalize(c)


def parse_arg(arg: str, defaults: dict) -> dict:
    """`key=value,key=value` over `defaults`; an unknown key is an error."""
    cell = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise UserError(f"config argument {item!r}: use key=value with keys "
                            f"{sorted(defaults)}")
        cell[key] = value
    return cell


def parse_schedule(schedule: str) -> list[tuple[str, int]]:
    """`sft9_dpo6` -> [("sft", 9), ("dpo", 6)]."""
    parts = [re.fullmatch(r"(sft|dpo)(\d+)", p) for p in schedule.split("_")]
    if not all(parts) or any(int(p[2]) < 1 for p in parts):
        raise UserError(f"schedule={schedule!r}: use stages like sft15, dpo15 or sft9_dpo6")
    return [(p[1], int(p[2])) for p in parts]


def set_param(c, param: str) -> float:
    """Full fine-tuning or LoRA of rank R; returns the learning-rate factor."""
    if param == "fft":
        c.param.kind = "fft"
        return 1.0
    match = re.fullmatch(r"lora(\d+)", param)
    if not match or int(match[1]) < 1:
        raise UserError(f"param={param!r}: use fft or loraR, e.g. lora8")
    c.param.update(kind="lora", r=int(match[1]), alpha=2.0 * int(match[1]))
    return LORA_RATE_FACTOR
