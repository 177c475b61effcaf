"""`lm ladder EXPERIMENT`: a scaling ladder. Train a family of sizes of one experiment, fit
L(C) = E + A * C^-alpha to their held-out losses, and predict the loss of a bigger run
before it is paid for.

The rungs (`plan_ladder`) come from one dial, the width D (`--widths`, or `--rungs N`
widths spaced geometrically from `--min-width` to `--max-width`); everything else is
derived from the base experiment (width D0, depth L0, F0 SwiGLU width) by these rules:

- depth      L = max(1, floor(D / aspect + 1/2)), aspect = D0 / L0 (`--aspect`; 64 for tiny);
- heads      the base's query and key/value heads, head size D / heads (D a multiple of
             2 x heads, so that the head size is even for rotary embeddings);
- MLP        F = D * F0 / D0, rounded up to a multiple of 16;
- tokens     `--tokens-per-param` x the parameters `--count` names: non-embedding (all but
             the input embedding and the output head; the default) or total, rounded to
             whole steps of the base's batch (batch size and context stay the base's, so
             every rung is scored on the same held-out tokens);
- schedule   the base's shape: warm-up the same share of the steps as in the base;
- learning   `--lr-rule constant` (default): the base's optim.lr and optim.muon_lr for
  rate       every rung (Muon's orthogonalised updates have a width-independent size);
             `inverse-width`: optim.lr x D0 / D (muP's rule for Adam on hidden matrices;
             optim.muon_lr unchanged);
- compute    C = training FLOPs = lm.model.transformer.flops_per_token (6 x the matmul
             parameters, output head included, + attention) x training tokens.

Each rung is an ordinary run directory, OUT/rung_K (`lm train EXPERIMENT --set ...
--run-dir OUT/rung_K`, run as a child process; `lm compare` reads them). The ladder is
resumable: a rung whose run finished (summary.json) with the planned configuration is not
trained again, an interrupted one resumes from its checkpoint (the same command again).
Rungs share the first rung's tokenizer (copied into each run), so their losses are in the
same units.

The fit (`fit_power_law`) is least squares on log L: for each E on a grid in [0, min L)
(refined twice around the best), log(L - E) = log A - alpha log C is a linear regression,
and the E whose (A, alpha) give the smallest squared error of log L wins: no starting
guess, no optimiser that can diverge. It uses each rung's final held-out loss (the
evaluation at the end of its run). A rung whose loss is not below the unigram entropy of
the held-out tokens (it has learned no more than token frequencies: the transient before
any power law) is left out of the fit, and said so (`--fit-all` keeps it). `--holdout K`
trains the K largest rungs too but leaves them out of the fit, and reports the
prediction's error against their measured loss. Each prediction comes with the range of
the fits that leave one rung out: how much it rests on any single rung.

Measured on `pretrain_tiny`'s corpus (2-core AMD EPYC shared with other work, 2026-12-07;
experiments/results/ladder_tiny_cpu_2026-12-07*): one-layer rungs (`--aspect 128`), a held-out
D=128 rung of 902 steps at 9.1x the largest fitted rung's compute, measured 2.890 nats/token.
20 tokens per non-embedding parameter, D=32..64: predicted 2.913 (+0.8%; 3.138, +8.6%, with
the rung above the unigram entropy kept); 3 tokens per parameter, D=16..48: predicted 2.997
(+3.7%; 2.803, -3.0%, with it kept). The leave-one-out ranges span about 2.6 to 3.4. With
batches of 16 rows the smallest rungs take 60-226 steps and are still in the transient where
the loss follows the steps more than the size. The same ladder as the first with batches of
4 rows (`--set data.batch_size=4`: 242-904 steps for the fitted rungs; designed before its
target was trained) lies on one power law (rms error of log L 0.3%) and predicts its held-out
D=128 rung at 3.238 against 3.258 measured (-0.6%); fits on four of its five rungs predict
-1.2% to +4.2%. Give the rungs enough steps (a small batch) and expect a few percent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from typing import Callable, Sequence

import numpy as np

from data_pipeline.errors import UserError
from lm import experiment as exp
from lm.config import Config
from lm.model.transformer import expected_param_count, flops_per_token
from lm.train.rundir import config_changes, saved_config

LR_RULES = ("constant", "inverse-width")
PARAM_COUNTS = ("non-embedding", "total")  # the parameters --tokens-per-param counts
# Keys the ladder sets for every rung: a --set of one of them would be overridden
DIAL_KEYS = ("model.d_model", "model.n_layers", "model.head_dim", "model.d_ff", "trainer.steps",
             "optim.warmup_steps")


# ---------------------------------------------------------------------------------------
# The rungs


@dataclasses.dataclass
class Rung:
    index: int
    width: int
    cfg: Config  # the rung's whole configuration
    sets: list[str]  # the --set overrides that make it from the base experiment (the user's first)
    run_dir: str
    params: int
    non_embedding: int
    tokens: int  # training tokens (steps x batch x context)
    flops_per_token: float
    holdout: bool = False  # trained but left out of the fit (its loss is predicted)
    loss: float | None = None  # final held-out loss, once finished
    unigram: float | None = None  # the unigram entropy of the held-out tokens (from its summary)
    unfit: str | None = None  # why a finished rung is left out of the fit

    @property
    def name(self) -> str:
        return os.path.basename(self.run_dir)

    @property
    def steps(self) -> int:
        return self.cfg.trainer.steps

    @property
    def compute(self) -> float:
        return self.flops_per_token * self.tokens

    def row(self) -> dict:
        m = self.cfg.model
        return {"rung": self.name, "width": m.d_model, "layers": m.n_layers, "heads": m.n_heads,
                "d_ff": m.d_ff, "params": self.params, "non_embedding": self.non_embedding,
                "tokens": self.tokens, "steps": self.steps, "lr": self.cfg.optim.lr,
                "muon_lr": self.cfg.optim.muon_lr, "flops": self.compute, "holdout": self.holdout,
                "heldout_loss": self.loss, "unigram_entropy": self.unigram, "not_fitted": self.unfit}


def non_embedding_params(model) -> int:
    """Parameters other than the input embedding and the output head (one matrix if tied), the
    value-embedding tables (lookups) and the training-only multi-token prediction heads."""
    tables = model.n_layers * model.vocab_size * model.n_kv_heads * model.head_size if model.value_embeds else 0
    mtp = model.mtp_tokens * (model.d_model ** 2 + model.d_model)
    return (expected_param_count(model) - model.vocab_size * model.d_model * (1 if model.tie_embeddings else 2)
            - tables - mtp)


def geometric_widths(lo: int, hi: int, n: int, multiple: int) -> list[int]:
    """`n` widths spaced geometrically from `lo` to `hi`, each rounded to a multiple of `multiple`."""
    if n == 1:
        return [max(multiple, round(lo / multiple) * multiple)]
    out = []
    for k in range(n):
        w = lo * (hi / lo) ** (k / (n - 1))
        out.append(max(multiple, int(round(w / multiple)) * multiple))
    if len(set(out)) < len(out):
        raise UserError(f"--rungs {n} widths from {lo} to {hi} in steps of {multiple} repeat a width ({out}): "
                        "fewer rungs, a wider span, or --widths")
    return out


def _check_sets(sets: Sequence[str]) -> None:
    for s in sets:
        key = s.split("=", 1)[0].strip()
        if key in DIAL_KEYS:
            raise UserError(f"--set {key}: the ladder sets it for each rung (from --widths, --aspect and "
                            "--tokens-per-param); leave it out")


def _multiple(base: Config) -> int:
    return 2 * base.model.n_heads  # head size D / heads, even


def rung_sets(base: Config, width: int, tokens_per_param: float, lr_rule: str = "constant",
              aspect: float | None = None, counted: str = "non-embedding") -> list[str]:
    """The --set overrides that make the rung of `width` from `base` (the module's rules)."""
    m, o, t, d = base.model, base.optim, base.trainer, base.data
    if lr_rule not in LR_RULES:
        raise UserError(f"--lr-rule {lr_rule!r}: choose one of {', '.join(LR_RULES)}")
    if width <= 0 or width % _multiple(base):
        raise UserError(f"width {width} is not a positive multiple of {_multiple(base)} (2 x the base's "
                        f"{m.n_heads} heads: the head size must be a whole even number)")
    aspect = aspect or m.d_model / m.n_layers
    layers = max(1, math.floor(width / aspect + 0.5))
    d_ff = 16 * math.ceil(width * m.d_ff / m.d_model / 16)
    model = dataclasses.replace(m, d_model=width, n_layers=layers, head_dim=None, d_ff=d_ff)
    per_step = d.batch_size * d.seq_len
    if counted not in PARAM_COUNTS:
        raise UserError(f"--count {counted!r}: choose one of {', '.join(PARAM_COUNTS)}")
    n = non_embedding_params(model) if counted == "non-embedding" else expected_param_count(model)
    steps = max(1, round(tokens_per_param * n / per_step))
    warmup = round(steps * o.warmup_steps / t.steps) if t.steps else 0
    sets = [f"model.d_model={width}", f"model.n_layers={layers}", "model.head_dim=None", f"model.d_ff={d_ff}",
            f"trainer.steps={steps}", f"optim.warmup_steps={warmup}"]
    if lr_rule == "inverse-width":
        sets.append(f"optim.lr={o.lr * m.d_model / width:.6g}")
    return sets


def make_rung(spec: str, overrides: Sequence[str], index: int, width: int, tokens_per_param: float,
              lr_rule: str, aspect: float | None, out: str, base: Config | None = None,
              counted: str = "non-embedding") -> Rung:
    base = base or exp.load(spec, list(overrides))
    sets = list(overrides) + rung_sets(base, width, tokens_per_param, lr_rule, aspect, counted)
    cfg = exp.load(spec, sets)  # exactly what `lm train` will build (and every key checked)
    tokens = cfg.trainer.steps * cfg.data.batch_size * cfg.data.seq_len
    return Rung(index=index, width=width, cfg=cfg, sets=sets, run_dir=os.path.join(out, f"rung_{index}"),
                params=expected_param_count(cfg.model), non_embedding=non_embedding_params(cfg.model),
                tokens=tokens, flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len))


