"""torchao's int8 weight-only Linear, with a decoding step's few-row product in the form torch.compile fuses.

torchao (quantize.py) turns a Linear's weight into an int8 tensor with one float scale per output row. Its own
product dequantizes the whole weight, then multiplies (`mm(x, q.t().to(x.dtype)) * scale`); inductor compiles that
into the same two steps, which on the CPUs we measured costs more than the float32 product it replaces (T5-Small: 77
ms per compiled step against 26 in float32, docs/BENCHMARKS.md "Where a T5-Small step goes"), and inductor's fused
weight-only kernels take bfloat16 activations only. Written as a product summed over the input dimension, `(x[:, None,
:] * q.to(x.dtype)).sum(-1) * scale`, inductor fuses it into one loop that reads each int8 weight once, converts it
in registers and accumulates in float32: a quarter of float32's weight bytes per step, float32 arithmetic.

That form is used inside a compiled graph for at most ROWS rows (a decoding step, a few beams); everywhere else --
eager calls, a prompt's pass, training -- the product is torchao's own. Both compute the same float32 sums of
the same dequantized weights, in another order: logits agree to float32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ROWS = 8  # at most this many rows take the fused product (more rows: one dequantized weight serves them all)


class Int8WeightLinear(nn.Linear):
    """An nn.Linear whose weight is torchao's Int8Tensor (int8 `qdata`, per-row `scale`); its class is swapped in
    place (`mark`), so its parameters and the state dict stay torchao's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not torch.compiler.is_compiling() or x.numel() > ROWS * x.shape[-1]:
            return F.linear(x, w, self.bias)
        y = (x.unsqueeze(-2) * w.qdata.to(x.dtype)).sum(-1) * w.scale.reshape(-1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def mark(root: nn.Module) -> int:
    """Every Linear under `root` with a torchao int8 weight-only weight becomes an Int8WeightLinear; how many."""
    n = 0
    for m in root.modules():
        w = getattr(m, "weight", None)
        if (type(m) is nn.Linear and hasattr(w, "qdata") and hasattr(w, "scale")
                and getattr(w, "act_quant_kwargs", None) is None and tuple(w.scale.shape)[:1] == (m.out_features,)
                and (getattr(w, "zero_point", None) is None or not bool(w.zero_point.any()))):  # symmetric
            m.__class__ = Int8WeightLinear
            n += 1
    return n
