"""Perplexity against quantization minutes or bits per weight: this repo's methods and the peer
quantizers, from the rows of bench/bench_peers.py.

One marker per method family (RTN, LoftQ, ApiQ-lw, ApiQ-bw filled; HQQ, GPTQ, AutoRound hollow), a
line through each family's best rows (none better at less cost: the curve to read "at equal time"
or "at equal bits" from), one panel per bit width, full precision as a reference line. Rows off
the benchmark's clock (bench_peers.py's on_clock) are drawn in grey and say so.

    python plots/peers.py bench/results/benchmark_test.json                     # -> figures/peers.png
    python plots/peers.py bench/results/benchmark_test.json --x bits_per_weight --out figures/peers_bits.png
    python plots/peers.py bench/results/benchmark_tuning.json --dataset wikitext2_valid --out figures/tuning.png
    python plots/peers.py out/peers --dataset c4                                 # a directory holding peers.json

Both axes are logarithmic for minutes (seconds for RTN and HQQ, an hour for long recipes), linear
for bits per weight; 2-bit perplexity spans decades. Lower left is better.
"""
from pathlib import Path

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from common import DATASETS, PEERS, family, parser, plt, read_json, save, windows

MARKERS = {"rtn": "s", "loftq": "D", "apiq-lw": "h", "apiq": "o", "hqq": "^", "gptq": "v", "autoround": "P"}   # per family


def style(method: str):
    """(marker, filled): this repo's methods filled, the peers hollow."""
    return MARKERS.get(family(method), "x"), family(method) not in PEERS


def frontier(points):
    """The (x, y) points that no other point beats on both: sorted by x, each lower than all before."""
    best, out = float("inf"), []
    for x, y in sorted(points):
        if y < best:
            best = y
            out.append((x, y))
    return out


def rows_of(results: str):
    path = Path(results)
    path = path / "peers.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run bench/bench_peers.py first (its --json)")
    return path, read_json(path).get("rows", [])


def main(a):
    path, rows = rows_of(a.results)
    rows = [r for r in rows if r.get(a.dataset) is not None]
    fp = next((r[a.dataset] for r in rows if r["method"] == "fp"), None)
    rows = [r for r in rows if r["method"] != "fp" and (r.get(a.x) or 0) > 0]   # log axis: no zero minutes
    bits = sorted({r["bits"] for r in rows})
    if not bits:
        raise FileNotFoundError(f"no quantized rows with {a.dataset} perplexity and {a.x} in {path}")
    families = list(dict.fromkeys(family(r["method"]) for r in rows))      # in the JSON's order
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    most = max(windows(r, a.dataset) for r in rows)                  # a row on fewer windows says so in its label
    fig, axes = plt.subplots(1, len(bits), figsize=(6.5 * len(bits), 5), squeeze=False)
    for ax, b in zip(axes[0], bits):
        mine = [r for r in rows if r["bits"] == b]
        for f in families:
            pts = [(r[a.x], r[a.dataset]) for r in mine if family(r["method"]) == f and r.get("on_clock", True)]
            if len(pts) > 1:
                ax.plot(*zip(*frontier(pts)), color=colors[f], linewidth=1, alpha=0.7, zorder=2)
        for r in mine:
            marker, filled = style(r["method"])
            c = colors[family(r["method"])] if r.get("on_clock", True) else "grey"
            label = r["method"] + ("" if windows(r, a.dataset) == most else f" ({windows(r, a.dataset)} windows)")
            label += "" if r.get("on_clock", True) else " (off the clock)"
            ax.scatter(r[a.x], r[a.dataset], marker=marker, s=60, color=c if filled else "none",
                       edgecolors=c, linewidths=1.5, zorder=3, label=label)
        if fp is not None:
            ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"full precision ({fp:.2f})")
        ax.set(yscale="log", xlabel=XLABEL[a.x], ylabel=f"{DATASETS[a.dataset]} perplexity (log)",
               title=f"{b}-bit weights, group 64")
        if a.x == "minutes":
            # minutes as plain numbers at 1, 2, 5 x 10^k (matplotlib's 3x10^-1 labels overlap)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    limits = sorted({str(windows(r, a.dataset)) for r in rows})
    smoke = " (SMOKE budgets: not a result)" if any(r.get("smoke") for r in rows) or "smoke" in path.name else ""
    fig.suptitle(f"SmolLM2-135M: perplexity against {XLABEL[a.x].split(' (')[0]} (windows of 2048 tokens: "
                 f"{', '.join(limits)}){smoke}")
    save(fig, a.out)


XLABEL = {"minutes": "quantization time (minutes, log; from the load, one thread)",
          "bits_per_weight": "bits per weight of the block linears (adapter included)"}


if __name__ == "__main__":
    from cli import run
    p = parser(__doc__, "peers.png")
    p.set_defaults(results="out/peers")
    for action in p._actions:                           # common.parser's help names out/results
        if action.dest == "results":
            action.help = "bench_peers.py's JSON, or a directory holding peers.json (default out/peers)"
    p.add_argument("--dataset", choices=tuple(DATASETS), default="wikitext2", help="which perplexity (default wikitext2)")
    p.add_argument("--x", choices=tuple(XLABEL), default="minutes", help="the horizontal axis (default minutes)")
    run(main, p.parse_args())
