"""Text data: WikiText-2 raw and C4 validation, from local files or `datasets`, cut into the
windows the GPTQ/OmniQuant/ApiQ evaluation and calibration protocols use (docs/method.md §4, §6).

    python data.py --ckpt smollm2-135m          # prints what is found and how many tokens

Local files follow the ../shared/data layout (wikitext2_raw/wiki.{train,valid,test}.raw,
c4/c4_validation_2k.jsonl). Which directory: --data-dir, else $APIQ_DATA_DIR, else
../shared/data beside this repository; with none of those, `datasets` downloads the same sets.
Note: the shared WikiText-2 train file is only its first 1018 lines (wiki.train.head1018.raw),
so offline calibration windows are drawn from ~2.7% of the train split.
"""
import json
import os
import random
from pathlib import Path

import torch

from cli import ArgumentParser, run
from qmodel import load

DATASETS = ("wikitext2", "c4")                           # the test sets (calibration: WikiText-2 train or C4)
CALIBRATION_SETS = ("wikitext2", "c4", "wikitext2+c4")    # calib_windows: train text, C4 or half each
TUNING = "wikitext2-valid"     # the tuning set: WikiText-2 validation, windowed as the test set; no run trains on it
TUNING_C4 = "c4-tuning"        # its C4 part: C4 validation documents that no C4 test window touches, joined
WIKITEXT_FILES = {"train": ("wiki.train.raw", "wiki.train.head1018.raw"),
                  "validation": ("wiki.valid.raw",), "test": ("wiki.test.raw",)}


def data_root(data_dir=None):
    """The local data directory, or None (then `datasets` is used)."""
    if data_dir or os.environ.get("APIQ_DATA_DIR"):
        d = Path(data_dir or os.environ["APIQ_DATA_DIR"]).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(f"data directory {d} does not exist")
        return d
    d = Path(__file__).resolve().parent.parent / "shared" / "data"
    return d if d.is_dir() else None


def hub_dataset(*args, **kw):
    """datasets.load_dataset(*args, **kw) where no local data directory was found; one line, fast,
    where the hub cannot be reached (instead of its retries and a ConnectionError traceback)."""
    import socket
    from urllib.parse import urlparse
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    how = ("no local data: give --data-dir DIR or set APIQ_DATA_DIR (a directory in the ../shared/data layout: "
           "wikitext2_raw/, c4/), or put one at ../shared/data beside this repository")
    if not offline:
        from huggingface_hub import constants
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        except OSError as e:
            raise FileNotFoundError(f"{how}; the datasets hub is not reachable either ({e})") from None
    from datasets import load_dataset
    try:
        return load_dataset(*args, **kw)
    except Exception as e:                # ConnectionError, an offline cache miss, a hub error
        raise FileNotFoundError(f"{how}; datasets could not load {args[0]} either: {str(e).splitlines()[0]}") from None


def wikitext2_rows(split, data_dir=None):
    """Rows as Hugging Face's wikitext-2-raw-v1 has them: each line with its '\\n', blank lines ''."""
    if split not in WIKITEXT_FILES:
        raise ValueError(f"unknown WikiText-2 split {split!r}: choose from {', '.join(WIKITEXT_FILES)}")
    root = data_root(data_dir)
    if root is None:
        return hub_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    for name in WIKITEXT_FILES[split]:
        f = root / "wikitext2_raw" / name
        if f.exists():
            lines = f.read_text(encoding="utf-8").split("\n")[:-1]  # the file ends with '\n'
            return [line + "\n" if line.strip() else "" for line in lines]
    raise FileNotFoundError(f"no WikiText-2 {split} file in {root / 'wikitext2_raw'}")


