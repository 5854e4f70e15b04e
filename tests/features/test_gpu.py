"""The device-resident pipeline (features/gpu.py), run on the CPU against the onnxruntime path."""
from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from agepipe.features import decoders, gpu
from agepipe.features.align import ARCFACE_TEMPLATE, norm_crop, similarity_transform
from agepipe.features.detect import Detections, letterbox, nms
from agepipe.features.embed import choose_face
from agepipe.features.images import read_photo

# opencv 4.8 (the lowest versions CI tests) rounds its fixed-point bilinear weights coarser than
# today's 5.0: its crops differ from ours by up to 4 levels, its embedding norms by up to 0.2%.
OPENCV_4_8 = cv2.__version__.startswith("4.8.")


def random_boxes(rng, n, spread=200.0):
    xy = rng.uniform(0, spread, (n, 2))
    wh = rng.uniform(10, 80, (n, 2))
    return np.hstack([xy, xy + wh]).astype(np.float32)


def test_batched_nms_equals_greedy_nms():
    rng = np.random.default_rng(0)
    batch, k = 16, 64
    boxes = np.stack([random_boxes(rng, k) for _ in range(batch)])
    valid = rng.uniform(size=(batch, k)) < 0.8
    keep, settled = gpu.batched_nms(torch.from_numpy(boxes), torch.from_numpy(valid), 0.4, rounds=k)
    assert settled.all()
    for b in range(batch):
        idx = np.flatnonzero(valid[b])
        expected = idx[nms(boxes[b][idx], np.linspace(1, 0, len(idx)), 0.4)]  # already in score order
        assert np.flatnonzero(keep[b].numpy()).tolist() == sorted(expected.tolist())
    # too few rounds for a long chain of overlaps: flagged, never silently wrong
    chain = np.array([[i * 3.0, 0, i * 3.0 + 10, 10] for i in range(20)], np.float32)[None]
    keep, settled = gpu.batched_nms(torch.from_numpy(chain), torch.ones(1, 20, dtype=torch.bool), 0.4, rounds=2)
    assert not settled.any()
    keep, settled = gpu.batched_nms(torch.from_numpy(chain), torch.ones(1, 20, dtype=torch.bool), 0.4, rounds=20)
    expected = nms(chain[0], np.linspace(1, 0, 20), 0.4)
    assert settled.all() and np.flatnonzero(keep[0].numpy()).tolist() == sorted(expected.tolist())


def test_similarity_transforms_equal_umeyama():
    rng = np.random.default_rng(1)
    src = ARCFACE_TEMPLATE[None] * rng.uniform(0.5, 4, (32, 1, 1)) + rng.normal(0, 3, (32, 5, 2)) + 100
    src[0] = src[0][:, ::-1]  # a mirrored face: Umeyama's reflection case
    got = gpu.similarity_transforms(torch.from_numpy(src), torch.from_numpy(ARCFACE_TEMPLATE)).numpy()
    expected = np.stack([similarity_transform(s, ARCFACE_TEMPLATE) for s in src])
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_warp_faces_equals_cv2_warp_affine(photos, embedder):
    images = [read_photo(str(photos[name])).pixels for name in ("t1", "players", "obama")]
    faces = [(i, det.landmarks[k]) for i, im in enumerate(images)
             for det in embedder.detector([im]) for k in range(len(det))]
    # a face pushed past the border, to check the zero border
    faces.append((2, faces[-1][1] - np.array([faces[-1][1][:, 0].min() + 20, 0], np.float32)))
    offsets = np.cumsum([0] + [im.size for im in images])[:-1]
    flat = torch.from_numpy(np.concatenate([im.reshape(-1) for im in images]))
    which = np.array([i for i, _ in faces])
    matrices = np.stack([similarity_transform(kp, ARCFACE_TEMPLATE) for _, kp in faces])
    crops = gpu.warp_faces(flat, torch.from_numpy(offsets[which]),
                           torch.tensor([images[i].shape[0] for i in which]),
                           torch.tensor([images[i].shape[1] for i in which]), torch.from_numpy(matrices)).numpy()
    expected = np.stack([norm_crop(images[i], kp) for i, kp in faces]).astype(np.float32)
    assert len(faces) > 25
    assert np.abs(crops - expected).max() <= (4.0 if OPENCV_4_8 else 1.0)
    assert (crops[-1][:, :10] == 0).all()  # outside the photo: black, as cv2's constant border


