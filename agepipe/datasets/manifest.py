"""What every dataset's manifest shares: Adience's age classes, subject-hash folds, image paths
that stay inside the dataset, the atomic Parquet writer and the printed summary.

Statuses any dataset may give a row (each dataset module documents its own as well):
    ok             usable; an unknown age or gender is NaN / -1, not a status
    missing_image  the image is not on disk after extraction
    bad_path       the metadata names a path that would leave the dataset folder
    duplicate      a usable row whose image an earlier usable row already lists; every row
                   but the image's first usable one (else its first) gets "#2", "#3", ... on
                   its image_id, so image_id stays unique
"""
from __future__ import annotations

import codecs
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from agepipe.atomic import atomic_path
from agepipe.features.store import MANIFEST_SCHEMA, fixed_list
from agepipe.paths import escapes, parts

MANIFEST_FILE = "manifest.parquet"
N_FOLDS = 5


def manifest_path(data_dir: str | Path, dataset: str) -> Path:
    return Path(data_dir).expanduser() / dataset / MANIFEST_FILE

AGE_CLASSES = ("0-2", "4-6", "8-12", "15-20", "25-32", "38-43", "48-53", "60-100")
CLASS_MIDPOINTS = np.array([1.0, 5.0, 10.0, 17.5, 28.5, 40.5, 50.5, 80.0])
# Ties (an age exactly between two midpoints: 3, 7.5, 13.75, 23, 34.5, 45.5, 65.25) go to the class
# that comes first in this order, the order of the midpoint list in Kim 2021's code
# (tae898/age-gender): 3 -> 4-6, 23 -> 25-32, 34.5 -> 25-32, 65.25 -> 60-100, ...
_TIE_ORDER = np.array([4, 5, 1, 7, 3, 6, 2, 0])

GENDER_NAMES = {0: "female", 1: "male", -1: "unknown"}


