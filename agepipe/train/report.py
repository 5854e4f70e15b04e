"""report.md and its PNG plots for a run folder, from its JSON files alone.

Plots are drawn on bare ``Figure`` objects with the Agg canvas: no pyplot state and no
display needed, and the user's matplotlib backend is left alone.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from agepipe.atomic import atomic_path, write_text

PLOTS = {"learning_curves.png": "learning curves", "confusion_matrix.png": "confusion matrix",
         "reliability.png": "reliability diagram", "risk_coverage.png": "risk-coverage"}
ROWS = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
        ("one_off_accuracy", "1-off accuracy"), ("mae_years", "MAE (years)"),
        ("cross_entropy", "cross-entropy (nats)"), ("ece", "expected calibration error"),
        ("mean_predictive_entropy", "mean predictive entropy (nats)"),
        ("mean_mutual_information", "mean mutual information (nats)")]
MANY_CURVES = 3  # more than this (a cross-validation's runs): drawn alike, the last one stands out
RUN_STYLE = {"color": "tab:grey", "alpha": 0.5, "linewidth": 0.8}


def _read(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def _names(task: str, test: dict) -> list[str]:
    if "classes" in test:
        return test["classes"]
    from agepipe.train.data import class_names  # imports torch: only for metrics written before "classes"

    return class_names(task)


def _margins(fig: Figure, left: float, bottom: float, right: float, top: float, **space) -> None:
    """Margins around the axes, in inches: room for the tick labels and axis titles these plots
    have. Fixed, because bbox_inches="tight" draws each figure twice to find them: a third of the
    time a report took (tests/train/test_report.py checks no text falls outside)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, bottom=bottom / height, right=1 - right / width,
                        top=1 - top / height, **space)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def in_words(counts: dict) -> str:
    """{"no_face": 3, "unknown_label": 1} as "no_face 3, unknown_label 1"."""
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def write_report(run_dir: str | Path) -> Path:
    """report.md and the four plots from config.json, history.json and metrics.json."""
    run_dir = Path(run_dir)
    config, metrics = _read(run_dir / "config.json"), _read(run_dir / "metrics.json")
    history = _read(run_dir / "history.json") if (run_dir / "history.json").exists() else None
    task, test = config["task"], metrics["test"]
    # A run that held out no fold (a table's pre-training) has no test rows: its test sections and
    # plots said "0 bootstrap resamples", tables of dashes and an ECE of nan.
    scored = bool(test.get("n"))
    if history:
        plot_learning_curves(history, run_dir / "learning_curves.png")
    if scored:
        plot_confusion(np.array(test["confusion_matrix"]), _names(task, test), run_dir / "confusion_matrix.png")
        curves = [("deterministic", test["reliability"])]
        if "mc" in test:
            curves.append((f"MC dropout K={test['mc']['samples']}", test["mc"]["reliability"]))
        if "reliability" in test.get("at_temperature_1", {}):  # the final prediction before the run's T
            cal, final = metrics["calibration"], curves[-1][0]
            # each curve at the T that divided it: an MC run's deterministic softmax has its own
            ts = [cal.get("deterministic", cal)["temperature"], cal["temperature"]]
            curves = [(f"{label}, T = {t:.2f}", rel) for (label, rel), t in zip(curves, ts)]
            curves.insert(-1, (f"{final}, T = 1", test["at_temperature_1"]["reliability"]))
        plot_reliability(curves, run_dir / "reliability.png")
        plot_risk_coverage([("this run", test["risk_coverage"])], test["risk_coverage"]["measure"]
                           if "measure" in test["risk_coverage"] else "predictive entropy",
                           run_dir / "risk_coverage.png")

    data, mc = config["data"], test.get("mc")
    left = metrics.get("left_out")  # the datasets' rows neither trained nor scored on, and why
    balance = config.get("train", {}).get("balance")
    lines = [f"# {task} run: {run_dir.name}", "",
             f"- feature set `{data['feature_set']}`, datasets {', '.join(data['datasets'])}, "
             + ("no test fold (every fold trained on)" if data["test_fold"] is None else f"test fold {data['test_fold']}"),
             # evaluate's sizes where it scored the rows the store holds now, else the training's
             "- rows: " + ", ".join(f"{k} {v}" for k, v in (metrics.get("split_sizes")
                                                            or data.get("split_sizes", {})).items())
             + (f"; left out: {in_words(left)}" if left else ""),
             "- classes: " + ", ".join(_names(task, test)),
             "- model: " + ", ".join(f"{k} {v}" for k, v in config["model"].items()),
             f"- best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')}, "
             f"training {metrics.get('train_seconds', math.nan):.1f} s"
             + (f", class-balanced ({balance})" if balance else "")
             + (f", initialised from `{config['init']}`" if config.get("init") else ""), ""]
    lines += warnings_section(run_warnings(metrics))
    validation = [f"Validation accuracy {_fmt(metrics['val'].get('accuracy'))}, balanced "
                  f"{_fmt(metrics['val'].get('balanced_accuracy'))} ({metrics['val'].get('n')} rows, "
                  "subject-disjoint from training).", ""]
    if not scored:
        lines += ["## Test", "", "No held-out test rows: this run's training and validation rows come from every "
                  "fold.", ""] + validation
    else:
        lines += headline_section(task, test)
        lines += ["## Test metrics", "",
                  "| metric | deterministic | " + (f"MC dropout (K={mc['samples']}) |" if mc else ""),
                  "| --- | --- | " + ("--- |" if mc else "")]
        for key, label in ROWS:
            if key in test or (mc and key in mc):
                lines.append(f"| {label} | {_fmt(test.get(key))} | " + (f"{_fmt(mc.get(key))} |" if mc else ""))
        lines += [""] + validation
        lines += per_class_section(test.get("per_class"))
        lines += reliability_section(headline_reliability(test))
        if said := calibration_sentence(metrics):
            lines[-1:-1] = ["", said]  # before the section's closing blank line
        lines += risk_coverage_section(test["risk_coverage"])
    lines += ["## Plots", ""] + [f"![{title}]({name})" for name, title in PLOTS.items() if (run_dir / name).exists()]
    if (run_dir / "predictions.parquet").exists():
        lines += ["", "Per-photo predictions (val and test): `predictions.parquet` with image_id, dataset, subject_id, "
                  "split, label, prediction, correct, probabilities (in the order of the classes above), entropy, "
                  "mutual_information (nats)."]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


