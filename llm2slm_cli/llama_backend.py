"""LLM-to-SLM decoded by llama.cpp (`--backend llama-cpp`): the frozen LLM's prompt pass and the projector run in
torch, every decoding step in llama.cpp.

The checkpoint builds the fused prompt P = q(f(X)) + E_X exactly as our own loop does (LLMToSLM.prompt_embeddings,
so Gemma's sqrt(d) embedding scale is already in E_X); P goes into one llama.cpp batch as embeddings (`embd`,
which llama.cpp's gemma3 graph does not scale again), each prompt its own sequence at positions 0..m-1; the last
position's logits give the first token, and from then on every step is a batch of token ids, one per unfinished
row, decoded by llama.cpp over its own KV cache. Greedy or sampled as decoding.decode does it (its bans and
warpers): the end token is banned before `min_new_tokens`, suppressed ids never come, a row ends at the end token (or
when the streamer stops it), and the ids are the SLM's own (a trimmed vocabulary's), mapped back to the tokenizer's
at the end. Beam search and the repetition controls stay with our loop (--backend torch).

The GGUF is `export --gguf`'s (gguf_export.py): its id map and weights fingerprint are checked against the
checkpoint before anything runs. A float32 GGUF gets a float32 KV cache (what our float32 loop keeps), others
llama.cpp's default float16 one.

torch is imported inside the functions that use it; llama_cpp only where a model is opened."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import gguf_export
from llm2slm_cli.errors import UserError, require_extra
from llm2slm_cli.padding import strip_generated

BACKENDS = ("torch", "llama-cpp")
DEFAULT_GGUF = "slm.gguf"  # where `export --gguf` puts it, and where --backend llama-cpp looks without --gguf


def require() -> None:
    require_extra("--backend llama-cpp", "llama-cpp", "llama_cpp", note=" (it compiles llama.cpp: minutes)")


def gguf_path(model_dir: str | Path, gguf: str | Path | None) -> Path:
    """--gguf, else the checkpoint directory's slm.gguf (an `export --gguf` directory); refused when neither is."""
    path = Path(gguf) if gguf is not None else Path(model_dir) / DEFAULT_GGUF
    if not path.is_file():
        hint = "" if gguf is not None else (f" (no --gguf given, and {Path(model_dir)} has no {DEFAULT_GGUF}: "
                                            "`llm2slm export CKPT --gguf Q8_0 --out DIR` writes one)")
        raise UserError(f"--backend llama-cpp: no such GGUF file{hint}", path=path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError("--gguf: not a GGUF file", path=path)
    return path


class LlamaCppSLM:
    """An LLMToSLM whose decoding steps run in llama.cpp; `generate` as LLMToSLM.generate (greedy or sampling)."""

    def __init__(self, model: Any, path: Path, *, threads: int | None = None) -> None:
        import numpy as np

        require()
        gguf_export.refuse_unexportable(model, "--backend llama-cpp")
        self.path = Path(path)
        meta = gguf_export.read_metadata(self.path)
        rows = model.slm.get_input_embeddings().weight.shape[0]
        ours = [int(i) for i in model.tokenizer_ids(_arange(rows))]
        if meta["token_ids"] is None or meta["slm_fingerprint"] is None:
            raise UserError("--gguf: this GGUF was not written by `llm2slm export --gguf` (it has no id map back to "
                            "the tokenizer)", path=self.path)
        if list(meta["token_ids"]) != ours or meta["slm_fingerprint"] != gguf_export.slm_fingerprint(model):
            raise UserError("--gguf: this GGUF was exported from another checkpoint (its SLM weights or vocabulary "
                            "differ from the checkpoint's)", path=self.path)
        self.model = model
        self.config, self.slm, self.llm = model.config, model.slm, model.llm
        self.prompt_tokenizer, self.target_tokenizer = model.prompt_tokenizer, model.target_tokenizer
        self.threads = threads  # None: torch's thread count at each call (bench --threads sets it per row)
        self.float32 = meta["file_type"] == 0
        self.quantization = _FILE_TYPES.get(meta["file_type"], str(meta["file_type"]))
        self._np = np
        self._lib = _library()
        params = self._lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = self._lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise UserError("llama.cpp cannot load this GGUF", path=self.path)
        self.n_embd = self._lib.llama_model_n_embd(self._model)
        self.n_vocab = self._lib.llama_vocab_n_tokens(self._lib.llama_model_get_vocab(self._model))
        if self.n_vocab != rows:
            raise UserError(f"--gguf: {self.n_vocab} tokens, the checkpoint's SLM has {rows}", path=self.path)
        self._ctx = None
        self._capacity = (0, 0)  # (sequences, tokens per sequence) the current context holds
        self._threads = 0  # the current context's

    # the interface of the other models (generation.py): no step-level batching, request-level batches only
    decoder = None

    def tokenizer_ids(self, ids):
        return self.model.tokenizer_ids(ids)

    def identity(self) -> dict[str, Any]:
        import llama_cpp

        return {"backend": "llama-cpp", "gguf": str(self.path), "gguf_quantization": self.quantization,
                "gguf_sha256": A.sha256_file(self.path), "llama_cpp_python": llama_cpp.__version__}

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._lib.llama_batch_free(self._prompt_batch)
            self._lib.llama_batch_free(self._token_batch)
            self._ctx = None
        if self._model is not None:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone already
            self.close()

    # ------------------------------------------------------------------------------------------------ decoding

    def generate(self, prompt_ids, prompt_mask, features=None, *, streamer=None, seeds=None,
                 **generation: Any) -> list[list[int]]:
        """Token ids of the responses (without the end token) for right-padded prompts, greedy or sampled; `streamer`
        (decoding.Streamer) sees the tokenizer ids of each step; `seeds` (one per prompt): sampling draws each row
        from a generator of its own seed, as our loop does (decoding.row_generators)."""
        import torch

        search = self._search(generation)
        with torch.inference_mode():
            p = self.model.prompt_embeddings(prompt_ids, prompt_mask, features).float().cpu()
            lengths = [int(n) for n in prompt_mask.sum(1).tolist()]
            out = self._steps(p, lengths, search, streamer, seeds)
        ids = self.model.tokenizer_ids(torch.tensor(out, dtype=torch.long))
        return strip_generated(ids, self.config.eos_token_id, self.config.pad_token_id)

    def _search(self, generation: dict[str, Any]):
        search = self.model.decoding_search(generation, "cpu")
        asked = [] if search is not None else ["options only transformers' generate does"]
        if search is not None:
            asked += [name for name, on in (("beam search", search.num_beams > 1),
                                            ("--repetition-penalty", search.repetition_penalty != 1.0),
                                            ("--no-repeat-ngram-size", search.no_repeat_ngram_size > 0)) if on]
        if asked:
            raise UserError(f"--backend llama-cpp decodes greedily or samples: not with {', '.join(asked)} (use "
                            "--backend torch)")
        return search

    def _steps(self, p, lengths: list[int], search, streamer, seeds) -> list[list[int]]:
        """decoding.decode's greedy and sampling loop (its bans and warpers, `decoding._ban`/`_process`/`_draw`, so
        both loops pick alike from the same scores), each step's logits from llama.cpp."""
        import torch

        from llm2slm_cli import decoding  # the model code imports torch: off the import of this module

        np, lib = self._np, self._lib
        batch, n = len(lengths), search.max_new_tokens
        self._context(batch, max(lengths) + n)
        threads = self.threads or _torch_threads()
        if threads != self._threads:
            lib.llama_set_n_threads(self._ctx, threads, threads)
            self._threads = threads
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        # the fused prompts, each its own sequence: one embedding batch, logits at each prompt's last position
        embd = np.concatenate([p[i, :m].numpy() for i, m in enumerate(lengths)]).astype(np.float32)
        seq = np.repeat(np.arange(batch, dtype=np.int32), lengths)
        pos = np.concatenate([np.arange(m, dtype=np.int32) for m in lengths])
        last = np.cumsum(lengths) - 1
        self._decode(self._prompt_batch, embd, None, pos, seq, last)
        logits = torch.stack([self._logits(int(i)) for i in last])
        generators = decoding.row_generators(seeds, "cpu") if search.do_sample else None
        out = torch.full((batch, n), search.pad_token_id, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        alive = torch.arange(batch)
        eos = search.eos_token_id
        t = 0
        for t in range(n):
            scores = logits  # the rows in `alive`, in order
            decoding._ban(scores, search, t)
            if search.do_sample:
                probs = decoding._process(scores, search.temperature, search.top_p, [], top_k=search.top_k)
                token = decoding._draw(probs, [generators[i] for i in alive] if generators else None)
            else:
                token = scores.argmax(-1)
            out[alive, t] = token
            if eos is not None:
                done[alive] |= token == eos
            if streamer is not None:
                stop = streamer(self.model.tokenizer_ids(out[:, t: t + 1]))
                if stop is not None:
                    done |= torch.as_tensor(stop, dtype=torch.bool)
            if t == n - 1 or bool(done.all()):
                break
            alive = torch.nonzero(~done).flatten()  # finished rows take no more steps (in our loop: padding)
            self._decode(self._token_batch, None, out[alive, t].numpy().astype(np.int32),
                         (np.asarray(lengths)[alive.numpy()] + t).astype(np.int32), alive.numpy().astype(np.int32),
                         np.arange(len(alive)))
            logits = torch.stack([self._logits(j) for j in range(len(alive))])
        return out[:, : t + 1].tolist()

    def _logits(self, i: int):
        import torch

        ptr = self._lib.llama_get_logits_ith(self._ctx, i)
        return torch.from_numpy(self._np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(self._np.float32))

    def _decode(self, b, embd, tokens, pos, seq, outputs) -> None:
        np, lib = self._np, self._lib
        k = len(pos)
        b.n_tokens = k
        if embd is not None:
            ctypes.memmove(b.embd, np.ascontiguousarray(embd).ctypes.data, embd.nbytes)
        else:
            ctypes.memmove(b.token, np.ascontiguousarray(tokens).ctypes.data, tokens.nbytes)
        ctypes.memmove(b.pos, np.ascontiguousarray(pos).ctypes.data, pos.nbytes)
        flags = np.zeros(k, dtype=np.int8)
        flags[outputs] = 1
        ctypes.memmove(b.logits, flags.ctypes.data, k)
        for i in range(k):
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = int(seq[i])
        rc = lib.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not decode a batch of {k} tokens (llama_decode returned {rc})")

    def _context(self, sequences: int, length: int) -> None:
        """A context for `sequences` rows of up to `length` tokens each (made anew only when it must grow), with its
        two batches: one of embeddings for the prompts, one of token ids for the steps."""
        have_seq, have_len = self._capacity
        if self._ctx is not None and sequences <= have_seq and length <= have_len:
            return
        lib = self._lib
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            lib.llama_batch_free(self._prompt_batch)
            lib.llama_batch_free(self._token_batch)
            self._ctx = None
        sequences, length = max(sequences, have_seq), max(_round_up(length, 256), have_len)
        params = lib.llama_context_default_params()
        params.n_ctx = sequences * length
        params.n_batch = params.n_ctx  # all prompts in one llama_decode call
        params.n_ubatch = min(params.n_ctx, 512)
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = self._threads = self.threads or _torch_threads()
        params.kv_unified = True
        params.no_perf = True
        if self.float32:
            params.type_k = params.type_v = 0  # GGML_TYPE_F32
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise UserError(f"llama.cpp cannot make a context of {params.n_ctx} tokens for {sequences} sequences")
        self._prompt_batch = lib.llama_batch_init(params.n_ctx, self.n_embd, 1)
        self._token_batch = lib.llama_batch_init(sequences, 0, 1)
        self._capacity = (sequences, length)


_FILE_TYPES = {0: "f32", 1: "f16", 7: "Q8_0", 15: "Q4_K_M"}


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _arange(n: int):
    import torch  # off the import of this module

    return torch.arange(n)


def _torch_threads() -> int:
    import torch  # off the import of this module

    return torch.get_num_threads()


def _tensor(a):
    import torch  # off the import of this module

    return torch.from_numpy(a.copy())


def _library():
    import llama_cpp
    from llama_cpp import _logger

    # llama.cpp logs every tensor and setting it loads; llama-cpp-python 0.3.36 maps ggml's newer log levels one off
    # (its warnings come out as errors), so only level CRITICAL keeps them quiet: our errors are raised, not logged
    _logger.logger.setLevel(logging.CRITICAL)
    llama_cpp.llama_backend_init()
    return llama_cpp


def open_backend(model: Any, spec: str | Path, gguf: str | Path | None, *, threads: int | None = None):
    """The llama.cpp backend over a loaded checkpoint `model` (from directory `spec`), and what to add to its
    identity; `threads` None follows torch's thread count."""
    backend = LlamaCppSLM(model, gguf_path(spec, gguf), threads=threads)
    return backend, backend.identity()
