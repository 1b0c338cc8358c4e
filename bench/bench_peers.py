"""The benchmark: this repo's methods and the quantizers a user would otherwise pick (HQQ, GPTQ via
GPTQModel, AutoRound), on the embedded SmolLM2-135M, every row on one clock, every choice on a
tuning set, every stored bit counted. The protocol (docs/benchmarks.md#the-protocol):

- Splits. Calibration text: WikiText-2 train (data.calib_windows, seed 0) for every method. Tuning
  set (--split tuning): the first --limit windows of WikiText-2 *validation* (data.TUNING); nothing
  trains on it and every choice (recipes, learning rates, ranks, the peers' settings) is made on it;
  with --c4-limit also C4 windows of documents that no C4 test window touches (data.TUNING_C4), to
  see whether a choice carries over to other text.
  Test sets (--split test): WikiText-2 test and C4 windows, read only by the final rows. A tuning
  run reads no test file (tests/test_bench_peers.py runs one with wiki.test.raw absent).
- Bits per weight in every row, over the block linears' weights (bench/bits_per_weight.py's
  formula, which its test checks against an export's files): codes, zero points, fp16 scales,
  GPTQ's g_idx, and the adapter at --adapter-bits (export.py writes fp16 by default). The
  embeddings and head (28.3M parameters, 16-bit in every row) are not in it.
- Minutes: wall time from loading the full-precision model to the quantized weights in memory,
  saving excluded (ours: calibrate.py's load_seconds + calibration_seconds; the peers: timed here,
  GPTQModel's save and reload left out), one thread a row. While a timed row runs, the other core
  runs at most one other timed row: every row records the mean and max 1-minute load average
  over its minutes, and a row with a mean above 2.5 is marked as not on the clock.
- One clock: every working day starts with --reference, one of the benchmark's own rows re-timed
  (REFERENCE: AutoRound 2 bits, 32 x 256 tokens, 50 iterations; ~16 min, not evaluated) under a
  row's conditions (one thread, the other core at most one other timed row); its seconds go to
  bench/results/reference.json with the CPU model and the load. Each row records its day's
  reference and the ratio to the first day's (re-read from reference.json on every run: a day's
  reference may come after its rows); rows count as one clock only within 5%.

    python bench/bench_peers.py --reference                                      # once a day
    python bench/bench_peers.py --split tuning --bits 2 --rows "hqq gptq autoround:iters=50,seqlen=256"
    python bench/bench_peers.py --split test --limit 20 --rows tuned    # after every choice: the tuning rows
    python bench/bench_peers.py --split test --limit 40 --rows best     # the best of each method and budget
    python bench/bench_peers.py --smoke --rows "hqq gptq autoround apiq:quick"    # the code paths, tiny budgets

Rows (--rows, space-separated): METHOD or METHOD:SETTING=VALUE,... (a bare SETTING means a flag):
  fp         full precision, the reference perplexity
  hqq        hqq 0.2.x: Quantizer.quantize on each linear, its BaseQuantizeConfig (no settings, no data)
  gptq       GPTQModel, its QuantizeConfig defaults: damp=0.05, act_group_aware=1 (activation-aware group
             order), desc_act=0; nsamples=128, seqlen=512 (GPTQ's 128 windows; 128 x 2048 exceeds the
             68k tokens of the local WikiText-2 train text)
  autoround  auto-round: its defaults, iters=200 (its "light" recipe: iters=50), lr 1/iters, batch_size=8,
             amp (bf16 on the CPU), compile (torch.compile: its default); nsamples=32, seqlen=512 by
             default here (its own 128 x 2048 exceeds the local text): chosen per time budget on the tuning set;
             seed=k: the calibration windows of calibrate.py --seed k, its own seed 42 + k (default 0: 42)
  apiq, apiq-lw, loftq, qlora, rtn
             calibrate.py --method bw / lw / loftq / qlora / rtn with the settings as flags
             (apiq:quick,rank=8 -> calibrate.py --method bw --quick --rank 8)
  tuned      (--split test) every row of the tuning JSON (--tuning) on the clock, as it was tuned
  best       (--split test) of those, the lowest tuning perplexity of each method in each time budget
             (BUDGETS: at most 20 and at most 40 minutes), within BEST_BITS_OVER bits/weight of the bits
A row is named by its method and the settings it changes (autoround-iters50-seqlen256); plots
group rows by the name's first part. With --split test, --limit 0 reads every window (the full
WikiText-2 test) and --tasks N adds the five zero-shot tasks (their first N items: each accuracy, the
mean and its standard error). Results: --json (default bench/results/benchmark_<split>.json, with
--tasks benchmark_test_tasks.json; --smoke: OUT/benchmark_smoke.json), a row written atomically as
soon as it is evaluated; a row already there with the same windows and tasks is not redone; the
peers' dequantized weights (with their minutes) and our model directories stay under OUT/models,
so a second evaluation does not quantize again. A missing peer library is skipped with the command
that installs it.
"""
import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GROUP = 64                                              # inputs per scale and zero point, every method
SEQLEN = 2048                                           # perplexity window (evaluate.py's protocol)
OURS = {"apiq": "bw", "apiq-lw": "lw", "loftq": "loftq", "qlora": "qlora", "rtn": "rtn"}   # row -> --method
PEERS = ("hqq", "gptq", "autoround")
METHODS = ("fp", "rtn", "qlora", "loftq", "apiq-lw", "apiq", *PEERS)
DEFAULTS = {  # each peer's documented preset, in the names the rows use
    "hqq": {},
    "gptq": dict(damp=0.05, act_group_aware=1, desc_act=0, nsamples=128, seqlen=512),
    "autoround": dict(iters=200, lr=None, batch_size=8, amp=1, compile=None, nsamples=32, seqlen=512, seed=0),
}
AUTOROUND_SEED = 42   # AutoRound's own default; a row's seed=k: the windows of seed k, AutoRound's seed 42 + k
SMOKE = {  # --smoke: the same code paths on tiny budgets (numbers meaningless)
    "gptq": dict(nsamples=4, seqlen=512),   # 2048 tokens: more than the 1536 inputs of w2, else H is singular
    "autoround": dict(nsamples=4, seqlen=64, iters=2, batch_size=2),
    "loftq": ["--loftq-iters", "1"],
    "apiq": ["--nsamples", "2", "--seqlen", "64", "--epochs", "1"],
    "apiq-lw": ["--nsamples", "2", "--seqlen", "64", "--epochs", "1"],
}
# --reference, the day's clock: this row re-timed. (Until 2026-12-07 a short job of its own, AutoRound
# 8 x 256 tokens x 10 iterations alone, ~4-6 min: its seconds moved by 25% between days while the rows'
# did not, so a row took its place; reference.json keeps those timings under "retired".)
REFERENCE = dict(row="autoround:iters=50,seqlen=256", bits=2)
ON_CLOCK = dict(load=2.5, reference=0.05)     # a row's mean load at most; its day's reference within 5%
# --rows best: per method and bits, the lowest tuning perplexity within each time budget (minutes at
# most the bound: a faster row competes in every budget above it), among rows with at most the
# paper's adapter share on top of a packed base (issue 35: AutoRound's bits + 0.4; a rank-8 adapter
# adds 0.37, rank 64's 2.94 does not fit)
BUDGETS = (20, 40)
BEST_BITS_OVER = 0.75
TORCH_PIN = "-c <(echo torch==2.13.0)"                  # keeps pip from touching the torch build
INSTALL = {  # method -> (module it imports, PyPI package, the command that installs it: requirements-bench.txt)
    "hqq": ("hqq", "hqq", f"pip install {TORCH_PIN} hqq==0.2.8.post1"),
    "gptq": ("gptqmodel", "gptqmodel", f"pip install {TORCH_PIN} pypcre==0.6.4 tokenicer==0.0.14 logbar==0.4.15 "
                                       f"device-smi==0.5.7 defuser==0.0.28 threadpoolctl==3.8.0 torchao==0.18.0 "
                                       f"&& pip install --no-deps gptqmodel==7.6.0"),
    "autoround": ("auto_round", "auto-round", f"pip install {TORCH_PIN} auto-round==0.16.1"),
}


