"""An LLM-to-SLM model exported by llm2slm, for transformers' remote code (arXiv 2402.16844).

A frozen large LM (the LLM) encodes the prompt once; a small projector maps its hidden states into a small LM (the
SLM), which does all of the decoding. Load it with

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)     # a decoder-only SLM
    model = AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)    # an encoder-decoder SLM

and call `model.generate(input_ids, attention_mask, ...)` with prompts tokenized by DIR's tokenizer (left or right
padding). The LLM comes from DIR/llm when the export bundles it, else from the hub id the config names, else from
`llm_path=` (a directory, a hub id or a loaded model). Self-contained: torch and transformers only.

What `generate` gives: for the same prompt ids, the ids llm2slm's own `generate` gives (its decoding loop and
transformers' agree; greedy and beam search are tested to be equal). A decoder-only model returns the prompt followed
by the new tokens, as transformers' causal LMs do; an encoder-decoder model the decoder's tokens, starting with its
start token. With a trimmed vocabulary the SLM scores only the kept tokens: ids are mapped in and out here, so
inputs and outputs are always the tokenizer's ids (and `output_scores` are over the kept tokens, in `slm_vocab`
order). Unlike llm2slm's loop, a repetition penalty or n-gram ban counts prompt tokens a trimmed vocabulary lacks
as its unknown token.
"""

import copy

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import Seq2SeqLMOutput

from .configuration_llm2slm import LLMToSLMConfig

_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                "longt5": "LongT5EncoderModel"}
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "proxies")


class Projector(nn.Sequential):
    """Linear(d_llm, d_slm) -> ReLU -> Linear(d_slm, d_slm), after a fixed per-channel standardisation if trained
    with one."""

    def __init__(self, d_llm, d_slm, feature_norm="none"):
        super().__init__(nn.Linear(d_llm, d_slm), nn.ReLU(), nn.Linear(d_slm, d_slm))
        self.feature_norm = feature_norm
        if feature_norm == "standardize":
            self.register_buffer("feature_shift", torch.zeros(d_llm))
            self.register_buffer("feature_scale", torch.ones(d_llm))

    def forward(self, features):
        if self.feature_norm == "standardize":
            features = (features - self.feature_shift.to(features.dtype)) / self.feature_scale.to(features.dtype)
        return super().forward(features)


class ProjectedEmbedding(nn.Module):
    """The SLM's input embedding over the LLM's vocabulary: a trained Linear(d_llm, d_slm) over the LLM's frozen
    embedding rows (set from the LLM once it is loaded; never saved)."""

    def __init__(self, rows, d_llm, d_slm):
        super().__init__()
        self.register_buffer("llm_rows", torch.zeros(rows, d_llm), persistent=False)
        self.proj = nn.Linear(d_llm, d_slm)

    @property
    def weight(self):
        return self.proj.weight

    @property
    def num_embeddings(self):
        return self.llm_rows.shape[0]

    def forward(self, input_ids):
        rows = nn.functional.embedding(input_ids, self.llm_rows)
        return self.proj(rows.to(self.proj.weight.dtype))


class _Stop(Exception):
    """Raised from a hook to skip the LLM's layers above the one whose output is needed."""


def _right_to_left(x, mask):
    """Right padding moved to the left: (batch, m) ids or (batch, m, d) embeddings, with their mask."""
    m = mask.shape[1]
    shift = m - mask.sum(1, keepdim=True)
    idx = (torch.arange(m, device=mask.device).unsqueeze(0) - shift) % m
    mask = torch.gather(mask, 1, idx)
    if x.dim() == 3:
        return torch.gather(x, 1, idx.unsqueeze(-1).expand_as(x)), mask
    return torch.gather(x, 1, idx), mask


def _right_padded(ids, mask):
    """Any padding (left, right) made right padding, the tokens of each row in their order."""
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(ids, 1, order), torch.gather(mask, 1, order)


def _keep_rows(slm, n):
    """The SLM's embedding and head cut to `n` rows, in place (their values come with the weights): the embedding
    module stays (and stays the one every part of the SLM reads, e.g. T5's encoder and decoder), a tied head stays
    tied."""
    emb, head = slm.get_input_embeddings(), slm.get_output_embeddings()
    tied = head is not None and _head_tied(slm, head, emb)
    emb.weight = nn.Parameter(emb.weight.new_empty(n, emb.weight.shape[1]))
    emb.num_embeddings, emb.padding_idx = n, None
    slm.set_input_embeddings(emb)
    if head is not None:
        head.weight = emb.weight if tied else nn.Parameter(head.weight.new_empty(n, head.weight.shape[1]))
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias.new_empty(n))
        head.out_features = n
    slm.config.vocab_size = n


