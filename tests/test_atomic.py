"""agepipe.atomic: a file appears whole under its name or not at all."""
import fsspec
import pytest

import errno
import fcntl
import logging

from agepipe.atomic import atomic_path, only_writer, open_atomic, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "metrics.json", "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed midway")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_the_name_shows_nothing_until_the_block_ends(tmp_path):
    path = tmp_path / "report.md"
    with atomic_path(path) as first, atomic_path(path) as second:
        assert first != second and first.parent == second.parent == tmp_path   # one folder: the rename is atomic
        first.write_text("first")
        second.write_text("second")
        assert not path.exists()
    assert path.read_text() == "first"          # the outer block ended last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


@pytest.mark.parametrize("name", ["store", "store [1]*?"])  # fsspec's generic mv globbed them
@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_open_atomic_on_an_fsspec_filesystem_is_all_or_nothing(tmp_path, protocol, name):
    fs = fsspec.filesystem(protocol)
    folder = f"{tmp_path}/{name}" if protocol == "file" else f"/{tmp_path.name}/{name}"
    path = f"{folder}/_index.json"
    with open_atomic(fs, path, "w") as f:
        f.write("old")
        assert not fs.exists(path)
    with pytest.raises(RuntimeError), open_atomic(fs, path, "w") as f:
        f.write("half")
        raise RuntimeError("the writer failed midway")
    assert fs.cat_file(path) == b"old"
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)] == ["_index.json"]


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_open_atomic_whose_rename_fails_leaves_no_temporary(tmp_path, protocol, monkeypatch):
    """The rename came after open_atomic's cleanup: a rename that failed (an object store's copy cut
    off by the network, a folder where the file should be) left the written temporary beside the
    file, until some later writer of that folder swept it."""
    fs = fsspec.filesystem(protocol)
    folder = str(tmp_path) if protocol == "file" else f"/{tmp_path.name}"
    path = f"{folder}/_index.json"
    if protocol == "file":
        fs.makedirs(path)  # os.replace of a file over a folder: IsADirectoryError
    else:
        with open_atomic(fs, path, "w") as f:
            f.write("old")

        def cut_off(*args, **kwargs):
            raise ConnectionError("the copy was cut off")
        monkeypatch.setattr(fs, "cp_file", cut_off)
    with pytest.raises(OSError), open_atomic(fs, path, "w") as f:
        f.write("new")
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)] == ["_index.json"]
    assert protocol == "file" or fs.cat_file(path) == b"old"


def test_a_file_system_that_does_not_lock_warns_and_lets_the_command_run(tmp_path, monkeypatch, caplog):
    """NFS without its lock daemon refuses flock with ENOLCK: the command runs, with a warning
    naming the lock file, instead of ending every train, table, download and extract there in a
    traceback. Another error of flock is not taken for that."""
    def refuse(f, how, code=errno.ENOLCK):
        raise OSError(code, "refused")

    monkeypatch.setattr(fcntl, "flock", refuse)
    ran = []
    with caplog.at_level(logging.WARNING), only_writer(tmp_path / "runs", "train"):
        ran.append(True)
    assert ran and "runs/.lock: the file system does not lock files" in caplog.text
    monkeypatch.setattr(fcntl, "flock", lambda f, how: refuse(f, how, errno.EBADF))
    with pytest.raises(OSError), only_writer(tmp_path / "runs", "train"):
        pass
