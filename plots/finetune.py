"""Training loss against step, one curve per initialisation: the "better starting point" picture
of ApiQ's finetuning experiments (section 4), from finetune.py's logs. One panel per bit width;
full precision + LoRA (`fp-lora-ft`) is drawn in every panel as the reference. Also prints the
Markdown table of held-out WikiText-2 perplexity before and after finetuning.

    python plots/finetune.py out/results                 # -> figures/finetune.png (cross-entropy runs)
    python plots/finetune.py out/results --loss kd --out figures/finetune_kd.png

Reads RESULTS/<init>-w<bits>-ft[-kd]/finetune_log.json (results.sh ft-* steps) and
RESULTS/fp-lora-ft[-kd]/finetune_log.json.
"""
import re
from pathlib import Path

from common import METHODS, parser, plt, read_json, save


def runs(results: Path, loss: str) -> dict:
    """{(init, bits): finetune_log} of the finished runs with this loss; bits None for fp + LoRA."""
    tag = "-ft" + ("-kd" if loss == "kd" else "")
    found = {}
    for f in sorted(results.glob(f"*{tag}/finetune_log.json")):
        name = f.parent.name.removesuffix(tag)
        if name == "fp-lora":
            found[("fp-lora", None)] = read_json(f)
        elif m := re.fullmatch(r"(.+)-w(\d)", name):
            if m[1] in METHODS:
                found[(m[1], int(m[2]))] = read_json(f)
    return found


def table(found: dict) -> str:
    lines = ["| start | bits | held-out ppl before | after | steps | minutes |", "|---|---|---|---|---|---|"]
    for (init, bits), log in sorted(found.items(), key=lambda kv: (kv[0][1] or 0, list(METHODS).index(kv[0][0])
                                                                    if kv[0][0] in METHODS else -1)):
        before = log.get("eval_before") or {}
        label = "full precision + LoRA" if bits is None else METHODS[init]
        b = f"{before['wikitext2']:.2f}" if before else "-"
        lines.append(f"| {label} | {bits or 'fp32'} | {b} | {log['eval']['wikitext2']:.2f} | {log['steps']} | "
                     f"{log['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(a):
    results = Path(a.results)
    if not results.is_dir():
        raise NotADirectoryError(f"results directory {results} does not exist (bash results.sh ft-... fills it)")
    found = runs(results, a.loss)
    bits = sorted({b for _, b in found if b is not None})
    if not bits:
        raise FileNotFoundError(f"no finished finetuning of a quantized start in {results} (--loss {a.loss})")
    fig, axes = plt.subplots(1, len(bits), figsize=(6.5 * len(bits), 4.4), squeeze=False)
    for ax, b in zip(axes[0], bits):
        for (init, bb), log in found.items():
            if bb not in (b, None):
                continue
            steps = [s["step"] for s in log["log"]]
            label = "full precision + LoRA" if bb is None else f"{METHODS[init]} ({log['eval']['wikitext2']:.1f})"
            ax.plot(steps, [s["loss"] for s in log["log"]], label=label,
                    color="black" if bb is None else None, linestyle="--" if bb is None else "-")
        ax.set(yscale="log", xlabel="optimizer step", title=f"{b}-bit start, group 64",
               ylabel="training loss (log)" + (" (KL to full precision)" if a.loss == "kd" else " (cross-entropy)"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="start (held-out ppl after)", title_fontsize=8)
    fig.suptitle("SmolLM2-135M: LoRA finetuning from each initialisation (finetune.py, same recipe)")
    fig.tight_layout()
    save(fig, a.out)
    print(table(found))


if __name__ == "__main__":
    from cli import run
    p = parser(__doc__, "finetune.png")
    p.add_argument("--loss", choices=("ce", "kd"), default="ce", help="which runs: ce (default) or kd")
    run(main, p.parse_args())