def _head_tied(slm, head, emb):
    """Whether the SLM's head is its input embedding (the same tensor, or tied by its config)."""
    if head.weight is emb.weight:
        return True
    if not hasattr(slm, "get_expanded_tied_weights_keys"):
        return False
    names = {id(m): name for name, m in slm.named_modules()}
    return slm.get_expanded_tied_weights_keys().get(f"{names[id(head)]}.weight") == f"{names[id(emb)]}.weight"


class _LLMToSLMModel(PreTrainedModel, GenerationMixin):
    config_class = LLMToSLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        spec = dict(config.slm_config)
        slm_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        auto = AutoModelForSeq2SeqLM if config.slm_kind == "encoder-decoder" else AutoModelForCausalLM
        self.slm = auto.from_config(slm_config)
        d_slm = next(getattr(slm_config, k) for k in ("d_model", "hidden_size", "n_embd")
                     if isinstance(getattr(slm_config, k, None), int))
        llm = config.llm
        if llm is not None:
            self.projector = Projector(llm["d_model"], d_slm, config.feature_norm)
        if config.vocab_adapter:
            rows = llm["embedding_rows"]
            self.slm.set_input_embeddings(ProjectedEmbedding(rows, llm["d_model"], d_slm))
            self.slm.set_output_embeddings(nn.Linear(d_slm, rows, bias=False))
            self.slm.config.vocab_size = rows
            self.slm.config.tie_word_embeddings = False
        if config.trim_vocab is not None:
            _keep_rows(self.slm, config.trim_vocab["kept"])
            self.register_buffer("slm_vocab", torch.arange(config.trim_vocab["kept"]))  # loaded with the weights
        if hasattr(self.slm, "get_expanded_tied_weights_keys"):  # transformers 5: what is tied after the surgery
            self.slm.all_tied_weights_keys = self.slm.get_expanded_tied_weights_keys()
        self.post_init()
        ids = config.special_ids
        self.generation_config = GenerationConfig(
            pad_token_id=ids.get("pad"), eos_token_id=ids.get("eos"),
            **({"decoder_start_token_id": ids.get("decoder_start")} if config.slm_kind == "encoder-decoder" else {}))

    # ------------------------------------------------------------------------------------------- the LLM

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, llm_path=None, **kwargs):
        """The model from DIR (or a hub repository), then its LLM: `llm_path` if given (a directory, a hub id or a
        loaded transformers model), else the copy in DIR/llm, else the hub id the config names."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if model.config.llm is not None:
            hub = {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}
            if isinstance(llm_path, nn.Module):
                model.attach_llm(llm_path)
            elif llm_path is not None:
                model.attach_llm(_load_llm(str(llm_path), None, model.config.llm, hub))
            elif model.config.llm.get("subfolder"):
                if "revision" in kwargs:
                    hub["revision"] = kwargs["revision"]
                model.attach_llm(_load_llm(str(pretrained_model_name_or_path), model.config.llm["subfolder"],
                                           model.config.llm, hub))
            elif model.config.llm.get("name_or_path"):
                model.attach_llm(_load_llm(model.config.llm["name_or_path"], None, model.config.llm, hub))
            else:
                raise ValueError(f"this model's LLM ({model.config.llm.get('name')!r}) is neither in the directory "
                                 "nor on the hub: pass llm_path=..., or export it with `llm2slm export "
                                 "--include-llm yes`")
        return model

    def attach_llm(self, llm):
        """Use `llm` (a transformers model: the LLM the checkpoint was trained with) as the frozen encoder."""
        expected = self.config.llm
        have = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
        d_model = next((getattr(have, k) for k in ("d_model", "hidden_size", "n_embd")
                        if isinstance(getattr(have, k, None), int)), None)
        if d_model != expected["d_model"]:
            raise ValueError(f"the LLM given has hidden size {d_model}, this model was trained on one of "
                             f"{expected['d_model']}")
        llm.requires_grad_(False)
        self.llm = llm.eval().to(self.slm.device)
        if self.config.vocab_adapter:
            rows = llm.get_input_embeddings().weight
            self.slm.get_input_embeddings().llm_rows = rows.detach().float().clone().to(self.slm.device)

    def _blocks(self):
        n = self.config.llm["n_layers"]
        for module in self.llm.base_model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
        raise ValueError(f"cannot find the LLM's {n} layers to take layer {self.config.llm['layer']} from")

    @torch.no_grad()
    def encode(self, input_ids, attention_mask):
        """The LLM's features (batch, m, d_llm) for right-padded prompts."""
        if getattr(self, "llm", None) is None:
            raise ValueError("no LLM loaded: load with from_pretrained, or call attach_llm(model)")
        info = self.config.llm
        if info["kind"] == "encoder-decoder":
            return self.llm.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if info["kind"] == "encoder-only":
            return self.llm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        base, layer = self.llm.base_model, info["layer"]
        if layer == "all":
            states = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          use_cache=False).hidden_states
            return torch.stack(states[1:]).float().mean(0).to(states[-1].dtype)
        if layer == info["n_layers"]:
            return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        captured = []

        def grab(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = self._blocks()[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    # --------------------------------------------------------------------------------- vocabulary ids

    def _lookup(self):
        """tokenizer id -> SLM row (a trimmed vocabulary's unkept ids -> its unknown token's row)."""
        trim = self.config.trim_vocab
        lookup = torch.full((trim["full"],), -1, dtype=torch.long, device=self.slm_vocab.device)
        lookup[self.slm_vocab] = torch.arange(len(self.slm_vocab), device=self.slm_vocab.device)
        return lookup.masked_fill(lookup < 0, int(lookup[trim["unknown"]]))

    def slm_ids(self, ids):
        if self.config.trim_vocab is None:
            return ids
        lookup = self._lookup()
        return lookup[ids.clamp(0, len(lookup) - 1)]

    def tokenizer_ids(self, ids):
        return ids if self.config.trim_vocab is None else self.slm_vocab[ids]

    def _slm_id(self, i):
        """One tokenizer id as the SLM's row, None where a trimmed vocabulary lacks it."""
        if i is None or self.config.trim_vocab is None:
            return i
        where = (self.slm_vocab == int(i)).nonzero()
        return int(where[0, 0]) if len(where) else None

    def _slm_generation_config(self, generation_config, kwargs):
        """The generation settings (tokenizer ids) as the SLM's: special ids mapped to its rows."""
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        rest = config.update(**kwargs)
        if self.config.trim_vocab is None:
            return config, rest
        for name in ("pad_token_id", "bos_token_id", "decoder_start_token_id", "forced_bos_token_id"):
            setattr(config, name, self._slm_id(getattr(config, name, None)))
        eos = config.eos_token_id
        if eos is not None:
            kept = [i for i in (self._slm_id(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
                    if i is not None]
            config.eos_token_id = kept or None
        forced_eos = getattr(config, "forced_eos_token_id", None)
        if forced_eos is not None:
            config.forced_eos_token_id = self._slm_id(forced_eos)
        for name in ("suppress_tokens", "begin_suppress_tokens"):  # unkept tokens are never generated anyway
            if getattr(config, name, None) is not None:
                setattr(config, name, [i for i in map(self._slm_id, getattr(config, name)) if i is not None] or None)
        if getattr(config, "bad_words_ids", None) is not None:
            words = [[self._slm_id(i) for i in w] for w in config.bad_words_ids]
            config.bad_words_ids = [w for w in words if None not in w] or None
        for name in ("force_words_ids", "sequence_bias"):
            if getattr(config, name, None) is not None:
                raise ValueError(f"{name} is not supported with a trimmed vocabulary")
        return config, rest

    # ------------------------------------------------------------------------------------ the model

    def get_input_embeddings(self):
        return self.slm.get_input_embeddings()

    def prompt_embeddings(self, input_ids, attention_mask):
        """The SLM's prompt input for right-padded prompts: projected LLM features (+ its own embeddings with
        fusion "add"), zero at padding."""
        embed = self.slm.get_input_embeddings()
        if self.config.llm is None:
            p = embed(self.slm_ids(input_ids))
        else:
            features = self.encode(input_ids.to(self.llm.device), attention_mask.to(self.llm.device))
            z = self.projector(features.to(device=input_ids.device, dtype=self.projector[0].weight.dtype))
            p = z if self.config.fusion == "replace" else z + embed(self.slm_ids(input_ids))
        return p * attention_mask.unsqueeze(-1).to(p.dtype)

    def _prompt(self, input_ids, attention_mask):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = _right_padded(input_ids.to(self.slm.device), attention_mask.to(self.slm.device))
        return ids, mask, self.prompt_embeddings(ids, mask)

    def _map_output(self, out, fix):
        if isinstance(out, torch.Tensor):
            return fix(out)
        out.sequences = fix(out.sequences)
        return out


class LLMToSLMForCausalLM(_LLMToSLMModel):
    """LLM-to-SLM with a decoder-only SLM: the fused prompt, then the SLM's own tokens."""

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """The prompt ids followed by the generated ids (tokenizer ids), as transformers' causal LMs return them;
        generation options as transformers' `generate` takes them."""
        if input_ids is None:
            raise ValueError("pass input_ids: prompts tokenized with this model's tokenizer")
        ids, mask, p = self._prompt(input_ids, attention_mask)
        p, left_mask = _right_to_left(p, mask)
        config, rest = self._slm_generation_config(generation_config, kwargs)
        history = None
        if self.config.llm is None or self.config.tokenizer_mode == "llm":  # the prompt in the SLM's ids
            pad = config.pad_token_id if config.pad_token_id is not None else 0
            history = _right_to_left(self.slm_ids(ids).masked_fill(mask == 0, pad), mask)[0]
        out = self.slm.generate(input_ids=history, inputs_embeds=p, attention_mask=left_mask,
                                generation_config=config, **rest)
        width = 0 if history is None else history.shape[1]

        def fix(seq):
            new = self.tokenizer_ids(seq[:, width:])
            prompt = input_ids.to(new.device).repeat_interleave(seq.shape[0] // input_ids.shape[0], 0)
            return torch.cat([prompt, new], 1)

        return self._map_output(out, fix)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """The SLM's output over the fused prompt (left-padded, as generation reads it); logits of a trimmed
        vocabulary in the order of `slm_vocab`."""
        ids, mask, p = self._prompt(input_ids, attention_mask)
        p, mask = _right_to_left(p, mask)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.slm(inputs_embeds=p, attention_mask=mask, position_ids=position_ids, **kwargs)


class LLMToSLMForConditionalGeneration(_LLMToSLMModel):
    """LLM-to-SLM with an encoder-decoder SLM: the fused prompt is its encoder's input."""

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """The decoder's ids (tokenizer ids), starting with its start token, as transformers' seq2seq models
        return them; generation options as transformers' `generate` takes them."""
        if input_ids is None:
            raise ValueError("pass input_ids: prompts tokenized with this model's tokenizer")
        ids, mask, p = self._prompt(input_ids, attention_mask)
        config, rest = self._slm_generation_config(generation_config, kwargs)
        out = self.slm.generate(inputs_embeds=p, attention_mask=mask, generation_config=config, **rest)
        return self._map_output(out, self.tokenizer_ids)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, **kwargs) -> Seq2SeqLMOutput:
        """The SLM's output for `decoder_input_ids` (tokenizer ids) after the fused prompt; logits of a trimmed
        vocabulary in the order of `slm_vocab`."""
        ids, mask, p = self._prompt(input_ids, attention_mask)
        if decoder_input_ids is not None:
            decoder_input_ids = self.slm_ids(decoder_input_ids.to(p.device))
        return self.slm(inputs_embeds=p, attention_mask=mask, decoder_input_ids=decoder_input_ids, **kwargs)


def _load_llm(name_or_path, subfolder, info, hub):
    """The LLM as a transformers model, as llm2slm loads it: a T5-family LLM's encoder alone, other LLMs whole."""
    import transformers

    where = {"subfolder": subfolder} if subfolder else {}
    config = AutoConfig.from_pretrained(name_or_path, **where, **hub)
    dtype = getattr(torch, info.get("dtype") or "float32")
    if info["kind"] == "encoder-decoder":
        name = _T5_ENCODERS.get(config.model_type)
        cls = getattr(transformers, name) if name else AutoModelForSeq2SeqLM
    else:
        cls = AutoModelForCausalLM if info["kind"] == "decoder-only" else AutoModel
    return cls.from_pretrained(name_or_path, **where, dtype=dtype, **hub)
