"""Feature store read speed: 500,000 x 512 embeddings from Parquet shards vs np.load of one .npy.

    python bench/store_bench.py [--rows 500000] [--shard-rows 10000]
    PYTHONPATH=/path/to/older/checkout python bench/store_bench.py    # the same on older code

Both read the same matrix; the table gives the ratio (np.load time / store time). "First
read": of a fresh copy of the .npy and of the store, just written and synced (best of 3 copies); agepipe
0.1.0 decoded Parquet there and left an Arrow copy beside the shards for later reads; now
every read copies the embedding pages straight into the matrix and writes nothing. "Later
reads": the same files again, from the page cache, best of 3.
"""
import argparse
import os
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
        first_npy, first_store = [], []
        for i in range(3):  # first reads: of fresh copies, freshly written as an extract leaves them
            npy, copy = Path(d) / f"copy{i}.npy", str(Path(d) / f"copy{i}")
            shutil.copy(Path(d) / "emb.npy", npy)
            shutil.copytree(Path(d) / "store", copy)
            for path in [npy, *Path(copy).rglob("*")]:  # written back: no read waits on writeback
                if path.is_file():
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
            first_npy.append(best_of(lambda: np.load(npy), repeats=1)[0])
            t, first = best_of(lambda: fstore.load_features(copy, "fs", "bench"), repeats=1)
            first_store.append(t)
            assert np.array_equal(emb, first.embeddings)
        t_npy, a = best_of(lambda: np.load(npy))
        t_store, feats = best_of(lambda: fstore.load_features(copy, "fs", "bench"))
        assert np.array_equal(a, feats.embeddings)
        side_files = [p for p in Path(d).rglob("*.arrow") if p.is_file()]
    f_npy, f_store = min(first_npy), min(first_store)
    shards = -(-args.rows // args.shard_rows)
    print(f"agepipe {agepipe.__version__} from {Path(agepipe.__file__).parent}; {args.rows:,} rows in {shards} "
          f"shards; {len(side_files)} .arrow files written by reads")
    print("| reader | first read, s | vs np.load | later reads, s | vs np.load |")
    print("|---|---|---|---|---|")
    print(f"| np.load (one .npy) | {f_npy:.3f} | 1.00x | {t_npy:.3f} | 1.00x |")
    print(f"| agepipe load_features | {f_store:.3f} | {f_npy / f_store:.2f}x | {t_store:.3f} | {t_npy / t_store:.2f}x |")


if __name__ == "__main__":
    main()
