"""`agepipe extract` against the original project's way: a loop of FaceAnalysis.get per photo.

    python bench/extract_bench.py [--images 200] [--det-size 640]

Same photos, one run, the same work (one face embedded per photo: the loop calls
get(max_num=1), which keeps insightface's largest-central face, the policy extract uses
without a face hint). agepipe runs on its default local Dask cluster with 1 and with 2
worker processes; its time is the extraction itself. The last column is what a user waits for
from the start: the loop with its model loading, extract with its cluster start and model loading.
"""
import argparse
import tempfile
import time
from pathlib import Path

import cv2

from agepipe.features.models import resolve_pack
from agepipe.pipeline.extract import run_extract
from photos import face_analysis, photo_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--det-size", type=int, default=640)
    ap.add_argument("--shard-rows", type=int, default=25)
    ap.add_argument("--plot", type=Path, default=None, help="also draw images/s per path into this PNG")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        paths = photo_dataset(d / "data", "bench", args.images)
        t = time.perf_counter()
        app = face_analysis(resolve_pack("buffalo_s"), args.det_size, d / "pack")
        loop_load = time.perf_counter() - t
        app.get(cv2.imread(str(paths[0])))
        t = time.perf_counter()
        loop_faces = sum(len(app.get(cv2.imread(str(p)), max_num=1)) for p in paths)
        t_loop = time.perf_counter() - t

        rows = [("FaceAnalysis.get loop (1 process)", t_loop, loop_load + t_loop, loop_faces)]
        for workers in (1, 2):
            store = d / f"store{workers}"
            t = time.perf_counter()
            result = run_extract(["bench"], str(d / "data"), str(store), det_size=args.det_size,
                                 shard_rows=args.shard_rows, workers=workers, progress=False, echo=lambda *_: None)
            total = time.perf_counter() - t
            ok = result["counts"]["bench"].get("ok", 0)
            rows.append((f"agepipe extract, {workers} worker{'s' * (workers > 1)}",
                         result["stats"]["wall_seconds"], total, ok))
        assert len({r[3] for r in rows}) == 1, rows  # the same faces embedded
    n = args.images
    print(f"{n} photos, det size {args.det_size}, buffalo_s, CPU, shards of {args.shard_rows}")
    print("| path | images/s | vs loop | wall incl. model loading and cluster start (s) | vs loop, so |")
    print("|---|---|---|---|---|")
    for name, seconds, total, _ in rows:
        print(f"| {name} | {n / seconds:.1f} | {t_loop / seconds:.2f}x | {total:.1f} | {rows[0][2] / total:.2f}x |")
    if args.plot:
        plot(rows, n, args.plot)


def plot(rows, n, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.2))
    names = [r[0] for r in rows][::-1]
    rates = [n / r[1] for r in rows][::-1]
    ax.barh(names, rates, color=["#4c72b0"] * (len(rows) - 1) + ["#999999"])
    for y, rate in enumerate(rates):
        ax.text(rate, y, f" {rate:.1f}", va="center")
    ax.set_xlabel("images/s (buffalo_s, det 640, CPU)")
    ax.set_xlim(0, max(rates) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
