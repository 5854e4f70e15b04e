"""Reading photos: every failure becomes a status with a reason, never an exception upstream.

Statuses: missing_image (no such path), not_a_file (a folder, FIFO or device: never opened
for reading, so it cannot hang or stream forever), too_large (more bytes than MAX_FILE_BYTES,
or more pixels than MAX_PIXELS even decoded reduced, a progressive JPEG at its full size, a
TIFF's tile; a JPEG of more than MAX_SCANS scans or MAX_SEGMENTS markers: refused from the
header, before any pixel is allocated), read_error, decode_error (not an image, a truncated one,
or a JPEG whose markers show its data damaged). A folder that cannot be listed is read as a path
of its own (read_error or not_a_file).
"""
from __future__ import annotations

import errno
import io
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

# Decoding a 10000x10000 photo at full size costs 300 MB; the detector sees at most
# det_size pixels anyway, so larger photos are decoded reduced (JPEG) or resized.
MAX_SIDE = 4096
# Our own bounds come before PIL's bomb guard (Image.MAX_IMAGE_PIXELS, left on): a photo of a
# face is a few MB; 64M decoded pixels are 192 MB of BGR, and a decode thread's peak at that
# size was 370-490 MB (PNG, WebP, TIFF; a 62-byte GIF claiming 7999x7999 before its error).
MAX_FILE_BYTES = 64 << 20
MAX_PIXELS = 64_000_000
# libjpeg decodes every block of the image once per scan: 90 kB of repeated scans held a thread
# 47 s (8000x8000). Encoders write about 10; libjpeg-turbo's tools cap untrusted files at 500.
MAX_SCANS = 500
# jpeg_structure takes a Python step per marker while holding the GIL: 60 MB of 4-byte comment
# segments held it 5 s (libjpeg skips them in 0.1 s). Encoders write a few dozen; an ICC profile or
# extended XMP split into 64 kB segments adds one per 64 kB.
MAX_SEGMENTS = 10_000
# Decoded photos waiting for the caller: 64 photos of 500x625 hold 60 MB, but 64 of 4096x4096
# (a JPEG of one colour, 0.3 MB, decodes to that) held 3.2 GB.
PREFETCH_BYTES = 512 << 20
# Every format read_photo decodes (a GIF's first frame, with OpenCV 4.11 or later, and an AVIF where
# OpenCV was built with libavif: elsewhere such a file is a decode_error row); a folder walk skipped
# .gif, .jfif and .avif files that were read when given by name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".avif")
# A folder walk takes a phone's HEIC/HEIF too, which no OpenCV reads: its decode_error row says so,
# where a folder of them was skipped as "no images found".
WALKED_SUFFIXES = IMAGE_SUFFIXES + (".heic", ".heif")


class ImageError(Exception):
    """An image that cannot be used; ``status`` is the store's status for it."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Photo:
    """A decoded photo (BGR uint8) and the factor from its pixels to the original's. The pixels
    are the photo as shown (OpenCV applies its EXIF orientation): boxes and landmarks found on
    them, in embed, extract and predict alike, are in that frame, not the file's stored one."""
    pixels: np.ndarray
    scale: float = 1.0  # original = pixels * scale


# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xDA)}
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}  # an MCU there is one sample, not 8x8 blocks: _scan_blocks does not apply
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
# The marker that ends a scan's entropy-coded data: FF followed by neither a stuffed 00, a restart
# marker D0-D7 nor a fill byte FF. One C-level search, not a Python step per FF byte: the decode
# threads hold the GIL for this, and a GPU worker runs 16 of them beside its launching thread.
_SCAN_END = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
_FILL = re.compile(rb"\xff+")  # fill bytes before a marker: 60 MB of them took 8 s a byte at a time
_MARKER = re.compile(rb"\xff(?=[^\x00\xff])")  # the same, restart markers included


class JpegStructure(NamedTuple):
    size: tuple[int, int] | None  # (width, height) from the frame header
    complete: bool                # the end-of-image marker follows the last scan
    progressive: bool
    scans: int
    segments: int = 0             # markers read; the walk stops past MAX_SEGMENTS
    damage: str = ""              # why the markers show the data damaged; "" when they do not

    @property
    def whole(self) -> bool:
        """libjpeg holds the whole image's coefficients (progressive or more than one scan), so
        a reduced decode still costs 6 bytes a full-size pixel."""
        return self.progressive or self.scans > 1


