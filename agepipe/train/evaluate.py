"""Metrics, calibration and MC-dropout uncertainty for a trained model.

MC dropout (Gal & Ghahramani 2016): K stochastic passes with dropout active and BatchNorm
on its running statistics, done as one forward of the input repeated K times. From the K
softmax vectors we report the mean (the prediction), its entropy (total uncertainty) and
the mutual information between prediction and weights (the part due to the model not
knowing, which grows away from the training data). The original counted votes of argmaxes
and took the entropy of the counts, which throws the probabilities away.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agepipe.train.checkpoint import load_checkpoint, write_json
from agepipe.train.data import class_ages, load_task_data, make_split, true_ages
from agepipe.train.model import ResMLP, autocast, has_dropout, mc_dropout_mode, resolve_device
from agepipe.train.report import write_report

ECE_BINS = 15
COVERAGES = (0.5, 0.8, 0.9, 1.0)
CURVE_POINTS = 100
MC_ROWS = 1 << 16  # rows per batched MC forward (K copies included), bounds memory


@torch.inference_mode()
def logits_of(model: ResMLP, x: torch.Tensor, amp: bool = True, chunk: int = 65536) -> torch.Tensor:
    """Deterministic (eval-mode) logits in float32, in chunks to bound memory."""
    model.eval()
    out = torch.empty(len(x), model.config.num_classes, device=x.device)
    with autocast(x.device, amp):
        for start in range(0, len(x), chunk):
            out[start:start + chunk] = model(x[start:start + chunk]).float()
    return out


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


@dataclass
class MCResult:
    probs: np.ndarray               # (n, C) mean softmax over the K passes
    predictive_entropy: np.ndarray  # (n,) entropy of the mean, nats
    mutual_information: np.ndarray  # (n,) predictive entropy - mean entropy of each pass


@torch.inference_mode()
def mc_dropout(model: ResMLP, x: torch.Tensor, samples: int = 32, amp: bool = True,
               max_rows: int = MC_ROWS) -> MCResult:
    """K dropout samples per row as one batched forward per chunk of rows."""
    if samples < 1:
        raise ValueError(f"mc samples must be >= 1, got {samples}")
    mc_dropout_mode(model)
    n, c = len(x), model.config.num_classes
    mean = torch.empty(n, c, device=x.device)
    h = torch.empty(n, device=x.device)
    mi = torch.empty(n, device=x.device)
    step = max(1, max_rows // samples)
    try:
        with autocast(x.device, amp):
            for start in range(0, n, step):
                part = x[start:start + step]
                # Each of the K copies of a row gets its own dropout masks.
                p = torch.softmax(model(part.repeat(samples, 1)).float(), -1).view(samples, len(part), c)
                m = p.mean(0)
                mean[start:start + step] = m
                h[start:start + step] = entropy(m)
                mi[start:start + step] = (entropy(m) - entropy(p).mean(0)).clamp_min(0)
    finally:
        model.eval()
    return MCResult(mean.cpu().numpy(), h.cpu().numpy(), mi.cpu().numpy())


# --- metrics on probabilities (numpy) ---------------------------------------------------

def expected_age(probs: np.ndarray, task: str) -> np.ndarray | None:
    ages = class_ages(task)
    return None if ages is None else probs @ ages


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Top-label confidence against accuracy in equal-width bins, and the expected
    calibration error (the count-weighted mean gap)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    which = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(which, weights=correct, minlength=bins) / count
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
    gaps = np.where(count > 0, np.abs(acc - mean_conf), 0.0)
    ece = float((gaps * count).sum() / max(len(y), 1))
    return {"ece": ece, "bin_edges": np.linspace(0, 1, bins + 1).tolist(),
            "bin_count": count.tolist(), "bin_accuracy": _nan_to_none(acc),
            "bin_confidence": _nan_to_none(mean_conf)}


def risk_coverage(uncertainty: np.ndarray, correct: np.ndarray) -> dict:
    """Accuracy on the most certain fraction of rows as the most uncertain are set aside."""
    n = len(correct)
    if n == 0:
        return {"coverage": [], "accuracy": [], "accuracy_at": {}, "aurc": math.nan}
    order = np.argsort(uncertainty, kind="stable")
    acc = np.cumsum(correct[order]) / np.arange(1, n + 1)
    points = np.unique(np.linspace(1, n, min(n, CURVE_POINTS)).round().astype(int))
    return {"coverage": (points / n).tolist(), "accuracy": acc[points - 1].tolist(),
            "accuracy_at": {f"{c:.2f}": float(acc[max(int(round(c * n)), 1) - 1]) for c in COVERAGES},
            "aurc": float((1 - acc).mean())}


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted."""
    return np.bincount(y * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(probs: np.ndarray, y: np.ndarray, task: str, ages: np.ndarray | None) -> dict:
    """Accuracy, cross-entropy and ECE; for age also 1-off accuracy and MAE in years."""
    pred = probs.argmax(1)
    out = {"n": int(len(y)),
           "accuracy": float((pred == y).mean()) if len(y) else math.nan,
           "cross_entropy": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
           if len(y) else math.nan}
    if task != "gender":
        out["one_off_accuracy"] = float((np.abs(pred - y) <= 1).mean()) if len(y) else math.nan
        out["mae_years"] = float(np.abs(expected_age(probs, task) - ages).mean()) if len(y) else math.nan
    out["ece"] = reliability(probs, y)["ece"]
    return out


def evaluate_split(model: ResMLP, x: torch.Tensor, y: torch.Tensor, task: str, ages: np.ndarray | None,
                   mc_samples: int = 32, amp: bool = True) -> dict:
    """Everything the report shows, for one split: deterministic and MC-dropout scores,
    the confusion matrix, reliability bins and the risk-coverage curve."""
    y_np = y.cpu().numpy()
    probs = torch.softmax(logits_of(model, x, amp), -1).cpu().numpy()
    out = scores(probs, y_np, task, ages)
    out["confusion_matrix"] = confusion_matrix(y_np, probs.argmax(1), probs.shape[1]).tolist()
    out["reliability"] = reliability(probs, y_np)
    if mc_samples > 0 and has_dropout(model):
        mc = mc_dropout(model, x, mc_samples, amp)
        final, uncertainty = mc.probs, mc.predictive_entropy
        out["mc"] = {"samples": mc_samples, **scores(mc.probs, y_np, task, ages),
                     "mean_predictive_entropy": float(mc.predictive_entropy.mean()) if len(y_np) else math.nan,
                     "mean_mutual_information": float(mc.mutual_information.mean()) if len(y_np) else math.nan,
                     "reliability": reliability(mc.probs, y_np)}
    else:  # no MC dropout (none asked for, or an ablation without dropout): softmax entropy ranks rows
        final, uncertainty = probs, entropy(torch.from_numpy(probs)).numpy()
    out["risk_coverage"] = risk_coverage(uncertainty, final.argmax(1) == y_np)
    return out


def _nan_to_none(a: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in a]


def evaluate_run(run_dir: str | Path, store: str | None = None, mc_samples: int = 32,
                 device: str = "auto") -> dict:
    """Rebuild a run's split from the store it recorded (or ``store``), score val and
    test, and write metrics.json and report.md into the run folder."""
    run_dir = Path(run_dir)
    model, config = load_checkpoint(run_dir, resolve_device(device))
    rec, task = config["data"], config["task"]
    data = load_task_data(store or rec["store"], rec["feature_set"], rec["datasets"], task,
                          rec["min_det_score"], next(model.parameters()).device)
    split = make_split(data.rows, rec["test_fold"], rec["val_fraction"])
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {"task": task}
    metrics["split_sizes"] = split.sizes()
    metrics.pop("warning", None)
    if rec.get("split_sizes") and rec["split_sizes"] != split.sizes():
        # The store changed since training (rows added or re-extracted): say so in the metrics.
        metrics["warning"] = (f"split sizes {split.sizes()} differ from training's {rec['split_sizes']}; "
                              "the store changed since this run was trained")
    amp = config.get("train", {}).get("amp", True)
    for name, mc in (("val", 0), ("test", mc_samples)):
        idx = getattr(split, name)
        rows = data.rows.iloc[idx]
        index = torch.from_numpy(idx).to(data.x.device)
        ages = true_ages(task, rows, data.y[index].cpu().numpy())
        metrics[name] = evaluate_split(model, data.x[index], data.y[index], task, ages, mc, amp)
    write_json(path, metrics)
    write_report(run_dir)
    return metrics
