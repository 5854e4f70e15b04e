"""A decode function for ProcessDecoders that raises, as a bug would, on any photo whose name
holds "bug"; other photos are decoded as usual."""
import os

from agepipe.features import decoders


def decode_into(path, *args):
    if "bug" in os.path.basename(path):
        raise ValueError("a bug in decoding")
    return decoders.decode_into(path, *args)
