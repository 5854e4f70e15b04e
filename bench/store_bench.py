"""Feature store read speed: 500,000 x 512 embeddings from Parquet shards vs np.load of one .npy.

    python bench/store_bench.py [--rows 500000] [--shard-rows 10000]

Both read the same matrix from the page cache, side by side, best of 3; the table gives
the ratio (store speed / np.load speed). Target: >= 0.5. The store's first read decodes
Parquet and leaves a memory-mapped Arrow copy of each shard; later reads use it.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from agepipe.features import store as fstore


def synthetic_shard(emb: np.ndarray, start: int) -> pa.Table:
    n = len(emb)
    ok = np.ones(n, bool)
    return pa.table({
        "image_id": [f"img/{start + i:08d}.jpg" for i in range(n)],
        "subject_id": [f"s{(start + i) // 20}" for i in range(n)],
        "fold": pa.array(np.arange(n) % 5, pa.int8()), "age": pa.array(np.full(n, 30, np.float32)),
        "age_bin": pa.array(np.full(n, 4, np.int8)), "gender": pa.array(np.ones(n, np.int8)),
        "face_hint": pa.nulls(n, pa.list_(pa.float32(), 4)), "status": ["ok"] * n,
        "n_faces": pa.array(np.ones(n, np.int16)), "det_score": pa.array(np.full(n, 0.9, np.float32)),
        "bbox": fstore.fixed_list(np.zeros((n, 4)), 4, ok), "landmarks": fstore.fixed_list(np.zeros((n, 10)), 10, ok),
        "embedding": fstore.fixed_list(emb, 512, ok), "embedding_norm": pa.array(np.ones(n, np.float32)),
    })


def best_of(f, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.rows, 512), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as d:
        np.save(Path(d) / "emb.npy", emb)
        for i, start in enumerate(range(0, args.rows, args.shard_rows)):
            fstore.write_shard(synthetic_shard(emb[start:start + args.shard_rows], start), d, "fs", "bench", i)
        t_npy, a = best_of(lambda: np.load(Path(d) / "emb.npy"))
        t_first, _ = best_of(lambda: fstore.load_features(d, "fs", "bench"), repeats=1)
        t_store, feats = best_of(lambda: fstore.load_features(d, "fs", "bench"))
        assert np.array_equal(a, feats.embeddings)
    gb = emb.nbytes / 1e9
    print(f"| reader | rows | seconds | GB/s | speed vs np.load |")
    print(f"|---|---|---|---|---|")
    print(f"| np.load (one .npy) | {args.rows:,} | {t_npy:.3f} | {gb / t_npy:.2f} | 1.00x |")
    shards = -(-args.rows // args.shard_rows)
    print(f"| agepipe store, first read (Parquet, builds the Arrow copy) | {args.rows:,} | {t_first:.3f} "
          f"| {gb / t_first:.2f} | {t_npy / t_first:.2f}x |")
    print(f"| agepipe store ({shards} shards, with labels and filter) | {args.rows:,} | {t_store:.3f} "
          f"| {gb / t_store:.2f} | {t_npy / t_store:.2f}x |")


if __name__ == "__main__":
    main()
