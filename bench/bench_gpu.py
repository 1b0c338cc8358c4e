"""The scripts on a GPU: what a session lent one runs (docs/scaling.md).

  1. end to end on CUDA, on a random 4-block toy with the Llama-2 tokenizer: calibrate.py (bf16,
     the default on a GPU), evaluate.py (cached and --packed), finetune.py, saliency.py (whole and
     --stream), and the one-line errors of a torchrun with more processes than GPUs;
  2. the paper's calibration settings (128 windows x 2048 tokens, 20 epochs, batch 1, rank 64,
     group 64, 2 bits) on blocks of Llama-2-7B's shape (random fp16 weights, C4 text: the local
     WikiText-2 train file is too short for 128 x 2048): seconds and peak GPU memory a block,
     from calib_log.json, and what 32 blocks would take at that rate.

Each run is a subprocess with its log; a failure is reported and the rest still run.

    python bench/bench_gpu.py --out OUT                          # on the GPU machine, ~6-8 min on an H100
    python bench/bench_gpu.py --device cpu --shape tiny --out /tmp/g   # the same steps on a CPU (a dry run)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_7b import SHAPES, write_synthetic  # noqa: E402

TOY = SHAPES["tiny"]


def run(name, cmd, log, timeout, expect_fail=None):
    """(ok, seconds, tail of the log). expect_fail: a text the failing run must print instead."""
    t0 = time.time()
    try:
        with open(log, "w") as f:
            r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        code = r.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    text = Path(log).read_text()
    ok = (code == 0) if expect_fail is None else (code not in (0, "timeout") and expect_fail in text)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {time.time() - t0:.1f} s" + ("" if ok else f" (exit {code})"), flush=True)
    if not ok:
        print("     " + text[-1500:].replace("\n", "\n     "), flush=True)
    return ok, time.time() - t0, text


def checkpoint(d: Path, shape: dict, data: Path):
    d.mkdir(parents=True, exist_ok=True)
    write_synthetic(d, shape)
    (d / "tokenizer.model").unlink(missing_ok=True)
    (d / "tokenizer.model").symlink_to(data / "tokenizers" / "llama2" / "tokenizer.model")
    return d


def main(a):
    out, data = Path(a.out), Path(a.data_dir).resolve()
    os.environ["APIQ_DATA_DIR"] = str(data)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    py, dev = sys.executable, ["--device", a.device]
    import torch
    print(f"torch {torch.__version__}, " + (f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"),
          flush=True)
    toy = checkpoint(work / "toy", TOY, data)
    q = work / "toy-w2"
    steps = [
        ("calibrate.py ApiQ-bw w2, 8 x 256 x 2 epochs", [py, "calibrate.py", "--ckpt", toy, "--nsamples", "8",
                                                          "--seqlen", "256", "--epochs", "2", "--out", q, *dev], None),
        ("evaluate.py perplexity, 2 windows of 512", [py, "evaluate.py", "--ckpt", q, "--limit", "2", "--seqlen", "512",
                                                      "--json", work / "eval.json", *dev], None),
        ("evaluate.py --packed", [py, "evaluate.py", "--ckpt", q, "--limit", "2", "--seqlen", "512", "--packed",
                                  "--json", work / "eval-packed.json", *dev], None),
        ("finetune.py 8 steps", [py, "finetune.py", "--ckpt", q, "--seqlen", "256", "--batch-size", "2", "--grad-accum", "1",
                                 "--max-steps", "8", "--eval-limit",
                                 "1", "--eval-seqlen", "512", "--out", work / "toy-w2-ft", *dev], None),
        ("saliency.py whole", [py, "saliency.py", "--ckpt", toy, "--nsamples", "4", "--seqlen", "128",
                               "--out", work / "sal", *dev], None),
        ("saliency.py --stream", [py, "saliency.py", "--ckpt", toy, "--nsamples", "4", "--seqlen", "128", "--stream",
                                  "--out", work / "sal-stream", *dev], None),
    ]
    if a.device.startswith("cuda"):
        steps.append(("torchrun, more processes than GPUs: one line",
                      [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(torch.cuda.device_count() + 1), "saliency.py", "--ckpt", toy, "--nsamples", "4",
                       "--seqlen", "64", "--out", work / "sal-ddp", *dev], "has no GPU of its own"))
    results = {}
    for name, cmd, fail in steps:
        ok, sec, _ = run(name, [str(c) for c in cmd], work / f"{len(results)}.log", 600, fail)
        results[name] = {"ok": ok, "seconds": round(sec, 1)}
    for f in ("eval.json", "eval-packed.json"):
        if (work / f).exists():
            results[f] = json.loads((work / f).read_text())["ppl"]
    if (work / "sal" / "saliency.json").exists() and (work / "sal-stream" / "saliency.json").exists():
        from safetensors.torch import load_file
        worst = 0.0
        for blk in sorted((work / "sal").glob("block_*.safetensors")):
            x, y = load_file(blk), load_file(work / "sal-stream" / blk.name)
            worst = max(worst, *(((x[k].float() - y[k].float()).norm() / x[k].float().norm()).item() for k in x))
        results["saliency stream vs whole, worst relative difference"] = worst
    print(json.dumps({k: v for k, v in results.items() if not (isinstance(v, dict) and "ok" in v)}, indent=1), flush=True)

    # 2. the paper's settings on blocks of the chosen shape
    shape = SHAPES[a.shape] | {"n_layers": a.blocks}
    big = checkpoint(work / f"{a.shape}x{a.blocks}", shape, data)
    cal = work / "paper"
    nsamples, seqlen, epochs = (128, 2048, 20) if a.shape == "7b" else (8, 256, 2)
    cmd = [py, "calibrate.py", "--ckpt", big, "--dataset", "c4", "--nsamples", nsamples, "--seqlen", seqlen,
           "--epochs", epochs, "--out", cal, *dev]
    ok, sec, text = run(f"calibrate.py, {a.shape} shape x {a.blocks} blocks, {nsamples} x {seqlen} x {epochs} epochs",
                        [str(c) for c in cmd], work / "paper.log", a.timeout)
    log = cal / "calib_log.json"
    blocks = json.loads(log.read_text())["blocks"] if log.exists() else []
    for b in blocks:
        print(f"  block {b.get('block')}: {b.get('seconds')} s, peak {b.get('peak_gib')} GiB, "
              f"rel error {b['rel_before']:.3%} -> {b['rel_after']:.3%}", flush=True)
    if blocks:
        per = sum(b["seconds"] for b in blocks) / len(blocks)
        results["paper settings"] = {"shape": a.shape, "blocks": len(blocks), "seconds_per_block": round(per, 1),
                                     "peak_gib": max(b["peak_gib"] for b in blocks), "wall_s": round(sec, 1),
                                     "32_blocks_hours": round(32 * per / 3600, 2)}
        print(f"{a.shape}-shaped block at {nsamples} x {seqlen} x {epochs} epochs: {per:.1f} s a block, "
              f"peak {results['paper settings']['peak_gib']:.2f} GiB; 32 blocks: "
              f"{results['paper settings']['32_blocks_hours']} h", flush=True)
    (out / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    for f in sorted(work.glob("*.log")):
        shutil.copy(f, out / f"log-{f.name}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="where bench_gpu.json and the logs go")
    p.add_argument("--work", default="/tmp/bench-gpu", help="scratch directory (checkpoints, models)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=tuple(SHAPES), default="7b", help="shape of the paper-settings blocks")
    p.add_argument("--blocks", type=int, default=2, help="blocks of that shape to calibrate (default 2)")
    p.add_argument("--timeout", type=int, default=330, help="seconds allowed to the paper-settings calibration")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="../shared/data layout")
    main(p.parse_args())
