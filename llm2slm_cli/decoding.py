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
  It also ties a row's random draws to the other rows (how many tokens a round emits depends on all of them), so
  sampling here uses one generator for the batch: unlike `decode`'s per-row generators, a seeded speculative sample
  depends on the batch it was decoded in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from llm2slm_cli import cpu_head
from llm2slm_cli.errors import UserError
from llm2slm_cli.padding import right_to_left, strip_generated


class Stepper:
    """One model decoding a batch token by token with its KV cache; every row is fed the same number of tokens.

    Decoder-only: the prompt is left-padded, position ids count real tokens only. Encoder-decoder: the encoder
    output is given once, the decoder starts from nothing and its cache holds the tokens fed so far. The attention
    mask of the tokens to come is allocated once (`reserve`), so a step takes a view instead of a new tensor.

    `static`: transformers' StaticCache, allocated once for the prompt plus `reserve` tokens (encoder-decoder: the
    encoder's length for cross-attention, `reserve` decoder tokens), so a one-token step has the same shapes every
    time; `compiled` also runs those steps through torch.compile (CUDA: mode reduce-overhead, i.e. CUDA graphs). The
    prompt's pass, and an encoder-decoder's first decoder step (which fills the cross-attention cache), stay eager.
    A static cache cannot be cropped: no `rewind`.
    """

    def __init__(self, model, *, encoder_decoder: bool, reserve: int = 0, static: bool = False,
                 compiled: bool = False) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        cpu_head.prepare(model)  # a wide vocabulary head takes the fast few-row product in our steps (cpu_head)
        self.model = model
        self.encoder_decoder = encoder_decoder
        self.static = static or compiled
        self._forward = compiled_forward(model) if compiled else model
        self.cache = None if self.static else (
            EncoderDecoderCache(DynamicCache(), DynamicCache()) if encoder_decoder
            else DynamicCache(config=model.config))
        self.reserve = reserve
        self.fed = 0  # tokens fed after the prompt (decoder-only) / in the decoder (encoder-decoder)
        self.mask: torch.Tensor | None = None
        self._mask_buffer: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None
        self.encoder_outputs: Any = None
        self.encoder_mask: torch.Tensor | None = None
        self.decoder_mask: torch.Tensor | None = None  # encoder-decoder rows joined with padding (`join`)

    def start_encoder_decoder(self, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor) -> None:
        from transformers.modeling_outputs import BaseModelOutput

        self.encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden)
        self.encoder_mask = encoder_mask
        if self.static and self.cache is None:
            from transformers import EncoderDecoderCache, StaticCache

            self.cache = EncoderDecoderCache(
                StaticCache(config=self.model.config, max_cache_len=max(self.reserve, 1)),
                StaticCache(config=self.model.config, max_cache_len=encoder_hidden.shape[1]))

    def prefill(self, mask: torch.Tensor, *, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool = False,
                logits_to_keep: int = 0):
        """Decoder-only: run the left-padded prompt; returns the model output (logits of the last `logits_to_keep`
        positions; 0: of every position)."""
        self._mask_buffer = torch.cat([mask, mask.new_ones(mask.shape[0], self.reserve)], 1)
        self.mask = self._mask_buffer[:, : mask.shape[1]]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.next_position = mask.sum(-1)
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        if self.static:
            from transformers import StaticCache

            self.cache = StaticCache(config=self.model.config, max_cache_len=self._mask_buffer.shape[1])
            self.mask = self._mask_buffer  # every step reads the whole buffer: the cache's length, fixed
        with cpu_head.fast_heads():
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=self.mask,
                              position_ids=positions, past_key_values=self.cache, use_cache=True,
                              output_hidden_states=output_hidden_states, **extra)

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed (batch, k) tokens; returns their logits (batch, k, vocab)."""
        k = tokens.shape[1]
        if self.static:
            return self._feed_static(tokens)
        if self.encoder_decoder:
            extra = {}
            if self.decoder_mask is not None:
                self.decoder_mask = torch.cat([self.decoder_mask, self.decoder_mask.new_ones(tokens.shape[0], k)], 1)
                extra["decoder_attention_mask"] = self.decoder_mask
            with cpu_head.fast_heads():
                out = self.model(encoder_outputs=self.encoder_outputs, attention_mask=self.encoder_mask,
                                 decoder_input_ids=tokens, past_key_values=self.cache, use_cache=True, **extra)
        else:
            width = self.mask.shape[1] + k
            if width > self._mask_buffer.shape[1]:  # past the reserve: grow it
                grow = max(k, self.reserve, 16)
                self._mask_buffer = torch.cat([self._mask_buffer, self.mask.new_ones(tokens.shape[0], grow)], 1)
            self.mask = self._mask_buffer[:, :width]
            positions = self.next_position.unsqueeze(1) + torch.arange(k, device=tokens.device)
            with cpu_head.fast_heads():
                out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                                 past_key_values=self.cache, use_cache=True)
            self.next_position = self.next_position + k
        self.fed += k
        return out.logits

    def _feed_static(self, tokens: torch.Tensor) -> torch.Tensor:
        """`feed` with the static cache: the mask is the whole buffer (slots not written yet are causally masked),
        positions and cache offsets are device tensors, so nothing waits for the device and the shapes never
        change; the filled cache decides which steps go through the compiled forward."""
        k = tokens.shape[1]
        if self.fed + k > self.reserve:
            raise RuntimeError(f"static cache of {self.reserve} new tokens is full")
        if self.encoder_decoder:
            forward = self._forward if self.fed > 0 and k == 1 else self.model  # the first fills cross-attention
            _cudagraph_step(forward is not self.model)
            with cpu_head.fast_heads():
                out = forward(encoder_outputs=self.encoder_outputs, attention_mask=self.encoder_mask,
                              decoder_input_ids=tokens, past_key_values=self.cache, use_cache=True)
        else:
            positions = self.next_position.unsqueeze(1) + torch.arange(k, device=tokens.device)
            forward = self._forward if k == 1 else self.model
            _cudagraph_step(forward is not self.model)
            with cpu_head.fast_heads():
                out = forward(input_ids=tokens, attention_mask=self._mask_buffer, position_ids=positions,
                              past_key_values=self.cache, use_cache=True)
            self.next_position = self.next_position + k
        self.fed += k
        # CUDA graphs write every call's outputs into the same memory: keep this step's apart
        return out.logits.clone() if forward is not self.model and out.logits.is_cuda else out.logits

    def rewind(self, keep: int) -> None:
        """Forget all but the first `keep` tokens fed (drafts that were not accepted)."""
        if self.static:
            raise RuntimeError("a static cache cannot be rewound")
        drop = self.fed - keep
        if drop <= 0:
            return
        self.cache.crop(-drop)
        self.fed = keep
        if not self.encoder_decoder:
            self.mask = self._mask_buffer[:, : self.mask.shape[1] - drop]
            self.next_position = self.next_position - drop

    def repeat(self, n: int) -> None:
        """Every row becomes n consecutive rows (beam search after one prefill of each prompt)."""
        if n == 1:
            return
        if self.static:
            _static_layers(self.cache, lambda t: t.repeat_interleave(n, 0))
        else:
            self.cache.batch_repeat_interleave(n)
        if self.encoder_decoder:
            hidden = self.encoder_outputs.last_hidden_state.repeat_interleave(n, 0)
            self.start_encoder_decoder(hidden, self.encoder_mask.repeat_interleave(n, 0))
        else:
            width = self.mask.shape[1]
            self._mask_buffer = self._mask_buffer.repeat_interleave(n, 0)
            self.mask = self._mask_buffer[:, :width]
            self.next_position = self.next_position.repeat_interleave(n, 0)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from row rows[i] (beam search). Rows move within their prompt's beams, so the prompt
        masks, positions and encoder output stay as they are."""
        if self.static:  # in place: the compiled steps read the cache at fixed addresses
            _static_layers(self.cache, lambda t: t.copy_(t.index_select(0, rows)), self_attention_only=True)
        else:
            self.cache.reorder_cache(rows)


    # ------------------------------------------------------------------- step-level batching (continuous.py)

    def join(self, other: Stepper) -> None:
        """The rows of `other` (a Stepper of the same model after its own prompt's pass) continue as rows of this
        one, after this one's. Self-attention caches are padded on the left along the sequence axis to a common
        length, the padding masked out; decoder-only rows keep their own positions (counted from their first real
        token), an encoder-decoder's rows their own decoder lengths, which T5's relative positions need: a row's
        query and keys move together. An encoder-decoder's encoder output, its mask and the cross-attention cache are
        padded on the right. Dynamic caches only."""
        if self.static or other.static:
            raise RuntimeError("a static cache cannot take more rows")
        if self.encoder_decoder:
            self_a, self_b = self.cache.self_attention_cache, other.cache.self_attention_cache
            width = max(self_a.get_seq_length(), self_b.get_seq_length())
            self.decoder_mask = torch.cat([_pad_left(_decoder_mask(self), width), _pad_left(_decoder_mask(other),
                                                                                              width)])
            _join_layers(self_a, self_b, width, left=True)
            hidden_a, hidden_b = self.encoder_outputs.last_hidden_state, other.encoder_outputs.last_hidden_state
            length = max(hidden_a.shape[1], hidden_b.shape[1])
            _join_layers(self.cache.cross_attention_cache, other.cache.cross_attention_cache, length, left=False)
            hidden = torch.cat([_pad_right(hidden_a, length, seq_dim=1), _pad_right(hidden_b, length, seq_dim=1)])
            self.encoder_outputs = type(self.encoder_outputs)(last_hidden_state=hidden)
            self.encoder_mask = torch.cat([_pad_right(self.encoder_mask, length, seq_dim=1),
                                           _pad_right(other.encoder_mask, length, seq_dim=1)])
        else:
            width = max(self.mask.shape[1], other.mask.shape[1])
            _join_layers(self.cache, other.cache, width, left=True)
            mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
            self.reserve = max(self.reserve, other.reserve)
            self._mask_buffer = torch.cat([mask, mask.new_ones(mask.shape[0], self.reserve)], 1)
            self.mask = self._mask_buffer[:, :width]
            self.next_position = torch.cat([self.next_position, other.next_position])
        self.fed = max(self.fed, other.fed)  # rows now differ in what they were fed: no `rewind`

    def keep(self, rows: torch.Tensor) -> None:
        """Only rows `rows` (indices, in order) go on; the cache columns no kept row reads any more (padding in
        front of every row; an encoder output's padding after every row) are dropped."""
        if self.static:
            raise RuntimeError("a static cache cannot drop rows")
        self.cache.batch_select_indices(rows)
        if self.encoder_decoder:
            hidden = self.encoder_outputs.last_hidden_state.index_select(0, rows)
            self.encoder_mask = self.encoder_mask.index_select(0, rows)
            length = int(self.encoder_mask.any(0).nonzero().max()) + 1
            if length < hidden.shape[1]:
                hidden, self.encoder_mask = hidden[:, :length], self.encoder_mask[:, :length]
                _crop_layers(self.cache.cross_attention_cache, slice(0, length))
            self.encoder_outputs = type(self.encoder_outputs)(last_hidden_state=hidden)
            if self.decoder_mask is not None:
                mask = self.decoder_mask.index_select(0, rows)
                lead = int(mask.argmax(1).min())  # every row has a real token
                if lead:
                    _crop_layers(self.cache.self_attention_cache, slice(lead, None))
                    mask = mask[:, lead:]
                self.decoder_mask = None if bool(mask.all()) else mask
        else:
            width = self.mask.shape[1]
            self._mask_buffer = self._mask_buffer.index_select(0, rows)
            self.next_position = self.next_position.index_select(0, rows)
            lead = int(self._mask_buffer[:, :width].argmax(1).min())
            if lead:
                _crop_layers(self.cache, slice(lead, None))
                self._mask_buffer, width = self._mask_buffer[:, lead:], width - lead
            self.mask = self._mask_buffer[:, :width]


