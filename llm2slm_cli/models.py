"""Loading LLMs and SLMs as a user names them: a hub id, a local directory, a GGUF file, or an architecture preset.

Presets (`preset:t5-large`, `tiny-t5`, ...) build a model from its published shape with fresh weights drawn from a
fixed seed, so the same preset gives the same weights (and fingerprint) on every machine: exact for speed and
memory measurements, and the way the tests get models without a download. Tiny presets carry built-in tokenizers;
paper-shape presets take the tokenizer of the model they copy (hub access or `--tokenizer DIR`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llm2slm_cli.errors import UserError

ModelKind = Literal["encoder-decoder", "encoder-only", "decoder-only"]

# Model types that have no autoregressive head worth using: their last layer is the LLM feature.
ENCODER_ONLY_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
                      "mpnet", "camembert", "modernbert"}
T5_TYPES = {"t5", "mt5", "umt5", "longt5"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


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


@dataclass(frozen=True)
class Source:
    """Where a model spec points."""

    spec: str
    kind: Literal["preset", "gguf", "dir", "checkpoint", "hub"]
    name: str  # preset name, path, or hub id


def resolve(spec: str) -> Source:
    if spec.startswith("preset:"):
        name = spec.removeprefix("preset:")
        preset(name)
        return Source(spec, "preset", name)
    if spec.startswith("tiny-") and not Path(spec).exists():
        preset(spec)
        return Source(f"preset:{spec}", "preset", spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError("no such GGUF file", path=spec)
        _check_gguf_header(path)
        return Source(spec, "gguf", str(path.resolve()))
    if path.is_dir() and (path / "llm2slm.json").is_file():
        # A model trained alone by `train` (no --llm) serves as a plain model, e.g. a fine-tuned LLM.
        from llm2slm_cli.artifacts import read_json_table

        recorded = read_json_table(path / "llm2slm.json", "checkpoint config")
        if recorded.get("llm") is not None:
            raise UserError("is an LLM-to-SLM checkpoint; only a model trained without --llm can be used as a "
                            "plain model here", path=spec)
        if recorded.get("peft") is not None:
            raise UserError("is a PEFT baseline (train --peft): its adapter only works through the checkpoint "
                            "itself (generate/bench --model DIR), not as a plain model here", path=spec)
        return Source(spec, "checkpoint", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError("directory has no config.json: not a transformers model directory", path=spec)
        return Source(spec, "dir", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise UserError("not a model: expected a transformers model directory, a .gguf file, a hub id or "
                        "preset:NAME", path=spec)
    return Source(spec, "hub", spec)


def refuse_float16(model_type: str | None, dtype: str | None, what: str,
                   fix: str = "use --dtype bfloat16 or float32") -> None:
    """T5-family weights were trained in bfloat16: in float16 their activations overflow to inf/NaN, and generation
    goes silently wrong. Refused for every T5 model, LLM or SLM, plain or inside a checkpoint."""
    if DTYPES.get(str(dtype), dtype) == "float16" and model_type in T5_TYPES:
        raise UserError(f"float16 is refused for T5-family models ({what}: their activations overflow to inf/NaN): "
                        f"{fix}")


def preset_model_type(spec: str) -> str | None:
    """The model type of a preset spec, without reading any file (None for other specs)."""
    name = spec.removeprefix("preset:")
    if not (spec.startswith("preset:") or (spec.startswith("tiny-") and not Path(spec).exists())):
        return None
    try:
        return preset(name).model_type
    except UserError:
        return None


def _check_gguf_header(path: Path) -> None:
    """The fixed 24-byte header of a GGUF file (magic, version, tensor and metadata counts): a foreign or cut file is
    a one-line error here, not a parser's traceback later."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror or e})", path=path) from None
    if head[:4] != b"GGUF":
        raise UserError("not a GGUF file (it does not start with the bytes 'GGUF')", path=path)
    if len(head) < 24:
        raise UserError(f"truncated GGUF file: {len(head)} bytes, shorter than its 24-byte header", path=path)
    version = int.from_bytes(head[4:8], "little")
    if version not in (1, 2, 3):
        raise UserError(f"GGUF version {version} is not supported (1 to 3 are)", path=path)


