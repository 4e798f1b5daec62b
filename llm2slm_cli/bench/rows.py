"""Timed rows (timing.Row) from loaded models: plain models, LLM-to-SLM models, assisted and speculative
decoding; and whether a checkpoint can share the LLM already loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm2slm_cli.bench import timing as B
from llm2slm_cli.bench.plan import Plan, same_spec
from llm2slm_cli.errors import UserError


def plain_row(plan: Plan, model: Any, tokenizer: Any = None, compile: bool = False):
    run = B.plain_generate(model, plan.engine)
    if compile and plan.engine == "llm2slm":
        run = B.compiled(model, run)
    return B.Row(plan.label, plan.role, plan.llm, plan.slm, run, [model],
                 B.prompt_vocab(model.config, tokenizer), B.special_ids(model.config, tokenizer), tokenizer=tokenizer,
                 engine=plan.engine)


def assisted_row(plan: Plan, model: Any, assistant: Any, tokenizer: Any = None):
    return B.Row(plan.label, plan.role, plan.llm, plan.slm, B.assisted_generate(model, assistant), [model, assistant],
                 B.prompt_vocab(model.config, tokenizer), B.special_ids(model.config, tokenizer), tokenizer=tokenizer,
                 engine=plan.engine)


def speculative_row(plan: Plan, draft: Any, verifier: Any, gamma: int):
    from llm2slm_cli.decoding import SpeculativeStats  # imports torch: off the import of this module

    stats = SpeculativeStats()
    config, tok = verifier.model.config, verifier.tokenizer
    modules = [draft, verifier.model] + ([draft.llm.model] if draft.llm is not None and
                                         draft.llm.model is not verifier.model else [])
    return B.Row(plan.label, plan.role, plan.llm, plan.slm, B.speculative_generate_fn(draft, verifier, gamma, stats),
                 modules, B.prompt_vocab(config, tok), B.special_ids(config, tok), tokenizer=tok, speculative=stats)


def llm2slm_row(plan: Plan, model: Any, compile: bool = False):
    llm = model.llm if model.has_llm else None
    config = llm.config if llm is not None else model.slm.config
    tok = model.prompt_tokenizer
    modules = [model] + ([llm.model] if llm is not None else [])
    run = B.llm2slm_generate(model, plan.engine)
    if compile and plan.engine == "llm2slm":
        run = B.compiled(model.slm, run)
    return B.Row(plan.label, plan.role, plan.llm, plan.slm, run, modules,
                 B.prompt_vocab(config, tok), B.special_ids(config, tok) | {model.config.pad_token_id,
                                                                             model.config.eos_token_id},
                 tokenizer=tok, engine=plan.engine)


def llama_cpp_row(plan: Plan, backend: Any):
    """A checkpoint whose SLM decodes in llama.cpp (llama_backend.LlamaCppSLM): the LLM and the projector in torch.
    Its weights are the GGUF's bytes and the torch parts'; no FLOPs are counted (llama.cpp's are not torch's)."""
    model = backend.model
    llm = model.llm if model.has_llm else None
    config = llm.config if llm is not None else model.slm.config
    tok = model.prompt_tokenizer
    torch_parts = [m for m in (getattr(model, "projector", None), llm.model if llm is not None else None)
                   if m is not None]

    def run(ids, mask, **generation: Any) -> int:
        if generation.get("num_beams", 1) != 1:
            raise B.Unsupported("the llama.cpp backend is greedy, not beam search")
        return min(len(t) for t in backend.generate(ids, mask, **generation))

    return B.Row(plan.label, plan.role, plan.llm, plan.slm, run, torch_parts, B.prompt_vocab(config, tok),
                 B.special_ids(config, tok) | {model.config.pad_token_id, model.config.eos_token_id},
                 tokenizer=tok, engine=plan.engine, file_bytes=plan.path.stat().st_size + B.weight_bytes(torch_parts))


def can_share(llm: Any, checkpoint: Path) -> bool:
    """Whether a checkpoint was made with exactly this LLM (weights, layer, tokenizer), so it need not load its own."""
    return shared_llm(llm, checkpoint, any_layer=False) is not None


def shared_llm(llm: Any, checkpoint: Path, *, any_layer: bool) -> Any:
    """The loaded LLM (a view at the checkpoint's layer with `any_layer`) if the checkpoint was made with exactly
    its weights and tokenizer; else None, and the checkpoint loads its own."""
    from llm2slm_cli.checkpoint import check_llm, read_model_config  # imports torch: off the import of this module

    expected = read_model_config(checkpoint).llm
    if llm is None or expected is None or same_spec(expected["name"]) != same_spec(llm.spec):
        return None
    if expected.get("dtype") != llm.dtype:
        return None
    if any_layer and llm.kind == "decoder-only" and expected.get("layer") != llm.layer:
        llm = llm.at_layer(expected["layer"])
    try:
        check_llm(llm, expected, f"checkpoint {checkpoint}")
    except UserError:
        return None
    return llm