def _decoder_mask(step: Stepper) -> torch.Tensor:
    if step.decoder_mask is not None:
        return step.decoder_mask
    n = step.cache.self_attention_cache.get_seq_length()
    return torch.ones(step.encoder_mask.shape[0], n, dtype=step.encoder_mask.dtype, device=step.encoder_mask.device)


def _pad_left(t: torch.Tensor, width: int, seq_dim: int = 1) -> torch.Tensor:
    """Zeros in front of `t` along `seq_dim` up to `width`."""
    short = width - t.shape[seq_dim]
    if not short:
        return t
    shape = list(t.shape)
    shape[seq_dim] = short
    return torch.cat([t.new_zeros(shape), t], seq_dim)


def _pad_right(t: torch.Tensor, width: int, seq_dim: int) -> torch.Tensor:
    short = width - t.shape[seq_dim]
    if not short:
        return t
    shape = list(t.shape)
    shape[seq_dim] = short
    return torch.cat([t, t.new_zeros(shape)], seq_dim)


def _join_layers(a, b, width: int, *, left: bool) -> None:
    """Cache `b`'s rows after `a`'s, layer by layer (keys and values: batch, heads, sequence, head dim), each padded
    with zeros to `width` along the sequence on the left or the right."""
    pad = _pad_left if left else _pad_right
    if len(a.layers) != len(b.layers):
        raise RuntimeError("caches of different models cannot be joined")
    for la, lb in zip(a.layers, b.layers):
        if not (la.is_initialized and lb.is_initialized):
            raise RuntimeError("a cache layer was never filled: these caches cannot be joined")
        la.keys = torch.cat([pad(la.keys, width, seq_dim=-2), pad(lb.keys, width, seq_dim=-2)])
        la.values = torch.cat([pad(la.values, width, seq_dim=-2), pad(lb.values, width, seq_dim=-2)])


