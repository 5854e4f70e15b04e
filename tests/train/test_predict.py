"""`agepipe predict` on real photos with the offline buffalo_s face models. The MLPs are
trained for an epoch on a synthetic store: what is checked is the wiring (faces, shapes,
probabilities, uncertainty, annotation), not the ages."""
import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from agepipe.cli import cli
from agepipe.train.data import AGE_BIN_MIDPOINTS
from agepipe.train.checkpoint import CheckpointError, load_checkpoint
from agepipe.train.loop import train
from agepipe.train.model import autocast
from agepipe.train.predict import (UNDECIDED_ENTROPY_SHARE, UNDECIDED_MI, Predictor, face_labels,
                                   label_place, legend_lines)


@pytest.fixture(scope="module")
def runs(gaussian_store, tmp_path_factory):
    store, _ = gaussian_store
    out = tmp_path_factory.mktemp("predict-runs")
    for task in ("age", "gender"):
        train(store, ["adience"], task, out / task, mc_samples=0, report=False, progress=False,
              train_overrides={"epochs": 1})
    return out / "age", out / "gender"


def test_predict_json_and_annotation(runs, photos, tmp_path, embedder):
    age, gender = runs
    annotated = tmp_path / "out.jpg"
    result = CliRunner().invoke(cli, ["predict", str(photos["t1"]), "--age-model", str(age), "--gender-model",
                                      str(gender), "--mc-samples", "8", "--json", "--annotate", str(annotated),
                                      "--json-out", str(tmp_path / "all.json")])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert json.loads((tmp_path / "all.json").read_text()) == [record]
    faces = record["faces"]
    assert len(faces) == 6  # insightface's t1.jpg
    image = cv2.imread(str(photos["t1"]))
    boxes = embedder.detector([image])[0].boxes  # the onnxruntime path finds the same six faces
    np.testing.assert_allclose(sorted(face["bbox"] for face in faces), sorted(boxes.tolist()), atol=0.1)
    for face in faces:
        age, gender = face["age"], face["gender"]
        probs = np.array(list(age["probs"].values()))
        # the reported numbers are one consistent reading of the MC-dropout mean probabilities
        assert age["expected_age"] == pytest.approx(probs @ AGE_BIN_MIDPOINTS, abs=0.15)
        assert age["predicted"] == list(age["probs"])[int(probs.argmax())] and age["probability"] == probs.max()
        for d, p in ((age, probs), (gender, np.array([gender["p_female"], gender["p_male"]]))):
            h = -(p * np.log(np.clip(p, 1e-12, 1))).sum()
            assert d["predictive_entropy"] == pytest.approx(h, abs=2e-3)
            assert d["entropy_share"] == pytest.approx(d["predictive_entropy"] / np.log(len(p)), abs=1e-3)
            assert 0 <= d["mutual_information"] <= d["predictive_entropy"] + 1e-4  # MI = H[mean] - mean H
            assert d["uncertainty"] == "MC-dropout predictive entropy (K=8)"
        for kind in ("age", "gender"):  # the text leads with what the image shows
            d = face[kind]
            assert f"{d['predicted']} {d['probability']:.2f}" in " ".join(t for t, _ in face_labels(face))
            assert d["undecided"] == (d["entropy_share"] > UNDECIDED_ENTROPY_SHARE
                                      or d["mutual_information"] > UNDECIDED_MI)
    drawn = cv2.imread(str(annotated))
    # the photo, untouched outside the labels, above a white legend band
    assert drawn.shape[1] == image.shape[1] and drawn.shape[0] > image.shape[0]
    assert not np.array_equal(drawn[:image.shape[0]], image)
    band = drawn[image.shape[0]:]
    assert (band > 200).mean() > 0.7 and (band < 100).any()  # white, with dark text (more lines when a model warns)


def test_a_photo_embed_reads_reduced_is_predicted_as_its_features_were_made(runs, photos, tmp_path, embedder):
    """predict decoded every photo at full size under images.MAX_PIXELS: an 8400x8400 photo that embed
    and extract read reduced (1/2 by the JPEG decoder, then to 4096) was 'more than the 64,000,000
    pixels agepipe decodes' to predict alone, and a photo under the bound was detected and cropped at
    full size, not as the features its models were trained on were made. It now reads as they do."""
    from agepipe.features.embed import in_original_pixels
    from agepipe.features.images import read_photo

    small = cv2.imread(str(photos["astronaut"]))
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), cv2.resize(small, (8400, 8400)), [cv2.IMWRITE_JPEG_QUALITY, 70])
    age, _ = runs
    result = CliRunner().invoke(cli, ["predict", str(path), "--age-model", str(age), "--mc-samples", "0", "--json",
                                      "--annotate", str(tmp_path / "annotated.jpg")])
    assert result.exit_code == 0, result.output
    [face] = json.loads(result.output.strip().splitlines()[-1])["faces"]
    photo = read_photo(str(path))
    [found] = embedder.faces(photo.pixels)
    np.testing.assert_allclose(face["bbox"], in_original_pixels(found, photo.scale).bbox, atol=0.1)  # embed's box
    np.testing.assert_allclose(np.array(face["bbox"]) * 512 / 8400, embedder.faces(small)[0].bbox, atol=3)
    assert cv2.imread(str(tmp_path / "annotated.jpg")).shape[1] == 4096  # drawn on the photo as read


