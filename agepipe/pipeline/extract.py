"""`agepipe extract`: manifest -> shards -> Dask tasks -> feature store.

The manifest is cut into shards of ``shard_rows`` consecutive rows (the same manifest
always gives the same shards). Each shard is one task: decode its photos on a few
threads, detect in batches, choose one face per photo, align, embed in batches, and
write the shard atomically. A shard on disk whose rows digest matches is finished, so a
rerun (after a crash, Ctrl-C or a killed worker) does only what is missing. When every
shard is written, one commit makes this cut the dataset's content (store.commit_shards):
an earlier cut of other shard sizes or --limit is replaced, never mixed in. A shard
whose task keeps failing is redone one photo per task, so a photo that kills its worker
costs that photo (status "worker_lost"), never the shard or the run.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections import Counter
from dataclasses import asdict, astuple, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from distributed.diagnostics.plugin import WorkerPlugin

from agepipe.features import store as fstore
from agepipe.pipeline import STAGES


@dataclass(frozen=True)
class ExtractConfig:
    """Plain values a worker needs to build its own models (never the models themselves)."""
    pack: str
    det_size: int = 640
    runtime: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 0            # onnxruntime intra-op threads per worker; 0 = its default
    decode_threads: int = 4
    batch_size: int = 16        # photos per detector batch; 0: the device pipeline sizes it
    decoders: str = ""          # the device pipeline's: "threads", "processes", "" its default
    detector_sha256: str = ""   # what the client hashed: a worker with other files refuses
    recognizer_sha256: str = ""


def default_batch_size(runtime: str, device: str) -> int:
    """Photos per batch: on a GPU 0, sized by each worker from its GPU's free memory (up to 256;
    the device pipeline's detector and recogniser run whole batches); on CPUs 16 (onnxruntime
    gains little from more)."""
    return 0 if runtime == "torch" and device == "cuda" else 16


def default_shard_rows(runtime: str, device: str) -> int:
    """Rows per shard: each shard fills and drains the device pipeline's two batches once (and
    waits for the device behind the previous shard), so a GPU gets 16 batches of 256 per shard."""
    return 4096 if runtime == "torch" and device == "cuda" else 1000


# --- on the worker ----------------------------------------------------------------------

_EMBEDDERS: dict = {}


class IgnoreCtrlC(WorkerPlugin):
    """A Dask worker plugin for workers this run started: a terminal's Ctrl-C reaches every
    process of its group, and the client alone should answer it (stop, cancel, close the
    cluster), not each worker with its own KeyboardInterrupt traceback."""
    name = "agepipe-ignore-ctrl-c"

    def setup(self, worker):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


HEARTBEAT_AT_CLOSE = "Failed to communicate with scheduler during heartbeat"


def closing_heartbeat_filter(worker):
    """A logging filter for a worker this run started: its heartbeat can race its own close and log
    a ConnectionPool traceback after a finished run (seen once in a test suite under load). That
    record is dropped while the worker closes; the same error while it runs still shows."""
    from distributed.core import Status

    closing = (Status.closing, Status.closing_gracefully, Status.closed)
    return lambda record: not (record.getMessage().startswith(HEARTBEAT_AT_CLOSE) and worker.status in closing)


class QuietClose(WorkerPlugin):
    name = "agepipe-quiet-close"

    def setup(self, worker):
        import logging

        logging.getLogger("distributed.worker").addFilter(closing_heartbeat_filter(worker))


def worker_embedder(cfg: ExtractConfig):
    """Models are loaded once per worker process, on the worker, and kept under the model files'
    identity (sha256): a long-lived worker never serves old files under a new feature set."""
    key = astuple(cfg)
    if key not in _EMBEDDERS:
        from agepipe.features.embed import FaceEmbedder
        from agepipe.features.models import ModelError, file_sha256, resolve_pack

        pack = resolve_pack(cfg.pack, download=False)
        for path, expected in ((pack.detector, cfg.detector_sha256), (pack.recognizer, cfg.recognizer_sha256)):
            if expected and file_sha256(path) != expected:
                raise ModelError(f"{path} on this worker differs from the client's (sha256)")
        if cfg.runtime == "torch":  # the device-resident pipeline (features/gpu.py), on CUDA or the CPU
            from agepipe.features.gpu import DevicePipeline

            _EMBEDDERS[key] = DevicePipeline(pack, det_size=cfg.det_size, device=cfg.device,
                                             batch_size=cfg.batch_size, decode_threads=cfg.decode_threads,
                                             decoders=cfg.decoders or None)
        else:
            _EMBEDDERS[key] = FaceEmbedder(pack, det_size=cfg.det_size, device=cfg.device,
                                           runtime=cfg.runtime, threads=cfg.threads)
    return _EMBEDDERS[key]


def load_models(cfg: ExtractConfig) -> int:
    """Loads this worker's models; returns its batch size (the device pipeline may size it)."""
    return getattr(worker_embedder(cfg), "batch_size", cfg.batch_size)


