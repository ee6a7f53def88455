"""The study's report from its finished runs: results.csv, results.md and PNGs (matplotlib Agg).

- `results.csv`: one row per run (cell, seed, labels, config, final dev scores, steps, parameter
  counts, wall-clock seconds summed over resumes, workdir).
- `results.md`: one row per cell with mean ± sample std (ddof = 1) over the finished seeds, n (and
  how many seeds diverged: those are listed, never averaged in), the trainable-parameter count
  and, where the grid gives them, the study's reported numbers; then
  the grid's chosen pairs of cells: the paired difference A − B of the grid's metric with a 95%
  bootstrap interval that resamples seeds and dev examples (`jaxsftdpo.stats.paired_bootstrap`,
  seeded, so the table is the same every time it is drawn from the same runs). accuracy and f1
  are shown in percent; other scores (chrF) as the task reports them. Nothing in it depends on
  timing, so an interrupted-and-resumed study draws the same table as an uninterrupted one.
- `grid.png` (metric by schedule and parameterization, error bars = std over seeds, one panel
  per other label combination), `curves.png` (dev metric over cumulative epochs from the runs'
  `eval/*` rows, FFT vs LoRA), `loss_curves.png` (training loss over steps, FFT vs LoRA),
  `dpo_rewards.png` (reward margins and accuracies over DPO steps),
  `chrf_temperature.png` (chrF against sampling temperature, from cells labelled with a
  `temperature` or runs that scored `chrf_T{t}`), `wall_clock.png` (seconds per cell).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from jaxsftdpo import stats
from jaxsftdpo.reporting import read_metrics

PERCENT = ("accuracy", "f1")
# The B of a compared pair that is no cell: every dev example answered with the dev set's most
# common label, the accuracy a classifier must beat before it has learned anything.
MAJORITY_CLASS = "majority_class"


def shown(metric: str, value: float) -> float:
    return value * 100.0 if metric in PERCENT else value


def write_report(grid, records: list[dict], workdir) -> None:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    done = [r for r in records if r["finished"]]
    metrics = metric_names(done)
    write_csv(records, metrics, workdir / "results.csv")
    (workdir / "results.md").write_text(results_markdown(grid, records, metrics))
    import matplotlib
    matplotlib.use("Agg")
    if done:
        plot_grid(grid, done, workdir / "grid.png")
        plot_curves(grid, done, workdir / "curves.png")
        plot_loss_curves(grid, done, workdir / "loss_curves.png")
        plot_dpo_rewards(grid, done, workdir / "dpo_rewards.png")
        plot_chrf_temperature(grid, done, workdir / "chrf_temperature.png")
        plot_wall_clock(grid, done, workdir / "wall_clock.png")


def metric_names(records) -> list[str]:
    """The final scores' names, in order (per-sampling-seed `*_seed<k>` scores stay in the csv)."""
    names = []
    for r in records:
        for key in r["results"]["final"]:
            if key != "after" and key not in names:
                names.append(key)
    return names


def table_metrics(metrics) -> list[str]:
    return [m for m in metrics if not re.search(r"_seed\d+$", m)]


def label_keys(grid) -> list[str]:
    keys = []
    for cell in grid.cells:
        keys += [k for k in cell.labels if k not in keys]
    return keys


# ---- tables ------------------------------------------------------------------------------------

