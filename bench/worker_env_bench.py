"""Photo decoding inside a Dask worker process: Dask's default worker settings against the ones
agepipe's clusters start with (cluster.WORKER_CONFIG), side by side in one run.

    python bench/worker_env_bench.py [--photos 600] [--threads 2] [--rounds 3]

Each side starts a one-worker process cluster and times, inside the worker, what a GPU worker's
decode threads do per photo (read_photo, then the cv2 letterbox into a 640x640 canvas) over the
same JPEG face crops (300-700 px), on the same number of threads; the sides alternate each round.
"""
import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def decode_all(paths, threads):
    """Photos/s of read_photo + letterbox over ``paths`` on ``threads`` threads (runs in the worker)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from agepipe.features.decoders import letterbox_into
    from agepipe.features.images import read_photo

    local = threading.local()

    def one(path):
        if not hasattr(local, "canvas"):
            local.canvas = np.empty((640, 640, 3), np.uint8)
        letterbox_into(read_photo(path).pixels, local.canvas)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, paths[:threads * 4]))  # warm-up
        t = time.perf_counter()
        list(pool.map(one, paths))
    return len(paths) / (time.perf_counter() - t)


def in_worker(agepipes, paths, threads):
    """Photos/s in a one-worker cluster: agepipe's own (cluster.open_client) or Dask's LocalCluster."""
    from distributed import Client, LocalCluster

    from agepipe.pipeline.cluster import open_client

    if agepipes:
        with open_client(workers=1) as (client, _):
            return client.submit(decode_all, paths, threads, pure=False).result()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40) as cluster, Client(cluster) as client:
        return client.submit(decode_all, paths, threads, pure=False).result()


def main():
    from face_crops import face_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = [str(p) for p in face_dataset(Path(d), "crops", args.photos)]
        sides = {"Dask's defaults (LocalCluster)": False, "agepipe's cluster (WORKER_CONFIG)": True}
        rates = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, agepipes in sides.items():
                rates[name].append(in_worker(agepipes, paths, args.threads))
    base = statistics.median(rates["Dask's defaults (LocalCluster)"])
    print(f"{args.photos} crops, {args.threads} decode threads in one worker process, {args.rounds} rounds\n")
    print("| worker settings | photos/s (median) | min - max | vs Dask's defaults |")
    print("| --- | --- | --- | --- |")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.0f} | {min(r):.0f} - {max(r):.0f} | "
              f"{statistics.median(r) / base:.2f}x |")


if __name__ == "__main__":
    main()