def _blank_features(n: int) -> dict:
    return {"n_faces": np.zeros(n, np.int16), "det_score": np.full(n, np.nan, np.float32),
            "bbox": np.zeros((n, 4), np.float32), "landmarks": np.zeros((n, 10), np.float32),
            "embedding": np.zeros((n, fstore.EMBEDDING_DIM), np.float32), "embedding_norm": np.full(n, np.nan, np.float32)}


def embed_rows(rows: pa.Table, data_root: str, cfg: ExtractConfig, timings: Counter) -> pa.Table:
    """The shard table for manifest rows: features for rows whose status is "ok", the
    manifest's status kept for the others, a status saying why for photos that fail."""
    from agepipe.features.align import norm_crop
    from agepipe.features.embed import choose_face
    from agepipe.features.images import ImageError, read_photos

    embedder = worker_embedder(cfg)
    n = rows.num_rows
    status = np.array(rows["status"].to_pylist(), dtype=object)
    hints = rows["face_hint"].to_pylist()
    feats = _blank_features(n)
    todo = [i for i in range(n) if status[i] == "ok"]
    image_ids = rows["image_id"].to_pylist()
    paths = [os.path.join(data_root, image_ids[i]) for i in todo]
    if cfg.runtime == "torch":
        _embed_on_device(embedder, paths, [hints[i] for i in todo], np.array(todo, np.int64), status, feats, timings)
        return _embedded(rows, status, feats, timings)

    def process(batch):
        t = time.perf_counter()
        dets = embedder.detector([photo.pixels for _, photo in batch])
        timings["detect"] += time.perf_counter() - t
        t = time.perf_counter()
        crops, chosen = [], []
        for (i, photo), det in zip(batch, dets):
            feats["n_faces"][i] = len(det)
            if not len(det):
                status[i] = "no_face"
                continue
            timings["faces_rescued"] += det.rescued  # a count among the times, popped in extract_shard
            hint = None if hints[i] is None else np.asarray(hints[i], np.float32) / photo.scale
            k = choose_face(det, photo.pixels.shape, hint)
            crops.append(norm_crop(photo.pixels, det.landmarks[k]))
            chosen.append((i, photo.scale, det, k))
        timings["align"] += time.perf_counter() - t
        t = time.perf_counter()
        emb, norms = embedder.embed_crops(crops)
        timings["embed"] += time.perf_counter() - t
        for (i, scale, det, k), e, norm in zip(chosen, emb, norms):
            feats["det_score"][i] = det.scores[k]
            feats["bbox"][i] = det.boxes[k] * scale
            feats["landmarks"][i] = det.landmarks[k].reshape(-1) * scale
            feats["embedding"][i] = e
            feats["embedding_norm"][i] = norm

    batch = []
    photos = iter(read_photos(paths, threads=cfg.decode_threads, prefetch=4 * cfg.batch_size))
    for i in todo:
        t = time.perf_counter()
        _, photo = next(photos)
        timings["decode"] += time.perf_counter() - t  # time inference waited on decoding
        if isinstance(photo, ImageError):
            status[i] = photo.status
            continue
        batch.append((i, photo))
        if len(batch) >= cfg.batch_size:
            process(batch)
            batch = []
    if batch:
        process(batch)
    return _embedded(rows, status, feats, timings)


def _embedded(rows: pa.Table, status, feats: dict, timings: Counter) -> pa.Table:
    # Rows the models took through to an embedding: proof for run_tasks that they work.
    timings["embedded"] += int((status == "ok").sum())  # a count among the times, popped in extract_shard
    return shard_table(rows, status, feats)


def _embed_on_device(pipeline, paths, hints, todo: np.ndarray, status, feats: dict, timings: Counter):
    """Fill status and features for rows ``todo`` from the device-resident pipeline."""
    from agepipe.features.gpu import unpack

    errors, packed = pipeline.extract(paths, hints, timings)
    decoded = np.array([e is None for e in errors], dtype=bool)
    if "worker_lost" in errors and not decoded.any():
        raise DecodersLost(f"{errors.count('worker_lost')} of {len(errors)} photos crashed their decode process, "
                           "none was decoded")
    status[todo[~decoded]] = [e for e in errors if e is not None]
    found = unpack(packed)
    feats["n_faces"][todo[decoded]] = found["n_faces"][decoded]
    face = decoded & (found["n_faces"] > 0)
    status[todo[decoded & ~face]] = "no_face"
    for name, column in found.items():
        if name != "n_faces":
            feats[name][todo[face]] = column[face]


class DecodersLost(Exception):
    """Every photo of a call that its decode processes took crashed them, none decoded: the decoders
    are broken (/dev/shm filled after its check makes each write to a slot a SIGBUS), not the photos.
    Raised as a dead worker would fail the task, so run_tasks's policy for those applies: redone photo
    by photo, each such photo worker_lost, and a shard none of whose photos gets through stops the run."""


def shard_table(rows: pa.Table, status, feats: dict) -> pa.Table:
    ok = np.asarray(status == "ok", dtype=bool)
    columns = {name: rows[name] for name in fstore.MANIFEST_SCHEMA.names if name != "status"}
    return pa.table({
        **columns,
        "status": pa.array(list(status), pa.string()),
        "n_faces": pa.array(feats["n_faces"]),
        "det_score": pa.array(feats["det_score"], mask=~ok),
        "bbox": fstore.fixed_list(feats["bbox"], 4, ok),
        "landmarks": fstore.fixed_list(feats["landmarks"], 10, ok),
        "embedding": fstore.fixed_list(feats["embedding"], fstore.EMBEDDING_DIM, ok),
        "embedding_norm": pa.array(feats["embedding_norm"], mask=~ok),
    }, schema=fstore.SHARD_SCHEMA)