def _from_gguf(path: Path, load):
    """`load()` a model, config or tokenizer from a GGUF file; the parser's many failures on a damaged file (struct
    errors, missing keys, bad tensors) are one user error naming it."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001 -- whatever a damaged file makes the parser raise
        raise UserError(f"cannot read this GGUF file, damaged or not a model ({type(e).__name__}: {_short(e)})",
                        path=path) from None


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return getattr(torch, DTYPES[name])


def load_config(spec: str):
    """The model's transformers config, without loading weights."""
    from transformers import AutoConfig

    src = resolve(spec)
    if src.kind == "preset":
        p = preset(src.name)
        return AutoConfig.for_model(p.model_type, **p.config)
    if src.kind == "checkpoint":
        return checkpoint_slm_config(Path(src.name))
    try:
        if src.kind == "gguf":
            path = Path(src.name)
            return _from_gguf(path, lambda: AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))
        return AutoConfig.from_pretrained(src.name)
    except OSError as e:
        raise UserError(f"cannot load the model config of {spec!r} ({_short(e)})") from None


def checkpoint_slm_config(directory: Path):
    """The transformers config of a checkpoint's SLM (slm_config.json), checked: a table with a model type that
    transformers knows."""
    from transformers import AutoConfig

    from llm2slm_cli.artifacts import read_json_table

    path = Path(directory) / "slm_config.json"
    base = read_json_table(path, "SLM config")
    model_type = base.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise UserError("the SLM config names no model_type (a damaged or foreign file)", path=path)
    try:
        return AutoConfig.for_model(model_type, **base)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the SLM config does not describe a model transformers knows ({_short(e)})",
                        path=path) from None


def model_kind(config) -> ModelKind:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if config.model_type in ENCODER_ONLY_TYPES:
        return "encoder-only"
    return "decoder-only"


def hidden_size(config) -> int:
    for name in ("d_model", "hidden_size", "n_embd"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise UserError(f"cannot tell the hidden size of a {config.model_type} model")


def num_layers(config) -> int:
    for name in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise UserError(f"cannot tell the number of layers of a {config.model_type} model")


def set_dropout(model, p: float) -> int:
    """Every dropout of a transformers model set to `p`: its nn.Dropout layers, and the rate its attention layers keep
    as a float (`dropout` in T5, `attention_dropout` in Llama/Gemma/Qwen; GPT2 reads its attn_dropout layer's p).
    PEFT's own dropouts (lora_dropout: --peft-lora-dropout) are left alone. Returns how many were set."""
    import torch.nn as nn

    n = 0
    for name, module in model.named_modules():
        if "lora_" in name:
            continue
        if isinstance(module, nn.Dropout):
            module.p = p
            n += 1
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, p)
                n += 1
    return n


def truncate_layers(model, layers: int | list[int], spec: str) -> None:
    """Keep some layers of `model` with their weights, in place: the first d (an int; paper Figure 4: GPT2 cut to 1,
    2, 4 layers) or the blocks at the given indices, in order (a list; negative counts from the end, e.g. [0, 1, -1]:
    the first two and the last, so the kept last block still writes into the space the head reads).

    Decoder-only: those blocks. Encoder-decoder: those blocks of the encoder and of the decoder (T5: block 0, which
    holds the relative position bias, must be kept). Embeddings, final norms and the head stay. The config's layer
    counts (and per-layer attention kinds) follow and each kept block is renumbered, so a checkpoint rebuilds the
    same shape and the KV cache sees consecutive layers."""
    from torch import nn

    config = model.config
    if model_kind(config) == "encoder-decoder":
        if config.model_type not in T5_TYPES:
            raise UserError(f"--slm-layers supports T5-family encoder-decoder SLMs, not {config.model_type!r}")
        stacks = [(model.get_encoder().block, "num_layers"), (model.get_decoder().block, "num_decoder_layers")]
    else:
        n = num_layers(config)
        lists = [m for m in model.base_model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        if not lists:
            raise UserError(f"cannot find the layer list of {spec!r} to keep {layers} of its layers")
        stacks = [(lists[0], "num_hidden_layers")]  # GPT2 maps num_hidden_layers to n_layer
    depth = min(len(blocks) for blocks, _ in stacks)
    if isinstance(layers, int):
        if not 1 <= layers <= depth:
            raise UserError(f"--slm-layers {layers}: the SLM {spec!r} has {depth} layers")
        keep = list(range(layers))
    else:
        keep = [i + depth if i < 0 else i for i in layers]
        if not keep or any(not 0 <= i < depth for i in keep) or keep != sorted(set(keep)):
            raise UserError(f"--slm-layers {','.join(map(str, layers))}: give distinct block indices in increasing "
                            f"order, each in [-{depth}, {depth - 1}] (the SLM {spec!r} has {depth} layers)")
        if model_kind(config) == "encoder-decoder" and keep[0] != 0:
            raise UserError("--slm-layers: a T5 SLM must keep block 0 (it holds the relative position bias)")
    for blocks, key in stacks:
        kept = [blocks[i] for i in keep]
        del blocks[:]
        for new, block in enumerate(kept):
            for m in block.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new
            blocks.append(block)
        setattr(config, key, len(keep))
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Gemma, Qwen, ...)
        config.layer_types = [config.layer_types[i] for i in keep]


