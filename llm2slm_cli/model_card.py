"""The model card of an exported checkpoint (its README.md): Hugging Face metadata built with huggingface_hub's
`ModelCardData`, then what the model is, its intended use and limitations, its training data and budget, its
metrics and how to load it, every fact taken from what the checkpoint, its `train` run and `eval` recorded.

No local path is written: a model named by one is "a local model" (with the hub id its config names, if it names
one), a data file is named by its file name. A license, a base model or a dataset goes into the metadata only where
it is known (a hub id in `KNOWN_MODELS`, a hub dataset `hf:NAME`); otherwise it is left out, never guessed.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import loading as M
from llm2slm_cli.data import hf_dataset_parts
from llm2slm_cli.errors import UserError

PAPER = "https://arxiv.org/abs/2402.16844"
DISTRIBUTION = "llm2slm-cli"  # the package's name (on PyPI, `llm2slm` is an unrelated package)
# Hub license ids (and, where the model card says so, languages) of well-known base models, by hub id
KNOWN_MODELS: list[tuple[str, str, list[str] | None]] = [
    (r"(google-t5/)?t5-(small|base|large|3b|11b)", "apache-2.0", ["en", "fr", "ro", "de"]),
    (r"google/(t5-v1_1|flan-t5|mt5|umt5|t5-efficient)-.+", "apache-2.0", None),
    (r"(openai-community/)?gpt2(-medium|-large|-xl)?|(distilbert/)?distilgpt2", "mit", ["en"]),
    (r"google/(gemma|codegemma|recurrentgemma)-.+", "gemma", None),
    (r"Qwen/Qwen3-.+", "apache-2.0", None),
    (r"Qwen/Qwen2\.5-(0\.5B|1\.5B|7B|14B|32B)(-.+)?", "apache-2.0", None),  # 3B and 72B have their own
    (r"meta-llama/(Meta-)?Llama-3-.+", "llama3", None),
    (r"meta-llama/(Meta-)?Llama-3\.1-.+", "llama3.1", None),
    (r"meta-llama/Llama-3\.2-.+", "llama3.2", None),
    (r"meta-llama/Llama-3\.3-.+", "llama3.3", None),
    (r"meta-llama/Llama-2-.+", "llama2", None),
    (r"(google-bert/)?bert-(base|large)-.+", "apache-2.0", None),
    (r"HuggingFaceTB/SmolLM2?-.+", "apache-2.0", None),
    (r"EleutherAI/pythia-.+", "apache-2.0", None),
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def render(name: str, mc, checkpoint: dict[str, Any], training: dict[str, Any] | None,
           metrics: dict[str, Any] | None, *, bundled: bool, unsupported: str | None) -> str:
    """README.md of an export: the YAML metadata, then the sections."""
    from huggingface_hub import ModelCard  # off the import of this module

    meta = metadata(name, mc, checkpoint, metrics, transformers=unsupported is None)
    body = [f"# {name}", "", *summary(mc), *details(mc, checkpoint, bundled=bundled), *intended_use(mc, checkpoint),
            *limitations(mc, metrics), *training_section(checkpoint, training), *metrics_section(metrics),
            *how_to_load(mc, bundled=bundled, unsupported=unsupported), *files_section(mc, bundled, unsupported)]
    return str(ModelCard("---\n" + meta.to_yaml() + "\n---\n\n" + "\n".join(body)))


# ------------------------------------------------------------------------------------------------------ metadata


def known_model(hub_id: str | None) -> tuple[str | None, list[str] | None]:
    """(license, languages) of a hub model listed in KNOWN_MODELS; (None, None) for any other."""
    for pattern, license_id, languages in KNOWN_MODELS:
        if hub_id and re.fullmatch(pattern, hub_id):
            return license_id, languages
    return None, None


def hub_model(spec: str | None, *, depth: int = 0) -> str | None:
    """The hub id of a model spec: the id itself; for a local directory (or an SLM-alone checkpoint), the hub id its
    config names (`_name_or_path`, or the checkpoint's SLM), if it names one; None otherwise (a preset, a GGUF file,
    a directory of unknown origin)."""
    try:
        src = M.resolve(spec) if spec else None
    except UserError:
        return None
    if src is None or src.kind in ("preset", "gguf"):
        return None
    if src.kind == "hub":
        return spec if _HUB_ID.fullmatch(spec) else None
    if src.kind == "checkpoint":
        return hub_model(A.read_json_or_none(Path(src.name) / A.MODEL_CONFIG, "slm"), depth=1) if not depth else None
    named = A.read_json_or_none(Path(src.name) / "config.json", "_name_or_path")
    if isinstance(named, str) and _HUB_ID.fullmatch(named) and not Path(named).expanduser().exists():
        return named
    return None


def license_of(mc) -> str | None:
    """The export's license: that of its base models when every one is known and they agree (the SLM's weights are
    in it, and the LLM runs on every prompt); None otherwise."""
    specs = [mc.slm] + ([mc.llm["name"]] if mc.llm else [])
    licenses = {known_model(hub_model(s))[0] for s in specs}
    return licenses.pop() if len(licenses) == 1 and None not in licenses else None


def metadata(name: str, mc, checkpoint: dict[str, Any], metrics: dict[str, Any] | None, *, transformers: bool):
    """The card's YAML metadata as huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData  # off the import of this module

    base = [b for b in ((hub_model(mc.llm["name"]) if mc.llm else None), hub_model(mc.slm)) if b]
    inputs = (checkpoint.get("config") or {}).get("inputs") or []
    datasets = sorted({hf_dataset_parts(str(p))[0] for p in inputs if str(p).startswith("hf:")})
    tags = ["llm2slm"] + (["llm-to-slm"] if mc.llm else []) + (["custom_code"] if transformers else [])
    results = eval_results(mc, metrics)
    return ModelCardData(
        license=license_of(mc), base_model=base or None, datasets=datasets or None,
        language=known_model(hub_model(mc.slm))[1], library_name="transformers" if transformers else None,
        pipeline_tag=pipeline_tag(mc), tags=tags, model_name=name if results else None, eval_results=results or None)


