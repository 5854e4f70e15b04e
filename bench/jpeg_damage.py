"""What jpeg_structure's restart-marker check costs and catches, against libjpeg itself.

    python bench/jpeg_damage.py [--trials 15]   (from bench/)

Cost: per real JPEG (packaged photos, as they are and re-encoded with a restart marker every MCU),
jpeg_structure before this check (an older images.py, given as --old) and now, against
cv2.imdecode on one thread, and what a second libjpeg pass at 1/8 (mostly the Huffman decode that
would see every damage libjpeg warns of) would add; best of many runs each. Catches: each photo damaged mid-scan in the
ways a disk or a transfer damages a file (its end marker kept), as it is and with restart markers
every MCU or every 16; libjpeg's verdict is whether cv2.imdecode printed 'Corrupt JPEG data' on
stderr (fd 2 captured around it: one thread) or failed, agepipe's whether decode_image refuses it.
"""
import argparse
import collections
import contextlib
import importlib.util
import os
import sys
import time

import cv2
import numpy as np

from agepipe.features import images
from photos import real_photos


@contextlib.contextmanager
def stderr_captured():
    """What C code writes on fd 2 meanwhile (libjpeg's warnings), in the yielded list."""
    read, write = os.pipe()
    saved = os.dup(2)
    os.dup2(write, 2)
    said = []
    try:
        yield said
    finally:
        os.dup2(saved, 2)
        os.close(write)
        os.close(saved)
        said.append(os.read(read, 1 << 16))
        os.close(read)


def libjpeg_warns(data: bytes) -> bool:
    """Whether cv2.imdecode fails or libjpeg warns ('Corrupt JPEG data: ...') on stderr."""
    with stderr_captured() as said:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return pixels is None or bool(said[0].strip())


def refused(data: bytes) -> bool:
    with stderr_captured():  # what decode_image passes, libjpeg decodes: its warnings are counted above
        try:
            images.decode_image(data, "x.jpg")
        except images.ImageError:
            return True
    return False


def best_ms(f, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def restarted(data: bytes, interval: int) -> bytes:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_RST_INTERVAL, interval])[1].tobytes()


def cost(jpegs: dict[str, bytes], old) -> None:
    print("| photo | kB | cv2.imdecode ms | a second pass at 1/8 (Huffman decode) | structure before us | now us | "
          "added, % of decode |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals = collections.Counter()
    for name, data in jpegs.items():
        buf = np.frombuffer(data, np.uint8)
        decode = best_ms(lambda: cv2.imdecode(buf, cv2.IMREAD_COLOR), 30)
        eighth = best_ms(lambda: cv2.imdecode(buf, cv2.IMREAD_REDUCED_COLOR_8), 30)
        before = best_ms(lambda: old.jpeg_structure(data), 200) if old else float("nan")
        now = best_ms(lambda: images.jpeg_structure(data), 200)
        kind = "restarts" if "every" in name else "as is"
        totals[kind, "decode"] += decode
        totals[kind, "before"] += before
        totals[kind, "now"] += now
        print(f"| {name} | {len(data) / 1e3:.0f} | {decode:.2f} | {100 * eighth / decode:.0f}% | {before * 1e3:.0f} | "
              f"{now * 1e3:.0f} | "
              f"{100 * (now - before) / decode:.2f}% |")
    for kind in ("as is", "restarts"):
        print(f"| all {kind} | | {totals[kind, 'decode']:.1f} | | {totals[kind, 'before'] * 1e3:.0f} | "
              f"{totals[kind, 'now'] * 1e3:.0f} | "
              f"{100 * (totals[kind, 'now'] - totals[kind, 'before']) / totals[kind, 'decode']:.2f}% |")


def catches(jpegs: dict[str, bytes], trials: int) -> None:
    rng = np.random.default_rng(0)
    damage = {
        "1 byte overwritten": lambda d, at: d[:at] + rng.integers(0, 256, 1, np.uint8).tobytes() + d[at + 1:],
        "16 bytes overwritten": lambda d, at: d[:at] + rng.integers(0, 256, 16, np.uint8).tobytes() + d[at + 16:],
        "256 bytes overwritten": lambda d, at: d[:at] + rng.integers(0, 256, 256, np.uint8).tobytes() + d[at + 256:],
        "512 bytes zeroed": lambda d, at: d[:at] + bytes(512) + d[at + 512:],
        "4096 bytes zeroed": lambda d, at: d[:at] + bytes(4096) + d[at + 4096:],
        "1 byte dropped": lambda d, at: d[:at] + d[at + 1:],
        "100 bytes dropped": lambda d, at: d[:at] + d[at + 100:],
        "100 bytes repeated": lambda d, at: d[:at] + d[at:at + 100] + d[at:],
    }
    print("| restart markers | damage | files | libjpeg warns or fails | agepipe refuses | refused, libjpeg silent |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant in ("as is", "every 16 MCUs", "every MCU"):
        group = {n: d for n, d in jpegs.items() if n.endswith(variant) or (variant == "as is" and "every" not in n)}
        for what, hurt in damage.items():
            count = collections.Counter()
            for data in group.values():
                start, end = data.find(b"\xff\xda") + 20, data.rfind(b"\xff\xd9") - 4200
                for _ in range(trials):
                    broken = hurt(data, int(rng.integers(start, end)))
                    warns, refuses = libjpeg_warns(broken), refused(broken)
                    count["files"] += 1
                    count["warns"] += warns
                    count["refuses"] += refuses
                    count["false"] += refuses and not warns
            print(f"| {variant} | {what} | {count['files']} | {count['warns']} | {count['refuses']} | {count['false']} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=15, help="damaged copies per photo and damage")
    parser.add_argument("--old", help="an older images.py to time against (git show HEAD~1:agepipe/features/images.py)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("old_images", args.old)
        old = importlib.util.module_from_spec(spec)
        sys.modules["old_images"] = old  # its dataclass looks itself up there
        spec.loader.exec_module(old)
    jpegs = {}
    for path in real_photos():
        if path.suffix == ".jpg":
            data = path.read_bytes()
            jpegs[path.name] = data
            jpegs[f"{path.name}, restart every MCU"] = restarted(data, 1)
    cost(jpegs, old)
    print()
    for path in real_photos():
        if path.suffix == ".jpg":
            jpegs[f"{path.name}, restart every 16 MCUs"] = restarted(path.read_bytes(), 16)
    catches(jpegs, args.trials)


if __name__ == "__main__":
    sys.exit(main())
