"""Run an ONNX face model in PyTorch: the same files as onnxruntime, batched, fp16 on CUDA.

onnx2torch imports torchvision, which cannot be installed beside our torch build, so this is a
small interpreter of our own. Float initializers become buffers, so ``.to(device)`` and
``.half()`` move and cast them; nodes run in graph order. Integer constants and the results of
Shape stay int64 on the CPU: shape arithmetic (Shape, Gather, Concat, ... feeding Reshape or
Resize) then needs no GPU sync and survives ``.half()``.
"""
from __future__ import annotations

import math
import os

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from torch import nn

DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
          7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _ints(t):
    """A shape-like input tensor (or None) as a list of Python ints."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _one_device(*xs):
    """Shape tensors live on the CPU; move them to the device of the data they meet."""
    dev = next((x.device for x in xs if x.device.type != "cpu"), xs[0].device)
    return [x.to(dev) for x in xs]


def _pads(a, x, value):
    """ONNX pads as torch padding: symmetric pads go to the op, asymmetric ones to F.pad."""
    k = x.ndim - 2
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"auto_pad={a['auto_pad']}")
    pads = a.get("pads", [0] * 2 * k)
    if pads[:k] == pads[k:]:
        return x, pads[:k]
    return F.pad(x, [p for i in reversed(range(k)) for p in (pads[i], pads[k + i])], value=value), [0] * k


def conv(a, x, w, b=None):
    x, pad = _pads(a, x, 0.0)
    f = (F.conv1d, F.conv2d, F.conv3d)[w.ndim - 3]
    return f(x, w, b, a.get("strides", 1), pad, a.get("dilations", 1), a.get("group", 1))


def conv_relu(a, x, w, b=None):
    """Conv then Relu in one op. Eager PyTorch runs a CUDA convolution's bias and a ReLU as two more
    passes over its output (on an H200, about a fifth of the detector's device time); cuDNN's fused
    convolution + bias + activation does them in the convolution's epilogue."""
    if not (x.is_cuda and w.ndim == 4):
        return F.relu_(conv(a, x, w, b))
    x, pad = _pads(a, x, 0.0)
    pair = (lambda v: [v, v] if isinstance(v, int) else list(v))
    return torch.cudnn_convolution_relu(x, w, b, pair(a.get("strides", 1)), pair(pad), pair(a.get("dilations", 1)),
                                        a.get("group", 1))


def max_pool(a, x):
    x, pad = _pads(a, x, -math.inf)
    f = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[x.ndim - 3]
    return f(x, a["kernel_shape"], a.get("strides", 1), pad, a.get("dilations", 1), bool(a.get("ceil_mode", 0)))


def avg_pool(a, x):
    y, pad = _pads(a, x, 0.0)
    if y is not x:  # zero padding would be averaged in
        raise NotImplementedError("AveragePool with asymmetric pads")
    f = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[x.ndim - 3]
    return f(x, a["kernel_shape"], a.get("strides", 1), pad, bool(a.get("ceil_mode", 0)),
             bool(a.get("count_include_pad", 0)))


def gemm(a, x, w, c=None):
    x = x.T if a.get("transA", 0) else x
    w = w.T if a.get("transB", 0) else w
    if c is None:
        return a.get("alpha", 1.0) * (x @ w)
    return torch.addmm(c, x, w, beta=a.get("beta", 1.0), alpha=a.get("alpha", 1.0))


def reshape(a, x, shape):
    shape = _ints(shape)
    if not a.get("allowzero", 0):  # 0 copies the input's dimension
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def gather(a, x, i):
    axis = a.get("axis", 0) % x.ndim
    i = i.to(x.device)
    i = torch.where(i < 0, i + x.shape[axis], i)
    return x.index_select(axis, i.reshape(-1)).reshape(x.shape[:axis] + i.shape + x.shape[axis + 1:])


def unsqueeze(a, x, axes=None):
    axes = a["axes"] if axes is None else _ints(axes)
    for ax in sorted(ax % (x.ndim + len(axes)) for ax in axes):
        x = x.unsqueeze(ax)
    return x


def squeeze(a, x, axes=None):
    axes = a.get("axes") if axes is None else _ints(axes)
    return x.squeeze() if axes is None else x.squeeze(tuple(axes))


def slice_(a, x, starts=None, ends=None, axes=None, steps=None):
    if a["opset"] < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends, axes, steps = map(_ints, (starts, ends, axes, steps))
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes or range(len(starts)), steps or [1] * len(starts)):
        if st > 0:  # Python slices clamp starts and ends as ONNX does
            index[ax] = slice(s, e, st)
        else:  # torch has no negative steps
            kept = range(*slice(s, e, st).indices(x.shape[ax]))
            x = x.index_select(ax, torch.tensor(list(kept), dtype=torch.int64, device=x.device))
    return x[tuple(index)]