def pipeline_tag(mc) -> str:
    return "text2text-generation" if mc.slm_kind == "encoder-decoder" else "text-generation"


def eval_dataset(metrics: dict[str, Any]) -> dict[str, str | None] | None:
    """What `eval` scored, as the card names it: a hub dataset by its id (and config, split), files by their stems
    (`test` for data/test.jsonl); None when the predictions' inputs are not recorded."""
    predictions = metrics.get("predictions") or {}
    inputs = predictions.get("inputs")
    if inputs is None and predictions.get("dir"):  # eval outputs from before eval recorded them
        inputs = A.read_json_or_none(Path(predictions["dir"]) / A.MANIFEST, "inputs")
    if not inputs:
        return None
    first = str(inputs[0])
    if first.startswith("hf:"):
        name, config, split = hf_dataset_parts(first)
        return {"name": name, "config": config, "split": split}
    return {"name": "+".join(dict.fromkeys(PurePath(str(p)).stem for p in inputs)), "config": None, "split": None}


def eval_results(mc, metrics: dict[str, Any] | None) -> list:
    """model-index results: the headline scores, BLEU and chrF with their sacrebleu signatures."""
    from huggingface_hub import EvalResult  # off the import of this module

    dataset = eval_dataset(metrics) if metrics else None
    if not dataset:
        return []
    m = metrics.get("metrics", {})
    return [EvalResult(task_type=pipeline_tag(mc), dataset_type=dataset["name"], dataset_name=dataset["name"],
                       dataset_config=dataset["config"], dataset_split=dataset["split"], metric_type=key,
                       metric_value=value, metric_name=METRIC_NAMES.get(key, key),
                       metric_config=(m.get(key) or {}).get("signature") if key in ("bleu", "chrf") else None)
            for key, value in scores(metrics).items()]


METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                "rougeLsum": "ROUGE-Lsum", "judge": "LLM judge (mean rating, 1-10)"}


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline scores of an `eval` metrics.json: BLEU, chrF, ROUGE-1/2/L/Lsum, the judge's mean rating."""
    m = metrics.get("metrics", {})
    out: dict[str, float] = {}
    for name in ("bleu", "chrf"):
        if isinstance(m.get(name), dict) and m[name].get("score") is not None:
            out[name] = round(m[name]["score"], 2)
    for k, v in (m.get("rouge") or {}).items():
        if isinstance(v, (int, float)):
            out[k] = round(v, 2)
    if isinstance(m.get("judge"), dict) and m["judge"].get("mean") is not None:
        out["judge"] = round(m["judge"]["mean"], 2)
    return out


# ------------------------------------------------------------------------------------------------------ sections


def describe(spec: str, *, short: bool = False) -> str:
    """A model as the card names it: a hub id, a preset, or "a local model" (never its path)."""
    try:
        src = M.resolve(spec)
    except UserError:
        src = None
    if src is not None and src.kind == "hub":
        return f"`{spec}`"
    if src is not None and src.kind == "preset":
        return f"`{src.name}`" + (", a preset" if short else
                                  " (an architecture preset: fresh weights, no pretrained model)")
    named = hub_model(spec)
    return f"a local model (its config names `{named}`)" if named else "a local model"


def data_name(spec: Any) -> str:
    """A training or evaluation input as the card names it: a hub dataset by its spec, a file by its name."""
    return str(spec) if str(spec).startswith("hf:") else PurePath(str(spec)).name


def summary(mc) -> list[str]:
    if mc.llm:
        return [f"An LLM-to-SLM model ([arXiv 2402.16844]({PAPER})): a frozen large language model, "
                f"{describe(mc.llm['name'])}, encodes the prompt once, and a small projector maps its hidden states "
                f"into a small language model, {describe(mc.slm)}, which does all of the decoding. The large model "
                "runs once per prompt, the small one once per generated token; made with llm2slm.", ""]
    return [f"The small language model {describe(mc.slm)} fine-tuned alone (the SLM baseline of LLM-to-SLM, "
            f"[arXiv 2402.16844]({PAPER})), made with llm2slm.", ""]


def details(mc, checkpoint: dict[str, Any], *, bundled: bool) -> list[str]:
    """The table of what the model is."""
    llm, counts = mc.llm, checkpoint.get("counts") or {}
    rows = []
    if llm:
        where = ", copied into `llm/`" if bundled else ", loaded by that name"
        rows.append(("LLM", f"{describe(llm['name'], short=True)} ({llm['kind']}, layer {llm['layer']}, "
                            f"{llm['dtype']}, d={llm['d_model']}){where}"))
        rows.append(("LLM fingerprint", f"sha256 `{llm['fingerprint']}` (llm2slm's `load` refuses an LLM whose "
                                        "weights differ)"))
    shape = (f", first {mc.slm_layers} layers" if mc.slm_layers else "") + (
        f", PEFT {mc.peft.get('peft_type')}" if mc.peft else "")
    rows.append(("SLM", f"{describe(mc.slm, short=True)} ({mc.slm_kind}{shape})"))
    if llm:
        rows.append(("method", f"fusion `{mc.fusion}`, tokenizer `{mc.tokenizer}`"
                               + (", vocabulary adapter" if mc.vocab_adapter else "")))
    if mc.trim_vocab:
        rows.append(("vocabulary", f"trimmed to the {mc.trim_vocab['kept']:,} of {mc.trim_vocab['full']:,} tokens "
                                   "the training examples use (it writes no other token)"))
    rows.append(("prompt template", f"`{mc.template}` (applied by llm2slm's `load` and `serve`)" if mc.template
                 else "none"))
    rows.append(("longest prompt", f"{mc.max_prompt_length} tokens"))
    if counts.get("parameters"):
        rows.append(("parameters", f"{counts['parameters']:,} ({counts.get('trainable_parameters', 0):,} trained)"))
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def intended_use(mc, checkpoint: dict[str, Any]) -> list[str]:
    inputs = (checkpoint.get("config") or {}).get("inputs") or []
    task = ", ".join(f"`{data_name(p)}`" for p in inputs) or "its training data"
    return ["## Intended use", "",
            f"The task of {task}: prompts like its training prompts" + (", in its template" if mc.template else "")
            + ". A research model for fast decoding with a frozen large model's understanding of the prompt; it was "
            "not evaluated for other tasks, for safety or for factual accuracy, and the limitations of its base "
            "models apply.", ""]