def extract_shard(task: dict) -> dict:
    """One Dask task: a shard's rows in, a shard file out; returns counts and stage times."""
    cfg = ExtractConfig(**task["config"])
    rows = pa.Table.from_pylist(task["rows"], schema=fstore.MANIFEST_SCHEMA)
    timings: Counter = Counter()
    started = time.perf_counter()
    if task.get("keep_from"):
        table = _keep_results(task["store"], task["keep_from"], rows, task["data_root"], cfg, timings,
                              task["retry_failed"])
    else:
        table = embed_rows(rows, task["data_root"], cfg, timings)
    embedded = timings.pop("embedded", 0)
    if not task.get("write", True):
        return {"table": table, "embedded": embedded, "seconds": time.perf_counter() - started}
    t = time.perf_counter()
    path = fstore.write_shard(table, task["store"], task["feature_set"], task["dataset"], task["index"], task["inputs"])
    check_run_current(task, path)
    timings["write"] += time.perf_counter() - t
    return {"dataset": task["dataset"], "index": task["index"], "file": path.rsplit("/", 1)[-1], "rows": table.num_rows,
            "status": dict(Counter(table["status"].to_pylist())), "faces_rescued": timings.pop("faces_rescued", 0),
            "kept": int(timings.pop("kept", 0)), "embedded": embedded, "timings": dict(timings),
            "seconds": time.perf_counter() - started, "worker_pid": os.getpid()}


def check_run_current(task: dict, path: str) -> None:
    """After a shard is written: StoreError if a commit replaced the index its run planned from. A
    task that a stopped run cancelled keeps running on a cluster the run did not start (Dask cannot
    stop a running task) and may finish after the next run's commit; its shard, which no index
    lists, is deleted again, so the folder holds the listed shards only. Checked after the rename:
    a commit before it deletes the file itself. One small read per shard."""
    index = fstore.index_to_replace(task["store"], task["feature_set"], task["dataset"])
    if (index.generation if index else None) == task.get("generation"):
        return
    if not index or path.rsplit("/", 1)[-1] not in {e.file for e in index.shards}:  # listed: a later run kept it
        fstore.remove_file(task["store"], path)
    raise fstore.index_changed(task["store"], task["feature_set"], task["dataset"])


def _keep_results(store: str, path: str, rows: pa.Table, data_root: str, cfg: ExtractConfig,
                  timings: Counter, retry_failed: bool) -> pa.Table:
    """A finished shard's results for the same photos, under the manifest rows as they are now
    (their labels may have changed since); with --retry-failed its transient failures redone."""
    existing = fstore.read_shard_file(store, path)
    if not existing["image_id"].equals(rows["image_id"]):
        raise fstore.StoreError(f"{path}: holds other photos than the manifest rows it was planned for; "
                                "rerun the extract")
    redo = to_retry(existing["status"].to_pylist(), rows["status"].to_pylist()) if retry_failed \
        else np.zeros(rows.num_rows, dtype=bool)
    keep = pa.array(~redo)
    kept, labels = existing.filter(keep), rows.filter(keep)
    for name in fstore.MANIFEST_SCHEMA.names:
        if name != "status":  # the shard's status is what extraction found
            kept = kept.set_column(kept.schema.get_field_index(name), name, labels[name])
    kept = kept.cast(fstore.SHARD_SCHEMA)
    timings["kept"] += kept.num_rows
    if not redo.any():
        return kept
    redone = embed_rows(rows.filter(pa.array(redo)), data_root, cfg, timings)
    positions = np.concatenate([np.flatnonzero(~redo), np.flatnonzero(redo)])
    merged = pa.concat_tables([kept, redone])
    return merged.take(pa.array(np.argsort(positions, kind="stable")))


# --- on the client ----------------------------------------------------------------------

# Statuses extraction gives; a manifest holding one was not written by a dataset module.
EXTRACT_STATUSES = frozenset({"no_face", "decode_error", "read_error", "not_a_file", "too_large",
                              *fstore.TRANSIENT_STATUSES})


