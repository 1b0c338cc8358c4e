"""Host memory of the big-model paths on a machine without a GPU: a random fp16 checkpoint with
Llama-2-7B's shapes in Meta's format (written here, never committed), then

  1. calibrate.py: all 32 blocks of ApiQ-bw at a tiny budget (1 window of 32 tokens, 1 epoch)
  2. saliency.py --stream over 2 sequences of 64 tokens (one block at a time)
  3. evaluate.py --packed on the calibrated directory: loading it, perplexity of one short window

each in its own process, with its exact peak RSS (os.wait4's ru_maxrss) and its sampled peak
anonymous and file-backed RSS (the checkpoint is memory-mapped: its pages count as file-backed
RSS while touched, and the kernel can drop them), against the checkpoint's fp16 bytes.

    python bench/bench_7b.py --threads 2                       # ~14 GB of disk, 20-40 min on 2 cores
    python bench/bench_7b.py --shape tiny --threads 1           # the same pipeline on a 4-layer toy (checks)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SHAPES = {"7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
          "tiny": {"dim": 256, "multiple_of": 64, "n_heads": 4, "n_layers": 4, "norm_eps": 1e-05, "vocab_size": -1}}


def write_synthetic(d: Path, shape: dict):
    """Random fp16 weights of these shapes in Meta's format (vocabulary 32000: the Llama-2 tokenizer)."""
    import torch
    sys.path.insert(0, str(ROOT))
    from llama import ModelArgs, Transformer
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs(**shape | {"vocab_size": 32000})).state_dict().items()}
    g, sd = torch.Generator().manual_seed(0), {}
    for k, s in shapes.items():                              # tensor by tensor, in fp16: no fp32 copy
        t = torch.empty(s, dtype=torch.float16)
        sd[k] = t.fill_(1.0) if k.endswith("norm.weight") else t.uniform_(-0.035, 0.035, generator=g)
    torch.save(sd, d / ".consolidated.00.pth.tmp")
    (d / ".consolidated.00.pth.tmp").replace(d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(shape))


def status_kib(key, pid):
    return int(next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith(key + ":")).split()[1])


def measure(cmd, log):
    """Run cmd; (exact peak RSS, sampled peak RssAnon, sampled peak RssFile) in GiB, and seconds."""
    t0, peak = time.time(), {"RssAnon": 0, "RssFile": 0}
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        while not (w := os.wait4(p.pid, os.WNOHANG))[0]:
            try:
                peak = {k: max(v, status_kib(k, p.pid)) for k, v in peak.items()}
            except (OSError, StopIteration):
                pass
            time.sleep(0.1)
    if code := os.waitstatus_to_exitcode(w[1]):
        raise RuntimeError(f"{' '.join(cmd)} exited {code}; log: {log}\n" + Path(log).read_text()[-2000:])
    return {"peak_rss": w[2].ru_maxrss / 2**20, "anon": peak["RssAnon"] / 2**20, "file": peak["RssFile"] / 2**20,
            "seconds": time.time() - t0}


def main(a):
    d = Path(a.dir)
    shape = SHAPES[a.shape]
    work = Path(tempfile.mkdtemp(prefix="bench-7b-", dir=a.dir if Path(a.dir).exists() else None))
    try:
        if not (d / "params.json").exists() or json.loads((d / "params.json").read_text()) != shape:
            d.mkdir(parents=True, exist_ok=True)
            need = 30e9 if a.shape == "7b" else 1e8
            if (free := shutil.disk_usage(d).free) < need:
                sys.exit(f"error: {d}: {free / 1e9:.1f} GB free, {need / 1e9:.0f} GB wanted")
            t = time.time()
            subprocess.run([sys.executable, __file__, "--write", str(d), "--shape", a.shape], check=True)
            print(f"wrote {d} in {time.time() - t:.0f} s")
        if not (d / "tokenizer.model").exists():
            data = Path(os.environ.get("APIQ_DATA_DIR") or ROOT.parent / "shared" / "data")
            (d / "tokenizer.model").symlink_to(data / "tokenizers" / "llama2" / "tokenizer.model")
        weights = (d / "consolidated.00.pth").stat().st_size / GIB
        py, th = sys.executable, ["--threads", str(a.threads)]
        runs = {
            "calibrate.py, all blocks (1 x 32 tokens, 1 epoch, fp32 blocks)":
                [py, "calibrate.py", "--ckpt", str(d), "--nsamples", "1", "--seqlen", "32", "--epochs", "1",
                 "--out", str(work / "calib"), *th],
            "saliency.py --stream (2 x 64 tokens, fp32 blocks)":
                [py, "saliency.py", "--ckpt", str(d), "--stream", "--nsamples", "2", "--seqlen", "64",
                 "--out", str(work / "sal"), *th],
            "evaluate.py --packed --dtype bf16 (1 window of 128 tokens)":
                [py, "evaluate.py", "--ckpt", str(work / "calib"), "--packed", "--dtype", "bf16", "--ppl", "wikitext2",
                 "--limit", "1", "--seqlen", "128", *th],
        }
        rows = {name: measure(cmd, work / f"{i}.log") for i, (name, cmd) in enumerate(runs.items())}
        print(f"\n{a.shape}-shaped random checkpoint, fp16 {weights:.2f} GiB; {a.threads} thread(s); "
              f"loadavg {os.getloadavg()[0]:.1f}\n")
        print("| run | peak RSS (GiB) | x fp16 weights | peak anon / file-backed (GiB, sampled) | minutes |\n"
              "|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['peak_rss']:.2f} | {r['peak_rss'] / weights:.2f}x | {r['anon']:.2f} / {r['file']:.2f} | "
                  f"{r['seconds'] / 60:.1f} |")
        sal = json.loads((work / "sal" / "saliency.json").read_text())
        print(f"\nsaliency.json: peak_rss_gib {sal['peak_rss_gib']}, seconds {sal['seconds']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not a.keep:
            for f in ("consolidated.00.pth", ".consolidated.00.pth.tmp", "params.json", "tokenizer.model"):
                (d / f).unlink(missing_ok=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="7b", help="7b (default) or tiny (a quick check)")
    p.add_argument("--dir", default=str(ROOT / "out" / "bench-7b-synthetic"), help="where the checkpoint is written")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of every run (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for another run")
    p.add_argument("--write", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.write:
        write_synthetic(Path(a.write), SHAPES[a.shape])
    else:
        main(a)