def limitations(mc, metrics: dict[str, Any] | None) -> list[str]:
    lines = ["## Limitations", ""]
    if metrics:
        outputs = metrics.get("outputs") or {}
        dataset = eval_dataset(metrics)
        where = f"`{dataset['name']}`" if dataset else "the evaluation data"
        n = (metrics.get("counts") or {}).get("examples")
        quality = ", ".join(f"{METRIC_NAMES.get(k, k)} {v}" for k, v in scores(metrics).items()) or "no score"
        lines.append(f"- Measured on {where}" + (f" ({n:,} examples)" if n else "") + f": {quality}.")
        if outputs.get("repetition_loops") is not None:
            lines.append(f"- {outputs['repetition_loops']:.1%} of its outputs repeat a word n-gram 3 or more times "
                         f"in a row; {outputs.get('empty', 0):.1%} are empty.")
    else:
        lines.append("- Quality was not measured: this export carries no `eval` results.")
    lines.append(f"- Prompts longer than {mc.max_prompt_length} tokens are cut by llm2slm (transformers' loading "
                 "leaves that to you).")
    if mc.llm:
        lines.append("- Every prompt runs through the large model once: the memory and time of that pass remain.")
    if mc.trim_vocab:
        lines.append("- It can only write the tokens of its trimmed vocabulary.")
    return [*lines, ""]


def training_section(checkpoint: dict[str, Any], training: dict[str, Any] | None) -> list[str]:
    cfg, counts = checkpoint.get("config") or {}, checkpoint.get("counts") or {}
    lines = ["## Training", ""]
    inputs = cfg.get("inputs") or []
    if inputs:
        sha = ((training or {}).get("inputs") or {}).get("train_sha256")
        lines.append("- Data: " + ", ".join(f"`{data_name(p)}`" for p in inputs) + (f" (sha256 `{sha}`)" if sha else "")
                     + (f", {counts['train_examples']:,} examples" if counts.get("train_examples") else ""))
        if cfg.get("dev"):
            lines.append("- Dev data: " + ", ".join(f"`{data_name(p)}`" for p in cfg["dev"]))
    budget = [f"step {checkpoint['step']}" if checkpoint.get("step") is not None else None,
              f"batch {cfg['batch_size']}" if cfg.get("batch_size") else None,
              f"max steps {cfg['max_steps']}" if cfg.get("max_steps") else
              (f"{cfg['epochs']} epoch(s)" if cfg.get("epochs") else None),
              f"lr {cfg['lr']}" if cfg.get("lr") is not None else None,
              f"weight decay {cfg['weight_decay']}" if cfg.get("weight_decay") is not None else None,
              f"seed {cfg['seed']}" if cfg.get("seed") is not None else None]
    seconds = ((training or {}).get("timing") or {}).get("seconds")
    if seconds is not None:
        budget.append(f"{seconds:,} s")
    if any(budget):
        lines.append("- Budget: " + ", ".join(b for b in budget if b))
    result = (training or {}).get("result") or {}
    if result.get("train_loss") is not None:
        lines.append(f"- Final loss: train {result['train_loss']:.4f}" + (
            f", dev {result['dev_loss']:.4f}" if result.get("dev_loss") is not None else ""))
    if len(lines) == 2:
        lines.append("- Not recorded (no training run beside the checkpoint).")
    return [*lines, ""]


