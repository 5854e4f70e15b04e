"""Cross-validation runs trained at once as one stacked model (train/batched.py)."""
import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from agepipe.train.batched import StackedResMLP, fit_stacked
from agepipe.train.checkpoint import load_checkpoint
from agepipe.train.loop import TrainConfig, class_weights, train
from agepipe.train.model import ModelConfig, ResMLP, precision
from tests.train.synthetic_store import Mixture, adience_like, write_store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    mixture = Mixture.make(seed=5)
    x, y = mixture.sample(1200, seed=6)
    return write_store(tmp_path_factory.mktemp("small"), x, adience_like(y, subjects=60))


@pytest.mark.parametrize("variant", [{}, {"skip": False, "batch_norm": False}, {"dropout": 0.0}])
def test_a_stacked_runs_exported_weights_give_the_stacked_forward(variant):
    cfg = ModelConfig(num_classes=8, num_blocks=2, **variant)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(ResMLP(cfg))
    stacked = StackedResMLP(models)
    x = torch.nn.functional.normalize(torch.randn(3, 64, 512), dim=2)
    stacked.train()
    stacked(x)  # one training step's worth of BatchNorm statistics, so they differ per run
    stacked.eval()
    with torch.no_grad():
        out = stacked(x)
        for r in range(3):
            assert torch.allclose(stacked.export(r)(x[r]), out[r], atol=1e-5)
            assert torch.allclose(models[r].eval()(x[r]), out[r], atol=1e-5) == (not cfg.batch_norm)


@pytest.fixture
def one_thread():
    # Hundreds of tiny steps: at torch's default of a thread per core on a shared CPU, each op
    # waits on descheduled OpenMP peers (13x slower here, measured); one thread keeps them at seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("balance", [False, True])
