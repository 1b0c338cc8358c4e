"""The quantizers a user would otherwise pick, side by side with this repo's methods, on the
embedded SmolLM2-135M: HQQ, GPTQ (GPTQModel) and AutoRound against RTN, LoftQ, ApiQ-lw and
ApiQ-bw (calibrate.py), all weight-only, asymmetric, groups of 64 inputs, evaluated with this repo's
perplexity protocol (evaluate.perplexity) on the same WikiText-2 test and C4 windows.

    python bench/bench_peers.py --bits 2,3 --limit 40 --threads 1             # every method, resumable
    python bench/bench_peers.py --methods hqq,gptq --bits 2 --limit 1 --smoke  # a quick check of two paths
    python plots/peers.py out/peers                                            # -> figures/peers.png

Methods (--methods, comma-separated):
  fp         full precision: the reference (bits 32, minutes 0)
  rtn        calibrate.py --method rtn: round-to-nearest, no adapter
  loftq      calibrate.py --method loftq: 5 alternating RTN / SVD steps, rank-64 LoRA
  apiq-lw    calibrate.py --method lw --quick (ApiQ-lw, layer by layer); rank-64 LoRA
  apiq       calibrate.py --method bw (ApiQ-bw), one row per --apiq-budgets entry (apiq-quick, ...);
             rank-64 LoRA
  hqq        hqq 0.2.x: Quantizer.quantize on each linear (half-quadratic solver, axis 1, settings of
             its BaseQuantizeConfig: at 2 and 3 bits the zero point stays a float); no data
  gptq       GPTQModel: GPTQ (Frantar et al. 2023) block by block, damp 1%, no act-order, on
             GPTQ_CALIB windows of this repo's calibration text
  autoround  auto-round: SignRound, 50 iterations, batch 8 (its "light" recipe) at its default learning
             rate (1 / iters), on 32 windows x 512 tokens of this repo's calibration text, fp32 (amp off)
The peers' calibration text is this repo's: data.calib_windows(tok, n, seqlen, seed=0), WikiText-2
train, given to each library as token ids. Every peer's result is its dequantized (fake-quantized)
weights, checked to hold at most 2^bits values per group, put into a copy of our fp32 model.

minutes: wall time, measured in this run, of the step that makes the quantized model from the
full-precision one: for ours the whole calibrate.py process (start, load, calibrate, save); for
the peers from our fp32 model in memory to the dequantized weights, including building the
transformers model (and, for GPTQModel, the directory) the library needs. Evaluation is not
counted. LoftQ and ApiQ also keep fp32 LoRA factors (rank 64) beside the N-bit codes.

Results: OUT/peers.json (rows: method, bits, minutes, wikitext2, c4, notes; written atomically
after every row) and a Markdown table. A row already in peers.json with the same --limit,
--c4-limit and --smoke is not redone; ours reuse a finished OUT/models/<row> directory, the peers
their dequantized weights OUT/models/<row>-w<bits>.safetensors (with the minutes they took), so a
second evaluation (more windows, C4) does not quantize again. Two runs with different --methods or
--bits may share OUT (two single-thread lanes): each reads peers.json again before it adds a row.
A missing peer library is skipped with the pip command that installs it (requirements-bench.txt).
"""
import argparse
import copy
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("fp", "rtn", "loftq", "apiq-lw", "apiq", "hqq", "gptq", "autoround")
GROUP = 64                                              # inputs per scale and zero point, every method
SEQLEN = 2048                                           # perplexity window (evaluate.py's protocol)
GPTQ_CALIB = dict(nsamples=128, seqlen=512)             # GPTQ's 128 windows; 128 x 2048 exceeds the 68k
                                                        # tokens of the local WikiText-2 train file
