"""A training step captured as a CUDA graph: one launch per step instead of one per kernel.

These models keep a GPU busy for microseconds per kernel, so an eager step is bound by the
host launching its kernels from Python (about 100 for one model, 500 for a stack of runs); a
replay is one launch. A step is warmed up outside the graph first (the optimizer's state and
cuBLAS's workspaces are allocated lazily, which a capture must not do), and what the warm-up
changed is put back, so training starts where it stood.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

WARM_UP_STEPS = 3


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Copies of the model's tensors (weights and buffers) and of the optimizer's state."""
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": {p: {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
                          for p, state in optimizer.state.items()}}


@torch.no_grad()
def restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Put back what ``snapshot`` saved, in place (a captured graph keeps the same tensors); the
    optimizer state that did not exist then (its first steps) is zeroed, as if never stepped."""
    for k, v in model.state_dict().items():
        v.copy_(saved["model"][k])
    for p, state in optimizer.state.items():
        before = saved["optimizer"].get(p, {})
        for k, t in state.items():
            if torch.is_tensor(t):
                t.copy_(before[k]) if k in before else t.zero_()


def warm_up(step: Callable[[], None], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Run ``step`` a few times, so that what it allocates lazily exists, then undo what it changed."""
    saved = snapshot(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "capturable=True but running without capture": only here
        for _ in range(WARM_UP_STEPS):
            step()
    restore(model, optimizer, saved)


def capture(step: Callable[[], None], model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.cuda.CUDAGraph:
    """``step`` (a training step on fixed input buffers) warmed up, undone and captured; the model
    and optimizer are left as they were before the call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up(step, model, optimizer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


class Replayed:
    """For a training step class (``run(idx)``, ``model``, ``optimizer`` and the epoch's sums
    ``loss_sum`` and ``correct``): each call copies the batch into the fixed index buffer ``idx``
    and replays ``run`` captured on it. ``_capture`` again whenever the step's tensors change."""

    def _capture(self) -> None:
        self.graph = None  # an old graph's memory goes back to the pool first
        self.graph = capture(lambda: self.run(self.idx), self.model, self.optimizer)
        self.loss_sum.zero_()  # what the warm-up added
        self.correct.zero_()

    def __call__(self, idx: torch.Tensor) -> None:
        self.idx.copy_(idx)
        self.graph.replay()
