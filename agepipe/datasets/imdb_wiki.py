"""IMDB-WIKI (Rothe, Timofte and Van Gool 2015): celebrity photos from IMDb and Wikipedia.

Two datasets with a manifest each: ``imdb`` (DATA/imdb/, from imdb_crop.tar, about 7 GB) and
``wiki`` (DATA/wiki/, from wiki_crop.tar, about 0.8 GB). Each archive holds ``{name}_crop/NN/*.jpg``
and the metadata ``{name}_crop/{name}.mat``: a 1x1 MATLAB struct whose fields are 1xN arrays —
dob (MATLAB serial date), photo_taken (year), full_path and name (cells of strings), gender
(1 male, 0 female, NaN unknown), face_location (cells of 1x4 boxes), face_score (-inf where no face
was found), second_face_score (NaN unless a second face), and for IMDB celeb_id and celeb_names.
Published totals: IMDB 460,723 images, WIKI 62,328.

``age``: photo_taken minus the birth year, one less when the birthday falls in the second half of
the year (the original code's convention: a photo is assumed taken mid-year). MATLAB's day 1 is
1 January of year 0, so Python's ordinal is dob - 366. ``image_id``: ``{name}_crop/`` + full_path
(without one, ``{name}_crop/{name}.mat#N`` for entry N, from 0).
``subject_id``: the person's name in both datasets, so that one person's IMDB and Wikipedia photos
are one subject, in one fold, on one side of every split (namesakes share a subject too, which makes
folds coarser, never leaky); without a name, the name another row of its IMDB celebrity id has,
else that id; with neither, the row is its own subject (its image_id). ``fold``: a hash of
subject_id. ``face_hint``: face_location (x1, y1, x2, y2 in the cropped image's pixels) unless no
face was found. Extra columns keep dob, photo_taken, name, face_score, second_face_score (and
celeb_id), so a trainer can apply the usual filters (face_score >= 1, no second face).

Statuses, the first that applies:
    bad_path             full_path would leave the dataset folder, or is empty or not one string
    bad_date             dob or photo_taken is missing or no date at all (dob 0, tiny or NaN)
    bad_age              the age at the photo is outside 0-100 (e.g. taken before birth)
    bad_gender           gender other than 0, 1 or NaN
    no_face_in_metadata  face_score is -inf: the dataset's detector found no face
    missing_image        the image is not on disk
    duplicate            a usable row whose image an earlier usable row already lists
    ok                   usable; an unknown gender alone stays "ok" with gender -1
"""
from __future__ import annotations

import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from agepipe.download import RemoteFile
from agepipe.datasets.manifest import (MetadataError, age_bin, files_on_disk, first_failure,
                                       is_safe_relpath, mark_duplicates, subject_fold)

BASE_URL = "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/static/"
NAMES = ("imdb", "wiki")
PUBLISHED_ROWS = {"imdb": 460_723, "wiki": 62_328}
_SIZES = {"imdb": 7_000_000_000, "wiki": 800_000_000}     # rough, for the free-space check

FIELDS = ("dob", "photo_taken", "full_path", "gender", "name", "face_location", "face_score",
          "second_face_score")
NUMERIC_FIELDS = ("dob", "photo_taken", "gender", "face_score", "second_face_score", "celeb_id")
MAX_AGE = 100
_MATLAB_EPOCH = 366                     # MATLAB serial date of Python's ordinal 0
_UNIX_EPOCH_ORDINAL = 719_163           # date(1970, 1, 1).toordinal()
_MAX_ORDINAL = 3_652_059                # date(9999, 12, 31).toordinal()
# The real imdb.mat is ~60 MB on disk and ~200 MB inflated; a few KB of zlib can claim gigabytes.
MAX_MAT_BYTES = 1 << 30
MAX_MAT_INFLATED = 2 << 30
_MI_COMPRESSED = 15


def files(name: str) -> tuple[RemoteFile, ...]:
    archive = f"{name}_crop.tar"
    return (RemoteFile(archive, BASE_URL + archive, size=_SIZES[name], extract=True),)


def mat_path(root: Path, name: str) -> Path:
    return Path(root) / f"{name}_crop" / f"{name}.mat"


def check_mat_size(path: Path) -> None:
    """Refuse a MAT file over MAX_MAT_BYTES, or one whose compressed variables inflate past
    MAX_MAT_INFLATED, before scipy inflates and allocates them: each top-level element of a
    MAT 5 file is read by its tag, and a compressed one is inflated chunk by chunk and counted,
    never kept. Anything that is not a MAT 5 file is left to scipy's own errors."""
    try:
        _check_mat_size(path)
    except zlib.error as e:
        raise MetadataError(f"{path}: not a readable MATLAB file ({e})") from None


