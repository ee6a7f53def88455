"""Statistics for the study's table: mean ± spread over seeds and a paired bootstrap interval.

Pure numpy and seeded, so the same numbers give the same table on every machine.

- `mean_std(values)`: the mean and the *sample* standard deviation (ddof = 1; NaN for one value).
- `paired_bootstrap(a, b)`: the difference `mean(a) - mean(b)` of two cells whose runs share
  seeds and dev examples, with a percentile interval from a two-level bootstrap: each replicate
  draws the seeds with replacement, then, within every drawn seed, the dev examples with
  replacement, and averages the per-example differences. `a` and `b` are `[seeds, examples]`
  arrays of per-example scores (e.g. 1/0 for a correct/wrong paraphrase prediction), row `s` of
  both from the same seed and column `i` from the same dev example.

Draw order (pinned by a test): `rng = np.random.default_rng(seed)`; per replicate,
`rng.integers(0, S, S)` for the seeds, then `rng.integers(0, N, (S, N))` for the examples.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def mean_std(values) -> tuple[float, float]:
    """`(mean, sample std with ddof=1)`; std is NaN when there is a single value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    std = float(np.std(x, ddof=1)) if x.size > 1 else float("nan")
    return float(np.mean(x)), std


class PairedDifference(NamedTuple):
    difference: float      # mean over seeds of (mean_i a[s, i] - mean_i b[s, i])
    low: float             # percentile interval of the bootstrap replicates
    high: float
    seeds: int
    examples: int          # per seed
    replicates: np.ndarray


def paired_bootstrap(a, b, *, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """Difference of means of two paired `[seeds, examples]` score arrays and its bootstrap CI."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired scores need equal [seeds, examples] shapes, got {a.shape} "
                         f"and {b.shape}")
    diff = a - b
    n_seeds, n_examples = diff.shape
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot, np.float64)
    for k in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        examples = rng.integers(0, n_examples, (n_seeds, n_examples))
        replicates[k] = diff[seeds[:, None], examples].mean()
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), n_seeds, n_examples,
                            replicates)