# A child draws its share of the run folders with the parent's own import path: -I keeps the
# working folder (which may hold another checkout) and PYTHON* variables out of it.
_DRAW = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from agepipe.train.report import write_report; " \
        "[write_report(run) for run in sys.argv[2:]]"


def write_reports(run_dirs: list[Path]) -> None:
    """write_report for each run folder, on the machine's cores: drawing takes about a second a
    run, most of a cross-validation's wait on a CPU. Each core's share is drawn by a fresh
    Python process (no CUDA state forked, the caller's script not re-run)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(run_dirs), cores)
    if workers < 2:
        for run in run_dirs:
            write_report(run)
        return
    procs = []
    try:
        for k in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-I", "-c", _DRAW, json.dumps(sys.path),
                                           *map(str, run_dirs[k::workers])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        errors = [p.communicate()[1].decode(errors="replace").strip() for p in procs]
    finally:
        for p in procs:  # Ctrl-C, or a failure to start one: none keeps drawing after we return
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [e for p, e in zip(procs, errors) if p.returncode]
    if failed:
        raise RuntimeError(f"drawing the runs' reports failed: {failed[0][-2000:]}")
    missing = [str(run) for run in run_dirs if not (Path(run) / "report.md").exists()]
    if missing:
        raise RuntimeError(f"drawing the runs' reports left no report.md in {missing[0]}")


def headline_reliability(split: dict) -> dict:
    return split["mc"]["reliability"] if "mc" in split else split["reliability"]


def run_warnings(metrics: dict) -> list[str]:
    """Training's warnings, evaluate's (the store changed since training: it says so in "warning")
    and the test fold's."""
    said = [metrics["warning"]] if metrics.get("warning") else []
    return metrics.get("train_warnings", []) + said + metrics["test"].get("warnings", [])


def warnings_section(warnings: list[str]) -> list[str]:
    if not warnings:
        return ["## Warnings", "", "none", ""]
    return ["## Warnings", ""] + [f"- **warning:** {w}" for w in warnings] + [""]


def headline(split: dict) -> dict:
    """The final prediction's scores: the MC-dropout mean's when there is one."""
    return split.get("mc", split)


