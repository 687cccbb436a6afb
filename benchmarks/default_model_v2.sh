#!/usr/bin/env bash
# The recipe of mlxeff's default model v2: a model with a 2,048-token context that reads it, trained
# on the books plus synthetic task text on one GPU; the finish step compares 4-bit forms of the
# "large" model (and, with MODELS="small large", a float16 "small" one trained side by side) on
# held-out books and tasks.
# Run from the repository root, as a sequence of calls (each at most ~10 minutes):
#
#   PHASE=train  bash benchmarks/default_model_v2.sh DATA [DEST]   # first call: prepare, probe, train
#   PHASE=train  bash benchmarks/default_model_v2.sh DATA [DEST]   # again until it prints "done"
#   PHASE=finish bash benchmarks/default_model_v2.sh DATA [DEST]   # quantize, evaluate, deliver;
#                                                                   # again until it prints "done"
#   PHASE=all    bash benchmarks/default_model_v2.sh DATA [DEST]   # everything, no time limit
#
# DATA holds train-*.txt.gz and valid.txt.gz (the Gutenberg children's corpus); DEST (default
# runs/default-model-v2) receives tasks/ (the task mixture), cache/ (token streams), probe-*/,
# plan.json, small/ and large/ (mlxeff train runs: checkpoints/, model/, train.log, summary.json),
# candidates/ (quantized large models) and summary-v2.json. With $OUT set, finish copies there:
# summary-v2.json, one tar per candidate that fits 16 MB (small-fp16.tar, large-affine4.tar,
# large-seedlm4.tar) and logs.tar.gz.
#
# Phases:
# - prepare: the task mixture from the training books (python -m mlxeff.tasks.mixture, TASK_TOKENS
#   tokens, items laid out so none straddles two training sequences) and the token cache the runs
#   share. The mixture's items are drawn by every core (--workers; the file is the same for any
#   number), its fillers by one: 28 M tokens took 357 s in one process and 206 s with two
#   workers on a 2-core box (3 M tokens: 39.4 s against 30.3 s). A mixture built beforehand can be copied to DEST/tasks/
#   (tasks.txt.gz and tasks.json): prepare then only tokenizes (32 s for the 75 M-token stream on
#   16 cores).
# - probe: PROBE_STEPS steps of each model in MODELS, side by side, as they will train; their last
#   logged tokens/s set each model's steps so they fill TRAIN_BUDGET seconds (plan.json; the probe
#   itself took 84 s on an H100, mostly loading and compiling). SMALL_STEPS / LARGE_STEPS override
#   the plan (set for every model in MODELS: no probe), SMALL_SAVE / LARGE_SAVE its checkpoint
#   intervals (default 50 steps without a plan).
# - train: the runs in the background with --resume; each call stops them after CALL_SECONDS
#   (SIGTERM: a run writes a checkpoint of its last step, as on Ctrl-C; checkpoints also every
#   ~45 s, written atomically; the next call resumes from the newest), so a call fits a 10-minute
#   limit. Prints "done" when every model is saved, else "incomplete".
# - finish: converts the large model to affine 4-bit (group 32, vocabulary matrix 8-bit) and SeedLM
#   4-bit (vocabulary matrix float16), measures sizes, perplexity on valid.txt.gz (window 512,
#   stride 256, first PPL_TOKENS tokens) and the three tasks on EVAL_ITEMS held-out items
#   (multi-document QA EVAL_DOCS passages in ~EVAL_CONTEXT tokens, key-value retrieval EVAL_PAIRS
#   pairs, copy of EVAL_COPY tokens) for every candidate, in the order small-fp16, large-affine4,
#   large-seedlm4, large-fp16 (the float16 large model is the reference for the quantization loss).
#   Each measurement is cached (DEST/evals/); a call starts none after FINISH_SECONDS (a copy
#   measurement decodes 200 x 200 tokens at batch 1) and prints "done" or "incomplete". $OUT gets
#   the (partial) summary every call, the tars once complete.
#
# Choices (budget: 16 MB for the shipped directory, tokenizer included; about 20 minutes of H100
# time for the training, the probe included):
# - The default tokenizer (8192-token byte-level BPE, 546 kB) is kept, so token caches, the eval
#   sets' token counts and tests stay valid.
# - small: the v1 shape (17 layers, width 192, head_dim 32, 2 query heads per KV head, FFN
#   multipliers 0.5 -> 4.0, divisor 32): 7,405,184 parameters, 14.8 MB in float16 + tokenizer =
#   15.4 MB. 18 layers (7.72 M) would leave under 20 kB of room.
# - large: 21 layers, width 320, head_dim 32 (6 -> 10 query heads, 3 -> 5 KV heads), FFN widths
#   192 -> 1280 (divisor 64): 22,297,344 parameters. Sizes measured on this shape (random weights,
#   default tokenizer): affine 4-bit g64 with the tied vocabulary matrix at 8 bits 14,476,252 bytes,
#   g32 15,869,064 (finish uses g32: on the trained model it cost 3.5% perplexity against g64's
#   4.0%, first 20,000 valid tokens, and still fits);
#   SeedLM 4-bit (exactly 4 bits per block weight, vocabulary matrix float16: 5.2 MB) about
#   15.69 MB, the tighter of the two -- 22 layers would be 16.18 MB. Every projection's input width
#   must be a multiple of the affine group (64): a width of 288 would leave every qkv_proj and
#   proj_1 in float16 (36.5 MB). Deep and thin, as MobileLLM (arXiv 2402.14905) finds best for
#   small models at a fixed size; the deeper 36 x 256 (23.8 M, also fitting both formats) has 70%
#   more layers and 40% more attention work per token at 2,048 positions, and with training time
#   fixed a faster model sees more tokens: LARGE_LAYERS=36 LARGE_DIM=256 trains it instead.
# - MODELS: the large shape alone by default. The first run trained both side by side and the
#   large one was the better candidate even in 4-bit form (benchmarks/RESULTS.md); alone it gets
#   the whole GPU (462,692 tokens/s in the probe on an H100, against 238,528 side by side).
# - Context 2048 (OpenELM's), 16 sequences per step, no accumulation: 32,768 tokens per step. The
#   first run took 131,072-token steps (ACCUM=4, as v1's 256 x 512) and made only 850 optimizer
#   steps in its time; at a quarter of the batch the same time gives four times the steps, and its
#   validation perplexity was lower at fewer tokens seen (29.54 after 85.6 M tokens against 32.17
#   after 111.4 M). Micro-batches of 16 keep attention's saved activations within memory.
# - The mixture: TASK_TOKENS (28 M) tokens of task text first in the stream, then the books
#   (47.4 M tokens): task items are 27.8% of the 75.4 M-token stream (exact figures in
#   mixture.json); the rest of the task file is book filler that aligns items with sequences.
#   Items carry follow-up questions (4-8 per multi-document item, 8-16 per key-value item; see
#   mlxeff/tasks/generators.py): the first run's items taught one answer token per ~1,000 tokens
#   of context, and its model learnt no retrieval.
# - AdamW (0.9, 0.95), lr 3e-3 (small, as v1) and 2e-3 (large: wider and deeper), warm-up 10% of
#   the steps (at most 300), cosine to a tenth, weight decay 0.1, clipping 1.0, z-loss 1e-4, bf16
#   compute with fp32 masters, seed 0.
#
# CPU dry run with tiny settings (the whole recipe, every phase, in a few minutes):
#   MODELS="small large" SMALL_LAYERS=2 SMALL_DIM=64 SMALL_HEAD=16 LARGE_LAYERS=2 LARGE_DIM=64 LARGE_HEAD=16 SEQ=256 \
#   BATCH=2 ACCUM=1 PROBE_STEPS=3 TRAIN_BUDGET=20 TASK_TOKENS=20000 DTYPE=float32 VALID_TOKENS=2048 \
#   EVAL_ITEMS=3 EVAL_DOCS=3 EVAL_CONTEXT=200 EVAL_PAIRS=5 EVAL_COPY=30 PPL_TOKENS=4096 \
#   PHASE=all OUT=/tmp/v2-out bash benchmarks/default_model_v2.sh /tmp/tiny-corpus /tmp/v2-run
set -euo pipefail

