"""Adience: messy fold files become a manifest where every line has a row and a status."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from agepipe.datasets import adience, prepare
from agepipe.datasets.manifest import MetadataError, age_bin, read_manifest, summarize
from agepipe.features.store import MANIFEST_SCHEMA
from tests.datasets import builders
from tests.datasets.builders import adience_files, adience_fold_text, adience_rows, write_files


@pytest.mark.parametrize("label, age, bad", [
    ("(25, 32)", 28.5, False), ("(38, 42)", 40.0, False), ("(8, 23)", 15.5, False), ("(27, 32)", 29.5, False),
    (" (60, 100) ", 80.0, False), ("35", 35.0, False), ("3", 3.0, False), ("None", math.nan, False),
    ("", math.nan, False), ("(25, )", math.nan, True), ("(32, 25)", math.nan, True), ("(60, 200)", math.nan, True),
    ("abc", math.nan, True), ("-3", math.nan, True), ("140", math.nan, True),
])
def test_parse_age(label, age, bad):
    got, got_bad = adience.parse_age(label)
    assert got_bad == bad and (got == age or math.isnan(got) and math.isnan(age))


def test_age_classes_follow_the_nearest_midpoint_with_kim_2021_ties():
    # Exact ties: 3 -> 4-6, 7.5 -> 4-6, 13.75 -> 15-20, 23 -> 25-32, 34.5 -> 25-32, 45.5 -> 38-43, 65.25 -> 60-100.
    ages = [0, 1, 2, 3, 4, 6, 7.5, 8, 13, 13.75, 14, 15.5, 23, 24, 33, 34.5, 35, 45.5, 46, 60, 65, 65.25, 100, math.nan]
    want = [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7, -1]
    assert age_bin(ages).tolist() == want


def test_manifest_accounts_for_every_line_with_the_right_labels(tmp_path):
    root = tmp_path / "adience"
    prepare("adience", tmp_path, source=str(write_files(tmp_path / "mine", adience_files())))
    frame = read_manifest(root / "manifest.parquet")

    for fold in range(5):
        text = adience_fold_text(fold)
        lines = [line for line in text.replace("\r\n", "\n").split("\n")[1:] if line.strip()]
        assert (frame["fold"] == fold).sum() == len(lines) == len(adience_rows(fold))
        got = frame[frame["fold"] == fold].reset_index(drop=True)
        for i, row in enumerate(adience_rows(fold)):
            r = got.iloc[i]
            where = f"{r['source_line']} {row.fields}"
            assert r["status"] == row.status, where
            assert (np.isnan(r["age"]) and np.isnan(row.age)) or r["age"] == pytest.approx(row.age), where
            assert r["age_bin"] == row.age_bin and r["gender"] == row.gender, where
            assert r["age_label"] == (row.fields[3] if len(row.fields) > 3 else ""), where

    ok = frame[frame["status"] == "ok"]
    assert all((root / i).is_file() for i in ok["image_id"])
    assert frame["image_id"].is_unique
    assert "aligned/7153718@N04/landmark_aligned_face.2282.11597935265_29bcdfa4a5_o.jpg" in set(ok["image_id"])
    assert "fold_0_data.txt#L12" in set(frame["image_id"])              # the line that names no image
    assert frame["face_hint"].map(lambda h: np.isnan(np.asarray(h, dtype=float)).all()).all()  # NaN, never null
    # Folds come from the files, and a user never crosses folds.
    assert frame.dropna(subset=["subject_id"]).groupby("subject_id")["fold"].nunique().max() == 1


def test_written_manifest_has_the_contract_schema_first(tmp_path):
    prepare("adience", tmp_path, source=str(write_files(tmp_path / "mine", adience_files())))
    schema = pq.read_schema(tmp_path / "adience" / "manifest.parquet")
    assert schema.names[:len(MANIFEST_SCHEMA)] == MANIFEST_SCHEMA.names
    for field in MANIFEST_SCHEMA:
        assert schema.field(field.name).type == field.type, field.name
    assert {"age_label", "gender_label", "source_line", "face_x", "fiducial_score"} <= set(schema.names)
    age = pq.read_table(tmp_path / "adience" / "manifest.parquet", columns=["age"])["age"]
    assert age.null_count == 0 and np.isnan(age.to_numpy()).sum() > 0      # unknown ages are NaN


def test_a_file_that_is_not_a_fold_file_is_named(tmp_path):
    root = tmp_path / "adience"
    root.mkdir()
    for k in range(5):
        (root / f"fold_{k}_data.txt").write_text(adience_fold_text(k))
    (root / "fold_3_data.txt").write_text("userid\timage\n1\t2\n")
    with pytest.raises(MetadataError, match=r"fold_3_data.txt: line 1 is not an Adience fold header"):
        adience.build_manifest(root)


def test_a_usable_line_is_not_lost_to_an_earlier_unusable_line_of_the_same_image(tmp_path):
    """A cut line that still names its image, then that image's whole line: the whole line is
    the image's usable row, under the image's own id. (It was marked "duplicate" under
    "...jpg#2", and the image had no usable row.)"""
    root = tmp_path / "adience"
    image = "aligned/7153718@N04/landmark_aligned_face.2282.11597935265_29bcdfa4a5_o.jpg"
    (root / "aligned" / "7153718@N04").mkdir(parents=True)
    (root / image).write_bytes(b"jpeg")
    whole = "7153718@N04\t11597935265_29bcdfa4a5_o.jpg\t2282\t(25, 32)\tf\t1\t2\t3\t4\t5\t6\t7"
    for k in range(5):
        lines = ["\t".join(adience.REQUIRED)] if k else ["\t".join(builders.ADIENCE_HEADER), whole[:-20], whole]
        (root / f"fold_{k}_data.txt").write_text("\n".join(lines) + "\n")
    frame = adience.build_manifest(root).set_index("source_line")
    assert frame.loc["fold_0_data.txt:3", ["image_id", "status"]].tolist() == [image, "ok"]
    assert frame.loc["fold_0_data.txt:3", "age"] == 28.5
    assert frame.loc["fold_0_data.txt:2", ["image_id", "status"]].tolist() == [image + "#2", "broken_line"]


def test_the_summary_names_where_the_unusable_lines_are(tmp_path):
    """A fold file's malformed lines were only counted ("broken_line 3"): finding them in a 4,000-line
    file meant reading the manifest's Parquet. The summary now names the first few by file:line."""
    _, frame = prepare("adience", tmp_path, source=str(write_files(tmp_path / "mine", adience_files())))
    text = summarize(frame, "adience", adience.PUBLISHED_ROWS)
    broken = next(line for line in text.splitlines() if line.strip().startswith("broken_line"))
    assert "fold_0_data.txt:11, fold_0_data.txt:12, fold_0_data.txt:18" in broken
    assert "fold_0_data.txt:14" in next(line for line in text.splitlines() if line.strip().startswith("bad_age"))
    assert not any(":" in line for line in text.splitlines() if line.strip().startswith("ok "))


