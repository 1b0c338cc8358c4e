"""Task accuracy after LoRA finetuning from each start, by bits: ApiQ's Figure 1 (Liao et al., EMNLP
2024: the average accuracy of QLoRA, LoftQ and ApiQ-bw after finetuning, by bit width, full
precision + LoRA as the reference) for SmolLM2 on the five local commonsense tasks.

    python plots/task_study.py out/results/tasks --json bench/results/task_study.json   # collect, then draw
    python plots/task_study.py bench/results/task_study.json                           # draw the kept JSON

A study made over several sessions or machines: a run already in the --json file and not under
the results directory is kept (a row under the directory replaces the file's row of the same start,
bits and seed), so each lane's directory can be collected into one JSON in turn.

Reads RESULTS/<start>-w<bits>-s<seed>/finetune_log.json and RESULTS/fp-lora-s<seed>/finetune_log.json
(results.sh tasks-* steps: finetune.py --data commonsense --eval-before; full precision's start is
scored by evaluate.py into RESULTS/fp-before.json, results.sh tasks-fp-before), writes one row a run to
--json: before and after finetuning, each task's accuracy on its held-out items by the official
evaluation (the answer generated, parsed) and by lm-eval's log-likelihood scoring, their averages
with a standard error, minutes and peak memory. The figure: one panel a scoring, the after-finetuning
average of each start by bits (seeds averaged; error bars: the standard error of that average),
full precision + LoRA a horizontal line, chance a dotted one (1 / the number of options, averaged
over the scored items and then the tasks), each start's before-finetuning average a hollow marker.
Prints the Markdown table.
"""
import math
import re
from pathlib import Path

from common import METHODS, parser, plt, read_json, save

STARTS = ("qlora", "loftq", "apiq-bw")               # the paper's three, in its order
SCORINGS = {"generated": "answer generated (official evaluation)", "zeroshot": "log-likelihood (lm-eval)"}


def scores(ev: dict) -> dict:
    """finetune.py's task evaluation -> {scoring: {"tasks": {task: acc}, "avg", "se", "n"}}: the
    average over tasks, and its standard error sqrt(sum_t p_t (1 - p_t) / n_t) / n_tasks."""
    out = {}
    for scoring in SCORINGS:
        per = ev["tasks"][scoring]                                    # {task: {"acc", "n", ...}}
        accs = {t: r["acc"] for t, r in per.items()}
        var = sum(r["acc"] * (1 - r["acc"]) / r["n"] for r in per.values())
        out[scoring] = {"tasks": accs, "avg": sum(accs.values()) / len(accs), "se": math.sqrt(var) / len(accs),
                        "n": min(r["n"] for r in per.values())}
    return out


def chance(rows: list, data_dir=None) -> dict:
    """{task: mean over the scored items of 1 / their number of options, "avg": over the tasks}: what
    answering at random scores, on the held-out items the runs were scored on (the first n of
    examples.task_parts' part)."""
    from examples import task_parts
    from tasks import item_requests
    scored = rows[0]["after"]["zeroshot"]                      # every row: the same part, tasks and n
    out = {}
    for task in scored["tasks"]:
        items = getattr(task_parts(task, data_dir), rows[0]["part"])[: scored["n"]]
        out[task] = sum(1 / len(item_requests(i)) for i in items) / len(items)
    out["avg"] = sum(out.values()) / len(out)
    return out


def collect(results: Path) -> list:
    """One row a finished run under `results`."""
    rows = []
    for f in sorted(results.glob("*/finetune_log.json")):
        m = re.fullmatch(r"(fp-lora|[a-z-]+?-w(\d))-s(\d+)", f.parent.name)
        if not m:
            continue
        log = read_json(f)
        if "tasks" not in (log.get("eval") or {}):
            raise ValueError(f"{f}: no task evaluation (finetune.py --data commonsense scores the tasks at the end)")
        start = "fp-lora" if m[1] == "fp-lora" else m[1].rsplit("-w", 1)[0]
        before = log.get("eval_before")
        rows.append({"start": start, "bits": int(m[2]) if m[2] else None, "seed": int(m[3]),
                     "before": scores(before) if before and "tasks" in before else None,
                     "after": scores(log["eval"]), "part": log["eval"]["tasks"]["part"], "steps": log["steps"],
                     "minutes": round(log["seconds"] / 60, 2), "peak_gib": log.get("peak_gib")})
    return rows