def test_labels_stay_inside_the_image_and_off_each_other():
    placed = []
    width, height = 400, 300
    # five faces side by side at the top edge, labels wider than the faces, one at the right edge
    for x in (0, 40, 80, 120, 360):
        left, top = label_place(x, 2, 40, 120, 30, width, height, placed)
        assert 0 <= left and left + 120 <= width and 0 <= top and top + 30 <= height
        box = (left, top, left + 120, top + 30)
        assert not any(box[0] < p[2] and p[0] < box[2] and box[1] < p[3] and p[1] < box[3] for p in placed)
        placed.append(box)


def test_predict_text_and_legend_say_what_the_numbers_are(runs, photos):
    age, gender = runs
    result = CliRunner().invoke(cli, ["predict", str(photos["astronaut"]), "--age-model", str(age),
                                      "--gender-model", str(gender), "--mc-samples", "8"])
    assert result.exit_code == 0, result.output
    line = result.output.split("face 0: ")[1]
    assert "(p female " in line or "(p male " in line
    assert "expected age" in line and "% of max" in line
    lines = legend_lines([{"age": {}, "gender": {}}], 8, {"gender": "the gender model did not beat ..."})
    assert lines[0].startswith("WARNING ('!', grey): the gender model")
    face = {"gender": {"predicted": "male", "probability": 0.99, "entropy_share": 0.1, "undecided": False}}
    assert face_labels(face)[0][0] == "male 0.99 unc 10%"
    assert face_labels(face, {"gender": "..."})[0][0] == "male 0.99 unc 10% !"
    assert any("p female + p male = 1" in t for t in lines) and any("mean of 8 MC-dropout passes" in t for t in lines)
    assert any(f"mutual information > {UNDECIDED_MI} nats" in t for t in lines)


def test_deterministic_prediction_is_the_model_on_the_face_embedding(runs, photos, embedder):
    age, _ = runs
    predictor = Predictor(str(age), None, mc_samples=0)
    image = cv2.imread(str(photos["astronaut"]))
    faces = predictor.faces(image)
    assert len(faces) == 1 and "gender" not in faces[0]
    model, config = load_checkpoint(age)
    assert config["temperature"] != 1.0  # the run's temperature scaling: the logits are divided by it
    embedding = torch.from_numpy(embedder.faces(image)[0].embedding[None])
    with torch.no_grad(), autocast(torch.device("cpu")):  # the run's precision (train.amp on)
        expected = torch.softmax(model(embedding).float() / config["temperature"], -1)[0].numpy()
    assert np.allclose(list(faces[0]["age"]["probs"].values()), expected, atol=1e-4)
    assert faces[0]["age"]["temperature"] == round(config["temperature"], 4)
    assert faces[0]["age"]["mutual_information"] is None
    assert faces[0]["age"]["uncertainty"] == "softmax entropy (deterministic)"


def test_unreadable_photos_are_reported_and_the_rest_predicted(runs, photos, tmp_path):
    age, gender = runs
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    result = CliRunner().invoke(cli, ["predict", str(broken), str(photos["astronaut"]), "--age-model", str(age),
                                      "--mc-samples", "4"])
    assert result.exit_code == 1
    assert "broken.jpg: " in result.output and "astronaut.png: 1 face(s)" in result.output
    assert "1 of 2 images could not be read" in result.output
    assert f"{broken}: {broken}" not in result.output  # the path once: the error names it


