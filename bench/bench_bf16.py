"""bf16 against fp32 calibration of the real SmolLM2-135M on the CPU (the GPU's numerics, the same
code path): the first --blocks blocks of calibrate.py --quick in each dtype on the same windows,
the relative block error after calibration side by side, and the wall time of each.

    python bench/bench_bf16.py --blocks 8 --threads 1           # ~10 min on one core
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(a):
    work = Path(tempfile.mkdtemp(prefix="bench-bf16-"))
    logs, seconds = {}, {}
    try:
        for dtype in ("fp32", "bf16"):
            out = work / dtype
            cmd = [sys.executable, "calibrate.py", "--quick", "--bits", str(a.bits), "--dtype", dtype, "--threads",
                   str(a.threads), "--stop-after", str(a.blocks), "--out", str(out)]
            t0 = time.time()
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            seconds[dtype] = time.time() - t0
            if r.returncode:
                sys.exit(f"error: {' '.join(cmd)}:\n{r.stderr[-2000:]}")
            logs[dtype] = json.loads((out / "progress.json").read_text())["blocks"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nSmolLM2-135M, calibrate.py --quick --bits {a.bits}, blocks 0-{a.blocks - 1}, {a.threads} thread(s): "
          f"fp32 {seconds['fp32'] / 60:.1f} min, bf16 {seconds['bf16'] / 60:.1f} min (whole processes)\n")
    print("| block | rel. error before | fp32 after | bf16 after | bf16 / fp32 |\n|---|---|---|---|---|")
    ratios = []
    for f, b in zip(logs["fp32"], logs["bf16"]):
        ratios.append(b["rel_after"] / f["rel_after"])
        print(f"| {f['block']} | {f['rel_before']:.2%} | {f['rel_after']:.3%} | {b['rel_after']:.3%} | {ratios[-1]:.3f} |")
    print(f"\nbf16 / fp32 block error: {min(ratios):.3f}-{max(ratios):.3f} (target: within 5%)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=8, help="calibrate the first N blocks (default 8)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    main(p.parse_args())
