"""Perplexity-evaluation throughput and load memory of SmolLM2-135M on this CPU.

    python bench/bench_ppl.py [--windows 6] [--seqlen 2048] [--threads N] [--no-bf16] [--json PATH]

1. Tokens/s of scoring WikiText-2 test windows (fp32, seqlen 2048): our llama.py through
   evaluate.window_nll against transformers' LlamaForCausalLM holding the SAME weights (our state
   dict renamed by checkpoints.HF_NAMES, q/k rows permuted back into HF's sliced-rotary layout) and
   used as its users do, `hf(x, labels=x).loss` under no_grad. Both must give the same NLL on a
   window (|diff| < 1e-4) before anything is timed. The implementations alternate window by
   window (A B A B ...), one warm-up window each is discarded, and the MEDIAN is reported, with
   the median of the per-window (paired) ratios, which a noisy machine disturbs less.
   Our bf16 model (load(dtype=bfloat16)) runs in the same rotation but is reported apart:
   it is not a like-for-like comparison, and its NLL difference from fp32 is shown.
2. Peak RSS (ru_maxrss) and wall time of load("smollm2-135m") in a fresh subprocess, against the
   model's fp32 parameter bytes.
The machine may be shared: the load average is printed before and after.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
from data import ppl_windows  # noqa: E402
from evaluate import window_nll  # noqa: E402

# ru_maxrss is KiB on Linux; "base" is the peak after imports, before load() (Python + torch)
LOAD_PROBE = f"""
import json, resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
import torch, checkpoints
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base, t = rss(), time.perf_counter()
model, tok = checkpoints.load("smollm2-135m")
secs = time.perf_counter() - t
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
print(json.dumps(dict(load_s=secs, peak_rss_mib=rss(), base_rss_mib=base, param_mib=nbytes / 2 ** 20)))
"""


def load_probe() -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def hf_twin(model, attn=None):
    """transformers' LlamaForCausalLM with our model's weights (no second read of the GGUF)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    a = model.args
    cfg = LlamaConfig(hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
                      num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps,
                      rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len, vocab_size=a.vocab_size,
                      tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg)
    if attn:
        hf.set_attn_implementation(attn)
    ours, sd = model.state_dict(), {}
    for hf_key, key in checkpoints.HF_NAMES.items():
        for i in range(a.n_layers) if "{}" in key else [0]:
            w = ours[key.format(i)]
            if key.endswith(("wq.weight", "wk.weight")):  # Meta adjacent-pair RoPE rows -> HF half-split rows
                heads = a.n_heads if key.endswith("wq.weight") else a.n_kv_heads
                rows, cols = w.shape
                w = w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
            sd[hf_key.format(i)] = w
    hf.load_state_dict(sd, strict=True)
    return hf.eval().requires_grad_(False)


def hf_nll(hf, x):
    with torch.no_grad():
        return hf(x, labels=x).loss.reshape(1)   # mean next-token NLL, as window_nll gives per row


