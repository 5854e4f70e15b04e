"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One number T > 0 divides every logit of a trained model; it is fitted after training, on the
validation split, to the least negative log-likelihood of the prediction the run reports (the
mean of the MC-dropout passes, or the one deterministic softmax). A run that reports the MC mean
fits a second T for its deterministic softmax, which is sharper than the mean of K passes (the
paper's age settings with --dropout 0.5: T = 0.50 for the MC mean, 0.77 for the deterministic
softmax; bench/calibration_bench.py); config.json keeps it as "deterministic_temperature". A
deterministic prediction keeps its argmax, so its accuracy; what changes is how sure it says it
is. A network trained to a low cross-entropy on its training rows is over-confident on others
(T > 1 softens it).

The likelihood is searched over log T on a grid and then by golden section: no learning rate,
no random start, the same T on every machine for the same logits. T stays within
[1/20, 20]: past that the validation rows are too few or too alike to say more, and the
calibration record says the bound was hit.
"""
from __future__ import annotations

import math

import torch

from agepipe.train.data import MIN_VAL_ROWS
from agepipe.train.evaluate import pass_logits
from agepipe.train.model import ResMLP, has_dropout

MIN_ROWS = MIN_VAL_ROWS          # fewer validation rows than this fit no temperature (T stays 1)
LOG_T_BOUNDS = (math.log(1 / 20), math.log(20))
GRID = 25                        # log T points first (steps of 0.25); the golden section then refines
FIT_ELEMENTS = 1 << 24           # passes x rows x classes of logits held while fitting (64 MB)
GOLDEN_STEPS = 20                # between two: 0.5 / 1.618**20, a factor 1 + 3e-5 in T


def nll(logits: torch.Tensor, y: torch.Tensor):
    """T -> the mean negative log-likelihood of the labels under the mean over passes of
    softmax(logits / T). logits: (passes, rows, classes) float32; y: (rows,) int64."""
    label = logits.gather(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)  # (K, n)
    log_k = math.log(logits.shape[0])

    def at(temperature: float) -> float:
        picked = label / temperature - torch.logsumexp(logits / temperature, 2)  # log p[y] of each pass
        # the log of the mean of K probabilities, in log space (a sure wrong pass is exp(-80))
        return float(-(torch.logsumexp(picked, 0) - log_k).mean())
    return at


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """T of least validation NLL; returns the calibration record a run keeps in metrics.json:
    temperature, rows, nll before (T = 1) and after, and at_bound when T is at a bound."""
    rows = int(logits.shape[1])
    if rows < MIN_ROWS:
        return too_few(rows)
    logits = logits.float()
    broken = int((~torch.isfinite(logits)).any(2).any(0).sum())
    if broken:  # their NaN made every T's likelihood NaN, and min() then took the lowest T
        return {"temperature": 1.0, "rows": rows,
                "skipped": f"{broken} of {rows} validation row(s) have logits that are not finite (NaN or inf): "
                           "no temperature fitted"}
    f = nll(logits, y.long())
    before = f(1.0)
    low, high = LOG_T_BOUNDS
    grid = [low + (high - low) * i / (GRID - 1) for i in range(GRID)]
    losses = [f(math.exp(u)) for u in grid]
    best = min(range(GRID), key=lambda i: (losses[i], abs(grid[i])))  # ties: the T nearest 1
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, GRID - 1)]
    u = _golden(lambda u: f(math.exp(u)), a, b)
    if f(math.exp(u)) >= losses[best]:  # the grid point was as good (flat likelihood: the T nearest 1) or better
        u = grid[best]
    t = math.exp(u)
    out = {"temperature": t, "rows": rows, "nll_before": before, "nll_after": f(t)}
    if best in (0, GRID - 1):
        out["at_bound"] = True
    return out


def too_few(rows: int) -> dict:
    return {"temperature": 1.0, "rows": rows,
            "skipped": f"{rows} validation row(s), fewer than {MIN_ROWS}: no temperature fitted"}


def _golden(f, a: float, b: float) -> float:
    """The minimum of a unimodal f on [a, b] by golden-section search."""
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (a + b) / 2


def calibrate_run(model: ResMLP, x: torch.Tensor, y: torch.Tensor, mc_samples: int, amp: bool) -> dict:
    """fit_temperature on a run's validation rows ``x``, ``y``, for the prediction its test
    metrics report: the mean of ``mc_samples`` MC-dropout passes (evaluate's masks), or the
    deterministic softmax (0, or a model without dropout). For the MC mean, the record's
    "deterministic" holds the deterministic softmax's own fit. Past FIT_ELEMENTS of logits (IMDB-WIKI's
    validation split for age101 at K=32: 650 MB) a fixed random subset of the rows is used."""
    samples = mc_samples if has_dropout(model) else 0
    prediction = f"MC dropout mean (K={samples})" if samples else "deterministic"
    if len(x) < MIN_ROWS:  # no passes for a fit not made (an empty split: no chunks to concatenate)
        return {**too_few(len(x)), "prediction": prediction}
    cap = max(MIN_ROWS, FIT_ELEMENTS // (max(samples, 1) * model.config.num_classes))
    if len(x) > cap:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:cap].to(x.device)
        x, y = x[keep], y[keep]
    record = {**fit_temperature(pass_logits(model, x, samples, amp), y), "prediction": prediction}
    if samples and "skipped" not in record:
        # The one deterministic pass is sharper than the mean of K: its own T, for the deterministic
        # scores beside the MC ones and for an evaluate or predict with --mc-samples 0.
        record["deterministic"] = fit_temperature(pass_logits(model, x, 0, amp), y)
    return record