# ----------------------------------------------------------------------------- rows

def value(text: str):
    """A setting's value as written: an int, a float, none, or the text."""
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_row(spec: str) -> dict:
    """"autoround:iters=50,seqlen=256" -> {name, method, settings}; settings are the peer's
    defaults with the given ones on top (ours: the given calibrate.py flags only)."""
    method, _, rest = spec.partition(":")
    if method not in METHODS:
        raise ValueError(f"row {spec!r}: unknown method {method!r}; known: {', '.join(METHODS)}")
    given = {}
    for part in filter(None, rest.split(",")):
        k, eq, v = part.partition("=")
        given[k.strip()] = value(v.strip()) if eq else True
    if method in DEFAULTS:
        if unknown := set(given) - set(DEFAULTS[method]):
            raise ValueError(f"row {spec!r}: {method} has no setting {', '.join(sorted(unknown))}; "
                             f"its settings: {', '.join(DEFAULTS[method]) or 'none'}")
        settings = DEFAULTS[method] | given
        changed = {k: v for k, v in given.items() if DEFAULTS[method][k] != v}
    else:
        settings = changed = given
    name = method + "".join(f"-{k}" if v is True else f"-{k}{v}" for k, v in changed.items())
    return {"name": name, "method": method, "settings": settings}


def tuning_score(r: dict) -> float:
    """What --rows best minimises: a row's perplexity on the whole tuning set, the geometric mean of
    WikiText-2 validation's and the C4 part's (--c4-limit) where it has both, else WikiText-2
    validation's alone."""
    return math.sqrt(r["wikitext2_valid"] * r["c4_tuning"]) if r.get("c4_tuning") else r["wikitext2_valid"]


