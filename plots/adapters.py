"""Distributions of the LoRA factors A and B after LoftQ and after ApiQ-bw: the ApiQ paper's fig. 5.

    python plots/adapters.py out/results --bits 2           # -> figures/adapters_w2.png

Reads the saved models `<results>/loftq-w<bits>/` and `<results>/apiq-bw-w<bits>/` (A and B of
every linear in model.safetensors; `--layer` keeps only the linears whose name contains it).
The paper's observation: LoftQ's factors come from an SVD of W - Q and B carries outliers and a
skew; ApiQ's A and B are smooth and symmetric around zero, like a standard LoRA init that has
moved. Counts are on a log scale so the tails show; each factor's std, max |value| and excess
kurtosis are printed and written in the legend.
"""
from pathlib import Path

import torch
from safetensors import safe_open

from common import METHODS, parse_methods, parser, plt, save


def factors(model_dir: Path, layer: str) -> dict:
    """{"A": all A values, "B": all B values} (1-D fp32) of the linears whose name contains `layer`."""
    path = model_dir / "model.safetensors"
    if not (model_dir / "apiq.json").is_file() or not path.is_file():
        raise FileNotFoundError(f"{model_dir} holds no finished saved model (apiq.json, model.safetensors)")
    out = {"A": [], "B": []}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            name, _, part = k.rpartition(".")
            if part in out and layer in name:
                out[part].append(f.get_tensor(k).float().flatten())
    if not out["A"]:
        raise ValueError(f"{path}: no LoRA factors in linears matching {layer!r}")
    return {k: torch.cat(v) for k, v in out.items()}


def stats(x: torch.Tensor) -> dict:
    x = x.double()
    std = x.std().item()
    kurt = ((x - x.mean()) ** 4).mean().item() / std ** 4 - 3 if std > 0 else float("nan")
    return {"std": std, "max_abs": x.abs().max().item(), "excess_kurtosis": kurt}


def main(a):
    methods = parse_methods(a.methods)
    dirs = {m: Path(a.results) / f"{m}-w{a.bits}" for m in methods}
    found = {m: factors(d, a.layer) for m, d in dirs.items() if d.is_dir()}
    if not found:
        raise FileNotFoundError(f"no saved {a.bits}-bit models for {', '.join(methods)} in {a.results} "
                                f"(looked for {', '.join(str(d) for d in dirs.values())})")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, part in zip(axes, ("A", "B")):
        lim = max(v[part].abs().max().item() for v in found.values())
        bins = torch.linspace(-lim, lim, 121).tolist()
        for m, v in found.items():
            s = stats(v[part])
            print(f"{METHODS[m]:8} {part}: n {v[part].numel()}, std {s['std']:.4g}, max |x| {s['max_abs']:.4g}, "
                  f"excess kurtosis {s['excess_kurtosis']:.3g}")
            ax.hist(v[part].numpy(), bins=bins, histtype="step", linewidth=1.4,
                    label=f"{METHODS[m]} (std {s['std']:.3g}, kurtosis {s['excess_kurtosis']:.3g})")
        ax.set(yscale="log", xlabel=f"value of {part}", ylabel="count (log)",
               title=f"{part} ({'r x in' if part == 'A' else 'out x r'})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    where = "all linears" if not a.layer else f"linears matching '{a.layer}'"
    fig.suptitle(f"{a.bits}-bit: LoRA factors after initialisation ({where})")
    save(fig, a.out.format(bits=a.bits))


if __name__ == "__main__":
    from cli import run
    p = parser(__doc__, "adapters_w{bits}.png", methods="loftq,apiq-bw")
    p.add_argument("--layer", default="", help="only linears whose name contains this (e.g. layers.0.attention.wq)")
    run(main, p.parse_args())
