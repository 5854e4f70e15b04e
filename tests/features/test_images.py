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
