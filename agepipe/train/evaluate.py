"""Metrics, calibration and MC-dropout uncertainty for a trained model.

MC dropout (Gal & Ghahramani 2016): K stochastic passes with dropout active and BatchNorm
on its running statistics, done as one forward of the input repeated K times. From the K
softmax vectors we report the mean (the prediction), its entropy (total uncertainty) and
the mutual information between prediction and weights (the part due to the model not
knowing, which grows away from the training data). The original counted votes of argmaxes
and took the entropy of the counts, which throws the probabilities away.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from agepipe.atomic import atomic_path
from agepipe.train.checkpoint import (CONFIG, CheckpointError, load_checkpoint, read_metrics, scoring_amp,
                                      temperature_for, write_json)
from agepipe.train.data import (SUBJECTS_ACROSS_DATASETS, class_ages, class_names, content_digest, load_task_data,
                                make_split, subject_keys, true_ages)
from agepipe.train.model import ResMLP, autocast, has_dropout, mc_dropout_mode, resolve_device
from agepipe.train.report import headline, write_report

ECE_BINS = 15
COVERAGES = (0.5, 0.8, 0.9, 1.0)
CURVE_POINTS = 100
MC_ROWS = 1 << 16  # rows per batched MC forward (K copies included), bounds memory
BOOTSTRAP = 1000   # resamples of the test rows for the 95% intervals


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


def uncertainty_measure(samples: int) -> str:
    """What a prediction's entropy is the entropy of: the mean of ``samples`` MC-dropout passes,
    or (0) one deterministic softmax. Two different quantities, so every file holding one says which."""
    return f"MC-dropout predictive entropy (K={samples})" if samples else "softmax entropy (deterministic)"


@dataclass
class MCResult:
    probs: np.ndarray               # (n, C) mean softmax over the K passes
    predictive_entropy: np.ndarray  # (n,) entropy of the mean, nats
    mutual_information: np.ndarray  # (n,) predictive entropy - mean entropy of each pass
    probs_at_1: np.ndarray | None = None  # (n, C) the mean at temperature 1, where another was used


@contextlib.contextmanager
def _seeded_passes(model: ResMLP, device: torch.device, amp: bool, seed: int):
    """Dropout on, BatchNorm on its running statistics, masks from ``seed`` on a fork of torch's
    generators: MC dropout twice gives the same numbers and flags (unseeded, K=32 moved a test
    accuracy by 0.007), and the caller's random stream is left as it was."""
    mc_dropout_mode(model)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device, amp):
            # This device's generator and the CPU's, which fork_rng restores: torch.manual_seed
            # would reseed every GPU's for good (another model training on one, in this process).
            torch.random.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.default_generators[device.index].manual_seed(seed)
            yield
    finally:
        model.eval()


def _passes(model: ResMLP, part: torch.Tensor, samples: int) -> torch.Tensor:
    """(samples, rows, classes) float32 logits: each of the K copies of a row gets its own masks."""
    return model(part.repeat(samples, 1)).float().view(samples, len(part), model.config.num_classes)


