"""bench/bench_peers.py, the benchmark's protocol: rows and their settings, the tuning split read
with no test file present, bits per weight and the clock recorded in every row."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_peers  # noqa: E402


def test_rows_name_the_settings_they_change():
    """A row is its method and the settings it changes from the peer's documented preset; ours
    pass theirs to calibrate.py as flags."""
    r = bench_peers.parse_row("autoround:iters=50,seqlen=256")
    assert r["name"] == "autoround-iters50-seqlen256"
    assert r["settings"] == bench_peers.DEFAULTS["autoround"] | {"iters": 50, "seqlen": 256}
    assert bench_peers.parse_row("autoround:iters=200")["name"] == "autoround"       # its default: no change
    assert bench_peers.parse_row("autoround:iters=50,seed=1")["name"] == "autoround-iters50-seed1"   # a second seed
    assert bench_peers.parse_row("gptq:damp=0.01")["settings"]["damp"] == 0.01
    a = bench_peers.parse_row("apiq:quick,rank=8,lr_lora=1e-3")
    assert a["name"] == "apiq-quick-rank8-lr_lora0.001"
    assert bench_peers.calibrate_flags(a["settings"]) == ["--quick", "--rank", "8", "--lr-lora", "0.001"]
    assert bench_peers.family(a["name"]) == "apiq" and bench_peers.family("apiq-lw-quick") == "apiq-lw"
    for bad, says in (("autoround:itres=5", "no setting itres"), ("awq", "unknown method 'awq'")):
        with pytest.raises(ValueError, match=says):
            bench_peers.parse_row(bad)


def test_bad_rows_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "bench/bench_peers.py", "--rows", "gptq:dampp=0.1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "gptq has no setting dampp" in r.stderr and "Traceback" not in r.stderr


def test_test_rows_are_the_tuning_sets_choices(tmp_path):
    """--rows tuned / best on the test split: the rows of the tuning JSON as tuned (name and settings,
    so their models are reused), on the clock only; best = the lowest tuning perplexity of each method
    in each time budget, among rows within BEST_BITS_OVER bits of a packed base: on both parts of the
    tuning set (geometric mean) among the rows that have both, else on WikiText-2 validation."""
    def row(method, bits, minutes, ppl, bpw, on_clock=True, settings=None):
        return dict(method=method, bits=bits, minutes=minutes, wikitext2_valid=ppl, bits_per_weight=bpw,
                    on_clock=on_clock, settings=settings or {})
    rows = [row("fp", 32, 0, 19.8, None),
            row("autoround-iters50-seqlen256", 2, 16.3, 82.8, 2.33, settings={"iters": 50, "seqlen": 256}),
            row("autoround-batch_size2-seqlen256", 2, 18.1, 86.4, 2.33),
            row("autoround-iters50", 2, 33.9, 66.6, 2.33),
            row("apiq-quick-rank8", 2, 9.0, 119.6, 2.69, settings={"quick": True, "rank": 8}),
            row("apiq-quick-rank8-e2e_epochs2", 2, 16.2, 74.6, 2.69),
            row("apiq-quick", 2, 9.1, 50.0, 5.27),                          # rank 64: over the bits
            row("apiq-quick-rank8-best_step", 2, 8.9, 40.0, 2.69, on_clock=False),
            row("apiq-long-rank8", 2, 45.0, 30.0, 2.69),                    # over the last budget
            row("autoround-iters50", 3, 33.9, 26.8, 3.34),
            row("apiq-quick-rank8", 3, 9.0, 23.1, 3.71), row("apiq-quick-rank8-x", 3, 30.0, 25.0, 3.71)]
    f = tmp_path / "tuning.json"
    f.write_text(json.dumps({"rows": rows}))
    best = bench_peers.tuned_rows(f, 2, best=True)
    assert [r["name"] for r in best] == ["apiq-quick-rank8-e2e_epochs2", "autoround-iters50-seqlen256",
                                         "autoround-iters50"]
    assert best[1] == {"name": "autoround-iters50-seqlen256", "method": "autoround",
                       "settings": {"iters": 50, "seqlen": 256}}
    assert [r["name"] for r in bench_peers.tuned_rows(f, 3, best=True)] == ["apiq-quick-rank8", "autoround-iters50"]
    tuned = {r["name"] for r in bench_peers.tuned_rows(f, 2, best=False)}
    assert "apiq-quick-rank8-best_step" not in tuned and "apiq-quick" in tuned and len(tuned) == 7
    assert bench_peers.calibrate_flags(bench_peers.tuned_rows(f, 2, False)[0]["settings"]) == ["--quick", "--rank", "8"]
    r = subprocess.run([sys.executable, "bench/bench_peers.py", "--rows", "best", "--split", "tuning",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "give --split test" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "bench/bench_peers.py", "--rows", "tuned", "--split", "test", "--tuning",
                        str(tmp_path / "none.json"), "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "is not a file" in r.stderr and "Traceback" not in r.stderr
    # with the tuning set's C4 part: the geometric mean of both parts, among the rows that have both
    both = [row("apiq-quick-rank8-e2e_epochs2", 2, 16.2, 74.6, 2.69) | {"c4_tuning": 262.6},      # 139.96
            row("apiq-quick-rank8-kd", 2, 18.6, 79.3, 2.69) | {"c4_tuning": 213.5},               # 130.12
            row("apiq-quick-rank8-e2e_epochs1", 2, 12.8, 70.0, 2.69),                             # no C4 part
            row("autoround-iters50-seqlen256", 2, 16.3, 82.8, 2.33) | {"c4_tuning": 184.3},       # 123.53
            row("autoround-iters50", 2, 33.9, 66.6, 2.33) | {"c4_tuning": 154.8},                 # 101.54
            row("autoround-batch_size2", 2, 37.8, 67.3, 2.33), row("gptq", 2, 16.5, 1453.3, 2.33)]
    (tmp_path / "both.json").write_text(json.dumps({"rows": both}))
    assert [r["name"] for r in bench_peers.tuned_rows(tmp_path / "both.json", 2, best=True)] == [
        "apiq-quick-rank8-kd", "gptq", "autoround-iters50-seqlen256", "autoround-iters50"]
    assert bench_peers.tuning_score(both[0]) == pytest.approx((74.6 * 262.6) ** 0.5)
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"method": "rtn", "bits": 2}]}))
    with pytest.raises(ValueError, match="not the tuning rows of bench_peers.py"):
        bench_peers.tuned_rows(tmp_path / "other.json", 2, best=True)


def test_a_rows_clock_is_its_days_reference_read_again():
    """on_clock: the row's day's first reference (on its machine's boot) within 5% of the first day's and
    a mean load <= 2.5; reclock re-reads it, so a reference run after the rows (or a replaced job) decides."""
    days = [{"date": "d1", "cpu": "c", "seconds": 1000.0}, {"date": "d2", "cpu": "c", "seconds": 960.0},
            {"date": "d2", "cpu": "c", "seconds": 700.0}, {"date": "d3", "cpu": "c", "seconds": 940.0}]
    row = {"method": "autoround", "machine": {"date": "d2", "cpu": "c", "load_mean": 2.0, "reference_ratio": None}}
    r = bench_peers.reclock(row, days)
    assert r["machine"]["reference_seconds"] == 960.0 and r["machine"]["reference_ratio"] == 0.96 and r["on_clock"]
    assert not bench_peers.reclock(row | {"machine": row["machine"] | {"date": "d3"}}, days)["on_clock"]    # 0.94
    assert not bench_peers.reclock(row | {"machine": row["machine"] | {"load_mean": 2.6}}, days)["on_clock"]
    assert not bench_peers.reclock(row | {"machine": row["machine"] | {"cpu": "other"}}, days)["on_clock"]
    assert bench_peers.reclock(row | {"method": "fp"}, days) == row | {"method": "fp"}          # no clock
    # a fresh machine (another boot) on the same date is a new clock: its own first reference
    days += [{"date": "d2", "cpu": "c", "boot": "b2", "seconds": 1100.0}]
    assert not bench_peers.reclock(row | {"machine": row["machine"] | {"boot": "b2"}}, days)["on_clock"]   # 1.10
    assert bench_peers.reclock(row, days)["machine"]["reference_seconds"] == 960.0         # rows without a boot
    assert bench_peers.reclock(row | {"machine": row["machine"] | {"boot": "b3"}}, days)["machine"]["reference_ratio"] is None


def test_presets_are_the_tuning_sets_choice():
    """calibrate.py --quick-e2e and --long-e2e resolve to the settings of a 2-bit tuning row on the
    clock, and that row is the lowest tuning perplexity of ApiQ-bw within the bits of rank 8 at its
    minutes or fewer (the choice the presets stand for; both parts of the tuning set where the rows
    have both, as --rows best chooses)."""
    import calibrate
    rows = json.loads((ROOT / "bench" / "results" / "benchmark_tuning.json").read_text())["rows"]
    ours = [r for r in rows if r["bits"] == 2 and bench_peers.family(r["method"]) == "apiq" and r["on_clock"]
            and r["bits_per_weight"] <= 2 + bench_peers.BEST_BITS_OVER]
    for name in ("quick_e2e", "long_e2e"):
        want = calibrate.make_config(**{name: True})
        row = next(r for r in ours if _same(calibrate.make_config(**r["settings"]), want))
        rivals = [r for r in ours if r["minutes"] <= row["minutes"]]
        rivals = [r for r in rivals if r.get("c4_tuning")] or rivals        # --rows best's rule
        assert bench_peers.tuning_score(row) == min(map(bench_peers.tuning_score, rivals))
    with pytest.raises(ValueError, match="--quick and --quick-e2e are different recipes"):
        calibrate.make_config(quick=True, quick_e2e=True)


def _same(a, b) -> bool:
    """Two calibrate.Configs equal in every result setting (the preset flags themselves aside)."""
    from dataclasses import asdict
    from recipes import CALIBRATE_PRESETS
    skip = set(CALIBRATE_PRESETS)
    return {k: v for k, v in asdict(a).items() if k not in skip} == {k: v for k, v in asdict(b).items() if k not in skip}


def test_tuning_rows_read_no_test_file(data_dir, smollm2_gguf, tmp_path):
    """A tuning run (full precision and RTN, one window) with wiki.test.raw absent: the rows are
    WikiText-2 validation perplexities, with bits per weight (RTN 2-bit g64 in GPTQ's format:
    2.326, bench/results/bits_per_weight_smollm2.json), the CPU and the load; no reference run
    today, so not on the clock. Run again, it redoes nothing."""
    d = tmp_path / "data" / "wikitext2_raw"
    d.mkdir(parents=True)
    for f in (data_dir / "wikitext2_raw").iterdir():
        if f.name != "wiki.test.raw":
            (d / f.name).symlink_to(f)
    env = {"APIQ_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/bench_peers.py", "--split", "tuning", "--rows", "fp rtn", "--bits", "2",
           "--limit", "1", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "tuning.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {x["method"]: x for x in json.loads((tmp_path / "tuning.json").read_text())["rows"]}
    assert set(rows) == {"fp", "rtn"}
    fp, rtn = rows["fp"], rows["rtn"]
    assert 1 < fp["wikitext2_valid"] < rtn["wikitext2_valid"] and "wikitext2" not in rtn
    assert rtn["split"] == "tuning" and rtn["limit"] == 1 and rtn["rank"] == 0
    assert abs(rtn["bits_per_weight"] - 2.3264) < 1e-3 and rtn["minutes"] > 0
    assert rtn["machine"]["cpu"] and rtn["machine"]["load_max"] >= rtn["machine"]["load_mean"] >= 0
    assert rtn["machine"]["reference_seconds"] is None and rtn["on_clock"] is False
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "rtn w2g64" not in again.stdout and "| rtn | 2 | 2.326 |" in again.stdout
    test = subprocess.run(cmd[:3] + ["test"] + cmd[4:], cwd=ROOT, capture_output=True, text=True, env=env)
    assert test.returncode != 0 and "no WikiText-2 test file" in test.stderr, test.stderr[-2000:]


def test_test_rows_with_zero_shot(data_dir, smollm2_gguf, tmp_path):
    """--split test --rows best --tasks N: the tuning JSON's row (RTN here) and full precision on one
    WikiText-2 test window, and the five zero-shot tasks on N items each: every task's accuracy, the
    mean of the five and its binomial standard error, recorded with the row."""
    tuning = tmp_path / "tuning.json"
    tuning.write_text(json.dumps({"rows": [dict(method="rtn", bits=2, minutes=0.1, wikitext2_valid=9e5,
                                                bits_per_weight=2.33, on_clock=True, settings={})]}))
    env = {"APIQ_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench/bench_peers.py", "--split", "test", "--rows", "best", "--tuning", str(tuning),
                        "--bits", "2", "--limit", "1", "--c4-limit", "0", "--tasks", "4", "--out", str(tmp_path / "out"),
                        "--json", str(tmp_path / "test.json")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {x["method"]: x for x in json.loads((tmp_path / "test.json").read_text())["rows"]}
    assert set(rows) == {"fp", "rtn"}
    for x in rows.values():
        acc = x["zero_shot"]
        assert len(acc) == 5 and all(v in (0, 25, 50, 75, 100) for v in acc.values()) and x["tasks"] == 4
        assert abs(x["zero_shot_mean"] - sum(acc.values()) / 5) < 0.01
        p = [v / 100 for v in acc.values()]
        assert abs(x["zero_shot_se"] - 100 * sum(q * (1 - q) / 4 for q in p) ** 0.5 / 5) < 0.01
    assert rows["fp"]["wikitext2"] < rows["rtn"]["wikitext2"] and "c4" not in rows["fp"]