def _crop_layers(cache, columns: slice) -> None:
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[..., columns, :], layer.values[..., columns, :]


def _static_layers(cache, fn, *, self_attention_only: bool = False) -> None:
    """Apply `fn` to the key and value tensors of every layer of a static cache (an EncoderDecoderCache's two)."""
    caches = [cache]
    if hasattr(cache, "self_attention_cache"):
        # rows move within their prompt's beams, so cross-attention (the same for every beam) need not be reordered
        caches = [cache.self_attention_cache] + ([] if self_attention_only else [cache.cross_attention_cache])
    for c in caches:
        for layer in c.layers:
            if layer.is_initialized:
                new_keys, new_values = fn(layer.keys), fn(layer.values)
                if new_keys is not layer.keys:  # a new tensor (repeat): a new static address
                    layer.keys, layer.values = new_keys, new_values
                    layer.batch_size = new_keys.shape[0]
                    torch._dynamo.mark_static_address(layer.keys)
                    torch._dynamo.mark_static_address(layer.values)


def compiled_forward(model):
    """`model`'s forward through torch.compile, made once per model: mode reduce-overhead (CUDA graphs) on CUDA,
    inductor's default elsewhere. Every guard stays: skipping those of torch's built-in modules saved a T5-Small
    step 1-4 ms on a CPU (docs/BENCHMARKS.md), but with several models compiled in one process (a `bench` run of
    two SLMs) a step then ran another model's graph and failed (tests/test_recipes.py's device check)."""
    compiled = model.__dict__.get("_llm2slm_compiled")
    if compiled is None:
        device = next(model.parameters()).device
        compiled = torch.compile(model.forward, mode="reduce-overhead" if device.type == "cuda" else None,
                                 fullgraph=False)
        model.__dict__["_llm2slm_compiled"] = compiled
    return compiled


def _cudagraph_step(compiled: bool) -> None:
    """Before a compiled call: tell CUDA graphs that the previous step's outputs are no longer needed."""
    if compiled and torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()


# A hook that sees the tokens a decoding loop emits, as they are chosen: called with (batch, k >= 1) token ids (the
# tokenizer's ids; rows that have finished get padding), it may return a (batch,) bool mask of rows to stop now.
Streamer = Callable[[torch.Tensor], "torch.Tensor | Sequence[bool] | None"]


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

    def count_round(self, g: int, m: int, accepted: torch.Tensor, live: torch.Tensor) -> None:
        """One round of g drafts, m + 1 tokens emitted to each live row; `accepted`: each row's leading accepted
        drafts."""
        n_live = int(live.sum())
        self.rounds += 1
        self.row_rounds += n_live
        self.drafted += g * n_live
        self.accepted += int(accepted[live].clamp(max=g).sum())
        self.emitted += (m + 1) * n_live

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


def _process(logits: torch.Tensor, temperature: float, top_p: float, banned: list[int], *, top_k: int = 0
             ) -> torch.Tensor:
    """Logits -> the probabilities sampling draws from, as transformers' warpers make them: banned tokens removed,
    temperature, the `top_k` most likely (0: all), then the nucleus."""
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    if top_k and top_k < logits.shape[-1]:  # before top-p, as in transformers (and unchanged by the temperature)
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def row_generators(seeds: Sequence[int | None] | None, device: Any) -> list[torch.Generator] | None:
    """One generator per row, seeded with that row's seed, for `decode`'s sampling: a row's draws then depend on its
    seed alone, never on the rows batched with it. A row without a seed (None) gets a generator seeded from torch's
    global one (so unseeded rows still follow torch.manual_seed); no seeds, or none given: None (the global
    generator draws for the whole batch)."""
    if seeds is None or all(s is None for s in seeds):
        return None
    return [torch.Generator(device=device).manual_seed(
        int(s) if s is not None else int(torch.randint(0, 2**62, (1,)).item())) for s in seeds]


