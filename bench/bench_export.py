"""The packed exports read with no apiq code. GPTQ (export.py --format gptq): transformers +
optimum + gptqmodel + peft load OUT/base and OUT/adapter. GGUF (--format gguf, 4 bits):
llama-cpp-python loads OUT/model.gguf with OUT/lora.gguf. This script prints

  - WikiText-2 test perplexity on windows of 2048 tokens (GPTQ protocol: the rows joined with
    "\\n\\n", tokenised once with the export's own tokenizer, non-overlapping windows, the mean of
    the per-window NLL), beside evaluate.py's on the source model and the same windows (--ref);
  - resident memory: the process's RSS growth while transformers loads the packed base (a second
    copy, after a first has paid the imports and gptqmodel's compiler) and every tensor of it is
    read once (safetensors maps the file: pages not read are not resident), minus the bytes of the
    tensors that stay 16-bit (embeddings, norms), against the same linears in fp16 (2 bytes a
    weight); then what one forward of 4 tokens adds (the kernel's transient fp16 weights, which
    the allocator keeps); the adapter's RSS growth on its own.

    python export.py out/demo/apiq-bw-w2 out/gptq/apiq-bw-w2 --format gptq
    python bench/bench_export.py out/gptq/apiq-bw-w2 --ref out/demo/apiq-bw-w2 --limit 8 --threads 2
    python bench/bench_export.py out/gptq/apiq-bw-w2 --windows 40:48      # windows of your choice
    python export.py out/demo/apiq-bw-w4 out/gguf/apiq-bw-w4 --format gguf
    python bench/bench_export.py out/gguf/apiq-bw-w4 --ref out/demo/apiq-bw-w4 --limit 8 --threads 2

The model and the windows go through transformers (or llama.cpp, with its own tokenizer) alone;
apiq's evaluate.py runs in its own process, only for the reference number. GPTQ needs the test
references (requirements-test.txt, setup.sh); GGUF needs llama-cpp-python, which builds llama.cpp
from source (`pip install llama-cpp-python`, ~4 min on 2 cores; not a test dependency).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def wikitext2_test(data_dir: Path) -> str:
    """The test split as Hugging Face's rows, joined with "\\n\\n" (each non-blank line keeps its "\\n")."""
    lines = (data_dir / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:-1]
    return "\n\n".join(line + "\n" if line.strip() else "" for line in lines)


