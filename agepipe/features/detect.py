"""SCRFD face detection, batched across images.

Each image is letterboxed (aspect kept, top-left aligned, zero padded) into the same
det_size canvas so a whole batch goes through the network in one call; decoding and NMS
follow insightface's SCRFD exactly, so boxes and scores match its per-image detection.

Face rescue: SCRFD misses a face that fills most of the frame (at 83% of the side, 43 of 45
dataset-style crops). A photo with no face is detected once more, shrunk by 1 + 2 * RESCUE_PAD
and centred on a det_size canvas of RESCUE_VALUE, as if padded by RESCUE_PAD of its longer
side on every edge; the faces found are mapped back to the photo's pixels. The policy is
part of the feature set's identity (``rescue_identity``) and the GPU path applies the same
functions (``needs_rescue``, ``rescue_canvas``, ``from_rescue_canvas``).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DET_THRESH = 0.5
NMS_THRESH = 0.4
RESCUE_PAD = 0.5      # each edge padded by this share of the photo's longer side
RESCUE_VALUE = 0      # the padding's grey level (BGR, all channels)


@dataclass
class Detections:
    boxes: np.ndarray      # (k, 4) x1, y1, x2, y2 in the image's pixels
    scores: np.ndarray     # (k,)
    landmarks: np.ndarray  # (k, 5, 2)
    rescued: bool = False  # found only by the rescue pass

    def __len__(self) -> int:
        return len(self.scores)


def letterbox_size(shape: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w): an image of ``shape`` (height, width, ...) scaled to fit a (width, height)
    canvas, aspect kept, as insightface's SCRFD computes it."""
    width, height = size
    ratio = shape[0] / shape[1]
    if ratio > height / width:
        return height, max(1, int(height / ratio))
    return max(1, int(width * ratio)), width  # a 1-pixel strip must not become 0 pixels


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The image resized into a (width, height) canvas at the top left, and its scale."""
    width, height = size
    new_h, new_w = letterbox_size(image.shape, size)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return canvas, new_h / image.shape[0]


def needs_rescue(det: Detections) -> bool:
    """The rescue pass runs only for a photo in which the first pass found no face."""
    return len(det) == 0


def rescue_identity() -> dict:
    return {"when": "no_face", "pad": RESCUE_PAD, "value": RESCUE_VALUE, "placement": "centre"}


def rescue_canvas(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
    """The (width, height) canvas the rescue pass detects on, and the map to it:
    canvas_xy = image_xy * scale_xy + offset_xy. The photo is resized to its letterbox
    scale / (1 + 2 * RESCUE_PAD) and centred, so a face filling it falls in the detector's range."""
    width, height = size
    h, w = image.shape[:2]
    scale = min(width / w, height / h) / (1 + 2 * RESCUE_PAD)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    x0, y0 = (width - new_w) // 2, (height - new_h) // 2
    canvas = np.full((height, width, 3), RESCUE_VALUE, dtype=np.uint8)
    canvas[y0:y0 + new_h, x0:x0 + new_w] = cv2.resize(image, (new_w, new_h))
    return canvas, (x0, y0), (new_w / w, new_h / h)  # the resize's exact per-axis factors


def from_rescue_canvas(det: Detections, offset_xy: tuple[int, int], scale_xy: tuple[float, float],
                       image_shape: tuple[int, ...]) -> Detections:
    """Faces found on a rescue canvas, in the photo's own pixels; a face whose box centre lies
    on the padding is not one of the photo's."""
    offset, scale = np.asarray(offset_xy, np.float32), np.asarray(scale_xy, np.float32)
    boxes = (det.boxes - np.tile(offset, 2)) / np.tile(scale, 2)
    landmarks = (det.landmarks - offset) / scale
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (cx >= 0) & (cx < image_shape[1]) & (cy >= 0) & (cy < image_shape[0])
    return Detections(boxes[inside].astype(np.float32), det.scores[inside],
                      landmarks[inside].astype(np.float32), rescued=bool(inside.any()))


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS with SCRFD's +1 pixel area convention; indices in descending score."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][overlap <= thresh]
    return np.array(keep, dtype=np.int64)


