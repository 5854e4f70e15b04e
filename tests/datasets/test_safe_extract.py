"""safe_extract: hostile archives write nothing outside the target and are named; finished
extractions are trusted, interrupted ones redone."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from agepipe.download import DownloadError, RemoteFile, UnsafeArchiveError, fetch, safe_extract


def member(name, kind=tarfile.REGTYPE, data=b"", link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar_bytes(*members, mode="w") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


@pytest.fixture
def layout(tmp_path):
    """tmp/outside/secret (must survive untouched) and tmp/data (the target)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep")
    target = tmp_path / "data" / "adience"
    target.mkdir(parents=True)
    return tmp_path, outside, target


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


HOSTILE = {
    "dotdot": ([member("../../outside/evil.txt", data=b"x")], "../../outside/evil.txt", "'..' in its path"),
    "absolute": ([member("{outside}/abs.txt", data=b"x")], "{outside}/abs.txt", "absolute path"),
    "symlink_absolute": ([member("link", tarfile.SYMTYPE, link="/etc")], "link", "absolute path"),
    "symlink_out": ([member("sub", tarfile.DIRTYPE), member("sub/link", tarfile.SYMTYPE, link="../../../outside")],
                    "sub/link", "leaves the target folder"),
    "hardlink_out": ([member("hard", tarfile.LNKTYPE, link="../../outside/secret")], "hard", "hard link"),
    "hardlink_absolute": ([member("hard", tarfile.LNKTYPE, link="{outside}/secret")], "hard", "hard link"),
    # Each link alone stays inside; together they would carry a.../evil.txt out.
    "link_chain": ([member("a", tarfile.SYMTYPE, link="x/.."), member("x", tarfile.SYMTYPE, link="."),
                    member("a/evil.txt", data=b"x")], "a/evil.txt", "outside the target folder"),
    "char_device": ([member("dev/null0", tarfile.CHRTYPE)], "dev/null0", "device file"),
    # tarfile would look the target up in the member list we empty: a KeyError and a traceback
    "hardlink_ahead": ([member("hard", tarfile.LNKTYPE, link="later.jpg"), member("later.jpg", data=b"x")], "hard",
                       "which no member before it unpacked"),
    # the manifest is agepipe's, built from the verified metadata; a planted one would outlive a failed run
    "manifest": ([member("manifest.parquet", data=b"PAR1")], "manifest.parquet", "the target's own file"),
    "fifo": ([member("pipe", tarfile.FIFOTYPE)], "pipe", "device file or FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_refused_by_name_and_nothing_lands_anywhere(layout, case):
    tmp, outside, target = layout
    members, name, why = HOSTILE[case]
    members = [member("aligned/ok.jpg", data=b"fine")] + [
        (_with_name(info, info.name.format(outside=outside), info.linkname.format(outside=outside)), data)
        for info, data in members]
    archive = tmp / "hostile.tar"
    archive.write_bytes(tar_bytes(*members))
    before = snapshot(tmp)
    with pytest.raises(UnsafeArchiveError) as refused:
        safe_extract(archive, target)
    assert repr(name.format(outside=outside)) in str(refused.value) and why in str(refused.value)
    assert snapshot(tmp) == before                       # not even the good member remains
    assert (outside / "secret").read_text() == "keep"


def _with_name(info, name, link):
    info.name, info.linkname = name, link
    return info


def test_links_inside_the_archive_are_fine_and_a_finished_extraction_is_trusted(tmp_path):
    archive = tmp_path / "good.tar.gz"
    archive.write_bytes(tar_bytes(member("top", tarfile.DIRTYPE), member("top/a.txt", data=b"alpha"),
                                  member("top/link", tarfile.SYMTYPE, link="a.txt"),
                                  member("top/hard", tarfile.LNKTYPE, link="top/a.txt"), mode="w:gz"))
    target = tmp_path / "data"
    assert safe_extract(archive, target) == [target / "top"]
    assert (target / "top/link").read_text() == "alpha" and os.path.islink(target / "top/link")
    assert (target / "top/hard").read_text() == "alpha"
    assert (target / ".good.tar.gz.extracted").exists() and not (target / ".good.tar.gz.extracting").exists()

    (target / "top/a.txt").write_text("edited")          # a finished extraction is not redone...
    safe_extract(archive, target)
    assert (target / "top/a.txt").read_text() == "edited"
    os.utime(archive, ns=(1, 1))                         # ...unless the archive changed
    safe_extract(archive, target)
    assert (target / "top/a.txt").read_text() == "alpha"


def test_an_interrupted_extraction_is_redone_not_trusted(tmp_path):
    archive = tmp_path / "x.tar"
    archive.write_bytes(tar_bytes(member("top/a.txt", data=b"alpha"), member("top/b.txt", data=b"beta")))
    target = tmp_path / "data"
    (target / ".x.tar.extracting" / "top").mkdir(parents=True)
    (target / ".x.tar.extracting" / "top" / "half.txt").write_text("half")
    (target / "top").mkdir()                             # moved in by a run that died before the marker
    (target / "top" / "stale.txt").write_text("stale")
    safe_extract(archive, target)
    assert snapshot(target) == [".x.tar.extracted", "top", "top/a.txt", "top/b.txt"]


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_damaged_archive_fails_cleanly(tmp_path, cut):
    data = tar_bytes(*[member(f"d/{i}.bin", data=os.urandom(20000)) for i in range(20)], mode="w:gz")
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(DownloadError, match="broken.tar.gz"):
        safe_extract(archive, tmp_path / "data")
    assert snapshot(tmp_path / "data") == []


def test_fetch_refuses_a_hostile_archive_served_over_http(server, tmp_path):
    server.files["/evil.tar"] = tar_bytes(member("aligned/ok.jpg", data=b"fine"),
                                          member("aligned/../../escape.txt", data=b"x"))
    target = tmp_path / "data"
    with pytest.raises(UnsafeArchiveError, match=r"evil.tar: refusing member 'aligned/../../escape.txt'"):
        fetch([RemoteFile("evil.tar", f"{server.url}/evil.tar", extract=True)], target, backoff=0.01)
    assert sorted(p.name for p in target.iterdir()) == [".checksums.json", "evil.tar"]
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("cut", ["at_a_header", "in_a_header", "zeroed_header"])
def test_a_tar_cut_at_a_member_boundary_is_damaged_not_complete(tmp_path, cut):
    """An uncompressed tar (IMDB-WIKI's are) copied in 512-byte multiples can stop exactly where
    a member's header would start: tarfile reads that as the archive's end, so the copy
    unpacked as whole, short of every later member, and its sha256 was trusted from then on."""
    data = tar_bytes(*[member(f"d/{i}.bin", data=os.urandom(1000)) for i in range(6)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        at = tar.getmember("d/3.bin").offset
    damaged = {"at_a_header": data[:at], "in_a_header": data[:at + 100],
               "zeroed_header": data[:at] + b"\xff" * 512 + data[at + 512:]}[cut]
    archive = tmp_path / "imdb_crop.tar"
    archive.write_bytes(damaged)
    with pytest.raises(DownloadError, match=r"imdb_crop.tar: damaged archive after 3 members"):
        safe_extract(archive, tmp_path / "data")
    assert snapshot(tmp_path / "data") == []


def test_an_extended_header_past_the_bound_is_refused_before_it_is_read(tmp_path):
    """tarfile reads a pax or GNU long-name header whole into memory before any member is
    seen: a few KB of gzip can claim gigabytes. One past MAX_HEADER_BYTES is refused instead."""
    from agepipe.download import MAX_HEADER_BYTES

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member("aligned/ok.jpg", data=b"fine")[0], io.BytesIO(b"fine"))
        info, data = member("aligned/big.jpg", data=b"x")
        info.pax_headers = {"comment": "z" * (MAX_HEADER_BYTES + 1)}
        tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "aligned.tar.gz"
    archive.write_bytes(out.getvalue())
    assert archive.stat().st_size < MAX_HEADER_BYTES // 100
    with pytest.raises(DownloadError, match=r"aligned.tar.gz: damaged archive after 1 members .*"
                                            r"an extended header of \d+ bytes"):
        safe_extract(archive, tmp_path / "data")
    assert snapshot(tmp_path / "data") == []


def test_a_hard_link_the_file_system_refuses_is_copied_not_skipped(tmp_path, monkeypatch):
    """On a file system without hard links (an exFAT disk for the data), tarfile falls back to
    copying the member from its member list, which safe_extract empties as it goes: the member
    was skipped without a word, and the extraction recorded as finished."""
    archive = tmp_path / "links.tar"
    archive.write_bytes(tar_bytes(member("top/a.jpg", data=b"alpha"),
                                  member("top/b.jpg", tarfile.LNKTYPE, link="top/a.jpg")))

    def no_hard_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    safe_extract(archive, tmp_path / "data")
    assert (tmp_path / "data" / "top" / "b.jpg").read_bytes() == b"alpha"
