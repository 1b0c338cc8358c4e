"""The saliency study (Cao & Aref Tables 1-2 on SmolLM2): mean +- std over calibration seeds of
WikiText-2 and C4 perplexity, their gap (C4 - WikiText-2: overfitting to the calibration text),
C4 against plain ApiQ-bw calibrated on the same seed's windows (paired), average zero-shot
accuracy and calibration minutes, per configuration; the figure: C4 perplexity, the gap and
accuracy against the penalty's strength.

    bash results.sh study-none-w2-s0 study-r0.3-w2-s0 ...    # fills out/results/study/
    python plots/saliency_study.py out/results/study         # -> table on stdout, figures/saliency_study.png
    python plots/saliency_study.py figures/saliency_study.csv --out x.png   # the same, from the runs' CSV

Beside the PNG it writes one row per run (`--csv`, default the PNG's name with .csv): the numbers
the table and figure are made of, small enough to commit, so that they can be redrawn, and merged
with later runs (`--merge earlier.csv`), after out/ is gone.

Reads, for every `<config>-w<bits>-s<seed>.json` (evaluate.py --json) in the directory, that JSON,
`<config>-w<bits>-s<seed>-zs.json` where there is one (zero-shot, results.sh STUDY_ITEMS) and the
model's `calib_log.json` (penalty / MSE per block). A configuration's name is the
results.sh study step's without the seed: none, lam<L> (the paper's raw lambda), r<R> (the
scale-free ratio) with before-, c4-, l2-, m<M>- in front.
"""
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

from common import parser, plt, read_json, save

NAME = re.compile(r"(?P<config>.+)-w(?P<bits>\d+)-s(?P<seed>\d+)\.json")
NUMBER = r"\d[\d.]*(?:e[+-]?\d+)?"
CONFIG = re.compile(rf"(?P<prefix>(?:(?:before|c4|l2|m{NUMBER})-)*)(?:(?P<none>none)|(?P<kind>lam|r)(?P<value>{NUMBER}))")


def strength(config: str):
    """('raw' | 'ratio' | None, value, [prefixes]) of a configuration name, as results.sh reads it
    (lam1e-3 and m1.3- included)."""
    m = CONFIG.fullmatch(config)
    if not m:
        raise ValueError(f"{config}: not a study configuration (none, lam<L> or r<R>, with before-, c4-, l2-, "
                         f"m<M>- in front)")
    prefix = [p for p in re.findall(rf"(before|c4|l2|m{NUMBER})-", m["prefix"])]
    if m["none"]:
        return None, 0.0, prefix
    return ("raw" if m["kind"] == "lam" else "ratio"), float(m["value"]), prefix


def mean_std(xs):
    """(mean, sample std) over the seeds; (None, None) unless every seed has the value, so that
    every column of a row averages the same seeds."""
    if not xs or any(x is None for x in xs):
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(m, s, digits=2):
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" +- {s:.{digits}f}" if s is not None else "")


def collect(d: Path) -> dict:
    """{(bits, config): [one dict per seed]}."""
    runs = defaultdict(list)
    for f in sorted(d.glob("*.json")):
        m = NAME.fullmatch(f.name)
        if not m:
            continue
        r = read_json(f)
        ppl, log_path = r.get("ppl", {}), d / f.stem / "calib_log.json"
        blocks = read_json(log_path)["blocks"] if log_path.is_file() else []
        made = read_json(d / f.stem / "apiq.json") if (d / f.stem / "apiq.json").is_file() else {}
        zs_path = d / f"{f.stem}-zs.json"          # results.sh: zero-shot in a JSON of its own (STUDY_ITEMS)
        zs = read_json(zs_path) if zs_path.is_file() else r
        runs[(int(m["bits"]), m["config"])].append(with_gap({
            "seed": int(m["seed"]), "wikitext2": ppl.get("wikitext2"), "c4": ppl.get("c4"),
            "acc": 100 * zs["zeroshot_avg"] if "zeroshot_avg" in zs else None,
            "acc_se": acc_se(zs.get("zeroshot", {})),
            "items": zs.get("config", {}).get("task_limit"),
            "minutes": made.get("calibration_seconds", 0) / 60 or None,
            "pen": [b.get("penalty_over_mse") for b in blocks]}))
    return runs


