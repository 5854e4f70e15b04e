"""The warm-up of a CUDA-graph capture is undone in place (train/graphs.py); the capture itself
needs a GPU (tests/train/test_batched.py, test_loop.py)."""
import torch

from agepipe.train import graphs
from agepipe.train.loop import PAPER_TRAIN, TrainStep, make_optimizer
from agepipe.train.model import ModelConfig, ResMLP


def _state(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()
             if p in optimizer.state})


def _trainer(seed=0):
    torch.manual_seed(seed)
    model = ResMLP(ModelConfig(num_classes=8, num_blocks=1, dropout=0.0)).train()  # no masks to draw
    optimizer = make_optimizer(model, PAPER_TRAIN["age"], torch.device("cpu"))
    x = torch.nn.functional.normalize(torch.randn(256, 512), dim=1)
    step = TrainStep(model, optimizer, x, torch.randint(0, 8, (256,)), amp=False)
    return model, optimizer, lambda: step(torch.arange(64))


def test_restore_puts_back_weights_buffers_and_optimizer_state_in_place():
    model, optimizer, step = _trainer()
    step(), step()  # mid-training: moments and step counts exist
    saved = graphs.snapshot(model, optimizer)
    before = _state(model, optimizer)
    pointers = [v.data_ptr() for v in model.state_dict().values()]
    for _ in range(graphs.WARM_UP_STEPS):
        step()
    after_warm_up = _state(model, optimizer)
    assert not torch.equal(after_warm_up[0]["head.weight"], before[0]["head.weight"])
    assert not torch.equal(after_warm_up[0]["blocks.1.ic.0.running_mean"], before[0]["blocks.1.ic.0.running_mean"])
    graphs.restore(model, optimizer, saved)
    restored = _state(model, optimizer)
    assert [v.data_ptr() for v in model.state_dict().values()] == pointers  # the graph's tensors stay
    for k, v in before[0].items():
        assert torch.equal(restored[0][k], v), k
    assert restored[1].keys() == before[1].keys()
    for name, state in before[1].items():
        for k, v in state.items():
            assert torch.equal(restored[1][name][k], v), (name, k)


def test_restore_before_the_first_step_leaves_a_fresh_optimizer_and_the_first_weights():
    model, optimizer, step = _trainer(1)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    saved = graphs.snapshot(model, optimizer)
    step()
    graphs.restore(model, optimizer, saved)
    for k, v in model.state_dict().items():
        assert torch.equal(v, first[k]), k
    moments = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    assert moments and all(not t.any() for t in moments)  # step counts included: as if never stepped
    # and training from there is training from the start: the same weights as a fresh trainer's
    fresh_model, _, fresh_step = _trainer(1)
    step(), fresh_step()
    torch.testing.assert_close(model.head.weight, fresh_model.head.weight)
