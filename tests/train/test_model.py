import pytest
import torch
from torch import nn

from agepipe.train.model import ModelConfig, ResMLP, count_parameters, mc_dropout_mode, paper_config


@pytest.mark.parametrize("task,classes,expected", [("age", 8, 825_736), ("age101", 101, 837_733),
                                                   ("gender", 2, 877_602)])
def test_paper_presets_have_the_originals_parameter_counts(task, classes, expected):
    assert count_parameters(ResMLP(paper_config(task, classes))) == expected


def test_paper_age_model_shapes():
    model = ResMLP(paper_config("age", 8))
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [512, 512, 256, 256, 256, 128, 8]
    assert model(torch.randn(4, 512)).shape == (4, 8)
    gender = ResMLP(paper_config("gender", 2))
    assert [m.out_features for m in gender.modules() if isinstance(m, nn.Linear)][-3:] == [64, 32, 2]


def test_only_the_very_first_residual_block_lacks_its_leading_ic_layer():
    model = ResMLP(ModelConfig(num_classes=8, num_blocks=2, residuals_per_block=2))
    residuals = [m for m in model.blocks if hasattr(m, "ic1")]
    assert isinstance(residuals[0].ic1, nn.Identity)
    assert all(isinstance(r.ic1[0], nn.BatchNorm1d) and isinstance(r.ic1[1], nn.Dropout) for r in residuals[1:])
    # One leading IC layer (BatchNorm 512: 1,024 parameters) more when asked for.
    with_first = ResMLP(ModelConfig(num_classes=8, num_blocks=2, residuals_per_block=2, first_ic=True))
    assert count_parameters(with_first) - count_parameters(model) == 1024


def test_ablation_switches_remove_what_they_name():
    def kinds(cfg):
        return {type(m) for m in ResMLP(cfg).modules()}
    assert nn.BatchNorm1d not in kinds(ModelConfig(num_classes=8, batch_norm=False))
    assert nn.Dropout not in kinds(ModelConfig(num_classes=8, dropout=0.0))
    assert not kinds(ModelConfig(num_classes=8, batch_norm=False, dropout=0.0)) & {nn.BatchNorm1d, nn.Dropout}
    # BatchNorm has 2 parameters per feature; the paper age model normalises 2 x 512 + 3 x 256 features.
    assert count_parameters(ResMLP(ModelConfig(num_classes=8, batch_norm=False))) == 825_736 - 2 * 1792


def test_skip_switch_changes_the_function_not_the_weights():
    torch.manual_seed(0)
    with_skip = ResMLP(ModelConfig(num_classes=8, skip=True)).eval()
    without = ResMLP(ModelConfig(num_classes=8, skip=False)).eval()
    without.load_state_dict(with_skip.state_dict())
    x = torch.randn(16, 512)
    block, plain = with_skip.blocks[0], without.blocks[0]
    inner = block.linear2(block.ic2(torch.relu(block.linear1(x))))
    assert torch.allclose(block(x), torch.relu(inner + x))
    assert torch.allclose(plain(x), torch.relu(inner))


def test_mc_dropout_mode_keeps_batchnorm_frozen_and_dropout_sampling():
    model = ResMLP(ModelConfig(num_classes=8, dropout=0.5))
    mc_dropout_mode(model)
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert all(m.training for m in model.modules() if isinstance(m, nn.Dropout))
    x = torch.randn(8, 512)
    before = model.blocks[1].ic[0].running_mean.clone()
    assert not torch.equal(model(x), model(x))
    assert torch.equal(model.blocks[1].ic[0].running_mean, before)



