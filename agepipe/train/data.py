"""From the feature store to labelled tensors and subject-disjoint splits.

Everything is vectorised: the embeddings become one (n, EMBEDDING_DIM) tensor (on the GPU when
training there) and a split is three index arrays into it, so the training loop never
touches a Python object per sample.

Splits: the test set is one fold (Adience's official folds, which are disjoint by
subject; IMDB-WIKI's folds are a hash of the subject). Validation is carved from the
training folds by subject too: subjects in a fixed hash order until about
``val_fraction`` of the training rows are taken. A random row split would put photos
of one person on both sides, which is how the original scored 0.92-0.98 on validation
against 0.60 on test.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from agepipe.datasets.manifest import AGE_CLASSES, CLASS_MIDPOINTS, age_bin
from agepipe.features import store as fstore
from agepipe.hashing import file_sha256

TASKS = ("age", "age101", "gender")
NUM_CLASSES = {"age": 8, "age101": 101, "gender": 2}

# Adience's 8 ranges and the midpoints the original used as each class's age: the manifest's.
AGE_BINS = AGE_CLASSES
AGE_BIN_MIDPOINTS = CLASS_MIDPOINTS.astype(np.float32)
GENDERS = ("female", "male")

VAL_FRACTION = 0.1
# A validation split of fewer rows gives a loss too noisy to pick the best epoch by (training warns)
# or to fit a temperature to (calibrate.py fits none).
MIN_VAL_ROWS = 50


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def class_names(task: str) -> list[str]:
    if task == "age":
        return list(AGE_BINS)
    if task == "age101":
        return [str(k) for k in range(101)]
    return list(GENDERS)


def class_ages(task: str) -> np.ndarray | None:
    """The age in years each class stands for (None for gender)."""
    if task == "age":
        return AGE_BIN_MIDPOINTS
    if task == "age101":
        return np.arange(101, dtype=np.float32)
    return None


def labels(task: str, rows: pd.DataFrame) -> np.ndarray:
    """int64 class per row, -1 where the label is unknown."""
    check_task(task)
    if task == "gender":
        g = rows["gender"].to_numpy(dtype=np.float64, na_value=-1)
        return np.where((g == 0) | (g == 1), g, -1).astype(np.int64)
    age = rows["age"].to_numpy(dtype=np.float64, na_value=np.nan)
    if task == "age101":  # half a year up, every time: Adience's midpoints 17.5 and 28.5 (np.rint: 18, 28)
        return np.where(np.isfinite(age), np.clip(np.floor(np.nan_to_num(age) + 0.5), 0, 100), -1).astype(np.int64)
    bins = rows["age_bin"].to_numpy(dtype=np.float64, na_value=-1)
    # Rows without a class (a store written before age_bin was filled) get the manifest's class of
    # their age: one mapping, with the original's tie rule, wherever an age becomes a class.
    out = np.where((bins >= 0) & (bins < 8), bins, age_bin(age))
    return out.astype(np.int64)


def true_ages(task: str, rows: pd.DataFrame, y: np.ndarray) -> np.ndarray | None:
    """Age in years per row for the MAE: the row's age, else its class's age."""
    ages = class_ages(task)
    if ages is None:
        return None
    age = rows["age"].to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(age), age, ages[np.clip(y, 0, len(ages) - 1)]).astype(np.float32)


@dataclass
class TaskData:
    """Rows with a known label for one task, as tensors on one device."""
    task: str
    x: torch.Tensor          # (n, EMBEDDING_DIM) float32
    y: torch.Tensor          # (n,) int64
    rows: pd.DataFrame       # the same n rows, index 0..n-1
    dropped: dict[str, int]  # rows left out and why
    warnings: list[str] = field(default_factory=list)  # what the runs must say about these rows
    digest: str | None = field(default=None, init=False, repr=False, compare=False)  # content_digest's, once computed

    @property
    def left_out(self) -> dict[str, int]:
        """The reasons that did leave rows out, with their counts: what a run's reports record."""
        return {k: v for k, v in self.dropped.items() if v}


