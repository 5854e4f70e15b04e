"""Training speed, each row both sides doing the same work with the same settings, in one run.

1. Epochs per second on a synthetic store of --rows x 512: agepipe's tensor loop (`fit`, the
   code behind `agepipe train`) against a per-sample loop in the original's style
   (tae898/age-gender: a Dataset returning one row and mapping its age to a class, a shuffling
   DataLoader, per-batch `.item()` metrics). The baseline is tuned as its users would run it:
   persistent DataLoader workers sized to the machine (`os.cpu_count()`), and a 0-worker row;
   the same AdamW as agepipe (`loop.make_optimizer`: fused where torch supports it), the same
   model, batch size, learning rate and weight decay, and agepipe's age mapping
   (`agepipe.datasets.manifest.age_bin`; the script checks both sides see the same labels).
2. Fused against plain (torch's default) AdamW, both in agepipe's training step
   (`loop.TrainStep`), same data and epochs: the optimizer's own share of any gain.
3. The 25-run cross-validation (5 folds x --cv-seeds) on one store of --cv-rows: today's
   sequential `cross_validate(..., batched=False)` against the stacked
   `cross_validate(..., batched=True)`, same data, config and epoch limit (the paper's early
   stopping on both), checkpoints and test metrics included; test accuracy mean +- std of both.
   Each in float32 and, where the device multiplies bfloat16 natively (`model.precision`: GPUs,
   CPUs with AVX512-BF16 or AMX), in bfloat16 autocast, agepipe's default there; the
   precision's gain is a row of its own.

    python bench/train_bench.py --threads 1  # about 5 minutes on 2 shared CPU cores
    python bench/train_bench.py --quick      # smoke run (1 seed, tiny stores)
    python bench/train_bench.py --device cuda

--threads 1 on a shared CPU whose load average exceeds its cores: at torch's default of a thread
per core, each small op waits on descheduled OpenMP peers (10-20x slower, measured).

Targets: the batched CV >= 3x the sequential one on a 2-core CPU; on an H100/H200 the 25 runs in
under 5 s and >= 20x the per-sample loop's epochs/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agepipe.datasets.manifest import age_bin  # noqa: E402
from agepipe.train.data import load_task_data  # noqa: E402
from agepipe.train.loop import PAPER_TRAIN, TrainStep, cross_validate, data_record, fit, make_optimizer  # noqa: E402
from agepipe.train.model import ResMLP, autocast, paper_config, precision, resolve_device  # noqa: E402
from tests.train.synthetic_store import FEATURE_SET, Mixture, adience_like, write_store  # noqa: E402

CFG = PAPER_TRAIN["age"]
WARM_STEPS = 20  # untimed steps first: allocator, kernels, optimizer state, worker start-up


# --- the baseline: per-sample loading, as in the original's data_loaders.py and trainer ---

class PerSampleAgeDataset(Dataset):
    """A list of dicts, one per photo; each item maps the photo's age to its class (agepipe's
    mapping, once per item as the original did with `_get_closest_age`) and returns one embedding."""

    def __init__(self, embeddings: np.ndarray, ages: np.ndarray):
        self.data = [{"embedding": e, "age": float(a)} for e, a in zip(embeddings, ages)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        item = self.data[idx]
        return item["embedding"], int(age_bin(item["age"])[0])


def baseline_epoch(model, batches, optimizer, device, amp) -> tuple[float, float]:
    model.train()
    total_loss, total_acc, n = 0.0, 0.0, 0
    for data, target in batches:
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


def baseline_rate(dataset, device, workers: int, epochs: int) -> float:
    """Epochs/s of the per-sample loop; workers > 0 are persistent, started before the clock."""
    loader = DataLoader(dataset, batch_size=CFG.batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)
    torch.manual_seed(0)
    model = ResMLP(paper_config("age", 8)).to(device)
    optimizer = make_optimizer(model, CFG, device)
    batches = iter(loader)
    baseline_epoch(model, (next(batches) for _ in range(WARM_STEPS)), optimizer, device, CFG.amp)
    sync(device)
    t = time.perf_counter()
    for _ in range(epochs):
        baseline_epoch(model, loader, optimizer, device, CFG.amp)
    sync(device)
    return epochs / (time.perf_counter() - t)


# --- agepipe's side -------------------------------------------------------------------------

def fit_rate(data, device, epochs: int) -> float:
    """Epochs/s of `fit` (no validation split: every row trains), its copy of the rows to the
    device inside the clock: the baseline's per-batch copies are inside its own."""
    all_rows, none = torch.arange(len(data.y)), torch.empty(0, dtype=torch.long)
    torch.manual_seed(0)
    model = ResMLP(paper_config("age", 8)).to(device)
    warm = all_rows[:WARM_STEPS * CFG.batch_size]
    fit(model, data.x[warm].to(device), data.y[warm].to(device), torch.arange(len(warm)), none,
        dataclasses.replace(CFG, epochs=1))
    sync(device)
    t = time.perf_counter()
    x, y = data.x.to(device), data.y.to(device)
    fit(model, x, y, all_rows, none, dataclasses.replace(CFG, epochs=epochs))
    sync(device)
    return epochs / (time.perf_counter() - t)


