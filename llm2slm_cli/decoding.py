"""Speculative decoding with an LLM-to-SLM draft (paper Tables 5 and 12): the draft proposes `gamma` tokens, the LLM
checks them in one forward pass.

- The LLM's pass over the prompt happens once and serves both sides: for an encoder-decoder LLM its encoder output
  is the verifier's cross-attention input *and* the draft's features; for a decoder-only LLM, one forward pass
  fills the verifier's KV cache and gives the draft the hidden states of its layer. The draft SLM's own encoder (if
  it has one) also runs once.
- Greedy verification emits exactly the LLM's greedy tokens. Sampling uses the standard rejection scheme (accept a
  draft token with probability min(1, p/q), else sample from the normalised max(0, p - q); a bonus token from p when
  all are accepted), which leaves the output distributed as the LLM's own sampling.
- Batches decode in lockstep: each round every unfinished row advances by the same number of tokens, m + 1, where m
  is the smallest number of drafts any unfinished row accepted. A row that accepted more keeps its first m + 1
  accepted tokens; since when a row is cut short depends only on the other rows, its tokens keep the right
  distribution. Lockstep keeps every KV cache rectangular, which models with relative position biases (T5) need.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from llm2slm_cli.errors import UserError


class Stepper:
    """One model decoding a batch token by token with its KV cache; every row is fed the same number of tokens.

    Decoder-only: the prompt is left-padded, position ids count real tokens only. Encoder-decoder: the encoder
    output is given once, the decoder starts from nothing and its cache holds the tokens fed so far.
    """

    def __init__(self, model, *, encoder_decoder: bool) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        self.model = model
        self.encoder_decoder = encoder_decoder
        self.cache = (EncoderDecoderCache(DynamicCache(), DynamicCache()) if encoder_decoder
                      else DynamicCache(config=model.config))
        self.fed = 0  # tokens fed after the prompt (decoder-only) / in the decoder (encoder-decoder)
        self.mask: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None
        self.encoder_outputs: Any = None
        self.encoder_mask: torch.Tensor | None = None

    def start_encoder_decoder(self, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor) -> None:
        from transformers.modeling_outputs import BaseModelOutput

        self.encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden)
        self.encoder_mask = encoder_mask

    def prefill(self, mask: torch.Tensor, *, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool = False):
        """Decoder-only: run the left-padded prompt; returns the model output (logits of every position)."""
        self.mask = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.next_position = mask.sum(-1)
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                          position_ids=positions, past_key_values=self.cache, use_cache=True,
                          output_hidden_states=output_hidden_states)

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed (batch, k) tokens; returns their logits (batch, k, vocab)."""
        k = tokens.shape[1]
        if self.encoder_decoder:
            out = self.model(encoder_outputs=self.encoder_outputs, attention_mask=self.encoder_mask,
                             decoder_input_ids=tokens, past_key_values=self.cache, use_cache=True)
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(tokens.shape)], 1)
            positions = self.next_position.unsqueeze(1) + torch.arange(k, device=tokens.device)
            out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True)
            self.next_position = self.next_position + k
        self.fed += k
        return out.logits

    def rewind(self, keep: int) -> None:
        """Forget all but the first `keep` tokens fed (drafts that were not accepted)."""
        drop = self.fed - keep
        if drop <= 0:
            return
        self.cache.crop(-drop)
        self.fed = keep
        if not self.encoder_decoder:
            self.mask = self.mask[:, : self.mask.shape[1] - drop]
            self.next_position = self.next_position - drop