def summary(rows: list, scoring: str) -> dict:
    """{(start, bits): (mean after, its standard error, mean before or None, seeds)} over seeds;
    the error of a mean over k seeds' averages: sqrt(sum se^2) / k (the items are the same, so
    this counts only the item sampling once per seed: a lower bound on the seed-to-seed spread)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["start"], r["bits"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        after = [r["after"][scoring] for r in rs]
        befores = [r["before"][scoring]["avg"] for r in rs if r["before"]]
        out[key] = (sum(a["avg"] for a in after) / len(after), math.sqrt(sum(a["se"] ** 2 for a in after)) / len(after),
                    befores[0] if befores else None, len(rs))
    return out


def table(rows: list) -> str:
    lines = ["| start | bits | seed | generated before | after | log-likelihood before | after | minutes | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(s, scoring):
        return "-" if s is None else f"{100 * s[scoring]['avg']:.1f} ± {100 * s[scoring]['se']:.1f}"
    order = ("fp-lora",) + STARTS
    for r in sorted(rows, key=lambda r: (r["bits"] or 0, order.index(r["start"]) if r["start"] in order else 9,
                                         r["seed"])):
        label = "full precision + LoRA" if r["start"] == "fp-lora" else METHODS.get(r["start"], r["start"])
        lines.append(f"| {label} | {r['bits'] or 'fp32'} | {r['seed']} | {cell(r['before'], 'generated')} | "
                     f"{cell(r['after'], 'generated')} | {cell(r['before'], 'zeroshot')} | "
                     f"{cell(r['after'], 'zeroshot')} | {r['minutes']} | {r['peak_gib']} |")
    return "\n".join(lines)


def draw(rows: list, out: str, chance_avg=None):
    bits = sorted({r["bits"] for r in rows if r["bits"]})
    starts = [s for s in STARTS if any(r["start"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(SCORINGS), figsize=(5.5 * len(SCORINGS), 4), squeeze=False)
    width = 0.8 / max(len(starts), 1)
    for ax, (scoring, title) in zip(axes[0], SCORINGS.items()):
        s = summary(rows, scoring)
        for k, start in enumerate(starts):
            xs = [i + (k - (len(starts) - 1) / 2) * width for i, b in enumerate(bits) if (start, b) in s]
            got = [s[(start, b)] for b in bits if (start, b) in s]
            bars = ax.bar(xs, [100 * g[0] for g in got], width, yerr=[100 * g[1] for g in got], capsize=3,
                          label=METHODS.get(start, start))
            ax.scatter([x for x, g in zip(xs, got) if g[2] is not None],
                       [100 * g[2] for g in got if g[2] is not None], marker="o", facecolors="none",
                       edgecolors=bars.patches[0].get_facecolor() if bars.patches else "k", zorder=3)
        if (ref := s.get(("fp-lora", None))) is not None:
            ax.axhline(100 * ref[0], color="k", ls="--", lw=1, label="full precision + LoRA")
        if chance_avg is not None:
            ax.axhline(100 * chance_avg, color="0.4", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(bits)), [f"{b} bits" for b in bits])
        ax.set_ylabel("average accuracy after finetuning (%)")
        ax.set_title(title, fontsize=10)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2-135M: 5 commonsense tasks after finetune.py --data commonsense (hollow: before)",
                 fontsize=10)
    save(fig, out)


def main(a):
    src = Path(a.results)
    if src.is_dir():
        rows = collect(src)
        if not rows:
            raise ValueError(f"{src}: no finished run (<start>-w<bits>-s<seed>/finetune_log.json; "
                             f"results.sh tasks-* steps)")
        if a.json and Path(a.json).is_file():
            new = {(r["start"], r["bits"], r["seed"]) for r in rows}
            kept = [r for r in read_json(Path(a.json))["rows"] if (r["start"], r["bits"], r["seed"]) not in new]
            print(f"kept {len(kept)} run(s) of {a.json} not under {src}")
            rows = kept + rows
        if (fp := src / "fp-before.json").is_file():          # evaluate.py --generate-answers on the same items
            ev = read_json(fp)
            for r in rows:
                if r["start"] == "fp-lora":
                    r["before"] = scores({"tasks": {"zeroshot": ev["zeroshot"], "generated": ev["zeroshot_generated"]}})
        odds = chance(rows)
        if a.json:
            from cli import write_json
            write_json(a.json, {"model": "smollm2-135m", "source": "plots/task_study.py over results.sh tasks-* steps",
                                "chance": odds, "rows": rows})
            print(f"wrote {a.json}")
    elif src.is_file():
        study = read_json(src)
        rows, odds = study["rows"], study.get("chance") or chance(study["rows"])
    else:
        raise FileNotFoundError(f"{src}: neither a results directory nor a JSON written by this script")
    print(table(rows))
    print(f"chance (1 / options, the same items): {100 * odds['avg']:.1f} on average; "
          + ", ".join(f"{t} {100 * p:.1f}" for t, p in odds.items() if t != "avg"))
    draw(rows, a.out, odds["avg"])


if __name__ == "__main__":
    p = parser(__doc__, "task_study.png")
    p.set_defaults(results="out/results/tasks")
    p.add_argument("--json", default=None, help="with a results directory: write the rows here (e.g. "
                                                "bench/results/task_study.json)")
    from cli import run
    run(main, p.parse_args())
