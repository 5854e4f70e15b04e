"""`agepipe predict`: faces in photos -> age and gender with MC-dropout uncertainty.

The embeddings must come from the same face models the runs were trained on: the runs
record the feature set's pack, det size and model hashes, which are the defaults here,
and a recogniser with another hash is refused (its embeddings live in another space).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch

from agepipe import atomic
from agepipe.features.embed import FaceEmbedder, in_original_pixels
from agepipe.features.images import ImageError, as_text, never_a_photo, read_photo_once
from agepipe.train.checkpoint import (CheckpointError, load_checkpoint, metrics_error, read_metrics, scoring_amp,
                                      temperature_for)
from agepipe.train.data import class_names
from agepipe.train.evaluate import (entropy, expected_age, fitted_for_another, logits_of, mc_dropout,
                                   uncertainty_measure)
from agepipe.train.model import ResMLP, has_dropout, resolve_device
from agepipe.train.report import headline

AGE_TASKS = ("age", "age101")


class Predictor:
    """The age and/or gender run, and the face models their embeddings came from."""

    def __init__(self, age_run: str | None, gender_run: str | None, models: str | None = None,
                 det_size: int | None = None, mc_samples: int = 32, device: str = "auto"):
        if not age_run and not gender_run:
            raise ValueError("give --age-model RUN, --gender-model RUN or both")
        self.device = resolve_device(device)
        self.runs, recorded = {}, {}  # kind -> (model, config); kind -> (run folder, its metrics.json)
        for kind, run, tasks in (("age", age_run, AGE_TASKS), ("gender", gender_run, ("gender",))):
            if run:
                model, config = load_checkpoint(run, self.device)
                if config["task"] not in tasks:
                    raise CheckpointError(f"{run}: a run for task {config['task']}; "
                                          f"--{kind}-model needs one for {' or '.join(tasks)}")
                self.runs[kind], recorded[kind] = (model, config), (run, read_metrics(run))
        # A model without dropout (--dropout 0) has nothing to sample: one deterministic pass, as the legend says.
        self.passes = {kind: mc_samples if has_dropout(model) else 0 for kind, (model, _) in self.runs.items()}
        # kind -> why its answers are no better than a constant guess (from the run's own test fold)
        self.cautions = {kind: c for kind, (run, metrics) in recorded.items() if (c := run_caution(kind, run, metrics))}
        self.warnings = []  # what the user should know that is not about one model's answers
        for kind, (run, metrics) in recorded.items():
            if other := fitted_for_another(metrics.get("calibration"), self.runs[kind][1], self.passes[kind], "predict"):
                self.warnings.append(f"the {kind} model: {other}")
        features = [c.get("data", {}).get("features", {}) for _, c in self.runs.values()]
        hashes = {f["recognizer_sha256"] for f in features if "recognizer_sha256" in f}
        names = {str(f["pack"]) for f in features if "pack" in f}
        if len(hashes) > 1 or (not hashes and len(names) > 1):
            raise CheckpointError("the age and gender runs were trained on embeddings from different face "
                                  f"models ({', '.join(sorted(names))}); one photo's faces cannot serve both")
        recorded = next((f for f in features if f), {})
        sizes = {kind: f["det_size"] for kind, f in zip(self.runs, features) if "det_size" in f}
        if det_size is None and len(set(sizes.values())) > 1:
            used = recorded["det_size"]
            other = " and ".join(kind for kind, size in sizes.items() if size != used)
            self.warnings.append(
                "the runs' faces were found at different det sizes (" + ", ".join(
                    f"{kind} {size}" for kind, size in sizes.items()) + f"); predict finds faces at {used}, so "
                f"the {other} model sees embeddings slightly unlike its training's (--det-size to choose)")
        self.embedder = FaceEmbedder(models or recorded.get("pack", "buffalo_s"),
                                     det_size=det_size or recorded.get("det_size", 640))
        want = recorded.get("recognizer_sha256")
        have = self.embedder.pack.identity()["recognizer_sha256"]
        if want and want != have:
            raise CheckpointError(
                f"the runs were trained on embeddings of recogniser sha256 {want[:12]}... "
                f"({recorded.get('pack')}); the models given have {have[:12]}... ({self.embedder.pack.name}). "
                "Use the same face models as the feature set (--models)")

    def faces(self, image: np.ndarray, photo_scale: float = 1.0) -> list[dict]:
        """Every face in a BGR photo with its predictions; boxes in the pixels of the original,
        ``photo_scale`` times the image's (images.Photo.scale)."""
        found = [in_original_pixels(f, photo_scale) for f in self.embedder.faces(image)]
        if not found:
            return []
        x = torch.from_numpy(np.stack([f.embedding for f in found])).to(self.device)
        out = [{"bbox": [round(float(v), 1) for v in f.bbox], "det_score": round(f.det_score, 4)} for f in found]
        for kind, (model, config) in self.runs.items():
            t = temperature_for(config, self.passes[kind])
            probs, h, mi = self._predict(model, x, self.passes[kind], scoring_amp(config, self.device), t)
            for face, p, hi, mii in zip(out, probs, h, mi):
                face[kind] = describe(config["task"], p, float(hi), mii, uncertainty_measure(self.passes[kind]), t)
        return out

    def _predict(self, model: ResMLP, x: torch.Tensor, passes: int, amp: bool, temperature: float):
        """In the run's precision (checkpoint.scoring_amp) and temperature, as evaluate scores it."""
        if passes > 0:
            mc = mc_dropout(model, x, passes, amp, temperature=temperature)
            return mc.probs, mc.predictive_entropy, mc.mutual_information
        probs = torch.softmax(logits_of(model, x, amp) / temperature, -1)
        return probs.cpu().numpy(), entropy(probs).cpu().numpy(), [None] * len(x)