def cast(a, x):
    to = DTYPES[a["to"]]
    # Float-to-float casts keep the tensor's dtype, so a .half() module stays fp16; others are exact.
    return x if to.is_floating_point and x.is_floating_point() else x.to(to)


def concat(a, *xs):
    return torch.cat(_one_device(*xs), a["axis"])


def softmax(a, x):
    if a["opset"] >= 13:
        return x.softmax(a.get("axis", -1))
    # before opset 13: one softmax over all dimensions from axis on
    return x.flatten(a.get("axis", 1) % x.ndim).softmax(-1).reshape(x.shape)


def clip(a, x, lo=None, hi=None):
    if a["opset"] < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = (None if t is None else t.to(x) for t in (lo, hi))
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def div(a, x, y):
    x, y = _one_device(x, y)
    return x / y if x.is_floating_point() else torch.div(x, y, rounding_mode="trunc")


# (mode, coordinate_transformation_mode, nearest_mode) -> F.interpolate's mode, align_corners
RESIZE_MODES = {
    ("nearest", "asymmetric", "floor"): ("nearest", None),
    ("nearest", "half_pixel", "round_prefer_ceil"): ("nearest-exact", None),
    ("linear", "half_pixel", None): ("linear", False),
    ("linear", "align_corners", None): ("linear", True),
}


def resize(a, x, roi=None, scales=None, sizes=None):
    if a["opset"] < 11:  # Upsample and Resize-10: (X, scales), asymmetric coordinates
        scales, ctm, nearest = roi, "asymmetric", "floor"
    else:
        ctm = a.get("coordinate_transformation_mode", "half_pixel")
        nearest = a.get("nearest_mode", "round_prefer_floor")
    key = (a.get("mode", "nearest"), ctm, nearest if a.get("mode", "nearest") == "nearest" else None)
    if key not in RESIZE_MODES:
        raise NotImplementedError("Resize with mode, coordinate_transformation_mode, nearest_mode = %s" % (key,))
    mode, align = RESIZE_MODES[key]
    if mode == "linear":
        mode = ("linear", "bilinear", "trilinear")[x.ndim - 3]
    if sizes is not None and sizes.numel():
        return F.interpolate(x, size=_ints(sizes)[2:], mode=mode, align_corners=align)
    factors = a["scales"] if scales is None else scales.tolist()
    return F.interpolate(x, scale_factor=factors[2:], mode=mode, align_corners=align)


def prelu(a, x, slope):
    if slope.ndim == x.ndim - 1 and slope.shape[0] == x.shape[1] and slope[0].numel() == 1:
        return F.prelu(x, slope.reshape(-1))  # one slope a channel, as exporters write it: one kernel
    return torch.where(x < 0, x * slope, x)


def _identity(a, x):
    return x


def _binary(f):
    return lambda a, x, y: f(*_one_device(x, y))


OPS = {
    "Conv": conv,
    "BatchNormalization": lambda a, x, w, b, mean, var: F.batch_norm(
        x, mean, var, w, b, False, 0.0, a.get("epsilon", 1e-5)),
    "Relu": lambda a, x: F.relu(x),
    "PRelu": prelu,
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": div,
    "Flatten": lambda a, x: x.reshape(math.prod(x.shape[:a.get("axis", 1)]), math.prod(x.shape[a.get("axis", 1):])),
    "Gemm": gemm,
    "MatMul": lambda a, x, y: torch.matmul(x, y),
    "Reshape": reshape,
    "Transpose": lambda a, x: x.permute(a.get("perm") or list(reversed(range(x.ndim)))),
    "Concat": concat,
    "Shape": lambda a, x: torch.tensor(x.shape[a.get("start", 0):a.get("end")], dtype=torch.int64),
    "Gather": gather,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
    "Slice": slice_,
    "Cast": cast,
    "Resize": resize,
    "Upsample": resize,
    "Identity": _identity,
    "Dropout": lambda a, x, *rest: x,  # inference: identity
    "MaxPool": max_pool,
    "AveragePool": avg_pool,
    "GlobalAveragePool": lambda a, x: x.mean(tuple(range(2, x.ndim)), keepdim=True),
    "Softmax": softmax,
    "Clip": clip,
}


def _attribute(attr):
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def _constant(node, source):
    """The value of a Constant node as a numpy array."""
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_float", "value_floats"):
        return np.array(_attribute(attr), dtype=np.float32)
    if attr.name in ("value_int", "value_ints"):
        return np.array(_attribute(attr), dtype=np.int64)
    raise NotImplementedError(f"{source}: Constant node {node.name!r} with {attr.name} is not supported")


