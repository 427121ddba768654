#!/usr/bin/env bash
# Issue 5's throughput call on a 2-GPU machine (device tool, carry .whl): the single-GPU run, then the named sharded
# variants (traced: profile/idle.json says where the GPU waits), all on the Llama-2-7B shape with the optimized
# settings, one table with the single-GPU run as baseline. Usage: bash scripts/gpu_dist_bench.sh fsdp2 [zero3 zero3dsl ...]
# Per GPU, every run does the same work a step: the single GPU the recipe's batch of 4 sequences, each sharded process
# 4 too (trainer.batch_size = 4 x processes), as the original configs did (accumulation 4 per process, so 8
# sequences a step on 2 GPUs). SHARDED_BATCH=4 keeps the global batch instead: each GPU then does half the work a step
# and the fixed cost of a step (optimizer, gathers) weighs twice as much per token.
# MICRO=4 sets the micro-batch of every run (default 2: 2 micro-batches a step per GPU; 4: one) and suffixes the names.
# On a fresh machine (install and checkpoint build) the single run and two sharded variants took 388-550 s (AM-AU).
# PROFILE_PYTHON=1 also records the traced steps' Python calls (trainer.profile_python): idle.json names the Python
# function behind each large gap.
# PROCS=1 runs the sharded variants as one process (a 1-GPU machine: the sharding's hooks without communication).
# ROUNDS=2 runs the whole sequence twice in the call (on a warm machine with the checkpoint built, single + one
# sharded variant twice fit 10 minutes: ~220 s a round in the twelfth session's calls).
set -u
O="trainer.torch_compile=true model.attn_implementation=fastest trainer.expandable_segments=true trainer.micro_batch_size>=${MICRO:-2} trainer.lazy_metrics=true trainer.async_inputs=true"
Z3="$O dist=zero3 dist.zero3_leaf_blocks=true dist.zero3_prefetch_bucket_size=60000000"
declare -A SHARDED=(
  [fsdp2]="$O dist=fsdp dist.fsdp_version=2"
  [fsdp2_nosync]="$O dist=fsdp dist.fsdp_version=2 dist.sync_each_micro_batch=false"  # accelerate's no_sync
  [zero3]="$Z3"
  # every 4-bit weight (at most 1.5e7 bf16 storage elements on the 7B/8B shapes) stays whole on each GPU, only the
  # embedding and head sharded (call AP: 0.69x, no faster: DeepSpeed re-gathers every persistent parameter each step)
  [zero3res]="$Z3 dist.zero3_persistence_threshold=20000000"
  # nothing persistent: LoRA matrices and norms join their block's one coalesced fetch instead of DeepSpeed's
  # one-collective-per-parameter re-gather of persistent parameters after every optimizer step (call AR: 0.49x, slower)
  [zero3p0]="$Z3 dist.zero3_persistence_threshold=0"
  # DeepSpeed's fast sharding of the leaf blocks: no host sync on pending fetch events, no per-shard stream records
  # (MICRO=4: 0.75x in AS, 0.70x in AT, within zero3's own spread)
  [zero3fast]="$Z3 dist.zero3_leaf_fast_sharding=true"
  # and LoRA's gradients reduced every ~3 blocks of the backward instead of mostly after it (r=8: ~6e5 a block)
  # (MICRO=4: 0.76x in AT, 0.77x in AU against zero3's 0.66x there; the fastest ZeRO-3, not yet 0.8x)
  [zero3fastrb]="$Z3 dist.zero3_leaf_fast_sharding=true dist.zero3_reduce_bucket_size=2000000"
  [zero3dsl]="$Z3 dist.zero3_memory_efficient_linear=true"  # DeepSpeed's linear kept (recompiles each block)
)
batch=" trainer.batch_size=${SHARDED_BATCH:-$((4 * ${PROCS:-2}))}"
export COMMON="+recipe=llama2_chatml bench.shape=llama2_7b bench.steps=10 bench.warmup=5 lora.train_new_tokens=false"
for round in $(seq 1 "${ROUNDS:-1}"); do
  # ROUNDS=2: single, sharded, single, sharded in one call (names suffixed _r1, _r2), the same-call spread of each;
  # only the first round's sharded runs are traced
  suffix=; [ "${ROUNDS:-1}" = 1 ] || suffix=_r$round
  # MICRO=4 names the runs single_mb4, fsdp2_mb4, ...: a second invocation in the same call (APPEND=1) then adds to
  # $OUT instead of overwriting the first one's files (call AR lost its micro-batch-2 files that way)
  suffix=${MICRO:+_mb$MICRO}$suffix
  [ "$round" = 1 ] || export NO_INSTALL=1 APPEND=1
  [ -d /tmp/qrc/models/bench-llama2_7b ] && first=130 || first=230  # the first run on a machine builds the checkpoint
  TIMEOUT=$first VARIANTS="single$suffix: $O quant.upcast_unquantized=false" bash scripts/gpu_bench.sh || exit 1
  profile=; [ "$round" = 1 ] && profile=" bench.profile=true${PROFILE_PYTHON:+ trainer.profile_python=true}"
  for name in "$@"; do
    [ -n "${SHARDED[$name]:-}" ] || { echo "unknown variant $name (${!SHARDED[*]})"; exit 2; }
    NO_INSTALL=1 APPEND=1 TIMEOUT=${TIMEOUT_SHARDED:-330} COMMON="$COMMON$profile" \
      VARIANTS="$name$suffix: ${SHARDED[$name]}${PROCS:+ dist.num_processes=$PROCS}$batch" bash scripts/gpu_bench.sh
  done
done
