"""ApiQ-bw calibration on this CPU: step throughput, model-FLOP utilisation (MFU) and memory of a
real SmolLM2-135M block, and the host memory of calibrating a Llama-2-7B-shaped checkpoint.

    python bench/bench_calibrate.py [--seqlens 256 1024 2048] [--rounds 3] [--steps 3] [--threads 1 2]
                                    [--synthetic-dir out/bench-7b-synthetic] [--blocks-7b 1] [--keep] [--skip-7b] [--json PATH]

1. Step time of calibrate.calibrate_block (ApiQ-bw, 2 bits, g64, r=64, aug-loss on, batch 1, one
   real WikiText-2 window) on block 0 and a deep block: calibrate.train is wrapped so that a step
   runs from one loss_fn call to the next (forward, backward, AdamW). Each call runs --steps steps,
   the first (optimizer state allocation) dropped. Rounds interleave, per thread count, a plain fp32
   torch.matmul of the block's shape (T x 576 @ 576 x 1536) and a 2048^3 one with the steps; all
   figures are medians. On a shared machine 2 OpenMP threads lose much more than 1 does: compare.
   Model FLOPs per step = 6 N T (N = the 7 linears' weights; forward 2NT, backward 4NT, both really
   run: the weight gradient feeds gamma/beta) + 12 T^2 dim for attention (QK^T and AV, 2 T^2 dim
   each forward, x3 with backward; the full T^2 as PaLM counts; "causal" counts half, 6 T^2 dim,
   what SDPA's CPU flash kernel computes). LoRA and fake-quant work is overhead, not model FLOPs.
   MFU = model FLOPs / step time / the block-shaped matmul's FLOP/s (2048^3 shown beside it).
   One step at the shortest and the longest seqlen is profiled (torch.profiler, self time).
2. Memory of one calibrate_block call (2 steps) in a fresh subprocess: VmHWM (ru_maxrss's counter)
   after, minus the RSS before (after a warm-up call that touches the kernels' code pages; the high-water mark reset
   via /proc/self/clear_refs; glibc's mmap threshold pinned at 64 KiB so that freed memory is not
   reused unseen); and calibrate.py's own per-block `peak_gib` (--nsamples 1 --epochs 2 --stop-after 1).
3. A random fp16 checkpoint with Llama-2-7B's shapes in Meta's format, then `calibrate.py --ckpt DIR
   --nsamples 1 --seqlen 256 --epochs 1 --stop-after 1`: its exact peak RSS (os.wait4) against the
   fp16 weight bytes, and its peak anonymous / file-backed RSS (sampled every 0.1 s).
The machine may be shared: the load average is printed.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, threading, time  # noqa: E401
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import calibrate  # noqa: E402
from checkpoints import load  # noqa: E402
from llama import LINEARS, ModelArgs, Transformer  # noqa: E402

GIB = 2 ** 30
LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
CALIB = dict(bits=2, group_size=64, rank=64, method="bw")  # the rest: calibrate.Config's (the paper's) defaults


def table(head, rows):
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows))


def matmul_flops(m, k, n, min_s=0.05):
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    reps, t = 0, time.perf_counter()
    while (dt := time.perf_counter() - t) < min_s or reps < 2:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / dt


def calib_steps(l, fp, X, Y, freqs, steps, hook=lambda k: None):
    """Seconds of each training step of calibrate_block (one loss_fn call to the next)."""
    stamps, orig = [], calibrate.train

    def timed(linears, objective, *rest):
        def fn(i):
            hook(len(stamps))
            stamps.append(time.perf_counter())
            return objective(i)
        ok = orig(linears, fn, *rest)
        hook(len(stamps))
        stamps.append(time.perf_counter())
        return ok
    calibrate.train = timed
    try:  # X^q = X and Y2 = Y, as calibrate.main has them for block 0
        calibrate.calibrate_block(l, fp, calibrate.Acts(X, X, Y, Y), freqs, calibrate.make_config(**CALIB, epochs=steps))
    finally:
        calibrate.train = orig
    return [b - a for a, b in zip(stamps, stamps[1:])]


def block_inputs(model, tok, l, T, n=1):
    """Input X (n, T, dim) of block l (fp model, n real WikiText-2 windows) and its target Y = F(W, X)."""
    from data import calib_windows
    freqs = model.freqs_cis(T, "cpu")
    with torch.no_grad():
        X = model.tok_embeddings(calib_windows(tok, n, T, 0))
        for layer in model.layers[:l]:
            X = layer(X, freqs)
    return X, calibrate.run_block(model.layers[l], X, freqs, "cpu"), freqs


def category(ev, T):
    names, p = [], ev
    while p is not None:
        names.append(p.name.lower().replace("_", ""))
        p = p.cpu_parent
    dims = {d for s in ev.input_shapes or [] if isinstance(s, list) for d in s if isinstance(d, int)}
    if any(n.startswith("optimizer.") for n in names):
        return "optimizer (AdamW step, zero_grad)"
    if any("scaleddotproduct" in n for n in names):
        return "attention (SDPA fwd+bwd)"
    if ev.name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "LoRA GEMMs (rank 64)" if CALIB["rank"] in dims else "base GEMMs x Q(W)^T (fwd+bwd)"
    if T in dims:  # (so T must not be 64, the rank and the group size)
        return "activation elementwise (norms, RoPE, SwiGLU, residual, loss)"
    return "fake-quant Q(W) on weights (fwd+bwd)" if dims else "other (scalars, .item())"


def profile_step(l, fp, X, Y, freqs, T):
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    secs = calib_steps(l, fp, X, Y, freqs, 2, lambda k: prof.start() if k == 1 else prof.stop() if k == 2 else 0)[1]
    cats = {}
    for ev in prof.events():
        cats[category(ev, T)] = cats.get(category(ev, T), 0) + ev.self_cpu_time_total
    total = sum(cats.values())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return secs, {c: s / total for c, s in sorted(cats.items(), key=lambda x: -x[1])}, \
        [(e.key, e.count, e.self_cpu_time_total / total) for e in top]


def status_kib(key, pid="self"):
    return int(next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith(key + ":")).split()[1])


def mem_probe(T, threads):
    """(subprocess) RSS growth of one calibrate_block call (2 steps) on block 0 at seqlen T."""
    torch.set_num_threads(threads)
    model, tok = load("smollm2-135m")
    X, Y, freqs = block_inputs(model, tok, 0, T)
    calib_steps(0, model.layers[0], X, Y, freqs, 2)  # warm-up: the code pages of these kernels, thread pools
    rss, anon, done = status_kib("VmRSS"), [status_kib("RssAnon")] * 2, threading.Event()

    def poll():  # this VM pages out cold file pages (DAMON), so refaulted code inflates RSS: watch anon too
        while not done.wait(0.005):
            anon[1] = max(anon[1], status_kib("RssAnon"))
    threading.Thread(target=poll, daemon=True).start()
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
    calib_steps(0, model.layers[0], X, Y, freqs, 2)
    done.set()
    # VmHWM is ru_maxrss's counter, but ru_maxrss also keeps the peak seen when any thread exited
    print(json.dumps({"growth_mib": (status_kib("VmHWM") - rss) / 1024,
                      "anon_growth_mib": (anon[1] - anon[0]) / 1024}))


def run_calibrate(ckpt, T, epochs, threads, blocks=1):
    """calibrate.py --stop-after BLOCKS in a subprocess: exact peak RSS (wait4), sampled anon/file peaks."""
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/log", "w+") as log:
        cmd = [sys.executable, "calibrate.py", "--ckpt", str(ckpt), "--nsamples", "1", "--seqlen", str(T),
               "--epochs", str(epochs), "--stop-after", str(blocks), "--threads", str(threads), "--out", f"{tmp}/out"]
        t0, peak = time.time(), {"RssAnon": 0, "RssFile": 0}
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while not (w := os.wait4(p.pid, os.WNOHANG))[0]:
            try:
                peak = {k: max(v, status_kib(k, p.pid) * 1024) for k, v in peak.items()}
            except (OSError, StopIteration):
                pass
            time.sleep(0.1)
        if code := os.waitstatus_to_exitcode(w[1]):
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{log.read()[-3000:]}")
        done = json.loads(Path(f"{tmp}/out/progress.json").read_text())["blocks"]
        return dict(peak_rss_gib=w[2].ru_maxrss / 2**20, anon_gib=peak["RssAnon"] / GIB, file_gib=peak["RssFile"] / GIB,
                    wall_s=time.time() - t0, peak_gib_log=done[-1]["peak_gib"],
                    block_s=[b["seconds"] for b in done], peak_gib_blocks=[b["peak_gib"] for b in done])


def write_synthetic(d: Path):
    """(subprocess) Llama-2-7B-shaped random fp16 weights in Meta's format; RAM: the state dict only."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs(**LLAMA2_7B | {"vocab_size": 32000})).state_dict().items()}
    g, sd = torch.Generator().manual_seed(0), {}
    for k, shape in shapes.items():  # in place, tensor by tensor: no fp32 temporaries
        t = torch.empty(shape, dtype=torch.float16)
        sd[k] = t.fill_(1.0) if k.endswith("norm.weight") else t.uniform_(-0.035, 0.035, generator=g)  # std 0.02
    torch.save(sd, d / ".consolidated.00.pth.tmp")
    (d / ".consolidated.00.pth.tmp").replace(d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(LLAMA2_7B))  # Llama-2's own: vocab -1, the tokenizer decides


def synthetic_7b(a, threads):
    d = Path(a.synthetic_dir)
    try:
        if not (d / "params.json").exists() or json.loads((d / "params.json").read_text()) != LLAMA2_7B:
            d.mkdir(parents=True, exist_ok=True)
            if (free := shutil.disk_usage(d).free) < 30e9:
                sys.exit(f"error: {d}: {free / 1e9:.1f} GB free; the 13.5 GB 7B-shaped checkpoint wants 30 GB free")
            t = time.time()
            subprocess.run([sys.executable, __file__, "--write-synthetic", str(d)], check=True)
            print(f"\nwrote {d} in {time.time() - t:.0f} s")
        if not (d / "tokenizer.model").exists():
            data = Path(os.environ.get("APIQ_DATA_DIR") or ROOT.parent / "shared" / "data")
            (d / "tokenizer.model").symlink_to(data / "tokenizers" / "llama2" / "tokenizer.model")
        return run_calibrate(d, 256, 1, threads, a.blocks_7b) | {"weights_gib": (d / "consolidated.00.pth").stat().st_size / GIB}
    finally:
        if not a.keep:  # only what this script writes there
            for f in ("consolidated.00.pth", ".consolidated.00.pth.tmp", "params.json", "tokenizer.model"):
                (d / f).unlink(missing_ok=True)
            if d.exists() and not any(d.iterdir()):
                d.rmdir()


def main(a):
    sub = max(a.threads)  # the threads of the subprocesses (parts 2 and 3)
    print(f"torch {torch.__version__}, threads {a.threads}, loadavg at start {os.getloadavg()}")
    model, tok = load("smollm2-135m")
    dim, hidden, blocks = model.args.dim, model.args.hidden_dim, (0, 2 * model.args.n_layers // 3)
    N = sum(m.weight.numel() for n, m in model.layers[0].named_modules() if n in LINEARS)
    cases = {(l, T): block_inputs(model, tok, l, T) for T in a.seqlens for l in blocks}
    steps, mm, sq = {(th, *c): [] for th in a.threads for c in cases}, {}, {}
    for _ in range(a.rounds):  # interleaved: per thread count the matmul peaks, then each case's steps
        for th in a.threads:
            torch.set_num_threads(th)
            sq.setdefault(th, []).append(matmul_flops(2048, 2048, 2048))
            for (l, T), (X, Y, freqs) in cases.items():
                mm.setdefault((th, T), []).append(matmul_flops(T, dim, hidden))
                steps[th, l, T] += calib_steps(l, model.layers[l], X, Y, freqs, a.steps)[1:]
    rows = []
    print(f"\nblock linears N = {N / 1e6:.3f} M; loadavg after the step timings {os.getloadavg()}")
    for (th, l, T), ts in steps.items():
        s, peak, sqp = statistics.median(ts), statistics.median(mm[th, T]), statistics.median(sq[th])
        lin, att = 6 * N * T, 12 * T * T * dim
        rows.append(dict(threads=th, block=l, seqlen=T, step_s=s, n=len(ts), tok_per_s=T / s, model_gflop=(lin + att) / 1e9,
                         attn_share=att / (lin + att), gflops=(lin + att) / s / 1e9, peak_block=peak / 1e9,
                         peak_square=sqp / 1e9, mfu=(lin + att) / s / peak, mfu_causal=(lin + att / 2) / s / peak))
    table(["threads", "block", "seqlen", "s/step (median, n)", "tok x ep/s", "model GFLOP/step (attn)", "achieved GFLOP/s",
           "matmul Tx576@576x1536 GFLOP/s", "matmul 2048^3 GFLOP/s", "MFU", "MFU causal attn"],
          [(r["threads"], r["block"], r["seqlen"], f"{r['step_s']:.3f} ({r['n']})", f"{r['tok_per_s']:.0f}",
            f"{r['model_gflop']:.1f} ({r['attn_share']:.0%})", f"{r['gflops']:.1f}", f"{r['peak_block']:.1f}",
            f"{r['peak_square']:.1f}", f"{r['mfu']:.1%}", f"{r['mfu_causal']:.1%}") for r in rows])
    prof = {}
    for th in a.threads:
        torch.set_num_threads(th)
        for T in sorted({min(a.seqlens), max(a.seqlens)}):
            prof[f"{th}t T={T}"] = profile_step(0, model.layers[0], *cases[0, T], T)
    last = list(prof)[-1]
    table(["one step of block 0, self time"] + [f"{k} ({p[0]:.2f} s profiled)" for k, p in prof.items()],
          [[c] + [f"{p[1].get(c, 0):.1%}" for p in prof.values()] for c in prof[last][1]])
    for k in (list(prof)[len(prof) // len(a.threads) - 1], last) if len(a.threads) > 1 else (last,):
        table([f"top op, {k}", "calls", "self time share"], [(o, n, f"{f:.1%}") for o, n, f in prof[k][2]])
    mem = []
    for T in a.seqlens:
        out = subprocess.run([sys.executable, __file__, "--mem-probe", str(T), "--threads", str(sub)], check=True,
                             capture_output=True, text=True, env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
        mem.append({"seqlen": T} | json.loads(out.splitlines()[-1]) | run_calibrate("smollm2-135m", T, 2, sub))
    table(["seqlen", "calibrate_block (2 steps): VmHWM growth, MiB", "RssAnon growth (sampled), MiB",
           "calibrate.py log peak_gib (= ru_maxrss of the process)"],
          [(m["seqlen"], f"{m['growth_mib']:.0f}", f"{m['anon_growth_mib']:.0f}", f"{m['peak_gib_log']:.3f}") for m in mem])
    big = None if a.skip_7b else synthetic_7b(a, sub)
    if big:
        table([f"7B-shaped: calibrate.py, T=256, {a.blocks_7b} block(s)", "value"], [
            ("fp16 weights (consolidated.00.pth)", f"{big['weights_gib']:.2f} GiB"),
            ("peak RSS (wait4 ru_maxrss)", f"{big['peak_rss_gib']:.2f} GiB = {big['peak_rss_gib'] / big['weights_gib']:.2f}x"),
            ("peak RssAnon / RssFile (sampled)", f"{big['anon_gib']:.2f} / {big['file_gib']:.2f} GiB"),
            ("calibrate's log: peak_gib per block", ", ".join(f"{g:.2f}" for g in big["peak_gib_blocks"]) + " GiB"),
            ("calibrate's log: seconds per block", ", ".join(f"{t:.0f}" for t in big["block_s"]) + " s"),
            ("wall time (load, data, blocks)", f"{big['wall_s']:.0f} s")])
    print(f"\nloadavg at end {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(threads=a.threads, steps=rows, profile={k: p[1:] for k, p in prof.items()},
                                                memory=mem, big=big, loadavg_end=os.getloadavg()), indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the matmul peaks, then each case's steps)")
    p.add_argument("--steps", type=int, default=3, help="steps per calibrate_block call (the first is dropped)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch thread counts timed in turn (the subprocesses of parts 2 and 3 use the largest)")
    p.add_argument("--blocks-7b", type=int, default=1, help="part 3: calibrate.py --stop-after this")
    p.add_argument("--synthetic-dir", default=str(ROOT / "out" / "bench-7b-synthetic"))
    p.add_argument("--keep", action="store_true", help="keep the 13.5 GB synthetic checkpoint")
    p.add_argument("--skip-7b", action="store_true", help="skip part 3")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--mem-probe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-synthetic", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mem_probe:
        mem_probe(a.mem_probe, max(a.threads))
    elif a.write_synthetic:
        write_synthetic(Path(a.write_synthetic))
    else:
        main(a)
