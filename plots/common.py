"""What the plot scripts share: the results directory that results.sh / evaluate.py --json fill,
the methods' names, and saving a figure so that an interrupted run leaves no half-written PNG.

A results directory holds `<method>-w<bits>.json` (evaluate.py --json), `fp.json`, and the saved
models `<method>-w<bits>/` (model.safetensors with each linear's A and B)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qmodel  # noqa: E402
from cli import ArgumentParser  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402,F401  (the scripts take plt from here)

# file prefix -> label, in the paper's order: calibrate.py's methods (qmodel.METHODS), then the
# saliency penalty's two variants (results.sh names their files so)
METHODS = {m.name: m.label for m in qmodel.METHODS.values()} | {
    "apiq-bw-sal-after": "ApiQ-bw + saliency (AfterLoRA)",
    "apiq-bw-sal-before": "ApiQ-bw + saliency (BeforeLoRA)",
}
DATASETS = {"wikitext2": "WikiText-2 test", "c4": "C4 validation",   # perplexity sets: their titles
            "wikitext2_valid": "WikiText-2 validation (the tuning set)", "c4_tuning": "C4 (the tuning set's part)"}
WINDOWS = {"wikitext2": "limit", "c4": "c4_limit", "wikitext2_valid": "limit", "c4_tuning": "c4_limit"}   # bench_peers.py rows: window counts


def windows(row: dict, dataset: str) -> int:
    """The windows a bench_peers.py row was evaluated on: its `windows` record (rows since --limit 0,
    every window), else its --limit / --c4-limit."""
    return row.get("windows", {}).get(dataset) or row[WINDOWS[dataset]]
PEERS = ("hqq", "gptq", "autoround")                 # bench_peers.py's other tools (ours: rtn, loftq, apiq)


def family(method: str) -> str:
    """A peers.json row's method family: apiq-quick -> apiq, autoround-lr5e-3 -> autoround;
    ApiQ-lw (row apiq-lw) is its own."""
    return "apiq-lw" if method.startswith("apiq-lw") else method.split("-")[0]


def parser(doc: str, png: str, methods: str = None) -> ArgumentParser:
    """The scripts' arguments; with `methods` (the default list) also --bits and --methods."""
    p = ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("results", nargs="?", default="out/results", help="results directory (default out/results)")
    p.add_argument("--out", default=f"figures/{png}", help=f"PNG to write (default figures/{png})")
    if methods is not None:
        p.add_argument("--bits", type=int, default=2, help="which results (default 2)")
        p.add_argument("--methods", default=methods, help=f"comma-separated, of: {', '.join(METHODS)}")
    return p


def parse_methods(s: str) -> list:
    names = [m.strip() for m in s.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return names


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def load_results(results: str, methods, bits: int) -> dict:
    """{method: parsed JSON} for the methods whose `<method>-w<bits>.json` exists."""
    d = Path(results)
    if not d.is_dir():
        raise NotADirectoryError(f"results directory {d} does not exist (bash results.sh fills out/results)")
    return {m: read_json(d / f"{m}-w{bits}.json") for m in methods if (d / f"{m}-w{bits}.json").is_file()}


def save(fig, out: str):
    """Write the PNG next to its final name, then rename: no half-written figure survives a crash."""
    from cli import atomic_write
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))
    print(f"wrote {out}")