def test_dropout_of_a_bfloat16_input_keeps_the_mean():
    """Under autocast a CPU's dropout sees bfloat16: nn.Dropout scaled the kept units by 1 / 0.95 rounded
    to bfloat16 (1.0547), so a layer's mean output was 1.002 times its input, in training and in each MC pass."""
    from agepipe.train.model import ic_layer

    torch.manual_seed(0)
    dropout = ic_layer(8, ModelConfig(num_classes=2, batch_norm=False, dropout=0.05)).train()
    x = (torch.rand(4_000_000) + 0.5).to(torch.bfloat16)  # activations of many values, as a layer's are
    out = dropout(x)
    assert out.dtype == torch.bfloat16
    assert abs(out.double().sum().item() / x.double().sum().item() - 1) < 6e-4  # the ratio's sd: about 1.2e-4
    assert (out == 0).float().mean().item() == pytest.approx(0.05, abs=6e-4)
    assert torch.equal(dropout.eval()(torch.ones(3, dtype=torch.bfloat16)), torch.ones(3, dtype=torch.bfloat16))

def test_keep_mask_on_a_cpu_uses_every_bit_of_its_draws():
    """The CPU mask takes four 16-bit lanes from each 64-bit draw: each lane must keep units at
    1 - p and be independent of its neighbours (a lane whose top bit never varied, as an int64
    random_ without its full range gives, would drop all or none)."""
    from agepipe.train.model import keep_mask

    torch.manual_seed(0)
    for p in (0.05, 0.5):
        lanes = keep_mask(torch.empty(4 * 500_000 + 3), p)[:-3].view(-1, 4).float()  # an odd size is cut to fit
        assert lanes.mean(0).tolist() == pytest.approx([1 - p] * 4, abs=3e-3)
        both = (lanes[:, :3] * lanes[:, 1:]).mean(0)  # neighbours kept together as often as chance says
        assert both.tolist() == pytest.approx([(1 - p) ** 2] * 3, abs=3e-3)
    torch.manual_seed(1)
    first = keep_mask(torch.empty(64, 9), 0.3)
    torch.manual_seed(1)
    assert first.shape == (64, 9) and torch.equal(first, keep_mask(torch.empty(64, 9), 0.3))  # seeded


def test_keep_mask_of_a_rate_within_2_to_the_minus_17_of_one_keeps_almost_nothing():
    """A p that rounds to 65536/65536 made the 16-bit threshold 32768, which an int16 compare wraps
    to -32768: every unit was kept, then scaled by 1 / (1 - p) (over 100,000x)."""
    from agepipe.train.model import dropout, keep_mask

    torch.manual_seed(0)
    for p in (0.999995, 1 - 1e-7):
        assert keep_mask(torch.empty(100_000), p).float().mean().item() < 1e-3
        assert dropout(torch.ones(100_000), p).mean().item() < 100  # about 1, not 1 / (1 - p)


def test_keep_mask_of_a_rate_near_0_or_1_is_not_rounded_to_another():
    """16 bits round p to a multiple of 1/65536: 5e-6 rounded to 0 and dropped nothing (while MC dropout
    took its passes as samples), and 0.99999 kept 1/65536 of the units, 1.5x the 1 - p that
    1 / (1 - p) scales for, so each layer's output came out 1.5x too large."""
    from agepipe.train.model import dropout, keep_mask

    torch.manual_seed(0)
    assert not keep_mask(torch.empty(4_000_000), 5e-6).all()  # about 20 dropped
    assert dropout(torch.ones(20_000_000), 0.99999).mean().item() == pytest.approx(1, abs=0.25)  # not 1.5


@pytest.mark.parametrize("bad", [dict(num_classes=1), dict(num_classes=8, dropout=1.0),
                                 dict(num_classes=8, num_blocks=10)])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_from_state_holds_the_given_tensors_and_draws_no_random_numbers():
    cfg = paper_config("age", 8)
    trained = ResMLP(cfg)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    trained.blocks[0].ic2[0].running_var.fill_(2.0)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    before = torch.get_rng_state()
    model = ResMLP.from_state(cfg, state)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in model.parameters())
    x = torch.randn(5, 512)
    assert torch.equal(model.eval()(x), trained.eval()(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        ResMLP.from_state(cfg, {k: v for k, v in state.items() if k != "head.bias"})