def _scan_blocks(frame: list[tuple[int, int, int]], size: tuple[int, int], scan: list[int]) -> int:
    """MCUs in a scan of the components ``scan`` (ids) of a frame of ``size`` whose components are
    (id, h, v) sampling factors: an interleaved scan's MCU covers 8*hmax x 8*vmax pixels, a
    single component's is one of its 8x8 blocks (T.81 A.2)."""
    def ceil(a, b):
        return -(-a // b)

    hmax, vmax = max(c[1] for c in frame), max(c[2] for c in frame)
    width, height = size
    if len(scan) > 1:
        return ceil(width, 8 * hmax) * ceil(height, 8 * vmax)
    h, v = next(((c[1], c[2]) for c in frame if c[0] == scan[0]), (hmax, vmax))
    return ceil(ceil(width * h, hmax), 8) * ceil(ceil(height * v, vmax), 8)


def _restart_damage(data: bytes, start: int, end: int, interval: int, mcus: int | None) -> str:
    """Why the restart markers in a scan's entropy-coded data data[start:end] cannot be what an
    encoder wrote; "" when they fit. An encoder writes RST0..RST7 in turn after every ``interval``
    MCUs; libjpeg meets any other sequence with a 'Corrupt JPEG data' warning and decodes on (grey
    or garbled blocks). Damage inside one interval leaves the markers as they were: only a Huffman
    decode sees it. numpy, not a Python step per marker: a restart every MCU of a 12-megapixel photo is 47,000."""
    scan = np.frombuffer(data, np.uint8, end - start, start)
    ff = np.flatnonzero(scan[:-1] == 0xFF)  # stuffed FF 00 and restart markers: about 1% of the bytes
    at = ff[(scan[ff + 1] & 0xF8) == 0xD0]
    numbers = scan[at + 1] - 0xD0
    wrong = np.flatnonzero(numbers != np.arange(len(at)) % 8)
    if len(wrong):
        k = int(wrong[0])
        return f"restart marker RST{numbers[k]} at byte {start + int(at[k]):,} where RST{k % 8} belongs"
    if mcus is not None:
        expected = -(-mcus // interval) - 1
        trailing = len(at) == expected + 1 and start + int(at[-1]) + 2 == end  # an empty last interval
        if len(at) != expected and not trailing:
            return (f"{len(at):,} restart markers in a scan of {mcus:,} MCUs restarted every {interval}, "
                    f"which has {expected:,}")
    return ""


def jpeg_structure(data: bytes) -> JpegStructure:
    """A JPEG's frame size, completeness, progressive flag, scan count and any damage its restart
    markers show. Segments are skipped by their lengths and each scan's entropy-coded data up to
    its next real marker, as the decoder reads them, so bytes FF D9 inside a segment, an EXIF
    thumbnail or after the image's end decide nothing: a cut-off file is one whose data ends before
    the decoder would reach EOI (libjpeg then fills the rest with grey and only warns)."""
    size, pos, n, progressive, scans, segments = None, 2, len(data), False, 0, 0
    frame, interval, lossless = [], 0, False

    def found(complete, damage=""):
        return JpegStructure(size, complete, progressive, scans, segments, damage)

    while pos + 1 < n:
        if data[pos] != 0xFF:                       # garbage where a marker belongs
            return found(False, f"bytes that are no marker at byte {pos:,}" if scans else "")
        marker = data[pos + 1]
        if marker == 0xFF:                          # fill bytes: to the last of them
            pos = _FILL.match(data, pos).end() - 1
            continue
        segments += 1
        if segments > MAX_SEGMENTS:
            return found(False)
        if marker == 0xD9:
            return found(True)
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return found(False)
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in _SOF and size is None and pos + 9 <= n:  # libjpeg allocates for the first, refuses others
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (width, height)
            progressive, lossless = marker in _PROGRESSIVE, marker in _LOSSLESS
            components = data[pos + 10:pos + 10 + 3 * data[pos + 9]] if pos + 9 < n else b""
            frame = [(components[i], components[i + 1] >> 4, components[i + 1] & 15)
                     for i in range(0, len(components) - 2, 3)]
        if marker == 0xDD and length >= 4 and pos + 6 <= n:  # DRI: MCUs per restart interval
            interval = struct.unpack(">H", data[pos + 4:pos + 6])[0]
        scan = list(data[pos + 5:pos + 5 + 2 * data[pos + 4]:2]) if marker == 0xDA and pos + 5 <= n else []
        pos += 2 + length
        if marker == 0xDA:                          # a scan: entropy-coded data up to a marker
            scans += 1
            end = _MARKER.search(data, pos)         # the common file has no restarts: one search
            if end is not None and 0xD0 <= data[end.start() + 1] <= 0xD7:
                if not interval:
                    return found(False, f"restart marker at byte {end.start():,} in a JPEG without restarts")
                end = _SCAN_END.search(data, end.start())
            if end is None:
                return found(False)
            if interval:
                # The MCU count is judged only where the frame is whole: a height of 0 (set
                # later by a DNL marker), sampling factors of 0 or a lossless frame leave it to libjpeg.
                known = (size and size[1] and frame and scan and not lossless
                         and all(h and v for _, h, v in frame))
                damage = _restart_damage(data, pos, end.start(), interval,
                                         _scan_blocks(frame, size, scan) if known else None)
                if damage:
                    return found(False, damage)
            pos = end.start()
    return found(False)


def _tile_pixels(im: Image.Image) -> int:
    """Pixels of one of a tiled TIFF's tiles (0 for anything else): OpenCV allocates a whole tile
    whatever the image's size, so a 260 kB TIFF of 16x16 pixels in one 16368x16368 tile took 770 MB."""
    tags = getattr(im, "tag_v2", None) if im.format == "TIFF" else None
    if not tags:
        return 0
    return int(tags.get(322, 0) or 0) * int(tags.get(323, 0) or 0)  # TileWidth, TileLength


def _header_size(data: bytes, name: str) -> tuple[int, int] | None:
    """(width, height) from the header alone; None when no header is recognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:  # the logical screen OpenCV allocates: PIL
        return struct.unpack("<HH", data[6:10])  # walked every block before the first frame in Python
    try:
        with warnings.catch_warnings():  # the size is all this asks: the decoder judges the rest, and a
            warnings.simplefilter("ignore")  # cut TIFF's 'Corrupt EXIF data' printed twice a photo
            with Image.open(io.BytesIO(data)) as im:
                size, tile = im.size, _tile_pixels(im)
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"{name}: {e}") from None
    except Exception:
        return None
    if tile > MAX_PIXELS:
        raise ImageError("too_large", f"{name}: TIFF tiles of {tile:,} pixels (each decoded whole), more than "
                         f"the {MAX_PIXELS:,} pixels agepipe decodes")
    return size


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of an image's bytes; 1 (as stored) when it has none."""
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
            warnings.simplefilter("ignore")
            value = im.getexif().get(0x0112, 1)
    except Exception:  # EXIF that cannot be read: the photo as stored, as OpenCV shows it then
        return 1
    return value if value in range(1, 9) else 1


def _is_avif(data: bytes) -> bool:
    """An AVIF: an ISOBMFF file whose ftyp box names the avif or avis brand."""
    return _has_brand(data, (b"avif", b"avis"))


def _is_heif(data: bytes) -> bool:
    """A HEIC/HEIF (an iPhone's photo): its ftyp box names a HEVC or HEIF brand."""
    return _has_brand(data, (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")) \
        and not _is_avif(data)  # an AVIF names mif1 too


def _has_brand(data: bytes, brands: tuple[bytes, ...]) -> bool:
    """Whether an ISOBMFF file's ftyp box (major brand, version, compatible brands) names one of ``brands``."""
    if data[4:8] != b"ftyp" or len(data) < 12:
        return False
    box = data[8:min(struct.unpack(">I", data[:4])[0], 1024)]
    return any(box[i:i + 4] in brands for i in range(0, len(box), 4))


def _oriented(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``pixels`` as EXIF ``orientation`` says they are shown (what OpenCV does for a JPEG)."""
    if orientation in (5, 6, 7, 8):  # the stored rows are the shown columns
        pixels = pixels.transpose(1, 0, 2)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        pixels = pixels[:, ::-1]
    if orientation in (3, 4):
        pixels = pixels[::-1]
    return np.ascontiguousarray(pixels)


def decode_image(data: bytes, name: str = "<bytes>", max_side: int = MAX_SIDE) -> Photo:
    if not data:
        raise ImageError("decode_error", f"{name}: empty file (0 bytes)")
    jpeg, whole = data[:2] == b"\xff\xd8", False
    if jpeg:
        structure = jpeg_structure(data)
        size, whole = structure.size, structure.whole
        if structure.segments > MAX_SEGMENTS:
            raise ImageError("too_large", f"{name}: more than the {MAX_SEGMENTS:,} JPEG segments agepipe reads")
        if structure.damage:
            # Read past, the damage leaves blocks grey or garbled with only a warning on stderr, and
            # a garbled face gives a plausible but wrong embedding.
            raise ImageError("decode_error", f"{name}: damaged JPEG data ({structure.damage})")
        if not structure.complete:
            # libjpeg fills a cut-off JPEG with grey and only warns; a half-grey face
            # would give a plausible but wrong embedding.
            raise ImageError("decode_error", f"{name}: truncated JPEG (its data ends before the end-of-image marker)")
        if structure.scans > MAX_SCANS:
            raise ImageError("too_large", f"{name}: {structure.scans:,} scans, more than the {MAX_SCANS} "
                             "agepipe decodes (libjpeg decodes the whole image once per scan)")
    else:
        size = _header_size(data, name)
    if size is None:
        if _is_heif(data):  # a phone's photo: say what it is, not "no known header"
            raise ImageError("decode_error", f"{name}: a HEIC/HEIF photo, which OpenCV does not decode; "
                             "convert it to JPEG")
        raise ImageError("decode_error", f"{name}: not a readable image (no known image header)")
    flag = cv2.IMREAD_COLOR
    reduce = 1
    if jpeg:
        for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if max(size) / factor >= max_side:
                flag, reduce = reduced, factor
                break
    pixels_out = -(-size[0] // reduce) * -(-size[1] // reduce)
    if pixels_out > MAX_PIXELS:
        raise ImageError("too_large", f"{name}: {size[0]}x{size[1]} pixels"
                         + (f" (1/{reduce} decoded: {pixels_out:,})" if reduce > 1 else "")
                         + f" is more than the {MAX_PIXELS:,} pixels agepipe decodes")
    if whole and size[0] * size[1] > MAX_PIXELS:  # a 500-byte file could claim 24 GB of coefficients
        raise ImageError("too_large", f"{name}: {size[0]}x{size[1]} pixels, progressive or multi-scan (decoded "
                         f"whole whatever the reduction), more than the {MAX_PIXELS:,} pixels agepipe decodes")
    buf = np.frombuffer(data, dtype=np.uint8)
    # OpenCV 5 turns a WebP by its EXIF orientation, OpenCV 4 does not, and OpenCV (5.1) does not turn
    # an AVIF by its irot/imir boxes (PIL reads them as its EXIF orientation): agepipe turns both itself
    turn_here = (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or _is_avif(data)
    if turn_here:
        flag |= cv2.IMREAD_IGNORE_ORIENTATION
    try:
        pixels = cv2.imdecode(buf, flag)
    except cv2.error as e:  # e.g. a header claiming more pixels than OpenCV allows
        raise ImageError("decode_error", f"{name}: {str(e).strip().splitlines()[-1]}") from None
    if pixels is None:
        raise ImageError("decode_error", f"{name}: not a readable image")
    if turn_here:
        pixels = _oriented(pixels, _exif_orientation(data))
    scale = float(reduce)
    if reduce > 1:
        scale = max(size) / max(pixels.shape[:2])
    if max(pixels.shape[:2]) > max_side:
        f = max_side / max(pixels.shape[:2])
        pixels = cv2.resize(pixels, (max(1, round(pixels.shape[1] * f)), max(1, round(pixels.shape[0] * f))),
                            interpolation=cv2.INTER_AREA)
        scale /= f
    return Photo(np.ascontiguousarray(pixels), scale)


# The machine's, not the file's: too many open files, no memory, a network mount that dropped or
# stalls (FUSE's ENOTCONN, NFS's ESTALE, and EIO or ETIMEDOUT from a soft mount whose server does
# not answer). A photo's read_error is kept for good (--retry-failed redoes only transient rows),
# so these are raised as they are: the shard's photos are redone one by one, a photo that fails
# again is a transient "error" row, and a shard of which every photo fails stops the run.
# Of those, the ones that fail every photo after them too (read_photo_once lets them stop the run).
_EXHAUSTED_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_MACHINE_ERRNOS = _EXHAUSTED_ERRNOS | {errno.ENOTCONN, errno.ESTALE, errno.EIO, errno.ETIMEDOUT, errno.EHOSTDOWN,
                                       errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET}


def _read_error(path: str, e: OSError) -> Exception:
    return e if e.errno in _MACHINE_ERRNOS else ImageError("read_error", f"{path}: {e.strerror or e}")


def read_bytes(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes, at most ``limit``. Opened without blocking and checked on the
    open descriptor, so a FIFO, a device (a link to /dev/zero) or a folder is refused, not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError("missing_image", f"{path}: no such file") from None
    except OSError as e:
        raise _read_error(path, e) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImageError("not_a_file", f"{path}: not a regular file (a folder, FIFO or device)")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise ImageError("too_large", f"{path}: {info.st_size:,} bytes, more than the {limit:,} "
                             "agepipe reads per image")
        try:
            data = f.read(min(info.st_size, limit) + 1)  # not limit + 1: CPython allocates all it is asked for
        except OSError as e:
            raise _read_error(path, e) from None
    if len(data) > limit:  # grew since fstat
        raise ImageError("too_large", f"{path}: more than the {limit:,} bytes agepipe reads per image")
    return data


def read_photo(path: str, max_side: int = MAX_SIDE) -> Photo:
    return decode_image(read_bytes(path), path, max_side)


def read_photo_once(path: str, max_side: int = MAX_SIDE) -> Photo:
    """read_photo for a command that has no redo (embed, predict): a read the machine failed
    (_MACHINE_ERRNOS: EIO from a bad sector or a cloud file not on this machine, a mount that
    dropped), which extract raises to redo the photo, is the photo's read_error, not the run's end.
    A machine out of file handles or memory fails every photo after it: that stops the run."""
    try:
        return read_photo(path, max_side)
    except OSError as e:
        if e.errno in _EXHAUSTED_ERRNOS:
            raise
        raise ImageError("read_error", f"{path}: {e.strerror or e}") from None


def read_image(path: str) -> np.ndarray:
    """BGR uint8 pixels of a photo at full size, or ImageError with a reason."""
    return read_photo(path, max_side=1 << 30).pixels


def as_text(text: str) -> str:
    """A photo's path, or a message naming it, as text any writer takes: a file name's bytes that are
    not UTF-8 (a name from a Latin-1 system), which Python holds as lone surrogates that a Parquet
    string and a UTF-8 stdout refuse, become backslash escapes (caf\\xe9.jpg)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def never_a_photo(targets: list, photos: list[str], option: str) -> None:
    """ValueError where an output is one of the photos read: `embed me.jpg --out me.jpg`,
    `predict me.jpg --annotate me.jpg`, or a folder annotated into again (a.jpg drawn over the
    a.annotated.jpg given too) replaced the photo."""
    given = {os.path.realpath(p) for p in photos}
    for target in targets:
        if os.path.realpath(target) in given:
            raise ValueError(f"{target}: {option} would write over this photo, which is one of those given; "
                             f"give {option} another name")


def find_images(paths: list[str]) -> list[str]:
    """Files as given, folders walked (sorted) for image files. A folder that cannot be listed is
    kept as a path of its own, so its read gives it a row saying why (os.walk skipped it silently)."""
    found = []

    def unlisted(error: OSError):
        found.append(error.filename)

    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path, onerror=unlisted):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files)
                          if f.lower().endswith(WALKED_SUFFIXES)]
        else:
            found.append(path)
    return found


def read_photos(paths: list[str], threads: int = 4, max_side: int = MAX_SIDE, prefetch: int = 64,
                read=read_photo):
    """(path, Photo or ImageError) in input order, each from ``read`` (read_photo_once where the
    machine's read errors are the photos'), decoded ahead by a thread pool so decoding
    overlaps the caller's inference (OpenCV releases the GIL while it decodes). At most
    ``prefetch`` photos wait decoded, and a decode thread starts no photo while those waiting
    hold PREFETCH_BYTES of pixels (the photo the caller waits for excepted), so memory stays
    bounded on any number and size of photos: PREFETCH_BYTES and one photo a thread."""
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    room = threading.Condition()
    held, taken, stopped = [0], [0], [False]  # pixel bytes decoded, not taken; photos taken; caller gone

    def load(index, path):
        with room:
            room.wait_for(lambda: held[0] < PREFETCH_BYTES or index == taken[0] or stopped[0])
        try:
            photo = read(path, max_side)
        except ImageError as e:
            return path, e
        with room:
            held[0] += photo.pixels.nbytes
        return path, photo

    def take(future):
        path, photo = future.result()
        with room:
            held[0] -= photo.pixels.nbytes if isinstance(photo, Photo) else 0
            taken[0] += 1
            room.notify_all()
        return path, photo

    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending = deque()
        try:
            for index, path in enumerate(paths):
                pending.append(pool.submit(load, index, path))
                if len(pending) >= prefetch:
                    yield take(pending.popleft())
            while pending:
                yield take(pending.popleft())
        finally:  # a caller that stops early (an error, Ctrl-C): no thread may wait for room forever
            for future in pending:
                future.cancel()
            with room:
                stopped[0] = True
                room.notify_all()