def calibration_sentence(metrics: dict) -> str | None:
    """The run's temperature scaling (calibrate.py) and what it did to the test rows, in words."""
    cal, test = metrics.get("calibration"), metrics.get("test", {})
    if not cal:  # a run from before temperature scaling
        return None
    if "skipped" in cal:
        return f"No temperature scaling: {cal['skipped']}."
    said = f"Temperature scaling: T = {cal['temperature']:.3f}"
    # Training's record, under "fit" where config.json's T were set by hand since (evaluate.calibration_record);
    # either T may have been, alone: each is said as set by hand only where it is not training's.
    fit = cal.get("fit", cal)
    if "skipped" in fit or fit["temperature"] != cal["temperature"]:  # config.json's, set by hand since
        said += (", config.json's, set since training " + ("fitted none" if "skipped" in fit
                                                            else f"fitted {fit['temperature']:.3f}"))
    elif "rows" in fit:  # training's fit (none: a metrics.json removed since training, T from config.json only)
        said += f", fitted on {fit['rows']} validation rows ({fit['prediction']}; their {_likelihood(fit)})"
    fitted = fit.get("deterministic", {}).get("temperature")
    if det := cal.get("deterministic"):  # the deterministic softmax's own T, beside the MC mean's
        said += f"; T = {det['temperature']:.3f} for the deterministic softmax" + (
            f" ({_likelihood(det)})" if "nll_after" in det else "")
        if det["temperature"] != fitted and "fit" in cal:
            said += ", config.json's, set since training" + (f" fitted {fitted:.3f}" if fitted is not None else "")
    elif fitted is not None:  # removed from config.json: the deterministic softmax divides by T
        said += (f"; the deterministic softmax takes it too (config.json holds no deterministic_temperature since "
                 f"training fitted {fitted:.3f})")
    plain, h = test.get("at_temperature_1"), headline(test)
    if plain and test.get("n"):
        said += (f"; test ECE {plain['ece']:.4f} -> {h['ece']:.4f}, cross-entropy {plain['cross_entropy']:.4f} -> "
                 f"{h['cross_entropy']:.4f}")
    return said + "."


def _likelihood(fit: dict) -> str:
    """A temperature fit's validation NLL before and after it (calibrate.fit_temperature's record)."""
    return (f"negative log-likelihood {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}"
            + (", T at its bound" if fit.get("at_bound") else ""))


def baseline_sentence(kind: str, split: dict) -> str:
    """One line a newcomer reads: does the model beat the constant guess on its held-out rows?"""
    base, h, n = split.get("majority_baseline"), headline(split), split["n"]
    if not base or not n:
        return f"the {kind} model: no held-out rows to score"
    bal, ci = h["balanced_accuracy"], split.get("bootstrap_95", {}).get("balanced_accuracy")
    points = 100 * (bal - base["balanced_accuracy"])
    # not "by 0 points" for a fraction of one, nor "by 1e-05 points"
    gain = f"{points:.0f}" if points >= 1 else f"{points:.1g}" if points >= 0.01 else "under 0.01"
    interval = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
    numbers = (f"balanced accuracy {bal:.2f}{interval} on {n} held-out photos vs the majority baseline's "
               f"{base['balanced_accuracy']:.2f} (always {base['class']})")
    if points <= 0 and base["balanced_accuracy"] >= 1:
        return (f"the {kind} model does not beat the majority baseline, nor can it here: every held-out photo "
                f"is {base['class']}, so the constant guess is already right; {numbers}")
    if points <= 0:
        return f"the {kind} model does not beat the majority baseline: too little data to learn; {numbers}"
    if ci and ci[0] <= base["balanced_accuracy"]:
        return (f"the {kind} model beats the majority baseline by {gain} points, but the 95% interval "
                f"includes the baseline: not conclusive on {n} photos; {numbers}")
    return f"the {kind} model beats the majority baseline by {gain} points; {numbers}"


def headline_section(task: str, test: dict) -> list[str]:
    h = headline(test)
    ci = test.get("bootstrap_95", {})
    which = test.get("prediction", "deterministic")
    lines = ["## Headline (test fold)", "",
             f"Prediction: {which}. 95% intervals from {ci.get('resamples', 0)} bootstrap resamples of the "
             + (f"{ci['groups']} subjects of the {test['n']} test rows (a subject's photos drawn together)."
                if "groups" in ci else f"{test['n']} test rows."), "",
             "| | accuracy | balanced accuracy |", "| --- | --- | --- |",
             f"| model | {_fmt(h['accuracy'])} {_ci(ci.get('accuracy'))} | "
             f"{_fmt(h.get('balanced_accuracy'))} {_ci(ci.get('balanced_accuracy'))} |"]
    base = test.get("majority_baseline")
    if base:
        lines.append(f"| majority baseline (always {base['class']}) | {_fmt(base['accuracy'])} | "
                     f"{_fmt(base['balanced_accuracy'])} |")
        sentence = baseline_sentence(task, test)
        lines += ["", sentence[0].upper() + sentence[1:] + "."]
    return lines + [""]


