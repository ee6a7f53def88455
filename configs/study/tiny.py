"""The study's grid in miniature: the quickstart's model and task on 2 CPU cores.

`python -m jaxsftdpo.study --grid configs/study/tiny.py --workdir runs/study_tiny` trains
3 schedules × {FFT, LoRA r=8} × 2 seeds = 12 runs of the quickstart (configs/quickstart.py:
a 2-layer GPT-2 built from its config, the package's yes/no task), each 2 epochs deep (the
study's are 15; at 5 the full fine-tuning cells all reach 100% and compare nothing): SFT-only,
DPO-only, and SFT 1 → DPO 1. The seed sets the data sample, the data order and the model's
initialisation (`seed_keys`). Measured: about 2 minutes on 2 CPU cores.

The grid file format is documented in jaxsftdpo/study.py.
"""

from jaxsftdpo.config import stage

# The quickstart's stage settings.
SFT = dict(learning_rate=3e-3, schedule="cosine", warmup_steps=10, batch_size=32)
DPO = dict(learning_rate=2e-4, batch_size=32)
SCHEDULES = {
    "sft2": [stage("sft", epochs=2, **SFT)],
    "dpo2": [stage("dpo", epochs=2, **DPO)],
    "sft1_dpo1": [stage("sft", epochs=1, **SFT), stage("dpo", epochs=1, **DPO)],
}
PARAMS = {"fft": {"param.kind": "fft"},
          "lora8": {"param.kind": "lora", "param.r": 8, "param.alpha": 16.0}}


def get_grid():
    cells = [{"name": f"{schedule}-{param}", "config": "configs/quickstart.py",
              "overrides": {"stages": stages, **PARAMS[param]},
              "labels": {"schedule": schedule, "param": param}}
             for schedule, stages in SCHEDULES.items() for param in PARAMS]
    compare = [(f"sft1_dpo1-{p}", f"sft2-{p}") for p in PARAMS]
    compare += [(f"dpo2-{p}", f"sft2-{p}") for p in PARAMS]
    compare += [(f"{s}-lora8", f"{s}-fft") for s in SCHEDULES]
    return {"name": "tiny (quickstart model and task)",
            "description": "SFT, DPO and SFT → DPO at equal depth (2 epochs), full fine-tuning "
                           "vs LoRA r = 8, on the quickstart's yes/no task.",
            "cells": cells, "seeds": 2, "seed_keys": ["seed", "model.init_seed"],
            "overrides": {"progress": False}, "metric": "accuracy", "compare": compare}
