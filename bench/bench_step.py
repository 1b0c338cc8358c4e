"""Tokens per second of one calibration step on the same SmolLM2-135M blocks: ApiQ-bw at a
calibrate.py recipe and AutoRound at its defaults, one thread each (issue 35's throughput target).

Each tool runs twice on the model cut to its first --blocks blocks, with a short and a long
number of steps a block, after an untimed run of the short one (torch.compile's kernels, caches in this
process); a step's seconds are the difference of the two wall times over the extra steps of all
blocks, so what does not grow with the steps (loading, caching the block inputs, freezing) cancels:

    seconds a step = (t_long - t_short) / ((steps_long - steps_short) x blocks)
    tokens a step  = windows a step x seqlen

ApiQ-bw: calibrate.calibrate_blocks with the recipe's flags (--apiq, as bench_peers.py writes a
row: "quick,rank=8,batch_size=4"), --epochs varied. AutoRound: auto_round.AutoRound on a transformers
copy (bench_peers.quantize_autoround, as a benchmark row), its defaults (batch 8 windows of 512 tokens a step, its CPU dtype and
torch.compile default), --iters varied. Same calibration windows (WikiText-2 train) for both.

    python bench/bench_step.py [--apiq quick,rank=8] [--blocks 2] [--threads 1] [--json bench/results/step_tokens.json]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def cut(model, blocks: int):
    """The model with only its first `blocks` blocks (in place)."""
    model.layers = model.layers[:blocks]
    model.args.n_layers = blocks
    return model


def apiq_seconds(settings: dict, epochs: int, blocks: int) -> tuple:
    """(wall seconds, steps a block, tokens a step) of calibrate_blocks over the first `blocks` blocks."""
    import calibrate
    from checkpoints import load
    from data import calib_windows
    cfg = calibrate.make_config(**(settings | {"epochs": epochs}))
    model, tok = load("smollm2-135m", device="cpu", dtype=None)
    cut(model, blocks)
    calibrate.round_kept_params(model)
    tokens = calib_windows(tok, cfg.nsamples, cfg.seqlen, cfg.seed)                 # (n, T)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        calibrate.calibrate_blocks(model, tokens, cfg, Path(out), [], None)
        seconds = time.perf_counter() - t0
    steps = epochs * -(-cfg.nsamples // cfg.batch_size)
    return seconds, steps, cfg.batch_size * cfg.seqlen


def autoround_seconds(iters: int, blocks: int) -> tuple:
    """(wall seconds, steps a block, tokens a step) of AutoRound at its defaults on the cut model,
    as a benchmark row runs it (bench_peers.quantize_autoround)."""
    from bench_peers import DEFAULTS, quantize_autoround
    from checkpoints import load
    s = DEFAULTS["autoround"] | {"iters": iters}
    model, tok = load("smollm2-135m", device="cpu", dtype=None)
    cut(model, blocks)
    t0 = time.perf_counter()
    quantize_autoround(model, tok, 2, s, None)
    return time.perf_counter() - t0, iters, s["batch_size"] * s["seqlen"]


def rate(short: tuple, long: tuple, blocks: int) -> dict:
    (t1, s1, tokens), (t2, s2, _) = short, long
    step = (t2 - t1) / ((s2 - s1) * blocks)
    return {"seconds_a_step": round(step, 4), "tokens_a_step": tokens, "tokens_per_second": round(tokens / step),
            "runs": [{"steps_a_block": s, "seconds": round(t, 2)} for t, s in ((t1, s1), (t2, s2))]}


def main(a):
    import torch
    torch.set_num_threads(a.threads)
    from bench_peers import cpu_model, parse_row
    row = parse_row("apiq:" + a.apiq)
    settings = dict(row["settings"]) | {"threads": a.threads}
    results = {}
    print(f"ApiQ-bw {a.apiq}: epochs {a.epochs[0]} and {a.epochs[1]} on {a.blocks} blocks", flush=True)
    apiq_seconds(settings, a.epochs[0], a.blocks)                                   # warm-up, untimed
    results["apiq"] = rate(*(apiq_seconds(settings, e, a.blocks) for e in a.epochs), a.blocks) | {"recipe": a.apiq}
    print(f"AutoRound defaults: iters {a.iters[0]} and {a.iters[1]} on {a.blocks} blocks", flush=True)
    autoround_seconds(a.iters[0], a.blocks)                                         # warm-up, untimed
    results["autoround"] = rate(*(autoround_seconds(i, a.blocks) for i in a.iters), a.blocks) | {"recipe": "defaults"}
    for name, r in results.items():
        print(f"{name:9s} {r['recipe']:24s} {r['tokens_a_step']:6d} tokens a step, {r['seconds_a_step']:.3f} s: "
              f"{r['tokens_per_second']} tokens/s")
    print(f"ratio ApiQ-bw / AutoRound: {results['apiq']['tokens_per_second'] / results['autoround']['tokens_per_second']:.2f}")
    if a.json:
        from cli import write_json
        write_json(a.json, {"blocks": a.blocks, "threads": a.threads, "cpu": cpu_model(),
                            "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"), **results})
        print(f"wrote {a.json}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--apiq", default="quick,rank=8", help="ApiQ-bw's recipe as a bench_peers.py row's settings")
    p.add_argument("--blocks", type=int, default=2, help="first blocks of SmolLM2 (default 2)")
    p.add_argument("--epochs", default="1,3", help="ApiQ-bw's two runs (default 1,3)")
    p.add_argument("--iters", default="10,30", help="AutoRound's two runs (default 10,30)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the figures here (e.g. bench/results/step_tokens.json)")
    a = p.parse_args()
    a.epochs = [int(x) for x in a.epochs.split(",")]
    a.iters = [int(x) for x in a.iters.split(",")]
    if len(a.epochs) != 2 or len(a.iters) != 2 or a.epochs[0] >= a.epochs[1] or a.iters[0] >= a.iters[1]:
        p.error("--epochs and --iters: two increasing numbers, e.g. 1,3")
    if a.blocks <= 0 or a.threads <= 0:
        p.error("--blocks and --threads must be positive")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from cli import run
    run(main, a)
