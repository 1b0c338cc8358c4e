#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU: set up, calibrate SmolLM2-135M to
# 2 bits with ApiQ-bw (--quick), make the RTN, QLoRA and LoftQ inits it is compared with and,
# for the adapters figure (ApiQ fig. 5), the first PAPER_BLOCKS (8) blocks of ApiQ-bw from the
# paper's start (A kaiming uniform, B = 0), evaluate them all against full precision (first
# LIMIT windows of WikiText-2 test and of C4), let the ApiQ model talk beside the full-precision
# one, draw the paper's figures into $OUT/figures and print the table. The steps are results.sh's
# (one place for each command), in two lanes of one thread each (2 cores); the paper-start blocks
# (~10 s each) go in the shorter, baselines lane. Re-running reuses what is finished, and a
# killed calibration continues where it stopped. ~15 minutes on 2 quiet cores, setup included
# (16.0 with LIMIT=8 on 2026-12-06's machine, whose calibration took 9.9 min: LIMIT is 4 since).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
export OUT=${OUT:-out/demo} LIMIT=${LIMIT:-4} ITEMS=${ITEMS:-0} THREADS=1 PAPER_BLOCKS=${PAPER_BLOCKS:-8}
mkdir -p "$OUT"
bash results.sh calib-bw-w2 eval-apiq-bw-w2 talk-apiq-bw-w2 > "$OUT/lane-apiq.log" 2>&1 &
apiq=$!
bash results.sh calib-rtn-w2 calib-qlora-w2 calib-loftq-w2 calib-bw-paper-w2 \
  eval-fp eval-rtn-w2 eval-qlora-w2 eval-loftq-w2 \
  > "$OUT/lane-baselines.log" 2>&1 || { echo "demo.sh: the baselines failed, see $OUT/lane-baselines.log" >&2; exit 1; }
wait $apiq || { echo "demo.sh: the ApiQ lane failed, see $OUT/lane-apiq.log" >&2; exit 1; }
grep -A3 "^prompt:" "$OUT/lane-apiq.log" || true
bash results.sh figures-w2 table
