"""Step-level (continuous) batching: rows join a running batch between two decoding steps and leave it when they end.

The server's step-level batcher (server/serving.py, through api.Model.steps) keeps one `Running` batch. Prompts that
arrive are prefilled on their own, apart from the running rows: the model's `prefill` is the first part of its
`generate` (for a checkpoint: the LLM encodes the prompt, the projector fuses, the SLM reads the fused embeddings),
which leaves a decoding.Stepper (the KV cache, attention mask and positions of those rows) and the scores of each
row's first token. At the next step boundary `Stepper.join` merges that Stepper into the running one: self-attention
caches padded on the left along the sequence axis with a zero attention mask there, decoder-only positions kept per
row (counted from each row's first real token, so RoPE and learned positions see what they saw alone), an
encoder-decoder's encoder output, its mask and its cross-attention cache padded on the right. A row that has ended is
removed by index-selecting the cache rows (`Stepper.keep`), and cache columns that no row reads any more go with it.

Each row chooses its token as decoding.decode does for a batch of one: the argmax of its scores (greedy), or (sampling)
a draw from the same warped distribution with the row's own torch.Generator, seeded by the request's seed, so a
row's tokens never depend on the rows it shares its steps with. Greedy output therefore equals the row decoded alone:
the masked padding adds exact zeros to the attention, and only the summation order of a larger matrix product
differs (float32 on a CPU; tested). Beam search, the repetition penalty and the n-gram ban are not done here (their
state spans the whole decoding of a prompt): the server decodes such requests in request-level batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llm2slm_cli import decoding
from llm2slm_cli.decoding import Search, Stepper


def steppable(model) -> bool:
    """Can `model` (a transformers model our loop decodes) take rows between steps: plain dynamic caches only (not a
    sliding-window or linear-attention cache, whose tensors cannot be padded; not a static or compiled cache)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if model.__dict__.get(decoding.DECODE_OPTIONS):
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config the cache cannot read: not one we can merge safely
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


@dataclass(eq=False)
class Row:
    """One response in the running batch: its Search (limits, sampling settings, end token, in the stepped model's
    ids), the generator its draws come from (sampling; None: torch's global one), how many tokens it has, and `emit`,
    which takes each new token (the tokenizer's id) and answers True once the row needs no more."""

    search: Search
    emit: Callable[[int], bool]
    generator: torch.Generator | None = None
    tag: Any = None
    t: int = 0


class Running:
    """The running batch of one model: `join` adds prefilled rows at a step boundary, `advance` decodes one token for
    every row and returns the rows that ended (they have left). `to_tokenizer` maps the model's ids to the
    tokenizer's (a trimmed vocabulary)."""

    def __init__(self, to_tokenizer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.to_tokenizer = to_tokenizer or (lambda ids: ids)
        self.step: Stepper | None = None
        self.logits: torch.Tensor | None = None
        self.rows: list[Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.step, self.logits, self.rows = None, None, []

    @torch.inference_mode()
    def join(self, step: Stepper, logits: torch.Tensor, rows: list[Row]) -> None:
        """Rows prefilled together (`step`, their first-token scores `logits`) join the batch."""
        if len(rows) != logits.shape[0]:
            raise ValueError(f"{len(rows)} rows for {logits.shape[0]} prefilled prompts")
        if self.step is None:
            self.step, self.logits, self.rows = step, logits, list(rows)
            return
        self.step.join(step)
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
        self.rows.extend(rows)

    @torch.inference_mode()
    def advance(self) -> list[Row]:
        """One step: every row takes its next token; the rows that ended leave (and are returned), the others are fed
        their token."""
        if not self.rows:
            return []
        scores = self.logits.to(dtype=torch.float32, copy=True)
        for i, row in enumerate(self.rows):
            if row.search.suppress or row.t < row.search.min_new_tokens:
                decoding._ban(scores[i: i + 1], row.search, row.t)
        tokens = scores.argmax(-1)
        for i, row in enumerate(self.rows):
            s = row.search
            if s.do_sample:
                probs = decoding._process(scores[i: i + 1], s.temperature, s.top_p, [], top_k=s.top_k)
                tokens[i] = torch.multinomial(probs, 1, generator=row.generator)[0, 0]
        ids = self.to_tokenizer(tokens).tolist()
        chosen = tokens.tolist()
        ended, going = [], []
        for i, row in enumerate(self.rows):
            row.t += 1
            stop = row.emit(ids[i])
            if stop or chosen[i] == row.search.eos_token_id or row.t >= row.search.max_new_tokens:
                ended.append(row)
            else:
                going.append(i)
        if not going:
            self.clear()
            return ended
        if ended:
            keep = torch.tensor(going, device=tokens.device)
            self.step.keep(keep)
            tokens = tokens.index_select(0, keep)
            self.rows = [self.rows[i] for i in going]
        self.logits = self.step.feed(tokens.unsqueeze(1))[:, -1]
        return ended
