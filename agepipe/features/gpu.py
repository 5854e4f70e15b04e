"""The device-resident face pipeline: paths in, one chosen face per photo out, batched end to end.

How a batch flows (`extract --runtime torch`; the same code runs on "cpu" for tests):

  decoders         read_photo, cv2 letterbox into a uint8 canvas slot and the photo's pixels into a
                   flat byte slot, both in pinned memory allocated once (two slots: double buffering);
                   processes on CUDA (shared memory, registered with CUDA), threads on the CPU:
                   decoders.py
  copy stream      the slot's canvas, pixels and per-photo numbers to the device in three copies
  compute stream   normalise, detect (fp32 with TF32 off: see __init__), threshold + anchor decode
                   + NMS for the whole batch, the face-choice policy, the 5-point similarity solved
                   in closed form, bilinear 112x112 crops sampled straight from the flat pixels,
                   recognise (fp16 on CUDA), then one packed row per photo back to pinned memory
  main thread      enqueues batch k, then reads batch k-1's rows while the GPU works on k and the
                   decoders fill k+1; nothing waits on the GPU except that read.

Shapes never depend on data (a fixed number of candidates per photo, a fixed number of NMS rounds),
so nothing syncs inside a batch. A photo whose candidates overflow or whose NMS did not settle is
redone exactly (rare; flagged in its packed row), and a photo with no face goes through detect.py's
face rescue, as on the CPU path. cv2 letterboxes on the host because a device resize does not
match cv2.resize closely enough (DESIGN; bench/device_letterbox.py). The crops reproduce
cv2.warpAffine's pixel convention by a bilinear gather from the flat bytes: grid_sample would
need every photo of a batch padded to one size.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import threading
import time
import weakref
from collections import Counter

import numpy as np
import torch

from agepipe.features.align import ARCFACE_TEMPLATE
from agepipe.features.decoders import (CRASHED, DECODERS, META, OK, OVERFLOW, STATUSES, HostSlot, ProcessDecoders,
                                       ThreadDecoders, default_decoders)
from agepipe.features.detect import DET_THRESH, NMS_THRESH, check_det_size, rescue_canvas
from agepipe.features.models import ModelError, recognizer_normalisation
from agepipe.features.onnx_torch import load_torch_model

CANDIDATES = 256      # best-scoring anchors per photo kept for NMS; more above threshold -> exact redo
NMS_ROUNDS = 12       # fixed-point rounds of batched greedy NMS; unsettled -> exact redo
# packed row per photo: n_faces, det_score, bbox 4, landmarks 10, embedding 512, norm, candidates, redo
ROW = 1 + 1 + 4 + 10 + 512 + 1 + 1 + 1


PRECISIONS = ("fp32", "tf32", "fp16")  # a network's arithmetic on CUDA (fp32 = TF32 off)


def batch_for_memory(free: int, photo_bytes: int, most: int = 256, least: int = 16) -> int:
    """Photos per batch for a device with ``free`` bytes: the largest power of two from ``least``
    to ``most`` whose photos take at most 60% of it (the rest: the caching allocator's slack and
    what other processes allocate meanwhile). ``most``: 256, the batch measured on an H200."""
    batch = least
    while batch * 2 <= min(most, int(0.6 * free) // max(photo_bytes, 1)):
        batch *= 2
    return batch


def batch_buckets(batch_size: int) -> list[int]:
    """The batch shapes the networks see: powers of two from 16, then the batch size itself."""
    return sorted({*(1 << k for k in range(4, batch_size.bit_length()) if 1 << k < batch_size), batch_size})


@contextlib.contextmanager
def _tf32(allowed: bool):
    """cuDNN's and cuBLAS's TF32 switch for one network call (torch's defaults: on for cuDNN)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def anchor_centers(size: tuple[int, int], strides=(8, 16, 32), per_cell: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, 2) anchor centres and (A,) strides in SCRFD's output order (stride, row, column, anchor)."""
    centers, stride_of = [], []
    for s in strides:
        h, w = size[1] // s, size[0] // s
        grid = np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32).reshape(-1, 2) * s
        centers.append(np.repeat(grid, per_cell, axis=0))
        stride_of.append(np.full(len(grid) * per_cell, s, np.float32))
    return torch.from_numpy(np.concatenate(centers)), torch.from_numpy(np.concatenate(stride_of))


def batched_nms(boxes: torch.Tensor, valid: torch.Tensor, thresh: float, rounds: int):
    """Greedy NMS (SCRFD's +1 pixel areas) for (B, K, 4) boxes sorted by descending score.

    Greedy NMS keeps j iff no kept i < j overlaps it by more than ``thresh``; that equation has one
    solution, reached by iterating it from "keep every valid box". Returns (keep (B, K), settled (B,)):
    a row that changed in the last round may not be the solution yet."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :]) + 1).clamp_(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :]) + 1).clamp_(min=0)
    inter = w * h
    overlap = inter / (areas[:, :, None] + areas[:, None, :] - inter)
    k = boxes.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu_(1)  # [i, j]: i ranks before j
    suppresses = (overlap > thresh) & earlier & valid[:, :, None]
    keep = valid
    for _ in range(rounds):
        keep = valid & ~(suppresses & keep[:, :, None]).any(1)
    settled = (keep == (valid & ~(suppresses & keep[:, :, None]).any(1))).all(1)
    return keep, settled


def choose_faces(boxes: torch.Tensor, keep: torch.Tensor, shapes: torch.Tensor, hints: torch.Tensor) -> torch.Tensor:
    """embed.choose_face for a batch: (B,) index into each photo's candidates. ``shapes`` (B, 2) is
    height, width; ``hints`` (B, 4) the dataset's box in the photo's pixels, NaN when it gives none."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    hx1, hy1, hx2, hy2 = (hints[:, i:i + 1] for i in range(4))
    inter = ((torch.minimum(x2, hx2) - torch.maximum(x1, hx1)).clamp(min=0)
             * (torch.minimum(y2, hy2) - torch.maximum(y1, hy1)).clamp(min=0))
    iou = inter / (area + (hx2 - hx1) * (hy2 - hy1) - inter + 1e-9)
    iou = torch.where(keep, torch.nan_to_num(iou, nan=-1.0), -1.0)
    best_iou, by_hint = iou.max(1)
    use_hint = torch.isfinite(hints).all(1) & (best_iou > 0)
    cx = (x1 + x2) / 2 - torch.div(shapes[:, 1:2], 2, rounding_mode="floor")
    cy = (y1 + y2) / 2 - torch.div(shapes[:, 0:1], 2, rounding_mode="floor")
    central = torch.where(keep, area - 2.0 * (cx ** 2 + cy ** 2), -torch.inf)
    return torch.where(use_hint, by_hint, central.argmax(1))


def similarity_transforms(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(F, 2, 3) least-squares similarities taking each (5, 2) src to dst. In 2-D Umeyama's estimator
    (align.similarity_transform) has this closed form, so no SVD (and no device sync) is needed."""
    sc = src - src.mean(1, keepdim=True)
    dc = dst - dst.mean(0)
    var = (sc ** 2).sum((1, 2))
    a = (sc[..., 0] * dc[:, 0] + sc[..., 1] * dc[:, 1]).sum(1) / var
    b = (sc[..., 0] * dc[:, 1] - sc[..., 1] * dc[:, 0]).sum(1) / var
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    shift = dst.mean(0) - (rot @ src.mean(1, keepdim=True).transpose(1, 2)).squeeze(-1)
    return torch.cat([rot, shift[..., None]], -1)


def warp_faces(flat: torch.Tensor, offsets: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
               matrices: torch.Tensor, size: int = 112) -> torch.Tensor:
    """cv2.warpAffine(photo, matrix, (size, size)) for F faces at once, bilinear, zero border:
    (F, size, size, 3) float pixels (rounded like cv2's uint8 output), sampled straight from the
    batch's photos laid end to end in ``flat`` (uint8 HxWx3 each, starting at ``offsets``)."""
    rot, shift = matrices[..., :2], matrices[..., 2]
    det = rot[:, 0, 0] * rot[:, 1, 1] - rot[:, 0, 1] * rot[:, 1, 0]
    inv = torch.stack([torch.stack([rot[:, 1, 1], -rot[:, 0, 1]], -1),
                       torch.stack([-rot[:, 1, 0], rot[:, 0, 0]], -1)], -2) / det[:, None, None]
    inv_shift = -(inv @ shift[..., None]).squeeze(-1)
    grid = torch.arange(size, device=flat.device, dtype=matrices.dtype)
    sx = inv[:, 0, 0, None, None] * grid + inv[:, 0, 1, None, None] * grid[:, None] + inv_shift[:, 0, None, None]
    sy = inv[:, 1, 0, None, None] * grid + inv[:, 1, 1, None, None] * grid[:, None] + inv_shift[:, 1, None, None]
    x0, y0 = sx.floor(), sy.floor()
    fx, fy = (sx - x0).float(), (sy - y0).float()
    x0, y0 = x0.long(), y0.long()
    h, w, off = heights[:, None, None], widths[:, None, None], offsets[:, None, None]
    channel = torch.arange(3, device=flat.device)
    out = torch.zeros(*sx.shape, 3, device=flat.device)
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        x, y = x0 + dx, y0 + dy
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        index = off + (y.clamp(min=0).minimum(h - 1) * w + x.clamp(min=0).minimum(w - 1)) * 3
        out += (weight * inside)[..., None] * flat[index[..., None] + channel].float()
    return out.round_().clamp_(0, 255)


class _Slot:
    """One half of the double buffer: its host staging (decoders.HostSlot) and its device copy."""

    def __init__(self, host: HostSlot, device: torch.device):
        self.host, self.device = host, device
        self.out = torch.empty(host.batch, ROW, dtype=torch.float32, pin_memory=device.type == "cuda")
        self.uploaded = self.computed = None  # CUDA events of the last batch through this slot
        if device.type == "cuda":
            self.canvas_dev = torch.empty_like(host.canvas, device=device)
            self.meta_dev = torch.empty_like(host.meta, device=device)
            self.flat_dev = torch.empty_like(host.flat, device=device)

    canvas = property(lambda self: self.host.canvas)
    meta = property(lambda self: self.host.meta)
    flat = property(lambda self: self.host.flat)
    flat_np = property(lambda self: self.host.flat_np)

    def grow(self, nbytes: int):
        """A flat buffer of at least ``nbytes``, keeping what the decoders already wrote."""
        self.host.grow(nbytes)
        if self.device.type == "cuda":
            self.flat_dev = torch.empty_like(self.host.flat, device=self.device)


class _Batch:
    """Photos of one batch in a slot: which rows they are, and what the decoders made of them."""

    def __init__(self, slot: _Slot, rows: list[int], pending):
        self.slot, self.rows, self.pending = slot, rows, pending
        self.used = 0
        self.overflow: list[tuple[int, np.ndarray]] = []  # (offset, pixels) of photos that did not fit
        self.errors: dict[int, str] = {}                  # position -> status
        self.outputs = self.events = None
        self.rescued = 0  # photos whose face only the rescue pass found

    def decoded(self, decoders):
        """Waits for the decoders; then errors, overflow and bytes used are known."""
        decoders.wait(self.pending)
        host = self.slot.host
        for j, code in enumerate(host.status_np[:len(self.rows)].tolist()):
            if code == CRASHED:
                # its decode process died on it or hung (killed): a hostile file, or the OOM killer's
                # choice, so transient as on the CPU path, where a photo that kills its worker is worker_lost
                self.errors[j] = "worker_lost"
            elif code not in (OK, OVERFLOW):
                if code not in range(1, len(STATUSES)):
                    raise RuntimeError(f"photo {j} of a batch was never decoded (status code {code})")
                self.errors[j] = STATUSES[code]
        self.overflow = [(int(host.meta_np[j, 0]), pixels) for j, pixels in self.pending.overflow.items()]
        self.used = int(host.counters_np[1])


class _Call:
    """One call of DevicePipeline.extract: its photos in batches, and those submitted so far."""

    def __init__(self, paths: list[str], hints: list, batch_size: int):
        self.paths, self.hints = paths, hints
        self.batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
        self.submitted = 0
        self.decoding: dict[int, _Batch] = {}  # batch index -> batch being decoded


class DevicePipeline:
    """A model pack on one device, for `agepipe extract --runtime torch` (CUDA, or CPU for tests).
    ``batch_size`` None: on CUDA the largest that fits the GPU's free memory (batch_for_memory
    from a measured photo), on the CPU 16. ``fuse_conv_relu``: the detector's Conv + Relu pairs as
    cuDNN's fused kernel (OnnxModule.fuse_conv_relu; off until measured on a GPU)."""

    def __init__(self, pack, det_size: int = 640, device: str = "cuda", batch_size: int | None = None,
                 decode_threads: int = 4, det_thresh: float = DET_THRESH, detector_precision: str | None = None,
                 recognizer_precision: str | None = None, decoders: str | None = None, fuse_conv_relu: bool = False):
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelError("--runtime torch --device cuda: torch sees no CUDA device")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pad_batches = self.cuda  # see _net; on the CPU padding would only cost time
        # Measured on an H200 against onnxruntime (bench/gpu_extract_device.py): an fp16 detector picks
        # another face or status for ~0.2% of photos; fp32 (TF32 off) agrees exactly. An fp16
        # recogniser keeps every embedding at cosine >= 0.9999.
        self.det_precision = detector_precision or "fp32"
        self.rec_precision = recognizer_precision or ("fp16" if self.cuda else "fp32")
        for p in (self.det_precision, self.rec_precision):
            if p not in PRECISIONS:
                raise ValueError(f"precision {p!r}: one of {', '.join(PRECISIONS)}")
        self.size = check_det_size((det_size, det_size))
        self.det_thresh = det_thresh
        self.batch_size = 16  # until sized below: the memory probe runs one batch of 16
        self.detector = load_torch_model(pack.detector, self.device, self.det_precision == "fp16")
        self.recognizer = load_torch_model(pack.recognizer, self.device, self.rec_precision == "fp16")
        if fuse_conv_relu:
            self.detector.fuse_conv_relu()
        self.rec_mean, self.rec_std = recognizer_normalisation(pack.recognizer)
        centers, strides = anchor_centers(self.size)
        self.centers, self.strides = centers.to(self.device), strides.to(self.device)
        self.template = torch.from_numpy(ARCFACE_TEMPLATE).to(self.device)
        if not batch_size:  # from the GPU's free memory, once the models are on it
            batch_size = (batch_for_memory(torch.cuda.mem_get_info(self.device)[0], 2 * self._photo_bytes())
                          if self.cuda else 16)
        self.batch_size = batch_size
        # processes on CUDA where this process may start them (see decoders.py); threads on the CPU
        self.decoder_kind = decoders or (default_decoders(batch_size, self.size) if self.cuda else "threads")
        if self.decoder_kind not in DECODERS:
            raise ValueError(f"decoders {self.decoder_kind!r}: one of {', '.join(DECODERS)}")
        if self.decoder_kind == "processes" and multiprocessing.current_process().daemon:
            raise ModelError("decoding in processes: this process is daemonic and may not start any (a Dask "
                             "worker: set distributed.worker.daemon to False); or decode with threads")
        shared = self.decoder_kind == "processes"
        hosts = []
        try:  # the slots made so far freed if the next one finds /dev/shm full (no finalizer yet)
            for _ in range(2):
                hosts.append(HostSlot(batch_size, self.size, pin=self.cuda, shared=shared))
            self.slots = [_Slot(h, self.device) for h in hosts]
            self.threads = max(1, decode_threads)
            self.decoders = (ProcessDecoders if shared else ThreadDecoders)(self.threads, hosts)
        except BaseException:
            for host in hosts:
                host.close()
            raise
        self._finalizer = weakref.finalize(self, _close, self.decoders, hosts)
        # One shard (one call of extract) at a time on the device, in arrival order: a call waiting its
        # turn gets its first batches decoded into the slots the call before it frees, so the device
        # does not idle while a new shard decodes its first batch (see _feed).
        self.turn = threading.Condition()
        self.calls: collections.deque[_Call] = collections.deque()
        self.free = list(self.slots)  # slots holding no batch that is decoding or waiting to launch
        if self.cuda:
            self.copy_stream, self.stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
            # redos and rescues of batch k-1: not queued behind batch k, which the GPU runs meanwhile
            self.side_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self.stream):  # plan every batch shape now, with the model loading
                for n in batch_buckets(batch_size):
                    self._net(self.detector, torch.zeros(n, 3, det_size, det_size, device=self.device),
                              self.det_precision)
                    self._net(self.recognizer, torch.zeros(n, 3, 112, 112, device=self.device), self.rec_precision)
            self.stream.synchronize()

    def _blank_batch(self, n: int):
        """Canvas, meta and flat pixels of ``n`` black photos the detector's size, on the device."""
        w, h = self.size
        meta = torch.zeros(n, META, dtype=torch.float64, device=self.device)
        meta[:, 0] = torch.arange(n, device=self.device) * (h * w * 3)
        meta[:, 1], meta[:, 2], meta[:, 3], meta[:, 4], meta[:, 5:9] = h, w, 1.0, 1.0, float("nan")
        return (torch.zeros(n, h, w, 3, dtype=torch.uint8, device=self.device), meta,
                torch.zeros(n * h * w * 3, dtype=torch.uint8, device=self.device))

    def _photo_bytes(self, n: int = 16) -> int:
        """Device memory a photo of a batch takes at the batch's peak (its inputs, the detector's
        activations, NMS, crops, the recogniser), measured on ``n`` black photos. Twice this per
        photo: a batch's redos and rescues may run on the side stream beside the next batch."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        canvas, meta, flat = self._blank_batch(n)
        self._finish(self._raw(canvas), meta, flat, CANDIDATES, NMS_ROUNDS)
        torch.cuda.synchronize(self.device)
        return -(-(torch.cuda.max_memory_allocated(self.device) - base) // n)

    def _net(self, net, x: torch.Tensor, precision: str):
        """A network on a float32 batch, padded to a bucket size: cuDNN plans each new batch
        shape on the host (measured: up to seconds per shape on an H200), so the rescue's and
        the redo's odd batch sizes must not reach it. Outputs are cut back to the batch."""
        n = len(x)
        size = next((b for b in batch_buckets(self.batch_size) if b >= n), n) if self.pad_batches else n
        if size > n:
            x = torch.cat([x, x.new_zeros(size - n, *x.shape[1:])])
        with _tf32(precision == "tf32"):
            outs = net(x.half() if precision == "fp16" else x)
        return [o[:n] for o in outs]

    # --- host side --------------------------------------------------------------------------

    def _submit(self, slot: _Slot, rows: list[int], paths: list[str], hints: list) -> _Batch:
        if slot.uploaded is not None:
            slot.uploaded.synchronize()  # the copy engine is done reading this slot's host memory
        return _Batch(slot, rows, self.decoders.submit(slot.host, [paths[r] for r in rows], [hints[r] for r in rows]))

    def close(self):
        """Stops the decoders and frees the shared memory (also done when the pipeline is collected)."""
        self._finalizer()

    # --- device side ------------------------------------------------------------------------

    def _raw(self, canvas: torch.Tensor):
        """Detector outputs as (B, A) scores and (B, A, 4) / (B, A, 10) offsets in canvas pixels."""
        x = canvas.permute(0, 3, 1, 2).flip(1).float().sub_(127.5).mul_(1 / 128.0)  # cv2.dnn.blobFromImages
        outs = self._net(self.detector, x, self.det_precision)
        n, b = len(outs) // 3, x.shape[0]
        scores = torch.cat([o.reshape(b, -1) for o in outs[:n]], 1).float()
        stride = self.strides[None, :, None]
        dist = torch.cat([o.reshape(b, -1, 4) for o in outs[n:2 * n]], 1).float() * stride
        kps = torch.cat([o.reshape(b, -1, 10) for o in outs[2 * n:]], 1).float() * stride
        return scores, dist, kps

    def _finish(self, raw, meta: torch.Tensor, flat: torch.Tensor, candidates: int, rounds: int, events=None,
                rescue: torch.Tensor | None = None):
        """Packed rows (B, ROW) from detector outputs: choose, align, embed. ``rescue`` (B, 4): the
        outputs are of rescue canvases, with offset x, y and factor x, y from detect.rescue_canvas."""
        scores, dist, kps = raw
        # detect.finite_only: a non-finite anchor is no face, and a NaN must not sort first
        scores = torch.where(torch.isfinite(scores), scores, -torch.inf)
        k = min(candidates, scores.shape[1])
        ranked, order = torch.sort(scores, dim=1, descending=True, stable=True)  # SCRFD's stable order
        s, order = ranked[:, :k], order[:, :k]
        valid = s >= self.det_thresh
        centers = self.centers[order]
        d = dist.gather(1, order[..., None].expand(-1, -1, 4))
        scale = meta[:, 3].float()[:, None, None]
        boxes = torch.cat([centers - d[..., :2], centers + d[..., 2:]], -1) / scale
        points = (centers.repeat(1, 1, 5) + kps.gather(1, order[..., None].expand(-1, -1, 10))) / scale
        valid = valid & torch.isfinite(boxes).all(-1) & torch.isfinite(points).all(-1)
        keep, settled = batched_nms(boxes, valid, NMS_THRESH, rounds)
        above = (scores >= self.det_thresh).sum(1)
        shapes = meta[:, 1:3].float()
        if rescue is not None:  # detect.from_rescue_canvas: to the photo's pixels, faces on the padding dropped
            offset, factor = rescue[:, None, :2], rescue[:, None, 2:]
            boxes = (boxes - offset.repeat(1, 1, 2)) / factor.repeat(1, 1, 2)
            points = (points - offset.repeat(1, 1, 5)) / factor.repeat(1, 1, 5)
            cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
            keep = keep & (cx >= 0) & (cx < shapes[:, 1:2]) & (cy >= 0) & (cy < shapes[:, 0:1])
        chosen = choose_faces(boxes, keep, shapes, meta[:, 5:9].float())
        pick = chosen[:, None, None]
        box = boxes.gather(1, pick.expand(-1, 1, 4))[:, 0]
        landmarks = points.gather(1, pick.expand(-1, 1, 10))[:, 0]
        photo_scale = meta[:, 4:5].float()  # decoded pixels -> the original's
        score = s.gather(1, chosen[:, None])[:, 0]
        n_faces = keep.sum(1)
        found = n_faces > 0
        self._mark(events, 1)

        # photos without a face get a harmless transform; their rows are ignored on the host
        src = torch.where(found[:, None, None], landmarks.reshape(-1, 5, 2).double(), self.template)
        matrices = similarity_transforms(src, self.template)
        crops = warp_faces(flat, meta[:, 0].long(), meta[:, 1].long(), meta[:, 2].long(), matrices)
        blob = crops.flip(-1).permute(0, 3, 1, 2).sub_(self.rec_mean).mul_(1 / self.rec_std)
        self._mark(events, 2)

        raw_emb = self._net(self.recognizer, blob, self.rec_precision)[0].float()
        norm = torch.linalg.vector_norm(raw_emb, dim=1)
        emb = raw_emb / norm.clamp(min=1e-12)[:, None]
        redo = (above > k) | ~settled
        return torch.cat([n_faces[:, None].float(), score[:, None], box * photo_scale, landmarks * photo_scale,
                          emb, norm[:, None],
                          above[:, None].float(), redo[:, None].float()], 1)

    def _mark(self, events, i):
        if events is None:
            return
        if self.cuda:
            events[i].record(self.stream)
        else:
            events[i] = time.perf_counter()

    def _launch(self, batch: _Batch, n: int):
        """Enqueue upload, compute and the copy back of a decoded batch; returns at once on CUDA."""
        slot = batch.slot
        if batch.overflow:  # rare: this batch's photos need a bigger flat slot
            slot.grow(batch.used)
            for offset, pixels in batch.overflow:
                slot.flat_np[offset:offset + pixels.size] = pixels.reshape(-1)
        events = ([torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.cuda else [0.0] * 4)
        batch.events = events
        if not self.cuda:
            events[0] = time.perf_counter()
            batch.inputs = tuple(t.to(self.device) for t in (slot.canvas[:n], slot.meta[:n], slot.flat[:batch.used]))
            batch.raw = self._raw(batch.inputs[0])
            rows = self._finish(batch.raw, batch.inputs[1], batch.inputs[2], CANDIDATES, NMS_ROUNDS, events)
            events[3] = time.perf_counter()
            batch.outputs = self._redone(batch, rows)  # now: the threads reuse this slot next
            return
        with torch.cuda.stream(self.copy_stream):
            if slot.computed is not None:
                self.copy_stream.wait_event(slot.computed)  # the last batch in this slot is done with it
            canvas = slot.canvas_dev[:n].copy_(slot.canvas[:n], non_blocking=True)
            meta = slot.meta_dev[:n].copy_(slot.meta[:n], non_blocking=True)
            flat = slot.flat_dev[:batch.used].copy_(slot.flat[:batch.used], non_blocking=True)
            slot.uploaded = torch.cuda.Event()
            slot.uploaded.record(self.copy_stream)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(slot.uploaded)
            events[0].record(self.stream)
            batch.inputs = (canvas, meta, flat)
            batch.raw = self._raw(canvas)
            rows = self._finish(batch.raw, meta, flat, CANDIDATES, NMS_ROUNDS, events)
            slot.out[:n].copy_(rows, non_blocking=True)
            batch.outputs = slot.out[:n]
            events[3].record(self.stream)
            slot.computed = events[3]

    def _collect(self, batch: _Batch, timings: Counter) -> np.ndarray:
        """The batch's packed rows on the host (waits for the device), with rare exact redos done."""
        events = batch.events
        if self.cuda:
            events[3].synchronize()
            spans = [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(3)]
        else:
            spans = [events[i + 1] - events[i] for i in range(3)]
        for stage, seconds in zip(("detect", "align", "embed"), spans):
            timings[stage] += seconds
        return self._redone(batch, batch.outputs) if self.cuda else batch.outputs

    def _redone(self, batch: _Batch, rows: torch.Tensor) -> np.ndarray:
        """Rows flagged for an exact redo redone; photos with no face through the face rescue."""
        rows = rows.numpy().copy()
        if self.cuda:
            self.side_stream.wait_event(batch.events[3])  # the batch's inputs and raw outputs are ready
        with torch.cuda.stream(self.side_stream) if self.cuda else contextlib.nullcontext():
            redo = np.flatnonzero(rows[:, -1] > 0)
            if len(redo):
                index = torch.from_numpy(redo).to(self.device)
                rows[redo] = self._settled(tuple(t.index_select(0, index) for t in batch.raw),
                                           batch.inputs[1].index_select(0, index), batch.inputs[2],
                                           int(rows[redo, -2].max()))
            missed = np.flatnonzero(rows[:, 0] == 0)  # detect.needs_rescue: no face in the first pass
            if len(missed):
                rows[missed] = self._rescue(batch, missed)
                batch.rescued = int((rows[missed, 0] > 0).sum())
        return rows

    def _settled(self, raw, meta, flat, candidates: int, rescue=None) -> np.ndarray:
        """Rows with enough candidates for every above-threshold anchor and NMS run until it settles."""
        rounds = NMS_ROUNDS
        while True:
            rows = self._finish(raw, meta, flat, max(candidates, 1), rounds, rescue=rescue).cpu().numpy()
            if not rows[:, -1].any():
                return rows
            candidates, rounds = max(candidates, int(rows[:, -2].max())), rounds * 4

    def _rescue(self, batch: _Batch, missed: np.ndarray) -> np.ndarray:
        """The face rescue (detect.py's policy, its own canvas geometry) for photos with no face;
        rare, so done photo by photo on the host from the batch's pixels."""
        index = torch.from_numpy(missed).to(self.device)
        meta, flat = batch.inputs[1].index_select(0, index), batch.inputs[2]
        shapes = meta[:, :3].cpu().numpy().astype(np.int64)
        # the photos' pixels back in one wait: a synchronous copy per photo stalled the launching thread
        host = torch.empty(int((shapes[:, 1] * shapes[:, 2] * 3).sum()), dtype=torch.uint8, pin_memory=self.cuda)
        at, views = 0, []
        for offset, h, w in shapes:
            host[at:at + h * w * 3].copy_(flat[offset:offset + h * w * 3], non_blocking=True)
            views.append(host[at:at + h * w * 3].numpy().reshape(h, w, 3))
            at += h * w * 3
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        canvases, maps = [], []
        for pixels in views:
            canvas, shift, factor = rescue_canvas(pixels, self.size)
            canvases.append(canvas)
            maps.append([*shift, *factor])
        meta = meta.clone()
        meta[:, 3] = 1.0  # the canvas is the detector's input as it is
        raw = self._raw(torch.from_numpy(np.stack(canvases)).to(self.device))
        return self._settled(raw, meta, flat, CANDIDATES, torch.tensor(maps, dtype=torch.float32, device=self.device))

    # --- the shard --------------------------------------------------------------------------

    def extract(self, paths: list[str], hints: list, timings: Counter):
        """For each path: (status or None, packed row or None), in order. Decoding of the next
        batch and the device's work on this one overlap; only packed rows come back. Calls from
        several threads (a Dask worker's task threads) take turns; the next call's first batches
        are decoded while this one's last batches are on the device."""
        call = _Call(paths, hints, self.batch_size)
        with self.turn:
            self.calls.append(call)
            self.turn.wait_for(lambda: self.calls[0] is call)
        try:
            return self._extract(call, timings)
        except BaseException:
            self._drain(call)
            raise
        finally:
            with self.turn:
                self.calls.popleft()
                self.turn.notify_all()

    def _extract(self, call: _Call, timings: Counter):
        status: list = [None] * len(call.paths)
        packed = np.zeros((len(call.paths), ROW), np.float32)
        self._feed(call)
        previous = None
        for k in range(len(call.batches)):
            batch = call.decoding[k]
            t = time.perf_counter()
            batch.decoded(self.decoders)
            del call.decoding[k]  # (until now _drain would wait for it)
            timings["decode"] += time.perf_counter() - t  # time the device side waited on decoding
            for position, error in batch.errors.items():
                status[batch.rows[position]] = error
            good = [j for j in range(len(batch.rows)) if j not in batch.errors]
            if len(good) < len(batch.rows):  # compact the failures out of the slot
                self._compact(batch, good)
            if good:
                self._launch(batch, len(good))
            self.free.append(batch.slot)  # reusable once its upload is done (_submit waits for that)
            if previous is not None:
                self._store(previous, packed, timings)
            previous = batch if good else None
            self._feed(call)
        if previous is not None:
            self._store(previous, packed, timings)
        return status, packed

    def _feed(self, call: _Call):
        """Free slots get the call's next batches, then the next waiting call's first ones."""
        while self.free:
            if call.submitted == len(call.batches):
                with self.turn:
                    call = self.calls[1] if len(self.calls) > 1 and self.calls[0] is call else None
                if call is None or call.submitted == len(call.batches):
                    return
            k = call.submitted
            call.decoding[k] = self._submit(self.free.pop(0), call.batches[k], call.paths, call.hints)
            call.submitted += 1

    def _drain(self, call: _Call):
        """After a failure: wait out this call's decoding batches; every slot that no later call's
        early batch holds is free again."""
        for batch in call.decoding.values():
            with contextlib.suppress(Exception):
                self.decoders.wait(batch.pending)
        call.decoding.clear()
        with self.turn:
            held = {id(b.slot) for c in self.calls if c is not call for b in c.decoding.values()}
        self.free = [slot for slot in self.slots if id(slot) not in held]

    def _compact(self, batch: _Batch, good: list[int]):
        slot = batch.slot
        for new, old in enumerate(good):
            if new != old:
                slot.canvas[new] = slot.canvas[old]
                slot.meta[new] = slot.meta[old]
        batch.rows = [batch.rows[j] for j in good]

    def _store(self, batch: _Batch, packed: np.ndarray, timings: Counter):
        packed[batch.rows] = self._collect(batch, timings)
        timings["faces_rescued"] += batch.rescued  # a count among the times, as extract's CPU path keeps it


def _close(decoders, hosts):
    decoders.close()
    for host in hosts:
        host.close()


def unpack(rows: np.ndarray) -> dict:
    """Packed rows as the store's columns (bbox and landmarks in the original photo's pixels)."""
    return {"n_faces": rows[:, 0].astype(np.int16), "det_score": rows[:, 1], "bbox": rows[:, 2:6],
            "landmarks": rows[:, 6:16], "embedding": rows[:, 16:528], "embedding_norm": rows[:, 528]}
