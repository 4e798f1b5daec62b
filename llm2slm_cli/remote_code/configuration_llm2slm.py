"""The config of an LLM-to-SLM model exported by llm2slm (arXiv 2402.16844), for transformers' remote code.

Self-contained: it imports transformers only. `llm2slm export` writes config.json with these fields; the modeling
file beside it (modeling_llm2slm.py) builds the model from them.
"""

from transformers import PretrainedConfig


class LLMToSLMConfig(PretrainedConfig):
    """What an exported LLM-to-SLM model is.

    - `slm_config`: the SLM's own transformers config (a dict with its `model_type`), before any vocabulary change.
    - `slm_kind`: "decoder-only" or "encoder-decoder".
    - `llm`: the frozen LLM, or None for an SLM trained alone: `subfolder` (its copy in this directory, e.g. "llm")
      or `name_or_path` (a hub id), `kind`, `layer` (int, or "all": the mean of every layer), `n_layers`,
      `d_model`, `dtype`, `embedding_rows` (its vocabulary, read by a vocabulary adapter).
    - `fusion`: "add" (projected features + the SLM's prompt embeddings) or "replace" (the features alone).
    - `tokenizer_mode`: "llm" (the SLM reads and writes the LLM's tokens) or "slm" (it writes its own tokenizer's).
    - `vocab_adapter`: the SLM reads the LLM's vocabulary through a trained projection of the LLM's embedding rows.
    - `feature_norm`: "none" or "standardize" (fixed per-channel statistics in the projector's buffers).
    - `trim_vocab`: None, or {"kept", "full", "unknown"}: the SLM keeps `kept` rows of the `full` vocabulary (the
      tokenizer ids of the rows are the `slm_vocab` buffer); prompt tokens it lacks read as `unknown`.
    - `special_ids`: the tokenizer's "pad", "eos" and (encoder-decoder) "decoder_start" ids.
    - `template`: the prompt template the model was trained with (apply it to prompts yourself), or None.
    """

    model_type = "llm2slm"

    def __init__(self, slm_config=None, slm_kind="decoder-only", llm=None, fusion="add", tokenizer_mode="llm",
                 vocab_adapter=False, feature_norm="none", trim_vocab=None, special_ids=None, template=None,
                 max_prompt_length=512, **kwargs):
        self.slm_config = dict(slm_config or {})
        self.slm_kind = slm_kind
        self.llm = dict(llm) if llm else None
        self.fusion = fusion
        self.tokenizer_mode = tokenizer_mode
        self.vocab_adapter = bool(vocab_adapter)
        self.feature_norm = feature_norm
        self.trim_vocab = dict(trim_vocab) if trim_vocab else None
        self.special_ids = dict(special_ids or {})
        self.template = template
        self.max_prompt_length = max_prompt_length
        kwargs.setdefault("is_encoder_decoder", slm_kind == "encoder-decoder")
        super().__init__(**kwargs)
