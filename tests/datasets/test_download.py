"""download.fetch against a loopback server that misbehaves, and local sources."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
from pathlib import Path

import pytest

from agepipe.download import (CHECKSUMS_FILE, ChecksumError, DownloadError, NotEnoughSpace,
                                       RemoteFile, fetch)

FAST = {"backoff": 0.01, "timeout": 5.0}
BLOB = os.urandom(3 * (1 << 20) + 12345)     # several read chunks


def remote(server, name="blob.bin", **kw) -> RemoteFile:
    return RemoteFile(name, f"{server.url}/official/{name}", size=len(BLOB), **kw)


def test_fetch_records_sha256_and_checks_it_on_every_later_use(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    [path] = fetch([remote(server)], tmp_path, **FAST)
    assert path.read_bytes() == BLOB
    record = json.loads((tmp_path / CHECKSUMS_FILE).read_text())["blob.bin"]
    assert record["sha256"] == hashlib.sha256(BLOB).hexdigest() and record["size"] == len(BLOB)
    assert not (tmp_path / "blob.bin.part").exists()

    requests = len(server.log)
    fetch([remote(server)], tmp_path, **FAST)            # present and intact: nothing fetched
    assert len(server.log) == requests

    with open(path, "r+b") as f:                          # bit rot on disk
        f.seek(1000)
        f.write(b"\0" * 8)
    with pytest.raises(ChecksumError, match="changed on disk"):
        fetch([remote(server)], tmp_path, **FAST)


def test_dropped_connection_resumes_without_fetching_bytes_twice(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    server.script["/official/blob.bin"] = [("drop", 1_000_000), ("drop", 1_000_000)]
    [path] = fetch([remote(server)], tmp_path, retries=1, **FAST)
    assert path.read_bytes() == BLOB
    assert [s.range for s in server.log] == [None, "bytes=1000000-", "bytes=2000000-"]
    assert server.bytes_sent("/official/blob.bin") == len(BLOB)


def test_a_tls_error_mid_body_is_retried_from_the_bytes_on_disk(server, tmp_path, monkeypatch):
    """A TLS record damaged on a flaky link (IMDB-WIKI is served over https) fails the read with
    ssl.SSLError, an OSError but no ConnectionError: the run ended there instead of resuming."""
    import ssl

    from agepipe import download

    server.files["/official/blob.bin"] = BLOB
    write_stream, starts = download._write_stream, []

    def tls_fails_once(stream, part, start, *args):
        starts.append(start)
        if len(starts) == 1:
            part.write_bytes(stream.read(1_000_000))
            raise ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac")
        return write_stream(stream, part, start, *args)

    monkeypatch.setattr(download, "_write_stream", tls_fails_once)
    [path] = fetch([remote(server)], tmp_path, **FAST)
    assert path.read_bytes() == BLOB and starts == [0, 1_000_000]


def test_interrupted_run_resumes_on_the_next_run(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    # The link drops, then the server is down: this run gives up with the bytes it got.
    server.script["/official/blob.bin"] = [("drop", 777_777), ("status", 503), ("status", 503)]
    with pytest.raises(DownloadError, match="giving up after 1 retries: HTTP 503"):
        fetch([remote(server)], tmp_path, retries=1, **FAST)
    part = tmp_path / "blob.bin.part"
    assert part.stat().st_size == 777_777 and not (tmp_path / "blob.bin").exists()

    [path] = fetch([remote(server)], tmp_path, **FAST)
    assert path.read_bytes() == BLOB
    assert server.log[-1].range == "bytes=777777-" and server.log[-1].body_bytes == len(BLOB) - 777_777
    assert server.bytes_sent("/official/blob.bin") == len(BLOB)


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
@pytest.mark.parametrize("server_honours_if_range", [True, False])
def test_a_file_changed_on_the_server_between_runs_is_fetched_again_whole(server, tmp_path, server_honours_if_range,
                                                                          validator):
    """The first run gets part of version 1; the file then changes upstream. The rerun asks for
    the rest only if the file is still version 1 (If-Range), so the result is version 2 whole,
    never version 1's head and version 2's tail (whose sha256 would have been recorded), whether
    the server names its versions by ETag or only by Last-Modified."""
    server.validator = validator
    server.files["/official/blob.bin"] = BLOB
    server.script["/official/blob.bin"] = [("drop", 777_777), ("status", 503), ("status", 503)]
    with pytest.raises(DownloadError):
        fetch([remote(server)], tmp_path, retries=1, **FAST)
    version = (tmp_path / "blob.bin.part.if-range").read_text()
    newer = os.urandom(len(BLOB))
    server.files["/official/blob.bin"] = newer
    if not server_honours_if_range:  # a 206 of the new version, which names itself in its validator
        server.script["/official/blob.bin"] = [("ignore_if_range",)]
    [path] = fetch([remote(server)], tmp_path, **FAST)
    assert path.read_bytes() == newer
    resumed = [s for s in server.log if s.range == "bytes=777777-"][-1]
    assert resumed.if_range == version and version.startswith('"') == (validator == "etag")
    assert json.loads((tmp_path / CHECKSUMS_FILE).read_text())["blob.bin"]["sha256"] == hashlib.sha256(newer).hexdigest()
    assert not list(tmp_path.glob("blob.bin.part*"))


def test_a_changed_file_that_does_not_fit_leaves_no_part_for_its_new_version(server, tmp_path, monkeypatch):
    """The rerun learns the file changed upstream (a 200 to its If-Range), then stops on a full
    disk before writing a byte. The part held version 1's head under version 2's ETag, so the
    next run resumed it and got version 1's head with version 2's tail, its sha256 recorded."""
    import collections

    from agepipe import download

    server.files["/official/blob.bin"] = BLOB
    server.script["/official/blob.bin"] = [("drop", 777_777), ("status", 503), ("status", 503)]
    with pytest.raises(DownloadError):
        fetch([remote(server)], tmp_path, retries=1, **FAST)
    newer = os.urandom(len(BLOB))
    server.files["/official/blob.bin"] = newer
    f = RemoteFile("blob.bin", f"{server.url}/official/blob.bin")     # size 0: past the first check
    usage = collections.namedtuple("usage", "total used free")
    with monkeypatch.context() as full:
        full.setattr(download.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, len(BLOB) - 1))
        with pytest.raises(NotEnoughSpace, match="blob.bin"):
            fetch([f], tmp_path, **FAST)
    [path] = fetch([f], tmp_path, **FAST)
    assert path.read_bytes() == newer
    assert json.loads((tmp_path / CHECKSUMS_FILE).read_text())["blob.bin"]["sha256"] == hashlib.sha256(newer).hexdigest()


def test_server_ignoring_range_is_refetched_whole_and_verifies(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:500_000])
    server.script["/official/blob.bin"] = [("ignore_range",)]
    [path] = fetch([remote(server, sha256=hashlib.sha256(BLOB).hexdigest())], tmp_path, **FAST)
    assert path.read_bytes() == BLOB
    assert [(s.range, s.status) for s in server.log] == [("bytes=500000-", 200)]


def test_a_server_ignoring_range_is_not_reported_as_a_changed_file(server, tmp_path, caplog):
    """A server without Range support (python -m http.server) answers the resume with the whole
    file, of the version the part holds: said as such, not as a file changed on the server."""
    server.files["/official/blob.bin"] = BLOB
    server.script["/official/blob.bin"] = [("drop", 777_777), ("status", 503), ("status", 503)]
    with pytest.raises(DownloadError):
        fetch([remote(server)], tmp_path, retries=1, **FAST)
    server.script["/official/blob.bin"] = [("ignore_range",)]
    with caplog.at_level(logging.WARNING, logger="agepipe.download"):
        [path] = fetch([remote(server)], tmp_path, **FAST)
    assert path.read_bytes() == BLOB and server.log[-1].if_range is not None
    assert "blob.bin: the server ignored the Range request" in caplog.text and "changed" not in caplog.text


def test_complete_part_from_a_run_stopped_before_the_rename(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB)
    [path] = fetch([remote(server)], tmp_path, **FAST)
    assert path.read_bytes() == BLOB
    assert [s.status for s in server.log] == [416]


def test_part_longer_than_the_file_starts_over(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB + b"junk")
    [path] = fetch([remote(server)], tmp_path, **FAST)
    assert path.read_bytes() == BLOB
    assert [s.status for s in server.log] == [416, 200]


def test_basic_auth_is_sent_only_when_the_server_asks(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    server.auth = ("adiencedb", "adience")
    [path] = fetch([remote(server)], tmp_path, auth=("adiencedb", "adience"), **FAST)
    assert path.read_bytes() == BLOB
    assert [(s.status, s.authorization is not None) for s in server.log] == [(401, False), (200, True)]

    with pytest.raises(DownloadError, match="HTTP 401, the server asks for credentials"):
        fetch([remote(server, name="other.bin")], tmp_path / "no-auth", **FAST)
    with pytest.raises(DownloadError, match="HTTP 401, credentials refused"):
        fetch([remote(server)], tmp_path / "wrong", auth=("adiencedb", "wrong"), **FAST)


def test_credentials_reach_the_url_a_redirect_leads_to_on_the_same_host(server, tmp_path):
    """The server redirects the file's URL (http -> https, a moved folder), then asks for
    credentials there. They were added to the first URL, which a redirect does not carry them
    from: the retry met the same 401 and failed as "credentials refused", never having sent them."""
    server.files["/moved/blob.bin"] = BLOB
    server.redirects["/official/blob.bin"] = "/moved/blob.bin"
    server.auth = ("adiencedb", "adience")
    [path] = fetch([remote(server)], tmp_path, auth=("adiencedb", "adience"), **FAST)
    assert path.read_bytes() == BLOB
    assert [(s.path, s.status, s.authorization is not None) for s in server.log] == [
        ("/official/blob.bin", 301, False), ("/moved/blob.bin", 401, False), ("/moved/blob.bin", 200, True)]


def test_credentials_are_not_sent_to_another_host_and_the_error_says_so(server, tmp_path):
    """A redirect to another host that asks for credentials gets none (they are for the host
    the user named); the error says where the request went instead of 'credentials refused'."""
    elsewhere = f"http://localhost:{server.server_address[1]}/moved/blob.bin"
    server.files["/moved/blob.bin"] = BLOB
    server.redirects["/official/blob.bin"] = elsewhere
    server.auth = ("adiencedb", "adience")
    with pytest.raises(DownloadError, match=f"{elsewhere}, where .* redirects, asks for credentials.*only to 127.0.0.1"):
        fetch([remote(server)], tmp_path, auth=("adiencedb", "adience"), **FAST)
    assert not [s for s in server.log if s.path == "/moved/blob.bin" and s.authorization]


def test_credentials_in_the_source_url(server, tmp_path):
    server.files["/mirror/blob.bin"] = BLOB
    server.auth = ("me", "p@ss")
    [path] = fetch([remote(server)], tmp_path, source=f"http://me:p%40ss@127.0.0.1:{server.server_address[1]}/mirror",
                   **FAST)
    assert path.read_bytes() == BLOB


def test_wrong_bytes_against_a_known_sha256_are_deleted(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    server.corrupt.add("/official/blob.bin")
    with pytest.raises(ChecksumError, match="blob.bin.*does not match the known sha256.*deleted"):
        fetch([remote(server, sha256=hashlib.sha256(BLOB).hexdigest())], tmp_path, **FAST)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()
    server.corrupt.clear()
    fetch([remote(server, sha256=hashlib.sha256(BLOB).hexdigest())], tmp_path, **FAST)


def test_a_changed_file_upstream_fails_against_the_recorded_sha256(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    [path] = fetch([remote(server)], tmp_path, **FAST)
    path.unlink()
    server.corrupt.add("/official/blob.bin")
    with pytest.raises(ChecksumError, match="recorded on first download"):
        fetch([remote(server)], tmp_path, **FAST)


def test_unverified_md5_mismatch_only_warns(server, tmp_path, caplog):
    server.files["/official/blob.bin"] = BLOB
    with caplog.at_level(logging.WARNING, logger="agepipe.download"):
        [path] = fetch([remote(server, unverified_md5="0" * 32)], tmp_path, **FAST)
    assert path.read_bytes() == BLOB
    assert "which a third party lists (unverified)" in caplog.text
    server.files["/official/b2"] = BLOB
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agepipe.download"):
        fetch([remote(server, name="b2", unverified_md5=hashlib.md5(BLOB).hexdigest())], tmp_path / "ok", **FAST)
    assert "unverified" not in caplog.text


def test_server_errors_are_retried_and_client_errors_are_not(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    server.script["/official/blob.bin"] = [("status", 503), ("status", 503)]
    fetch([remote(server)], tmp_path, **FAST)
    assert [s.status for s in server.log] == [503, 503, 200]
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch([remote(server, name="absent.bin")], tmp_path, **FAST)
    assert [s.status for s in server.log][-1:] == [404] and len(server.log) == 4


def test_several_files_at_once_and_every_failure_is_named(server, tmp_path):
    names = [f"f{i}.bin" for i in range(4)]
    for i, name in enumerate(names):
        server.files[f"/official/{name}"] = BLOB[i * 1000:]
    files = [remote(server, name=n) for n in names] + [remote(server, name="gone1"), remote(server, name="gone2")]
    with pytest.raises(DownloadError) as failure:
        fetch(files, tmp_path, workers=3, **FAST)
    assert "2 files failed" in str(failure.value) and "gone1" in str(failure.value) and "gone2" in str(failure.value)
    for i, name in enumerate(names):
        assert (tmp_path / name).read_bytes() == BLOB[i * 1000:]


def test_free_space_is_checked_before_any_request(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    huge = RemoteFile("blob.bin", f"{server.url}/official/blob.bin", size=10 ** 18)
    with pytest.raises(NotEnoughSpace, match="needed"):
        fetch([huge], tmp_path, **FAST)
    assert server.log == []


def test_a_mirror_or_folder_copy_is_measured_by_its_own_size_not_the_catalogue_s(server, tmp_path):
    """A mirror or a folder may hold another copy than the catalogue describes (a sample of
    IMDB-WIKI's 7 GB tar): the check before starting refused it on a disk with less free space
    than the catalogue's size, however small the copy."""
    server.files["/mirror/blob.bin"] = BLOB
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(BLOB)
    huge = RemoteFile("blob.bin", f"{server.url}/official/blob.bin", size=10 ** 18)
    for source, dest in ((f"{server.url}/mirror", "a"), (str(folder), "b")):
        [path] = fetch([huge], tmp_path / dest, source=source, **FAST)
        assert path.read_bytes() == BLOB


@pytest.mark.parametrize("extract, refused", [(False, False), (True, True)])
def test_a_mirror_s_file_is_checked_for_its_download_and_its_unpacking(server, tmp_path, monkeypatch,
                                                                          extract, refused):
    """A mirror's size is known from its response: there the check counts unpacking too."""
    import collections

    from agepipe import download

    server.files["/mirror/blob.bin"] = BLOB
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, len(BLOB) + 1))
    f = RemoteFile("blob.bin", "http://127.0.0.1:9/unreachable/blob.bin", size=10 ** 18, extract=extract)
    if refused:
        with pytest.raises(NotEnoughSpace, match="blob.bin: .* still to fetch and unpack"):
            fetch([f], tmp_path, source=f"{server.url}/mirror", extract=True, **FAST)
        assert not (tmp_path / "blob.bin").exists()
    else:
        [path] = fetch([f], tmp_path, source=f"{server.url}/mirror", extract=True, **FAST)
        assert path.read_bytes() == BLOB


