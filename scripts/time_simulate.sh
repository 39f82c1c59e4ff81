#!/usr/bin/env bash
# Wall time of `slimtune plan --simulate` for each 70B recipe at its GPU count, one at a time
# (docs/planner.md). Prints one line per recipe: name, wall seconds, user seconds, max RSS, and the
# planner's simulated summary line. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
for entry in llama70b_loram:1 llama70b_qlora_fsdp2:2 llama70b_qlora_zero3:2 llama70b_paca:2 llama70b_s2ft:2 \
             llama8b_galore:1; do
  name=${entry%%:*}; gpus=${entry##*:}
  out=$(mktemp)
  /usr/bin/time -o "$out.time" -f "%e s wall, %U s user, %M KB max RSS" \
    slimtune plan --config "configs/$name.yaml" --gpus "$gpus" --gpu-mem 24GiB --simulate > "$out"
  echo "$name ($gpus GPU): $(cat "$out.time")"
  grep -E "^simulated \(|^verdict" "$out" | sed 's/^/    /'
  rm -f "$out" "$out.time"
done