def manifest_table(data_dir: str, dataset: str) -> pa.Table:
    """The manifest's rows, checked where they will become paths and statuses: a duplicated
    image_id or a status no dataset gives is refused (naming the row); an image_id that would
    leave the dataset's folder costs that row (status "bad_path")."""
    import re

    from agepipe.datasets import REGISTRY, choices
    from agepipe.datasets.manifest import is_safe_relpath, manifest_path
    from agepipe.paths import check_name

    check_name(dataset, "--dataset")
    path = manifest_path(data_dir, dataset)
    if not path.exists() and dataset not in REGISTRY:  # a typo: not "download it first", which download refuses
        raise FileNotFoundError(f"unknown dataset {dataset!r}: agepipe knows {', '.join(choices())}, and there "
                                f"is no manifest at {path}")
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}; run `agepipe download --dataset {dataset}` first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable manifest ({e}); rebuild it with "
                         f"`agepipe download --dataset {dataset}`") from None
    missing = set(fstore.MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    try:
        table = table.select(fstore.MANIFEST_SCHEMA.names).cast(fstore.MANIFEST_SCHEMA)
    except (pa.ArrowException, ValueError) as e:  # values that do not fit the manifest's types
        raise ValueError(f"{path}: not a manifest agepipe reads ({e}); rebuild it with "
                         f"`agepipe download --dataset {dataset}`") from None
    image_ids = table["image_id"].to_pylist()
    status = table["status"].to_pylist()
    seen: dict[str, int] = {}
    for row, (image_id, s) in enumerate(zip(image_ids, status)):
        if image_id in seen:
            raise ValueError(f"{path}: row {row} repeats image_id {image_id!r} of row {seen[image_id]}; "
                             f"rebuild the manifest with `agepipe download --dataset {dataset}`")
        seen[image_id] = row
        if s in EXTRACT_STATUSES or not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", s):
            raise ValueError(f"{path}: row {row} ({image_id!r}) has status {s!r}, which no dataset's "
                             "manifest gives")
    bad = [i for i, (image_id, s) in enumerate(zip(image_ids, status)) if s == "ok" and not is_safe_relpath(image_id)]
    if bad:
        for i in bad:
            status[i] = "bad_path"
        table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    return table


def cut_shard_rows(index: fstore.Index | None, default: int) -> int:
    """The shard size of the dataset's committed cut: a rerun without --shard-rows (after a crash,
    a --limit, for --retry-failed or a relabel) finds its shards, where another size would cut
    every shard anew and read every photo again. One shard tells only that it was at least its rows."""
    if not index or not index.shards:
        return default
    first = index.shards[0].rows
    return first if len(index.shards) > 1 else max(first, default)


def uncommitted_cut_rows(store: str, manifest: pa.Table, on_disk: dict, default: int) -> int:
    """The shard size of a run that stopped before its first commit (no index yet), from its
    first shard on disk: rerun without its --shard-rows, the default would cut every shard anew
    and read every photo again. ``default`` when no shard 0 holds the manifest's first rows."""
    for digest, found in on_disk.items():
        for path, _ in found:
            if path.rsplit("/", 1)[-1].startswith("part-00000"):
                try:
                    rows = fstore.read_shard_file(store, path, columns=["image_id"]).num_rows
                except fstore.StoreError:  # gone or damaged since it was listed: not a cut to follow
                    continue
                if digest == fstore.rows_digest(manifest.slice(0, rows)):
                    return rows if rows < manifest.num_rows else max(rows, default)
    return default


def plan_shards(manifest: pa.Table, shard_rows: int) -> list[pa.Table]:
    return [manifest.slice(start, shard_rows) for start in range(0, manifest.num_rows, shard_rows)]


def to_retry(statuses: list[str], manifest_statuses: list[str]) -> np.ndarray:
    """Rows --retry-failed redoes: transient failures, and photos the manifest lists that were
    missing when extracted (they may have arrived since)."""
    shard, manifest = np.array(statuses, dtype=object), np.array(manifest_statuses, dtype=object)
    return np.isin(shard, list(fstore.TRANSIENT_STATUSES)) | ((shard == "missing_image") & (manifest == "ok"))


def shard_has_transient(store: str, path: str, rows: pa.Table) -> bool:
    statuses = fstore.read_shard_file(store, path, columns=["status"])["status"].to_pylist()
    return bool(to_retry(statuses, rows["status"].to_pylist()).any())


@dataclass
class Cut:
    """One dataset's shards as this run cuts them: (start, rows, digest, inputs digest,
    finished path or None)."""
    shards: list[tuple[int, int, str, str, str | None]]
    manifest: str             # the manifest file cut, and its sha256 (both "" when there is none)
    manifest_sha256: str
    generation: str | None    # the index planned from, so a commit notices another writer


@dataclass
class Plan:
    tasks: list[dict]
    skipped: int          # finished shards left alone
    skipped_rows: int
    cuts: dict[str, Cut]


def make_plan(manifests: dict[str, pa.Table], data_dir: str, store: str, feature_set: str,
              cfg: ExtractConfig, shard_rows: int | None, retry_failed: bool, manifest_sha256: dict[str, str],
              default_rows: int = 1000) -> Plan:
    """Tasks for the shards not yet on disk. A shard counts as finished when a complete file
    holding exactly its rows, made from the manifest rows as they are now, exists, listed in
    the index or left by a run that crashed before its commit. ``manifest_sha256``: each
    manifest file's, hashed before its rows were read (read_manifests). ``shard_rows`` None:
    each dataset's committed cut's (cut_shard_rows)."""
    from agepipe.datasets.manifest import manifest_path

    tasks, skipped, skipped_rows, cuts = [], 0, 0, {}
    for dataset, manifest in manifests.items():
        fstore.remove_stale_temporaries(store, feature_set, dataset)
        index = fstore.index_to_replace(store, feature_set, dataset)
        on_disk = fstore.shards_on_disk(store, feature_set, dataset)
        listed = {e.file for e in index.shards} if index else set()
        placed = {(e.start, e.rows): e for e in index.shards} if index else {}
        data_root = os.path.join(os.path.expanduser(data_dir), dataset)
        shards = []
        start = 0
        size = shard_rows or (cut_shard_rows(index, default_rows) if index else
                              uncommitted_cut_rows(store, manifest, on_disk, default_rows))
        for index_no, rows in enumerate(plan_shards(manifest, size)):
            digest, inputs = fstore.rows_digest(rows), fstore.inputs_digest(rows)
            # A shard from before inputs were recorded (None) is taken as made from these rows.
            found = sorted((p for p, made_from in on_disk.get(digest, []) if made_from in (None, inputs)),
                           key=lambda p: p.rsplit("/", 1)[-1] not in listed)
            path = found[0] if found else None
            task = {"rows": rows.to_pylist(), "data_root": data_root, "store": store, "feature_set": feature_set,
                    "dataset": dataset, "index": index_no, "inputs": inputs, "retry_failed": retry_failed,
                    "config": asdict(cfg), "generation": index.generation if index else None}
            shards.append((start, rows.num_rows, digest, inputs, path))
            place, start = (start, rows.num_rows), start + rows.num_rows
            if path:
                if not (retry_failed and shard_has_transient(store, path, rows)):
                    skipped += 1
                    skipped_rows += rows.num_rows
                    continue
                task["keep_from"] = path
            else:
                task["keep_from"] = same_photos(store, on_disk, placed.get(place), rows, inputs)
                task["relabel"] = task["keep_from"] is not None
            tasks.append(task)
        sha256 = manifest_sha256.get(dataset, "")
        manifest_file = os.path.abspath(manifest_path(data_dir, dataset)) if sha256 else ""
        cuts[dataset] = Cut(shards, manifest_file, sha256, index.generation if index else None)
    return Plan(tasks, skipped, skipped_rows, cuts)


def same_photos(store: str, on_disk: dict, entry: fstore.ShardEntry | None, rows: pa.Table,
                inputs: str) -> str | None:
    """The committed shard at these rows' place, when it holds the same photos made from the same
    inputs and only their labels (subject, fold, age, gender) changed since, e.g. a manifest
    rebuilt after a fix of its labels: its results are kept under the new labels, not extracted
    again. None otherwise, and for a shard that recorded no inputs: its statuses may be stale."""
    if entry is None:
        return None
    for path, made_from in on_disk.get(entry.digest, []):
        if path.rsplit("/", 1)[-1] == entry.file and made_from == inputs:
            ids = fstore.read_shard_file(store, path, columns=["image_id"])["image_id"]
            return path if ids.equals(rows["image_id"]) else None
    return None


def check_photos_there(client, tasks: list[dict], sample: int = 64) -> None:
    """A dataset none of whose photos is where its manifest says (not unpacked, another
    --data-dir, a worker that does not mount them) is a setup error: it would become a
    "missing_image" row for every photo, which a rerun keeps. Every worker looks, where the
    photos are read, at the first ``sample`` photos to do of each dataset."""
    wanted: dict[str, list[str]] = {}
    for task in tasks:
        if task.get("keep_from") and not task["retry_failed"]:
            continue  # a relabelled shard: its results kept, its photos not read
        paths = wanted.setdefault(task["data_root"], [])
        paths += [os.path.join(task["data_root"], r["image_id"]) for r in task["rows"][:sample - len(paths)]
                  if r["status"] == "ok"]
    absent_roots = on_every_worker(client, "was looking for the photos", roots_without_photos, wanted)
    for worker, absent in sorted(absent_roots.items()):
        for root in absent:
            paths, dataset = wanted[root], os.path.basename(root)
            raise ExtractError(f"{root}: none of the first {len(paths)} photos its manifest lists is there (the "
                               f"first: {paths[0]}; seen from worker {worker}); unpack them with `agepipe download "
                               f"--dataset {dataset}`, or give the --data-dir that holds them")


def on_every_worker(client, doing: str, function, *args) -> dict:
    """client.run: {worker: ``function(*args)``} from every worker. A worker that dies meanwhile (the
    kernel's OOM killer picks one as it loads its models, the memory peak) is ExtractError, not
    Dask's CommClosedError traceback; an error ``function`` raises is raised as it is."""
    from distributed.comm import CommClosedError

    try:
        return client.run(function, *args)
    except CommClosedError as e:
        raise ExtractError(f"a Dask worker died while it {doing} ({e}); if it ran out of memory, free memory or "
                           "ask for fewer workers (--workers N), then rerun (finished shards are kept)") from None


def roots_without_photos(wanted: dict[str, list[str]]) -> list[str]:
    """On a worker: the dataset folders none of whose ``wanted`` photos this process sees."""
    return [root for root, paths in wanted.items() if paths and not any(os.path.lexists(p) for p in paths)]


def commit_plan(plan: Plan, results: list[dict], store: str, feature_set: str) -> None:
    """After every task has written its shard: list this cut's shards in each dataset's index
    (replacing the old cut in one rename) and delete the shards it leaves out. A shard redone
    by this run is the file its result names: another holding its rows (a killed run's, whose
    failed photos may have failed again) is not what this run did."""
    written = {(r["dataset"], r["index"]): r["file"] for r in results}
    for dataset, cut in plan.cuts.items():
        entries = []
        redone = {t["index"] for t in plan.tasks if t["dataset"] == dataset}
        for index_no, (start, rows, digest, inputs, path) in enumerate(cut.shards):
            if index_no in redone:
                if (dataset, index_no) not in written:
                    raise fstore.StoreError(f"shard {index_no} of {dataset} was not written, so nothing was "
                                            f"committed; rerun `agepipe extract --dataset {dataset}`")
                path = written[dataset, index_no]
            entries.append(fstore.ShardEntry(path.rsplit("/", 1)[-1], start, rows, digest))
        # Every task has ended: a temporary now is a killed worker's, which it could not remove.
        fstore.remove_stale_temporaries(store, feature_set, dataset)
        fstore.commit_shards(store, feature_set, dataset, entries, cut.manifest_sha256, cut.generation, cut.manifest)


class ExtractError(Exception):
    """The run cannot go on (a setup error or a bug, not a photo); the message says why."""


def _is_setup_error(error: BaseException) -> bool:
    """Failures no photo causes: missing or mismatched models, missing packages, a store that
    refuses writes (a full disk: redoing the shard photo by photo would end in the same write), another
    writer's commit (the run's own would be refused)."""
    from agepipe.features.models import ModelError

    return isinstance(error, (ModelError, ImportError, MemoryError, fstore.StoreWriteError, fstore.IndexChanged))


def run_tasks(client, tasks: list[dict], progress: bool) -> list[dict]:
    """Submit shards, follow them with a progress bar over photos, and fall back to one task
    per photo for a shard that keeps failing. A setup error stops the run (ExtractError) and
    cancels what is left: it would otherwise become an "error" row for every photo.

    A rescued shard where photos got through the models is written, its failed photos as rows.
    Where none did, the models are to blame, not the photos (a failed photo's task raised, or its
    worker died: a native crash in the models kills the worker on every photo): with two or more
    failed photos the run stops (a setup error or a bug); a lone failed photo costs its row when a shard of its
    dataset has gone through the models since the last such failure (so a fault that persists
    is not excused by old successes), and until then waits unwritten: a second such shard, or
    the run's end without that proof, stops the run."""
    from distributed import as_completed
    from tqdm import tqdm

    total = sum(len(t["rows"]) for t in tasks)
    bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, smoothing=0.1)
    futures = {client.submit(extract_shard, t, key=f"shard-{t['dataset']}-{t['index']:05d}-{time.time_ns()}",
                             retries=1, pure=False): t for t in tasks}
    results, waiting = [], []
    proof: dict[str, bool] = {}  # per dataset: photos got through the models since the last lone failure

    def done(result: dict) -> None:
        results.append(result)
        bar.update(result["rows"])

    try:
        for future in as_completed(futures):
            task = futures[future]
            try:
                result = future.result()
            except Exception as e:  # KilledWorker, or an error the photo-by-photo pass will pin down
                if _is_setup_error(e):
                    raise ExtractError(f"shard {task['index']} of {task['dataset']}: {type(e).__name__}: {e}") from None
                result = _rescue_shard(client, task, e)
                if result["lost"] and not result["embedded"]:
                    if len(result["lost"]) > 1:
                        raise _models_failed(task, result)
                    if not proof.pop(task["dataset"], False):
                        if waiting:
                            raise _models_failed(task, result)
                        waiting.append((task, result))
                        continue
                _write_rescued(task, result)
            if result["embedded"]:
                proof[task["dataset"]] = True
            done(result)
        for task, result in waiting:  # at most one: a second would have stopped the run
            if not proof.pop(task["dataset"], False):
                raise _models_failed(task, result)
            _write_rescued(task, result)
            done(result)
    finally:
        client.cancel(list(futures))  # nothing left running after an error or Ctrl-C
        bar.close()
    return results


