"""IMDB-WIKI: the MATLAB metadata in its real layout, dates that break naive conversion, and
subject-hash folds."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import scipy.io

import agepipe
from agepipe.datasets import imdb_wiki, prepare
from agepipe.datasets.manifest import MetadataError, read_manifest, subject_fold
from tests.datasets.builders import imdb_wiki_files, mat_rows, write_files, write_mat


def test_fixture_mat_has_the_real_layout(tmp_path):
    path = tmp_path / "imdb.mat"
    write_mat(path, "imdb", mat_rows("imdb"))
    mat = scipy.io.loadmat(path)
    record = mat["imdb"][0, 0]
    assert mat["imdb"].shape == (1, 1)
    n = len(mat_rows("imdb"))
    for field in ("dob", "photo_taken", "full_path", "gender", "name", "face_location", "face_score",
                  "second_face_score", "celeb_id"):
        assert record[field].shape == (1, n), field
    assert record["full_path"].dtype == object and record["full_path"][0, 0].shape == (1,)
    assert record["face_location"][0, 0].shape == (1, 4)
    assert record["name"][0, n - 1].shape == (0,)           # an empty name is an empty cell


def test_age_at_photo_follows_the_original_convention_and_survives_bad_dates():
    d = lambda y, m, day: date(y, m, day).toordinal() + 366     # noqa: E731  MATLAB datenum
    dob = np.array([d(1981, 5, 5), d(1981, 6, 30), d(1981, 7, 1), d(1981, 12, 31), 0, 1, 366.9, np.nan,
                    np.inf, -5, 1e12, d(1990, 1, 1)])
    taken = np.array([2009, 2009, 2009, 2009, 2009, 2009, 2009, 2009, 2009, 2009, 2009, 0])
    age, bad = imdb_wiki.age_at_photo(dob, taken)
    assert age[:4].tolist() == [28, 28, 27, 27]
    assert bad.tolist() == [False] * 4 + [True] * 8
    assert np.isnan(age[4:]).all()


def test_folds_are_a_stable_hash_of_the_subject():
    subjects = ["6488", "11516", "Fred Astaire", "6488", ""]
    folds = subject_fold(subjects)
    assert folds.dtype == np.int8 and folds[0] == folds[3] and set(folds) <= set(range(5))
    # Pinned: a change here reshuffles every user's IMDB-WIKI folds.
    assert folds.tolist() == subject_fold(subjects).tolist() == [0, 3, 1, 0, 1]
    spread = np.bincount(subject_fold([str(i) for i in range(5000)]), minlength=5)
    assert spread.min() > 900


@pytest.mark.parametrize("name", ["imdb", "wiki"])
def test_manifest_accounts_for_every_entry(tmp_path, name):
    source = write_files(tmp_path / "mine", imdb_wiki_files(name))
    path, frame = prepare(name, tmp_path / "data", source=str(source))
    assert path == tmp_path / "data" / name / "manifest.parquet"
    frame = read_manifest(path)
    rows = mat_rows(name)
    assert len(frame) == len(rows)
    for r, (_, got) in zip(rows, frame.iterrows()):
        assert got["status"] == r.status, r.full_path
        want_age = r.age if r.status not in ("bad_date", "bad_age") else math.nan
        assert (math.isnan(got["age"]) and math.isnan(want_age)) or got["age"] == want_age, r.full_path
        assert got["gender"] == {1.0: 1, 0.0: 0}.get(r.gender, -1), r.full_path
        if r.status == "no_face_in_metadata":
            assert np.isnan(np.asarray(got["face_hint"], dtype=float)).all()  # no value: NaN, never null
        else:
            assert list(got["face_hint"]) == list(r.location), r.full_path
        assert got["subject_id"] == (r.name or (str(r.celeb_id) if name == "imdb" and r.celeb_id > 0 else got["image_id"]))
    assert frame["image_id"].iloc[0] == "imdb_crop/01/nm0000001_rm124825600_1899-5-10_1968.jpg".replace("imdb", name)
    assert frame["image_id"].iloc[-3].endswith("#2")                   # the duplicate
    ok = frame[frame["status"] == "ok"]
    assert all((tmp_path / "data" / name / i).is_file() for i in ok["image_id"])
    assert frame.groupby("subject_id")["fold"].nunique().max() == 1
    assert frame["second_face_score"].notna().sum() == 1
    assert ("celeb_id" in frame) == (name == "imdb")


def test_unreadable_metadata_is_named(tmp_path):
    root = tmp_path / "wiki"
    (root / "wiki_crop").mkdir(parents=True)
    scipy.io.savemat(root / "wiki_crop" / "wiki.mat", {"other": np.zeros((1, 3))})
    with pytest.raises(MetadataError, match=r"wiki.mat: no 1x1 struct named 'wiki' \(variables: \['other'\]\)"):
        imdb_wiki.build_manifest(root, "wiki")
    (root / "wiki_crop" / "wiki.mat").write_bytes(b"not matlab at all")
    with pytest.raises(MetadataError, match="wiki.mat: not a readable MATLAB file"):
        imdb_wiki.build_manifest(root, "wiki")
    rows = mat_rows("wiki")
    write_mat(root / "wiki_crop" / "wiki.mat", "wiki", rows)
    mat = scipy.io.loadmat(root / "wiki_crop" / "wiki.mat")
    record = mat["wiki"][0, 0]
    record["dob"] = record["dob"][:, :3]
    scipy.io.savemat(root / "wiki_crop" / "wiki.mat", {"wiki": mat["wiki"]})
    with pytest.raises(MetadataError, match=rf"full_path has {len(rows)} entries but \{{'dob': 3\}}"):
        imdb_wiki.build_manifest(root, "wiki")


def test_a_metadata_file_that_inflates_past_the_bound_is_refused_before_scipy_reads_it(tmp_path, monkeypatch):
    """A compressed MAT variable of 4 MB of zeros is a few KB on disk: with the bound lowered to
    1 MB it is refused by its inflated size, with the default bound it goes on to scipy."""
    root = tmp_path / "wiki"
    (root / "wiki_crop").mkdir(parents=True)
    path = root / "wiki_crop" / "wiki.mat"
    scipy.io.savemat(path, {"other": np.zeros(1 << 19)}, do_compression=True)
    assert path.stat().st_size < 64 << 10
    with pytest.raises(MetadataError, match=r"no 1x1 struct named 'wiki'"):
        imdb_wiki.build_manifest(root, "wiki")
    monkeypatch.setattr(imdb_wiki, "MAX_MAT_INFLATED", 1 << 20)
    loads = []
    monkeypatch.setattr(scipy.io, "loadmat", lambda *a, **k: loads.append(a))
    with pytest.raises(MetadataError, match=r"wiki.mat: its variables inflate past 1048576 bytes"):
        imdb_wiki.build_manifest(root, "wiki")
    assert loads == []
    monkeypatch.setattr(imdb_wiki, "MAX_MAT_INFLATED", 2 << 30)
    monkeypatch.setattr(imdb_wiki, "MAX_MAT_BYTES", 1 << 10)
    with pytest.raises(MetadataError, match=r"wiki.mat: \d+ bytes, over the 1024 a metadata file may have"):
        imdb_wiki.build_manifest(root, "wiki")


def test_a_metadata_file_with_broken_compressed_data_is_named(tmp_path):
    root = tmp_path / "wiki"
    (root / "wiki_crop").mkdir(parents=True)
    path = root / "wiki_crop" / "wiki.mat"
    scipy.io.savemat(path, {"other": np.arange(1000.0)}, do_compression=True)
    data = bytearray(path.read_bytes())
    data[140:160] = b"\xff" * 20  # inside the zlib stream of the first variable (after its 8-byte tag)
    path.write_bytes(bytes(data))
    with pytest.raises(MetadataError, match="wiki.mat: not a readable MATLAB file"):
        imdb_wiki.build_manifest(root, "wiki")


def test_a_duplicate_never_takes_an_id_the_metadata_already_has():
    import numpy as np

    from agepipe.datasets.manifest import mark_duplicates

    status = np.array(["ok"] * 5, dtype=object)
    ids = mark_duplicates(["a.jpg", "a.jpg#2", "a.jpg", "a.jpg", "b.jpg"], status)
    assert ids == ["a.jpg", "a.jpg#2", "a.jpg#3", "a.jpg#4", "b.jpg"] and len(set(ids)) == 5
    assert list(status) == ["ok", "ok", "duplicate", "duplicate", "ok"]


def test_a_face_location_that_is_not_numbers_costs_that_rows_hint_only():
    import numpy as np

    from agepipe.datasets.imdb_wiki import face_hints

    cells = np.empty(3, dtype=object)
    cells[:] = [np.array([[1.0, 2.0, 30.0, 40.0]]), np.array(["none"]), np.array([[5.0, 6.0, 70.0, 80.0]])]
    hints = face_hints(cells, np.array([True, True, True]))
    assert hints[1] is None and list(hints[0]) == [1, 2, 30, 40] and list(hints[2]) == [5, 6, 70, 80]


def test_a_matlab_class_scipy_does_not_know_is_named_not_a_traceback(tmp_path):
    """scipy 1.17 meets an unknown array class byte with UnboundLocalError (its own bug): that
    damaged file was a traceback, not a MetadataError naming it."""
    root = tmp_path / "wiki"
    (root / "wiki_crop").mkdir(parents=True)
    path = root / "wiki_crop" / "wiki.mat"
    scipy.io.savemat(path, {"wiki": np.zeros(3)}, do_compression=False)
    data = bytearray(path.read_bytes())
    assert data[144] == 6                    # the first variable's class (mxDOUBLE_CLASS) ...
    data[144] = 203                          # ... now one no MATLAB writes
    path.write_bytes(bytes(data))
    with pytest.raises(MetadataError, match="wiki.mat: not a readable MATLAB file"):
        imdb_wiki.build_manifest(root, "wiki")


def test_a_file_that_crashes_scipys_reader_is_named_and_the_run_lives(tmp_path):
    """scipy 1.17.1's MATLAB reader segfaults on a string of a type MATLAB has not (in a fresh
    process; in one whose memory differs it may raise instead): the whole run died, naming no
    file. Built in a fresh process, as `agepipe download` runs it."""
    root = tmp_path / "wiki"
    (root / "wiki_crop").mkdir(parents=True)
    path = root / "wiki_crop" / "wiki.mat"
    rows = mat_rows("wiki")
    write_mat(path, "wiki", rows, compress=False)
    data = bytearray(path.read_bytes())
    tag = data.index(next(r.name for r in rows if r.name).encode()) - 8
    assert data[tag] == 16                   # the name's characters: miUTF8 ...
    data[tag] = 58                           # ... now a type MATLAB has not
    path.write_bytes(bytes(data))
    build = ("import sys; from pathlib import Path; from agepipe.datasets import imdb_wiki, manifest\n"
             "try: imdb_wiki.build_manifest(Path(sys.argv[1]), 'wiki')\n"
             "except manifest.MetadataError as e: print(e)")
    done = subprocess.run([sys.executable, "-c", build, str(root)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(agepipe.__file__).parents[1])})
    assert done.returncode == 0, done.stderr  # the run lives ...
    # ... and names the file (other scipy versions refuse it with an error of their own)
    assert re.search(r"wiki\.mat: .*(crashed on it \(SIGSEGV\)|not a readable MATLAB file)", done.stdout), done.stdout


def test_a_numeric_field_that_holds_no_numbers_is_named_with_its_entry(tmp_path):
    """gender written as a cell of "m"/"f" (a converted copy, not the published file) was a
    bare ValueError from numpy, naming neither the file nor the field."""
    root = tmp_path / "wiki"
    (root / "wiki_crop").mkdir(parents=True)
    path = root / "wiki_crop" / "wiki.mat"
    rows = mat_rows("wiki")
    write_mat(path, "wiki", rows)
    mat = scipy.io.loadmat(path)
    struct = np.empty((1, 1), dtype=mat["wiki"].dtype)
    for field in mat["wiki"].dtype.names:
        struct[0, 0][field] = mat["wiki"][0, 0][field]
    genders = np.empty((1, len(rows)), dtype=object)
    genders[0, :] = [{1.0: "m", 0.0: "f"}.get(r.gender, "") for r in rows]
    struct[0, 0]["gender"] = genders
    scipy.io.savemat(path, {"wiki": struct})
    with pytest.raises(MetadataError, match=r"wiki.mat: field 'gender' is not an array of numbers \(entry 0: 'm'\)"):
        imdb_wiki.build_manifest(root, "wiki")


def test_a_celebrity_whose_name_some_rows_lack_is_one_subject(tmp_path):
    """IMDB rows of one celeb_id, some with the name and some without: the named ones were the
    subject "Fred Astaire", the others "6488", two subjects in different folds, so one person's
    photos straddled the train/test split."""
    from tests.datasets.builders import MatRow, matlab_datenum

    root = tmp_path / "imdb"
    (root / "imdb_crop").mkdir(parents=True)
    dob = matlab_datenum(date(1899, 5, 10))
    rows = [MatRow("01/a.jpg", dob, 1968, 1.0, "", celeb_id=6488),
            MatRow("01/b.jpg", dob, 1970, 1.0, "Fred Astaire", celeb_id=6488),
            MatRow("01/c.jpg", dob, 1971, 1.0, "", celeb_id=7777)]
    write_mat(root / "imdb_crop" / "imdb.mat", "imdb", rows)
    frame = imdb_wiki.build_manifest(root, "imdb")
    assert frame["subject_id"].tolist() == ["Fred Astaire", "Fred Astaire", "7777"]
    assert frame["fold"].iloc[0] == frame["fold"].iloc[1]
    assert frame["name"].tolist() == ["", "Fred Astaire", ""]      # the metadata's own names stay


def test_a_full_path_cell_that_is_not_one_string_is_a_bad_path(tmp_path):
    """A full_path cell holding a nested cell, numbers or a char matrix of two rows became the
    path "wiki_crop/['01/b.jpg']", "wiki_crop/3.0" or the first row alone: a row "ok" for one
    of two paths, or "missing_image" for a path no metadata names."""
    from tests.datasets.builders import MatRow, matlab_datenum

    root = tmp_path / "wiki"
    (root / "wiki_crop" / "01").mkdir(parents=True)
    dob = matlab_datenum(date(1950, 1, 1))
    rows = [MatRow(f"01/{c}.jpg", dob, 1980, 1.0, f"Person {c}") for c in "abcd"]
    for r in rows:
        (root / "wiki_crop" / r.full_path).write_bytes(b"jpeg")
    write_mat(root / "wiki_crop" / "wiki.mat", "wiki", rows)
    mat = scipy.io.loadmat(root / "wiki_crop" / "wiki.mat")
    cells = mat["wiki"][0, 0]["full_path"]
    nested = np.empty((1, 1), dtype=object)
    nested[0, 0] = np.array(["01/b.jpg"])
    cells[0, 1], cells[0, 2], cells[0, 3] = nested, np.array([[3.0]]), np.array(["01/d.jpg", "01/a.jpg"])
    scipy.io.savemat(root / "wiki_crop" / "wiki.mat", {"wiki": mat["wiki"]})
    frame = imdb_wiki.build_manifest(root, "wiki")
    assert frame["status"].tolist() == ["ok", "bad_path", "bad_path", "bad_path"]
    assert frame["image_id"].iloc[0] == "wiki_crop/01/a.jpg" and frame["image_id"].is_unique


def test_metadata_that_lists_no_image_is_named(tmp_path):
    """A struct of empty fields: the manifest's empty columns were untyped and writing it died in
    pyarrow (ArrowTypeError), naming no file."""
    root = tmp_path / "wiki"
    (root / "wiki_crop").mkdir(parents=True)
    write_mat(root / "wiki_crop" / "wiki.mat", "wiki", [])
    with pytest.raises(MetadataError, match=r"wiki.mat: struct 'wiki' lists no image"):
        imdb_wiki.build_manifest(root, "wiki")


def test_a_row_without_a_full_path_is_named_by_its_entry_in_the_metadata(tmp_path):
    """An empty full_path cell was the image_id "wiki_crop/" (a second one "wiki_crop/#2"): the
    summary's bad_path rows named neither the file nor the entry to look at."""
    from agepipe.datasets.manifest import summarize
    from tests.datasets.builders import MatRow, matlab_datenum

    root = tmp_path / "wiki"
    (root / "wiki_crop").mkdir(parents=True)
    dob = matlab_datenum(date(1950, 1, 1))
    rows = [MatRow(path, dob, 1980, 1.0, "Someone") for path in ("01/a.jpg", "", "01/b.jpg", "")]
    write_mat(root / "wiki_crop" / "wiki.mat", "wiki", rows)
    frame = imdb_wiki.build_manifest(root, "wiki")
    assert frame["image_id"].tolist() == ["wiki_crop/01/a.jpg", "wiki_crop/wiki.mat#1", "wiki_crop/01/b.jpg",
                                          "wiki_crop/wiki.mat#3"]
    assert frame["status"].tolist() == ["missing_image", "bad_path", "missing_image", "bad_path"]
    bad = next(line for line in summarize(frame, "wiki").splitlines() if line.strip().startswith("bad_path"))
    assert "(wiki_crop/wiki.mat#1, wiki_crop/wiki.mat#3)" in bad
