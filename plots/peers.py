"""Perplexity against quantization minutes, log-log: this repo's methods and the peer quantizers.

One marker per method (RTN, LoftQ, ApiQ-lw, ApiQ-bw filled; HQQ, GPTQ, AutoRound hollow), one panel per bit
width, full precision as a reference line.

    python plots/peers.py out/peers                        # -> figures/peers.png
    python plots/peers.py out/peers --dataset c4 --out figures/peers_c4.png

Reads OUT/peers.json written by bench/bench_peers.py (rows: method, bits, minutes, wikitext2, c4).
Both axes are logarithmic: minutes span seconds (RTN, HQQ) to an hour (ApiQ --long), 2-bit
perplexity spans decades. Lower left is better: good quality for little time.
"""
from pathlib import Path

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from common import DATASETS, PEERS, WINDOWS, family, parser, plt, read_json, save

MARKERS = {"rtn": "s", "loftq": "D", "apiq-lw": "h", "apiq": "o", "hqq": "^", "gptq": "v", "autoround": "P"}   # per family


def style(method: str):
    """(marker, filled): this repo's methods filled, the peers hollow."""
    return MARKERS.get(family(method), "x"), family(method) not in PEERS


def main(a):
    path = Path(a.results) / "peers.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run bench/bench_peers.py --out {a.results} first")
    rows = [r for r in read_json(path).get("rows", []) if r.get(a.dataset) is not None]
    fp = next((r[a.dataset] for r in rows if r["method"] == "fp"), None)
    rows = [r for r in rows if r["method"] != "fp" and r["minutes"] > 0]   # log axis: no zero minutes
    bits = sorted({r["bits"] for r in rows})
    if not bits:
        raise FileNotFoundError(f"no quantized rows with {a.dataset} perplexity in {path}")
    methods = list(dict.fromkeys(r["method"] for r in rows))              # in peers.json's order
    key = WINDOWS[a.dataset]
    most = max(r[key] for r in rows)                  # a row on fewer windows says so in its label
    fig, axes = plt.subplots(1, len(bits), figsize=(6 * len(bits), 4.6), squeeze=False)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, b in zip(axes[0], bits):
        for r in (r for r in rows if r["bits"] == b):
            marker, filled = style(r["method"])
            c = colors[r["method"]]
            ax.scatter(r["minutes"], r[a.dataset], marker=marker, s=70, color=c if filled else "none",
                       edgecolors=c, linewidths=1.5, zorder=3,
                       label=r["method"] + ("" if r[key] == most else f" ({r[key]} windows)"))
        if fp is not None:
            ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"full precision ({fp:.2f})")
        ax.set(xscale="log", yscale="log", xlabel="quantization time (minutes, log)",
               ylabel=f"{DATASETS[a.dataset]} perplexity (log)", title=f"{b}-bit weights, group 64")
        # minutes as plain numbers at 1, 2, 5 x 10^k (matplotlib's 3x10^-1 labels overlap)
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    limits = sorted({str(r.get(key)) for r in rows})
    smoke = " (SMOKE budgets: not a result)" if any(r.get("smoke") for r in rows) else ""
    fig.suptitle(f"SmolLM2-135M: perplexity against quantization time (windows of 2048 tokens: "
                 f"{', '.join(limits)}){smoke}")
    save(fig, a.out)


if __name__ == "__main__":
    from cli import run
    p = parser(__doc__, "peers.png")
    p.set_defaults(results="out/peers")
    for action in p._actions:                           # common.parser's help names out/results
        if action.dest == "results":
            action.help = "directory holding peers.json (default out/peers)"
    p.add_argument("--dataset", choices=tuple(DATASETS), default="wikitext2", help="which perplexity (default wikitext2)")
    run(main, p.parse_args())
