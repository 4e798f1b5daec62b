"""The method: a frozen LLM encodes the prompt once, a projector maps its features into a small LM that decodes.

Read against Figure 2 of "Think Big, Generate Quick: LLM-to-SLM for Fast Autoregressive Decoding" (arXiv 2402.16844):

    H = f(X)                       frozen LLM: encoder's last layer (T5), last layer (BERT), or layer k / all
                                   layers (decoder-only); always with the attention mask
    Z = q(H)                       projector: Linear(d_l, d_s) -> ReLU -> Linear(d_s, d_s), trained from scratch
    P = Z + E_X   (fusion "add")   the SLM's prompt input; fusion "replace" uses Z alone
    Y = g(P)                       the SLM decodes: encoder-decoder (P is its encoder's input) or decoder-only
                                   ([P ; E_Y], features on prompt positions only, loss on target tokens only)

By default the SLM reads and writes the LLM's tokens, so prompt positions align one to one. If the SLM's own
vocabulary differs, two layers are added: an embedding projection Linear(d_l, d_s) over the LLM's frozen input
embedding rows, and a new head Linear(d_s, |V_llm|). With tokenizer "slm" the SLM keeps its own vocabulary for the
target, which only "replace" fusion allows (prompt lengths differ between the two tokenizers).

With no LLM at all the same class is the SLM-alone baseline: P = E_X over the SLM's own tokens, fine-tuned in full
or, as the paper's PEFT baselines (Table 6), frozen with LoRA, prompt tuning or prefix tuning through `peft`.

Beside this file: checkpoint.py saves and loads the model, kd.py is the distillation loss, peft_baselines.py the
PEFT baselines' configs and wrapping.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llm2slm_cli import artifacts as A
from llm2slm_cli import decoding, fingerprints, peft_baselines, presets, surgery
from llm2slm_cli import loading as M
from llm2slm_cli.errors import UserError
from llm2slm_cli.kd import kd_loss
from llm2slm_cli.padding import right_to_left, strip_generated  # noqa: F401 (strip_generated: re-exported)
from llm2slm_cli.peft_baselines import jsonable

Fusion = Literal["add", "replace"]
TokenizerMode = Literal["llm", "slm"]


# ---------------------------------------------------------------------------------------------------- the frozen LLM


def parse_layer(layer: str | int, n_layers: int) -> int | Literal["all"]:
    """Layer k means the hidden state after block k (0 = embeddings); negative counts from the end; "all" = mean."""
    if layer == "all":
        return "all"
    try:
        k = int(layer)
    except ValueError:
        raise UserError(f"--layer must be an integer or 'all', got {layer!r}") from None
    if k < 0:
        k = n_layers + 1 + k
    if not 0 <= k <= n_layers:
        raise UserError(f"--layer {layer}: the LLM has {n_layers} layers (0 = embeddings, -1 = last)")
    return k


class _Stop(Exception):
    """Raised from a hook to skip the LLM's layers above the one whose output we need."""


LLMWeights = Literal["full", "encoder", "lazy"]


