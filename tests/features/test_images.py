"""Hostile photos: each costs its own photo, with a status, before its pixels cost memory."""
import io
import resource
import struct

import pytest
from PIL import Image

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