def test_a_run_gives_the_same_numbers_whether_the_runs_beside_it_stop_or_not(balance, one_thread):
    # Runs that stop leave the stack (their weights and AdamW moments are cut out). Without
    # dropout nothing random is shared between runs, so each run of a 4-run stack must give the
    # numbers of the same run trained as a stack of one, where no other run ever stops.
    # (Not fit(): its separate matmuls round differently, and AdamW's first steps turn 1e-8
    # gradient differences into lr-sized ones, so only distributions compare; see below.)
    x, y = (torch.from_numpy(a) for a in Mixture.make(seed=5, signal=1.6).sample(1000, seed=7))
    cfg = TrainConfig(lr=0.01, weight_decay=1e-4, gamma=0.9, batch_size=32, epochs=12, patience=2, balance=balance)
    model_cfg = ModelConfig(num_classes=8, num_blocks=2, dropout=0.0)
    seeds, starts = [3, 4, 5, 6], []
    for seed in seeds:
        torch.manual_seed(seed)
        starts.append(ResMLP(model_cfg))
    rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    # Training splits of different sizes but the same number of batches per epoch.
    train_idx = [rows[100 * r:100 * r + 320 + 10 * r] for r in range(4)]
    val_idx = [rows[-100 * (r + 1):][:100] for r in range(4)]
    weight = torch.stack([class_weights(y[i], 8) for i in train_idx]) if balance else None

    def stack(runs):
        model = StackedResMLP([copy.deepcopy(starts[r]) for r in runs])
        results = fit_stacked(model, x, y, [train_idx[r] for r in runs], [val_idx[r] for r in runs], cfg,
                              [seeds[r] for r in runs], None if weight is None else weight[runs])
        return model, results

    together, results = stack([0, 1, 2, 3])
    epochs_run = [len(r["history"]) for r in results]
    assert len(set(epochs_run)) > 1 and min(epochs_run) < cfg.epochs, epochs_run  # runs left mid-training
    assert together.runs == epochs_run.count(max(epochs_run)) < len(seeds)  # the stack ends with the last ones
    for r in range(4):
        expected = stack([r])[1][0]
        got = results[r]
        assert got["best_epoch"] == expected["best_epoch"] and len(got["history"]) == len(expected["history"])
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            np.testing.assert_allclose([e[key] for e in got["history"]], [e[key] for e in expected["history"]],
                                       rtol=1e-5, atol=1e-6, err_msg=f"run {r} {key}")
        for name, tensor in expected["state"].items():
            torch.testing.assert_close(got["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=f"run {r} {name}")


def test_batched_cv_matches_sequential_runs_in_distribution(small_store, tmp_path, one_thread):
    def cv(batched):
        return train(small_store, ["adience"], "age", tmp_path / str(batched), cv=True, seeds=2, mc_samples=0,
                       progress=False, train_overrides={"epochs": 4}, batched=batched)

    runs = {b: cv(b) for b in (True, False)}
    _same_distribution(runs[True], runs[False])
    for k in range(5):
        run = tmp_path / "True" / f"fold{k}-seed1"
        config = json.loads((run / "config.json").read_text())
        assert config["data"]["test_fold"] == k and config["train"]["seed"] == 1
        model, _ = load_checkpoint(run)
        history = json.loads((run / "history.json").read_text())
        assert 1 <= history["best_epoch"] <= len(history["history"]) <= 4
    assert runs[True]["batched"] and not runs[False]["batched"]


def _same_distribution(a: dict, b: dict) -> None:
    """Two cross-validations over the same folds, seeds and schedule: their mean test accuracies
    may differ by the runs' sampling noise only, and both learn (chance: 1/8)."""
    acc_a, acc_b = (np.array([r["test_accuracy"] for r in cv["runs"]]) for cv in (a, b))
    noise = np.sqrt(acc_a.var(ddof=1) / len(acc_a) + acc_b.var(ddof=1) / len(acc_b))
    assert abs(acc_a.mean() - acc_b.mean()) <= 3 * noise + 0.01, (acc_a, acc_b)
    assert min(acc_a.mean(), acc_b.mean()) > 1 / 8


def test_bfloat16_training_matches_float32_in_distribution(small_store, tmp_path, one_thread, monkeypatch):
    # bfloat16 autocast wherever the device has it natively; forced here so that any CPU runs the
    # mixed-precision path (torch emulates it where the CPU lacks it), stacked and sequential.
    monkeypatch.setattr("agepipe.train.model.bf16_native", lambda device: True)
    runs = {}
    for batched in (True, False):
        for amp in (True, False):
            out = tmp_path / f"{batched}-{amp}"
            runs[batched, amp] = train(small_store, ["adience"], "age", out, cv=True, seeds=2, mc_samples=4,
                                       progress=False, train_overrides={"epochs": 4, "amp": amp}, batched=batched)
            config = json.loads((out / "fold0-seed0" / "config.json").read_text())
            assert config["precision"] == ("bfloat16" if amp else "float32")
        _same_distribution(runs[batched, True], runs[batched, False])
    monkeypatch.setattr("agepipe.train.model.bf16_native", lambda device: False)
    assert precision(torch.device("cpu"), True) == "float32"


def _runs_leaving(device):
    """A 4-run stack whose runs stop at different epochs, no dropout (the same arithmetic however
    the steps are launched): its fit_stacked results, given how a step is launched."""
    x, y = (torch.from_numpy(a).to(device) for a in Mixture.make(seed=5, signal=1.6).sample(1000, seed=7))
    cfg = TrainConfig(lr=0.01, weight_decay=1e-4, gamma=0.9, batch_size=32, epochs=12, patience=2, balance=True)
    model_cfg = ModelConfig(num_classes=8, num_blocks=2, dropout=0.0)
    rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx = [rows[100 * r:100 * r + 320 + 10 * r] for r in range(4)]
    val_idx = [rows[-100 * (r + 1):][:100] for r in range(4)]
    weight = torch.stack([class_weights(y[i.to(device)], 8) for i in train_idx])

    def fit(cuda_graphs):
        starts = []
        for seed in range(4):
            torch.manual_seed(seed)
            starts.append(ResMLP(model_cfg))
        model = StackedResMLP(starts).to(device)
        return fit_stacked(model, x, y, train_idx, val_idx, cfg, [0, 1, 2, 3], weight, cuda_graphs=cuda_graphs)
    return fit


def _same_training(eager, graphed, rtol):
    epochs_run = [len(r["history"]) for r in eager]
    assert len(set(epochs_run)) > 1 and min(epochs_run) < 12, epochs_run  # runs left mid-training
    for e, g in zip(eager, graphed):
        assert g["best_epoch"] == e["best_epoch"] and len(g["history"]) == len(e["history"])
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose([h[key] for h in g["history"]], [h[key] for h in e["history"]],
                                       rtol=rtol, atol=rtol / 10, err_msg=key)


def test_the_graphed_stack_replays_its_buffers_and_recaptures_as_runs_leave(monkeypatch, one_thread):
    # What a CUDA graph changes, short of the capture itself: the batch copied into a fixed index
    # buffer, the warm-up before each capture undone, a new capture (trimmed buffers, new sums and
    # class weights) whenever runs leave. A stand-in "graph" replays the step eagerly from those
    # buffers; the training must be the eager stack's, number for number.
    from agepipe.train import batched, graphs

    captures = []

    def eager_capture(step, model, optimizer):
        graphs.warm_up(step, model, optimizer)
        captures.append(model.runs)
        return type("Replay", (), {"replay": staticmethod(step)})()

    fit = _runs_leaving(torch.device("cpu"))
    eager = fit(False)
    monkeypatch.setattr(graphs, "capture", eager_capture)
    monkeypatch.setattr(batched, "_graphed", lambda cuda_graphs, device: cuda_graphs)
    _same_training(eager, fit(True), rtol=1e-6)
    assert captures[0] == 4 and captures == sorted(set(captures), reverse=True) and len(captures) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_graph_stack_trains_like_the_eager_stack_as_runs_leave():
    fit = _runs_leaving(torch.device("cuda"))
    _same_training(fit(False), fit(True), rtol=1e-4)


@pytest.mark.parametrize("case", ["weighs nothing", "nan"])
def test_fit_and_fit_stacked_agree_on_a_validation_loss_of_nan(case, one_thread):
    # "weighs nothing": under --balance, validation rows all of a class the training split lacks weigh
    # 0, so the loss is 0/0: there is no validation loss, as with an empty split (every epoch, the
    # last weights). "nan": rows whose loss is NaN (a model that overflows on them) never improve,
    # so patience runs out. NaN stood for "no validation rows" in both, and fit_stacked then kept the
    # last weights but recorded best epoch 1.
    from agepipe.train.loop import fit

    x, y = (torch.from_numpy(a) for a in Mixture.make(classes=3, seed=5, signal=1.6).sample(600, seed=7))
    train_idx, val_idx = torch.nonzero(y != 2)[:300, 0], torch.nonzero(y == 2)[:60, 0]
    if case == "nan":
        x[val_idx] = math.nan
    cfg = TrainConfig(lr=0.01, weight_decay=1e-4, gamma=0.9, batch_size=32, epochs=6, patience=2,
                      balance=case == "weighs nothing")
    weight = class_weights(y[train_idx], 3)[None] if cfg.balance else None
    torch.manual_seed(0)
    start = ResMLP(ModelConfig(num_classes=3, num_blocks=2, dropout=0.0))

    def stacked(epochs, val):
        model = StackedResMLP([copy.deepcopy(start)])
        return fit_stacked(model, x, y, [train_idx], [val], dataclasses.replace(cfg, epochs=epochs), [0], weight)[0]

    def single(epochs, val):
        model = copy.deepcopy(start)
        result = fit(model, x, y, train_idx, val, dataclasses.replace(cfg, epochs=epochs))
        return {**result, "state": model.state_dict()}

    epochs = cfg.epochs if case == "weighs nothing" else cfg.patience
    for fitted in (stacked, single):
        got = fitted(cfg.epochs, val_idx)
        assert len(got["history"]) == got["best_epoch"] == epochs, fitted
        assert all(math.isnan(h["val_loss"]) for h in got["history"])
        # The weights kept are those of the epoch recorded: the same run without validation, cut there.
        for name, tensor in fitted(epochs, val_idx[:0])["state"].items():
            torch.testing.assert_close(got["state"][name], tensor, msg=f"{fitted.__name__} {name}")
