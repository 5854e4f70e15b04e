"""Fitting the MLP on in-memory tensors: AdamW, exponential LR decay, early stopping; and
the runs built on it (one split, or cross-validation over the five folds).

A batch is a slice of a seeded ``torch.randperm`` used to index the embedding tensor, so an
epoch is a few hundred tensor ops rather than a Python call per sample. Losses and
accuracies accumulate on the device and are read once per epoch; on a GPU the whole step is
one CUDA graph replay.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion
from tqdm import tqdm

import agepipe
from agepipe.atomic import FolderError
from agepipe.datasets import GROUPS, expand_groups
from agepipe.features import store as fstore
from agepipe.train import graphs
from agepipe.train.batched import StackedResMLP, fit_stacked
from agepipe.train.calibrate import calibrate_run
from agepipe.train.checkpoint import (CONFIG, CheckpointError, init_from, is_run_folder, model_config_from,
                                      read_config, save_checkpoint, write_json)
from agepipe.train.data import (MIN_VAL_ROWS, NUM_CLASSES, SUBJECTS_ACROSS_DATASETS, VAL_FRACTION, Split, TaskData,
                                check_task, content_digest, load_task_data, make_split, resolve_feature_set)
from agepipe.train.evaluate import logits_of, score_splits
from agepipe.train.model import ModelConfig, ResMLP, autocast, paper_config, precision, resolve_device
from agepipe.train.report import PLOTS, write_cv_table, write_report


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    weight_decay: float
    gamma: float  # the learning rate is multiplied by gamma after every epoch
    batch_size: int
    epochs: int = 30
    patience: int = 5  # epochs without a lower validation loss before stopping
    seed: int = 0
    amp: bool = True  # bfloat16 autocast where the device has it natively (model.precision)
    balance: bool = False  # class-balanced loss: see class_weights
    calibrate: bool = True  # temperature scaling on the validation split after training (calibrate.py)

    def __post_init__(self):
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 < self.lr < math.inf or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        # patience 0 would stop a run in the epoch it improved (and fit and fit_stacked disagree there)
        if self.batch_size < 2 or self.epochs < 1 or self.patience < 1:
            raise ValueError(f"batch_size must be >= 2, epochs and patience >= 1; got {self.batch_size}, "
                             f"{self.epochs} and {self.patience}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The hyper-parameters Kim 2021 chose by search (tae898/age-gender).
PAPER_TRAIN = {
    "age": TrainConfig(lr=0.0011670, weight_decay=0.00012337, gamma=0.39479, batch_size=128),
    "age101": TrainConfig(lr=0.0011670, weight_decay=0.00012337, gamma=0.39479, batch_size=128),
    "gender": TrainConfig(lr=0.024398, weight_decay=0.0047354, gamma=0.066204, batch_size=512),
}


class TrainingWarning(UserWarning):
    """A run that will finish but whose result is doubtful (see training_warnings)."""


def seed_everything(seed: int) -> None:
    """Weights and dropout masks come from torch's global generators."""
    torch.manual_seed(seed)