def main(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    probe = load_probe()
    model, tok = checkpoints.load("smollm2-135m")
    windows = ppl_windows("wikitext2", tok, a.seqlen)[: a.windows + 1]
    if len(windows) < a.windows + 1:
        raise ValueError(f"only {len(windows)} WikiText-2 windows of {a.seqlen} tokens")
    runners = {"ours fp32": (lambda x: window_nll(model, x))}
    hf = hf_twin(model)
    default_attn = hf.config._attn_implementation
    runners[f"transformers fp32 ({default_attn})"] = lambda x: hf_nll(hf, x)
    if default_attn != "sdpa":
        hf_sdpa = hf_twin(model, "sdpa")
        runners["transformers fp32 (sdpa)"] = lambda x: hf_nll(hf_sdpa, x)
    nlls0 = {name: run(windows[:1]).item() for name, run in runners.items()}
    for name, v in nlls0.items():
        assert abs(v - nlls0["ours fp32"]) < 1e-4, f"{name} NLL {v:.6f} != ours {nlls0['ours fp32']:.6f}"
    if not a.no_bf16:
        model_bf16, _ = checkpoints.load("smollm2-135m", dtype=torch.bfloat16)
        runners["ours bf16 (separate)"] = lambda x: window_nll(model_bf16, x)

    secs, nll = {name: [] for name in runners}, {name: [] for name in runners}
    for i in range(a.windows + 1):             # window 0 is every implementation's warm-up
        for name, run in runners.items():
            t = time.perf_counter()
            v = run(windows[i:i + 1]).item()
            if i:
                secs[name].append(time.perf_counter() - t)
                nll[name].append(v)
    load_after = os.getloadavg()

    res = {"seqlen": a.seqlen, "windows": a.windows, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "loadavg_before": load_before, "loadavg_after": load_after, "nll_window0": nlls0,
           "load": probe, "impl": {}}
    for name in runners:
        med = statistics.median(secs[name])
        res["impl"][name] = {"s_per_window": med, "tokens_per_s": a.seqlen / med,
                             "mean_nll": statistics.fmean(nll[name]), "all_s": secs[name]}
    theirs = f"transformers fp32 ({default_attn})"
    res["ratio_ours_over_theirs"] = res["impl"][theirs]["s_per_window"] / res["impl"]["ours fp32"]["s_per_window"]
    res["ratio_paired_median"] = statistics.median(b / o for b, o in zip(secs[theirs], secs["ours fp32"]))
    if not a.no_bf16:
        d = [b - f for b, f in zip(nll["ours bf16 (separate)"], nll["ours fp32"])]
        res["bf16_nll_diff"] = {"mean": statistics.fmean(d), "max_abs": max(map(abs, d))}

    import transformers
    print(f"\nSmolLM2-135M, WikiText-2 test, seqlen {a.seqlen}, median of {a.windows} windows "
          f"(+1 warm-up), torch {torch.__version__} / transformers {transformers.__version__}, "
          f"{res['threads']} threads, loadavg {load_before[0]:.2f} -> {load_after[0]:.2f}\n")
    print("| implementation | s/window | tokens/s | mean NLL |\n|---|---:|---:|---:|")
    for name, r in res["impl"].items():
        print(f"| {name} | {r['s_per_window']:.2f} | {r['tokens_per_s']:.0f} | {r['mean_nll']:.4f} |")
    print(f"\nfp32 throughput ours/transformers: {res['ratio_ours_over_theirs']:.2f}x (ratio of medians), "
          f"{res['ratio_paired_median']:.2f}x (median of paired windows); window-0 NLL: "
          + ", ".join(f"{k} {v:.6f}" for k, v in nlls0.items()))
    if not a.no_bf16:
        print(f"bf16 (not like-for-like): NLL bf16 - fp32 mean {res['bf16_nll_diff']['mean']:+.4f}, "
              f"max |diff| {res['bf16_nll_diff']['max_abs']:.4f} on the measured windows")
    peak, base, param = probe["peak_rss_mib"], probe["base_rss_mib"], probe["param_mib"]
    print(f"\n| load('smollm2-135m'), fresh process | value |\n|---|---:|\n| load time | {probe['load_s']:.2f} s |\n"
          f"| peak RSS (ru_maxrss) | {peak:.0f} MiB |\n| RSS after imports, before load | {base:.0f} MiB |\n"
          f"| fp32 parameter bytes | {param:.0f} MiB |\n| peak RSS / parameter bytes | {peak / param:.2f}x |\n"
          f"| (peak - imports) / parameter bytes | {(peak - base) / param:.2f}x |")
    if a.json:
        from cli import write_json
        write_json(a.json, res)
        print(f"wrote {a.json}")
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=6, help="timed windows per implementation (+1 warm-up)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-bf16", action="store_true", help="skip the separate bf16 figure")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    main(p.parse_args())
