"""Training speed: agepipe's tensor loop against a per-sample Dataset/DataLoader loop like
the original's (tae898/age-gender), same model, same hyper-parameters, same machine.

1. Epochs per second on a synthetic store of --rows x 512 (default 400,000).
2. Wall time of a full 5-fold x --cv-seeds cross-validation at Adience's size (--cv-rows,
   default 17,000): agepipe's `cross_validate` (the code behind `agepipe train --cv`,
   checkpoints and test metrics included; MC dropout only with --mc-samples) against the
   original's recipe: a per-sample DataLoader, a random 10% validation split, per-batch
   `.item()` metrics, early stopping on validation loss, then a test pass.

    python bench/train_bench.py                          # full size
    python bench/train_bench.py --rows 50000 --cv-seeds 1  # quick
    python bench/train_bench.py --device cuda

Targets: >= 2x the per-sample loop on CPU; on a GPU >= 20x, with the 25-run CV under 60 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agepipe.train.data import AGE_BIN_MIDPOINTS, load_task_data  # noqa: E402
from agepipe.train.loop import PAPER_TRAIN, cross_validate, data_record, fit  # noqa: E402
from agepipe.train.model import ResMLP, autocast, paper_config, resolve_device  # noqa: E402
from tests.train.synthetic_store import FEATURE_SET, Mixture, adience_like, write_store  # noqa: E402

CFG = PAPER_TRAIN["age"]


# --- the baseline: per-sample loading, as in the original's data_loaders.py and trainer ---

class PerSampleAgeDataset(Dataset):
    """A list of dicts, one per photo; each item maps the photo's age to the nearest class
    (the original's `_get_closest_age`) and returns one embedding."""

    def __init__(self, embeddings: np.ndarray, ages: np.ndarray):
        self.data = [{"embedding": e, "age": float(a)} for e, a in zip(embeddings, ages)]
        self.age_map = {float(a): i for i, a in enumerate(AGE_BIN_MIDPOINTS)}

    def __len__(self):
        return len(self.data)

    def _get_closest_age(self, num: float) -> float:
        possible = np.array(list(self.age_map.keys()))
        return possible[int(np.argmin(np.abs(possible - num)))]

    def __getitem__(self, idx):
        return self.data[idx]["embedding"], self.age_map[self._get_closest_age(self.data[idx]["age"])]


def baseline_epoch(model, loader, optimizer, device, amp) -> tuple[float, float]:
    model.train()
    total_loss, total_acc, n = 0.0, 0.0, 0
    for data, target in loader:
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        with autocast(device, amp):
            output = model(data)
        loss = F.cross_entropy(output.float(), target)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(target)  # the original's MetricTracker: .item() per batch
        total_acc += (output.argmax(1) == target).float().mean().item() * len(target)
        n += len(target)
    return total_loss / n, total_acc / n


@torch.no_grad()
def baseline_eval(model, loader, device, amp) -> tuple[float, float]:
    model.eval()
    total_loss, total_acc, n = 0.0, 0.0, 0
    for data, target in loader:
        data, target = data.to(device), target.to(device)
        with autocast(device, amp):
            output = model(data).float()
        total_loss += F.cross_entropy(output, target).item() * len(target)
        total_acc += (output.argmax(1) == target).float().mean().item() * len(target)
        n += len(target)
    return total_loss / max(n, 1), total_acc / max(n, 1)


def baseline_run(dataset, train_rows, test_rows, seed, device, workers, amp) -> dict:
    """One fold the original's way: a random validation split of the training rows."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    rows = np.random.permutation(train_rows)
    n_val = int(0.1 * len(rows))
    # drop_last: a final batch of one row would stop BatchNorm (the original could hit that too).
    loader = lambda idx, shuffle: DataLoader(  # noqa: E731
        dataset, batch_size=CFG.batch_size, num_workers=workers, drop_last=shuffle,
        sampler=SubsetRandomSampler(idx) if shuffle else idx)
    train_loader, val_loader = loader(rows[n_val:], True), loader(rows[:n_val], True)
    model = ResMLP(paper_config("age", 8)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=CFG.lr, weight_decay=CFG.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=CFG.gamma)
    best, best_state, waited, epochs = math.inf, None, 0, 0
    for _ in range(CFG.epochs):
        baseline_epoch(model, train_loader, optimizer, device, amp)
        scheduler.step()
        epochs += 1
        val_loss, _ = baseline_eval(model, val_loader, device, amp)
        if val_loss < best:
            best, waited = val_loss, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= CFG.patience:
                break
    model.load_state_dict(best_state)
    _, test_acc = baseline_eval(model, loader(test_rows, False), device, amp)
    return {"epochs": epochs, "test_accuracy": test_acc}


# --- helpers -------------------------------------------------------------------------------

def synthetic_store(root: Path, rows: int, subjects: int, seed: int = 0) -> str:
    mixture = Mixture.make(seed=seed)
    parts = [mixture.sample(min(50_000, rows - start), seed=seed + 1 + start) for start in range(0, rows, 50_000)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return write_store(root, x, adience_like(y, subjects=subjects), shard_rows=50_000)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(args, device, tmp: Path) -> list[tuple]:
    t = time.perf_counter()
    store = synthetic_store(tmp / "big", args.rows, subjects=5000)
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    data = load_task_data(store, FEATURE_SET, ["adience"], "age", device=device)
    t_load = time.perf_counter() - t
    print(f"store of {args.rows} x 512: written in {t_write:.1f} s, loaded into tensors on {device} in {t_load:.1f} s",
          flush=True)
    all_rows = torch.arange(len(data.y))
    none = torch.empty(0, dtype=torch.long)

    torch.manual_seed(0)
    model = ResMLP(paper_config("age", 8)).to(device)
    # Warm-up (allocator, kernels), then the timed epochs.
    fit(model, data.x, data.y, all_rows[:20 * CFG.batch_size], none, dataclasses.replace(CFG, epochs=1))
    sync(device)
    t = time.perf_counter()
    fit(model, data.x, data.y, all_rows, none, dataclasses.replace(CFG, epochs=args.epochs))
    sync(device)
    ours = args.epochs / (time.perf_counter() - t)

    dataset = PerSampleAgeDataset(data.x.cpu().numpy(), data.rows["age"].to_numpy())
    loader = DataLoader(dataset, batch_size=CFG.batch_size, shuffle=True, num_workers=args.baseline_workers,
                        drop_last=True)
    torch.manual_seed(0)
    model = ResMLP(paper_config("age", 8)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=CFG.lr, weight_decay=CFG.weight_decay)
    warm = DataLoader(torch.utils.data.Subset(dataset, range(20 * CFG.batch_size)), batch_size=CFG.batch_size)
    baseline_epoch(model, warm, optimizer, device, CFG.amp)
    sync(device)
    t = time.perf_counter()
    for _ in range(args.epochs):
        baseline_epoch(model, loader, optimizer, device, CFG.amp)
    sync(device)
    theirs = args.epochs / (time.perf_counter() - t)
    print(f"epochs/s on {args.rows} rows: agepipe {ours:.4f}, per-sample loop {theirs:.4f}", flush=True)
    return [(f"epochs/s, {args.rows} rows, batch {CFG.batch_size}", ours, theirs)]


def cv_bench(args, device, tmp: Path) -> list[tuple]:
    store = synthetic_store(tmp / "cv", args.cv_rows, subjects=200, seed=1)
    t = time.perf_counter()
    data = load_task_data(store, FEATURE_SET, ["adience"], "age", device=device)
    record = data_record(store, FEATURE_SET, ["adience"], None, 0.0)
    cv = cross_validate(data, paper_config("age", 8), CFG, tmp / "cv-runs", record, seeds=args.cv_seeds,
                        mc_samples=args.mc_samples, progress=False)
    sync(device)
    ours = time.perf_counter() - t
    our_epochs = sum(r["epochs_run"] for r in cv["runs"])

    t = time.perf_counter()
    dataset = PerSampleAgeDataset(data.x.cpu().numpy(), data.rows["age"].to_numpy())
    folds = data.rows["fold"].to_numpy()
    runs = [baseline_run(dataset, np.flatnonzero(folds != k), np.flatnonzero(folds == k), s, device,
                         args.baseline_workers, CFG.amp)
            for s in range(args.cv_seeds) for k in range(5)]
    theirs = time.perf_counter() - t
    their_epochs = sum(r["epochs"] for r in runs)
    n = 5 * args.cv_seeds
    print(f"cross-validation, {n} runs on {args.cv_rows} rows: agepipe {our_epochs} epochs, test accuracy "
          f"{cv['summary']['test_accuracy']['mean']:.4f} +- {cv['summary']['test_accuracy']['std']:.4f}; "
          f"per-sample loop {their_epochs} epochs, test accuracy {np.mean([r['test_accuracy'] for r in runs]):.4f}",
          flush=True)
    return [(f"CV wall seconds, {n} runs", ours, theirs),
            ("CV seconds per epoch", ours / our_epochs, theirs / their_epochs)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--epochs", type=int, default=1, help="timed epochs on the big store")
    p.add_argument("--cv-rows", type=int, default=17_000)
    p.add_argument("--cv-seeds", type=int, default=5)
    p.add_argument("--mc-samples", type=int, default=0,
                   help="MC-dropout passes in agepipe's CV test metrics (0: like the baseline, which has none)")
    p.add_argument("--baseline-workers", type=int, default=0,
                   help="DataLoader workers for the per-sample loop (the original used 8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-cv", action="store_true")
    args = p.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"baseline DataLoader workers: {args.baseline_workers}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_throughput:
            results += throughput(args, device, Path(tmp))
        if not args.skip_cv:
            results += cv_bench(args, device, Path(tmp))
    print(f"\n| measure | agepipe | per-sample loop | ratio |\n| --- | --- | --- | --- |")
    for label, ours, theirs in results:
        faster = ours / theirs if label.startswith("epochs/s") else theirs / ours
        print(f"| {label} | {ours:.3f} | {theirs:.3f} | {faster:.2f}x |")


if __name__ == "__main__":
    main()
