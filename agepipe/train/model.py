"""The MLP of Kim 2021 (tae898/age-gender): residual blocks of "IC" layers on an embedding.

An IC layer (Independent Component, arXiv 1905.05928) is BatchNorm then Dropout. A stage is
``residuals_per_block`` residual blocks at width d followed by a downsample block to d/2;
a final Linear maps to the classes. The paper presets reproduce the original exactly,
including its quirk that the very first residual block takes the raw (already
L2-normalised) embedding without a leading IC layer.

Switches remove BatchNorm (``batch_norm=False``), dropout (``dropout=0``) or the skip
connection (``skip=False``): the paper's ablation variants.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn

from agepipe.features.store import EMBEDDING_DIM


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int
    num_blocks: int = 2
    residuals_per_block: int = 1
    dropout: float = 0.05
    batch_norm: bool = True
    skip: bool = True
    in_features: int = EMBEDDING_DIM
    first_ic: bool = False  # the original has no IC layer before the very first Linear

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.num_blocks < 0 or self.residuals_per_block < 0:
            raise ValueError("num_blocks and residuals_per_block must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.in_features >> self.num_blocks < 1:
            raise ValueError(f"{self.num_blocks} halvings of {self.in_features} features leave none")

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's architectures (Kim 2021, table of chosen hyper-parameters).
PAPER_BLOCKS = {"age": 2, "age101": 2, "gender": 4}


def paper_config(task: str, num_classes: int) -> ModelConfig:
    return ModelConfig(num_classes=num_classes, num_blocks=PAPER_BLOCKS[task], residuals_per_block=1,
                       dropout=0.05)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's mask for ``x``: True where a unit is kept, with probability 1 - p.

    On a CPU from 16 random bits per unit, four units per 64-bit draw: torch's CPU generator draws
    one number at a time on one thread, and ``torch.rand`` took 16% of a stacked cross-validation here
    (4x the time of the same bits drawn as int64). p is then rounded to a multiple of 1/65536
    (0.05 to 0.0500031), which moves p and 1 - p by under 0.1% where both are at least 2**-7.
    Elsewhere (CUDA draws in parallel), and for a p nearer 0 or 1, from ``torch.rand`` and a compare."""
    threshold = round(p * 65536) - 32768
    # Near 0 or 1 the rounding is most of p or of 1 - p: 1e-6 rounded to 0 (no dropout at all), 0.99999
    # kept 1.5x the units that 1 / (1 - p) scales for, and within 2**-17 of 1 the threshold 32768
    # wrapped to -32768 in the int16 compare (every unit kept). Such a p draws from torch.rand.
    if x.device.type != "cpu" or not 2 ** -7 <= p <= 1 - 2 ** -7:
        return torch.rand_like(x, dtype=torch.float32).ge(p)
    n = x.numel()
    bits = torch.empty(-(-n // 4), dtype=torch.int64).random_(-2 ** 63, None)  # every bit random
    return bits.view(torch.int16)[:n].view(x.shape).ge(threshold)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """What F.dropout does in training, with ``keep_mask`` (F.dropout's bernoulli_ took 5x as long on
    a CPU: measured), and 1 / (1 - p) applied as a Python number, which a CPU multiplies in float32
    before rounding each product once (nn.Dropout's bfloat16 scale is 1.0547 for p = 0.05, not
    1.0526)."""
    return x.mul(keep_mask(x, p)).mul_(1 / (1 - p))


class Dropout(nn.Dropout):
    """nn.Dropout, but ``dropout`` on a CPU: a cheaper mask, and on bfloat16 input (autocast) the
    exact scale: nn.Dropout's made each layer's output 0.2% too large on average there, in training
    and in every MC-dropout pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.device.type == "cpu"):
            return super().forward(x)
        return dropout(x, self.p)


def ic_layer(features: int, cfg: ModelConfig) -> nn.Module:
    layers = []
    if cfg.batch_norm:
        layers.append(nn.BatchNorm1d(features))
    if cfg.dropout > 0:
        layers.append(Dropout(cfg.dropout))
    return nn.Sequential(*layers) if layers else nn.Identity()


class Residual(nn.Module):
    """y = ReLU(W2 IC(ReLU(W1 IC(x))) + x)."""

    def __init__(self, features: int, cfg: ModelConfig, leading_ic: bool = True):
        super().__init__()
        self.ic1 = ic_layer(features, cfg) if leading_ic else nn.Identity()
        self.linear1 = nn.Linear(features, features)
        self.ic2 = ic_layer(features, cfg)
        self.linear2 = nn.Linear(features, features)
        self.skip = cfg.skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear2(self.ic2(torch.relu(self.linear1(self.ic1(x)))))
        return torch.relu(out + x if self.skip else out)


class DownSample(nn.Module):
    """IC, Linear d -> d/2, ReLU."""

    def __init__(self, features: int, cfg: ModelConfig):
        super().__init__()
        self.ic = ic_layer(features, cfg)
        self.linear = nn.Linear(features, features // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(self.ic(x)))


class ResMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        layers = []
        width = cfg.in_features
        for i in range(cfg.num_blocks):
            for j in range(cfg.residuals_per_block):
                layers.append(Residual(width, cfg, leading_ic=cfg.first_ic or (i, j) != (0, 0)))
            layers.append(DownSample(width, cfg))
            width //= 2
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> ResMLP:
        """A ResMLP holding ``state``'s tensors (shared, not copied): built on the meta device, so
        no random initialisation is drawn only to be overwritten (8 ms of CPU per model here, a
        table's 500 runs built each twice)."""
        with torch.device("meta"):
            model = cls(cfg)
        params = {name for name, _ in model.named_parameters()}
        # Parameters wrapped here: torch 2.1's assign= refuses a plain tensor for a Parameter.
        model.load_state_dict({k: nn.Parameter(v) if k in params else v for k, v in state.items()}, assign=True)
        return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mc_dropout_mode(model: nn.Module) -> nn.Module:
    """BatchNorm uses its running statistics while Dropout keeps sampling masks."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    return model


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: CUDA GPUs (Ampere and later in hardware;
    agepipe has trained in bfloat16 on every GPU), and CPUs with AVX512-BF16 or AMX (on this
    project's AVX512-BF16 CPU a bfloat16 batched matmul ran 2.4x float32's rate)."""
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16())


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    # torch's CPU probes are private; a torch without them gets float32.
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def precision(device: torch.device, amp: bool = True) -> str:
    """What training and scoring compute in: bfloat16 mixed precision where ``amp`` asks for it and
    the device has it natively (no loss scaling needed), float32 elsewhere."""
    return "bfloat16" if amp and bf16_native(device) else "float32"


def autocast(device: torch.device, enabled: bool = True):
    """The autocast context of ``precision``. No cast cache: each weight is used once per
    forward, and a cache cannot live in a CUDA graph."""
    if precision(device, enabled) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    return device