@pytest.mark.parametrize("as_url", [False, True])
def test_local_source_folder_or_file_url(tmp_path, as_url):
    source = tmp_path / "mine"
    source.mkdir()
    (source / "blob.bin").write_bytes(BLOB)
    f = RemoteFile("blob.bin", "http://127.0.0.1:9/unreachable/blob.bin", size=len(BLOB))
    where = source.as_uri() if as_url else str(source)
    [path] = fetch([f], tmp_path / "data", source=where, **FAST)
    assert path.read_bytes() == BLOB
    assert json.loads((tmp_path / "data" / CHECKSUMS_FILE).read_text())["blob.bin"]["source"] == str(source / "blob.bin")
    with pytest.raises(DownloadError, match="other.bin: not found in the source folder"):
        fetch([RemoteFile("other.bin", "http://127.0.0.1:9/x")], tmp_path / "data", source=where, **FAST)
    with pytest.raises(DownloadError, match="no such folder"):
        fetch([f], tmp_path / "data2", source=str(tmp_path / "nowhere"), **FAST)


def test_ctrl_c_stops_the_workers_and_leaves_a_resumable_part(server, tmp_path):
    server.files["/official/blob.bin"] = BLOB
    server.script["/official/blob.bin"] = [("trickle", 32 * 1024, 0.05)]      # 0.6 MB/s: 5 s in all
    threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        fetch([remote(server)], tmp_path, **FAST)
    got = (tmp_path / "blob.bin.part").stat().st_size
    # Stopped part way (a bound on the wall time failed on a loaded machine; the bytes cannot).
    assert 0 < got < len(BLOB) and not (tmp_path / "blob.bin").exists()
    [path] = fetch([remote(server)], tmp_path, **FAST)
    # (The interrupted response is logged whenever its handler notices: order is not fixed.)
    assert path.read_bytes() == BLOB and [s.range for s in server.log if s.status == 206] == [f"bytes={got}-"]


