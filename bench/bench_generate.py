"""The official commonsense evaluation's generation (evaluate.generation_accuracy: 32 greedy tokens
from each item's commonsense_170k prompt) one item at a time against left-padded batches
(evaluate.generate_greedy): items per second both ways, their ratio, and whether the generated
texts and the accuracy agree. On a CPU a new token reads every weight once, whether for one row or
for sixteen, so a batch shares that read.

    python bench/bench_generate.py [--ckpt smollm2-135m] [--task arc_easy] [--items 32] [--batch 16] [--threads 1]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from evaluate import generation_accuracy  # noqa: E402
from examples import task_parts  # noqa: E402
from qmodel import load  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="smollm2-135m", help="a model name or a quantized model's directory")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--items", type=int, default=32, help="the first this many held-out items")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load(a.ckpt)
    model.eval()
    items = task_parts(a.task, a.data_dir).held_out[: a.items]
    runs = {}
    for bs in (1, a.batch):
        t = time.time()
        runs[bs] = generation_accuracy(model, tok, a.task, items, samples=len(items), batch_size=bs)
        runs[bs]["seconds"] = time.time() - t
        print(f"batch {bs:3d}: {len(items) / runs[bs]['seconds']:.2f} items/s ({runs[bs]['seconds']:.1f} s), "
              f"accuracy {runs[bs]['acc']:.4f}")
    one, many = runs[1], runs[a.batch]
    same = sum(x["generated"] == y["generated"] for x, y in zip(one["samples"], many["samples"]))
    print(f"{a.ckpt}, {a.task}, {len(items)} items, {a.threads} thread(s): batch {a.batch} is "
          f"{one['seconds'] / many['seconds']:.2f}x the items per second of one at a time; "
          f"{same}/{len(items)} generated texts identical; accuracy {one['acc']:.4f} vs {many['acc']:.4f}")


if __name__ == "__main__":
    main()