def _draw(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One token per row of (batch, vocab) probabilities: by one generator for the batch (None: torch's global one),
    or row i by generator[i] alone (`row_generators`)."""
    if isinstance(generator, list):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} row generators for a batch of {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(probs[i: i + 1], 1, generator=g) for i, g in enumerate(generator)]
                         ).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _greedy(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    return logits.argmax(-1)


@dataclass
class Search:
    """What `decode` does after the prompt: greedy, nucleus sampling or beam search, as transformers defines them.

    `min_new_tokens` bans the end token before then; `suppress` ids are never generated; `early_stopping` and
    `length_penalty` are beam search's (transformers' meanings); `repetition_penalty` and `no_repeat_ngram_size` are
    transformers' too, applied by its own processors (RepetitionControls). `check_every` steps between asking
    whether every row has finished (each ask waits for a GPU; a CPU loses nothing by asking every step).
    `static_cache` and `compile` choose how the steps run (Stepper), not what they compute: the greedy output is the
    same."""

    max_new_tokens: int
    eos_token_id: int | None
    pad_token_id: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k; search_from fills in transformers' default (50) where the model sets none
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    suppress: tuple[int, ...] = ()
    repetition_penalty: float = 1.0  # 1.0: off
    no_repeat_ngram_size: int = 0  # 0: off
    check_every: int = 1
    static_cache: bool = False
    compile: bool = False  # static cache + torch.compile of the one-token steps


# Options `decode` understands; anything else asked of a generation falls back to transformers' generate.
SEARCH_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams",
                  "length_penalty", "early_stopping", "suppress_tokens", "repetition_penalty", "no_repeat_ngram_size"}


def generation_value(generation_config: Any, name: str, fallback: Any = None) -> Any:
    """What transformers' generate uses for `name`: the model's generation config, or where that leaves it unset
    (None), the default generate fills in (transformers 5: top_k None in the config means 50)."""
    value = getattr(generation_config, name, None)
    if value is not None:
        return value
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    value = defaults().get(name) if defaults is not None else getattr(GenerationConfig(), name, None)
    return fallback if value is None else value


def search_from(options: dict[str, Any], generation_config: Any, *, eos: int | None, pad: int | None,
                device: Any) -> Search | None:
    """A Search for transformers-style generation options, or None where `decode` does not do what they ask
    (unknown options, or a model generation config that sets forced or banned words and the like). The repetition
    penalty and n-gram size come from `options`, else from the model's generation config, as generate takes them."""
    if set(options) - SEARCH_OPTIONS or options.get("max_new_tokens") is None:
        return None
    g = generation_config
    untouched = dict(encoder_repetition_penalty=1.0, encoder_no_repeat_ngram_size=0,
                     bad_words_ids=None, force_words_ids=None, forced_bos_token_id=None, forced_eos_token_id=None,
                     suppress_tokens=None, begin_suppress_tokens=None, sequence_bias=None, num_return_sequences=1,
                     diversity_penalty=0.0, renormalize_logits=False, min_length=0,
                     exponential_decay_length_penalty=None,
                     stop_strings=None, constraints=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                     min_p=None, top_h=None, watermarking_config=None, guidance_scale=None, max_time=None,
                     prompt_lookup_num_tokens=None, assistant_model=None, penalty_alpha=None, low_memory=None)
    for name, default in untouched.items():
        value = getattr(g, name, default)
        if value is not None and value != default:
            return None

    def pick(name: str, default: Any) -> Any:
        return options[name] if options.get(name) is not None else generation_value(g, name, default)

    do_sample = bool(options.get("do_sample", False))
    if eos is None and pad is None:
        return None
    return Search(max_new_tokens=int(options["max_new_tokens"]), eos_token_id=eos,
                  pad_token_id=pad if pad is not None else eos, min_new_tokens=int(options.get("min_new_tokens") or 0),
                  do_sample=do_sample, temperature=float(pick("temperature", 1.0)) if do_sample else 1.0,
                  top_p=float(pick("top_p", 1.0)) if do_sample else 1.0,
                  top_k=int(pick("top_k", 0) or 0) if do_sample else 0, num_beams=int(pick("num_beams", 1)),
                  length_penalty=float(pick("length_penalty", 1.0)), early_stopping=pick("early_stopping", False),
                  suppress=tuple(int(i) for i in options.get("suppress_tokens") or ()),
                  repetition_penalty=float(pick("repetition_penalty", 1.0)),
                  no_repeat_ngram_size=int(pick("no_repeat_ngram_size", 0) or 0),
                  check_every=8 if getattr(device, "type", "cpu") == "cuda" else 1)


DECODE_OPTIONS = "_llm2slm_decode_options"


def set_decode_options(model, **options: Any) -> None:
    """How `start` runs `model` from now on: Search fields static_cache and compile (generate --compile)."""
    model.__dict__[DECODE_OPTIONS] = options


def refuse_without_loop(model) -> None:
    """Called where `model` is about to decode with transformers' generate: refuse if it was set to decode
    compiled, which only this toolkit's loop does."""
    if model.__dict__.get(DECODE_OPTIONS):
        raise UserError("--compile needs this toolkit's decoding loop; these options (stop strings, or generation "
                        "settings it does not do) need transformers' generate: leave --compile out")


def start(model, mask: torch.Tensor, search: Search, *, input_ids: torch.Tensor | None = None,
          inputs_embeds: torch.Tensor | None = None, decoder_start: int | None = None
          ) -> tuple[Stepper, torch.Tensor]:
    """Run the prompt through `model` once: a Stepper holding its cache and the scores of the first new token.

    Decoder-only prompts are left-padded; an encoder-decoder model reads right-padded ones with its encoder and
    its decoder starts from `decoder_start`. Only the last position's logits are computed where the model allows."""
    encoder_decoder = bool(model.config.is_encoder_decoder)
    options = model.__dict__.get(DECODE_OPTIONS)
    if options:
        from dataclasses import replace

        search = replace(search, **options)
    step = Stepper(model, encoder_decoder=encoder_decoder, reserve=search.max_new_tokens,
                   static=search.static_cache, compiled=search.compile)
    if encoder_decoder:
        encoder = model.get_encoder()
        hidden = encoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        step.start_encoder_decoder(hidden, mask)
        first = torch.full((mask.shape[0], 1), decoder_start, dtype=torch.long, device=mask.device)
        return step, step.feed(first)[:, -1]
    last = 1 if _keeps_logits(model) else 0
    return step, step.prefill(mask, input_ids=input_ids, inputs_embeds=inputs_embeds, logits_to_keep=last).logits[:, -1]


def _keeps_logits(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def generate_plain(model, input_ids: torch.Tensor, mask: torch.Tensor, search: Search, *,
                   generator: torch.Generator | list[torch.Generator] | None = None,
                   streamer: Streamer | None = None) -> torch.Tensor:
    """A transformers model alone through `decode`: (batch, n) new token ids (left-padded decoder-only prompts)."""
    encoder_decoder = bool(model.config.is_encoder_decoder)
    first = getattr(model.generation_config, "decoder_start_token_id", None) if encoder_decoder else None
    step, logits = start(model, mask, search, input_ids=input_ids, decoder_start=first)
    # the repetition controls see what generate's processors see: the whole prompt, or the decoder's ids
    prompt_ids, prompt_mask = ((input_ids, mask) if not encoder_decoder else
        (torch.full((mask.shape[0], 1), first, dtype=torch.long, device=mask.device), None))
    return decode(step, logits, search, generator=generator, streamer=streamer, prompt_ids=prompt_ids,
                  prompt_mask=prompt_mask)


class RepetitionControls:
    """Search's repetition_penalty and no_repeat_ngram_size, by transformers' own processors (penalty, then n-gram
    ban: generate's order), over the sequence generate shows them: the prompt's ids, then the new tokens.

    `prompt_ids` (batch, m) are what generate holds as input_ids before the first new token: a decoder-only model's
    left-padded prompt, an encoder-decoder's decoder start token (None: nothing before the new tokens). The penalty
    skips each row's leading padding (the leading zeros of `prompt_mask`), as generate reads it off the attention
    mask; the n-gram ban counts padding tokens like any other token, as generate does. Ids the scores have no column
    for (prompt tokens a trimmed vocabulary lacks) get -inf columns while the processors run: they count in n-grams
    and are never penalised or banned, whatever transformers' processors do with ids past the vocabulary."""

    def __init__(self, search: Search, prompt_ids: torch.Tensor | None, prompt_mask: torch.Tensor | None, *,
                 batch: int, vocab: int, device: Any) -> None:
        from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

        rows = max(search.num_beams, 1)
        if prompt_ids is None:
            prompt_ids = torch.zeros((batch, 0), dtype=torch.long, device=device)
        self.prompt = prompt_ids.long().repeat_interleave(rows, 0)  # beam search: each prompt's beams, in a row
        self.processors = LogitsProcessorList()
        if search.repetition_penalty != 1.0:
            skip = None if prompt_mask is None else (prompt_mask != 0).int().argmax(dim=1).repeat_interleave(rows)
            self.processors.append(RepetitionPenaltyLogitsProcessor(float(search.repetition_penalty),
                                                                    prompt_ignore_length=skip))
        if search.no_repeat_ngram_size > 0:
            self.processors.append(NoRepeatNGramLogitsProcessor(int(search.no_repeat_ngram_size)))
        self.vocab = vocab
        self.extra = max(int(self.prompt.max()) + 1 - vocab, 0) if self.prompt.numel() else 0

    @classmethod
    def of(cls, search: Search, prompt_ids: torch.Tensor | None, prompt_mask: torch.Tensor | None,
           logits: torch.Tensor) -> RepetitionControls | None:
        """The controls `search` asks for, or None (then the loops do exactly what they do without them)."""
        if search.repetition_penalty == 1.0 and search.no_repeat_ngram_size <= 0:
            return None
        return cls(search, prompt_ids, prompt_mask, batch=logits.shape[0], vocab=logits.shape[-1],
                   device=logits.device)

    def __call__(self, sequence: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`scores` (rows, vocab) of the token after `sequence` (rows, length: the prompt then the new tokens)."""
        if self.extra:
            scores = torch.nn.functional.pad(scores, (0, self.extra), value=float("-inf"))
        scores = self.processors(sequence, scores)
        return scores[:, : self.vocab] if self.extra else scores


@torch.inference_mode()
def decode(step: Stepper, logits: torch.Tensor, search: Search, *,
           generator: torch.Generator | list[torch.Generator] | None = None, streamer: Streamer | None = None,
           prompt_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decode with `step`'s model from `logits` (batch, vocab), the scores of each prompt's first new token; returns
    (batch, n <= max_new_tokens) token ids, padding after a row's end token. For beam search, `step` holds each
    prompt once: its cache is repeated to num_beams rows here (one prefill per prompt, not per beam).

    `streamer` (greedy and sampling; beam search only knows its tokens at the end and never calls it) sees every
    step's tokens as they are chosen; the rows it asks to stop finish there, as if they had emitted the end token.
    Without one, or when it never asks, the output is the same token for token. `prompt_ids` and `prompt_mask`: what
    the repetition penalty and the n-gram ban count before the new tokens (RepetitionControls), in the ids of the
    model's scores. Sampling draws from `generator`: one for the batch (None: torch's global one), or a list of one
    per row (`row_generators`), which makes each row's sample independent of the batch."""
    if search.do_sample and search.num_beams > 1:
        raise UserError("beam sampling is not supported: use --num-beams 1 with sampling")
    controls = RepetitionControls.of(search, prompt_ids, prompt_mask, logits)
    if search.num_beams > 1:
        return _beam_search(step, logits, search, controls)
    return _sample_or_greedy(step, logits, search, generator, streamer, controls)


def _ban(scores: torch.Tensor, search: Search, t: int) -> None:
    """In place: the end token before min_new_tokens, and the suppressed ids, get -inf."""
    if search.suppress:
        scores[:, list(search.suppress)] = float("-inf")
    if t < search.min_new_tokens and search.eos_token_id is not None:
        scores[:, search.eos_token_id] = float("-inf")


def _sample_or_greedy(step: Stepper, logits: torch.Tensor, search: Search, generator,
                      streamer: Streamer | None = None, controls: RepetitionControls | None = None) -> torch.Tensor:
    batch, n = logits.shape[0], search.max_new_tokens
    out = torch.full((batch, n), search.pad_token_id, dtype=torch.long, device=logits.device)
    if controls is not None:  # the sequence the processors read: the prompt, then `out` (a view of its tail)
        sequence = torch.cat([controls.prompt, out], 1)
        out = sequence[:, controls.prompt.shape[1]:]
    done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    eos = search.eos_token_id
    t = 0
    for t in range(n):
        scores = logits.to(dtype=torch.float32, copy=True)
        if controls is not None:  # on the raw scores, before the bans and the sampling warpers (as generate)
            scores = controls(sequence[:, : controls.prompt.shape[1] + t], scores)
        _ban(scores, search, t)
        if search.do_sample:
            token = _draw(_process(scores, search.temperature, search.top_p, [], top_k=search.top_k), generator)
        else:
            token = scores.argmax(-1)
        token = token.masked_fill(done, search.pad_token_id)
        out[:, t] = token
        if eos is not None:
            done |= token == eos
        stop = _stream(streamer, token.unsqueeze(1))
        if stop is not None:
            done |= stop
        if t == n - 1 or ((t + 1) % search.check_every == 0 and (eos is not None or stop is not None)
                          and bool(done.all())):
            break
        logits = step.feed(token.unsqueeze(1))[:, -1]
    return out[:, : t + 1]


def _stream(streamer: Streamer | None, tokens: torch.Tensor) -> torch.Tensor | None:
    """Show `streamer` the (batch, k) tokens just emitted; the (batch,) bool mask of rows it wants stopped, or None."""
    if streamer is None:
        return None
    stop = streamer(tokens)
    if stop is None:
        return None
    return torch.as_tensor(stop, dtype=torch.bool, device=tokens.device)


def _beam_search(step: Stepper, logits: torch.Tensor, search: Search,
                 controls: RepetitionControls | None = None) -> torch.Tensor:
    """transformers' beam search (its vectorised form, same candidates, scores, length penalty and stopping rules),
    without its per-step bookkeeping: 2 x num_beams candidates per prompt, finished hypotheses kept apart. One
    algorithm, kept whole so that it reads step for step beside transformers' `_beam_search`: its state (running
    and finished beams with their scores) is shared by every line of the loop."""
    batch, k, n = logits.shape[0], search.num_beams, search.max_new_tokens
    device, eos, lp, early = logits.device, search.eos_token_id, search.length_penalty, search.early_stopping
    step.repeat(k)
    logits = logits.repeat_interleave(k, 0)
    keep = 2 * k
    top_mask = torch.arange(keep, device=device) < k
    vocab = logits.shape[-1]
    running = torch.full((batch, k, n), search.pad_token_id, dtype=torch.long, device=device)
    finished = running.clone()
    running_scores = torch.zeros((batch, k), device=device)
    running_scores[:, 1:] = -1e9  # the first step expands the first beam only
    finished_scores = torch.full((batch, k), -1e9, device=device)
    is_finished = torch.zeros((batch, k), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)
    t = 0
    for t in range(n):
        log_probs = torch.log_softmax(logits.float(), -1)
        if controls is not None:  # each beam's sequence: its prompt, then its tokens so far
            log_probs = controls(torch.cat([controls.prompt, running[:, :, :t].reshape(batch * k, t)], 1),
                                 log_probs)
        _ban(log_probs, search, t)  # after the softmax, as transformers' processors run on log-probabilities
        log_probs = (log_probs.view(batch, k, vocab) + running_scores.unsqueeze(-1)).view(batch, k * vocab)
        top_scores, top_index = torch.topk(log_probs, keep)
        parent, token = top_index // vocab, top_index % vocab
        candidates = torch.take_along_dim(running, parent.unsqueeze(-1), 1)
        candidates[:, :, t] = token
        if t == n - 1:
            hits = torch.ones_like(token, dtype=torch.bool)  # the length limit finishes every candidate
        elif eos is not None:
            hits = token == eos
        else:
            hits = torch.zeros_like(token, dtype=torch.bool)
        # the best num_beams unfinished candidates run on
        live_scores = top_scores + hits.float() * -1e9
        chosen = torch.topk(live_scores, k).indices
        running = torch.take_along_dim(candidates, chosen.unsqueeze(-1), 1)
        running_scores = torch.take_along_dim(live_scores, chosen, 1)
        rows = (torch.take_along_dim(parent, chosen, 1) + offsets).flatten()
        # candidates among the top num_beams that just finished join the finished hypotheses
        just_finished = hits & top_mask
        scores = top_scores / ((t + 1) ** lp)
        scores = scores + (is_finished.all(-1, keepdim=True) & (early is True)).float() * -1e9
        scores = scores + (~improvable).float() * -1e9 + (~just_finished).float() * -1e9
        merged = torch.topk(torch.cat([finished_scores, scores], 1), k).indices
        finished = torch.take_along_dim(torch.cat([finished, candidates], 1), merged.unsqueeze(-1), 1)
        finished_scores = torch.take_along_dim(torch.cat([finished_scores, scores], 1), merged, 1)
        is_finished = torch.take_along_dim(torch.cat([is_finished, just_finished], 1), merged, 1)
        # can a running beam still beat the worst finished one?
        length = n if early == "never" and lp > 0.0 else t + 1
        best_running = running_scores[:, :1] / (length ** lp)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, -1.0e9)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        # One question to the device every `check_every` steps: steps past the stopping point change nothing (a
        # prompt that cannot improve, or is finished under early stopping, admits no new hypothesis; every
        # candidate ending finishes its prompt the same step), so the answer is the same, only padded longer.
        if (t + 1) % search.check_every == 0 and bool(
                ~improvable.any() | (is_finished.all() & (early is True)) | hits.all()):
            break
        step.reorder(rows)
        logits = step.feed(running[:, :, t].reshape(-1, 1))[:, -1]
    return finished[:, 0, : t + 1]  # with check_every > 1, maybe padding columns after every row's end


@torch.inference_mode()
def speculative_generate(draft, verifier, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, gamma: int = 4,
                         max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                         top_p: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
                         suppress_tokens: list[int] | None = None, streamer: Streamer | None = None
                         ) -> tuple[list[list[int]], SpeculativeStats]:
    """Generate for right-padded prompts with `verifier` (a FrozenLLM: its full model checks) and `draft` (an
    LLMToSLM reading the same vocabulary). Returns token ids without the end token, and acceptance statistics.
    `suppress_tokens` are never generated (benchmarks suppress the end token to time an exact length). Sampling
    draws from the LLM's distribution as its own sampling would: `top_k` None is what transformers' generate uses
    for the LLM (its generation config's, else 50); 0 turns top-k off. `streamer`
    (see `decode`) sees each round's m + 1 tokens; the rows it stops finish there.

    The round loop below is one algorithm (draft g, verify in one LLM pass, accept, emit, roll both caches back)
    and reads best whole; its parts that stand alone are `_verifier_prefill`, `_draft_prefill`, `_draft_tokens`
    and `_verify`."""
    shared_layer = _check_pair(draft, verifier, gamma)
    cfg = draft.config
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    banned = list(suppress_tokens or [])
    device, batch = prompt_ids.device, prompt_ids.shape[0]
    if top_k is None:
        top_k = int(generation_value(verifier.model.generation_config, "top_k", 0) or 0) if do_sample else 0
    sampling = (temperature, top_p, banned, top_k, generator) if do_sample else None
    llm_step, llm_pending, llm_first, features = _verifier_prefill(verifier, prompt_ids, prompt_mask, shared_layer)
    draft_step, draft_logits = _draft_prefill(draft, prompt_ids, prompt_mask, features)
    feed_draft, widen = draft.slm_ids, _widen(draft, verifier)  # a trimmed draft: its own ids, the LLM's scores
    draft_logits = widen(draft_logits)
    stats = SpeculativeStats()
    out_tokens = torch.full((batch, 0), pad, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    while out_tokens.shape[1] < max_new_tokens and not bool(done.all()):
        g = min(gamma, max_new_tokens - out_tokens.shape[1])
        # 1. draft g tokens
        base = draft_step.fed
        d, q = _draft_tokens(draft_step, draft_logits, g, lambda ids: widen(draft_step.feed(feed_draft(ids))[:, -1]),
                             banned, sampling)
        # 2. the LLM scores the pending token and all drafts in one pass: p_1 .. p_{g+1}
        llm_base, pending = llm_step.fed, llm_pending.shape[1]
        logits = llm_step.feed(torch.cat([llm_pending, d], 1))[:, -(g + 1):]
        if not pending:  # first round of a decoder-only LLM
            logits = torch.cat([llm_first, logits[:, :g]], 1)
        # 3-4. how many drafts each row accepts (m: the fewest of the live rows), and the (m+1)-th token
        accepted, m, nxt = _verify(logits, d, q, done, banned, sampling)
        emitted = torch.cat([d[:, :m], nxt.unsqueeze(1)], 1)  # (batch, m + 1)
        # 5. bookkeeping: finished rows emit padding; stop at the first end token
        emitted = torch.where(done.unsqueeze(1), torch.full_like(emitted, pad), emitted)
        stats.count_round(g, m, accepted, ~done)
        out_tokens = torch.cat([out_tokens, emitted], 1)
        done = done | (emitted == eos).any(1)
        stop = _stream(streamer, emitted)
        if stop is not None:
            done = done | stop
        # 6. roll both caches back to what was accepted and queue the rest
        llm_step.rewind(llm_base + pending + m)  # the pending token + the m accepted drafts
        llm_pending = nxt.unsqueeze(1)
        kept = min(m, g - 1)  # drafts d_1..d_{g-1} were fed to the draft; d_g never was
        draft_step.rewind(base + kept)
        draft_logits = widen(draft_step.feed(feed_draft(emitted[:, kept:]))[:, -1])
    return strip_generated(out_tokens[:, :max_new_tokens], eos, pad), stats


def _check_pair(draft, verifier, gamma: int) -> int | str | None:
    """Refuse what cannot draft or verify; the draft's LLM layer when the verifier's prompt pass can give the draft
    its features (both read the same LLM: a decoder-only LLM's pass returns every layer's hidden state, so the
    draft's layer need not be the verifier's), else None."""
    if gamma < 1:
        raise UserError("--gamma must be at least 1")
    cfg = draft.config
    if (cfg.peft or {}).get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise UserError("a prompt- or prefix-tuned draft cannot draft here (its virtual tokens are not part of the "
                        "incremental decoding): use a LoRA, fully fine-tuned or LLM-to-SLM draft")
    if verifier.kind == "encoder-only":
        raise UserError(f"the LLM {verifier.spec!r} is encoder-only: it cannot verify drafts")
    shares = draft.has_llm and cfg.llm["fingerprint"] == verifier.fingerprint and (
        cfg.llm["layer"] == verifier.layer or verifier.kind == "decoder-only")
    return cfg.llm["layer"] if shares else None


def _draft_tokens(draft_step, logits: torch.Tensor, g: int, feed, banned: list[int], sampling):
    """g draft tokens from the draft's next-token `logits` (`feed(ids)` steps the draft and gives the next
    logits; the last draft is not fed): the drafts (batch, g) and, when sampling, the distributions they were
    drawn from."""
    drafts, q = [], []
    for j in range(g):
        if sampling is not None:
            temperature, top_p, _, top_k, generator = sampling
            qj = _process(logits, temperature, top_p, banned, top_k=top_k)
            dj = torch.multinomial(qj, 1, generator=generator).squeeze(1)
            q.append(qj)
        else:
            dj = _greedy(logits, banned)
        drafts.append(dj)
        if j < g - 1:
            logits = feed(dj.unsqueeze(1))
    return torch.stack(drafts, 1), q


def _verifier_prefill(verifier, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, draft_layer):
    """The LLM's one pass over the prompt: its stepper, the token it has still to read (an encoder-decoder's
    start token; none for a decoder-only LLM, whose last prompt logits score the first draft: `first`), and, when
    `draft_layer` is given (the draft reads this LLM), the draft's features from the same pass."""
    llm_model, batch = verifier.model, prompt_ids.shape[0]
    llm_step = Stepper(llm_model, encoder_decoder=verifier.kind == "encoder-decoder")
    features = first = None
    if verifier.kind == "encoder-decoder":
        hidden = llm_model.get_encoder()(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
        llm_step.start_encoder_decoder(hidden, prompt_mask)
        pending = torch.full((batch, 1), llm_model.config.decoder_start_token_id, device=prompt_ids.device)
        features = hidden if draft_layer is not None else None
    else:
        ids_left, mask_left = right_to_left(prompt_ids, prompt_mask)
        out = llm_step.prefill(mask_left, input_ids=ids_left, output_hidden_states=draft_layer is not None,
                               logits_to_keep=1 if _keeps_logits(llm_model) else 0)
        pending = prompt_ids[:, :0]  # nothing pending: the prompt's last logits score the first draft
        first = out.logits[:, -1:]
        if draft_layer is not None:  # the same pass gives the draft its features: the hidden state of its layer
            features, _ = _left_to_right(_layer(draft_layer, out.hidden_states), mask_left)
        del out
    return llm_step, pending, first, features


def _draft_prefill(draft, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, features):
    """The draft's prompt, the fused embeddings, read once: its stepper and its logits for the first token (in
    the draft's own vocabulary; the caller widens them)."""
    cfg = draft.config
    p = draft.prompt_embeddings(prompt_ids, prompt_mask, features)
    draft_step = Stepper(draft.slm, encoder_decoder=cfg.slm_kind == "encoder-decoder")
    if cfg.slm_kind == "encoder-decoder":
        enc = draft.slm.get_encoder()(inputs_embeds=p, attention_mask=prompt_mask).last_hidden_state
        draft_step.start_encoder_decoder(enc, prompt_mask)
        start = torch.full((prompt_ids.shape[0], 1), cfg.decoder_start_token_id, device=prompt_ids.device)
        return draft_step, draft_step.feed(draft.slm_ids(start))[:, -1]
    p_left, m_left = right_to_left(p, prompt_mask)
    return draft_step, draft_step.prefill(m_left, inputs_embeds=p_left,
                                          logits_to_keep=1 if _keeps_logits(draft.slm) else 0).logits[:, -1]


def _verify(logits: torch.Tensor, d: torch.Tensor, q: list, done: torch.Tensor, banned: list[int], sampling):
    """One round's check of the g drafts `d` against the LLM's logits p_1 .. p_{g+1}: the leading accepted drafts
    per row, m (the fewest over the rows still live: every row emits m + 1 tokens this round) and the (m+1)-th
    token. Greedy (`sampling` None): a draft is accepted when it is the LLM's argmax. Sampling (`sampling` =
    temperature, top_p, banned, top_k, generator; `q` the draft's distributions): rejection sampling, the
    rejected position resampled from max(p - q, 0), which gives exactly the LLM's distribution."""
    g = d.shape[1]
    live = ~done
    if sampling is None:
        target = _greedy(logits, banned)
        accepted = torch.cumprod((d == target[:, :g]).long(), 1).sum(1)
        m = int(accepted[live].min()) if bool(live.any()) else g
        return accepted, m, target[:, m]
    temperature, top_p, banned, top_k, generator = sampling
    p_all = _process(logits, temperature, top_p, banned, top_k=top_k)
    q_all = torch.stack(q, 1)
    p_d = p_all[:, :g].gather(-1, d.unsqueeze(-1)).squeeze(-1)
    q_d = q_all.gather(-1, d.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(p_d.shape, generator=generator, device=d.device)
    ok = u < (p_d / q_d.clamp_min(1e-20)).clamp(max=1.0)
    accepted = torch.cumprod(ok.long(), 1).sum(1)  # leading accepted drafts per row
    m = int(accepted[live].min()) if bool(live.any()) else g
    if m == g:
        return accepted, m, torch.multinomial(p_all[:, g], 1, generator=generator).squeeze(1)
    residual = (p_all[:, m] - q_all[:, m]).clamp_min(0)
    fallback = residual.sum(-1, keepdim=True) <= 0  # p == q: any sample of p is right
    residual = torch.where(fallback, p_all[:, m], residual)
    corrected = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator).squeeze(1)
    return accepted, m, torch.where(accepted > m, d[:, m], corrected)


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


def _layer(layer: int | str, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A decoder-only LLM's features of `layer` as FrozenLLM.encode defines them, from a pass with all hidden
    states."""
    if layer == "all":
        return torch.stack(hidden_states[1:]).float().mean(0).to(hidden_states[-1].dtype)
    return hidden_states[layer]


def _left_to_right(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.shape[1]
    shift = m - mask.sum(1, keepdim=True)
    idx = (torch.arange(m, device=mask.device).unsqueeze(0) + shift) % m
    return torch.gather(x, 1, idx.unsqueeze(-1).expand_as(x)), torch.gather(mask, 1, idx)