def with_gap(r: dict) -> dict:
    """A run with its gap C4 - WikiText-2 (None unless both were measured), derived here only."""
    r["gap"] = r["c4"] - r["wikitext2"] if r["c4"] is not None and r["wikitext2"] is not None else None
    return r


FIELDS = ("bits", "config", "seed", "wikitext2", "c4", "acc", "acc_se", "items", "minutes", "pen")


def write_csv(runs: dict, path: str):
    """One row per run; `pen` is penalty / MSE per block joined by ';'. Written whole, then renamed."""
    from cli import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(FIELDS)
            for (bits, config), rs in sorted(runs.items()):
                for r in sorted(rs, key=lambda r: r["seed"]):
                    w.writerow([bits, config, r["seed"]] + ["" if r[k] is None else repr(r[k]) for k in FIELDS[3:-1]]
                               + [";".join("" if x is None else repr(x) for x in r["pen"])])
    atomic_write(path, write)
    print(f"wrote {path}")


def read_csv(path: Path) -> dict:
    """write_csv's file back into collect()'s form."""
    num = lambda v, t=float: t(v) if v != "" else None   # noqa: E731
    runs = defaultdict(list)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(FIELDS) - set(rows[0]):
        raise ValueError(f"{path}: not this script's CSV (columns {', '.join(FIELDS)})")
    for row in rows:
        r = {k: num(row[k]) for k in ("wikitext2", "c4", "acc", "acc_se", "minutes")}
        r.update(seed=int(row["seed"]), items=num(row["items"], int),
                 pen=[num(x) for x in row["pen"].split(";")] if row["pen"] else [])
        runs[(int(row["bits"]), row["config"])].append(with_gap(r))
    return runs


def acc_se(zeroshot: dict):
    """One standard error (points) of one model's average accuracy over the tasks, from the items
    alone (binomial): sqrt(sum_t p_t (1 - p_t) / n_t) / tasks. None without zero-shot results."""
    tasks = [t for t in zeroshot.values() if t.get("n")]
    if not tasks:
        return None
    return 100 * sum(t["acc"] * (1 - t["acc"]) / t["n"] for t in tasks) ** 0.5 / len(tasks)


def paired(rs, base, key, relative=True):
    """100 (x / x_none - 1) (relative) or x - x_none for each seed that plain ApiQ-bw also ran: a
    seed fixes the calibration windows, so the seed-to-seed noise that both configurations share
    cancels."""
    by_seed = {r["seed"]: r[key] for r in base}
    return [(100 * (r[key] / by_seed[r["seed"]] - 1) if relative else r[key] - by_seed[r["seed"]]) for r in rs
            if r[key] is not None and by_seed.get(r["seed"]) is not None]


