"""Tiny dataset files in the real layouts, and the manifest rows each line must become.

Adience: fold files with every messy case the real ones hold, and aligned.tar.gz.
IMDB-WIKI: imdb_crop.tar / wiki_crop.tar holding a .mat written with the real struct layout.
"""
from __future__ import annotations

import io
import tarfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import scipy.io


def jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def make_tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    """A tar (``mode`` "w:gz" for .tar.gz) with folder entries before their files, as real ones have."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        folders = sorted({str(Path(name).parent) for name in members} - {"."},
                         key=lambda p: (p.count("/"), p))
        for folder in _with_parents(folders):
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _with_parents(folders):
    seen = []
    for folder in folders:
        parts = folder.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in seen:
                seen.append(p)
    return seen


# --- Adience --------------------------------------------------------------------------------

ADIENCE_HEADER = ["user_id", "original_image", "face_id", "age", "gender", "x", "y", "dx", "dy",
                  "tilt_ang", "fiducial_yaw_angle", "fiducial_score"]
NAN = float("nan")


@dataclass
class AdienceRow:
    """A fold-file line and what the manifest must say about it."""
    fields: list[str]
    status: str
    age: float = NAN
    age_bin: int = -1
    gender: int = -1
    on_disk: bool = True            # put its aligned image into aligned.tar.gz


def _row(user, image, face, age_label, gender_label, **expect):
    return AdienceRow([user, image, str(face), age_label, gender_label, "100", "200", "300", "300", "-95", "0", "50"],
                      **expect)


# Every messy case the real fold files hold; users never cross folds, as in the official split.
ADIENCE_FOLDS: dict[int, list[AdienceRow | str]] = {
    0: [
        _row("7153718@N04", "11597935265_29bcdfa4a5_o.jpg", 2282, "(25, 32)", "f", status="ok", age=28.5, age_bin=4, gender=0),
        _row("7153718@N04", "11598838386_349a0d4849_o.jpg", 2283, "35", "m", status="ok", age=35, age_bin=5, gender=1),
        _row("7153718@N04", "11598013005_240c9f1ca9_o.jpg", 2284, "3", "u", status="ok", age=3, age_bin=1),
        _row("7153718@N04", "11598166203_c70bb34c80_o.jpg", 2285, "(38, 42)", "", status="ok", age=40, age_bin=5),
        _row("30601258@N03", "10399646885_67c7d20df9_o.jpg", 1, "None", "f", status="ok", gender=0),
        _row("30601258@N03", "10424815813_e94629b1ec_o.jpg", 2, "None", "u", status="no_label"),
        _row("30601258@N03", "10437979845_5985be4b26_o.jpg", 3, "(8, 23)", "m", status="ok", age=15.5, age_bin=3, gender=1),
        _row("30601258@N03", "10437979846_5985be4b26_o.jpg", 4, "(27, 32)", "f", status="ok", age=29.5, age_bin=4, gender=0),
        _row("30601258@N03", "10437979847_5985be4b26_o.jpg", 5, "(60, 100)", "m", status="ok", age=80, age_bin=7, gender=1),
        AdienceRow(["30601258@N03", "10437979848_5985be4b26_o.jpg", "6", "(25, 32)"], status="broken_line"),
        AdienceRow(["garbage"], status="broken_line", on_disk=False),
        _row("30601258@N03", "10437979849_5985be4b26_o.jpg", 7, "(25, 32)", "m", status="missing_image",
             age=28.5, age_bin=4, gender=1, on_disk=False),
        _row("30601258@N03", "10437979850_5985be4b26_o.jpg", 8, "(25, )", "m", status="bad_age", gender=1),
        _row("30601258@N03", "10437979851_5985be4b26_o.jpg", 9, "(25, 32)", "x", status="bad_gender", age=28.5, age_bin=4),
        _row("..", "passwd", 10, "(25, 32)", "f", status="bad_path", age=28.5, age_bin=4, gender=0, on_disk=False),
        _row("7153718@N04", "11597935265_29bcdfa4a5_o.jpg", 2282, "(25, 32)", "f", status="duplicate",
             age=28.5, age_bin=4, gender=0),
        AdienceRow(["30601258@N03", "10437979852_5985be4b26_o.jpg", "11", "(0, 2)", "f", "1", "2", "3", "4",
                    "5", "6", "7", "surplus"], status="broken_line"),
        "",                                 # a blank line is not a row
    ],
    1: [_row("114841417@N06", f"{12000000000 + i}_abc_o.jpg", 100 + i, label, g, status="ok",
             age=mid, age_bin=i, gender={"f": 0, "m": 1}[g])
        for i, (label, mid, g) in enumerate([("(0, 2)", 1, "f"), ("(4, 6)", 5, "m"), ("(8, 12)", 10, "f"),
                                             ("(15, 20)", 17.5, "m"), ("(25, 32)", 28.5, "f"),
                                             ("(38, 43)", 40.5, "m"), ("(48, 53)", 50.5, "f"),
                                             ("(60, 100)", 80, "m")])],
    2: [_row("8187011@N06", "9515000001_aaaa_o.jpg", 200, "23", "m", status="ok", age=23, age_bin=4, gender=1)],
    3: [_row("64504106@N06", "9515000002_bbbb_o.jpg", 300, "(48, 53)", "f", status="ok", age=50.5, age_bin=6, gender=0)],
    4: [_row("10044155@N06", "9515000003_cccc_o.jpg", 400, "58", "m", status="ok", age=58, age_bin=6, gender=1),
        _row("10044155@N06", "9515000004_cccc_o.jpg", 401, "(60, 100)", "", status="ok", age=80, age_bin=7)],
}
# Line ends as the real files mix them: CRLF in fold 0, LF with trailing tabs and no final newline in 1.
_ADIENCE_EOL = {0: "\r\n", 1: "\t\n"}


def adience_fold_text(fold: int) -> str:
    eol = _ADIENCE_EOL.get(fold, "\n")
    lines = ["\t".join(ADIENCE_HEADER)] + ["\t".join(r.fields) if isinstance(r, AdienceRow) else r
                                           for r in ADIENCE_FOLDS[fold]]
    text = eol.join(lines)
    return text if fold == 1 else text + eol


def adience_rows(fold: int) -> list[AdienceRow]:
    return [r for r in ADIENCE_FOLDS[fold] if isinstance(r, AdienceRow)]


def adience_files() -> dict[str, bytes]:
    """{file name: bytes} of the official Adience files, in their real layouts."""
    aligned = {}
    seed = 0
    for fold in ADIENCE_FOLDS:
        for r in adience_rows(fold):
            if not r.on_disk or r.status == "broken_line" and len(r.fields) < 3:
                continue
            user, image, face = r.fields[:3]
            seed += 1
            aligned[f"aligned/{user}/landmark_aligned_face.{face}.{image}"] = jpeg(seed)
    files = {"aligned.tar.gz": make_tar(aligned, "w:gz")}
    files.update({f"fold_{k}_data.txt": adience_fold_text(k).encode() for k in range(5)})
    return files


# --- IMDB-WIKI -------------------------------------------------------------------------------

def matlab_datenum(d: date) -> float:
    return float(d.toordinal() + 366)


@dataclass
class MatRow:
    """One entry of imdb.mat / wiki.mat and what the manifest must say about it."""
    full_path: str
    dob: float
    photo_taken: int
    gender: float
    name: str
    celeb_id: int = 1
    face_score: float = 3.5
    second_face_score: float = NAN
    location: tuple = (10.0, 12.0, 40.0, 44.0)
    status: str = "ok"
    age: float = NAN
    on_disk: bool = True


def mat_rows(name: str) -> list[MatRow]:
    d = matlab_datenum
    return [
        MatRow("01/nm0000001_rm124825600_1899-5-10_1968.jpg", d(date(1899, 5, 10)), 1968, 1.0,
               "Fred Astaire", celeb_id=6488, age=69),
        # Born in the second half of the year: one year less.
        MatRow("01/nm0000001_rm3343756032_1899-10-10_1970.jpg", d(date(1899, 10, 10)), 1970, 1.0,
               "Fred Astaire", celeb_id=6488, age=70),
        MatRow("02/nm0000002_rm221957120_1924-9-16_1974.jpg", d(date(1924, 9, 16)), 1974, NAN,
               "Lauren Bacall", celeb_id=11516, age=49, second_face_score=1.9),
        MatRow("02/nm0000002_rm0_0-0-0_2004.jpg", 0.0, 2004, 0.0, "Lauren Bacall", celeb_id=11516,
               status="bad_date"),
        MatRow("03/nm0000003_rm1_0-1-2_2004.jpg", 3.0, 2004, 0.0, "Brigitte Bardot", celeb_id=2744,
               status="bad_date"),
        MatRow("03/nm0000003_rm2_1-1-1_2004.jpg", 400.0, 2004, 0.0, "Brigitte Bardot", celeb_id=2744,
               status="bad_age"),
        MatRow("04/nm0000004_rm3_1990-6-1_1985.jpg", d(date(1990, 6, 1)), 1985, 1.0, "John Belushi",
               celeb_id=10000, status="bad_age"),
        MatRow("04/nm0000004_rm4_1949-1-24_0.jpg", d(date(1949, 1, 24)), 0, 1.0, "John Belushi",
               celeb_id=10000, status="bad_date"),
        MatRow("05/nm0000005_rm5_1918-7-14_1960.jpg", d(date(1918, 7, 14)), 1960, 1.0, "Ingmar Bergman",
               celeb_id=9000, face_score=float("-inf"), location=(1, 1, 1, 1), status="no_face_in_metadata",
               age=41),
        MatRow("05/nm0000005_rm6_1918-7-14_1970.jpg", d(date(1918, 7, 14)), 1970, 1.0, "Ingmar Bergman",
               celeb_id=9000, age=51, on_disk=False, status="missing_image"),
        MatRow("05/nm0000005_rm7_1918-7-14_1971.jpg", d(date(1918, 7, 14)), 1971, 2.0, "Ingmar Bergman",
               celeb_id=9000, age=52, status="bad_gender"),
        MatRow("../../outside.jpg", d(date(1950, 1, 1)), 1980, 1.0, "Nobody", celeb_id=1, age=30,
               on_disk=False, status="bad_path"),
        MatRow("01/nm0000001_rm124825600_1899-5-10_1968.jpg", d(date(1899, 5, 10)), 1968, 1.0,
               "Fred Astaire", celeb_id=6488, age=69, status="duplicate"),
        MatRow("06/nm0000006_rm8_1960-2-2_2000.jpg", d(date(1960, 2, 2)), 2000, 0.0, "",
               celeb_id=0, age=40),       # no name and no id: its own subject
        MatRow("06/nm0000007_rm9_1970-3-3_2001.jpg", d(date(1970, 3, 3)), 2001, 1.0, "",
               celeb_id=7777, age=31),    # no name: IMDB's celebrity id
    ]


def write_mat(path, name: str, rows: list[MatRow], compress: bool = True) -> None:
    """imdb.mat / wiki.mat with the real layout: variable ``name`` is a 1x1 struct whose fields
    are 1xN arrays; full_path and name are cells of strings, face_location a cell of 1x4 arrays."""
    def cell(items):
        out = np.empty((1, len(items)), dtype=object)
        for i, item in enumerate(items):
            out[0, i] = item
        return out

    fields = {
        "dob": np.array([[r.dob for r in rows]], dtype=np.float64),
        "photo_taken": np.array([[r.photo_taken for r in rows]], dtype=np.uint16),
        "full_path": cell([r.full_path for r in rows]),
        "gender": np.array([[r.gender for r in rows]], dtype=np.float64),
        "name": cell([r.name for r in rows]),
        "face_location": cell([np.array([r.location], dtype=np.float64) for r in rows]),
        "face_score": np.array([[r.face_score for r in rows]], dtype=np.float64),
        "second_face_score": np.array([[r.second_face_score for r in rows]], dtype=np.float64),
    }
    if name == "imdb":
        fields["celeb_names"] = cell(sorted({r.name for r in rows}))
        fields["celeb_id"] = np.array([[r.celeb_id for r in rows]], dtype=np.float64)
    struct = np.empty((1, 1), dtype=[(k, object) for k in fields])
    for k, v in fields.items():
        struct[0, 0][k] = v
    scipy.io.savemat(path, {name: struct}, do_compression=compress)


def imdb_wiki_files(name: str) -> dict[str, bytes]:
    """{file name: bytes}: imdb_crop.tar or wiki_crop.tar in the real layout, the .mat inside."""
    rows = mat_rows(name)
    mat = io.BytesIO()
    write_mat(mat, name, rows)
    members = {f"{name}_crop/{r.full_path}": jpeg(i) for i, r in enumerate(rows)
               if r.on_disk and r.status != "bad_path"}
    members[f"{name}_crop/{name}.mat"] = mat.getvalue()
    return {f"{name}_crop.tar": make_tar(members)}


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder
