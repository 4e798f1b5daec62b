"""Code run the way a user without llm2slm runs it (`run_alone`): a fresh Python process that imports torch and
transformers only, in a directory of its own, offline, with its own cache for transformers' remote code; it fails if
any module of llm2slm_cli was imported after all. And the checkpoints such tests load (`random_checkpoint`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# "z" and "q" are not in the trimmed vocabularies: prompts carry tokens the SLM reads as its unknown token
PROMPTS = ["alpha beta gamma", "delta", "beta beta alpha delta gamma zzq", "gamma"]
KEPT_TEXT = "abcdefghilmnoprt "

PRELUDE = """\
import json
import sys

import torch

torch.set_num_threads(1)
ARGS = json.loads(sys.argv[1])
RESULT = {}


def new_ids(model, inputs, out, seq2seq):
    # each row's generated ids up to its end token (transformers returns the prompt first for a causal LM, the
    # decoder's start token first for a seq2seq model)
    out = out[:, 1:] if seq2seq else out[:, inputs["input_ids"].shape[1]:]
    g = model.generation_config
    rows = []
    for row in out.tolist():
        if g.eos_token_id in row:
            row = row[: row.index(g.eos_token_id)]
        while row and row[-1] == g.pad_token_id:
            row.pop()
        rows.append(row)
    return rows

"""
EPILOGUE = """
assert "llm2slm_cli" not in sys.modules
RESULT["imported_llm2slm_cli"] = sorted(m for m in sys.modules if m.split(".")[0] == "llm2slm_cli")
print(json.dumps(RESULT))
"""


def run_alone(code: str, workdir: Path, **args) -> dict:
    """Run `code` (it reads ARGS, fills RESULT; `new_ids` is defined) in a fresh Python in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "alone.py"
    script.write_text(PRELUDE + textwrap.dedent(code) + EPILOGUE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "hf-modules"),
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(script), json.dumps(args, default=str)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("imported_llm2slm_cli") == []  # transformers alone: llm2slm_cli was never imported
    return result


def random_checkpoint(path, slm: str, llm: str | None, *, layer: int | str = -1, trim: bool = False, seed: int = 0,
                      **build):
    """A checkpoint with every trained weight drawn at scale 0.5 (and the projector's feature statistics, with
    feature_norm="standardize"): responses that differ by prompt and run to the length limit, so that equal
    responses mean something (a tiny model trained for a few steps answers every prompt alike, often with nothing).
    `build`: LLMToSLM.build's options (fusion, tokenizer, feature_norm)."""
    import torch

    from llm2slm_cli import checkpoint
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM

    model = LLMToSLM.build(slm, FrozenLLM(llm, layer=layer) if llm else None, **build)
    tok = model.target_tokenizer
    if trim:
        kept = sorted(set(tok(KEPT_TEXT).input_ids) | set(tok.all_special_ids))
        model.trim_vocabulary(torch.tensor(kept), tok.unk_token_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if build.get("feature_norm") == "standardize":
            model.projector.feature_shift.copy_(torch.randn(model.projector.feature_shift.shape, generator=g))
            model.projector.feature_scale.copy_(torch.rand(model.projector.feature_scale.shape, generator=g) + 0.5)
    checkpoint.save(model, path)
    return path
