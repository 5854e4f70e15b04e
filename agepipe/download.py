"""Fetch a dataset's files: resumable, verified downloads and safe unpacking.

    fetch(files, dest_dir, source=None, auth=None, workers=4, extract=True) -> list[Path]
    safe_extract(archive, target) -> list[Path]

How a file arrives in ``dest_dir``:

* From its official URL, or from ``source``: a folder, a ``file://`` URL or an HTTP(S) mirror that
  holds the files under their official names. A local file is hard-linked when it can be (no
  copy, no extra space), else copied.
* Bytes go to ``NAME.part``; a rerun, or a retry after a dropped connection, asks for the rest
  with an HTTP ``Range`` request, so bytes already on disk are not fetched again. The part's
  version (its ETag, else Last-Modified) is kept in ``NAME.part.if-range`` and sent as
  ``If-Range``, so a file that changed on the server is fetched again whole instead of being
  stitched from two versions; a copy from a folder resumes likewise only while the file there
  keeps the size and mtime recorded in ``NAME.part.source``. A server that ignores ``Range`` is
  tolerated (the part is rewritten from its first byte). Failed attempts are retried with exponential backoff;
  ``.part`` is renamed to ``NAME`` only when complete.
* HTTP basic auth is answered only when a server asks for it (401), so credentials are never
  sent to a mirror that does not want them. ``http://user:password@host/...`` sources work too.
* Verification: ``RemoteFile.sha256`` when a trustworthy checksum is known; otherwise the sha256
  recorded on first download in ``dest_dir/.checksums.json`` is checked on every later use.
  ``unverified_md5`` (a checksum listed by a third party) only warns when it differs.
* Archives are unpacked by ``safe_extract`` into a temporary folder beside the target and moved
  into place when complete; a marker file then records the archive, so an interrupted
  extraction is redone, never trusted.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import logging
import lzma
import os
import shutil
import socket
import ssl
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from agepipe import __version__
from agepipe.atomic import write_text
from agepipe.paths import escapes, parts

log = logging.getLogger(__name__)

CHECKSUMS_FILE = ".checksums.json"
MANIFEST_FILE = "manifest.parquet"  # written after extraction; an archive never supplies it
CHUNK = 1 << 20
MAX_BACKOFF_S = 60.0
_NO_SUCH_HOST = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset, by its official name and URL."""
    name: str                   # file name in dest_dir and under a --source folder or mirror
    url: str                    # the official location
    size: int = 0               # about how many bytes (0: unknown); used for the free-space check
    sha256: str | None = None   # a checksum we trust; None: record on first download
    unverified_md5: str | None = None   # listed by a third party: a mismatch only warns
    extract: bool = False       # a tar archive to unpack into dest_dir


class DownloadError(Exception):
    """A file could not be fetched, verified or unpacked; the message names it."""


class ChecksumError(DownloadError):
    pass


class UnsafeArchiveError(DownloadError):
    pass


class DamagedArchive(DownloadError):
    """An archive that cannot be read to its end (a truncated or corrupt copy)."""


class NotEnoughSpace(DownloadError):
    pass


class _Retryable(Exception):
    """A failure worth another attempt (dropped connection, short body, 5xx)."""


