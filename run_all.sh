#!/usr/bin/env bash
# The whole paper in one command: frame caches -> FCLIP (contrastive.py) -> the 12 runs of Table 6
# (regress.py) -> Tables 5 and 6 and Fig. 3 (evaluate.py) -> curves and the best vision + text
# fusion (tools/report.py).
#
#   bash run_all.sh /path/to/Memento10k            the paper's runs (a GPU, the published weights)
#   bash run_all.sh /path/to/Memento10k --search   also Table 4's batch-size and lr searches
#   bash run_all.sh --demo                         toy dataset, tiny random encoders, CPU, offline
#   bash run_all.sh --demo --fast                  the same, smaller (the tests)
#
# Every step runs every time: a script reuses in seconds what it finished for the same inputs, goes
# on with what it left unfinished, and refuses in one line what other inputs made (after an edit
# of the code, say), naming what changed; the first step that fails stops this script.
# Environment: RESULTS=dir (default results/, results/demo), CONTRASTIVE_ARGS="--batch-size 16",
# REGRESS_ARGS="--dtype float16", LAUNCH="torchrun --nproc_per_node 8" (the fine-tuned runs and
# FCLIP), PYTHON=python3, FCLIP_CACHE=dir (the caches; the demo's default: RESULTS/cache).
set -euo pipefail

DATA="" DEMO=0 FAST=0 SEARCH=0
for arg in "$@"; do
  case "$arg" in
    --demo) DEMO=1 ;;
    --fast) FAST=1 ;;
    --search) SEARCH=1 ;;
    -h|--help) sed -n '2,/^set -e/{/^#/p;}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run_all.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) [ -z "$DATA" ] || { echo "run_all.sh: one dataset folder, found $DATA and $arg" >&2; exit 2; }
       DATA="$arg" ;;
  esac
