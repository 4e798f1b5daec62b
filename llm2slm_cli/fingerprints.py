"""Fingerprints: which vocabulary a tokenizer has, which weights a loaded model holds, and which weights a model
spec names (from its files alone, without loading it)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from llm2slm_cli import artifacts as A
from llm2slm_cli.artifacts import sha256_file
from llm2slm_cli.loading import DTYPES, resolve, weight_files
from llm2slm_cli.presets import preset


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


def _file_sha256(path: Path) -> str:
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