def tuned_rows(path: Path, bits: int, best: bool) -> list:
    """The test split's rows, chosen on the tuning set (--rows tuned / best): every row of the tuning
    JSON at `bits` that is on the clock, or only the best of each method in each budget (BUDGETS,
    BEST_BITS_OVER): the lowest tuning_score among its rows measured on both parts of the tuning set,
    or among all its rows where none is. Each row with its name and settings as tuned, so its model
    is reused."""
    try:
        rows = [r for r in json.loads(path.read_text())["rows"] if r["bits"] == bits and r["method"] != "fp"
                and r["on_clock"] and r.get("wikitext2_valid") is not None]
        for r in rows:
            r["minutes"], r["bits_per_weight"], r["settings"]                 # what the choice reads
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not the tuning rows of bench_peers.py --split tuning ({type(e).__name__}: {e})")
    if best:
        groups = {}                                                       # (method, budget) -> its rows
        for r in rows:
            if r["bits_per_weight"] > bits + BEST_BITS_OVER or r["minutes"] > BUDGETS[-1]:
                continue
            for budget in (b for b in BUDGETS if r["minutes"] <= b):      # a 12-min row competes at 20 and 40
                groups.setdefault((family(r["method"]), budget), []).append(r)
        chosen = [min([r for r in g if r.get("c4_tuning")] or g, key=tuning_score) for g in groups.values()]
        rows = list({r["method"]: r for r in chosen}.values())
    return [{"name": r["method"], "method": family(r["method"]), "settings": r["settings"]}
            for r in sorted(rows, key=order)]


def calibrate_flags(settings: dict) -> list:
    """{quick: True, rank: 8} -> ["--quick", "--rank", "8"]."""
    flags = []
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return flags


# ----------------------------------------------------------------------------- the clock

def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform
    return platform.processor() or platform.machine()


def cpu_detail() -> str:
    """What the model name leaves out and the rows' minutes depend on: the CPU's family and model
    numbers, and whether it has bf16 instructions (AutoRound's CPU default computes the block in
    bf16; ApiQ in fp32)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {}
    for line in info.splitlines():
        k, _, v = line.partition(":")
        fields.setdefault(k.strip(), v.strip())                  # the first CPU's
    bf16 = "avx512_bf16" if "avx512_bf16" in info else "amx_bf16" if "amx_bf16" in info else "no bf16"
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {bf16}"


class LoadMeter:
    """The 1-minute load average, sampled every `every` seconds while a row runs (mean and max)."""

    def __init__(self, every=5.0):
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self.stop.wait(self.every):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"load_mean": round(sum(s) / len(s), 2), "load_max": round(max(s), 2)}


def reference_path(a) -> Path:
    return a.json.parent / ("reference_smoke.json" if a.smoke else "reference.json")


def today() -> str:
    return datetime.date.today().isoformat()


def reference_days(a) -> list:
    return json.loads(reference_path(a).read_text())["days"] if reference_path(a).exists() else []


def boot() -> str:
    """This machine's boot (the kernel's boot id): a fresh machine on the same date is a new clock."""
    f = Path("/proc/sys/kernel/random/boot_id")
    return f.read_text().strip() if f.exists() else "unknown"


def day_clock(days, date, cpu, booted=None) -> dict:
    """A day's reference seconds on a CPU (the first that day on that machine's boot: entries and rows
    made before boots were recorded have none, and match each other) and their ratio to the first
    day's; None where that day's reference was not run."""
    mine = [d for d in days if d["date"] == date and d["cpu"] == cpu and d.get("boot") == booted]
    ref = mine[0]["seconds"] if mine else None
    first = days[0]["seconds"] if days else None
    return {"reference_seconds": ref, "reference_ratio": round(ref / first, 4) if ref and first else None}


def clock(a) -> dict:
    """What every row records of the machine: the CPU, the date, the boot, that day's reference (day_clock)."""
    return {"cpu": cpu_model(), "cpu_detail": cpu_detail(), "date": today(), "boot": boot(),
            **day_clock(reference_days(a), today(), cpu_model(), boot())}


def reclock(row, days) -> dict:
    """The row with its day's reference re-read from reference.json and on_clock again."""
    if row["method"] == "fp":
        return row
    m = row["machine"]
    row = row | {"machine": m | day_clock(days, m["date"], m["cpu"], m.get("boot"))}
    return row | {"on_clock": on_clock(row)}


def on_clock(row) -> bool:
    m = row["machine"]
    return (m.get("reference_ratio") is not None and abs(m["reference_ratio"] - 1) <= ON_CLOCK["reference"]
            and m["load_mean"] <= ON_CLOCK["load"])


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

# ----------------------------------------------------------------------------- the peers
# Each returns (dequantized weights {"layers.L.attention.wq": (out, in)}, notes, seconds to leave
# out of its minutes, the bits_per_weight.formula arguments of its packed form).

def quantize_hqq(fp_model, tok, bits, s, a):
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
    # its packed form: N-bit codes, an fp16 scale and a zero point (N bits rounded, else fp16) per group
    return (weights, f"hqq {hqq_version()}: half-quadratic solver, axis 1, {zero} zero point, no data", 0.0,
            dict(zero_bits=bits if params["round_zero"] else 16, g_idx=False))


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