def test_letterbox_into_equals_letterbox(photos):
    canvas = np.full((640, 640, 3), 7, np.uint8)  # stale pixels from an earlier photo must go
    for name in ("t1", "astronaut", "obama"):
        image = read_photo(str(photos[name])).pixels
        for im in (image, np.ascontiguousarray(image.transpose(1, 0, 2))):  # landscape and portrait
            expected, scale = letterbox(im, (640, 640))
            assert decoders.letterbox_into(im, canvas) == scale
            assert np.array_equal(canvas, expected)


def test_choose_faces_equals_choose_face():
    rng = np.random.default_rng(2)
    boxes = np.stack([random_boxes(rng, 12, 400) for _ in range(6)])
    keep = rng.uniform(size=(6, 12)) < 0.7
    keep[:, 0] = True
    shapes = np.array([[480, 640]] * 3 + [[641, 333]] * 3)
    hints = np.full((6, 4), np.nan, np.float32)
    hints[1] = boxes[1][np.flatnonzero(keep[1])[-1]] + 3          # overlaps a face: that face
    hints[4] = [5000, 5000, 5100, 5100]                             # overlaps none: the central one
    got = gpu.choose_faces(torch.from_numpy(boxes), torch.from_numpy(keep), torch.from_numpy(shapes).float(),
                           torch.from_numpy(hints)).numpy()
    for b in range(6):
        kept = np.flatnonzero(keep[b])
        det = Detections(boxes[b][kept], np.ones(len(kept)), np.zeros((len(kept), 5, 2)))
        hint = None if np.isnan(hints[b]).all() else hints[b]
        assert got[b] == kept[choose_face(det, tuple(shapes[b]) + (3,), hint)], b


def face_crops(photos, folder, embedder):
    """JPEG crops around each face of the group photos, as face datasets ship them, and tight
    crops (the face 85% of the side) that only the face rescue finds."""
    paths = []
    for name in ("obama", "biden"):
        image = read_photo(str(photos[name])).pixels
        x1, y1, x2, y2 = embedder.detector([image])[0].boxes[0]
        side = max(x2 - x1, y2 - y1) / 0.85
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        crop = image[int(cy - side / 2):int(cy + side / 2), int(cx - side / 2):int(cx + side / 2)]
        path = folder / f"{name}-tight.jpg"
        cv2.imwrite(str(path), crop)
        paths.append(path)
    for name in ("t1", "players"):
        image = read_photo(str(photos[name])).pixels
        for k, box in enumerate(embedder.detector([image])[0].boxes[:6]):
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            crop = image[max(0, int(y1 - h)):int(y2 + h), max(0, int(x1 - w)):int(x2 + w)]
            path = folder / f"{name}-{k}.jpg"
            cv2.imwrite(str(path), crop)
            paths.append(path)
    return paths


def reference(embedder, path, hint=None):
    """What the onnxruntime path stores for one photo: n_faces and the chosen face."""
    photo = read_photo(str(path))
    det = embedder.detector([photo.pixels])[0]
    if not len(det):
        return 0, None
    k = choose_face(det, photo.pixels.shape, None if hint is None else np.asarray(hint, np.float32) / photo.scale)
    emb, norms = embedder.embed_crops([norm_crop(photo.pixels, det.landmarks[k])])
    return len(det), (det.boxes[k] * photo.scale, det.scores[k], emb[0], norms[0])


def test_a_photo_that_kills_its_decode_process_is_a_transient_row(photos, buffalo_s, tmp_path, monkeypatch):
    """Killed on a photo (a codec bug, or the OOM killer's choice, a machine fault) it was a
    decode_error, kept for good, where the CPU path makes a photo that kills its worker a
    worker_lost row that --retry-failed tries again."""
    import functools

    from tests.features import crashing_decoder

    crash = tmp_path / "crash.jpg"
    crash.write_bytes(photos["obama"].read_bytes())
    paths = [str(photos["obama"]), str(crash), str(photos["biden"])]
    monkeypatch.setattr(gpu, "ProcessDecoders", functools.partial(decoders.ProcessDecoders,
                                                                   decode=crashing_decoder.decode_into))
    pipeline = gpu.DevicePipeline(buffalo_s, device="cpu", batch_size=4, decode_threads=1, decoders="processes")
    try:
        errors, packed = pipeline.extract(paths, [None] * len(paths), Counter())
    finally:
        pipeline.close()
    assert errors == [None, "worker_lost", None]


