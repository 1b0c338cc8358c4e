"""Calibration recipes side by side: each recipe is a set of calibrate.py flags; every one is
calibrated on the same checkpoint and the same data, then evaluated on the same WikiText-2 test
windows. Prints calibration minutes and perplexity per recipe (issue: ApiQ on a CPU budget).

    python bench/bench_recipes.py --recipes paper-quick,quick --limit 40 --threads 1
    python bench/bench_recipes.py --list

The quality of a recipe does not depend on the machine (same math, fp32), its time does: time a
recipe on the machine it is meant for, alone (`--jobs 1`). With --jobs N, N recipes run at once
(on a GPU, or with --threads 1 each on a CPU with N cores).
"""
import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Q = ["--nsamples", "32", "--seqlen", "256", "--epochs", "2"]         # the old --quick budget
FAST = ["--lora-init", "svd", "--learn-rounding", "--lr-schedule", "cosine", "--lr-lora", "2e-3", "--lr-clip", "1e-2"]
RECIPES = {
    "paper-quick": Q,                                                  # the paper's optimiser at the old --quick budget
    "lr4": Q + ["--lr-lora", "2e-3", "--lr-clip", "1e-2"],
    "cosine": Q + ["--lr-schedule", "cosine", "--lr-lora", "2e-3", "--lr-clip", "1e-2"],
    "svd": Q + ["--lora-init", "svd"],
    "round": Q + ["--learn-rounding"],
    "round-lr1e-2": Q + ["--learn-rounding", "--lr-round", "1e-2"],
    "noaug": Q + ["--no-aug-loss"],
    "all": Q + FAST,
    "all-no-svd": Q + ["--learn-rounding", "--lr-schedule", "cosine", "--lr-lora", "2e-3", "--lr-clip", "1e-2"],
    "all-no-round": Q + ["--lora-init", "svd", "--lr-schedule", "cosine", "--lr-lora", "2e-3", "--lr-clip", "1e-2"],
    "all-constant": Q + ["--lora-init", "svd", "--learn-rounding", "--lr-lora", "2e-3", "--lr-clip", "1e-2"],
    "all-round1e-2": Q + FAST + ["--lr-round", "1e-2"],
    "all-noaug": Q + FAST + ["--no-aug-loss"],
    "all-e4": ["--nsamples", "32", "--seqlen", "256", "--epochs", "4"] + FAST,
    "all-bs4-e8": ["--nsamples", "32", "--seqlen", "256", "--epochs", "8", "--batch-size", "4"] + FAST,
    "all-512": ["--nsamples", "32", "--seqlen", "512", "--epochs", "2"] + FAST,
    "long": ["--nsamples", "64", "--seqlen", "512", "--epochs", "4"] + FAST,
    "paper-quick-w3": Q + ["--bits", "3"],
    "all-w3": Q + FAST + ["--bits", "3"],
    "all-bf16": Q + FAST + ["--dtype", "bf16"],                      # the CUDA bf16 path (GPU only)
    "all-e8": ["--nsamples", "32", "--seqlen", "256", "--epochs", "8"] + FAST,
    "all-bs4-e16": ["--nsamples", "32", "--seqlen", "256", "--epochs", "16", "--batch-size", "4"] + FAST,
    "all-lora5e-3": Q + FAST + ["--lr-lora", "5e-3"],
    "all-round2e-3": Q + FAST + ["--lr-round", "2e-3"],
    "all-512-bs4-e8": ["--nsamples", "32", "--seqlen", "512", "--epochs", "8", "--batch-size", "4"] + FAST,
    "long-w3": ["--nsamples", "64", "--seqlen", "512", "--epochs", "4", "--bits", "3"] + FAST,
    "long-bs4": ["--nsamples", "128", "--seqlen", "512", "--epochs", "8", "--batch-size", "4"] + FAST,
    "loftq": ["--method", "loftq"],
    "loftq-w3": ["--method", "loftq", "--bits", "3"],
}


def run(cmd, log):
    t = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return r.returncode, time.time() - t


def one(name, a):
    out = Path(a.out) / name
    flags = RECIPES[name]
    common = ["--ckpt", a.ckpt, "--threads", str(a.threads), "--device", a.device]
    if "--bits" not in flags:
        flags = flags + ["--bits", str(a.bits)]
    cal = ["calibrate.py", *common, "--dtype", a.dtype, "--out", str(out), *flags, *a.extra]
    if not (out / "apiq.json").exists():
        rc, secs = run(cal, f"{out}.calib.log")
        if rc:
            return {"recipe": name, "error": f"calibrate.py exited {rc}: see {out}.calib.log"}
    secs = json.loads((out / "apiq.json").read_text()).get("calibration_seconds")
    ev = ["evaluate.py", "--ckpt", str(out), "--threads", str(a.threads), "--device", a.device, "--ppl", a.ppl,
          "--limit", str(a.limit), "--json", f"{out}.json"]
    rc, _ = run(ev, f"{out}.eval.log")
    if rc:
        return {"recipe": name, "error": f"evaluate.py exited {rc}: see {out}.eval.log"}
    res = json.loads(Path(f"{out}.json").read_text())
    return {"recipe": name, "flags": " ".join(RECIPES[name]), "calib_minutes": round(secs / 60, 2), **res["ppl"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names (--list)")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    p.add_argument("--ckpt", default="smollm2-135m", help="checkpoint")
    p.add_argument("--bits", type=int, default=2, help="bits where the recipe does not say")
    p.add_argument("--limit", type=int, default=40, help="WikiText-2 test windows of 2048 tokens")
    p.add_argument("--ppl", default="wikitext2", help="perplexity datasets")
    p.add_argument("--jobs", type=int, default=1, help="recipes at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", help="calibration dtype")
    p.add_argument("--out", default="out/recipes", help="where models, logs and summary.json go")
    p.add_argument("extra", nargs="*", help="flags added to every calibrate.py call (after --)")
    a = p.parse_args()
    if a.list:
        for k, v in RECIPES.items():
            print(f"{k:16} {' '.join(v)}")
        return
    names = [n.strip() for n in a.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"error: unknown recipe(s) {', '.join(unknown)} (--list)")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda n: one(n, a), names))
    print(f"\n| recipe | calibrate (min) | {' | '.join(a.ppl.split(','))} | flags |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['recipe']} | {r['error']} | | |")
        else:
            ppl = " | ".join(f"{r[k]:.2f}" for k in a.ppl.split(","))
            print(f"| {r['recipe']} | {r['calib_minutes']} | {ppl} | `{r['flags']}` |")
    from cli import write_json
    sys.path.insert(0, str(ROOT))
    write_json(Path(a.out) / "summary.json", {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
