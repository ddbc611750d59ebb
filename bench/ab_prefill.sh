#!/usr/bin/env bash
# Same-machine A/B of the eager prefill and load-to-ready: the installed rustinfer against an
# older source tree (extracted from `git archive`), alternating so that drift in the host's speed
# lands on both. Hosts of the same card kind differ by up to 1.5x in Python speed, so figures from
# two calls are not comparable; these are.
#   bench/ab_prefill.sh /tmp/old [rounds]
# Prints one JSON line per run ({"tree": "old"|"new", ...}) and a table last.
set -uo pipefail
OLD=$1
ROUNDS=${2:-2}
MODEL=bench/configs/llama-3.2-1b/config.json
common=(--model "$MODEL" --load-format dummy --device cuda --dtype bfloat16)
old_path="$OLD:$OLD/plugins/ops_cuda:$OLD/plugins/ops_cpu:$OLD/plugins/models_llama3"
old_path="$old_path:$OLD/plugins/models_qwen${PYTHONPATH:+:$PYTHONPATH}"
results=$(mktemp)
for _ in $(seq "$ROUNDS"); do
  for tree in old new; do
    if [ "$tree" = old ]; then pp=$old_path; else pp=${PYTHONPATH:-}; fi
    line=$(PYTHONPATH=$pp python3 -m rustinfer bench latency "${common[@]}" --input-len 2048 \
      --output-len 2 --iters 5 --json 2>/dev/null | tail -n 1)
    echo "{\"tree\": \"$tree\", \"run\": \"prefill_2048\", \"result\": ${line:-null}}" | tee -a "$results"
    line=$(PYTHONPATH=$pp python3 -m rustinfer bench latency "${common[@]}" --input-len 60 \
      --output-len 16 --iters 10 --json 2>/dev/null | tail -n 1)
    echo "{\"tree\": \"$tree\", \"run\": \"ttft_60\", \"result\": ${line:-null}}" | tee -a "$results"
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'tree':<6}{'run':<14}{'prefill ms':>12}{'tok/s':>12}{'load s':>8}")
for r in rows:
    x = r["result"] or {}
    print(f"{r['tree']:<6}{r['run']:<14}{x.get('prefill_ms', '-'):>12}{x.get('prefill_tok_s', '-'):>12}{x.get('load_s', '-'):>8}")
PY
