"""The figures' data (evaluate.py --errors) and the plot scripts, on the real pipeline: a tiny random
Llama is calibrated, quantized, saved and evaluated by the scripts themselves, then every plot
script draws from those results."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import load
from evaluate import activation_errors
from lora import weight_errors
from qmodel import quantize_model
from quant import rtn

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ["act_error", "weight_error", "adapters", "ppl_bits"]
SMALL = ["--group-size", "32", "--threads", "1"]


def sh(*cmd):
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def results(tiny_ckpt, tmp_path_factory):
    """A results directory as results.sh lays it out, made by calibrate.py and evaluate.py."""
    d = tmp_path_factory.mktemp("results")
    ev = ["--ppl", "wikitext2,c4", "--seqlen", "64", "--limit", "1", "--threads", "1"]
    cal = ["--ckpt", tiny_ckpt, "--rank", "8", *SMALL]
    sh("evaluate.py", "--ckpt", tiny_ckpt, *ev, "--json", d / "fp.json")
    sh("calibrate.py", *cal, "--out", d / "apiq-bw-w2", "--nsamples", "2", "--seqlen", "32", "--epochs", "1")
    sh("calibrate.py", *cal, "--method", "loftq", "--loftq-iters", "1", "--out", d / "loftq-w2")
    sh("calibrate.py", *cal, "--method", "qlora", "--out", d / "qlora-w2")
    sh("calibrate.py", *cal, "--method", "rtn", "--bits", "3", "--out", d / "rtn-w3")
    for name in ("apiq-bw-w2", "loftq-w2"):
        sh("evaluate.py", "--ckpt", d / name, *ev, "--errors", "--error-windows", "2", "--json", d / f"{name}.json")
    sh("evaluate.py", "--ckpt", d / "qlora-w2", *ev[2:], "--ppl", "", "--errors", "--json", d / "qlora-w2.json")
    sh("evaluate.py", "--ckpt", d / "rtn-w3", *ev, "--json", d / "rtn-w3.json")
    return d


@pytest.mark.parametrize("script", PLOTS)
def test_each_plot_script_writes_a_png(results, script, tmp_path):
    png = tmp_path / f"{script}.png"
    r = sh(f"plots/{script}.py", results, "--out", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, r.stdout
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("script", PLOTS)
def test_plot_without_results_is_one_line_error(script, tmp_path):
    r = subprocess.run([sys.executable, f"plots/{script}.py", str(tmp_path), "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_results_hold_what_the_figures_need(results, tiny_ckpt):
    import json
    r = json.loads((results / "apiq-bw-w2.json").read_text())["errors"]
    assert r["windows"] == 2 and r["reference"] == str(tiny_ckpt)   # the source named in apiq.json
    assert [x["block"] for x in r["activation"]] == [0, 1, 2, 3]
    assert len(r["weight"]) == 4 * 7                                   # every linear of every block
    q = json.loads((results / "qlora-w2.json").read_text())
    assert q["ppl"] == {} and len(q["errors"]["activation"]) == 4


def test_errors_against_independent_computations(tiny_ckpt, data_dir):
    """weight error of QLoRA is ||W - RTN(W)||_F (B = 0); the activation errors equal the block
    outputs that the models' own forward passes produce (captured by hooks)."""
    ref, _ = load(str(tiny_ckpt))
    model = quantize_model(copy.deepcopy(ref), "qlora", 2, 32, 8, 16.0)
    for row in weight_errors(model, ref):
        w = ref.get_submodule(row["layer"]).weight
        expect = torch.linalg.matrix_norm(w - rtn(w, 2, 32)).item()
        assert row["error"] == pytest.approx(expect, rel=1e-5)
        assert row["rel"] == pytest.approx(expect / torch.linalg.matrix_norm(w).item(), rel=1e-5)
    x = torch.randint(0, 32000, (2, 48), generator=torch.Generator().manual_seed(0))
    outs = {}
    for tag, m in (("fp", ref), ("q", model)):
        hooks = [layer.register_forward_hook(lambda mod, i, o, l=l, tag=tag: outs.__setitem__((tag, l), o))
                 for l, layer in enumerate(m.layers)]
        acts = []
        with torch.no_grad():
            for row in x:
                m(row[None])
                acts.append([outs[(tag, l)] for l in range(len(m.layers))])
        for h in hooks:
            h.remove()
        outs[tag] = acts
    got = activation_errors(model, ref, x)
    for l, row in enumerate(got):
        fp = torch.cat([a[l] for a in outs["fp"]])
        diff = torch.cat([a[l] for a in outs["q"]]) - fp
        assert row["mse"] == pytest.approx(diff.pow(2).mean().item(), rel=1e-4)
        assert row["rel"] == pytest.approx(diff.pow(2).sum().item() / fp.pow(2).sum().item(), rel=1e-4)
    assert got[0]["rel"] > 0
    assert all(r["mse"] == 0 for r in activation_errors(ref, ref, x[:1]))   # a model against itself


