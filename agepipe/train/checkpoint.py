"""Run folders: ``config.json`` (plain values) + ``model.safetensors`` (tensors only).

Nothing here unpickles: a checkpoint from a stranger is two data files, read with a JSON
parser and safetensors' header parser, then checked name by name and shape by shape
against the model its config describes. Anything else is a CheckpointError that names
the file and what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from agepipe.atomic import atomic_path
from agepipe.features.store import EMBEDDING_DIM
from agepipe.train.data import NUM_CLASSES
from agepipe.train.model import ModelConfig, ResMLP

FORMAT = "agepipe-run"
VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TASKS = ("age", "age101", "gender")
# A run's config.json is a few KB and its safetensors header a few KB; the paper's models have
# 2-4 blocks of one residual each. Far beyond these a file is not a run, and reading or
# building what it describes could cost gigabytes before anything else noticed.
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_BLOCKS = 16
MAX_RESIDUALS = 64
MAX_FEATURES = 1 << 14
MAX_CLASSES = 1 << 12


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
    # An earlier run's config.json goes before its weights are replaced: stopped between the two
    # writes, the folder is no run, not the new weights under the old run's settings.
    (run_dir / CONFIG).unlink(missing_ok=True)
    # One metadata key only: safetensors orders several in its header at random, and the same
    # training run should give the same file, byte for byte.
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # like the run's other files (safetensors writes 0600)
    write_json(run_dir / CONFIG, {"format": FORMAT, "version": VERSION, **config,
                                  "model": model.config.to_dict()})
    return run_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder agepipe wrote a run into (its config.json says so), not a link
    to one elsewhere: the only kind of folder a cross-validation may remove."""
    config = path / CONFIG
    if path.is_symlink() or not config.is_file() or config.stat().st_size > MAX_CONFIG_BYTES:
        return False
    try:
        found = json.loads(config.read_text())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(found, dict) and found.get("format") == FORMAT


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        if (Path(run_dir) / "cv.json").is_file():  # `train --cv` and table cells: the runs are inside
            runs = sorted(p for p in Path(run_dir).glob("fold*-seed*") if is_run_folder(p))
            example = f", e.g. {runs[0]}" if runs else ""
            raise CheckpointError(f"{run_dir} holds a cross-validation (cv.json), not a run: give one of its "
                                  f"fold<k>-seed<s> run folders{example}")
        raise CheckpointError(f"{path}: no such file; is {run_dir} a run folder from `agepipe train`?")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes; a run's config.json has a few KB")
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a run config") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an agepipe run config (expected \"format\": \"{FORMAT}\")")
    if not isinstance(config.get("version"), int) or config["version"] > VERSION:
        raise CheckpointError(f"{path}: config version {config.get('version')!r} is not one this "
                              f"agepipe reads (<= {VERSION}); upgrade agepipe")
    model = model_config_from(config.get("model"), path)
    if config.get("task") not in TASKS:
        raise CheckpointError(f"{path}: \"task\" is {config.get('task')!r}, not one of {', '.join(TASKS)}")
    if model.num_classes != NUM_CLASSES[config["task"]]:
        raise CheckpointError(f"{path}: a model of {model.num_classes} classes, but task {config['task']} has "
                              f"{NUM_CLASSES[config['task']]}")
    # Weights that fit such a config load, then fail on the first embedding with torch's "mat1 and mat2 shapes".
    if model.in_features != EMBEDDING_DIM:
        raise CheckpointError(f"{path}: a model of {model.in_features} input features, but the store's embeddings "
                              f"have {EMBEDDING_DIM}")
    if not isinstance(config.get("data", {}), dict):
        raise CheckpointError(f"{path}: \"data\" (where the run's rows came from) is not an object")
    if not isinstance(config.get("train", {}), dict):
        raise CheckpointError(f"{path}: \"train\" (the run's training settings) is not an object")
    check_data_record(config.get("data", {}), path)
    for key in ("temperature", "deterministic_temperature"):  # a run from before temperature scaling: none, as 1
        t = config.get(key, 1.0)
        if not (_number(t) and 0 < t < math.inf):
            raise CheckpointError(f"{path}: \"{key}\" is {t!r}, not a finite number > 0 (what the logits are "
                                  "divided by; 1 leaves them as they are)")
    return config


