"""An LLMToSLM checkpoint on disk: saving and loading it (the files a manifest verifies), the shape of its
llm2slm.json, and the check that an LLM is the one a checkpoint or a feature store was made with."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from llm2slm_cli import artifacts as A
from llm2slm_cli import loading as M
from llm2slm_cli.errors import UserError
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM, LLMWeights, ModelConfig
from llm2slm_cli.peft_baselines import jsonable


def save(model: LLMToSLM, directory: Path) -> None:
    """Write `model` as a checkpoint in `directory`: its config, weights, tokenizers and, last, their manifest."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    A.atomic_write_json(directory / A.MODEL_CONFIG, dataclasses.asdict(model.config))
    A.atomic_write_json(directory / A.SLM_CONFIG, model.slm_base_config)
    with A.atomic_output(directory / A.MODEL_WEIGHTS) as tmp:
        save_model(model, str(tmp))
    if model.prompt_tokenizer is not None:
        model.prompt_tokenizer.save_pretrained(str(directory / A.TOKENIZER_DIR))
    if model.target_tokenizer is not model.prompt_tokenizer:
        model.target_tokenizer.save_pretrained(str(directory / A.SLM_TOKENIZER_DIR))
    # last: the sizes and sha256 of the weights and config files, which `load` checks (train and export
    # write their own, fuller manifest over this one)
    A.atomic_write_json(directory / A.MANIFEST, A.make_manifest(
        A.KIND_CHECKPOINT, {}, model=jsonable(dataclasses.asdict(model.config)),
        files=A.checkpoint_records(directory)))


def load(directory: Path, *, llm: FrozenLLM | None = None, llm_spec: str | None = None,
         device: str | torch.device = "cpu", unverified: bool = False, llm_weights: LLMWeights = "encoder") -> LLMToSLM:
    """Load a checkpoint; its LLM is named by the name it records (or by `llm_spec`, or is the copy `export` put
    in DIR/llm) and must match its fingerprint; its weights are loaded as `llm_weights` says (by default a T5
    LLM's encoder alone; "lazy": when it first encodes, e.g. never with stored features; see FrozenLLM). The
    weights and config files are checked against the manifest's sha256 first; a checkpoint without a manifest
    is refused unless `unverified` (or LLM2SLM_UNVERIFIED_CHECKPOINTS=1)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    config = read_model_config(directory)
    slm_config = M.checkpoint_slm_config(directory)
    A.verify_checkpoint(directory, unverified=unverified)  # the files' shapes first (one line), then their bytes
    if config.llm is not None and llm is None:
        bundled = directory / A.BUNDLED_LLM  # `export` may copy the LLM in beside the weights
        spec = llm_spec or (str(bundled) if (bundled / "config.json").is_file() else config.llm["name"])
        llm = FrozenLLM(spec, layer=config.llm["layer"], dtype=config.llm["dtype"],
                        tokenizer=directory / A.TOKENIZER_DIR, device=device, weights=llm_weights)
    if llm is not None:
        check_llm(llm, config.llm, f"checkpoint {directory}")
    slm = M.auto_class(config.slm_kind, with_head=True).from_config(slm_config)
    model = LLMToSLM(config, slm, llm)
    try:
        load_model(model, str(directory / A.MODEL_WEIGHTS), strict=True, device=str(device))
    except (OSError, RuntimeError, SafetensorError) as e:  # truncated or foreign (an unverified checkpoint)
        raise UserError(f"cannot load weights ({M.short_error(e)})", path=directory / A.MODEL_WEIGHTS) from None
    if config.trim_vocab is not None:  # the kept ids came with the weights
        model.loaded_trimmed_vocabulary()
    model.prompt_tokenizer = M.ensure_special_tokens(_load_tok(directory / A.TOKENIZER_DIR))
    slm_tok_dir = directory / A.SLM_TOKENIZER_DIR
    model.target_tokenizer = (M.ensure_special_tokens(_load_tok(slm_tok_dir)) if slm_tok_dir.is_dir()
                              else model.prompt_tokenizer)
    return model.to(device).eval()


def _load_tok(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # a damaged or hand-edited tokenizer
        raise UserError(f"the checkpoint's tokenizer cannot be loaded ({type(e).__name__}: {e})"[:300],
                        path=path) from None


# The shape of llm2slm.json (see ModelConfig): a damaged or foreign one is one line naming the key.
MODEL_CONFIG_SCHEMA: dict[str, Any] = {
    "slm": str, "slm_kind": str, "llm": (dict, A.NONE), "fusion?": str, "tokenizer?": str, "vocab_adapter?": bool,
    "pad_token_id?": int, "eos_token_id?": int, "decoder_start_token_id?": (int, A.NONE), "template?": (str, A.NONE),
    "max_prompt_length?": int, "peft?": (dict, A.NONE), "slm_layers?": (int, list, A.NONE),
    "trim_vocab?": (dict, A.NONE), "feature_norm?": str, "version": int}
TRIM_SCHEMA = {"kept": int, "full": int, "unknown": int}


def read_model_config(directory: Path) -> ModelConfig:
    path = Path(directory) / A.MODEL_CONFIG
    if not path.is_file():
        raise UserError(f"not an llm2slm checkpoint (no {A.MODEL_CONFIG})", path=directory)
    raw = A.read_json_table(path, "checkpoint config")
    if "version" not in raw:
        raise UserError("no 'version' in the checkpoint config (a damaged or foreign file)", path=path)
    if raw.get("version") != A.SCHEMA_VERSION:
        raise UserError(f"checkpoint schema version {raw.get('version')} is not supported (this tool reads version "
                        f"{A.SCHEMA_VERSION})", path=path)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown checkpoint config keys {', '.join(unknown)} (made by another version?)", path=path)
    A.check_schema(raw, MODEL_CONFIG_SCHEMA, path)
    for key, schema in (("llm", A.MANIFEST_SCHEMA[A.KIND_FEATURES]["llm"]), ("trim_vocab", TRIM_SCHEMA)):
        if raw.get(key) is not None:
            A.check_schema(raw[key], schema, path, key)
    # the shape is right; the numbers must be too (a hand-edited or unverified checkpoint reaches this)
    for key, least in (("max_prompt_length", 1), ("pad_token_id", 0), ("eos_token_id", 0),
                       ("decoder_start_token_id", 0)):
        if isinstance(raw.get(key), int) and raw[key] < least:
            raise UserError(f"'{key}' is {raw[key]}, expected {least} or more (a damaged file)", path=path)
    try:
        return ModelConfig(**raw)
    except TypeError as e:
        raise UserError(f"incomplete checkpoint config ({e})", path=path) from None


def check_llm(llm: FrozenLLM, expected: dict[str, Any] | None, what: str) -> None:
    """Refuse an LLM whose weights, layer or tokenizer differ from what `what` was made with."""
    if expected is None:
        raise UserError(f"{what} was made without an LLM, but --llm {llm.spec} was given")
    have = llm.identity()
    if expected.get("fingerprint_kind") != A.FINGERPRINT_FILES:  # made before fingerprints were the files' sha256
        have["fingerprint"] = llm.state_fingerprint()
    for key in ("fingerprint", "layer", "tokenizer_fingerprint", "d_model"):
        if have[key] != expected[key]:
            raise UserError(f"{what} was made with LLM {expected['name']!r} ({key} {str(expected[key])[:16]}), "
                            f"but the LLM given is {llm.spec!r} ({key} {str(have[key])[:16]})")
