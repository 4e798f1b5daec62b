"""Peer runtimes as bench rows: CTranslate2 (a directory from ct2-transformers-converter) and llama.cpp (a GGUF file).

They are what a user after fast CPU decoding would otherwise pick, so they are timed by timing.measure exactly
like this toolkit's rows: random prompt ids of --prompt-length tokens, exactly --new-tokens new tokens (the end token
is suppressed until then), greedy, median of --repeats after --warmup, torch's thread count. Their weights are not
torch modules: no FLOPs are counted, and weights_mb is the size of their weight file. With --peer-source, the row's
greedy tokens are compared with this toolkit's greedy decoding of the source model in float32 (a check that both
sides run the same protocol on the same model).

Conversion (see docs/BENCHMARKS.md): `llm2slm convert preset:t5-small --out DIR` (or any model's save_pretrained
directory with its tokenizer), then `ct2-transformers-converter --model DIR --output_dir OUT --quantization int8`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm2slm_cli import loading as M
from llm2slm_cli.bench import timing as B
from llm2slm_cli.bench.timing import Unsupported
from llm2slm_cli.errors import UserError, require_extra

# each runtime's module -> its extra in pyproject.toml, and what to know before installing it
EXTRAS = {"ctranslate2": ("ctranslate2", ""), "llama_cpp": ("llama-cpp", " (it compiles llama.cpp: minutes)")}
ENGINES = {"ctranslate2": "ctranslate2", "llama_cpp": "llama.cpp"}
CT2_VOCABULARIES = ("shared_vocabulary.json", "target_vocabulary.json", "vocabulary.json")


def require(module: str, option: str) -> None:
    """A missing peer runtime is one line naming the install command (checked before anything is loaded)."""
    extra, note = EXTRAS[module]
    require_extra(option, extra, module, note=note)


def check_ct2_directory(label: str, directory: Path) -> None:
    if not (directory / "model.bin").is_file() or not (directory / "config.json").is_file():
        raise UserError(f"--ctranslate2 {label}: {directory} is not a CTranslate2 model directory (no model.bin and "
                        "config.json): convert one with ct2-transformers-converter --model DIR --output_dir OUT",
                        path=directory)
    if not any((directory / name).is_file() for name in CT2_VOCABULARIES):
        raise UserError(f"--ctranslate2 {label}: no vocabulary file ({', '.join(CT2_VOCABULARIES)})", path=directory)


def check_gguf_file(label: str, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"--llama-cpp {label}: no such file", path=path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"--llama-cpp {label}: not a GGUF file", path=path)


class CT2Model:
    """A CTranslate2 model: a Translator for encoder-decoder models, a Generator for decoder-only ones."""

    engine = "ctranslate2"

    def __init__(self, directory: Path, compute_type: str, device: Any, threads: int) -> None:
        import ctranslate2

        self.directory = Path(directory)
        names = [n for n in CT2_VOCABULARIES if (self.directory / n).is_file()]
        self.vocabulary: list[str] = json.loads((self.directory / names[0]).read_text())
        self.index = {token: i for i, token in enumerate(self.vocabulary)}
        self.seq2seq = names[0] != "vocabulary.json"
        cls = ctranslate2.Translator if self.seq2seq else ctranslate2.Generator
        ct2_device = ("cuda" if getattr(device, "type", "cpu") == "cuda" and ctranslate2.get_cuda_device_count()
            else "cpu")
        try:
            self.model = cls(str(self.directory), device=ct2_device, compute_type=compute_type,
                             intra_threads=threads, inter_threads=1)
        except (RuntimeError, ValueError) as e:  # a compute type this device lacks, a damaged model.bin
            raise UserError(f"CTranslate2 cannot load {self.directory} with --ct2-compute-type {compute_type} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        config = json.loads((self.directory / "config.json").read_text())
        self.special_ids = {self.index[t] for k in ("bos_token", "eos_token", "unk_token", "decoder_start_token")
                            if isinstance(t := config.get(k), str) and t in self.index}
        self.vocab_size = len(self.vocabulary)
        self.file_bytes = (self.directory / "model.bin").stat().st_size
        self.version = ctranslate2.__version__
        self.device = ct2_device

    def generate_ids(self, prompts: list[list[int]], n: int, num_beams: int) -> list[list[int]]:
        """Exactly n new token ids per prompt (the end token is allowed only from the n+1th on), greedy or beam."""
        tokens = [[self.vocabulary[i] for i in ids] for ids in prompts]
        if self.seq2seq:
            results = self.model.translate_batch(tokens, beam_size=num_beams, min_decoding_length=n,
                                                 max_decoding_length=n, max_input_length=0)
            return [[self.index[t] for t in r.hypotheses[0]] for r in results]
        results = self.model.generate_batch(tokens, beam_size=num_beams, sampling_topk=1, min_length=n, max_length=n,
                                            include_prompt_in_result=False)
        return [list(r.sequences_ids[0]) for r in results]


class LlamaCppModel:
    """A GGUF file run by llama.cpp (llama-cpp-python), greedy: each step the argmax of the last logits, the end
    token excluded; one sequence at a time."""

    engine = "llama.cpp"

    def __init__(self, path: Path, threads: int, context: int) -> None:
        import llama_cpp

        self.path = Path(path)
        try:
            self.model = llama_cpp.Llama(model_path=str(self.path), n_ctx=context, n_batch=min(context, 512),
                                         n_threads=threads, n_threads_batch=threads, verbose=False)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"llama.cpp cannot load {self.path} ({str(e).splitlines()[0] if str(e) else e!r})",
                            path=self.path) from None
        self.vocab_size = self.model.n_vocab()
        self.special_ids = {i for i in (self.model.token_bos(), self.model.token_eos()) if i is not None and i >= 0}
        self.banned = sorted(i for i in (self.model.token_eos(),) if i is not None and i >= 0)
        self.file_bytes = self.path.stat().st_size
        self.version = llama_cpp.__version__
        self.device = "cpu"

    def generate_ids(self, prompts: list[list[int]], n: int, num_beams: int) -> list[list[int]]:
        import numpy as np

        if len(prompts) != 1:
            raise Unsupported("llama.cpp rows take batch size 1")
        if num_beams != 1:
            raise Unsupported("llama.cpp rows are greedy, not beam search")
        llm, out = self.model, []
        llm.reset()
        llm.eval(list(prompts[0]))
        for step in range(n):
            # the last position's logits, from the context itself: with logits_all off (its default, and what a
            # user runs) llama-cpp-python 0.3.36 leaves `scores` at zero, so argmax would read token 0 every step
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(self.vocab_size,)).copy()
            logits[self.banned] = -np.inf
            token = int(np.argmax(logits))
            out.append(token)
            if step + 1 < n:  # like the other rows: no forward pass after the last token
                llm.eval([token])
        return [out]


def peer_generate(model: CT2Model | LlamaCppModel, tokens: list[list[int]] | None = None):
    """A timing.GenerateFn for a peer model; `tokens`, when given, keeps the ids of the last call."""

    def run(ids, mask, **generation: Any) -> int:
        got = model.generate_ids(ids.tolist(), generation["max_new_tokens"], generation.get("num_beams", 1))
        if tokens is not None:
            tokens[:] = got
        return min(len(t) for t in got)

    return run


def load_peer(plan: Any, device: Any, context: int):
    import torch

    if plan.engine == "ctranslate2":
        return CT2Model(plan.path, plan.compute_type, device, torch.get_num_threads())
    return LlamaCppModel(plan.path, torch.get_num_threads(), context)


def peer_row(plan: Any, model: CT2Model | LlamaCppModel, tokenizer: Any = None):
    return B.Row(plan.label, plan.role, None, plan.slm, peer_generate(model), [], model.vocab_size, model.special_ids,
                 tokenizer=tokenizer, engine=model.engine, file_bytes=model.file_bytes)


def greedy_check(model: CT2Model | LlamaCppModel, reference: str, ids: Any, new_tokens: int) -> dict[str, Any]:
    """The peer's greedy tokens against this toolkit's greedy decoding (decoding.decode) of `reference` in float32,
    on one prompt: equal, and how many leading tokens agree."""
    from llm2slm_cli.decoding import generate_plain, search_from  # imports torch: off the import of this module

    theirs = model.generate_ids(ids.tolist(), new_tokens, 1)[0]
    ours_model = M.load_model(reference, dtype="float32", role="reference").eval()
    gen = ours_model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else ours_model.config.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else ours_model.config.pad_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    search = search_from(B.generation_kwargs(new_tokens, 1), gen, eos=eos, pad=pad if pad is not None else eos,
                         device=ids.device)
    if search is None:
        raise UserError(f"--peer-source {reference}: decoding.decode cannot decode it greedily with its generation "
                        "config")
    ours = generate_plain(ours_model.to(ids.device), ids, ids.new_ones(ids.shape), search)[0].tolist()
    same = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    return {"reference": reference, "dtype": "float32", "prompt_length": ids.shape[1], "new_tokens": new_tokens,
            "equal": theirs == ours, "same_prefix_tokens": same}
