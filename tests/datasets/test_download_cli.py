"""`agepipe download`: from a folder, from a loopback mirror that demands the published
credentials, for IMDB and WIKI together, and once as a real subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
from click.testing import CliRunner

from agepipe.cli import cli
from agepipe.datasets.manifest import read_manifest
from tests.datasets.builders import adience_files, adience_rows, imdb_wiki_files, make_tar, mat_rows, write_files

FOLD_LINES = {0: 17, 1: 8, 2: 1, 3: 1, 4: 2}     # rows of the fixture's fold files


def run(*args, env=None):
    result = CliRunner().invoke(cli, ["download", *args], env=env, catch_exceptions=False)
    return result


def check_adience(data_dir, output):
    frame = read_manifest(data_dir / "adience" / "manifest.parquet")
    for fold in range(5):
        assert (frame["fold"] == fold).sum() == len(adience_rows(fold)) == FOLD_LINES[fold]
    assert frame["status"].notna().all()
    counts = frame["status"].value_counts()
    for status, n in counts.items():                   # the summary accounts for every row
        assert f"{status:<22}{n:>9,}" in output
    assert f"adience: {len(frame):,} rows" in output and "(published: 4,484)" in output
    assert "25-32" in output and "female" in output
    return frame


def test_download_from_a_folder_of_the_real_file_names_without_faces_tar(tmp_path):
    source = write_files(tmp_path / "Downloads", adience_files())
    assert sorted(p.name for p in source.iterdir()) == ["aligned.tar.gz", *(f"fold_{k}_data.txt" for k in range(5))]
    result = run("--dataset", "adience", "--source", str(source), "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    check_adience(tmp_path / "data", result.output)
    assert (tmp_path / "data" / "adience" / "aligned").is_dir()


def test_download_from_a_mirror_that_demands_the_published_credentials(tmp_path, server):
    for name, data in adience_files().items():
        server.files[f"/adiencedb/{name}"] = data
    server.files["/adiencedb/faces.tar.gz"] = make_tar({"faces/1/a.jpg": b"x"}, "w:gz")   # the page has it too
    server.auth = ("adiencedb", "adience")
    data_dir = tmp_path / "data"
    result = run("--dataset", "adience", "--source", f"{server.url}/adiencedb/", "--workers", "3",
                 env={"AGEPIPE_DATA": str(data_dir)})
    assert result.exit_code == 0, result.output
    first = check_adience(data_dir, result.output)
    assert "/adiencedb/faces.tar.gz" not in {s.path for s in server.log}   # nothing uses the unaligned crops

    served = len(server.log)
    again = run("--dataset", "adience", "--source", f"{server.url}/adiencedb/", "--data-dir", str(data_dir))
    assert again.exit_code == 0, again.output
    assert len(server.log) == served                    # verified files are not fetched again
    pd.testing.assert_frame_equal(first, read_manifest(data_dir / "adience" / "manifest.parquet"))


def test_imdb_wiki_means_both(tmp_path, server):
    for name in ("imdb", "wiki"):
        for file, data in imdb_wiki_files(name).items():
            server.files[f"/static/{file}"] = data
    result = run("--dataset", "imdb-wiki", "--source", f"{server.url}/static", "--data-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    for name in ("imdb", "wiki"):
        frame = read_manifest(tmp_path / name / "manifest.parquet")
        rows = mat_rows(name)
        assert len(frame) == len(rows) and (frame["status"] == "ok").sum() == sum(r.status == "ok" for r in rows)
        assert f"{name}: {len(rows)} rows (published total:" in result.output
        assert (tmp_path / name / f"{name}_crop" / f"{name}.mat").is_file()


def test_no_extract_only_fetches(tmp_path):
    source = write_files(tmp_path / "Downloads", adience_files())
    result = run("--dataset", "adience", "--source", str(source), "--data-dir", str(tmp_path / "data"),
                 "--no-extract")
    assert result.exit_code == 0, result.output
    root = tmp_path / "data" / "adience"
    assert (root / "aligned.tar.gz").is_file() and not (root / "aligned").exists()
    assert not (root / "manifest.parquet").exists() and "--no-extract" in result.output


def test_errors_are_one_clear_line(tmp_path, server):
    bad = run("--dataset", "celeba", "--data-dir", str(tmp_path))
    assert bad.exit_code != 0 and "unknown dataset 'celeba'; known: adience, imdb, sample, wiki, imdb-wiki" in bad.output
    server.files["/static/wiki_crop.tar"] = make_tar({"wiki_crop/../../../escape.jpg": b"x"})
    hostile = run("--dataset", "wiki", "--source", f"{server.url}/static", "--data-dir", str(tmp_path / "d"))
    assert hostile.exit_code == 1
    # The tar lists the folders first: the first of them is the member named.
    assert "wiki_crop.tar: refusing member 'wiki_crop/..': '..' in its path" in hostile.output
    assert not (tmp_path / "escape.jpg").exists()


def test_a_data_dir_that_cannot_be_written_is_one_sentence(tmp_path):
    (tmp_path / "taken").write_text("a file")
    result = run("--dataset", "sample", "--data-dir", str(tmp_path / "taken" / "data"))  # once an OSError traceback
    assert result.exit_code == 1
    assert (f"Error: {tmp_path / 'taken' / 'data' / 'sample'}: cannot write (Not a directory); `agepipe download` "
            "writes the dataset there: make --data-dir writable, or give another") in result.output


def test_real_subprocess(tmp_path):
    source = write_files(tmp_path / "Downloads", adience_files())
    env = {**os.environ, "AGEPIPE_DATA": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-c", "from agepipe.cli import main; main()", "download",
                           "--dataset", "adience", "--source", source.as_uri()],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_adience(tmp_path / "data", proc.stdout)
    assert "third party lists (unverified)" in proc.stderr     # the fixture is not the real file


def test_the_sample_downloads_again_after_its_build_folder_was_removed(tmp_path):
    """DATA/.sample-source is a build cache beside DATA/sample; once removed, a rerun verifies
    the fetched copy instead of failing on a missing --source folder."""
    import shutil

    data = tmp_path / "data"
    assert run("--dataset", "sample", "--data-dir", data).exit_code == 0
    shutil.rmtree(data / ".sample-source")
    result = run("--dataset", "sample", "--data-dir", data)
    assert result.exit_code == 0, result.output
    assert f"manifest: {data / 'sample' / 'manifest.parquet'}" in result.output


def test_the_sample_without_the_package_of_its_photos_is_one_sentence(tmp_path, monkeypatch):
    """The sample's photos come from installed packages (the test-base extra): without
    insightface, `download --dataset sample` ended in a FileNotFoundError traceback."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "insightface" else find_spec(name, *a))
    result = run("--dataset", "sample", "--data-dir", tmp_path / "data")
    assert result.exit_code == 1
    assert ("Error: the sample needs the installed package insightface (for data/images/t1.jpg): "
            "pip install insightface\n") in result.output