DATA=${1:?usage: PHASE=train|finish|all bash benchmarks/default_model_v2.sh DATA [DEST]}
DEST=${2:-runs/default-model-v2}
PHASE=${PHASE:-all}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOKENIZER=${TOKENIZER:-$REPO/mlxeff/assets/default}
SEQ=${SEQ:-2048}
TASK_TOKENS=${TASK_TOKENS:-28000000}
BATCH=${BATCH:-16}
ACCUM=${ACCUM:-1}
DTYPE=${DTYPE:-bfloat16}
PROBE_STEPS=${PROBE_STEPS:-30}
TRAIN_BUDGET=${TRAIN_BUDGET:-1100}  # seconds of training (plan.json)
CALL_SECONDS=${CALL_SECONDS:-540}   # a PHASE=train call stops its runs after this many seconds
FINISH_SECONDS=${FINISH_SECONDS:-330}  # a PHASE=finish call starts no measurement after this
SMALL_LAYERS=${SMALL_LAYERS:-17} SMALL_DIM=${SMALL_DIM:-192} SMALL_HEAD=${SMALL_HEAD:-32} SMALL_DIV=${SMALL_DIV:-32} SMALL_LR=${SMALL_LR:-3e-3}
LARGE_LAYERS=${LARGE_LAYERS:-21} LARGE_DIM=${LARGE_DIM:-320} LARGE_HEAD=${LARGE_HEAD:-32} LARGE_DIV=${LARGE_DIV:-64} LARGE_LR=${LARGE_LR:-2e-3}
EVAL_ITEMS=${EVAL_ITEMS:-200} EVAL_DOCS=${EVAL_DOCS:-10} EVAL_CONTEXT=${EVAL_CONTEXT:-2000}
EVAL_PAIRS=${EVAL_PAIRS:-50} EVAL_COPY=${EVAL_COPY:-200} PPL_TOKENS=${PPL_TOKENS:-262144}
VALID_TOKENS=${VALID_TOKENS:-262144}  # validation tokens of each in-training evaluation (4 per run)

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${MLXEFF:-}" ]]; then
  if python -c "import mlxeff.cli.main" 2>/dev/null; then
    MLXEFF="python -m mlxeff.cli.main"
  else
    # Not pip-installed (the GPU machine runs the source tree): cli/ imports as `cli`; the OpenBLAS
    # re-launch (which names mlxeff.cli.main) is for CPU runs only.
    MLXEFF="python -m cli.main"
    export MLXEFF_NO_OPENBLAS=1
  fi
