"""Decoding a batch's photos into the device pipeline's host slots, by threads or by processes.

Per photo: read_photo, cv2's letterbox into the slot's uint8 canvas, the decoded pixels into the
slot's flat byte buffer (at an offset claimed under a lock), and the photo's numbers into its meta
row. A photo that fails gets its status; one whose pixels do not fit the flat buffer comes back
as an overflow for the pipeline to place.

Threads are the simple choice, but they share the worker's GIL with the thread that launches the
device's work: each decoded photo takes and drops the GIL dozens of times between OpenCV calls,
and with 16 decode threads the launching thread queues behind them for every kernel it issues
(bench/decoders_bench.py measures the launcher's rate beside either kind). Processes share
nothing with it but memory: the slots live in shared memory, registered as pinned with CUDA, and
only a few small messages per batch cross the pipes. A photo that crashes a decoder process (a
codec bug, the kernel's OOM killer), or keeps it longer than PHOTO_TIMEOUT_S (a codec spinning on
a pathological file: the process is killed), costs that photo, a worker_lost row (transient, as on
the CPU path: --retry-failed tries it again); the process is replaced and the batch goes on.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from typing import TYPE_CHECKING

import zlib

import cv2
import numpy as np

from agepipe.features.detect import letterbox_size
from agepipe.features.images import ImageError, read_photo

if TYPE_CHECKING:
    import torch

META = 9  # offset, height, width, letterbox scale, photo scale, face hint x1 y1 x2 y2
# a photo's status in the slot: 0 not decoded yet, then these
STATUSES = ("", "ok", "overflow", "crashed", "missing_image", "not_a_file", "too_large", "read_error", "decode_error")
OK, OVERFLOW, CRASHED = 1, 2, 3
# A batch's photos laid end to end: a first guess; the buffer grows when a batch needs more.
BYTES_PER_PHOTO = 1 << 20
DECODERS = ("threads", "processes")
# A decode process on one photo longer than this is stuck (a codec spinning on a pathological file,
# which would hold the run for good): killed, and the photo counted as one that crashed it.
PHOTO_TIMEOUT_S = 120.0


def letterbox_into(image: np.ndarray, canvas: np.ndarray) -> float:
    """detect.letterbox written into an existing (H, W, 3) canvas; returns the scale."""
    new_h, new_w = letterbox_size(image.shape, (canvas.shape[1], canvas.shape[0]))
    view = canvas[:new_h, :new_w]
    resized = cv2.resize(image, (new_w, new_h), dst=view)  # straight into the canvas: no 1 MB temporary
    if resized.ctypes.data != view.ctypes.data:  # an OpenCV that would not write a strided dst
        view[...] = resized
    canvas[new_h:] = 0
    canvas[:new_h, new_w:] = 0
    return new_h / image.shape[0]


def decode_into(path: str, hint, canvas: np.ndarray, meta: np.ndarray, flat: np.ndarray, claim):
    """One photo into its canvas and meta row, its pixels into ``flat`` at the offset ``claim(nbytes)``
    returns. Returns (status code, the pixels when they did not fit ``flat``, else None)."""
    try:
        photo = read_photo(path)
    except ImageError as e:
        return STATUSES.index(e.status), None
    pixels = photo.pixels
    meta[3] = letterbox_into(pixels, canvas)
    meta[1:3] = pixels.shape[:2]
    meta[4] = photo.scale
    meta[5:9] = np.nan if hint is None else np.asarray(hint, np.float32) / photo.scale  # as extract's CPU path
    offset = claim(pixels.size)
    meta[0] = offset
    if offset + pixels.size > len(flat):
        return OVERFLOW, pixels
    flat[offset:offset + pixels.size] = pixels.reshape(-1)
    return OK, None


def decode_share(paths: list[str], hints: list, views, flat: np.ndarray, lock, decode=decode_into,
                 starting=None) -> dict[int, np.ndarray]:
    """One decoder's share of a batch: the next photo from the slot's counter, taken under
    ``lock``, until none is left (the other decoders take theirs meanwhile). ``views``: the slot's
    (meta, counters, status, canvas); ``starting(j)`` is told each photo before it is decoded.
    Returns the pixels of the photos that did not fit ``flat``."""
    meta, counters, status, canvas = views

    def claim(nbytes):
        with lock:
            offset = int(counters[1])
            counters[1] += nbytes
        return offset

    overflow = {}
    while True:
        with lock:
            j = int(counters[0])
            counters[0] += 1
        if j >= len(paths):
            return overflow
        if starting is not None:
            starting(j)
        status[j], pixels = decode(paths[j], hints[j], canvas[j], meta[j], flat, claim)
        if pixels is not None:
            overflow[j] = pixels


def slot_views(buf: np.ndarray, batch: int, height: int, width: int):
    """(meta, counters, status, canvas) laid out in one uint8 buffer (8-byte fields first)."""
    meta = buf[:batch * META * 8].view(np.float64).reshape(batch, META)
    at = batch * META * 8
    counters = buf[at:at + 16].view(np.int64)
    status = buf[at + 16:at + 16 + batch].view(np.int8)
    at += 16 + batch
    return meta, counters, status, buf[at:at + batch * height * width * 3].reshape(batch, height, width, 3)


def slot_bytes(batch: int, height: int, width: int) -> int:
    return batch * META * 8 + 16 + batch + batch * height * width * 3


class HostSlot:
    """One half of the device pipeline's double buffer on the host: canvas (B, H, W, 3) uint8,
    meta (B, META) float64, status (B,) int8, flat pixels, and two counters (next photo, bytes
    used). In shared memory when processes decode into it; pinned (registered) for CUDA copies."""

    def __init__(self, batch: int, size: tuple[int, int], pin: bool, shared: bool, flat_bytes: int | None = None):
        self.batch, self.size, self.pin, self.shared = batch, size, pin, shared
        self._segments: dict[str, shared_memory.SharedMemory] = {}
        self._registered: dict[str, int] = {}  # segment name -> address pinned with cudaHostRegister
        try:  # a segment made before /dev/shm ran out must not outlive the error (GBs at batch 256)
            self.name, buf = self._allocate(slot_bytes(batch, size[1], size[0]))
            self.views = slot_views(buf.numpy(), batch, size[1], size[0])
            self.meta_np, self.counters_np, self.status_np, self.canvas_np = self.views
            import torch  # here, not at the top: the decode processes import this module and need no torch

            self.meta, self.canvas = torch.from_numpy(self.meta_np), torch.from_numpy(self.canvas_np)
            self.flat_name, self.flat = self._allocate(flat_bytes or batch * BYTES_PER_PHOTO)
            self.flat_np = self.flat.numpy()
        except BaseException:
            self.close()
            raise

    def _allocate(self, nbytes: int) -> tuple[str | None, torch.Tensor]:
        import torch

        if not self.shared:
            return None, torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        check_shm_space(nbytes)
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self._segments[shm.name] = shm
        tensor = torch.frombuffer(shm.buf, dtype=torch.uint8)
        if self.pin:  # so copies to the device are asynchronous DMA, as from pin_memory=True
            error = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0))
            if error == 0:
                self._registered[shm.name] = tensor.data_ptr()
            else:  # still correct, but each copy to the device then waits for the host
                clear_cuda_error()
                warnings.warn(f"shared memory not pinned for CUDA (cudaHostRegister error {error}): "
                              "copies to the GPU will be synchronous", stacklevel=2)
        return shm.name, tensor

    def reset(self):
        self.status_np[:] = 0
        self.counters_np[:] = 0

    def grow(self, nbytes: int):
        """A flat buffer of at least ``nbytes``, keeping what the decoders already wrote."""
        name, bigger = self._allocate(max(nbytes, 2 * len(self.flat)))
        bigger[:len(self.flat)] = self.flat
        old = self.flat_name
        self.flat_name, self.flat, self.flat_np = name, bigger, bigger.numpy()
        if old is not None:
            self._release(old)

    def _release(self, name: str):
        shm = self._segments.pop(name)
        if name in self._registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self._registered.pop(name))
        shm.unlink()  # decoders that still map it keep their mapping until they move on
        close_segment(shm)

    def close(self):
        self.canvas = self.meta = self.flat = None
        self.views = self.canvas_np = self.meta_np = self.status_np = self.counters_np = self.flat_np = None
        for name in list(self._segments):
            self._release(name)


def clear_cuda_error():
    """Take the error a failed CUDA runtime call (cudaHostRegister) left behind. The runtime keeps
    it as this thread's last error, and torch checks every kernel launch with cudaGetLastError, so
    the next kernel launched, any kernel, would raise it as its own. A launch here takes it
    (cudaGetLastError also resets it)."""
    import torch

    with contextlib.suppress(RuntimeError):  # torch.AcceleratorError is a RuntimeError
        torch.ones(1, device="cuda")


def close_segment(shm: shared_memory.SharedMemory):
    """Close a segment whose buffer torch or numpy may still view (then the mapping stays until
    they are gone; the name is already unlinked, so nothing is left behind)."""
    try:
        shm.close()
    except BufferError:
        pass


def check_shm_space(nbytes: int, where: str = "/dev/shm"):
    """Shared memory is a tmpfs: a container's default 64 MB would kill the decoders with SIGBUS
    on their first large write, so the space is checked before it is used."""
    try:
        stat = os.statvfs(where)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if free < nbytes:
        raise MemoryError(f"{where} has {free / 2**20:.0f} MiB free, the decode processes need "
                          f"{nbytes / 2**20:.0f} MiB more (in a container: --shm-size); or decode with threads")


class _Pending:
    """A batch being decoded: the slot, its paths, and the photos that did not fit its flat buffer."""

    def __init__(self, slot: HostSlot, paths: list[str]):
        self.slot, self.paths = slot, paths
        self.overflow: dict[int, np.ndarray] = {}
        self.digests: dict[int, int] = {}  # of the overflow's pixels as a decode process decoded them


def pixels_digest(pixels: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(pixels)).cast("B"), zlib.crc32(repr(pixels.shape).encode()))


class ThreadDecoders:
    """Decoding by a pool of threads in this process (each thread takes the next photo)."""

    def __init__(self, n: int, slots: list[HostSlot]):
        self.n = max(1, n)
        self.pool = ThreadPoolExecutor(self.n, thread_name_prefix="decode")
        self.locks = {id(s): threading.Lock() for s in slots}

    def submit(self, slot: HostSlot, paths: list[str], hints: list) -> _Pending:
        slot.reset()
        pending, lock = _Pending(slot, paths), self.locks[id(slot)]

        def work():
            pending.overflow.update(decode_share(paths, hints, slot.views, slot.flat_np, lock))

        pending.futures = [self.pool.submit(work) for _ in range(min(self.n, len(paths)))]
        return pending

    def wait(self, pending: _Pending):
        concurrent.futures.wait(pending.futures)  # all of them, before one raises: none left writing the slot
        for f in pending.futures:
            f.result()

    def close(self):
        self.pool.shutdown()


def _next_task(tasks, parent: int):
    """The next task, or None to stop: when told to, or when the pipeline's process is gone (killed,
    it cannot say so; this process holds the queue's pipe open itself, so it would wait forever)."""
    import queue

    while True:
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _decoder_main(index: int, tasks, replies, slot_names: list[str], geometry: tuple[int, int, int],
                  locks: list, current_name: str, decode, parent: int):
    """A decode process: attaches the slots, then decodes the photos of each batch it is sent,
    taking the next one from the slot's shared counter until none is left."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker or the client answers Ctrl-C
    cv2.setNumThreads(1)  # one decode per process; OpenCV's own threads would only compete
    batch, h, w = geometry
    slots = []
    for name in slot_names:
        shm = shared_memory.SharedMemory(name=name)
        slots.append((shm, *slot_views(np.ndarray(shm.size, np.uint8, shm.buf), batch, h, w)))
    current_shm = shared_memory.SharedMemory(name=current_name)
    state = np.ndarray(current_shm.size // 8, np.int64, current_shm.buf)
    current, since = state[0::2], state[1::2]  # per process: its photo, and when it started it
    flats: dict[int, tuple[str, shared_memory.SharedMemory]] = {}
    while (task := _next_task(tasks, parent)) is not None:
        s, flat_name, seq, paths, hints = task
        if s not in flats or flats[s][0] != flat_name:
            if s in flats:
                flats[s][1].close()
            flats[s] = (flat_name, shared_memory.SharedMemory(name=flat_name))
        flat = np.ndarray(flats[s][1].size, np.uint8, flats[s][1].buf)

        def starting(j, s=s):
            since[index] = time.monotonic_ns()  # first: the pipeline must not see the photo with the last one's time
            current[index] = s * batch + j  # if this process dies now, this photo did it

        try:  # photos that overflow are placed by the pipeline, which decodes them again: their digests
            # say if it got the same pixels (the pixels themselves, MBs through a pipe, could be cut off
            # by a decoder that dies on its next photo, and the pipeline wait forever for the rest)
            overflow = decode_share(paths, hints, slots[s][1:], flat, locks[s], decode, starting)
            current[index] = -1
            replies.put((index, seq, None, {j: pixels_digest(p) for j, p in overflow.items()}))
        except BaseException:  # a bug, not a photo: the pipeline raises it
            current[index] = -1
            replies.put((index, seq, traceback.format_exc(), {}))
        del flat
    if os.getppid() != parent:  # the pipeline was killed: its segments (GBs in RAM) are left to its decoders
        for shm in [slot[0] for slot in slots] + [current_shm] + [shm for _, shm in flats.values()]:
            with contextlib.suppress(FileNotFoundError):  # another decoder's already
                shm.unlink()


class ProcessDecoders:
    """Decoding by a pool of processes (spawned: a CUDA process must not fork) into shared slots."""

    def __init__(self, n: int, slots: list[HostSlot], decode=decode_into, photo_timeout_s: float = PHOTO_TIMEOUT_S):
        self.n, self.slots, self.decode = max(1, n), slots, decode  # decode: a module-level function
        self.photo_timeout_s = photo_timeout_s
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list = [None] * self.n
        self.tasks: list = [None] * self.n
        self.replies = None
        self.seq = itertools.count()
        self.inflight: dict[int, _Pending] = {}
        self.current_shm = shared_memory.SharedMemory(create=True, size=16 * self.n)
        try:  # all or nothing: a process that would not start must not leave the others, or the segment, behind
            state = np.ndarray(2 * self.n, np.int64, self.current_shm.buf)
            self.current, self.since = state[0::2], state[1::2]  # as _decoder_main sees them
            self._start_all()
        except BaseException:
            self.close(grace=0)
            raise

    def _start_all(self):
        # new locks and replies queue: a process killed while it held one would block the others
        self.locks = [self.ctx.Lock() for _ in self.slots]
        self.replies = self.ctx.Queue()
        self.current[:] = -1
        for i in range(self.n):
            self._start(i)

    def _start(self, i: int):
        if self.tasks[i] is not None:  # its reader is gone: nothing to flush at exit
            self.tasks[i].cancel_join_thread()
            self.tasks[i].close()
        self.tasks[i] = self.ctx.Queue()
        slot = self.slots[0]
        proc = self.ctx.Process(
            target=_decoder_main, name=f"agepipe-decode-{i}", daemon=True,
            args=(i, self.tasks[i], self.replies, [s.name for s in self.slots], (slot.batch, slot.size[1], slot.size[0]),
                  self.locks, self.current_shm.name, self.decode, os.getpid()))
        proc.start()
        self.procs[i] = proc  # once started: _stop can join it
        self.started = time.monotonic_ns()  # progress, for _check_progress: it has its tasks to take yet

    def submit(self, slot: HostSlot, paths: list[str], hints: list) -> _Pending:
        pending = _Pending(slot, paths)
        pending.seq = next(self.seq)
        pending.task = (self.slots.index(slot), slot.flat_name, pending.seq, list(paths),
                        [None if h is None else tuple(map(float, h)) for h in hints])
        self.inflight[pending.seq] = pending
        self._send(pending)
        return pending

    def _send(self, pending: _Pending):
        """The batch to every decoder, from its first photo."""
        pending.slot.reset()
        pending.digests.clear()
        pending.waiting = set(range(self.n))
        for i in range(self.n):
            self.tasks[i].put(pending.task)

    def wait(self, pending: _Pending):
        """Until every decoder has finished the batch. A decoder that died, or was killed for being on
        one photo longer than ``photo_timeout_s``, is replaced: the photo it was on is marked crashed,
        and the replacement joins the batches it had not finished. A wait that raises abandons its
        batch: every decoder is killed and started afresh (one still on it would write its old photos
        into the next batch the slot holds), the other batches in flight are sent to them again, and
        a later wait for the abandoned batch returns at once."""
        import queue

        if pending.seq not in self.inflight:
            return
        try:
            replied = time.monotonic_ns()
            while pending.waiting:
                try:
                    index, seq, error, digests = self.replies.get(timeout=0.5)
                except queue.Empty:
                    self._replace_dead()
                    self._check_progress(replied)
                    continue
                replied = time.monotonic_ns()
                if error:
                    raise RuntimeError(f"a decode process failed:\n{error}")
                self.inflight[seq].waiting.discard(index)
                self.inflight[seq].digests.update(digests)
        except BaseException:
            del self.inflight[pending.seq]
            self._restart()
            raise
        del self.inflight[pending.seq]
        status = pending.slot.status_np[:len(pending.paths)]
        for j in np.flatnonzero(status == OVERFLOW):
            if int(j) not in pending.digests:  # its decoder died before it replied: its pixels cannot be
                status[j] = CRASHED            # checked, and unplaced its crop would sample other bytes
        for j, digest in pending.digests.items():  # decoded a moment ago
            pixels = read_photo(pending.paths[j]).pixels
            if pixels_digest(pixels) != digest:  # not what the canvas and meta were made from: the shard
                # fails, and is redone photo by photo, each decoded once
                raise ImageError("read_error", f"{pending.paths[j]}: changed while it was decoded")
            pending.overflow[j] = pixels

    def _check_progress(self, replied: int):
        """RuntimeError when no decoder has replied or started a photo for ``photo_timeout_s``: one
        killed inside a lock (a slot's, or the replies queue's) left it held, and the others wait
        on it for good on no photo, where neither a dead nor a hung decoder is seen."""
        last = max(replied, int(self.since.max()), self.started)
        if time.monotonic_ns() - last > self.photo_timeout_s * 1e9:
            raise RuntimeError(f"the decode processes stalled: no photo started and no reply in "
                               f"{self.photo_timeout_s:g} s (a lock left held by a killed decoder)")

    def _replace_dead(self):
        now = time.monotonic_ns()
        for i, proc in enumerate(self.procs):
            hung = self.current[i] >= 0 and now - self.since[i] > self.photo_timeout_s * 1e9
            if hung:
                proc.kill()
                proc.join()
            elif proc.is_alive():
                continue
            photo = int(self.current[i])  # after the kill: the photo it was on when killed
            s, j = divmod(photo, self.slots[0].batch)
            on_photo = photo >= 0 and self.slots[s].status_np[j] == 0  # else broken at start, or killed between photos
            if not on_photo:  # no photo to blame: this wait fails (and restarts every decoder)
                raise RuntimeError(f"decode process {proc.name} exited with code {proc.exitcode} outside any photo")
            self.slots[s].status_np[j] = CRASHED
            if hung:  # the row says worker_lost, as for a crash: this says why
                path = next((p.paths[j] for p in self.inflight.values() if p.slot is self.slots[s]), "a photo")
                warnings.warn(f"{path}: not decoded in {self.photo_timeout_s:g} s, its decode process was killed",
                              stacklevel=2)
            self.current[i] = -1
            self._start(i)
            for seq in sorted(self.inflight):  # tasks are taken in order; it had finished the others
                if i in self.inflight[seq].waiting:
                    self.tasks[i].put(self.inflight[seq].task)

    def _restart(self):
        """Every decoder killed and started afresh; the batches still in flight sent again."""
        self._stop(grace=0)
        self._start_all()
        for seq in sorted(self.inflight):
            self._send(self.inflight[seq])

    def _stop(self, grace: float):
        """Every decoder stopped (asked to, and given ``grace`` seconds, first) and its queues closed."""
        procs = [p for p in self.procs if p is not None]  # None: never started
        tasks = [q for q in self.tasks if q is not None]
        if grace:
            for q in tasks:
                q.put(None)
            for proc in procs:
                proc.join(timeout=grace)
        for proc in procs:
            proc.kill()
            proc.join()
        for q in tasks:
            q.cancel_join_thread()
            q.close()
        if self.replies is not None:
            self.replies.close()

    def close(self, grace: float = 5):
        self._stop(grace)
        self.current = self.since = None
        close_segment(self.current_shm)
        self.current_shm.unlink()


def default_decoders(batch: int, size: tuple[int, int]) -> str:
    """Processes where this process may start children (a Dask worker is a daemon by default; the
    clusters agepipe starts let their GPU workers have children) and /dev/shm holds two slots
    (a container's is often 64 MB), else threads, with a warning that says why."""
    if multiprocessing.current_process().daemon:
        return "threads"
    need = 2 * (slot_bytes(batch, size[1], size[0]) + batch * BYTES_PER_PHOTO)
    try:
        check_shm_space(need)
    except MemoryError as e:
        warnings.warn(f"decoding photos in threads: {e}", stacklevel=2)
        return "threads"
    return "processes"
