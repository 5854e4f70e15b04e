"""Decoding a batch into host slots: threads and processes write the same bytes and statuses;
a decoder process that dies costs the one photo it was on."""
import os

import numpy as np
import pytest

from agepipe.features import decoders
from agepipe.features.decoders import HostSlot, ProcessDecoders, ThreadDecoders
from tests.features import crashing_decoder

SIZE = (160, 160)


@pytest.fixture()
def batch_paths(photos, tmp_path):
    """Real photos and the failures a dataset holds: missing, cut off, a folder, not an image."""
    paths = [str(p) for p in photos.values()]
    (tmp_path / "cut.jpg").write_bytes(photos["obama"].read_bytes()[:3000])
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "text.jpg").write_text("not a photo")
    paths += [str(tmp_path / n) for n in ("gone.jpg", "cut.jpg", "folder.jpg", "text.jpg")]
    return paths


def decode(kind, paths, hints, flat_bytes=None, decode=decoders.decode_into):
    """Two batches through two slots, as the pipeline runs them; each batch's statuses, bytes used,
    meta, canvas and every photo's pixels as placed in flat (overflow included)."""
    slots = [HostSlot(len(paths), SIZE, pin=False, shared=kind == "processes", flat_bytes=flat_bytes)
             for _ in range(2)]
    pool = (ProcessDecoders(2, slots, decode=decode) if kind == "processes" else ThreadDecoders(2, slots))
    try:
        out = []
        pending = [pool.submit(slot, paths, hints) for slot in slots]  # both in flight at once
        for slot, p in zip(slots, pending):
            pool.wait(p)
            status = slot.status_np[:len(paths)].copy()
            pixels, overflowed = {}, int((status == decoders.OVERFLOW).sum())
            for j in np.flatnonzero(status == decoders.OK):
                offset, h, w = slot.meta_np[j, :3].astype(int)
                pixels[int(j)] = slot.flat_np[offset:offset + h * w * 3].copy()
            for j, image in p.overflow.items():
                pixels[j] = image.reshape(-1)
            status[status == decoders.OVERFLOW] = decoders.OK  # placed by the caller: decoded all the same
            out.append((status, int(slot.counters_np[1]), slot.meta_np[:len(paths)].copy(),
                        slot.canvas_np[:len(paths)].copy(), pixels, overflowed))
        return out
    finally:
        pool.close()
        for slot in slots:
            slot.close()


def test_threads_and_processes_decode_the_same(batch_paths):
    hints = [None] * len(batch_paths)
    hints[0] = (10.0, 20.0, 110.0, 140.0)
    threads, processes = decode("threads", batch_paths, hints), decode("processes", batch_paths, hints)
    names = [decoders.STATUSES[c] for c in threads[0][0]]
    assert names[-4:] == ["missing_image", "decode_error", "not_a_file", "decode_error"]
    assert set(names[:-4]) == {"ok"}
    for (ts, tused, tmeta, tcanvas, tpix, _), (ps, pused, pmeta, pcanvas, ppix, _) in zip(threads, processes):
        np.testing.assert_array_equal(ts, ps)
        assert tused == pused  # the same photos claimed the same bytes, in whatever order
        ok = ts == decoders.OK
        np.testing.assert_array_equal(tmeta[ok, 1:], pmeta[ok, 1:])  # offsets differ with the order
        np.testing.assert_array_equal(tcanvas[ok], pcanvas[ok])
        assert tpix.keys() == ppix.keys() and all((tpix[j] == ppix[j]).all() for j in tpix)
        assert tcanvas[ok].any(axis=(1, 2, 3)).all()
        np.testing.assert_allclose(tmeta[0, 5:9], np.asarray(hints[0]) / tmeta[0, 4])


@pytest.mark.parametrize("kind", decoders.DECODERS)
def test_photos_that_do_not_fit_the_flat_buffer_come_back_whole(batch_paths, kind):
    hints = [None] * len(batch_paths)
    roomy = decode(kind, batch_paths, hints)[0]
    tight = decode(kind, batch_paths, hints, flat_bytes=300_000)[0]
    assert tight[5] >= 3 and roomy[5] < tight[5]  # most photos are bigger than 300 kB
    assert all((roomy[4][j] == tight[4][j]).all() for j in roomy[4]) and roomy[4].keys() == tight[4].keys()
    assert tight[1] == roomy[1]  # the bytes the batch needs, to grow the buffer to