done
# paths given by the caller are relative to the caller's folder; the scripts run from the repository's
absolute() { case "$1" in ""|/*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
DATA="$(absolute "$DATA")"
RESULTS="$(absolute "${RESULTS:-}")"
[ -z "${FCLIP_CACHE:-}" ] || export FCLIP_CACHE="$(absolute "$FCLIP_CACHE")"
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
LAUNCH="${LAUNCH:-$PY}"
read -r -a CONTRASTIVE_EXTRA <<< "${CONTRASTIVE_ARGS:-}"
read -r -a REGRESS_EXTRA <<< "${REGRESS_ARGS:-}"

step() {  # step NAME COMMAND...: run it; stop here, naming it, when it fails
  local name="$1" t0=$SECONDS code=0; shift
  echo "== $name: $*"
  "$@" < /dev/null || code=$?
  [ $code = 130 ] && { echo "run_all.sh: interrupted during '$name'; the same command goes on" >&2; exit 130; }
  [ $code = 2 ] && { echo "run_all.sh: step '$name' refused (the line above says why); to keep what other" \
    "inputs made, give another RESULTS=folder, or delete $RESULTS to start over" >&2; exit 2; }
  [ $code = 0 ] || { echo "run_all.sh: step '$name' failed (exit $code): $*" >&2; exit 1; }
  echo "== $name: finished in $((SECONDS - t0)) s"
}

if [ "$DEMO" = 1 ]; then
  if [ "$FAST" = 1 ]; then
    RESULTS="${RESULTS:-results/demo-fast}" VIDEOS=60 CL_BATCH=8 CL_EPOCHS=2 EPOCHS=8 START=3 PATIENCE=3
  else
    RESULTS="${RESULTS:-results/demo}" VIDEOS=500 CL_BATCH=16 CL_EPOCHS=5 EPOCHS=60 START=15 PATIENCE=10
  fi
  export FCLIP_CACHE="${FCLIP_CACHE:-$PWD/$RESULTS/cache}"
  DATA="$RESULTS/data" MODELS="$RESULTS/models" SIZE=32 DEVICE=cpu  # the tiny encoders' image size
  echo "DEMO: a generated toy dataset and tiny randomly initialised encoders, on the CPU, offline."
  echo "DEMO: its numbers say that the pipeline runs, nothing about the paper's results, which need"
  echo "DEMO: the Memento10k dataset and the published weights: bash run_all.sh /path/to/Memento10k"
  CL_ARGS=(--checkpoint "$MODELS/clip" --epochs $CL_EPOCHS --lr 1e-3 --batch-size $CL_BATCH)
  RG_ARGS=(--epochs $EPOCHS --patience-start $START --patience $PATIENCE --lr 1e-3 --batch-size 64)
  step "demo dataset" $PY -m tools.demo dataset "$DATA" --videos $VIDEOS --seed 0
  step "tiny clip, vit, distilbert" $PY -m tools.demo models clip vit distilbert --out "$MODELS" \
    --corpus "$DATA/captions.txt"
else
  [ -n "$DATA" ] || { echo "usage: bash run_all.sh /path/to/Memento10k [--search] | --demo [--fast]" >&2; exit 2; }
  [ -d "$DATA" ] || { echo "run_all.sh: $DATA is not a folder" >&2; exit 2; }
  RESULTS="${RESULTS:-results}" SIZE=224 DEVICE=cuda CL_ARGS=() RG_ARGS=()
  [ "$SEARCH" = 1 ] && RG_ARGS=(--lr auto --batch-size table4)
fi

step "data summary and frame caches (CLIP's and ViT's preprocessing)" \
  $PY data.py --data "$DATA" --prepare --family clip vit --size $SIZE
step "FCLIP: contrastive adaptation (Table 5)" $LAUNCH contrastive.py --data "$DATA" \
  --out "$RESULTS/fclip" --device $DEVICE --resume ${CL_ARGS[@]+"${CL_ARGS[@]}"} \
  ${CONTRASTIVE_EXTRA[@]+"${CONTRASTIVE_EXTRA[@]}"}

# a run for each row of regress.STRATEGIES and modality (Table 6): "STRATEGY MODALITY ENCODER FROZEN"
ROWS="$($PY -c 'import regress
for s, r in regress.STRATEGIES.items():
    [print(s, m, r.encoder(m), int(r.frozen)) for m in ("vision", "text") if r.encoder(m)]')"
while read -r s m encoder frozen; do
  extra=() run="$PY"
  [ "$frozen" = 1 ] || run="$LAUNCH"  # frozen strategies embed once, on one process
  if [ "$DEMO" = 1 ] && [ "$encoder" != fclip ]; then
    case "$encoder" in  # the tiny stand-in of each published encoder
      google/vit-base-patch32-224-in21k) extra=(--checkpoint "$MODELS/vit") ;;
      distilbert-base-uncased) extra=(--checkpoint "$MODELS/distilbert") ;;
      openai/clip-vit-base-patch32) extra=(--checkpoint "$MODELS/clip") ;;
      *) echo "== strategy $s $m: left out of the demo (no tiny stand-in for $encoder)"; continue ;;
    esac
  fi
  step "strategy $s $m (Table 6)" $run regress.py --strategy "$s" --modality "$m" --data "$DATA" \
    --fclip "$RESULTS/fclip/model" --out "$RESULTS/s$s-$m" --device $DEVICE \
    ${RG_ARGS[@]+"${RG_ARGS[@]}"} ${extra[@]+"${extra[@]}"} ${REGRESS_EXTRA[@]+"${REGRESS_EXTRA[@]}"}
done <<< "$ROWS"

step "Tables 5 and 6, Fig. 3" $PY evaluate.py "$RESULTS"
step "curves, best vision + best text fusion" $PY -m tools.report "$RESULTS"
echo
echo "Tables: $RESULTS/table5.md, $RESULTS/table6.md (and .csv), figure: $RESULTS/fig3.png, fusion: $RESULTS/fusion.json"
[ "$DEMO" = 1 ] && echo "DEMO: toy data and random-initialised tiny encoders; these are not the paper's numbers."
exit 0