# A face is "undecided" by a model when its MC-dropout predictive entropy exceeds this share of
# the maximum (ln of the number of classes), or the mutual information (the part of the
# uncertainty due to the weights) exceeds this many nats.
UNDECIDED_ENTROPY_SHARE = 0.75
UNDECIDED_MI = 0.05


def run_caution(kind: str, run: str | Path, metrics: dict | None = None) -> str | None:
    """A sentence when the run's own test fold says its predictions are no better than a
    constant guess (from its metrics.json, or ``metrics`` read from it; None when it beats its
    majority baseline, or held out no rows to say so: a table's pretrain run, whose scores are NaN)."""
    test = (read_metrics(run) if metrics is None else metrics).get("test", {})
    try:
        base = test.get("majority_baseline")
        if not base or not test.get("n", 1) or headline(test)["balanced_accuracy"] > base["balanced_accuracy"]:
            return None
    except (AttributeError, KeyError, TypeError) as e:
        raise metrics_error(run, f"its test scores: {type(e).__name__} {e}") from None
    return (f"the {kind} model did not beat its majority baseline ({base['class']} for every face) on its "
            "held-out fold: treat its answers as a constant guess")


def describe(task: str, probs: np.ndarray, h: float, mi: float | None, measure: str,
             temperature: float = 1.0) -> dict:
    """One model's answer for a face; ``measure`` names the entropy ``h`` (evaluate.uncertainty_measure),
    so JSON of runs with and without MC dropout does not mix two quantities under one key unsaid;
    ``temperature``, the run's, is what its logits were divided by (calibrate.py)."""
    names = class_names(task)
    k = int(probs.argmax())
    share = h / math.log(len(names))
    out = {"task": task, "predicted": names[k], "probability": round(float(probs[k]), 4),
           "predictive_entropy": round(h, 4), "uncertainty": measure, "entropy_share": round(share, 4),
           "mutual_information": None if mi is None else round(float(mi), 4), "temperature": round(temperature, 4),
           "undecided": bool(share > UNDECIDED_ENTROPY_SHARE or (mi is not None and mi > UNDECIDED_MI))}
    if task == "gender":
        out["p_female"], out["p_male"] = round(float(probs[0]), 4), round(float(probs[1]), 4)
    else:
        out["expected_age"] = round(float(expected_age(probs[None], task)[0]), 1)
        out["probs"] = dict(zip(names, (round(float(p), 4) for p in probs)))
    return out


def face_labels(face: dict, flagged=()) -> list[tuple[str, tuple]]:
    """The lines drawn beside a face with their colour: the same class and probability the text
    output leads with; orange and '?' where the model is undecided, grey and '!' where the
    model (a kind in ``flagged``) did not beat its majority baseline."""
    lines = []
    for kind in ("age", "gender"):
        if kind in face:
            d = face[kind]
            head = f"age {d['predicted']}" if kind == "age" else d["predicted"]
            text = f"{head} {d['probability']:.2f} unc {d['entropy_share']:.0%}"
            if d["undecided"]:
                lines.append((text + " ?", UNSURE))
            elif kind in flagged:
                lines.append((text + " !", FLAGGED))
            else:
                lines.append((text, DECIDED))
    return lines