class _Stopped(Exception):
    """Another thread asked the workers to stop (Ctrl-C)."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise _Stopped()


# --- public API -------------------------------------------------------------------------

def fetch(files: list[RemoteFile], dest_dir: str | os.PathLike, source: str | None = None,
          auth: tuple[str, str] | None = None, workers: int = 4, extract: bool = True,
          retries: int = 5, backoff: float = 1.0, timeout: float = 60.0) -> list[Path]:
    """Bring ``files`` into ``dest_dir``, verified, archives unpacked there when ``extract``.

    ``source``: None (official URLs), a folder, a ``file://`` URL or an HTTP(S) base URL.
    ``auth``: (user, password) answered to an HTTP 401. ``retries``: failed attempts in a row
    (without new bytes) before giving up on a file; waits grow from ``backoff`` seconds.
    Returns the files' paths in order. Raises DownloadError naming every file that failed;
    the others are complete, so a rerun fetches only what is missing.
    """
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    source, auth = _split_credentials(source, auth)
    locations = [_location(f, source) for f in files]
    _check_free_space(files, locations, dest_dir, extract)

    stop = threading.Event()

    def one(index: int) -> Path:
        f = files[index]
        try:
            path = _get(f, locations[index], dest_dir, auth, retries, backoff, timeout, index, stop,
                        unpack=extract and f.extract)
            if extract and f.extract:
                try:
                    safe_extract(path, dest_dir, protected={g.name for g in files}, _stop=stop, _position=index)
                except DamagedArchive as e:
                    if f.sha256:  # as published: nothing a new copy would change
                        raise
                    forget(f, dest_dir)
                    raise DamagedArchive(f"{e}; deleted it and the sha256 recorded for it, which were of this "
                                         f"damaged copy: give a whole {f.name} and rerun") from None
        except OSError as e:        # e.g. a full disk: the message alone would not name the file
            raise DownloadError(f"{f.name}: {e}") from e
        return path

    errors = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fetch") as pool:
        futures = [pool.submit(one, i) for i in range(len(files))]
        try:
            for future in futures:
                try:
                    future.result()
                except DownloadError as e:
                    errors.append(e)
        except BaseException:
            # Ctrl-C (or a bug): workers stop at their next chunk instead of finishing gigabytes,
            # and files still queued are not started.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise DownloadError(f"{len(errors)} files failed:\n" + "\n".join(f"  {e}" for e in errors))
    return [dest_dir / f.name for f in files]


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike, *, protected=(),
                 _stop: threading.Event | None = None, _position: int = 0) -> list[Path]:
    """Unpack a tar archive (any compression) into ``target``; returns its top-level paths.

    Refuses absolute paths, ``..``, links or hard links that resolve outside the archive's
    folder (also through a chain of links, checked once all are unpacked), device files, and
    members that would replace the target's bookkeeping (any top-level name starting with
    ".") or its verified files (``protected``, the archive, every file in .checksums.json),
    naming the member; nothing is then left behind. Members are
    unpacked into ``target/.NAME.extracting`` and moved into ``target`` when all are done;
    ``target/.NAME.extracted`` records that, so a rerun skips a finished extraction and redoes
    an interrupted one (top-level entries of an unfinished run are replaced).
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    marker = _extracted_marker(target, archive.name)
    stat = archive.stat()
    identity = {"archive": archive.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    done = _read_json(marker)
    if done and all(done.get(k) == v for k, v in identity.items()) and \
            all((target / name).exists() for name in done.get("entries", [])):
        return [target / name for name in done["entries"]]

    work = target / f".{archive.name}.extracting"
    if work.exists():
        log.info("removing the unfinished extraction %s", work)
        _remove(work)
    work.mkdir()
    try:
        protected = {*protected, archive.name, CHECKSUMS_FILE, MANIFEST_FILE,
                     *_read_checksums(target / CHECKSUMS_FILE)}
        members = _extract_members(archive, work, protected, _stop, _position)
        entries = sorted(os.listdir(work))
        for name in entries:
            _remove(target / name)
            os.replace(work / name, target / name)
        work.rmdir()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _write_json(marker, {**identity, "entries": entries, "members": members})
    return [target / name for name in entries]


# --- where a file comes from --------------------------------------------------------------

def _split_credentials(source: str | None, auth):
    """Credentials written into a source URL take precedence and are removed from it."""
    if not source or "://" not in source:
        return source, auth
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError as e:  # "Invalid IPv6 URL": a bracket left open in the host
        raise DownloadError(f"--source {source}: not a URL ({e})") from None
    if parts.username is None:
        return source, auth
    netloc = parts.netloc.rpartition("@")[2]   # the host as written: an IPv6 one keeps its brackets
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), (user, password)


def _location(f: RemoteFile, source: str | None) -> str | Path:
    """An http(s) URL (str) or a local file (Path)."""
    if source is None:
        return f.url
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return _mirror_url(source, f.name)
    if scheme == "file":
        folder = Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path))
    elif scheme and len(scheme) > 1:
        raise DownloadError(f"--source {source}: only folders, file://, http:// and https:// are supported")
    else:
        folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DownloadError(f"--source {source}: no such folder")
    return folder / f.name


