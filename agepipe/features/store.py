"""The feature store: Parquet shards of embeddings, one folder per feature set.

Layout (DESIGN.md): ``STORE/<feature_set>/<dataset>/part-NNNNN.parquet`` plus
``STORE/<feature_set>/feature_set.json``. A shard is written under a temporary
name and renamed when complete, so readers never see half a shard and a rerun
can trust every ``part-*.parquet`` it finds. ``STORE`` may be any fsspec URL.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass

import fsspec
import fsspec.implementations.local
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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

def _fs(store: str):
    return fsspec.core.url_to_fs(str(store))


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def dataset_dir(store: str, feature_set: str, dataset: str) -> str:
    return _join(str(store), feature_set, dataset)


# --- identity ---------------------------------------------------------------------------

def feature_set_name(label: str, config: dict) -> str:
    """``label`` plus a short hash of everything that changes an embedding, e.g.
    ``buffalo_s-det640-3f9a1c2e``: two configurations never share a folder."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return f"{label}-{digest}"


# --- writing ----------------------------------------------------------------------------

def rows_digest(image_ids) -> str:
    """Which rows a shard holds, so a rerun can tell a finished shard from one cut differently."""
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()[:16]


def write_shard(table: pa.Table, store: str, feature_set: str, dataset: str, index: int) -> str:
    """Write one shard atomically: a temporary name in the same folder, then a rename."""
    table = without_nulls(table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
    table = table.replace_schema_metadata({"agepipe.rows": rows_digest(table["image_id"].to_pylist())})
    fs, root = _fs(dataset_dir(store, feature_set, dataset))
    fs.makedirs(root, exist_ok=True)
    final = _join(root, shard_name(index))
    tmp = _join(root, f".{shard_name(index)}.{uuid.uuid4().hex}.tmp")
    with fs.open(tmp, "wb") as f:
        # Embeddings are noise to a compressor; storing them plain keeps reads at memcpy speed.
        pq.write_table(
            table, f,
            compression={name: ("none" if name in ("embedding", "landmarks", "bbox") else "zstd")
                         for name in SHARD_SCHEMA.names},
            use_dictionary=["status", "subject_id"],
            row_group_size=max(len(table), 1),
        )
        if hasattr(f, "flush"):
            f.flush()
        if hasattr(f, "fileno"):
            try:
                os.fsync(f.fileno())
            except (OSError, ValueError):
                pass
    fs.mv(tmp, final)
    return final


def finished_shards(store: str, feature_set: str, dataset: str) -> dict[int, str]:
    """{shard index: path} of complete shards (temporary files are ignored)."""
    fs, root = _fs(dataset_dir(store, feature_set, dataset))
    if not fs.exists(root):
        return {}
    found = {}
    for path in fs.glob(_join(root, SHARD_GLOB)):
        name = path.rsplit("/", 1)[-1]
        try:
            found[int(name[len("part-"):-len(".parquet")])] = path
        except ValueError:
            continue
    return found


def shard_is_valid(store: str, path: str, digest: str | None = None) -> bool:
    """A shard is trusted when its footer reads, its schema matches and it holds the rows
    expected (``digest`` from rows_digest)."""
    fs, _ = _fs(store)
    try:
        with fs.open(path, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
    except Exception:
        return False
    if schema.names != SHARD_SCHEMA.names:
        return False
    found = (schema.metadata or {}).get(b"agepipe.rows", b"").decode()
    return digest is None or found == digest


def remove_stale_temporaries(store: str, feature_set: str, dataset: str) -> int:
    fs, root = _fs(dataset_dir(store, feature_set, dataset))
    if not fs.exists(root):
        return 0
    stale = fs.glob(_join(root, ".part-*.tmp"))
    for path in stale:
        fs.rm(path)
    return len(stale)


# --- feature_set.json -------------------------------------------------------------------

def feature_set_json_path(store: str, feature_set: str) -> str:
    return _join(str(store), feature_set, "feature_set.json")


def read_feature_set_info(store: str, feature_set: str) -> dict:
    fs, path = _fs(feature_set_json_path(store, feature_set))
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        return json.load(f)


def write_feature_set_info(store: str, feature_set: str, info: dict) -> None:
    fs, path = _fs(feature_set_json_path(store, feature_set))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)
    fs.mv(tmp, path)


# --- reading ----------------------------------------------------------------------------

def list_feature_sets(store: str) -> list[str]:
    fs, root = _fs(store)
    if not fs.exists(root):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                  if fs.exists(_join(p, "feature_set.json")))


def list_datasets(store: str, feature_set: str) -> list[str]:
    fs, root = _fs(_join(str(store), feature_set))
    if not fs.exists(root):
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True)
                  if e["type"] == "directory")


def _shard_paths(store: str, feature_set: str, datasets: list[str] | str | None) -> list[tuple[str, str]]:
    """[(dataset, shard path)] in order; a dataset named explicitly must have shards."""
    if isinstance(datasets, str):
        datasets = [datasets]
    out = []
    for dataset in datasets or list_datasets(store, feature_set):
        shards = finished_shards(store, feature_set, dataset)
        if not shards and datasets:
            raise FileNotFoundError(
                f"no shards for dataset {dataset!r} in {dataset_dir(store, feature_set, dataset)}; "
                f"run `agepipe extract --dataset {dataset}` first")
        out += [(dataset, shards[i]) for i in sorted(shards)]
    if not out:
        raise FileNotFoundError(f"feature set {feature_set!r} holds no shards under {store}")
    return out