def content_digest(data: TaskData) -> str:
    """Which rows ``data`` holds, however the store's shards cut them and wherever the store lives:
    a sha256 of every column, the labels and the embeddings, the rows in (dataset, image_id) order
    (image_id is unique in its dataset's manifest). Equal digests: the same rows, labelled the same.
    50,000 rows: 0.1 s, mostly hashing their 100 MB of embeddings (loading them took 0.06 s; 2-core
    machine, 2026-12-07). Computed once per TaskData: a table's cells and every run of a
    cross-validation record it."""
    if data.digest is None:
        data.digest = _digest_rows(data)
    return data.digest


def _digest_rows(data: TaskData) -> str:
    order = data.rows.sort_values(["dataset", "image_id"], kind="stable").index.to_numpy()
    h = hashlib.sha256()
    for name in sorted(data.rows.columns):
        values = data.rows[name].to_numpy()[order]
        if values.dtype == object:  # a null string is None under pandas 2, NaN under 3: one spelling
            values = np.where(pd.isna(values), None, values)
        h.update(f"{name} {values.dtype}\n".encode())
        # Strings (and their nulls) as JSON, which no id can fool; numbers as their bytes.
        h.update(json.dumps(values.tolist()).encode() if values.dtype == object else values.data)
    h.update(data.y.cpu().numpy()[order].data)
    x = data.x.cpu().numpy()
    for start in range(0, len(order), 8192):  # a chunk at a time: no second copy of the matrix
        h.update(x[order[start:start + 8192]].data)
    return h.hexdigest()[:16]


def resolve_feature_set(store: str, feature_set: str | None) -> str:
    """The given feature set, or the store's only one."""
    found = fstore.list_feature_sets(store)
    if feature_set:
        if feature_set not in found:
            raise FileNotFoundError(f"feature set {feature_set!r} not in {store} "
                                    f"(found: {', '.join(found) or 'none'})")
        return feature_set
    if not found:
        raise FileNotFoundError(f"no feature sets in {store}: run `agepipe extract --dataset NAME` first, or "
                                "point --store (env AGEPIPE_STORE) at the store an extract wrote")
    if len(found) != 1:
        raise ValueError(f"{store} holds {len(found)} feature sets ({', '.join(found)}); "
                         "name one with --feature-set")
    return found[0]


def check_datasets_held(store: str, feature_set: str, datasets: list[str]) -> None:
    """A dataset the feature set has no folder for: a sentence that tells a typo (a name agepipe
    does not know) from a dataset not extracted yet."""
    from agepipe.datasets import REGISTRY, choices

    held = fstore.list_datasets(store, feature_set)
    if not held:
        resolve_feature_set(store, feature_set)  # a feature set the store lacks is named as that
    for name in datasets:
        if name in held:
            continue
        what = (f"run `agepipe extract --dataset {name}` first" if name in REGISTRY
                else f"{name!r} is no dataset agepipe knows ({', '.join(choices())})")
        raise FileNotFoundError(f"feature set {feature_set} in {store} holds no dataset {name!r} "
                                f"(it holds: {', '.join(held) or 'none'}); {what}")


def load_task_data(store: str, feature_set: str, datasets: list[str], task: str,
                   min_det_score: float = 0.0, device: str | torch.device = "cpu") -> TaskData:
    """Rows with status "ok", a known label, a finite embedding and det_score >= min_det_score."""
    check_task(task)
    check_datasets_held(store, feature_set, datasets)
    feats = fstore.load_features(store, feature_set, datasets, min_det_score=min_det_score)
    y = labels(task, feats.rows)
    # One NaN row would turn every weight NaN in its first step, and the run would end in a
    # crash deep in scoring. The sum is finite exactly when every value is (they are unit-norm).
    finite = np.isfinite(feats.embeddings.sum(1))
    known = (y >= 0) & finite
    if not known.any():  # else "the training split has 0 rows", with no word of why
        above = f", det_score >= {min_det_score:g} (--min-det-score)" if min_det_score > 0 else ""
        raise ValueError(f"{', '.join(datasets)} in {feature_set}: no row has status \"ok\"{above}, a {task} label "
                         "and a finite embedding; nothing to train or score")
    rows = feats.rows.loc[known].reset_index(drop=True)
    x = torch.from_numpy(feats.embeddings if known.all() else feats.embeddings[known])
    # every row of the datasets read that is not trained or scored on, by why (DESIGN: none silently)
    dropped = {**feats.left_out, "unknown_label": int((y < 0).sum())}
    said = stale_labels(store, feature_set, datasets)
    bad = (y >= 0) & ~finite
    if bad.any():
        dropped["nonfinite_embedding"] = int(bad.sum())
        said.append(nonfinite_warning(feats.rows.loc[bad]))
    if unfolded := int(rows["fold"].isna().sum()):  # agepipe's manifests give every row a fold 0-4
        first = rows.loc[rows["fold"].isna()].iloc[0]
        said.append(f"{unfolded} row(s) have no fold (the first: {first['image_id']}): "
                    "they are never in a test fold, and every cross-validation run trains on them")
    return TaskData(task, x.to(device), torch.from_numpy(y[known]).to(device), rows, dropped, said)


