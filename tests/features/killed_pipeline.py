"""A device pipeline's decoders in a process of their own, for a test to kill: run as a spawned child
of the test, it shares the test's resource tracker, as a Dask worker shares its nanny's."""
import time

from agepipe.features.decoders import HostSlot, ProcessDecoders


def main(conn, photo: str):
    slots = [HostSlot(4, (64, 64), pin=False, shared=True) for _ in range(2)]
    pool = ProcessDecoders(2, slots)
    for slot in slots:  # the decoders attach each slot's flat buffer too
        pool.wait(pool.submit(slot, [photo], [None]))
    conn.send(([s.name for s in slots] + [s.flat_name for s in slots] + [pool.current_shm.name],
               [p.pid for p in pool.procs]))
    time.sleep(120)
