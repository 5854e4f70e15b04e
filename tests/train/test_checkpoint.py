import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from agepipe.train.checkpoint import CheckpointError, init_from, load_checkpoint, save_checkpoint
from agepipe.train.model import ModelConfig, ResMLP, paper_config


def saved_run(tmp_path, cfg=None):
    torch.manual_seed(0)
    model = ResMLP(cfg or paper_config("age", 8))
    model.train()
    model(torch.randn(64, model.config.in_features))  # move the BatchNorm running statistics off their defaults
    run = tmp_path / "run"
    task = {8: "age", 101: "age101", 2: "gender"}[model.config.num_classes]
    save_checkpoint(run, model.eval(), {"task": task})
    return model, run


def test_round_trip_gives_the_same_function(tmp_path):
    model, run = saved_run(tmp_path)
    loaded, config = load_checkpoint(run)
    x = torch.randn(10, 512)
    assert torch.equal(loaded(x), model(x))
    assert config["task"] == "age" and config["model"]["num_blocks"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors"]


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_in_place_of_the_weights_is_refused_without_running_it(tmp_path):
    _, run = saved_run(tmp_path)
    marker = tmp_path / "pwned"
    (run / "model.safetensors").write_bytes(pickle.dumps({"state_dict": WritesAFile(str(marker))}))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(run)
    assert not marker.exists()


@pytest.mark.parametrize("config, message", [
    ("{not json", "not valid JSON"),
    ('{"arch": {"type": "ResMLP"}}', "not an agepipe run config"),
    ('{"format": "agepipe-run", "version": 99, "model": {}}', "version 99"),
    ('{"format": "agepipe-run", "version": 1, "model": {"num_classes": 8, "act": "gelu"}}',
     r"unknown model settings \['act'\]"),
    ('{"format": "agepipe-run", "version": 1, "model": {"num_classes": "8"}}', "num_classes='8' is not a int"),
    ('{"format": "agepipe-run", "version": 1, "model": {"num_classes": 8, "skip": 1}}', "skip=1 is not a bool"),
])
def test_malformed_or_foreign_configs_name_the_problem(tmp_path, config, message):
    _, run = saved_run(tmp_path)
    (run / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(run)



@pytest.mark.parametrize("key, value, message", [
    ("min_det_score", None, "data.min_det_score is None, not a number"),
    ("test_fold", "0", "data.test_fold is '0', not a fold 0-4 or null"),
    ("val_fraction", 5, "data.val_fraction is 5, not a number in"),
    ("features", "buffalo_s", "data.features is 'buffalo_s', not an object"),
    ("features", {"pack": ["a"]}, r"data.features.pack is \['a'\], not a string"),
    ("features", {"det_size": "640"}, "data.features.det_size is '640', not an integer"),
])
def test_a_data_record_of_the_wrong_types_names_the_file(tmp_path, key, value, message):
    """evaluate and predict read these values; a tampered one is refused at load, in a sentence
    that names config.json, rather than a TypeError deep inside them or another split."""
    _, run = saved_run(tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["data"] = {key: value}
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: " + message):
        load_checkpoint(run)

def test_a_model_of_another_input_width_is_refused_at_load(tmp_path):
    """Its weights fit its config, so only the first embedding scored found it: a RuntimeError
    'mat1 and mat2 shapes cannot be multiplied' from evaluate or predict, no file named."""
    _, run = saved_run(tmp_path, ModelConfig(num_classes=8, in_features=256))
    with pytest.raises(CheckpointError, match="config.json: a model of 256 input features, but the store's "
                                              "embeddings have 512"):
        load_checkpoint(run)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    _, run = saved_run(tmp_path)
    tensors = ResMLP(paper_config("gender", 2)).state_dict()
    save_file(dict(tensors), str(run / "model.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit the model") as e:
        load_checkpoint(run)
    assert "head.weight: (2, 32) torch.float32, model needs (8, 128)" in str(e.value)
    assert str(e.value).endswith("more")  # the rest (unexpected blocks.4 ...) are counted


def test_missing_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: no such file"):
        load_checkpoint(tmp_path / "nothing")


def test_a_cross_validation_folder_names_a_run_inside(tmp_path):
    _, run = saved_run(tmp_path / "cv")
    run.rename(tmp_path / "cv" / "fold0-seed0")
    (tmp_path / "cv" / "cv.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds a cross-validation") as e:  # once "config.json: no such file"
        load_checkpoint(tmp_path / "cv")
    assert str(e.value).endswith(f"give one of its fold<k>-seed<s> run folders, e.g. {tmp_path / 'cv' / 'fold0-seed0'}")


def test_init_from_takes_the_body_and_a_fresh_head_for_other_classes(tmp_path):
    pretrained, run = saved_run(tmp_path, paper_config("age101", 101))
    model = ResMLP(paper_config("age", 8))
    head_before = model.head.weight.clone()
    fresh = init_from(model, run)
    assert fresh == ["head.bias", "head.weight"]
    assert torch.equal(model.blocks[0].linear1.weight, pretrained.blocks[0].linear1.weight)
    assert torch.equal(model.blocks[3].ic[0].running_var, pretrained.blocks[3].ic[0].running_var)
    assert torch.equal(model.head.weight, head_before)
    with pytest.raises(CheckpointError, match=r"the number of classes aside: dropout 0.05 there, 0.2 here \(--dropout\)"):
        init_from(ResMLP(ModelConfig(num_classes=8, dropout=0.2)), run)


def test_config_is_plain_json_and_weights_carry_no_code(tmp_path):
    _, run = saved_run(tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["format"] == "agepipe-run"
    header_len = int.from_bytes((run / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((run / "model.safetensors").read_bytes()[8:8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}
    assert {k for k in header if k != "__metadata__"} == set(ResMLP(paper_config("age", 8)).state_dict())
    assert not [p for p in os.listdir(run) if p.startswith(".")]  # no temporaries left
