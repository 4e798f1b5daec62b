"""The paper's PEFT baselines (Table 6): the SLM alone, frozen, with LoRA, prompt tuning or prefix tuning through
`peft`. Here: their peft configs with the family defaults of Table 8, and the wrapping of an SLM; LLMToSLM carries the
wrapped SLM and adds the virtual tokens."""

from __future__ import annotations

from typing import Any, Literal

from llm2slm_cli import loading as M
from llm2slm_cli.errors import UserError

# Paper Table 8, by SLM family; decoder-only SLMs other than GPT2 take GPT2's. prefix_hidden 0: no projection.
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"prompt_tokens": 200, "prefix_tokens": 256, "prefix_hidden": 64, "lora_rank": 40, "lora_alpha": 64,
             "lora_dropout": 0.1},
    "t5": {"prompt_tokens": 1024, "prefix_tokens": 1024, "prefix_hidden": 0, "lora_rank": 24, "lora_alpha": 32,
           "lora_dropout": 0.1},
}
PeftMethod = Literal["lora", "prompt", "prefix"]
PEFT_TYPES: dict[str, str] = {"lora": "LORA", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}  # peft's names


def peft_spec(method: PeftMethod, slm_config, *, virtual_tokens: int | None = None, prefix_hidden: int | None = None,
              lora_rank: int | None = None, lora_alpha: float | None = None, lora_dropout: float | None = None,
              lora_targets: list[str] | None = None) -> dict[str, Any]:
    """The peft config (as a dict) of a PEFT baseline on this SLM; None options take the family's Table 8 value.

    Prompt tuning prepends its virtual tokens to the (encoder) input, initialised from random vocabulary rows;
    prefix tuning puts them in every (decoder) self-attention layer's keys and values; LoRA targets peft's default
    modules for the architecture (GPT2: c_attn; T5: q, v; Llama: q_proj, v_proj) unless `lora_targets` are given."""
    import peft

    defaults = PEFT_DEFAULTS["t5" if slm_config.model_type in M.T5_TYPES else "gpt2"]
    task = "SEQ_2_SEQ_LM" if M.model_kind(slm_config) == "encoder-decoder" else "CAUSAL_LM"
    if method == "lora":
        cfg = peft.LoraConfig(task_type=task, r=lora_rank or defaults["lora_rank"],
                              lora_alpha=lora_alpha or defaults["lora_alpha"],
                              lora_dropout=defaults["lora_dropout"] if lora_dropout is None else lora_dropout,
                              target_modules=lora_targets or None, fan_in_fan_out=slm_config.model_type == "gpt2")
    elif method == "prompt":
        cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=virtual_tokens or defaults["prompt_tokens"],
                                      num_transformer_submodules=1, prompt_tuning_init="SAMPLE_VOCAB")
    elif method == "prefix":
        hidden = defaults["prefix_hidden"] if prefix_hidden is None else prefix_hidden
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=virtual_tokens or defaults["prefix_tokens"],
                                      prefix_projection=hidden > 0, encoder_hidden_size=hidden or None)
    else:
        raise UserError(f"--peft must be lora, prompt or prefix, got {method!r}")
    return jsonable(cfg.to_dict())


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """A peft config dict as it round-trips through JSON: enums as their values, sets as sorted lists."""
    import enum

    def plain(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (set, frozenset)):
            return sorted(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in d.items()}


def wrap(slm, peft_config: dict[str, Any]):
    """The SLM wrapped by peft (`peft.get_peft_model`) as `peft_config` (from `peft_spec`) says; peft freezes it."""
    import warnings

    import peft

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on defaults it fills in
            return peft.get_peft_model(slm, peft.get_peft_config(dict(peft_config)))
    except ValueError as e:  # e.g. --peft-lora-targets naming no module of this SLM
        method = {v: k for k, v in PEFT_TYPES.items()}.get(peft_config.get("peft_type"), "")
        raise UserError(f"--peft {method}: {M.short_error(e)}") from None
