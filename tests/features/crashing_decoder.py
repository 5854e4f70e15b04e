"""A decode function for ProcessDecoders that kills its process, as a codec bug would, on any
photo whose name holds "crash"; other photos are decoded as usual."""
import os
import signal

from agepipe.features import decoders


def decode_into(path, *args):
    if "crash" in os.path.basename(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return decoders.decode_into(path, *args)
