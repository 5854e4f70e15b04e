"""Model packs: buffalo_l downloaded from a (loopback) mirror and checked, folders, clear errors."""
import io
import threading
import zipfile

import pytest

from agepipe.features.models import ModelError, resolve_pack
from tests.datasets.loopback import FlakyServer


@pytest.fixture
def mirror(buffalo_s):
    """A loopback server holding a buffalo_l.zip laid out like insightface's (a folder inside)."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.write(buffalo_s.detector, "buffalo_l/det_10g.onnx")
        zf.write(buffalo_s.recognizer, "buffalo_l/w600k_r50.onnx")
        zf.writestr("buffalo_l/../../escape.onnx", b"a name that must not choose a path")
    srv = FlakyServer()
    srv.files["/models/buffalo_l.zip"] = data.getvalue()
    srv.script["/models/buffalo_l.zip"] = [("drop", 100_000)]  # the first try breaks off mid-file
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_buffalo_l_downloads_once_from_a_mirror_and_is_checked(mirror, tmp_path, monkeypatch, buffalo_s):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "insightface"))
    pack = resolve_pack("buffalo_l", model_url=f"{mirror.url}/models/buffalo_l.zip")
    folder = tmp_path / "insightface" / "models" / "buffalo_l"
    assert pack.detector == folder / "det_10g.onnx" and pack.recognizer == folder / "w600k_r50.onnx"
    assert pack.detector.read_bytes() == buffalo_s.detector.read_bytes()
    assert not list(tmp_path.rglob("escape.onnx"))
    assert (folder / ".agepipe-sha256.json").exists()
    requests = len(mirror.log)
    assert resolve_pack("buffalo_l", model_url=f"{mirror.url}/models/buffalo_l.zip") == pack
    assert len(mirror.log) == requests  # found in the cache: nothing fetched again
    with open(pack.recognizer, "r+b") as f:  # a corrupted or swapped file is caught
        f.seek(1000)
        f.write(b"\x00" * 16)
    with pytest.raises(ModelError, match="differs from the one recorded"):
        resolve_pack("buffalo_l")


def test_buffalo_l_without_network_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="agepipe models fetch buffalo_l"):
        resolve_pack("buffalo_l", download=False)


def test_folder_pack_finds_detector_and_recognizer_by_shape(tmp_path, buffalo_s):
    (tmp_path / "a.onnx").symlink_to(buffalo_s.recognizer)
    (tmp_path / "b.onnx").symlink_to(buffalo_s.detector)
    pack = resolve_pack(str(tmp_path))
    assert pack.detector.name == "b.onnx" and pack.recognizer.name == "a.onnx"
    (tmp_path / "b.onnx").unlink()
    with pytest.raises(ModelError, match="no detector"):
        resolve_pack(str(tmp_path))


def test_unknown_pack_and_cuda_without_provider():
    with pytest.raises(ModelError, match="unknown model pack"):
        resolve_pack("buffalo_xl")
    from agepipe.features.models import choose_providers

    with pytest.raises(ModelError, match="onnxruntime-gpu"):
        choose_providers("cuda")


def test_a_recogniser_of_other_than_512_d_embeddings_is_refused_before_anything_runs(tmp_path, buffalo_s):
    # It would run, and every usable photo of a shard would become an "error" row.
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["y"])], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
        [numpy_helper.from_array(np.ones((3, 128), np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "rec128.onnx")
    (tmp_path / "det.onnx").symlink_to(buffalo_s.detector)
    with pytest.raises(ModelError, match=r"rec128.onnx: a recogniser of 128-d embeddings; .* 512-d"):
        resolve_pack(str(tmp_path))


@pytest.mark.parametrize("outputs", [6, 15])
def test_an_scrfd_other_than_the_9_output_one_is_refused_before_anything_runs(tmp_path, buffalo_s, outputs):
    # One without landmarks (insightface's scrfd_500m.onnx) ended every photo in an IndexError;
    # one of 5 strides read stride 64's scores as stride 8's boxes and failed on a candidate.
    import onnx

    graph = onnx.load(str(buffalo_s.detector))
    outs = list(graph.graph.output)
    del graph.graph.output[:]
    graph.graph.output.extend(outs[:6] if outputs == 6 else outs[:3] + outs[:2] + outs[3:6] + outs[3:5] + outs[6:] + outs[6:8])
    onnx.save(graph, tmp_path / "scrfd.onnx")
    (tmp_path / "rec.onnx").symlink_to(buffalo_s.recognizer)
    with pytest.raises(ModelError, match=rf"scrfd.onnx: an SCRFD detector of {outputs} outputs; .* 9-output"):
        resolve_pack(str(tmp_path))
