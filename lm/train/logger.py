"""Run-directory outputs: metrics as JSON lines and TensorBoard scalars, and a loss plot.

Every metrics row also records `wall_s` and `cpu_s`: seconds of wall-clock and of this
process's CPU time since the process imported this module (so tokenizer training,
compilation and evaluation are counted), for comparisons at equal time (`lm compare`).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

_WALL0, _CPU0 = time.perf_counter(), time.process_time()


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` (flushed at once, so a
    crash loses nothing already logged) and mirrors the numbers to TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            try:
                from tensorboardX import SummaryWriter  # optional: TensorBoard scalars

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=10)
            except ImportError:  # TensorBoard output is optional
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "wall_s": time.perf_counter() - _WALL0, "cpu_s": time.process_time() - _CPU0}
        for k, v in metrics.items():
            v = float(v) if not isinstance(v, (str, bool)) else v
            row[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
            if self._tb is not None and isinstance(v, float) and math.isfinite(v):
                self._tb.add_scalar(k, v, int(step))
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
    return rows


def plot_loss(run_dir: str, out_name: str = "loss.png") -> str | None:
    """Training (and held-out) loss against step, as a PNG in the run directory."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    if not train:
        return None
    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported when a plot is drawn

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, out_name)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metrics(run_dir: str, keys: dict[str, str], out_name: str, title: str = "") -> str | None:
    """Each metric of `keys` (name -> label) against step, one panel each, as a PNG."""
    rows = read_metrics(run_dir)
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported when a plot is drawn

    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.4), dpi=110, squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        ax.plot(*zip(*pts), "o-" if len(pts) < 30 else "-", lw=1.3, ms=3)
        ax.set_xlabel("step")
        ax.set_title(keys[k], fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title or os.path.basename(os.path.abspath(run_dir)), fontsize=10)
    fig.tight_layout()
    path = os.path.join(run_dir, out_name)
    fig.savefig(path)
    plt.close(fig)
    return path
