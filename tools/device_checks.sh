#!/usr/bin/env bash
# The accelerator checks of the encoding, training and scale-out issues, in one run of at most ~8 minutes.
#
#   bash tools/device_checks.sh            # on a GPU machine; logs to $OUT (or ./device_logs)
#   QUICK=1 bash tools/device_checks.sh    # tiny sizes, to try the script on a CPU first
#
# 1. parity of fp32 encoding with sentence-transformers on this device (default matmul precision);
# 2. tools/bench_encode.py, base, fp32 and bf16, against sentence-transformers in the same precision;
# 3. tools/bench_train.py, instructor-large, bf16, sequence length 256: step throughput and MFU;
# 4. tools/bench_scale.py max_batch, instructor-xl, bf16: the largest contrastive batch without and with GradCache.
set -u
OUT=${OUT:-device_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
if [ "${QUICK:-0}" = 1 ]; then
  ENC="--size tiny --num_texts 64 --batch_size 16 --max_seq_length 128"; TRAIN="--size tiny --batch_size 8 --seq_len 32"
  SCALE="--size tiny --seq_len 32 --start 64 --gc_start 256 --limit 512 --memory_gb 0.05"
else
  ENC="--size base --num_texts 1024 --batch_size 128"; TRAIN="--size large --batch_size 32 --seq_len 256"
  SCALE="--size xl --seq_len 128 --start 32 --gc_start 1024 --limit 1024 --chunk_size 64"
fi
run() {  # run NAME SECONDS COMMAND...: one check, its output in $OUT/NAME.log, never more than SECONDS
  local name=$1 seconds=$2; shift 2
  echo "=== $name: $*"
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "--- exit $? ($name)"; grep -v "it/s\]\|Warning\|warn(" "$OUT/$name.log" | tail -12
}
python3 -c "import jax, flax, torch, transformers, sentence_transformers as st; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'st', st.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
run parity 50 python3 -c "
import tempfile, numpy as np
from instructor_jax import Instructor
from instructor_jax.config import tiny_config
from instructor_jax.reference import make_reference_checkpoint, reference_embeddings
d = tempfile.mkdtemp(); ref = make_reference_checkpoint(d + '/m', tiny_config(d_model=64, pooling_rule='sentence-transformers'))
ref = ref.to('cuda') if __import__('torch').cuda.is_available() else ref
pairs = [['Represent the sentence: ', 'the old bridge measures heavy rain ' * k] for k in range(20)]
print('fp32 parity on this device, max |diff| =', float(np.abs(Instructor.from_pretrained(d + '/m').encode(pairs) - reference_embeddings(ref, pairs)).max()))"
run encode_fp32 70 python3 tools/bench_encode.py $ENC --dtype float32
run encode_bf16 70 python3 tools/bench_encode.py $ENC --dtype bfloat16
run train_large_bf16 90 python3 tools/bench_train.py $TRAIN --dtype bfloat16 --steps 3
run max_batch_xl_gradcache 110 python3 tools/bench_scale.py max_batch $SCALE --dtype bfloat16 --run --which gradcache
run max_batch_xl_direct 110 python3 tools/bench_scale.py max_batch $SCALE --dtype bfloat16 --run --which direct
