"""LoRA finetuning from a quantized model's initialisation: the stage ApiQ's initialisation exists
for (Liao et al., EMNLP 2024, arXiv 2402.05147, section 4: finetuning after QLoRA's, LoftQ's and
ApiQ's starts with the same recipe; docs/method.md §8).

    python finetune.py --ckpt out/smollm2-135m-apiq-bw-w2g64-quick --quick      # SmolLM2 on a CPU
    python finetune.py --ckpt out/llama2-7b-apiq-bw-w2g64                       # the official WikiText-2 recipe
    python finetune.py --ckpt out/smollm2-135m-apiq-bw-w2g64-quick --quick --loss kd   # distil full precision
    python finetune.py --ckpt smollm2-135m --fp-lora --quick                    # the reference: LoRA on fp weights

The quantized base stays frozen: each QuantLinear keeps its packed codes (Q(W), with the trained
clipping and any learned rounding in them) and only its LoRA factors A, B train; embeddings,
norms and head are frozen too. On windows x (B, T) of packed text the loss is

    ce:  - mean_t log p_q(x_{t+1} | x_{<=t})                          next-token cross-entropy (the paper)
    kd:  mean_t KL( p_fp(. | x_{<=t}) || p_q(. | x_{<=t}) )            beyond the paper: distil the full-
                                                                       precision model's distribution

AdamW on A and B (fp32, whatever --dtype), the learning rate along a cosine to 0 over all steps,
one step per batch_size x grad_accum windows. Every --save-every steps the adapters, the
optimizer state and the log go atomically to OUT/checkpoint.pt; the same command continues from
there after a crash or Ctrl-C, bit-identical on CPU (an epoch's window order is a function of
--seed and the epoch). At the end: a model directory in calibrate.py's format (evaluate.py reads
it; --fp-lora: the adapters only, adapters.safetensors), WikiText-2 test perplexity (held out),
and finetune_log.json (loss, lr and seconds per step, peak memory), written last.

On examples (prompt -> answer; examples.py), as the official finetuning/train_multitask.py
--task commonsense does:

    python finetune.py --ckpt out/smollm2-135m-apiq-bw-w2g64-quick --data commonsense --quick
    python finetune.py --ckpt out/smollm2-135m-apiq-bw-w2g64-quick --data my_pairs.jsonl   # {"prompt", "answer"}

the loss is the cross-entropy of the answer's tokens and EOS only, averaged over all of them in a
step; each pass takes batch_size examples padded on the right to the longest (no packing), and an
epoch's example order is a function of --seed and the epoch, so the same checkpoint and resume
guarantees hold. Defaults (EXAMPLES) follow the official scripts/train_multitask.sh at commit
50da961: max length 512 (--seqlen; a longer example of a file is an error), lr 3e-4, gradient norm
clipped at 1, 3 epochs, 4 examples x 4 passes a step, warmup over 10% of the steps then linear to 0,
no weight decay; --quick: 1 epoch. (Another released copy of the script uses lr 3e-3, norm 0.3 and
1 epoch: --lr 3e-3 --max-grad-norm 0.3 --epochs 1.) --data commonsense trains on the train parts
of the five local tasks (about 100k tokens, --max-train-tokens) and ends with each task's 300
held-out items (--eval-items, --eval-part) scored by log-likelihood (evaluate.zero_shot) and by
generating the answer (evaluate.generation_accuracy, the official evaluation).
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import fastpath
from cli import (DEFAULT_DEVICE, DTYPES, arg, as_flags, atomic_write, check_device, check_writable, default_dtype,
                 parse_config, peak_memory_gib, reset_peak_memory, result_settings, run, write_json)
from data import ppl_windows, train_windows
from evaluate import generation_accuracy, parse_list, perplexity, print_task_table, zero_shot
from examples import (BUILT_IN, HUB, MAX_TOKENS, commonsense_train, encode, hub_examples, is_examples, pad_batch,
                      read_examples, take, task_parts)
from llama import check_seqlen
from lora import LoraLinear, adapters, is_quantized, swap_linears
from qmodel import check_linears, is_kept, load, read_quantized_config, save_quantized
from recipes import FINETUNE_QUICK, lr_factor, preset
from runs import output_dir, resume_finetune, save_checkpoint
from tasks import HELD_OUT, TASKS

# --data of examples: the settings of the official scripts/train_multitask.sh (ApiQ, commit 50da961:
# max length 512, lr 3e-4, grad norm 1, 3 epochs, 4 examples a pass x 4 passes a step, warmup 0.1 then
# the Trainer's linear decay, its weight decay 0); --quick: one epoch
EXAMPLES = dict(seqlen=512, epochs=3, batch_size=4, grad_accum=4, lr=3e-4, wd=0.0, max_grad_norm=1.0, warmup=0.1,
                schedule="linear")
EXAMPLES_QUICK = dict(epochs=1)

# ---- the loss of one forward pass

def lm_loss(model, x, teacher=None):
    """Mean loss over the B x (T - 1) predicted positions of windows x (B, T): cross-entropy to
    the next token, or (teacher given) KL(teacher || model) of the next-token distributions."""
    logits = model(x[:, :-1])                                                   # (B, T-1, vocab), fp32
    if teacher is None:
        return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    with torch.no_grad():
        target = F.log_softmax(teacher(x[:, :-1]), -1).flatten(0, 1)           # (B(T-1), vocab)
    return F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), target, log_target=True, reduction="batchmean")


def answer_loss(model, x, mask, teacher=None):
    """Mean loss over the answer positions of padded examples x (B, T), mask (B, T - 1) True where
    position t predicts an answer token x[:, t + 1] (examples.pad_batch): cross-entropy to that token
    (the official scripts' loss, the prompt and the padding at IGNORE_INDEX), or (teacher given)
    KL(teacher || model). The head runs on the answer positions only."""
    logits = model.output(model.hidden(x[:, :-1])[mask]).float()             # (n, vocab), n = mask.sum()
    if teacher is None:
        return F.cross_entropy(logits, x[:, 1:][mask])
    with torch.no_grad():
        target = F.log_softmax(teacher.output(teacher.hidden(x[:, :-1])[mask]).float(), -1)    # (n, vocab)
    return F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")


def make_batch(data, mb) -> tuple:
    """(x (b, T), mask (b, T - 1) or None) of the windows (a tensor) or the examples (a list of
    examples.Encoded) with indices mb."""
    if isinstance(data, torch.Tensor):
        return data[mb], None
    return pad_batch([data[i] for i in mb.tolist()])


def lr_at(cfg, step, total) -> float:
    """The learning rate's multiplier at optimizer step `step` of `total`: from 0 up in a line over
    the first ceil(warmup x total) steps, then --schedule to 0 over the rest (warmup with linear is
    transformers' get_linear_schedule_with_warmup, what the official train_multitask.sh runs)."""
    warm = math.ceil(cfg.warmup * total)
    if step < warm:
        return step / warm
    return lr_factor(cfg.schedule, step - warm, total - warm)


def window_order(cfg, n, epoch) -> torch.Tensor:
    """The windows (or examples) of one epoch, shuffled by a generator seeded from (seed, epoch)
    alone: a resumed run sees the same order as an uninterrupted one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))


def step_windows(cfg, n, step) -> torch.Tensor:
    """Indices of the windows (or examples) optimizer step `step` trains on (the last step of an epoch
    may be short)."""
    per_step = cfg.batch_size * cfg.grad_accum
    per_epoch = math.ceil(n / per_step)
    epoch, i = divmod(step, per_epoch)
    return window_order(cfg, n, epoch)[i * per_step:(i + 1) * per_step]


# ---- the loop

def train(cfg, model, data, teacher, out, settings):
    """Optimizer steps from where OUT's checkpoint left off to the last, on windows (n, seqlen) or
    a list of examples.Encoded; returns (log, seconds, peak memory in GiB), the seconds and the peak
    over every process that worked on it (a resumed run's earlier ones from the checkpoint). A step's
    loss is the mean over all the positions it predicts (a window's every one, an example's answer
    tokens), whatever passes they fall into."""
    params = {f"{n}.{k}": getattr(m, k) for n, m in adapters(model).items() for k in ("A", "B")}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.wd)
    per_epoch = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum))
    total = min(per_epoch * cfg.epochs, cfg.max_steps or per_epoch * cfg.epochs)
    start, log, spent, peak_before = resume_finetune(out, settings, params, opt)
    bar = tqdm(total=total, initial=start, desc="finetune", unit="step")
    t0 = time.time() - spent
    for step in range(start, total):
        t_step = time.time()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(cfg, step, total)
        passes = [make_batch(data, mb) for mb in step_windows(cfg, len(data), step).split(cfg.batch_size)]
        counts = [x[:, 1:].numel() if mask is None else int(mask.sum()) for x, mask in passes]  # predicted positions
        loss_sum = 0.0
        for (x, mask), n in zip(passes, counts):
            x = x.to(cfg.device)                                                # (b, T)
            loss = lm_loss(model, x, teacher) if mask is None else answer_loss(model, x, mask.to(cfg.device), teacher)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: non-finite loss ({loss.item()}); lower --lr (now {cfg.lr}) "
                                         f"or check the model {cfg.ckpt}")
            (loss * (n / sum(counts))).backward()                               # the step's mean over its positions
            loss_sum += loss.item() * n
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.time() - t_step
        tokens = sum(x[:, 1:].numel() for x, _ in passes)                      # positions run, padding too
        log.append({"step": step + 1, "loss": loss_sum / sum(counts), "lr": opt.param_groups[0]["lr"],
                    "seconds": round(seconds, 3), "tokens": tokens, "loss_tokens": sum(counts)})
        bar.update(1)
        bar.set_postfix(loss=f"{log[-1]['loss']:.4f}", tok_s=f"{tokens / seconds:.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == total:
            save_checkpoint(out, step + 1, settings, params, opt, log, time.time() - t0,
                            max(peak_before, peak_memory_gib(cfg.device)))
    bar.close()
    return log, time.time() - t0, max(peak_before, peak_memory_gib(cfg.device))


# ---- the model, the checkpoint, the output

def load_student(cfg):
    """(model, tok, source info): the quantized model with only A, B trainable (cached Q(W): a
    step costs what a full-precision LoRA step costs), or with --fp-lora the full-precision model
    with plain LoRA on its block linears."""
    dtype = DTYPES[cfg.dtype]
    model, tok = load(cfg.ckpt, device=cfg.device, dtype=dtype, cache=not cfg.packed)
    if cfg.packed:
        model = fastpath.accelerate(model).module     # PackedMatmul: Q(W) dequantized in each pass, never kept
    if is_quantized(model):
        source = read_quantized_config(Path(cfg.ckpt))
        if not adapters(model):
            raise ValueError(f"{cfg.ckpt} has no LoRA adapter (rank 0, --method rtn): calibrate with --method qlora "
                             f"for QLoRA's start")
    elif not cfg.fp_lora:
        raise ValueError(f"{cfg.ckpt} is full precision: calibrate it first (calibrate.py --method bw|lw|qlora|loftq "
                         f"--ckpt {cfg.ckpt}) or pass --fp-lora for plain LoRA on the full-precision weights")
    else:
        check_linears(model, 1, cfg.rank)
        torch.manual_seed(cfg.seed)
        for block in model.layers:
            swap_linears(block, lambda lin: LoraLinear(lin, cfg.rank, cfg.lora_alpha).to(cfg.device))
        source = {"method": "fp", "source": cfg.ckpt}
    model.requires_grad_(False)
    for m in adapters(model).values():
        m.A.requires_grad_(True)
        m.B.requires_grad_(True)
    return model.train(), tok, source


def load_teacher(cfg, source):
    name = cfg.teacher or source.get("source")
    if not name:
        raise ValueError(f"--loss kd: {cfg.ckpt} does not name its full-precision source; give --teacher")
    teacher, _ = load(name, device=cfg.device, dtype=DTYPES[cfg.dtype])
    if is_quantized(teacher):
        raise ValueError(f"--teacher {name} is quantized: the teacher is the full-precision model")
    return teacher.eval().requires_grad_(False)


def save_model(cfg, model, tok, out, source, summary):
    """The finetuned model in calibrate.py's format (A, B replaced), or --fp-lora's adapters."""
    if source["method"] == "fp":
        tensors = {f"{n}.{k}": getattr(m, k).detach().cpu().contiguous() for n, m in adapters(model).items()
                   for k in ("A", "B")}
        atomic_write(out / "adapters.safetensors", lambda tmp: save_file(tensors, tmp))
        return
    made = {k: v for k, v in source.items() if k not in ("format", "model_args", "tied_embeddings", "linears")}
    with safe_open(str(Path(cfg.ckpt) / "model.safetensors"), framework="pt") as f:   # frozen: the start's own bytes
        kept = {k: f.get_tensor(k) for k in f.keys() if is_kept(k)}                  # (not rounded to a bf16 --dtype)
    save_quantized(model, tok, out, {**made, "method": f"{source['method']}+ft-{cfg.loss}",
                                     "finetuned": {"from": str(cfg.ckpt), **result_settings(cfg), **summary}}, kept)


def held_out(model, tok, cfg) -> dict:
    """What the run is judged on: after text, the WikiText-2 test perplexity; with --eval-tasks
    (after --data commonsense by default), each task's --eval-part items scored both ways."""
    was_training = model.training
    model.eval()
    out = {}
    if not is_examples(cfg.data):
        seqlen = min(cfg.eval_seqlen, model.args.max_seq_len)
        windows = ppl_windows("wikitext2", tok, seqlen, cfg.data_dir)[: cfg.eval_limit]   # (n, seqlen)
        out = {"wikitext2": perplexity(model, windows, desc="held-out wikitext2"), "windows": len(windows),
               "seqlen": seqlen}
    if tasks := eval_tasks(cfg):
        out["tasks"] = task_scores(model, tok, cfg, tasks)
    model.train(was_training)
    return out


def task_scores(model, tok, cfg, tasks) -> dict:
    """Accuracy on the first --eval-items of each task's --eval-part (tasks.split, seed 0: never
    trained on), by lm-eval's log-likelihood scoring (evaluate.zero_shot, the harness's prompts) and
    by generating the answer from the commonsense_170k prompt (evaluate.generation_accuracy, the
    official evaluation)."""
    zs, gen = {}, {}
    for name in tasks:
        items = getattr(task_parts(name, cfg.data_dir), cfg.eval_part)[: cfg.eval_items]
        zs[name] = zero_shot(model, tok, name, items)
        gen[name] = generation_accuracy(model, tok, name, items)
    mean = lambda rs: sum(r["acc"] for r in rs.values()) / len(rs)          # noqa: E731
    return {"part": cfg.eval_part, "zeroshot": zs, "generated": gen, "zeroshot_avg": mean(zs),
            "generated_avg": mean(gen)}


def report(when, ev):
    if not ev:
        print(f"{when}: no held-out evaluation (--eval-tasks names the local tasks to score)")
    if "wikitext2" in ev:
        print(f"{when}: held-out WikiText-2 perplexity {ev['wikitext2']:.3f} ({ev['windows']} windows of "
              f"{ev['seqlen']})")
    if "tasks" in ev:
        print(f"{when}: accuracy on each task's {ev['tasks']['part']} items (acc, acc_norm: log-likelihood scoring; "
              f"generated: the answer generated, the official evaluation)")
        print_task_table(ev["tasks"]["zeroshot"], ev["tasks"]["generated"])


# ---- the examples

def read_data(cfg) -> list:
    """The examples.Example's of --data (read before the model, so that bad input fails at once)."""
    if cfg.data == "commonsense":
        return commonsense_train(cfg.data_dir)
    return hub_examples(cfg.data) if cfg.data in HUB else read_examples(cfg.data)


def tokenise(cfg, tok, exs) -> tuple[list, int]:
    """(the examples tokenised, how many were left out for being longer than --seqlen): a file's
    example longer than the window is an error; the built-in mix and the Hub sets leave such
    examples out (the official scripts cut them at 512 tokens). --data commonsense stops before
    --max-train-tokens."""
    cap = cfg.max_train_tokens if cfg.data == "commonsense" else None
    rows, dropped = take((encode(tok, ex) for ex in exs), cfg.seqlen, cap, strict=cfg.data not in BUILT_IN)
    if not rows:
        raise ValueError(f"--data {cfg.data}: no example fits the window of --seqlen {cfg.seqlen} tokens")
    return rows, dropped


def eval_tasks(cfg) -> list:
    default = "all" if cfg.data in ("commonsense", "commonsense_170k") else ""
    names = parse_list(default if cfg.eval_tasks is None else cfg.eval_tasks, TASKS + ("all",), "--eval-tasks task")
    return list(TASKS) if "all" in names else names


# ---- the script

@dataclass
class Config:
    """One run of finetune.py. The defaults are the official WikiText-2 recipe (docs/method.md §8)."""
    ckpt: Optional[str] = arg(None, "quantized model directory written by calibrate.py (or, with --fp-lora, a "
                              "full-precision checkpoint)", type=str)
    data: str = arg("wikitext2", "training text: wikitext2 (train split), wikitext2+valid (train, then "
                                "validation: never the test split), c4, or a .txt / .jsonl file of text; or examples "
                                "(prompt -> answer, the loss on the answer): commonsense (the train parts of the five "
                                "local tasks, the official template), commonsense_170k or gsm8k (the official sets, "
                                "through `datasets`), or a .jsonl / .json file of records with \"prompt\" and "
                                "\"answer\" (examples.py)")
    seqlen: int = arg(1024, "tokens per training window (text: packed end to end); with examples the longest "
                      "example (default 512, the official max length)")
    epochs: int = arg(3, "passes over the training windows or examples")
    batch_size: int = arg(4, "windows (or examples, padded to the longest) per forward pass")
    grad_accum: int = arg(16, "forward passes per optimizer step (a step sees batch_size x grad_accum windows; "
                          "examples: default 4)")
    lr: float = arg(3e-4, "AdamW learning rate of A and B")
    wd: float = arg(0.1, "AdamW weight decay (examples: default 0)")
    schedule: str = arg("cosine", "the learning rate after the warmup, to 0 at the last step (examples: default "
                        "linear)", choices=("cosine", "linear"))
    warmup: float = arg(0.0, "fraction of the steps over which the learning rate rises from 0 (examples: default 0.1)")
    max_grad_norm: Optional[float] = arg(None, "clip the gradient of A and B to this norm (default none; examples: 1)",
                                         type=float)
    max_train_tokens: int = arg(MAX_TOKENS, "--data commonsense: the mix's examples stop before their tokens pass this")
    loss: str = arg("ce", "ce: next-token cross-entropy (paper); kd: KL to the full-precision model's "
                    "next-token distribution", choices=("ce", "kd"))
    teacher: Optional[str] = arg(None, "full-precision model for --loss kd (default: the source in apiq.json)")
    max_steps: Optional[int] = arg(None, "at most this many optimizer steps (the schedule spans them)", type=int)
    fp_lora: bool = arg(False, "allow a full-precision --ckpt: plain LoRA on its weights (the reference)")
    rank: int = arg(64, "LoRA rank of --fp-lora (a quantized model keeps its own)")
    lora_alpha: float = arg(16.0, "LoRA alpha of --fp-lora")
    seed: int = arg(0, "seed of the window or example order (and of --fp-lora's A)")
    eval_limit: Optional[int] = arg(None, "held-out WikiText-2 test windows at the end (default: all)", type=int)
    eval_tasks: Optional[str] = arg(None, "tasks scored at the end, comma-separated, 'all' or '' (default all after "
                                    "--data commonsense or commonsense_170k, else none)", type=str)
    eval_items: int = arg(HELD_OUT, "items of each --eval-tasks task scored (of its --eval-part)")
    eval_part: str = arg("held_out", "the items scored: held_out (never trained on; the result) or dev (where "
                         "the recipe's choices are made)", choices=("dev", "held_out"))
    eval_seqlen: int = arg(2048, "tokens per held-out window")
    eval_before: bool = arg(False, "also measure the held-out perplexity (or task scores) before training",
                            result=False)
    save_every: int = arg(20, "optimizer steps between checkpoints", result=False)
    packed: bool = arg(False, "keep the codes packed and dequantize in every forward and backward (fastpath."
                       "accelerate's PackedMatmul): less memory, slower steps (default: Q(W) cached, a step costs "
                       "what a full-precision LoRA step costs)", result=False)
    quick: bool = arg(False, f"the CPU recipe (SmolLM2: 10-15 min on one core): {as_flags(FINETUNE_QUICK)}; with "
                      f"examples {as_flags(EXAMPLES_QUICK)}", result=False)
    out: Optional[str] = arg(None, "output directory (default <ckpt>-ft, -ft-kd with --loss kd; examples: "
                             "<ckpt>-ft-commonsense, -ft-examples for a file)", result=False)
    data_dir: Optional[str] = arg(None, "local data directory (default $APIQ_DATA_DIR or ../shared/data)", result=False)
    device: str = arg(DEFAULT_DEVICE, "cpu or cuda", result=False)
    dtype: Optional[str] = arg(None, "weights and activations (default bf16 on a GPU, fp32 on the CPU; A, B and AdamW "
                               "stay fp32; no fp16: its gradients underflow without loss scaling)",
                               choices=("fp32", "bf16"), type=str)
    threads: Optional[int] = arg(None, "torch CPU threads (pass 1 beside another job)", result=False, type=int)

    def __post_init__(self):
        self.dtype = self.dtype or default_dtype(self.device)


def make_config(**given) -> Config:
    """Config from the given settings, --quick's recipe filling what was not given; with examples
    the official train_multitask.sh's settings (EXAMPLES) filling what is left."""
    if is_examples(given.get("data", Config.data)):
        return Config(**(EXAMPLES | preset(given, quick=EXAMPLES_QUICK)))
    return Config(**preset(given, quick=FINETUNE_QUICK))


def finetune_dir(cfg) -> Path:
    on = ("-" + (cfg.data if cfg.data in BUILT_IN else "examples")) if is_examples(cfg.data) else ""
    return output_dir(cfg.out, cfg.ckpt, "{path}-ft" + on + ("-kd" if cfg.loss == "kd" else "") +
                      ("-quick" if cfg.quick else ""))


def check_config(cfg):
    if not cfg.ckpt:
        raise ValueError("--ckpt: give the quantized model directory to finetune (calibrate.py writes one)")
    positive = ("seqlen", "epochs", "batch_size", "grad_accum", "save_every", "eval_seqlen", "rank", "eval_items",
                "max_train_tokens")
    if bad := [f"--{k.replace('_', '-')}" for k in positive if getattr(cfg, k) <= 0]:
        raise ValueError(f"{', '.join(bad)} must be positive")
    if min(cfg.seqlen, cfg.eval_seqlen) < 2:
        raise ValueError(f"--seqlen {cfg.seqlen} / --eval-seqlen {cfg.eval_seqlen}: a window needs at least 2 tokens "
                         f"(one to predict the next from)")
    if any(n is not None and n <= 0 for n in (cfg.max_steps, cfg.eval_limit)) or cfg.lr <= 0 or cfg.wd < 0:
        raise ValueError("--max-steps, --eval-limit and --lr must be positive, --wd >= 0")
    if not 0 <= cfg.warmup < 1 or (cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0):
        raise ValueError(f"--warmup {cfg.warmup} must be in [0, 1), --max-grad-norm positive")
    eval_tasks(cfg)                                                                  # a known task
    if finetune_dir(cfg).resolve() == Path(cfg.ckpt).resolve():
        raise ValueError("--out is the model being finetuned: choose another directory")
    check_device(cfg.device, DTYPES[cfg.dtype])


def held_out_before(model, tok, cfg, out, settings) -> dict:
    """held_out() of the start, kept in OUT/eval_before.json until the run ends: a run resumed after a
    kill reads it back instead of scoring the start again (with task scores that is ~half an hour on
    one core). It is read only under the same settings (the start and the evaluation among them)."""
    path = out / "eval_before.json"
    if path.exists():
        try:
            kept = json.loads(path.read_text())
        except ValueError:                     # cannot be half-written (atomic), but may be foreign
            kept = {}
        if kept.get("settings") == json.loads(json.dumps(settings)):
            print(f"before: read back from {path}")
            return kept["eval"]
    before = held_out(model, tok, cfg)
    write_json(path, {"settings": settings, "eval": before})
    return before


def main(cfg: Config):
    check_config(cfg)
    out = finetune_dir(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    exs = read_data(cfg) if is_examples(cfg.data) else None
    check_writable(out)
    print("config:", json.dumps(asdict(cfg)))
    model, tok, source = load_student(cfg)
    check_seqlen(model.args, cfg.seqlen)
    n_params = sum(m.A.numel() + m.B.numel() for m in adapters(model).values())
    if exs is None:
        data = train_windows(tok, cfg.seqlen, cfg.data, cfg.data_dir)                  # (n, seqlen)
        size = {"windows": len(data)}
        what = f"{len(data)} windows x {cfg.seqlen} tokens"
    else:
        data, dropped = tokenise(cfg, tok, exs)                                        # [examples.Encoded]
        size = {"examples": len(data), "tokens": sum(len(r.ids) for r in data),
                "answer_tokens": sum(len(r.ids) - r.start for r in data), "longer_than_seqlen": dropped}
        what = (f"{len(data)} examples, {size['tokens']} tokens ({size['answer_tokens']} of them answers, the loss's)"
                + (f", {dropped} longer than --seqlen {cfg.seqlen} left out" if dropped else ""))
    teacher = load_teacher(cfg, source) if cfg.loss == "kd" else None
    settings = result_settings(cfg)
    print(f"{source['method']} model {cfg.ckpt}: {len(adapters(model))} adapters, {n_params / 1e6:.2f}M trainable; "
          f"{what} of {cfg.data}")
    before = held_out_before(model, tok, cfg, out, settings) if cfg.eval_before else None
    if before:
        report("before", before)
    reset_peak_memory(cfg.device)
    log, seconds, peak = train(cfg, model, data, teacher, out, settings)
    after = held_out(model, tok, cfg)
    report(f"after {len(log)} steps ({seconds / 60:.1f} min)", after)
    summary = {"steps": len(log), "seconds": round(seconds, 1), "eval": after}
    save_model(cfg, model, tok, out, source, summary)
    write_json(out / "finetune_log.json", {"config": asdict(cfg), "init": source["method"], "trainable": n_params,
                                           **size, "eval_before": before, **summary,
                                           "peak_gib": round(peak, 3), "log": log})
    (out / "checkpoint.pt").unlink(missing_ok=True)
    (out / "eval_before.json").unlink(missing_ok=True)                               # kept in the log now
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    run(lambda: main(parse_config(Config, __doc__.split("\n")[0] + " Interrupted (Ctrl-C, a crash, kill -9)? The "
                                  "same command continues from the last checkpoint (--save-every), bit-identical on "
                                  "CPU.", sys.argv[1:], build=make_config)),
        resume="the same command continues from the last checkpoint")
