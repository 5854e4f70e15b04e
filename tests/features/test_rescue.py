"""Face rescue: faces that fill the frame are found on a padded canvas, mapped back to the
photo's pixels; photos without a face stay without one; photos with faces are untouched."""
import numpy as np
import pytest

from agepipe.features import detect
from agepipe.features.align import norm_crop
from agepipe.features.detect import Detections, from_rescue_canvas, rescue_canvas
from agepipe.features.embed import box_iou, choose_face
from agepipe.features.images import read_image
from tests.conftest import package_dir

# scikit-image's photos without a human face (camera.png is a cameraman)
NO_FACE = ("coffee.png", "chelsea.png", "rocket.jpg", "horse.png", "motorcycle_left.png",
           "hubble_deep_field.jpg", "retina.jpg", "brick.png", "clock_motion.png", "logo.png")
CROP_FACES = ("t1", "astronaut", "obama", "obama2", "biden", "yaoming")


class CountingNet:
    """The detector's network, recording the batch size of every call."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, batch):
        self.calls.append(len(batch))
        return self.net(batch)


@pytest.fixture
def counted(embedder):
    net = embedder.detector.net
    embedder.detector.net = CountingNet(net)
    yield embedder.detector.net
    embedder.detector.net = net


def tight_crop(image, box, share):
    """A square crop centred on the face in which the box's longer side is ``share`` of the side."""
    side = max(box[2] - box[0], box[3] - box[1])
    crop_side = int(round(side / share))
    x0 = int(round((box[0] + box[2]) / 2 - crop_side / 2))
    y0 = int(round((box[1] + box[3]) / 2 - crop_side / 2))
    x0 = min(max(x0, 0), image.shape[1] - crop_side)
    y0 = min(max(y0, 0), image.shape[0] - crop_side)
    offset = np.array([x0, y0], np.float32)
    return np.ascontiguousarray(image[y0:y0 + crop_side, x0:x0 + crop_side]), offset


@pytest.fixture(scope="module")
def big_faces(photos, embedder):
    """(photo, its first-pass detections, index of the face) for every face >= 60 px."""
    out = []
    for name in CROP_FACES:
        image = read_image(str(photos[name]))
        det = embedder.detector([image], rescue=False)[0]
        for k, box in enumerate(det.boxes):
            if min(box[2] - box[0], box[3] - box[1]) >= 60:
                out.append((name, image, det, k))
    assert len(out) == 11  # t1's six, one in each of the others
    return out


def test_rescue_canvas_maps_pixels_and_boxes_both_ways():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    canvas, (ox, oy), (sx, sy) = rescue_canvas(image, (640, 640))
    assert canvas.shape == (640, 640, 3)
    # the photo takes 1 / (1 + 2 * pad) of the canvas's side, centred; the rest is padding
    assert round(300 * sy) == round(640 / (1 + 2 * detect.RESCUE_PAD))
    assert ox + 200 * sx / 2 == pytest.approx(320, abs=1) and oy + 300 * sy / 2 == pytest.approx(320, abs=1)
    assert (canvas[:int(oy)] == detect.RESCUE_VALUE).all() and (canvas[:, :int(ox)] == detect.RESCUE_VALUE).all()
    # a uniform patch of the photo lands where the map says
    image[100:140, 50:90] = (10, 200, 30)
    canvas, _, _ = rescue_canvas(image, (640, 640))
    x, y = 70 * sx + ox, 120 * sy + oy
    assert tuple(canvas[int(y), int(x)]) == (10, 200, 30)

    box = np.array([[50, 100, 90, 140]], np.float32)
    kps = np.tile(np.array([[70, 120]], np.float32), (1, 5, 1))
    on_canvas = Detections(box * np.array([sx, sy, sx, sy], np.float32) + np.array([ox, oy, ox, oy], np.float32),
                           np.array([0.8], np.float32), kps * np.array([sx, sy], np.float32) + np.array([ox, oy]))
    back = from_rescue_canvas(on_canvas, (ox, oy), (sx, sy), image.shape)
    np.testing.assert_allclose(back.boxes, box, atol=1e-3)
    np.testing.assert_allclose(back.landmarks, kps, atol=1e-3)
    assert back.rescued

    # a box centred on the padding is no face of the photo's
    padding = Detections(np.array([[0, 0, 40, 40]], np.float32), np.array([0.9], np.float32),
                         np.zeros((1, 5, 2), np.float32))
    dropped = from_rescue_canvas(padding, (ox, oy), (sx, sy), image.shape)
    assert len(dropped) == 0 and not dropped.rescued


def test_rescue_is_part_of_the_feature_set_identity(buffalo_s, monkeypatch):
    from agepipe.features.embed import feature_identity
    from agepipe.features.store import feature_set_name

    before = feature_identity(buffalo_s, 640)
    assert before["rescue"]["pad"] == detect.RESCUE_PAD
    monkeypatch.setattr(detect, "RESCUE_PAD", detect.RESCUE_PAD + 0.25)
    after = feature_identity(buffalo_s, 640)
    assert feature_set_name("b", before) != feature_set_name("b", after)


def test_no_face_photos_stay_without_faces(embedder):
    images = [read_image(str(package_dir("skimage") / "data" / name)) for name in NO_FACE]
    assert [len(d) for d in embedder.detector(images, rescue=False)] == [0] * len(images)
    assert [len(d) for d in embedder.detector(images, rescue=True)] == [0] * len(images)
    assert [len(f) for f in embedder.faces_batch(images)] == [0] * len(images)