def quantize_gptq(fp_model, tok, bits, s, a):
    """GPTQ through GPTQModel, the way its users run it: our model saved as a transformers
    directory (GPTQModel loads from one), quantized layer by layer on this repo's calibration
    windows, saved in the GPTQ format and loaded back with the torch kernel; then every
    TorchLinear's codes, dequantized. Its QuantizeConfig's defaults except the format's (asymmetric,
    group 64) and offload_to_disk=False (a memory setting: 135M parameters fit in memory).

    Why the save and reload: in gptqmodel 7.6.0 the model left in memory by quantize() with
    sym=False dequantizes one step too high in every group (qzeros are packed in the GPTQ v1
    format, zero - 1, and read back as they are), so its weights are not the quantized model
    that it saves; the reloaded model is (measured: the two differ by exactly one scale). The
    save and reload are left out of the minutes, as every row's saving is."""
    import torch

    import gptqmodel
    from data import calib_windows
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    tame_gptqmodel(gptqmodel, a.threads, a.out / "gptq-logs")
    windows = calib_windows(tok, s["nsamples"], s["seqlen"], seed=0)              # (n, T)
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows]
    cfg = QuantizeConfig(bits=bits, group_size=GROUP, sym=False, desc_act=bool(s["desc_act"]),
                         act_group_aware=bool(s["act_group_aware"]), damp_percent=s["damp"], device="cpu",
                         offload_to_disk=False)
    with tempfile.TemporaryDirectory(dir=a.out, prefix=".gptq-") as d:
        to_hf(fp_model).save_pretrained(f"{d}/fp")
        hf_tokenizer().save_pretrained(f"{d}/fp")
        qm = GPTQModel.load(f"{d}/fp", cfg, dtype=torch.float32)
        qm.quantize(calib, batch_size=1)
        t_save = time.time()
        qm.save(f"{d}/q")
        del qm
        # TorchLinear takes only fp16 / bf16; fp16 holds the saved scales exactly
        qm = GPTQModel.load(f"{d}/q", device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        excluded = time.time() - t_save
    weights = {}
    with torch.no_grad():
        for name, m in qm.model.named_modules():
            if not hasattr(m, "dequantize_weight"):
                continue
            # scale * (code - zero), computed by the kernel in fp16 (in, out); redone in fp32: the
            # small integer code - zero is recovered exactly by rounding, then times the fp32 scale
            sc = m.scales.float()[m.g_idx.long()]                        # (in, out) the scale of each weight
            k = torch.round(m.dequantize_weight().float() / sc)          # (in, out) code - zero
            w = (sc * k).T.contiguous()                                  # (out, in)
            ours, w = hf_to_ours(name, w, fp_model.args)
            if ours:
                weights[ours] = w
    order = "desc_act" if s["desc_act"] else "act_group_aware" if s["act_group_aware"] else "no reordering"
    return (weights, f"gptqmodel {gptqmodel.__version__}: {s['nsamples']} x {s['seqlen']} tokens, damp "
                     f"{s['damp']:g}, {order}", excluded, dict(g_idx=True))


def quantize_autoround(fp_model, tok, bits, s, a):
    """AutoRound on a transformers copy of our model, its defaults except the row's settings: the
    calibration windows are given as token tensors, batch by batch; after quantize() (no export)
    every linear's weight is its quantize-dequantize value, read back from the in-memory model."""
    import auto_round
    from auto_round import AutoRound

    from data import calib_windows
    seed = s.get("seed", 0)                                                      # rows tuned before it: 0
    windows = calib_windows(tok, s["nsamples"], s["seqlen"], seed=seed)          # (n, T), ApiQ-bw's for one seed
    hf = to_hf(fp_model)
    kw = dict(bits=bits, group_size=GROUP, sym=False, dataset=list(windows.split(s["batch_size"])),  # [(b, T), ...]
              nsamples=s["nsamples"], seqlen=s["seqlen"], iters=s["iters"], lr=s["lr"],
              batch_size=s["batch_size"], device_map="cpu", amp=bool(s["amp"]), seed=AUTOROUND_SEED + seed)
    if s["compile"] is not None:
        kw["enable_torch_compile"] = bool(s["compile"])
    ar = AutoRound(hf, tokenizer=hf_tokenizer(), **kw)
    model, _ = ar.quantize()
    amp = getattr(getattr(ar, "model_context", None), "amp", bool(s["amp"]))   # off where the CPU lacks bf16
    weights = {}
    for name, m in model.named_modules():
        if hasattr(m, "weight") and getattr(m, "in_features", None):
            ours, w = hf_to_ours(name, m.weight.detach().float(), fp_model.args)
            if ours:
                weights[ours] = w
    lr = s["lr"] or f"1/iters = {1 / s['iters']:g}"
    # its export (auto_gptq / auto_round format) packs as GPTQ: N-bit codes and zeros, fp16 scales
    return (weights, f"auto-round {auto_round.__version__}: {s['nsamples']} x {s['seqlen']} tokens, iters "
                     f"{s['iters']}, lr {lr}, batch {s['batch_size']}, amp {'bf16' if amp else 'off (fp32)'}"
                     f"{' (asked: bf16; this CPU lacks it)' if s['amp'] and not amp else ''}, "
                     f"torch.compile {'default' if s['compile'] is None else bool(s['compile'])}", 0.0, dict(g_idx=True))


QUANTIZE = {"hqq": quantize_hqq, "gptq": quantize_gptq, "autoround": quantize_autoround}


# ----------------------------------------------------------------------------- timed rows

def timed_peer(method, bits, settings, a):
    """(what QUANTIZE[method] returns, seconds, load) of one peer run, timed from a fresh load of
    the full-precision model to its weights in memory, less what the peer says to leave out."""
    from checkpoints import load
    with LoadMeter() as meter:
        t0 = time.time()
        fp_model, tok = load("smollm2-135m")                     # the clock starts with the load
        result = QUANTIZE[method](fp_model, tok, bits, settings, a)
        seconds = time.time() - t0 - result[2]
    return result, seconds, meter.summary()


def run_peer(row, bits, a):
    """(dequantized weights, seconds, notes, bits_per_weight arguments, machine) of a peer row:
    quantized here from a fresh load of the full-precision model, or read back from
    OUT/models/<row>-w<bits>.safetensors, which the first run writes with its minutes."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from cli import atomic_write
    f = a.out / "models" / f"{row['name']}-w{bits}{'-smoke' if a.smoke else ''}.safetensors"
    if f.exists():
        with safe_open(str(f), framework="pt") as g:
            meta = json.loads(g.metadata()["row"])
        print(f"  the weights from {f} ({meta['seconds'] / 60:.1f} min when made)", flush=True)
        return load_file(str(f)), meta["seconds"], meta["notes"], meta["packed"], meta["machine"]
    settings = row["settings"] | (SMOKE.get(row["method"], {}) if a.smoke else {})
    (weights, notes, _, packed), seconds, loadavg = timed_peer(row["method"], bits, settings, a)
    machine = clock(a) | loadavg | {"threads": a.threads}
    f.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in weights.items()}
    meta = {"seconds": seconds, "notes": notes, "packed": packed, "machine": machine}
    atomic_write(f, lambda tmp: save_file(tensors, tmp, metadata={"row": json.dumps(meta)}))
    return weights, seconds, notes, packed, machine


def run_ours(row, bits, a):
    """calibrate.py in a subprocess -> (model directory, seconds, notes, machine). Minutes are
    calibrate.py's load_seconds + calibration_seconds (saving excluded); a calibration interrupted
    and continued adds the wall time of every process instead (said in the notes). A finished
    directory is reused."""
    from cli import write_json
    d = a.out / "models" / f"{row['name']}-w{bits}{'-smoke' if a.smoke else ''}"
    flags = calibrate_flags(row["settings"]) + (SMOKE.get(row["method"], []) if a.smoke else [])
    args = ["--method", OURS[row["method"]], "--bits", str(bits), "--group-size", str(GROUP), *flags]
    record = d.parent / f"{d.name}.row.json"               # the processes that worked on it, their machine
    spent = json.loads(record.read_text()) if record.exists() else {"seconds": 0.0, "processes": 0, "args": args}
    if spent["args"] != args:
        raise ValueError(f"{d} was made by calibrate.py {' '.join(spent['args'])}, not {' '.join(args)}: "
                         f"remove it (and {record.name}) or choose another --out")
    if not (d / "apiq.json").exists():
        cmd = [sys.executable, "calibrate.py", *args, "--threads", str(a.threads), "--out", str(d)]
        log = d.parent / f"{d.name}.log"
        d.parent.mkdir(parents=True, exist_ok=True)
        print(f"  {' '.join(cmd[1:])}  (log: {log})", flush=True)
        t0 = time.time()
        with LoadMeter() as meter:
            try:
                with open(log, "a") as f:
                    r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            finally:
                spent |= {"seconds": spent["seconds"] + time.time() - t0, "processes": spent["processes"] + 1,
                          "machine": clock(a) | meter.summary() | {"threads": a.threads}}
                write_json(record, spent)
        if r.returncode:
            tail = log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
            raise RuntimeError(f"calibrate.py exited {r.returncode}: {tail[0]} (log: {log})")
    if "machine" not in spent:
        raise ValueError(f"{d}: made outside this benchmark (no {record.name}): its minutes are not on this clock")
    made = json.loads((d / "apiq.json").read_text())
    if spent["processes"] == 1:
        seconds, note = made.get("load_seconds", 0.0) + made["calibration_seconds"], ""
    else:
        seconds, note = spent["seconds"], f"{spent['processes']} calibrate.py processes: their wall time"
    return d, seconds, note, spent["machine"]


def evaluate_ppl(model, windows, label):
    """({dataset: perplexity or None}, notes): a non-finite loss (a broken 2-bit model) is
    recorded as None with a note, so that the row is not redone on every run."""
    from evaluate import perplexity
    ppl, notes = {}, []
    for ds, w in windows.items():
        try:
            ppl[ds] = round(perplexity(model, w, desc=f"{label} {ds}"), 4)
        except FloatingPointError as e:
            ppl[ds] = None
            notes.append(str(e))
    return ppl, notes


def task_items(n: int) -> dict:
    """{task: its first n items}: the five zero-shot tasks (tasks.TASKS), read once before any row."""
    from evaluate import task_part_items
    from tasks import TASKS
    return {name: task_part_items(name)[:n] for name in TASKS}


def evaluate_tasks(model, tok, items: dict, label: str) -> dict:
    """The zero-shot tasks scored as evaluate.py does (lm-eval's log-likelihood of each option):
    {zero_shot: {task: acc %}, zero_shot_mean, zero_shot_se}, the mean of the five accuracies and its
    standard error (each task binomial: sqrt(sum_t p_t (1 - p_t) / n_t) / 5)."""
    from evaluate import zero_shot
    acc, var = {}, 0.0
    for name, its in items.items():
        r = zero_shot(model, tok, name, its)
        acc[name] = round(100 * r["acc"], 2)
        var += r["acc"] * (1 - r["acc"]) / r["n"]
    print(f"  {label}: zero-shot " + ", ".join(f"{t} {v}" for t, v in acc.items()), flush=True)
    return {"zero_shot": acc, "zero_shot_mean": round(sum(acc.values()) / len(acc), 2),
            "zero_shot_se": round(100 * var ** 0.5 / len(acc), 2)}


def eval_windows(a, tok) -> dict:
    """{dataset: windows (n, 2048)} of the split: the tuning set reads WikiText-2 validation only."""
    from data import TUNING, TUNING_C4, ppl_windows
    if a.split == "tuning":
        w = {"wikitext2_valid": ppl_windows(TUNING, tok, SEQLEN)[:a.limit or None]}
        if a.c4_limit:                               # C4 documents that no test window touches
            w["c4_tuning"] = ppl_windows(TUNING_C4, tok, SEQLEN)[:a.c4_limit]
        return w
    w = {"wikitext2": ppl_windows("wikitext2", tok, SEQLEN)[:a.limit or None]}
    if a.c4_limit:
        w["c4"] = ppl_windows("c4", tok, SEQLEN)[:a.c4_limit]
    return w


# ----------------------------------------------------------------------------- the table

def family(method: str) -> str:
    """A row's method family (as plots/common.py's): apiq-quick -> apiq, autoround-iters50 ->
    autoround; ApiQ-lw is its own."""
    return "apiq-lw" if method.startswith("apiq-lw") else method.split("-")[0]


def order(r):
    """Rows as the table lists them: fp first, then by bits, methods as in METHODS, then minutes."""
    base = family(r["method"])
    return (0 if base == "fp" else r["bits"], METHODS.index(base) if base in METHODS else len(METHODS),
            r["minutes"], r["method"])


def table(rows, datasets) -> str:
    def num(x, fmt):
        return "" if x is None else format(x, fmt)
    lines = ["| row | bits | bits/weight | minutes | " + " | ".join(datasets) + " | clock | notes |",
             "|---|---|---|---|" + "---|" * len(datasets) + "---|---|"]
    for r in rows:
        bits = "fp32" if r["method"] == "fp" else r["bits"]
        clk = "" if r["method"] == "fp" else ("yes" if r["on_clock"] else "no")
        lines.append(f"| {r['method']} | {bits} | {num(r.get('bits_per_weight'), '.3f')} | {num(r['minutes'], '.2f')} | "
                     + " | ".join(num(r.get(d), ".2f") for d in datasets) + f" | {clk} | {r['notes']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run

def reference(a):
    """Re-time the reference row (REFERENCE, not evaluated) and add it to reference.json: the day's clock."""
    from cli import write_json
    row = parse_row(REFERENCE["row"])
    s = row["settings"] | (SMOKE[row["method"]] if a.smoke else {})
    _, seconds, loadavg = timed_peer(row["method"], REFERENCE["bits"], s, a)
    path = reference_path(a)
    saved = json.loads(path.read_text()) if path.exists() else {}
    days = saved.get("days", []) + [{"date": today(), "cpu": cpu_model(), "cpu_detail": cpu_detail(), "boot": boot(),
                                     "seconds": round(seconds, 2),
                                     "threads": a.threads, **loadavg}]
    write_json(path, saved | {"job": f"the row {row['name']} at {REFERENCE['bits']} bits ({REFERENCE['row']}), timed as "
                                     f"the rows are, from loading the model; not evaluated", "days": days})
    first = days[0]["seconds"]
    print(f"reference: {seconds:.1f} s ({seconds / first:.3f} x the first day's {first:.1f} s), load "
          f"{loadavg['load_mean']}; {path}")


def main(a):
    import torch

    from bits_per_weight import formula
    from checkpoints import load
    from cli import check_writable, write_json
    from lora import quant_linears
    from qmodel import load as load_quantized
    torch.set_num_threads(a.threads)
    check_writable(a.out)
    if a.reference:
        return reference(a)
    saved = json.loads(a.json.read_text()) if a.json.exists() else {}
    days = reference_days(a)
    rows = {(r["method"], r["bits"]): reclock(r, days) for r in saved.get("rows", [])}
    if a.reclock:
        write_json(a.json, saved | {"rows": sorted(rows.values(), key=order)})
        return print(f"{a.json}: {sum(r['on_clock'] for r in rows.values())} of {len(rows)} rows on the clock")
    same = dict(split=a.split, limit=a.limit, c4_limit=a.c4_limit, tasks=a.tasks)
    if a.split == "test" and not a.smoke:
        print("the test split: run it only for rows whose every choice was made on the tuning set")

    def done(key):
        r = rows.get(key)
        return r is not None and all(r.get(k, 0 if k == "tasks" else None) == v   # rows before --tasks: 0
                                     for k, v in same.items())

    skipped = set()
    plan = {bits: a.rows if a.rows not in ("tuned", "best") else     # {bits: [row, ...]}
            [parse_row("fp"), *tuned_rows(a.tuning, bits, best=a.rows == "best")] for bits in a.bits}
    for r in [r for rows_of in plan.values() for r in rows_of]:
        m = r["method"]
        if m in INSTALL and m not in skipped and importlib.util.find_spec(INSTALL[m][0]) is None:
            print(f"skip {m}: the package {INSTALL[m][1]} is not installed; to install it: {INSTALL[m][2]}")
            skipped.add(m)
    fp_model, tok = load("smollm2-135m")                     # fp32, evaluation mode: the evaluation's copy
    shapes = [tuple(m.weight.shape) for b in fp_model.layers for m in b.modules() if isinstance(m, torch.nn.Linear)]
    windows = eval_windows(a, tok)
    items = task_items(a.tasks) if a.tasks else {}           # {task: items}, read once for every row
    datasets = list(windows)
    print(f"split {a.split}: " + ", ".join(f"{d} {len(w)}" for d, w in windows.items()) +
          f" windows x {SEQLEN} tokens; threads {a.threads}; results {a.json}" + ("; SMOKE budgets" if a.smoke else ""))
    failed = []
    for bits in a.bits:
        for row in plan[bits]:
            if row["method"] in skipped:
                continue
            key = (row["name"], 32 if row["method"] == "fp" else bits)
            if done(key):
                continue
            print(f"{row['name']} w{key[1]}g{GROUP}", flush=True)
            try:
                rank, packed = 0, {}
                if row["method"] == "fp":
                    model, seconds, notes, machine = fp_model, 0.0, "reference", clock(a)
                elif row["method"] in OURS:                  # ours: calibrate.py, then qmodel.load
                    d, seconds, notes, machine = run_ours(row, bits, a)
                    model, _ = load_quantized(d)
                    rank = max((m.rank for _, m in quant_linears(model)), default=0)
                    notes = "; ".join(filter(None, ["calibrate.py " + " ".join(calibrate_flags(row["settings"])), notes]))
                else:                                        # a peer: dequantized weights into our model
                    weights, seconds, notes, packed, machine = run_peer(row, bits, a)
                    model = with_linears(fp_model, weights, bits)
                    del weights
                ppl, problems = evaluate_ppl(model, windows, f"{row['name']} w{key[1]}")
                if a.tasks:
                    ppl |= evaluate_tasks(model, tok, items, f"{row['name']} w{key[1]}")
                bpw = {} if row["method"] == "fp" else formula(shapes, bits, GROUP, rank, a.adapter_bits, **packed)
                r = dict(method=key[0], bits=key[1], settings=row["settings"], minutes=round(seconds / 60, 3),
                         rank=rank, adapter_bits=a.adapter_bits if rank else None,
                         bits_per_weight=round(bpw["bits_per_weight"], 4) if bpw else None,
                         base_bits_per_weight=round(bpw["base_bits_per_weight"], 4) if bpw else None,
                         **ppl, notes="; ".join([notes, *problems]), machine=machine, **same,
                         windows={d: len(w) for d, w in windows.items()})
                r["on_clock"] = row["method"] == "fp" or on_clock(r)
                if a.json.exists():                          # rows another run (a second lane) saved meanwhile
                    rows.update({(x["method"], x["bits"]): reclock(x, days)
                                 for x in json.loads(a.json.read_text()).get("rows", [])})
                rows[key] = r
                write_json(a.json, {"model": "smollm2-135m", "group_size": GROUP, "seqlen": SEQLEN,
                                    "protocol": "bench/bench_peers.py's docstring; docs/benchmarks.md#the-protocol",
                                    "rows": sorted(rows.values(), key=order)})
                print(f"  {key[0]} w{key[1]}: {seconds / 60:.2f} min, " +
                      ", ".join(f"{d} {ppl[d]}" for d in datasets) + f", {r['bits_per_weight']} bits/weight", flush=True)
                del model
            except KeyboardInterrupt:
                raise
            except Exception as e:                           # one failing row does not stop the rest
                if os.environ.get("APIQ_DEBUG"):
                    raise
                traceback.print_exc(limit=-3)
                print(f"error: {row['name']} w{bits}: {type(e).__name__}: {e}", flush=True)
                failed.append(f"{row['name']} w{bits}")
    shown = [r for r in sorted(rows.values(), key=order) if done((r["method"], r["bits"]))]
    print(f"\nSmolLM2-135M, asymmetric, group {GROUP}; perplexity on the {a.split} split (" +
          ", ".join(f"{d} {len(w)}" for d, w in windows.items()) + f" windows of {SEQLEN} tokens); "
          f"minutes on {a.threads} thread(s); clock: within {ON_CLOCK['reference']:.0%} of the first day's "
          f"reference and a mean load <= {ON_CLOCK['load']}\n")
    print(table(shown, datasets + (["zero_shot_mean", "zero_shot_se"] if a.tasks else [])))
    if skipped:
        print(f"\nskipped (not installed): {', '.join(sorted(skipped))}")
    if failed:
        print(f"\nfailed: {', '.join(failed)} (rerun the same command to retry them)")
        sys.exit(1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="fp hqq gptq autoround:iters=50",
                   help="space-separated rows (see above); with --split test also 'tuned' (every row of the "
                        "tuning JSON on the clock) or 'best' (the best of each method in each time budget)")
    p.add_argument("--tuning", default=str(ROOT / "bench" / "results" / "benchmark_tuning.json"),
                   help="the tuning rows that --rows tuned/best read (default bench/results/benchmark_tuning.json)")
    p.add_argument("--bits", default="2,3", help="comma-separated weight bits (default 2,3)")
    p.add_argument("--split", choices=("tuning", "test"), default="tuning",
                   help="tuning: WikiText-2 validation windows (every choice); test: WikiText-2 test and C4 (the table)")
    p.add_argument("--limit", type=int, default=20,
                   help="WikiText-2 windows of 2048 tokens (default 20; 0: every window, the full test set)")
    p.add_argument("--c4-limit", type=int, default=None,
                   help="C4 windows: of the test split (default --limit), of the tuning set's C4 part (data.TUNING_C4: "
                        "documents no test window touches; default 0: none); 0: none")
    p.add_argument("--tasks", type=int, default=0,
                   help="with --split test: also the five zero-shot tasks, the first N items of each (default 0: none)")
    p.add_argument("--adapter-bits", type=int, default=16, choices=(16, 32),
                   help="bits of each adapter weight as stored (export.py --adapter-dtype; default fp16)")
    p.add_argument("--reference", action="store_true", help="re-time the day's reference row (REFERENCE), then stop")
    p.add_argument("--reclock", action="store_true", help="re-read every row's day reference from reference.json "
                   "into --json (on_clock again), then stop")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in calibrate.py (default 1)")
    p.add_argument("--out", default=None, help="models directory (default out/bench; with --smoke out/bench-smoke)")
    p.add_argument("--json", default=None, help="results (default bench/results/benchmark_<split>.json, "
                                                "with --tasks benchmark_test_tasks.json; "
                                                "--smoke: OUT/benchmark_smoke.json)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets for every row: checks the code paths only")
    a = p.parse_args(argv)
    try:
        if a.rows.strip() in ("tuned", "best"):
            if a.split != "test":
                raise ValueError(f"--rows {a.rows.strip()}: the tuning set's rows on the test split; give --split test")
            a.rows, a.tuning = a.rows.strip(), Path(a.tuning).resolve()
            if not a.tuning.is_file():
                raise ValueError(f"--rows {a.rows} reads the tuning rows, and {a.tuning} is not a file: "
                                 "run --split tuning first")
        else:
            a.rows = [parse_row(r) for r in a.rows.split()]
        a.bits = [int(b) for b in a.bits.split(",") if b.strip()]
    except ValueError as e:
        p.error(str(e))
    if not a.rows:
        p.error("--rows: give at least one row")
    if not a.bits or any(not 2 <= b <= 8 for b in a.bits):
        p.error("--bits: comma-separated integers, each in 2..8")
    if a.tasks < 0 or (a.tasks and a.split != "test"):
        p.error("--tasks: a number of items >= 0, on the test split only (the tasks choose nothing)")
    a.c4_limit = (a.limit if a.split == "test" else 0) if a.c4_limit is None else a.c4_limit
    if a.limit < 0 or a.c4_limit < 0 or a.threads <= 0:
        p.error("--limit and --c4-limit must be >= 0 (--limit 0: every window), --threads positive")
    a.out = Path(a.out or ("out/bench-smoke" if a.smoke else "out/bench")).resolve()   # calibrate.py runs in ROOT
    a.json = Path(a.json).resolve() if a.json else (a.out / "benchmark_smoke.json" if a.smoke else
                                                    ROOT / "bench" / "results" /
                                                    f"benchmark_{a.split}{'_tasks' if a.tasks else ''}.json")
    return a


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