def test_ctrl_c_starts_no_file_still_waiting_for_a_worker(server, tmp_path):
    """Files queued behind busy workers (Adience's six with four workers) were started after
    Ctrl-C, each opening a connection before its first chunk noticed the stop."""
    server.files["/official/blob.bin"] = BLOB
    server.files["/official/next.bin"] = BLOB
    server.script["/official/blob.bin"] = [("trickle", 32 * 1024, 0.05)]
    threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        fetch([remote(server), remote(server, name="next.bin")], tmp_path, workers=1, **FAST)
    assert "/official/next.bin" not in {s.path for s in server.log}


def test_a_leftover_part_goes_once_the_file_is_in_place(tmp_path):
    # An interrupted download, then the file by a hard link from a folder (or already whole):
    # the stale .part, gigabytes for IMDB, is not kept forever.
    source = tmp_path / "mine"
    source.mkdir()
    (source / "blob.bin").write_bytes(BLOB)
    data = tmp_path / "data"
    data.mkdir()
    (data / "blob.bin.part").write_bytes(BLOB[:1000])
    f = RemoteFile("blob.bin", "http://127.0.0.1:9/unreachable/blob.bin", size=len(BLOB))
    [path] = fetch([f], data, source=str(source), **FAST)
    assert path.read_bytes() == BLOB and not (data / "blob.bin.part").exists()
    (data / "blob.bin.part").write_bytes(BLOB[:1000])
    fetch([f], data, source=str(source), **FAST)
    assert not (data / "blob.bin.part").exists()


