"""Zero-shot multiple-choice tasks of the second paper's Table 1 (Cao & Aref, arXiv 2504.13932;
docs/method.md §6): WinoGrande, HellaSwag, ARC-Challenge, ARC-Easy, PIQA, in lm-evaluation-harness's
prompt format, so that evaluate.zero_shot scores them as `lm_eval --tasks ...` does (0-shot).

    python tasks.py                      # counts and the first item of each task

Every loader returns items (context, continuations, gold). The harness scores each choice as the
request (context, " " + choice): " " is its target_delimiter, so every continuation here starts
with it and acc_norm divides by the choice's length without it (evaluate.zero_shot).
WinoGrande is "partial scoring" (Sakaguchi et al.; the harness's winogrande task): the sentence up
to the blank with each option filled in is a separate context, and the one common continuation
(the text after the blank) is scored under each; its items hold a list of contexts and a
one-element continuation list.

Sources, local files in the ../shared/data layout (data.data_root; see its README) else the Hub
datasets the harness's task YAMLs name:
  arc_easy / arc_challenge  arc/ARC-{Easy,Challenge}-Test.jsonl (AI2 jsonl; allenai/ai2_arc test).
      "Question: {stem}\\nAnswer:" / " {choice}"; gold = the answerKey's index in the label list
      (a few items use labels 1-4 instead of A-E).
  piqa  piqa/valid.jsonl + valid-labels.lst (baber/piqa validation).
      "Question: {goal}\\nAnswer:" / " {sol1}", " {sol2}".
  hellaswag  hellaswag/hellaswag_val_full.txt.bz2, llama.cpp's 6-lines-per-item text (Rowan/hellaswag
      validation). Harness: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) /
      " " + preprocess(ending). The local file has `activity_label: ctx` already cleaned by llama.cpp's
      extractor, with ctx_b NOT capitalised (ctx_a/ctx_b are not kept separately, so this cannot be
      undone) and "[title]" rules slightly different; we apply the harness's preprocess on top.
      Scores on the local file may therefore differ from the harness's by a little.
  winogrande  winogrande/winogrande_dev.llmfoundry.jsonl, llm-foundry's reformatting of the 1.1 dev set
      (allenai/winogrande winogrande_xl validation): context_options = the sentence up to "_" with
      option 1 / 2, continuation = the stripped text after "_", exactly the harness's partial_context /
      partial_target.
"""
import bz2
import json
import random
import re
from typing import NamedTuple

from cli import ArgumentParser, run
from data import data_root, hub_dataset

TASKS = ("winogrande", "hellaswag", "arc_challenge", "arc_easy", "piqa")  # Table 1's order
ACC_NORM = ("hellaswag", "arc_challenge", "arc_easy", "piqa")  # the harness reports only acc for winogrande


class Item(NamedTuple):
    context: str | list[str]  # one prompt, or one per option (WinoGrande)
    continuations: list[str]  # one per option, or the one common continuation (WinoGrande)
    gold: int


def item_requests(item: Item) -> list[tuple[str, str]]:
    """The (context, continuation) pairs to score, one per option."""
    if isinstance(item.context, list):
        return [(c, item.continuations[0]) for c in item.context]
    return [(item.context, c) for c in item.continuations]