def test_a_header_column_the_manifest_does_not_read_cannot_overwrite_a_rows_fold_or_line(tmp_path):
    """A converted copy's header with its own "fold" (or "line") column: its values replaced the
    fold taken from the file name and the build died in pandas, naming no file."""
    root = tmp_path / "adience"
    root.mkdir()
    for k in range(5):
        header = "\t".join([*builders.ADIENCE_HEADER, "fold", "line"])
        line = "\t".join(["u1", "i.jpg", "1", "35", "f", *"1234567", "", "x"])
        (root / f"fold_{k}_data.txt").write_text(f"{header}\n{line}\n" if k == 3 else header + "\n")
    frame = adience.build_manifest(root)
    assert frame[["fold", "source_line", "age", "status"]].values.tolist() == [[3, "fold_3_data.txt:2", 35.0, "missing_image"]]


def test_a_header_that_names_a_column_twice_is_named(tmp_path):
    root = tmp_path / "adience"
    root.mkdir()
    for k in range(5):
        header = [*builders.ADIENCE_HEADER, "age"] if k == 2 else builders.ADIENCE_HEADER
        (root / f"fold_{k}_data.txt").write_text("\t".join(header) + "\n")
    with pytest.raises(MetadataError, match=r"fold_2_data.txt: line 1 names column 'age' twice"):
        adience.build_manifest(root)


