"""Decode threads against decode processes, beside a thread that launches device work.

    python bench/decoders_bench.py [--photos 512] [--batch 64] [--decoders 2] [--rounds 3]   (from bench/)

The device pipeline's main thread issues the GPU's work op by op (about 1,400 launches per batch of
256 before CUDA graphs); each launch drops and retakes the GIL. Its decoders run beside it. Here
the same decoders (features/decoders.py, the pipeline's two host slots filled in turn, a batch
waited for before its slot is refilled) decode JPEG face crops while a "launcher" thread issues
small torch ops as fast as it can, as the main thread would. Per kind of decoder: photos/s decoded,
and the launcher's ops/s against its rate alone in the same run. Both sides decode the same photos
into the same slots with the same number of decoders; rounds alternate the sides.
"""
import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import cv2
import torch

from agepipe.features.decoders import HostSlot, ProcessDecoders, ThreadDecoders
from face_crops import face_dataset


class Launcher:
    """A thread issuing tiny torch ops (each drops and retakes the GIL, as a CUDA launch does)."""

    def __init__(self):
        self.ops, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        x = torch.zeros(16)
        while not self.stop.is_set():
            for _ in range(100):
                x.add_(1)
            self.ops += 100

    def __enter__(self):
        self.start = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.rate = self.ops / (time.perf_counter() - self.start)


def launcher_alone(seconds: float) -> float:
    with Launcher() as launcher:
        time.sleep(seconds)
    return launcher.rate


def decode_all(kind: str, paths: list[str], batch: int, n: int) -> tuple[float, float]:
    """(photos/s, launcher ops/s) for all paths through two slots, as the pipeline feeds them."""
    slots = [HostSlot(batch, (640, 640), pin=False, shared=kind == "processes") for _ in range(2)]
    pool = (ProcessDecoders if kind == "processes" else ThreadDecoders)(n, slots)
    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    try:
        pool.wait(pool.submit(slots[0], batches[0], [None] * len(batches[0])))  # processes started and warm
        with Launcher() as launcher:
            t = time.perf_counter()
            pending = {k: pool.submit(slots[k % 2], batches[k], [None] * len(batches[k]))
                       for k in range(min(2, len(batches)))}
            for k in range(len(batches)):
                pool.wait(pending.pop(k))
                if k + 2 < len(batches):
                    pending[k + 2] = pool.submit(slots[k % 2], batches[k + 2], [None] * len(batches[k + 2]))
            wall = time.perf_counter() - t
        return len(paths) / wall, launcher.rate
    finally:
        pool.close()
        for slot in slots:
            slot.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--decoders", type=int, default=2, help="threads or processes (default: this machine's 2 cores)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as d:
        paths = [str(p) for p in face_dataset(Path(d), "crops", args.photos)]
        results = {"threads": [], "processes": []}
        alone = []
        for r in range(args.rounds):
            alone.append(launcher_alone(2.0))
            for kind in (("threads", "processes") if r % 2 == 0 else ("processes", "threads")):
                results[kind].append(decode_all(kind, paths, args.batch, args.decoders))
    base = statistics.median(alone)
    print(f"{args.photos} JPEG face crops 300-700 px, batch {args.batch}, {args.decoders} decoders, "
          f"{args.rounds} rounds alternating; the launcher alone: {base:,.0f} ops/s (median)\n")
    print("| decoders | photos/s decoded (median; min - max) | launcher ops/s beside them (median) | launcher vs alone |")
    print("| --- | --- | --- | --- |")
    for kind, runs in results.items():
        photos, ops = zip(*runs)
        print(f"| {args.decoders} {kind} | {statistics.median(photos):.0f} ({min(photos):.0f} - {max(photos):.0f}) "
              f"| {statistics.median(ops):,.0f} | {statistics.median(ops) / base:.2f} |")


if __name__ == "__main__":
    main()
