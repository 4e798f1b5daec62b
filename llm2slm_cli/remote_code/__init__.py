"""The model code `export` copies into an exported directory, so that transformers alone loads it
(`AutoModelForCausalLM` or `AutoModelForSeq2SeqLM`, `trust_remote_code=True`): `configuration_llm2slm.py`, the
config, and `modeling_llm2slm.py`, the model (frozen LLM, projector, SLM, `generate`). Those two files import torch
and transformers, never llm2slm_cli: whoever loads an export may not have this package installed. This module itself
only names them (importing it imports neither torch nor transformers)."""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "configuration_llm2slm.py"
MODELING_FILE = "modeling_llm2slm.py"
CONFIG_CLASS = "LLMToSLMConfig"
MODEL_TYPE = "llm2slm"
# the model class of each SLM kind, and the transformers auto class that loads it
MODEL_CLASSES = {"decoder-only": ("LLMToSLMForCausalLM", "AutoModelForCausalLM"),
                 "encoder-decoder": ("LLMToSLMForConditionalGeneration", "AutoModelForSeq2SeqLM")}


def source_files() -> list[Path]:
    """The two files, as they lie in this package."""
    here = Path(__file__).resolve().parent
    return [here / CONFIG_FILE, here / MODELING_FILE]


def auto_map(slm_kind: str) -> dict[str, str]:
    """config.json's `auto_map`: the config class, and the model class under the auto class of its SLM kind."""
    cls, auto = MODEL_CLASSES[slm_kind]
    return {"AutoConfig": f"{Path(CONFIG_FILE).stem}.{CONFIG_CLASS}", auto: f"{Path(MODELING_FILE).stem}.{cls}"}
