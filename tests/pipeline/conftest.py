"""A small dataset of real photos laid out like a real one, with a manifest."""
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agepipe.features.store import MANIFEST_SCHEMA, without_nulls

PHOTOS = ["t1", "astronaut", "obama", "obama2", "obama3", "biden", "yaoming", "players"]


def write_manifest(root, rows):
    """Rows as given, even ones the real writer refuses (hostile manifests), but without nulls in
    face_hint, as agepipe writes it: pyarrow < 26 cannot read those."""
    root.mkdir(parents=True, exist_ok=True)
    table = without_nulls(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    pq.write_table(table, root / "manifest.parquet")


@pytest.fixture(scope="session")
def mini_data(photos, tmp_path_factory):
    """DATA/mini: 8 real photos, twice over (16 rows), a corrupt JPEG, a missing file, a row
    the manifest already marks unusable, and a face hint that picks a face in a group photo."""
    data = tmp_path_factory.mktemp("data")
    root = data / "mini"
    rows = []
    for copy in range(2):
        for name in PHOTOS:
            image_id = f"photos/{copy}/{name}{photos[name].suffix}"
            (root / image_id).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(photos[name], root / image_id)
            rows.append({"image_id": image_id, "subject_id": name, "fold": len(name) % 5,
                         "age": 30.0, "age_bin": 4, "gender": 1, "face_hint": None, "status": "ok"})
    (root / "photos/bad.jpg").write_bytes(photos["obama"].read_bytes()[:5000])
    rows.append({"image_id": "photos/bad.jpg", "subject_id": "x", "fold": 0, "age": 30.0, "age_bin": 4,
                 "gender": 0, "face_hint": None, "status": "ok"})
    rows.append({"image_id": "photos/gone.jpg", "subject_id": "y", "fold": 1, "age": 30.0, "age_bin": 4,
                 "gender": 0, "face_hint": None, "status": "ok"})
    rows.append({"image_id": "photos/unlabelled.jpg", "subject_id": "z", "fold": 2, "age": None, "age_bin": -1,
                 "gender": -1, "face_hint": None, "status": "bad_label"})
    write_manifest(root, rows)
    return data
