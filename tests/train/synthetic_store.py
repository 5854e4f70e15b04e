"""Synthetic feature stores for the training tests and bench/train_bench.py: real Parquet
shards written with the store's own writer, holding class-conditional Gaussians on the
unit sphere."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from agepipe.features import store as fstore
from agepipe.train.data import AGE_BIN_MIDPOINTS

FEATURE_SET = "synthetic-det640-00000000"


@dataclass(frozen=True)
class Mixture:
    """Class-conditional Gaussians, then projected onto the unit sphere. The class means are
    unit vectors in a ``rank``-dimensional subspace; the noise has standard deviation 1 in
    that subspace and ``perp`` across the other EMBEDDING_DIM - rank dimensions (real embeddings have
    a low intrinsic dimension too). The covariance is shared and isotropic on the subspace
    that holds the means, so the Bayes classifier is argmax_c mean_c . x, and projecting
    onto the sphere (a positive scaling) leaves that argmax unchanged."""
    means: np.ndarray   # (classes, EMBEDDING_DIM)
    basis: np.ndarray   # (EMBEDDING_DIM, EMBEDDING_DIM) orthonormal; the first ``rank`` columns span the means
    rank: int
    signal: float
    perp: float

    @classmethod
    def make(cls, classes: int = 8, rank: int = 16, signal: float = 2.8, perp: float = 0.1, seed: int = 0):
        rng = np.random.default_rng(seed)
        basis = np.linalg.qr(rng.standard_normal((fstore.EMBEDDING_DIM, fstore.EMBEDDING_DIM)))[0]
        m = rng.standard_normal((classes, rank))
        means = (m / np.linalg.norm(m, axis=1, keepdims=True)) @ basis[:, :rank].T
        return cls(means, basis, rank, signal, perp)

    def sample(self, n: int, seed: int = 1, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """``shift`` moves every point along a direction outside the means' subspace:
        inputs unlike any the model was trained on."""
        rng = np.random.default_rng(seed)
        y = rng.integers(0, len(self.means), n)
        # Noise covariance perp^2 I + (1 - perp^2) P, P the projection on the first ``rank`` columns.
        noise = self.perp * rng.standard_normal((n, fstore.EMBEDDING_DIM))
        noise += np.sqrt(1 - self.perp ** 2) * rng.standard_normal((n, self.rank)) @ self.basis[:, :self.rank].T
        x = self.signal * self.means[y] + noise
        x += shift * self.basis[:, -1]
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    def bayes_accuracy(self, n: int = 50_000, seed: int = 99) -> float:
        x, y = self.sample(n, seed)
        return float(((x @ self.means.T).argmax(1) == y).mean())


def write_store(root, embeddings: np.ndarray, rows: dict | pd.DataFrame, dataset: str = "adience",
                feature_set: str = FEATURE_SET, shard_rows: int = 4000, info: dict | None = None) -> str:
    """A feature store from arrays; columns not given get plausible defaults. Rows whose
    status is not "ok" get a null embedding, as the extractor writes them."""
    rows = pd.DataFrame(rows)
    n = len(embeddings)
    status = rows["status"].to_numpy() if "status" in rows else np.full(n, "ok", dtype=object)
    ok = status == "ok"
    col = lambda name, default: rows[name].to_numpy() if name in rows else default  # noqa: E731
    table = pa.table({
        "image_id": pa.array(col("image_id", np.array([f"{dataset}/img{i:07d}.jpg" for i in range(n)]))),
        "subject_id": pa.array(col("subject_id", np.array([f"s{i}" for i in range(n)]))),
        "fold": pa.array(col("fold", np.arange(n) % 5), pa.int8()),
        "age": pa.array(col("age", np.full(n, np.nan)), pa.float32()),
        "age_bin": pa.array(col("age_bin", np.full(n, -1)), pa.int8()),
        "gender": pa.array(col("gender", np.full(n, -1)), pa.int8()),
        "face_hint": pa.nulls(n, pa.list_(pa.float32(), 4)),
        "status": pa.array(status, pa.string()),
        "n_faces": pa.array(ok.astype(np.int16), pa.int16()),
        "det_score": pa.array(col("det_score", np.where(ok, 0.9, np.nan)), pa.float32()),
        "bbox": fstore.fixed_list(np.tile([10, 10, 110, 130], (n, 1)), 4, ok),
        "landmarks": fstore.fixed_list(np.zeros((n, 10)), 10, ok),
        "embedding": fstore.fixed_list(embeddings, fstore.EMBEDDING_DIM, ok),
        "embedding_norm": pa.array(np.where(ok, 20.0, np.nan), pa.float32()),
    })
    fstore.write_dataset(table, str(root), feature_set, dataset, shard_rows)
    fstore.write_feature_set_info(str(root), feature_set, info or {"pack": "buffalo_s", "det_size": 640})
    return str(root)


def adience_like(y: np.ndarray, subjects: int = 100, seed: int = 2) -> dict:
    """Labels for an age-class vector: Adience-style rows, each subject in one fold."""
    rng = np.random.default_rng(seed)
    subject = rng.integers(0, subjects, len(y))
    return {"subject_id": np.array([f"user{s:03d}" for s in subject]), "fold": subject % 5,
            "age_bin": y, "age": AGE_BIN_MIDPOINTS[y], "gender": rng.integers(0, 2, len(y))}


def age_gender_store(root, n_adience: int = 1500, n_imdb: int = 1500, n_wiki: int = 500, seed: int = 0) -> str:
    """Adience plus IMDB and WIKI, for pre-training: 16 classes of one mixture, class c meaning
    age class c // 2 and gender c % 2, so both tasks are learnable and pre-training transfers.
    IMDB-WIKI rows carry ages in years and no age_bin, as their manifests do for ages between
    Adience's ranges: training derives the class from the age."""
    mixture = Mixture.make(classes=16, seed=seed)
    x, y = mixture.sample(n_adience, seed=seed + 1)
    rows = adience_like(y // 2, seed=seed + 2)
    rows["gender"] = y % 2
    write_store(root, x, rows, dataset="adience")
    for k, (dataset, n) in enumerate((("imdb", n_imdb), ("wiki", n_wiki))):
        x, y = mixture.sample(n, seed=seed + 10 + k)
        rng = np.random.default_rng(seed + 20 + k)
        subject = rng.integers(0, n // 4, n)
        write_store(root, x, {"subject_id": np.array([f"{dataset}{s:05d}" for s in subject]), "fold": subject % 5,
                              "age": AGE_BIN_MIDPOINTS[y // 2] + rng.uniform(-1, 1, n), "age_bin": np.full(n, -1),
                              "gender": y % 2}, dataset=dataset)
    return str(root)