def plan_ladder(spec: str, overrides: Sequence[str] = (), widths: Sequence[int] | None = None, rungs: int = 5,
                min_width: int | None = None, max_width: int | None = None, tokens_per_param: float = 20.0,
                lr_rule: str = "constant", aspect: float | None = None, holdout: int = 0,
                out: str | None = None, counted: str = "non-embedding") -> list[Rung]:
    """The rungs of the ladder of experiment `spec` (with `overrides`), smallest first."""
    overrides = list(overrides)
    _check_sets(overrides)
    if not tokens_per_param > 0 or not math.isfinite(tokens_per_param):
        raise UserError(f"--tokens-per-param {tokens_per_param} must be a positive number")
    if aspect is not None and not aspect > 0:
        raise UserError(f"--aspect {aspect} must be positive (the width per layer)")
    base = exp.load(spec, overrides)
    if base.stage != "pretrain":
        raise UserError(f"{spec} is a {base.stage} experiment; a ladder trains pretraining runs (stage pretrain)")
    if base.trainer.init_from:
        raise UserError(f"{spec} starts from another run (trainer.init_from); a ladder trains each size from scratch")
    multiple = _multiple(base)
    if widths is None:
        lo = min_width or max(multiple, base.model.d_model // 8)
        hi = max_width or max(lo, base.model.d_model // 2)
        if hi < lo:
            raise UserError(f"--max-width {hi} is below --min-width {lo}")
        widths = geometric_widths(lo, hi, rungs, multiple)
    widths = list(widths)
    if len(set(widths)) != len(widths):
        raise UserError(f"--widths {','.join(map(str, widths))} repeats a width")
    if not 0 <= holdout < len(widths):
        raise UserError(f"--holdout {holdout}: the ladder has {len(widths)} rungs; hold out fewer")
    if len(widths) - holdout < 3:
        raise UserError(f"{len(widths) - holdout} rung(s) to fit (of {len(widths)}, {holdout} held out): the fit "
                        "L(C) = E + A*C^-alpha has 3 parameters and needs at least 3 rungs")
    out = out or os.path.join("runs", f"ladder_{base.name}")
    ladder = [make_rung(spec, overrides, 0, w, tokens_per_param, lr_rule, aspect, out, base, counted)
              for w in widths]
    ladder.sort(key=lambda r: r.compute)
    for k, r in enumerate(ladder):
        r.index, r.run_dir = k, os.path.join(out, f"rung_{k}")
        r.holdout = k >= len(ladder) - holdout
    return ladder


# ---------------------------------------------------------------------------------------
# Training the rungs (each a child `lm train`), resumable


_RESULT_KEYS = ("optim.", "trainer.steps", "trainer.seed", "trainer.microbatches", "stage")


def finished_loss(rung: Rung) -> float | None:
    """The rung's final held-out loss if its run finished with the planned configuration
    (and `rung.unigram`, the unigram entropy of its held-out tokens); None if it has not
    finished. A finished run of another configuration is an error."""
    path = os.path.join(rung.run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    saved = saved_config(rung.run_dir)
    if saved is None:
        raise UserError(f"{rung.run_dir} has a summary.json but no config.json: not a run the ladder can read; "
                        "remove it, or give another --out")
    blocking, free = config_changes(saved, rung.cfg)
    differ = blocking + [c for c in free if c.startswith(_RESULT_KEYS)]
    if differ:
        raise UserError(f"{rung.run_dir} holds a finished run of another configuration ({'; '.join(differ[:4])}"
                        f"{'; ...' if len(differ) > 4 else ''}): remove it to retrain it, or give another --out")
    try:
        with open(path) as f:
            summary = json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is not readable JSON ({e}): remove the rung's folder to retrain it") from None
    if summary.get("stopped") or summary.get("steps") != rung.steps:
        return None
    unigram = summary.get("heldout_unigram_entropy")
    rung.unigram = float(unigram) if isinstance(unigram, (int, float)) else None
    loss = summary.get("heldout_loss")
    return float(loss) if isinstance(loss, (int, float)) else float("nan")


def train_cmd(spec: str, rung: Rung) -> list[str]:
    cmd = [sys.executable, "-m", "lm", "train", spec, "--run-dir", rung.run_dir, "--no-progress"]
    for s in rung.sets:
        cmd += ["--set", s]
    return cmd


def train_rung(spec: str, rung: Rung, log: Callable = print) -> None:
    """`lm train` of one rung in a child process (its output goes to ours). A Ctrl-C reaches
    the child too (it saves and stops); a SIGTERM to the ladder is passed on to it."""
    cmd = train_cmd(spec, rung)
    log("$ lm " + shlex.join(cmd[3:]))
    sys.stdout.flush()  # (our lines before the child's)
    proc = subprocess.Popen(cmd)
    previous = signal.getsignal(signal.SIGTERM)
    terminated = []

    def forward(signum, _frame):
        terminated.append(signum)
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the child received it too: let it save
            try:
                proc.wait(timeout=120)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
            print(f"lm ladder: stopped during {rung.name}; run the same command again to resume", file=sys.stderr)
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        raise UserError(f"stopped by SIGTERM during {rung.name} (its last checkpoint is kept); run the same "
                        "command again to resume")
    if code != 0:
        raise UserError(f"training {rung.name} failed (exit code {code}; its output is above); fix the cause and "
                        "run the same command again: finished rungs are kept")


def share_tokenizer(rungs: Sequence[Rung], rung: Rung) -> None:
    """Copy the first rung's trained tokenizer into `rung`'s run before it starts (when the
    experiment names none), so that every rung reads text into the same tokens."""
    if rung.cfg.data.tokenizer or rung.cfg.data.cache_dir or rung.cfg.data.corpus == "synthetic":
        return
    dest = os.path.join(rung.run_dir, "tokenizer.model")
    source = next((os.path.join(r.run_dir, "tokenizer.model") for r in rungs
                   if r is not rung and os.path.exists(os.path.join(r.run_dir, "tokenizer.model"))), None)
    if source is None or os.path.exists(dest):
        return
    os.makedirs(rung.run_dir, exist_ok=True)
    shutil.copyfile(source, dest + ".tmp")
    os.replace(dest + ".tmp", dest)


def train_ladder(spec: str, rungs: Sequence[Rung], log: Callable = print,
                 train: Callable[[str, Rung, Callable], None] = train_rung) -> None:
    """Train every rung that has not finished (smallest first); fill in each rung's loss."""
    for rung in rungs:
        rung.loss = finished_loss(rung)
        if rung.loss is not None:
            log(f"{rung.name}: finished (held-out loss {rung.loss:.4f}); not trained again")
            continue
        log(f"{rung.name}: D={rung.cfg.model.d_model} L={rung.cfg.model.n_layers}, {rung.non_embedding:,} "
            f"non-embedding parameters, {rung.tokens:,} tokens ({rung.steps} steps), {rung.compute:.3e} FLOPs")
        share_tokenizer(rungs, rung)
        train(spec, rung, log)
        rung.loss = finished_loss(rung)
        if rung.loss is None:
            raise UserError(f"{rung.name} stopped before its last step ({rung.run_dir} has no finished summary); "
                            "run the same command again to resume it")


# ---------------------------------------------------------------------------------------
# The fit: L(C) = E + A * C^-alpha


@dataclasses.dataclass
class Fit:
    E: float
    A: float
    alpha: float
    rms: float  # root mean square error of log L over the fitted points
    n: int

    def predict(self, compute) -> np.ndarray | float:
        c = np.asarray(compute, dtype=float)
        out = self.E + self.A * np.exp(-self.alpha * np.log(c))
        return float(out) if out.ndim == 0 else out

    def describe(self) -> str:
        return (f"L(C) = {self.E:.4f} + {self.A:.4g} * C^-{self.alpha:.4f}  (E={self.E:.4f}, A={self.A:.4g}, "
                f"alpha={self.alpha:.4f}; {self.n} rungs, rms error of log L {self.rms:.2e})")


def check_points(compute: Sequence[float], loss: Sequence[float], names: Sequence[str] | None = None) -> None:
    """One line for data no power law with a floor can describe."""
    names = list(names) if names is not None else [f"point {k}" for k in range(len(loss))]
    bad = [n for n, v in zip(names, loss) if not (isinstance(v, (int, float)) and math.isfinite(v))]
    if bad:
        raise UserError(f"held-out loss is not a finite number for {', '.join(bad)}: the fit needs finite losses "
                        "(a diverged run? retrain it with a lower learning rate)")
    if len(loss) < 3:
        raise UserError(f"{len(loss)} rung(s) to fit: L(C) = E + A*C^-alpha has 3 parameters and needs at least "
                        "3 rungs of different compute")
    if any(not (c > 0 and math.isfinite(c)) for c in compute):
        raise UserError("every rung's compute must be a positive number of FLOPs")
    order = sorted(range(len(loss)), key=lambda k: compute[k])
    for a, b in zip(order, order[1:]):
        if not compute[b] > compute[a]:
            raise UserError(f"{names[a]} and {names[b]} have the same compute ({compute[a]:.3e} FLOPs): each rung "
                            "must have more compute than the last")
        if not loss[b] < loss[a]:
            raise UserError(f"the loss does not fall with compute: {names[b]} ({compute[b]:.3e} FLOPs) has "
                            f"held-out loss {loss[b]:.4f}, not below {names[a]}'s {loss[a]:.4f} at less compute "
                            "(too few tokens, a bad learning rate, or rungs too close: more --tokens-per-param "
                            "or wider spacing)")


def _profile(x: np.ndarray, logl: np.ndarray, loss: np.ndarray, E: np.ndarray):
    """For each floor in `E`: (error, log A at mean x, alpha) of the best (A, alpha), by
    linear regression of log(L - E) on x = log C - mean(log C) (x sums to 0)."""
    y = np.log(loss[None, :] - E[:, None])
    slope = (y * x).sum(1) / (x * x).sum()
    intercept = y.mean(1)
    pred = E[:, None] + np.exp(intercept[:, None] + slope[:, None] * x)
    err = ((np.log(pred) - logl) ** 2).sum(1)
    return np.where(slope < 0, err, np.inf), intercept, -slope


def fit_power_law(compute: Sequence[float], loss: Sequence[float], names: Sequence[str] | None = None) -> Fit:
    """Least-squares fit of log L to log(E + A * C^-alpha), by a grid over E (see the module
    docstring). Raises UserError (one line) for points it cannot fit."""
    compute, loss = list(map(float, compute)), list(map(float, loss))
    check_points(compute, loss, names)
    c, l = np.asarray(compute), np.asarray(loss)
    lc = np.log(c)
    mean = lc.mean()
    x, logl = lc - mean, np.log(l)
    top = l.min() * (1 - 1e-9)
    grid = np.concatenate([[0.0], top * (1 - np.geomspace(1.0, 1e-7, 600))])  # dense near the smallest loss
    for _ in range(3):
        err, intercept, alpha = _profile(x, logl, l, grid)
        k = int(np.argmin(err))
        best = float(err[k]), float(intercept[k]), float(alpha[k]), float(grid[k])
        grid = np.linspace(grid[max(0, k - 1)], grid[min(len(grid) - 1, k + 1)], 201)
    err, intercept, alpha, E = best
    if not math.isfinite(err):
        raise UserError("no power law with a floor fits these losses (they do not fall with compute)")
    A = math.exp(intercept + alpha * mean)
    return Fit(E=E, A=A, alpha=alpha, rms=math.sqrt(err / len(l)), n=len(l))


def leave_one_out(compute: Sequence[float], loss: Sequence[float], at: float) -> tuple[float, float] | None:
    """The range of the predictions at `at` of the fits that leave one point out (4 points
    or more; fits that fail are skipped): how much the prediction rests on any one rung."""
    if len(loss) < 4:
        return None
    preds = []
    for k in range(len(loss)):
        try:
            fit = fit_power_law([c for j, c in enumerate(compute) if j != k], [x for j, x in enumerate(loss) if j != k])
        except UserError:
            continue
        preds.append(fit.predict(at))
    return (min(preds), max(preds)) if preds else None


# ---------------------------------------------------------------------------------------
# Targets, the report and the plot


def target_compute(spec: str, tokens: int | None = None) -> tuple[float, str]:
    """(training FLOPs, description) of experiment `spec` at `tokens` (default its own steps)."""
    cfg = exp.load(spec)
    per_step = cfg.data.batch_size * cfg.data.seq_len
    tokens = tokens or cfg.trainer.steps * per_step
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    return fpt * tokens, (f"{spec} ({expected_param_count(cfg.model) / 1e6:.1f}M parameters, {tokens:,} tokens, "
                          f"vocabulary {cfg.model.vocab_size})")


def table(rungs: Sequence[Rung], fit: Fit | None) -> str:
    head = (f"{'rung':<8} {'D':>5} {'L':>3} {'params':>10} {'non-emb':>10} {'tokens':>12} {'steps':>6} "
            f"{'FLOPs':>10} {'held-out':>8} {'fit':>8} {'error':>7}")
    lines = [head, "-" * len(head)]
    for r in rungs:
        pred = fit.predict(r.compute) if fit else None
        loss = f"{r.loss:8.4f}" if r.loss is not None else f"{'-':>8}"
        fitted = f"{pred:8.4f}" if pred is not None else f"{'-':>8}"
        err = f"{(pred - r.loss) / r.loss:+7.2%}" if pred is not None and r.loss is not None else f"{'':>7}"
        lines.append(f"{r.name:<8} {r.cfg.model.d_model:>5} {r.cfg.model.n_layers:>3} {r.params:>10,} "
                     f"{r.non_embedding:>10,} {r.tokens:>12,} {r.steps:>6} {r.compute:>10.3e} {loss} {fitted} {err}"
                     + ("  (held out)" if r.holdout else f"  (not fitted: {r.unfit})" if r.unfit else ""))
    return "\n".join(lines)


def plot(rungs: Sequence[Rung], fit: Fit, targets: Sequence[tuple[str, float]], out: str, title: str = "") -> str:
    """Rungs (fitted: filled; held out: open), the fitted curve and the targets, log compute axis."""
    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported when a plot is drawn

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    done = [r for r in rungs if r.loss is not None]
    xs = [r.compute for r in rungs if r.loss is not None or r.holdout] + [c for _, c in targets]
    grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 200)
    ax.plot(grid, fit.predict(grid), "-", color="C0", lw=1.5,
            label=f"fit: {fit.E:.3f} + {fit.A:.3g}·C^-{fit.alpha:.3f}")
    ax.axhline(fit.E, color="C0", ls=":", lw=1, label=f"E = {fit.E:.3f}")
    fitted = [r for r in done if not r.holdout and not r.unfit]
    unfit = [r for r in done if r.unfit]
    if unfit:
        ax.plot([r.compute for r in unfit], [r.loss for r in unfit], "x", color="0.5", ms=7,
                label="not fitted (no better than unigram)")
    ax.plot([r.compute for r in fitted], [r.loss for r in fitted], "o", color="C0", ms=6, label="rungs (fitted)")
    for r in fitted:
        ax.annotate(f"D={r.cfg.model.d_model}", (r.compute, r.loss), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    for r in rungs:
        if r.holdout and r.loss is None:
            ax.plot([r.compute], [fit.predict(r.compute)], "*", color="C3", ms=10)
            ax.annotate(f"D={r.cfg.model.d_model}: predicted {fit.predict(r.compute):.3f}",
                        (r.compute, fit.predict(r.compute)), textcoords="offset points", xytext=(-10, 10), ha="right",
                        fontsize=7, color="C3")
    held = [r for r in done if r.holdout]
    for r in held:
        pred = fit.predict(r.compute)
        ax.plot([r.compute], [r.loss], "s", mfc="none", mec="C3", ms=8, mew=1.5)
        ax.plot([r.compute], [pred], "*", color="C3", ms=10)
        ax.annotate(f"D={r.cfg.model.d_model}: measured {r.loss:.3f}, predicted {pred:.3f} "
                    f"({(pred - r.loss) / r.loss:+.1%})", (r.compute, r.loss), textcoords="offset points",
                    xytext=(-10, 10), ha="right", fontsize=7, color="C3")
    if held:
        ax.plot([], [], "s", mfc="none", mec="C3", label="held out: measured")
    if any(r.holdout for r in rungs):
        ax.plot([], [], "*", color="C3", label="held out: predicted")
    for name, c in targets:
        ax.plot([c], [fit.predict(c)], "D", color="C2", ms=6)
        ax.annotate(f"{name}: {fit.predict(c):.3f}", (c, fit.predict(c)), textcoords="offset points",
                    xytext=(4, -10), fontsize=7, color="C2")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final held-out loss (nats/token)")
    ax.set_title(title or "scaling ladder", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def describe_rules(base: Config, tokens_per_param: float, lr_rule: str, aspect: float | None,
                   counted: str = "non-embedding") -> str:
    m = base.model
    lr = f"optim.lr {base.optim.lr:g}" + (f" x {m.d_model}/D" if lr_rule == "inverse-width" else "")
    if base.optim.name == "muon":
        lr += f", optim.muon_lr {base.optim.muon_lr:g}"
    return (f"rungs: width D; L = max(1, round(D/{aspect or m.d_model / m.n_layers:g})); heads {m.n_heads} "
            f"(key/value {m.n_kv_heads}), head size D/{m.n_heads}; F = D x {m.d_ff}/{m.d_model} rounded up to 16; "
            f"tokens = {tokens_per_param:g} x {counted} parameters in steps of {base.data.batch_size}x"
            f"{base.data.seq_len}; {lr} ({lr_rule}); warm-up {base.optim.warmup_steps}/{base.trainer.steps} of the "
            f"steps; C = flops_per_token x tokens")


def ladder(spec: str, overrides: Sequence[str] = (), *, widths: Sequence[int] | None = None, rungs: int | None = None,
           min_width: int | None = None, max_width: int | None = None, tokens_per_param: float = 20.0,
           lr_rule: str = "constant", aspect: float | None = None, holdout: int = 0, out: str | None = None,
           png: str | None = None, targets: Sequence[tuple[str, float]] = (), dry_run: bool = False,
           fit_only: bool = False, counted: str = "non-embedding", fit_all: bool = False, log: Callable = print,
           train: Callable[[str, Rung, Callable], None] = train_rung) -> dict:
    """`lm ladder`: plan, train what is missing, fit, predict; returns the report (also
    written to OUT/ladder.json) with "text" and "png"."""
    if widths is not None and (rungs is not None or min_width is not None or max_width is not None):
        raise UserError("give --widths, or --rungs with --min-width/--max-width, not both")
    plan = plan_ladder(spec, overrides, widths, rungs or 5, min_width, max_width, tokens_per_param, lr_rule,
                       aspect, holdout, out, counted)
    out = os.path.dirname(plan[0].run_dir)
    total = sum(r.compute for r in plan)
    rules = describe_rules(exp.load(spec, list(overrides)), tokens_per_param, lr_rule, aspect, counted)
    log(rules)
    if dry_run:
        text = table(plan, None) + f"\n{len(plan)} rungs, {total:.3e} FLOPs in all (nothing trained: --dry-run)"
        return {"text": text, "png": None}
    if fit_only:
        for r in plan:
            r.loss = finished_loss(r)
    else:
        train_ladder(spec, plan, log, train)
    for r in plan:
        if (not fit_all and not r.holdout and r.loss is not None and r.unigram is not None
                and math.isfinite(r.loss) and r.loss >= r.unigram):
            r.unfit = f"loss {r.loss:.3f} not below the unigram entropy {r.unigram:.3f}"
            log(f"{r.name} is left out of the fit: its held-out loss {r.loss:.4f} is not below the unigram entropy "
                f"{r.unigram:.4f} of the held-out tokens (it has learned no more than token frequencies; --fit-all "
                "keeps it)")
    fitted = [r for r in plan if not r.holdout and r.loss is not None and not r.unfit]
    if len(fitted) < 3 and any(r.unfit for r in plan):
        raise UserError(f"only {len(fitted)} finished rung(s) beat the unigram entropy of the held-out tokens; the "
                        "fit needs 3: more --tokens-per-param or larger --widths (or --fit-all)")
    fit = fit_power_law([r.compute for r in fitted], [r.loss for r in fitted], [r.name for r in fitted])
    lines = [table(plan, fit), "", "fit: " + fit.describe(), "(C: training FLOPs; L: final held-out loss, nats/token)"]
    checks = []
    xs, ys = [r.compute for r in fitted], [r.loss for r in fitted]

    def spread(c: float) -> str:
        lo_hi = leave_one_out(xs, ys, c)
        return f" (leave-one-out range {lo_hi[0]:.4f} to {lo_hi[1]:.4f})" if lo_hi else ""

    for r in plan:
        if r.holdout and r.loss is None:  # (--fit-only before it has finished)
            lines.append(f"held out {r.name}: predicted {fit.predict(r.compute):.4f}{spread(r.compute)} (not trained "
                         "yet)")
        if r.holdout and r.loss is not None:
            pred = fit.predict(r.compute)
            err = (pred - r.loss) / r.loss
            checks.append({"rung": r.name, "flops": r.compute, "predicted": pred, "measured": r.loss, "error": err,
                           "compute_ratio": r.compute / max(xs), "leave_one_out": leave_one_out(xs, ys, r.compute)})
            lines.append(f"held out {r.name} ({r.compute / max(xs):.1f}x the compute of the largest fitted rung): "
                         f"predicted {pred:.4f}{spread(r.compute)}, measured {r.loss:.4f}, error {err:+.2%}")
    predictions = []
    for name, c in targets:
        predictions.append({"target": name, "flops": c, "predicted": fit.predict(c),
                            "leave_one_out": leave_one_out(xs, ys, c)})
        lines.append(f"target {name}: {c:.3e} FLOPs -> predicted held-out loss {fit.predict(c):.4f}{spread(c)}")
    png = png or os.path.join(out, "ladder.png")
    title = f"lm ladder {spec}: {tokens_per_param:g} tokens per {counted} parameter, lr {lr_rule}"
    plot(plan, fit, [(n, c) for n, c in targets], png, title)
    report = {"experiment": spec, "overrides": list(overrides), "rules": rules, "tokens_per_param": tokens_per_param,
              "counted": counted, "lr_rule": lr_rule, "rungs": [r.row() for r in plan],
              "fit": {"E": fit.E, "A": fit.A, "alpha": fit.alpha, "rms_log": fit.rms, "n": fit.n,
                      "rungs": [r.name for r in fitted]},
              "holdout": checks, "targets": predictions, "png": png}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ladder.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines.append(f"compare the rungs: lm compare {' '.join(r.run_dir for r in plan)} --out {out}/compare.png")
    report["text"] = "\n".join(lines)
    return report