def test_a_photo_that_kills_its_decoder_costs_that_photo_only(photos, tmp_path):
    paths = [str(p) for p in photos.values()]
    crash = tmp_path / "crash.jpg"
    crash.write_bytes(photos["obama"].read_bytes())
    paths.insert(2, str(crash))
    results = decode("processes", paths, [None] * len(paths), decode=crashing_decoder.decode_into)
    for status, *_ in results:  # in both batches: the replacement process joined each
        names = [decoders.STATUSES[c] for c in status]
        assert names[2] == "crashed" and names.count("ok") == len(paths) - 1


def test_processes_leave_no_shared_memory_behind(batch_paths):
    """The slots' segments are unlinked on close (the locks' small semaphores go when collected)."""
    def segments():
        return {n for n in os.listdir("/dev/shm") if not n.startswith("sem.")}

    before = segments()
    decode("processes", batch_paths, [None] * len(batch_paths))
    assert segments() <= before


def test_too_little_shared_memory_is_a_clear_error(tmp_path):
    with pytest.raises(MemoryError, match="--shm-size"):
        decoders.check_shm_space(1 << 60)


def test_decoders_stop_when_their_pipeline_is_killed(tmp_path):
    """A worker killed outright cannot stop its decoders: they notice and exit by themselves."""
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent("""
        import os, sys, time
        from agepipe.features.decoders import HostSlot, ProcessDecoders
        if __name__ == "__main__":
            slots = [HostSlot(4, (64, 64), pin=False, shared=True) for _ in range(2)]
            pool = ProcessDecoders(2, slots)
            print(" ".join(str(p.pid) for p in pool.procs), flush=True)
            time.sleep(60)
    """)
    (tmp_path / "pipeline.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "pipeline.py")], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    children = [int(p) for p in proc.stdout.readline().split()]
    assert len(children) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in children)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60  # a child may still be starting
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in children)


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan is reaped by init, but maybe not at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_default_is_processes_where_they_can_run(monkeypatch):
    asked = []
    monkeypatch.setattr(decoders, "check_shm_space", asked.append)  # this machine's /dev/shm aside
    assert decoders.default_decoders(16, (640, 640)) == "processes"
    assert asked and asked[0] >= 2 * 16 * 640 * 640 * 3  # room for two slots of pixels asked for

    def no_room(nbytes, where="/dev/shm"):
        raise MemoryError(f"{where} has 64 MiB free")

    monkeypatch.setattr(decoders, "check_shm_space", no_room)
    with pytest.warns(UserWarning, match="threads: /dev/shm has 64 MiB free"):
        assert decoders.default_decoders(16, (640, 640)) == "threads"
    monkeypatch.undo()

    class Daemon:
        daemon = True

    monkeypatch.setattr(decoders.multiprocessing, "current_process", lambda: Daemon())
    assert decoders.default_decoders(16, (640, 640)) == "threads"  # may not start children


def test_a_decode_process_does_not_import_torch():
    """16 decode processes each importing torch would cost seconds and memory for nothing."""
    import subprocess
    import sys

    code = "import sys, agepipe.features.decoders; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_photo_that_changes_after_it_overflowed_is_not_taken_from_the_changed_file(photos, tmp_path):
    """A photo too big for the flat buffer is read a second time by the pipeline: a file replaced in
    between gave pixels of another shape and content than the meta and canvas the detector used (the
    row's face from one photo, its crop from another; pixels of another size overran the next photo's
    place in flat). Now the second read must give the pixels the decode process digested, or the
    batch fails (its shard is then redone photo by photo, each decoded once)."""
    from agepipe.features.images import ImageError
    from tests.features import changing_decoder

    path = tmp_path / "change.jpg"
    path.write_bytes(photos["players"].read_bytes())
    (tmp_path / "change.jpg.next").write_bytes(photos["obama"].read_bytes())
    slot = HostSlot(1, SIZE, pin=False, shared=True, flat_bytes=1000)
    pool = ProcessDecoders(1, [slot], decode=changing_decoder.decode_into)
    try:
        pending = pool.submit(slot, [str(path)], [None])
        with pytest.raises(ImageError, match="changed while it was decoded"):
            pool.wait(pending)
        assert slot.status_np[0] == decoders.OVERFLOW and not (tmp_path / "change.jpg.next").exists()
        pending = pool.submit(slot, [str(path)], [None])  # unchanged since: placed as before
        pool.wait(pending)
        np.testing.assert_array_equal(pending.overflow[0], decoders.read_photo(str(path)).pixels)
    finally:
        pool.close()
        slot.close()


