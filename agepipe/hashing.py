"""The sha256 of a file, remembered while the file is unchanged (same size and mtime): model files
are checked on every worker start, a manifest on every training that reads its store."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
