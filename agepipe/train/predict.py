"""`agepipe predict`: faces in photos -> age and gender with MC-dropout uncertainty.

The embeddings must come from the same face models the runs were trained on: the runs
record the feature set's pack, det size and model hashes, which are the defaults here,
and a recogniser with another hash is refused (its embeddings live in another space).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from agepipe import atomic
from agepipe.features.embed import FaceEmbedder
from agepipe.features.images import ImageError, read_image
from agepipe.train.checkpoint import CheckpointError, load_checkpoint
from agepipe.train.data import class_names
from agepipe.train.evaluate import entropy, expected_age, logits_of, mc_dropout
from agepipe.train.model import ResMLP, has_dropout, resolve_device

AGE_TASKS = ("age", "age101")


class Predictor:
    """The age and/or gender run, and the face models their embeddings came from."""

    def __init__(self, age_run: str | None, gender_run: str | None, models: str | None = None,
                 det_size: int | None = None, mc_samples: int = 32, device: str = "auto"):
        if not age_run and not gender_run:
            raise ValueError("give --age-model RUN, --gender-model RUN or both")
        self.device = resolve_device(device)
        self.mc_samples = mc_samples
        self.runs = {}
        for kind, run, tasks in (("age", age_run, AGE_TASKS), ("gender", gender_run, ("gender",))):
            if run:
                model, config = load_checkpoint(run, self.device)
                if config["task"] not in tasks:
                    raise CheckpointError(f"{run}: a run for task {config['task']}; "
                                          f"--{kind}-model needs one for {' or '.join(tasks)}")
                self.runs[kind] = (model, config)
        features = [c["data"].get("features", {}) for _, c in self.runs.values()]
        hashes = {f["recognizer_sha256"] for f in features if "recognizer_sha256" in f}
        names = {str(f["pack"]) for f in features if "pack" in f}
        if len(hashes) > 1 or (not hashes and len(names) > 1):
            raise CheckpointError("the age and gender runs were trained on embeddings from different face "
                                  f"models ({', '.join(sorted(names))}); one photo's faces cannot serve both")
        recorded = next((f for f in features if f), {})
        self.embedder = FaceEmbedder(models or recorded.get("pack", "buffalo_s"),
                                     det_size=det_size or recorded.get("det_size", 640))
        want = recorded.get("recognizer_sha256")
        have = self.embedder.pack.identity()["recognizer_sha256"]
        if want and want != have:
            raise CheckpointError(
                f"the runs were trained on embeddings of recogniser sha256 {want[:12]}... "
                f"({recorded.get('pack')}); the models given have {have[:12]}... ({self.embedder.pack.name}). "
                "Use the same face models as the feature set (--models)")

    def faces(self, image: np.ndarray) -> list[dict]:
        """Every face in a BGR photo with its predictions."""
        found = self.embedder.faces(image)
        if not found:
            return []
        x = torch.from_numpy(np.stack([f.embedding for f in found])).to(self.device)
        out = [{"bbox": [round(float(v), 1) for v in f.bbox], "det_score": round(f.det_score, 4)} for f in found]
        for kind, (model, config) in self.runs.items():
            probs, h, mi = self._predict(model, x)
            for face, p, hi, mii in zip(out, probs, h, mi):
                face[kind] = describe(config["task"], p, float(hi), mii)
        return out

    def _predict(self, model: ResMLP, x: torch.Tensor):
        if self.mc_samples > 0 and has_dropout(model):
            mc = mc_dropout(model, x, self.mc_samples)
            return mc.probs, mc.predictive_entropy, mc.mutual_information
        probs = torch.softmax(logits_of(model, x), -1)
        return probs.cpu().numpy(), entropy(probs).cpu().numpy(), [None] * len(x)


def describe(task: str, probs: np.ndarray, h: float, mi: float | None) -> dict:
    names = class_names(task)
    k = int(probs.argmax())
    out = {"task": task, "predicted": names[k], "probability": round(float(probs[k]), 4),
           "predictive_entropy": round(h, 4),
           "mutual_information": None if mi is None else round(float(mi), 4)}
    if task == "gender":
        out["p_male"] = round(float(probs[1]), 4)
    else:
        out["expected_age"] = round(float(expected_age(probs[None], task)[0]), 1)
        out["probs"] = dict(zip(names, (round(float(p), 4) for p in probs)))
    return out


def summary_line(face: dict) -> str:
    parts = [f"box {[round(v) for v in face['bbox']]} det {face['det_score']:.2f}"]
    if "age" in face:
        a = face["age"]
        parts.append(f"age {a['predicted']} (p {a['probability']:.2f}), expected {a['expected_age']:.1f} y"
                     + _uncertainty(a))
    if "gender" in face:
        g = face["gender"]
        parts.append(f"{g['predicted']} (p male {g['p_male']:.2f})" + _uncertainty(g))
    return "; ".join(parts)


def _uncertainty(d: dict) -> str:
    mi = "" if d["mutual_information"] is None else f", MI {d['mutual_information']:.3f}"
    return f" [entropy {d['predictive_entropy']:.3f}{mi}]"


def annotate(image: np.ndarray, faces: list[dict]) -> np.ndarray:
    """A copy of the photo with each face's box and a short label."""
    out = image.copy()
    thick = max(1, round(max(image.shape[:2]) / 500))
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face["bbox"])
        label = []
        if "age" in face:
            label.append(f"{face['age']['expected_age']:.0f}y")
        if "gender" in face:  # the sex seen and how sure the model is of it
            p = face["gender"]["p_male"]
            label.append(f"{'M' if p >= 0.5 else 'F'} {max(p, 1 - p):.2f}")
        text = " ".join(label)
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 200, 0), thick)
        scale = 0.5 * thick
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        top = max(y1 - h - base - 2, 0)
        cv2.rectangle(out, (x1, top), (x1 + w + 2, top + h + base + 2), (0, 200, 0), -1)
        cv2.putText(out, text, (x1 + 1, top + h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    return out


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Atomically, in the format the name's suffix says."""
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".jpg", image)
    if not ok:
        raise ValueError(f"{path}: cannot encode an image with suffix {path.suffix!r}")
    atomic.write_bytes(path, buf.tobytes())


def annotation_paths(annotate_to: str, images: list[str]) -> list[Path]:
    """OUT itself for one photo; OUT/<name>.annotated.jpg for each of several, where a name
    two photos share (a/photo.jpg, b/photo.jpg) takes their folders too (a_photo, b_photo)."""
    if len(images) == 1:
        return [Path(annotate_to)]
    stems = [Path(p).stem for p in images]
    repeated = {s for s in stems if stems.count(s) > 1}
    if repeated:
        common = os.path.commonpath([os.path.abspath(p) for p in images])
        stems = [s if s not in repeated else
                 os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0].replace(os.sep, "_")
                 for s, p in zip(stems, images)]
    names, seen = [], set()
    for s in stems:
        name, k = s, 1
        while name in seen:  # still equal after the folders (a_b/photo, a/b_photo)
            k += 1
            name = f"{s}-{k}"
        seen.add(name)
        names.append(name)
    return [Path(annotate_to) / f"{name}.annotated.jpg" for name in names]


def predict_images(paths: list[str], predictor: Predictor, annotate_to: str | None = None) -> list[dict]:
    """One result per photo: its faces, or the error that kept it from being read."""
    results = []
    targets = annotation_paths(annotate_to, paths) if annotate_to else [None] * len(paths)
    for path, target in zip(paths, targets):
        try:
            image = read_image(path)
        except ImageError as e:
            results.append({"image": path, "error": str(e), "faces": []})
            continue
        faces = predictor.faces(image)
        result = {"image": path, "faces": faces}
        if target is not None:
            write_image(target, annotate(image, faces))
            result["annotated"] = str(target)
        results.append(result)
    return results