def test_saliency_study_table_and_figure(tiny_ckpt, tmp_path):
    """plots/saliency_study.py on study results made by calibrate.py + evaluate.py (plain x 2 seeds,
    the naive penalty x 1, tiny model): its mean +- std equal numpy's over the JSONs, and a PNG."""
    import json

    import numpy as np

    import calibrate
    import evaluate
    d = tmp_path / "study"
    runs = [("none", 0, {}), ("none", 1, {}), ("l2-r1", 0, dict(weight_penalty=1.0, sal_ratio=1.0))]
    for config, seed, pen in runs:
        name = f"{config}-w2-s{seed}"
        calibrate.main(calibrate.make_config(ckpt=str(tiny_ckpt), rank=8, group_size=32, threads=1, nsamples=2,
                                             seqlen=32, epochs=1, seed=seed, out=str(d / name), **pen))
        evaluate.main(evaluate.Config(ckpt=str(d / name), ppl="wikitext2,c4", seqlen=64, limit=1, threads=1,
                                      json=str(d / f"{name}.json")))
        evaluate.main(evaluate.Config(ckpt=str(d / name), ppl="", tasks="piqa,arc_easy", task_limit=6, threads=1,
                                      batch_size=8, json=str(d / f"{name}-zs.json")))   # as results.sh
    png = tmp_path / "study.png"
    out = sh("plots/saliency_study.py", d, "--out", png).stdout
    ppl = [json.loads((d / f"none-w2-s{s}.json").read_text())["ppl"] for s in (0, 1)]
    c4, gap = np.array([p["c4"] for p in ppl]), np.array([p["c4"] - p["wikitext2"] for p in ppl])
    row = next(ln for ln in out.splitlines() if ln.startswith("| 2 | none | 2 |"))
    assert f"{c4.mean():.2f} +- {c4.std(ddof=1):.2f}" in row and f"{gap.mean():.2f} +- {gap.std(ddof=1):.2f}" in row
    one = json.loads((d / "l2-r1-w2-s0.json").read_text())["ppl"]
    assert f"| 2 | l2-r1 | 1 | {one['wikitext2']:.2f} | {one['c4']:.2f} |" in out        # one seed: no +-
    vs = 100 * (one["c4"] / ppl[0]["c4"] - 1)                                              # paired with none's seed 0
    assert f"| {one['c4'] - one['wikitext2']:.2f} | {vs:.1f} |" in out
    zs = {f"{c}-{s}": json.loads((d / f"{c}-w2-s{s}-zs.json").read_text()) for c, s, _ in runs}
    acc = np.array([100 * zs[f"none-{s}"]["zeroshot_avg"] for s in (0, 1)])
    assert f"| {acc.mean():.1f} +- {acc.std(ddof=1):.1f} (6) | - |" in row                  # items per task shown
    dacc = 100 * (zs["l2-r1-0"]["zeroshot_avg"] - zs["none-0"]["zeroshot_avg"])          # points, paired
    assert f"| {100 * zs['l2-r1-0']['zeroshot_avg']:.1f} (6) | {dacc:.1f} |" in out
    se = [100 * np.sqrt(sum(t["acc"] * (1 - t["acc"]) / t["n"] for t in z["zeroshot"].values())) / 2 for z in zs.values()]
    assert f"{np.mean(se):.2f} points on average" in out                                 # binomial, 2 tasks
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the per-run CSV beside the PNG gives back the same table without the JSONs, and merges
    (d / "l2-r1-w2-s0.json").unlink()
    again = sh("plots/saliency_study.py", d, "--merge", tmp_path / "study.csv", "--out", tmp_path / "again.png").stdout
    table = lambda text: [ln for ln in text.splitlines() if ln.startswith("|") or "standard error" in ln]  # noqa: E731
    assert table(again) == table(out) and len(table(out)) == 5
    only = sh("plots/saliency_study.py", tmp_path / "again.csv", "--bits", "2", "--out", tmp_path / "3.png").stdout
    assert table(only) == table(out)


