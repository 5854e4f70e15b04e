"""Run folders: ``config.json`` (plain values) + ``model.safetensors`` (tensors only).

Nothing here unpickles: a checkpoint from a stranger is two data files, read with a JSON
parser and safetensors' header parser, then checked name by name and shape by shape
against the model its config describes. Anything else is a CheckpointError that names
the file and what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from agepipe.atomic import atomic_path
from agepipe.train.model import ModelConfig, ResMLP

FORMAT = "agepipe-run"
VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class CheckpointError(Exception):
    """A run folder that is missing, malformed or not an agepipe run."""


def write_json(path: str | Path, obj) -> None:
    """Atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, allow_nan=True)
        f.write("\n")


def save_checkpoint(run_dir: str | Path, model: ResMLP, config: dict) -> Path:
    """Write the weights and ``config`` (plus the model's own config) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors orders several in its header at random, and the same
    # training run should give the same file, byte for byte.
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(run_dir / CONFIG, {"format": FORMAT, "version": VERSION, **config,
                                  "model": model.config.to_dict()})
    return run_dir


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; is {run_dir} a run folder from `agepipe train`?")
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an agepipe run config (expected \"format\": \"{FORMAT}\")")
    if not isinstance(config.get("version"), int) or config["version"] > VERSION:
        raise CheckpointError(f"{path}: config version {config.get('version')!r} is not one this "
                              f"agepipe reads (<= {VERSION}); upgrade agepipe")
    model_config_from(config.get("model"), path)
    return config


def model_config_from(values, where) -> ModelConfig:
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: \"model\" must be an object of {', '.join(fields)}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CheckpointError(f"{where}: unknown model settings {unknown}")
    kinds = {"int": int, "float": (int, float), "bool": bool}
    for name, value in values.items():
        kind = kinds[fields[name].type]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise CheckpointError(f"{where}: model setting {name}={value!r} is not a {fields[name].type}")
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad model settings: {e}") from None


def read_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_weights(model: ResMLP, tensors: dict[str, torch.Tensor], where, skip: tuple[str, ...] = ()) -> None:
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in tensors.items() if not k.startswith(skip)}
    problems = [f"{k}: {tuple(given[k].shape)} {given[k].dtype}, model needs "
                f"{tuple(v.shape)} {v.dtype}" for k, v in expected.items()
                if k in given and (given[k].shape != v.shape or given[k].dtype != v.dtype)]
    problems += [f"missing {k}" for k in sorted(set(expected) - set(given))]
    problems += [f"unexpected {k}" for k in sorted(set(given) - set(expected))]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"{where}: weights do not fit the model in its config.json: {shown}")


def load_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ResMLP, dict]:
    """The model (in eval mode, on ``device``) and its run config."""
    config = read_config(run_dir)
    model = ResMLP(model_config_from(config["model"], Path(run_dir) / CONFIG))
    tensors = read_weights(run_dir)
    check_weights(model, tensors, Path(run_dir) / WEIGHTS)
    model.load_state_dict(tensors)
    return model.to(device).eval(), config


def init_from(model: ResMLP, run_dir: str | Path) -> list[str]:
    """Start ``model`` from another run's weights (pre-train, then fine-tune). The body must
    match; the head is taken only when its classes match too. Returns the names not taken."""
    theirs = model_config_from(read_config(run_dir)["model"], Path(run_dir) / CONFIG)
    mine = model.config
    if dataclasses.replace(theirs, num_classes=mine.num_classes) != mine:
        raise CheckpointError(f"{run_dir}: its model ({theirs}) differs from this one ({mine}) "
                              "in more than the number of classes")
    tensors = read_weights(run_dir)
    where = Path(run_dir) / WEIGHTS
    if theirs.num_classes == mine.num_classes:
        check_weights(model, tensors, where)
        model.load_state_dict(tensors)
        return []
    check_weights(model, tensors, where, skip=("head.",))
    body = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    model.load_state_dict(body, strict=False)
    return sorted(k for k in model.state_dict() if k.startswith("head."))