def _mirror_url(base: str, name: str) -> str:
    """``name`` under a mirror's path; its query (a signed URL's token) stays the query."""
    parts = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + urllib.parse.quote(name)))


def _check_free_space(files, locations, dest_dir: Path, extract: bool) -> None:
    """Fail before starting when the files still to fetch (and unpack) cannot fit.

    Sizes are the files' own where known without a request: a local source's, a finished
    download's, the catalogue's for the official URLs. A mirror may hold another copy (a newer
    release, a sample): its file is checked when the response gives its length (_download).
    """
    need = 0
    for f, where in zip(files, locations):
        final, part = dest_dir / f.name, dest_dir / (f.name + ".part")
        if final.exists():
            size, copy = final.stat().st_size, 0
        elif isinstance(where, Path):
            size = where.stat().st_size if where.is_file() else 0  # a missing file fails in _get
            linked = where.is_file() and where.stat().st_dev == dest_dir.stat().st_dev
            copy = 0 if linked else size
        elif where == f.url:
            size = copy = f.size
        else:
            continue
        need += max(0, copy - (part.stat().st_size if part.exists() else 0))
        need += _unpacked_size(f, size, dest_dir, extract)
    free = shutil.disk_usage(dest_dir).free
    if need > free:
        raise NotEnoughSpace(f"{dest_dir}: about {_gb(need)} needed, {_gb(free)} free")


def _unpacked_size(f: RemoteFile, size: int, dest_dir: Path, extract: bool) -> int:
    """About what unpacking ``f`` still takes: archives of JPEGs barely compress."""
    return size if extract and f.extract and not _extracted_marker(dest_dir, f.name).exists() else 0


def _extracted_marker(target: Path, name: str) -> Path:
    return target / f".{name}.extracted"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


# --- getting one file ---------------------------------------------------------------------

def _get(f: RemoteFile, where: str | Path, dest_dir: Path, auth, retries: int, backoff: float,
         timeout: float, position: int, stop: threading.Event, unpack: bool = False) -> Path:
    final, part = dest_dir / f.name, dest_dir / (f.name + ".part")
    if final.exists():
        _drop_part(part)  # an interrupted download's bytes, now of no use (gigabytes for IMDB)
        _verify(f, final, dest_dir, where, fresh=False, position=position, stop=stop)
        return final
    if isinstance(where, Path) and _try_hardlink(where, final):
        _drop_part(part)
    else:
        unpack = unpack and not _extracted_marker(dest_dir, f.name).exists()
        delimited = _fill_part(where, part, f.name, auth, retries, backoff, timeout, position, stop, unpack)
        os.replace(part, final)
        _drop_part(part)
        if not delimited and not f.sha256:
            # Its sha256 is recorded as it is: a body cut short would be trusted from now on.
            log.warning("%s: the server gave no length (no Content-Length, not chunked), so whether "
                        "all of it arrived could not be checked; its sha256 is recorded from this copy",
                        f.name)
    _verify(f, final, dest_dir, where, fresh=True, position=position, stop=stop)
    return final


def _fill_part(where: str | Path, part: Path, name: str, auth, retries: int, backoff: float,
               timeout: float, position: int, stop: threading.Event, unpack: bool = False) -> bool:
    """Complete ``part``, resuming after every failure; ``retries`` failures in a row without a
    new byte end it. False when nothing told where the file ends (a body ended by the server
    closing the connection looks whole even when cut short)."""
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if isinstance(where, Path):
                _copy_from(where, part, name, position, stop)
                return True
            return _download(where, part, name, auth, timeout, position, stop, unpack)
        except _Retryable as e:
            after = part.stat().st_size if part.exists() else 0
            failures = 0 if after > before else failures + 1
            if failures > retries:
                raise DownloadError(f"{name}: giving up after {retries} retries: {e}") from None
            wait = min(MAX_BACKOFF_S, backoff * 2 ** max(0, failures - 1))
            log.warning("%s: %s; retrying in %.1f s from byte %d", name, e, wait, after)
            if stop.wait(wait):
                raise _Stopped() from None


def _try_hardlink(src: Path, final: Path) -> bool:
    if not src.is_file():
        raise DownloadError(f"{final.name}: not found in the source folder {src.parent}")
    try:
        os.link(src, final)
        return True
    except OSError:         # another filesystem, or links not allowed: copy instead
        return False