def parse_slm_layers(text: str | int | list[int] | None) -> int | list[int] | None:
    """--slm-layers: "d" (the first d) or "i,j,k" (those blocks; negative counts from the end)."""
    if text is None or isinstance(text, (int, list)):
        return text
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"--slm-layers takes a number of layers or comma-separated block indices, got {text!r}")
    if "," not in str(text):
        if values[0] <= 0:
            raise UserError(f"--slm-layers must be positive, got {values[0]}")
        return values[0]
    return values


def keep_vocabulary(model, kept) -> None:
    """Keep only the embedding and output-head rows of the token ids in `kept` (a sorted LongTensor), in place, in
    that order: new id i is old id kept[i]. Tied heads stay tied; the embedding module (e.g. Gemma's scaled one)
    stays the same class."""
    from torch import nn

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    sharing = _sharing(model, emb)
    old_pad = emb.padding_idx
    emb.weight = nn.Parameter(emb.weight.data[kept].clone(), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = len(kept)
    if old_pad is not None:
        where = (kept == old_pad).nonzero()
        emb.padding_idx = int(where[0, 0]) if len(where) else None
    _share(sharing, emb)
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(head.weight.data[kept].clone(), requires_grad=head.weight.requires_grad)
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias.data[kept].clone(), requires_grad=head.bias.requires_grad)
        head.out_features = len(kept)
    model.config.vocab_size = len(kept)
    text = getattr(model.config, "text_config", None)
    if text is not None and hasattr(text, "vocab_size"):
        text.vocab_size = len(kept)


