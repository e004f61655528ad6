#!/usr/bin/env bash
# The whole paper from one command: frame cache -> FCLIP (contrastive.py) -> the 12 runs of
# Table 6 (regress.py) -> Tables 5 and 6, Fig. 3 and the best vision + best text fusion (evaluate.py).
#
#   bash run_all.sh /path/to/Memento10k            real reproduction (GPU, published weights)
#   bash run_all.sh /path/to/Memento10k --search   also the batch-size and lr searches of Table 4
#   bash run_all.sh --demo                         toy dataset + tiny random encoders, CPU, offline
#   bash run_all.sh --demo --fast                  the same, smaller (CI)
#
# A step whose results already exist is skipped, so a rerun after a crash continues where it
# stopped (FCLIP from its last checkpoint); the first failing step stops the script and is named.
# RESULTS=dir changes the output folder (default: results/ in the repository).
set -euo pipefail

DATA="" DEMO=0 FAST=0 SEARCH=0
for arg in "$@"; do
  case "$arg" in
    --demo) DEMO=1 ;;
    --fast) FAST=1 ;;
    --search) SEARCH=1 ;;
    -h|--help) sed -n '2,/^set -e/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run_all.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) [ -z "$DATA" ] || { echo "run_all.sh: one dataset folder, found $DATA and $arg" >&2; exit 2; }; DATA="$arg" ;;
  esac