class FrozenLLM:
    """The LLM as a feature extractor: eval mode, no gradients, never a registered submodule of what we train.

    `weights` says what is loaded: "full" the whole model (speculative decoding and distill-labels generate with it),
    "encoder" what features need (a T5-family LLM's encoder alone; other LLMs whole), "lazy" nothing until the LLM
    first encodes (then as "encoder"): with stored features its weights are never read. The identity, fingerprint
    included, comes from the config, the tokenizer and the weight files' sha256 (fingerprints.weights_fingerprint),
    never from loaded tensors; the vocabulary adapter's rows are read alone from the weight file."""

    def __init__(self, spec: str, *, layer: str | int = -1, dtype: str = "float32",
                 tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
                 tokenizer_optional: bool = False, tokenizer_option: str | None = "--tokenizer",
                 weights: LLMWeights = "full") -> None:
        config = M.load_config(spec)
        self.spec = spec
        self.kind: M.ModelKind = M.model_kind(config)
        if M.DTYPES.get(dtype) == "float16" and config.model_type in M.T5_TYPES:
            raise UserError("float16 is refused for T5-family LLMs (their activations overflow to inf/NaN): "
                            "use bfloat16 or float32")
        if weights not in ("full", "encoder", "lazy"):
            raise ValueError(f"weights must be full, encoder or lazy, not {weights!r}")
        self.dtype = M.DTYPES.get(dtype, dtype)
        self.n_layers = M.num_layers(config)
        self.layer = parse_layer(layer, self.n_layers) if self.kind == "decoder-only" else self.n_layers
        if self.kind != "decoder-only" and str(layer) not in ("-1", str(self.n_layers)):
            raise UserError(f"--layer applies to decoder-only LLMs; a {self.kind} LLM gives its last layer")
        self.config = config
        # one holder shared by the copies at_layer makes, so a lazy model is loaded once for all of them
        self._held: dict[str, Any] = {"model": None, "part": "all" if weights == "full" else "encoder",
                                      "device": torch.device(device)}
        if weights != "lazy":
            self._load()
        try:
            self.tokenizer = M.load_tokenizer(spec, tokenizer, local_only=tokenizer_optional, option=tokenizer_option)
        except UserError:
            if not tokenizer_optional:  # benchmarks of paper-shape presets run offline on random token ids
                raise
            self.tokenizer = None
        self.d_model = M.hidden_size(config)
        self._fingerprint: str | None = None
        self._state_fingerprint: str | None = None

    def _load(self) -> None:
        model = M.load_model(self.spec, dtype=self.dtype, role="LLM", part=self._held["part"])
        model.requires_grad_(False)
        self._held["model"] = model.to(self._held["device"])

    @property
    def loaded(self) -> bool:
        return self._held["model"] is not None

    @property
    def model(self) -> nn.Module:
        if self._held["model"] is None:
            self._load()
        return self._held["model"]

    @property
    def device(self) -> torch.device:
        if self._held["model"] is None:
            return self._held["device"]
        return next(self._held["model"].parameters()).device

    def to(self, device: str | torch.device) -> FrozenLLM:
        self._held["device"] = torch.device(device)
        if self._held["model"] is not None:
            self._held["model"].to(device)
        return self

    def whole(self) -> FrozenLLM:
        """This LLM with its whole model loaded (speculative decoding verifies with its decoder); loaded now if only
        its encoder was, or nothing."""
        if self._held["part"] != "all":
            self._held.update(part="all", model=None)
            self._load()
        return self

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprints.weights_fingerprint(self.spec, self.dtype)
        return self._fingerprint

    def state_fingerprint(self) -> str:
        """The hash of every tensor of the whole model, as identities of older artifacts record it (loads the whole
        model if it is not loaded whole already)."""
        if self._state_fingerprint is None:
            if self._held["model"] is not None and self._held["part"] == "all":
                self._state_fingerprint = fingerprints.state_fingerprint(self._held["model"])
            else:
                model = M.load_model(self.spec, dtype=self.dtype, role="LLM")
                self._state_fingerprint = fingerprints.state_fingerprint(model)
        return self._state_fingerprint

    def at_layer(self, layer: str | int) -> FrozenLLM:
        """The same loaded model giving the features of another layer (decoder-only; nothing is copied)."""
        if self.kind != "decoder-only":
            raise UserError(f"--layer applies to decoder-only LLMs; a {self.kind} LLM gives its last layer")
        _ = self.fingerprint  # hashed once, for both
        other = copy.copy(self)
        other.layer = parse_layer(layer, self.n_layers)
        return other

    def input_embedding_weight(self) -> torch.Tensor:
        """The LLM's input embedding rows; an LLM not loaded reads this one tensor from its weight file."""
        if self._held["model"] is None:
            rows = M.input_embedding_rows(self.spec, self.dtype)
            if rows is not None:
                return rows
        return self.model.get_input_embeddings().weight

    def identity(self) -> dict[str, Any]:
        return {"name": self.spec, "kind": self.kind, "layer": self.layer, "dtype": self.dtype,
                "d_model": self.d_model, "n_layers": self.n_layers,
                "vocab_size": len(self.tokenizer) if self.tokenizer else self.config.vocab_size,
                "fingerprint": self.fingerprint, "fingerprint_kind": A.FINGERPRINT_FILES,
                "tokenizer_fingerprint": fingerprints.tokenizer_fingerprint(self.tokenizer) if self.tokenizer else None}

    def _block_list(self) -> nn.ModuleList:
        for module in self.model.base_model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.n_layers:
                return module
        raise UserError(f"cannot find the layer list of {self.spec!r} to take layer {self.layer} from")

    @torch.no_grad()  # not inference_mode: on-the-fly features feed the projector's autograd graph
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """H (batch, m, d_l) for right-padded prompts; rows at padded positions are meaningless."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.kind == "encoder-decoder":
            return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.kind == "encoder-only":
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        base = self.model.base_model
        if self.layer == "all":
            states = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          use_cache=False).hidden_states
            return torch.stack(states[1:]).float().mean(0).to(states[-1].dtype)
        if self.layer == self.n_layers:
            return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # Layer k < L: take the input of block k and stop there, so the blocks above never run.
        captured: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = self._block_list()[self.layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]


# ------------------------------------------------------------------------------------------ the trainable pieces


FeatureNorm = Literal["none", "standardize"]


class Projector(nn.Sequential):
    """q: Linear(d_l, d_s) -> ReLU -> Linear(d_s, d_s).

    With `standardize`, each feature channel is first shifted and scaled by fixed statistics of the training
    features (buffers saved with the checkpoint, set once by `set_feature_statistics`). That per-channel affine map
    folds into the first Linear, so the function class is the paper's; only the conditioning changes: a decoder-only
    LLM's hidden states carry a few "massive" channels (Gemma-3-270M layer 6: three channels average |x| ~2,000 while
    the median channel is ~5), which otherwise dominate the first layer's input."""

    def __init__(self, d_llm: int, d_slm: int, feature_norm: FeatureNorm = "none") -> None:
        super().__init__(nn.Linear(d_llm, d_slm), nn.ReLU(), nn.Linear(d_slm, d_slm))
        if feature_norm not in ("none", "standardize"):
            raise UserError(f"--feature-norm must be none or standardize, got {feature_norm!r}")
        self.feature_norm = feature_norm
        if feature_norm == "standardize":
            self.register_buffer("feature_shift", torch.zeros(d_llm))
            self.register_buffer("feature_scale", torch.ones(d_llm))

    @torch.no_grad()
    def set_feature_statistics(self, rows: torch.Tensor) -> None:
        """Per-channel mean and standard deviation of feature rows (tokens x d_l; padding left out)."""
        rows = rows.double()
        self.feature_shift.copy_(rows.mean(0))
        self.feature_scale.copy_(rows.std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.feature_norm == "standardize":
            features = (features - self.feature_shift.to(features.dtype)) / self.feature_scale.to(features.dtype)
        return super().forward(features)


class ProjectedEmbedding(nn.Module):
    """The SLM's input embedding over the LLM's vocabulary: a trained Linear(d_l, d_s) over the LLM's frozen rows.

    The rows are a non-persistent buffer: they belong to the LLM and are never saved with the checkpoint.
    """

    def __init__(self, llm_rows: torch.Tensor, d_slm: int) -> None:
        super().__init__()
        self.register_buffer("llm_rows", llm_rows.detach().float().clone(), persistent=False)
        self.proj = nn.Linear(llm_rows.shape[1], d_slm)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight for dtype and device
        return self.proj.weight

    @property
    def num_embeddings(self) -> int:
        return self.llm_rows.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.llm_rows)
        return self.proj(rows.to(self.proj.weight.dtype))