def _sharing(model, emb) -> list:
    """The other embedding modules that read `emb`'s table: T5's encoder and decoder `embed_tokens` share the
    weight of `shared` (tied, not the same module), so replacing only `shared.weight` would leave them the old
    table, indexed by new ids."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not emb and
            getattr(m, "weight", None) is emb.weight]


def _share(modules: list, emb) -> None:
    for m in modules:
        m.weight = emb.weight
        m.num_embeddings = emb.num_embeddings
        m.padding_idx = emb.padding_idx


def widen_vocabulary(model, kept, full: int, *, fill: int) -> None:
    """Undo keep_vocabulary for a model that must read and score the full vocabulary (a draft for transformers'
    assisted generation), in place: row kept[i] gets new row i; other input rows copy row `fill` (the unknown
    token, as trimmed models read them); the head scores other tokens -1e4 through a bias, so they are never picked.
    The head is untied from the input embedding."""
    import torch
    from torch import nn

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = emb.weight.data
    rows = weight[fill].expand(full, -1).clone()
    rows[kept] = weight
    out = nn.Linear(weight.shape[1], full, bias=True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[kept] = head.weight.data
        out.bias.fill_(-1e4)
        out.bias[kept] = head.bias.data if getattr(head, "bias", None) is not None else 0.0
    sharing = _sharing(model, emb)
    emb.weight = nn.Parameter(rows, requires_grad=False)
    emb.num_embeddings = full
    _share(sharing, emb)
    model.set_output_embeddings(out)
    model.config.tie_word_embeddings = False
    model.config.vocab_size = full
    text = getattr(model.config, "text_config", None)
    if text is not None and hasattr(text, "vocab_size"):
        text.vocab_size = full


def _auto_class(kind: ModelKind, *, with_head: bool):
    import transformers as tf

    if kind == "encoder-decoder":
        return tf.AutoModelForSeq2SeqLM
    if kind == "encoder-only":
        return tf.AutoModel
    return tf.AutoModelForCausalLM if with_head else tf.AutoModel


def load_model(spec: str, *, dtype: str = "float32", with_head: bool = True, role: str = "model",
               part: Literal["all", "encoder"] = "all"):
    """Load a model in eval mode. Decoder-only models load with their LM head unless `with_head` is False.

    `part="encoder"`: of a T5-family encoder-decoder model, only the encoder (T5EncoderModel, which reads only the
    encoder's tensors from the weight files); a preset or checkpoint is built whole (its weights are defined by the
    whole model) and its decoder dropped. Other models load whole."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our stages show their own progress; a bar per weight file is noise
    src = resolve(spec)
    config = load_config(spec)
    refuse_float16(config.model_type, dtype, f"{role} {spec!r}")
    kind = model_kind(config)
    cls = _auto_class(kind, with_head=with_head)
    dt = torch_dtype(dtype)
    encoder_cls = _encoder_class(config) if part == "encoder" else None
    if encoder_cls is not None and src.kind in ("dir", "hub"):
        try:
            return encoder_cls.from_pretrained(src.name, dtype=dt).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load {role} {spec!r} ({_short(e)})") from None
    if encoder_cls is not None:
        return _encoder_of(load_model(spec, dtype=dtype, role=role), encoder_cls)
    if src.kind == "preset":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # fresh weights, the same on every machine
            model = cls.from_config(config)
        model = model.to(dt)
    elif src.kind == "checkpoint":
        from safetensors.torch import load_file

        from llm2slm_cli.artifacts import verify_checkpoint

        verify_checkpoint(Path(src.name))  # never a damaged checkpoint's weights, loaded without a word
        model = cls.from_config(config)
        weights = load_file(str(Path(src.name) / "model.safetensors"))
        missing, unexpected = model.load_state_dict({k.removeprefix("slm."): v for k, v in weights.items()},
                                                    strict=False)
        tied = model._tied_weights_keys or {}
        tied = set(tied) | set(tied.values()) if isinstance(tied, dict) else set(tied)
        if unexpected or any(k not in tied for k in missing):
            raise UserError(f"weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})",
                            path=src.name)
        model.tie_weights()
        model = model.to(dt)
    else:
        try:
            if src.kind == "gguf":
                path = Path(src.name)
                model = _from_gguf(path, lambda: cls.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dt))
            else:
                model = cls.from_pretrained(src.name, dtype=dt)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load {role} {spec!r} ({_short(e)})") from None
    return model.eval()


def _encoder_class(config):
    """The encoder-only class of a T5-family config (None for other models)."""
    import transformers as tf

    name = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
            "longt5": "LongT5EncoderModel"}.get(config.model_type)
    return getattr(tf, name, None) if name and model_kind(config) == "encoder-decoder" else None


def _encoder_of(full, encoder_cls):
    """The encoder of a whole encoder-decoder model as `encoder_cls`, sharing its tensors; the decoder is dropped."""
    import torch

    with torch.device("meta"):
        encoder = encoder_cls(full.config)
    wanted = encoder.state_dict().keys()
    encoder.load_state_dict({k: v for k, v in full.state_dict().items() if k in wanted}, strict=True, assign=True)
    encoder.tie_weights()
    return encoder.eval()


