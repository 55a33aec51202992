#!/usr/bin/env bash
# The accuracy benchmark with the default commands only (issue 17): `mist-kit train --method mist|linear --seeds 0,1,2`
# exactly as a user types them, on Caltech-101 VTAB-1k and the two small tasks of bench/splits/. One job per
# argument (TASK:METHOD), run in order; each writes bench/work/defaults/TASK-METHOD/{report.json,log.txt,uptime.txt}.
#
#   OMP_NUM_THREADS=1 nice -n 10 bench/accuracy_defaults.sh caltech101:mist few10:mist &
#   OMP_NUM_THREADS=1 nice -n 10 bench/accuracy_defaults.sh caltech101:linear faces2:linear few10:linear faces2:mist &
#
# Env: DATA (Caltech-101 VTAB-1k folder), WEIGHTS (DINOv2 ViT-S/14 safetensors), CALTECH_CACHE (a feature cache root
# for the Caltech lists), SMALL_CACHE (the small tasks' cache root, default bench/work/defaults/cache), WORK (output
# root, default bench/work/defaults). To measure a lever against the defaults: EXTRA (flags appended to every
# command, e.g. "--ema 0.99") and TAG (appended to each job's folder name: TASK-METHOD-TAG).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-/work/shared/data/caltech101-vtab1k}
WEIGHTS=${WEIGHTS:-/work/cache/dinov2_vits14.safetensors}
CALTECH_CACHE=${CALTECH_CACHE:-/work/cache/caltech}
WORK=${WORK:-$ROOT/bench/work/defaults}
SMALL_CACHE=${SMALL_CACHE:-$WORK/cache}
read -r -a extra <<< "${EXTRA:-}"
MK=$ROOT/.venv/bin/mist-kit
mkdir -p "$WORK"
for job in "$@"; do
  task=${job%%:*}; method=${job##*:}
  if [ "$task" = caltech101 ]; then
    train=$DATA/train800.txt; val=$DATA/val200.txt; test=$DATA/test.txt; cache=$CALTECH_CACHE
  else  # the split lists next to the Caltech images (list paths are relative to the list's folder)
    d=$WORK/splits/$task; mkdir -p "$d"
    cp "$ROOT/bench/splits/$task/"*.txt "$d/"; ln -sfn "$DATA/images" "$d/images"
    train=$d/train.txt; val=$d/val.txt; test=$d/test.txt; cache=$SMALL_CACHE
  fi
  out=$WORK/$task-$method${TAG:+-$TAG}
  mkdir -p "$out"
  uptime > "$out/uptime.txt"
  cmd=("$MK" train --backbone vit_small_patch14_dinov2 --weights "$WEIGHTS" --img-size 224 --train "$train"
       --val "$val" --test "$test" --method "$method" --seeds 0,1,2 --out "$out/run" --cache-dir "$cache" --json
       ${extra[@]+"${extra[@]}"})
  echo "${cmd[*]}" > "$out/command.txt"
  start=$(date +%s)
  "${cmd[@]}" > "$out/report.json" 2> "$out/log.txt"
  echo "$(( $(date +%s) - start )) s wall" >> "$out/uptime.txt"; uptime >> "$out/uptime.txt"
  echo "$job done"
done
