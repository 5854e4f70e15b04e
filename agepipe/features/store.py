"""The feature store: Parquet shards of embeddings, one folder per feature set.

Layout (DESIGN.md): ``STORE/<feature_set>/<dataset>/part-NNNNN-<id>.parquet``, the
dataset's ``_index.json`` and ``STORE/<feature_set>/feature_set.json``. A shard is written
under a temporary name, then renamed to a name no other write uses; it becomes part of
the dataset when a commit replaces the index (also by rename) with one that lists it, and
the shards the new index leaves out are then deleted. Readers follow the index only, so
they see one cut of the manifest, each row once, whatever runs came before. ``STORE`` may
be any fsspec URL. Reading writes nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import os
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

import fsspec
import fsspec.implementations.local
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from agepipe.atomic import flock, open_atomic
from agepipe.features.plain_column import read_float_lists

EMBEDDING_DIM = 512

MANIFEST_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("subject_id", pa.string()),
    pa.field("fold", pa.int8()),
    pa.field("age", pa.float32()),
    pa.field("age_bin", pa.int8()),
    pa.field("gender", pa.int8()),
    pa.field("face_hint", pa.list_(pa.float32(), 4)),
    pa.field("status", pa.string(), nullable=False),
]
MANIFEST_SCHEMA = pa.schema(MANIFEST_FIELDS)

FEATURE_FIELDS = [
    pa.field("n_faces", pa.int16()),
    pa.field("det_score", pa.float32()),
    pa.field("bbox", pa.list_(pa.float32(), 4)),
    pa.field("landmarks", pa.list_(pa.float32(), 10)),
    pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
    pa.field("embedding_norm", pa.float32()),
]
SHARD_SCHEMA = pa.schema(MANIFEST_FIELDS + FEATURE_FIELDS)

# Statuses a rerun with --retry-failed tries again: the image may be fine next time.
TRANSIENT_STATUSES = frozenset({"error", "worker_lost"})

SHARD_GLOB = "part-*.parquet"


def fixed_list(values: np.ndarray | None, width: int, valid: np.ndarray | None = None) -> pa.Array:
    """A fixed_size_list<float32>[width] array from an (n, width) matrix; rows where
    ``valid`` is False hold NaN, never null: pyarrow before 26 cannot read a Parquet
    fixed_size_list column with a null entry."""
    values = np.array(values, dtype=np.float32).reshape(-1, width)
    if valid is not None:
        values[~np.asarray(valid, dtype=bool)] = np.nan
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def list_values(chunk: pa.FixedSizeListArray) -> np.ndarray:
    """A fixed-size list array's rows as an (n, width) float32 matrix, null rows and null
    items as NaN (stores and manifests that agepipe 0.1.0 wrote hold nulls)."""
    width = chunk.type.list_size
    values = chunk.values.slice(chunk.offset * width, len(chunk) * width)
    out = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)
    if chunk.null_count:
        out = out.copy() if not out.flags.writeable else out
        out[chunk.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out


def without_nulls(table: pa.Table) -> pa.Table:
    """``table`` with every null inside a fixed_size_list column replaced by NaN."""
    for i, field in enumerate(table.schema):
        if not pa.types.is_fixed_size_list(field.type):
            continue
        column = table.column(i)
        if column.null_count == 0 and all(c.values.null_count == 0 for c in column.chunks):
            continue
        width = field.type.list_size
        chunks = [pa.FixedSizeListArray.from_arrays(pa.array(list_values(c).reshape(-1)), width)
                  for c in column.chunks]
        table = table.set_column(i, pa.field(field.name, pa.list_(pa.float32(), width)),
                                 pa.chunked_array(chunks, pa.list_(pa.float32(), width)))
    return table


# --- paths -----------------------------------------------------------------------------

def _url_to_fs(store: str):
    try:
        return fsspec.core.url_to_fs(str(store))
    except (ImportError, ValueError) as e:  # gs:// without gcsfs installed, a scheme fsspec does not know
        raise StoreError(f"{store}: fsspec cannot open it ({e})") from None


def _fs(store: str):
    fs, path = _url_to_fs(store)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        fs.invalidate_cache()  # object stores cache listings; workers in other processes write
    return fs, path


def absolute(store: str) -> str:
    """A local store's absolute path (a URL as given): a process with another working folder, as
    a worker of an existing cluster, finds the same folder."""
    fs, path = _url_to_fs(store)
    return path if isinstance(fs, fsspec.implementations.local.LocalFileSystem) else str(store)


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _files(fs, root: str, pattern: str) -> list[str]:
    """The paths in the folder ``root`` whose names match ``pattern``, sorted. Not fs.glob of the
    joined path: that reads a [, * or ? in the store's own path as a pattern too, and in
    /data/store [1] found no shard at all."""
    try:
        paths = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):  # no folder: no file in it
        return []
    except PermissionError as e:
        raise StoreError(f"{root}: cannot list this folder ({e.strerror or e}); fix its permissions, then run "
                         "the command again") from None
    return sorted(p for p in paths if fnmatch.fnmatchcase(_name(p), pattern))


def shard_name(index: int) -> str:
    """A name no other write uses: a new cut or a --retry-failed rewrite never replaces a file
    that the committed index lists."""
    return f"part-{index:05d}-{uuid.uuid4().hex[:8]}.parquet"


def dataset_dir(store: str, feature_set: str, dataset: str) -> str:
    return _join(str(store), feature_set, dataset)


class StoreError(ValueError):
    """A store that cannot be read as it is; the message names the file or folder and what to run."""


class UnfinishedExtract(StoreError):
    """Shards that no index lists yet: an extract of the dataset is running or stopped before its commit."""


class StoreWriteError(StoreError):
    """A write the store refused (a full disk, no permission, a lost connection): no photo's fault."""


class IndexChanged(StoreError):
    """A commit replaced the index a run planned from (another writer's, or the next run's), or the
    one a reader was reading: the old cut's shards are deleted right after."""


def index_changed(store: str, feature_set: str, dataset: str) -> IndexChanged:
    return IndexChanged(f"{index_path(store, feature_set, dataset)} changed while this run worked (another "
                        f"writer?); rerun `agepipe extract --dataset {dataset}`")


@contextlib.contextmanager
def _writing(fs, path: str, mode: str):
    """open_atomic, its OSError (the temporary already removed) said as one sentence naming the file."""
    try:
        with open_atomic(fs, path, mode) as f:
            yield f
    except OSError as e:
        raise StoreWriteError(f"{path}: cannot write ({e}); free space or fix the store, then rerun "
                              "`agepipe extract` (finished shards are kept)") from None


def _rerun(dataset: str) -> str:
    return f"run `agepipe extract --dataset {dataset}` to redo it"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # Arrow's messages end lines inside a sentence


def _after_read_error(path: str, e: Exception) -> str:
    """What to do about a shard that could not be read. No permission or a lost connection says
    nothing of the file. Anything else (Arrow's damaged-page errors are plain OSErrors too) is damage,
    and a rerun knows a finished shard by its footer alone, so it would keep one damaged before that."""
    if isinstance(e, (PermissionError, ConnectionError, TimeoutError)):
        return "fix access to it (its permissions, the connection), then run the command again"
    return f"delete it, then run `agepipe extract --dataset {_dataset_of(path)}` to redo it"


def _dataset_of(shard_path: str) -> str:
    return shard_path.rstrip("/").rsplit("/", 2)[-2]


# --- identity ---------------------------------------------------------------------------

def feature_set_name(label: str, config: dict) -> str:
    """``label`` plus a short hash of everything that changes an embedding, e.g.
    ``buffalo_s-det640-3f9a1c2e``: two configurations never share a folder."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return f"{label}-{digest}"


# --- writing ----------------------------------------------------------------------------

# The manifest columns a shard copies unchanged: what identifies the rows it was made from.
ROW_KEY = ["image_id", "subject_id", "fold", "age", "gender"]


def _digest(columns: list[list]) -> str:
    """A short sha256 of rows given as columns: a line a row, its values tab-separated."""
    text = "\n".join("\t".join(map(str, values)) for values in zip(*columns))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rows_digest(rows: pa.Table) -> str:
    """Which manifest rows a shard holds (ids and labels), so a rerun can tell a finished
    shard from one cut differently, or from rows whose labels changed since."""
    return _digest([rows[name].to_pylist() for name in ROW_KEY])


def inputs_digest(manifest_rows: pa.Table) -> str:
    """What else of the manifest rows went into a shard: the statuses (which photos were
    embedded), the face boxes (which face) and age_bin, so a rerun redoes a shard whose
    manifest changed there while its rows_digest stayed the same."""
    # A missing face box is null in agepipe 0.1.0's manifests and NaN since: the same input.
    hints = [None if h is None or all(v != v for v in h) else h for h in manifest_rows["face_hint"].to_pylist()]
    return _digest([manifest_rows["status"].to_pylist(), hints, manifest_rows["age_bin"].to_pylist()])


def write_shard(table: pa.Table, store: str, feature_set: str, dataset: str, index: int,
                inputs: str | None = None) -> str:
    """Write one shard atomically (a temporary name in the same folder, then a rename) under a
    name of its own; it counts once an index commit lists it. ``inputs``: the inputs_digest of
    the manifest rows it was made from (default: the table's own). Returns its path."""
    table = without_nulls(table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
    table = table.replace_schema_metadata({"agepipe.rows": rows_digest(table),
                                           "agepipe.inputs": inputs or inputs_digest(table)})
    fs, root = _fs(dataset_dir(store, feature_set, dataset))
    final = _join(root, shard_name(index))
    with _writing(fs, final, "wb") as f:
        # Embeddings are noise to a compressor; storing them plain keeps reads at memcpy speed.
        pq.write_table(
            table, f,
            compression={name: ("none" if name in ("embedding", "landmarks", "bbox") else "zstd")
                         for name in SHARD_SCHEMA.names},
            use_dictionary=["status", "subject_id"],
            row_group_size=max(len(table), 1),
            data_page_size=1 << 30,  # one page per column: plain_column reads it with one header
        )
    return final


def shard_digests(store: str, path: str) -> tuple[str, str | None] | None:
    """(rows digest, inputs digest or None if written before agepipe recorded it) of a complete
    shard with the current schema; None for anything else."""
    fs, _ = _fs(store)
    try:
        with fs.open(path, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
    except Exception:
        return None
    meta = schema.metadata or {}
    if schema.names != SHARD_SCHEMA.names or not meta.get(b"agepipe.rows"):
        return None
    return meta[b"agepipe.rows"].decode(), meta.get(b"agepipe.inputs", b"").decode() or None


def shards_on_disk(store: str, feature_set: str, dataset: str) -> dict[str, list[tuple[str, str | None]]]:
    """{rows digest: [(path, inputs digest)]} of every readable shard in the dataset folder,
    listed or not: a crashed run's finished shards are found again by the rows they hold."""
    fs, root = _fs(dataset_dir(store, feature_set, dataset))  # no folder: _files finds nothing
    found: dict[str, list[tuple[str, str | None]]] = {}
    for path in _files(fs, root, SHARD_GLOB):
        digests = shard_digests(store, path)
        if digests:
            found.setdefault(digests[0], []).append((path, digests[1]))
    return found


def rows_on_disk(store: str, feature_set: str, dataset: str) -> int:
    """Distinct rows in the dataset folder's readable shards, listed or not (what a writer finds
    again where no readable index lists them)."""
    fs, root = _fs(dataset_dir(store, feature_set, dataset))  # no folder: _files finds nothing
    ids: set[str] = set()
    for path in _files(fs, root, SHARD_GLOB):
        try:
            ids.update(read_shard_file(store, path, ["image_id"])["image_id"].to_pylist())
        except StoreError:
            continue  # unreadable: nothing a writer keeps
    return len(ids)


def remove_file(store: str, path: str) -> None:
    """``path`` as write_shard returns it (on an object store, without the URL's scheme)."""
    fs, _ = _fs(store)
    fs.rm_file(path)  # not fs.rm, which on an object store reads a [, * or ? in the path as a pattern


def _remove_temporaries(fs, root: str, names: list[str]) -> int:
    """The temporaries open_atomic left for ``names`` in ``root`` (.NAME.<id>.tmp): a process killed
    mid-write never removes its own."""
    stale = [path for name in names for path in _files(fs, root, f".{name}.*.tmp")]
    for path in stale:
        fs.rm_file(path)
    return len(stale)


def remove_stale_temporaries(store: str, feature_set: str, dataset: str) -> int:
    """The dataset's shard and index temporaries; called under its writer lock, so none is in flight."""
    fs, root = _fs(dataset_dir(store, feature_set, dataset))
    if not fs.exists(root):
        return 0
    return _remove_temporaries(fs, root, ["part-*", INDEX_FILE])


@contextlib.contextmanager
def writer_lock(store: str, feature_set: str, dataset: str):
    """One writer per feature set and dataset: an flock on a local store (released by the
    kernel if the process dies). Object stores have no lock; there the commit's generation
    check keeps a second writer from replacing an index it did not read."""
    root = dataset_dir(store, feature_set, dataset)
    with _flock(root, wait=False) as held:
        if held is False:
            raise _another_writer(root)
        yield


def check_no_writer(store: str, feature_set: str, dataset: str) -> None:
    """StoreError where another extract holds the dataset's writer lock now. Makes nothing: a look
    before a run starts its cluster (seconds, minutes where GPUs load models), so a second extract
    is refused at once; writer_lock takes the lock after."""
    root = dataset_dir(store, feature_set, dataset)
    with _flock(root, wait=False, make=False) as held:
        if held is False:
            raise _another_writer(root)


def _another_writer(root: str) -> StoreError:
    return StoreError(f"another `agepipe extract` is writing {root}; let it finish, then rerun")


@contextlib.contextmanager
def _flock(root: str, wait: bool, make: bool = True):
    """An exclusive flock on ``root``/.lock; yields False where ``wait`` is off and another
    process holds it, None on an object store (no locks there) and, with ``make`` off, where
    there is no lock file (no writer has run there)."""
    fs, root = _fs(root)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        yield None
        return
    try:  # _lock_file's own errors are StoreWriteError
        f = _lock_file(root) if make else open(os.path.join(root, LOCK_FILE))
    except OSError:  # with make off, no lock file: no writer has run there
        yield None
        return
    with f:
        yield flock(f, wait)


def _lock_file(root: str):
    """``root``/.lock opened for flock, made if missing; a store it cannot write (read-only, another
    owner's) is StoreWriteError naming the folder, the first write an extract tries."""
    try:
        os.makedirs(root, exist_ok=True)
        return open(os.path.join(root, LOCK_FILE), "a")
    except OSError as e:
        raise StoreWriteError(f"{root}: cannot write ({e.strerror or e}); `agepipe extract` writes the store: "
                              "make this folder writable, or give another --store") from None


# --- the index: which shards hold the dataset ---------------------------------------------

INDEX_FILE = "_index.json"  # "_": pyarrow.dataset and pandas skip it when reading the folder
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class ShardEntry:
    """One listed shard: its file name, the manifest rows [start, start + rows) it holds and
    their digest."""
    file: str
    start: int
    rows: int
    digest: str


@dataclass(frozen=True)
class Index:
    shards: list[ShardEntry]
    rows: int                 # manifest rows the shards cover (a --limit run covers fewer)
    manifest_sha256: str
    generation: str           # changes with every commit
    manifest: str = ""        # the manifest file's path where extract read it ("" before 2026-11-28)


def index_path(store: str, feature_set: str, dataset: str) -> str:
    return _join(dataset_dir(store, feature_set, dataset), INDEX_FILE)


def read_index(store: str, feature_set: str, dataset: str) -> Index | None:
    """The committed index, None for a folder without one (a store agepipe 0.1.0 wrote)."""
    fs, path = _fs(index_path(store, feature_set, dataset))
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as f:
            raw = json.load(f)
        index = Index([_shard_entry(e) for e in raw["shards"]], int(raw["rows"]),
                      str(raw["manifest_sha256"]), str(raw["generation"]), str(raw.get("manifest", "")))
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: not a readable shard index ({e}); {_rerun(dataset)}") from None
    expected = 0
    for entry in sorted(index.shards, key=lambda e: e.start):
        if entry.start != expected:
            what = "overlap" if entry.start < expected else "leave out manifest rows"
            raise StoreError(f"{path}: the listed shards {what} at row {min(entry.start, expected)}; "
                             f"{_rerun(dataset)}")
        expected += entry.rows
    if expected != index.rows:
        raise StoreError(f"{path}: the listed shards hold {expected} rows, the index says {index.rows}; "
                         f"{_rerun(dataset)}")
    return index


def _shard_entry(raw: dict) -> ShardEntry:
    """An index entry as read back (data, maybe damaged): a shard's plain file name in the dataset's
    folder and row counts, or ValueError."""
    entry = ShardEntry(**raw)
    name_ok = isinstance(entry.file, str) and "/" not in entry.file and entry.file.startswith("part-")
    counts_ok = all(type(n) is int and n >= 0 for n in (entry.start, entry.rows))
    if not (name_ok and counts_ok and isinstance(entry.digest, str)):
        raise ValueError(f"shard entry {raw}")
    return entry


def index_to_replace(store: str, feature_set: str, dataset: str) -> Index | None:
    """The index a writer plans from and replaces: None when there is none, or a damaged one
    (the writer rebuilds it from the shards on disk, which readers refuse it for)."""
    try:
        return read_index(store, feature_set, dataset)
    except StoreError:
        return None


def commit_shards(store: str, feature_set: str, dataset: str, shards: list[ShardEntry],
                  manifest_sha256: str = "", expected_generation: str | None = None, manifest: str = "") -> Index:
    """Make ``shards`` the dataset's content in one step: the index is written under a
    temporary name and renamed over the old one, then every shard it does not list is
    deleted. ``expected_generation`` is the index the caller planned from (None: none);
    ``manifest`` the path of the manifest file whose sha256 is ``manifest_sha256``."""
    fs, path = _fs(index_path(store, feature_set, dataset))
    current = index_to_replace(store, feature_set, dataset)
    if (current.generation if current else None) != expected_generation:
        raise index_changed(store, feature_set, dataset)
    index = Index(sorted(shards, key=lambda e: e.start), sum(e.rows for e in shards), manifest_sha256,
                  uuid.uuid4().hex, manifest)
    with _writing(fs, path, "w") as f:
        json.dump({"shards": [asdict(e) for e in index.shards], "rows": index.rows, "manifest": manifest,
                   "manifest_sha256": manifest_sha256, "generation": index.generation}, f, indent=1)
    listed = {e.file for e in index.shards}
    root = path.rsplit("/", 1)[0]
    for old in _files(fs, root, SHARD_GLOB):
        if _name(old) not in listed:
            fs.rm_file(old)
    if fs.exists(_join(root, ".arrow")):  # agepipe 0.1.0's read copies
        fs.rm(_join(root, ".arrow"), recursive=True)
    return index


def write_dataset(table: pa.Table, store: str, feature_set: str, dataset: str, shard_rows: int,
                  manifest_sha256: str = "") -> Index:
    """``table`` as the dataset's whole content in one process: its shards, then one commit
    (replacing whatever cut was there). For tools and tests that build a store from arrays."""
    # Digested as the shards hold the rows: a float64 age is another number as float32.
    table = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    # Locked, and the index read, before the first shard: another writer's commit meanwhile would
    # delete the shards written so far as unlisted.
    with writer_lock(store, feature_set, dataset):
        current = index_to_replace(store, feature_set, dataset)
        entries = []
        for i, start in enumerate(range(0, table.num_rows, shard_rows)):
            part = table.slice(start, shard_rows)
            path = write_shard(part, store, feature_set, dataset, i)
            entries.append(ShardEntry(_name(path), start, part.num_rows, rows_digest(part)))
        return commit_shards(store, feature_set, dataset, entries, manifest_sha256,
                             current.generation if current else None)


# --- feature_set.json -------------------------------------------------------------------

def feature_set_json_path(store: str, feature_set: str) -> str:
    return _join(str(store), feature_set, "feature_set.json")


def read_feature_set_info(store: str, feature_set: str) -> dict:
    fs, path = _fs(feature_set_json_path(store, feature_set))
    if not fs.exists(path):
        return {}
    try:
        with fs.open(path, "r") as f:
            info = json.load(f)
    except ValueError as e:  # cut short, or not text
        info = e
    if not isinstance(info, dict):  # its runs' record is its owner's: never rewritten over
        raise StoreError(f"{path}: not a readable feature set record ({info!s:.80}); restore it from a copy, "
                         "or delete it and run `agepipe extract` again (it is written anew, its record of "
                         "earlier runs lost)")
    return info


def write_feature_set_info(store: str, feature_set: str, info: dict) -> None:
    fs, path = _fs(feature_set_json_path(store, feature_set))
    with _writing(fs, path, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)


def update_feature_set_info(store: str, feature_set: str, update) -> dict:
    """Read feature_set.json, ``update(info)`` in place, write it back; returns info. Extracts
    of different datasets share the file: on a local store each waits for the other's update
    (a lock of the feature set's folder), so neither's record is lost."""
    with _flock(_join(str(store), feature_set), wait=True) as held:
        if held:  # no other update in flight: a temporary there is a killed one's
            _remove_temporaries(*_fs(_join(str(store), feature_set)), ["feature_set.json"])
        info = read_feature_set_info(store, feature_set)
        update(info)
        write_feature_set_info(store, feature_set, info)
    return info


# --- reading ----------------------------------------------------------------------------

def list_feature_sets(store: str) -> list[str]:
    fs, root = _fs(store)
    if not fs.isdir(root):  # a file: fsspec 2023.1.0 (the floor) listed it with os.scandir, NotADirectoryError
        return []
    return sorted(_name(p) for p in fs.ls(root, detail=False) if fs.exists(_join(p, "feature_set.json")))


def is_folder(store: str) -> bool:
    """Whether the store's root is a folder (on an object store, a prefix that holds objects)."""
    fs, root = _fs(store)
    return fs.isdir(root)


def list_datasets(store: str, feature_set: str) -> list[str]:
    fs, root = _fs(_join(str(store), feature_set))
    if not fs.exists(root):
        return []
    return sorted(_name(e["name"]) for e in fs.ls(root, detail=True) if e["type"] == "directory")


def shard_files(store: str, feature_set: str, dataset: str) -> list[str]:
    """The dataset's shards in row order: those its index lists (what other readers should
    read), or for a store agepipe 0.1.0 wrote (no index) every ``part-NNNNN.parquet``."""
    return [path for path, _ in _listed(store, feature_set, dataset)]


def _is_legacy_shard(path: str) -> bool:
    """agepipe 0.1.0 named shards part-NNNNN.parquet; shard_name adds an id to every name since."""
    name = _name(path)
    return len(name) == len("part-00000.parquet") and name[5:10].isdigit()


def _listed(store: str, feature_set: str, dataset: str) -> list[tuple[str, ShardEntry | None]]:
    index = read_index(store, feature_set, dataset)
    fs, root = _fs(dataset_dir(store, feature_set, dataset))
    if index is None:
        found = _files(fs, root, SHARD_GLOB)
        if not all(map(_is_legacy_shard, found)):
            # Shards this version wrote and no index: an extract stopped before its commit. They
            # may cover part of the manifest only; the rerun keeps them and finishes the rest.
            raise UnfinishedExtract(
                f"{root}: the extract that wrote these shards has not finished (no {INDEX_FILE} lists them); "
                f"run `agepipe extract --dataset {dataset}` to finish it (a tool that wrote them with write_shard "
                "commits them with store.commit_shards, or writes them with store.write_dataset)")
        return [(p, None) for p in found]
    out = []
    for entry in index.shards:
        path = _join(root, entry.file)
        if not fs.exists(path):
            raise _if_recut(store, feature_set, dataset, path,
                            StoreError(f"{root}: shard {entry.file} listed in {INDEX_FILE} is missing; {_rerun(dataset)}"))
        out.append((path, entry))
    return out


def _if_recut(store: str, feature_set: str, dataset: str, path: str, error: StoreError) -> StoreError:
    """``error`` for a shard a reader found in the index and then could not read; IndexChanged where
    the index no longer lists it: an extract committed a new cut meanwhile and deleted the old
    cut's shards. Nothing is damaged and nothing was mixed; a rerun reads the new cut."""
    index = index_to_replace(store, feature_set, dataset)
    if index is None or _name(path) in {e.file for e in index.shards}:
        return error
    return IndexChanged(f"{index_path(store, feature_set, dataset)}: an `agepipe extract` committed a new cut of "
                        f"{dataset} while this command read it, and the old cut's shards are gone; rerun the "
                        "command (it read nothing from two cuts)")


def _shard_paths(store: str, feature_set: str, datasets: list[str] | str | None):
    """[(dataset, shard path, index entry or None)] in order; a dataset named explicitly must
    have shards."""
    if isinstance(datasets, str):
        datasets = [datasets]
    out = []
    for dataset in dict.fromkeys(datasets or list_datasets(store, feature_set)):  # a dataset named twice: once
        try:
            shards = _listed(store, feature_set, dataset)
        except UnfinishedExtract:
            if datasets:
                raise
            continue  # all datasets: those not yet extracted (or still being extracted) are not there yet
        if not shards and datasets:
            raise FileNotFoundError(
                f"no shards for dataset {dataset!r} in {dataset_dir(store, feature_set, dataset)}; "
                f"run `agepipe extract --dataset {dataset}` first")
        out += [(dataset, path, entry) for path, entry in shards]
    if not out:
        raise FileNotFoundError(f"feature set {feature_set!r} holds no shards under {store}")
    return out


def read_shard_file(store: str, path: str, columns: list[str] | None = None,
                    entry: ShardEntry | None = None) -> pa.Table:
    """One shard's columns straight from the store (no copy, nothing written); with ``entry``
    the shard must hold the rows the index lists. Any unreadable file raises StoreError."""
    fs, _ = _fs(store)
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    try:
        with (contextlib.nullcontext(path) if local else fs.open(path, "rb")) as source:
            pf = pq.ParquetFile(source, pre_buffer=not local)
            table = pf.read(columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise StoreError(f"{path}: cannot read this shard ({_one_line(e)}); {_after_read_error(path, e)}") from None
    if entry is not None:
        digest = (pf.schema_arrow.metadata or {}).get(b"agepipe.rows", b"").decode()
        if digest != entry.digest or pf.metadata.num_rows != entry.rows:
            raise StoreError(f"{path}: holds other rows than {INDEX_FILE} lists; {_rerun(_dataset_of(path))}")
    wanted = SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    try:
        if missing := [n for n in SHARD_SCHEMA.names if n not in pf.schema_arrow.names]:
            raise KeyError(f"no column {missing[0]!r}")  # whatever columns were asked for: not a shard
        return table.select(wanted.names).cast(wanted)
    except (KeyError, pa.ArrowException) as e:  # another tool's file, or another width of embedding
        raise StoreError(f"{path}: not a shard of this store ({e}); {_rerun(_dataset_of(path))}") from None


def _read_shards(store: str, feature_set: str, datasets, columns: list[str] | None):
    """[(dataset, path, table)] of every listed shard. A store without an index (agepipe
    0.1.0) must not hold an image in two shards."""
    out, seen = [], {}
    for dataset, path, entry in _shard_paths(store, feature_set, datasets):
        try:
            t = read_shard_file(store, path, columns, entry)
        except StoreError as e:
            raise _if_recut(store, feature_set, dataset, path, e) from None
        if entry is None:  # no index: no commit can replace it meanwhile
            ids = t["image_id"] if columns is None or "image_id" in columns else \
                read_shard_file(store, path, ["image_id"])["image_id"]
            for image_id in dict.fromkeys(ids.to_pylist()):
                if seen.setdefault((dataset, image_id), path) != path:
                    raise StoreError(f"{path.rsplit('/', 1)[0]}: {image_id!r} is in two shards "
                                     f"({_name(seen[dataset, image_id])}, {_name(path)}); {_rerun(dataset)}")
        out.append((dataset, path, t))
    return out


def read_table(store: str, feature_set: str, datasets: list[str] | str | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """All shards of the given datasets (all when None) as one table, shards in order.
    The column ``dataset`` is added."""
    return pa.concat_tables([t.append_column("dataset", pa.array([d] * len(t), pa.string()))
                             for d, _, t in _read_shards(store, feature_set, datasets, columns)])


def read_embeddings(store: str, path: str, out: np.ndarray | None = None) -> np.ndarray:
    """A shard's embeddings as an (n, 512) float32 matrix (into ``out`` when given), rows
    without one NaN. Shards as this version writes them are copied page by page
    (plain_column); others (agepipe 0.1.0's, with nulls) go through pyarrow's reader."""
    fs, _ = _fs(store)
    try:
        with fs.open(path, "rb") as f:
            metadata = pq.ParquetFile(f).metadata
            found = read_float_lists(f, metadata, "embedding", EMBEDDING_DIM, out)
            if found is None:
                column = pq.ParquetFile(f).read(columns=["embedding"]).column(0)
                found = np.concatenate([list_values(c) for c in column.chunks]) if column.num_chunks else \
                    np.empty((0, EMBEDDING_DIM), np.float32)
                if out is not None:
                    out[...] = found
                    found = out
    except (OSError, pa.ArrowException, ValueError) as e:
        raise StoreError(f"{path}: cannot read this shard's embeddings ({_one_line(e)}); "
                         f"{_after_read_error(path, e)}") from None
    return found


@dataclass
class Features:
    """Embeddings as one contiguous (n, 512) float32 matrix and their rows' labels; ``left_out``:
    how many rows of the folds read each filter left out (by status, and below the det score)."""
    embeddings: np.ndarray
    rows: pd.DataFrame
    left_out: dict[str, int] = dataclasses.field(default_factory=dict)


LABEL_COLUMNS = ["image_id", "subject_id", "fold", "age", "age_bin", "gender", "det_score", "embedding_norm"]


def load_features(store: str, feature_set: str, datasets: list[str] | str | None = None,
                  folds: list[int] | None = None, min_det_score: float = 0.0) -> Features:
    """Rows with status "ok" (optionally only the given folds and above a detector score).
    No Python loop per row: each shard's embedding pages are copied once, straight into
    the one output matrix."""
    shards = _read_shards(store, feature_set, datasets, LABEL_COLUMNS + ["status"])
    keeps, left_out = [], Counter()
    for _, _, table in shards:
        asked = np.ones(len(table), dtype=bool)  # the folds asked for: the rest is not left out, only not read
        if folds is not None:
            asked = pc.is_in(table["fold"], pa.array(folds, pa.int8())).to_numpy(zero_copy_only=False).astype(bool)
        status = table["status"].to_numpy(zero_copy_only=False)
        keep = asked & (status == "ok")
        left_out.update(status[asked & ~keep].tolist())
        if min_det_score > 0:
            above = pc.fill_null(pc.greater_equal(table["det_score"], min_det_score), False)
            low = keep & ~above.to_numpy(zero_copy_only=False).astype(bool)
            left_out["det_score_below_min"] += int(low.sum())
            keep &= ~low
        keeps.append(keep)
    embeddings = np.empty((sum(int(k.sum()) for k in keeps), EMBEDDING_DIM), dtype=np.float32)
    row = 0
    for (dataset, path, _), keep in zip(shards, keeps):
        k = int(keep.sum())
        try:
            if k == len(keep) and k:  # the common case: straight into the output, no copy
                read_embeddings(store, path, embeddings[row:row + k])
            elif k:
                np.compress(keep, read_embeddings(store, path), axis=0, out=embeddings[row:row + k])
        except StoreError as e:  # the shard was there when its labels were read a moment ago
            raise _if_recut(store, feature_set, dataset, path, e) from None
        row += k
    rows = pa.concat_tables([
        t.filter(pa.array(keep)).append_column("dataset", pa.array([d] * int(keep.sum()), pa.string()))
        for (d, _, t), keep in zip(shards, keeps)])
    return Features(embeddings, rows.drop_columns(["status"]).to_pandas(), {k: v for k, v in sorted(left_out.items()) if v})


def _counts(store: str, feature_set: str, dataset: str) -> dict[str, int]:
    """{status: rows} read from the dataset's shards ({} when it has none)."""
    if not _listed(store, feature_set, dataset):
        return {}
    t = read_table(store, feature_set, dataset, columns=["status"])
    counts = pc.value_counts(t["status"]).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def status_counts(store: str, feature_set: str, datasets: list[str] | None = None) -> dict[str, dict[str, int]]:
    """{dataset: {status: rows}} of the datasets (all when None) read from the shards themselves."""
    out = {}
    for dataset in datasets or list_datasets(store, feature_set):
        try:
            counts = _counts(store, feature_set, dataset)
        except UnfinishedExtract:
            continue  # being extracted, or stopped before its first commit: no rows yet
        if counts:
            out[dataset] = counts
    return out


def dataset_counts(store: str, feature_set: str) -> dict[str, dict[str, int] | StoreError]:
    """Every dataset of the feature set: its {status: rows} ({} before any shard), or the
    StoreError that keeps it from being counted (UnfinishedExtract: an extract not yet
    committed; any other: a damaged store), so one dataset's state hides no other's."""
    out: dict[str, dict[str, int] | StoreError] = {}
    for dataset in list_datasets(store, feature_set):
        try:
            out[dataset] = _counts(store, feature_set, dataset)
        except StoreError as e:
            out[dataset] = e
    return out
