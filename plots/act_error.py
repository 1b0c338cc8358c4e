"""Activation error per block for QLoRA, LoftQ and ApiQ-bw: the ApiQ paper's fig. 4.

    python evaluate.py --method qlora --bits 2 --errors --json out/results/qlora-w2.json   # (results.sh)
    python plots/act_error.py out/results --bits 2          # -> figures/act_error_w2.png

Reads `<method>-w<bits>.json` written by `evaluate.py --errors`: at each block's output, the mean
squared difference between the full-precision and the quantized model's hidden states, each model
running on its own input (so errors carry from block to block, as in use). Left: that error;
right: the same divided by the full-precision hidden states' mean square, which makes blocks
comparable (SmolLM2's hidden states grow a few huge channels). The paper's claim: the error grows
with depth for QLoRA and LoftQ and stays small for ApiQ.
"""
from common import METHODS, load_results, parse_methods, parser, plt, save


def main(a):
    methods = parse_methods(a.methods)
    runs = {m: r["errors"] for m, r in load_results(a.results, methods, a.bits).items() if "errors" in r}
    if not runs:
        raise FileNotFoundError(f"no {a.bits}-bit results with activation errors (evaluate.py --errors) for "
                                f"{', '.join(methods)} in {a.results}")
    fig, (ax_abs, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.2))
    for m, err in runs.items():
        blocks = [r["block"] for r in err["activation"]]
        ax_abs.plot(blocks, [r["mse"] for r in err["activation"]], marker=".", label=METHODS[m])
        ax_rel.plot(blocks, [100 * r["rel"] for r in err["activation"]], marker=".", label=METHODS[m])
    ax_abs.set(yscale="log", xlabel="block index", ylabel="mean squared error at block output",
               title="activation error")
    ax_rel.set(yscale="log", xlabel="block index", ylabel="error / full-precision mean square (%)",
               title="activation error, relative")
    for ax in (ax_abs, ax_rel):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    err = next(iter(runs.values()))
    fig.suptitle(f"{a.bits}-bit: quantized vs full-precision hidden states "
                 f"({err['windows']} WikiText-2 test window(s) of {err['seqlen']} tokens)")
    save(fig, a.out.format(bits=a.bits))


if __name__ == "__main__":
    from cli import run
    p = parser(__doc__, "act_error_w{bits}.png", methods="qlora,loftq,apiq-lw,apiq-bw")
    run(main, p.parse_args())