def save_plain(model, directory: Path) -> None:
    """Save a model as a plain transformers directory. A GGUF-loaded model carries a quantization config that
    `save_pretrained` refuses; its dequantized weights go into a fresh model of the same config without it."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None or hasattr(config, "gguf_file"):
        import copy

        config = copy.deepcopy(config)
        for name in ("quantization_config", "gguf_file"):
            if hasattr(config, name):
                delattr(config, name)
        fresh = type(model)(config).to(next(model.parameters()).dtype)
        fresh.load_state_dict(model.state_dict(), strict=True)
        fresh.generation_config = model.generation_config
        model = fresh
    model.save_pretrained(str(directory))


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def load_tokenizer(spec: str, override: str | Path | None = None, *, local_only: bool = False,
                   option: str | None = "--tokenizer"):
    """The tokenizer of a model spec (or the one at `override`), with pad and eos tokens guaranteed.

    A paper-shape preset borrows its tokenizer from the hub cache (or the hub, unless `local_only`); where that
    fails, the error names `option`, the command's option that gives this model's tokenizer (None: it has none)."""
    from transformers import AutoTokenizer

    src = resolve(spec)
    try:
        if override is not None:
            tok = _tokenizer_from_dir(Path(override))
        elif src.kind == "preset":
            p = preset(src.name)
            if p.tokenizer.startswith("builtin:"):
                tok = builtin_tokenizer(p.tokenizer.removeprefix("builtin:"))
            else:
                try:
                    try:
                        tok = AutoTokenizer.from_pretrained(p.tokenizer, local_files_only=True)
                    except OSError:
                        if local_only:
                            raise
                        tok = AutoTokenizer.from_pretrained(p.tokenizer)
                except OSError:
                    raise UserError(f"preset {src.name!r} uses the tokenizer of {p.tokenizer!r}, which cannot be "
                                    "loaded here (offline?): " + (f"pass {option} DIR" if option else
                                    "this command takes no tokenizer option: load it once with network access "
                                    "(it is cached), or give a model directory with its tokenizer files")) from None
        elif src.kind == "gguf":
            path = Path(src.name)
            tok = _from_gguf(path, lambda: AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
        elif src.kind == "checkpoint":
            tok = AutoTokenizer.from_pretrained(str(Path(src.name) / "tokenizer"))
        else:
            tok = AutoTokenizer.from_pretrained(src.name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {spec!r} ({_short(e)})") from None
    return ensure_special_tokens(tok)


def _tokenizer_from_dir(path: Path):
    """A tokenizer directory, or the bare files of one: a SentencePiece `spiece.model` (T5) or GPT-2's
    `vocab.json` + `merges.txt` -- the form these tokenizers are often distributed in."""
    from transformers import AutoTokenizer, GPT2Tokenizer, T5Tokenizer

    if not path.is_dir():
        raise UserError("no such tokenizer directory", path=path)
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    if (path / "spiece.model").is_file():
        return T5Tokenizer.from_pretrained(str(path))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return GPT2Tokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def ensure_special_tokens(tok):
    """Every tokenizer used here needs an end token (targets end with it) and a padding token."""
    if tok.eos_token_id is None:
        if tok.sep_token_id is None:
            raise UserError(f"tokenizer {tok.name_or_path!r} has neither an eos nor a sep token")
        tok.eos_token = tok.sep_token  # BERT family: [SEP] ends a sequence
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tok) -> str:
    """Identity of a vocabulary: equal fingerprints mean token ids mean the same strings."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(repr(vocab).encode()).hexdigest()


def state_fingerprint(model) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes and bytes): which weights these are."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------- which weights, from the files alone


_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def weight_files(spec: str) -> list[Path]:
    """The files a model's weights are read from, as `load_model` reads them (safetensors first, else PyTorch
    .bin; one file or the shards an index names); [] for a preset. A hub id's files come from the Hugging Face cache,
    downloaded if they are not there yet."""
    import json

    src = resolve(spec)
    if src.kind == "preset":
        return []
    if src.kind == "gguf":
        return [Path(src.name)]
    if src.kind == "checkpoint":
        return [Path(src.name) / "model.safetensors"]

    def find(filename: str) -> Path | None:
        if src.kind == "dir":
            return Path(src.name) / filename if (Path(src.name) / filename).is_file() else None
        from transformers.utils import cached_file

        try:
            found = cached_file(src.name, filename, _raise_exceptions_for_missing_entries=False)
        except OSError as e:
            raise UserError(f"cannot find the weights of {spec!r} ({_short(e)})") from None
        return Path(found) if found else None

    for single, index in _WEIGHT_FILES:
        if (path := find(single)) is not None:
            return [path]
        if (path := find(index)) is not None:
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError):
                raise UserError("unreadable weights index", path=path) from None
            files = [find(name) for name in shards]
            missing = [name for name, f in zip(shards, files) if f is None]
            if missing:
                raise UserError(f"the weights index names {missing[0]}, which is not there", path=path)
            return files
    raise UserError(f"cannot find the weights of {spec!r} (no model.safetensors or pytorch_model.bin)")


