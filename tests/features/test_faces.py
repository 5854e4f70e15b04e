"""agepipe's faces against insightface's own FaceAnalysis on real photos, same files, same det size."""
import cv2
import numpy as np
import pytest

from agepipe.features.embed import box_iou, choose_face
from agepipe.features.images import read_image
from tests.conftest import chosen_face

REFERENCE_PHOTOS = ["t1", "astronaut", "obama", "obama2", "obama3", "biden", "yaoming"]


@pytest.fixture(scope="module")
def face_analysis(buffalo_s_dir):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(buffalo_s_dir), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


@pytest.mark.parametrize("name", REFERENCE_PHOTOS)
def test_same_faces_and_embeddings_as_insightface(name, photos, embedder, face_analysis):
    image = read_image(str(photos[name]))
    reference = face_analysis.get(image)
    ours = embedder.faces(image)
    assert len(reference) >= 1
    assert len(ours) == len(reference)
    boxes = np.array([f.bbox for f in ours])
    for ref in reference:
        iou = box_iou(boxes, ref.bbox)
        j = int(np.argmax(iou))
        assert iou[j] >= 0.95
        assert abs(ours[j].det_score - ref.det_score) <= 0.01
        assert float(np.dot(ours[j].embedding, ref.normed_embedding)) >= 0.999
        assert ours[j].embedding_norm == pytest.approx(float(np.linalg.norm(ref.embedding)), rel=1e-3)


def test_batched_detection_matches_one_at_a_time(photos, embedder):
    images = [read_image(str(photos[n])) for n in ("t1", "astronaut", "biden")]
    batched = embedder.faces_batch(images)
    for image, faces in zip(images, batched):
        single = embedder.faces(image)
        assert len(single) == len(faces)
        for a, b in zip(single, faces):
            np.testing.assert_allclose(a.bbox, b.bbox, atol=1e-3)
            assert float(a.embedding @ b.embedding) > 0.99999


def test_t1_has_six_faces(photos, embedder):
    assert len(embedder.faces(read_image(str(photos["t1"])))) == 6


def one_embedding(embedder, path):
    return chosen_face(embedder, read_image(str(path))).embedding


def test_same_person_more_similar_than_different_people(photos, embedder):
    obama = [one_embedding(embedder, photos[n]) for n in ("obama", "obama2", "obama3")]
    biden = one_embedding(embedder, photos["biden"])
    same = [float(obama[i] @ obama[j]) for i in range(3) for j in range(i + 1, 3)]
    different = [float(o @ biden) for o in obama]
    assert min(same) > max(different) + 0.2, (same, different)


def test_mirror_image_embeds_close(photos, embedder):
    for name in ("obama", "biden", "astronaut"):
        image = read_image(str(photos[name]))
        a = embedder.faces(image)
        b = embedder.faces(np.ascontiguousarray(cv2.flip(image, 1)))
        assert len(a) == len(b) == 1
        assert float(a[0].embedding @ b[0].embedding) >= 0.9


def test_choose_face_prefers_the_hint_then_the_largest_central():
    from agepipe.features.detect import Detections

    boxes = np.array([[0, 0, 50, 50], [200, 200, 300, 300], [380, 380, 400, 400]], np.float32)
    det = Detections(boxes, np.ones(3, np.float32), np.zeros((3, 5, 2), np.float32))
    assert choose_face(det, (500, 500, 3)) == 1
    assert choose_face(det, (500, 500, 3), hint=np.array([375, 375, 402, 402])) == 2
    # a hint overlapping no face falls back to the default policy
    assert choose_face(det, (500, 500, 3), hint=np.array([100, 400, 120, 420])) == 1