def _copy_from(src: Path, part: Path, name: str, position: int, stop: threading.Event) -> None:
    total = src.stat().st_size
    start = part.stat().st_size if part.exists() else 0
    if start and (start > total or _read_json(_source_record(part)) != _identity(src)):
        # Another file than the part was copied from (or one whose copy was not recorded): its
        # tail after the part's head would be two files, and its sha256 recorded as the file's.
        log.warning("%s: the part was not copied from %s as it is now (the file changed); copying it "
                    "again from the first byte", name, src)
        start = 0
    if start == 0:
        _drop_part(part)     # first, so a crash never leaves old bytes under the new record
        _keep_source(part, src)
    with open(src, "rb") as stream:
        stream.seek(start)
        _write_stream(stream, part, start, total, name, position, stop)


def _identity(src: Path) -> dict:
    """What tells one version of a local file from another, as If-Range's ETag does over HTTP."""
    stat = src.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _source_record(part: Path) -> Path:
    return part.with_name(part.name + ".source")


def _keep_source(part: Path, src: Path) -> None:
    _write_json(_source_record(part), _identity(src))


class _RangeNotSatisfiable(Exception):
    def __init__(self, total: int | None):
        self.total = total


def _download(url: str, part: Path, name: str, auth, timeout: float, position: int,
              stop: threading.Event, unpack: bool = False) -> bool:
    """Whether the response told where the file ends (a size, or chunked encoding's last chunk).
    ``unpack``: the file will be unpacked next to it, which takes about its size again."""
    offset = part.stat().st_size if part.exists() else 0
    version = _if_range(part).read_text() if offset and _if_range(part).exists() else None
    _source_record(part).unlink(missing_ok=True)  # bytes from here on are not the folder's file
    try:
        response = _open(url, offset, auth, timeout, name, version)
    except _RangeNotSatisfiable as e:
        if e.total == offset:           # a previous run got every byte but stopped before the rename
            return True
        _drop_part(part)
        raise _Retryable(f"the part holds {offset} bytes but the file has {e.total}; starting over") from None
    with response:
        if response.status == 206 and version and _version(response) not in (None, version):
            _drop_part(part)  # a server that ignored If-Range but names the version it sent
            raise _Retryable("the file changed on the server since the part was fetched; starting over")
        start, total = _content_range(response, offset, name, version)
        if start == 0:
            # The old bytes go before the new version is recorded: a stop here (a full disk) must
            # not leave them under it for the next run to resume from.
            _drop_part(part)
            _keep_version(part, response)
        free = shutil.disk_usage(part.parent).free
        if total is not None and total - start + (total if unpack else 0) > free:
            then = " and unpack" if unpack else ""
            raise NotEnoughSpace(f"{name}: {_gb(total - start)} still to fetch{then} ({_gb(total)}), "
                                 f"{_gb(free)} free in {part.parent}")
        try:
            _write_stream(response, part, start, total, name, position, stop)
        # ssl.SSLError: a TLS record damaged on the way (an OSError, but no ConnectionError).
        except (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException, ssl.SSLError) as e:
            raise _Retryable(f"connection lost ({e.__class__.__name__})") from None
        # http.client raises IncompleteRead on a chunked body cut short
        return total is not None or bool(getattr(response, "chunked", False))


def _if_range(part: Path) -> Path:
    return part.with_name(part.name + ".if-range")