def _check_mat_size(path: Path) -> None:
    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        if size > MAX_MAT_BYTES:
            raise MetadataError(f"{path}: {size} bytes, over the {MAX_MAT_BYTES} a metadata file may have")
        header = f.read(128)
        if len(header) < 128 or header[126:128] not in (b"IM", b"MI"):
            return
        order = "<" if header[126:128] == b"IM" else ">"
        inflated = 0
        while len(tag := f.read(8)) == 8:
            kind, nbytes = struct.unpack(order + "II", tag)
            if kind >> 16:  # a small element: its data is in the tag
                continue
            if kind != _MI_COMPRESSED:
                inflated += nbytes
                f.seek(nbytes + (-nbytes % 8), 1)
                continue
            stream, left = zlib.decompressobj(), nbytes
            while left and not stream.eof:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                while chunk and inflated <= MAX_MAT_INFLATED:
                    inflated += len(stream.decompress(chunk, 1 << 24))
                    chunk = stream.unconsumed_tail
                if inflated > MAX_MAT_INFLATED:
                    raise MetadataError(f"{path}: its variables inflate past {MAX_MAT_INFLATED} bytes; "
                                        "not IMDB-WIKI's metadata")
            f.seek(left, 1)


_LOAD = dict(squeeze_me=False, struct_as_record=True)
MAT_PROBE_SECONDS = 600