@pytest.mark.parametrize("share", [0.83, 0.9])
def test_tight_crops_found_after_rescue_as_the_right_face(share, big_faces, embedder):
    crops, truth = [], []
    for _, image, det, k in big_faces:
        crop, offset = tight_crop(image, det.boxes[k], share)
        crops.append(crop)
        truth.append((det.boxes[k] - np.tile(offset, 2), det.landmarks[k] - offset,
                      embedder.embed_crops([norm_crop(image, det.landmarks[k])])[0][0]))
    plain = embedder.detector(crops, rescue=False)
    assert sum(len(d) == 0 for d in plain) >= len(crops) * 0.8  # the problem is real at this share
    ious = []
    for crop, before, after, (box, landmarks, embedding) in zip(
            crops, plain, embedder.detector(crops), truth):
        assert len(after) >= 1
        assert after.rescued == (len(before) == 0)
        k = choose_face(after, crop.shape)
        ious.append(box_iou(after.boxes[k:k + 1], box)[0])
        # a small face's box moves a few pixels on any crop, rescued or not (bench/tight_crops.py)
        assert ious[-1] >= 0.85
        # landmarks in the crop's own pixels: near the full photo's (a wrong map is off by tens of %)
        error = np.linalg.norm(after.landmarks[k] - landmarks, axis=1) / (box[3] - box[1])
        assert error.mean() <= 0.05 and error.max() <= 0.1
        found = embedder.embed_crops([norm_crop(crop, after.landmarks[k])])[0][0]
        assert float(found @ embedding) >= 0.85
    assert np.median(ious) >= 0.9


def test_rescue_runs_once_on_just_the_photos_without_a_face(photos, embedder, counted):
    images = [read_image(str(photos[n])) for n in ("t1", "astronaut", "biden")]
    plain = embedder.detector(images, rescue=False)
    counted.calls.clear()
    again = embedder.detector(images)
    assert counted.calls == [3]  # photos with faces: no rescue pass
    for a, b in zip(plain, again):
        assert not b.rescued
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.landmarks, b.landmarks)

    astronaut = images[1]
    crop, _ = tight_crop(astronaut, plain[1].boxes[0], 0.9)
    coffee = read_image(str(package_dir("skimage") / "data" / "coffee.png"))
    counted.calls.clear()
    mixed = embedder.detector([images[0], crop, coffee, images[2]])
    assert counted.calls == [4, 2]  # one rescue batch: the crop and the coffee
    assert [len(d) for d in mixed] == [6, 1, 0, 1]
    assert [d.rescued for d in mixed] == [False, True, False, False]


def test_extract_and_embed_count_and_keep_rescued_faces(photos, embedder, buffalo_s, tmp_path):
    """The one detection path serves `agepipe predict` (FaceEmbedder.faces), `agepipe embed`
    (embed_files) and `agepipe extract` (a shard through extract_shard), whose summary counts
    the rescued photos."""
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    from agepipe.features.embed import embed_files, feature_identity
    from agepipe.features.store import MANIFEST_SCHEMA, inputs_digest
    from agepipe.pipeline.extract import ExtractConfig, extract_shard, run_stats

    image = read_image(str(photos["obama"]))
    box = embedder.detector([image])[0].boxes[0]
    crop, offset = tight_crop(image, box, 0.9)
    assert len(embedder.faces(crop)) == 1
    data = tmp_path / "data"
    data.mkdir()
    cv2.imwrite(str(data / "crop.png"), crop)
    cv2.imwrite(str(data / "coffee.png"), read_image(str(package_dir("skimage") / "data" / "coffee.png")))
    cv2.imwrite(str(data / "t1.png"), read_image(str(photos["t1"])))

    table = embed_files([str(data / n) for n in ("crop.png", "coffee.png")], embedder, progress=False)
    assert table["status"].to_pylist() == ["ok", "no_face"]
    assert box_iou(np.array(table["bbox"].to_pylist()[:1]), box - np.tile(offset, 2))[0] >= 0.85

    rows = [{"image_id": n, "subject_id": n, "fold": 0, "age": 30.0, "age_bin": 4, "gender": 1,
             "face_hint": None, "status": "ok"} for n in ("crop.png", "coffee.png", "t1.png")]
    identity = feature_identity(buffalo_s, 640)
    cfg = ExtractConfig(pack="buffalo_s", detector_sha256=identity["detector_sha256"],
                        recognizer_sha256=identity["recognizer_sha256"])
    result = extract_shard({"rows": rows, "data_root": str(data), "store": str(tmp_path / "store"),
                            "feature_set": "fs", "dataset": "d", "index": 0, "config": cfg.__dict__,
                            "inputs": inputs_digest(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))})
    assert result["faces_rescued"] == 1 and "faces_rescued" not in result["timings"]
    assert run_stats([result, {**result, "index": 1}], 1.0)["faces_rescued"] == 2
    shard = pq.read_table(next((tmp_path / "store").rglob("part-*.parquet")))
    assert shard["status"].to_pylist() == ["ok", "no_face", "ok"]
    assert shard["n_faces"].to_pylist() == [1, 0, 6]
    np.testing.assert_allclose(shard["bbox"][0].as_py(), table["bbox"][0].as_py(), atol=1e-3)


def test_lfw_patches_faces_found_and_none_invented(embedder):
    """scikit-image's LFW subset: 25x25 px patches, 100 filled by a face (the first pass finds
    none of them) and 100 without one (no pass may find a face there)."""
    import cv2
    from skimage.data import lfw_subset

    patches = [cv2.cvtColor((p * 255).round().astype(np.uint8), cv2.COLOR_GRAY2BGR) for p in lfw_subset()]
    faces, others = patches[:100], patches[100:]
    assert sum(len(d) for d in embedder.detector(faces, rescue=False)) == 0
    assert sum(len(d) > 0 for d in embedder.detector(faces)) >= 95
    assert sum(len(d) for d in embedder.detector(others)) == 0