@torch.inference_mode()
def mc_dropout(model: ResMLP, x: torch.Tensor, samples: int = 32, amp: bool = True,
               max_rows: int = MC_ROWS, seed: int = 0, temperature: float = 1.0) -> MCResult:
    """K dropout samples per row as one batched forward per chunk of rows (_seeded_passes), each
    pass's logits divided by ``temperature``. ``probs_at_1`` holds the mean at T = 1 where T is not 1."""
    if samples < 1:
        raise ValueError(f"mc samples must be >= 1, got {samples}")
    n, c = len(x), model.config.num_classes
    mean = torch.empty(n, c, device=x.device)
    at_1 = torch.empty(n, c, device=x.device) if temperature != 1.0 else None
    h = torch.empty(n, device=x.device)
    mi = torch.empty(n, device=x.device)
    step = max(1, max_rows // samples)
    with _seeded_passes(model, x.device, amp, seed):
        for start in range(0, n, step):
            logits = _passes(model, x[start:start + step], samples)
            p = torch.softmax(logits / temperature, -1)
            m = p.mean(0)
            mean[start:start + step] = m
            h[start:start + step] = entropy(m)
            mi[start:start + step] = (entropy(m) - entropy(p).mean(0)).clamp_min(0)
            if at_1 is not None:
                at_1[start:start + step] = torch.softmax(logits, -1).mean(0)
    return MCResult(mean.cpu().numpy(), h.cpu().numpy(), mi.cpu().numpy(),
                    None if at_1 is None else at_1.cpu().numpy())


@torch.inference_mode()
def pass_logits(model: ResMLP, x: torch.Tensor, samples: int, amp: bool = True, seed: int = 0) -> torch.Tensor:
    """(K, n, classes) logits of the prediction a run reports: K MC-dropout passes with mc_dropout's
    masks (K >= 1), or the one deterministic pass (K = 0, returned as 1 pass)."""
    if samples == 0:
        return logits_of(model, x, amp).unsqueeze(0)
    with _seeded_passes(model, x.device, amp, seed):
        step = max(1, MC_ROWS // samples)
        return torch.cat([_passes(model, x[s:s + step], samples) for s in range(0, len(x), step)], 1)


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
    ece = float((gaps * count).sum() / len(y)) if len(y) else math.nan  # no rows: no calibration to measure
    return {"ece": ece, "bin_edges": np.linspace(0, 1, bins + 1).tolist(),
            "bin_count": count.tolist(), "bin_accuracy": _nan_to_none(acc),
            "bin_confidence": _nan_to_none(mean_conf)}


def risk_coverage(uncertainty: np.ndarray, correct: np.ndarray, measure: str = "predictive entropy") -> dict:
    """Accuracy on the most certain fraction of rows as the most uncertain are set aside.
    A random ranking keeps the overall accuracy at every coverage (its AURC is the error
    rate); ``error_auroc`` is the chance that an error is ranked more uncertain than a
    correct prediction (0.5: no better than random; ties count half)."""
    n = len(correct)
    if n == 0:
        return {"measure": measure, "coverage": [], "accuracy": [], "accuracy_at": {}, "aurc": math.nan,
                "random_accuracy": math.nan, "random_aurc": math.nan, "error_auroc": math.nan}
    acc = _kept_hits(uncertainty, correct) / np.arange(1, n + 1)
    points = np.unique(np.linspace(1, n, min(n, CURVE_POINTS)).round().astype(int))
    return {"measure": measure, "coverage": (points / n).tolist(), "accuracy": acc[points - 1].tolist(),
            "accuracy_at": {f"{c:.2f}": float(acc[max(int(round(c * n)), 1) - 1]) for c in COVERAGES},
            "aurc": float((1 - acc).mean()), "random_accuracy": float(correct.mean()),
            "random_aurc": float(1 - correct.mean()), "error_auroc": error_auroc(uncertainty, correct)}


def _kept_hits(uncertainty: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Right predictions among the k most certain rows, k = 1..n. Rows of equal uncertainty
    have no order among them (a constant model ties every row): within a tie their hits are
    spread evenly, the mean over every order, as error_auroc counts ties half; else the
    curve would follow the rows' storage order."""
    order = np.argsort(uncertainty, kind="stable")
    hits = np.cumsum(correct[order])
    _, start, size = np.unique(uncertainty[order], return_index=True, return_counts=True)
    end = start + size
    before = np.where(start > 0, hits[start - 1], 0)
    tie = np.repeat(np.arange(len(start)), size)
    into = np.arange(1, len(order) + 1) - start[tie]
    return before[tie] + into * (hits[end - 1] - before)[tie] / size[tie]


def error_auroc(uncertainty: np.ndarray, correct: np.ndarray) -> float:
    """P(uncertainty of an error > that of a correct prediction), ties half: the Mann-Whitney U."""
    wrong, right = uncertainty[~correct], uncertainty[correct]
    if len(wrong) == 0 or len(right) == 0:
        return math.nan
    ranks = _average_ranks(np.concatenate([wrong, right]))
    return float((ranks[:len(wrong)].sum() - len(wrong) * (len(wrong) + 1) / 2) / (len(wrong) * len(right)))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted."""
    return np.bincount(y * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """The mean recall over the classes present in ``y``: a constant guess scores 1/classes."""
    present = np.unique(y)
    if len(present) == 0:
        return math.nan
    return float(np.mean([(pred[y == c] == c).mean() for c in present]))


def per_class(y: np.ndarray, pred: np.ndarray, names: list[str]) -> list[dict]:
    """Precision, recall and support of each class (None where undefined: nothing predicted,
    or no row of that class)."""
    out = []
    for c, name in enumerate(names):
        predicted, actual = pred == c, y == c
        hits = int((predicted & actual).sum())
        out.append({"class": name, "support": int(actual.sum()), "predicted": int(predicted.sum()),
                    "precision": hits / predicted.sum() if predicted.any() else None,
                    "recall": hits / actual.sum() if actual.any() else None})
    return out


def majority_baseline(train_y: np.ndarray, y: np.ndarray, names: list[str]) -> dict:
    """The constant guess of the training split's most frequent class, scored on ``y``."""
    majority = int(np.bincount(train_y, minlength=len(names)).argmax())
    pred = np.full(len(y), majority)
    return {"class": names[majority], "accuracy": float((pred == y).mean()) if len(y) else math.nan,
            "balanced_accuracy": balanced_accuracy(y, pred)}


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0,
                 groups: np.ndarray | None = None) -> dict:
    """95% percentile intervals of accuracy and balanced accuracy over resamples of the rows,
    or of the ``groups`` when rows are not independent draws: a subject, whose photos look alike
    and mostly share a label (the splits never cut one for that reason), or a photo that several
    runs (seeds) scored; a group's rows are kept together; "groups" says how many there are.

    Both depend on a group only through its cells (rows and rows right of each class), so a
    resample of the groups is a multinomial draw of the groups' distinct patterns of cells: the
    same distribution as drawing indices, at a cost that does not grow with the rows (drawing
    indices and scoring each resample in Python took about 0.2 s per split, most of the time a
    run took to be scored)."""
    y, pred = np.asarray(y), np.asarray(pred)
    if len(y) == 0:
        return {}
    present, cls = np.unique(y, return_inverse=True)
    k = len(present)
    group = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    # One code per (group, class) cell that has rows: its class, rows and rows right.
    cell, inverse = np.unique(group * k + cls.ravel(), return_inverse=True)
    rows = np.bincount(inverse.ravel())
    hits = np.bincount(inverse.ravel(), weights=pred == y).astype(np.int64)
    base = int(rows.max()) + 1
    owner = cell // k  # sorted: a group's cells are consecutive, in class order
    slot = np.arange(len(cell)) - np.searchsorted(owner, owner)
    pattern = np.full((owner[-1] + 1, slot.max() + 1), -1, dtype=np.int64)
    pattern[owner, slot] = (cell % k * base + rows) * base + hits
    patterns, count = np.unique(pattern, axis=0, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(len(pattern), count / len(pattern), size=resamples)
    which, code = np.nonzero(patterns >= 0)[0], patterns[patterns >= 0]
    support = np.zeros((len(patterns), k))
    right = np.zeros((len(patterns), k))
    np.add.at(support, (which, code // base // base), code // base % base)
    np.add.at(right, (which, code // base // base), code % base)
    support, right = draws @ support, draws @ right
    with np.errstate(invalid="ignore"):  # a class no row of the resample has: not averaged, as balanced_accuracy
        bal = np.nanmean(right / support, axis=1)
    return {"resamples": resamples, **({"groups": len(pattern)} if groups is not None else {}),
            "accuracy": np.percentile(right.sum(1) / support.sum(1), [2.5, 97.5]).tolist(),
            "balanced_accuracy": np.percentile(bal, [2.5, 97.5]).tolist()}


def scores(probs: np.ndarray, y: np.ndarray, task: str, ages: np.ndarray | None) -> dict:
    """Accuracy, balanced accuracy, cross-entropy and ECE; for age also 1-off accuracy and
    MAE in years."""
    pred = probs.argmax(1)
    out = {"n": int(len(y)),
           "accuracy": float((pred == y).mean()) if len(y) else math.nan,
           "balanced_accuracy": balanced_accuracy(y, pred),
           "cross_entropy": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
           if len(y) else math.nan}
    if task != "gender":
        out["one_off_accuracy"] = float((np.abs(pred - y) <= 1).mean()) if len(y) else math.nan
        out["mae_years"] = float(np.abs(expected_age(probs, task) - ages).mean()) if len(y) else math.nan
    out["ece"] = reliability(probs, y)["ece"]
    return out


def evaluate_split(model: ResMLP, x: torch.Tensor, y: torch.Tensor, task: str, ages: np.ndarray | None,
                   mc_samples: int = 32, amp: bool = True, train_y: np.ndarray | None = None,
                   rows_out: dict | None = None, subjects: np.ndarray | None = None,
                   temperature: float = 1.0, mc_temperature: float | None = None) -> dict:
    """Everything the report shows, for one split: deterministic and MC-dropout scores with
    bootstrap intervals, per-class precision and recall, the majority baseline (the most
    frequent class of ``train_y``), the confusion matrix, reliability bins, the risk-coverage
    curve and warnings. ``rows_out``, when given, receives the per-row columns of
    predictions.parquet; ``subjects``, each row's subject, makes the bootstrap draw subjects.
    Every probability is of the logits divided by the run's T (calibrate.py): ``temperature``
    for the deterministic pass, ``mc_temperature`` (default the same) for each MC pass; where the
    final prediction's is not 1, "at_temperature_1" keeps its scores without it."""
    y_np = y.cpu().numpy()
    names = class_names(task)
    logits = logits_of(model, x, amp)
    probs = torch.softmax(logits / temperature, -1).cpu().numpy()
    out = {"classes": names, **scores(probs, y_np, task, ages)}
    out["reliability"] = reliability(probs, y_np)
    at_1 = torch.softmax(logits, -1).cpu().numpy() if temperature != 1.0 else None
    mi = None
    if mc_samples > 0 and has_dropout(model):
        temperature = temperature if mc_temperature is None else mc_temperature  # the final prediction's from here
        mc = mc_dropout(model, x, mc_samples, amp, temperature=temperature)
        final, uncertainty, mi = mc.probs, mc.predictive_entropy, mc.mutual_information
        at_1 = mc.probs_at_1
        measure = uncertainty_measure(mc_samples)
        out["mc"] = {"samples": mc_samples, **scores(mc.probs, y_np, task, ages),
                     "mean_predictive_entropy": float(mc.predictive_entropy.mean()) if len(y_np) else math.nan,
                     "mean_mutual_information": float(mc.mutual_information.mean()) if len(y_np) else math.nan,
                     "reliability": reliability(mc.probs, y_np)}
    else:  # no MC dropout (none asked for, or an ablation without dropout): softmax entropy ranks rows
        final, uncertainty = probs, entropy(torch.from_numpy(probs)).numpy()
        measure = uncertainty_measure(0)
    if temperature != 1.0:
        plain = scores(at_1, y_np, task, ages)
        out["at_temperature_1"] = {**{k: plain[k] for k in ("accuracy", "cross_entropy", "ece")},
                                   "reliability": reliability(at_1, y_np)}
    pred = final.argmax(1)
    # The headline numbers are those of the final prediction (the MC mean when there is one).
    out["prediction"] = "MC dropout mean" if mi is not None else "deterministic"
    out["per_class"] = per_class(y_np, pred, names)
    # Of the final prediction, as per_class: the deterministic pass's disagreed with the report's table.
    out["confusion_matrix"] = confusion_matrix(y_np, pred, probs.shape[1]).tolist()
    out["bootstrap_95"] = bootstrap_ci(y_np, pred, groups=subjects)
    if train_y is not None and len(train_y):
        out["majority_baseline"] = majority_baseline(np.asarray(train_y), y_np, names)
    out["risk_coverage"] = risk_coverage(uncertainty, pred == y_np, measure)
    out["warnings"] = split_warnings(out, pred)
    if rows_out is not None:
        rows_out.update(label=y_np, prediction=pred, probabilities=final, entropy=uncertainty,
                        mutual_information=mi if mi is not None else np.full(len(y_np), np.nan))
    return out


def split_warnings(split: dict, pred: np.ndarray) -> list[str]:
    """Plain sentences for what a reader of the numbers must not miss."""
    out = []
    names, n = split["classes"], len(pred)
    if n and len(np.unique(pred)) == 1:
        out.append(f"the model predicts one class ({names[int(pred[0])]}) for all {n} rows: "
                   "it has learnt no more than a constant guess")
    base = split.get("majority_baseline")
    bal = headline(split)["balanced_accuracy"]
    if base and n and not bal > base["balanced_accuracy"]:
        out.append(f"balanced accuracy {bal:.3f} does not beat the majority baseline "
                   f"({base['class']} for every row: {base['balanced_accuracy']:.3f})")
    auroc = split["risk_coverage"]["error_auroc"]
    if np.isfinite(auroc) and auroc < 0.5:
        out.append(f"the uncertainty ({split['risk_coverage']['measure']}) ranks errors worse than chance "
                   f"(error AUROC {auroc:.2f} < 0.5): do not use it to set predictions aside")
    return out


def _nan_to_none(a: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in a]


def evaluate_run(run_dir: str | Path, store: str | None = None, mc_samples: int = 32,
                 device: str = "auto") -> dict:
    """Rebuild a run's split from the store it recorded (or ``store``), score val and
    test, and write metrics.json and report.md into the run folder."""
    run_dir = Path(run_dir)
    model, config = load_checkpoint(run_dir, resolve_device(device))
    rec, task = config.get("data", {}), config["task"]
    missing = [k for k in ("store", "feature_set", "datasets", "min_det_score", "test_fold", "val_fraction")
               if k not in rec and not (k == "store" and store)]
    if missing:
        raise CheckpointError(f"{run_dir / CONFIG}: \"data\" does not say where the run's rows came from "
                              f"(no {', '.join(missing)}), so its split cannot be rebuilt")
    try:
        data = load_task_data(store or rec["store"], rec["feature_set"], rec["datasets"], task,
                              rec["min_det_score"], next(model.parameters()).device)
    except FileNotFoundError as e:
        if store and rec.get("store") and store != rec["store"]:  # an AGEPIPE_STORE set long ago is easy to forget
            raise FileNotFoundError(f"{e}. {run_dir} was trained from the store {rec['store']}; --store (or env "
                                    f"AGEPIPE_STORE) pointed evaluate at {store}") from None
        raise
    split = make_split(data.rows, rec["test_fold"], rec["val_fraction"],
                       subjects_per_dataset=rec.get("subjects") != SUBJECTS_ACROSS_DATASETS)
    path = run_dir / "metrics.json"
    metrics = read_metrics(run_dir) or {"task": task}
    metrics["split_sizes"] = split.sizes()
    metrics["left_out"] = data.left_out  # of the store as it is now
    metrics.pop("warning", None)
    said = list(data.warnings)  # labels whose manifest changed since the cut: scored as they are, said
    # The store changed since training (rows added, re-extracted or relabelled): said in the
    # metrics. The rows' digest sees what the split sizes alone miss, a row changed in place; a
    # run of before it was recorded has the sizes only.
    resized = bool(rec.get("split_sizes")) and rec["split_sizes"] != split.sizes()
    if resized or ("rows" in rec and rec["rows"] != content_digest(data)):
        sizes = f"split sizes {split.sizes()}, training's {rec['split_sizes']}" if resized else "the same split sizes"
        said.insert(0, f"the rows differ from those this run was trained on ({sizes}): the store changed since; "
                       "scored on the rows as they are now")
    fit = metrics.pop("calibration", None)
    fit = fit.get("fit", fit) if fit else None  # training's record, kept whole under "fit" by an evaluate before
    if calibration := calibration_record(config, fit):
        metrics["calibration"] = calibration
    if other := fitted_for_another(calibration, config, mc_samples if has_dropout(model) else 0, "this evaluate"):
        said.append(other)
    if said:
        metrics["warning"] = "; ".join(said)
    amp = scoring_amp(config, next(model.parameters()).device)  # the precision the run trained in
    metrics.update(score_splits(model, data, split, mc_samples, amp, run_dir, config))
    write_json(path, metrics)
    write_report(run_dir)
    return metrics


def calibration_record(config: dict, fit: dict | None) -> dict | None:
    """metrics.json's "calibration" for the temperatures config.json holds now: training's ``fit``
    (calibrate.py) where they are its; else those T, with the fit under "fit" (set by hand since)
    or alone (training's metrics.json is gone); None for a run that has neither."""
    used = {"temperature": config.get("temperature", 1.0)}
    if "deterministic_temperature" in config:
        used["deterministic"] = {"temperature": config["deterministic_temperature"]}
    if fit is None:
        return None if used == {"temperature": 1.0} else used
    fitted = {"temperature": fit.get("temperature")}
    if "deterministic" in fit:
        fitted["deterministic"] = {"temperature": fit["deterministic"].get("temperature")}
    return fit if fitted == used else {**used, "fit": fit}


def fitted_for_another(calibration: dict | None, config: dict, passes: int, who: str) -> str | None:
    """A sentence when the T that ``who`` divides by (checkpoint.temperature_for) was fitted for the
    MC-dropout mean and ``who`` takes the deterministic prediction (``passes`` 0), or the reverse: a
    run from before the deterministic softmax had its own T, or one fitted for the deterministic
    softmax alone (--mc-samples 0). The MC mean is softer than the one deterministic pass: with
    --dropout 0.5, T = 0.50 for the one, 0.77 for the other, and the deterministic test ECE 0.075 at
    the MC mean's T, 0.041 at its own (bench/calibration_bench.py --noise 0 --dropout 0.5)."""
    fit = (calibration or {}).get("fit", calibration or {})  # training's, kept under "fit" where config.json changed
    fitted_for = fit.get("prediction", "")
    temperature = temperature_for(config, passes)
    if (temperature == 1.0 or temperature != fit.get("temperature")  # a T set by hand was fitted for nothing
            or not fitted_for or fitted_for.startswith("MC") == (passes > 0)
            or (passes == 0 and "deterministic_temperature" in config)):  # the deterministic prediction's own
        return None
    return (f"the run's temperature T = {temperature:.3f} was fitted for its {fitted_for} prediction; {who} "
            f"scores the {'MC dropout mean' if passes else 'deterministic'} one (--mc-samples {passes}), which "
            "that T may not calibrate")


def score_splits(model: ResMLP, data, split, mc_samples: int, amp: bool, run_dir: str | Path,
                 config: dict | None = None) -> dict:
    """{"val": ..., "test": ...} scored against the training split's majority class, and
    run_dir/predictions.parquet: one row per val and test photo (at the temperatures of the run's
    ``config``, checkpoint.temperature_for)."""
    config = config or {}
    train_y = data.y[torch.from_numpy(split.train).to(data.x.device)].cpu().numpy()
    out, tables = {}, []
    for name, mc in (("val", 0), ("test", mc_samples)):
        idx = getattr(split, name)
        rows = data.rows.iloc[idx]
        index = torch.from_numpy(idx).to(data.x.device)
        ages = true_ages(data.task, rows, data.y[index].cpu().numpy())
        per_row: dict = {}
        out[name] = evaluate_split(model, data.x[index], data.y[index], data.task, ages, mc, amp, train_y, per_row,
                                   subject_keys(rows), temperature_for(config, 0), temperature_for(config, mc))
        tables.append(predictions_table(rows, name, per_row, class_names(data.task)))
    table = pa.concat_tables(tables)
    # The entropy column holds another quantity per split when MC dropout scored the test rows
    # (validation rows are always deterministic): the file says which, as it says the classes.
    measures = {name: out[name]["risk_coverage"]["measure"] for name in out}
    table = table.replace_schema_metadata({**table.schema.metadata,
                                           b"agepipe.uncertainty": json.dumps(measures).encode()})
    write_predictions(Path(run_dir) / "predictions.parquet", table)
    return out


def predictions_table(rows, split_name: str, per_row: dict, names: list[str]) -> pa.Table:
    """One row per photo: what it is, what the model said, and how unsure it was."""
    n = len(rows)
    probs = np.asarray(per_row["probabilities"], dtype=np.float32).reshape(n, len(names))
    return pa.table({
        "image_id": pa.array(rows["image_id"].astype(str).tolist(), pa.string()),
        "dataset": pa.array(rows["dataset"].astype(str).tolist() if "dataset" in rows else [""] * n, pa.string()),
        # the person: a cross-validation's pooled interval draws a subject's photos together (bootstrap_ci)
        "subject_id": pa.array(rows["subject_id"].astype("string"), pa.string(), from_pandas=True),
        "split": pa.array([split_name] * n, pa.string()),
        "label": pa.array([names[int(k)] for k in per_row["label"]], pa.string()),
        "prediction": pa.array([names[int(k)] for k in per_row["prediction"]], pa.string()),
        "correct": pa.array(np.asarray(per_row["label"]) == np.asarray(per_row["prediction"])),
        "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), len(names)),
        "entropy": pa.array(np.asarray(per_row["entropy"], dtype=np.float32)),
        "mutual_information": pa.array(np.asarray(per_row["mutual_information"], dtype=np.float32),
                                       from_pandas=True),
    }, metadata={b"classes": json.dumps(names).encode()})


def write_predictions(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