def test_a_photo_whose_name_is_not_utf8_is_predicted_and_named(runs, photos, tmp_path):
    """A file name in another system's encoding (Latin-1 'café.jpg') is held by Python as lone
    surrogates, which a UTF-8 stdout refuses: predict died in a traceback at the first such photo's
    line after all the work, and its --json wrote them as \\udcXX escapes a strict reader refuses.
    The name's undecodable bytes are now given as \\xNN, in text and JSON alike."""
    import os
    import shutil

    age, _ = runs
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos["astronaut"], folder / os.fsdecode(b"caf\xe9.jpg"))
    shown = str(folder / "caf\\xe9.jpg")
    for args in ([], ["--json"]):
        result = CliRunner().invoke(cli, ["predict", str(folder), "--age-model", str(age), "--mc-samples", "0",
                                          *args, "--annotate", f"{tmp_path / 'out'}/"])
        assert result.exit_code == 0, result.output
        if args:
            record = json.loads(result.output.strip().splitlines()[-1])
            assert record["image"] == shown and len(record["faces"]) == 1
            assert record["annotated"] == str(tmp_path / "out" / "caf\\xe9.annotated.jpg")
        else:
            assert f"{shown}: 1 face(s)" in result.output
    assert (tmp_path / "out" / os.fsdecode(b"caf\xe9.annotated.jpg")).exists()  # written under its own name


def test_a_photo_the_disk_cannot_read_is_reported_and_the_rest_predicted(runs, photos, tmp_path, monkeypatch):
    """EIO (a bad sector, a cloud-synced file not on this machine) ended predict in a traceback
    before any answer; it is now that photo's error, as an unreadable photo's is."""
    import errno
    import os

    from agepipe.features import images

    age, _ = runs
    opening = os.open

    def open_(p, *args, **kwargs):
        if str(p) == str(photos["obama"]):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(p))
        return opening(p, *args, **kwargs)

    monkeypatch.setattr(images.os, "open", open_)
    result = CliRunner().invoke(cli, ["predict", str(photos["obama"]), str(photos["astronaut"]), "--age-model",
                                      str(age), "--mc-samples", "0"])
    assert result.exit_code == 1, result.output
    assert f"{photos['obama']}: Input/output error\n" in result.output
    assert "astronaut.png: 1 face(s)" in result.output and "1 of 2 images could not be read" in result.output