@pytest.fixture
def other_disk(tmp_path):
    """A folder on another filesystem than tmp_path (a USB disk's Downloads): no hard link can
    reach it, so its files are copied through NAME.part."""
    import tempfile
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to copy from")
    with tempfile.TemporaryDirectory(dir=shm) as folder:
        yield Path(folder)


def test_a_copy_resumed_after_the_source_file_changed_starts_over(other_disk, tmp_path):
    """A copy from a --source folder was interrupted; the file there was then replaced (a fresh
    browser download, the same size). The rerun copies the new file whole, never the old one's
    head and the new one's tail, whose sha256 would be recorded on first use and trusted."""
    f = RemoteFile("blob.bin", "http://127.0.0.1:9/unreachable/blob.bin", size=len(BLOB))
    (other_disk / "blob.bin").write_bytes(BLOB)
    data = tmp_path / "data"
    data.mkdir()
    (data / "blob.bin.part").write_bytes(BLOB[:777_777])    # as the interrupted copy left it
    newer = os.urandom(len(BLOB))
    (other_disk / "blob.bin").write_bytes(newer)
    [path] = fetch([f], data, source=str(other_disk), **FAST)
    assert path.read_bytes() == newer
    assert json.loads((data / CHECKSUMS_FILE).read_text())["blob.bin"]["sha256"] == hashlib.sha256(newer).hexdigest()
    assert not list(data.glob("blob.bin.part*"))


