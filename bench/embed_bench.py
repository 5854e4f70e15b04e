"""agepipe's embedding path against a plain loop of insightface's FaceAnalysis.get.

    python bench/embed_bench.py [--images 120] [--det-size 640]

Same photos, same two ONNX files, same det size, same process, CPU; both decode the
photos themselves and embed every face. Prints images/s and the ratio.
"""
import argparse
import tempfile
import time
from pathlib import Path

import cv2

from agepipe.features.embed import FaceEmbedder, embed_files
from agepipe.features.models import resolve_pack
from photos import face_analysis, real_photos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--det-size", type=int, default=640)
    args = ap.parse_args()
    photos = real_photos()
    paths = [str(photos[i % len(photos)]) for i in range(args.images)]
    pack = resolve_pack("buffalo_s")
    with tempfile.TemporaryDirectory() as d:
        app = face_analysis(pack, args.det_size, Path(d) / "pack")
        embedder = FaceEmbedder(pack, det_size=args.det_size)
        embed_files(paths[:4], embedder, progress=False)  # warm both up
        app.get(cv2.imread(paths[0]))

        t = time.perf_counter()
        loop_faces = sum(len(app.get(cv2.imread(p))) for p in paths)
        t_loop = time.perf_counter() - t

        t = time.perf_counter()
        table = embed_files(paths, embedder, batch_size=16, progress=False)
        t_ours = time.perf_counter() - t
    our_faces = table["status"].to_pylist().count("ok")
    assert our_faces == loop_faces, (our_faces, loop_faces)
    n = len(paths)
    print(f"{n} photos ({len(photos)} distinct), {loop_faces} faces, det size {args.det_size}, buffalo_s, CPU")
    print("| path | images/s | faces/s | vs loop |")
    print("|---|---|---|---|")
    print(f"| FaceAnalysis.get loop | {n / t_loop:.1f} | {loop_faces / t_loop:.1f} | 1.00x |")
    print(f"| agepipe embed_files (batched) | {n / t_ours:.1f} | {our_faces / t_ours:.1f} | {t_loop / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