def check_mat_parses(path: Path) -> None:
    """scipy's MATLAB reader is C code that some damaged files crash (scipy 1.17.1: a segfault on
    a flipped byte of a struct's header), killing the run without naming the file. It reads the
    file first in a child process, so such a file is named instead (a few seconds at IMDB's size;
    any other failure is left to the reading here, which names it)."""
    try:
        done = subprocess.run([sys.executable, "-c", f"import sys, scipy.io; scipy.io.loadmat(sys.argv[1], **{_LOAD})",
                               str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=MAT_PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        raise MetadataError(f"{path}: scipy's MATLAB reader did not finish in {MAT_PROBE_SECONDS} s; "
                            "not IMDB-WIKI's metadata", path) from None
    if done.returncode < 0:
        raise MetadataError(f"{path}: scipy's MATLAB reader crashed on it ({signal.Signals(-done.returncode).name}); "
                            "a damaged file, not IMDB-WIKI's metadata", path)


def read_mat(path: Path, name: str) -> dict[str, np.ndarray]:
    """The struct's fields as 1-D arrays of length N (celeb_names keeps its own length)."""
    try:
        check_mat_size(path)
        check_mat_parses(path)
        mat = scipy.io.loadmat(path, **_LOAD)
    except FileNotFoundError:
        raise MetadataError(f"{path}: metadata file missing") from None
    except MetadataError:
        raise
    # Any error scipy meets in a damaged file is that file's (scipy 1.10 on a file shorter than a
    # header: IndexError; 1.17 on an unknown class byte: UnboundLocalError).
    except Exception as e:  # noqa: BLE001
        raise MetadataError(f"{path}: not a readable MATLAB file ({e.__class__.__name__}: {e})") from None
    struct = mat.get(name)
    if not isinstance(struct, np.ndarray) or struct.dtype.names is None or struct.size != 1:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise MetadataError(f"{path}: no 1x1 struct named {name!r} (variables: {found})")
    record = struct.reshape(-1)[0]
    required = FIELDS + (("celeb_id",) if name == "imdb" else ())
    missing = [f for f in required if f not in struct.dtype.names]
    if missing:
        raise MetadataError(f"{path}: struct {name!r} lacks fields {missing}")
    fields = {f: np.asarray(record[f]).reshape(-1) for f in struct.dtype.names}
    n = len(fields["full_path"])
    if not n:   # nothing to account for, and columns too empty to have a type to write
        raise MetadataError(f"{path}: struct {name!r} lists no image", path)
    wrong = {f: len(fields[f]) for f in required if len(fields[f]) != n}
    if wrong:
        raise MetadataError(f"{path}: full_path has {n} entries but {wrong}")
    for f in NUMERIC_FIELDS:
        if f in fields:
            fields[f] = numbers(path, f, fields[f])
    return fields


def numbers(path: Path, field: str, values: np.ndarray) -> np.ndarray:
    """A field of numbers as float64. One that holds cells or text is not the published layout:
    named, with its first entry that is not a number."""
    if values.dtype.kind in "biuf":
        return values.astype(np.float64)
    entry = next((i for i, v in enumerate(values)
                  if np.ndim(v) or not isinstance(v, (int, float, np.number))), 0)
    shown = np.asarray(values[entry]).reshape(-1).tolist() if len(values) else []
    raise MetadataError(f"{path}: field {field!r} is not an array of numbers (entry {entry}: "
                        f"{shown[0] if len(shown) == 1 else shown!r})")


def cell_strings(cells: np.ndarray) -> list[str]:
    """A MATLAB cell array of strings: each cell is a 1-element array, or empty for ''. A cell
    that holds anything else (numbers, a nested cell, a char matrix of several rows) is '' too:
    its text would be a path or name the metadata does not give."""
    out = []
    for cell in cells:
        cell = np.asarray(cell).reshape(-1)
        out.append(str(cell[0]).strip() if cell.size == 1 and cell.dtype.kind == "U" else "")
    return out


def age_at_photo(dob: np.ndarray, photo_taken: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(age in whole years as float, NaN where undefined; mask of impossible dates)."""
    dob = np.asarray(dob, dtype=np.float64)
    taken = np.asarray(photo_taken, dtype=np.float64)
    ordinal = np.floor(dob) - _MATLAB_EPOCH
    valid = (np.isfinite(ordinal) & (ordinal >= 1) & (ordinal <= _MAX_ORDINAL)
             & np.isfinite(taken) & (taken >= 1) & (taken <= 9999))
    days = np.where(valid, ordinal - _UNIX_EPOCH_ORDINAL, 0).astype("int64").astype("datetime64[D]")
    year = days.astype("datetime64[Y]").astype(np.int64) + 1970
    month = days.astype("datetime64[M]").astype(np.int64) % 12 + 1
    age = taken - year - (month >= 7)
    return np.where(valid, age, np.nan), ~valid


def face_hints(locations: np.ndarray, found: np.ndarray) -> list:
    hints = []
    for cell, ok in zip(locations, found):
        try:
            box = np.asarray(cell, dtype=np.float64).reshape(-1) if ok else np.empty(0)
        except (ValueError, TypeError):  # a cell that is not numbers: that row has no hint
            box = np.empty(0)
        hints.append(box.astype(np.float32) if box.size == 4 and np.isfinite(box).all() else None)
    return hints


def build_manifest(root: Path, name: str) -> pd.DataFrame:
    """The manifest of ``root`` (DATA/imdb or DATA/wiki) from its .mat file and images."""
    root = Path(root)
    meta = read_mat(mat_path(root, name), name)
    n = len(meta["full_path"])
    paths = cell_strings(meta["full_path"])
    # A row without a path is named by its entry (from 0, as numbers() names one), so it can be found.
    image_ids = [f"{name}_crop/{p}" if p else f"{name}_crop/{name}.mat#{i}" for i, p in enumerate(paths)]
    bad_path = np.array([not p or not is_safe_relpath(i) for p, i in zip(paths, image_ids)], dtype=bool)

    age, bad_date = age_at_photo(meta["dob"], meta["photo_taken"])
    bad_age = ~bad_date & ~((age >= 0) & (age <= MAX_AGE))
    age[bad_age] = np.nan
    raw_gender = np.asarray(meta["gender"], dtype=np.float64)
    bad_gender = np.isfinite(raw_gender) & ~np.isin(raw_gender, (0.0, 1.0))
    gender = np.where(np.isin(raw_gender, (0.0, 1.0)), raw_gender, -1).astype(np.int8)
    face_score = np.asarray(meta["face_score"], dtype=np.float64)
    no_face = np.isneginf(face_score)
    on_disk = files_on_disk(root, f"{name}_crop")
    missing = np.array([i not in on_disk for i in image_ids], dtype=bool)

    status = first_failure((bad_path, "bad_path"), (bad_date, "bad_date"), (bad_age, "bad_age"),
                           (bad_gender, "bad_gender"), (no_face, "no_face_in_metadata"),
                           (missing, "missing_image"), n=n)
    image_ids = mark_duplicates(image_ids, status)

    names = cell_strings(meta["name"])
    subjects = names
    if name == "imdb":
        celeb_id = np.asarray(meta["celeb_id"], dtype=np.float64)
        known = np.isfinite(celeb_id) & (celeb_id > 0)
        # A row without a name takes the name its celebrity's other rows have: as the id, it
        # would be a second subject, in another fold, for the same person.
        named = {}
        for nm, c, k in zip(names, celeb_id, known):
            if nm and k:
                named.setdefault(c, nm)
        subjects = [nm or (named.get(c, str(int(c))) if k else "") for nm, c, k in zip(names, celeb_id, known)]
    subjects = [s or i for s, i in zip(subjects, image_ids)]

    frame = pd.DataFrame({
        "image_id": image_ids,
        "subject_id": subjects,
        "fold": subject_fold(subjects),
        "age": age.astype(np.float32),
        "age_bin": age_bin(age),
        "gender": gender,
        "face_hint": face_hints(meta["face_location"], ~no_face),
        "status": status.astype(str),
        "name": names,
        "dob": np.asarray(meta["dob"], dtype=np.float64),
        "photo_taken": np.asarray(meta["photo_taken"], dtype=np.float64),
        "face_score": face_score.astype(np.float32),
        "second_face_score": np.asarray(meta["second_face_score"], dtype=np.float32),
    })
    if name == "imdb":
        frame["celeb_id"] = np.where(known, celeb_id, -1).astype(np.int64)
    return frame
