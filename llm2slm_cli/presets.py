"""Architecture presets: models built from their published shape (`preset:t5-large`, `tiny-t5`, ...).

A preset's fresh weights are drawn from a fixed seed (`loading.load_model`), so the same preset gives the same weights
(and fingerprint) on every machine: exact for speed and memory measurements, and the way the tests get models without
a download. Tiny presets carry built-in tokenizers (`loading.builtin_tokenizer`); paper-shape presets take the
tokenizer of the model they copy (hub access or `--tokenizer DIR`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2slm_cli.errors import UserError


@dataclass(frozen=True)
class Preset:
    model_type: str
    config: dict[str, Any]
    tokenizer: str  # "builtin:<name>" or a hub id whose tokenizer the preset shares
    description: str
    vocab: str = ""  # presets with the same vocab family share token ids (T5, T5 v1.1 and Flan-T5 share one)

    def __post_init__(self) -> None:
        if not self.vocab:
            family = self.tokenizer.removeprefix("builtin:").split("-")[0]
            object.__setattr__(self, "vocab", "t5" if "t5" in self.tokenizer else family)


def _t5(d_model: int, d_ff: int, layers: int, heads: int, gated: bool, **kw: Any) -> dict[str, Any]:
    return dict(vocab_size=32128, d_model=d_model, d_ff=d_ff, d_kv=64, num_layers=layers, num_decoder_layers=layers,
                num_heads=heads, feed_forward_proj="gated-gelu" if gated else "relu",
                tie_word_embeddings=not gated, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **kw)


def _gpt2(layers: int, d: int = 768, heads: int = 12) -> dict[str, Any]:
    return dict(vocab_size=50257, n_positions=1024, n_embd=d, n_layer=layers, n_head=heads,
                bos_token_id=50256, eos_token_id=50256)


_TINY_T5 = dict(vocab_size=260, d_kv=16, feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)

PRESETS: dict[str, Preset] = {
    "t5-small": Preset("t5", _t5(512, 2048, 6, 8, False), "t5-small", "T5-Small, 60M"),
    "t5-base": Preset("t5", _t5(768, 3072, 12, 12, False), "t5-base", "T5-Base, 220M"),
    "t5-large": Preset("t5", _t5(1024, 4096, 24, 16, False), "t5-large", "T5-Large, 738M"),
    "t5-v1_1-small": Preset("t5", _t5(512, 1024, 8, 6, True), "google/t5-v1_1-small", "T5 v1.1 Small, 77M"),
    "flan-t5-base": Preset("t5", _t5(768, 2048, 12, 12, True), "google/flan-t5-base", "Flan-T5-Base, 248M"),
    "gpt2": Preset("gpt2", _gpt2(12), "gpt2", "GPT2, 124M"),
    "gpt2-medium": Preset("gpt2", _gpt2(24, 1024, 16), "gpt2", "GPT2-Medium, 355M"),
    # small fresh models that train in minutes on a CPU (the offline demo)
    "mini-gpt2": Preset("gpt2", dict(_gpt2(2, 128, 4), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "gpt2",
                        "GPT2 shape, d=128, 2 layers"),
    "small-llama": Preset("llama", dict(vocab_size=260, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                        bos_token_id=3, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False),
                          "builtin:bytes-llama", "Llama shape, d=256, 4 layers, byte vocabulary"),
    # tiny models for tests and smoke runs; the byte tokenizer makes them usable on any text
    "tiny-t5": Preset("t5", dict(_TINY_T5, d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
                      "builtin:bytes-t5", "T5 shape, d=64, 2+2 layers"),
    "tiny-t5-large": Preset("t5", dict(_TINY_T5, d_model=96, d_ff=192, num_layers=3, num_decoder_layers=3,
                                       num_heads=4), "builtin:bytes-t5", "T5 shape, d=96, 3+3 layers"),
    "tiny-gpt2": Preset("gpt2", dict(vocab_size=260, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=3, eos_token_id=1, pad_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0),
                        "builtin:bytes-gpt2", "GPT2 shape, d=64, 2 layers"),
    "tiny-llama": Preset("llama", dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                       bos_token_id=3, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False),
                         "builtin:bytes-llama", "Llama shape, d=64, 3 layers"),
    "tiny-bert": Preset("bert", dict(vocab_size=193, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=1024, pad_token_id=0,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                        "builtin:wordpiece", "BERT shape, d=48, 2 layers, character WordPiece vocabulary"),
}
_GPT2_LAYERS = re.compile(r"^gpt2-l(\d+)$")


def preset(name: str) -> Preset:
    if name in PRESETS:
        return PRESETS[name]
    if m := _GPT2_LAYERS.match(name):  # GPT2 truncated to its first d layers (paper Figure 4)
        d = int(m.group(1))
        if not 1 <= d <= 12:
            raise UserError(f"preset {name!r}: GPT2 has 12 layers, ask for 1 to 12")
        return Preset("gpt2", _gpt2(d), "gpt2", f"GPT2 with {d} layers")
    raise UserError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}, gpt2-l<d>")


def preset_model_type(spec: str) -> str | None:
    """The model type of a preset spec, without reading any file (None for other specs)."""
    name = spec.removeprefix("preset:")
    if not (spec.startswith("preset:") or (spec.startswith("tiny-") and not Path(spec).exists())):
        return None
    try:
        return preset(name).model_type
    except UserError:
        return None
