"""A loaded 2-bit SmolLM2-135M in use: resident memory packed vs cached vs fp16, perplexity speed
packed vs cached, and generation with the KV cache vs recomputing the prefix for every token.

    python bench/bench_inference.py --threads 1                       # makes a 2-bit QLoRA-init model first
    python bench/bench_inference.py --model out/results/apiq-bw-w2    # or measures a calibrated one

Memory: each kind of load runs in a fresh process, twice: resident memory (VmRSS, after gc and
malloc_trim) grows on the first load also by the library code and data it touches for the
first time (~0.1 GiB, the same for every kind); the second load's growth, after the first
model is freed, is the model's. The quantized linears' share = that minus the parts every load
keeps in full (embeddings, norms: their tensor bytes) minus the LoRA factors (A, B in fp32,
reported apart). Targets (issue 13): packed linears
<= 0.35x the fp16 linears; packed perplexity >= 0.8x the cached model's speed at seqlen 2048;
generation with the KV cache >= 5x the tokens/s of prefix recomputation (128 new tokens after a
256-token prompt).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import ctypes, gc, json, sys
import torch
sys.path.insert(0, sys.argv[3])
import checkpoints, lora, qmodel
torch.set_num_threads(1)

def rss():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

what, path = sys.argv[1], sys.argv[2]

def load():
    if what == "fp16":
        return checkpoints.load("smollm2-135m", dtype=torch.float16)[0]
    return qmodel.load(path, dtype=torch.float16, cache=(what == "cached"))[0]

fresh = rss()
model = load()                      # the first load also maps the libraries' code and data it touches
first = rss() - fresh
del model
before = rss()
model = load()                      # the second load's growth: the model alone
resident = rss() - before
seen, kept, adapters = set(), 0, 0
for name, t in list(model.named_parameters()) + list(model.named_buffers()):
    if t is None or t.data_ptr() in seen:
        continue
    seen.add(t.data_ptr())
    if qmodel.is_kept(name):
        kept += t.numel() * t.element_size()
    elif name.endswith((".A", ".B")):
        adapters += t.numel() * t.element_size()
print(json.dumps({"resident": resident, "first": first, "kept": kept, "adapters": adapters}))
"""


def memory(model_dir):
    rows = {}
    for what in ("fp16", "packed", "cached"):
        r = subprocess.run([sys.executable, "-c", CHILD, what, str(model_dir), str(ROOT)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{what}: {r.stderr.strip().splitlines()[-1]}")
        rows[what] = json.loads(r.stdout.strip().splitlines()[-1])
        rows[what]["linears"] = rows[what]["resident"] - rows[what]["kept"] - rows[what]["adapters"]
    return rows


def prefix_recompute(model, ids, n):
    """The generation loop before the KV cache: the whole prefix again for every new token."""
    import torch
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model.output(model.hidden(torch.tensor([ids]))[0, -1]).argmax()))
    return ids


def main(a):
    import torch

    from checkpoints import load
    from data import ppl_windows, token_stream
    from evaluate import generate, perplexity
    from qmodel import load as load_q
    from qmodel import quantize_model, save_quantized
    torch.set_num_threads(a.threads)
    tmp = None
    if a.model is None:                                    # a 2-bit QLoRA start (codes from RTN), rank 64
        tmp = tempfile.TemporaryDirectory()
        fp, tok = load("smollm2-135m")
        save_quantized(quantize_model(fp, "qlora", bits=2), tok, tmp.name, {"method": "qlora", "source": "smollm2-135m"})
        a.model = tmp.name
        del fp
    mem = memory(a.model)
    print(f"SmolLM2-135M 2-bit g64 ({a.model}); resident memory in MiB (fresh process each)\n")
    print("| load | first load's growth | model (second load) | embeddings + norms | LoRA A, B (fp32) | block linears | "
          "linears vs fp16 |\n|---|---|---|---|---|---|---|")
    for what, r in mem.items():
        mib = {k: v / 2**20 for k, v in r.items()}
        print(f"| {what} | {mib['first']:.1f} | {mib['resident']:.1f} | {mib['kept']:.1f} | {mib['adapters']:.1f} | "
              f"{mib['linears']:.1f} | {r['linears'] / mem['fp16']['linears']:.3f}x |")

    cached, tok = load_q(a.model)
    packed, _ = load_q(a.model, cache=False)
    windows = ppl_windows("wikitext2", tok, 2048)[:1]                             # (1, 2048)
    times = {"cached": [], "packed": []}
    for _ in range(a.repeats):                                                    # interleaved
        for name, model in (("cached", cached), ("packed", packed)):
            t = time.perf_counter()
            perplexity(model, windows, desc=name)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nperplexity, one window of 2048 tokens, median of {a.repeats}: cached {med['cached']:.2f} s, "
          f"packed {med['packed']:.2f} s: packed at {med['cached'] / med['packed']:.2f}x the cached speed")

    prompt_ids = token_stream(tok, "test")[1000:1000 + 256].tolist()
    prompt = tok.decode(prompt_ids)
    ids = tok.encode(prompt, bos=True)
    t = time.perf_counter()
    old = prefix_recompute(cached, ids, a.new_tokens)
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    new = generate(cached, tok, prompt, max_new_tokens=a.new_tokens)
    t_new = time.perf_counter() - t
    same = tok.decode(old[len(ids):]).startswith(new)        # generate stops early only at EOS
    print(f"\ngeneration, {a.new_tokens} new tokens after a {len(ids)}-token prompt (greedy, cached model): prefix "
          f"recompute {a.new_tokens / t_old:.1f} tok/s, KV cache {a.new_tokens / t_new:.1f} tok/s: "
          f"{t_old / t_new:.1f}x; same text: {same}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="2-bit quantized model directory (default: make a QLoRA-init one)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="perplexity timings per model (default 3)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    from cli import run
    run(main, a)
