"""A decode function for ProcessDecoders that takes a second over any photo whose name holds
"slow" and raises, as a bug would, on any whose name holds "bug"; other photos are decoded as usual."""
import os
import time

from tests.features import raising_decoder


def decode_into(path, *args):
    if "slow" in os.path.basename(path):
        time.sleep(1)
    return raising_decoder.decode_into(path, *args)