def _version(response) -> str | None:
    """Which version of the file the response holds: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")


def _keep_version(part: Path, response) -> None:
    """Record which version of the file the part holds."""
    version = _version(response)
    if version:
        _if_range(part).write_text(version)
    else:
        _if_range(part).unlink(missing_ok=True)


def _drop_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _if_range(part).unlink(missing_ok=True)
    _source_record(part).unlink(missing_ok=True)


def _open(url: str, offset: int, auth, timeout: float, name: str, version: str | None = None):
    """The response for ``url`` from byte ``offset`` (only if the file is still ``version``),
    answering a 401 with ``auth`` once."""
    request = urllib.request.Request(url, headers={"User-Agent": f"agepipe/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
        if version:
            request.add_header("If-Range", version)
    sent_auth = False
    while True:
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 401 and auth and not sent_auth:
                token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
                if _may_send_auth(e.geturl(), url):
                    # Sent to the URL that asks: a redirect to it (http -> https) would drop them.
                    request.full_url = e.geturl()
                # Unredirected: a redirect to another host does not carry the credentials.
                request.add_unredirected_header("Authorization", f"Basic {token}")
                sent_auth = True
                continue
            if e.code == 416 and offset:
                total = (e.headers.get("Content-Range") or "").rpartition("/")[2].strip()
                raise _RangeNotSatisfiable(int(total) if total.isdigit() else None) from None
            if e.code == 401:
                why = "credentials refused" if sent_auth else "the server asks for credentials"
                if sent_auth and not _may_send_auth(e.geturl(), url):
                    why = (f"{e.geturl()}, where the server redirects, asks for credentials, which agepipe "
                           f"sends only to {urllib.parse.urlsplit(url).hostname} (over https if asked)")
                raise DownloadError(f"{name}: {url}: HTTP 401, {why}") from None
            if e.code in (408, 429) or e.code >= 500:
                raise _Retryable(f"HTTP {e.code} {e.reason}") from None
            raise DownloadError(f"{name}: {url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError, socket.timeout) as e:
            reason = getattr(e, "reason", None)
            if isinstance(reason, socket.gaierror) and reason.errno in _NO_SUCH_HOST:
                # A name that does not resolve will not resolve in a minute either.
                raise DownloadError(f"{name}: {url}: no such host ({reason.strerror})") from None
            if isinstance(reason, (FileNotFoundError, IsADirectoryError, PermissionError)):  # a file:// URL
                raise DownloadError(f"{name}: {url}: {reason.strerror}") from None
            raise _Retryable(f"{e.__class__.__name__}: {getattr(e, 'reason', e)}") from None


def _may_send_auth(asked: str, url: str) -> bool:
    """Credentials for ``url`` go to a URL that asks for them on the same host, never over plain
    http when https was asked for."""
    asked_at, wanted = urllib.parse.urlsplit(asked), urllib.parse.urlsplit(url)
    return asked_at.hostname == wanted.hostname and (asked_at.scheme, wanted.scheme) != ("http", "https")


def _content_range(response, offset: int, name: str, version: str | None = None) -> tuple[int, int | None]:
    """(the first byte the body holds, the file's size or None)."""
    if response.status == 206:
        spec = response.headers.get("Content-Range", "")
        try:
            first_last, _, total = spec.removeprefix("bytes ").partition("/")
            first = int(first_last.partition("-")[0])
            size = None if total.strip() == "*" else int(total)
        except ValueError:
            raise _Retryable(f"unreadable Content-Range {spec!r}") from None
        if first > offset:
            raise _Retryable(f"asked for byte {offset}, got bytes from {first}")
        return first, size
    # A server without Range support (python -m http.server) answers 200 with the same version.
    if offset and version and _version(response) != version:
        log.warning("%s: the file changed on the server since the part was fetched; fetching it again "
                    "from the first byte", name)
    elif offset:
        log.warning("%s: the server ignored the Range request; fetching again from the first byte", name)
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def _write_stream(stream, part: Path, start: int, total: int | None, name: str, position: int,
                  stop: threading.Event) -> None:
    """Write ``stream`` into ``part`` from byte ``start``; a short body is a retryable failure."""
    written = start
    with open(part, "r+b" if part.exists() else "wb") as out, \
            tqdm(total=total, initial=start, desc=name, position=position, unit="B",
                 unit_scale=True, unit_divisor=1024, leave=False, disable=None) as bar:
        out.truncate(start)
        out.seek(start)
        # read1 returns what has arrived: on a slow link Ctrl-C is not held up by a full chunk.
        read = getattr(stream, "read1", stream.read)
        while chunk := read(CHUNK):
            _check(stop)
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if total is not None and written < total:
        raise _Retryable(f"connection closed at byte {written} of {total}")


# --- verification ---------------------------------------------------------------------------

_records_lock = threading.Lock()


def _verify(f: RemoteFile, path: Path, dest_dir: Path, where, fresh: bool, position: int = 0,
            stop: threading.Event | None = None) -> None:
    check_md5 = fresh and f.unverified_md5 is not None
    sha256, md5 = _hash(path, check_md5, position, stop)
    if f.sha256:
        expected, what = f.sha256.lower(), "the known sha256"
    else:
        with _records_lock:
            records = _read_checksums(dest_dir / CHECKSUMS_FILE)
            record = records.get(f.name)
            if record is None:
                records[f.name] = record = {
                    "sha256": sha256, "size": path.stat().st_size, "source": str(where),
                    "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                _write_json(dest_dir / CHECKSUMS_FILE, records)
        expected = record["sha256"]
        what = f"the sha256 recorded on first download ({dest_dir / CHECKSUMS_FILE}, {record.get('recorded_at')})"
    if sha256 != expected:
        if fresh:
            path.unlink()
            raise ChecksumError(f"{f.name} from {where}: sha256 {sha256} does not match {what} {expected}; "
                                "the download was deleted")
        raise ChecksumError(f"{path}: sha256 {sha256} does not match {what} {expected}; "
                            "the file changed on disk: delete it to fetch it again")
    if check_md5 and md5 != f.unverified_md5.lower():
        log.warning("%s: md5 %s differs from %s, which a third party lists (unverified); "
                    "the sha256 is recorded and checked from now on", f.name, md5, f.unverified_md5)


def forget(f: RemoteFile, dest_dir: Path) -> None:
    """Drop a damaged copy and its sha256 recorded on first use, so a whole copy is not refused
    against it (a truncated download from a --source folder would be, forever)."""
    with _records_lock:
        records = _read_checksums(dest_dir / CHECKSUMS_FILE)
        if records.pop(f.name, None) is not None:
            _write_json(dest_dir / CHECKSUMS_FILE, records)
    (dest_dir / f.name).unlink(missing_ok=True)


def _hash(path: Path, with_md5: bool, position: int, stop: threading.Event | None) -> tuple[str, str | None]:
    sha256 = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
    with open(path, "rb") as stream, tqdm(total=path.stat().st_size, desc=f"{path.name} sha256", unit="B",
                                          position=position, unit_scale=True, unit_divisor=1024, leave=False,
                                          disable=None) as bar:
        while chunk := stream.read(CHUNK * 4):
            _check(stop)
            sha256.update(chunk)
            if md5 is not None:
                md5.update(chunk)
            bar.update(len(chunk))
    return sha256.hexdigest(), md5.hexdigest() if md5 is not None else None


# --- extraction -----------------------------------------------------------------------------

# Real pax and long-name headers hold a path or two: a few hundred bytes.
MAX_HEADER_BYTES = 1 << 20
_EXTENDED_HEADERS = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                     tarfile.GNUTYPE_LONGLINK}
_FILTER_ERROR = getattr(tarfile, "FilterError", ())     # () catches nothing on older Pythons
_DAMAGED = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


class _EndChecked(tarfile.TarInfo):
    """tarfile takes a missing, short or unreadable header for the archive's end, as it does
    the end-of-archive zero block: a copy cut where a member starts would unpack as whole.
    It also reads a pax or GNU long-name header whole into memory: those are bounded."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if tar.offset == 0:
                raise       # not a tar at all: tarfile.open goes on to try the compressed formats
            raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset} ({e})") from None

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        info = super().frombuf(buf, encoding, errors)
        if info.type in _EXTENDED_HEADERS and info.size > MAX_HEADER_BYTES:
            raise tarfile.InvalidHeaderError(f"an extended header of {info.size} bytes, over the "
                                             f"{MAX_HEADER_BYTES} one may have")
        return info


def _extract_members(archive: Path, work: Path, protected: set[str], stop: threading.Event | None,
                     position: int) -> int:
    root = os.path.realpath(work)
    # Python's own "data" filter (3.12, backported to 3.10.12/3.11.4) is a second line of defence.
    data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        tar = tarfile.open(archive, "r:*", tarinfo=_EndChecked)
    except (tarfile.TarError, OSError) as e:
        raise DamagedArchive(f"{archive}: not a readable tar archive ({e})") from None
    count = 0
    resolved: dict[str, str] = {}
    with tar, tqdm(desc=f"{archive.name} unpack", unit=" files", position=position, leave=False,
                   disable=None) as bar:
        try:
            while (member := tar.next()) is not None:
                _check(stop)
                _check_member(member, root, archive, resolved, protected)
                try:
                    # Folder modes are left alone: a read-only folder would refuse its own files.
                    tar.extract(member, work, set_attrs=not member.isdir(), **data_filter)
                except _FILTER_ERROR as e:
                    raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r}: {e}") from None
                if member.islnk() and not os.path.lexists(os.path.join(work, member.name)):
                    # A file system without hard links (exFAT): tarfile would copy the target from
                    # the member list emptied below, and skips the member without a word when it cannot.
                    shutil.copyfile(os.path.join(work, member.linkname), os.path.join(work, member.name))
                tar.members.clear()     # 460k TarInfo objects are memory nobody reads again
                count += 1
                bar.update()
        except _DAMAGED as e:
            raise DamagedArchive(f"{archive}: damaged archive after {count} members "
                                f"({e.__class__.__name__}: {e})") from None
    _check_links(archive, root)
    return count


def _check_links(archive: Path, root: str) -> None:
    """Every link, now that all are unpacked, resolves inside ``root``: a link that was inside
    when written (``b -> d/..``) can leave through one written later (``d -> .``)."""
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not _inside(os.path.realpath(path), root):
                rel = os.path.relpath(path, root)
                raise UnsafeArchiveError(f"{archive}: refusing member {rel!r}: its chain of symbolic links "
                                         "leaves the target folder; nothing was unpacked")


def _check_member(member: tarfile.TarInfo, root: str, archive: Path, resolved: dict[str, str],
                  protected: set[str]) -> None:
    """Refuse a member that could write outside ``root``. ``resolved`` caches folders' real
    paths; only a symbolic link can change them, so unpacking one empties the cache."""
    def refuse(why: str):
        raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r}: {why}; nothing was unpacked")

    name = member.name
    why = escapes(name)
    if why:
        refuse(why)
    top = next((p for p in parts(name) if p not in ("", ".")), "")
    if top.startswith(".") or top in protected:
        # The target's bookkeeping (.checksums.json, markers, temporaries) and verified files
        # (fold files, the archives) are never replaced by an archive's member.
        refuse(f"it would replace the target's own file {top!r}")
    if member.isdev():
        refuse("device file or FIFO")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        refuse(f"unsupported member type {member.type!r}")
    dest = os.path.join(root, name)
    # Resolved on disk: a link unpacked earlier could otherwise carry a later member outside.
    folder = os.path.dirname(dest)
    if folder not in resolved:
        resolved[folder] = os.path.realpath(folder)
    real = os.path.realpath(dest) if os.path.islink(dest) else \
        os.path.join(resolved[folder], os.path.basename(dest))
    if not _inside(real, root):
        refuse("it would land outside the target folder")
    if member.issym():
        resolved.clear()
        link = member.linkname
        if not link or escapes(link) == "absolute path":
            refuse(f"symbolic link to the absolute path {link!r}")
        if not _inside(os.path.realpath(os.path.join(os.path.dirname(dest), link)), root):
            refuse(f"symbolic link to {link!r} leaves the target folder")
    if member.islnk():
        link = member.linkname
        if escapes(link) or not _inside(os.path.realpath(os.path.join(root, link)), root):
            refuse(f"hard link to {link!r} leaves the target folder")
        if not os.path.lexists(os.path.join(root, link)):  # tarfile would look for it in a list we empty
            refuse(f"hard link to {link!r}, which no member before it unpacked")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


# --- small file helpers ---------------------------------------------------------------------

def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_checksums(path: Path) -> dict:
    """The recorded checksums; a damaged record is an error, never read as empty (rewriting it
    would drop every other file's checksum)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError, OSError) as e:
        data = e
    if not isinstance(data, dict) or not all(isinstance(r, dict) and isinstance(r.get("sha256"), str)
                                             for r in data.values()):
        raise ChecksumError(f"{path}: damaged ({data if isinstance(data, Exception) else 'not a map of file to sha256'}); "
                            "it records the sha256 of every file fetched here, so it is left as it is: "
                            "restore it, or delete it to record the files' checksums anew")
    return data