def read_shard_file(store: str, path: str, columns: list[str] | None = None) -> pa.Table:
    """One shard's Parquet file (``path`` as finished_shards gives it), straight from the store."""
    fs, _ = _fs(store)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns, schema=SHARD_SCHEMA)


def _read_shard(store: str, path: str, columns: list[str] | None) -> pa.Table:
    """A shard's columns. Embeddings on a local store come from the shard's memory-mapped
    Arrow copy: Parquet spends 512 repetition levels a row decoding the embedding list, an
    Arrow file maps it at page-cache speed. The copy is made on first read and named by the
    shard's rows digest and mtime, so a rewritten shard never reads a stale copy. Other
    columns are cheap to read from Parquet and make no copy."""
    fs, _ = _fs(store)
    wants_embedding = columns is None or "embedding" in columns
    if not wants_embedding or not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return read_shard_file(store, path, columns)
    folder, name = os.path.split(path)
    pf = pq.ParquetFile(path)
    digest = (pf.schema_arrow.metadata or {}).get(b"agepipe.rows", b"").decode()
    cache = os.path.join(folder, ".arrow", f"{name[:-len('.parquet')]}-{digest}-{os.stat(path).st_mtime_ns}.arrow")
    if not os.path.exists(cache):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        for stale in os.listdir(os.path.dirname(cache)):
            if stale.startswith(name[:-len(".parquet")] + "-"):
                os.remove(os.path.join(os.path.dirname(cache), stale))
        table = pf.read().cast(SHARD_SCHEMA)
        tmp = f"{cache}.{uuid.uuid4().hex}.tmp"
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, cache)
    table = pa.ipc.open_file(_map_populated(cache)).read_all()
    return table.select(columns) if columns else table


def _map_populated(path: str) -> pa.Buffer:
    """The file memory-mapped with its pages mapped in one call (MAP_POPULATE where Linux
    has it): a page fault per 4 KiB would cost more than the copy that follows."""
    import mmap

    with open(path, "rb") as f:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return pa.py_buffer(mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ))


def read_table(store: str, feature_set: str, datasets: list[str] | str | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """All shards of the given datasets (all when None) as one table, shards in order.
    The column ``dataset`` is added."""
    tables = []
    for dataset, path in _shard_paths(store, feature_set, datasets):
        t = _read_shard(store, path, columns)
        tables.append(t.append_column("dataset", pa.array([dataset] * len(t), pa.string())))
    return pa.concat_tables(tables)


@dataclass
class Features:
    """Embeddings as one contiguous (n, 512) float32 matrix and their rows' labels."""
    embeddings: np.ndarray
    rows: pd.DataFrame


LABEL_COLUMNS = ["image_id", "subject_id", "fold", "age", "age_bin", "gender", "det_score", "embedding_norm"]


def load_features(store: str, feature_set: str, datasets: list[str] | str | None = None,
                  folds: list[int] | None = None, min_det_score: float = 0.0) -> Features:
    """Rows with status "ok" (optionally only the given folds and above a detector score).
    Vectorised, no Python loop per row: each shard's embeddings are copied once, straight
    into the one output matrix."""
    table = read_table(store, feature_set, datasets, columns=LABEL_COLUMNS + ["status", "embedding"])
    mask = pc.equal(table["status"], "ok")
    if folds is not None:
        mask = pc.and_(mask, pc.is_in(table["fold"], pa.array(folds, pa.int8())))
    if min_det_score > 0:
        mask = pc.and_(mask, pc.greater_equal(table["det_score"], min_det_score))
    keep = mask.to_numpy(zero_copy_only=False).astype(bool)
    embeddings = np.empty((int(keep.sum()), EMBEDDING_DIM), dtype=np.float32)
    row = start = 0
    for chunk in table["embedding"].chunks:
        sel = keep[start:start + len(chunk)]
        start += len(chunk)
        k = int(sel.sum())
        if not k:
            continue
        # the child values of a fixed-size list sit at fixed offsets, nulls included
        values = chunk.values.to_numpy(zero_copy_only=False)
        values = values[chunk.offset * EMBEDDING_DIM:(chunk.offset + len(chunk)) * EMBEDDING_DIM]
        if k == len(chunk):  # the common case: a plain copy runs at memcpy speed
            embeddings[row:row + k] = values.reshape(-1, EMBEDDING_DIM)
        else:
            np.compress(sel, values.reshape(-1, EMBEDDING_DIM), axis=0, out=embeddings[row:row + k])
        row += k
    rows = table.drop_columns(["embedding", "status"]).filter(pa.array(keep)).to_pandas()
    return Features(embeddings, rows)


def status_counts(store: str, feature_set: str) -> dict[str, dict[str, int]]:
    """{dataset: {status: rows}} read from the shards themselves."""
    out = {}
    for dataset in list_datasets(store, feature_set):
        if not finished_shards(store, feature_set, dataset):
            continue
        t = read_table(store, feature_set, dataset, columns=["status"])
        counts = pc.value_counts(t["status"]).to_pylist()
        out[dataset] = {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}
    return out
