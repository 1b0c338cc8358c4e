#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU: set up, calibrate SmolLM2-135M to
# 2 bits with ApiQ-bw (--quick), evaluate it against full precision, RTN, QLoRA and LoftQ, let it
# talk, and draw the paper's figures from those results into $OUT/figures.
# Re-running reuses what is finished (a killed calibration continues where it stopped).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
. .venv/bin/activate
OUT=${OUT:-out/demo}
LIMIT=${LIMIT:-10}   # perplexity windows of 2048 tokens per dataset (full WikiText-2 test: 148)
mkdir -p "$OUT"
[ -f "$OUT/apiq-bw-w2/apiq.json" ] || python calibrate.py --quick --bits 2 --out "$OUT/apiq-bw-w2"
[ -f "$OUT/fp.json" ] || python evaluate.py --limit "$LIMIT" --json "$OUT/fp.json"
[ -f "$OUT/rtn-w2.json" ] || python evaluate.py --limit "$LIMIT" --method rtn --bits 2 --json "$OUT/rtn-w2.json"
[ -f "$OUT/qlora-w2.json" ] || python evaluate.py --ppl '' --method qlora --bits 2 --errors --json "$OUT/qlora-w2.json"
[ -f "$OUT/loftq-w2.json" ] || { rm -rf "$OUT/loftq-w2"; python evaluate.py --limit "$LIMIT" --method loftq --bits 2 \
  --save "$OUT/loftq-w2" --errors --json "$OUT/loftq-w2.json"; }
python evaluate.py --limit "$LIMIT" --ckpt "$OUT/apiq-bw-w2" --errors --json "$OUT/apiq-bw-w2.json" \
  --prompt "The capital of France is"
python plots/act_error.py "$OUT" --out "$OUT/figures/act_error_w2.png"
python plots/weight_error.py "$OUT" --out "$OUT/figures/weight_error_w2.png"
python plots/adapters.py "$OUT" --out "$OUT/figures/adapters_w2.png"
python plots/ppl_bits.py "$OUT" --out "$OUT/figures/ppl_bits.png"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print(f"\nSmolLM2-135M, first {json.loads((Path(sys.argv[1]) / 'fp.json').read_text())['config']['limit']} windows of 2048 tokens")
print(f"| {'model':26} | {'WikiText-2 ppl':>14} | {'C4 ppl':>10} |\n|{'-' * 28}|{'-' * 16}|{'-' * 12}|")
for name, label in [("fp", "full precision (fp32)"), ("rtn-w2", "RTN (= QLoRA init) w2 g64"),
                    ("loftq-w2", "LoftQ w2 g64 (T = 5)"), ("apiq-bw-w2", "ApiQ-bw w2 g64 (--quick)")]:
    r = json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())["ppl"]
    print(f"| {label:26} | {r['wikitext2']:14.2f} | {r['c4']:10.2f} |")
PY