def test_a_copy_of_an_unchanged_source_file_resumes(other_disk, tmp_path):
    """Copied to byte 777,777 from the same file as now (size and mtime recorded beside the
    part): the rerun copies the rest only, keeping the bytes on disk."""
    f = RemoteFile("blob.bin", "http://127.0.0.1:9/unreachable/blob.bin", size=len(BLOB))
    src = other_disk / "blob.bin"
    src.write_bytes(BLOB)
    data = tmp_path / "data"
    data.mkdir()
    part = data / "blob.bin.part"
    from agepipe.download import _keep_source
    part.write_bytes(b"\0" * 777_777)       # not the source's head: shows these bytes are kept
    _keep_source(part, src)                  # as the interrupted copy recorded it
    [path] = fetch([f], data, source=str(other_disk), **FAST)
    assert path.read_bytes() == b"\0" * 777_777 + BLOB[777_777:]
    assert not list(data.glob("blob.bin.part*"))


def test_a_mirror_url_with_a_query_gets_the_file_name_on_its_path(server, tmp_path):
    """A signed mirror URL (?token=...): the name goes on the path and the query is kept."""
    server.files["/mirror/blob.bin"] = BLOB
    [path] = fetch([remote(server)], tmp_path, source=f"{server.url}/mirror/?token=a%2Fb&x=1", **FAST)
    assert path.read_bytes() == BLOB
    assert [(s.path, s.query) for s in server.log] == [("/mirror/blob.bin", "token=a%2Fb&x=1")]