def summary_line(face: dict) -> str:
    parts = [f"box {[round(v) for v in face['bbox']]} det {face['det_score']:.2f}"]
    if "age" in face:
        a = face["age"]
        parts.append(f"age {a['predicted']} (p {a['probability']:.2f}; expected age {a['expected_age']:.1f} y)"
                     + _uncertainty(a))
    if "gender" in face:
        g = face["gender"]
        parts.append(f"{g['predicted']} (p {g['predicted']} {g['probability']:.2f})" + _uncertainty(g))
    return "; ".join(parts)


def _uncertainty(d: dict) -> str:
    mi = "" if d["mutual_information"] is None else f", MI {d['mutual_information']:.3f}"
    flag = ", UNDECIDED" if d["undecided"] else ""
    return f" [entropy {d['predictive_entropy']:.3f} nats = {d['entropy_share']:.0%} of max{mi}{flag}]"


DECIDED, UNSURE, FLAGGED, INK = (0, 200, 0), (0, 140, 255), (170, 170, 170), (0, 0, 0)  # BGR
FONT = cv2.FONT_HERSHEY_SIMPLEX


def legend_lines(faces: list[dict], passes: dict[str, int] | int, cautions: dict | None = None) -> list[str]:
    """``passes``: each kind's MC-dropout passes (0: one deterministic pass), or one count for all."""
    kinds = [k for k in ("age", "gender") if any(k in f for f in faces)]
    hows = {k: f"mean of {n} MC-dropout passes" if (n := passes if isinstance(passes, int) else passes.get(k, 0))
            else "one deterministic pass" for k in kinds}
    how = next(iter(hows.values())) if len(set(hows.values())) == 1 else "; ".join(f"{k}: {h}" for k, h in hows.items())
    lines = [f"WARNING ('!', grey): {c}" for c in (cautions or {}).values()]
    if "age" in kinds:
        lines.append("e.g. 'age 25-32 0.41': the most likely Adience age class and its probability")
    if "gender" in kinds:
        lines.append("e.g. 'female 0.82': the more likely gender and its probability (p female + p male = 1)")
    lines += [f"unc N%: predictive entropy as a share of its maximum ({how})",
              f"orange box and line, '?': the model cannot decide: unc > {UNDECIDED_ENTROPY_SHARE:.0%} or mutual information "
              f"> {UNDECIDED_MI} nats"]
    return lines


def annotate(image: np.ndarray, faces: list[dict], passes: dict[str, int] | int = 32,
             cautions: dict | None = None, photo_scale: float = 1.0) -> np.ndarray:
    """A copy of the photo with each face's box and labels, placed inside the image and off
    each other, and a legend in a band added at the foot. Boxes are in the original's pixels,
    ``photo_scale`` times the image's (images.Photo.scale)."""
    height, width = image.shape[:2]
    thick = max(1, round(max(height, width) / 800))
    scale = 0.4 * max(1.0, max(height, width) / 800)
    out = image.copy()
    placed: list[tuple[int, int, int, int]] = []
    for face in sorted(faces, key=lambda f: (f["bbox"][1], f["bbox"][0])):
        x1, y1, x2, y2 = (int(round(v / photo_scale)) for v in face["bbox"])
        lines = face_labels(face, cautions or {})
        unsure = any(colour == UNSURE for _, colour in lines)
        cv2.rectangle(out, (x1, y1), (x2, y2), UNSURE if unsure else DECIDED, thick + unsure)
        sizes = [cv2.getTextSize(t, FONT, scale, thick) for t, _ in lines]
        line_h = max((h + b for (_, h), b in sizes), default=0) + 4
        w, h = max((sw for (sw, _), _ in sizes), default=0) + 4, line_h * len(lines)
        if not lines:
            continue
        left, top = label_place(x1, y1, y2, w, h, width, height, placed)
        placed.append((left, top, left + w, top + h))
        for i, (text, colour) in enumerate(lines):
            y = top + i * line_h
            cv2.rectangle(out, (left, y), (left + w, y + line_h), colour, -1)
            cv2.putText(out, text, (left + 2, y + line_h - 5), FONT, scale, INK, thick, cv2.LINE_AA)
    return add_legend(out, legend_lines(faces, passes, cautions), scale, thick)