def _models_failed(task: dict, result: dict) -> ExtractError:
    lost = result["lost"]
    return ExtractError(f"shard {task['index']} of {task['dataset']}: every photo that reached the models failed "
                        f"({len(lost)} photo{'s' if len(lost) > 1 else ''}; {lost[0]['image_id']}: "
                        f"{lost[0]['error']}), none got through them: not the photos' fault; nothing written for it")


def _rescue_shard(client, task: dict, error: Exception) -> dict:
    """Redo a failed shard one photo per task; a photo whose task fails is recorded as
    "worker_lost" (its worker died) or "error" (it raised), and a rerun with --retry-failed
    tries it again. Returns the shard's result with its table, not yet written."""
    started = time.perf_counter()
    singles = [{**task, "rows": [row], "write": False, "keep_from": None} for row in task["rows"]]
    futures = [client.submit(extract_shard, s, retries=0, pure=False,
                             key=f"photo-{task['dataset']}-{task['index']}-{i}-{time.time_ns()}")
               for i, s in enumerate(singles)]
    from distributed import KilledWorker

    tables, lost, embedded = [], [], 0
    for row, future in zip(task["rows"], futures):
        try:
            single = future.result()
            tables.append(single["table"])
            embedded += single["embedded"]
        except Exception as e:
            if _is_setup_error(e):
                client.cancel(futures)
                raise ExtractError(f"{row['image_id']}: {type(e).__name__}: {e}") from None
            status = "worker_lost" if isinstance(e, (KilledWorker, DecodersLost)) else "error"
            lost.append({"image_id": row["image_id"], "status": status, "error": f"{type(e).__name__}: {e}"})
            rows = pa.Table.from_pylist([row], schema=fstore.MANIFEST_SCHEMA)
            tables.append(shard_table(rows, np.array([status], dtype=object), _blank_features(1)))
    table = pa.concat_tables(tables)
    return {"dataset": task["dataset"], "index": task["index"], "rows": table.num_rows,
            "status": dict(Counter(table["status"].to_pylist())), "embedded": embedded, "timings": {},
            "seconds": time.perf_counter() - started, "rescued": f"{type(error).__name__}: {error}",
            "lost": lost, "table": table}


