"""Loading LLMs and SLMs as a user names them: a hub id, a local directory, a GGUF file, or an architecture preset
(presets.py); their configs and tokenizers, the built-in tokenizers of the tiny presets, and which files hold their
weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm2slm_cli.artifacts import read_json_table, verify_checkpoint
from llm2slm_cli.errors import UserError
from llm2slm_cli.presets import preset

ModelKind = Literal["encoder-decoder", "encoder-only", "decoder-only"]

# Model types that have no autoregressive head worth using: their last layer is the LLM feature.
ENCODER_ONLY_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
                      "mpnet", "camembert", "modernbert"}
T5_TYPES = {"t5", "mt5", "umt5", "longt5"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


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
    if path.exists():
        raise UserError("not a model: expected a transformers model directory, a .gguf file, a hub id or "
                        "preset:NAME", path=spec)
    if looks_local(spec):
        raise UserError("no such directory", path=spec)
    return Source(spec, "hub", spec)


RUN_DIR = re.compile(r"final|step-\d+")  # the name of a checkpoint of `train`: final/ or step-NNNNNN/


def looks_local(spec: str) -> bool:
    """A spec that can only mean a local path, never a hub id ('name' or 'namespace/name'): it starts with '.', '/'
    or '~', holds a backslash or more than one '/', ends with '/', or its last part is a checkpoint's name."""
    parts = spec.split("/")
    return (spec.startswith((".", "/", "~")) or "\\" in spec or len(parts) > 2 or spec.endswith("/")
            or RUN_DIR.fullmatch(parts[-1]) is not None)


def refuse_float16(model_type: str | None, dtype: str | None, what: str,
                   fix: str = "use --dtype bfloat16 or float32") -> None:
    """T5-family weights were trained in bfloat16: in float16 their activations overflow to inf/NaN, and generation
    goes silently wrong. Refused for every T5 model, LLM or SLM, plain or inside a checkpoint."""
    if DTYPES.get(str(dtype), dtype) == "float16" and model_type in T5_TYPES:
        raise UserError(f"float16 is refused for T5-family models ({what}: their activations overflow to inf/NaN): "
                        f"{fix}")


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
        raise UserError(f"cannot read this GGUF file, damaged or not a model ({type(e).__name__}: {short_error(e)})",
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
        raise UserError(f"cannot load the model config of {spec!r} ({short_error(e)})") from None


def checkpoint_slm_config(directory: Path):
    """The transformers config of a checkpoint's SLM (slm_config.json), checked: a table with a model type that
    transformers knows."""
    from transformers import AutoConfig

    path = Path(directory) / "slm_config.json"
    base = read_json_table(path, "SLM config")
    model_type = base.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise UserError("the SLM config names no model_type (a damaged or foreign file)", path=path)
    try:
        return AutoConfig.for_model(model_type, **base)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the SLM config does not describe a model transformers knows ({short_error(e)})",
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


def auto_class(kind: ModelKind, *, with_head: bool):
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
    cls = auto_class(kind, with_head=with_head)
    dt = torch_dtype(dtype)
    encoder_cls = _encoder_class(config) if part == "encoder" else None
    if encoder_cls is not None and src.kind in ("dir", "hub"):
        try:
            return encoder_cls.from_pretrained(src.name, dtype=dt).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load {role} {spec!r} ({short_error(e)})") from None
    if encoder_cls is not None:
        return _encoder_of(load_model(spec, dtype=dtype, role=role), encoder_cls)
    if src.kind == "preset":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # fresh weights, the same on every machine
            model = cls.from_config(config)
        model = model.to(dt)
    elif src.kind == "checkpoint":
        from safetensors.torch import load_file

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
            raise UserError(f"cannot load {role} {spec!r} ({short_error(e)})") from None
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


def short_error(e: Exception) -> str:
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
        raise UserError(f"cannot load the tokenizer of {spec!r} ({short_error(e)})") from None
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
            raise UserError(f"cannot find the weights of {spec!r} ({short_error(e)})") from None
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
        model = auto_class(model_kind(config), with_head=True).from_config(config)
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