def step_rate(data, device, epochs: int, fused: bool) -> float:
    """Epochs/s of agepipe's TrainStep with fused or plain AdamW (the same seed and batches)."""
    torch.manual_seed(0)
    model = ResMLP(paper_config("age", 8)).to(device)
    optimizer = (make_optimizer(model, CFG, device) if fused else
                 torch.optim.AdamW(model.parameters(), lr=CFG.lr, weight_decay=CFG.weight_decay))
    n, batch = len(data.y), CFG.batch_size
    warm = TrainStep(model, optimizer, data.x[:WARM_STEPS * batch].to(device), data.y[:WARM_STEPS * batch].to(device),
                     CFG.amp)
    order = torch.Generator().manual_seed(0)
    model.train()
    for b in range(WARM_STEPS):
        warm(torch.arange(b * batch, (b + 1) * batch, device=device))
    sync(device)
    t = time.perf_counter()
    step = TrainStep(model, optimizer, data.x.to(device), data.y.to(device), CFG.amp)  # the copy counts, as in fit_rate
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order).to(device)
        for b in range(n // batch):
            step(perm[b * batch:(b + 1) * batch])
        step.take()
    sync(device)
    return epochs / (time.perf_counter() - t)


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


def load() -> str:
    return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())


def throughput(args, device, tmp: Path) -> list[tuple]:
    store = synthetic_store(tmp / "big", args.rows, subjects=5000)
    # On the host: agepipe's sides copy the rows to the device inside their clocks
    data = load_task_data(store, FEATURE_SET, ["adience"], "age", device=torch.device("cpu"))
    dataset = PerSampleAgeDataset(data.x.cpu().numpy(), data.rows["age"].to_numpy())
    labels = np.array([dataset[i][1] for i in range(len(dataset))])
    if not np.array_equal(labels, data.y.cpu().numpy()):
        raise SystemExit("the baseline's age classes differ from agepipe's: the comparison would be unfair")
    workers = os.cpu_count() or 1
    e = args.epochs
    print(f"store of {args.rows} x 512 on {device}; {e} timed epochs per row; {load()}", flush=True)
    ours = fit_rate(data, device, e)
    print(f"  agepipe fit: {ours:.4f} epochs/s; {load()}", flush=True)
    persistent = baseline_rate(dataset, device, workers, e)
    print(f"  per-sample loop, {workers} persistent workers: {persistent:.4f} epochs/s; {load()}", flush=True)
    inline = baseline_rate(dataset, device, 0, e)
    print(f"  per-sample loop, 0 workers: {inline:.4f} epochs/s; {load()}", flush=True)
    fused = step_rate(data, device, e, fused=True)
    plain = step_rate(data, device, e, fused=False)
    print(f"  TrainStep AdamW fused {fused:.4f}, plain {plain:.4f} epochs/s; {load()}", flush=True)
    rows = f"{args.rows:,} rows, batch {CFG.batch_size}"
    return [(f"epochs/s, {rows}: agepipe `fit` vs per-sample loop, {workers} persistent workers", ours, persistent),
            (f"epochs/s, {rows}: agepipe `fit` vs per-sample loop, 0 workers", ours, inline),
            (f"epochs/s, {rows}: agepipe `TrainStep`, fused vs plain AdamW", fused, plain)]