def _write_rescued(task: dict, result: dict) -> None:
    path = fstore.write_shard(result.pop("table"), task["store"], task["feature_set"], task["dataset"], task["index"],
                              task["inputs"])
    result["file"] = path.rsplit("/", 1)[-1]


def run_stats(results: list[dict], wall: float) -> dict:
    """One run's statuses, stage timings and throughput, as feature_set.json's "runs" record them."""
    status: Counter = Counter()
    timings: Counter = Counter()
    for r in results:
        status.update(r["status"])
        timings.update(r.get("timings", {}))
    rows = sum(r["rows"] for r in results)
    kept = sum(r.get("kept", 0) for r in results)  # results kept from finished shards: not extracted
    return {"rows": rows, "kept": kept, "status": dict(sorted(status.items())), "wall_seconds": round(wall, 3),
            "images_per_second": round((rows - kept) / wall, 2) if wall > 0 else None,
            "stage_seconds": {s: round(timings.get(s, 0.0), 3) for s in STAGES},
            "faces_rescued": sum(r.get("faces_rescued", 0) for r in results),  # found only by face rescue
            "rescued_shards": [r["index"] for r in results if "rescued" in r],
            "lost": [lost for r in results for lost in r.get("lost", [])],
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_environment(cfg: ExtractConfig, layout, workers_env: dict) -> dict:
    """What ran an extract (recorded with each run; feature_set.json's top level keeps the last)."""
    from importlib.metadata import PackageNotFoundError, version

    import cv2

    import agepipe

    versions = {}
    for name in ("onnxruntime", "numpy", "pyarrow", "dask", "torch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    # OpenCV resizes and warps every face: its own version, whichever of its wheels (opencv-python,
    # -headless, -contrib) installed it; a version by distribution name missed all but one.
    versions["opencv"] = cv2.__version__
    return {"runtime": cfg.runtime, "device": cfg.device, "agepipe_version": agepipe.__version__,
            "versions": versions,
            "cluster": {"mode": layout.mode, "workers": layout.workers, "worker_env": workers_env}}


def feature_set_info(feature_set: str, identity: dict, environment: dict) -> dict:
    return {"name": feature_set, **identity, **environment,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def read_manifests(data_dir: str, names: list[str]) -> tuple[dict[str, pa.Table], dict[str, str]]:
    """Each dataset's manifest rows (manifest_table) and its file's sha256, hashed before it is
    read: a manifest rebuilt meanwhile is recorded as the older file, so training warns that its
    labels changed rather than taking the store's for the new ones."""
    from agepipe.datasets.manifest import manifest_path
    from agepipe.hashing import file_sha256

    tables, hashed = {}, {}
    for name in names:
        path = manifest_path(data_dir, name)
        hashed[name] = file_sha256(str(path)) if path.is_file() else ""
        tables[name] = manifest_table(data_dir, name)
    return tables, hashed


def check_limit_keeps_rows(store: str, feature_set: str, manifests: dict[str, pa.Table], limit: int) -> None:
    """--limit is a quick try: it never shrinks a dataset the store already holds more of (its
    commit would replace the whole cut with the first rows, hours of extraction at IMDB-WIKI's size).
    ``manifests``: whole, before the limit's cut."""
    for name, manifest in manifests.items():
        if manifest.num_rows <= limit:
            continue  # the limit cuts nothing: the extract is the one without it
        index = fstore.index_to_replace(store, feature_set, name)
        # The shards on disk count as well as those the index lists: an extract that stopped before
        # its commit (or a damaged index) leaves shards the next run would keep, and this one's
        # commit would delete.
        held = max(sum(e.rows for e in index.shards) if index else 0, fstore.rows_on_disk(store, feature_set, name))
        if held > limit:
            raise ValueError(f"{store}/{feature_set}/{name} holds {held} rows; --limit {limit} would replace them "
                             f"with the first {limit}. Run without --limit (finished shards are kept), "
                             "or try --limit on another --store")


def run_extract(datasets: list[str], data_dir: str, store: str, pack: str = "buffalo_s", det_size: int = 640,
                runtime: str = "onnxruntime", device: str = "cpu", shard_rows: int | None = None,
                limit: int | None = None, retry_failed: bool = False, scheduler: str | None = None,
                gpus: list[str] | None = None, workers: int | None = None, batch_size: int | None = None,
                decoders: str | None = None, progress: bool = True, echo=print) -> dict:
    """Extract the datasets' manifests into the store; returns the feature set's info."""
    from agepipe.datasets import expand_groups
    from agepipe.features.embed import feature_identity
    from agepipe.features.models import resolve_pack
    from agepipe.pipeline.cluster import dashboard_link, local_layout, open_client

    names = list(dict.fromkeys(expand_groups(datasets)))  # a dataset named twice is extracted once
    # Workers of an existing cluster resolve a relative path from their own working folder.
    data_dir, store = os.path.abspath(os.path.expanduser(data_dir)), fstore.absolute(store)
    whole, hashed = read_manifests(data_dir, names)
    manifests = {name: m.slice(0, limit) if limit else m for name, m in whole.items()}
    resolved = resolve_pack(pack)
    identity = feature_identity(resolved, det_size)
    feature_set = fstore.feature_set_name(f"{resolved.name}-det{det_size}", identity)
    if limit:
        check_limit_keeps_rows(store, feature_set, whole, limit)
    for name in names:
        fstore.check_no_writer(store, feature_set, name)

    # Starting worker processes takes seconds; say so before the wait.
    if scheduler:
        echo(f"connecting to the Dask scheduler at {scheduler}...")
    else:
        n = len(gpus) if gpus else local_layout(workers).workers
        echo(f"starting local Dask cluster ({n} {'GPU ' if gpus else ''}workers)...")
    with open_client(scheduler, gpus, workers) as (client, layout):
        cores = os.cpu_count() or 1
        threads = max(1, cores // layout.workers) if layout.mode == "local" else 0
        cfg = ExtractConfig(pack=pack, det_size=det_size, runtime=runtime, device=device, threads=threads,
                            decode_threads=layout.decode_threads,
                            batch_size=batch_size or default_batch_size(runtime, device), decoders=decoders or "",
                            detector_sha256=identity["detector_sha256"],
                            recognizer_sha256=identity["recognizer_sha256"])
        if layout.mode != "scheduler":  # a user's own workers keep their Ctrl-C and their logs
            client.register_plugin(IgnoreCtrlC())
            client.register_plugin(QuietClose())
        workers_env = on_every_worker(client, "was starting", lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        link = dashboard_link(client)
        echo(f"cluster: {layout.mode}, {layout.workers} worker processes"
             + (f", GPUs {','.join(layout.gpus)}" if layout.gpus else "")
             + (f"; dashboard {link}" if link else ""))
        echo(f"feature set: {feature_set} ({resolved.name}, det size {det_size}, {runtime} on {device})")

        with contextlib.ExitStack() as locks:
            for name in names:
                locks.enter_context(fstore.writer_lock(store, feature_set, name))
            plan = make_plan(manifests, data_dir, store, feature_set, cfg,
                             shard_rows, retry_failed, hashed, default_shard_rows(runtime, device))
            todo_rows = sum(len(t["rows"]) for t in plan.tasks)
            relabel = sum(bool(t.get("relabel")) for t in plan.tasks)
            echo(f"shards: {len(plan.tasks)} to do ({todo_rows} rows), {plan.skipped} already finished "
                 f"({plan.skipped_rows} rows)" + (f"; {relabel} of those to do only relabelled: the same photos, "
                                                  "their labels changed, their results kept" if relabel else ""))
            check_photos_there(client, plan.tasks)
            if plan.tasks:  # every worker loads its models first: a setup error stops the run before any shard
                batches = on_every_worker(client, "was loading its models", load_models, cfg)
                if not cfg.batch_size:
                    echo("batch size from each GPU's free memory: "
                         + ", ".join(f"{b} photos" for b in sorted(set(batches.values()))))
            # Recorded once the setup checks pass: a feature set listed without rows would make
            # `train` without --feature-set refuse a store whose only data is another's.
            environment = run_environment(cfg, layout, workers_env)

            def describe(info: dict) -> None:
                created = info.get("created")  # the feature set's, not this run's
                info.update(feature_set_info(feature_set, identity, environment))
                info["created"] = created or info["created"]

            fstore.update_feature_set_info(store, feature_set, describe)
            started = time.perf_counter()
            results = run_tasks(client, plan.tasks, progress)
            wall = time.perf_counter() - started
            commit_plan(plan, results, store, feature_set)
            # Counted under the locks: another extract's commit in between would fail this run's count
            stats = run_stats(results, wall)
            counts = fstore.status_counts(store, feature_set, names)  # another dataset's damage is not this run's

            def record_run(info: dict) -> None:
                info["counts"] = {**info.get("counts", {}), **counts}
                info.setdefault("runs", []).append({"datasets": names, "limit": limit, **environment, **stats})
                info["stats"] = {"images_per_second": stats["images_per_second"],
                                 "stage_seconds": stats["stage_seconds"]}

            fstore.update_feature_set_info(store, feature_set, record_run)
    return {"feature_set": feature_set, "stats": stats, "counts": counts}
