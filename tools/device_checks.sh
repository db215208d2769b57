#!/usr/bin/env bash
# The accelerator checks, most important first. With no CHECKS, the default set runs: it fits one 10-minute
# device call on one GPU (each check is cut at its budget, `run NAME SECONDS`; the budgets add up to 570 s).
#
#   bash tools/device_checks.sh            # on a GPU (or TPU) machine; logs to $OUT (or ./device_logs)
#   CHECKS="train_large_bf16 max_batch_xl_direct" bash tools/device_checks.sh   # others, by name
#   CHECKS=all bash tools/device_checks.sh # every check (~20 minutes: split it over calls with CHECKS)
#   QUICK=1 bash tools/device_checks.sh    # tiny sizes, to try the script on a CPU first
#   ATTN=xla,cudnn bash tools/device_checks.sh   # the attention variants compared (default below)
#
# Default set (issue 24, docs/attention.md; then the compass goal):
# 1. encode_attention_mixed: tools/bench_encode.py, base, bf16, mixed lengths: each attention implementation's
#    sentences/s and MFU, packed and unpacked, side by side with sentence-transformers, and its largest
#    difference from xla's embeddings on this device (target: >= 40% MFU, base mixed);
# 2. train_attention_medi: tools/bench_train.py --lengths medi, large, bf16: each implementation's real tokens/s
#    and MFU, packed and unpacked, next to PyTorch, with its first-step loss against xla's (target >= 45% MFU);
# 3. encode_attention_short: as 1 with short texts;
# 4. attention_cost: tools/measure_attention_cost.py, base, bf16: the layout planner's attention weight
#    (model.flops.ATTENTION_COST_WEIGHT, fitted on 2 CPU cores) per implementation on this device;
# 5. max_batch_xl_gradcache: tools/bench_scale.py max_batch, instructor-xl, bf16, length 128: GradCache at a
#    contrastive batch of 4,096.
# An implementation that cannot run on the device (pallas_tpu on a GPU, cudnn on a TPU) is reported as refused.
# Others, by name: encode_levers_mixed (fused_qkv and bfloat16_elementwise, with xla and cudnn),
# train_large_bf16 (fixed length 256 against PyTorch, each implementation), max_batch_xl_direct,
# max_batch_large_gradcache, max_batch_large_direct, parity (fp32 against sentence-transformers),
# mfu_large_b64 (tools/bench_scale.py memory --time, large, batch 64 x 256).
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
  COST="--size tiny --tokens 2048 --repeats 1"
else
  TRAIN="--size large --batch_size 32 --seq_len 256"; XL="--size xl --seq_len 128"; LARGE="--size large --seq_len 128"
  XL_GC="--gc_start 4096 --limit 4096 --chunk_size 64"; XL_DIRECT="--start 32 --limit 1024"
  LARGE_GC="--gc_start 2048 --limit 2048 --chunk_size 128"; LARGE_DIRECT="--start 128 --limit 2048"
  MFU="--size large --seq_len 256 --batches 64"
  ENCODE="--size base --num_texts 2048 --batch_size 128 --repeats 2"; MEDI="--size large --batch_size 32 --steps 3"
  COST="--size base --tokens 32768"
fi
ATTN=${ATTN:-xla,cudnn,pallas_tpu}
LEVERS=${LEVERS:-xla+fused_qkv,xla+bfloat16_elementwise,cudnn+fused_qkv+bfloat16_elementwise}
DEFAULT="encode_attention_mixed train_attention_medi encode_attention_short attention_cost max_batch_xl_gradcache"
run() {  # run NAME SECONDS COMMAND...: one check, its output in $OUT/NAME.log, never more than SECONDS
  local name=$1 seconds=$2; shift 2
  case " ${CHECKS:-$DEFAULT} " in *" all "*|*" $name "*) ;; *) return ;; esac
  echo "=== $name: $*"
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "--- exit $? ($name)"; grep -v "it/s\]\|Warning\|warn(" "$OUT/$name.log" | tail -20
}
python3 -c "import jax, flax, torch, transformers, sentence_transformers as st; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'st', st.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
# JAX and PyTorch share the GPU in bench_train: JAX may preallocate only part of it.
run encode_attention_mixed 140 python3 tools/bench_encode.py $ENCODE --lengths mixed --dtype bfloat16 --attention $ATTN
run train_attention_medi 160 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python3 tools/bench_train.py $MEDI --lengths medi --dtype bfloat16 --attention $ATTN
run encode_attention_short 70 python3 tools/bench_encode.py $ENCODE --lengths short --dtype bfloat16 --attention $ATTN
run attention_cost 50 python3 tools/measure_attention_cost.py $COST --dtype bfloat16 --attention $ATTN
run max_batch_xl_gradcache 150 python3 tools/bench_scale.py max_batch $XL $XL_GC --dtype bfloat16 --run --which gradcache
# Not in the default set (name them in CHECKS):
run encode_levers_mixed 150 python3 tools/bench_encode.py $ENCODE --lengths mixed --dtype bfloat16 --attention $LEVERS
run train_large_bf16 180 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python3 tools/bench_train.py $TRAIN --dtype bfloat16 --steps 5 --attention $ATTN
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
