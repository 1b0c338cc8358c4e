"""Wall time and peak memory of the saliency pass, whole-model (saliency.py) against one block at a
time (saliency.py --stream), on the real SmolLM2-135M: each run a fresh saliency.py process over
the same sequences, the two kinds alternating, medians of --repeats runs each.

    python bench/bench_saliency.py --threads 1                 # 4 x 512 tokens, 3 runs each, ~4 min
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(kind, a, work: Path, i: int) -> dict:
    out = work / f"{kind}-{i}"
    cmd = [sys.executable, "saliency.py", "--ckpt", a.ckpt, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
           "--threads", str(a.threads), "--out", str(out), *(["--stream"] if kind == "streamed" else [])]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    meta = json.loads((out / "saliency.json").read_text())
    shutil.rmtree(out)
    return meta


def main(a):
    work = Path(tempfile.mkdtemp(prefix="bench-saliency-"))
    import os
    loads = [os.getloadavg()[0]]
    try:
        runs = {"whole": [], "streamed": []}
        for i in range(a.repeats):
            for kind in (("whole", "streamed") if i % 2 == 0 else ("streamed", "whole")):
                runs[kind].append(run(kind, a, work, i))
                loads.append(os.getloadavg()[0])
                print(f"{kind} {i}: {runs[kind][-1]['seconds']:.1f} s, peak RSS {runs[kind][-1]['peak_rss_gib']:.2f} GiB",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: {f: statistics.median(m[f] for m in v) for f in ("seconds", "peak_rss_gib", "rss_after_load_gib")}
           for k, v in runs.items()}
    model_gib = runs["whole"][0]["model_gib"]
    print(f"\n{a.ckpt}, {a.nsamples} x {a.seqlen} tokens, {a.threads} thread(s), medians of {a.repeats}; "
          f"load average {min(loads):.1f}-{max(loads):.1f}; fp32 model {model_gib:.2f} GiB\n")
    print("| pass | seconds | x whole | peak RSS (GiB) | peak - after load (GiB) |\n|---|---|---|---|---|")
    for k, m in med.items():
        print(f"| {k} | {m['seconds']:.1f} | {m['seconds'] / med['whole']['seconds']:.2f}x | {m['peak_rss_gib']:.2f} | "
              f"{m['peak_rss_gib'] - m['rss_after_load_gib']:.2f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=4, help="sequences per run")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (the paper's 512)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternating")
    p.add_argument("--threads", type=int, default=1)
    main(p.parse_args())
