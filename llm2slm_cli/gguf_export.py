"""A trained decoder-only SLM as a GGUF file, for decoding in llama.cpp (`export --gguf`, `--backend llama-cpp`).

The file holds the SLM alone, as the checkpoint has it: its kept layers and, for a trimmed vocabulary, only the
kept rows. Its vocabulary is the SLM's own ids (GGUF id i is the SLM's row i), with the tokenizer's token texts
for them, and `llm2slm.token_ids` maps each GGUF id back to the tokenizer's id; llama.cpp never tokenizes here
(prompts come in as fused embeddings, steps as ids, text goes out through our tokenizer). `llm2slm.slm_fingerprint`
names the weights it was made from, so the backend refuses a GGUF of another checkpoint.

Tensor names come from the gguf library's own map (gguf.get_tensor_name_map); what llama.cpp's converter
(convert_hf_to_gguf.py) changes on the way is done the same here, per family: Gemma-3's RMSNorm weights get +1
(its norm multiplies by 1 + w), Llama's q and k rows are permuted for llama.cpp's rotary layout, GPT2's Conv1D
weights are transposed. f32 and f16 are written here; Q8_0 and Q4_K_M are llama.cpp's own quantization
(llama_model_quantize) of the f32 file, so their per-tensor choices are llama.cpp's.

torch and the model code are imported inside the functions that use them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llm2slm_cli import fingerprints
from llm2slm_cli.errors import UserError, require_extra
from llm2slm_cli.version import __version__

QUANTIZATIONS = ("f32", "f16", "Q8_0", "Q4_K_M")
# the transformers model type -> gguf's architecture name
FAMILIES = {"llama": "LLAMA", "qwen2": "QWEN2", "gemma3_text": "GEMMA3", "gpt2": "GPT2"}
TOKEN_IDS_KEY = "llm2slm.token_ids"
FINGERPRINT_KEY = "llm2slm.slm_fingerprint"
VERSION_KEY = "llm2slm.version"
# llama.cpp's file types (llama.h: enum llama_ftype)
_LLAMA_FTYPES = {"Q8_0": 7, "Q4_K_M": 15}


def refuse_unexportable(model: Any, where: str) -> None:
    """One line for what a GGUF of the SLM alone cannot be (see `check_exportable`), for a loaded LLMToSLM."""
    check_exportable(model.config, model.slm.config.model_type, where)


def check_exportable(config: Any, model_type: str | None, where: str) -> None:
    """A checkpoint's ModelConfig and its SLM's model type: refused in one line if it is an encoder-decoder SLM, reads
    the LLM's vocabulary through the adapter, is a PEFT baseline, or is of a family without a GGUF export here."""
    if config.slm_kind != "decoder-only":
        raise UserError(f"{where}: llama.cpp decodes a decoder-only SLM (Gemma, Llama, Qwen2, GPT2 families); this "
                        f"checkpoint's SLM {config.slm!r} is {config.slm_kind}")
    if config.vocab_adapter:
        raise UserError(f"{where}: this SLM reads the LLM's vocabulary through a projection of its embedding rows, "
                        "which llama.cpp has no layer for")
    if config.peft is not None:
        raise UserError(f"{where}: a PEFT baseline ({config.peft.get('peft_type')}) is not exported to GGUF")
    if model_type not in FAMILIES:
        raise UserError(f"{where}: no GGUF export for the SLM family {model_type!r} (supported: "
                        f"{', '.join(sorted(FAMILIES))})")


