"""A full disk, imported by the client and preloaded by its workers (DASK_DISTRIBUTED__WORKER__PRELOAD):
while the file $AGEPIPE_FULL_DISK exists, every atomic write into the store of a file whose name
holds the text that file holds fails with ENOSPC, its temporary half written, as a full disk does."""
import contextlib
import errno
import os

from agepipe.features import store

_open_atomic = store.open_atomic


@contextlib.contextmanager
def open_atomic(fs, path, mode):
    flag = os.environ["AGEPIPE_FULL_DISK"]
    with _open_atomic(fs, path, mode) as f:
        if os.path.exists(flag) and open(flag).read() in path.rsplit("/", 1)[-1]:
            f.write(b"PAR1 half a file" if "b" in mode else "{")
            raise OSError(errno.ENOSPC, "No space left on device")
        yield f


store.open_atomic = open_atomic
