"""What a run leaves for people: metrics.jsonl, TensorBoard events, a loss-curve PNG, a table."""

from __future__ import annotations

import json
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it into place, so no reader
    (another host, a resumed run) ever sees it half-written."""
    path = Path(path)
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text)
    staged.replace(path)


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.

    Only the main process writes (`is_main`), so multi-host runs write each file once.
    """

    def __init__(self, workdir: Path, *, is_main: bool = True):
        self.is_main = is_main
        self._jsonl = None
        self._tb = None
        if is_main:
            from tensorboardX import SummaryWriter
            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "stage"):
                self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.is_main:
            self._jsonl.close()
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Training loss against global step, one line per stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in sorted({r["stage"] for r in records}):
        rows = [r for r in records if r["stage"] == stage]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".",
                label=f"stage {stage} ({rows[0]['kind']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def results_table(evals: list[dict]) -> str:
    """Markdown table: one row per metric, one column per evaluation point."""
    if not evals:
        return ""
    metrics = [k for k in evals[0] if k != "after"]
    header = "| metric | " + " | ".join(f"after {e['after']}" if e["after"] != "start"
                                          else "before training" for e in evals) + " |"
    rule = "| --- " * (len(evals) + 1) + "|"
    rows = [f"| {m} | " + " | ".join(f"{e.get(m, float('nan')):.4f}" for e in evals) + " |"
            for m in metrics]
    return "\n".join([header, rule, *rows])