def finite_only(scores: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray):
    """The candidates whose score, box and landmarks are all finite: a NaN or inf from the
    network (an fp16 overflow) is no face; kept, it became a stored inf box or crashed the SVD."""
    finite = np.isfinite(scores) & np.isfinite(boxes).all(1) & np.isfinite(landmarks).all((1, 2))
    return scores[finite], boxes[finite], landmarks[finite]


def check_det_size(size: tuple[int, int]) -> tuple[int, int]:
    """The detector's input size, refused unless a multiple of its largest stride: the network's
    output grids round up, the anchors' grids would not, and every box would land elsewhere."""
    if any(side < 32 or side % 32 for side in size):
        raise ValueError(f"det size {size[0]}x{size[1]}: must be a multiple of 32 (the detector's largest stride), "
                         f"e.g. {max(32, round(size[0] / 32) * 32)}")
    return tuple(size)


class Detector:
    """SCRFD with keypoints (the 9-output variants of buffalo_s and buffalo_l)."""

    strides = (8, 16, 32)
    anchors_per_cell = 2

    def __init__(self, net, det_size: int | tuple[int, int] = 640,
                 det_thresh: float = DET_THRESH, nms_thresh: float = NMS_THRESH):
        self.net = net
        self.size = check_det_size((det_size, det_size) if isinstance(det_size, int) else tuple(det_size))
        self.det_thresh = det_thresh
        self.nms_thresh = nms_thresh
        self._centers = {}

    def _anchor_centers(self, stride: int) -> np.ndarray:
        if stride not in self._centers:
            h, w = self.size[1] // stride, self.size[0] // stride
            grid = np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32) * stride
            self._centers[stride] = np.repeat(grid.reshape(-1, 2), self.anchors_per_cell, axis=0)
        return self._centers[stride]

    def prepare(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[float]]:
        """The NCHW float32 batch (RGB, (x - 127.5) / 128) and each image's scale."""
        canvases, scales = zip(*(letterbox(im, self.size) for im in images))
        batch = cv2.dnn.blobFromImages(list(canvases), 1.0 / 128.0, self.size,
                                       (127.5, 127.5, 127.5), swapRB=True)
        return batch, list(scales)

    def __call__(self, images: list[np.ndarray], rescue: bool = True) -> list[Detections]:
        """Faces in each image; with ``rescue``, the photos with none go through the rescue
        pass together as one batch."""
        if not images:
            return []
        batch, scales = self.prepare(images)
        dets = self.decode(self.net(batch), scales)
        missed = [i for i, det in enumerate(dets) if needs_rescue(det)] if rescue else []
        if missed:
            canvases = [rescue_canvas(images[i], self.size) for i in missed]
            batch, _ = self.prepare([c for c, _, _ in canvases])
            found = self.decode(self.net(batch), [1.0] * len(missed))
            for i, det, (_, offset, scale) in zip(missed, found, canvases):
                dets[i] = from_rescue_canvas(det, offset, scale, images[i].shape)
        return dets

    def decode(self, outputs: list[np.ndarray], scales: list[float]) -> list[Detections]:
        n = len(self.strides)
        results = []
        for b, scale in enumerate(scales):
            scores, boxes, kpss = [], [], []
            for i, stride in enumerate(self.strides):
                s = outputs[i][b].reshape(-1)
                keep = np.where(s >= self.det_thresh)[0]
                centers = self._anchor_centers(stride)[keep]
                d = outputs[i + n][b][keep] * stride
                k = outputs[i + 2 * n][b][keep] * stride
                scores.append(s[keep])
                boxes.append(np.hstack([centers - d[:, :2], centers + d[:, 2:]]))
                kpss.append((np.tile(centers, 5) + k).reshape(-1, 5, 2))
            s = np.concatenate(scores)
            order = np.argsort(-s, kind="stable")
            s = s[order].astype(np.float32)
            bx = (np.concatenate(boxes)[order] / scale).astype(np.float32)
            kp = (np.concatenate(kpss)[order] / scale).astype(np.float32)
            s, bx, kp = finite_only(s, bx, kp)
            keep = nms(bx, s, self.nms_thresh) if len(s) else np.zeros(0, np.int64)
            results.append(Detections(bx[keep].reshape(-1, 4), s[keep], kp[keep].reshape(-1, 5, 2)))
        return results