def write_csv(records, metrics, path: Path) -> None:
    labels = []
    for r in records:
        labels += [k for k in r["labels"] if k not in labels]
    columns = ["cell", "seed", *labels, "config", "arg", "overrides", "finished", "diverged",
               *metrics,
               "global_step", "trainable_params", "total_params", "wall_s", "workdir"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in records:
            res = r["results"] or {}
            row = {"cell": r["cell"], "seed": r["seed"], **r["labels"], "config": r["config"],
                   "arg": r["arg"], "overrides": json.dumps(r["overrides"], default=str),
                   "finished": int(r["finished"]), "global_step": res.get("global_step", ""),
                   "diverged": r["diverged"]["step"] if r["diverged"] else "",
                   "trainable_params": res.get("trainable_params", ""),
                   "total_params": res.get("total_params", ""),
                   "wall_s": "" if r["wall_s"] is None else f"{r['wall_s']:.1f}",
                   "workdir": r["workdir"]}
            row.update({m: res.get("final", {}).get(m, "") for m in metrics})
            writer.writerow(row)


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def cell_summary(grid, records, metrics) -> list[dict]:
    """Per cell: n, {metric: (mean, std)} in display units, trainable-parameter counts."""
    out = []
    for cell in grid.cells:
        runs = [r for r in records if r["cell"] == cell.name and r["finished"]]
        scores = {m: stats.mean_std([shown(m, r["results"]["final"][m]) for r in runs
                                     if m in r["results"]["final"]]) for m in metrics}
        params = sorted({r["results"]["trainable_params"] for r in runs})
        diverged = [r for r in records if r["cell"] == cell.name and r["diverged"]]
        out.append({"cell": cell, "n": len(runs), "scores": scores, "trainable_params": params,
                    "runs": runs, "diverged": len(diverged)})
    return out


def results_markdown(grid, records, metrics) -> str:
    metrics = table_metrics(metrics)
    keys = label_keys(grid)
    summary = cell_summary(grid, records, metrics)
    references = [m for m in metrics if any(m in c.reference for c in grid.cells)]
    unit = lambda m: f"{m} (%)" if m in PERCENT else m  # noqa: E731
    seeds = len({r["seed"] for r in records})
    lines = [f"# Study: {grid.name}", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += [f"Grid `{grid.path}`, {len(grid.cells)} cells × {seeds} seeds. Dev scores after "
              f"the last stage: mean ± sample std over the finished seeds (n).", ""]
    header = ["cell", *keys, *[unit(m) for m in metrics], "n", "trainable params",
              *[f"{m} (study)" for m in references]]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for s in summary:
        cell = s["cell"]
        values = [f"{_fmt(mean)} ± {_fmt(std)}" if s["n"] else "—"
                  for mean, std in (s["scores"][m] for m in metrics)]
        params = ", ".join(f"{p:,}" for p in s["trainable_params"]) or "—"
        refs = [_fmt(cell.reference[m]) if m in cell.reference else "" for m in references]
        n = f"{s['n']} ({s['diverged']} diverged)" if s["diverged"] else str(s["n"])
        lines.append("| " + " | ".join([cell.name, *[str(cell.labels.get(k, "")) for k in keys],
                                        *values, n, params, *refs]) + " |")
    if grid.compare:
        lines += ["", f"## Paired differences of {grid.metric}", "",
                  f"A − B on the same seeds and dev examples, in the table's units; 95% "
                  f"percentile interval of {grid.n_boot} bootstrap replicates that resample "
                  f"seeds, then dev examples within each seed.", "",
                  "| A | B | seeds | dev examples | A − B | 95% CI |", "| --- | --- | --- | --- "
                  "| --- | --- |"]
        for a, b in grid.compare:
            lines.append(_paired_row(grid, records, a, b))
    diverged = [f"{r['cell']}/seed{r['seed']} at step {r['diverged']['step']} (stage "
                f"{r['diverged']['stage']}, {r['diverged']['kind']}: {r['diverged']['why']})"
                for r in records if r["diverged"]]
    if diverged:
        lines += ["", f"Diverged, left out of the means ({len(diverged)}): "
                      f"{'; '.join(diverged)}."]
    missing = [f"{r['cell']}/seed{r['seed']}" for r in records
               if not r["finished"] and not r["diverged"]]
    if missing:
        lines += ["", f"Not finished yet ({len(missing)}): {', '.join(missing)}; rerun the "
                      f"study command to train them."]
    return "\n".join(lines) + "\n"


def per_example_scores(workdir, metric: str) -> dict | None:
    """`{example id: score}` from a run's dev_predictions.jsonl (accuracy: the `correct` field;
    any other metric: a numeric field of that name, or the mean of a list of numbers, as the
    sonnet task's per-sampling-seed sentence chrF), or None if the rows lack it.

    For chrF the interval is thus over sentence-level chrF, an approximation: the table's chrF
    is corpus-level, which is not a mean over examples."""
    rows = dev_predictions(workdir)
    if rows is None:
        return None
    field = "correct" if metric == "accuracy" else metric
    scores = {}
    for key, row in rows.items():
        value = row.get(field)
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            value = float(np.mean(value))  # e.g. sentence chrF per sampling seed
        if not isinstance(value, (int, float)):
            return None
        scores[key] = float(value)
    return scores


def dev_predictions(workdir) -> dict | None:
    """`{example id as JSON: row}` of a run's dev_predictions.jsonl (a row without an id is
    keyed by its line number), or None if the run wrote none."""
    path = Path(workdir) / "dev_predictions.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {json.dumps(row.get("id", i)): row for i, row in enumerate(rows)}


def majority_class_scores(workdir) -> dict | None:
    """`{example id: 1.0 or 0.0}`: whether answering every dev example of a run's
    dev_predictions.jsonl with the most common gold label (ties: the smallest) is correct; None
    if the rows have no `label`."""
    rows = dev_predictions(workdir)
    if not rows or any("label" not in row for row in rows.values()):
        return None
    labels, counts = np.unique([row["label"] for row in rows.values()], return_counts=True)
    majority = labels[np.argmax(counts)]
    return {key: float(row["label"] == majority) for key, row in rows.items()}


def paired_scores(records, a: str, b: str, metric: str):
    """`[seeds, examples]` arrays of per-example scores of cells a and b on their shared seeds
    and shared dev example ids (ids in a's order; cut to the fewest examples of any seed).
    `b = MAJORITY_CLASS` (accuracy only) pairs a's runs with the majority-class answer on the
    same dev examples."""
    by = {(r["cell"], r["seed"]): r for r in records if r["finished"]}
    seeds_b = {s for c, s in by if c == (a if b == MAJORITY_CLASS else b)}
    rows_a, rows_b = [], []
    for seed in sorted({s for c, s in by if c == a} & seeds_b):
        sa = per_example_scores(by[(a, seed)]["workdir"], metric)
        sb = (majority_class_scores(by[(a, seed)]["workdir"]) if b == MAJORITY_CLASS
              else per_example_scores(by[(b, seed)]["workdir"], metric))
        if sa is None or sb is None:
            return None
        ids = [i for i in sa if i in sb]
        rows_a.append([sa[i] for i in ids])
        rows_b.append([sb[i] for i in ids])
    if not rows_a:
        return None
    n = min(len(r) for r in rows_a)
    if n == 0:
        return None
    return np.array([r[:n] for r in rows_a]), np.array([r[:n] for r in rows_b])


def _paired_row(grid, records, a: str, b: str) -> str:
    pair = paired_scores(records, a, b, grid.metric)
    if pair is None:
        return f"| {a} | {b} | 0 | — | — | no shared finished seeds with per-example " \
               f"{grid.metric} |"
    d = stats.paired_bootstrap(*pair, n_boot=grid.n_boot, seed=0)
    k = 100.0 if grid.metric in PERCENT else 1.0
    return (f"| {a} | {b} | {d.seeds} | {d.examples} | {k * d.difference:+.2f} | "
            f"[{k * d.low:+.2f}, {k * d.high:+.2f}] |")


# ---- plots -------------------------------------------------------------------------------------

def _plt():
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _param_color(param) -> str:
    p = str(param)
    if p.startswith("fft"):
        return "tab:blue"
    return {"lora4": "tab:orange", "lora8": "tab:red", "lora16": "tab:purple"}.get(p, "tab:green")


def _ordered(values):
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def plot_grid(grid, records, path: Path) -> None:
    """Grid metric by schedule (groups) and parameterization (bars); one panel per combination
    of the other labels (e.g. data scale)."""
    cells = [c for c in grid.cells if "schedule" in c.labels and "param" in c.labels
             and "temperature" not in c.labels]  # those get chrf_temperature.png
    if not cells:
        return
    metric = grid.metric
    summary = {s["cell"].name: s for s in cell_summary(grid, records, [metric])}
    facet = lambda c: tuple((k, v) for k, v in c.labels.items()  # noqa: E731
                            if k not in ("schedule", "param"))
    facets = _ordered(facet(c) for c in cells)
    plt = _plt()
    fig, axes = plt.subplots(1, len(facets), figsize=(5 * len(facets), 4), squeeze=False)
    for ax, f in zip(axes[0], facets):
        group = [c for c in cells if facet(c) == f]
        schedules = _ordered(c.labels["schedule"] for c in group)
        params = _ordered(c.labels["param"] for c in group)
        width = 0.8 / len(params)
        for j, p in enumerate(params):
            xs, ys, es = [], [], []
            for i, s in enumerate(schedules):
                match = [c for c in group if c.labels["schedule"] == s and c.labels["param"] == p]
                if not match or summary[match[0].name]["n"] == 0:
                    continue
                mean, std = summary[match[0].name]["scores"][metric]
                xs.append(i + (j - (len(params) - 1) / 2) * width)
                ys.append(mean)
                es.append(0.0 if np.isnan(std) else std)
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=str(p), color=_param_color(p))
        ax.set_xticks(range(len(schedules)))
        ax.set_xticklabels([str(s) for s in schedules])
        ax.set_title(", ".join(f"{k}={v}" for k, v in f) or grid.name)
        ax.set_ylabel(f"dev {metric}" + (" (%)" if metric in PERCENT else ""))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _dedupe(rows: list[dict], key) -> list[dict]:
    """Last row per key: a resumed run logs again the steps after its last checkpoint."""
    out = {}
    for r in rows:
        out[key(r)] = r
    return list(out.values())


def eval_curve(record, metric: str) -> list[tuple[float, float]]:
    """`(cumulative epoch, dev metric)` of one run: the start, then each `eval/` row."""
    rows = [r for r in read_metrics(Path(record["workdir"]) / "metrics.jsonl")
            if f"eval/{metric}" in r]
    rows = _dedupe(rows, lambda r: (r["stage"], r["step"]))
    offsets, total = {}, 0.0
    for stage in sorted({r["stage"] for r in rows}):
        offsets[stage] = total
        total += max(r["epoch"] for r in rows if r["stage"] == stage)
    points = []
    start = record["results"]["evals"][0]
    if start.get("after") == "start" and metric in start:
        points.append((0.0, start[metric]))
    points += sorted((offsets[r["stage"]] + r["epoch"], r[f"eval/{metric}"]) for r in rows)
    return points


def _mean_curve(curves: list[list[tuple]]):
    by_x = {}
    for curve in curves:
        for x, y in curve:
            by_x.setdefault(round(x, 6), []).append(y)
    xs = sorted(by_x)
    return (np.array(xs), np.array([np.mean(by_x[x]) for x in xs]),
            np.array([np.std(by_x[x], ddof=1) if len(by_x[x]) > 1 else 0.0 for x in xs]))


def _runs_of(records, cell):
    return [r for r in records if r["cell"] == cell.name]


def loss_curve(record) -> list[tuple[float, float]]:
    """`(step, training loss)` of one run's logged steps (SFT's NLL, then DPO's loss)."""
    rows = [r for r in read_metrics(Path(record["workdir"]) / "metrics.jsonl") if "loss" in r]
    return sorted((r["step"], r["loss"]) for r in _dedupe(rows, lambda r: r["step"]))


def plot_curves(grid, records, path: Path) -> None:
    """Dev metric over cumulative epochs, mean ± std over seeds (`_plot_cell_curves`)."""
    metric = grid.metric
    _plot_cell_curves(grid, records, path, lambda r: eval_curve(r, metric),
                      "epoch (cumulative over stages)",
                      f"dev {metric}" + (" (%)" if metric in PERCENT else ""),
                      100.0 if metric in PERCENT else 1.0)


def plot_loss_curves(grid, records, path: Path) -> None:
    """Training loss over optimizer steps, mean ± std over seeds (`_plot_cell_curves`): FFT
    against LoRA where no dev curve was logged during training."""
    _plot_cell_curves(grid, records, path, loss_curve, "optimizer step",
                      "training loss (SFT NLL, DPO loss)", 1.0)


def _plot_cell_curves(grid, records, path: Path, curve_of, xlabel: str, ylabel: str,
                      k: float) -> None:
    """`curve_of(run record)` as lines, one panel per schedule, FFT and LoRA cells as lines
    (only the largest data scale when cells carry a `scale` label); nothing when no run has a
    curve of two points."""
    cells = list(grid.cells)
    scales = [c.labels["scale"] for c in cells if "scale" in c.labels]
    if scales:
        cells = [c for c in cells if c.labels.get("scale") == max(scales)]
    panels = _ordered(c.labels.get("schedule", "") for c in cells)
    curves = {c.name: [curve_of(r) for r in _runs_of(records, c)] for c in cells}
    if not any(any(len(k) > 1 for k in v) for v in curves.values()):
        return
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False,
                             sharey=True)
    for ax, panel in zip(axes[0], panels):
        for c in cells:
            if c.labels.get("schedule", "") != panel or not curves[c.name]:
                continue
            xs, ys, es = _mean_curve(curves[c.name])
            rest = ", ".join(str(v) for key, v in c.labels.items()
                             if key not in ("schedule", "scale"))
            color = _param_color(c.labels.get("param", ""))
            ax.plot(xs, k * ys, marker=".", color=color, label=rest or c.name)
            ax.fill_between(xs, k * (ys - es), k * (ys + es), color=color, alpha=0.15)
        ax.set_title(str(panel) or grid.name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    _save(fig, path)


def dpo_series(record, key: str) -> list[tuple[float, float]]:
    """`(step within the DPO stage, value)` of a run's logged DPO metric."""
    rows = [r for r in read_metrics(Path(record["workdir"]) / "metrics.jsonl")
            if r.get("kind") == "dpo" and key in r]
    rows = _dedupe(rows, lambda r: (r["stage"], r["step"]))
    if not rows:
        return []
    first = min(r["step"] for r in rows)
    return sorted((r["step"] - first + 1, r[key]) for r in rows)


def plot_dpo_rewards(grid, records, path: Path) -> None:
    keys = ("rewards/margins", "rewards/accuracies")
    series = {c.name: {k: [dpo_series(r, k) for r in _runs_of(records, c)] for k in keys}
              for c in grid.cells}
    cells = [c for c in grid.cells if any(series[c.name]["rewards/margins"])]
    if not cells:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, keys):
        for c in cells:
            xs, ys, es = _mean_curve([s for s in series[c.name][key] if s])
            color = _param_color(c.labels.get("param", "")) if "param" in c.labels else None
            line, = ax.plot(xs, ys, label=c.name, color=color, alpha=0.8,
                            linestyle="-" if str(c.labels.get("param", "fft")) == "fft" else "--")
            ax.fill_between(xs, ys - es, ys + es, color=line.get_color(), alpha=0.1)
        ax.set_xlabel("DPO step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def chrf_by_temperature(grid, records) -> dict:
    """`{group: {temperature: (mean, std)}}` of dev chrF over seeds: cells labelled with a
    `temperature` give a point each (grouped by their other labels), and cells whose runs scored
    `chrf_T{t}` (`data.eval_temperatures`) a curve each (grouped by all their labels)."""
    metrics = metric_names(records)
    at = {m: float(m[len("chrf_T"):]) for m in metrics if re.fullmatch(r"chrf_T[\d.]+", m)}
    curves = {}
    for s in cell_summary(grid, records, ["chrf", *at]):
        if not s["n"]:
            continue
        labels = s["cell"].labels
        group = ", ".join(f"{v}" for k, v in labels.items() if k != "temperature") or grid.name
        points = {t: s["scores"][m] for m, t in at.items() if not np.isnan(s["scores"][m][0])}
        if "temperature" in labels and not np.isnan(s["scores"]["chrf"][0]):
            points[float(labels["temperature"])] = s["scores"]["chrf"]
        if points:
            curves.setdefault(group, {}).update(points)
    return curves


def plot_chrf_temperature(grid, records, path: Path) -> None:
    curves = chrf_by_temperature(grid, records)
    if not curves:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group in _ordered(curves):
        xs = sorted(curves[group])
        ms = [curves[group][x] for x in xs]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[0.0 if np.isnan(s) else s for _, s in ms],
                    marker="o", capsize=3, label=group)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("dev chrF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_wall_clock(grid, records, path: Path) -> None:
    rows = []
    for c in grid.cells:
        secs = [r["wall_s"] for r in _runs_of(records, c) if r["wall_s"] is not None]
        if secs:
            mean, std = stats.mean_std(secs)
            rows.append((c.name, mean, 0.0 if np.isnan(std) else std))
    if not rows:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [m for _, m, _ in rows], xerr=[s for _, _, s in rows], capsize=3,
            color=[_param_color(grid.cell(n).labels.get("param", "")) for n, _, _ in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n for n, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock seconds per run (mean ± std over seeds)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