def label_place(x1: int, y1: int, y2: int, w: int, h: int, width: int, height: int,
                placed: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Top-left corner of a w x h label: above the box, else below it, else stepped down until it
    overlaps no label already placed; always inside the image."""
    left = min(max(x1, 0), max(width - w, 0))
    candidates = [y1 - h, y2] + list(range(max(y1 - h, 0), height - h + 1, max(h // 2, 1)))
    for top in candidates:
        top = min(max(top, 0), max(height - h, 0))
        box = (left, top, left + w, top + h)
        if not any(_overlap(box, p) for p in placed):
            return left, top
    return left, min(max(y1 - h, 0), max(height - h, 0))


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def add_legend(image: np.ndarray, lines: list[str], scale: float, thick: int) -> np.ndarray:
    """The image on a white band holding the legend, its lines wrapped to the image's width."""
    lines = [part for line in lines for part in _wrap(line, image.shape[1] - 12, scale, thick)]
    line_h = cv2.getTextSize("Ag", FONT, scale, thick)[0][1] + 10
    band = np.full((line_h * len(lines) + 8, image.shape[1], 3), 255, dtype=image.dtype)
    red = False
    for i, text in enumerate(lines):
        red = text.startswith("WARNING") or (red and text.startswith("  "))
        cv2.putText(band, text, (6, (i + 1) * line_h), FONT, scale, (0, 0, 220) if red else INK, thick, cv2.LINE_AA)
    return np.vstack([image, band])


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Atomically, in the format the name's suffix says."""
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".jpg", image)
    if not ok:
        raise ValueError(f"{path}: cannot encode an image with suffix {path.suffix!r}")
    atomic.write_bytes(path, buf.tobytes())


def annotation_paths(annotate_to: str, images: list[str]) -> list[Path]:
    """OUT itself for one photo (unless OUT is a folder, or ends in a separator);
    OUT/<name>.annotated.jpg for each of several, where a name two photos share (a/photo.jpg,
    b/photo.jpg) takes their folders too (a_photo, b_photo)."""
    folder = os.path.isdir(annotate_to) or annotate_to.endswith((os.sep, "/"))
    if len(images) == 1 and not folder:
        suffix = Path(annotate_to).suffix
        if suffix and not cv2.haveImageWriter(annotate_to):  # checked before any photo, not at the first
            raise ValueError(f"{annotate_to}: cannot write a {suffix} image; give a name ending in .jpg or .png, "
                             "or a folder")
        never_a_photo([annotate_to], images, "--annotate")
        return [Path(annotate_to)]
    if os.path.lexists(annotate_to) and not folder:
        raise ValueError(f"{annotate_to}: a file, not a folder; with {len(images)} photos --annotate needs a "
                         "folder to write one annotated photo each into")
    stems = [Path(p).stem for p in images]
    repeated = {s for s, n in Counter(stems).items() if n > 1}  # not stems.count: minutes on 100,000 photos
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
    paths = [Path(annotate_to) / f"{name}.annotated.jpg" for name in names]
    never_a_photo(paths, images, "--annotate")
    return paths


def json_out_apart(json_out: str, annotate_to: str, images: list[str]) -> None:
    """ValueError where --json-out is a file --annotate writes: the JSON was written over the annotated
    photo, which predict said it had written there."""
    if os.path.realpath(json_out) in {os.path.realpath(t) for t in annotation_paths(annotate_to, images)}:
        raise ValueError(f"{json_out}: both --json-out and --annotate would write this file; give them "
                         "different names")


def predict_images(paths: list[str], predictor: Predictor, annotate_to: str | None = None):
    """One result per photo, yielded as each is done: its faces, or the error that kept it from
    being read. Photos are read as embed and extract read them (a large one reduced to
    images.MAX_SIDE, as its features were made; boxes in its own pixels), so a photo they take is
    one predict takes, with the same faces; the annotated copy is the reduced photo."""
    targets = annotation_paths(annotate_to, paths) if annotate_to else [None] * len(paths)
    for path, target in zip(paths, targets):
        try:
            photo = read_photo_once(path)
        except ImageError as e:
            yield {"image": as_text(path), "error": as_text(str(e)), "faces": []}
            continue
        faces = predictor.faces(photo.pixels, photo.scale)
        result = {"image": as_text(path), "faces": faces}
        if target is not None:
            try:
                write_image(target, annotate(photo.pixels, faces, predictor.passes, predictor.cautions, photo.scale))
            except OSError as e:
                raise ValueError(f"{atomic.cannot_write(target, e)}; give another --annotate") from None
            result["annotated"] = as_text(str(target))
        yield result


def _wrap(text: str, width: int, scale: float, thick: int) -> list[str]:
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and cv2.getTextSize(trial, FONT, scale, thick)[0][0] > width:
            out.append(line)
            line = "  " + word  # a continuation, indented
        else:
            line = trial
    return out + [line]
