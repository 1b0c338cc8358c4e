"""Finetuning examples, prompt -> answer, as ApiQ's official finetuning on tasks builds them
(Liao et al., EMNLP 2024, §4 and its commonsense tables; BaohaoLiao/ApiQ `finetuning/
train_multitask.py --task commonsense` and `finetuning/train_gsm8k.py`): where the examples come
from, their tokens with the loss on the answer only, batches padded on the right, and the answer
read back out of a generation (`finetuning/compute_metrics.py`).

    python examples.py --ckpt smollm2-135m      # the commonsense mix: counts, tokens, one example

An example is a (prompt, answer) pair of strings. The model reads BOS (where the tokenizer adds one)
+ prompt + answer + EOS as one row, and the loss is the next-token cross-entropy of the answer's
tokens and EOS only: as in the official scripts, the prompt is tokenised alone and that many leading
tokens are left out of the loss (their IGNORE_INDEX). The official scripts truncate a row at 512
tokens; here a row longer than the window is an error (a file's example) or left out (a built-in
or downloaded set's, counted). A batch's rows are padded on the right to its longest row (no packing
across examples) and the padding is masked out of the loss. The official loader also puts one pad
token with attention mask 0 before every row; with rotary positions this changes no logit, so it is
not done here.

The commonsense template (train_multitask.py's task_config): prompt = instruction + "\\n", answer =
"the correct answer is " + the gold option's name (answer1.., solution1.., option1.., ending1..),
in the instructions of commonsense_170k (LLM-Adapters, Hu et al. 2023). Its evaluation generates
greedily from the prompt (32 new tokens at most) and counts an item correct when the text after
"the correct answer is " is exactly the gold name (parse_answer).

Sources (finetune.py --data):
  commonsense  the five local tasks of tasks.py, each split by tasks.split with SPLIT_SEED into
      train, dev and held-out parts (the same for every method); the train parts pooled, shuffled with
      SPLIT_SEED and taken in that order up to about MAX_TOKENS tokens, a mix in proportion to each
      task's size as commonsense_170k mixes its tasks (whole training sets, concatenated). A train item
      whose prompt equals a dev or held-out prompt of any task is left out (by content, not index).
      Each item is written in commonsense_170k's instruction for its task (commonsense_instruction).
  commonsense_170k, gsm8k  the official training sets through `datasets` (a Hub copy of LLM-Adapters'
      commonsense_170k.json; GSM8K's main train split), where the Hub can be reached.
  FILE.jsonl / FILE.json  one record a line (or a JSON list), told by its fields: "prompt" and
      "answer" (used as given, joined with nothing between); "instruction" and "output" (the layout of
      commonsense_170k.json and math_10k.json: the commonsense template); "question" and "answer"
      (GSM8K's: train_gsm8k.py's format). A .jsonl whose first record has "text" is text, not
      examples (data.train_windows).
"""
import json
import os
import random
from pathlib import Path
from typing import NamedTuple

import torch

from cli import ArgumentParser, run
from data import hub_dataset
from tasks import TASKS, Item, load_task, split

SPLIT_SEED = 0           # tasks.split's seed and the mix's shuffle: fixed, the same for every method
MAX_TOKENS = 100_000     # the commonsense mix's tokens (prompt + answer + BOS/EOS of its examples)
TRIGGER = "the correct answer is "                       # task_config["commonsense"]["trigger_tokens"]
GEN_TOKENS = 32                                          # its generation_args: max_new_tokens
GSM8K_QUESTION = "\nAnswer the above question. First think step by step and then answer the final number.\n"
GSM8K_ANSWER = "The final answer is: "                   # train_gsm8k.py puts it where GSM8K has "####"
HUB = {"commonsense_170k": ("zwhe99/commonsense_170k",), "gsm8k": ("openai/gsm8k", "main")}
BUILT_IN = ("commonsense",) + tuple(HUB)


class Example(NamedTuple):
    prompt: str
    answer: str
    where: str          # for messages: FILE:LINE, or task#index


class Encoded(NamedTuple):
    ids: list           # BOS + prompt + answer + EOS
    start: int          # ids[start:] are the answer's tokens and EOS: the loss is on them
    where: str


# ---- the commonsense template