fi
if [[ "$(python -c 'import mlx.core as mx; print(mx.default_device())')" == *cpu* ]]; then
  for lib in /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0; do
    if [[ -f "$lib" && "${LD_PRELOAD:-}" != *openblas* ]]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; break; fi
  done
fi
MODELS=${MODELS:-large}  # which of the two shapes to train (and evaluate): large, or "small large"
HELPER="python $REPO/benchmarks/default_model_v2.py"
MIX="$DEST/tasks/tasks.txt.gz"
TOKENS_PER_STEP=$(( BATCH * ACCUM * SEQ ))

for f in "$DATA/valid.txt.gz"; do [[ -f "$f" ]] || { echo "error: $DATA: no valid.txt.gz" >&2; exit 1; }; done
ls "$DATA"/train-*.txt.gz >/dev/null 2>&1 || { echo "error: $DATA: no train-*.txt.gz shards" >&2; exit 1; }
mkdir -p "$DEST"

shape() {  # the shape options of model $1 (small|large)
  local p=${1^^}; local L=${p}_LAYERS D=${p}_DIM H=${p}_HEAD V=${p}_DIV
  echo "--layers ${!L} --model-dim ${!D} --head-dim ${!H} --qkv-mult 0.5 1.0 --ffn-mult 0.5 4.0 --gqa-groups 2 --ffn-divisor ${!V}"
}

train_run() {  # train_run NAME OUTDIR STEPS SAVE_EVERY SECONDS [extra...]: one mlxeff train run
  local name=$1 out=$2 steps=$3 save=$4 secs=$5; shift 5
  local p=${name^^}; local lr=${p}_LR
  local warmup=$(( steps / 10 < 300 ? steps / 10 : 300 ))
  local resume=(); [[ -d "$out/checkpoints" ]] && resume=(--resume)
  mkdir -p "$out"
  # --train: the mixture FIRST (its layout assumes its tokens start the stream), then the books.
  timeout --signal=TERM --kill-after=30 "$secs" $MLXEFF train \
    --train "$MIX" --train "$DATA/train-*.txt.gz" --tokenizer "$TOKENIZER" $(shape "$name") \
    --seq-len "$SEQ" --batch-size "$BATCH" --accum "$ACCUM" --steps "$steps" \
    --lr "${!lr}" --min-lr "$(python -c "print(${!lr} / 10)")" --warmup "$warmup" --weight-decay 0.1 \
    --clip 1.0 --z-loss 1e-4 --dtype "$DTYPE" --save-dtype float16 --seed 0 \
    --save-every "$save" --log-every 5 --cache-dir "$DEST/cache" --out "$out" \
    ${resume[@]+"${resume[@]}"} "$@" --json > "$out/summary.stdout.json" 2>> "$out/train.log"
}