def test_fold_files_that_list_no_image_are_named(tmp_path):
    """Five fold files with a header and no line after it: the manifest's empty columns were
    untyped and writing it died in pyarrow (ArrowTypeError), naming no file."""
    root = tmp_path / "adience"
    for k in range(5):
        write_files(root, {f"fold_{k}_data.txt": ("\t".join(builders.ADIENCE_HEADER) + "\n").encode()})
    with pytest.raises(MetadataError, match=r"adience: no fold file fold_0_data.txt .. fold_4_data.txt lists an image"):
        adience.build_manifest(root)


def test_a_line_without_a_user_id_is_written_with_no_subject(tmp_path):
    """A line whose user_id is empty, with every fold file holding lines: under pandas 3 the
    subject column is of pandas' string type, whose missing value is NaN, and writing the
    manifest died in pyarrow (ArrowTypeError: Expected bytes, got a 'float' object)."""
    from agepipe.datasets.manifest import write_manifest

    root = tmp_path / "adience"
    for k in range(5):
        lines = ["\t".join(builders.ADIENCE_HEADER), f"u{k}\ti.jpg\t1\t35\tf"] + (["\ti.jpg\t2\t35\tf"] if k == 0 else [])
        write_files(root, {f"fold_{k}_data.txt": "\n".join(lines).encode()})
    frame = adience.build_manifest(root)
    written = read_manifest(write_manifest(frame, root / "manifest.parquet")).set_index("source_line")
    assert written.loc["fold_0_data.txt:3", "status"] == "broken_line"
    assert pd.isna(written.loc["fold_0_data.txt:3", "subject_id"]) and written.loc["fold_0_data.txt:2", "subject_id"] == "u0"
    assert pq.read_table(root / "manifest.parquet", columns=["subject_id"])["subject_id"].null_count == 1


def test_the_summary_shows_a_fold_whose_file_lists_no_image(tmp_path):
    """fold_3_data.txt holding its header only: the summary listed folds 0, 1, 2 and 4 and said
    nothing of fold 3, whose published 3,446 rows were all missing."""
    root = tmp_path / "adience"
    for k in range(5):
        lines = ["\t".join(builders.ADIENCE_HEADER)] + ([] if k == 3 else [f"u{k}\ti.jpg\t1\t35\tf"])
        write_files(root, {f"fold_{k}_data.txt": "\n".join(lines).encode()})
    text = summarize(adience.build_manifest(root), "adience", adience.PUBLISHED_ROWS)
    folds = text.split("  fold:\n")[1].split("  age class")[0].splitlines()
    assert [line.split()[:2] for line in folds] == [["0", "1"], ["1", "1"], ["2", "1"], ["3", "0"], ["4", "1"]]
    assert "(published: 3,446)" in folds[3]