def check_quantization(quantization: str) -> None:
    """A known precision, and llama.cpp installed for the two it quantizes (checked before any work)."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--gguf must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    if quantization in _LLAMA_FTYPES:
        require_extra(f"--gguf {quantization}", "llama-cpp", "llama_cpp",
                      note=" (it compiles llama.cpp: minutes; f32 and f16 are written without it)")


def slm_fingerprint(model: Any) -> str:
    return fingerprints.state_fingerprint(model.slm)


def write(model: Any, path: Path, quantization: str, *, threads: int = 1) -> dict[str, Any]:
    """Write `model`'s SLM (an LLMToSLM, float32 weights) to `path` as GGUF at `quantization`; what was written."""
    import gguf

    check_quantization(quantization)
    refuse_unexportable(model, "--gguf")
    path = Path(path)
    slm = model.slm
    cfg = slm.config
    arch = FAMILIES[cfg.model_type]
    tensors = _tensors(slm, arch, half=quantization == "f16")
    token_ids = [int(i) for i in model.tokenizer_ids(_arange(len(_embedding_rows(slm))))]
    target = path if quantization in ("f32", "f16") else path.with_name(path.name + ".f32.tmp")
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    try:
        writer.add_name(Path(str(model.config.slm)).name or "slm")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quantization == "f16" else gguf.LlamaFileType.ALL_F32)
        _hparams(writer, cfg, arch)
        _vocabulary(writer, model, token_ids)
        writer.add_array(TOKEN_IDS_KEY, token_ids)
        writer.add_string(FINGERPRINT_KEY, slm_fingerprint(model))
        writer.add_string(VERSION_KEY, __version__)
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    if target != path:
        try:
            _quantize(target, path, quantization, threads)
        finally:
            target.unlink(missing_ok=True)
    return {"file": path.name, "quantization": quantization, "architecture": arch.lower(),
            "vocabulary": len(token_ids), "bytes": path.stat().st_size}


def _arange(n: int):
    import torch  # off the import of this module

    return torch.arange(n)


def _embedding_rows(slm: Any):
    return slm.get_input_embeddings().weight


def _tensors(slm: Any, arch: str, *, half: bool) -> list[tuple[str, Any]]:
    """(GGUF name, numpy array) of every weight, changed as llama.cpp's converter changes them."""
    import gguf
    import numpy as np
    import torch  # off the import of this module

    cfg = slm.config
    n_layers = _get(cfg, "num_hidden_layers", "n_layer")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for name, t in slm.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the head from token_embd where output.weight is absent
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # GPT2's causal-mask buffers of older versions
            continue
        t = t.detach().to(device="cpu", dtype=torch.float32)
        if arch == "GEMMA3" and name.endswith("norm.weight"):
            t = t + 1.0
        if arch == "LLAMA" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads
            t = _permute(t, heads if name.endswith("q_proj.weight") else cfg.num_key_value_heads)
        if arch == "GPT2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.t()
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"--gguf: the SLM has a weight llama.cpp's {arch.lower()} model has no place for: {name}")
        array = np.ascontiguousarray(t.numpy())
        # as llama.cpp's converter: 1-D tensors (norms, biases) stay float32
        out.append((new, array.astype(np.float16) if half and array.ndim > 1 else array))
    return out


def _permute(w, n_head: int):
    """HF's rotate-half rotary layout -> llama.cpp's interleaved one (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        value = getattr(cfg, n, None)
        if value is not None:
            return value
    return default


def _rope(cfg: Any, layer_type: str | None = None) -> float:
    """The rotary base of a (sliding or full attention) layer; anything but plain RoPE is refused."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise UserError(f"--gguf: RoPE scaling {kind!r} is not exported (plain RoPE only)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise UserError("--gguf: the SLM's config names no rope_theta")
    return float(theta)


