"""A decode function for ProcessDecoders that takes a second over any photo whose name holds
"slow", never ends one whose name holds "hang" (a codec spinning on a pathological file), and
raises, as a bug would, on any whose name holds "bug"; other photos are decoded as usual."""
import os
import time

from tests.features import raising_decoder


def decode_into(path, *args):
    name = os.path.basename(path)
    if "slow" in name:
        time.sleep(1)
    while "hang" in name:
        time.sleep(60)
    return raising_decoder.decode_into(path, *args)
