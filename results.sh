#!/usr/bin/env bash
# Every row and figure of RESULTS.md on the embedded SmolLM2-135M, on a CPU.
#
#   bash results.sh                 # all steps, in order; finished steps are skipped
#   bash results.sh calib-bw-w2 eval-apiq-bw-w2    # only these steps (e.g. two shells in parallel)
#   bash results.sh list            # the step names
#   OUT=out/demo ITEMS=0 bash results.sh calib-bw-w2 ...    # what demo.sh runs
#   FT_LOSS=kd bash results.sh ft-apiq-bw-w2                # finetune.py --loss kd from OUT/apiq-bw-w2
#   bash results.sh study-none-w2-s0 study-r0.3-w2-s1       # the saliency study (Cao & Aref Tables 1-2): below
#   bash results.sh bench-reference bench-tune-peers-w2   # the benchmark: the day's clock, the peers' tuning rows
#   bash results.sh bench-tune-apiq-w2                    # ... and ApiQ-bw's (a second single-thread lane)
#   bash results.sh bench-test-w2 bench-best-w2           # then the test split: the rows chosen on the tuning set
#   bash results.sh bench-figures                         # perplexity against minutes and bits per weight
#   bash results.sh peers           # the older headline table (bench/bench_peers.py before the protocol)
#   bash results.sh tasks-apiq-bw-w2-s0 tasks-loftq-w2-s0   # the task study (ApiQ fig. 1): below
#   PPL= bash results.sh eval-apiq-bw-w2     # activation/weight errors (+ zero-shot) only, for the figures
#   PAPER_BLOCKS=8 bash results.sh calib-bw-paper-w2   # ApiQ-bw from the paper's start, first 8 blocks (fig. 5)
#
# Calibration uses calibrate.py --quick (RECIPE=--long for the long one; `calibrate.py --help` shows
# what each sets; the paper: 128 x 2048 tokens, 20 epochs). Perplexity is on the first LIMIT windows of 2048 tokens of WikiText-2 test and of C4,
# zero-shot accuracy on the first ITEMS items of each task. Each step's exact command is echoed;
# the timings are in each JSON ("seconds", "calibration_seconds" in the model's apiq.json).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || bash setup.sh
. .venv/bin/activate
OUT=${OUT:-out/results}      # JSON results, saved models, saliency
LIMIT=${LIMIT:-40}           # perplexity windows per dataset (full WikiText-2 test: 148)
PPL=${PPL-wikitext2,c4}      # perplexity datasets of the eval-* steps ('': none; the peers step has them all)
ITEMS=${ITEMS:-50}           # zero-shot items per task (0: none)
THREADS=${THREADS:-1}        # torch threads per process (1 lets two steps share 2 cores)
SAL_LAMBDA=${SAL_LAMBDA:-1}  # the paper's lambda (multiplier 1)
FT_LOSS=${FT_LOSS:-ce}       # finetune.py --loss: ce (paper) or kd (ft-* steps write NAME-ft-kd)
PAPER_BLOCKS=${PAPER_BLOCKS:-}  # calib-bw-paper-*: calibrate only the first this many blocks ('': all)
STUDY_LIMIT=${STUDY_LIMIT:-40}  # saliency study: WikiText-2 test and C4 windows per model
STUDY_ITEMS=${STUDY_ITEMS:-0}   # saliency study: zero-shot items per task (0: none; 500: 1 point of standard error)
# the benchmark's tuning rows (bench/bench_peers.py --split tuning: WikiText-2 validation), the peers at
# their presets and AutoRound at its light (50) and default (200) iterations, at ~10, 20, 40 minutes
PEER_TUNING=${PEER_TUNING:-"fp hqq gptq autoround:iters=50,seqlen=256 autoround:iters=200,batch_size=2,seqlen=256
  autoround:iters=50 autoround:iters=200,batch_size=2 autoround:iters=50,seqlen=1024 autoround:iters=200,batch_size=4"}
# ApiQ-bw's tuning rows on the same clock: the paper's adapter share (rank 8 here), issue 35's levers
# on --quick one at a time (signed steps at AutoRound's step rule 1/steps: 1/64 for --quick's 64
# steps; the best step; the end-to-end stage, with and without the step sizes), the two that helped
# together (docs/recipes.md), then four windows a step, a longer budget and rank 64
APIQ_TUNING=${APIQ_TUNING:-"apiq:quick,rank=8 apiq:quick,rank=8,sign_steps,lr_round=0.016 apiq:quick,rank=8,best_step
  apiq:quick,rank=8,e2e_epochs=1 apiq:quick,rank=8,e2e_epochs=1,e2e_lr_scale=0
  apiq:quick,rank=8,sign_steps,lr_round=0.016,e2e_epochs=1 apiq:quick,rank=8,sign_steps,lr_round=0.016,e2e_epochs=2
  apiq:quick,rank=8,batch_size=4,epochs=8 apiq:quick,rank=8,nsamples=64,epochs=3 apiq:quick"}
FT_TAG=$([ "$FT_LOSS" = kd ] && echo -kd || true)
mkdir -p "$OUT"

say() { echo "+ $*" >&2; "$@"; }
EVAL=(--ppl "$PPL" --limit "$LIMIT" --threads "$THREADS")   # + --errors where quantized
[ "$ITEMS" -gt 0 ] && EVAL+=(--tasks all --task-limit "$ITEMS")   # ITEMS=0: perplexity only

calib() {  # calib <name> <calibrate.py args...>: every quantized model, ApiQ or a data-free init
  local name=$1; shift
  [ -f "$OUT/$name/apiq.json" ] || say python calibrate.py "${RECIPE:---quick}" --threads "$THREADS" --out "$OUT/$name" "$@"
}
# calib-bw-paper-w<bits>: ApiQ-bw with the --quick recipe's data budget from the paper's start (A
# kaiming uniform, B = 0, plain rounding), for plots/adapters.py (ApiQ fig. 5). With PAPER_BLOCKS
# only the first PAPER_BLOCKS blocks (--stop-after; the model stays unfinished, blocks/ and
# progress.json): done when progress.json lists that many, a killed run calibrates only the rest.
calib_paper() {  # calib_paper <bits>
  local name=apiq-bw-paper-w$1 stop=()
  if [ -n "$PAPER_BLOCKS" ]; then
    case $PAPER_BLOCKS in *[!0-9]*|0*) echo "results.sh: PAPER_BLOCKS=$PAPER_BLOCKS: a number of blocks > 0" >&2
      exit 2 ;; esac
    local have=0 progress="$OUT/$name/progress.json"
    [ -f "$progress" ] && have=$(python -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["blocks"]))' \
      "$progress")
    [ "$have" -ge "$PAPER_BLOCKS" ] && return 0
    stop=(--stop-after $((PAPER_BLOCKS - have)))
  fi
  calib "$name" --bits "$1" --lora-init standard --no-learn-rounding ${stop[@]+"${stop[@]}"}
}
evaluate() {  # evaluate <name> <evaluate.py args...>
  local name=$1; shift
  [ -f "$OUT/$name.json" ] || say python evaluate.py --json "$OUT/$name.json" "$@"
}