def test_a_slot_cuda_would_not_pin_leaves_no_cuda_error_behind(monkeypatch):
    """cudaHostRegister can fail (a sandbox's GPU proxy, a driver that will not pin shared memory);
    the slot then warns and copies synchronously. But the runtime keeps a failed call's error as the
    thread's last error, and torch checks each kernel launch with cudaGetLastError: the pipeline's
    next kernel raised it as its own, so the fallback crashed. Stand-ins for CUDA's runtime here:
    a register that fails and leaves its error, and a kernel launch that raises a pending one."""
    import torch

    runtime = {"last_error": 0, "unregistered": 0}

    class Cudart:
        @staticmethod
        def cudaHostRegister(ptr, nbytes, flags):
            runtime["last_error"] = 712  # cudaErrorHostMemoryAlreadyRegistered, say
            return 712

        @staticmethod
        def cudaHostUnregister(ptr):
            runtime["unregistered"] += 1
            return 0

    def launch(*size, device=None, **kw):  # a kernel launch: torch's C10_CUDA_KERNEL_LAUNCH_CHECK
        error, runtime["last_error"] = runtime["last_error"], 0
        if error:
            raise RuntimeError(f"CUDA error {error}")
        return torch.empty(0)

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart)
    monkeypatch.setattr(torch, "ones", launch)
    with pytest.warns(UserWarning, match="not pinned"):
        slot = HostSlot(2, (32, 32), pin=True, shared=True)
    try:
        assert runtime["last_error"] == 0  # the pipeline's next kernel launches cleanly
        assert not slot._registered
    finally:
        slot.close()
    assert runtime["unregistered"] == 0  # nothing was registered, so nothing is unregistered


def test_a_decode_process_that_raises_is_an_error_and_its_batch_can_be_waited_out(photos, tmp_path):
    """The pipeline raises the decoder's error, then (as after any failure) waits out the batches
    still decoding, this one included: that wait must end, not wait for a reply already given."""
    import threading

    from tests.features import raising_decoder

    paths = [str(p) for p in photos.values()]
    bug = tmp_path / "bug.jpg"
    bug.write_bytes(photos["obama"].read_bytes())
    paths.insert(1, str(bug))
    slots = [HostSlot(len(paths), SIZE, pin=False, shared=True) for _ in range(2)]
    pool = ProcessDecoders(2, slots, decode=raising_decoder.decode_into)
    try:
        pending = pool.submit(slots[0], paths, [None] * len(paths))
        with pytest.raises(RuntimeError, match="a bug in decoding"):
            pool.wait(pending)
        waiter = threading.Thread(target=lambda: pool.wait(pending), daemon=True)
        waiter.start()
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "waiting out the failed batch never ended"
    finally:
        pool.close()
        for slot in slots:
            slot.close()


def test_a_decoder_killed_between_photos_fails_one_wait_not_every_later_one(photos):
    """Killed while on no photo (the OOM killer, idle): no photo to blame, so the batch's wait
    fails; the process is replaced all the same, so the batch drains and later batches (a retry,
    the worker's next shards, which reuse its pipeline) decode."""
    import signal

    paths = [str(p) for p in photos.values()]
    hints = [None] * len(paths)
    slots = [HostSlot(len(paths), SIZE, pin=False, shared=True) for _ in range(2)]
    pool = ProcessDecoders(2, slots)
    try:
        pool.wait(pool.submit(slots[0], paths, hints))  # both up, now idle
        os.kill(pool.procs[0].pid, signal.SIGKILL)
        pool.procs[0].join()
        pending = pool.submit(slots[1], paths, hints)
        with pytest.raises(RuntimeError, match="outside any photo"):
            pool.wait(pending)
        pool.wait(pending)  # drained, as the pipeline does after a failure
        pool.wait(pool.submit(slots[0], paths, hints))
        assert np.isin(slots[0].status_np[:len(paths)], (decoders.OK, decoders.OVERFLOW)).all()
    finally:
        pool.close()
        for slot in slots:
            slot.close()