def read_jsonl(path):
    if not path.exists():
        raise FileNotFoundError(f"no task file at {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def arc(level, data_dir=None) -> list[Item]:
    root = data_root(data_dir)
    if root is None:
        rows = [{"question": {"stem": r["question"], "choices": [{"text": t, "label": lab} for t, lab in
                 zip(r["choices"]["text"], r["choices"]["label"])]}, "answerKey": r["answerKey"]}
                for r in hub_dataset("allenai/ai2_arc", f"ARC-{level}", split="test")]
    else:
        rows = read_jsonl(root / "arc" / f"ARC-{level}-Test.jsonl")
    items = []
    for r in rows:
        choices = r["question"]["choices"]
        labels = [c["label"] for c in choices]
        items.append(Item(f"Question: {r['question']['stem']}\nAnswer:", [" " + c["text"] for c in choices],
                          labels.index(r["answerKey"])))
    return items


def piqa(data_dir=None) -> list[Item]:
    root = data_root(data_dir)
    if root is None:
        rows = list(hub_dataset("baber/piqa", split="validation"))
    else:
        rows = read_jsonl(root / "piqa" / "valid.jsonl")
        labels = (root / "piqa" / "valid-labels.lst").read_text().split()
        if len(labels) != len(rows):
            raise ValueError(f"PIQA: {len(rows)} items but {len(labels)} labels")
        rows = [r | {"label": int(lab)} for r, lab in zip(rows, labels)]
    return [Item(f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(r["label"]))
            for r in rows]


def hellaswag_preprocess(text):
    """The harness's hellaswag/utils.py preprocess: WikiHow's bracket tags out, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(data_dir=None) -> list[Item]:
    root = data_root(data_dir)
    if root is None:
        return [Item(hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
                     [" " + hellaswag_preprocess(e) for e in r["endings"]], int(r["label"]))
                for r in hub_dataset("Rowan/hellaswag", split="validation")]
    path = root / "hellaswag" / "hellaswag_val_full.txt.bz2"
    if not path.exists():
        raise FileNotFoundError(f"no task file at {path}")
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not 6 per item")
    return [Item(hellaswag_preprocess(lines[i]), [" " + hellaswag_preprocess(e) for e in lines[i + 2:i + 6]],
                 int(lines[i + 1])) for i in range(0, len(lines), 6)]


def winogrande(data_dir=None) -> list[Item]:
    root = data_root(data_dir)
    if root is None:
        items = []
        for r in hub_dataset("allenai/winogrande", "winogrande_xl", split="validation"):
            i = r["sentence"].index("_")
            items.append(Item([r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]],
                              [" " + r["sentence"][i + 1:].strip()], int(r["answer"]) - 1))
        return items
    rows = read_jsonl(root / "winogrande" / "winogrande_dev.llmfoundry.jsonl")
    return [Item(list(r["context_options"]), [" " + r["continuation"].strip()], int(r["gold"])) for r in rows]


# ---- the parts of a task for finetuning on it (ApiQ §4's commonsense study on the five local sets)

HELD_OUT, DEV = 300, 200    # items a task: held-out accuracy after finetuning; the dev part that choices are made on


class Split(NamedTuple):
    train: list       # finetuning examples
    dev: list         # every choice of the recipe is scored here
    held_out: list    # read only by the final evaluation


def split(items, seed=0, held_out=HELD_OUT, dev=DEV) -> Split:
    """A fixed three-way split of a task's items, a pure function of the items (the file) and the
    seed, the same for every method: the item indices shuffled once by random.Random(seed), the first
    `held_out` of them held out, the next `dev` the dev part, the rest train; each part in the
    file's order."""
    if held_out + dev >= len(items):
        raise ValueError(f"{len(items)} items cannot give {held_out} held-out and {dev} dev items and a train part")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held, dev_part, train = order[:held_out], order[held_out:held_out + dev], order[held_out + dev:]
    return Split(*([items[i] for i in sorted(part)] for part in (train, dev_part, held)))


def example(item: Item) -> tuple[str, str]:
    """(prompt, answer) of an item for finetuning: the context that leads to the gold option and the
    gold continuation, in the harness's format (WinoGrande: the sentence with the gold option filled
    in, then the common rest)."""
    if isinstance(item.context, list):
        return item.context[item.gold], item.continuations[0]
    return item.context, item.continuations[item.gold]


def load_task(name, data_dir=None) -> list[Item]:
    if name == "arc_easy":
        return arc("Easy", data_dir)
    if name == "arc_challenge":
        return arc("Challenge", data_dir)
    loaders = {"piqa": piqa, "hellaswag": hellaswag, "winogrande": winogrande}
    if name not in loaders:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return loaders[name](data_dir)


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="local data directory (../shared/data layout)")

    def main(a):
        print(f"data: {data_root(a.data_dir) or 'datasets (online)'}")
        for name in TASKS:
            items = load_task(name, a.data_dir)
            print(f"{name}: {len(items)} items; first: {items[0]}")

    run(main, p.parse_args())
