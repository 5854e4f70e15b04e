"""`agepipe table`'s whole grid on a synthetic store the size of the real datasets, timed.

    python bench/table_device.py --device cuda            # on a GPU machine: the issue's < 2 minutes
    python bench/table_device.py --device cpu --quick     # the same code, tried on a CPU

The grid is the paper's: 2 tasks x 5 variants x {scratch, pre-trained on imdb-wiki} x 5 folds x
5 seeds (500 runs, and a pre-training per task and variant), each variant with its own hyper-parameters and the
paper's 30-epoch limit with early stopping. The store is tests/train/synthetic_store's mixture
at the sizes agepipe's extract leaves of the real datasets: Adience ~17,000 faces, IMDB ~180,000
and WIKI ~40,000 (--scale shrinks all three). Prints the wall time of the whole command, its
cells' own seconds and the table's first lines; `agepipe table` runs as its own process, its
lines printed as each cell finishes.
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.train.synthetic_store
from tests.train.synthetic_store import age_gender_store  # noqa: E402

SIZES = {"adience": 17_000, "imdb": 180_000, "wiki": 40_000}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2% of the sizes, 2 folds, 1 seed, 2 epochs")
    ap.add_argument("--cuda-graphs", action="store_true", help="agepipe table --cuda-graphs")
    args = ap.parse_args()
    scale = 0.02 if args.quick else args.scale
    extra = ["--folds", "0,1", "--seeds", "1", "--epochs", "2"] if args.quick else []
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        n = {k: max(200, int(v * scale)) for k, v in SIZES.items()}
        store = age_gender_store(Path(d) / "store", n_adience=n["adience"], n_imdb=n["imdb"], n_wiki=n["wiki"])
        print(f"synthetic store: adience {n['adience']}, imdb {n['imdb']}, wiki {n['wiki']} rows "
              f"({time.perf_counter() - t:.1f} s to write)")
        out = Path(d) / "table"
        # A process of its own, as a user runs it: its cell lines reach the log as each cell finishes,
        # so a run the device's time limit cuts short still says how far it got.
        cmd = [sys.executable, "-m", "agepipe", "table", "--store", str(store), "--out", str(out),
               "--device", args.device, *extra, *(["--cuda-graphs"] if args.cuda_graphs else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        sys.stdout.flush()
        t = time.perf_counter()
        code = subprocess.call(cmd, env=env)
        wall = time.perf_counter() - t
        if code:
            sys.exit(code)
        with open(out / "table.csv") as f:
            rows = list(csv.DictReader(f))
        runs = sum(int(r["runs"]) for r in rows)
        cells = sum(float(r["seconds"]) for r in rows)
        pretrain = sum(float(r["pretrain_seconds"] or 0) for r in rows)
        flags = f"--device {args.device}" + " --cuda-graphs" * args.cuda_graphs
        print(f"agepipe table {flags}: {len(rows)} cells, {runs} runs, {wall:.1f} s wall "
              f"(its cells' own {cells:.1f} s include {pretrain:.1f} s of pre-training); "
              f"target: the whole grid < 120 s on one H100/H200")
        print("\n".join((out / "table.md").read_text().splitlines()[:8]))


if __name__ == "__main__":
    main()