def winogrande_sentence(item: Item) -> tuple[str, list[str]]:
    """The sentence with its blank "_" and the two options, rebuilt from the harness's partial
    contexts (the local file keeps no other form): the options start where the two contexts part,
    moved back to a word's start; the text after the blank follows a space unless it opens with
    punctuation ("_'s", "_.")."""
    a, b = item.context
    i = len(os.path.commonprefix([a, b]))
    i = a.rfind(" ", 0, i) + 1
    rest = item.continuations[0].lstrip()
    gap = "" if rest[:1] in tuple(".,;:!?'\u2019)") else " "
    return a[:i] + "_" + gap + rest, [a[i:], b[i:]]


def commonsense_instruction(task: str, item: Item) -> tuple[str, str]:
    """(instruction, gold option's name) of a tasks.Item in commonsense_170k's wording for its task."""
    if task == "winogrande":
        sentence, (o1, o2) = winogrande_sentence(item)
        return (f"Please choose the correct answer to fill in the blank to complete the given sentence: {sentence}"
                f"\n\nOption1: {o1} Option2: {o2} Answer format: option1/option2", f"option{item.gold + 1}")
    options = [c.removeprefix(" ") for c in item.continuations]
    if task == "hellaswag":
        head = f"Please choose the correct ending to complete the given sentence: {item.context}"
        name, sep = "ending", " "
    else:                               # "Question: {question}\nAnswer:" in tasks.py
        question = item.context.removeprefix("Question: ").removesuffix("\nAnswer:")
        if task == "piqa":
            head, name, sep = f"Please choose the correct solution to the question: {question}", "solution", "\n\n"
        else:
            head, name, sep = f"Please choose the correct answer to the question: {question}", "answer", " "
    listed = sep.join(f"{name.capitalize()}{k + 1}: {o}" for k, o in enumerate(options))
    names = "/".join(f"{name}{k + 1}" for k in range(len(options)))
    return f"{head}\n\n{listed}\n\nAnswer format: {names}", f"{name}{item.gold + 1}"


def commonsense_example(task: str, item: Item, where="") -> Example:
    instruction, gold = commonsense_instruction(task, item)
    return Example(instruction + "\n", TRIGGER + gold, where)


def parse_answer(generated: str) -> str:
    """What a generation answers: the text after the first "the correct answer is ", left-stripped,
    or "" where it never says so (compute_metrics.py's extract_output)."""
    i = generated.find(TRIGGER)
    return "" if i < 0 else generated[i + len(TRIGGER):].lstrip()


def is_correct(generated: str, gold: str) -> bool:
    """Exact match of the parsed answer with the gold option's name, as the official evaluation."""
    return parse_answer(generated).strip() == gold.strip()


def task_parts(name, data_dir=None):
    """tasks.split of a task's items with SPLIT_SEED: (train, dev, held_out)."""
    return split(load_task(name, data_dir), seed=SPLIT_SEED)


def commonsense_train(data_dir=None, tasks=TASKS) -> list[Example]:
    """The train parts of the tasks, pooled and shuffled with SPLIT_SEED, less any item whose prompt
    is also a dev or held-out prompt."""
    pool, unseen = [], set()
    for name in tasks:
        parts = task_parts(name, data_dir)
        unseen |= {commonsense_example(name, it).prompt for it in parts.dev + parts.held_out}
        pool += [commonsense_example(name, it, f"{name} train #{i}") for i, it in enumerate(parts.train)]
    random.Random(SPLIT_SEED).shuffle(pool)
    return [ex for ex in pool if ex.prompt not in unseen]


# ---- records of a file or of a Hub set

def record_example(r, where) -> Example:
    """The (prompt, answer) of one record, by its fields (the module docstring)."""
    if not isinstance(r, dict):
        raise ValueError(f"{where}: not a JSON object with \"prompt\" and \"answer\"")
    if "prompt" in r:
        fields = ("prompt", "answer")
    elif "instruction" in r:
        fields = ("instruction", "output")
    elif "question" in r:
        fields = ("question", "answer")
    else:
        raise ValueError(f"{where}: no \"prompt\" field (a record needs \"prompt\" and \"answer\"; or \"instruction\" "
                         f"and \"output\"; or \"question\" and \"answer\"); it has {', '.join(map(repr, r)) or 'none'}")
    for k in fields:
        if k not in r:
            raise ValueError(f"{where}: no \"{k}\" field (a record with \"{fields[0]}\" needs \"{fields[1]}\")")
        if not isinstance(r[k], str):
            raise ValueError(f"{where}: \"{k}\" must be a string, not {type(r[k]).__name__}")
    if not r[fields[1]].strip():
        raise ValueError(f"{where}: empty answer (\"{fields[1]}\" is {r[fields[1]]!r})")
    prompt, answer = r[fields[0]], r[fields[1]]
    if fields[0] == "instruction":
        prompt = prompt + "\n"                                    # train_multitask.py's "%s\n"
    elif fields[0] == "question":
        prompt, answer = prompt + GSM8K_QUESTION, answer.replace("####", GSM8K_ANSWER)
    return Example(prompt, answer, where)