def _op_name(node):
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _load(model):
    """The ModelProto and a name for error messages; a broken file raises ValueError naming it."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<onnx.ModelProto>"
    source = os.fspath(model)
    try:
        return onnx.load(source), source
    except DecodeError as e:
        raise ValueError(f"{source}: not a readable ONNX model ({e})") from e


class OnnxModule(nn.Module):
    """An ONNX graph run with torch ops; forward(*inputs) returns the graph outputs as a tuple.
    Float inputs are cast to the module's float dtype; moving them to its device is the caller's job."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto):
        super().__init__()
        model, self.source = _load(model)
        graph = model.graph
        unsupported = sorted({_op_name(n) for n in graph.node} - set(OPS) - {"Constant"})
        if unsupported:
            raise NotImplementedError(f"{self.source}: ONNX op(s) not supported by agepipe's torch runtime: "
                                      + ", ".join(unsupported))
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise ValueError(f"{self.source}: not a valid ONNX model ({e})") from e
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

        self.shape_consts = {}  # integer constants: int64 on the CPU, untouched by .to() and .half()
        self.buffer_names = {}  # ONNX name -> buffer attribute (ONNX names may hold dots)
        constants = [(t.name, numpy_helper.to_array(t)) for t in graph.initializer]
        constants += [(n.output[0], _constant(n, self.source)) for n in graph.node if n.op_type == "Constant"]
        for name, array in constants:
            tensor = torch.from_numpy(np.array(array))
            if tensor.is_floating_point():
                self.buffer_names[name] = f"c{len(self.buffer_names)}"
                self.register_buffer(self.buffer_names[name], tensor)
            else:
                self.shape_consts[name] = tensor
        self.input_names = [i.name for i in graph.input
                            if i.name not in self.buffer_names and i.name not in self.shape_consts]
        self.output_names = [o.name for o in graph.output]

        nodes = [n for n in graph.node if n.op_type != "Constant"]
        # Drop each value after its last use: holding them all would keep every activation of a batch.
        last_use = {name: i for i, n in enumerate(nodes) for name in n.input if name}
        free = [[] for _ in nodes]
        for name, i in last_use.items():
            if name not in self.output_names:
                free[i].append(name)
        self.nodes = [(OPS[n.op_type], {"opset": opset, **{a.name: _attribute(a) for a in n.attribute}},
                       list(n.input), list(n.output), dead, f"{n.name!r} ({n.op_type})")
                      for n, dead in zip(nodes, free)]

    def fuse_conv_relu(self) -> int:
        """Each Conv whose only reader is a Relu becomes one conv_relu node (the Relu passes its
        input on); returns how many. Outputs are the same up to rounding."""
        readers: dict[str, int] = {}
        for _, _, ins, _, _, _ in self.nodes:
            for name in ins:
                readers[name] = readers.get(name, 0) + 1
        made = {outs[0]: i for i, (fn, _, _, outs, _, _) in enumerate(self.nodes) if fn is conv}
        fused = 0
        for i, (fn, attrs, ins, outs, dead, what) in enumerate(self.nodes):
            j = made.get(ins[0]) if fn is OPS["Relu"] else None
            if j is not None and readers[ins[0]] == 1 and ins[0] not in self.output_names:
                self.nodes[j] = (conv_relu, *self.nodes[j][1:])
                self.nodes[i] = (_identity, attrs, ins, outs, dead, what)
                fused += 1
        return fused

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"{self.source}: expects inputs {self.input_names}, got {len(inputs)} tensor(s)")
        dtype = next(self.buffers(), torch.empty(0)).dtype  # fp16 after .half()
        env = dict(self.shape_consts)
        env.update((name, getattr(self, b)) for name, b in self.buffer_names.items())
        env.update((name, x.to(dtype) if x.is_floating_point() else x) for name, x in zip(self.input_names, inputs))
        for fn, attrs, ins, outs, dead, what in self.nodes:
            try:
                y = fn(attrs, *[env[i] if i else None for i in ins])
            except Exception as e:
                raise RuntimeError(f"{self.source}: node {what} failed: {e}") from e
            env.update(zip(outs, y if isinstance(y, tuple) else (y,)))
            for name in dead:
                del env[name]
        return tuple(env[name] for name in self.output_names)


def load_torch_model(path: str | os.PathLike | onnx.ModelProto, device: str | torch.device = "cpu",
                     half: bool = False) -> OnnxModule:
    """An ONNX model as an eval-mode OnnxModule on ``device``, in fp16 when ``half``."""
    module = OnnxModule(path).to(device)
    return (module.half() if half else module).eval().requires_grad_(False)
