"""A decode function for ProcessDecoders that kills its process while it holds its slot's lock, as
the kernel's OOM killer may, on any photo whose name holds "locked"; other photos are decoded as usual."""
import os
import signal

from agepipe.features import decoders


def decode_into(path, hint, canvas, meta, flat, claim):
    if "locked" in os.path.basename(path):
        [lock] = [c.cell_contents for c in claim.__closure__ if hasattr(c.cell_contents, "acquire")]
        lock.acquire()  # as inside claim
        os.kill(os.getpid(), signal.SIGKILL)
    return decoders.decode_into(path, hint, canvas, meta, flat, claim)
