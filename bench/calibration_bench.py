"""What temperature scaling does to a cross-validation's test rows, side by side in one run.

Not a speed bench: calibration, measured. A synthetic Adience-like store (8 age classes, a
Gaussian mixture in the embedding space; tests.train.synthetic_store) with a share of its labels
replaced by random classes (Adience's age labels are a rater's guess; IMDB-WIKI's come from
birth dates and photo years, often wrong), a 5-fold cross-validation with the paper's age
settings, MC dropout K=32 as `agepipe train --cv` runs it. Each run's test rows are scored with
and without its own temperature (metrics.json "at_temperature_1"): both columns are the same runs'
same MC passes; only the division by T differs. A second table scores the runs' deterministic
softmax on the same test rows at T = 1, at the MC mean's T (what a run used for it before it had
its own) and at its own T ("deterministic_temperature").

    python bench/calibration_bench.py                      # about 3 minutes on 2 CPU cores
    python bench/calibration_bench.py --noise 0 0.2 0.4 --epochs 30 --seeds 2
    python bench/calibration_bench.py --noise 0 --dropout 0.5        # where the two T part
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agepipe.train.checkpoint import load_checkpoint, scoring_amp, temperature_for  # noqa: E402
from agepipe.train.data import load_task_data, make_split  # noqa: E402
from agepipe.train.evaluate import logits_of, reliability  # noqa: E402
from agepipe.train.loop import PAPER_TRAIN, TrainingWarning, cross_validate, data_record  # noqa: E402
from agepipe.train.model import paper_config  # noqa: E402
from tests.train.synthetic_store import FEATURE_SET, Mixture, adience_like, write_store  # noqa: E402


def noisy_store(root: Path, rows: int, noise: float) -> str:
    x, y = Mixture.make(seed=1).sample(rows, seed=2)
    rng = np.random.default_rng(3)
    y = np.where(rng.random(rows) < noise, rng.integers(0, 8, rows), y)
    return write_store(root, x, adience_like(y, subjects=200))


def json_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def deterministic_scores(run: Path, data) -> dict:
    """The run's deterministic softmax on its test rows: (ECE, cross-entropy) at each T."""
    model, config = load_checkpoint(run)
    rec = config["data"]
    test = torch.from_numpy(make_split(data.rows, rec["test_fold"], rec["val_fraction"]).test)
    logits, y = logits_of(model, data.x[test], scoring_amp(config, torch.device("cpu"))), data.y[test].numpy()
    out = {}
    for name, t in (("T = 1", 1.0), ("the MC mean's T", config["temperature"]),
                    ("its own T", temperature_for(config, 0))):
        probs = torch.softmax(logits / t, -1).numpy()
        likelihood = np.clip(probs[np.arange(len(y)), y], 1e-12, None)
        out[name] = (reliability(probs, y)["ece"], float(-np.log(likelihood).mean()))
    return out


def mean_std(values) -> str:
    return f"{np.mean(values):.4f} +- {np.std(values):.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--epochs", type=int, nargs="+", default=[30, 2],
                   help="epoch limits (30: the paper's, early stopping on; 2: a model stopped short)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--dropout", type=float, default=None,
                   help="the model's dropout (default: the paper's, 0.05; the MC mean and the deterministic softmax "
                        "part further the higher it is)")
    args = p.parse_args()
    table, det_table = [], []
    model = paper_config("age", 8)
    model = model if args.dropout is None else replace(model, dropout=args.dropout)
    with tempfile.TemporaryDirectory() as tmp:
        for noise in args.noise:
            store = noisy_store(Path(tmp) / f"store-{noise}", args.rows, noise)
            data = load_task_data(store, FEATURE_SET, ["adience"], "age")
            record = data_record(store, FEATURE_SET, ["adience"], None, 0.0)
            for epochs in args.epochs:
                out = Path(tmp) / f"cv-{noise}-{epochs}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", TrainingWarning)
                    cv = cross_validate(data, model, replace(PAPER_TRAIN["age"], epochs=epochs), out,
                                        record, seeds=args.seeds, mc_samples=args.mc_samples, progress=False)
                runs = [json_metrics(out / f"fold{r['fold']}-seed{r['seed']}") for r in cv["runs"]]
                temps = [m["calibration"]["temperature"] for m in runs]
                after = [m["test"].get("mc", m["test"]) for m in runs]
                # a run that fitted no T (too few rows, a flat likelihood) is its own "before"
                before = [m["test"].get("at_temperature_1", a) for m, a in zip(runs, after)]
                for key in ("ece", "cross_entropy", "accuracy"):
                    table.append((f"{noise:.0%}", str(epochs), key, mean_std([b[key] for b in before]),
                                  mean_std([a[key] for a in after]),
                                  f"{np.mean([a[key] / b[key] for a, b in zip(after, before)]):.3f}"))
                det = [deterministic_scores(out / f"fold{r['fold']}-seed{r['seed']}", data) for r in cv["runs"]]
                for i, key in enumerate(("ece", "cross_entropy")):
                    det_table.append((f"{noise:.0%}", str(epochs), key,
                                      *(mean_std([d[name][i] for d in det]) for name in det[0])))
                own = [m["calibration"].get("deterministic", {}).get("temperature", 1.0) for m in runs]
                print(f"label noise {noise:.0%}, at most {epochs} epochs: {len(runs)} runs, validation rows "
                      f"{mean_std([m['calibration']['rows'] for m in runs])}, T = {mean_std(temps)} "
                      f"(min {min(temps):.3f}, max {max(temps):.3f}); the deterministic softmax's T = {mean_std(own)}",
                      flush=True)
    print(f"\n{args.rows} rows, dropout {model.dropout}, 5 folds x {args.seeds} seed(s), test rows of each run, "
          f"final prediction (MC dropout mean, K={args.mc_samples}); mean +- std over runs")
    print("| label noise | epochs | metric | T = 1 | the run's T | after / before (mean of runs) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print("\nThe same runs' deterministic softmax on the same test rows")
    print("| label noise | epochs | metric | T = 1 | the MC mean's T | its own T |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in det_table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