def test_a_failed_wait_leaves_no_decoder_writing_a_slot(photos, tmp_path):
    """A wait that raised (here a decoder's bug) left the other decoders on its batch: the next
    batch in that slot reset the slot's counter, and they went on taking its photo indices, writing
    the old batch's pixels over the new one's (the pipeline waits a failed batch out, but a second
    error in that wait left it too). Now no decoder is on the failed batch once its wait has raised:
    the next batch in that slot, and one in flight in the other, hold their own photos only."""
    from tests.features import slow_decoder

    paths = [str(p) for p in photos.values()]
    slow = [str(tmp_path / "bug.jpg")]
    for p in paths[:-1]:
        slow.append(str(tmp_path / f"slow-{os.path.basename(p)}"))
        os.link(p, slow[-1])
    hints = [None] * len(paths)
    slots = [HostSlot(len(paths), SIZE, pin=False, shared=True, flat_bytes=1 << 26) for _ in range(2)]  # no overflow
    pool = ProcessDecoders(2, slots, decode=slow_decoder.decode_into)
    try:
        pool.wait(pool.submit(slots[0], paths, hints))  # both decoders up
        failing = pool.submit(slots[0], slow, hints)  # one decoder raises at once, the other is slow
        other = pool.submit(slots[1], paths, hints)
        with pytest.raises(RuntimeError, match="a bug in decoding"):
            pool.wait(failing)
        again = paths[::-1]  # photo j is not the failed batch's photo j
        pool.wait(pool.submit(slots[0], again, hints))
        pool.wait(other)
        for slot, expected in ((slots[0], again), (slots[1], paths)):
            assert_holds(slot, expected)
    finally:
        pool.close()
        for slot in slots:
            slot.close()


def assert_holds(slot: HostSlot, paths: list[str]):
    """The slot's canvas, meta and flat pixels are those of ``paths``, decoded in this process."""
    canvas = np.empty_like(slot.canvas_np[0])
    for j, path in enumerate(paths):
        assert slot.status_np[j] == decoders.OK
        pixels = decoders.read_photo(path).pixels
        offset, h, w = slot.meta_np[j, :3].astype(int)
        assert (h, w) == pixels.shape[:2], path
        np.testing.assert_array_equal(slot.flat_np[offset:offset + h * w * 3], pixels.reshape(-1))
        decoders.letterbox_into(pixels, canvas)
        np.testing.assert_array_equal(slot.canvas_np[j], canvas)


def test_a_pool_that_fails_to_start_leaves_nothing_behind(monkeypatch):
    """A decode process that would not start (out of processes or memory) left the ones started
    before it running, and the pool's shared segment in /dev/shm, for as long as the worker lived."""
    from multiprocessing import shared_memory

    made, started = [], []

    class Recorded(shared_memory.SharedMemory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.name)

    process = decoders.multiprocessing.get_context("spawn").Process
    real_start = process.start

    def start(self):
        if started:
            raise OSError("no more processes")
        real_start(self)
        started.append(self)

    slots = [HostSlot(4, (64, 64), pin=False, shared=True) for _ in range(2)]
    try:
        monkeypatch.setattr(shared_memory, "SharedMemory", Recorded)
        monkeypatch.setattr(process, "start", start)
        with pytest.raises(OSError, match="no more processes"):
            ProcessDecoders(3, slots)
    finally:
        monkeypatch.undo()
        for slot in slots:
            slot.close()
    assert len(started) == 1 and not alive(started[0].pid)
    assert made and not any(os.path.exists(f"/dev/shm/{name}") for name in made)


def photos_with_one_named(photos, path, at: int) -> list[str]:
    """The packaged photos with obama.jpg, linked as ``path``, at ``at``: the test decoders act on the name."""
    paths = [str(p) for p in photos.values()]
    paths.insert(at, str(path))
    os.link(photos["obama"], path)
    return paths


def wait_at_most(pool, pending, seconds: float) -> list[BaseException]:
    """pool.wait(pending) on a thread, failing the test if it has not ended in ``seconds`` (a hung
    wait would hang the suite); what it raised, if anything."""
    import threading

    errors = []

    def wait():
        try:
            pool.wait(pending)
        except BaseException as e:
            errors.append(e)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout=seconds)
    assert not waiter.is_alive(), "the batch's wait never ended"
    return errors


