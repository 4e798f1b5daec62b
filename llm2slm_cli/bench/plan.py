"""Which rows a `bench` run has: the options turned into row plans, checked before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llm2slm_cli import artifacts as A
from llm2slm_cli import gguf_export, llama_backend
from llm2slm_cli import loading as M
from llm2slm_cli.bench import peers
from llm2slm_cli.config import BenchConfig
from llm2slm_cli.errors import UserError


@dataclass
class Plan:
    """A row before anything is loaded: enough to check labels and options up front."""

    label: str
    role: str  # "LLM", "SLM", "LLM-to-SLM", "checkpoint", "speculative", "assisted", "peer"
    llm: str | None
    slm: str | None  # for a peer row: the model it was converted from (--peer-source), if given
    checkpoint: Path | None = None
    engine: str = "llm2slm"  # "llm2slm" (decoding.decode), "transformers" (its generate), "ctranslate2", "llama.cpp"
    path: Path | None = None  # a peer row's model: a CTranslate2 directory or a GGUF file
    compute_type: str | None = None  # a CTranslate2 row's

    def twin(self) -> Plan:
        """The same row decoded by transformers' generate (bench --compare)."""
        return Plan(f"{self.label} [transformers]", self.role, self.llm, self.slm, self.checkpoint, "transformers")


def short_name(spec: str) -> str:
    try:
        src = M.resolve(spec)
    except UserError:
        return spec
    return src.name if src.kind == "preset" else Path(spec).name if src.kind != "hub" else spec


def same_spec(spec: str | None) -> str | None:
    """A model name as the rows compare it ('tiny-t5' and 'preset:tiny-t5' are the same model)."""
    if spec is None:
        return None
    try:
        return M.resolve(spec).spec
    except UserError:
        return spec


def plan_rows(config: BenchConfig) -> list[Plan]:
    from llm2slm_cli.checkpoint import read_model_config  # imports torch: off the import of this module

    plans: list[Plan] = []
    one = len(config.slm) == 1
    if config.llm and M.model_kind(M.load_config(config.llm)) != "encoder-only":  # an encoder cannot generate
        plans.append(Plan("LLM", "LLM", config.llm, None))
    plans += [Plan("SLM" if one else f"SLM:{short_name(s)}", "SLM", None, s) for s in config.slm]
    if config.llm:
        plans += [Plan("LLM-to-SLM" if one else f"LLM-to-SLM:{short_name(s)}", "LLM-to-SLM", config.llm, s)
                  for s in config.slm]
    for item in config.model:
        label, _, directory = (x.strip() for x in item.partition("="))
        cfg = read_model_config(Path(directory))
        plans.append(Plan(label, "checkpoint", cfg.llm["name"] if cfg.llm else None, cfg.slm, Path(directory)))
    if config.compare:  # every row that decodes with generate, once more with transformers' generate
        plans = [q for p in plans for q in (p.twin(), p)]
    plans += _llama_cpp_model_plans(config)
    for item in config.speculative:
        label, _, directory = (x.strip() for x in item.partition("="))
        cfg = read_model_config(Path(directory))
        if not config.llm:
            raise UserError(f"--speculative {label}: name the LLM that checks the drafts with --llm")
        plans.append(Plan(label, "speculative", config.llm, cfg.slm, Path(directory)))
    for item in config.assistant:
        label, _, spec = (x.strip() for x in item.partition("="))
        if not config.llm:
            raise UserError(f"--assistant {label}: name the LLM it drafts for with --llm")
        directory = Path(spec)
        if (directory / "llm2slm.json").is_file():
            cfg = read_model_config(directory)
            if cfg.llm is not None:
                raise UserError(f"--assistant {label}: {spec} reads the LLM's features; transformers' assisted "
                                "generation needs a plain model (a checkpoint trained without --llm, or a model)")
            plans.append(Plan(label, "assisted", config.llm, cfg.slm, directory, "transformers"))
        else:
            plans.append(Plan(label, "assisted", config.llm, spec, None, "transformers"))
    plans += _peer_plans(config)
    labels = [p.label for p in plans]
    for label in labels:
        if labels.count(label) > 1:
            raise UserError(f"two rows are labelled {label!r}: give each --model a label of its own")
    if M.DTYPES.get(config.dtype) == "float16":  # before any row is measured: every model of every row
        for p in (p for p in plans if p.role != "peer"):  # a peer runs its own compute type
            types = [A.read_json_or_none(p.checkpoint / A.SLM_CONFIG, "model_type") if p.checkpoint is not None
                     else M.load_config(p.slm).model_type if p.slm is not None else None,
                     M.load_config(p.llm).model_type if p.llm is not None and p.checkpoint is None else None]
            for model_type in types:
                M.refuse_float16(model_type, config.dtype, f"row {p.label!r}")
    longest = config.prompt_length + max([config.new_tokens, *sweep_lengths(config)])
    for spec in {p.llm for p in plans if p.role == "LLM"} | set(config.slm):
        hf = M.load_config(spec)
        limit = getattr(hf, "n_positions", None) or getattr(hf, "max_position_embeddings", None)
        if M.model_kind(hf) == "decoder-only" and isinstance(limit, int) and longest > limit:
            raise UserError(f"{spec!r} reads at most {limit} positions: --prompt-length {config.prompt_length} plus "
                            f"{longest - config.prompt_length} new tokens is {longest}")
    return plans