STEPS=(sal)
for b in 2 3; do STEPS+=(calib-bw-w$b calib-bw-paper-w$b calib-lw-w$b calib-bw-sal-after-w$b calib-bw-sal-before-w$b); done
for b in 2 3 4; do STEPS+=(calib-rtn-w$b calib-qlora-w$b calib-loftq-w$b); done
STEPS+=(eval-fp)
for b in 2 3 4; do STEPS+=(eval-rtn-w$b eval-qlora-w$b eval-loftq-w$b); done
for b in 2 3; do STEPS+=(eval-apiq-bw-w$b eval-apiq-lw-w$b eval-apiq-bw-sal-after-w$b eval-apiq-bw-sal-before-w$b); done
for b in 2 3; do for m in qlora loftq apiq-lw apiq-bw apiq-bw-sal-after; do STEPS+=(ft-$m-w$b); done; done
STEPS+=(ft-fp peers figures figures-ft table)

# The saliency study: study-<config>-w<bits>-s<seed> calibrates (--quick, --seed) into OUT/study/
# and evaluates WikiText-2 and C4 (STUDY_LIMIT windows) into study/<name>.json; with STUDY_ITEMS > 0
# also the 5 zero-shot tasks into study/<name>-zs.json, 8 options a forward pass (~1.7x faster than
# one by one, the same scores); fp32: bf16 (~2.7x faster again on a CPU with AMX) moved a 2-bit
# model's average by 1.1 points on 200 items a task, WinoGrande's by 4. Rerun a finished step with
# STUDY_ITEMS set to add them. <config>:
#   none          plain ApiQ-bw
#   lam<L>        the paper's raw penalty, lambda = L (lam1: the paper's setting)
#   r<R>          scale-free: the penalty starts at R x the block's MSE (--sal-ratio R)
# with any of these in front: before- (BeforeLoRA; default AfterLoRA), c4- (alpha from C4:
# step sal-c4), l2- (alpha_i = 1, the naive penalty), m<M>- (multiplier M). E.g. study-c4-r0.3-w2-s1.
study() {
  local name=$1 rest=${1##*-w}; local spec=${1%-w*} b=${rest%-s*} seed=${rest#*-s}
  local args=(--bits "$b" --seed "$seed") sal="$OUT/saliency" variant=after strength=$spec mult
  while :; do case $strength in
      before-*) variant=before; strength=${strength#before-} ;;
      c4-*) sal="$OUT/saliency-c4"; strength=${strength#c4-} ;;
      l2-*) sal=; strength=${strength#l2-} ;;
      m[0-9]*-*) mult=${strength%%-*}; args+=(--sal-multiplier "${mult#m}"); strength=${strength#*-} ;;
      *) break ;;
  esac; done
  local pen=(--weight-penalty 1)
  [ -n "$sal" ] && pen=(--saliency "$sal")
  case $strength in
    none) pen=() ;;
    lam[0-9]*) if [ -n "$sal" ]; then pen+=(--sal-lambda "${strength#lam}"); else pen=(--weight-penalty "${strength#lam}"); fi ;;
    r[0-9]*) pen+=(--sal-ratio "${strength#r}") ;;
    *) echo "results.sh: study step '$1': <config>-w<bits>-s<seed>, config none, lam<L> or r<R> with before-, c4-, l2-, m<M>- in front" >&2
       exit 2 ;;
  esac
  [ ${#pen[@]} -gt 0 ] && pen+=(--sal-variant "$variant")
  calib "study/$name" "${args[@]}" ${pen[@]+"${pen[@]}"}            # (bash 3.2: no empty "${a[@]}" under set -u)
  evaluate "study/$name" --ckpt "$OUT/study/$name" --ppl wikitext2,c4 --limit "$STUDY_LIMIT" --threads "$THREADS"
  if [ "$STUDY_ITEMS" -gt 0 ]; then
    evaluate "study/$name-zs" --ckpt "$OUT/study/$name" --ppl '' --tasks all --task-limit "$STUDY_ITEMS" \
      --batch-size 8 --threads "$THREADS"
  fi
}

step() {
  case $1 in
    sal) [ -f "$OUT/saliency/saliency.json" ] || say python saliency.py --threads "$THREADS" --out "$OUT/saliency" ;;
    sal-c4) [ -f "$OUT/saliency-c4/saliency.json" ] || say python saliency.py --dataset c4 --threads "$THREADS" \
        --out "$OUT/saliency-c4" ;;
    study-*-w[0-9]-s[0-9]*) study "${1#study-}" ;;
    figures-study) say python plots/saliency_study.py "$OUT/study" ;;
    # the task study (ApiQ fig. 1): tasks-<start>-w<bits>-s<seed> finetunes from a start with
    # finetune.py --data commonsense (the five tasks' train parts, the official multitask settings; the
    # same recipe for every start, --seed the example order) into OUT/tasks/; before (seed 0 only: the
    # start is the same) and after, each task's 300 held-out items by both scorings (~2 h a run on one
    # core: the start's scores ~32 min, 108 steps ~55 min, the scores after). <start>: qlora, loftq,
    # apiq-bw (calib-* steps: --quick, rank 64); tasks-fp-s<seed>: full precision + LoRA (its start
    # scored by tasks-fp-before, evaluate.py on the same items). tasks-table: bench/results/task_study.json
    # and figures/task_study.png.
    tasks-fp-before) [ -f "$OUT/tasks/fp-before.json" ] || say python evaluate.py --ckpt smollm2-135m --ppl '' \
        --tasks all --task-part held_out --task-limit 300 --generate-answers --threads "$THREADS" \
        --json "$OUT/tasks/fp-before.json" ;;
    tasks-fp-s[0-9]*) local s=${1##*-s}
      [ "$s" = 0 ] && step tasks-fp-before
      [ -f "$OUT/tasks/fp-lora-s$s/finetune_log.json" ] || say python finetune.py --ckpt smollm2-135m --fp-lora \
        --data commonsense --seed "$s" --threads "$THREADS" --out "$OUT/tasks/fp-lora-s$s" ;;
    tasks-*-w[0-9]-s[0-9]*) local run=${1#tasks-}; local start=${run%-w*} b=${run##*-w} s=${run##*-s}; b=${b%-s*}
      case $start in
        qlora|loftq) step "calib-$start-w$b" ;;
        apiq-bw) step "calib-bw-w$b" ;;
        *) echo "results.sh: $1: tasks-<start>-w<bits>-s<seed>, start qlora, loftq or apiq-bw" >&2; exit 2 ;;
      esac
      local before=()
      [ "$s" = 0 ] && before=(--eval-before)
      [ -f "$OUT/tasks/$run/finetune_log.json" ] || say python finetune.py --ckpt "$OUT/$start-w$b" \
        --data commonsense --seed "$s" ${before[@]+"${before[@]}"} --threads "$THREADS" --out "$OUT/tasks/$run" ;;
    tasks-table) say python plots/task_study.py "$OUT/tasks" --json bench/results/task_study.json ;;
    calib-bw-w[0-9]) calib "apiq-bw-w${1#calib-bw-w}" --bits "${1#calib-bw-w}" ;;
    calib-bw-paper-w[0-9]) calib_paper "${1#calib-bw-paper-w}" ;;
    calib-lw-w[0-9]) calib "apiq-lw-w${1#calib-lw-w}" --method lw --bits "${1#calib-lw-w}" ;;
    calib-rtn-w[0-9]|calib-qlora-w[0-9]|calib-loftq-w[0-9]) local m=${1#calib-}; m=${m%-w*}
      calib "$m-w${1##*-w}" --method "$m" --bits "${1##*-w}" ;;
    calib-bw-sal-*-w[0-9])
      local variant=${1#calib-bw-sal-}; variant=${variant%-w*}; local b=${1##*-w}
      calib "apiq-bw-sal-$variant-w$b" --bits "$b" --saliency "$OUT/saliency" --sal-lambda "$SAL_LAMBDA" \
        --sal-variant "$variant" ;;
    eval-fp) evaluate fp "${EVAL[@]}" ;;
    # the benchmark (bench/bench_peers.py; docs/benchmarks.md#the-protocol): the day's reference (a row re-timed)
    # first, then rows one thread each, resumable row by row, into bench/results/benchmark_*.json
    bench-reference) say python bench/bench_peers.py --reference --threads 1 --out "$OUT/bench" ;;
    bench-tune-peers-w[0-9]) say python bench/bench_peers.py --split tuning --bits "${1##*-w}" --rows "$PEER_TUNING" \
        --threads 1 --out "$OUT/bench" ;;
    bench-tune-apiq-w[0-9]) say python bench/bench_peers.py --split tuning --bits "${1##*-w}" --rows "fp $APIQ_TUNING" \
        --threads 1 --out "$OUT/bench" ;;
    # the test split, read only by rows chosen on the tuning set (bench_peers.py --rows tuned / best):
    # every tuning row on the clock at 20 windows of WikiText-2 test and of C4 (the curves), then the
    # best of each method in each time budget at 40 windows each and on the full WikiText-2 test. The
    # models are the tuning rows' (OUT/bench/models): nothing is quantized again where they are there
    bench-test-w[0-9]) say python bench/bench_peers.py --split test --bits "${1##*-w}" --rows tuned --limit 20 \
        --threads 1 --out "$OUT/bench" ;;
    bench-best-w[0-9]) say python bench/bench_peers.py --split test --bits "${1##*-w}" --rows best --limit 40 \
        --threads 1 --out "$OUT/bench" --json bench/results/benchmark_test40.json
      say python bench/bench_peers.py --split test --bits "${1##*-w}" --rows best --limit 0 \
        --threads 1 --out "$OUT/bench" --json bench/results/benchmark_test_full.json ;;
    # perplexity against minutes and against bits per weight, every method: the tuning rows, the test rows
    bench-figures) for x in minutes bits_per_weight; do
        say python plots/peers.py bench/results/benchmark_tuning.json --dataset wikitext2_valid --x "$x" \
          --out "figures/tuning_$x.png"
        [ ! -f bench/results/benchmark_test.json ] || say python plots/peers.py bench/results/benchmark_test.json \
          --x "$x" --out "figures/test_$x.png"
      done
      [ ! -f bench/results/benchmark_test.json ] || say python plots/peers.py bench/results/benchmark_test.json \
        --dataset c4 --out figures/test_c4_minutes.png ;;
    # the older headline table's rows (RESULTS.md), made again under the protocol's clock into
    # OUT/peers.json: the peers at the settings of then (GPTQ damp 1% without act-order, AutoRound
    # light in fp32), ours at --quick and longer budgets; 2 and 3 bits, 4 bits with ours
    peers) local old="fp rtn loftq apiq-lw:quick apiq:quick apiq:quick,nsamples=64,epochs=2 \
apiq:quick,nsamples=64,epochs=3 apiq:long"
      say python bench/bench_peers.py --split test --bits 2,3 --limit "$LIMIT" --threads "$THREADS" --out "$OUT/peers" \
        --json "$OUT/peers/peers.json" --rows "$old hqq gptq:damp=0.01,act_group_aware=0 autoround:iters=50,amp=0,compile=0"
      say python bench/bench_peers.py --split test --bits 4 --limit "$LIMIT" --threads "$THREADS" --out "$OUT/peers" \
        --json "$OUT/peers/peers.json" --rows "fp rtn loftq apiq:quick" ;;
    # QLoRA's init is RTN with B = 0: its outputs are RTN's exactly, so only its errors are measured
    eval-qlora-w[0-9]) evaluate "qlora-w${1##*-w}" --ckpt "$OUT/qlora-w${1##*-w}" --ppl '' --errors --threads "$THREADS" ;;
    eval-rtn-w[0-9]|eval-loftq-w[0-9]|eval-apiq-*) local name=${1#eval-}
      evaluate "$name" --ckpt "$OUT/$name" --errors "${EVAL[@]}" ;;
    # finetuning (finetune.py --quick, the same recipe for every start; FT_LOSS=kd distils full precision)
    ft-fp) [ -f "$OUT/fp-lora-ft$FT_TAG/finetune_log.json" ] || say python finetune.py --ckpt smollm2-135m --fp-lora \
        --quick --loss "$FT_LOSS" --threads "$THREADS" --out "$OUT/fp-lora-ft$FT_TAG" ;;
    ft-*) local name=${1#ft-}
      [ -f "$OUT/$name-ft$FT_TAG/finetune_log.json" ] || say python finetune.py --ckpt "$OUT/$name" --quick \
        --eval-before --loss "$FT_LOSS" --threads "$THREADS" --out "$OUT/$name-ft$FT_TAG" ;;
    figures-ft) say python plots/finetune.py "$OUT" ;;
    talk-*) local name=${1#talk-}   # the model's continuation beside full precision's
      say python evaluate.py --ckpt "$OUT/$name" --ppl '' --prompt "${PROMPT:-The capital of France is}" \
        --threads "$THREADS" ;;
    figures-w[0-9]) local b=${1##*-w}
      say python plots/act_error.py "$OUT" --bits "$b"  --out "$OUT/figures/act_error_w$b.png"
      say python plots/weight_error.py "$OUT" --bits "$b" --out "$OUT/figures/weight_error_w$b.png"
      say python plots/adapters.py "$OUT" --bits "$b" --out "$OUT/figures/adapters_w$b.png"
      say python plots/ppl_bits.py "$OUT" --out "$OUT/figures/ppl_bits.png" ;;
    figures)
      for b in 2 3; do
        say python plots/act_error.py "$OUT" --bits $b
        say python plots/weight_error.py "$OUT" --bits $b
        say python plots/adapters.py "$OUT" --bits $b
      done
      if [ -f "$OUT/peers/peers.json" ]; then   # the headline rows, the peers included
        say python plots/ppl_bits.py "$OUT/peers"
        say python plots/peers.py "$OUT/peers"
      else
        say python plots/ppl_bits.py "$OUT"
      fi ;;
    table) python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