phase_prepare() {
  echo "== prepare: $TASK_TOKENS task tokens, seq $SEQ" >&2
  $HELPER prepare --data "$DATA" --dest "$DEST" --tokenizer "$TOKENIZER" --tokens "$TASK_TOKENS" --seq-len "$SEQ"
}

phase_probe() {
  [[ -f "$DEST/plan.json" ]] && return 0
  echo "== probe: $PROBE_STEPS steps of each of: $MODELS (side by side)" >&2
  local start=$SECONDS pids=()
  for name in $MODELS; do
    rm -rf "$DEST/probe-$name"
    train_run "$name" "$DEST/probe-$name" "$PROBE_STEPS" "$PROBE_STEPS" 600 & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >&2 || true; fi
  echo "== probe wall time: $(( SECONDS - start )) s" >&2
  $HELPER plan --dest "$DEST" --budget "$TRAIN_BUDGET" --tokens-per-step "$TOKENS_PER_STEP" --models $MODELS
  rm -rf "$DEST"/probe-*/checkpoints "$DEST"/probe-*/model
}

needs_probe() {  # a model to train without a fixed step count (NAME_STEPS)
  local name s; for name in $MODELS; do s=${name^^}_STEPS; [[ -z "${!s:-}" ]] && return 0; done; return 1
}

plan_value() {  # plan_value NAME KEY
  python -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]][sys.argv[3]])" "$DEST/plan.json" "$1" "$2"
}

phase_train() {  # phase_train SECONDS
  local secs=$1 pids=() start=$SECONDS
  for name in $MODELS; do
    [[ -f "$DEST/$name/model/config.json" && -f "$DEST/$name/summary.json" ]] && continue
    local p=${name^^}; local s=${p}_STEPS
    local v=${p}_SAVE
    local steps=${!s:-$(plan_value "$name" steps)} save=${!v:-$( [[ -f "$DEST/plan.json" ]] && plan_value "$name" save_every || echo 50)}
    echo "== train $name: $steps steps of $TOKENS_PER_STEP tokens (stopping after $secs s)" >&2
    train_run "$name" "$DEST/$name" "$steps" "$save" "$secs" \
      --valid "$DATA/valid.txt.gz" --eval-tokens "$VALID_TOKENS" --eval-every $(( steps / 4 > 0 ? steps / 4 : 1 )) & pids+=($!)
  done
  local rc=0
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || rc=$?; done
  echo "== train wall time this call: $(( SECONDS - start )) s (exit $rc; 124 = stopped by the call limit)" >&2
  for name in $MODELS; do tail -n 2 "$DEST/$name/train.log" >&2 || true; done
  $HELPER status --dest "$DEST" --models $MODELS
}

phase_finish() {
  $HELPER finish --data "$DATA" --dest "$DEST" --cli "$MLXEFF" ${OUT:+--out "$OUT"} --models $MODELS \
    --items "$EVAL_ITEMS" --docs "$EVAL_DOCS" --context-tokens "$EVAL_CONTEXT" --pairs "$EVAL_PAIRS" \
    --copy-tokens "$EVAL_COPY" --ppl-tokens "$PPL_TOKENS" --seconds "$1"
}

case "$PHASE" in
  prepare) phase_prepare ;;
  probe) phase_prepare; phase_probe ;;
  train)
    call_start=$SECONDS
    [[ -f "$DEST/cache/.prepared" ]] || { phase_prepare; touch "$DEST/cache/.prepared"; }
    if needs_probe; then phase_probe; fi
    left=$(( CALL_SECONDS - (SECONDS - call_start) ))
    if (( left < 60 )); then echo "== no time left in this call; run PHASE=train again" >&2; $HELPER status --dest "$DEST" --models $MODELS; exit 0; fi
    phase_train "$left" ;;
  finish) phase_finish "$FINISH_SECONDS" ;;
  all)
    [[ -f "$DEST/cache/.prepared" ]] || { phase_prepare; touch "$DEST/cache/.prepared"; }
    if needs_probe; then phase_probe; fi
    phase_train 100000000
    phase_finish 1000000000 ;;
  *) echo "error: PHASE must be prepare, probe, train, finish or all (got $PHASE)" >&2; exit 1 ;;
esac