def class_weights(y_train: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights from the training split: class c weighs n / (k * n_c), k the
    number of classes present, so each present class carries the same total weight and a
    weighted mean over the training rows stays 1 (the learning rate keeps its meaning).
    Classes absent from the split get 0."""
    counts = torch.bincount(y_train, minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes, device=y_train.device)
    weights[present] = len(y_train) / (int(present.sum()) * counts[present])
    return weights


# Below these an epoch cannot follow the schedule (and data.MIN_VAL_ROWS: the validation loss cannot pick one).
MIN_STEPS_PER_EPOCH = 10
MIN_USEFUL_STEPS = 100


def training_warnings(n_train: int, n_val: int, cfg: TrainConfig) -> list[str]:
    """What makes a run's result doubtful before it starts: too few optimizer steps per epoch
    for a schedule that decays fast (steps are counted while the rate is within 100x of its
    start), and a validation split too small to early-stop on."""
    out = []
    batch = min(cfg.batch_size, n_train)
    steps = n_train // batch if batch else 0
    decay_epochs = math.inf if cfg.gamma >= 1 else 1 + math.floor(math.log(0.01) / math.log(cfg.gamma))
    live_epochs = min(cfg.epochs, decay_epochs)
    if steps < MIN_STEPS_PER_EPOCH and steps * live_epochs < MIN_USEFUL_STEPS:
        decay = cfg.gamma ** (cfg.epochs - 1)
        smaller = max(2, n_train // MIN_STEPS_PER_EPOCH)
        # Where the epochs end before the decay does, a gamma closer to 1 adds no step.
        other = ("a gamma closer to 1", "--gamma", "--set gamma=G") if decay_epochs <= cfg.epochs else \
            ("more epochs", "--epochs", "--epochs")
        out.append(f"an epoch is {steps} optimizer step(s) ({n_train} training rows, batch {cfg.batch_size}) "
                   f"and the learning rate falls {1 / decay:.3g}x over {cfg.epochs} epochs (gamma {cfg.gamma:g}): "
                   f"only {steps * live_epochs} steps at a rate within 100x of the first; the model will barely "
                   f"train. Use a smaller batch size (<= {smaller} gives {MIN_STEPS_PER_EPOCH} steps an epoch) or "
                   f"{other[0]}: train's --batch-size {smaller} or {other[1]}, table's --set "
                   f"batch_size={smaller} or {other[2]}.")
    if n_val == 0:
        out.append("the validation split is empty: no early stopping, the last epoch's weights are kept.")
    elif n_val < MIN_VAL_ROWS:
        out.append(f"the validation split has {n_val} rows (< {MIN_VAL_ROWS}): its loss is too noisy to pick the "
                   "best epoch or to stop early on; the chosen epoch is close to arbitrary.")
    return out


def weightless_validation(data: TaskData, split: Split, cfg: TrainConfig) -> list[str]:
    """Under --balance, a validation split whose rows are all of classes the training split lacks
    weighs nothing: it has no loss to pick an epoch by, and fit takes it as empty."""
    if not cfg.balance or len(split.val) == 0:
        return []
    device = data.y.device
    weight = class_weights(data.y[torch.from_numpy(split.train).to(device)], NUM_CLASSES[data.task])
    if has_validation(data.y[torch.from_numpy(split.val).to(device)], weight):
        return []
    return [f"the validation split's {len(split.val)} rows are all of classes the training split lacks, which "
            "--balance weighs 0: there is no validation loss, so no early stopping; the last epoch's weights are "
            "kept."]


def empty_test(split: Split, record: dict) -> list[str]:
    """A test fold with no row to score (a dataset without that fold, or --min-det-score above all its
    faces): every test metric is NaN, which the run's output would otherwise show with no word of why."""
    if record["test_fold"] is None or len(split.test):
        return []
    return [f"the test split is empty: fold {record['test_fold']} of {', '.join(record['datasets'])} has no row with "
            "status \"ok\", a label and a finite embedding" + (f" (det_score >= {record['min_det_score']:g})"
                                                               if record["min_det_score"] > 0 else "")
            + ", so every test metric is NaN. Choose another --test-fold"]


def has_validation(val_y: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether the validation split can pick an epoch: it has rows, and under --balance rows of a
    class the training split holds (the others weigh 0, and a loss over no weight is 0/0 = NaN)."""
    return len(val_y) > 0 and (weight is None or bool(weight[val_y].sum() > 0))


def _val_scores(model, x, y, amp, weight: torch.Tensor | None = None) -> tuple[float, float]:
    if len(y) == 0:
        return math.nan, math.nan
    logits = logits_of(model, x, amp)
    loss = F.cross_entropy(logits, y, weight=weight).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


class TrainStep:
    """One AdamW step on the rows ``idx`` of (x, y). The epoch's summed loss and hits stay on
    the device until ``take``, so a GPU never waits on the host between steps."""

    def __init__(self, model: ResMLP, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 amp: bool, weight: torch.Tensor | None = None):
        self.model, self.optimizer, self.x, self.y, self.amp = model, optimizer, x, y, amp
        self.weight = weight
        self.loss_sum = torch.zeros((), device=x.device)
        self.correct = torch.zeros((), dtype=torch.long, device=x.device)

    def run(self, idx: torch.Tensor) -> None:
        xb, yb = self.x[idx], self.y[idx]
        with autocast(self.x.device, self.amp):
            logits = self.model(xb)
        loss = F.cross_entropy(logits.float(), yb, weight=self.weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(idx)
        self.correct += (logits.detach().argmax(1) == yb).sum()

    def __call__(self, idx: torch.Tensor) -> None:
        self.run(idx)

    def take(self) -> tuple[float, int]:
        """The sums since the last call, and zero them."""
        out = self.loss_sum.item(), int(self.correct.item())
        self.loss_sum.zero_()
        self.correct.zero_()
        return out


class GraphedTrainStep(graphs.Replayed, TrainStep):
    """The same step captured once as a CUDA graph and replayed. A model this small keeps a
    GPU busy for microseconds per kernel, so eager training is bound by launching ~100
    kernels from Python per step; a replay is one launch. The batch is gathered inside the
    graph from a fixed index buffer, and the learning rate is a device tensor the scheduler
    updates in place, so every replay sees the current epoch's rate."""

    def __init__(self, model, optimizer, x, y, amp, first_batch: torch.Tensor, weight: torch.Tensor | None = None):
        super().__init__(model, optimizer, x, y, amp, weight)
        self.idx = first_batch.clone()
        self._capture()


def make_optimizer(model: ResMLP, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as one fused kernel: on CPU the default per-tensor update costs as much as the
    forward pass of this model. The rate is a tensor so a captured step reads its current value."""
    lr = torch.tensor(cfg.lr, device=device)
    if device.type == "cuda":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True,
                                 capturable=True)
    if TorchVersion(torch.__version__) >= (2, 4):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model: ResMLP, x: torch.Tensor, y: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor,
        cfg: TrainConfig, progress: bool = False) -> dict:
    """Train in place; restore the weights of the epoch with the lowest validation loss.
    ``x``/``y`` hold every row on the model's device; the index tensors select the splits.
    Each epoch is a fresh permutation cut into full batches (the few rows left over sit that
    epoch out), so every step has the same shape. With ``cfg.balance`` the training and the
    validation loss weigh each class by ``class_weights`` of the training split. Returns the
    history, one dict per epoch."""
    device = x.device
    n = len(train_idx)
    if n < 2:
        raise ValueError(f"the training split has {n} rows; nothing to fit")
    batch = min(cfg.batch_size, n)
    steps = n // batch
    val_x, val_y = x[val_idx.to(device)], y[val_idx.to(device)]
    weight = class_weights(y[train_idx.to(device)], model.config.num_classes) if cfg.balance else None
    validates = has_validation(val_y, weight)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)
    # Batch order has its own generator so it does not depend on how many dropout masks came before.
    order = torch.Generator().manual_seed(cfg.seed)
    model.train()
    if device.type == "cuda":
        step = GraphedTrainStep(model, optimizer, x, y, cfg.amp, train_idx[:batch].to(device), weight)
    else:
        step = TrainStep(model, optimizer, x, y, cfg.amp, weight)
    history, best, best_epoch, best_loss, waited = [], None, None, math.inf, 0
    epochs = tqdm(range(1, cfg.epochs + 1), desc="epochs", unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        start = time.perf_counter()
        model.train()
        perm = train_idx[torch.randperm(n, generator=order)].to(device)
        for b in range(steps):
            step(perm[b * batch:(b + 1) * batch])
        loss_sum, correct = step.take()
        lr = float(optimizer.param_groups[0]["lr"])
        scheduler.step()
        val_loss, val_acc = _val_scores(model, val_x, val_y, cfg.amp, weight)
        history.append({"epoch": epoch, "lr": lr, "train_loss": loss_sum / (steps * batch),
                        "train_accuracy": correct / (steps * batch), "val_loss": val_loss,
                        "val_accuracy": val_acc, "seconds": time.perf_counter() - start})
        epochs.set_postfix(train_loss=f"{history[-1]['train_loss']:.4f}", val_loss=f"{val_loss:.4f}")
        if not validates:
            continue  # no validation loss: train all epochs, keep the last weights
        if val_loss < best_loss:  # a NaN loss never is: it counts toward patience
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    return {"history": history, "best_epoch": best_epoch if best is not None else len(history),
            "stopped_early": len(history) < cfg.epochs}


# --- runs: one split, or the five folds -------------------------------------------------

def run_config(task: str, train_cfg: TrainConfig, data_record: dict, init: str | None,
               device: torch.device) -> dict:
    return {"task": task, "train": train_cfg.to_dict(), "precision": precision(device, train_cfg.amp),
            "data": data_record,
            "init": str(init) if init else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"agepipe": agepipe.__version__, "torch": torch.__version__}}


def train_run(data: TaskData, split: Split, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path,
              data_record: dict, init: str | None = None, mc_samples: int = 32, report: bool = True,
              progress: bool = False, before_saving: Callable[[], None] | None = None) -> dict:
    """Fit one model on ``split``, save the run folder (checkpoint, history, metrics and,
    when ``report``, report.md with plots) and return its metrics. ``before_saving``: called
    once the model is fitted, before the folder is written."""
    model, fresh = initial_model(model_cfg, train_cfg.seed, init, data.x.device)
    warned = warn_before(data, split, train_cfg, init, data_record)
    index = {k: torch.from_numpy(v) for k, v in vars(split).items()}
    start = time.perf_counter()
    result = fit(model, data.x, data.y, index["train"], index["val"], train_cfg, progress)
    seconds = time.perf_counter() - start
    if before_saving:
        before_saving()
    return save_run(data, split, model, train_cfg, out, data_record, init, fresh, result, seconds, warned,
                    mc_samples, report)


def initial_model(model_cfg: ModelConfig, seed: int, init: str | None, device) -> tuple[ResMLP, list[str]]:
    """The run's starting weights (from its seed, or the init run) and the tensors init did not give."""
    seed_everything(seed)
    model = ResMLP(model_cfg)
    fresh = init_from(model, init) if init else []
    return model.to(device), fresh


def warn_before(data: TaskData, split: Split, train_cfg: TrainConfig, init: str | None,
                record: dict) -> list[str]:
    warned = (data.warnings + init_leak(init, record) + training_warnings(len(split.train), len(split.val), train_cfg)
              + weightless_validation(data, split, train_cfg) + empty_test(split, record))
    for message in warned:
        warnings.warn(message, TrainingWarning, stacklevel=3)
    return warned


def save_run(data: TaskData, split: Split, model: ResMLP, train_cfg: TrainConfig, out: str | Path,
             data_record: dict, init: str | None, fresh: list[str], result: dict, seconds: float,
             warned: list[str], mc_samples: int, report: bool) -> dict:
    """The run folder of a fitted model: checkpoint, history, metrics (and report); returns the metrics."""
    out = Path(out)
    check_finite(model, out, result)
    # A run folder trained again loses the last run's results first: a crash while this one is
    # scored, or a cross-validation (its reports are written later, only where missing), must not
    # show them beside the new model.
    for name in ("history.json", "metrics.json", "predictions.parquet", "report.md", *PLOTS):
        (out / name).unlink(missing_ok=True)
    # "rows": what the run trained and was scored on, so evaluate can tell when the store changed
    record = {**data_record, "split_sizes": split.sizes(), "dropped": data.dropped, "rows": content_digest(data)}
    config = run_config(data.task, train_cfg, record, init, data.x.device)
    config["warnings"] = warned
    if init:
        config["init_fresh"] = fresh  # tensors not taken from the init run (a head for other classes)
    val = torch.from_numpy(split.val).to(data.x.device)
    calibration = (calibrate_run(model, data.x[val], data.y[val], mc_samples, train_cfg.amp) if train_cfg.calibrate
                   else {"temperature": 1.0, "skipped": "calibration turned off (--no-calibrate)"})
    config["temperature"] = calibration["temperature"]  # what evaluate and predict divide the logits by
    if "deterministic" in calibration:  # checkpoint.temperature_for: an MC run's deterministic softmax has its own
        config["deterministic_temperature"] = calibration["deterministic"]["temperature"]
    save_checkpoint(out, model, config)
    write_json(out / "history.json", result)
    metrics = {"task": data.task, "best_epoch": result["best_epoch"], "epochs_run": len(result["history"]),
               "train_seconds": seconds, "train_warnings": warned, "split_sizes": split.sizes(),
               "left_out": data.left_out, "calibration": calibration}
    metrics.update(score_splits(model, data, split, mc_samples, train_cfg.amp, out, config))
    write_json(out / "metrics.json", metrics)
    if report:
        write_report(out)
    return metrics


class Diverged(ValueError):
    """A run whose weights went NaN or infinite: its settings' failure (a learning rate too high),
    which `agepipe table` records for that cell and goes on from."""


def check_finite(model: ResMLP, out: Path, result: dict) -> None:
    """Refuse a model whose weights went NaN or infinite (training diverged, with no earlier epoch's
    weights to fall back on): saved, it would crash scoring and `evaluate` would refuse it."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        losses = [h["train_loss"] for h in result["history"]]
        raise Diverged(f"{out}: training diverged: after {len(losses)} epoch(s) (train loss {losses}) the "
                       f"weights hold NaN or infinite values ({bad[0]}"
                       + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") +
                       "); nothing was saved. Train with a lower learning rate")


def train_runs_batched(data: TaskData, jobs: list[tuple[Split, int]], model_cfg: ModelConfig,
                       train_cfg: TrainConfig, outs: list[Path], records: list[dict], init: str | None = None,
                       mc_samples: int = 32, cuda_graphs: bool = False,
                       before_saving: Callable[[], None] | None = None) -> list[dict]:
    """The runs ``jobs`` (split, seed) as one stacked model (batched.py); each saved as train_run saves it
    (``before_saving`` called once, after the fit)."""
    device = data.x.device
    starts = [initial_model(model_cfg, seed, init, device) for _, seed in jobs]
    warned = [warn_before(data, split, train_cfg, init, rec) for (split, _), rec in zip(jobs, records)]
    stacked = StackedResMLP([m for m, _ in starts]).to(device)
    train_idx = [torch.from_numpy(split.train) for split, _ in jobs]
    weight = (torch.stack([class_weights(data.y[i.to(device)], model_cfg.num_classes) for i in train_idx])
              if train_cfg.balance else None)
    seed_everything(jobs[0][1])  # dropout masks
    start = time.perf_counter()
    results = fit_stacked(stacked, data.x, data.y, train_idx, [torch.from_numpy(s.val) for s, _ in jobs],
                          train_cfg, [seed for _, seed in jobs], weight, cuda_graphs)
    seconds = (time.perf_counter() - start) / len(jobs)  # each run's share of the wall time
    if before_saving:
        before_saving()
    metrics = []
    for r, ((split, seed), result) in enumerate(zip(jobs, results)):
        model = ResMLP.from_state(model_cfg, result.pop("state")).to(device).eval()
        metrics.append(save_run(data, split, model, dataclasses.replace(train_cfg, seed=seed), outs[r], records[r],
                                init, starts[r][1], result, seconds, warned[r], mc_samples, report=False))
    return metrics


def data_record(store: str, feature_set: str, datasets: list[str], test_fold: int | None,
                min_det_score: float, val_fraction: float = VAL_FRACTION) -> dict:
    """Enough to rebuild the same rows and split later (`agepipe evaluate`)."""
    if "://" not in str(store):  # a local folder: absolute, so evaluate works from any directory
        store = os.path.abspath(os.path.expanduser(store))
    return {"store": str(store), "feature_set": feature_set, "datasets": list(datasets),
            "test_fold": test_fold, "val_fraction": val_fraction, "subjects": SUBJECTS_ACROSS_DATASETS,
            "min_det_score": min_det_score, "features": feature_models(store, feature_set)}


FEATURE_KEYS = ("pack", "det_size", "detector_sha256", "recognizer_sha256")


def feature_models(store: str, feature_set: str) -> dict:
    """The face models behind the embeddings, so `agepipe predict` can use (and check) the same ones."""
    info = fstore.read_feature_set_info(store, feature_set)
    return {k: info[k] for k in FEATURE_KEYS if k in info}


def model_config_for(task: str, init: str | None = None, **overrides) -> ModelConfig:
    """The paper's preset, or the init run's architecture with this task's classes; then overrides."""
    classes = NUM_CLASSES[task]
    if init:
        base = model_config_from(read_config(init)["model"], Path(init) / "config.json")
        base = dataclasses.replace(base, num_classes=classes)
    else:
        base = paper_config(task, classes)
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def train_config_for(task: str, **overrides) -> TrainConfig:
    return dataclasses.replace(PAPER_TRAIN[task], **{k: v for k, v in overrides.items() if v is not None})


def summarise(values: list[float]) -> dict:
    """cv.json's mean and std over the runs that have a value, and their count ("runs") where some
    have none: a run without validation rows has no val_accuracy, and one NaN made the whole
    cross-validation's "nan +- nan"."""
    v = np.asarray(values, dtype=np.float64)
    have = v[np.isfinite(v)]
    out = {"mean": float(have.mean()) if len(have) else math.nan, "std": float(have.std()) if len(have) else math.nan}
    if len(have) < len(v):
        out["runs"] = len(have)
    return out


def check_folds(data: TaskData) -> list[int]:
    """Folds 0-4, which a cross-validation needs its rows to hold; a ValueError naming those they hold."""
    present = sorted(int(f) for f in data.rows["fold"].dropna().unique())
    if present != list(range(5)):
        raise ValueError(f"cross-validation needs rows in folds 0-4; these rows have folds {present}")
    return present


def cross_validate(data: TaskData, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path,
                   record: dict, seeds: int = 1, init: str | None = None, mc_samples: int = 32,
                   progress: bool = True, echo=None, batched: bool = True, folds: list[int] | None = None,
                   cuda_graphs: bool = False) -> dict:
    """Every fold (or only ``folds``) as the test set, for seeds 0..seeds-1: runs in
    OUT/fold{k}-seed{s}/, then cv.json and cv.md with mean +- std over all runs (the paper's table).
    Run folders of an earlier cross-validation in OUT that this one did not train again (other
    seeds or folds) are removed after, but for ``init``, and cv.json names them ("removed_runs").
    ``batched``: all runs trained at once as one stacked model (batched.py); else one after another.
    ``cuda_graphs``: the stack's step as one CUDA graph replay (fit_stacked)."""
    out = Path(out)
    present = check_folds(data)
    folds = present if folds is None else sorted(set(folds))
    jobs = [(k, s) for s in range(seeds) for k in folds]
    splits = {k: make_split(data.rows, k, record["val_fraction"]) for k in folds}
    outs = [out / f"fold{k}-seed{s}" for k, s in jobs]
    records = [{**record, "test_fold": k} for k, _ in jobs]
    # As save_run does for a run: a CV stopped while its runs are saved must not leave the earlier
    # CV's summary (cv.json, cv.md, the report `train --cv` draws) beside runs it no longer describes.
    # Removed once the first run is to be saved: a setup error (an --init of another architecture)
    # leaves the earlier CV whole.
    def forget_earlier() -> None:
        for name in ("cv.json", "cv.md", "report.md", *PLOTS):
            (out / name).unlink(missing_ok=True)

    if batched:
        all_metrics = train_runs_batched(data, [(splits[k], s) for k, s in jobs], model_cfg, train_cfg, outs,
                                         records, init, mc_samples, cuda_graphs, forget_earlier)
    else:
        all_metrics = [train_run(data, splits[k], model_cfg, dataclasses.replace(train_cfg, seed=s), o, rec, init,
                                 mc_samples, report=False, before_saving=forget_earlier)
                       for (k, s), o, rec in tqdm(list(zip(jobs, outs, records)), desc="cross-validation",
                                                  unit="run", disable=not progress)]
    runs, warned = [], set()
    for (k, s), metrics in zip(jobs, all_metrics):
        runs.append({"fold": k, "seed": s, "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
                     "train_seconds": metrics["train_seconds"], **summary_values(metrics)})
        warned.update(metrics["train_warnings"])
        if echo:  # a line per run, so a long CV says what each run gave
            echo(f"run {len(runs)}/{len(jobs)}: fold {k} seed {s}: test accuracy {metrics['test']['accuracy']:.4f}, "
                 f"balanced {metrics['test']['balanced_accuracy']:.4f} ({metrics['train_seconds']:.1f} s)")
    cv = {"task": data.task, "folds": folds, "seeds": seeds, "batched": batched, "runs": runs,
          "warnings": sorted(warned), "left_out": data.left_out,
          "summary": {key: summarise([r[key] for r in runs]) for key in runs[0] if key not in ("fold", "seed")}}
    kept = {o.name for o in outs}
    if init and out.resolve() in Path(init).resolve().parents:  # the run these started from, as their config says
        kept.add(Path(init).resolve().relative_to(out.resolve()).parts[0])  # or the earlier run holding it
    cv["removed_runs"] = earlier_runs(out, kept)
    # The new record is whole (written atomically) before an earlier run goes: a crash while they are
    # removed leaves this CV's cv.json, which names the folders it did not train, never a folder of
    # runs no cv.json accounts for. The next cross-validation here removes what is left of them.
    write_json(out / "cv.json", cv)
    write_cv_table(out / "cv.md", cv)
    left = []
    for name in cv["removed_runs"]:
        try:
            remove_run_folder(out / name)
        except OSError as e:  # a folder made read-only: the new runs are trained and recorded all the same
            left.append(f"{out / name}: an earlier run, not removed ({e.strerror or e}); remove it by hand")
    if left:
        for message in left:
            warnings.warn(message, TrainingWarning, stacklevel=2)
        cv["warnings"] = sorted(warned) + left
        write_json(out / "cv.json", cv)
    return cv


RUN_FOLDER = re.compile(r"fold(\d+)-seed(\d+)")


def earlier_runs(out: Path, runs: set[str]) -> list[str]:
    """The run folders fold<k>-seed<s> in ``out`` other than ``runs``: those of an earlier
    cross-validation with other seeds or folds, which beside this one's would pass for its runs.
    Only folders agepipe trained a run into; whatever else the user keeps there stays."""
    found = [p.name for p in out.iterdir()
             if RUN_FOLDER.fullmatch(p.name) and p.name not in runs and is_run_folder(p)]
    return sorted(found, key=lambda name: tuple(map(int, RUN_FOLDER.fullmatch(name).groups())))


def remove_run_folder(run: Path) -> None:
    """``run`` and all it holds, config.json last: a removal cut short leaves a folder that
    is_run_folder still knows, so the next cross-validation removes the rest."""
    for path in run.iterdir():
        if path.name == CONFIG:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    (run / CONFIG).unlink()
    run.rmdir()


CV_METRICS = ("accuracy", "one_off_accuracy", "mae_years", "cross_entropy", "ece")


def summary_values(metrics: dict) -> dict:
    """The numbers of one run that the cross-validation table aggregates."""
    test, mc = metrics["test"], metrics["test"].get("mc", {})
    out = {f"test_{k}": test[k] for k in CV_METRICS if k in test}
    out.update({f"test_mc_{k}": mc[k] for k in CV_METRICS if k in mc})
    out["val_accuracy"] = metrics["val"]["accuracy"]
    cal = metrics["calibration"]
    out["temperature"] = cal["temperature"]
    if cal.get("prediction", "").startswith("MC"):  # the deterministic softmax's own T (1 where none was fitted)
        out["deterministic_temperature"] = cal.get("deterministic", {}).get("temperature", 1.0)
    return out


def check_out(out: str | Path, cv: bool) -> None:
    """A single run and a cross-validation write report.md and the plots at the top of their
    folder: one into the other's wrote over its report, leaving config.json beside cv.json."""
    out = Path(out)
    if not cv and (out / "cv.json").is_file():
        raise FolderError(f"{out} holds a cross-validation (cv.json): a single run there would write over its "
                          "report; give `agepipe train` another --out, or add --cv to run it again")
    if cv and is_run_folder(out):
        raise FolderError(f"{out} holds a run (config.json): a cross-validation there would write over its "
                          "report; give `agepipe train --cv` another --out")


def check_init_kept(init: str | None, out: str | Path, cv: bool, seeds: int = 1) -> None:
    """Refuse an init run that this command writes over: a single run writes OUT; a cross-validation
    writes OUT/fold{k}-seed{s} for every fold and seed (`--cv --init OUT/fold0-seed0` trained fold 0
    seed 0 again, replacing the run all five started from). Runs elsewhere in a cross-validation's OUT
    are not written, and cross_validate keeps the one it starts from."""
    if not init:
        return
    start, out_at = Path(init).resolve(), Path(out).resolve()
    runs = [out_at / f"fold{k}-seed{s}" for s in range(seeds) for k in range(5)] if cv else [out_at]
    for folder in [out_at, *runs]:
        if start == folder or (folder in runs and folder in start.parents):
            holds = "" if start == folder else ", which holds it"
            raise FolderError(f"--init {init}: `agepipe train{' --cv' if cv else ''} --out {out}` writes {folder}"
                              f"{holds}, and the run it starts from must stay as it is. Give another --out, or copy "
                              "that run elsewhere and --init the copy")


def check_init_features(init: str, record: dict) -> None:
    """Refuse to start from a run trained on another recogniser's embeddings: its weights read
    another space, and fine-tuning from them would train on as if they did not."""
    data = read_config(init).get("data", {})
    theirs = data.get("features", {}).get("recognizer_sha256")
    mine = record["features"].get("recognizer_sha256")
    if theirs and mine and theirs != mine:
        raise CheckpointError(f"{init}: trained on embeddings of recogniser sha256 {theirs[:12]}... "
                              f"({data.get('feature_set')}); feature set "
                              f"{record['feature_set']} has {mine[:12]}...: --init needs a run of the same face models")


def init_leak(init: str | None, record: dict) -> list[str]:
    """A sentence when the init run trained on rows of this run's test fold (a dataset of both,
    or IMDB and WIKI, which share people and their folds: another test fold): the starting weights
    saw the rows, or the people, this run is scored on. One sentence for every run it concerns, so a
    cross-validation says it once."""
    if not init or record["test_fold"] is None:
        return []
    theirs = read_config(init).get("data", {})
    mine = {d for name in record["datasets"] for group in GROUPS.values() if name in group for d in group}
    mine.update(record["datasets"])
    shared = [d for d in expand_groups(theirs.get("datasets", [])) if d in mine]
    seen = [k for k in range(5) if k != theirs.get("test_fold")]  # its training and validation folds
    if not shared or record["test_fold"] not in seen:
        return []
    held = f"its test fold was {theirs['test_fold']}" if theirs.get("test_fold") is not None else "it held out no fold"
    return [f"--init {init} was trained on the {' and '.join(shared)} rows of folds {', '.join(map(str, seen))} "
            f"({held}): a run tested on one of them starts from weights that saw its test rows' people, so its test "
            "scores are inflated. Start from a run of the same test fold, or one trained on other datasets"]


def train(store: str, datasets: list[str], task: str, out: str | Path, *, feature_set: str | None = None,
          test_fold: int | None = 0, cv: bool = False, seeds: int = 1, init: str | None = None,
          device: str = "auto", min_det_score: float = 0.0, mc_samples: int = 32,
          model_overrides: dict | None = None, train_overrides: dict | None = None,
          report: bool = True, progress: bool = True, echo=None, batched: bool = True) -> dict:
    """`agepipe train`: the store's rows for ``task`` into memory once, then one run
    (test fold ``test_fold``) or, with ``cv``, every fold times ``seeds``, trained at once as one
    stacked model unless ``batched`` is False (their reports are drawn after, by the caller:
    `agepipe train --cv` draws one per run and the CV's report, in parallel)."""
    check_task(task)
    check_init_kept(init, out, cv, seeds)
    check_out(out, cv)
    datasets = expand_groups(datasets)  # imdb-wiki: imdb and wiki
    feature_set = resolve_feature_set(store, feature_set)
    data = load_task_data(store, feature_set, datasets, task, min_det_score, resolve_device(device))
    model_cfg = model_config_for(task, init, **(model_overrides or {}))
    train_cfg = train_config_for(task, **(train_overrides or {}))
    record = data_record(store, feature_set, datasets, test_fold, min_det_score)
    if init:
        check_init_features(init, record)
    if cv:
        return cross_validate(data, model_cfg, train_cfg, out, record, seeds, init, mc_samples, progress, echo,
                              batched)
    split = make_split(data.rows, test_fold, record["val_fraction"])
    return train_run(data, split, model_cfg, train_cfg, out, record, init, mc_samples, report, progress)
