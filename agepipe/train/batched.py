"""Many runs of one architecture trained at once, as one stacked model (the folds x seeds of a
cross-validation).

Each run's tensors are the ResMLP's, stacked along a leading run axis: a Linear's weight is
held transposed, (R, in, out), so its forward is one ``torch.baddbmm`` and its gradient comes out
in the same layout (no transposed copy per step: 17% less time per layer on a CPU, measured);
BatchNorm keeps per-run statistics;
dropout draws an independent mask per element, hence per run. The loss is the sum of the
runs' mean losses, so each run's gradient is its own, and AdamW is elementwise, so the runs
never mix. Every run keeps its own split (indices gathered from the one shared feature
matrix), seed (initial weights and batch order), class weights, early stopping and best
epoch; ``export`` gives back run r as a plain ResMLP for the usual run folder. A run that
stops early leaves the stack (``keep``: its weights, BatchNorm statistics and AdamW moments
are cut out), so later epochs compute only the live runs.

One difference from separate runs: a step takes one batch from every run, so an epoch is the
largest run's number of steps (fixed at the start, so a run's numbers do not depend on when the
others stop), and a run with fewer training rows draws the missing batches from a second
permutation of its rows (a few percent more steps for the smaller folds).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from agepipe.train import graphs
from agepipe.train.model import ResMLP, autocast, dropout


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict names may not hold dots


class StackedResMLP(nn.Module):
    """R ResMLPs of one config as stacked tensors; forward takes (R, B, in) to (R, B, classes)."""

    def __init__(self, models: list[ResMLP]):
        super().__init__()
        self.template = models[0]
        self.config = models[0].config
        self.runs = len(models)
        states = [m.state_dict() for m in models]
        params = dict(models[0].named_parameters())
        self.transposed = {f"{n}.weight" for n, m in models[0].named_modules() if isinstance(m, nn.Linear)}
        self.weights = nn.ParameterDict({
            _key(k): nn.Parameter(torch.stack([s[k].t() if k in self.transposed else s[k]
                                               for s in states]).contiguous())
            for k in params})
        for k in states[0]:
            if k not in params:
                self.register_buffer(_key(k), torch.stack([s[k] for s in states]).clone())
        self.names = {m: n for n, m in models[0].named_modules()}

    def _tensor(self, name: str) -> torch.Tensor:
        key = _key(name)
        return self.weights[key] if key in self.weights else getattr(self, key)

    def _linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        name = self.names[module]
        w, b = self._tensor(f"{name}.weight"), self._tensor(f"{name}.bias")
        return torch.baddbmm(b.unsqueeze(1), x, w)

    def _batch_norm(self, module: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        name = self.names[module]
        mean, var = self._tensor(f"{name}.running_mean"), self._tensor(f"{name}.running_var")
        x = x.float()  # under autocast a Linear gives bfloat16; statistics stay float32, as nn.BatchNorm1d's
        if self.training:
            # The variance from the centred rows, not x.var: a strided reduction over the batch
            # axis costs 6x more on a CPU (measured), and the centred rows are needed anyway.
            batch_mean = x.mean(1, keepdim=True)
            centred = x - batch_mean
            batch_var = (centred * centred).mean(1)
            with torch.no_grad():  # as nn.BatchNorm1d: the running variance is the unbiased one
                n = x.shape[1]
                mean.lerp_(batch_mean.squeeze(1), module.momentum)
                var.lerp_(batch_var * n / max(n - 1, 1), module.momentum)
                self._tensor(f"{name}.num_batches_tracked").add_(1)
            var = batch_var
        else:
            centred = x - mean.unsqueeze(1)
        scale = self._tensor(f"{name}.weight") * torch.rsqrt(var + module.eps)
        return centred * scale.unsqueeze(1) + self._tensor(f"{name}.bias").unsqueeze(1)

    def _ic(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for m in (module if isinstance(module, nn.Sequential) else [module]):
            if isinstance(m, nn.BatchNorm1d):
                x = self._batch_norm(m, x)
            elif isinstance(m, nn.Dropout) and self.training:
                x = dropout(x, m.p)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.template.blocks:
            if hasattr(block, "linear1"):  # Residual
                out = torch.relu(self._linear(block.linear1, self._ic(block.ic1, x)))
                out = self._linear(block.linear2, self._ic(block.ic2, out))
                x = torch.relu(out + x if block.skip else out)
            else:  # DownSample
                x = torch.relu(self._linear(block.linear, self._ic(block.ic, x)))
        return self._linear(self.template.head, x)

    def state_of(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's tensors under ResMLP's names."""
        return {k: self._tensor(k)[r].detach().t().contiguous() if k in self.transposed else
                self._tensor(k)[r].detach().clone() for k in self.template.state_dict()}

    def keep(self, rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Only the runs at ``rows`` stay, with their moments in ``optimizer`` (AdamW is
        elementwise, so each run's slice of a moment is its own; the step count is shared).
        New Parameters, not a new ``.data``: a live autograd graph may still hold the old shapes."""
        for key, old in list(self.weights.items()):
            new = self.weights[key] = nn.Parameter(old.detach()[rows])
            state = optimizer.state.pop(old, {})
            if state:  # exp_avg, exp_avg_sq; not the 0-d step
                optimizer.state[new] = {k: v[rows] if v.dim() else v for k, v in state.items()}
            for group in optimizer.param_groups:
                group["params"] = [new if q is old else q for q in group["params"]]
        for key, buf in list(self._buffers.items()):  # its own, not the template's
            self._buffers[key] = buf[rows]
        self.runs = len(rows)

    def export(self, r: int) -> ResMLP:
        return ResMLP.from_state(self.config, self.state_of(r)).eval()


def _padded(indices: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, longest) indices, padded with each run's first row, and the mask of real entries."""
    longest = max(1, max(len(i) for i in indices))
    idx = torch.zeros(len(indices), longest, dtype=torch.long)
    mask = torch.zeros(len(indices), longest, dtype=torch.bool)
    for r, i in enumerate(indices):
        if len(i):
            idx[r, :len(i)], idx[r, len(i):], mask[r, :len(i)] = i, i[0], True
    return idx.to(device), mask.to(device)


def _run_losses(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                weight: torch.Tensor | None) -> torch.Tensor:
    """Each run's (weighted) mean cross-entropy over its masked rows (every row where ``mask``
    is None): (R,)."""
    per_row = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (R, B)
    if weight is None:
        return per_row.mean(1) if mask is None else (per_row * mask).sum(1) / mask.sum(1)
    w = torch.gather(weight, 1, y)
    if mask is not None:
        w = w * mask
    return (per_row * w).sum(1) / w.sum(1)


class StackedStep:
    """One AdamW step of every live run on its rows ``idx`` (runs, batch). The epoch's per-run
    loss and hit sums stay on the device until ``take``."""

    def __init__(self, model: StackedResMLP, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 weight: torch.Tensor | None, amp: bool):
        self.model, self.optimizer, self.x, self.y, self.weight, self.amp = model, optimizer, x, y, weight, amp
        self._sums()

    def _sums(self) -> None:
        self.loss_sum = torch.zeros(self.model.runs, device=self.x.device)
        self.correct = torch.zeros(self.model.runs, dtype=torch.long, device=self.x.device)

    def run(self, idx: torch.Tensor) -> None:
        yb = self.y[idx]
        with autocast(self.x.device, self.amp):  # as TrainStep: the runs train as separate ones would
            logits = self.model(self.x[idx])
        losses = _run_losses(logits.float(), yb, None, self.weight)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        self.loss_sum += losses.detach() * idx.shape[1]
        self.correct += (logits.detach().argmax(2) == yb).sum(1)

    def __call__(self, idx: torch.Tensor) -> None:
        self.run(idx)

    def take(self) -> tuple[list[float], list[int]]:
        """Each live run's sums since the last call, and zero them."""
        out = self.loss_sum.tolist(), self.correct.tolist()
        self.loss_sum.zero_()
        self.correct.zero_()
        return out

    def keep(self, rows: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Only the runs at ``rows`` stay (StackedResMLP.keep), with their class weights."""
        self.model.keep(rows, self.optimizer)
        self.weight = weight
        self._sums()


class GraphedStackedStep(graphs.Replayed, StackedStep):
    """The same step as one CUDA graph replay (graphs.py), captured again whenever runs leave the
    stack: its tensors are new then. The batch is gathered inside the graph from a fixed index
    buffer."""

    def __init__(self, model, optimizer, x, y, weight, amp: bool, first_batch: torch.Tensor):
        super().__init__(model, optimizer, x, y, weight, amp)
        self.idx = first_batch.clone()
        self._capture()

    def keep(self, rows: torch.Tensor, weight: torch.Tensor | None) -> None:
        super().keep(rows, weight)
        self.idx = self.idx[rows].clone()
        self._capture()


def _graphed(cuda_graphs: bool, device: torch.device) -> bool:
    return cuda_graphs and device.type == "cuda"  # a CPU has no graphs to replay: eager there


def fit_stacked(model: StackedResMLP, x: torch.Tensor, y: torch.Tensor, train_idx: list[torch.Tensor],
                val_idx: list[torch.Tensor], cfg, seeds: list[int], weight: torch.Tensor | None = None,
                cuda_graphs: bool = False) -> list[dict]:
    """Train every run of ``model`` at once with ``cfg``'s schedule (the same for all runs);
    each run early-stops on its own validation loss, keeping the weights of its best epoch,
    and leaves the stack. Returns one fit() result per run; ``model`` ends holding the runs
    that never stopped. ``cuda_graphs`` (on a CUDA device): each step one graph replay
    (GraphedStackedStep); off by default until a GPU has measured it."""
    from agepipe.train.loop import has_validation, make_optimizer

    device, runs = x.device, model.runs
    sizes = [len(i) for i in train_idx]
    if min(sizes) < 2:
        raise ValueError(f"a training split has {min(sizes)} rows; nothing to fit")
    batch = min(cfg.batch_size, min(sizes))
    steps = max(n // batch for n in sizes)
    orders = [torch.Generator().manual_seed(s) for s in seeds]
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)
    histories = [[] for _ in range(runs)]
    best = [None] * runs
    best_epoch = [None] * runs
    best_loss = [math.inf] * runs
    waited = [0] * runs
    has_val = [has_validation(y[i.to(device)], None if weight is None else weight[r]) for r, i in enumerate(val_idx)]
    has_rows = [len(i) > 0 for i in val_idx]
    live = list(range(runs))  # the run at each position of the stack

    def of_live():  # the live runs' validation rows and class weights
        val, val_mask = _padded([val_idx[r] for r in live], device)
        return val, val_mask, None if weight is None else weight[torch.tensor(live, device=weight.device)]

    val, val_mask, live_weight = of_live()
    if _graphed(cuda_graphs, device):  # captured on each run's first rows; every batch is copied in
        step = GraphedStackedStep(model, optimizer, x, y, live_weight, cfg.amp,
                                  torch.stack([i[:batch] for i in train_idx]).to(device))
    else:
        step = StackedStep(model, optimizer, x, y, live_weight, cfg.amp)
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        model.train()
        perms = []
        for r in live:
            idx, need = train_idx[r], steps * batch
            order = torch.cat([torch.randperm(len(idx), generator=orders[r]) for _ in range(-(-need // len(idx)))])
            perms.append(idx[order[:need]])
        perm = torch.stack(perms).to(device)  # (live runs, steps * batch)
        for b in range(steps):
            step(perm[:, b * batch:(b + 1) * batch])
        loss_sum, correct = step.take()
        lr = float(optimizer.param_groups[0]["lr"])
        scheduler.step()
        model.eval()
        with torch.no_grad(), autocast(device, cfg.amp):
            logits = model(x[val]).float()
            val_loss = _run_losses(logits, y[val], val_mask, live_weight).tolist()
            val_acc = (((logits.argmax(2) == y[val]) & val_mask).sum(1) / val_mask.sum(1).clamp(min=1)).tolist()
        seconds = time.perf_counter() - start
        train_loss, train_acc = [v / (steps * batch) for v in loss_sum], [v / (steps * batch) for v in correct]
        stays = []
        for pos, r in enumerate(live):
            vl = val_loss[pos] if has_rows[r] else math.nan
            histories[r].append({"epoch": epoch, "lr": lr, "train_loss": train_loss[pos],
                                 "train_accuracy": train_acc[pos], "val_loss": vl,
                                 "val_accuracy": val_acc[pos] if has_rows[r] else math.nan, "seconds": seconds})
            if has_val[r]:
                if vl < best_loss[r]:  # a NaN loss never is: it counts toward patience
                    best_loss[r], best_epoch[r], waited[r] = vl, epoch, 0
                    best[r] = model.state_of(pos)
                else:
                    waited[r] += 1
            if not has_val[r] or waited[r] < cfg.patience:
                stays.append(pos)
            elif best[r] is None:  # leaves without a finite validation loss: its last weights, as fit keeps
                best[r] = model.state_of(pos)
        if not stays:
            break
        if len(stays) < len(live):
            live = [live[pos] for pos in stays]
            val, val_mask, live_weight = of_live()
            step.keep(torch.tensor(stays, device=device), live_weight)
    for pos, r in enumerate(live):
        if best[r] is None:
            best[r] = model.state_of(pos)  # no validation loss: the last weights
    results = []
    for r in range(runs):
        h = histories[r]
        results.append({"history": h, "best_epoch": best_epoch[r] or len(h), "stopped_early": len(h) < cfg.epochs,
                        "state": best[r]})
    return results