@pytest.mark.parametrize("kind", decoders.DECODERS)
def test_device_pipeline_on_cpu_agrees_with_onnxruntime(photos, embedder, buffalo_s, tmp_path, kind):
    """Same face chosen for every photo, boxes within 1 px, cosine >= 0.999 (fp32 on the CPU),
    whichever kind of decoder feeds it."""
    paths = [str(p) for p in photos.values()] + [str(p) for p in face_crops(photos, tmp_path, embedder)]
    t1 = read_photo(str(photos["t1"])).pixels
    second = embedder.detector([t1])[0].boxes[1]
    paths.append(str(photos["t1"]))
    hints = [None] * (len(paths) - 1) + [second.tolist()]  # the dataset's box picks another face
    paths.append(str(tmp_path / "gone.jpg"))
    hints.append(None)
    (tmp_path / "bad.jpg").write_bytes(photos["obama"].read_bytes()[:3000])
    paths.append(str(tmp_path / "bad.jpg"))
    hints.append(None)

    pipeline = gpu.DevicePipeline(buffalo_s, device="cpu", batch_size=5, decode_threads=2, decoders=kind)
    timings = Counter()
    errors, packed = pipeline.extract(paths, hints, timings)
    pipeline.close()
    assert errors[-2:] == ["missing_image", "decode_error"] and not any(errors[:-2])
    assert set(timings) == {"decode", "detect", "align", "embed", "faces_rescued"}
    rescued = [p for p in paths if "tight" in p and not len(embedder.detector([read_photo(p).pixels], rescue=False)[0])]
    assert len(rescued) == 2 and timings["faces_rescued"] == 2  # found by the rescue pass, on both paths
    found = gpu.unpack(packed)
    cosines = []
    for j, path in enumerate(paths[:-2]):
        n, face = reference(embedder, path, hints[j])
        assert found["n_faces"][j] == n, path
        assert face is not None, path
        box, score, emb, norm = face
        np.testing.assert_allclose(found["bbox"][j], box, atol=1.0, err_msg=path)
        assert abs(found["det_score"][j] - score) < 1e-3
        assert abs(found["embedding_norm"][j] - norm) / norm < (2e-3 if OPENCV_4_8 else 1e-3)
        cosines.append(float(found["embedding"][j] @ emb))
    assert len(cosines) >= 20 and min(cosines) >= 0.999, cosines
    assert np.abs(found["bbox"][-3] - second).max() <= 1.0  # the hint's face, not the central one


def test_overflowing_or_unsettled_photos_are_redone_exactly(photos, embedder, buffalo_s, monkeypatch):
    """Too few candidates and NMS rounds for a crowd: the flagged photos are redone, not wrong."""
    monkeypatch.setattr(gpu, "CANDIDATES", 8)
    monkeypatch.setattr(gpu, "NMS_ROUNDS", 1)
    paths = [str(photos[name]) for name in ("players", "t1", "obama")]
    pipeline = gpu.DevicePipeline(buffalo_s, device="cpu", batch_size=3, decode_threads=1)
    _, packed = pipeline.extract(paths, [None] * 3, Counter())
    found = gpu.unpack(packed)
    assert (packed[:, -1] == 0).all()  # no row left flagged
    for j, path in enumerate(paths):
        n, (box, _, emb, _) = reference(embedder, path)
        assert found["n_faces"][j] == n and n > 0
        np.testing.assert_allclose(found["bbox"][j], box, atol=1.0)
        assert float(found["embedding"][j] @ emb) >= 0.999


def test_batch_buckets():
    assert gpu.batch_buckets(256) == [16, 32, 64, 128, 256]
    assert gpu.batch_buckets(100) == [16, 32, 64, 100]
    assert gpu.batch_buckets(8) == [8]


def test_networks_see_only_bucket_shapes_and_padding_changes_nothing(photos, embedder, buffalo_s, tmp_path,
                                                                     monkeypatch):
    """On CUDA every batch is padded to a bucket (cuDNN plans each new shape anew: seconds on an
    H200), the rescue's and the redo's odd sizes too; the padding rows must not change a result."""
    monkeypatch.setattr(gpu, "CANDIDATES", 8)  # crowds overflow: the redo path runs too
    paths = [str(p) for p in face_crops(photos, tmp_path, embedder)] + [str(photos["players"])]
    results = []
    for pad in (False, True):
        pipeline = gpu.DevicePipeline(buffalo_s, device="cpu", batch_size=32, decode_threads=2)
        pipeline.pad_batches = pad
        seen = []
        for name in ("detector", "recognizer"):
            net = getattr(pipeline, name)
            setattr(pipeline, name, lambda x, net=net: (seen.append(len(x)), net(x))[1])
        timings = Counter()
        errors, packed = pipeline.extract(paths, [None] * len(paths), timings)
        assert not any(errors) and timings["faces_rescued"] >= 1
        results.append(packed)
        if pad:
            assert set(seen) <= {16, 32}, seen
        else:
            assert set(seen) - {16, 32}  # without padding the networks do see odd sizes
    plain, padded = (gpu.unpack(r) for r in results)
    assert (plain["n_faces"] == padded["n_faces"]).all()
    np.testing.assert_allclose(plain["bbox"], padded["bbox"], atol=0.05)
    assert ((plain["embedding"] * padded["embedding"]).sum(1) >= 0.99999).all()