def test_a_source_url_that_does_not_parse_is_one_sentence(tmp_path):
    """A bracket left open in --source's host (urllib: "Invalid IPv6 URL") ended in a ValueError traceback."""
    source = "http://[mirror.example.org/imdb-wiki/"
    result = run("--dataset", "adience", "--data-dir", tmp_path / "data", "--source", source)
    assert result.exit_code == 1
    assert f"Error: --source {source}: not a URL (Invalid IPv6 URL)\n" in result.output


def test_a_truncated_archive_is_forgotten_so_a_whole_copy_is_taken_next(tmp_path):
    """--source holds half a browser download of aligned.tar.gz: it fails as damaged, and its
    sha256 (recorded on first use) goes with it; the whole copy then downloads. (Every later
    copy was refused against the truncated one's sha256, and deleted.)"""
    files = adience_files()
    good = files["aligned.tar.gz"]
    source = tmp_path / "Downloads"
    write_files(source, {**files, "aligned.tar.gz": good[: len(good) // 2]})
    args = ("--dataset", "adience", "--data-dir", tmp_path / "data", "--source", source)
    result = run(*args)
    assert result.exit_code == 1 and "damaged archive" in result.output
    assert "deleted it and the sha256 recorded for it" in result.output
    assert "aligned.tar.gz" not in (tmp_path / "data" / "adience" / ".checksums.json").read_text()
    (source / "aligned.tar.gz").unlink()
    (source / "aligned.tar.gz").write_bytes(good)
    result = run(*args)
    assert result.exit_code == 0, result.output
    check_adience(tmp_path / "data", result.output)


def test_a_wrong_fold_file_is_forgotten_so_the_right_one_is_taken_next(tmp_path, server):
    """The mirror first answers fold_3_data.txt with a login page (200, HTML): the run stops
    naming the file and its line 1, and keeps neither the page nor its sha256 (recorded on first
    download), so the rerun, once the mirror serves the real file, builds the manifest. (The page
    was kept and trusted: every rerun failed on it, and a fresh copy of the real file was refused
    against its recorded sha256.)"""
    files = adience_files()
    for name, data in files.items():
        server.files[f"/adiencedb/{name}"] = data
    server.files["/adiencedb/fold_3_data.txt"] = b"<html><body>Please log in</body></html>\n"
    args = ("--dataset", "adience", "--source", f"{server.url}/adiencedb/", "--data-dir", tmp_path / "data")
    result = run(*args)
    assert result.exit_code == 1
    assert "fold_3_data.txt: line 1 is not an Adience fold header" in result.output
    root = tmp_path / "data" / "adience"
    assert not (root / "fold_3_data.txt").exists() and not (root / "manifest.parquet").exists()
    assert "fold_3_data.txt" not in (root / ".checksums.json").read_text()

    server.files["/adiencedb/fold_3_data.txt"] = files["fold_3_data.txt"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    check_adience(tmp_path / "data", result.output)


def test_a_failed_rebuild_removes_the_manifest_of_the_old_metadata(tmp_path):
    """wiki.mat, unpacked from wiki_crop.tar and checked by no sha256, is damaged on disk after
    a first download. The rebuild stops naming it, and the manifest built from the old wiki.mat
    goes: `agepipe extract` then asks for a download instead of reading rows of a file that is no
    longer there. (The old manifest stayed, and extract ran on it without a word.)"""
    source = write_files(tmp_path / "Downloads", imdb_wiki_files("wiki"))
    args = ("--dataset", "wiki", "--source", str(source), "--data-dir", str(tmp_path / "data"))
    assert run(*args).exit_code == 0
    root = tmp_path / "data" / "wiki"
    mat = root / "wiki_crop" / "wiki.mat"
    mat.write_bytes(mat.read_bytes()[:100])

    result = run(*args)
    assert result.exit_code == 1
    assert f"{mat}: not a readable MATLAB file" in result.output
    assert f"removed {root / 'manifest.parquet'}, built from the earlier metadata" in result.output
    assert not (root / "manifest.parquet").exists()
    extract = CliRunner().invoke(cli, ["extract", "--dataset", "wiki", "--data-dir", str(tmp_path / "data"),
                                       "--store", str(tmp_path / "store")], catch_exceptions=False)
    assert extract.exit_code != 0
    assert "run `agepipe download --dataset wiki` first" in extract.output


def test_a_second_download_of_a_dataset_stops_while_one_runs(tmp_path, server):
    """Two downloads of one dataset at once fetched one NAME.part over two connections (the second
    truncating what the first was writing; the loser failed renaming a part the winner had
    renamed) and removed each other's unfinished extraction. The second now stops at once,
    before any request, as train and table do on their --out."""
    from agepipe.atomic import only_writer

    for name, data in adience_files().items():
        server.files[f"/adiencedb/{name}"] = data
    root = tmp_path / "data" / "adience"
    root.mkdir(parents=True)
    with only_writer(root, "download"):                 # the first download, still running
        result = run("--dataset", "adience", "--source", f"{server.url}/adiencedb/", "--data-dir", tmp_path / "data")
    assert result.exit_code == 1
    assert f"{root}: another agepipe command is writing this folder now" in result.output
    assert server.log == []
    result = run("--dataset", "adience", "--source", f"{server.url}/adiencedb/", "--data-dir", tmp_path / "data")
    assert result.exit_code == 0, result.output


def test_a_manifest_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch):
    """The disk fills up with the unpacked photos, then the manifest cannot be written: that
    was an OSError traceback after every file had been fetched and unpacked."""
    import errno

    from agepipe.datasets import manifest

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(manifest.pq, "write_table", full_disk)
    source = write_files(tmp_path / "Downloads", adience_files())
    result = run("--dataset", "adience", "--source", str(source), "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 1
    path = tmp_path / "data" / "adience" / "manifest.parquet"
    assert f"Error: {path}: cannot write (No space left on device)" in result.output
    assert not path.exists()