@dataclass
class SpeculativeStats:
    rounds: int = 0  # LLM verification passes
    drafted: int = 0  # draft tokens proposed to unfinished rows
    accepted: int = 0  # of those, accepted by the LLM
    emitted: int = 0  # tokens emitted to unfinished rows
    row_rounds: int = 0  # (unfinished row, round) pairs

    def add(self, other: SpeculativeStats) -> None:
        """Count `other`'s calls in with these (a stage sums the statistics of its batches)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_llm_call(self) -> float:
        """Mean tokens a row gains per LLM forward pass (1.0 is plain decoding)."""
        return self.emitted / self.row_rounds if self.row_rounds else 0.0

    def as_counts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def as_dict(self) -> dict[str, Any]:
        return {"llm_calls": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_llm_call": round(self.tokens_per_llm_call, 4)}


def _process(logits: torch.Tensor, temperature: float, top_p: float, banned: list[int]) -> torch.Tensor:
    """Logits -> the probabilities sampling draws from (temperature, then nucleus), banned tokens removed."""
    logits = logits.float()
    if banned:
        logits[..., banned] = float("-inf")
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _greedy(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    return logits.argmax(-1)


@torch.inference_mode()
def speculative_generate(draft, verifier, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, gamma: int = 4,
                         max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         suppress_tokens: list[int] | None = None) -> tuple[list[list[int]], SpeculativeStats]:
    """Generate for right-padded prompts with `verifier` (a FrozenLLM: its full model checks) and `draft` (an
    LLMToSLM reading the same vocabulary). Returns token ids without the end token, and acceptance statistics.
    `suppress_tokens` are never generated (benchmarks suppress the end token to time an exact length)."""
    from llm2slm_cli.llm2slm import _right_to_left, strip_generated

    if gamma < 1:
        raise UserError("--gamma must be at least 1")
    cfg = draft.config
    if (cfg.peft or {}).get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise UserError("a prompt- or prefix-tuned draft cannot draft here (its virtual tokens are not part of the "
                        "incremental decoding): use a LoRA, fully fine-tuned or LLM-to-SLM draft")
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    banned = list(suppress_tokens or [])
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    llm_model = verifier.model
    llm_kind = verifier.kind
    if llm_kind == "encoder-only":
        raise UserError(f"the LLM {verifier.spec!r} is encoder-only: it cannot verify drafts")
    shares_llm = draft.has_llm and cfg.llm["fingerprint"] == verifier.fingerprint and \
        cfg.llm["layer"] == verifier.layer

    # --- the LLM's one pass over the prompt
    llm_step = Stepper(llm_model, encoder_decoder=llm_kind == "encoder-decoder")
    features = None
    if llm_kind == "encoder-decoder":
        hidden = llm_model.get_encoder()(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
        llm_step.start_encoder_decoder(hidden, prompt_mask)
        llm_pending = torch.full((batch, 1), llm_model.config.decoder_start_token_id, device=device)
        features = hidden if shares_llm else None
    else:
        ids_left, mask_left = _right_to_left(prompt_ids, prompt_mask)
        out = llm_step.prefill(mask_left, input_ids=ids_left, output_hidden_states=shares_llm)
        llm_pending = prompt_ids[:, :0]  # nothing pending: the prompt's last logits score the first draft
        llm_first = out.logits[:, -1:]
        if shares_llm:  # the same pass gives the draft its features: the hidden state of the draft's layer
            features, _ = _left_to_right(_layer(verifier, out.hidden_states), mask_left)
        del out

    # --- the draft's prompt: the fused embeddings, once
    p = draft.prompt_embeddings(prompt_ids, prompt_mask, features)
    draft_step = Stepper(draft.slm, encoder_decoder=cfg.slm_kind == "encoder-decoder")
    feed_draft, widen = draft.slm_ids, _widen(draft, verifier)  # a trimmed draft: its own ids, the LLM's scores
    if cfg.slm_kind == "encoder-decoder":
        enc = draft.slm.get_encoder()(inputs_embeds=p, attention_mask=prompt_mask).last_hidden_state
        draft_step.start_encoder_decoder(enc, prompt_mask)
        start = torch.full((batch, 1), cfg.decoder_start_token_id, device=device)
        draft_logits = widen(draft_step.feed(feed_draft(start))[:, -1])
    else:
        p_left, m_left = _right_to_left(p, prompt_mask)
        draft_logits = widen(draft_step.prefill(m_left, inputs_embeds=p_left).logits[:, -1])

    stats = SpeculativeStats()
    out_tokens = torch.full((batch, 0), pad, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    while out_tokens.shape[1] < max_new_tokens and not bool(done.all()):
        g = min(gamma, max_new_tokens - out_tokens.shape[1])
        # 1. draft g tokens
        drafts, q = [], []
        base = draft_step.fed
        for j in range(g):
            if do_sample:
                qj = _process(draft_logits, temperature, top_p, banned)
                dj = torch.multinomial(qj, 1, generator=generator).squeeze(1)
                q.append(qj)
            else:
                dj = _greedy(draft_logits, banned)
            drafts.append(dj)
            if j < g - 1:
                draft_logits = widen(draft_step.feed(feed_draft(dj.unsqueeze(1)))[:, -1])
        d = torch.stack(drafts, 1)  # (batch, g)
        # 2. the LLM scores the pending token and all drafts in one pass: p_1 .. p_{g+1}
        llm_base, pending = llm_step.fed, llm_pending.shape[1]
        logits = llm_step.feed(torch.cat([llm_pending, d], 1))[:, -(g + 1):]
        if not pending:  # first round of a decoder-only LLM
            logits = torch.cat([llm_first, logits[:, :g]], 1)
        # 3. how many drafts each row accepts
        if do_sample:
            p_all = _process(logits, temperature, top_p, banned)
            q_all = torch.stack(q, 1)
            p_d = p_all[:, :g].gather(-1, d.unsqueeze(-1)).squeeze(-1)
            q_d = q_all.gather(-1, d.unsqueeze(-1)).squeeze(-1)
            u = torch.rand(p_d.shape, generator=generator, device=device)
            ok = u < (p_d / q_d.clamp_min(1e-20)).clamp(max=1.0)
        else:
            target = _greedy(logits, banned)
            ok = d == target[:, :g]
        accepted = torch.cumprod(ok.long(), 1).sum(1)  # leading accepted drafts per row
        live = ~done
        m = int(accepted[live].min()) if bool(live.any()) else g
        # 4. the (m+1)-th token of every row
        if do_sample:
            if m < g:
                residual = (p_all[:, m] - q_all[:, m]).clamp_min(0)
                fallback = residual.sum(-1, keepdim=True) <= 0  # p == q: any sample of p is right
                residual = torch.where(fallback, p_all[:, m], residual)
                corrected = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1,
                                              generator=generator).squeeze(1)
                nxt = torch.where(accepted > m, d[:, m], corrected)
            else:
                nxt = torch.multinomial(p_all[:, g], 1, generator=generator).squeeze(1)
        else:
            nxt = target[:, m]
        emitted = torch.cat([d[:, :m], nxt.unsqueeze(1)], 1)  # (batch, m + 1)
        # 5. bookkeeping: finished rows emit padding; stop at the first end token
        emitted = torch.where(done.unsqueeze(1), torch.full_like(emitted, pad), emitted)
        n_live = int(live.sum())
        stats.rounds += 1
        stats.row_rounds += n_live
        stats.drafted += g * n_live
        stats.accepted += int(accepted[live].clamp(max=g).sum())
        stats.emitted += (m + 1) * n_live
        out_tokens = torch.cat([out_tokens, emitted], 1)
        done = done | (emitted == eos).any(1)
        # 6. roll both caches back to what was accepted and queue the rest
        llm_step.rewind(llm_base + pending + m)  # the pending token + the m accepted drafts
        llm_pending = nxt.unsqueeze(1)
        kept = min(m, g - 1)  # drafts d_1..d_{g-1} were fed to the draft; d_g never was
        draft_step.rewind(base + kept)
        draft_logits = widen(draft_step.feed(feed_draft(emitted[:, kept:]))[:, -1])
    return strip_generated(out_tokens[:, :max_new_tokens], eos, pad), stats


def _widen(draft, verifier):
    """Scores over a trimmed draft's kept tokens -> scores over the LLM's vocabulary (-inf for unkept tokens, which
    the draft can never propose: probability 0 in rejection sampling)."""
    if draft.config.trim_vocab is None:
        return lambda logits: logits
    width = max(draft.config.trim_vocab["full"], verifier.config.vocab_size)

    def widen(logits: torch.Tensor) -> torch.Tensor:
        full = logits.new_full((*logits.shape[:-1], width), float("-inf"))
        full[..., draft.slm_vocab] = logits
        return full

    return widen


def _layer(verifier, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The decoder-only LLM's features as FrozenLLM.encode defines them, from a pass with all hidden states."""
    if verifier.layer == "all":
        return torch.stack(hidden_states[1:]).float().mean(0).to(hidden_states[-1].dtype)
    return hidden_states[verifier.layer]


def _left_to_right(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.shape[1]
    shift = m - mask.sum(1, keepdim=True)
    idx = (torch.arange(m, device=mask.device).unsqueeze(0) + shift) % m
    return torch.gather(x, 1, idx.unsqueeze(-1).expand_as(x)), torch.gather(mask, 1, idx)
