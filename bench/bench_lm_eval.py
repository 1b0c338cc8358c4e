"""lm-evaluation-harness on an exported model against evaluate.py on the apiq model it came from:
the same zero-shot items, two independent scorers.

    pip install lm-eval                     # benchmark-only, like the peers (requirements-bench.txt)
    python bench/bench_lm_eval.py out/results/apiq-bw-w2 --limit 200 --threads 1

export.py writes the transformers base + PEFT adapter of the quantized directory; lm-eval loads
them with `--model hf --model_args pretrained=BASE,peft=ADAPTER` (no apiq code) and runs its own
arc_easy and piqa task definitions, pointed at this repository's local copies of the data
(../shared/data: the AI2 ARC-Easy test file and the PIQA validation file with its labels,
rewritten into the Hub datasets' fields, first --limit items); evaluate.zero_shot scores the same
items on the apiq model. Printed: acc and acc_norm of both, and their difference in points.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK_YAML = """task: {task}_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{text}"
doc_to_target: {target}
doc_to_choice: "{choice}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
# lm-eval 0.4's own arc_easy.yaml and piqa.yaml, dataset fields as on the Hub (allenai/ai2_arc, baber/piqa)
TASKS = {
    "arc_easy": dict(text="Question: {{question}}\\nAnswer:", target="\"{{choices.label.index(answerKey)}}\"",
                     choice="{{choices.text}}"),
    "piqa": dict(text="Question: {{goal}}\\nAnswer:", target="label", choice="{{[sol1, sol2]}}"),
}


def hub_rows(task, data_dir, limit):
    """The first `limit` items of the local file in the Hub dataset's fields."""
    if task == "arc_easy":
        rows = [json.loads(line) for line in (data_dir / "arc" / "ARC-Easy-Test.jsonl").open()][:limit]
        return [{"question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]
    goals = [json.loads(line) for line in (data_dir / "piqa" / "valid.jsonl").open()][:limit]
    labels = (data_dir / "piqa" / "valid-labels.lst").read_text().split()[:limit]
    return [{"goal": g["goal"], "sol1": g["sol1"], "sol2": g["sol2"], "label": int(y)} for g, y in zip(goals, labels)]


def quiet_peft_gptq_dispatch():
    """peft asks for `optimum` when it finds gptqmodel (bench_peers.py's GPTQ peer) installed; the
    export has no GPTQ layers, so that dispatch is switched off."""
    import peft.tuners.lora.awq as awq
    import peft.tuners.lora.gptq as gptq
    awq.is_gptqmodel_available = gptq.is_gptqmodel_available = lambda: False


def main(a):
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    import export
    from data import data_root
    from evaluate import zero_shot
    from qmodel import load
    from tasks import load_task
    torch.set_num_threads(a.threads)
    quiet_peft_gptq_dispatch()
    data_dir = data_root()
    if data_dir is None:
        raise FileNotFoundError("this benchmark reads ../shared/data (or $APIQ_DATA_DIR)")
    tmp = Path(tempfile.mkdtemp(prefix="lm-eval-"))
    base, adapter = export.export(a.model, tmp / "hf")
    for task, fmt in TASKS.items():
        path = tmp / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in hub_rows(task, data_dir, a.limit)))
        (tmp / f"{task}_local.yaml").write_text(TASK_YAML.format(task=task, path=path, **fmt))
    model_args = f"pretrained={base},dtype=float32" + (f",peft={adapter}" if adapter else "")
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=[f"{t}_local" for t in TASKS],
                                  task_manager=TaskManager(include_path=str(tmp)), batch_size=1, device="cpu")
    ours_model, tok = load(a.model)
    print(f"\n{a.model}, first {a.limit} items; lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''} "
          f"on the export vs evaluate.py on the apiq model\n")
    print("| task | metric | lm-eval (export) | evaluate.py | difference (points) |\n|---|---|---|---|---|")
    for task in TASKS:
        theirs = out["results"][f"{task}_local"]
        ours = zero_shot(ours_model, tok, task, load_task(task)[:a.limit])
        for metric in ("acc", "acc_norm"):
            t, o = 100 * theirs[f"{metric},none"], 100 * ours[metric]
            print(f"| {task} | {metric} | {t:.2f} | {o:.2f} | {t - o:+.2f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="quantized model directory (calibrate.py / finetune.py)")
    p.add_argument("--limit", type=int, default=200, help="items per task (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    from cli import run
    run(main, a)