def test_a_folder_without_photos_says_what_predict_and_embed_look_for(runs, tmp_path):
    age, _ = runs
    (tmp_path / "notes.txt").write_text("no photo")
    for args in (["predict", str(tmp_path), "--age-model", str(age)], ["embed", str(tmp_path), "-o", "x.parquet"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert f"no images found in {tmp_path}: give photo files, or folders holding .jpg" in result.output
        assert ".gif, .avif files" in result.output


def run_with_features(run, folder, **features):
    """A copy of ``run`` whose config records other face-model ``features``."""
    config = json.loads((run / "config.json").read_text())
    config["data"]["features"].update(features)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    return folder


def test_runs_must_match_their_kind_and_the_face_models(runs, tmp_path):
    age, gender = runs
    with pytest.raises(CheckpointError, match="task gender; --age-model needs one for age or age101"):
        Predictor(str(gender), None)
    other = run_with_features(age, tmp_path / "other", recognizer_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="recogniser sha256 000000000000"):
        Predictor(str(other), None)


def test_runs_from_different_det_sizes_are_named_and_the_photos_take_the_first(runs, photos, tmp_path):
    """The face models' det size was taken from the first run without a word when the other's
    embeddings came from another."""
    age, gender = runs
    other = run_with_features(gender, tmp_path / "gender320", det_size=320)
    predictor = Predictor(str(age), str(other), mc_samples=0)
    assert predictor.embedder.det_size == 640
    assert predictor.warnings == ["the runs' faces were found at different det sizes (age 640, gender 320); predict "
                                  "finds faces at 640, so the gender model sees embeddings slightly unlike its "
                                  "training's (--det-size to choose)"]
    assert Predictor(str(age), str(other), det_size=320, mc_samples=0).warnings == []
    assert Predictor(str(age), str(gender), mc_samples=0).warnings == []
    result = CliRunner().invoke(cli, ["predict", str(photos["t1"]), "--age-model", str(age), "--gender-model",
                                      str(other), "--mc-samples", "0"])
    assert result.exit_code == 0 and "warning: the runs' faces were found at different det sizes" in result.output


def test_annotate_to_a_folder_with_one_photo_writes_into_the_folder(tmp_path):
    from agepipe.train.predict import annotation_paths

    photo = str(tmp_path / "in" / "face.jpg")
    (tmp_path / "out").mkdir()
    # an existing folder, or a name ending in a separator, is a folder even for one photo
    assert annotation_paths(str(tmp_path / "out"), [photo]) == [tmp_path / "out" / "face.annotated.jpg"]
    assert annotation_paths(str(tmp_path / "new") + "/", [photo]) == [tmp_path / "new" / "face.annotated.jpg"]
    assert annotation_paths(str(tmp_path / "one.jpg"), [photo]) == [tmp_path / "one.jpg"]


def test_photos_sharing_a_name_are_annotated_under_their_folders_names(tmp_path):
    from agepipe.train.predict import annotation_paths

    photos = [f"/photos/{i // 3}/IMG_{i:04d}.jpg" for i in range(9)] + ["/elsewhere/IMG_0000.jpg"]
    names = [p.name for p in annotation_paths(str(tmp_path / "out") + "/", photos)]
    assert names[0] == "photos_0_IMG_0000.annotated.jpg" and names[-1] == "elsewhere_IMG_0000.annotated.jpg"
    assert names[1:-1] == [f"IMG_{i:04d}.annotated.jpg" for i in range(1, 9)]  # a name no other photo has: as it is


def test_annotate_to_a_name_that_cannot_hold_the_image_is_one_sentence(runs, photos, tmp_path):
    age, _ = runs
    taken = tmp_path / "taken.jpg"
    taken.write_bytes(b"a file")
    for images, target, said in (([photos["t1"]], tmp_path / "out.txt", "cannot write a .txt image"),
                                 ([photos["t1"], photos["astronaut"]], taken, "a file, not a folder")):
        result = CliRunner().invoke(cli, ["predict", *map(str, images), "--age-model", str(age), "--mc-samples", "0",
                                          "--annotate", str(target)])
        assert result.exit_code == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert f"Error: {target}: {said}" in result.output
    assert taken.read_bytes() == b"a file" and not (tmp_path / "out.txt").exists()


def test_each_photo_is_said_as_it_is_done_before_a_later_one_fails(runs, photos, tmp_path):
    # Every answer was printed at the end: a failure (here the second photo's annotated copy,
    # where a folder holds its name) or a Ctrl-C lost the answers already worked out.
    age, _ = runs
    (tmp_path / "out" / "astronaut.annotated.jpg").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["predict", str(photos["t1"]), str(photos["astronaut"]), "--age-model", str(age),
                                      "--mc-samples", "0", "--annotate", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert f"{photos['t1']}: 6 face(s), annotated -> {tmp_path / 'out' / 't1.annotated.jpg'}" in result.output
    assert result.output.index("6 face(s)") < result.output.index("astronaut.annotated.jpg: cannot write")


def test_annotate_never_writes_over_a_photo_it_was_given(runs, photos, tmp_path):
    """`predict me.jpg --annotate me.jpg` replaced the user's photo with the drawing, and a second
    `predict pics --annotate pics` drew a.jpg over a.annotated.jpg, which it had been given too."""
    import shutil

    age, _ = runs
    photo = tmp_path / "me.jpg"
    shutil.copy(photos["t1"], photo)
    pics = tmp_path / "pics"
    pics.mkdir()
    shutil.copy(photos["t1"], pics / "a.jpg")
    shutil.copy(photos["t1"], pics / "a.annotated.jpg")
    before = {p: p.read_bytes() for p in (photo, pics / "a.jpg", pics / "a.annotated.jpg")}
    for images, target, named in (([photo], photo, photo), ([pics], pics, pics / "a.annotated.jpg")):
        result = CliRunner().invoke(cli, ["predict", *map(str, images), "--age-model", str(age), "--mc-samples", "0",
                                          "--annotate", str(target)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
        assert (f"Error: {named}: --annotate would write over this photo, which is one of those given; "
                "give --annotate another name") in result.output
    assert {p: p.read_bytes() for p in before} == before and sorted(pics.iterdir()) == [pics / "a.annotated.jpg",
                                                                                         pics / "a.jpg"]


def test_json_out_never_writes_over_a_photo_it_was_given(runs, photos, tmp_path):
    """`predict me.jpg --json-out me.jpg` replaced the photo with the JSON."""
    import shutil

    age, _ = runs
    photo = tmp_path / "me.jpg"
    shutil.copy(photos["t1"], photo)
    before = photo.read_bytes()
    result = CliRunner().invoke(cli, ["predict", str(photo), "--age-model", str(age), "--mc-samples", "0",
                                      "--json-out", str(photo)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert (f"Error: {photo}: --json-out would write over this photo, which is one of those given; give --json-out "
            "another name") in result.output
    assert photo.read_bytes() == before


@pytest.mark.parametrize("annotate, json_out", [("r.jpg", "r.jpg"), ("out/", "out/t1.annotated.jpg")])
def test_json_out_and_annotate_never_write_one_file(runs, photos, tmp_path, monkeypatch, annotate, json_out):
    """`predict t1.jpg --annotate r.jpg --json-out r.jpg` wrote the annotated photo, then the JSON
    over it, and said 'annotated -> r.jpg' of a file that held JSON."""
    age, _ = runs
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["predict", str(photos["t1"]), "--age-model", str(age), "--mc-samples", "0",
                                      "--annotate", annotate, "--json-out", json_out])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert (f"Error: {json_out}: both --json-out and --annotate would write this file; give them different "
            "names") in result.output
    assert not (tmp_path / json_out).exists()


@pytest.mark.parametrize("option", ["--annotate", "--json-out"])
def test_an_output_that_cannot_be_written_is_one_sentence(runs, photos, tmp_path, option):
    age, _ = runs
    (tmp_path / "taken").write_text("a file")
    target = tmp_path / "taken" / "out.jpg"
    result = CliRunner().invoke(cli, ["predict", str(photos["t1"]), "--age-model", str(age), "--mc-samples", "0",
                                      option, str(target)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert f"Error: {target}: cannot write ({tmp_path / 'taken'} is a file, not a folder); give another {option}" \
        in result.output


@pytest.mark.parametrize("text", ["{", '{"test": 5}', '{"test": {"majority_baseline": {"class": "female"}}}'])
def test_a_damaged_metrics_json_is_named(tmp_path, text):
    """predict reads the run's metrics.json for its caution: a damaged one is a sentence naming it."""
    from agepipe.train.predict import run_caution

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(text)
    with pytest.raises(CheckpointError, match="metrics.json: not a metrics file of `agepipe train`.*agepipe evaluate"):
        run_caution("gender", run)


def test_the_legend_of_a_model_without_dropout_says_one_deterministic_pass(gaussian_store, tmp_path):
    """--mc-samples has no dropout to sample in a --dropout 0 model: its faces get one
    deterministic pass, and the annotation's legend must say so, not "mean of 8 MC-dropout passes",
    also beside a model that does sample."""
    store, _ = gaussian_store
    train(store, ["adience"], "gender", tmp_path / "g", mc_samples=0, report=False, progress=False,
          model_overrides={"dropout": 0.0}, train_overrides={"epochs": 1})
    predictor = Predictor(None, str(tmp_path / "g"), mc_samples=8)
    lines = legend_lines([{"gender": {}}], predictor.passes)
    assert any("(one deterministic pass)" in t for t in lines), lines
    train(store, ["adience"], "age", tmp_path / "a", mc_samples=0, report=False, progress=False,
          train_overrides={"epochs": 1})
    predictor = Predictor(str(tmp_path / "a"), str(tmp_path / "g"), mc_samples=8)
    assert predictor.passes == {"age": 8, "gender": 0}
    lines = legend_lines([{"age": {}, "gender": {}}], predictor.passes)
    assert any("(age: mean of 8 MC-dropout passes; gender: one deterministic pass)" in t for t in lines), lines
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 512), dtype=np.float32))
    sampled = [predictor._predict(predictor.runs["gender"][0], x, predictor.passes["gender"], False, 1.0)[0] for _ in range(2)]
    np.testing.assert_array_equal(*sampled)  # the gender model's one pass: the same answer every time


def test_a_run_that_held_out_no_fold_is_not_flagged_as_a_constant_guess(gaussian_store, tmp_path):
    """A run trained with no test fold (a table's pretrain run) has no held-out rows, so its balanced
    accuracy and baseline are NaN: predict said it "did not beat its majority baseline on its held-out
    fold" and greyed every face as a constant guess."""
    from agepipe.train.predict import run_caution

    store, _ = gaussian_store
    run = tmp_path / "run"
    train(store, ["adience"], "gender", run, test_fold=None, mc_samples=0, report=False, progress=False,
          train_overrides={"epochs": 1})
    assert json.loads((run / "metrics.json").read_text())["test"]["n"] == 0
    assert run_caution("gender", run) is None


def test_predict_warns_when_it_takes_another_prediction_than_the_temperature_was_fitted_for(runs):
    # the runs were trained with --mc-samples 0: their T is the deterministic softmax's
    age, gender = runs
    assert Predictor(str(age), str(gender), mc_samples=0).warnings == []
    t = json.loads((gender / "config.json").read_text())["temperature"]
    assert f"the gender model: the run's temperature T = {t:.3f} was fitted for its deterministic prediction; " \
           "predict scores the MC dropout mean one (--mc-samples 4), which that T may not calibrate" \
           in Predictor(str(age), str(gender), mc_samples=4).warnings
