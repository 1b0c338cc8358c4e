"""Distributions of the LoRA factors A and B after LoftQ and after ApiQ-bw: the ApiQ paper's fig. 5.

    python plots/adapters.py out/results --bits 2           # -> figures/adapters_w2.png
    PAPER_BLOCKS=8 bash results.sh calib-bw-paper-w2        # the paper-start model, first 8 blocks

One column per factor (A, B), every model's values of it on the same axes, counts on a log scale
so that the tails show; below, the same values standardised ((x - mean) / std, each model its
own) beside a standard Gaussian, so that a narrow distribution's shape shows beside a wide one's.
The curves, each from a saved model in the results directory:

  LoftQ                                  <results>/loftq-w<bits>/: A, B from the SVD of W - Q(W)
                                         (results.sh step calib-loftq-w<bits>)
  ApiQ-bw, paper start                   <results>/apiq-bw-paper-w<bits>/: calibrated from the paper's
                                         start, A the standard LoRA init (kaiming uniform) and B = 0,
                                         plain rounding (calibrate.py --lora-init standard
                                         --no-learn-rounding; step calib-bw-paper-w<bits>)
  ApiQ-bw, SVD-start recipe (--quick)    <results>/apiq-bw-w<bits>/: our CPU recipe, which starts A, B
                                         from LoftQ's SVD and learns the rounding (step calib-bw-w<bits>)

The paper's observation: LoftQ's B is skewed and carries outliers; ApiQ's A and B come out smooth,
symmetric and Gaussian-like. For each model and factor one line gives n, std, skew, excess kurtosis
and max |x| (std, skew and kurtosis also in the legend). A model may be a calibration stopped after
K blocks (calibrate.py --stop-after K: no model.safetensors yet, its blocks in blocks/); then every
model is cut to the blocks they all have, and the title and printout say which (e.g. "blocks 0-7").
`--layer` keeps only the linears whose name contains it (names as layers.N.attention.wq); missing
models are left out with a note (none at all: an error).
"""
from pathlib import Path

import torch
from safetensors import safe_open

from common import parser, plt, save

CURVES = {  # --methods name -> (directory name, legend label)
    "loftq": ("loftq-w{bits}", "LoftQ"),
    "apiq-bw-paper": ("apiq-bw-paper-w{bits}", "ApiQ-bw, paper start (A kaiming, B = 0)"),
    "apiq-bw": ("apiq-bw-w{bits}", "ApiQ-bw, SVD-start recipe (--quick)"),
}
PARTS = ("A", "B")


def sources(model_dir: Path) -> dict:
    """{block: (safetensors file, key prefix of that block's linears)}: a finished model's
    model.safetensors (keys layers.N.attention.wq.A), else an unfinished calibration's
    blocks/block_NNN.safetensors (keys attention.wq.A)."""
    model = model_dir / "model.safetensors"
    if (model_dir / "apiq.json").is_file() and model.is_file():
        with safe_open(str(model), framework="pt") as f:
            blocks = sorted({int(k.split(".")[1]) for k in f.keys()
                             if k.startswith("layers.") and k.rpartition(".")[2] in PARTS})
        if not blocks:
            raise ValueError(f"{model}: no LoRA factors (a model without LoRA, e.g. RTN?)")
        return {b: (model, f"layers.{b}.") for b in blocks}
    files = sorted((model_dir / "blocks").glob("block_*.safetensors"))
    if files:
        return {int(p.stem.removeprefix("block_")): (p, "") for p in files}
    raise FileNotFoundError(f"{model_dir} holds neither a finished model (apiq.json, model.safetensors) "
                            f"nor calibrated blocks (blocks/block_NNN.safetensors)")


def read_factors(model_dir: Path, blocks=None, layer: str = "") -> dict:
    """{(block, linear name): {"A": A, "B": B}} (fp32) of the given blocks (default: all there),
    from either layout; names are the finished model's (layers.N.attention.wq) in both."""
    out = {}
    for b, (path, prefix) in sorted(sources(Path(model_dir)).items()):
        if blocks is not None and b not in blocks:
            continue
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if not k.startswith(prefix):
                    continue
                linear, _, part = k[len(prefix):].rpartition(".")
                name = f"layers.{b}.{linear}"
                if part in PARTS and layer in name:
                    out.setdefault((b, name), {})[part] = f.get_tensor(k).float()
    return out


def pooled(factors: dict) -> dict:
    """{"A": every A value, "B": every B value} (1-D)."""
    return {p: torch.cat([v[p].flatten() for _, v in sorted(factors.items())]) for p in PARTS}


def stats(x: torch.Tensor) -> dict:
    """n, std, skew, excess kurtosis and max |x| of all values of x. Population moments (divided by
    n, no Bessel correction): std = sqrt(E[(x-mu)^2]), skew = E[(x-mu)^3] / std^3, excess kurtosis
    = E[(x-mu)^4] / std^4 - 3 (0 for a Gaussian, -1.2 for a uniform, 6 for an exponential)."""
    x = x.double().flatten()
    d = x - x.mean()
    std = d.pow(2).mean().sqrt().item()
    skew = d.pow(3).mean().item() / std ** 3 if std > 0 else float("nan")
    kurt = d.pow(4).mean().item() / std ** 4 - 3 if std > 0 else float("nan")
    return {"n": x.numel(), "std": std, "skew": skew, "excess_kurtosis": kurt, "max_abs": x.abs().max().item()}