def sweep_lengths(config: BenchConfig) -> list[int]:
    return [int(x) for x in config.lengths.split(",") if x.strip()] if config.lengths else []


def _llama_cpp_model_plans(config: BenchConfig) -> list[Plan]:
    """--llama-cpp-model rows: checkpoints whose SLM decodes in llama.cpp from DIR/slm.gguf (llama_backend.py)."""
    from llm2slm_cli.checkpoint import read_model_config  # imports torch: off the import of this module

    if not config.llama_cpp_model:
        return []
    llama_backend.require()
    asked = [o for o, on in ((f"--dtype {config.dtype}", M.DTYPES.get(config.dtype, config.dtype) != "float32"),
                             (f"--quantize {config.quantize}", config.quantize != "none")) if on]
    if asked:
        raise UserError(f"--llama-cpp-model: not with {', '.join(asked)} (the GGUF's quantization is the SLM's "
                        "precision; the LLM and projector run in float32)")
    plans = []
    for item in config.llama_cpp_model:
        label, _, directory = (x.strip() for x in item.partition("="))
        cfg = read_model_config(Path(directory))
        gguf_export.check_exportable(cfg, A.read_json_or_none(Path(directory) / A.SLM_CONFIG, "model_type"),
                                     f"--llama-cpp-model {label}")
        plans.append(Plan(label, "checkpoint", cfg.llm["name"] if cfg.llm else None, cfg.slm, Path(directory),
                          engine="llama.cpp", path=llama_backend.gguf_path(directory, None)))
    return plans


def _peer_plans(config: BenchConfig) -> list[Plan]:
    """--ctranslate2 (one row per --ct2-compute-type) and --llama-cpp rows, their runtimes installed and their
    models present; --peer-source names the model each was converted from."""
    sources = {}
    for item in config.peer_source:
        label, _, spec = (x.strip() for x in item.partition("="))
        M.load_config(spec)  # a model that is not there is refused before any row runs
        sources[label] = spec
    plans: list[Plan] = []
    types = [t.strip() for t in config.ct2_compute_type.split(",") if t.strip()]
    if config.ctranslate2:
        peers.require("ctranslate2", "--ctranslate2")
    for item in config.ctranslate2:
        label, _, directory = (x.strip() for x in item.partition("="))
        peers.check_ct2_directory(label, Path(directory))
        plans += [Plan(label if len(types) == 1 else f"{label} [{t}]", "peer", None, sources.get(label),
                       engine="ctranslate2", path=Path(directory), compute_type=t) for t in types]
    if config.llama_cpp:
        peers.require("llama_cpp", "--llama-cpp")
    for item in config.llama_cpp:
        label, _, path = (x.strip() for x in item.partition("="))
        peers.check_gguf_file(label, Path(path))
        plans.append(Plan(label, "peer", None, sources.get(label), engine="llama.cpp", path=Path(path)))
    named = {x.strip() for item in config.ctranslate2 + config.llama_cpp for x in [item.partition("=")[0]]}
    for label in sources:
        if label not in named:
            raise UserError(f"--peer-source {label}: there is no --ctranslate2 or --llama-cpp row labelled {label!r}")
    return plans