def c4_docs(data_dir=None):
    """C4 en validation documents (local: the 2000-document sample; online: shard 0)."""
    root = data_root(data_dir)
    if root is None:
        return hub_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            split="validation")["text"]
    f = root / "c4" / "c4_validation_2k.jsonl"
    if not f.exists():
        raise FileNotFoundError(f"no C4 validation file at {f}")
    with open(f, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def token_stream(tok, split="test", data_dir=None) -> torch.Tensor:
    """WikiText-2 split as one token stream: rows joined with '\\n\\n', tokenised once (GPTQ protocol)."""
    return torch.tensor(tok.encode("\n\n".join(wikitext2_rows(split, data_dir)), bos=True), dtype=torch.long)


def random_doc_windows(tok, docs, n, seqlen, seed):
    """GPTQ's C4 sampler: n times, a random document longer than seqlen, a random window of it.
    Returns (windows (n, seqlen), the indices of the documents they came from)."""
    rng, cache = random.Random(seed), {}
    out, used = [], []
    for _ in range(n):
        for _attempt in range(100 * len(docs)):
            i = rng.randint(0, len(docs) - 1)
            if i not in cache:
                cache[i] = tok.encode(docs[i], bos=True)
            if len(cache[i]) > seqlen:
                break
        else:
            raise ValueError(f"no C4 document is longer than seqlen {seqlen} tokens: lower --seqlen")
        j = rng.randint(0, len(cache[i]) - seqlen - 1)
        out.append(torch.tensor(cache[i][j:j + seqlen]))
        used.append(i)
    return torch.stack(out), used                                             # (n, seqlen), [n]


def c4_eval_docs(tok, docs) -> set:
    """The documents that the C4 test windows (256 of 2048 tokens, seed 0) come from: calibration
    on C4 draws from the others only."""
    return set(random_doc_windows(tok, docs, 256, 2048, seed=0)[1])


def c4_tuning_stream(tok, docs, seqlen=2048, held=None):
    """The tuning set's C4 part ("c4-tuning") before windowing: (token ids, the documents' indices).
    The documents no C4 test window touches, in file order, joined with '\\n\\n', until they fill 64
    windows of seqlen; calibration on mixed text (calib_windows) leaves these documents out too.
    held: c4_eval_docs(tok, docs) where the caller has it already."""
    held, ids, used = c4_eval_docs(tok, docs) if held is None else held, [], []
    for i, d in enumerate(docs):
        if i not in held:
            ids += tok.encode(d, bos=not ids) + tok.encode("\\n\\n", bos=False)
            used.append(i)
            if len(ids) >= 64 * seqlen:
                break
    return ids, used


def ppl_windows(name, tok, seqlen=2048, data_dir=None) -> torch.Tensor:
    """Evaluation windows (n, seqlen), docs/method.md §6: WikiText-2 test non-overlapping, tail dropped;
    C4: 256 random windows, seed 0; the tuning set "wikitext2-valid": WikiText-2 validation, windowed
    as the test split (choices are made on it; it reads no test file), and "c4-tuning": up to 64
    windows of the C4 documents that no C4 test window touches, in file order joined with '\n\n'
    (a --dataset c4 calibration draws from the same documents; the benchmark's rows calibrate on
    WikiText-2 train)."""
    if name in ("wikitext2", TUNING):
        split = "test" if name == "wikitext2" else "validation"
        ids = token_stream(tok, split, data_dir)
        n = ids.numel() // seqlen
        if n == 0:
            raise ValueError(f"WikiText-2 {split} has {ids.numel()} tokens, fewer than seqlen {seqlen}")
        return ids[: n * seqlen].view(n, seqlen)                              # (n, seqlen)
    if name == "c4":
        return random_doc_windows(tok, c4_docs(data_dir), 256, seqlen, seed=0)[0]
    if name == TUNING_C4:        # the documents no C4 test window touches, joined: few are >= 2048 tokens
        docs = c4_docs(data_dir)
        ids, _ = c4_tuning_stream(tok, docs, seqlen)
        n = min(64, len(ids) // seqlen)
        return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)      # (n, seqlen)
    raise ValueError(f"unknown dataset {name!r}: choose from {', '.join(DATASETS + (TUNING, TUNING_C4))}")


def c4_windows(nsamples: int, c4_share=None) -> int:
    """How many of nsamples mixed calibration windows are C4's: int(nsamples * c4_share), half for None;
    at least one window of each text."""
    n = nsamples // 2 if c4_share is None else int(nsamples * c4_share)
    if not 0 < n < nsamples:
        raise ValueError(f"a C4 share of {c4_share} of {nsamples} windows leaves one of the two texts no window: "
                         f"choose it in (0, 1) with at least one window each")
    return n


def calib_windows(tok, nsamples=128, seqlen=2048, seed=0, dataset="wikitext2", data_dir=None,
                  c4_share=None) -> torch.Tensor:
    """Calibration windows (nsamples, seqlen), docs/method.md §4: WikiText-2 train joined with '\\n\\n',
    window starts drawn with random.randint(0, N - seqlen - 1) from random.seed(seed); C4: GPTQ's
    sampler over the documents that no C4 test window touches (c4_eval_docs). wikitext2+c4 (beyond
    the paper): the last c4_windows(nsamples, c4_share) windows C4's (None: half), from the documents
    that neither a test window nor the tuning set's C4 part touches (c4_tuning_stream), the first ones
    WikiText-2 train's (the same windows as --dataset wikitext2 draws)."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must be positive")
    if dataset in ("c4", "wikitext2+c4"):        # documents no C4 test window (and, mixed, no tuning window) touches
        docs = c4_docs(data_dir)
        held = c4_eval_docs(tok, docs)
        if dataset == "wikitext2+c4":
            held = held | set(c4_tuning_stream(tok, docs, held=held)[1])
        n = nsamples if dataset == "c4" else c4_windows(nsamples, c4_share)
        c4 = random_doc_windows(tok, [d for i, d in enumerate(docs) if i not in held], n, seqlen, seed)[0]
        if dataset == "c4":
            return c4
        return torch.cat([calib_windows(tok, nsamples - n, seqlen, seed, "wikitext2", data_dir), c4])
    if dataset != "wikitext2":
        raise ValueError(f"unknown dataset {dataset!r}: choose from {', '.join(CALIBRATION_SETS)}")
    ids = token_stream(tok, "train", data_dir)
    if nsamples * seqlen > ids.numel():
        raise ValueError(f"{nsamples} windows x {seqlen} tokens = {nsamples * seqlen} tokens, but the WikiText-2 "
                         f"train text here has only {ids.numel()}: lower --nsamples or --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i:i + seqlen] for i in starts])                   # (nsamples, seqlen)


def train_windows(tok, seqlen, source="wikitext2", data_dir=None) -> torch.Tensor:
    """Finetuning text packed into non-overlapping windows (n, seqlen), the tail dropped (as
    Hugging Face's run_clm groups texts). source: wikitext2 = the train split as one stream
    (token_stream); wikitext2+valid = the train split, then the validation split (more text
    offline, where the train file is a 68k-token head; the test split stays unseen); c4 = the C4
    documents, each with BOS, end to end (locally the validation sample: never use it for C4
    perplexity after training on it); or a path: a .txt file whole, a .jsonl file's "text" field
    of each line, end to end."""
    if source in ("wikitext2", "wikitext2+valid"):
        ids = token_stream(tok, "train", data_dir)
        if source == "wikitext2+valid":
            ids = torch.cat([ids, token_stream(tok, "validation", data_dir)])
    else:
        if source == "c4":
            docs = c4_docs(data_dir)
        else:
            f = Path(source)
            if not f.is_file():
                raise FileNotFoundError(f"training text {source!r}: not wikitext2, wikitext2+valid, c4 or a "
                                        f".txt / .jsonl file")
            text = f.read_text(encoding="utf-8")
            try:
                docs = [json.loads(line)["text"] for line in text.splitlines() if line.strip()] \
                    if f.suffix == ".jsonl" else [text]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{f}: each line must be a JSON object with a \"text\" field ({e})") from None
        ids = torch.tensor([t for d in docs for t in tok.encode(d, bos=True)], dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the training text {source!r} has {ids.numel()} tokens, fewer than one window of "
                         f"--seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)                                  # (n, seqlen)


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="smollm2-135m", help="model whose tokenizer counts the tokens")
    p.add_argument("--data-dir", default=None, help="local data directory (../shared/data layout)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length")

    def main(a):
        _, tok = load(a.ckpt)
        print(f"data: {data_root(a.data_dir) or 'datasets (online)'}")
        for split in ("train", "validation", "test"):
            print(f"wikitext2 {split}: {token_stream(tok, split, a.data_dir).numel()} tokens")
        print(f"c4 windows: {tuple(ppl_windows('c4', tok, a.seqlen, a.data_dir).shape)}")

    run(main, p.parse_args())
