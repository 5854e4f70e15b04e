"""`agepipe table`: Kim 2021's whole table in one command.

The grid is tasks (age: Adience's 8 classes; gender) x model variants x {from scratch,
pre-trained on IMDB-WIKI} x test folds x seeds. Each (task, variant, init) cell is one
``loop.cross_validate`` in OUT/<task>/<init>/<variant>/ (its per-run folders, cv.json and cv.md);
a pre-trained cell first trains the same variant on the pre-training datasets
(OUT/<task>/pretrained/<variant>/pretrain/) and starts every run from it, as the original did.
The cells are gathered into OUT/table.md and OUT/table.csv: test accuracy mean +- std over the
runs, a 95% confidence interval of the mean, the original's published number, and the times.

A rerun with the same settings on the same rows reuses every finished cell: cell.json records
them, with a digest of the rows' content (data.content_digest), so a store re-cut into other
shards, moved or copied still reuses them, and a changed row trains its cells again.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import stdtrit

from agepipe.atomic import only_writer, write_text
from agepipe.datasets import expand_groups
from agepipe.train.checkpoint import write_json
from agepipe.train.data import (VAL_FRACTION, check_datasets_held, content_digest, load_task_data, make_split,
                                resolve_feature_set, subject_keys)
from agepipe.train.loop import (Diverged, check_folds, cross_validate, data_record, model_config_for,
                                train_config_for, train_run)
from agepipe.train.model import precision, resolve_device

TASKS = ("age", "gender")
INITS = ("scratch", "pretrained")

# The original's ablations (tae898/age-gender model/model.py): add_IC=false removes the whole IC
# layer, BatchNorm and Dropout alike; add_residual=false removes the skip connection.
VARIANTS = {
    "full": {},
    "dropout0": {"dropout": 0.0},
    "no-ic": {"batch_norm": False, "dropout": 0.0},
    "no-skip": {"skip": False},
    "neither": {"batch_norm": False, "dropout": 0.0, "skip": False},
}
VARIANT_HELP = {
    "full": "the paper's model: IC layers (BatchNorm + dropout 0.05) and skip connections",
    "dropout0": "IC layers with dropout 0 (BatchNorm only)",
    "no-ic": "no IC layers: neither BatchNorm nor dropout (add_IC false)",
    "no-skip": "no skip connections (add_residual false)",
    "neither": "no IC layers and no skip connections: a plain MLP",
}

# Where a variant's hyper-parameters differ from the task's (loop.PAPER_TRAIN): the original ran its
# gender models without IC layers at a tenth of the searched learning rate (TRAINING-RESULTS.md).
VARIANT_TRAIN = {
    ("gender", "no-ic"): {"lr": 0.00243983281217744},
    ("gender", "neither"): {"lr": 0.00243983281217744},
}
TRAIN_KEYS = {"lr": float, "weight_decay": float, "gamma": float, "batch_size": int, "patience": int}

# Test accuracy, mean and std over 5 folds x 5 seeds, as tae898/age-gender published them in
# training-results/TRAINING-RESULTS.md (commit 01c9ead07629dc68a6dc34473afd8917411b7396).
PUBLISHED_SOURCE = "tae898/age-gender training-results/TRAINING-RESULTS.md"
PUBLISHED = {
    ("gender", "full", "scratch"): (0.8406407172280743, 0.027314883353706715),
    ("gender", "full", "pretrained"): (0.8887175397758311, 0.025486444846123855),
    ("gender", "dropout0", "scratch"): (0.8412609429948891, 0.03257054909731762),
    ("gender", "dropout0", "pretrained"): (0.8985643474512477, 0.019786984421465842),
    ("gender", "no-ic", "scratch"): (0.8206668461496278, 0.03890423963959933),
    ("gender", "no-ic", "pretrained"): (0.9066379871650122, 0.024821142870521833),
    ("gender", "no-skip", "scratch"): (0.8339792004421082, 0.03452867618194227),
    ("gender", "no-skip", "pretrained"): (0.8936712563920685, 0.01711819441026738),
    ("gender", "neither", "scratch"): (0.5847169636316493, 0.10150374884096376),
    ("gender", "neither", "pretrained"): (0.9033931761843292, 0.02273976694274134),
    ("age", "full", "scratch"): (0.5481515230237024, 0.03905170389565693),
    ("age", "full", "pretrained"): (0.6086133596326488, 0.028311297707050202),
    ("age", "dropout0", "scratch"): (0.5437349798897955, 0.041431485692379325),
    ("age", "dropout0", "pretrained"): (0.5968017863017355, 0.0186838841831273),
    ("age", "no-ic", "scratch"): (0.5332253618829352, 0.040315399034449785),
    ("age", "no-ic", "pretrained"): (0.6032404380342925, 0.03081564764232662),
    ("age", "no-skip", "scratch"): (0.5394806824328668, 0.03735867803724017),
    ("age", "no-skip", "pretrained"): (0.6046470200696574, 0.026999898209333337),
    ("age", "neither", "scratch"): (0.40679957475404477, 0.05287554302722316),
    ("age", "neither", "pretrained"): (0.5936561489498906, 0.03572556187687143),
}

CSV_COLUMNS = ["task", "variant", "init", "runs", "accuracy_mean", "accuracy_std", "ci95_low", "ci95_high", "ci95_over",
               "published_mean", "published_std", "seconds", "pretrain_seconds", "lr", "weight_decay", "gamma",
               "batch_size", "dropout", "batch_norm", "skip", "diverged"]


def parse_settings(items: list[str]) -> list[tuple[str, str, object]]:
    """``SELECTOR.KEY=VALUE`` -> (selector, key, value). SELECTOR is all, a task, a variant or
    task:variant; KEY one of TRAIN_KEYS."""
    out = []
    for item in items:
        target, sep, value = item.partition("=")
        selector, dot, key = target.rpartition(".")
        if not sep or not dot or key not in TRAIN_KEYS:
            raise ValueError(f"--set {item!r}: expected SELECTOR.KEY=VALUE with KEY one of {', '.join(TRAIN_KEYS)}")
        task, _, variant = selector.rpartition(":")
        known = (selector == "all" or selector in TASKS or selector in VARIANTS
                 or (task in TASKS and variant in VARIANTS))
        if not known:
            raise ValueError(f"--set {item!r}: {selector!r} is not all, a task ({', '.join(TASKS)}), "
                             f"a variant ({', '.join(VARIANTS)}) or task:variant")
        try:
            typed = TRAIN_KEYS[key](value)
        except ValueError:
            kind = {"int": "an integer", "float": "a number"}.get(TRAIN_KEYS[key].__name__, TRAIN_KEYS[key].__name__)
            raise ValueError(f"--set {item!r}: {value!r} is not {kind}") from None
        try:  # the value's range, checked before any cell trains
            dataclasses.replace(train_config_for("age"), **{key: typed})
        except ValueError as e:
            raise ValueError(f"--set {item!r}: {e}") from None
        out.append((selector, key, typed))
    return out


def cell_train_overrides(task: str, variant: str, settings: list[tuple[str, str, object]]) -> dict:
    """The variant's own hyper-parameters, then the user's --set values in the order given."""
    out = dict(VARIANT_TRAIN.get((task, variant), {}))
    for selector, key, value in settings:
        if selector in ("all", task, variant, f"{task}:{variant}"):
            out[key] = value
    return out


def accuracy_stats(values: list[float], folds: list[int]) -> dict:
    """Mean and std over the runs (np.std, as cv.json and the original report them) and a 95%
    Student-t confidence interval of the mean, clipped to [0, 1].

    The interval is over the test folds' means, not the runs: the seeds of one fold score the
    same photos, so their accuracies move together and 25 runs are 5 draws, not 25 (an interval
    over the runs came out about sqrt(5) times too narrow). With one test fold the seeds are all
    there is: the interval is over them and says only how training varies on that fold. A single
    run has neither std nor interval (NaN)."""
    a, f = np.asarray(values, dtype=np.float64), np.asarray(folds)
    means = np.array([a[f == k].mean() for k in np.unique(f)])
    draws, over = (means, "folds") if len(means) > 1 else (a, "seeds")
    mean, low, high = float(a.mean()), math.nan, math.nan
    if len(draws) > 1:
        # centred on the draws' mean, not the runs': the two differ where the folds have unequal seeds
        centre = float(draws.mean())
        half = float(stdtrit(len(draws) - 1, 0.975) * draws.std(ddof=1) / math.sqrt(len(draws)))
        low, high = max(centre - half, 0.0), min(centre + half, 1.0)
    return {"runs": len(a), "accuracy_mean": mean, "accuracy_std": float(a.std()) if len(a) > 1 else math.nan,
            "ci95_low": low, "ci95_high": high, "ci95_over": over if len(draws) > 1 else ""}


@dataclass
class Grid:
    tasks: list[str]
    variants: list[str]
    inits: list[str]
    folds: list[int] | None = None    # test folds; None: all five
    seeds: int = 5
    epochs: int | None = None          # None: the paper's 30
    settings: list = dataclasses.field(default_factory=list)  # parse_settings output

    def cells(self):
        return [(t, v, i) for t in self.tasks for i in self.inits for v in self.variants]


def run_table(store: str, out: str | Path, grid: Grid, *, feature_set: str | None = None,
              datasets: tuple[str, ...] = ("adience",), pretrain_datasets: tuple[str, ...] = ("imdb-wiki",),
              device: str = "auto", min_det_score: float = 0.0, mc_samples: int = 0, cuda_graphs: bool = False,
              amp: bool = True, echo: Callable[[str], None] = print) -> list[dict]:
    """Train every cell of ``grid`` (reusing finished ones), write table.md and table.csv into
    ``out``, and return the rows. ``cuda_graphs``: see cross_validate; ``amp``: TrainConfig.amp."""
    start = time.perf_counter()
    out = Path(out)
    feature_set = resolve_feature_set(store, feature_set)
    datasets, pretrain_datasets = expand_groups(list(datasets)), expand_groups(list(pretrain_datasets))
    check_datasets_held(store, feature_set, datasets + (pretrain_datasets if "pretrained" in grid.inits else []))
    dev = resolve_device(device)
    cells, rows, said, diverged = grid.cells(), [], set(), []
    for task in grid.tasks:
        # A cell is reused only on the same rows: digested from the rows loaded, so an extract that
        # commits meanwhile cannot make the record name other rows than the ones trained on.
        data = load_task_data(store, feature_set, datasets, task, min_det_score, dev)
        check_folds(data)  # before any cell pre-trains, not after
        record = data_record(store, feature_set, datasets, None, min_det_score)
        digest = content_digest(data)
        pre = pre_record = pre_digest = None
        if "pretrained" in grid.inits:
            pre = load_task_data(store, feature_set, pretrain_datasets, task, min_det_score, dev)
            pre_digest = content_digest(pre)
            pre_record = data_record(store, feature_set, pretrain_datasets, None, min_det_score)
            check_no_shared_subjects(data, pre)
        for message in data.warnings + (pre.warnings if pre else []):  # stale labels: said once a table
            if message not in said:
                said.add(message)
                echo(f"warning: {message}")
        for init in grid.inits:
            for variant in grid.variants:
                overrides = {**cell_train_overrides(task, variant, grid.settings), "epochs": grid.epochs, "amp": amp}
                train_cfg = train_config_for(task, **overrides)
                model_cfg = model_config_for(task, None, **VARIANTS[variant])
                cell_dir = out / task / init / variant
                identity = {"task": task, "variant": variant, "init": init, "folds": _folds_key(grid.folds),
                            "seeds": grid.seeds,
                            "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
                            "precision": precision(dev, train_cfg.amp), "data": _without_store(record),
                            "rows": digest,
                            "pretrain_data": _without_store(pre_record) if init == "pretrained" else None,
                            "pretrain_rows": pre_digest if init == "pretrained" else None, "mc_samples": mc_samples}
                done, why = _finished_cell(cell_dir, identity)
                failed = None  # why the cell has no runs: its training diverged
                if done is None:
                    cell_start, pretrain_seconds = time.perf_counter(), None
                    try:
                        # A `train --cv --out` into this cell meanwhile would write its runs among these.
                        with only_writer(cell_dir, "table"):
                            # The old record goes first: a retrain stopped part-way leaves the folder holding new
                            # runs, which a rerun with the old settings must not pass off as the recorded cell;
                            # nor may the earlier table.md and table.csv, which give that record's numbers.
                            for path in (cell_dir / "cell.json", out / "table.md", out / "table.csv"):
                                path.unlink(missing_ok=True)
                            init_run = None
                            if init == "pretrained":
                                init_run = cell_dir / "pretrain"
                                split = make_split(pre.rows, None, VAL_FRACTION)
                                t0 = time.perf_counter()
                                train_run(pre, split, model_cfg, train_cfg, init_run, pre_record, None, 0, report=False)
                                pretrain_seconds = time.perf_counter() - t0
                                echo(f"  {task} {variant}: pre-trained on {'+'.join(pretrain_datasets)} "
                                     f"({len(pre.rows)} rows) in {pretrain_seconds:.1f} s")
                                model_cfg = model_config_for(task, str(init_run), **VARIANTS[variant])
                            cv = cross_validate(data, model_cfg, train_cfg, cell_dir, record, grid.seeds,
                                                str(init_run) if init_run else None, mc_samples, progress=False,
                                                folds=grid.folds, cuda_graphs=cuda_graphs)
                            done = {"identity": identity, "seconds": time.perf_counter() - cell_start,
                                    "pretrain_seconds": pretrain_seconds,
                                    "accuracy": [r["test_accuracy"] for r in cv["runs"]],
                                    "folds": [r["fold"] for r in cv["runs"]]}
                            write_json(cell_dir / "cell.json", done)
                            how = f"trained in {done['seconds']:.1f} s" + (f" (again: {why})" if why else "")
                    except Diverged as e:  # this cell's settings failed, not the table: the other cells go on
                        failed = str(e)
                        diverged.append(f"{task} {init} {variant}: {e}")
                        done = {"seconds": time.perf_counter() - cell_start, "pretrain_seconds": pretrain_seconds}
                else:
                    how = f"reused (trained in {done['seconds']:.1f} s before)"
                stats = accuracy_stats(done["accuracy"], done["folds"]) if "accuracy" in done else no_runs()
                row = {"task": task, "variant": variant, "init": init, **stats, "diverged": failed}
                published = PUBLISHED.get((task, variant, init))
                row["published_mean"], row["published_std"] = published if published else (None, None)
                row.update(seconds=done["seconds"], pretrain_seconds=done.get("pretrain_seconds"),
                           **{k: train_cfg.to_dict()[k] for k in ("lr", "weight_decay", "gamma", "batch_size")},
                           **{k: model_cfg.to_dict()[k] for k in ("dropout", "batch_norm", "skip")})
                rows.append(row)
                result = (f"its training diverged after {done['seconds']:.1f} s, no runs" if failed else
                          f"accuracy {_mean_std(row)} over {row['runs']} run{'s' if row['runs'] > 1 else ''}, {how}")
                echo(f"[{len(rows)}/{len(cells)}] {task} {init} {variant}: {result}"
                     + (f" (original {published[0]:.4f} +- {published[1]:.4f})" if published else ""))
    wall = time.perf_counter() - start
    write_table(out, rows, grid, wall, f"{dev} ({precision(dev, amp)})", feature_set)
    echo(f"{len(rows)} cells in {wall:.1f} s -> {out / 'table.md'}, {out / 'table.csv'}")
    if diverged:  # after the table: the other cells are done and recorded; a rerun trains only these again
        raise Diverged(f"{len(diverged)} of {len(cells)} cell(s) diverged (table.md marks them; a rerun trains only "
                       "them again): " + "; ".join(diverged) + ". In a table, a cell's learning rate is --set "
                       "VARIANT.lr=VALUE (or task:variant.lr=VALUE)")
    return rows


def no_runs() -> dict:
    """accuracy_stats of a cell that has none (its training diverged)."""
    return {"runs": 0, "accuracy_mean": math.nan, "accuracy_std": math.nan, "ci95_low": math.nan,
            "ci95_high": math.nan, "ci95_over": ""}


def _folds_key(folds: list[int] | None) -> list[int] | None:
    """None for all five folds, however asked for: --folds 0,1,2,3,4 trains the same runs as the default."""
    return None if folds is None or sorted(set(folds)) == list(range(5)) else folds


def _without_store(record: dict) -> dict:
    """A data record without the store's path: the rows' digest says what was trained on, and a
    store moved or copied (or the same one as s3://) holds the same rows."""
    return {k: v for k, v in record.items() if k != "store"}


def check_no_shared_subjects(data, pre) -> None:
    """Refuse pre-training rows of a person the cross-validation also holds (--pretrain-dataset
    naming a --dataset, or IMDB and WIKI, whose subjects are names, split between them): the
    pre-training uses every row, so each pre-trained run would have seen its test fold's people."""
    keys = subject_keys(data.rows)
    shared = np.isin(keys, subject_keys(pre.rows))
    if shared.any():
        first = data.rows.iloc[int(np.argmax(shared))]
        raise ValueError(f"{len(np.unique(keys[shared]))} subject(s) of the cross-validation rows are in the "
                         f"pre-training rows too (first: {first['subject_id']!r} of {first['dataset']}): the "
                         "pre-trained runs would have seen the people of their test folds. Pre-train on "
                         "datasets that share no one with --dataset")


def _finished_cell(cell_dir: Path, identity: dict) -> tuple[dict | None, str]:
    """The recorded result of a cell trained with exactly these settings on these rows, if there
    is one; else None and why it is trained again ("" when nothing is recorded)."""
    path = cell_dir / "cell.json"
    if not path.exists():
        return None, ""
    done, damage = _read_cell(path)
    if damage:
        return None, f"{path} is damaged ({damage})"
    # A cell recorded before its precision was trained in float32 (the stacked runs never autocast).
    old = {"precision": "float32", **done["identity"]}
    for key in ("data", "pretrain_data"):  # recorded with the store's path before the rows' digest
        if isinstance(old.get(key), dict):
            old[key] = _without_store(old[key])
    new = json.loads(json.dumps(identity))  # tuples and lists alike
    # amp only asks for bfloat16; "precision" says what ran (float32 both ways on a device without it).
    # calibrate: a temperature divides the logits and keeps their argmax, so the table's accuracies; a
    # cell recorded before temperature scaling (without the key) is as good as a new one.
    for ident in (old, new):
        if isinstance(ident.get("train"), dict):
            ident["train"] = {k: v for k, v in ident["train"].items() if k not in ("amp", "calibrate")}
    changed = [k for k in new if k in old and old[k] != new[k]]
    unrecorded = [k for k in new if k not in old and new[k] is not None]
    why = [f"{', '.join(keys)} {what}" for keys, what in ((changed, "changed"), (unrecorded, "not recorded")) if keys]
    if "folds" not in done:  # the confidence interval is over the folds' means
        why.append("recorded without its runs' test folds")
    elif not why:
        why = _runs_replaced(cell_dir, done)
    return (done, "") if not why else (None, "; ".join(why))


def _runs_replaced(cell_dir: Path, done: dict) -> list[str]:
    """Why the cell's folder no longer holds the runs cell.json recorded: a `train --cv --out` into it
    since (other settings or seeds) replaced them and cv.json, or was stopped part-way (no cv.json)."""
    path = cell_dir / "cv.json"
    try:
        runs = [(r["fold"], r["test_accuracy"]) for r in json.loads(path.read_text())["runs"]]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
        return [f"{path} is missing or not a cross-validation's record ({type(e).__name__}: {e})"]
    # as JSON: a NaN accuracy equals itself there
    if json.dumps(runs) != json.dumps(list(zip(done["folds"], done["accuracy"]))):
        return [f"{path} records other runs than cell.json (a cross-validation trained there since)"]
    return []


def _read_cell(path: Path) -> tuple[dict | None, str]:
    """cell.json and "" if it is a cell's record; else None and what is wrong. Its writes are
    atomic, so a damaged one was edited or hit a failing disk: the cell trains again, not a crash."""
    try:
        done = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"not JSON: {e}"
    ok = (isinstance(done, dict) and isinstance(done.get("identity"), dict)
          and isinstance(done.get("seconds"), (int, float))
          and isinstance(done.get("pretrain_seconds"), (int, float, type(None)))
          and isinstance(done.get("accuracy"), list) and len(done["accuracy"]) > 0
          and all(isinstance(a, (int, float)) for a in done["accuracy"])
          and ("folds" not in done or (isinstance(done["folds"], list) and len(done["folds"]) == len(done["accuracy"])
                                       and all(isinstance(k, int) for k in done["folds"]))))
    return (done, "") if ok else (None, "not a cell's record of identity, seconds, accuracies and folds")


def _blank(v) -> bool:
    """Nothing to show: not published, or no spread for one run."""
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def _num(v, digits: int = 4) -> str:
    return "" if _blank(v) else f"{v:.{digits}f}"


def _mean_std(row: dict) -> str:
    """"mean +- std", or the mean alone for one run (it has no spread to show)."""
    if row.get("diverged"):
        return "diverged"
    std = row["accuracy_std"]
    return f"{row['accuracy_mean']:.4f}" + (f" +- {std:.4f}" if math.isfinite(std) else "")


def write_table(out: Path, rows: list[dict], grid: Grid, wall_seconds: float, device: str, feature_set: str) -> None:
    """table.csv (full precision; blank where the original published nothing) and table.md."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if _blank(row.get(k)) else row[k] for k in CSV_COLUMNS})
    write_text(out / "table.csv", buf.getvalue())

    folds = ", ".join(map(str, grid.folds)) if grid.folds is not None else "0-4"
    lines = ["# Kim 2021's table, reproduced by agepipe", "",
             f"Test accuracy on the held-out fold, over test folds {folds} x {grid.seeds} seed(s) per cell "
             f"({grid.epochs or 30} epochs at most); feature set `{feature_set}`, device {device}.",
             "std: over the runs (np.std, as the original reports it). 95% CI: Student t interval of the mean "
             "over the test folds' means (a fold's seeds score the same photos, so the folds are the independent "
             "draws), over the seeds where one fold was tested (how training varies, not the photos), clipped "
             "to [0, 1]; none for one run.",
             f"original: the published mean +- std over 5 folds x 5 seeds ({PUBLISHED_SOURCE}).", ""]
    for task in grid.tasks:
        lines += [f"## {task}", "",
                  "| variant | init | accuracy | 95% CI | original | runs | lr | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in rows if r["task"] == task):
            original = (f"{_num(r['published_mean'])} +- {_num(r['published_std'])}"
                        if r["published_mean"] is not None else "")
            ci = (f"[{_num(r['ci95_low'])}, {_num(r['ci95_high'])}]" + (" (seeds)" if r["ci95_over"] == "seeds" else "")
                  if math.isfinite(r["ci95_low"]) else "")
            seconds = _num(r["seconds"], 1) + (f" (pre-training {_num(r['pretrain_seconds'], 1)})"
                                               if r["pretrain_seconds"] is not None else "")
            lines.append(f"| {r['variant']} | {r['init']} | {_mean_std(r)} "
                         f"| {ci} | {original} | {r['runs']} | {r['lr']:g} | {seconds} |")
        lines.append("")
    if failed := [r for r in rows if r.get("diverged")]:
        lines += ["Cells whose training diverged (no runs; a rerun trains them again): "
                  + "; ".join(f"{r['task']} {r['init']} {r['variant']}: {r['diverged']}" for r in failed), ""]
    lines += ["Variants: " + "; ".join(f"{v}: {VARIANT_HELP[v]}" for v in grid.variants) + ".", "",
              f"Total wall time: {wall_seconds:.1f} s for this command; the cells took "
              f"{sum(r['seconds'] for r in rows):.1f} s when trained (a reused cell keeps the time of the run "
              "that trained it).", ""]
    write_text(out / "table.md", "\n".join(lines))

