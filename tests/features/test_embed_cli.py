"""`agepipe embed` on good and bad input: per-image statuses or one clear error, never a traceback."""
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from agepipe.cli import cli
from agepipe.features.store import EMBEDDING_DIM


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture(scope="module")
def bad_photos(photos, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    obama = photos["obama"].read_bytes()
    (d / "zero.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(obama[: len(obama) // 2])
    (d / "text.jpg").write_text("this is not a photo\n")
    face = cv2.imread(str(photos["obama"]))
    cv2.imwrite(str(d / "gray.png"), cv2.cvtColor(face, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(d / "rgba.png"), cv2.cvtColor(face, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(d / "deep16.png"), face.astype(np.uint16) * 257)
    Image.open(photos["obama"]).convert("CMYK").save(d / "cmyk.jpg")
    shutil.copy(photos["biden"], d / "biden.jpg")
    return d


def test_bad_and_odd_photos_each_get_a_status(bad_photos, tmp_path):
    out = tmp_path / "faces.parquet"
    result = run("embed", bad_photos, "--out", out)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pandas()
    status = {p.rsplit("/", 1)[-1]: s for p, s in zip(table.image, table.status)}
    assert status["zero.jpg"] == "decode_error"
    assert status["truncated.jpg"] == "decode_error"
    assert status["text.jpg"] == "decode_error"
    for ok in ("gray.png", "rgba.png", "deep16.png", "cmyk.jpg", "biden.jpg"):
        assert status[ok] == "ok", ok
    errors = dict(zip(table.image.str.rsplit("/", n=1).str[-1], table.error))
    assert "0 bytes" in errors["zero.jpg"] and "truncated" in errors["truncated.jpg"]
    faces = table[table.status == "ok"]
    emb = np.stack(faces.embedding.to_numpy())
    assert emb.shape[1] == EMBEDDING_DIM
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the odd encodings of one photo all give that photo's face
    by_name = {p.rsplit("/", 1)[-1]: e for p, e in zip(faces.image, emb)}
    for name in ("gray.png", "rgba.png", "deep16.png", "cmyk.jpg"):
        assert float(by_name[name] @ by_name["rgba.png"]) > 0.9, name
    assert "8 images, 5 faces" in result.output
    assert "decode_error   3 images" in result.output


def test_huge_photo_is_downscaled_and_boxes_stay_in_original_pixels(photos, tmp_path, embedder):
    small = cv2.imread(str(photos["astronaut"]))
    big = cv2.resize(small, (10000, 10000), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(tmp_path / "huge.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 80])
    del big
    out = tmp_path / "faces.parquet"
    assert run("embed", tmp_path / "huge.jpg", "--out", out).exit_code == 0
    row = pq.read_table(out).to_pylist()[0]
    assert row["status"] == "ok"
    reference = embedder.faces(small)[0]
    factor = 10000 / small.shape[0]
    np.testing.assert_allclose(np.array(row["bbox"]) / factor, reference.bbox, atol=3.0)
    assert float(np.array(row["embedding"]) @ reference.embedding) > 0.95


def test_missing_path_and_empty_folder(tmp_path, photos):
    out = tmp_path / "faces.parquet"
    result = run("embed", tmp_path / "nope.jpg", photos["biden"], "--out", out)
    assert result.exit_code == 0
    statuses = pq.read_table(out)["status"].to_pylist()
    assert statuses == ["missing_image", "ok"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("embed", empty, "--out", out)
    assert result.exit_code != 0 and "no images found" in result.output


def test_a_photo_whose_name_is_not_utf8_gets_its_rows(tmp_path, photos):
    """A file name in another system's encoding (Latin-1 'café.jpg') is held by Python as lone
    surrogates, which a Parquet string cannot hold: embed died in a UnicodeEncodeError after embedding
    every photo, one odd name costing the whole run. The name's undecodable bytes are now \\xNN."""
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos["biden"], folder / os.fsdecode(b"caf\xe9.jpg"))
    (folder / os.fsdecode(b"na\xefve.jpg")).write_bytes(b"not a photo")
    out = tmp_path / "faces.parquet"
    result = run("embed", folder, "--out", out)
    assert result.exit_code == 0, result.output
    rows = {r["image"]: r for r in pq.read_table(out).to_pylist()}
    assert rows[f"{folder}/caf\\xe9.jpg"]["status"] == "ok"
    broken = rows[f"{folder}/na\\xefve.jpg"]
    assert broken["status"] == "decode_error" and broken["error"].startswith(f"{folder}/na\\xefve.jpg: ")
    out = tmp_path / os.fsdecode(b"r\xe9sum\xe9.parquet")  # and an --out so named: written, and said so
    result = run("embed", folder, "--out", out)
    assert result.exit_code == 0 and f"-> {tmp_path}/r\\xe9sum\\xe9.parquet" in result.output, result.output
    with open(out, "rb") as f:  # Arrow opens no such name itself
        assert pq.read_table(f).num_rows == 2


def test_a_photo_the_disk_cannot_read_costs_that_photo_not_the_run(tmp_path, photos, monkeypatch):
    """EIO (a bad sector, a cloud-synced file not on this machine) is raised as it is for extract,
    which redoes the photo; embed has no redo, and one such photo ended the run in a traceback with
    no table. It is now that photo's read_error row, naming it."""
    import errno
    import os

    from agepipe.features import images

    bad = tmp_path / "bad.jpg"
    shutil.copy(photos["biden"], bad)
    opening = os.open

    def open_(p, *args, **kwargs):
        if str(p) == str(bad):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(p))
        return opening(p, *args, **kwargs)

    monkeypatch.setattr(images.os, "open", open_)
    out = tmp_path / "faces.parquet"
    result = run("embed", bad, photos["obama"], "--out", out)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["read_error", "ok"]
    assert rows[0]["error"] == f"{bad}: Input/output error"
    # out of file handles is the machine's: every photo after would fail too, so the run stops
    def exhausted(p, *args, **kwargs):  # the photo's open only: os.open is every module's (torch imports lazily)
        if str(p) == str(photos["obama"]):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(p))
        return opening(p, *args, **kwargs)

    monkeypatch.setattr(images.os, "open", exhausted)
    result = CliRunner().invoke(cli, ["embed", str(photos["obama"]), "--out", str(tmp_path / "none.parquet")])
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EMFILE
    assert not (tmp_path / "none.parquet").exists()


def test_an_out_that_cannot_be_written_is_one_sentence(tmp_path, photos):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" / "faces.parquet"
    result = run("embed", photos["biden"], "--out", out)  # once an OSError traceback
    assert result.exit_code == 1
    assert (f"Error: {out}: cannot write ({tmp_path / 'taken'} is a file, not a folder); give another --out"
            in result.output)


def test_an_out_that_is_a_photo_given_is_refused(tmp_path, photos):
    """`embed me.jpg --out me.jpg` replaced the photo with a Parquet file."""
    photo = tmp_path / "me.jpg"
    shutil.copy(photos["biden"], photo)
    before = photo.read_bytes()
    result = run("embed", photo, "--out", photo)
    assert result.exit_code == 1
    assert (f"Error: {photo}: --out would write over this photo, which is one of those given; give --out "
            "another name") in result.output
    assert photo.read_bytes() == before


def test_corrupt_onnx_file_is_named(tmp_path, photos, buffalo_s):
    models = tmp_path / "models"
    models.mkdir()
    (models / "w600k_mbf.onnx").symlink_to(buffalo_s.recognizer)
    (models / "broken.onnx").write_bytes(b"\x08\x07garbage" * 100)
    result = run("embed", photos["biden"], "--out", tmp_path / "f.parquet", "--models", models)
    assert result.exit_code != 0
    assert "broken.onnx" in result.output and "not a readable ONNX model" in result.output


def test_missing_pack_says_where_it_looked_and_how_to_fix(tmp_path, photos, monkeypatch):
    import threading

    from tests.datasets.loopback import FlakyServer

    empty_mirror = FlakyServer()  # answers 404 to everything
    threading.Thread(target=empty_mirror.serve_forever, daemon=True).start()
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "insightface"))
    monkeypatch.setenv("AGEPIPE_MODEL_URL", f"{empty_mirror.url}/buffalo_l.zip")
    result = run("embed", photos["biden"], "--out", tmp_path / "f.parquet", "--models", "buffalo_l")
    empty_mirror.shutdown()
    assert result.exit_code != 0
    assert "buffalo_l" in result.output and "AGEPIPE_MODEL_URL" in result.output


def test_cli_runs_as_a_real_process(photos, tmp_path):
    out = tmp_path / "faces.parquet"
    proc = subprocess.run([sys.executable, "-m", "agepipe", "embed", str(photos["t1"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1 images, 6 faces" in proc.stdout
    assert pq.read_table(out).num_rows == 6


@pytest.mark.parametrize("command", [["embed", "x.jpg"], ["extract", "--dataset", "sample"],
                                     ["predict", "x.jpg", "--age-model", "."]])
def test_a_det_size_off_the_detectors_grid_is_refused(command):
    # SCRFD's output grids round up while anchors built by floor division would not: at 150 every
    # box landed elsewhere (cosine to the 640 face 0.05), with status ok.
    from agepipe.features.detect import check_det_size

    result = CliRunner().invoke(cli, [*command, "--det-size", "150"])
    assert result.exit_code == 2 and "must be a multiple of 32" in result.output and "e.g. 160" in result.output
    assert check_det_size((640, 640)) == (640, 640) and check_det_size((160, 96)) == (160, 96)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_det_size((640, 100))