def test_credentials_in_an_ipv6_source_url(server6, tmp_path):
    server6.files["/mirror/blob.bin"] = BLOB
    server6.auth = ("me", "p@ss")
    source = f"http://me:p%40ss@[::1]:{server6.server_address[1]}/mirror"
    [path] = fetch([remote(server6)], tmp_path, source=source, **FAST)
    assert path.read_bytes() == BLOB
    assert [s.status for s in server6.log] == [401, 200]
    # Where it came from, without the credentials: the brackets kept (without them "::1:PORT"
    # reads as host ::1:PORT, or with no port as host ":" and port 1).
    recorded = json.loads((tmp_path / CHECKSUMS_FILE).read_text())["blob.bin"]["source"]
    assert recorded == f"http://[::1]:{server6.server_address[1]}/mirror/blob.bin"


def test_a_body_without_a_length_is_taken_with_a_warning_when_no_sha256_can_check_it(server, tmp_path, caplog):
    """A server may end a body by closing the connection (no Content-Length, not chunked): a
    body cut short then looks whole. It is kept (such servers are legitimate), but a file with no
    published sha256 (Adience's fold files) gets a warning naming it, as its sha256 is recorded."""
    server.files["/official/fold_0_data.txt"] = BLOB
    server.script["/official/fold_0_data.txt"] = [("no_length", 1_000_000)]
    with caplog.at_level(logging.WARNING, logger="agepipe.download"):
        [path] = fetch([remote(server, name="fold_0_data.txt")], tmp_path, **FAST)
    assert path.stat().st_size == 1_000_000                # what arrived: nothing can tell it is short
    assert "fold_0_data.txt: the server gave no length" in caplog.text

    server.files["/official/blob.bin"] = BLOB
    server.script["/official/blob.bin"] = [("no_length", None)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agepipe.download"):     # the sha256 checks it
        [path] = fetch([remote(server, sha256=hashlib.sha256(BLOB).hexdigest())], tmp_path, **FAST)
    assert path.read_bytes() == BLOB and "no length" not in caplog.text


def test_a_missing_file_url_fails_at_once_not_after_retries(tmp_path):
    # `agepipe models fetch --url file:///...` to a file that is not there retried for 31 s.
    missing = tmp_path / "nowhere" / "blob.bin"
    with pytest.raises(DownloadError) as raised:
        fetch([RemoteFile("blob.bin", missing.as_uri())], tmp_path / "dest", retries=3, **FAST)
    assert str(raised.value) == f"blob.bin: {missing.as_uri()}: No such file or directory"