done
# paths given by the caller are relative to the caller's folder; the scripts run from the repository's
absolute() { case "$1" in ""|/*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
DATA="$(absolute "$DATA")"
RESULTS="$(absolute "${RESULTS:-}")"
cd "$(dirname "$0")"
PY="${PYTHON:-python}"

step() {  # step NAME DONE_FILE COMMAND...: run COMMAND unless DONE_FILE exists ('-': always run)
  local name="$1" done_file="$2"; shift 2
  if [ "$done_file" != - ] && [ -e "$done_file" ]; then echo "== $name: done already ($done_file), skipped"; return; fi
  echo "== $name: $*"
  local t0=$SECONDS
  local code=0
  "$@" || code=$?
  [ $code = 130 ] && { echo "run_all.sh: interrupted during '$name'; the same command continues" >&2; exit 130; }
  [ $code = 0 ] || { echo "run_all.sh: step '$name' failed (exit $code): $*" >&2; exit 1; }
  echo "== $name: finished in $((SECONDS - t0)) s"
}

if [ "$DEMO" = 1 ]; then
  # toy data and tiny random encoders written in the Hugging Face layout, so the same
  # loading code runs as for the published weights
  if [ "$FAST" = 1 ]; then
    RESULTS="${RESULTS:-results/demo-fast}" VIDEOS=60 CL_BATCH=8 CL_EPOCHS=2 EPOCHS=8 START=3 PATIENCE=3
  else
    RESULTS="${RESULTS:-results/demo}" VIDEOS=500 CL_BATCH=16 CL_EPOCHS=5 EPOCHS=60 START=15 PATIENCE=10
  fi
  DATA="$RESULTS/data"
  MODELS="$RESULTS/models"
  SIZE=32  # the tiny encoders' image size
  echo "DEMO: a generated toy dataset and tiny randomly initialised encoders, on CPU, offline."
  echo "DEMO: its numbers say that the pipeline runs, nothing about the paper's results, which need"
  echo "DEMO: the Memento10k dataset and the published weights: bash run_all.sh /path/to/Memento10k"
  CLIP="$MODELS/clip"
  # the tiny stand-in of each published encoder that strategies.py names
  declare -A TINY=([google/vit-base-patch32-224-in21k]="$MODELS/vit" [distilbert-base-uncased]="$MODELS/distilbert"
                   [openai/clip-vit-base-patch32]="$CLIP")
  CL_ARGS=(--checkpoint "$CLIP" --epochs $CL_EPOCHS --lr 1e-3 --batch-size $CL_BATCH)
  RG_ARGS=(--epochs $EPOCHS --patience-start $START --patience $PATIENCE --lr 1e-3 --batch-size 64)
else
  [ -n "$DATA" ] || { echo "usage: bash run_all.sh /path/to/Memento10k [--search] | --demo [--fast]" >&2; exit 2; }
  [ -d "$DATA" ] || { echo "run_all.sh: $DATA is not a folder" >&2; exit 2; }
  RESULTS="${RESULTS:-results}"
  SIZE=224
  declare -A TINY=()
  CL_ARGS=()
  RG_ARGS=()
  [ "$SEARCH" = 1 ] && RG_ARGS=(--lr auto --batch-size table4)
fi

# a step is skipped when its results exist: they must come from the same settings
SETTINGS="data=$DATA demo=$DEMO fast=$FAST search=$SEARCH"
mkdir -p "$RESULTS"
if [ -f "$RESULTS/run_all.settings" ] && [ "$(cat "$RESULTS/run_all.settings")" != "$SETTINGS" ]; then
  echo "run_all.sh: $RESULTS holds runs made with other settings ($(cat "$RESULTS/run_all.settings"); now" \
       "$SETTINGS): give another RESULTS=folder, or delete $RESULTS to start over" >&2
  exit 2
fi
echo "$SETTINGS" > "$RESULTS/run_all.settings"

if [ "$DEMO" = 1 ]; then
  step "demo dataset" "$DATA/memento_test_data.json" $PY demo.py dataset "$DATA" --videos $VIDEOS --seed 0
  step "tiny clip, vit, distilbert" "$MODELS/distilbert/model.safetensors" \
    $PY demo.py models clip vit distilbert --out "$MODELS" --corpus "$DATA/captions.txt"
fi

# frames are decoded once per image family; a finished cache makes these steps instant
step "data summary and frame caches (CLIP and ViT preprocessing)" - \
  $PY data.py --data "$DATA" --prepare --family clip vit --size $SIZE

# results.json is written when FCLIP has finished; an interrupted run is continued from its checkpoint
step "FCLIP: contrastive adaptation (Table 5)" "$RESULTS/fclip/results.json" \
  $PY contrastive.py --data "$DATA" --out "$RESULTS/fclip" --resume "${CL_ARGS[@]}"

# one run per row of strategies.py and modality (Table 6): "STRATEGY MODALITY ENCODER" lines
mapfile -t ROWS < <($PY strategies.py)
[ ${#ROWS[@]} -gt 0 ] || { echo "run_all.sh: strategies.py listed no strategy" >&2; exit 1; }
for row in "${ROWS[@]}"; do
  read -r s m encoder <<< "$row"
  extra=() done_file="$RESULTS/s$s-$m/results.json"
  if [ "$DEMO" = 1 ] && [ "$encoder" != fclip ]; then
    [ -n "${TINY[$encoder]:-}" ] || { echo "== strategy $s $m: left out of the demo (no tiny stand-in for $encoder)"; continue; }
    extra=(--checkpoint "${TINY[$encoder]}")
  fi
  # an FCLIP row starts from FCLIP: after a newer FCLIP, regress.py looks (and refuses folds of the old one)
  if [ "$encoder" = fclip ] && [ "$RESULTS/fclip/results.json" -nt "$done_file" ]; then done_file=-; fi
  step "strategy $s $m (Table 6)" "$done_file" \
    $PY regress.py --strategy "$s" --modality "$m" --data "$DATA" --fclip "$RESULTS/fclip/model" \
      --out "$RESULTS/s$s-$m" "${RG_ARGS[@]}" "${extra[@]}"
done

step "Tables 5 and 6, Fig. 3, best vision + best text fusion" - $PY evaluate.py "$RESULTS" --fuse-best
echo
echo "Tables: $RESULTS/table5.md, $RESULTS/table6.md (and .csv), figure: $RESULTS/fig3.png, fusion: $RESULTS/fusion.json"
[ "$DEMO" = 1 ] && echo "DEMO: toy data and random-initialised tiny encoders; these are not the paper's numbers."
exit 0