def span(blocks) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs, blocks = [], sorted(blocks)
    for b in blocks:
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ", ".join(f"{a}" if a == z else f"{a}-{z}" for a, z in runs)


def parse_curves(s: str) -> list:
    names = [m.strip() for m in s.split(",") if m.strip()]
    unknown = [m for m in names if m not in CURVES]
    if unknown or not names:
        raise ValueError(f"--methods: unknown or none ({', '.join(unknown)}); known: {', '.join(CURVES)}")
    return names


def main(a):
    names = parse_curves(a.methods)
    if not Path(a.results).is_dir():
        raise NotADirectoryError(f"results directory {a.results} does not exist (bash results.sh fills out/results)")
    dirs = {m: Path(a.results) / CURVES[m][0].format(bits=a.bits) for m in names}
    have = {m: sources(d) for m, d in dirs.items() if d.is_dir()}
    if not have:
        raise FileNotFoundError(f"no saved {a.bits}-bit models for {', '.join(names)} in {a.results} "
                                f"(looked for {', '.join(str(d) for d in dirs.values())})")
    for m, d in dirs.items():
        if m not in have:
            print(f"note: no {d} ({CURVES[m][1]}): left out")
    every = set.intersection(*(set(s) for s in have.values()))
    if not every:
        raise ValueError("the models share no block: " +
                         "; ".join(f"{dirs[m]}: blocks {span(s)}" for m, s in have.items()))
    cut = any(set(s) != every for s in have.values())
    blocks = f"blocks {span(every)}" + (" only, the blocks every model has" if cut else "")
    where = "all linears" if not a.layer else f"linears matching '{a.layer}'"
    print(f"{a.bits}-bit, {where}, {blocks}")
    found = {}
    for m in have:
        f = read_factors(dirs[m], every, a.layer)
        if not f:
            raise ValueError(f"{dirs[m]}: no LoRA factors in linears matching {a.layer!r} in {blocks}")
        found[m] = pooled(f)

    # top row: the values themselves, every model on the same bins; bottom row: each model's values
    # over its own std, against a standard Gaussian's expected counts, so that a narrow
    # distribution's shape (skew, tails) shows beside a wide one's
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.6), gridspec_kw=dict(hspace=0.3))
    for col, part in enumerate(PARTS):
        top, bottom = axes[0, col], axes[1, col]
        lim = max(v[part].abs().max().item() for v in found.values()) or 1.0
        z = {m: stats(v[part]) for m, v in found.items()}
        zlim = max((s["max_abs"] / s["std"] for s in z.values() if s["std"] > 0), default=1.0)
        n_bins, zbins, peak = 160, torch.linspace(-zlim, zlim, 161), 1.0
        for m, v in found.items():
            s = z[m]
            print(f"{CURVES[m][1]:39} {part}: n {s['n']}, std {s['std']:.4g}, skew {s['skew']:.3g}, "
                  f"excess kurtosis {s['excess_kurtosis']:.3g}, max |x| {s['max_abs']:.4g}")
            label = f"{CURVES[m][1]}: std {s['std']:.3g}, skew {s['skew']:.2g}, kurtosis {s['excess_kurtosis']:.3g}"
            top.hist(v[part].numpy(), bins=torch.linspace(-lim, lim, n_bins + 1).tolist(), histtype="step",
                     linewidth=1.4, label=label)
            if s["std"] > 0:
                x = v[part].double()
                counts, _, _ = bottom.hist(((x - x.mean()) / s["std"]).numpy(), bins=zbins.tolist(),
                                           histtype="step", linewidth=1.4, label=label)
                peak = max(peak, counts.max())
        n = max(s["n"] for s in z.values())
        gauss = n * (zbins[1] - zbins[0]) * torch.exp(-zbins ** 2 / 2) / (2 * torch.pi) ** 0.5
        bottom.plot(zbins.numpy(), gauss.numpy(), "k:", linewidth=1, label="standard Gaussian (expected counts)")
        shape = "r x in" if part == "A" else "out x r"
        top.set(yscale="log", xlabel=f"value of {part}", ylabel="count (log)", title=f"{part} ({shape})")
        bottom.set(yscale="log", xlabel=f"({part} - mean) / std, each model its own", ylabel="count (log)",
                   ylim=(0.5, 3 * peak), title=f"{part}, standardised: the shape")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
        bottom.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.suptitle(f"{a.bits}-bit: LoRA factors at the start of finetuning ({where}, {blocks}); "
                 f"kurtosis = excess kurtosis", fontsize=10)
    save(fig, a.out.format(bits=a.bits))


if __name__ == "__main__":
    from cli import run
    p = parser(__doc__, "adapters_w{bits}.png")
    p.add_argument("--bits", type=int, default=2, help="which results (default 2)")
    p.add_argument("--methods", default=",".join(CURVES), help=f"comma-separated, of: {', '.join(CURVES)}")
    p.add_argument("--layer", default="", help="only linears whose name contains this (e.g. layers.0.attention.wq)")
    run(main, p.parse_args())
