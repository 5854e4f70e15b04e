"""Where a step of the stacked cross-validation spends its time, and how far it could go.

One training step of the 25 runs (5 folds x 5 seeds) of the paper's age model, batch 128, each
row the same work in the same run:

- sequential: 25 steps of agepipe's single-run `TrainStep` (today's `cross_validate(batched=False)`);
- stacked: one step of `StackedStep` (the runs as one stacked model), eager PyTorch;
- stacked, `torch.compile`: the same with the stacked forward compiled by inductor (default
  mode, static shapes; its compile time is its own column);
- matrix products only: the step's batched products alone (forward, and backward for the input
  and the weight gradients), in the step's precision: what no fusion of the other ops can beat.

Each in float32 and bfloat16 autocast. Ratios are against the sequential float32 step, issue
12's "today". The last column bounds the stacked CV's gain if every op besides the products cost
nothing.

    python bench/stacked_step_bench.py             # about 3 minutes on 2 shared CPU cores
    python bench/stacked_step_bench.py --threads 2 --steps 20
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

# A cache of its own, so the compile row pays the cold compile a first `agepipe train` would
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agepipe.train.batched import StackedResMLP, StackedStep  # noqa: E402
from agepipe.train.loop import PAPER_TRAIN, TrainStep, make_optimizer  # noqa: E402
from agepipe.train.model import ResMLP, paper_config  # noqa: E402

ROWS, RUNS, BATCH, WARM = 4000, 25, 128, 3


def timed(step, steps: int) -> float:
    """Seconds per call after WARM untimed calls (allocator, optimizer state, a compile)."""
    for _ in range(WARM):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def sequential(amp: bool, steps: int) -> float:
    cfg = dataclasses.replace(PAPER_TRAIN["age"], amp=amp)
    model = ResMLP(paper_config("age", 8)).train()
    x, y = torch.randn(ROWS, 512), torch.randint(0, 8, (ROWS,))
    step = TrainStep(model, make_optimizer(model, cfg, torch.device("cpu")), x, y, amp)
    # the runs one after the other: 25 of one run's steps (timed over 5x the calls: each is short)
    return RUNS * timed(lambda: step(torch.randint(0, ROWS, (BATCH,))), steps * 5)


def stacked(amp: bool, steps: int, compiled: bool) -> tuple[float, float]:
    """Seconds per step, and the seconds the first step took (a compile's cost)."""
    cfg = dataclasses.replace(PAPER_TRAIN["age"], amp=amp)
    model = StackedResMLP([ResMLP(paper_config("age", 8)) for _ in range(RUNS)]).train()
    x, y = torch.randn(ROWS, 512), torch.randint(0, 8, (ROWS,))
    step = StackedStep(model, make_optimizer(model, cfg, torch.device("cpu")), x, y, None, amp)
    if compiled:
        model.forward = torch.compile(model.forward, dynamic=False)
    t = time.perf_counter()
    step(torch.randint(0, ROWS, (RUNS, BATCH)))
    first = time.perf_counter() - t
    return timed(lambda: step(torch.randint(0, ROWS, (RUNS, BATCH))), steps), first


def products(amp: bool, steps: int) -> float:
    """The stacked step's batched products alone: per Linear the forward, the weight gradient,
    and the input gradient (none for the first layer: the embeddings need none)."""
    dtype = torch.bfloat16 if amp else torch.float32
    template = ResMLP(paper_config("age", 8))
    shapes = [(m.in_features, m.out_features) for m in template.modules() if isinstance(m, torch.nn.Linear)]
    ops = []
    for i, (fan_in, fan_out) in enumerate(shapes):
        x = torch.randn(RUNS, BATCH, fan_in, dtype=dtype)
        w = torch.randn(RUNS, fan_in, fan_out, dtype=dtype)
        g = torch.randn(RUNS, BATCH, fan_out, dtype=dtype)
        ops.append(lambda x=x, w=w: torch.bmm(x, w))
        ops.append(lambda x=x, g=g: torch.bmm(x.transpose(1, 2), g))
        if i:
            ops.append(lambda g=g, w=w: torch.bmm(g, w.transpose(1, 2)))
    return timed(lambda: [op() for op in ops], steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--steps", type=int, default=20, help="timed stacked steps per row")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {RUNS} runs x batch {BATCH}, the paper's age model")
    rows = []
    base = None
    for amp in (False, True):
        name = "bfloat16" if amp else "float32"
        seq = sequential(amp, args.steps)
        base = base or seq
        eager, _ = stacked(amp, args.steps, False)
        rows += [(f"sequential ({name})", seq, ""), (f"stacked ({name})", eager, "")]
        if not args.no_compile:
            comp, first = stacked(amp, args.steps, True)
            rows.append((f"stacked, torch.compile ({name})", comp, f"first step (the compile) {first:.1f} s"))
        rows.append((f"matrix products only ({name})", products(amp, args.steps), "a floor for any stacked step"))
    print("\n| step of 25 runs | ms | vs sequential float32 | note |\n| --- | --- | --- | --- |")
    for name, sec, note in rows:
        print(f"| {name} | {sec * 1000:.1f} | {base / sec:.2f}x | {note} |")


if __name__ == "__main__":
    main()