def test_a_folder_of_images_that_cannot_be_listed_is_named_not_counted_as_missing_images(tmp_path, monkeypatch):
    """os.walk skipped a folder it could not list (permissions, a dropped network mount) without a
    word, and every photo in it became a missing_image row: a wrong status, kept by every rerun."""
    import os

    prepare("adience", tmp_path, source=str(write_files(tmp_path / "mine", adience_files())))
    root = tmp_path / "adience"
    shut = root / "aligned" / "7153718@N04"
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(shut):
            raise PermissionError(13, "Permission denied", str(shut))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(MetadataError, match=f"{shut}: cannot be listed \\(Permission denied\\)"):
        adience.build_manifest(root)
    monkeypatch.undo()
    frame = adience.build_manifest(root)  # listed again: its photos are found
    assert (frame["status"] == "ok").any() and not (frame["status"] == "missing_image").all()


@pytest.mark.parametrize("encoding, bom", [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff")], ids=["le", "be"])
def test_a_fold_file_saved_as_utf16_with_a_bom_reads_as_its_utf8_copy(tmp_path, encoding, bom):
    """A fold file saved as "Unicode" (UTF-16 with a byte-order mark, as Notepad and Excel write
    it) was read as UTF-8 with its undecodable bytes replaced: line 1 held NULs, and the file was
    'not an Adience fold header'. The BOM now says how to read it."""
    utf8, utf16 = tmp_path / "utf8" / "adience", tmp_path / "utf16" / "adience"
    for root in (utf8, utf16):
        write_files(root, {f"fold_{k}_data.txt": adience_fold_text(k).encode() for k in range(5)})
    write_files(utf16, {"fold_0_data.txt": bom + adience_fold_text(0).encode(encoding)})
    pd.testing.assert_frame_equal(adience.build_manifest(utf16), adience.build_manifest(utf8))


def test_a_fold_file_that_is_not_utf8_names_its_first_bad_line(tmp_path):
    """A Latin-1 fold file (an image name with an é) was read with the é replaced by U+FFFD, so
    its row named an image no one has, a missing_image row with no word of why. Such a file is
    now a MetadataError naming the file and the line (the header being line 1)."""
    root = tmp_path / "adience"
    write_files(root, {f"fold_{k}_data.txt": adience_fold_text(k).encode() for k in range(5)})
    lines = adience_fold_text(3).split("\n")
    lines.insert(2, "64504106@N06\tcaf\u00e9_o.jpg\t301\t(48, 53)\tf")
    write_files(root, {"fold_3_data.txt": "\n".join(lines).encode("latin-1")})
    with pytest.raises(MetadataError, match=r"fold_3_data.txt: line 3 is not UTF-8 \(bytes e9\); save the file as UTF-8") as e:
        adience.build_manifest(root)
    assert e.value.path == root / "fold_3_data.txt"


def test_the_summary_names_a_user_in_two_fold_files(tmp_path):
    """The official folds never split a user; a user_id in two fold files (an edited or merged copy)
    puts one person's photos on both sides of a cross-validation split, and nothing said so. The
    summary now names the user and the first line of it in each fold file; every row stays."""
    root = tmp_path / "adience"
    for k in range(5):
        lines = ["\t".join(builders.ADIENCE_HEADER), f"u{k}\ti{k}.jpg\t1\t35\tf"]
        if k in (1, 3):
            lines += [f"shared\tj{k}.jpg\t2\t35\tf", f"shared\tk{k}.jpg\t3\t35\tf"]
        write_files(root, {f"fold_{k}_data.txt": "\n".join(lines).encode()})
    frame = adience.build_manifest(root)
    assert len(frame) == 9 and (frame["status"] == "missing_image").all()
    lines = summarize(frame, "adience", adience.PUBLISHED_ROWS).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  subjects in more than one fold: 1 "))
    assert lines[at + 1].split() == ["shared", "fold_1_data.txt:3,", "fold_3_data.txt:3"]
    assert lines[at + 2].startswith("  age class")


def test_the_summary_of_subject_exclusive_folds_says_nothing_of_subjects(tmp_path):
    _, frame = prepare("adience", tmp_path, source=str(write_files(tmp_path / "mine", adience_files())))
    assert "more than one fold" not in summarize(frame, "adience", adience.PUBLISHED_ROWS)