# 50 iterations and batch 8 as its "light" recipe, lr None = the library's own choice, 1 / iters (0.02);
# the "light" recipe's lr 5e-3 gave 103.0 at 2 bits here (row autoround-lr5e-3 in RESULTS.md)
AUTOROUND = dict(nsamples=32, seqlen=512, iters=50, lr=None, batch_size=8)
SMOKE = {  # --smoke: the same code paths on tiny budgets (numbers meaningless)
    "loftq": ["--loftq-iters", "1"],
    "apiq": ["--nsamples", "2", "--seqlen", "64", "--epochs", "1"],
    "gptq": dict(nsamples=4, seqlen=512),   # 2048 tokens: more than the 1536 inputs of w2, else H is singular
    "autoround": dict(nsamples=4, seqlen=64, iters=2, lr=5e-3, batch_size=2),
}
TORCH_PIN = "-c <(echo torch==2.13.0)"                  # keeps pip from touching the torch build
INSTALL = {  # method -> (module it imports, PyPI package, the command that installs it: requirements-bench.txt)
    "hqq": ("hqq", "hqq", f"pip install {TORCH_PIN} hqq==0.2.8.post1"),
    "gptq": ("gptqmodel", "gptqmodel", f"pip install {TORCH_PIN} pypcre==0.6.4 tokenicer==0.0.14 logbar==0.4.15 "
                                       f"device-smi==0.5.7 defuser==0.0.28 threadpoolctl==3.8.0 torchao==0.18.0 "
                                       f"&& pip install --no-deps gptqmodel==7.6.0"),
    "autoround": ("auto_round", "auto-round", f"pip install {TORCH_PIN} auto-round==0.16.1"),
}


# ----------------------------------------------------------------------------- arguments