def temperature_for(config: dict, passes: int) -> float:
    """The T (calibrate.py) that divides the logits of a prediction of ``passes`` MC-dropout passes
    (0: the deterministic one). "temperature" was fitted for the prediction the run reports; a run
    that reports the MC mean has the deterministic softmax's own T beside it (not one from before)."""
    if passes == 0 and "deterministic_temperature" in config:
        return config["deterministic_temperature"]
    return config.get("temperature", 1.0)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What `evaluate` and `predict` read from a run's "data" record, and what each value must be: a
# value of another type would fail deep inside them (a TypeError, not a sentence naming the file),
# or quietly rebuild another split (a test_fold of "0" matches no row).
DATA_FIELDS = {
    "store": ("a string", lambda v: isinstance(v, str)),
    "feature_set": ("a string", lambda v: isinstance(v, str)),
    "datasets": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(d, str) for d in v)),
    "test_fold": ("a fold 0-4 or null", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)
                                                                and 0 <= v <= 4)),
    "val_fraction": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "min_det_score": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    "subjects": ("a string", lambda v: isinstance(v, str)),
    "features": ("an object", lambda v: isinstance(v, dict)),
}
FEATURE_FIELDS = {
    "pack": ("a string", lambda v: isinstance(v, str)),
    "det_size": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "detector_sha256": ("a string", lambda v: isinstance(v, str)),
    "recognizer_sha256": ("a string", lambda v: isinstance(v, str)),
}


def check_data_record(data: dict, path) -> None:
    """Refuse a "data" record whose values are not what `evaluate` and `predict` read them as."""
    for fields, record, where in ((DATA_FIELDS, data, "data"), (FEATURE_FIELDS, data.get("features", {}),
                                                                "data.features")):
        for name, (kind, ok) in fields.items():
            if name in record and not ok(record[name]):
                raise CheckpointError(f"{path}: {where}.{name} is {record[name]!r}, not {kind}")


def metrics_error(run_dir: str | Path, why: str) -> CheckpointError:
    return CheckpointError(f"{Path(run_dir) / 'metrics.json'}: not a metrics file of `agepipe train` ({why}); "
                           f"remove it and `agepipe evaluate {run_dir}` scores the run again")


def read_metrics(run_dir: str | Path) -> dict:
    """The run's metrics.json as a dict ({} when there is none)."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise metrics_error(run_dir, f"not valid JSON: {e}") from None
    if not isinstance(metrics, dict):
        raise metrics_error(run_dir, "not a JSON object")
    return metrics


def scoring_amp(config: dict, device: torch.device) -> bool:
    """Whether a run is scored under bfloat16 autocast: as it trained. Its "precision" says what
    ran; a run from before agepipe recorded one trained in bfloat16 only on a GPU (train.amp on),
    on a CPU in float32, and is scored as it was then."""
    if "precision" in config:
        return config["precision"] == "bfloat16"
    return bool(config.get("train", {}).get("amp", True)) and torch.device(device).type == "cuda"


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
    bounds = {"num_blocks": MAX_BLOCKS, "residuals_per_block": MAX_RESIDUALS, "in_features": MAX_FEATURES,
              "num_classes": MAX_CLASSES}
    for name, most in bounds.items():
        if name in values and not 0 <= values[name] <= most:
            raise CheckpointError(f"{where}: model setting {name}={values[name]!r} is outside 0..{most}")
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad model settings: {e}") from None


def weights_header(path: Path) -> dict[str, dict]:
    """The safetensors header (tensor name -> dtype, shape, offsets), read with a byte bound
    and checked for consistency with the file's size before any tensor is read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a readable safetensors file (shorter than its header)")
            n = struct.unpack("<Q", head)[0]
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a readable safetensors file (a header of {n:,} bytes; a run's has a few KB)")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (its header: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    size = path.stat().st_size - 8 - n
    for name, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and \
            all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in entry["shape"]) and \
            isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2 and \
            all(isinstance(o, int) and 0 <= o <= size for o in entry["data_offsets"])
        if not ok:
            raise CheckpointError(f"{path}: not a readable safetensors file (tensor {name!r}: a malformed header entry)")
    return header


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32"}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of the model's tensors, from its config alone: built on the
    meta device, which allocates no memory (the config's values are bounded already)."""
    with torch.device("meta"):
        model = ResMLP(cfg)
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}