def test_unknown_precision_is_refused(buffalo_s):
    with pytest.raises(ValueError, match="bf16"):
        gpu.DevicePipeline(buffalo_s, device="cpu", detector_precision="bf16")


def test_batch_for_memory_takes_the_largest_power_of_two_within_60_percent():
    mb, gb = 1 << 20, 1 << 30
    assert gpu.batch_for_memory(80 * gb, 50 * mb) == 256   # an H100: capped at the measured 256
    assert gpu.batch_for_memory(80 * gb, 50 * mb, most=1024) == 512
    assert gpu.batch_for_memory(15 * gb, 50 * mb) == 128   # 0.6 x 15 GiB holds 184 such photos
    assert gpu.batch_for_memory(8 * gb, 50 * mb) == 64
    assert gpu.batch_for_memory(1 * gb, 50 * mb) == 16     # never under 16: the bucket everything pads to


def test_the_memory_probe_runs_the_whole_device_path_on_black_photos(buffalo_s):
    """What `_photo_bytes` measures on CUDA: one batch of black photos through detection, face
    choice, crops and the recogniser. On the CPU an unsized pipeline takes 16 photos a batch."""
    pipeline = gpu.DevicePipeline(buffalo_s, device="cpu", decode_threads=1)
    assert pipeline.batch_size == 16 and len(pipeline.slots[0].canvas) == 16
    canvas, meta, flat = pipeline._blank_batch(3)
    assert canvas.shape == (3, 640, 640, 3) and len(flat) == 3 * 640 * 640 * 3
    rows = pipeline._finish(pipeline._raw(canvas), meta, flat, gpu.CANDIDATES, gpu.NMS_ROUNDS)
    found = gpu.unpack(rows.numpy())
    assert rows.shape == (3, gpu.ROW) and (found["n_faces"] == 0).all()
    assert np.isfinite(found["embedding"]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_an_unsized_pipeline_fits_its_batch_to_free_memory(buffalo_s):
    pipeline = gpu.DevicePipeline(buffalo_s, device="cuda")
    photo = pipeline._photo_bytes()
    assert 1 << 20 < photo < 1 << 30
    assert pipeline.batch_size in (16, 32, 64, 128, 256)
    total = torch.cuda.get_device_properties(pipeline.device).total_memory
    assert pipeline.batch_size == 16 or pipeline.batch_size * 2 * photo <= 0.6 * total


def test_concurrent_calls_take_turns_and_the_next_decodes_early(photos, buffalo_s, tmp_path):
    """Two task threads calling extract at once (a Dask GPU worker's two): each gets its own rows,
    as when called alone, and the second call's first batch is submitted by the first call's
    thread, into a slot the first call freed, while the first call's last batches run."""
    import threading

    paths = [str(p) for p in photos.values()]
    first, second = paths[:5], paths[5:]
    pipeline = gpu.DevicePipeline(buffalo_s, device="cpu", batch_size=2, decode_threads=2)
    alone = [pipeline.extract(p, [None] * len(p), Counter()) for p in (first, second)]

    submitted_by = []
    submit, launch = pipeline._submit, pipeline._launch

    def recording_submit(slot, rows, paths_, hints):
        submitted_by.append((threading.current_thread().name, paths_[rows[0]]))
        return submit(slot, rows, paths_, hints)

    def launch_once_both_waiting(batch, n):
        if not submitted_by or submitted_by[0][0] == threading.current_thread().name == "a":
            with pipeline.turn:  # a's launches wait for b to be in line
                pipeline.turn.wait_for(lambda: len(pipeline.calls) == 2, timeout=30)
        return launch(batch, n)

    pipeline._submit, pipeline._launch = recording_submit, launch_once_both_waiting
    results = {}
    threads = [threading.Thread(target=lambda p=p, name=name: results.__setitem__(name, pipeline.extract(
        p, [None] * len(p), Counter())), name=name) for name, p in (("a", first), ("b", second))]
    threads[0].start()
    while not pipeline.calls:
        pass
    threads[1].start()
    for t in threads:
        t.join()
    for (status, packed), (status_alone, packed_alone) in zip((results["a"], results["b"]), alone):
        assert status == status_alone
        np.testing.assert_allclose(packed, packed_alone, atol=1e-4)
    assert len(second) >= 3 and ("a", second[0]) in submitted_by  # b's first batch, decoded while a ran
    assert all(name == "a" for name, path in submitted_by if path in first)
    pipeline.close()


def test_a_failed_call_leaves_the_pipeline_usable(photos, buffalo_s):
    paths = [str(p) for p in photos.values()]
    pipeline = gpu.DevicePipeline(buffalo_s, device="cpu", batch_size=2, decode_threads=2)
    expected = pipeline.extract(paths, [None] * len(paths), Counter())
    launch, launches = pipeline._launch, []

    def failing_launch(batch, n):
        launches.append(n)
        if len(launches) == 2:
            raise RuntimeError("a bug on the device side")
        return launch(batch, n)

    pipeline._launch = failing_launch
    with pytest.raises(RuntimeError, match="a bug"):
        pipeline.extract(paths, [None] * len(paths), Counter())
    pipeline._launch = launch
    status, packed = pipeline.extract(paths, [None] * len(paths), Counter())
    assert status == expected[0] and len(pipeline.free) == 2
    np.testing.assert_allclose(packed, expected[1], atol=1e-4)
    pipeline.close()


def spoiled(outputs, case, anchor):
    """Detector outputs (scores, boxes, landmarks per stride) with non-finite values, as an fp16
    overflow gives them: at the best anchor of stride 16 (``anchor``), or in 300 of stride 8's scores."""
    outputs = [o.clone() if isinstance(o, torch.Tensor) else o.copy() for o in outputs]
    where = {"nan_scores": (0, slice(0, 300)), "inf_score": (0, 5000), "inf_box": (4, anchor),
             "nan_landmarks": (7, anchor)}[case]
    outputs[where[0]][:, where[1]] = np.inf if case.startswith("inf") else np.nan
    return outputs


@pytest.mark.parametrize("case", ["nan_scores", "inf_score", "inf_box", "nan_landmarks"])
def test_non_finite_detector_outputs_are_no_face_on_both_paths(photos, embedder, buffalo_s, monkeypatch, case):
    """NaN scores sorted first took every candidate slot on the device (its face lost); an inf box
    was stored as the face's; NaN landmarks crashed the CPU path's SVD and gave a NaN embedding
    on the device. Now an anchor with any non-finite output is no candidate, on both paths."""
    path = str(photos["obama"])
    net = embedder.detector.net
    best = int(net(embedder.detector.prepare([read_photo(path).pixels])[0])[1][0].argmax())
    monkeypatch.setattr(embedder.detector, "net", lambda x: spoiled(net(x), case, best))
    n, (box, score, emb, _) = reference(embedder, path)
    pipeline = gpu.DevicePipeline(buffalo_s, device="cpu", batch_size=2, decode_threads=1)
    detector = pipeline.detector
    pipeline.detector = lambda x: spoiled(detector(x), case, best)
    errors, packed = pipeline.extract([path], [None], Counter())
    pipeline.close()
    found = gpu.unpack(packed)
    assert errors == [None] and found["n_faces"][0] == n == 1
    assert np.isfinite(box).all() and np.isfinite(score) and np.isfinite(found["embedding"]).all()
    np.testing.assert_allclose(found["bbox"][0], box, atol=1.0)
    assert float(found["embedding"][0] @ emb) >= 0.999


@pytest.mark.parametrize("fails_at", [2, 3, 4])
def test_a_pipeline_that_cannot_get_its_shared_memory_leaves_none_behind(buffalo_s, monkeypatch, fails_at):
    """/dev/shm too full for the second slot (or its flat buffer): the MemoryError, and the
    segments already made unlinked, not held (GBs at batch 256) while the worker lives."""
    import os

    def segments():
        return {n for n in os.listdir("/dev/shm") if not n.startswith("sem.")}

    check, calls = decoders.check_shm_space, []

    def full_after(nbytes, *args):
        calls.append(nbytes)
        if len(calls) == fails_at:
            raise MemoryError("/dev/shm is full")
        check(nbytes, *args)

    monkeypatch.setattr(decoders, "check_shm_space", full_after)
    before = segments()
    with pytest.raises(MemoryError):
        gpu.DevicePipeline(buffalo_s, device="cpu", batch_size=2, decoders="processes")
    assert segments() <= before
