#!/usr/bin/env bash
# The accelerator checks (the scale-out and packed-sequence issues), most important first. Checks 1-4 took
# ~11 minutes on an H200 (one device call allows 10): name a subset in CHECKS to split them over calls.
#
#   bash tools/device_checks.sh            # on a GPU machine; logs to $OUT (or ./device_logs)
#   CHECKS="train_large_bf16 max_batch_xl_gradcache" bash tools/device_checks.sh
#   QUICK=1 bash tools/device_checks.sh    # tiny sizes, to try the script on a CPU first
#
# 1. tools/bench_train.py, instructor-large, bf16, sequence length 256: step throughput and MFU against
#    PyTorch on the same batch (scanned layers, RngBitGenerator dropout bits: the configs' settings);
# 2. tools/bench_scale.py max_batch, instructor-xl then instructor-large, bf16, sequence length 128: the
#    largest contrastive batch that trains with GradCache and without it;
# 3. parity of fp32 encoding with sentence-transformers on this device;
# 4. tools/bench_scale.py memory --time, instructor-large at batch 64 x 256 tokens: MFU without GradCache;
# 5. packed sequences: tools/bench_encode.py, base, bf16, mixed and short lengths (packed and unpacked
#    against sentence-transformers, MFU; target >= 40% for base at mixed lengths), and tools/bench_train.py
#    --lengths medi, large, bf16 (packed against unpacked real tokens/s, MFU; target >= 45%).
set -u
OUT=${OUT:-device_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
if [ "${QUICK:-0}" = 1 ]; then
  TRAIN="--size tiny --batch_size 8 --seq_len 32"; XL="--size tiny --seq_len 32 --memory_gb 0.05"; LARGE=$XL
  XL_GC="--gc_start 256 --limit 512"; XL_DIRECT="--start 64 --limit 512"; LARGE_GC=$XL_GC; LARGE_DIRECT=$XL_DIRECT
  MFU="--size tiny --seq_len 32 --batches 16"
  ENCODE="--size tiny --num_texts 64 --max_seq_length 128"; MEDI="--size tiny --batch_size 8 --seq_len 128"
else
  TRAIN="--size large --batch_size 32 --seq_len 256"; XL="--size xl --seq_len 128"; LARGE="--size large --seq_len 128"
  XL_GC="--gc_start 1024 --limit 1024 --chunk_size 64"; XL_DIRECT="--start 32 --limit 1024"
  LARGE_GC="--gc_start 2048 --limit 2048 --chunk_size 128"; LARGE_DIRECT="--start 128 --limit 2048"
  MFU="--size large --seq_len 256 --batches 64"
  ENCODE="--size base --num_texts 2048 --batch_size 128"; MEDI="--size large --batch_size 32"
fi
run() {  # run NAME SECONDS COMMAND...: one check, its output in $OUT/NAME.log, never more than SECONDS
  local name=$1 seconds=$2; shift 2
  case " ${CHECKS:-$name} " in *" $name "*) ;; *) return ;; esac
  echo "=== $name: $*"
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "--- exit $? ($name)"; grep -v "it/s\]\|Warning\|warn(" "$OUT/$name.log" | tail -12
}
python3 -c "import jax, flax, torch, transformers, sentence_transformers as st; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'st', st.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
# JAX and PyTorch share the GPU in bench_train: JAX may preallocate only part of it.
run train_large_bf16 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python3 tools/bench_train.py $TRAIN --dtype bfloat16 --steps 5
run max_batch_xl_gradcache 100 python3 tools/bench_scale.py max_batch $XL $XL_GC --dtype bfloat16 --run --which gradcache
run max_batch_xl_direct 110 python3 tools/bench_scale.py max_batch $XL $XL_DIRECT --dtype bfloat16 --run --which direct
run max_batch_large_gradcache 90 python3 tools/bench_scale.py max_batch $LARGE $LARGE_GC --dtype bfloat16 --run --which gradcache
run max_batch_large_direct 100 python3 tools/bench_scale.py max_batch $LARGE $LARGE_DIRECT --dtype bfloat16 --run --which direct
run parity 40 python3 -c "
import tempfile, numpy as np
from instructor_jax import Instructor
from instructor_jax.model.config import tiny_config
from instructor_jax.reference import make_reference_checkpoint, reference_embeddings
d = tempfile.mkdtemp(); ref = make_reference_checkpoint(d + '/m', tiny_config(d_model=64, pooling_rule='sentence-transformers'))
ref = ref.to('cuda') if __import__('torch').cuda.is_available() else ref
pairs = [['Represent the sentence: ', 'the old bridge measures heavy rain ' * k] for k in range(20)]
print('fp32 parity on this device, max |diff| =', float(np.abs(Instructor.from_pretrained(d + '/m').encode(pairs) - reference_embeddings(ref, pairs)).max()))"
run mfu_large_b64 90 python3 tools/bench_scale.py memory $MFU --chunk_size 0 --dtype bfloat16 --time
run encode_base_mixed_bf16 120 python3 tools/bench_encode.py $ENCODE --lengths mixed --dtype bfloat16
run encode_base_short_bf16 90 python3 tools/bench_encode.py $ENCODE --lengths short --dtype bfloat16
run train_large_medi_bf16 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python3 tools/bench_train.py $MEDI --lengths medi --dtype bfloat16 --steps 5