def metrics_section(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return []
    lines = ["## Metrics", "", "| metric | score |", "|---|---|",
             *[f"| {METRIC_NAMES.get(k, k)} | {v} |" for k, v in scores(metrics).items()], ""]
    for metric in ("bleu", "chrf"):
        signature = (metrics.get("metrics", {}).get(metric) or {}).get("signature")
        if signature:
            lines += [f"{METRIC_NAMES[metric]} signature (sacrebleu): `{signature}`", ""]
    generation = (metrics.get("predictions") or {}).get("generation")
    if generation:
        lines += ["Decoding: " + ", ".join(f"{k}={v}" for k, v in generation.items()), ""]
    return lines


def install_line() -> str:
    """How to install llm2slm: from its repository when the package names one (its Project-URL metadata), else from
    a source checkout. It is not on PyPI under its own name."""
    from importlib import metadata as md

    try:
        urls = md.metadata(DISTRIBUTION).get_all("Project-URL") or []
    except md.PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        url = url.strip()
        if label.strip().lower() in ("repository", "source", "homepage", "code") and url.startswith("https://"):
            return f'pip install "git+{url}"'
    return "pip install -e .   # in a checkout of llm2slm's source (it is not on PyPI)"


def how_to_load(mc, *, bundled: bool, unsupported: str | None) -> list[str]:
    auto = "AutoModelForSeq2SeqLM" if mc.slm_kind == "encoder-decoder" else "AutoModelForCausalLM"
    lines = ["## How to load", ""]
    if unsupported:
        lines += [f"transformers cannot load this model on its own: it is {unsupported}. Use llm2slm.", ""]
    else:
        new = "out" if mc.slm_kind == "encoder-decoder" else "out[:, inputs.input_ids.shape[1]:]"
        lines += ["With transformers alone (the model code is in this directory: `trust_remote_code=True`):", "",
                  "```python", f"from transformers import {auto}, AutoTokenizer", "",
                  'MODEL = "..."   # this directory, or the Hub repository it was uploaded to',
                  f"model = {auto}.from_pretrained(MODEL, trust_remote_code=True)",
                  "tokenizer = AutoTokenizer.from_pretrained(MODEL, trust_remote_code=True)",
                  'inputs = tokenizer(["..."], return_tensors="pt", padding=True)',
                  "out = model.generate(**inputs, max_new_tokens=64, num_beams=4)",
                  f"print(tokenizer.batch_decode({new}, skip_special_tokens=True))", "```", ""]
        if mc.template:
            lines += [f"Format prompts with the training template first: `{mc.template}`.", ""]
        if mc.llm and not bundled and not hub_model(mc.llm["name"]):
            lines += ["The LLM is not in this directory and not on the Hub: give it as `from_pretrained(..., "
                      "llm_path=DIR)`, or export with `llm2slm export --include-llm yes`.", ""]
        if mc.tokenizer == "slm" and mc.llm:
            lines += ["Outputs are in the SLM's own tokenizer: decode them with `slm_tokenizer/`.", ""]
    lines += ["With llm2slm (the training template applied, the LLM's fingerprint checked):", "", "```bash",
              install_line(), "```", "", "```python", "from llm2slm_cli import load", "",
              'MODEL_DIR = "..."   # this directory (huggingface_hub.snapshot_download gives one of a Hub repository)',
              "model = load(MODEL_DIR)",
              'print(model.generate(["..."], num_beams=4))', "```", "", "```bash",
              "llm2slm generate --model MODEL_DIR --prompt '...' --num-beams 4",
              "llm2slm serve --model MODEL_DIR    # an OpenAI-compatible API on 127.0.0.1:8000", "```", ""]
    return lines


def files_section(mc, bundled: bool, unsupported: str | None) -> list[str]:
    hf = "" if unsupported else (", `config.json`, `generation_config.json`, `configuration_llm2slm.py` and "
                                 "`modeling_llm2slm.py` (transformers' config and model code), the tokenizer's files "
                                 "at the top")
    return ["## Files", "",
            "`llm2slm.json` (the method's configuration), `slm_config.json`, `model.safetensors` (projector and SLM), "
            "`tokenizer/`" + (", `slm_tokenizer/`" if mc.tokenizer == "slm" and mc.llm else "")
            + (", `llm/` (the frozen LLM)" if bundled else "") + hf
            + ", `manifest.json` (sizes and sha256 of the files, the training configuration).", ""]
