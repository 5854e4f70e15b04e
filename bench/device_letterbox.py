"""Could the letterbox run on the GPU (after nvJPEG, say)? The device pipeline on the CPU, the same
photos through cv2's letterbox (agepipe's) and through torch's bilinear resize (what a device would
run: F.interpolate, half-pixel centres, no antialias, as cv2.INTER_LINEAR), rows compared.

    python bench/device_letterbox.py [--photos 200]      (from bench/)

Prints how the two canvases differ (bytes off by how much) and how the rows differ: face count,
box, embedding cosine, against extract's agreement target (boxes within 1 px, cosine >= 0.999).
"""
import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agepipe.features import decoders, gpu
from agepipe.features.detect import letterbox_size
from agepipe.features.models import resolve_pack
from face_crops import face_dataset

CV2_LETTERBOX = decoders.letterbox_into


def torch_letterbox(image: np.ndarray, canvas: np.ndarray, diffs: list) -> float:
    """decoders.letterbox_into's geometry, resized by torch; records the bytes' difference to cv2's."""
    new_h, new_w = letterbox_size(image.shape, (canvas.shape[1], canvas.shape[0]))
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    reference = np.empty_like(canvas)
    CV2_LETTERBOX(image, reference)
    canvas[...] = 0
    canvas[:new_h, :new_w] = resized.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    off = np.abs(canvas.astype(np.int16) - reference)
    diffs.append((int(off.max()), float((off > 0).mean())))
    return new_h / image.shape[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=200)
    args = ap.parse_args()
    pack, rows, diffs = resolve_pack("buffalo_s"), {}, []
    with tempfile.TemporaryDirectory() as d:
        paths = [str(p) for p in face_dataset(Path(d), "crops", args.photos)]
        for name, letterbox in (("cv2", CV2_LETTERBOX), ("torch", lambda im, c: torch_letterbox(im, c, diffs))):
            decoders.letterbox_into = letterbox  # what the decode threads call
            pipeline = gpu.DevicePipeline(pack, device="cpu", batch_size=32, decode_threads=2)
            rows[name] = gpu.unpack(pipeline.extract(paths, [None] * len(paths), Counter())[1])
            pipeline.close()
    a, b = rows["cv2"], rows["torch"]
    ok = (a["n_faces"] > 0) & (b["n_faces"] > 0)
    cos = (a["embedding"][ok] * b["embedding"][ok]).sum(1)
    box = np.abs(a["bbox"][ok] - b["bbox"][ok]).max(1)
    print(f"{len(paths)} JPEG face crops 300-700 px; canvas bytes off by at most {max(m for m, _ in diffs)}, "
          f"{np.median([s for _, s in diffs]):.1%} of a canvas's bytes off (median)")
    print(f"torch letterbox vs cv2's: same n_faces {np.mean(a['n_faces'] == b['n_faces']):.4f}, {ok.sum()} with a "
          f"face in both, box within 1 px {np.mean(box <= 1):.4f} (max {box.max():.2f} px), cosine min {cos.min():.5f} "
          f"p1 {np.percentile(cos, 1):.5f} median {np.median(cos):.6f} -> "
          f"{'PASS' if (box <= 1).all() and cos.min() >= 0.999 and (a['n_faces'] == b['n_faces']).all() else 'FAIL'}")


if __name__ == "__main__":
    main()