def first_record(path):
    """The first record of a .jsonl file (None if it has none or is not JSON), to tell text from examples."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def is_examples(data: str) -> bool:
    """Does --data name examples (else text)?"""
    if data in BUILT_IN:
        return True
    f = Path(data)
    if f.suffix == ".json":
        return True
    if f.suffix != ".jsonl" or not f.is_file():
        return False
    r = first_record(f)
    return not (isinstance(r, dict) and "text" in r)


def read_examples(path) -> list[Example]:
    """The examples of a .jsonl (one record a line) or .json (a list of records) file; one clear
    error naming the file and line for anything that is not an example."""
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    text = f.read_text(encoding="utf-8")
    if f.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{f}: a .json file of examples holds a list of records")
        out = [record_example(r, f"{f} record {i}") for i, r in enumerate(rows)]
    else:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: not JSON ({e})") from None
                out.append(record_example(r, f"{f}:{n}"))
    if not out:
        raise ValueError(f"{f}: no examples (the file is empty)")
    return out


def hub_examples(name) -> list[Example]:
    repo = HUB[name]
    try:
        rows = hub_dataset(*repo, split="train")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--data {name}: `datasets` could not load {'/'.join(repo)} here ({e}); give a local "
                                f"copy as --data FILE.json or FILE.jsonl") from None
    return [record_example(r, f"{repo[0]} row {i}") for i, r in enumerate(rows)]


# ---- tokens and batches

def encode(tok, ex: Example) -> Encoded:
    """BOS + prompt + answer + EOS, the answer's tokens being those after the prompt's own count (an
    empty prompt without BOS starts from BOS or EOS, so that the answer's first token is predicted)."""
    head = tok.encode(ex.prompt, bos=True)
    ids = tok.encode(ex.prompt + ex.answer, bos=True) + ([tok.eos_id] if tok.eos_id is not None else [])
    if not head:
        head = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
        ids = head + ids
    return Encoded(ids, len(head), ex.where)


def take(rows, seqlen, max_tokens=None, strict=False) -> tuple[list[Encoded], int]:
    """(the rows that fit a window of seqlen tokens, in order, until the next would take their tokens
    past max_tokens; how many were longer than the window and left out). strict: a row longer than
    the window is an error that names where it came from."""
    out, total, dropped = [], 0, 0
    for r in rows:
        if len(r.ids) > seqlen:
            if strict:
                raise ValueError(f"{r.where}: the example is {len(r.ids)} tokens (prompt + answer + BOS/EOS), longer "
                                 f"than the window of --seqlen {seqlen}")
            dropped += 1
            continue
        if max_tokens is not None and total + len(r.ids) > max_tokens:
            break
        out.append(r)
        total += len(r.ids)
    return out, dropped


def pad_batch(rows: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T): the rows padded on the right with token 0 to the longest, T its length; mask
    (B, T - 1): True where position t predicts an answer token x[:, t + 1]."""
    T = max(len(r.ids) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)                            # (B, T)
    mask = torch.zeros(len(rows), T - 1, dtype=torch.bool)                     # (B, T - 1)
    for i, r in enumerate(rows):
        x[i, :len(r.ids)] = torch.tensor(r.ids)
        mask[i, r.start - 1:len(r.ids) - 1] = True
    return x, mask


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="smollm2-135m", help="model whose tokenizer counts the tokens")
    p.add_argument("--data-dir", default=None, help="local data directory (../shared/data layout)")

    def main(a):
        from qmodel import load
        _, tok = load(a.ckpt)
        for name in TASKS:
            parts = task_parts(name, a.data_dir)
            print(f"{name}: train {len(parts.train)}, dev {len(parts.dev)}, held-out {len(parts.held_out)}")
        rows, _ = take((encode(tok, ex) for ex in commonsense_train(a.data_dir)), 512, MAX_TOKENS)
        counts = {t: sum(r.where.startswith(t + " ") for r in rows) for t in TASKS}
        print(f"the mix: {len(rows)} examples, {sum(len(r.ids) for r in rows)} tokens; {counts}")
        ex = commonsense_train(a.data_dir)[0]
        print(f"first example ({ex.where}):\n{ex.prompt}{ex.answer}")

    run(main, p.parse_args())
