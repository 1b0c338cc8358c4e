"""Weight error ||W - (Q + s B A)||_F per block for QLoRA, LoftQ and ApiQ: the ApiQ paper's fig. 3.

    python plots/weight_error.py out/results --bits 2       # -> figures/weight_error_w2.png

Reads `<method>-w<bits>.json` written by `evaluate.py --errors` (one Frobenius norm per linear)
and joins the seven linears of each block: sqrt(sum of their squared errors). Right: the same
relative to the block's full-precision ||W||_F. The paper's point: ApiQ does not try to keep W
(LoftQ minimises exactly this weight error), yet its activation error (plots/act_error.py) is the
smallest.
"""
import math
import re
from collections import defaultdict

from common import METHODS, load_results, parse_methods, parser, plt, save


def per_block(rows) -> tuple[list, list, list]:
    """(blocks, error, relative error) with each block's seven linears joined."""
    err2, w2 = defaultdict(float), defaultdict(float)
    for r in rows:
        m = re.match(r"layers\.(\d+)\.", r["layer"])
        if m is None:
            raise ValueError(f"weight error row for {r['layer']!r} is not inside a block (layers.N.)")
        l = int(m.group(1))
        err2[l] += r["error"] ** 2
        w2[l] += (r["error"] / r["rel"]) ** 2 if r["rel"] else 0.0
    blocks = sorted(err2)
    return blocks, [math.sqrt(err2[l]) for l in blocks], [math.sqrt(err2[l] / w2[l]) for l in blocks]


def main(a):
    methods = parse_methods(a.methods)
    runs = {m: r["errors"]["weight"] for m, r in load_results(a.results, methods, a.bits).items() if "errors" in r}
    if not runs:
        raise FileNotFoundError(f"no {a.bits}-bit results with weight errors (evaluate.py --errors) for "
                                f"{', '.join(methods)} in {a.results}")
    fig, (ax_abs, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.2))
    for m, rows in runs.items():
        blocks, err, rel = per_block(rows)
        ax_abs.plot(blocks, err, marker=".", label=METHODS[m])
        ax_rel.plot(blocks, [100 * r for r in rel], marker=".", label=METHODS[m])
    ax_abs.set(xlabel="block index", ylabel="||W - (Q + s B A)||_F  (7 linears joined)", title="weight error")
    ax_rel.set(xlabel="block index", ylabel="||W - (Q + s B A)||_F / ||W||_F  (%)", title="weight error, relative")
    for ax in (ax_abs, ax_rel):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{a.bits}-bit: distance of the quantized model's weights from full precision")
    save(fig, a.out.format(bits=a.bits))


if __name__ == "__main__":
    from cli import run
    p = parser(__doc__, "weight_error_w{bits}.png", methods="qlora,loftq,apiq-lw,apiq-bw")
    run(main, p.parse_args())