def cv_bench(args, device, tmp: Path) -> list[tuple]:
    store = synthetic_store(tmp / "cv", args.cv_rows, subjects=200, seed=1)
    data = load_task_data(store, FEATURE_SET, ["adience"], "age", device=device)
    record = data_record(store, FEATURE_SET, ["adience"], None, 0.0)
    cfg = dataclasses.replace(CFG, epochs=args.cv_epochs)
    n = 5 * args.cv_seeds
    print(f"cross-validation, {n} runs on {args.cv_rows} rows, at most {cfg.epochs} epochs, patience "
          f"{cfg.patience}; {load()}", flush=True)
    # Each side: (batched, CUDA graphs, amp). bfloat16 sides where the device has it natively
    # (agepipe's default there); float32 is the precision the "today" ran in on a CPU.
    sides = {"sequential, float32": (False, False, False), "batched, float32": (True, False, False)}
    bf16 = precision(device, True) == "bfloat16"
    if bf16:
        sides.update({"sequential, bfloat16": (False, False, True), "batched, bfloat16": (True, False, True)})
    if device.type == "cuda":  # the stack's step as one CUDA graph replay, not yet the default
        sides["batched, bfloat16, CUDA graphs"] = (True, True, True)
    out = {}
    for name, (batched, graphed, amp) in sides.items():
        sync(device)
        t = time.perf_counter()
        cv = cross_validate(data, paper_config("age", 8), dataclasses.replace(cfg, amp=amp), tmp / name, record,
                            seeds=args.cv_seeds, mc_samples=args.mc_samples, progress=False, batched=batched,
                            cuda_graphs=graphed)
        sync(device)
        seconds = time.perf_counter() - t
        acc = cv["summary"]["test_accuracy"]
        epochs = sum(r["epochs_run"] for r in cv["runs"])
        out[name] = seconds
        # Both sides compute each run until it stops (a stopped run leaves the stack).
        print(f"  {name}: {seconds:.1f} s, {epochs} run-epochs, test accuracy "
              f"{acc['mean']:.4f} +- {acc['std']:.4f}; {load()}", flush=True)
    label = f"CV wall seconds, {n} runs, {args.cv_rows:,} rows"
    rows = [(f"{label}: batched vs sequential `cross_validate`, float32", out["batched, float32"],
             out["sequential, float32"])]
    if bf16:
        rows += [(f"{label}: batched vs sequential, bfloat16 autocast", out["batched, bfloat16"],
                  out["sequential, bfloat16"]),
                 (f"{label}: batched, bfloat16 autocast vs float32", out["batched, bfloat16"], out["batched, float32"]),
                 (f"{label}: agepipe's default here (batched, bfloat16) vs sequential float32 (the issue's)",
                  out["batched, bfloat16"], out["sequential, float32"])]
    if device.type == "cuda":
        rows += [(f"{label}: batched with CUDA graphs vs batched eager", out["batched, bfloat16, CUDA graphs"],
                  out["batched, bfloat16"])]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=30_000)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per throughput row")
    p.add_argument("--cv-rows", type=int, default=3_000)
    p.add_argument("--cv-seeds", type=int, default=5)
    p.add_argument("--cv-epochs", type=int, default=CFG.epochs, help="epoch limit of every CV run (early stopping on)")
    p.add_argument("--mc-samples", type=int, default=0, help="MC-dropout passes in the CV test metrics, both sides")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the main process, both sides (0: torch's default, one per core); "
                        "on a shared, overloaded CPU 1 avoids OpenMP threads waiting on descheduled peers")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-cv", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.rows, args.epochs, args.cv_rows, args.cv_seeds, args.cv_epochs = 4_000, 1, 2_000, 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; {load()}", flush=True)
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_throughput:
            results += throughput(args, device, Path(tmp))
        if not args.skip_cv:
            results += cv_bench(args, device, Path(tmp))
    print(f"\n{time.perf_counter() - start:.0f} s in all; {load()}")
    # epochs/s rows: new / old; CV rows (wall seconds): old / new. Either way, how many times faster new is.
    print("\n| measure | new | old | new faster by |\n| --- | --- | --- | --- |")
    for label, new, old in results:
        speedup = old / new if label.startswith("CV wall") else new / old
        print(f"| {label} | {new:.4g} | {old:.4g} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
