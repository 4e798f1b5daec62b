"""A faster vocabulary head for decoding on a CPU.

A decoding step multiplies a few hidden states (one per row, or the g + 1 tokens a speculative pass verifies) by the
head's (vocabulary x d) matrix. On the CPUs we measured (torch 2.13's MKL on an AMD EPYC), `F.linear` takes a slow
path for that shape: a 3-row product with Gemma-3's 262,144 x 640 head costs 240 ms against 41 ms for the same product
computed as `W @ h.T`, and a 1-row one (a matrix-vector product) 70 ms against 30 ms when the row is given twice
(docs/BENCHMARKS.md, "The vocabulary head on a CPU"). The head is the largest matrix of a small model, so this is
most of a step.

`prepare(model)` marks the model's output Linear (when it is that wide); inside `fast_heads()` (our decoding loop's
steps, decoding.Stepper) a marked head computes its few rows that way. Everywhere else -- training, transformers'
own generate, a GPU, other dtypes, more than ROWS rows, gradients -- it is the plain Linear. The products are the same
sums in another order: logits agree to float32 rounding, not bit for bit, with F.linear.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

ENABLED = True  # False: every head is the plain Linear (benchmarks/cpu_head.py times both)
ROWS = 64  # at most this many hidden states per call take the W @ h.T product
MIN_VOCAB = 16_384  # narrower heads are a small part of a step
_state = threading.local()


class WideHead(nn.Linear):
    """An nn.Linear whose few-row float32 CPU products are W @ h.T inside `fast_heads()`; its class is swapped in
    place (`prepare`), so its parameters, their ties and the state dict stay the model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (not getattr(_state, "on", False) or x.device.type != "cpu" or x.dtype != torch.float32
                or w.dtype != torch.float32 or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
                or torch.compiler.is_compiling()):
            return F.linear(x, w, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n > ROWS:
            return F.linear(x, w, self.bias)
        # a matrix-vector product takes MKL's slow path: give it two rows (copies: a stride-0 expand is slower still)
        both = rows if n > 1 else rows.repeat(2, 1)
        out = (w @ both.T).T[:n]
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], w.shape[0])


def prepare(model: nn.Module) -> None:
    """Mark `model`'s output embedding as a WideHead when it is a plain, wide nn.Linear (quantized, PEFT-wrapped and
    narrow heads stay as they are)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    # a torchao-quantized head is an nn.Linear whose weight is a tensor subclass (its own kernels): left alone
    if type(head) is nn.Linear and head.out_features >= MIN_VOCAB and type(head.weight) is nn.Parameter:
        head.__class__ = WideHead


@contextmanager
def fast_heads():
    """Marked heads take the few-row path inside this block (this thread only)."""
    before = getattr(_state, "on", False)
    _state.on = ENABLED
    try:
        yield
    finally:
        _state.on = before
