"""report.md and its PNG plots for a run folder, from its JSON files alone.

Plots are drawn on bare ``Figure`` objects with the Agg canvas: no pyplot state and no
display needed, and the user's matplotlib backend is left alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from agepipe.atomic import atomic_path, write_text
from agepipe.train.data import class_names

PLOTS = {"learning_curves.png": "learning curves", "confusion_matrix.png": "confusion matrix",
         "reliability.png": "reliability diagram", "risk_coverage.png": "risk-coverage"}
ROWS = [("accuracy", "accuracy"), ("one_off_accuracy", "1-off accuracy"), ("mae_years", "MAE (years)"),
        ("cross_entropy", "cross-entropy (nats)"), ("ece", "expected calibration error"),
        ("mean_predictive_entropy", "mean predictive entropy (nats)"),
        ("mean_mutual_information", "mean mutual information (nats)")]


def _read(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_report(run_dir: str | Path) -> Path:
    """report.md and the four plots from config.json, history.json and metrics.json."""
    run_dir = Path(run_dir)
    config, metrics = _read(run_dir / "config.json"), _read(run_dir / "metrics.json")
    history = _read(run_dir / "history.json") if (run_dir / "history.json").exists() else None
    task, test = config["task"], metrics["test"]
    if history:
        plot_learning_curves(history, run_dir / "learning_curves.png")
    plot_confusion(np.array(test["confusion_matrix"]), class_names(task), run_dir / "confusion_matrix.png")
    plot_reliability(test, run_dir / "reliability.png")
    plot_risk_coverage(test["risk_coverage"], run_dir / "risk_coverage.png")

    data, mc = config["data"], test.get("mc")
    lines = [f"# {task} run: {run_dir.name}", "",
             f"- feature set `{data['feature_set']}`, datasets {', '.join(data['datasets'])}, "
             f"test fold {data['test_fold']}",
             "- rows: " + ", ".join(f"{k} {v}" for k, v in data.get("split_sizes", {}).items()),
             "- model: " + ", ".join(f"{k} {v}" for k, v in config["model"].items()),
             f"- best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')}, "
             f"training {metrics.get('train_seconds', math.nan):.1f} s"
             + (f", initialised from `{config['init']}`" if config.get("init") else ""),
             "", "## Test metrics", "",
             "| metric | deterministic | " + (f"MC dropout (K={mc['samples']}) |" if mc else ""),
             "| --- | --- | " + ("--- |" if mc else "")]
    for key, label in ROWS:
        if key in test or (mc and key in mc):
            lines.append(f"| {label} | {_fmt(test.get(key))} | " + (f"{_fmt(mc.get(key))} |" if mc else ""))
    rc = test["risk_coverage"]
    lines += ["", f"Validation accuracy {_fmt(metrics['val'].get('accuracy'))} "
              f"({metrics['val'].get('n')} rows, subject-disjoint from training).", "",
              "Accuracy when only the most certain predictions are kept: " +
              ", ".join(f"{float(c):.0%} kept {_fmt(a)}" for c, a in rc["accuracy_at"].items()) +
              f"; area under the risk-coverage curve {_fmt(rc['aurc'])}.", ""]
    lines += [f"![{title}]({name})" for name, title in PLOTS.items() if (run_dir / name).exists()]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def write_cv_table(path: Path, cv: dict) -> None:
    """cv.md: mean +- std over all runs, then one line per run."""
    keys = [k for k in cv["summary"] if k not in ("best_epoch", "epochs_run", "train_seconds")]
    lines = [f"# Cross-validation: {cv['task']}, folds {cv['folds']}, {cv['seeds']} seed(s), "
             f"{len(cv['runs'])} runs", "", "| metric | mean +- std |", "| --- | --- |"]
    lines += [f"| {k} | {cv['summary'][k]['mean']:.4f} +- {cv['summary'][k]['std']:.4f} |" for k in keys]
    lines += ["", "| fold | seed | best epoch | " + " | ".join(keys) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    lines += [f"| {r['fold']} | {r['seed']} | {r['best_epoch']} | " + " | ".join(_fmt(r[k]) for k in keys) + " |"
              for r in cv["runs"]]
    write_text(path, "\n".join(lines) + "\n")


def plot_learning_curves(history: dict, path: Path) -> None:
    epochs = [h["epoch"] for h in history["history"]]
    fig = Figure(figsize=(9, 3.5))
    for ax, what in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for split in ("train", "val"):
            ax.plot(epochs, [h[f"{split}_{what}"] for h in history["history"]], marker=".", label=split)
        ax.axvline(history["best_epoch"], color="grey", linestyle=":", label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.legend()
    _save(fig, path)


def plot_confusion(cm: np.ndarray, names: list[str], path: Path) -> None:
    fig = Figure(figsize=(6, 5) if len(names) <= 10 else (9, 8))
    ax = fig.subplots()
    with np.errstate(invalid="ignore", divide="ignore"):
        share = cm / cm.sum(1, keepdims=True)
    im = ax.imshow(np.nan_to_num(share), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true class")
    if len(names) <= 10:
        ax.set_xticks(range(len(names)), names, rotation=45)
        ax.set_yticks(range(len(names)), names)
        for i, j in np.ndindex(cm.shape):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if np.nan_to_num(share[i, j]) > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    _save(fig, path)


def plot_reliability(test: dict, path: Path) -> None:
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    curves = [("deterministic", test["reliability"])]
    if "mc" in test:
        curves.append((f"MC dropout K={test['mc']['samples']}", test["mc"]["reliability"]))
    for label, rel in curves:
        conf = [c for c, n in zip(rel["bin_confidence"], rel["bin_count"]) if n]
        acc = [a for a, n in zip(rel["bin_accuracy"], rel["bin_count"]) if n]
        ax.plot(conf, acc, marker="o", label=f"{label} (ECE {rel['ece']:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    _save(fig, path)


def plot_risk_coverage(rc: dict, path: Path) -> None:
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(rc["coverage"], rc["accuracy"])
    ax.set_xlabel("coverage (share of predictions kept, most certain first)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    _save(fig, path)
