"""`lm compare RUN_A RUN_B ...`: held-out loss of several runs against steps, tokens and
wall-clock, in one PNG and a table.

Each run directory gives its metrics (metrics.jsonl: `eval_loss` at each evaluation, and
`wall_s`/`cpu_s`, seconds since the process started, which count tokenizer training,
compilation and evaluation) and its config (config.json: tokens per step). A resumed run's
clock restarts with each process: the segments are joined end to end. The table gives,
per run, the last evaluation, the time it took, and the held-out loss each run had reached
by the time the fastest run finished (the comparison at equal wall-clock; `--clock cpu`
compares at equal CPU time instead, for runs that shared a busy machine unevenly).
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

from data_pipeline.errors import NotFound, UserError
from lm.train.logger import read_metrics


class Curve:
    """The held-out evaluations of one run: steps, tokens, wall and CPU seconds, losses."""

    def __init__(self, run_dir: str, metric: str = "eval_loss"):
        if not os.path.isdir(run_dir):
            raise NotFound(f"no run directory {run_dir!r}")
        rows = read_metrics(run_dir)
        if not rows:
            raise UserError(f"{run_dir} has no metrics.jsonl (or it is empty): nothing to compare; train it first")
        cfg_path = os.path.join(run_dir, "config.json")
        data = json.load(open(cfg_path)).get("data", {}) if os.path.exists(cfg_path) else {}
        tokens_per_step = data.get("batch_size", 0) * data.get("seq_len", 0)
        self.name = os.path.basename(os.path.normpath(run_dir))
        self.steps, self.tokens, self.wall, self.cpu, self.loss, self.bpb = [], [], [], [], [], []
        offset_wall = offset_cpu = last_wall = last_cpu = 0.0
        for r in rows:
            wall, cpu = r.get("wall_s"), r.get("cpu_s")
            if isinstance(wall, (int, float)):
                if wall + offset_wall < last_wall:  # a resumed process: its clock starts again
                    offset_wall, offset_cpu = last_wall, last_cpu
                last_wall, last_cpu = wall + offset_wall, (cpu or 0.0) + offset_cpu
            v = r.get(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.steps.append(r["step"])
                self.tokens.append(r["step"] * tokens_per_step)
                self.wall.append(last_wall if isinstance(wall, (int, float)) else float("nan"))
                self.cpu.append(last_cpu if isinstance(wall, (int, float)) else float("nan"))
                self.loss.append(float(v))
                b = r.get("eval_bpb")
                self.bpb.append(float(b) if isinstance(b, (int, float)) else float("nan"))
        if not self.loss:
            raise UserError(f"{run_dir} has no {metric!r} in its metrics: it was never evaluated "
                            "(set trainer.eval_every, or let it finish)")

    def time(self, clock: str = "wall") -> list[float]:
        return self.cpu if clock == "cpu" else self.wall

    def at(self, seconds: float, clock: str = "wall") -> float:
        """The last evaluation's loss at or before `seconds` of `clock` (nan: none yet)."""
        done = [loss for w, loss in zip(self.time(clock), self.loss) if w <= seconds + 1e-6]
        return done[-1] if done else float("nan")


def table(curves: Sequence[Curve], clock: str = "wall") -> str:
    """One line per run: last step, tokens, wall/CPU seconds, held-out loss (and nats per
    byte where bits per byte are known), and the loss at the fastest run's time (`clock`:
    "wall", or "cpu" where other work shared the machine unevenly)."""
    walls = [c.time(clock)[-1] for c in curves if math.isfinite(c.time(clock)[-1])]
    equal = min(walls) if walls else float("nan")
    width = max(len(c.name) for c in curves)
    head = (f"{'run':<{width}}  {'step':>6}  {'tokens':>10}  {'wall s':>7}  {'cpu s':>7}  {'held-out':>8}  "
            f"{'nats/B':>6}  {f'@{equal:.0f}s' if math.isfinite(equal) else '@equal s':>8}")
    lines = [head, "-" * len(head)]
    for c in curves:
        npb = c.bpb[-1] * math.log(2)
        lines.append(f"{c.name:<{width}}  {c.steps[-1]:>6}  {c.tokens[-1]:>10,}  {c.wall[-1]:>7.0f}  {c.cpu[-1]:>7.0f}  "
                     f"{c.loss[-1]:>8.4f}  {npb:>6.3f}  {c.at(equal, clock):>8.4f}")
    return "\n".join(lines)


def plot(curves: Sequence[Curve], out: str, metric: str = "eval_loss", clock: str = "wall") -> str:
    """Held-out loss against steps, tokens and wall-clock seconds: three panels, one PNG."""
    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported when a plot is drawn

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=110, sharey=True)
    for c in curves:
        for ax, xs in zip(axes, (c.steps, c.tokens, c.time(clock))):
            ax.plot(xs, c.loss, "o-" if len(xs) < 30 else "-", ms=3, lw=1.4, label=c.name)
    for ax, label in zip(axes, ("step", "training tokens", f"{clock} seconds (all included)")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out {metric.removeprefix('eval_')}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def compare(run_dirs: Sequence[str], out: str = "compare.png", metric: str = "eval_loss",
            clock: str = "wall") -> tuple[str, str]:
    """(the table, the PNG's path) of `run_dirs`."""
    if not run_dirs:
        raise UserError("lm compare needs at least one run directory")
    if clock not in ("wall", "cpu"):
        raise UserError(f"--clock {clock!r}: choose wall or cpu")
    curves = [Curve(d, metric) for d in run_dirs]
    return table(curves, clock), plot(curves, out, metric, clock)
