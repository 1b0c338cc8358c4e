"""Beyond ApiQ: an end-to-end stage after the block-wise pass (calibrate.py --e2e-epochs).

EfficientQAT (Chen et al. 2024, arXiv 2407.11062, section 3.3, "E2E-QP") follows its block-wise
pass with a stage that trains only the quantization step sizes of the whole model end to end on
next-token cross-entropy, the integer codes and zero points fixed (Llama-2-7B w2g64: WikiText-2
7.65 -> 6.86 in its Table 2 setting). Here the LoRA factors may join them:

    Q(W) = (codes - zero) * scale             scale (out, in // group_size) trainable        eq. (6)
    y    = x Q(W)^T + s (x A^T) B^T           A, B trainable (--e2e-lr-lora; 0: fixed)
                                              (--e2e-lr-scale 0: the scales fixed, A, B alone)
    loss = - mean_t log p_q(x_{t+1} | x_{<=t})   over the calibration windows, one window a step
      or (--e2e-loss kd, beyond EfficientQAT)
    loss = mean_t KL( p_fp(. | x_{<=t}) || p_q(. | x_{<=t}) )     the full-precision model's distribution

AdamW (no weight decay) with the learning rates along a cosine to 0 over the stage's steps, the
gradient norm clipped at 0.3, as EfficientQAT's E2E-QP scripts do; their step-size learning rate
for 2 bits is 2e-5 (examples/e2e_qp/Llama-2-7b/w2g64-redpajama.sh: 4096 windows of 4096 tokens,
one epoch, batch 32). The stage is short against the block-wise pass and is not checkpointed: a
run killed inside it replays the saved blocks and runs the stage again.
"""
import time

import torch
from tqdm import tqdm

from cli import compute_in
from finetune import lm_loss
from lora import quant_linears
from quant import dequantize, unpack
from recipes import lr_factor

MAX_GRAD_NORM = 0.3   # EfficientQAT's E2E-QP scripts (--max_grad_norm 0.3)


def end_to_end(model, tokens, epochs, lr_scale, lr_lora, device="cpu", teacher=None, dtype=torch.float32) -> list:
    """Train every frozen QuantLinear's scale (and A, B where lr_lora > 0) of `model` on windows
    `tokens` (n, T) for `epochs` passes, one window a step in fixed order, on next-token cross-
    entropy or, with a full-precision `teacher`, the KL to its distribution; the codes and zero
    points do not change. The scales stay where they are stored (fp32), so the model saves as
    before; with `dtype` bf16 / fp16 (calibrate.py --dtype) the matmuls run under autocast, as the
    block-wise pass's do. The model ends where it was, in eval mode. Returns the log: loss, the
    step's seconds."""
    lins = [m for _, m in quant_linears(model)]
    scales = [m.scale for m in lins] if lr_scale > 0 else []
    lora = [p for m in lins for p in m.lora_parameters()] if lr_lora > 0 else []
    groups = [g for g in ({"params": scales, "lr": lr_scale}, {"params": lora, "lr": lr_lora}) if g["params"]]
    params = scales + lora
    if not params:   # calibrate.py refuses this before the block-wise pass; a direct caller gets the same line
        raise ValueError("end-to-end stage: nothing to train (--e2e-lr-scale and --e2e-lr-lora are both 0)")
    # trained scales: Q(W) made from the fixed codes in every step, differentiable in the scale (its
    # gradient needs dL/dQ(W) of every linear: a step costs ~3 forwards); fixed scales: Q(W) once
    codes = [unpack(m.codes, m.bits, (m.out_features, m.in_features)) for m in lins] if scales else []  # uint8
    if not scales:
        for m in lins:
            m.cache_qweight()
    was = {p: p.requires_grad for p in [*model.parameters(), *scales]}
    home = next(model.parameters()).device
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    total = epochs * len(tokens)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor("cosine", k, total))
    model.to(device).train()
    log, bar = [], tqdm(total=total, desc="end to end", unit="step", mininterval=1.0)
    try:
        for _ in range(epochs):
            for i in range(len(tokens)):
                t0 = time.time()
                for m, c in zip(lins, codes):          # (out, in): Q(W) from the fixed codes, eq. (6)
                    m.q_cache = dequantize(c, m.scale, m.zero.float(), m.group_size)
                with compute_in(device, dtype):
                    loss = lm_loss(model, tokens[i:i + 1].to(device), teacher)   # cross-entropy, or KL to the teacher
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"end-to-end stage: the loss became {loss.item()} at step {len(log)}; "
                                             f"lower --e2e-lr-scale / --e2e-lr-lora")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
                sched.step()
                log.append({"loss": round(loss.item(), 5), "seconds": round(time.time() - t0, 3)})
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                bar.update()
    finally:
        bar.close()
        for m in lins:                                 # plain frozen linears again: Q(W) from the codes
            m.drop_cache()
        for p, grad in was.items():
            p.grad = None
            p.requires_grad_(grad)
        model.to(home).eval()
    return log