def nonfinite_warning(rows: pd.DataFrame) -> str:
    first = rows.iloc[0]
    return (f"{len(rows)} row(s) with status \"ok\" hold an embedding with NaN or infinite values (first: "
            f"{first['dataset']} {first['image_id']}); they are left out of training and scoring. The store "
            "is damaged there, or the recogniser overflowed on those photos")


def stale_labels(store: str, feature_set: str, datasets: list[str]) -> list[str]:
    """A sentence for each dataset whose manifest file has changed since extract cut the store's
    shards from it: the store's labels (subjects, folds, ages, genders) may no longer be the
    manifest's. Checked where that file is still there (not on another machine)."""
    out = []
    for dataset in datasets:
        index = fstore.read_index(store, feature_set, dataset)
        if not (index and index.manifest):
            continue
        try:
            changed = file_sha256(index.manifest) != index.manifest_sha256
        except OSError:  # gone, or unreadable here: nothing to compare with
            continue
        if changed:
            # The cut's own shard size: under another (extract's default) every shard is cut anew, photos read again.
            cut = f" --shard-rows {index.shards[0].rows}" if index.shards else ""
            out.append(f"{dataset}: its manifest ({index.manifest}) has changed since the store's shards were cut "
                       "from it, so the labels trained on (subjects, folds, ages, genders) may not be the "
                       f"manifest's; `agepipe extract --dataset {dataset}{cut}` brings the store up to date (shards "
                       "whose labels alone changed are rewritten without reading a photo)")
    return out


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# How make_split keys subjects, recorded in each run's data record. Runs recorded without it
# were split with the subjects keyed per dataset; `evaluate` rebuilds their split that way.
SUBJECTS_ACROSS_DATASETS = "across datasets"


def subject_keys(rows: pd.DataFrame, per_dataset: bool = False) -> np.ndarray:
    """A stable 64-bit hash per row's subject (the image itself when the subject is unknown).
    Not per dataset: one person's IMDB and Wikipedia photos share a subject_id (their name) and
    must stay on one side of the split; ids of different datasets that happen to be equal only
    make the split coarser. ``per_dataset``: the keys of runs trained before 2026-11-28."""
    subjects = rows["subject_id"].astype(object).where(rows["subject_id"].notna(), rows["image_id"]).astype(str)
    if per_dataset:
        subjects = rows["dataset"].astype(str) + "/" + subjects
    return pd.util.hash_array(subjects.to_numpy(dtype=object))


def make_split(rows: pd.DataFrame, test_fold: int | None, val_fraction: float = VAL_FRACTION,
               subjects_per_dataset: bool = False) -> Split:
    """Test: rows of ``test_fold`` (none when None). Validation: whole subjects of the other
    folds, in hash order, until ``val_fraction`` of their rows. Train: the rest."""
    n = len(rows)
    fold = rows["fold"].to_numpy(dtype=np.float64, na_value=-1)
    is_test = fold == test_fold if test_fold is not None else np.zeros(n, dtype=bool)
    rest = np.flatnonzero(~is_test)
    keys = subject_keys(rows.iloc[rest], subjects_per_dataset)
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    # np.unique sorts the hashes: a fixed, label-blind order of subjects.
    taken = np.zeros(len(uniq), dtype=bool)
    if val_fraction > 0 and len(uniq) > 1:
        taken = np.cumsum(counts) <= val_fraction * len(rest)
        taken[0] = True
    is_val = taken[inverse]
    return Split(train=rest[~is_val], val=rest[is_val], test=np.flatnonzero(is_test))
