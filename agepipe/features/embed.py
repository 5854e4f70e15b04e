"""Photos to ArcFace embeddings: detect (batched), align, embed (batched), choose a face.

Face-selection policy for dataset images (part of the feature set's identity):
the face whose box best overlaps the dataset's own box when it gives one (IMDB-WIKI's
face_location); otherwise, or when no face overlaps that box, insightface's choice for
``max_num=1``: the largest face nearest the centre (area minus twice the squared
distance of its centre from the image centre).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from agepipe.features.align import ARCFACE_TEMPLATE, norm_crop
from agepipe.features.detect import DET_THRESH, NMS_THRESH, Detections, Detector, rescue_identity
from agepipe.features.models import ModelPack, load_net, recognizer_normalisation, resolve_pack
from agepipe.features.store import EMBEDDING_DIM

SELECTION_POLICY = "best-iou-with-hint-else-largest-central-v1"
RECOGNITION_BATCH = 64


@dataclass
class Face:
    bbox: np.ndarray        # (4,) x1, y1, x2, y2 in original pixels
    landmarks: np.ndarray   # (5, 2) in original pixels
    det_score: float
    embedding: np.ndarray   # (EMBEDDING_DIM,) L2-normalised
    embedding_norm: float


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    x1 = np.maximum(boxes[:, 0], box[0])
    y1 = np.maximum(boxes[:, 1], box[1])
    x2 = np.minimum(boxes[:, 2], box[2])
    y2 = np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + (box[2] - box[0]) * (box[3] - box[1]) - inter + 1e-9)


def choose_face(det: Detections, image_shape: tuple[int, ...], hint: np.ndarray | None = None) -> int:
    """Index of the face the policy above picks (det must be non-empty)."""
    if hint is not None and np.all(np.isfinite(hint)):
        iou = box_iou(det.boxes, np.asarray(hint, dtype=np.float32))
        if iou.max() > 0:
            return int(np.argmax(iou))
    b = det.boxes
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    cx = (b[:, 0] + b[:, 2]) / 2 - image_shape[1] // 2
    cy = (b[:, 1] + b[:, 3]) / 2 - image_shape[0] // 2
    return int(np.argmax(area - 2.0 * (cx ** 2 + cy ** 2)))


def feature_identity(pack: ModelPack, det_size: int, det_thresh: float = DET_THRESH) -> dict:
    """Everything that changes an embedding, hashed into the feature set's name. The runtime
    is not part of it: onnxruntime and torch agree to cosine >= 0.999 (recorded, not hashed)."""
    return {**pack.identity(), "det_size": det_size, "det_thresh": det_thresh, "nms_thresh": NMS_THRESH,
            "template": ARCFACE_TEMPLATE.round(4).tolist(), "selection": SELECTION_POLICY,
            "rescue": rescue_identity()}


class FaceEmbedder:
    """A model pack loaded once: ``faces(image)`` for every face, ``embed_crops`` for aligned ones."""

    def __init__(self, pack: str | ModelPack = "buffalo_s", det_size: int = 640, device: str = "cpu",
                 runtime: str = "onnxruntime", det_thresh: float = DET_THRESH, threads: int = 0):
        self.pack = resolve_pack(pack) if isinstance(pack, str) else pack
        self.det_size = det_size
        self.runtime = runtime
        self.detector = Detector(load_net(self.pack.detector, runtime, device, threads), det_size, det_thresh)
        self.recognizer = load_net(self.pack.recognizer, runtime, device, threads)
        self.rec_mean, self.rec_std = recognizer_normalisation(self.pack.recognizer)

    @property
    def provider(self) -> str:
        return self.recognizer.provider

    def identity(self) -> dict:
        return feature_identity(self.pack, self.det_size, self.detector.det_thresh)

    def embed_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(n, EMBEDDING_DIM) L2-normalised embeddings and their raw norms for aligned 112x112 BGR crops."""
        if not crops:
            return np.zeros((0, EMBEDDING_DIM), np.float32), np.zeros(0, np.float32)
        out = []
        for i in range(0, len(crops), RECOGNITION_BATCH):
            blob = cv2.dnn.blobFromImages(crops[i:i + RECOGNITION_BATCH], 1.0 / self.rec_std, (112, 112),
                                          (self.rec_mean,) * 3, swapRB=True)
            out.append(self.recognizer(blob)[0])
        raw = np.concatenate(out).astype(np.float32)
        norms = np.linalg.norm(raw, axis=1)
        return raw / np.maximum(norms, 1e-12)[:, None], norms

    def faces_batch(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Every face of every image (detection batched across images)."""
        dets = self.detector(images)
        crops = [norm_crop(im, kp) for im, det in zip(images, dets) for kp in det.landmarks]
        emb, norms = self.embed_crops(crops)
        result, j = [], 0
        for det in dets:
            faces = []
            for k in range(len(det)):
                faces.append(Face(det.boxes[k], det.landmarks[k], float(det.scores[k]), emb[j], float(norms[j])))
                j += 1
            result.append(faces)
        return result

    def faces(self, image: np.ndarray) -> list[Face]:
        return self.faces_batch([image])[0]


def in_original_pixels(face: Face, scale: float) -> Face:
    """A face found on a downscaled photo, with its box and landmarks in the original's pixels."""
    if scale == 1.0:
        return face
    return Face(face.bbox * scale, face.landmarks * scale, face.det_score, face.embedding, face.embedding_norm)


FACES_SCHEMA_FIELDS = ["image", "face_index", "status", "error", "det_score", "bbox", "landmarks",
                       "embedding", "embedding_norm"]


def embed_files(paths: list[str], embedder: FaceEmbedder, batch_size: int = 16, progress: bool = True):
    """Every face of every photo as a pyarrow table (one row per face, face_index 0 the highest
    det_score; one row with a status for a photo with no face or that cannot be read). No face is
    chosen here: the policy above is extract's, for one face a dataset row."""
    import pyarrow as pa
    from tqdm import tqdm

    from agepipe.features.images import ImageError, as_text, read_photo_once, read_photos
    from agepipe.features.store import fixed_list

    rows = {k: [] for k in FACES_SCHEMA_FIELDS}

    def add(image, index, status, error=None, face=None):
        rows["image"].append(as_text(image))
        rows["face_index"].append(index)
        rows["status"].append(status)
        rows["error"].append(error and as_text(error))
        rows["det_score"].append(face.det_score if face else None)
        rows["bbox"].append(face.bbox if face else np.zeros(4, np.float32))
        rows["landmarks"].append(face.landmarks.reshape(-1) if face else np.zeros(10, np.float32))
        rows["embedding"].append(face.embedding if face else np.zeros(EMBEDDING_DIM, np.float32))
        rows["embedding_norm"].append(face.embedding_norm if face else None)

    def flush(batch):
        found = embedder.faces_batch([photo.pixels for _, photo in batch])
        for (path, photo), faces in zip(batch, found):
            if not faces:
                add(path, None, "no_face")
            for i, face in enumerate(faces):
                add(path, i, "ok", face=in_original_pixels(face, photo.scale))

    batch = []
    bar = tqdm(total=len(paths), unit="img", desc="embed", disable=not progress)
    for path, photo in read_photos(paths, read=read_photo_once):
        if isinstance(photo, ImageError):
            add(path, None, photo.status, str(photo))
        else:
            batch.append((path, photo))
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
        bar.update(1)
    if batch:
        flush(batch)
    bar.close()
    ok = np.array([s == "ok" for s in rows["status"]], dtype=bool)
    return pa.table({
        "image": pa.array(rows["image"], pa.string()),
        "face_index": pa.array(rows["face_index"], pa.int16()),
        "status": pa.array(rows["status"], pa.string()),
        "error": pa.array(rows["error"], pa.string()),
        "det_score": pa.array(rows["det_score"], pa.float32()),
        "bbox": fixed_list(np.array(rows["bbox"]), 4, ok),
        "landmarks": fixed_list(np.array(rows["landmarks"]), 10, ok),
        "embedding": fixed_list(np.array(rows["embedding"]), EMBEDDING_DIM, ok),
        "embedding_norm": pa.array(rows["embedding_norm"], pa.float32()),
    })
