"""agepipe.atomic: a file appears whole under its name or not at all."""
import pytest

from agepipe.atomic import atomic_path, write_text


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