# ------------------------------------------------------------------------------------------------- configuration


@dataclass
class ModelConfig:
    """What a checkpoint is; stored as llm2slm.json beside the weights."""

    slm: str
    slm_kind: M.ModelKind
    llm: dict[str, Any] | None  # FrozenLLM.identity(); None for the SLM-alone baseline
    fusion: Fusion = "add"
    tokenizer: TokenizerMode = "llm"
    vocab_adapter: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int | None = None
    template: str | None = None
    max_prompt_length: int = 512
    feature_norm: FeatureNorm = "none"  # the projector's fixed per-channel standardisation of the features
    peft: dict[str, Any] | None = None  # the peft config of a PEFT baseline (SLM alone), as peft writes it
    # the SLM was cut to its first d layers, or to the blocks listed (slm_config.json has the new shape)
    slm_layers: int | list[int] | None = None
    # a trimmed SLM vocabulary: {"kept": n, "full": N, "unknown": old id that unkept prompt tokens become}; the kept
    # ids themselves are the `slm_vocab` tensor in model.safetensors
    trim_vocab: dict[str, int] | None = None
    version: int = A.SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.fusion not in ("add", "replace"):
            raise UserError(f"--fusion must be add or replace, got {self.fusion!r}")
        if self.tokenizer not in ("llm", "slm"):
            raise UserError(f"--tokenizer-mode must be llm or slm, got {self.tokenizer!r}")
        if self.llm is not None and self.tokenizer == "slm" and self.fusion != "replace":
            raise UserError("the SLM's own tokenizer needs --fusion replace: the two tokenizers split a prompt "
                            "into different numbers of tokens, so LLM features cannot be added to SLM embeddings")
        if self.slm_kind == "encoder-only":
            raise UserError(f"the SLM {self.slm!r} is encoder-only and cannot generate: use an encoder-decoder "
                            "(T5 family) or decoder-only (GPT2 family) model")
        if self.peft is not None and self.llm is not None:
            raise UserError("--peft trains a baseline on the SLM alone: leave out --llm (the LLM-to-SLM counterpart "
                            "at a matched parameter count is --llm ... --freeze-slm)")


# ------------------------------------------------------------------------------------------------------ the model


_right_to_left = right_to_left  # the name the tests and older callers import from here