def table(runs: dict) -> list:
    rows = []
    print("| bits | configuration | seeds | WikiText-2 | C4 | C4 - WikiText-2 | C4 vs none, same seeds (%) | "
          "avg zero-shot (items/task) | acc vs none, same seeds (points) | calibrate (min) | "
          "penalty / MSE at blocks 0, 12, last |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    order = lambda k: (k[0], strength(k[1])[2], strength(k[1])[0] or "", strength(k[1])[1])   # noqa: E731
    for (bits, config) in sorted(runs, key=order):
        rs = runs[(bits, config)]
        stats = {k: mean_std([r[k] for r in rs]) for k in ("wikitext2", "c4", "gap", "acc", "minutes")}
        base = runs.get((bits, "none"), [])
        vs = paired(rs, base, "c4") if config != "none" else []
        stats["c4_vs_none"] = mean_std(vs) if vs else (None, None)
        dacc = paired(rs, base, "acc", relative=False) if config != "none" else []
        stats["acc_vs_none"] = mean_std(dacc) if dacc else (None, None)
        items = sorted({r["items"] for r in rs if r["acc"] is not None and r["items"]})
        acc = fmt(*stats["acc"], 1) + (f" ({'/'.join(map(str, items))})" if items and stats["acc"][0] is not None else "")
        pens = [r["pen"] for r in rs if r["pen"] and r["pen"][0] is not None]
        pen = "-" if not pens else ", ".join(f"{statistics.fmean(p[i] for p in pens):.2g}"
                                            for i in (0, min(12, len(pens[0]) - 1), len(pens[0]) - 1))
        print(f"| {bits} | {config} | {len(rs)} | {fmt(*stats['wikitext2'])} | {fmt(*stats['c4'])} | "
              f"{fmt(*stats['gap'])} | {fmt(*stats['c4_vs_none'], 1)} | {acc} | {fmt(*stats['acc_vs_none'], 1)} | {fmt(*stats['minutes'], 1)} | {pen} |")
        rows.append((bits, config, stats))
    ses = [r["acc_se"] for rs in runs.values() for r in rs if r["acc_se"] is not None]
    if ses:
        print(f"\nOne model's standard error of the average accuracy, from its items alone (binomial): "
              f"{statistics.fmean(ses):.2f} points on average ({min(ses):.2f}-{max(ses):.2f}).")
    return rows


def figure(rows, out):
    """C4 perplexity, gap and accuracy against strength; one line per (bits, kind, prefixes),
    plain ApiQ-bw as a band (mean +- std)."""
    panels = [("c4", "C4 perplexity"), ("gap", "C4 - WikiText-2")]
    if any(s["acc"][0] is not None for _, _, s in rows):
        panels.append(("acc", "average zero-shot accuracy (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    lines = defaultdict(list)
    for bits, config, stats in rows:
        kind, value, prefix = strength(config)
        if kind is not None:
            lines[(bits, kind, "-".join(prefix))].append((value, stats))
    for ax, (key, label) in zip(axes[0], panels):
        for bits, config, stats in rows:
            m, s = stats[key]
            if config == "none" and m is not None:
                ax.axhline(m, color="k", lw=1, label=f"w{bits} no penalty")
                if s:
                    ax.axhspan(m - s, m + s, color="k", alpha=0.1)
        for (bits, kind, prefix), pts in sorted(lines.items()):
            pts = sorted((v, st[key]) for v, st in pts if st[key][0] is not None)
            if pts:
                ax.errorbar([v for v, _ in pts], [m for _, (m, _) in pts], yerr=[s or 0 for _, (_, s) in pts],
                            marker="o", capsize=3,
                            label=f"w{bits} {prefix + ' ' if prefix else ''}{'lambda' if kind == 'raw' else 'ratio'}")
        ax.set_xscale("log")
        ax.set_xlabel("lambda (raw) or penalty / MSE at the block's start (ratio)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Saliency-aware weight preservation on SmolLM2-135M (mean +- std over calibration seeds)")
    save(fig, out)


def load(path: str) -> dict:
    """Runs from a results directory (the JSONs) or from this script's CSV."""
    d = Path(path)
    if d.is_file():
        if d.suffix != ".csv":
            raise ValueError(f"{d}: give a results directory or this script's .csv")
        return read_csv(d)
    if not d.is_dir():
        raise NotADirectoryError(f"{d} does not exist: run bash results.sh study-<config>-w<bits>-s<seed> first")
    return collect(d)


def main(a):
    runs = load(a.results)
    for extra in a.merge:                      # earlier runs; a run that is in both is taken from `results`
        for key, rs in load(extra).items():
            have = {r["seed"] for r in runs.get(key, [])}
            runs.setdefault(key, []).extend(r for r in rs if r["seed"] not in have)
    if a.bits:
        runs = {k: v for k, v in runs.items() if k[0] == a.bits}
    if not runs:
        raise FileNotFoundError(f"no <config>-w<bits>-s<seed> runs in {a.results}"
                                f"{' at ' + str(a.bits) + ' bits' if a.bits else ''}: run the results.sh study steps first")
    rows = table(runs)
    write_csv(runs, a.csv or str(Path(a.out).with_suffix(".csv")))
    figure(rows, a.out)


if __name__ == "__main__":
    from cli import run
    p = parser(__doc__, "saliency_study.png")
    p.set_defaults(results="out/results/study")
    p.add_argument("--csv", help="per-run CSV to write (default: --out with .csv)")
    p.add_argument("--merge", action="append", default=[], help="an earlier CSV of this script to add (repeatable)")
    p.add_argument("--bits", type=int, help="only these runs' bits (default: all)")
    run(main, p.parse_args())