def per_class_section(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    lines = ["## Per class (test)", "", "| class | support | predicted | precision | recall |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['class']} | {r['support']} | {r['predicted']} | {_fmt(r['precision'])} | {_fmt(r['recall'])} |"
              for r in rows if r["support"] or r["predicted"]]
    return lines + ["", "Classes with no test row and no prediction are left out.", ""]


def reliability_section(rel: dict) -> list[str]:
    lines = ["## Reliability (test, final prediction)", "",
             f"Expected calibration error {rel['ece']:.4f}. Bins of top-class probability with their row counts:", "",
             "| bin | rows | mean confidence | accuracy |", "| --- | --- | --- | --- |"]
    edges = rel["bin_edges"]
    for k, n in enumerate(rel["bin_count"]):
        if n:
            lines.append(f"| {edges[k]:.2f}-{edges[k + 1]:.2f} | {n} | {_fmt(rel['bin_confidence'][k])} | "
                         f"{_fmt(rel['bin_accuracy'][k])} |")
    return lines + [""]


def risk_coverage_section(rc: dict) -> list[str]:
    measure = rc.get("measure", "predictive entropy")
    lines = ["## Risk-coverage (test)", "",
             f"Uncertainty measure: {measure}; the most uncertain predictions are set aside first. "
             f"A random ranking keeps accuracy {_fmt(rc.get('random_accuracy'))} at every coverage "
             f"(AURC {_fmt(rc.get('random_aurc'))}); this ranking's AURC is {_fmt(rc['aurc'])} (lower is better). "
             f"Error AUROC {_fmt(rc.get('error_auroc'))}: the chance an error is ranked more uncertain than a "
             "correct prediction (0.5 = random).", "",
             "| coverage | accuracy | random ranking |", "| --- | --- | --- |"]
    lines += [f"| {float(c):.0%} | {_fmt(a)} | {_fmt(rc.get('random_accuracy'))} |" for c, a in rc["accuracy_at"].items()]
    return lines + [""]


def write_cv_report(out_dir: str | Path, run_dirs: list[str | Path]) -> Path:
    """OUT/report.md for a cross-validation: a report per fold run (written if missing), the
    metrics of every run with their baselines, pooled per-class precision and recall and a
    pooled bootstrap interval, and the same plots across folds."""
    import pyarrow.parquet as pq

    from agepipe.train.data import subject_keys
    from agepipe.train.evaluate import (balanced_accuracy, bootstrap_ci, per_class, reliability,
                                        risk_coverage)

    out_dir, runs = Path(out_dir), [Path(r) for r in run_dirs]
    if not runs:
        raise ValueError("write_cv_report needs at least one run folder")
    write_reports([run for run in runs if not (run / "report.md").exists()])
    entries = []
    for run in runs:
        metrics, config = _read(run / "metrics.json"), _read(run / "config.json")
        test = pq.read_table(run / "predictions.parquet", filters=[("split", "==", "test")]).to_pandas()
        entries.append((run, config, metrics, test))
    task = entries[0][1]["task"]
    names = _names(task, entries[0][2]["test"])
    index = {c: k for k, c in enumerate(names)}

    def arrays(frame):
        y = frame["label"].map(index).to_numpy()
        return y, frame["prediction"].map(index).to_numpy(), np.stack(frame["probabilities"].to_numpy())

    lines = [f"# Cross-validation report: {task}, {len(runs)} runs", "", "- classes: " + ", ".join(names), ""]
    warnings = [f"{run.name}: {w}" for run, _, m, _ in entries
                for w in run_warnings(m)]
    lines += warnings_section(warnings)
    lines += ["## Every run (test fold)", "",
              "| run | test fold | rows | accuracy [95% CI] | balanced accuracy [95% CI] | majority baseline "
              "(balanced) | points over baseline | ECE | error AUROC | report |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    table = {"accuracy": [], "balanced_accuracy": [], "baseline": [], "ece": [], "error_auroc": []}
    for run, config, metrics, _ in entries:
        test = metrics["test"]
        h, ci, base = headline(test), test.get("bootstrap_95", {}), test.get("majority_baseline", {})
        rel, rc = headline_reliability(test), test["risk_coverage"]
        points = 100 * (h["balanced_accuracy"] - base["balanced_accuracy"]) if base else math.nan
        for key, v in (("accuracy", h["accuracy"]), ("balanced_accuracy", h["balanced_accuracy"]),
                       ("baseline", base.get("balanced_accuracy", math.nan)), ("ece", rel["ece"]),
                       ("error_auroc", rc.get("error_auroc", math.nan))):
            table[key].append(math.nan if v is None else v)
        lines.append(f"| {run.name} | {config['data'].get('test_fold')} | {test['n']} | {_fmt(h['accuracy'])} "
                     f"{_ci(ci.get('accuracy'))} | {_fmt(h['balanced_accuracy'])} {_ci(ci.get('balanced_accuracy'))} | "
                     f"{_fmt(base.get('balanced_accuracy'))} ({base.get('class', '-')}) | {points:+.1f} | "
                     f"{rel['ece']:.4f} | {_fmt(rc.get('error_auroc'))} | [report]({_rel(run / 'report.md', out_dir)}) |")
    lines += ["", "| metric | mean +- std over runs |", "| --- | --- |"]
    lines += [f"| {k.replace('_', ' ')} | {np.nanmean(v):.4f} +- {np.nanstd(v):.4f} |" for k, v in table.items()]
    y, pred, probs = (np.concatenate(a) for a in zip(*(arrays(t) for *_, t in entries)))
    entropy = np.concatenate([t["entropy"].to_numpy() for *_, t in entries])
    # Runs of several seeds score the same photos, and a subject's photos are alike: a subject is one
    # draw of the bootstrap, not one per photo or run, keyed as the runs' own intervals key it (a
    # photo of no known subject, or of a run written before predictions.parquet named subjects, is its own).
    photos = np.concatenate([(t["dataset"] + "/" + t["image_id"]).to_numpy() for *_, t in entries])
    subjects = np.concatenate([subject_keys(t if "subject_id" in t else t.assign(subject_id=None))
                               for *_, t in entries])
    pooled_ci = bootstrap_ci(y, pred, groups=subjects)
    lines += ["", "## Pooled over runs (every run's test rows together)", "",
              f"{len(y)} predictions of {len(np.unique(photos))} photos of {pooled_ci['groups']} subjects: accuracy "
              f"{(pred == y).mean():.4f} {_ci(pooled_ci['accuracy'])}, balanced accuracy "
              f"{balanced_accuracy(y, pred):.4f} {_ci(pooled_ci['balanced_accuracy'])} "
              "(95% bootstrap intervals, resampling subjects).", ""]
    lines += per_class_section(per_class(y, pred, names))
    pooled_rel = reliability(probs, y)
    lines += reliability_section(pooled_rel)
    measure = entries[0][2]["test"]["risk_coverage"].get("measure", "predictive entropy")
    pooled_rc = risk_coverage(entropy, pred == y, measure)
    lines += risk_coverage_section(pooled_rc)
    plot_confusion(sum(np.array(m["test"]["confusion_matrix"]) for _, _, m, _ in entries), names,
                   out_dir / "confusion_matrix.png")
    plot_reliability([(run.name, reliability(arrays(t)[2], arrays(t)[0])) for run, *_, t in entries]
                     + [("pooled", pooled_rel)], out_dir / "reliability.png")
    plot_risk_coverage([(run.name, m["test"]["risk_coverage"]) for run, _, m, _ in entries] + [("pooled", pooled_rc)],
                       measure, out_dir / "risk_coverage.png")
    lines += ["## Plots across folds", "", "![confusion matrix, summed over runs](confusion_matrix.png)",
              "![reliability diagram, one line per run](reliability.png)",
              "![risk-coverage, one line per run](risk_coverage.png)"]
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def write_cv_table(path: Path, cv: dict) -> None:
    """cv.md: mean +- std over all runs, then one line per run."""
    keys = [k for k in cv["summary"] if k not in ("best_epoch", "epochs_run", "train_seconds")]
    lines = [f"# Cross-validation: {cv['task']}, folds {cv['folds']}, {cv['seeds']} seed(s), "
             f"{len(cv['runs'])} runs", "", "| metric | mean +- std |", "| --- | --- |"]
    def spread(s: dict) -> str:  # "runs": how many have the value, where some have none (loop.summarise)
        return f"{s['mean']:.4f} +- {s['std']:.4f}" + (f" ({s['runs']} of {len(cv['runs'])} runs)" if "runs" in s else "")
    lines += [f"| {k} | {spread(cv['summary'][k])} |" for k in keys]
    lines += ["", "| fold | seed | best epoch | " + " | ".join(keys) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    lines += [f"| {r['fold']} | {r['seed']} | {r['best_epoch']} | " + " | ".join(_fmt(r[k]) for k in keys) + " |"
              for r in cv["runs"]]
    write_text(path, "\n".join(lines) + "\n")


def plot_learning_curves(history: dict, path: Path) -> None:
    epochs = [h["epoch"] for h in history["history"]]
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    _margins(fig, 1.0, 0.55, 0.3, 0.15, wspace=0.35)  # room for a diverging run's 6-digit losses
    for ax, what in zip(axes, ("loss", "accuracy")):
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
    _margins(fig, 1.0, 1.0, 0.2, 0.15)
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


def _runs_label(curves: list[tuple[str, dict]], what: str, key: str) -> str:
    values = [rec[key] for _, rec in curves[:-1]]
    return f"each of {len(values)} runs ({what} {np.nanmin(values):.3f}-{np.nanmax(values):.3f})"


def plot_reliability(curves: list[tuple[str, dict]], path: Path) -> None:
    """Accuracy against confidence per bin, each point labelled with its row count; below,
    the rows per bin of the last curve (the final prediction, or the pooled one). Past
    MANY_CURVES, the curves but the last (a cross-validation's runs) are drawn alike in grey."""
    fig = Figure(figsize=(5.5, 6.5))
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    _margins(fig, 0.95, 0.55, 0.25, 0.15, hspace=0.1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    many, labelled = len(curves) > MANY_CURVES, False
    for k, (label, rel) in enumerate(curves):
        kept = [(c, a, n) for c, a, n in zip(rel["bin_confidence"], rel["bin_accuracy"], rel["bin_count"]) if n]
        if not kept:
            continue
        conf, acc, n = zip(*kept)
        if many and k < len(curves) - 1:
            ax.plot(conf, acc, **RUN_STYLE, label=None if labelled else _runs_label(curves, "ECE", "ece"))
            labelled = True
            continue
        line, = ax.plot(conf, acc, marker="o", label=f"{label} (ECE {rel['ece']:.3f})")
        if not many:
            for c, a, rows in kept:
                left = c > 0.8  # near the right edge: the label goes to the point's left
                ax.annotate(f"n={rows}", (c, a), textcoords="offset points", xytext=(-4 if left else 4, -10),
                            ha="right" if left else "left", fontsize=7, color=line.get_color())
    last = curves[-1][1]
    edges = np.array(last["bin_edges"])
    counts.bar(edges[:-1], last["bin_count"], width=np.diff(edges), align="edge", color="tab:grey",
               edgecolor="white")
    counts.set_ylabel(f"rows ({curves[-1][0]})")
    counts.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left", fontsize=7)
    _save(fig, path)


def plot_risk_coverage(curves: list[tuple[str, dict]], measure: str, path: Path) -> None:
    """Accuracy as the most uncertain predictions are set aside, against a random ranking
    (which keeps the overall accuracy at every coverage). Past MANY_CURVES, as in
    plot_reliability."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    _margins(fig, 0.8, 0.55, 0.25, 0.35)
    many = len(curves) > MANY_CURVES
    for k, (label, rc) in enumerate(curves):
        if many and k < len(curves) - 1:
            ax.plot(rc["coverage"], rc["accuracy"], **RUN_STYLE,
                    label=_runs_label(curves, "AURC", "aurc") if k == 0 else None)
            continue
        line, = ax.plot(rc["coverage"], rc["accuracy"], label=f"{label} (AURC {rc['aurc']:.3f})")
        if rc.get("random_accuracy") is not None:
            ax.axhline(rc["random_accuracy"], color=line.get_color(), linestyle=":",
                       label=f"{label}: random ranking (AURC {rc['random_aurc']:.3f})")
    ax.set_title(f"ranked by {measure}", fontsize=9)
    ax.set_xlabel("coverage (share of predictions kept, most certain first)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower left")
    _save(fig, path)