def test_a_photo_that_hangs_its_decoder_costs_that_photo_only(photos, tmp_path):
    """A decoder stuck in one photo (a codec spinning on a pathological file) neither replied nor
    died, so the batch's wait, and the run, never ended. Now a decoder on one photo longer than the
    limit is killed and replaced, the photo marked crashed (a worker_lost row) with a warning."""
    from tests.features import slow_decoder

    paths = photos_with_one_named(photos, tmp_path / "hang.jpg", 2)
    slot = HostSlot(len(paths), SIZE, pin=False, shared=True)
    pool = ProcessDecoders(2, [slot], decode=slow_decoder.decode_into, photo_timeout_s=3)
    try:
        pending = pool.submit(slot, paths, [None] * len(paths))
        with pytest.warns(UserWarning, match="hang.jpg: not decoded in 3 s, its decode process was killed"):
            errors = wait_at_most(pool, pending, 60)
        assert not errors
        names = [decoders.STATUSES[c] for c in slot.status_np[:len(paths)]]
        assert names[2] == "crashed" and all(n in ("ok", "overflow") for n in names[:2] + names[3:])
    finally:
        pool.close()
        slot.close()


def test_a_decoder_killed_holding_its_slots_lock_fails_the_wait_not_hangs_it(photos, tmp_path):
    """Killed inside a slot's lock (the OOM killer strikes anywhere), a decoder left the lock held:
    its replacement, and every other decoder, blocked on it for good on no photo, so neither the
    dead-process nor the hung-photo check fired and the batch's wait, and the run, never ended.
    Now a wait in which no photo started and no decoder replied for the photo limit fails (every
    decoder restarted with new locks), and the next batch decodes."""
    from tests.features import locked_decoder

    paths = photos_with_one_named(photos, tmp_path / "locked.jpg", 1)
    slot = HostSlot(len(paths), SIZE, pin=False, shared=True)
    pool = ProcessDecoders(1, [slot], decode=locked_decoder.decode_into, photo_timeout_s=3)
    try:
        errors = wait_at_most(pool, pool.submit(slot, paths, [None] * len(paths)), 60)
        assert len(errors) == 1 and "no photo started" in str(errors[0])
        fine = [p for p in paths if "locked" not in p]
        pool.wait(pool.submit(slot, fine, [None] * len(fine)))
        assert np.isin(slot.status_np[:len(fine)], (decoders.OK, decoders.OVERFLOW)).all()
    finally:
        pool.close()
        slot.close()


def test_a_killed_pipeline_leaves_no_shared_memory_behind(photos):
    """A Dask worker killed outright (the OOM killer's usual choice) could not unlink its slots: they
    stayed in /dev/shm (GBs at batch 256, in RAM) until the run's client exited, its resource tracker
    being the nanny's, and the restarted worker's slots came on top. Now its decoders, which notice
    it gone, unlink them as they exit."""
    import multiprocessing
    import signal
    import time

    from tests.features import killed_pipeline

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=killed_pipeline.main, args=(theirs, str(photos["obama"])))
    proc.start()
    try:
        assert ours.poll(120), "the pipeline did not start"
        names, children = ours.recv()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert len(names) == 5 and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (any(alive(pid) for pid in children)
                                           or any(os.path.exists(f"/dev/shm/{n}") for n in names)):
        time.sleep(0.2)
    assert not [n for n in names if os.path.exists(f"/dev/shm/{n}")]


def test_a_photo_that_overflowed_before_its_decoder_crashed_is_not_left_unplaced(photos, tmp_path):
    """A decode process tells the pipeline the digests of the photos that did not fit the flat
    buffer when it finishes its share: one that died on a later photo never told, so an overflowed
    photo had its canvas but no pixels placed in flat, and the crop was sampled from whatever bytes
    were there (an ok row with another photo's or a black face). Now such a photo is one its decoder
    was lost on (worker_lost, redone by --retry-failed)."""
    paths = [str(photos["obama"]), str(tmp_path / "crash.jpg")]
    os.link(photos["biden"], paths[1])
    slot = HostSlot(len(paths), SIZE, pin=False, shared=True, flat_bytes=1000)
    pool = ProcessDecoders(1, [slot], decode=crashing_decoder.decode_into)
    try:
        pending = pool.submit(slot, paths, [None] * len(paths))
        pool.wait(pending)
        status = slot.status_np[:len(paths)]
        assert status[1] == decoders.CRASHED
        assert all(int(j) in pending.overflow for j in np.flatnonzero(status == decoders.OVERFLOW))
        assert status[0] == decoders.CRASHED
    finally:
        pool.close()
        slot.close()
