"""Cost of the saliency penalty (issue: time with the penalty / without <= 1.10): median seconds
per ApiQ-bw training step of a real SmolLM2-135M block with no penalty, AfterLoRA (as
calibrate.py does it, W_eff formed once a step; and with the separate LoRA path) and BeforeLoRA,
interleaved in one run, 1 thread, r 64, g64, 2 bits, --aug-loss.

    python saliency.py --nsamples 16 --out out/saliency-smollm2     # once, if missing
    python bench/bench_penalty.py 2048                               # seqlen (256 = --quick)
    python bench/bench_penalty.py 256 --quick --saliency out/results/saliency   # --quick's recipe
    python bench/bench_penalty.py 256 --quick --saliency out/results/saliency --rounds 12   # more rounds
    python bench/bench_penalty.py 256 --quick --saliency out/results/saliency --pass 16     # + the alpha pass

--pass N also times saliency.compute_saliency on N WikiText-2 train sequences of seqlen tokens, the
whole model in fp32 and in bf16 (AMX or AVX512-BF16 on a recent x86 CPU; alpha from the two agree
to cosine >= 0.997 per linear on SmolLM2), and prints the issue's ratio for one calibration with
the --quick recipe: (steps x s/step with the penalty + the pass) / (steps x s/step without). The
calibration's work outside the steps (block inputs, LoRA init, saving) is the same with and
without the penalty and is left out of both: the printed ratio is an upper bound.
"""
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import calibrate  # noqa: E402
import fastpath  # noqa: E402
from checkpoints import load  # noqa: E402
from data import calib_windows  # noqa: E402
from saliency import compute_saliency, make_penalty  # noqa: E402

torch.set_num_threads(1)
argv = sys.argv[1:]
QUICK = "--quick" in argv                                   # calibrate.py --quick's options, not the paper's
SAL = argv[argv.index("--saliency") + 1] if "--saliency" in argv else "out/saliency-smollm2"
T = int(argv[0]) if argv and argv[0].isdigit() else 2048
ROUNDS = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 4   # timed rounds of each variant
PASS = int(argv[argv.index("--pass") + 1]) if "--pass" in argv else 0         # sequences of the alpha pass
model, tok = load("smollm2-135m")
tokens = calib_windows(tok, 4, T, 0)
freqs = model.freqs_cis(T, "cpu")
with torch.no_grad():
    X = model.tok_embeddings(tokens)
fp = model.layers[0]
Y = calibrate.run_block(fp, X, freqs, "cpu")
base = dict(bits=2, group_size=64, rank=64, epochs=2, quick=QUICK, seqlen=T)  # the rest: the paper's or --quick's
merges = fastpath.FastQuantLinear.merges
res = {"plain": [], "after": [], "after (separate LoRA path)": [], "before": []}
for r in range(ROUNDS + 1):  # round 0 is warm-up
    for k in res:
        variant = k.split()[0]
        a = calibrate.make_config(**base, saliency=None if k == "plain" else SAL, fast=True,
                                  sal_variant="after" if k == "plain" else variant)
        pen = None if k == "plain" else make_penalty(model, a.saliency, a.sal_lambda, a.sal_multiplier, a.sal_variant)
        # --fast: "after" forms W_eff = Q(W) + s B A once a step (FastQuantLinear.merges); the separate
        # row is the step before that: the forward's LoRA path, and the penalty's own B A
        fastpath.FastQuantLinear.merges = (lambda *args: False) if "separate" in k else merges
        t = time.perf_counter()
        acts = calibrate.Acts(X, X, Y, Y if a.aug_loss else None)
        calibrate.calibrate_block(0, fp, acts, freqs, a, calibrate.start_block(fp, 0, a, pen))
        if r:
            res[k].append((time.perf_counter() - t) / (a.epochs * len(X)))
fastpath.FastQuantLinear.merges = merges
p = statistics.median(res["plain"])
print("\n| seqlen | penalty | s/step (median) | ratio to none |\n|---|---|---|---|")
for k, v in res.items():
    print(f"| {T}{' --quick' if QUICK else ''} | {k} | {statistics.median(v):.3f} | {statistics.median(v) / p:.2f} |")
if PASS:
    a = calibrate.make_config(**base)
    steps = model.args.n_layers * a.epochs * a.nsamples           # one calibration: every block's steps
    windows = calib_windows(tok, PASS, T, 1)                        # (PASS, T), other windows than the steps'
    print(f"\n| alpha pass, {PASS} x {T} tokens | seconds | calibration with the AfterLoRA penalty + pass, "
          f"/ plain ({steps} steps) |\n|---|---|---|")
    after = statistics.median(res["after"])
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model).to(dtype)
        compute_saliency(m, windows[:1], "cpu")                     # warm-up
        t = time.perf_counter()
        compute_saliency(m, windows, "cpu")
        sec = time.perf_counter() - t
        print(f"| {str(dtype).split('.')[1]} | {sec:.1f} | {(steps * after + sec) / (steps * p):.2f} |")
        del m
