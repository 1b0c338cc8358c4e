"""Perplexity against bits for each method (WikiText-2 and C4), full precision as a reference line.

    python plots/ppl_bits.py out/results                    # -> figures/ppl_bits.png

    python plots/ppl_bits.py out/results/peers              # bench/bench_peers.py's rows, peers included

Reads every `<method>-w<bits>.json` and `fp.json` written by `evaluate.py --json`, or, where the
directory holds bench/bench_peers.py's `peers.json`, its rows (one line per row name: apiq-quick,
autoround, ...). QLoRA's init is RTN with B = 0, so its perplexity is RTN's line. Perplexity spans
decades at 2 bits: log scale.
"""
from pathlib import Path

from common import DATASETS, METHODS, PEERS, family, load_results, parser, plt, read_json, save, windows

BITS = range(1, 9)


def from_evaluate(results: str) -> tuple[dict, dict, dict]:
    """({method: {dataset: [(bits, ppl, windows)]}}, {dataset: fp ppl}, labels) from evaluate.py's JSONs."""
    by_method = {}
    for bits in BITS:
        for m, r in load_results(results, METHODS, bits).items():
            for ds, ppl in r.get("ppl", {}).items():
                by_method.setdefault(m, {}).setdefault(ds, []).append((bits, ppl, r["config"].get("limit")))
    by_method = {m: by_method[m] for m in METHODS if m in by_method}   # legend in the paper's order
    fp = Path(results) / "fp.json"
    return by_method, read_json(fp).get("ppl", {}) if fp.is_file() else {}, METHODS


def from_peers(path: Path) -> tuple[dict, dict, dict]:
    """The same from bench/bench_peers.py's peers.json: one line per row name."""
    by_method, fp = {}, {}
    for r in read_json(path).get("rows", []):
        for ds in DATASETS:
            if r.get(ds) is None:
                continue
            n = windows(r, ds)
            if r["method"] == "fp":
                fp[ds] = r[ds]
            else:
                by_method.setdefault(r["method"], {}).setdefault(ds, []).append((r["bits"], r[ds], n))
    most = max((p[2] for v in by_method.values() for pts in v.values() for p in pts), default=None)
    labels = {}                                       # a row on fewer windows says so in its label
    for m, v in by_method.items():
        for ds, pts in v.items():
            fewer = [f"{b}-bit: {n}" for b, _, n in sorted(pts) if n != most]
            labels[m, ds] = m + (f" ({', '.join(fewer)} windows)" if fewer else "")
    return by_method, fp, labels


def main(a):
    peers = Path(a.results) / "peers.json"
    by_method, fp, labels = from_peers(peers) if peers.is_file() else from_evaluate(a.results)
    if not by_method:
        raise FileNotFoundError(f"no <method>-w<bits>.json or peers.json rows with perplexities in {a.results}")
    shown = [ds for ds in DATASETS if any(ds in v for v in by_method.values())]
    colors = {m: f"C{i % 10}" for i, m in enumerate(by_method)}         # one color a method in both panels
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.4), squeeze=False)
    limits = set()
    for ax, ds in zip(axes[0], shown):
        for m, v in by_method.items():
            if ds in v:
                pts = sorted(v[ds])
                limits.update(p[2] for p in pts)
                peer = family(m) in PEERS                       # bench_peers rows: the other tools dashed
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if peer else "-",
                        color=colors[m], label=labels.get((m, ds), labels.get(m)))
        if ds in fp:
            ax.axhline(fp[ds], color="black", linestyle="--", linewidth=1, label=f"full precision ({fp[ds]:.2f})")
        ax.set(yscale="log", xlabel="weight bits", ylabel="perplexity (log)", title=DATASETS[ds])
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    counts = ", ".join("all" if n is None else str(n) for n in sorted(limits, key=lambda n: n or 1e9))
    fig.suptitle(f"perplexity against bits (windows of 2048 tokens per dataset: {counts})")
    save(fig, a.out)


if __name__ == "__main__":
    from cli import run
    run(main, parser(__doc__, "ppl_bits.png").parse_args())
