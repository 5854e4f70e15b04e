"""Reading photos: every failure becomes a status with a reason, never an exception upstream."""
from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# Decoding a 10000x10000 photo at full size costs 300 MB; the detector sees at most
# det_size pixels anyway, so larger photos are decoded reduced (JPEG) or resized.
MAX_SIDE = 4096
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

Image.MAX_IMAGE_PIXELS = None  # we only read headers with PIL; the size check is ours


class ImageError(Exception):
    """An image that cannot be used; ``status`` is the store's status for it."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Photo:
    """A decoded photo (BGR uint8) and the factor from its pixels to the original's."""
    pixels: np.ndarray
    scale: float = 1.0  # original = pixels * scale


def _header_size(data: bytes) -> tuple[int, int] | None:
    import io
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return None


def decode_image(data: bytes, name: str = "<bytes>", max_side: int = MAX_SIDE) -> Photo:
    if not data:
        raise ImageError("decode_error", f"{name}: empty file (0 bytes)")
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        # libjpeg fills a cut-off JPEG with grey and only warns; a half-grey face
        # would give a plausible but wrong embedding.
        raise ImageError("decode_error", f"{name}: truncated JPEG (no end-of-image marker)")
    size = _header_size(data)
    flag = cv2.IMREAD_COLOR
    reduce = 1
    if size is not None and data[:2] == b"\xff\xd8":
        for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if max(size) / factor >= max_side:
                flag, reduce = reduced, factor
                break
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        pixels = cv2.imdecode(buf, flag)
    except cv2.error as e:  # e.g. a header claiming more pixels than OpenCV allows
        raise ImageError("decode_error", f"{name}: {str(e).strip().splitlines()[-1]}") from None
    if pixels is None:
        raise ImageError("decode_error", f"{name}: not a readable image")
    scale = float(reduce)
    if reduce > 1 and size is not None:
        scale = max(size) / max(pixels.shape[:2])
    if max(pixels.shape[:2]) > max_side:
        f = max_side / max(pixels.shape[:2])
        pixels = cv2.resize(pixels, (max(1, round(pixels.shape[1] * f)), max(1, round(pixels.shape[0] * f))),
                            interpolation=cv2.INTER_AREA)
        scale /= f
    return Photo(np.ascontiguousarray(pixels), scale)


def read_photo(path: str, max_side: int = MAX_SIDE) -> Photo:
    if not os.path.exists(path):
        raise ImageError("missing_image", f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError("read_error", f"{path}: {e.strerror or e}") from None
    return decode_image(data, path, max_side)


def read_image(path: str) -> np.ndarray:
    """BGR uint8 pixels of a photo at full size, or ImageError with a reason."""
    return read_photo(path, max_side=1 << 30).pixels


def find_images(paths: list[str]) -> list[str]:
    """Files as given, folders walked (sorted) for image files."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files)
                          if f.lower().endswith(IMAGE_SUFFIXES)]
        else:
            found.append(path)
    return found


def read_photos(paths: list[str], threads: int = 4, max_side: int = MAX_SIDE, prefetch: int = 64):
    """(path, Photo or ImageError) in input order, decoded ahead by a thread pool so decoding
    overlaps the caller's inference (OpenCV releases the GIL while it decodes). At most
    ``prefetch`` photos wait decoded, so memory stays bounded on any number of paths."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def load(path):
        try:
            return path, read_photo(path, max_side)
        except ImageError as e:
            return path, e

    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending = deque()
        for path in paths:
            pending.append(pool.submit(load, path))
            if len(pending) >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
