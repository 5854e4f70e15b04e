"""Host cost per photo of extraction with the networks replaced by free stand-ins (CPU proxy for the GPU).

    python bench/gpu_proxy_bench.py [--photos 512] [--batch 64] [--decode-threads 2]

Both sides run one shard through `extract.embed_rows` on the same JPEG face crops, decoding on the
same number of threads, with the detector and recogniser replaced by stand-ins that return a real
photo's outputs (right shapes, real faces to decode, NMS and align) at no cost:

  before  the per-photo path (`--runtime onnxruntime`, and `--runtime torch` until now): letterbox
          and float blob per photo, anchor decode and NMS in NumPy per photo, cv2 alignment per face
  after   the device-resident path (features/gpu.py) with device "cpu": its device stages
          (normalise, anchor decode, NMS, face choice, alignment) run on this CPU here and are
          timed apart, as the work a GPU takes over.

CPU seconds are the process's (all threads), so threads cannot hide work. JPEG decoding and cv2's
letterbox (both paths do it on the host: a device resize does not match cv2.resize, see DESIGN)
are timed where they run, on each thread, and subtracted. "left" is every other host cost per
photo: batching, staging, copies, result handling, building the shard table. "ops per batch" is
how many tensor ops the device stages dispatch per batch (each a kernel launch on a GPU).
"""
import argparse
import dataclasses
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from agepipe.features import decoders, detect, gpu, images
from agepipe.features.embed import FaceEmbedder
from agepipe.features.models import resolve_pack
from agepipe.pipeline import extract as ex
from face_crops import face_dataset


def stand_ins(pack, sample: np.ndarray):
    """The real networks' outputs for one photo and one face, returned for any batch at no cost."""
    embedder = FaceEmbedder(pack, det_size=640)
    blob, _ = embedder.detector.prepare([sample])
    det_out = embedder.detector.net(blob)
    rec_out = embedder.recognizer(np.zeros((1, 3, 112, 112), np.float32))[0]
    return det_out, rec_out


def numpy_stand_ins(det_out, rec_out):
    return (lambda batch: [np.broadcast_to(o, (len(batch),) + o.shape[1:]) for o in det_out],
            lambda batch: [np.broadcast_to(rec_out, (len(batch), rec_out.shape[1]))])


def torch_stand_ins(det_out, rec_out):
    det = [torch.from_numpy(o) for o in det_out]
    rec = torch.from_numpy(rec_out)
    return (lambda x: tuple(o.expand(x.shape[0], *o.shape[1:]) for o in det),
            lambda x: (rec.expand(x.shape[0], -1),))


class CpuClock:
    """Thread CPU seconds spent inside the functions it wraps, summed over threads."""

    def __init__(self):
        self.seconds = Counter()
        self.lock = threading.Lock()

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[name] += time.thread_time() - t
        return timed


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--decode-threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tensor work on one core: its thread CPU time is all of it
    cv2.setNumThreads(1)
    pack = resolve_pack("buffalo_s")
    clock = CpuClock()
    images.read_photo = clock.wrap("decode", images.read_photo)  # as the threads call them
    decoders.read_photo = images.read_photo
    detect.letterbox = clock.wrap("letterbox", detect.letterbox)
    decoders.letterbox_into = clock.wrap("letterbox", decoders.letterbox_into)
    results = []
    with tempfile.TemporaryDirectory() as d:
        paths = face_dataset(Path(d), "proxy", args.photos)
        rows = pq.read_table(Path(d) / "proxy" / "manifest.parquet")
        det_out, rec_out = stand_ins(pack, images.read_photo(str(paths[0])).pixels)
        for name, runtime in (("before: per-photo path", "onnxruntime"), ("after: device-resident path", "torch")):
            cfg = ex.ExtractConfig(pack="buffalo_s", runtime=runtime, batch_size=args.batch,
                                   decode_threads=args.decode_threads)
            if runtime == "onnxruntime":
                embedder = FaceEmbedder(pack, det_size=640, threads=1)
                embedder.detector.net, embedder.recognizer = numpy_stand_ins(det_out, rec_out)
            else:
                embedder = gpu.DevicePipeline(pack, device="cpu", batch_size=args.batch,
                                              decode_threads=args.decode_threads)
                embedder.detector, embedder.recognizer = torch_stand_ins(det_out, rec_out)
                embedder._launch = clock.wrap("device", embedder._launch)
            ex._EMBEDDERS.clear()
            ex._EMBEDDERS[dataclasses.astuple(cfg)] = embedder  # the worker's cache: these, not the real models
            root = str(Path(d) / "proxy")
            ex.embed_rows(rows.slice(0, 2 * args.batch), root, cfg, Counter())  # warm-up: both slots
            ops = None
            if runtime == "torch":
                with CountOps() as counter:
                    ex.embed_rows(rows.slice(0, args.batch), root, cfg, Counter())
                ops = counter.ops
            clock.seconds.clear()
            c = time.process_time()
            table = ex.embed_rows(rows, root, cfg, Counter())
            cpu = time.process_time() - c
            assert len(ex._EMBEDDERS) == 1, "extract loaded its own models, not the stand-ins"
            ok = sum(s == "ok" for s in table["status"].to_pylist())
            results.append((name, cpu, dict(clock.seconds), ops, ok))
    n = args.photos
    print(f"{n} JPEG face crops 300-700 px, batch {args.batch}, {args.decode_threads} decode threads, "
          f"stand-in networks; {results[0][4]} and {results[1][4]} photos with a face")
    print("| path | photos/s per core | host ms/photo | JPEG decode | cv2 letterbox | device stages "
          "(on a GPU there) | left: host ms/photo besides these | ops per batch | left vs before |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for name, cpu, sec, ops, _ in results:
        ms = {k: 1000 * sec.get(k, 0.0) / n for k in ("decode", "letterbox", "device")}
        left = 1000 * cpu / n - sum(ms.values())
        base = base or left
        print(f"| {name} | {n / cpu:.0f} | {1000 * cpu / n:.3f} | {ms['decode']:.3f} | {ms['letterbox']:.3f} "
              f"| {ms['device']:.3f} | {left:.3f} | {ops or '-'} | {base / left:.1f}x |")


if __name__ == "__main__":
    main()