rows = [("fp", "full precision (fp32)", None)] + [
    (f"{m}-w{b}", label, b) for b in (2, 3, 4) for m, label in [
        ("rtn", "RTN (= QLoRA init)"), ("loftq", "LoftQ (T = 5)"), ("apiq-lw", "ApiQ-lw"), ("apiq-bw", "ApiQ-bw"),
        ("apiq-bw-sal-after", "ApiQ-bw + saliency AfterLoRA"), ("apiq-bw-sal-before", "ApiQ-bw + saliency BeforeLoRA")]]
tasks = ["winogrande", "hellaswag", "arc_challenge", "arc_easy", "piqa"]
print("| method | bits | WikiText-2 | C4 | WinoGrande | HellaSwag | ARC-C | ARC-E | PIQA | avg | calibrate | evaluate |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, label, bits in rows:
    f = d / f"{name}.json"
    if not f.is_file():
        continue
    r = json.loads(f.read_text())
    zs = r.get("zeroshot", {})
    acc = [f"{100 * zs[t]['acc']:.1f}" if t in zs else "-" for t in tasks]
    avg = f"{100 * r['zeroshot_avg']:.1f}" if "zeroshot_avg" in r else "-"
    cfg = d / name / "apiq.json"
    calib = json.loads(cfg.read_text()).get("calibration_seconds") if cfg.is_file() else None
    calib = f"{calib / 60:.1f} min" if calib else ("%.1f min" % (r["quantize_seconds"] / 60) if "quantize_seconds" in r else "-")
    ppl = [f"{r['ppl'][k]:.2f}" if k in r.get("ppl", {}) else "-" for k in ("wikitext2", "c4")]
    print(f"| {label} | {bits or 32} | {' | '.join(ppl)} | {' | '.join(acc)} | {avg} | {calib} | "
          f"{r['seconds_total'] / 60:.1f} min |")
PY
    ;;
    list) printf '%s\n' "${STEPS[@]}" ;;
    *) echo "results.sh: unknown step '$1' (bash results.sh list)" >&2; exit 2 ;;
  esac
}

if [ $# -eq 0 ]; then set -- "${STEPS[@]}"; fi
for s in "$@"; do step "$s"; done
