"""The sample's labels.csv, which a user may write: its every fault is named by file, line and column."""
from __future__ import annotations

import re

import pytest

from agepipe.datasets import sample
from agepipe.datasets.manifest import MetadataError, read_manifest, write_manifest
from tests.datasets.builders import write_files

HEADER = "full_path,subject_id,age,gender,x1,y1,x2,y2"
GOOD = ["t1/t1-00-m40.jpg,t1-00,30,0,45,55,158,192", "gdp/gdp-22-m40.jpg,gdp-22,36,1,25.5,31,89.5,110"]


def write_sample(tmp_path, lines: list[str], eol: str = "\n"):
    root = tmp_path / "sample"
    write_files(root / sample.FOLDER / "t1", {"t1-00-m40.jpg": b"jpeg"})
    write_files(root / sample.FOLDER, {"labels.csv": eol.join([HEADER, *lines, ""]).encode()})
    return root


def test_a_labels_file_is_read_as_written(tmp_path):
    frame = sample.build_manifest(write_sample(tmp_path, ["", *GOOD], eol="\r\n"))   # a blank line is no row
    assert frame["image_id"].tolist() == ["sample_crop/t1/t1-00-m40.jpg", "sample_crop/gdp/gdp-22-m40.jpg"]
    assert frame["status"].tolist() == ["ok", "missing_image"]
    assert frame["age"].tolist() == [30, 36] and frame["gender"].tolist() == [0, 1]
    assert frame["face_hint"].tolist() == [[45, 55, 158, 192], [25.5, 31, 89.5, 110]]


@pytest.mark.parametrize("bad, where", [
    ("gdp/x.jpg,gdp-23,,1,1,2,3,4", "line 4, column age: empty"),
    ("gdp/x.jpg,gdp-23,abc,1,1,2,3,4", "line 4, column age: 'abc' is not an age in years (0-100)"),
    ("gdp/x.jpg,gdp-23,-3,1,1,2,3,4", "line 4, column age: '-3' is not an age in years (0-100)"),
    ("gdp/x.jpg,gdp-23,30,,1,2,3,4", "line 4, column gender: empty"),
    ("gdp/x.jpg,gdp-23,30,m,1,2,3,4", "line 4, column gender: 'm' is not a gender (0 female, 1 male)"),
    ("gdp/x.jpg,gdp-23,30,2,1,2,3,4", "line 4, column gender: '2' is not a gender (0 female, 1 male)"),
    (",gdp-23,30,1,1,2,3,4", "line 4, column full_path: empty"),
    ("gdp/x.jpg, ,30,1,1,2,3,4", "line 4, column subject_id: empty"),
    ("gdp/x.jpg,gdp-23,30,1,1,2,3", "line 4, column y2: empty"),
    ("gdp/x.jpg,gdp-23,30,1,1,2,inf,4", "line 4, column x2: 'inf' is not a number"),
    ("gdp/x.jpg,gdp-23,30,1,1,2,3,4,5", "line 4: 9 values, the header names 8"),
])
def test_a_missing_or_bad_value_is_named_by_file_line_and_column(tmp_path, bad, where):
    """A user's labels.csv with an empty or malformed value died in pandas (IntCastingNaNError,
    'could not convert string to float', ParserError), naming neither the file nor the column,
    or (an empty full_path) became a row whose image_id was NaN."""
    root = write_sample(tmp_path, [*GOOD, bad])
    with pytest.raises(MetadataError, match=re.escape(f"{root / sample.FOLDER / 'labels.csv'}: {where}")) as e:
        sample.build_manifest(root)
    assert e.value.path == root / sample.FOLDER / "labels.csv"


def test_a_row_is_named_by_its_first_line_as_an_editor_numbers_it(tmp_path):
    """pandas skips blank lines and joins a quoted value's lines, so its row numbers are not the
    lines an editor shows; the line named is the editor's."""
    root = write_sample(tmp_path, ["", GOOD[0], '"gdp/x\ny.jpg",gdp-23,30,1,1,2,3,4', "", "gdp/z.jpg,gdp-24,30,1,1,2,3,"])
    with pytest.raises(MetadataError, match=r"labels.csv: line 7, column y2: empty"):
        sample.build_manifest(root)


def test_a_labels_file_without_a_column_or_a_row_is_named(tmp_path):
    root = write_sample(tmp_path, GOOD)
    (root / sample.FOLDER / "labels.csv").write_text("full_path,subject_id,age,x1,y1,x2,y2\n")
    with pytest.raises(MetadataError, match=r"labels.csv: line 1 has no column gender"):
        sample.build_manifest(root)
    (root / sample.FOLDER / "labels.csv").write_text(HEADER + "\n")
    with pytest.raises(MetadataError, match=r"labels.csv: lists no crop"):
        sample.build_manifest(root)


def test_a_crop_listed_twice_is_a_duplicate_row_not_a_failed_write(tmp_path):
    """A crop on two lines made two rows with one image_id, and writing the manifest died in a
    ValueError naming the manifest, not the labels. The second is a duplicate row, as in the
    other datasets."""
    root = write_sample(tmp_path, [GOOD[0], GOOD[0]])
    written = read_manifest(write_manifest(sample.build_manifest(root), root / "manifest.parquet"))
    assert written[["image_id", "status"]].values.tolist() == [
        ["sample_crop/t1/t1-00-m40.jpg", "ok"], ["sample_crop/t1/t1-00-m40.jpg#2", "duplicate"]]
