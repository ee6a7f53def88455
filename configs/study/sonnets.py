"""The study's sonnet grid (../shared/STUDY.md): SFT, and SFT → DPO with both pairing variants,
each at sampling temperatures 1.0 to 2.0: 3 × 5 = 15 cells, 3 seeds each by default.

    python -m jaxsftdpo.study --grid configs/study/sonnets.py --workdir runs/study_sonnets

Each cell is `configs/sonnets.py:schedule=S,param=fft,temperature=T,pairing=V` on GPT-2 small
(`model.name_or_path=gpt2`: the network or `--config.model.name_or_path=DIR`). Pairing variants:
`one_sample` (the rejected answer is one continuation sampled from the SFT policy) and
`worst_of_k` (the lowest-chrF of k samples). The temperature changes only the sampling (dev
continuations and rejected answers), yet each cell trains its own model: simple, and it keeps
every cell an ordinary run; the SFT-only cells could share one training run.
"""

SFT, STAGED = "sft10", "sft10_dpo3"
TEMPERATURES = (1.0, 1.25, 1.5, 1.75, 2.0)
VARIANTS = {SFT: [None], STAGED: ["one_sample", "worst_of_k"]}

# ../shared/STUDY.md, as reported: best SFT at T = 1.5, and SFT -> DPO with pairs from the same
# sonnets (our one_sample; the study names no temperature for it, shown at 1.5).
REFERENCE = {(SFT, None, 1.5): {"chrf": 41.29}, (STAGED, "one_sample", 1.5): {"chrf": 41.48}}


def name(schedule, pairing, t):
    return f"{schedule}{'-' + pairing if pairing else ''}-T{t:g}"


def get_grid():
    cells = []
    for schedule, pairings in VARIANTS.items():
        for pairing in pairings:
            for t in TEMPERATURES:
                arg = f"schedule={schedule},param=fft,temperature={t:g}"
                labels = {"schedule": schedule, "param": "fft", "temperature": t}
                if pairing:
                    arg += f",pairing={pairing}"
                    labels["pairing"] = pairing
                cells.append({"name": name(schedule, pairing, t), "config": "configs/sonnets.py",
                              "arg": arg, "labels": labels,
                              "reference": REFERENCE.get((schedule, pairing, t), {})})
    compare = [(name(STAGED, v, t), name(SFT, None, t)) for v in VARIANTS[STAGED]
               for t in TEMPERATURES]
    return {"name": "sonnets (Shakespeare continuation)",
            "description": "SFT vs SFT → DPO (two pairing variants) across sampling temperatures "
                           "on GPT-2 small; dev chrF (corpus-level, mean over sampling seeds).",
            "cells": cells, "seeds": 3,
            "overrides": {"model.name_or_path": "gpt2", "progress": False},
            "metric": "chrf", "compare": compare}