class LLMToSLM(nn.Module):
    def __init__(self, config: ModelConfig, slm: nn.Module, llm: FrozenLLM | None = None) -> None:
        super().__init__()
        self.config = config
        self.slm_base_config = slm.config.to_dict()  # before the vocabulary adapter touches it; saved as is
        self.slm = slm
        d_slm = M.hidden_size(slm.config)
        if config.llm is not None:
            self.projector = Projector(config.llm["d_model"], d_slm, config.feature_norm)
        if config.vocab_adapter:
            if llm is None:
                raise UserError("this model reads the LLM's vocabulary through its embedding rows: load the LLM")
            rows = llm.input_embedding_weight()
            slm.set_input_embeddings(ProjectedEmbedding(rows, d_slm))
            slm.set_output_embeddings(nn.Linear(d_slm, rows.shape[0], bias=False))
            slm.config.vocab_size = rows.shape[0]
            slm.config.tie_word_embeddings = False
        self.__dict__["llm"] = llm  # a plain attribute: not a submodule, so never trained, moved or saved with us
        if config.trim_vocab is not None:  # the shape only: checkpoint.load loads the kept ids with the weights
            self._trim(torch.arange(config.trim_vocab["kept"]))
        self._set_special_ids()
        if config.peft is not None:
            self._wrap_peft()

    # ------------------------------------------------------------------------------------ trimmed vocabulary

    def trim_vocabulary(self, kept: torch.Tensor, unknown: int) -> None:
        """Keep only the SLM's embedding and head rows of `kept` token ids (plus `unknown` and the special ids).

        Ids outside stay the tokenizer's everywhere else: they are mapped in (`slm_ids`; prompt tokens that were not
        kept become `unknown`) and out (generated ids are kept ids, mapped back), so training and generation read
        and write the tokenizer's ids as before, and generation can only emit kept tokens."""
        if self.config.vocab_adapter:
            raise UserError("--trim-vocab cannot be used with the vocabulary adapter (the SLM reads the LLM's "
                            "vocabulary): use --tokenizer-mode slm --fusion replace, or an SLM of the LLM's family")
        if self.config.trim_vocab is not None:
            raise UserError("this model's vocabulary is trimmed already")
        full = self.slm.get_input_embeddings().num_embeddings
        specials = [self.config.pad_token_id, self.config.eos_token_id, self.config.decoder_start_token_id, unknown]
        ids = torch.cat([kept.flatten().long(), torch.tensor([i for i in specials if i is not None])]).unique()
        if int(ids.min()) < 0 or int(ids.max()) >= full:
            raise UserError(f"cannot trim the vocabulary: token ids outside the SLM's {full} embedding rows")
        self.config.trim_vocab = {"kept": len(ids), "full": full, "unknown": unknown}
        self._trim(ids)
        self._set_special_ids()

    def _trim(self, ids: torch.Tensor) -> None:
        surgery.keep_vocabulary(self.slm, ids)
        self.register_buffer("slm_vocab", ids.clone())  # new id -> tokenizer id; saved with the weights
        self.register_buffer("slm_lookup", torch.empty(0, dtype=torch.long), persistent=False)
        self._refresh_lookup()

    def loaded_trimmed_vocabulary(self) -> None:
        """After `slm_vocab` came with loaded weights (checkpoint.load): the lookup and generation ids from it."""
        self._refresh_lookup()
        self._set_special_ids()

    def _refresh_lookup(self) -> None:
        """tokenizer id -> new id (unkept ids -> the unknown token's new id), from `slm_vocab`."""
        trim = self.config.trim_vocab
        lookup = torch.full((trim["full"],), -1, dtype=torch.long, device=self.slm_vocab.device)
        lookup[self.slm_vocab] = torch.arange(len(self.slm_vocab), device=self.slm_vocab.device)
        unknown = int(lookup[trim["unknown"]])
        self.slm_lookup = lookup.masked_fill(lookup < 0, unknown)

    def slm_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> the SLM's embedding rows (the same ids unless the vocabulary is trimmed)."""
        if self.config.trim_vocab is None:
            return ids
        return self.slm_lookup[ids.clamp(0, len(self.slm_lookup) - 1)]

    def plain_slm(self, *, savable: bool = False) -> nn.Module:
        """A copy of the SLM as a plain transformers model over the tokenizer's full vocabulary (a trimmed one
        widened back: unkept tokens are never emitted), for tools that feed it token ids themselves (transformers'
        assisted generation). Only an SLM trained alone is whole without the LLM.

        A trimmed vocabulary is widened with a head bias that scores unkept tokens -1e4, which the model's class
        may not have (it would not survive save_pretrained); `savable` widens it keeping the class's own layers
        instead (surgery.widen_rows: unkept rows copy the unknown token's) and lists the unkept tokens in the
        generation config's `suppress_tokens`, so that transformers' generate never emits them."""
        import copy

        if self.has_llm:
            raise UserError("this checkpoint reads the LLM's features: it is not a model on its own (use a "
                            "checkpoint trained without --llm)")
        if "peft_prompt" in self._modules:
            raise UserError("a prompt- or prefix-tuned SLM is not a plain model (its virtual tokens live outside it)")
        slm = copy.deepcopy(self.slm)
        trim = self.config.trim_vocab
        if trim is not None and savable:
            unkept = surgery.widen_rows(slm, self.slm_vocab, trim["full"], fill=int(self.slm_lookup[trim["unknown"]]))
            slm.generation_config.suppress_tokens = unkept or None
            slm.generation_config._from_model_config = False  # it says more than the model's config now
        elif trim is not None:
            surgery.widen_vocabulary(slm, self.slm_vocab, trim["full"], fill=int(self.slm_lookup[trim["unknown"]]))
        c = self.config
        for cfg in (slm.config, slm.generation_config):
            cfg.pad_token_id, cfg.eos_token_id = c.pad_token_id, c.eos_token_id
            if c.slm_kind == "encoder-decoder":
                cfg.decoder_start_token_id = c.decoder_start_token_id
        return slm.eval()

    def tokenizer_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The SLM's output ids -> tokenizer ids."""
        return ids if self.config.trim_vocab is None else self.slm_vocab[ids]

    def _set_special_ids(self) -> None:
        """The SLM's generation settings in its own ids; settings that name unkept tokens are dropped."""
        c = self.config
        one = (lambda i: i) if c.trim_vocab is None else (lambda i: None if i is None else
                                                          int(self.slm_ids(torch.tensor(i))))
        for cfg in (self.slm.config, self.slm.generation_config):
            cfg.pad_token_id = one(c.pad_token_id)
            cfg.eos_token_id = one(c.eos_token_id)
            if c.slm_kind == "encoder-decoder":
                cfg.decoder_start_token_id = one(c.decoder_start_token_id)
        if c.trim_vocab is not None:
            g = self.slm.generation_config
            if g.bos_token_id is not None:
                g.bos_token_id = one(g.bos_token_id) if bool((self.slm_vocab == g.bos_token_id).any()) else None
            for name in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "forced_bos_token_id",
                         "forced_eos_token_id"):
                if getattr(g, name, None) is not None:
                    setattr(g, name, None)

    def _wrap_peft(self) -> None:
        """A PEFT baseline: peft freezes the SLM and adds the adapter. LoRA layers go into the SLM's modules in place;
        the virtual tokens of prompt and prefix tuning live in `peft_prompt` and are added by `_virtual_tokens`
        (peft's own forward drops the position ids left padding needs and cannot generate from `inputs_embeds`)."""
        wrapped = peft_baselines.wrap(self.slm, self.config.peft)
        self.config.peft = jsonable(wrapped.active_peft_config.to_dict())  # with the sizes peft read off the SLM
        self.__dict__["peft_model"] = wrapped  # not a submodule: its modules are ours (slm, peft_prompt) already
        if wrapped.active_peft_config.is_prompt_learning:
            self.peft_prompt = wrapped.prompt_encoder[wrapped.active_adapter]

    def _virtual_tokens(self, x: torch.Tensor, mask: torch.Tensor, generation: dict[str, Any] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Prompt tuning: the virtual tokens' embeddings go before the SLM's (encoder) input. Prefix tuning: their keys
        and values fill the SLM's (decoder's) self-attention cache first; for a decoder-only SLM the mask covers them.
        Decoder-only positions count from the first virtual token in training and generation alike. Without prompt
        or prefix tuning, nothing changes."""
        if "peft_prompt" not in self._modules:
            return x, mask, {}
        wrapped = self.__dict__["peft_model"]
        n, batch = wrapped.active_peft_config.num_virtual_tokens, x.shape[0]
        with_virtual = torch.cat([mask.new_ones(batch, n), mask], 1)
        if self.config.peft["peft_type"] == "PROMPT_TUNING":
            return torch.cat([wrapped.get_prompt(batch).to(x.dtype), x], 1), with_virtual, {}
        rows = batch
        if generation is not None:  # generate() runs num_beams (or num_return_sequences) rows per prompt
            gc = self.slm.generation_config
            rows *= max(generation.get("num_beams", gc.num_beams or 1),
                        generation.get("num_return_sequences", gc.num_return_sequences or 1))
        extra = {"past_key_values": wrapped.get_prompt(rows)}
        if self.config.slm_kind == "encoder-decoder":
            return x, mask, extra  # the prefix is the decoder's; the encoder input is unchanged
        if generation is not None:
            # generate() reads a cache of n entries as the first n positions of the input: zero rows stand for them
            # (it feeds only the rows after the cached ones to the model)
            x = torch.cat([x.new_zeros(batch, n, x.shape[2]), x], 1)
        return x, with_virtual, extra

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, slm_spec: str, llm: FrozenLLM | None, *, fusion: Fusion = "add", tokenizer: TokenizerMode = "llm",
              slm_tokenizer: str | Path | None = None, template: str | None = None,
              max_prompt_length: int = 512, slm_dtype: str = "float32", slm_layers: int | list[int] | None = None,
              peft: dict[str, Any] | None = None, feature_norm: FeatureNorm = "none") -> LLMToSLM:
        """A new model: the SLM's pretrained (or preset) weights, a fresh projector and, if needed, adapter.

        `slm_layers` keeps the SLM's first d layers (surgery.truncate_layers); `peft` (from
        `peft_baselines.peft_spec`) makes it a PEFT baseline: the SLM alone, frozen, with a fresh adapter."""
        slm_config = M.load_config(slm_spec)
        slm_kind = M.model_kind(slm_config)
        if slm_kind == "encoder-only":
            ModelConfig(slm_spec, slm_kind, None)  # raises the explanation
        if peft is not None and llm is not None:
            ModelConfig(slm_spec, slm_kind, llm.identity(), peft=peft)  # raises the explanation
        slm = M.load_model(slm_spec, dtype=slm_dtype, role="SLM")
        if slm_layers is not None:
            surgery.truncate_layers(slm, slm_layers, slm_spec)
        own_tok = None
        if llm is None or tokenizer == "slm":
            own_tok = M.load_tokenizer(slm_spec, slm_tokenizer, option="--slm-tokenizer")
            out_tok = own_tok
        else:
            out_tok = llm.tokenizer
        if own_tok is not None and len(own_tok) > slm.get_input_embeddings().num_embeddings:
            # a fresh or small-vocabulary SLM given a larger tokenizer: new rows for the new tokens
            slm.resize_token_embeddings(len(own_tok))
        adapter = False
        if llm is not None and tokenizer == "llm":
            adapter = not _same_vocabulary(llm, slm_spec, slm_tokenizer, slm_config)
        if out_tok is not None:
            pad_id, eos_id = out_tok.pad_token_id, out_tok.eos_token_id
        else:  # an LLM preset without its tokenizer (benchmarks): the ids its config declares
            pad_id = llm.config.pad_token_id if llm.config.pad_token_id is not None else llm.config.eos_token_id
            eos_id = llm.config.eos_token_id
        start = pad_id
        if slm_kind == "encoder-decoder" and not adapter and slm_config.decoder_start_token_id is not None:
            start = slm_config.decoder_start_token_id
        config = ModelConfig(
            slm=slm_spec, slm_kind=slm_kind, llm=llm.identity() if llm else None, fusion=fusion,
            tokenizer=tokenizer, vocab_adapter=adapter, pad_token_id=pad_id, eos_token_id=eos_id,
            decoder_start_token_id=start if slm_kind == "encoder-decoder" else None,
            template=template, max_prompt_length=max_prompt_length, peft=peft, slm_layers=slm_layers,
            feature_norm=feature_norm)
        model = cls(config, slm, llm)
        model.prompt_tokenizer = llm.tokenizer if llm else own_tok
        model.target_tokenizer = out_tok
        return model

    # ------------------------------------------------------------------------------------------------ forward

    @property
    def has_llm(self) -> bool:
        return self.config.llm is not None

    def prompt_embeddings(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          features: torch.Tensor | None = None) -> torch.Tensor:
        """P for right-padded prompts: Z + E_X ("add"), Z ("replace") or E_X (no LLM); zero at padding."""
        embed = self.slm.get_input_embeddings()
        if not self.has_llm:
            p = embed(self.slm_ids(prompt_ids))
        else:
            if features is None:
                features = self.llm.encode(prompt_ids, prompt_mask)
            z = self.projector(features.to(device=prompt_ids.device, dtype=self.projector[0].weight.dtype))
            p = z if self.config.fusion == "replace" else z + embed(self.slm_ids(prompt_ids))
        return p * prompt_mask.unsqueeze(-1).to(p.dtype)

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, target_ids: torch.Tensor,
                target_mask: torch.Tensor, features: torch.Tensor | None = None, *,
                teacher_ids: torch.Tensor | None = None, teacher_logprobs: torch.Tensor | None = None,
                kd_weight: float = 0.0, kd_temperature: float = 1.0, return_parts: bool = False):
        """Summed cross-entropy over target tokens (prompt tokens carry no loss) and the number of those tokens.

        All inputs are right-padded; targets end with the end-of-sequence token. With a teacher's top-K distributions
        (`teacher_ids`, `teacher_logprobs`: (batch, target length, K), tokenizer ids) and `kd_weight` A > 0, the loss
        is (1 - A) * cross-entropy + A * `kd_loss`, both summed over target tokens; `return_parts` adds the two sums.
        """
        p = self.prompt_embeddings(prompt_ids, prompt_mask, features)
        target_ids = self.slm_ids(target_ids)
        labels = target_ids.masked_fill(target_mask == 0, -100)
        if self.config.slm_kind == "encoder-decoder":
            start = self.slm_ids(torch.full_like(target_ids[:, :1], self.config.decoder_start_token_id))
            decoder_input_ids = torch.cat([start, target_ids[:, :-1]], 1)
            p, mask, extra = self._virtual_tokens(p, prompt_mask)
            logits = self.slm(inputs_embeds=p, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                              use_cache=False, **extra).logits
        else:
            # [left-padded prompt ; right-padded target]: the layout generation uses, so positions match.
            p, pm = _right_to_left(p, prompt_mask)
            x = torch.cat([p, self.slm.get_input_embeddings()(target_ids)], 1)
            mask = torch.cat([pm, target_mask], 1)
            x, mask, extra = self._virtual_tokens(x, mask)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1]:]
            # only the positions that predict target tokens go through the head (vocabularies can be huge)
            logits = self.slm(inputs_embeds=x, attention_mask=mask, position_ids=position_ids, use_cache=False,
                              logits_to_keep=target_ids.shape[1] + 1, **extra).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                           reduction="sum")
        if not kd_weight:
            return (loss, target_mask.sum(), {"ce": loss.detach()}) if return_parts else (loss, target_mask.sum())
        kd = kd_loss(logits, target_mask, self.teacher_slm_ids(teacher_ids), teacher_logprobs, kd_temperature)
        mixed = (1 - kd_weight) * loss + kd_weight * kd
        if return_parts:
            return mixed, target_mask.sum(), {"ce": loss.detach(), "kd": kd.detach()}
        return mixed, target_mask.sum()

    def teacher_slm_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """A teacher's tokenizer ids -> the SLM's output ids, -1 where the SLM has no such token (a trimmed
        vocabulary) or where `ids` is already -1 (padding)."""
        if self.config.trim_vocab is None:
            return ids
        mapped = self.slm_ids(ids.clamp(min=0))
        return mapped.masked_fill((ids < 0) | (self.slm_vocab[mapped] != ids), -1)

    @torch.inference_mode()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, features: torch.Tensor | None = None,
                 **generation: Any) -> list[list[int]]:
        """Token ids of the responses (without the end token) for right-padded prompts (see `generate_ids`)."""
        out = self.generate_ids(prompt_ids, prompt_mask, features, **generation)
        return strip_generated(out, self.config.eos_token_id, self.config.pad_token_id)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, features: torch.Tensor | None = None,
                     *, engine: str = "auto", streamer: Any = None, seeds: Sequence[int | None] | None = None,
                     **generation: Any) -> torch.Tensor:
        """(batch, n) generated tokenizer ids, padded after each row's end token, for right-padded prompts.

        The LLM runs once over the prompts; the SLM's KV cache is filled by one pass over the fused prompt; every
        step after that feeds plain token embeddings. Decoding is decoding.decode (greedy, sampling, beam search
        with transformers' semantics and less per-step work); engine="transformers", or options decode does not
        know (stop strings, prefix tuning's cache), use transformers' generate with `inputs_embeds` instead, which
        cannot count the prompt in a repetition penalty or n-gram ban: those options are refused there.
        `streamer` (decoding.Streamer) sees the tokenizer ids of each step in our loop; transformers' never calls it.
        `seeds` (one per prompt): our loop samples each row from a generator of its own seed, so a row's sample does
        not depend on the batch (decoding.row_generators); transformers' generate draws from torch's global one.
        """
        p, mask, extra = self._slm_prompt(prompt_ids, prompt_mask, features, generation)
        encoder_decoder = self.config.slm_kind == "encoder-decoder"
        search = None if extra or engine == "transformers" else self.decoding_search(generation, p.device)
        if search is not None:
            step, logits = self._slm_start(p, mask, search)
            history = (self.repetition_prompt(prompt_ids, prompt_mask, pad=search.pad_token_id)
                if search.repetition_penalty != 1.0 or search.no_repeat_ngram_size > 0 else (None, None))
            out = decoding.decode(step, logits, search, prompt_ids=history[0], prompt_mask=history[1],
                                  generator=decoding.row_generators(seeds, p.device) if search.do_sample else None,
                                  streamer=None if streamer is None else lambda t: streamer(self.tokenizer_ids(t)))
        else:
            asked = [k for k in ("repetition_penalty", "no_repeat_ngram_size")
                     if generation.get(k) not in (None, 1.0 if k == "repetition_penalty" else 0)]
            if asked:
                raise UserError(f"{' and '.join(asked)} need this toolkit's decoding loop for an LLM-to-SLM model "
                                "(transformers' generate reads its prompt as embeddings and cannot count the "
                                "prompt's tokens); not with stop strings, prefix tuning or engine='transformers'")
            out = self.slm.generate(inputs_embeds=p, attention_mask=mask, **extra, **generation)
            if encoder_decoder:
                out = out[:, 1:]
        return self.tokenizer_ids(out)

    def _slm_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, features: torch.Tensor | None,
                    generation: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """What the SLM reads: the fused prompt embeddings (left-padded for a decoder-only SLM), their mask, and what
        prefix tuning adds to its call."""
        p = self.prompt_embeddings(prompt_ids, prompt_mask, features)
        mask = prompt_mask
        if self.config.slm_kind != "encoder-decoder":
            p, mask = _right_to_left(p, mask)
        return self._virtual_tokens(p, mask, generation)

    def _slm_start(self, p: torch.Tensor, mask: torch.Tensor, search: decoding.Search):
        g = self.slm.generation_config
        encoder_decoder = self.config.slm_kind == "encoder-decoder"
        return decoding.start(self.slm, mask, search, inputs_embeds=p,
                              decoder_start=g.decoder_start_token_id if encoder_decoder else None)

    # the step-level batcher's hooks (continuous.py): generate_ids's own first step, and its Search

    @property
    def decoder(self) -> nn.Module | None:
        """The model that steps; None where generate_ids uses transformers' generate (prefix tuning)."""
        return None if (self.config.peft or {}).get("peft_type") == "PREFIX_TUNING" else self.slm

    def decoding_search(self, generation: dict[str, Any], device: Any) -> decoding.Search | None:
        """The decoding.Search generate_ids decodes `generation` with (None: transformers' generate)."""
        g = self.slm.generation_config
        return decoding.search_from(generation, g, eos=g.eos_token_id, pad=g.pad_token_id, device=device)

    @torch.inference_mode()
    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, search: decoding.Search):
        """generate_ids's first step for right-padded prompts: the LLM encodes them, the projector fuses, the SLM
        reads the fused embeddings; a decoding.Stepper holding its cache, and the first token's scores."""
        p, mask, extra = self._slm_prompt(prompt_ids, prompt_mask, None, {})
        if extra:
            raise UserError("a prefix-tuned SLM decodes with transformers' generate: it cannot be stepped")
        return self._slm_start(p, mask, search)

    def repetition_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, pad: int
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the repetition penalty and the n-gram ban count before the new tokens (decoding.RepetitionControls),
        in the SLM's output ids, with its mask: what transformers' generate would show its processors for an SLM
        given the prompt as token ids.

        A decoder-only SLM: the prompt's tokens, left-padded as the SLM reads them (padding: `pad`). Prompt tokens a
        trimmed vocabulary lacks become ids past the SLM's head, one per distinct token: never generated, so never
        penalised, but still in the n-grams (dropping them would join their neighbours into n-grams the prompt does
        not have). An encoder-decoder SLM: its decoder start token, as generate counts only the decoder's ids. With
        tokenizer "slm" and an LLM, the prompt is in the LLM's vocabulary, which the SLM never reads as tokens: only
        the new tokens count."""
        batch, device = prompt_ids.shape[0], prompt_ids.device
        if self.config.slm_kind == "encoder-decoder":
            start = self.slm.generation_config.decoder_start_token_id
            return torch.full((batch, 1), start, dtype=torch.long, device=device), None
        if self.has_llm and self.config.tokenizer == "slm":
            return None, None
        ids = self.slm_ids(prompt_ids)
        if self.config.trim_vocab is not None:
            lacking = (self.slm_vocab[ids] != prompt_ids) & prompt_mask.bool()
            if bool(lacking.any()):
                _, rank = torch.unique(prompt_ids[lacking], return_inverse=True)
                ids = ids.masked_scatter(lacking, len(self.slm_vocab) + rank)
        return _right_to_left(ids.masked_fill(prompt_mask == 0, pad), prompt_mask)


def _same_vocabulary(llm: FrozenLLM, slm_spec: str, slm_tokenizer: str | Path | None, slm_config) -> bool:
    a, b = M.resolve(llm.spec), M.resolve(slm_spec)
    if a.kind == b.kind == "preset" and slm_tokenizer is None:  # presets know their vocabulary family
        return presets.preset(a.name).vocab == presets.preset(b.name).vocab
    if llm.tokenizer is None:
        raise UserError(f"cannot compare vocabularies: the tokenizer of {llm.spec!r} is not available")
    if slm_config.vocab_size < len(llm.tokenizer):
        return False  # the SLM cannot even index the LLM's token ids
    try:
        slm_tok = M.load_tokenizer(slm_spec, slm_tokenizer, local_only=b.kind == "preset")
    except UserError:
        if b.kind != "preset":
            raise
        # A fresh preset whose tokenizer is not here: its vocabulary is a known family, and no family of ours is
        # the LLM's unless the LLM is that preset's model itself, which resolve() would have called a preset.
        return False
    same = fingerprints.tokenizer_fingerprint(slm_tok) == fingerprints.tokenizer_fingerprint(llm.tokenizer)
    return same and slm_config.vocab_size >= len(llm.tokenizer)


def parameter_counts(model: LLMToSLM) -> dict[str, Any]:
    """Total and trainable parameters, and the trainable ones by part: projector, vocab_adapter, peft (LoRA, prompt
    or prefix) and slm (its own weights). Paper Table 6 compares methods at matched trainable counts. The frozen
    LLM is not part of the model and not counted here."""
    adapter: set[int] = set()
    if model.config.vocab_adapter:
        for module in (model.slm.get_input_embeddings(), model.slm.get_output_embeddings()):
            adapter |= {id(p) for p in module.parameters()}
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():  # shared (tied) weights once
        if not p.requires_grad:
            continue
        part = ("peft" if name.startswith("peft_prompt.") or ".lora_" in name else
                "vocab_adapter" if id(p) in adapter else name.split(".")[0])
        parts[part] = parts.get(part, 0) + p.numel()
    return {"parameters": sum(p.numel() for p in model.parameters()), "trainable_parameters": sum(parts.values()),
            "trainable_by_part": parts}
