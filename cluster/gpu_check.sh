#!/usr/bin/env bash
# Single-GPU check: bf16 unlearning steps with live G-effects on a
# SmolLM2-135M-shaped and a ~1B Llama-3.2-1B-shaped model configured from scratch (no hub),
# FSDP2 and DeepSpeed ZeRO-3 on one GPU, then the G-effect and evaluation benches on CUDA.
# Timings and peak memory are printed. Runs in a few minutes on one H100/H200-class GPU.
#
#   bash cluster/gpu_check.sh            # in a checkout with the package importable
#
# Optional wheels (deepspeed and its small deps, gguf) may be dropped into .whl/ for machines
# without package access; they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
echo "== 1. unlearning steps with G-effects, FSDP2, DeepSpeed (rayunlearn.bench.gpu)"
timeout 300 $PY -m rayunlearn.bench.gpu ${QUICK:+--quick}
echo "== 2. G-effect engine ratios on CUDA, SmolLM2-135M shape, bf16 (rayunlearn.bench.effects)"
timeout 200 $PY -m rayunlearn.bench.effects --device cuda --dtype bfloat16 --model smollm2-135m-shape --quick
echo "== total $(( $(date +%s) - start )) s"