def check_header(cfg: ModelConfig, path: Path, skip: tuple[str, ...] = ()) -> None:
    """Refuse weights whose names, shapes or dtypes differ from the model's, before reading them."""
    header = weights_header(path)
    expected = {k: v for k, v in expected_tensors(cfg).items() if not k.startswith(skip)}
    names = {code: str(dtype) for dtype, code in _DTYPES.items()}
    given = {k: (tuple(e["shape"]), names.get(e.get("dtype"), str(e.get("dtype"))))
             for k, e in header.items() if not k.startswith(skip)}
    problems = [f"{k}: {given[k][0]} {given[k][1]}, model needs {v[0]} {v[1]}"
                for k, v in expected.items() if k in given and given[k] != v]
    problems += [f"missing {k}" for k in sorted(set(expected) - set(given))]
    problems += [f"unexpected {k}" for k in sorted(set(given) - set(expected))]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"{path}: weights do not fit the model in its config.json: {shown}")


def read_weights(run_dir: str | Path, cfg: ModelConfig, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors, once the header shows they fit ``cfg``; refused when any is NaN or infinite
    (such a model would predict "female (p male nan)")."""
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    check_header(cfg, path, skip)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"{path}: weights hold NaN or infinite values ({', '.join(bad[:4])}"
                              + (f" and {len(bad) - 4} more" if len(bad) > 4 else "") + "); retrain the run")
    return tensors


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
    cfg = model_config_from(config["model"], Path(run_dir) / CONFIG)
    tensors = read_weights(run_dir, cfg)  # checked against cfg before the model is built
    with torch.device("meta"):
        check_weights(ResMLP(cfg), tensors, Path(run_dir) / WEIGHTS)
    return ResMLP.from_state(cfg, tensors).to(device).eval(), config


# The train options that set a ModelConfig field, named where --init refuses another architecture.
INIT_OPTIONS = {"num_blocks": "--blocks", "residuals_per_block": "--residuals-per-block", "dropout": "--dropout",
                "batch_norm": "--no-batch-norm", "skip": "--no-skip"}


def init_from(model: ResMLP, run_dir: str | Path) -> list[str]:
    """Start ``model`` from another run's weights (pre-train, then fine-tune). The body must
    match; the head is taken only when its classes match too. Returns the names not taken."""
    theirs = model_config_from(read_config(run_dir)["model"], Path(run_dir) / CONFIG)
    mine = model.config
    if dataclasses.replace(theirs, num_classes=mine.num_classes) != mine:
        differ = [f"{f.name} {getattr(theirs, f.name)} there, {getattr(mine, f.name)} here"
                  + (f" ({INIT_OPTIONS[f.name]})" if f.name in INIT_OPTIONS else "")
                  for f in dataclasses.fields(mine)
                  if f.name != "num_classes" and getattr(theirs, f.name) != getattr(mine, f.name)]
        raise CheckpointError(f"{run_dir}: --init needs its architecture, the number of classes aside: "
                              + "; ".join(differ) + ". Leave those options out to take the init run's")
    same_head = theirs.num_classes == mine.num_classes
    tensors = read_weights(run_dir, theirs, skip=() if same_head else ("head.",))
    where = Path(run_dir) / WEIGHTS
    if same_head:
        check_weights(model, tensors, where)
        model.load_state_dict(tensors)
        return []
    check_weights(model, tensors, where, skip=("head.",))
    body = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    model.load_state_dict(body, strict=False)
    return sorted(k for k in model.state_dict() if k.startswith("head."))
