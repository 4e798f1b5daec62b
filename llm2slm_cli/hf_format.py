"""An exported checkpoint in transformers' own format too, beside llm2slm's files.

`write` adds what `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)`
reads: config.json (model_type "llm2slm", an `auto_map` naming the model code), generation_config.json (the
tokenizer's special ids), the model code itself (remote_code/: configuration_llm2slm.py, modeling_llm2slm.py, which
import torch and transformers only) and the prompt tokenizer's files at the top of the directory (so that
`AutoTokenizer.from_pretrained(DIR)` and `pipeline(model=DIR)` find it). model.safetensors is the checkpoint's own:
the model code names its parts as llm2slm does (slm.*, projector.*, slm_vocab). The LLM is the copy in DIR/llm
(export --include-llm) or the hub id the checkpoint names; an LLM that is neither (a preset, a local directory not
copied) must be given to `from_pretrained` as `llm_path=`.

A PEFT baseline is left out (`unsupported`): its adapter layers are peft's, which this model code does not rebuild.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import loading as M
from llm2slm_cli import remote_code
from llm2slm_cli.errors import UserError

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"


def unsupported(mc) -> str | None:
    """Why transformers cannot load this checkpoint through the model code (None: it can)."""
    if mc.peft is not None:
        return "a PEFT baseline (its adapter is peft's)"
    return None


def write(directory: Path, checkpoint: Path, mc, *, bundled: bool) -> list[str]:
    """Write the transformers files of checkpoint `checkpoint` (model config `mc`) into `directory`, which holds
    its copy already; returns the names written, for the manifest."""
    directory, checkpoint = Path(directory), Path(checkpoint)
    slm_config = A.read_json_table(checkpoint / A.SLM_CONFIG, "SLM config")
    config = _config(checkpoint, mc, slm_config, bundled=bundled)
    A.atomic_write_json(directory / CONFIG, config)
    _generation_config(checkpoint, mc).save_pretrained(str(directory))
    written = [CONFIG, GENERATION_CONFIG]
    for source in remote_code.source_files():
        shutil.copy2(source, directory / source.name)
        written.append(source.name)
    for path in sorted((checkpoint / A.TOKENIZER_DIR).iterdir()):
        if path.is_file() and not (directory / path.name).exists():
            shutil.copy2(path, directory / path.name)
            written.append(path.name)
    return written


def _config(checkpoint: Path, mc, slm_config: dict[str, Any], *, bundled: bool) -> dict[str, Any]:
    import transformers  # off the import of this module

    cls, _ = remote_code.MODEL_CLASSES[mc.slm_kind]
    return {"model_type": remote_code.MODEL_TYPE, "architectures": [cls], "auto_map": remote_code.auto_map(mc.slm_kind),
            "slm_config": slm_config, "slm_kind": mc.slm_kind,
            "llm": _llm(checkpoint, mc, bundled=bundled) if mc.llm else None,
            "fusion": mc.fusion, "tokenizer_mode": mc.tokenizer, "vocab_adapter": mc.vocab_adapter,
            "feature_norm": mc.feature_norm, "trim_vocab": mc.trim_vocab,
            "special_ids": {"pad": mc.pad_token_id, "eos": mc.eos_token_id,
                            **({"decoder_start": mc.decoder_start_token_id}
                               if mc.slm_kind == "encoder-decoder" else {})},
            "template": mc.template, "max_prompt_length": mc.max_prompt_length,
            "is_encoder_decoder": mc.slm_kind == "encoder-decoder",
            "transformers_version": transformers.__version__}


def _llm(checkpoint: Path, mc, *, bundled: bool) -> dict[str, Any]:
    """config.json's LLM: where it is (the copy, or a hub id) and the features it gives. A local path is never
    written: it would not exist where the export is loaded."""
    llm = mc.llm
    try:
        kind = M.resolve(llm["name"]).kind
    except UserError:
        kind = "dir"
    entry = {"name": llm["name"] if kind in ("hub", "preset") else None,
             "name_or_path": llm["name"] if kind == "hub" else None,
             "subfolder": A.BUNDLED_LLM if bundled else None,
             **{k: llm[k] for k in ("kind", "layer", "n_layers", "d_model", "dtype")}}
    if mc.vocab_adapter:
        entry["embedding_rows"] = _head_rows(checkpoint, mc)
    return entry


def _head_rows(checkpoint: Path, mc) -> int:
    """The rows of the SLM's output head in the weights (with a vocabulary adapter: the LLM's vocabulary)."""
    import torch  # off the import of this module
    from safetensors import safe_open

    config = M.checkpoint_slm_config(checkpoint)
    with torch.device("meta"):
        slm = M.auto_class(mc.slm_kind, with_head=True).from_config(config)
    name = next(n for n, m in slm.named_modules() if m is slm.get_output_embeddings())
    with safe_open(str(checkpoint / A.MODEL_WEIGHTS), "pt") as f:
        return int(f.get_slice(f"slm.{name}.weight").get_shape()[0])


def _generation_config(checkpoint: Path, mc):
    """The SLM's generation settings with the tokenizer's special ids, as llm2slm decodes with them (a trimmed
    vocabulary drops the settings that name tokens it lacks)."""
    from transformers import GenerationConfig  # off the import of this module

    config = GenerationConfig.from_model_config(M.checkpoint_slm_config(checkpoint))
    config._from_model_config = False  # else generate() may rebuild it from config.json, which names no tokens
    config.pad_token_id, config.eos_token_id = mc.pad_token_id, mc.eos_token_id
    if mc.slm_kind == "encoder-decoder":
        config.decoder_start_token_id = mc.decoder_start_token_id
    if mc.trim_vocab is not None:
        kept = set(_kept_ids(checkpoint))
        if config.bos_token_id is not None and config.bos_token_id not in kept:
            config.bos_token_id = None
        for name in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "forced_bos_token_id",
                     "forced_eos_token_id"):
            if getattr(config, name, None) is not None:
                setattr(config, name, None)
    return config


def _kept_ids(checkpoint: Path) -> list[int]:
    """A trimmed checkpoint's kept tokenizer ids (the `slm_vocab` tensor of its weights)."""
    from safetensors import safe_open  # off the import of this module

    with safe_open(str(checkpoint / A.MODEL_WEIGHTS), "pt") as f:
        return f.get_tensor("slm_vocab").tolist()