def _hparams(w: Any, cfg: Any, arch: str) -> None:
    n_embd = _get(cfg, "hidden_size", "n_embd")
    w.add_block_count(_get(cfg, "num_hidden_layers", "n_layer"))
    w.add_context_length(_get(cfg, "max_position_embeddings", "n_positions"))
    w.add_embedding_length(n_embd)
    w.add_head_count(_get(cfg, "num_attention_heads", "n_head"))
    w.add_vocab_size(_get(cfg, "vocab_size"))
    if arch == "GPT2":
        w.add_feed_forward_length(_get(cfg, "n_inner", default=4 * n_embd))
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"--gguf: llama.cpp's gpt2 uses the tanh GELU, not {cfg.activation_function!r}")
        return
    head_dim = _get(cfg, "head_dim", default=n_embd // cfg.num_attention_heads)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count_kv(_get(cfg, "num_key_value_heads", default=cfg.num_attention_heads))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch in ("LLAMA", "QWEN2"):
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UserError(f"--gguf: llama.cpp's {arch.lower()} uses SiLU, not {cfg.hidden_act!r}")
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(_rope(cfg))
        if arch == "LLAMA" and getattr(cfg, "mlp_bias", False):
            raise UserError("--gguf: a Llama with MLP biases is not exported")
        return
    # Gemma-3: per-layer sliding windows as the config lists them (a cut model keeps its layers' own kinds)
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise UserError("--gguf: attention logit soft-capping is not in llama.cpp's gemma3")
    if getattr(cfg, "query_pre_attn_scalar", head_dim) != head_dim:
        raise UserError(f"--gguf: llama.cpp's gemma3 scales queries by 1/sqrt(head_dim): query_pre_attn_scalar "
                        f"{cfg.query_pre_attn_scalar} differs from head_dim {head_dim}")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UserError("--gguf: a bidirectional Gemma-3 is not a causal decoder")
    w.add_rope_freq_base(_rope(cfg, "full_attention"))
    types = list(getattr(cfg, "layer_types", None) or [])
    if cfg.sliding_window and "sliding_attention" in types:
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        w.add_rope_freq_base_swa(_rope(cfg, "sliding_attention"))
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)


def _vocabulary(w: Any, model: Any, token_ids: list[int]) -> None:
    """The SLM's ids as a SentencePiece-style vocabulary of the tokenizer's texts (llama.cpp needs one to load;
    it never tokenizes with it here). Texts a tokenizer lacks or repeats get a placeholder naming the id."""
    import gguf

    tok = model.target_tokenizer
    texts = tok.convert_ids_to_tokens(token_ids) if tok is not None else [None] * len(token_ids)
    special = set(getattr(tok, "all_special_ids", []) or [])
    seen: set[str] = set()
    tokens, types = [], []
    for i, text in zip(token_ids, texts):
        if not text or text in seen:
            text = f"<llm2slm-token-{i}>"
        seen.add(text)
        tokens.append(text)
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    c = model.config
    slm_id = {t: i for i, t in enumerate(token_ids)}
    for add, tid in ((w.add_eos_token_id, c.eos_token_id), (w.add_pad_token_id, c.pad_token_id),
                     (w.add_bos_token_id, getattr(tok, "bos_token_id", None)),
                     (w.add_unk_token_id, (c.trim_vocab or {}).get("unknown", getattr(tok, "unk_token_id", None)))):
        if tid is not None and tid in slm_id:
            add(slm_id[tid])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def _quantize(source: Path, path: Path, quantization: str, threads: int) -> None:
    import llama_cpp
    from llama_cpp import _logger

    _logger.logger.setLevel(logging.CRITICAL)  # llama.cpp logs every tensor it quantizes (llama_backend._library)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _LLAMA_FTYPES[quantization]
    params.nthread = max(1, threads)
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), params)
    if rc != 0:
        path.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not quantize the SLM to {quantization} (llama_model_quantize returned {rc})")


def read_metadata(path: Path) -> dict[str, Any]:
    """What the backend checks before loading a GGUF: its architecture, our id map and fingerprint (None where the
    file was not written by this module)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read the GGUF file ({e})", path=path) from None

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    return {"architecture": value("general.architecture"), "token_ids": value(TOKEN_IDS_KEY),
            "slm_fingerprint": value(FINGERPRINT_KEY), "file_type": value("general.file_type")}
