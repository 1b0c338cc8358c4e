"""Beyond the papers: the recipes that fit ApiQ into a CPU budget, and their presets.

The ApiQ paper calibrates 128 windows of 2048 tokens for 20 epochs with A random, B = 0 and
constant learning rates (calibrate.Config's defaults). On a CPU that is days for SmolLM2; these
options buy most of its quality in minutes (measured in bench/bench_recipes.py; docs/recipes.md):

- SVD start (--lora-init svd): A, B from the rank-r SVD of W - Q(W) at the starting clipping
  (one step of LoftQ's Algorithm 1), so the block starts at Q + s B A, closer to W than Q alone.
- learned rounding (--learn-rounding): a rounding offset V per weight in [-0.5, 0.5] as in
  AutoRound (SignRound, Cheng et al. 2023), code = clamp(round(W / step + V) + zero) (quant.py);
  its own AdamW group without weight decay, clamped after every step. The codes stay N-bit.
- schedules (--lr-schedule): the learning rates decay to 0 over a block's steps, linearly or
  along a cosine; the finetuning recipe of ApiQ's official scripts uses the cosine (finetune.py).
- signed steps (--sign-steps): the clipping logits and rounding offsets move by a fixed step
  against the sign of their gradient, p <- p - lr sign(dL/dp), AutoRound's optimiser (SignRound,
  Cheng et al. 2023, section 3; docs/method.md section 9); A and B keep AdamW.
- best step (--best-step): a block ends at the parameters of its lowest-loss step, not its last
  (AutoRound keeps its best iteration the same way).
- the end-to-end stage (--e2e-epochs, e2e.py): after the block-wise pass the step sizes and A, B
  train on the whole model's next-token loss (EfficientQAT's E2E-QP, arXiv 2407.11062 section 3.3).
- presets: --quick, --long, --quick-e2e and --long-e2e of calibrate.py, --quick of finetune.py;
  each also sets compile=True: speed only, fastpath.accelerate's devices with the compiled quantizer.
  --quick-e2e and --long-e2e are the recipes chosen against AutoRound on the benchmark's tuning set
  (WikiText-2 validation and its C4 part, 2 bits; docs/recipes.md): rank 8, --quick's block-wise pass
  with signed steps, then two epochs of the end-to-end stage, on calibration text half WikiText-2
  train, half C4 (SmolLM2: ~16 min on one core); and the same on 64 windows with the stage on the KL
  to full precision (~36 min). They were chosen at 2 bits; at 3 bits the tuning set (WikiText-2 validation
  alone) preferred --quick --rank 8 --e2e-epochs 1.

    python calibrate.py --quick          # = the flags of QUICK below
"""
import math

import torch

from lora import svd_split

# calibrate.py: the CPU options; --quick also drops the --aug-loss term (no measured effect with them)
CPU_OPTIONS = dict(lora_init="svd", learn_rounding=True, lr_schedule="cosine", lr_lora=2e-3, lr_clip=1e-2)
# --quick: 32 x 512 x 2 since the speed devices (was 32 x 256 x 2: about the same minutes before them)
QUICK = dict(nsamples=32, seqlen=512, epochs=2, aug_loss=False, compile=True, **CPU_OPTIONS)
LONG = dict(nsamples=64, seqlen=512, epochs=4, compile=True, **CPU_OPTIONS)
# against AutoRound at ~16 and ~36 min (2 bits): rank 8 (on SmolLM2 the paper's adapter share of the
# linears, rank 64 on Llama-2-7B: +0.37 bits per weight), signed steps at AutoRound's step size
# 1/steps (1/64 for --quick's 32 windows x 2 epochs, 1/128 for 64 windows), 2 epochs end to end, half
# the windows C4 (the tuning set's C4 part: 262.6 -> 146.8 at 16 min); on 64 windows the stage on the
# KL to full precision (the only 64-window row with the C4 half so far)
QUICK_E2E = QUICK | dict(rank=8, sign_steps=True, lr_round=0.016, e2e_epochs=2, dataset="wikitext2+c4")
LONG_E2E = QUICK_E2E | dict(nsamples=64, lr_round=0.008, e2e_loss="kd")
CALIBRATE_PRESETS = dict(quick=QUICK, long=LONG, quick_e2e=QUICK_E2E, long_e2e=LONG_E2E)   # flag -> settings
# finetune.py: the local WikiText-2 train text (68k tokens) once in 256-token windows, 16 windows
# a step, a higher rate for the few steps
FINETUNE_QUICK = dict(seqlen=256, epochs=1, batch_size=4, grad_accum=4, lr=1e-3, eval_limit=10)
SCHEDULES = ("constant", "linear", "cosine")


def preset(given: dict, **presets) -> dict:
    """The settings given, the preset named by a true flag among them (quick=QUICK, ...) filling what
    was not."""
    named = [name for name in presets if given.get(name)]
    if len(named) > 1:
        raise ValueError(" and ".join("--" + n.replace("_", "-") for n in named) + " are different recipes: give one")
    return (presets[named[0]] if named else {}) | given


def lr_factor(schedule, step, total):
    """Multiplier of the learning rates at `step` of `total`: 1 (constant, the paper's calibration),
    decaying linearly, or along a cosine from 1 to 0."""
    if schedule == "linear":
        return 1 - step / total
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    return 1.0


@torch.no_grad()
def svd_start(m):
    """A, B of QuantLinear m from the rank-r SVD of W - Q(W) at its starting clipping."""
    B, A = svd_split(m.weight.float() - m.qweight().float(), m.rank, m.scaling)
    m.B.copy_(B)                                                                  # (out, r)
    m.A.copy_(A)                                                                  # (r, in)


class SignSGD(torch.optim.Optimizer):
    """--sign-steps: p <- p - lr * sign(dL/dp) for every parameter with a gradient (no moments, no
    weight decay); the step size is the group's lr, which the schedule decays."""

    def __init__(self, groups, lr=1e-3):
        super().__init__(groups, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-g["lr"])


class BestStep:
    """--best-step: a copy of `params` as they were at the step with the lowest loss so far; the loss
    of a step is computed before its update, so the copy is taken before optimizer.step()."""

    def __init__(self, params):
        self.params, self.loss, self.kept = list(params), math.inf, None

    def see(self, loss: float):
        if loss < self.loss:
            self.loss, self.kept = loss, [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self):
        for p, kept in zip(self.params, self.kept or []):
            p.copy_(kept)


def rounding_group(linears, lr):
    """The AdamW parameter group of the rounding offsets of `linears` (none without --learn-rounding)."""
    offsets = [p for m in linears for p in m.round_parameters()]
    return [{"params": offsets, "lr": lr, "weight_decay": 0.0}] if offsets else []


@torch.no_grad()
def clamp_offsets(linears):
    """V stays a rounding offset: W / step moves by less than one code."""
    for m in linears:
        for v in m.round_parameters():
            v.clamp_(-0.5, 0.5)
