"""Adience (Eidinger, Enbar and Hassner 2014): the aligned faces and the five official folds.

Files, from the dataset's page (HTTP basic auth adiencedb / adience, as the page publishes):
aligned.tar.gz (``aligned/{user_id}/landmark_aligned_face.{face_id}.{original_image}``) and
fold_0_data.txt .. fold_4_data.txt. The page's faces.tar.gz (1.5 GB of unaligned crops) is not
fetched: no manifest row uses it.

Manifest: one row per non-blank line after the header of each fold file, so the rows of fold k
are the rows of fold_k_data.txt (published: 19,370 = 4,484 / 3,730 / 3,894 / 3,446 / 3,816).
``fold`` comes from the file name; ``subject_id`` is user_id (the official folds never split a
user); ``image_id`` is the aligned image's path. ``age`` is the mean of the numbers in the label
("(25, 32)" -> 28.5, "35" -> 35) and ``age_bin`` the class whose midpoint is nearest, as in the
original paper (manifest.age_bin). The raw label stays in ``age_label``; every row names its
``source_line`` ("fold_0_data.txt:17", the header being line 1). The real fold files are ASCII; a
file is read as UTF-8, or as UTF-16 after a UTF-16 byte-order mark, and one with bytes that are
neither (Latin-1) is a MetadataError naming its first such line.

Statuses, the first that applies:
    broken_line    the line lacks the fields up to gender, or has extra ones (its labels are not
                   trusted; image_id is "fold_K_data.txt#LINE" when the image cannot be named)
    bad_path       user_id, face_id or original_image would leave the dataset folder
    bad_age        a label other than "None", a number or "(a, b)" within 0-100
    bad_gender     a gender other than m, f, u or empty
    no_label       neither age nor gender is known
    missing_image  the aligned image is not on disk
    duplicate      a usable row whose image an earlier usable row already lists
    ok             usable; an unknown age ("None") or gender ("u", empty) alone stays "ok" with
                   age NaN / age_bin -1 or gender -1, so the other model can still learn from it
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from agepipe.download import RemoteFile
from agepipe.datasets.manifest import (LINE_END, MetadataError, age_bin, decode_text, files_on_disk,
                                       first_failure, is_safe_relpath, mark_duplicates)

NAME = "adience"
BASE_URL = ("http://www.cslab.openu.ac.il/download/adiencedb/"
            "AdienceBenchmarkOfUnfilteredFacesForGenderAndAgeClassification/")
AUTH = ("adiencedb", "adience")
FOLD_FILES = tuple(f"fold_{k}_data.txt" for k in range(5))
PUBLISHED_ROWS = {0: 4484, 1: 3730, 2: 3894, 3: 3446, 4: 3816}

# The md5s come from a third-party loader, not from the dataset's authors: a mismatch only warns.
# Sizes are rough, for the free-space check.
FILES = (
    RemoteFile("aligned.tar.gz", BASE_URL + "aligned.tar.gz", size=2_000_000_000,
               unverified_md5="bf8336d576433f0143828925eadbe23f", extract=True),
) + tuple(RemoteFile(name, BASE_URL + name, size=2_000_000, unverified_md5=md5)
          for name, md5 in zip(FOLD_FILES, ("dda2131b5a4934a67f0acfda8b50a65b", "bb558fff6aba953b5b05403d74dfd8a8",
                                            "a156e37bf4292a61ee5e11a06cfc6c5f", "7c9f7dab8fb034affe8a08e97da24266",
                                            "68ebc064a70274551a565fdd5235f0cc")))

REQUIRED = ("user_id", "original_image", "face_id", "age", "gender")
# A fold file has 12 columns and about 1.5 MB; far beyond these it is not one (a million
# columns would cost gigabytes of DataFrame before any row were judged).
MAX_COLUMNS = 64
MAX_FOLD_BYTES = 64 << 20
NUMERIC = {"x": "face_x", "y": "face_y", "dx": "face_dx", "dy": "face_dy", "tilt_ang": "tilt_ang",
           "fiducial_yaw_angle": "fiducial_yaw_angle", "fiducial_score": "fiducial_score"}
GENDERS = {"m": 1, "f": 0, "u": -1, "": -1, "none": -1}

_RANGE = re.compile(r"\(\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def aligned_path(user_id: str, face_id: str, original_image: str) -> str:
    return f"aligned/{user_id}/landmark_aligned_face.{face_id}.{original_image}"


def parse_age(label: str) -> tuple[float, bool]:
    """(age in years or NaN, whether the label is malformed). "None" and "" are unknown, not bad."""
    label = label.strip()
    if label in ("", "None"):
        return float("nan"), False
    if m := _RANGE.fullmatch(label):
        low, high = float(m[1]), float(m[2])
        ok = low <= high <= 100
        return ((low + high) / 2, False) if ok else (float("nan"), True)
    if _NUMBER.fullmatch(label) and float(label) <= 100:
        return float(label), False
    return float("nan"), True


def read_fold_file(path: Path, fold: int) -> pd.DataFrame:
    """One row per non-blank line after the header, raw strings plus parsing flags."""
    try:
        if path.stat().st_size > MAX_FOLD_BYTES:
            raise MetadataError(f"{path}: {path.stat().st_size:,} bytes; an Adience fold file has a few MB", path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise MetadataError(f"{path}: fold file missing") from None
    lines = LINE_END.split(decode_text(path, data))
    header = [h.strip() for h in lines[0].split("\t", MAX_COLUMNS)]
    if len(header) > MAX_COLUMNS:
        raise MetadataError(f"{path}: line 1 has more than {MAX_COLUMNS} columns; not an Adience fold header", path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise MetadataError(f"{path}: line 1 is not an Adience fold header (no {', '.join(missing)})", path)
    # Only the columns the manifest reads: another (a converted copy's "fold") must not overwrite
    # the row's own fields, and one of them twice would be ambiguous.
    used = (*REQUIRED, *NUMERIC)
    twice = [c for c in used if header.count(c) > 1]
    if twice:
        raise MetadataError(f"{path}: line 1 names column {twice[0]!r} twice; not an Adience fold header", path)
    col = {name: i for i, name in enumerate(header) if name in used}
    needed = max(col[c] for c in REQUIRED) + 1
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        extra = len(fields) > len(header) and any(fields[len(header):])

        def get(name: str) -> str:
            i = col.get(name)
            return fields[i] if i is not None and i < len(fields) else ""

        rows.append({"fold": fold, "line": number, "broken": len(fields) < needed or extra,
                     **{name: get(name) for name in col}})
    frame = pd.DataFrame(rows, columns=["fold", "line", "broken", *col])
    frame["source_line"] = [f"{path.name}:{n}" for n in frame["line"]]
    return frame


def build_manifest(root: Path) -> pd.DataFrame:
    """The manifest of ``root`` (DATA/adience) from its fold files and aligned images."""
    root = Path(root)
    raw = pd.concat([read_fold_file(root / name, k) for k, name in enumerate(FOLD_FILES)],
                    ignore_index=True)
    n = len(raw)
    if not n:   # nothing to account for, and columns too empty to have a type to write
        raise MetadataError(f"{root}: no fold file {FOLD_FILES[0]} .. {FOLD_FILES[-1]} lists an image "
                            "(each holds its header only)")
    ident = raw[["user_id", "original_image", "face_id"]].fillna("")
    named = (ident != "").all(axis=1).to_numpy()
    image_ids = [aligned_path(u, f, o) if ok else source.replace(":", "#L")
                 for u, o, f, ok, source in zip(ident["user_id"], ident["original_image"],
                                                ident["face_id"], named, raw["source_line"])]
    broken = raw["broken"].to_numpy(bool) | ~named
    # Each field is one path component: a slash or ".." would point elsewhere.
    bad_path = named & np.array([not is_safe_relpath(p) or any(c in u + f + o for c in "/\\")
                                 for u, o, f, p in zip(ident["user_id"], ident["original_image"],
                                                       ident["face_id"], image_ids)], dtype=bool)

    parsed = [parse_age(label) for label in raw["age"].fillna("")]
    age = np.array([a for a, _ in parsed], dtype=np.float64)
    bad_age = np.array([bad for _, bad in parsed], dtype=bool)
    gender_label = raw["gender"].fillna("").str.strip().str.lower()
    gender = gender_label.map(GENDERS)
    bad_gender = gender.isna().to_numpy()
    gender = gender.fillna(-1).to_numpy(dtype=np.int8, copy=True)
    # Labels of a broken line are not trusted.
    age[broken | bad_age] = np.nan
    gender[broken | bad_gender] = -1
    no_label = np.isnan(age) & (gender == -1)
    on_disk = files_on_disk(root, "aligned")
    missing = np.array([i not in on_disk for i in image_ids], dtype=bool)

    status = first_failure((broken, "broken_line"), (bad_path, "bad_path"), (bad_age, "bad_age"),
                           (bad_gender, "bad_gender"), (no_label, "no_label"),
                           (missing, "missing_image"), n=n)
    image_ids = mark_duplicates(image_ids, status)

    frame = pd.DataFrame({
        "image_id": image_ids,
        "subject_id": ident["user_id"].where(ident["user_id"] != "", None),
        "fold": raw["fold"].astype(np.int8),
        "age": age.astype(np.float32),
        "age_bin": age_bin(age),
        "gender": gender,
        "face_hint": [None] * n,    # the fold files' boxes are in the original photo, not the aligned crop
        "status": status.astype(str),
        "age_label": raw["age"].fillna(""),
        "gender_label": raw["gender"].fillna(""),
        "face_id": ident["face_id"],
        "original_image": ident["original_image"],
        "source_line": raw["source_line"],
    })
    for column, name in NUMERIC.items():
        values = raw[column] if column in raw else pd.Series([""] * n)
        frame[name] = pd.to_numeric(values.fillna(""), errors="coerce").astype(np.float32)
    return frame