def test_ppl_bits_from_bench_peers_rows(tmp_path):
    """plots/ppl_bits.py on a bench_peers.py results directory: one line per row name, full
    precision from the fp row, the window counts of the rows in the title."""
    import json
    rows = [dict(method="fp", bits=32, minutes=0.0, wikitext2=20.4, c4=None, limit=40, c4_limit=0)]
    rows += [dict(method=m, bits=b, minutes=1.0, wikitext2=p * 100 ** (3 - b), c4=None, limit=40, c4_limit=0)
             for m, p in (("rtn", 60.0), ("apiq-quick", 27.0), ("autoround", 28.0)) for b in (2, 3)]
    (tmp_path / "peers.json").write_text(json.dumps({"rows": rows}))
    png = tmp_path / "ppl_bits.png"
    r = sh("plots/ppl_bits.py", tmp_path, "--out", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in r.stdout
    (tmp_path / "peers.json").write_text(json.dumps({"rows": rows[:1]}))   # full precision only: nothing to draw
    bad = subprocess.run([sys.executable, "plots/ppl_bits.py", str(tmp_path), "--out", str(tmp_path / "x.png")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and not (tmp_path / "x.png").exists()


def test_peers_plot_and_row_families(tmp_path, monkeypatch):
    """plots/peers.py on bench_peers.py rows: ApiQ-lw is a family of its own (its own marker, not a
    point of ApiQ-bw's budget curve), in the plots and in bench_peers.py's row order alike; the
    peers hollow, ours filled."""
    import json
    for d in ("plots", "bench"):
        monkeypatch.syspath_prepend(str(ROOT / d))
    import bench_peers
    import common
    import peers
    rows = [dict(method="fp", bits=32, minutes=0.0, wikitext2=20.4, c4=26.0, limit=40, c4_limit=40)]
    rows += [dict(method=m, bits=2, minutes=t, wikitext2=p, c4=2 * p, limit=n, c4_limit=n)
             for m, t, p, n in (("autoround", 29.0, 72.0, 40), ("apiq-long", 61.0, 54.0, 40), ("rtn", 0.2, 6e5, 10),
                                ("apiq-quick", 10.8, 99.0, 40), ("apiq-lw", 15.1, 300.0, 40))]
    names = [r["method"] for r in sorted(rows, key=bench_peers.order)]
    assert names == ["fp", "rtn", "apiq-lw", "apiq-quick", "apiq-long", "autoround"]
    assert [common.family(m) for m in names] == [bench_peers.family(m) for m in names] \
        == ["fp", "rtn", "apiq-lw", "apiq", "apiq", "autoround"]
    assert peers.style("apiq-lw") != peers.style("apiq-quick") == peers.style("apiq-long") == ("o", True)
    assert peers.style("autoround")[1] is False
    (tmp_path / "peers.json").write_text(json.dumps({"rows": rows}))
    png = tmp_path / "peers.png"
    r = sh("plots/peers.py", tmp_path, "--dataset", "c4", "--out", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in r.stdout


def test_peers_plot_reads_the_benchmark_json(tmp_path, monkeypatch):
    """plots/peers.py on a bench_peers.py JSON file (not a directory): the tuning split's perplexity
    against bits per weight; each family's line runs through its rows that nothing beats on both
    axes; a row off the clock is drawn but not on a line."""
    import json
    monkeypatch.syspath_prepend(str(ROOT / "plots"))
    import peers
    assert peers.frontier([(2, 50.0), (1, 80.0), (3, 60.0), (4, 40.0)]) == [(1, 80.0), (2, 50.0), (4, 40.0)]
    rows = [dict(method="fp", bits=32, minutes=0.0, wikitext2_valid=13.7, limit=20, on_clock=True)]
    rows += [dict(method=m, bits=2, minutes=t, bits_per_weight=bpw, wikitext2_valid=p, limit=20, on_clock=ok)
             for m, t, bpw, p, ok in (("autoround-iters50", 20.0, 2.33, 60.0, True), ("autoround", 40.0, 2.33, 55.0, True),
                                      ("apiq-quick-rank8", 9.0, 2.69, 90.0, True), ("gptq", 3.0, 2.33, 900.0, False))]
    f = tmp_path / "benchmark_tuning.json"
    f.write_text(json.dumps({"rows": rows}))
    png = tmp_path / "bits.png"
    r = sh("plots/peers.py", f, "--dataset", "wikitext2_valid", "--x", "bits_per_weight", "--out", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in r.stdout


def test_adapter_stats_are_population_moments(monkeypatch):
    """plots/adapters.py's skew and excess kurtosis on large samples of known distributions:
    uniform (0, -1.2), Gaussian (0, 0), exponential (2, 6); std is the population one."""
    monkeypatch.syspath_prepend(str(ROOT / "plots"))
    import adapters
    g = torch.Generator().manual_seed(0)
    n = 10 ** 6
    samples = {"uniform": (torch.rand(n, generator=g, dtype=torch.float64), 0.0, -1.2, 0.02),
               "gaussian": (torch.randn(n, generator=g, dtype=torch.float64), 0.0, 0.0, 0.03),
               "exponential": (torch.empty(n, dtype=torch.float64).exponential_(generator=g), 2.0, 6.0, 0.4)}
    for name, (x, skew, kurt, tol) in samples.items():
        s = adapters.stats(x.float())
        assert s["n"] == n and s["max_abs"] == pytest.approx(x.abs().max().item(), rel=1e-6), name
        assert s["std"] == pytest.approx(x.std(correction=0).item(), rel=1e-5), name
        assert abs(s["skew"] - skew) < (0.1 if name == "exponential" else 0.01), (name, s)
        assert abs(s["excess_kurtosis"] - kurt) < tol, (name, s)
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])                       # by hand: mean 4, deviations -3 -2 -1 6
    m2, m3, m4 = 50 / 4, 180 / 4, 1394 / 4
    s = adapters.stats(x)
    assert s["skew"] == pytest.approx(m3 / m2 ** 1.5) and s["excess_kurtosis"] == pytest.approx(m4 / m2 ** 2 - 3)


def test_adapter_factors_from_blocks_dir_equal_the_finished_model(tiny_ckpt, tmp_path, monkeypatch, one_thread):
    """An unfinished calibration (--stop-after: blocks/block_NNN.safetensors) and the finished model
    it becomes (model.safetensors) give plots/adapters.py the same factors of the same block, under
    the same names; the figure of a finished model beside a 1-block one is cut to block 0."""
    import shutil

    import calibrate
    from llama import LINEARS
    monkeypatch.syspath_prepend(str(ROOT / "plots"))
    import adapters
    out = tmp_path / "apiq-bw-w2"
    cfg = dict(ckpt=str(tiny_ckpt), rank=8, group_size=32, threads=1, nsamples=2, seqlen=32, epochs=1)
    calibrate.main(calibrate.make_config(**cfg, out=str(out), stop_after=1))
    part = tmp_path / "apiq-bw-paper-w2"
    shutil.copytree(out, part)                                    # what the stopped run left
    assert not (part / "model.safetensors").exists() and (part / "blocks" / "block_000.safetensors").is_file()
    calibrate.main(calibrate.make_config(**cfg, out=str(out)))    # continues to the finished model
    assert (out / "model.safetensors").is_file() and not (out / "blocks").exists()
    assert sorted(adapters.sources(part)) == [0] and sorted(adapters.sources(out)) == [0, 1, 2, 3]
    got, want = adapters.read_factors(part), adapters.read_factors(out, blocks={0})
    assert sorted(got) == sorted(want) == [(0, f"layers.0.{n}") for n in sorted(LINEARS)]
    for k in want:
        assert torch.equal(got[k]["A"], want[k]["A"]) and torch.equal(got[k]["B"], want[k]["B"]), k
        assert got[k]["A"].shape[0] == got[k]["B"].shape[1] == 8    # r x in, out x r
    assert adapters.read_factors(part, layer="layers.0.attention.wq").keys() == {(0, "layers.0.attention.wq")}
    shutil.copytree(tmp_path / "apiq-bw-w2", tmp_path / "loftq-w2")  # any finished model as the third
    r = sh("plots/adapters.py", tmp_path, "--out", tmp_path / "a.png")
    assert "blocks 0 only" in r.stdout and (tmp_path / "a.png").is_file(), r.stdout
    n_a = sum(v["A"].numel() for v in want.values())
    assert sum(f"A: n {n_a}," in ln for ln in r.stdout.splitlines()) == 3, r.stdout
