"""The datasets agepipe knows, and `prepare`, the one call that turns one into a manifest.

Architecture, in the img2dataset way: ``download.py`` gets files (resume, verify, safe unpack) and
knows nothing about faces; each dataset module (``adience.py``, ``imdb_wiki.py``) knows its
files and how its metadata becomes manifest rows; ``manifest.py`` holds what they share (age
classes, folds, the Parquet writer, the summary). A ``Dataset`` ties one of each together, and
``REGISTRY`` maps the names users type to them: adding a dataset is one module and one entry.

    prepare(name, data_dir, source=None, workers=4, extract=True) -> Path | None
        fetches DATA/<name>/'s files, unpacks them, writes DATA/<name>/manifest.parquet.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd

from agepipe.atomic import cannot_write, only_writer
from agepipe.datasets import adience, imdb_wiki, sample
from agepipe.download import DownloadError, RemoteFile, fetch, forget
from agepipe.datasets.manifest import MetadataError, manifest_path, write_manifest


@dataclass(frozen=True)
class Dataset:
    name: str                                       # also its folder: DATA/<name>/
    files: tuple[RemoteFile, ...]
    build_manifest: Callable[[Path], pd.DataFrame]  # DATA/<name> -> manifest rows
    auth: tuple[str, str] | None = None             # HTTP basic auth, answered when asked
    published_rows: dict[int, int] | int | None = None   # per fold, or in all, for the summary
    default_source: Callable[[Path], str] | None = None  # DATA/<name> -> a local source, when no URL serves it


REGISTRY: dict[str, Dataset] = {
    "adience": Dataset("adience", adience.FILES, adience.build_manifest, auth=adience.AUTH,
                       published_rows=adience.PUBLISHED_ROWS),
    **{name: Dataset(name, imdb_wiki.files(name), partial(imdb_wiki.build_manifest, name=name),
                     published_rows=imdb_wiki.PUBLISHED_ROWS[name])
       for name in imdb_wiki.NAMES},
    "sample": Dataset("sample", sample.files(), sample.build_manifest, default_source=sample.local_source),
}
GROUPS = {"imdb-wiki": ("imdb", "wiki")}


def expand_groups(names) -> list[str]:
    """Each group ("imdb-wiki") replaced by its datasets; any other name kept as it is (a
    manifest or a store may hold datasets agepipe does not download)."""
    return [n for name in names for n in GROUPS.get(name, (name,))]


def expand(choice: str) -> list[str]:
    """The dataset names a user's choice stands for ("imdb-wiki" is both), all known ones."""
    names = expand_groups([choice])
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown dataset {unknown[0]!r}; known: {', '.join(choices())}")
    return names


def choices() -> list[str]:
    return sorted(REGISTRY) + sorted(GROUPS)


def prepare(name: str, data_dir: str | Path, source: str | None = None, workers: int = 4,
            extract: bool = True, **fetch_options) -> tuple[Path, pd.DataFrame] | None:
    """Fetch, verify and unpack dataset ``name`` into DATA/<name>/ and write its manifest.
    Returns (manifest path, manifest rows), or None when ``extract`` is False (files only).
    Metadata that cannot be read (MetadataError) also removes the previous run's manifest."""
    dataset = REGISTRY[name]
    root = Path(data_dir).expanduser() / name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{cannot_write(root, e)}; `agepipe download` writes the dataset there: make "
                            "--data-dir writable, or give another") from None
    # Two at once would write one NAME.part and remove each other's unfinished extraction.
    with only_writer(root, "download"):
        if source is None and dataset.default_source is not None:
            source = dataset.default_source(root)
        fetch(list(dataset.files), root, source=source, auth=dataset.auth, workers=workers,
              extract=extract, **fetch_options)
        if not extract:
            return None
        try:
            frame = dataset.build_manifest(root)
        except MetadataError as e:
            raise _drop_stale_manifest(manifest_path(data_dir, name), _forget_wrong_file(dataset, root, e)) from None
        try:
            return write_manifest(frame, manifest_path(data_dir, name)), frame
        except OSError as e:    # a disk the unpacked photos filled: said after every file is in place
            raise DownloadError(f"{cannot_write(manifest_path(data_dir, name), e)}; the dataset's files are "
                                "in place: rerun `agepipe download` once it can be written") from None


def _drop_stale_manifest(path: Path, error: MetadataError) -> MetadataError:
    """The previous run's manifest no longer describes the metadata on disk: kept, `agepipe
    extract` would go on reading its rows as the dataset's. Without it, extract asks for a
    download."""
    try:
        path.unlink()
    except FileNotFoundError:
        return error
    return MetadataError(f"{error}; removed {path}, built from the earlier metadata, so nothing is "
                         "extracted from it", error.path)


def _forget_wrong_file(dataset: Dataset, root: Path, error: MetadataError) -> MetadataError:
    """A fetched metadata file that is no such file (a login page served as the file) goes,
    with the sha256 recorded on its first download: kept, every rerun would trust it."""
    wrong = [f for f in dataset.files if error.path == root / f.name and not f.sha256]
    if not wrong:
        return error
    forget(wrong[0], root)
    return MetadataError(f"{error}; deleted it and the sha256 recorded for it: give the right "
                         f"{wrong[0].name} and rerun", error.path)
