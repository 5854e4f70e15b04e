"""Feature store read speed: 500,000 x 512 embeddings from Parquet shards vs np.load of one .npy.

    python bench/store_bench.py [--rows 500000] [--shard-rows 10000]
    PYTHONPATH=/path/to/older/checkout python bench/store_bench.py    # the same on older code

Both read the same matrix from the page cache, best of 3 (first reads: of 3 fresh copies); the table
gives the ratio (store speed / np.load speed). "First read" is the first load_features in a
fresh store: agepipe 0.1.0 decoded Parquet there and left an Arrow copy beside the shards
for later reads; now every read copies the embedding pages straight into the matrix and
writes nothing.
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import agepipe
from agepipe.features import store as fstore


def synthetic_shard(emb: np.ndarray, start: int) -> pa.Table:
    n = len(emb)
    ok = np.ones(n, bool)
    return pa.table({
        "image_id": [f"img/{start + i:08d}.jpg" for i in range(n)],
        "subject_id": [f"s{(start + i) // 20}" for i in range(n)],
        "fold": pa.array(np.arange(n) % 5, pa.int8()), "age": pa.array(np.full(n, 30, np.float32)),
        "age_bin": pa.array(np.full(n, 4, np.int8)), "gender": pa.array(np.ones(n, np.int8)),
        "face_hint": fstore.fixed_list(np.zeros((n, 4)), 4, ~ok), "status": ["ok"] * n,
        "n_faces": pa.array(np.ones(n, np.int16)), "det_score": pa.array(np.full(n, 0.9, np.float32)),
        "bbox": fstore.fixed_list(np.zeros((n, 4)), 4, ok), "landmarks": fstore.fixed_list(np.zeros((n, 10)), 10, ok),
        "embedding": fstore.fixed_list(emb, 512, ok), "embedding_norm": pa.array(np.ones(n, np.float32)),
    })


def write_store(d: str, emb: np.ndarray, shard_rows: int) -> None:
    entries = []
    for i, start in enumerate(range(0, len(emb), shard_rows)):
        table = synthetic_shard(emb[start:start + shard_rows], start)
        path = fstore.write_shard(table, d, "fs", "bench", i)
        if hasattr(fstore, "commit_shards"):
            entries.append(fstore.ShardEntry(path.rsplit("/", 1)[-1], start, table.num_rows,
                                             fstore.rows_digest(table)))
    if entries:  # agepipe 0.1.0 had no index
        fstore.commit_shards(d, "fs", "bench", entries)


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
        write_store(str(Path(d) / "store"), emb, args.shard_rows)
        np.load(Path(d) / "emb.npy")  # both files in the page cache before anything is timed
        t_npy, a = best_of(lambda: np.load(Path(d) / "emb.npy"))
        firsts = []
        for i in range(3):  # a first read each time: a fresh copy of the store
            copy = str(Path(d) / f"copy{i}")
            shutil.copytree(Path(d) / "store", copy)
            firsts.append(best_of(lambda: fstore.load_features(copy, "fs", "bench"), repeats=1))
        t_first, first = min(firsts, key=lambda r: r[0])
        t_store, feats = best_of(lambda: fstore.load_features(copy, "fs", "bench"))
        assert np.array_equal(a, feats.embeddings) and np.array_equal(a, first.embeddings)
        side_files = [p for p in Path(d).rglob("*.arrow") if p.is_file()]
    gb = emb.nbytes / 1e9
    shards = -(-args.rows // args.shard_rows)
    print(f"agepipe {agepipe.__version__} from {Path(agepipe.__file__).parent}; "
          f"{len(side_files)} .arrow files written by reads")
    print("| reader | rows | seconds | GB/s | speed vs np.load |")
    print("|---|---|---|---|---|")
    print(f"| np.load (one .npy) | {args.rows:,} | {t_npy:.3f} | {gb / t_npy:.2f} | 1.00x |")
    print(f"| agepipe load_features, first read ({shards} shards) | {args.rows:,} | {t_first:.3f} "
          f"| {gb / t_first:.2f} | {t_npy / t_first:.2f}x |")
    print(f"| agepipe load_features, later reads | {args.rows:,} | {t_store:.3f} "
          f"| {gb / t_store:.2f} | {t_npy / t_store:.2f}x |")


if __name__ == "__main__":
    main()
