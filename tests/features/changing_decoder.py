"""A decode function for ProcessDecoders that, once it has decoded a photo that does not fit the
flat buffer, replaces the file with its ``.next`` sibling: a photo changed while it was extracted."""
import os

from agepipe.features import decoders


def decode_into(path, *args):
    code, pixels = decoders.decode_into(path, *args)
    if code == decoders.OVERFLOW and os.path.exists(path + ".next"):
        os.replace(path + ".next", path)
    return code, pixels