def _file_sha256(path: Path) -> str:
    from llm2slm_cli.artifacts import sha256_file

    real = Path(path).resolve()
    # the hub cache names each large (LFS) file by its sha256: no need to read gigabytes to learn it
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    return sha256_file(real)


def weights_fingerprint(spec: str, dtype: str = "float32") -> str:
    """Which weights, in which dtype, a model spec names: the sha256 of its weight files (`weight_files`), never of
    the loaded tensors, so it is known without loading the model. A preset's weights are drawn from a fixed seed: its
    name, shape and the transformers version that draws them stand for them. A copy of an LLM that `export` bundled
    (DIR/llm) is the LLM it copied while its files are the ones export wrote (A.BUNDLED_LLM_IDENTITY)."""
    import json

    from llm2slm_cli import artifacts as A

    src = resolve(spec)
    dtype = DTYPES.get(dtype, dtype)
    if src.kind == "preset":
        import transformers

        p = preset(src.name)
        return A.sha256_json({"dtype": dtype, "preset": src.name, "model_type": p.model_type, "config": p.config,
                              "seed": 0, "transformers": transformers.__version__})
    files = {f.name: _file_sha256(f) for f in weight_files(spec)}
    marker = Path(src.name) / A.BUNDLED_LLM_IDENTITY if src.kind == "dir" else None
    if marker is not None and marker.is_file():
        try:
            copied = json.loads(marker.read_text())
        except (OSError, ValueError):
            copied = None
        if isinstance(copied, dict) and copied.get("files") == files and copied.get("dtype") == dtype:
            return str(copied["fingerprint"])
    return A.sha256_json({"dtype": dtype, "files": files})


def input_embedding_rows(spec: str, dtype: str = "float32"):
    """A model's input embedding matrix alone, read from the safetensors file that holds it (no model is built or
    loaded), in `dtype`; None where the weights are not safetensors files (presets, GGUF, .bin)."""
    import torch
    from safetensors import safe_open

    src = resolve(spec)
    if src.kind in ("preset", "gguf"):
        return None
    files = weight_files(spec)
    if not all(f.suffix == ".safetensors" for f in files):
        return None
    config = load_config(spec)
    with torch.device("meta"):  # only for the parameter's name: no memory, no initialisation
        model = _auto_class(model_kind(config), with_head=True).from_config(config)
    weight = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is weight)
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    names = [name, name.removeprefix(prefix), prefix + name]  # files are saved with or without the base's prefix
    if src.kind == "checkpoint":
        names = [f"slm.{n}" for n in names]
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for n in names:
                if n in keys:
                    return st.get_tensor(n).to(torch_dtype(dtype))
    return None


def builtin_tokenizer(name: str):
    """Small tokenizers built in code for the tiny presets: bytes (all text, 260 ids) or a character WordPiece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if name.startswith("bytes"):
        specials = ["<pad>", "</s>", "<unk>", "<s>"]
        byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
        byte_chars.sort(key=lambda c: _BYTE_ORDER[c])
        vocab = {t: i for i, t in enumerate(specials + byte_chars)}
        # T5-like tokenizers end a prompt with </s>; Llama-like ones start it with <s>; GPT2 adds nothing.
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(specials)
        if name == "bytes-t5":
            tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        elif name == "bytes-llama":
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                       unk_token="<unk>", bos_token="<s>")
    elif name == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        chars = [chr(c) for c in range(33, 127)]
        vocab = {t: i for i, t in enumerate(specials + chars + ["##" + c for c in chars])}
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=200))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        raise UserError(f"unknown built-in tokenizer {name!r}")
    fast.name_or_path = f"builtin:{name}"
    return ensure_special_tokens(fast)


def _byte_order() -> dict[str, int]:
    from tokenizers import pre_tokenizers  # noqa: F401  (keeps the import local to where bytes are needed)

    # GPT2's byte-to-unicode table: printable bytes map to themselves, the rest to 256 + n, in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_ORDER = _byte_order()