def apiq_flags(budget: str) -> list:
    """calibrate.py flags of one --apiq-budgets entry: quick, long, or NxTxE (--quick's recipe with
    N windows of T tokens, E epochs)."""
    if budget in ("quick", "long"):
        return [f"--{budget}"]
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", budget)
    if not m:
        raise ValueError(f"--apiq-budgets entry {budget!r}: give quick, long, or NxTxE (e.g. 64x512x4)")
    return ["--quick", "--nsamples", m[1], "--seqlen", m[2], "--epochs", m[3]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods: " + ", ".join(METHODS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    p.add_argument("--bits", default="2,3", help="comma-separated weight bits (default 2,3)")
    p.add_argument("--limit", type=int, default=40, help="WikiText-2 test windows of 2048 tokens (default 40)")
    p.add_argument("--c4-limit", type=int, default=None, help="C4 windows (default: --limit; 0: no C4)")
    p.add_argument("--apiq-budgets", default="quick,long", help="ApiQ rows: quick, long, NxTxE (default quick,long)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in calibrate.py (default 1)")
    p.add_argument("--out", default=None, help="results directory (default out/peers; with --smoke out/peers-smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets for every method: checks the code paths only")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if unknown := [m for m in a.methods if m not in METHODS]:
        p.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    try:
        a.bits = [int(b) for b in a.bits.split(",") if b.strip()]
    except ValueError:
        p.error(f"--bits {a.bits!r}: comma-separated integers")
    if not a.bits or any(not 2 <= b <= 8 for b in a.bits):
        p.error("--bits: each in 2..8")
    a.budgets = [b.strip() for b in a.apiq_budgets.split(",") if b.strip()]
    for b in a.budgets:
        try:
            apiq_flags(b)
        except ValueError as e:
            p.error(str(e))
    a.c4_limit = a.limit if a.c4_limit is None else a.c4_limit
    if a.limit <= 0 or a.c4_limit < 0 or a.threads <= 0:
        p.error("--limit and --threads must be positive, --c4-limit >= 0")
    a.out = Path(a.out or ("out/peers-smoke" if a.smoke else "out/peers")).resolve()  # calibrate.py runs in ROOT
    return a


# ----------------------------------------------------------------------------- transformers <-> ours

def to_hf(model):
    """A transformers LlamaForCausalLM holding our model's weights (fp32), checked on its logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import checkpoints
    a = model.args
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
                      tie_word_embeddings=model.output.weight is model.tok_embeddings.weight)
    if a.use_scaled_rope:
        raise ValueError("to_hf: Llama-3.1 RoPE scaling is not mapped (SmolLM2 does not use it)")
    to_hf_name = {ours: theirs for theirs, ours in checkpoints.HF_NAMES.items()}
    sd = {}
    for name, w in model.state_dict().items():
        if name.endswith("attention.wq.weight"):
            w = checkpoints.hf_permute(w, a.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = checkpoints.hf_permute(w, a.n_kv_heads)
        sd[checkpoints.rename(name, to_hf_name)] = w.detach().float()
    hf = LlamaForCausalLM(cfg)                    # random init, then overwritten (~135M weights: seconds)
    hf.load_state_dict(sd)                        # the tied head: lm_head.weight is our output.weight
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf.eval().requires_grad_(False)
    x = torch.randint(0, a.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))  # (1, 32)
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"to_hf: transformers' Llama differs from ours by {diff:.2e} in the logits")
    return hf


def hf_tokenizer():
    """transformers' tokenizer of the embedded GGUF (AutoRound and GPTQModel want one)."""
    from transformers import AutoTokenizer

    import checkpoints
    gguf = checkpoints.embedded_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def hf_to_ours(name: str, w, args):
    """transformers linear `model.layers.L.self_attn.q_proj` and its weight (out, in) -> our name
    `layers.L.attention.wq` and weight (q/k rows un-permuted); None for a module that is not one."""
    import checkpoints
    ours = checkpoints.rename(name + ".weight", checkpoints.HF_NAMES)
    if ours is None or not ours.startswith("layers."):
        return None, None
    if ours.endswith("attention.wq.weight"):
        w = checkpoints.hf_unpermute(w, args.n_heads)
    elif ours.endswith("attention.wk.weight"):
        w = checkpoints.hf_unpermute(w, args.n_kv_heads)
    return ours.removesuffix(".weight"), w


def check_grid(name, w, bits):
    """A dequantized weight (out, in) holds at most 2^bits distinct values in each group of GROUP
    inputs: else the library handed back something that is not its N-bit model."""
    g = w.float().reshape(w.shape[0], -1, GROUP).sort(-1).values    # (out, in / GROUP, GROUP)
    distinct = (g.diff(dim=-1) != 0).sum(-1) + 1                     # (out, in / GROUP)
    if distinct.max() > 2**bits:
        raise RuntimeError(f"{name}: {int(distinct.max())} distinct values in a group, more than 2^{bits}")


def with_linears(fp_model, weights: dict, bits: int):
    """A copy of our fp32 model whose block linears hold `weights` {"layers.L.attention.wq": (out, in)}."""
    import torch

    import llama
    expected = {f"layers.{l}.{n}" for l in range(fp_model.args.n_layers) for n in llama.LINEARS}
    if missing := expected - set(weights):
        raise RuntimeError(f"no quantized weight for {len(missing)} linears, e.g. {sorted(missing)[0]}")
    model = copy.deepcopy(fp_model)                      # deepcopy keeps the tied embedding / head
    with torch.no_grad():
        for name in expected:
            lin, w = model.get_submodule(name), weights[name]
            if w.shape != lin.weight.shape:
                raise RuntimeError(f"{name}: weight {tuple(w.shape)}, the model wants {tuple(lin.weight.shape)}")
            check_grid(name, w, bits)
            lin.weight.copy_(w.to(lin.weight.dtype))
    return model


# ----------------------------------------------------------------------------- the peers

def quantize_hqq(fp_model, tok, bits, a):
    """HQQ: each linear alone, no data. BaseQuantizeConfig(nbits, group_size=64, axis=1)'s weight
    settings, fp32 on the CPU, unpacked; Quantizer.dequantize gives (W_q - zero) * scale."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    import llama
    params = BaseQuantizeConfig(nbits=bits, group_size=GROUP, axis=1)["weight_quant_params"]
    weights = {}
    for l, block in enumerate(fp_model.layers):
        for name in llama.LINEARS:
            w = block.get_submodule(name).weight.detach()                    # (out, in)
            w_q, meta = Quantizer.quantize(w, device="cpu", compute_dtype=torch.float32, bitpack=False, **params)
            weights[f"layers.{l}.{name}"] = Quantizer.dequantize(w_q, meta).reshape(w.shape)  # (out, in)
    zero = "rounded" if params["round_zero"] else "float"
    return weights, f"hqq {hqq_version()}: half-quadratic solver, axis 1, {zero} zero point, no data"


def hqq_version():
    from importlib.metadata import version
    return version("hqq")


def tame_gptqmodel(gptqmodel, threads, log_dir):
    """Two settings GPTQModel takes from its surroundings. Its CPU worker pool is sized from
    os.cpu_count() beside a fixed 2-thread loader pool, which fails on a 2-core machine (cpu pool
    of 1): both get `threads` workers, so it runs on --threads threads like everything else here.
    Its per-layer logs go to ./logs: here to `log_dir`. Both are module globals, read when first
    used."""
    from gptqmodel.looper import loop_processor
    loop_processor._PROJECT_LOG_DIR = Path(log_dir)
    pool = gptqmodel.DeviceThreadPool
    if getattr(pool, "_bench_threads", None) is not None:
        return
    def sized(**kw):
        kw["workers"] = {**kw["workers"], "cpu": threads, "model_loader:cpu": threads}
        return pool(**kw)
    sized._bench_threads = threads
    gptqmodel.DeviceThreadPool = sized


def quantize_gptq(fp_model, tok, bits, a):
    """GPTQ through GPTQModel, the way its users run it: our model saved as a transformers
    directory (GPTQModel loads from one), quantized layer by layer on this repo's calibration
    windows, saved in the GPTQ format and loaded back with the torch kernel; then every
    TorchLinear's codes, dequantized.

    Why the save and reload: in gptqmodel 7.6.0 the model left in memory by quantize() with
    sym=False dequantizes one step too high in every group (qzeros are packed in the GPTQ v1
    format, zero - 1, and read back as they are), so its weights are not the quantized model
    that it saves; the reloaded model is (measured: the two differ by exactly one scale)."""
    import torch

    import gptqmodel
    from data import calib_windows
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    tame_gptqmodel(gptqmodel, a.threads, a.out / "gptq-logs")
    c = SMOKE["gptq"] if a.smoke else GPTQ_CALIB
    windows = calib_windows(tok, c["nsamples"], c["seqlen"], seed=0)             # (n, T)
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows]
    cfg = QuantizeConfig(bits=bits, group_size=GROUP, sym=False, desc_act=False, act_group_aware=False,
                         damp_percent=0.01, device="cpu", offload_to_disk=False)
    with tempfile.TemporaryDirectory(dir=a.out, prefix=".gptq-") as d:
        to_hf(fp_model).save_pretrained(f"{d}/fp")
        hf_tokenizer().save_pretrained(f"{d}/fp")
        qm = GPTQModel.load(f"{d}/fp", cfg, dtype=torch.float32)
        qm.quantize(calib, batch_size=1)
        qm.save(f"{d}/q")
        del qm
        # TorchLinear takes only fp16 / bf16; fp16 holds the saved scales exactly
        qm = GPTQModel.load(f"{d}/q", device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    weights = {}
    with torch.no_grad():
        for name, m in qm.model.named_modules():
            if not hasattr(m, "dequantize_weight"):
                continue
            # scale * (code - zero), computed by the kernel in fp16 (in, out); redone in fp32: the
            # small integer code - zero is recovered exactly by rounding, then times the fp32 scale
            s = m.scales.float()[m.g_idx.long()]                         # (in, out) the scale of each weight
            k = torch.round(m.dequantize_weight().float() / s)           # (in, out) code - zero
            w = (s * k).T.contiguous()                                   # (out, in)
            ours, w = hf_to_ours(name, w, fp_model.args)
            if ours:
                weights[ours] = w
    return weights, (f"gptqmodel {gptqmodel.__version__}: {c['nsamples']} x {c['seqlen']} tokens, damp 1%, "
                     f"no act-order; minutes include its save + reload")


def quantize_autoround(fp_model, tok, bits, a):
    """AutoRound on a transformers copy of our model: the calibration windows are given as token
    tensors, batch by batch; after quantize() (no export) every linear's weight is its
    quantize-dequantize value, read back from the in-memory model."""
    import auto_round
    from auto_round import AutoRound

    from data import calib_windows
    c = SMOKE["autoround"] if a.smoke else AUTOROUND
    windows = calib_windows(tok, c["nsamples"], c["seqlen"], seed=0)             # (n, T)
    hf = to_hf(fp_model)
    ar = AutoRound(hf, tokenizer=hf_tokenizer(), bits=bits, group_size=GROUP, sym=False,
                   dataset=list(windows.split(c["batch_size"])),               # [(batch, T), ...]
                   nsamples=c["nsamples"], seqlen=c["seqlen"], iters=c["iters"], lr=c["lr"],
                   batch_size=c["batch_size"], device_map="cpu", amp=False, low_cpu_mem_usage=False,
                   enable_torch_compile=False)
    model, _ = ar.quantize()
    weights = {}
    for name, m in model.named_modules():
        if hasattr(m, "weight") and getattr(m, "in_features", None):
            ours, w = hf_to_ours(name, m.weight.detach().float(), fp_model.args)
            if ours:
                weights[ours] = w
    return weights, (f"auto-round {auto_round.__version__}: {c['nsamples']} x {c['seqlen']} tokens, "
                     f"iters {c['iters']}, lr {c['lr'] or 'default (1/iters)'}, batch {c['batch_size']}, fp32")


PEERS = {"hqq": quantize_hqq, "gptq": quantize_gptq, "autoround": quantize_autoround}


# ----------------------------------------------------------------------------- ours (calibrate.py)

def run_ours(row, method, bits, flags, a):
    """calibrate.py in a subprocess -> (model directory, seconds, notes). A finished directory is
    reused; a calibration interrupted before is continued (ApiQ-bw resumes block by block), and
    its minutes add up the wall time of every process that worked on it."""
    import json

    from cli import write_json
    d = a.out / "models" / f"{row}-w{bits}"
    args = ["--method", method, "--bits", str(bits), "--group-size", str(GROUP), *flags]   # what makes the model
    clock = d.parent / f"{d.name}.seconds.json"            # wall time of the calibrate.py processes, their flags
    spent = json.loads(clock.read_text()) if clock.exists() else {"seconds": 0.0, "processes": 0, "args": args}
    if spent["args"] != args:
        raise ValueError(f"{d} was made by calibrate.py {' '.join(spent['args'])}, not {' '.join(args)}: "
                         f"remove it (and {clock.name}) or choose another --out")
    if not (d / "apiq.json").exists():
        cmd = [sys.executable, "calibrate.py", *args, "--threads", str(a.threads), "--out", str(d)]
        log = d.parent / f"{d.name}.log"
        d.parent.mkdir(parents=True, exist_ok=True)
        print(f"  {' '.join(cmd[1:])}  (log: {log})", flush=True)
        t0 = time.time()
        try:
            with open(log, "a") as f:
                r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        finally:
            spent = {"seconds": spent["seconds"] + time.time() - t0, "processes": spent["processes"] + 1, "args": args}
            write_json(clock, spent)
        if r.returncode:
            tail = log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
            raise RuntimeError(f"calibrate.py exited {r.returncode}: {tail[0]} (log: {log})")
    made = json.loads((d / "apiq.json").read_text())
    if spent["processes"] == 0:                              # a directory made elsewhere: its own clock
        spent = {"seconds": made.get("calibration_seconds", float("nan")), "processes": 0, "args": args}
        note = "minutes: calibrate.py's own calibration_seconds (directory made outside this benchmark)"
    else:
        note = f"{spent['processes']} calibrate.py processes" if spent["processes"] > 1 else ""
    return d, spent["seconds"], note


def run_peer(row, method, bits, fp_model, tok, a):
    """(dequantized weights, seconds, notes) of a peer: quantized here, or read back from
    OUT/models/<row>-w<bits>.safetensors, which the first run writes (with its seconds), so that an
    evaluation with another --limit or --c4-limit does not quantize again."""
    from safetensors.torch import load_file, save_file

    from cli import atomic_write
    f = a.out / "models" / f"{row}-w{bits}{'-smoke' if a.smoke else ''}.safetensors"
    if f.exists():
        from safetensors import safe_open
        with safe_open(str(f), framework="pt") as g:
            meta = g.metadata()
        print(f"  the weights from {f} ({float(meta['seconds']) / 60:.1f} min when made)", flush=True)
        return load_file(str(f)), float(meta["seconds"]), meta["notes"]
    t0 = time.time()
    weights, notes = PEERS[method](fp_model, tok, bits, a)
    seconds = time.time() - t0
    f.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in weights.items()}
    atomic_write(f, lambda tmp: save_file(tensors, tmp, metadata={"seconds": str(seconds), "notes": notes}))
    return weights, seconds, notes


def our_rows(method, a):
    """[(row name, calibrate.py --method, extra flags)] for one of our --methods entries."""
    if method in ("rtn", "loftq"):
        return [(method, method, SMOKE[method] if a.smoke and method in SMOKE else [])]
    if method == "apiq-lw":                                  # layer-wise ApiQ, the --quick recipe only
        return [(method, "lw", ["--quick"] + (SMOKE["apiq"] if a.smoke else []))]
    # ApiQ-bw, one row per budget; under --smoke the tiny flags come after the preset's, and given
    # flags win over a preset's (calibrate.py: a preset fills only what was not given)
    return [(f"apiq-{b}", "bw", apiq_flags(b) + (SMOKE["apiq"] if a.smoke else [])) for b in a.budgets]


# ----------------------------------------------------------------------------- the run

def evaluate_ppl(model, windows, label):
    """({dataset: perplexity or None}, notes): a non-finite loss (a broken 2-bit model) is
    recorded as None with a note, so that the row is not redone on every run."""
    from evaluate import perplexity
    ppl, notes = {}, []
    for ds, w in windows.items():
        try:
            ppl[ds] = None if w is None else round(perplexity(model, w, desc=f"{label} {ds}"), 4)
        except FloatingPointError as e:
            ppl[ds] = None
            notes.append(str(e))
    return ppl, notes


def family(method: str) -> str:
    """A row's method family (as plots/common.py's): apiq-quick -> apiq, autoround-lr5e-3 ->
    autoround; ApiQ-lw is its own."""
    return "apiq-lw" if method.startswith("apiq-lw") else method.split("-")[0]


def order(r):
    """Rows as the table and peers.json list them: fp first, then by bits, methods as in METHODS,
    ApiQ budgets by their minutes."""
    base = family(r["method"])
    return (0 if base == "fp" else r["bits"], METHODS.index(base) if base in METHODS else len(METHODS),
            r["minutes"], r["method"])


def table(rows) -> str:
    def num(x, fmt):
        return "" if x is None else format(x, fmt)
    lines = ["| method | bits | minutes | WikiText-2 | C4 | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        bits = "fp32" if r["method"] == "fp" else r["bits"]
        lines.append(f"| {r['method']} | {bits} | {num(r['minutes'], '.2f')} | {num(r['wikitext2'], '.2f')} | "
                     f"{num(r['c4'], '.2f')} | {r['notes']} |")
    return "\n".join(lines)


def main(a):
    import json

    import torch

    from checkpoints import load
    from cli import check_writable, write_json
    from data import ppl_windows
    from qmodel import load as load_quantized
    torch.set_num_threads(a.threads)
    check_writable(a.out)
    path = a.out / "peers.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows = {(r["method"], r["bits"]): r for r in saved.get("rows", [])}
    same = dict(limit=a.limit, c4_limit=a.c4_limit, smoke=a.smoke)

    def done(key):
        r = rows.get(key)
        return r is not None and all(r.get(k) == v for k, v in same.items())

    def save(key, minutes, evaluated, notes):
        ppl, problems = evaluated
        notes = "; ".join([notes, *problems])
        if path.exists():                                    # rows another run (a second lane) saved meanwhile
            rows.update({(r["method"], r["bits"]): r for r in json.loads(path.read_text()).get("rows", [])})
        rows[key] = dict(method=key[0], bits=key[1], minutes=round(minutes, 3), wikitext2=ppl["wikitext2"],
                         c4=ppl["c4"], notes=notes, **same)
        write_json(path, {"model": "smollm2-135m", "group_size": GROUP, "seqlen": SEQLEN,
                          "rows": sorted(rows.values(), key=order)})
        print(f"  {key[0]} w{key[1]}: {minutes:.2f} min, wikitext2 {ppl['wikitext2']}, c4 {ppl['c4']}", flush=True)

    skipped = set()
    for method in a.methods:
        if method in INSTALL and importlib.util.find_spec(INSTALL[method][0]) is None:
            _, package, cmd = INSTALL[method]
            print(f"skip {method}: the package {package} is not installed; to install it: {cmd}")
            skipped.add(method)
    failed = []
    fp_model, tok = load("smollm2-135m")                     # fp32, evaluation mode
    windows = {"wikitext2": ppl_windows("wikitext2", tok, SEQLEN)[:a.limit],                  # (limit, 2048)
               "c4": ppl_windows("c4", tok, SEQLEN)[:a.c4_limit] if a.c4_limit else None}     # (c4_limit, 2048)
    print(f"windows: wikitext2 {len(windows['wikitext2'])}, c4 {0 if windows['c4'] is None else len(windows['c4'])} "
          f"x {SEQLEN} tokens; threads {a.threads}; results {path}" + ("; SMOKE budgets" if a.smoke else ""))
    if "fp" in a.methods and not done(("fp", 32)):
        print("fp: full precision")
        save(("fp", 32), 0.0, evaluate_ppl(fp_model, windows, "fp"), "reference")
    for bits in a.bits:
        for method in a.methods:
            if method == "fp" or method in skipped:
                continue
            jobs = [(method, None, None)] if method in PEERS else our_rows(method, a)   # a peer, or ours
            for row, cal_method, flags in jobs:
                key = (row, bits)
                if done(key):
                    continue
                print(f"{row} w{bits}g{GROUP}", flush=True)
                try:
                    if cal_method is not None:                   # ours: calibrate.py, then qmodel.load
                        d, seconds, extra = run_ours(row, cal_method, bits, flags, a)
                        model, _ = load_quantized(d)
                        lora = "" if cal_method == "rtn" else "; + rank-64 LoRA"
                        notes = " ".join(["calibrate.py --method", cal_method, *flags]) + lora
                        notes += f"; {extra}" if extra else ""
                    else:                                        # a peer: dequantized weights into our model
                        weights, seconds, notes = run_peer(row, method, bits, fp_model, tok, a)
                        model = with_linears(fp_model, weights, bits)
                        del weights
                    save(key, seconds / 60, evaluate_ppl(model, windows, f"{row} w{bits}"), notes)
                    del model
                except KeyboardInterrupt:
                    raise
                except Exception as e:                           # one failing method does not stop the rest
                    if os.environ.get("APIQ_DEBUG"):
                        raise
                    traceback.print_exc(limit=-3)
                    print(f"error: {row} w{bits}: {type(e).__name__}: {e}", flush=True)
                    failed.append(f"{row} w{bits}")
    shown = [r for r in sorted(rows.values(), key=order) if all(r.get(k) == v for k, v in same.items())]
    print(f"\nSmolLM2-135M, asymmetric, group {GROUP}; perplexity on {a.limit} WikiText-2 and {a.c4_limit} C4 "
          f"windows of {SEQLEN} tokens; minutes on {a.threads} thread(s)\n")
    print(table(shown))
    if skipped:
        print(f"\nskipped (not installed): {', '.join(sorted(skipped))}")
    if failed:
        print(f"\nfailed: {', '.join(failed)} (rerun the same command to retry them)")
        sys.exit(1)


def stop_on_term(signum, frame):
    """SIGTERM (kill) as Ctrl-C: the running calibrate.py is stopped and its wall time recorded."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, stop_on_term)
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)                  # before torch is imported, for every library here
    from cli import run
    run(main, args)