class MetadataError(ValueError):
    """A metadata file cannot be read at all; the message names the file (and row). ``path``:
    the file, where what it holds (not its absence) is at fault."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


# A byte-order mark says the encoding: Windows' Notepad and Excel write one on a "Unicode" save.
_BOMS = ((codecs.BOM_UTF8, "utf-8", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
         (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"))
LINE_END = re.compile(r"\r\n|\n|\r")


def decode_text(path: Path, data: bytes) -> str:
    """A metadata text file's characters, without its byte-order mark: UTF-16 after a UTF-16 BOM,
    else UTF-8. Nothing is guessed beyond that: Latin-1 decodes any bytes at all, so a file in
    another encoding would become wrong names without a word; its first undecodable line is
    named instead (1-based, as an editor numbers it)."""
    encoding, label, start = "utf-8", "UTF-8", 0
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            encoding, label, start = codec, name, len(bom)
            break
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as e:
        line = len(LINE_END.split(data[start:start + e.start].decode(encoding)))
        raise MetadataError(f"{path}: line {line} is not {label} (bytes {e.object[e.start:e.end].hex(' ')}); "
                            "save the file as UTF-8", path) from None


def age_bin(ages) -> np.ndarray:
    """Adience class 0-7 of the midpoint nearest each age; -1 where the age is NaN."""
    ages = np.asarray(ages, dtype=np.float64).reshape(-1)
    known = np.isfinite(ages)
    distance = np.abs(ages[known, None] - CLASS_MIDPOINTS[_TIE_ORDER][None, :])
    out = np.full(len(ages), -1, dtype=np.int8)
    out[known] = _TIE_ORDER[np.argmin(distance, axis=1)]
    return out


def subject_fold(subject_ids, n_folds: int = N_FOLDS) -> np.ndarray:
    """A fold 0..n_folds-1 from a stable hash of each subject id (the same on every machine and
    Python run, unlike hash()), so one person's images never straddle folds."""
    def fold(subject: str) -> int:
        digest = hashlib.blake2b(subject.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % n_folds
    ids = [str(s) for s in subject_ids]
    folds = {s: fold(s) for s in set(ids)}
    return np.array([folds[s] for s in ids], dtype=np.int8)


def is_safe_relpath(path: str) -> bool:
    """A relative path that stays inside the dataset folder, written one way only (no "." or
    empty parts, so one image has one image_id)."""
    return escapes(path) is None and all(part not in ("", ".") for part in parts(path))


def mark_duplicates(image_ids: list[str], status: np.ndarray) -> list[str]:
    """Each image keeps its image_id on one row: its first usable row, else its first row (an
    earlier cut or mislabelled line must not cost the image its usable one). Every other row
    gets a "#k" suffix, so image_id stays unique, and status "duplicate" unless already failed.
    Returns the new ids."""
    keeper: dict[str, int] = {}
    for i, image_id in enumerate(image_ids):
        if image_id not in keeper or (status[keeper[image_id]] != "ok" and status[i] == "ok"):
            keeper[image_id] = i
    seen: dict[str, int] = {}
    taken = set(image_ids)  # a suffixed id must not be one the metadata already has
    out = []
    for i, image_id in enumerate(image_ids):
        if keeper[image_id] != i:
            k = seen.get(image_id, 1) + 1
            while f"{image_id}#{k}" in taken:
                k += 1
            seen[image_id] = k
            image_id = f"{image_id}#{k}"
            taken.add(image_id)
            if status[i] == "ok":
                status[i] = "duplicate"
        out.append(image_id)
    return out


def files_on_disk(root: Path, folder: str) -> set[str]:
    """Relative paths (from ``root``) of every file under ``root/folder``: one walk instead of a
    stat per manifest row."""
    def unreadable(e: OSError):  # its files would be missing_image rows, for a reason not theirs
        if not isinstance(e, FileNotFoundError):  # no folder: every row is missing_image, rightly
            raise MetadataError(f"{e.filename}: cannot be listed ({e.strerror or e}); fix access, then rerun")

    found = set()
    base = root / folder
    for dirpath, _, filenames in os.walk(base, onerror=unreadable):
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        found.update(f"{rel}/{name}" for name in filenames)
    return found


def first_failure(*checks: tuple[np.ndarray, str], n: int) -> np.ndarray:
    """Status per row: the name of the first check whose mask is True, else "ok"."""
    status = np.full(n, "ok", dtype=object)
    undecided = np.ones(n, dtype=bool)
    for mask, name in checks:
        hit = undecided & np.asarray(mask, dtype=bool)
        status[hit] = name
        undecided &= ~hit
    return status


def write_manifest(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the manifest's contract columns (typed by store.MANIFEST_SCHEMA) followed by any
    extra columns of ``frame``, to a temporary name and then renamed. ``face_hint`` holds 4-value
    sequences or None."""
    path = Path(path)
    missing = [c for c in MANIFEST_SCHEMA.names if c not in frame.columns]
    if missing:
        raise ValueError(f"manifest for {path} lacks columns {missing}")
    if not frame["image_id"].is_unique:
        dup = frame["image_id"][frame["image_id"].duplicated()].iloc[0]
        raise ValueError(f"manifest for {path}: image_id {dup!r} is not unique")
    hints = frame["face_hint"].to_numpy()
    valid = np.array([h is not None for h in hints], dtype=bool)
    matrix = np.zeros((len(frame), 4), dtype=np.float32)
    if valid.any():
        matrix[valid] = np.stack([np.asarray(h, dtype=np.float32).reshape(4) for h in hints[valid]])
    columns = {}
    for field in MANIFEST_SCHEMA:
        if field.name == "face_hint":
            columns[field.name] = fixed_list(matrix, 4, valid)
        else:
            # An unknown age stays NaN, as the contract says, not null; elsewhere NaN is how pandas 3's
            # string type holds a missing value (a line's empty user_id): null.
            columns[field.name] = pa.array(frame[field.name].to_numpy(), type=field.type,
                                           from_pandas=not pa.types.is_floating(field.type))
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    extras = [c for c in frame.columns if c not in MANIFEST_SCHEMA.names]
    if extras:
        extra = pa.Table.from_pandas(frame[extras], preserve_index=False)
        for name in extras:
            table = table.append_column(extra.schema.field(name), extra[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def _where(frame: pd.DataFrame, status: str, shown: int = 3) -> str:
    """The first few rows of an unusable status, by file:line where the metadata has lines (else
    image_id), so a malformed line can be found without reading the manifest."""
    if status == "ok":
        return ""
    at = frame["source_line"] if "source_line" in frame else frame["image_id"]
    rows = at[frame["status"] == status]
    more = f", ... {len(rows) - shown:,} more" if len(rows) > shown else ""
    return f"   ({', '.join(map(str, rows.iloc[:shown]))}{more})"


def _subjects_in_several_folds(frame: pd.DataFrame, shown: int = 3) -> list[str]:
    """Summary lines for the subjects with rows in more than one fold, each with its first row of
    each fold (by file:line where the metadata has lines). Folds are meant to be
    subject-exclusive (Adience's official ones are): such a subject's photos can be in both a
    cross-validation run's training and test folds. Its rows stay as they are; this only says so."""
    known = frame[frame["subject_id"].notna()]
    folds = known.groupby("subject_id", sort=False)["fold"].nunique()
    several = folds.index[folds > 1]
    if not len(several):
        return []
    at = "source_line" if "source_line" in frame else "image_id"
    lines = [f"  subjects in more than one fold: {len(several):,} (folds are meant to be subject-exclusive; "
             "their photos can be on both sides of a cross-validation split)"]
    for subject in several[:shown]:
        firsts = known[known["subject_id"] == subject].drop_duplicates("fold")
        lines.append(f"    {subject:<22}{', '.join(map(str, firsts[at]))}")
    if len(several) > shown:
        lines.append(f"    ... {len(several) - shown:,} more")
    return lines


def summarize(frame: pd.DataFrame, name: str, published: dict[int, int] | int | None = None) -> str:
    """Rows per status (where the first unusable ones are), per fold (and the subjects in more
    than one), and per age class and gender among usable rows."""
    n = len(frame)
    lines = [f"{name}: {n:,} rows"]
    if isinstance(published, int) and published != n:
        lines[0] += f" (published total: {published:,}; this metadata differs)"
    lines.append("  status:")
    for status, count in frame["status"].value_counts().sort_index().items():
        lines.append(f"    {status:<22}{count:>9,}{_where(frame, status)}")
    lines.append("  fold:")
    counts = frame["fold"].value_counts()
    # A published fold with no row at all (its file holds a header only) is shown too, as 0.
    folds = set(counts.index) | (set(published) if isinstance(published, dict) else set())
    for fold in sorted(folds):
        count = int(counts.get(fold, 0))
        note = ""
        if isinstance(published, dict) and published.get(int(fold)) not in (None, count):
            note = f"   (published: {published[int(fold)]:,})"
        lines.append(f"    {int(fold):<22}{count:>9,}{note}")
    lines += _subjects_in_several_folds(frame)
    ok = frame[frame["status"] == "ok"]
    lines.append("  age class (status ok):")
    bins = ok["age_bin"].value_counts()
    for b, label in [(i, AGE_CLASSES[i]) for i in range(len(AGE_CLASSES))] + [(-1, "unknown")]:
        lines.append(f"    {label:<22}{int(bins.get(b, 0)):>9,}")
    lines.append("  gender (status ok):")
    genders = ok["gender"].value_counts()
    for g in (0, 1, -1):
        lines.append(f"    {GENDER_NAMES[g]:<22}{int(genders.get(g, 0)):>9,}")
    return "\n".join(lines)
