"""Run outputs on rank 0: metrics.jsonl, the progress bar, and the curves drawn as a PNG at the end."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

PLOTTED = (("critic/score/mean", "reward (score)"), ("val/score/mean", "validation reward (greedy)"),
           ("actor/reward_kl_penalty/mean", "KL to the reference (per token)"),
           ("perf/throughput", "throughput (tokens/s)"))


class MetricsLog:
    """Appends one JSON object per step to ``path``; reopening after a resume drops the lines of
    steps after the checkpoint (they are about to be run again)."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")

    def close(self) -> None:
        self._file.close()


def set_aside(path: str | os.PathLike) -> Path | None:
    """Move a non-empty metrics file of an earlier run to ``<name>.previous.jsonl`` (replacing an
    older one there) before a run that starts at step 0 writes its own; the new path, or None."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    previous = path.with_name(path.stem + ".previous" + path.suffix)
    os.replace(path, previous)
    return previous


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut by a kill mid-write
                continue
    return rows


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class ProgressBar:
    """tqdm on rank 0 with the reward, the KL and the throughput of the last step."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="hfrl train", unit="step", dynamic_ncols=True)

    def update(self, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        post = {"reward": metrics.get("critic/score/mean"), "kl": metrics.get("actor/reward_kl_penalty/mean"),
                "tok/s": metrics.get("perf/throughput")}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in post.items() if v is not None}, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> str | None:
    """Reward, validation reward, KL and throughput against the step, one panel each (those logged).
    Returns the PNG's path, or None when matplotlib is missing (pip install matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)

    def plottable(row, key):   # a value to plot: finite (a diverged run logs inf or nothing)
        value = row.get(key)
        return "step" in row and isinstance(value, (int, float)) and math.isfinite(value)

    panels = [(key, title) for key, title in PLOTTED if any(plottable(r, key) for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        points = [(r["step"], r[key]) for r in rows if plottable(r, key)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    tmp = f"{png_path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return str(png_path)
