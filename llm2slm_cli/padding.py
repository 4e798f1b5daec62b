"""Padding and end-token helpers shared by the model (llm2slm.py) and the decoding loops (decoding.py).

They live apart so that neither of those modules imports the other for them: llm2slm.py uses decoding.py, and
decoding.py (speculative decoding) needs only these two functions.
"""

from __future__ import annotations

from typing import Any


def right_to_left(x: Any, mask: Any) -> tuple[Any, Any]:
    """Move right padding to the left (decoder-only SLMs generate after a left-padded prompt): (batch, m) token ids
    or (batch, m, d) embeddings, with their (batch, m) mask."""
    import torch

    m = mask.shape[1]
    shift = m - mask.sum(1, keepdim=True)
    idx = (torch.arange(m, device=mask.device).unsqueeze(0) - shift) % m
    mask = torch.gather(mask, 1, idx)
    if x.dim() == 3:
        x = torch.gather(x, 1, idx.unsqueeze(-1).expand_as(x))
    else:
        x = torch.gather(x, 1, idx)
    return x, mask


def strip_generated(out: Any, eos_id: int, pad_id: int) -> list[list[int]]:
    """Cut each row of (batch, n) generated ids at its first end token; rows that stopped early are padded after it."""
    result = []
    for row in out.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        while row and row[-1] == pad_id:
            row.pop()
        result.append(row)
    return result