def ref_ppl(ref, start, stop, threads) -> float:
    """evaluate.py's perplexity of the source on WikiText-2 windows start..stop-1, in its own process."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "evaluate.py", "--ckpt", str(ref), "--ppl", "wikitext2", "--skip", str(start),
               "--limit", str(stop - start), "--threads", str(threads), "--json", f"{d}/r.json"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"bench_export: evaluate.py failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        return json.loads(Path(f"{d}/r.json").read_text())["ppl"]["wikitext2"]


def windows_of(ids, start, stop, seqlen=2048):
    n = len(ids) // seqlen
    if not 0 <= start < stop <= n:
        sys.exit(f"bench_export: windows {start}:{stop} outside 0:{n}")
    return torch.tensor(ids[: n * seqlen]).view(n, seqlen)[start:stop]     # (stop - start, seqlen)


def report(what, nll, seconds, a, start, stop):
    ppl = math.exp(sum(nll) / len(nll))
    print(f"{what}: WikiText-2 windows {start}:{stop} perplexity {ppl:.3f} "
          f"({seconds / len(nll):.1f} s a window, {a.threads} threads)")
    if a.ref:
        want = ref_ppl(a.ref, start, stop, a.threads)
        print(f"evaluate.py on {a.ref} (fp32): {want:.3f}; the export is {100 * (ppl / want - 1):+.2f}%")


def bench_gptq(a, start, stop):
    import peft
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    base, adapter = a.export / "base", a.export / "adapter"
    # the first load and forward pay the imports (gptqmodel, optimum, torchao), the kernel selection
    # and gptqmodel's torch.compile of its kernel; the second model's RSS growth is the model's
    short = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        warm = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        warm(short)
        r0 = rss_mb()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        for t in model.state_dict().values():            # read every tensor once: resident, no copies
            t.max()
        r1 = rss_mb()
        model(short)
        r1f = rss_mb()
    del warm
    packed = kept = fp16_linear = 0
    bits = json.loads((base / "config.json").read_text())["quantization_config"]["bits"]
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            n = math.prod(t.get_shape()) * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}[t.get_dtype()]
            if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                packed += n
                if k.endswith(".qweight"):
                    shape = t.get_shape()
                    fp16_linear += 2 * shape[1] * shape[0] * 32 // bits
            else:
                kept += n
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    for t in model.state_dict().values():
        t.max()
    r2 = rss_mb()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    print(f"q_proj: {type(layer).__name__} over {type(layer.base_layer).__name__}")

    tok = AutoTokenizer.from_pretrained(base)
    windows = windows_of(tok(wikitext2_test(a.data_dir))["input_ids"], start, stop)
    nll, t0 = [], time.time()
    with torch.no_grad():
        for i, x in enumerate(windows):
            logits = model(x[None]).logits[0, :-1].float()                      # (2047, vocab)
            nll.append(torch.nn.functional.cross_entropy(logits, x[1:]).item())
            print(f"\rwindow {start + i}: nll {nll[-1]:.4f}", end="", file=sys.stderr)
    print(file=sys.stderr)
    r3 = rss_mb()
    report(f"transformers + gptqmodel + peft ({a.dtype})", nll, time.time() - t0, a, start, stop)
    lin = r1 - r0 - kept / 2**20
    print(f"RSS: base load (the second) +{r1 - r0:.1f} MiB, of which the 16-bit rest is {kept / 2**20:.1f} MiB "
          f"(file); the quantized linears +{lin:.1f} MiB vs {fp16_linear / 2**20:.1f} MiB in fp16 = "
          f"{lin / (fp16_linear / 2**20):.3f}x (their packed tensors: {packed / 2**20:.1f} MiB)")
    print(f"RSS: a forward of 4 tokens adds +{r1f - r1:.1f} MiB; the adapter +{r2 - r1f:.1f} MiB; "
          f"after the windows (activations, logits, compiled kernels) +{r3 - r0:.1f} MiB over the second load")


def bench_gguf(a, start, stop):
    from llama_cpp import Llama
    lora = a.export / "lora.gguf"
    if a.no_adapter:
        lora = Path("/nonexistent")                                              # the base alone
    # n_batch 1: one token a decode, llama.cpp's generation path. Batched decodes (n_batch > 1)
    # segfaulted on this AVX512/AMX CPU with llama-cpp-python 0.3.36 built GGML_NATIVE, for the
    # embedded SmolLM2 GGUF as for ours.
    llm = Llama(model_path=str(a.export / "model.gguf"), lora_path=str(lora) if lora.exists() else None,
                n_ctx=2048, n_batch=1, n_ubatch=1, logits_all=True, n_threads=a.threads, verbose=False)
    ids = llm.tokenize(wikitext2_test(a.data_dir).encode("utf-8"), add_bos=True, special=True)
    print(f"llama.cpp's tokenizer: {len(ids)} tokens")
    windows = windows_of(ids, start, stop)
    nll, t0 = [], time.time()
    for i, x in enumerate(windows):
        llm.reset()
        llm.eval(x.tolist())
        logits = torch.from_numpy(llm.scores[: len(x) - 1].copy()).float()     # (2047, vocab)
        nll.append(torch.nn.functional.cross_entropy(logits, x[1:]).item())
        print(f"\rwindow {start + i}: nll {nll[-1]:.4f}", end="", file=sys.stderr)
    print(file=sys.stderr)
    report("llama.cpp (llama-cpp-python), Q4_1" + (" + GGUF LoRA" if lora.exists() else ""),
           nll, time.time() - t0, a, start, stop)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export", type=Path, help="export.py --format gptq directory (base/, adapter/) or --format gguf "
                                             "directory (model.gguf, lora.gguf)")
    p.add_argument("--ref", type=Path, help="the quantized model directory it was exported from (evaluate.py)")
    p.add_argument("--limit", type=int, default=8, help="the first N windows (default 8)")
    p.add_argument("--windows", help="START:STOP, windows of your choice instead of --limit")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="GPTQ: compute dtype (default fp16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-adapter", action="store_true", help="GGUF: the base without lora.gguf (does the adapter matter?)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("APIQ_DATA_DIR", ROOT.parent / "shared" / "data")))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    start, stop = map(int, a.windows.split(":")) if a.windows else (0, a.limit)
    if (a.export / "model.gguf").exists():
        bench_gguf(a, start, stop)
    elif (a.export / "base" / "config.json").exists():
        bench_gptq(a, start, stop)
    else:
        sys.exit(f"bench_export: {a.export} holds neither base/config.json (gptq) nor model.gguf (gguf)")


if __name__ == "__main__":
    main()
