"""`llm2slm export`: a trained checkpoint as a self-contained directory with a model card.

The directory is a checkpoint as `train` writes it (llm2slm.json, slm_config.json, model.safetensors, tokenizer/,
manifest.json), without the training state (optimizer, RNG), plus README.md, a Hugging Face model card (YAML
metadata, then the LLM and its fingerprint, the SLM, the data, the training budget, metrics, how to load it), and
transformers' files (hf_format.py: config.json, generation_config.json and the model code, which
`AutoModelForCausalLM`/`AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)` load). With the LLM
named by a local path (or --include-llm yes), the LLM's weights are copied into llm/, where loading finds them.
`load`, `generate` and `serve` take the directory; `huggingface_hub.upload_folder` uploads it as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import fingerprints, hf_format, runtime
from llm2slm_cli import loading as M
from llm2slm_cli.config import ExportConfig
from llm2slm_cli.errors import UserError

COPIED = (A.MODEL_CONFIG, A.SLM_CONFIG, A.MODEL_WEIGHTS, A.TOKENIZER_DIR, A.SLM_TOKENIZER_DIR)


def run(config: ExportConfig) -> Path:
    from llm2slm_cli.checkpoint import read_model_config  # imports torch: off the import of this module

    src, out = Path(config.checkpoint), Path(config.out)
    # first: --out is none of the inputs (the checkpoint, its LLM, --eval, the run's manifest beside the checkpoint),
    # nor holds or lies inside one: `export run/final --out run --overwrite` would delete the run
    A.check_out_not_input(out, config, [("the training manifest", src.parent / A.MANIFEST)])
    model_config = read_model_config(src)  # refuses what is not a checkpoint
    checkpoint = A.verify_checkpoint(src)  # weights and config files against their sha256
    training = _training_manifest(src)
    metrics = _metrics(config.eval) if config.eval is not None else None
    llm = model_config.llm
    include = config.include_llm == "yes" or (config.include_llm == "auto" and llm is not None and
                                               M.resolve(llm["name"]).kind in ("dir", "gguf", "checkpoint"))
    if include and llm is None:
        raise UserError("--include-llm yes: this checkpoint was trained without an LLM", path=src)

    A.check_output_dir(out, overwrite=config.overwrite, resumable=False)  # refused now; nothing is deleted yet
    # Built beside --out and put in its place at the end: with --overwrite the previous export stays until the new
    # one is complete (an LLM whose fingerprint differs, a full disk leave it as it was).
    work = A.building_dir(out)
    try:
        for name in COPIED:
            if (src / name).is_dir():
                shutil.copytree(src / name, work / name)
            elif (src / name).is_file():
                shutil.copy2(src / name, work / name)
        if include:
            _copy_llm(llm, work / A.BUNDLED_LLM)
        extra = [] if hf_format.unsupported(model_config) else hf_format.write(work, src, model_config,
                                                                              bundled=include)
        name = config.name or out.resolve().name
        (work / A.MODEL_CARD).write_text(model_card(name, out, model_config, checkpoint, training, metrics,
                                                    bundled=include))
        manifest = {**A.make_manifest(A.KIND_CHECKPOINT, checkpoint.get("config", {}),
                                      model=checkpoint.get("model"), step=checkpoint.get("step"),
                                      counts=checkpoint.get("counts"),
                                      files={**A.checkpoint_records(work),
                                             **{n: A.file_record(work / n) for n in extra}}),
                    "exported": {"from": str(src), "config": A.config_to_dict(config), "llm_included": include,
                                 "training": training and {k: training.get(k) for k in ("result", "timing",
                                                                                          "inputs")},
                                 "metrics": metrics}}
        A.atomic_write_json(work / A.MANIFEST, manifest)  # last: its presence means the directory is complete
        A.replace_output_dir(work, out)
    except OSError as e:  # a copy's error names its source file; the disk that is full is the destination's
        if A.is_disk_full(e, work):
            raise A.disk_full_error(e, out) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a failed run's unfinished export (gone after the swap)
    runtime.say(f"exported {src} -> {out}" + (" (with its LLM)" if include else ""), config.quiet)
    return out


def _training_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The `train` run's manifest, beside run/final (absent for a run that has not finished)."""
    path = checkpoint.parent / A.MANIFEST
    if path.is_file() and A.read_json_or_none(path, "kind") == A.KIND_TRAINING:
        return A.read_manifest(checkpoint.parent, A.KIND_TRAINING)
    return None


def _metrics(directory: Path) -> dict[str, Any]:
    """eval's metrics.json, checked against the sha256 eval recorded for it: the model card quotes these numbers."""
    manifest = A.read_manifest(directory, A.KIND_EVALUATION)
    A.verify_file(Path(directory) / A.METRICS, (manifest.get("files") or {}).get(A.METRICS), "metrics file")
    try:
        return json.loads((Path(directory) / A.METRICS).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable metrics ({e})", path=Path(directory) / A.METRICS) from None


def _copy_llm(identity: dict[str, Any], directory: Path) -> None:
    """The LLM as a plain transformers directory; its fingerprint must still be the one the checkpoint records. The
    copy records that fingerprint and its own files' sha256 (A.BUNDLED_LLM_IDENTITY): a fingerprint made from the
    weight files names the original's files, not the copy's."""
    by_files = identity.get("fingerprint_kind") == A.FINGERPRINT_FILES
    if by_files and fingerprints.weights_fingerprint(identity["name"], identity["dtype"]) != identity["fingerprint"]:
        raise UserError(f"the LLM at {identity['name']!r} is not the one this checkpoint was trained with (its "
                        "fingerprint differs)")
    model = M.load_model(identity["name"], dtype=identity["dtype"], role="LLM")
    if not by_files and fingerprints.state_fingerprint(model) != identity["fingerprint"]:
        raise UserError(f"the LLM at {identity['name']!r} is not the one this checkpoint was trained with (its "
                        "fingerprint differs)")
    M.save_plain(model, directory)
    M.load_tokenizer(identity["name"]).save_pretrained(str(directory))
    if by_files:
        files = {f.name: A.sha256_file(f) for f in M.weight_files(str(directory))}
        A.atomic_write_json(directory / A.BUNDLED_LLM_IDENTITY, {"fingerprint": identity["fingerprint"],
                                                                  "dtype": identity["dtype"], "files": files})


def _hub_id(spec: str) -> str | None:
    try:
        return spec if M.resolve(spec).kind == "hub" else None
    except UserError:
        return None


def model_card(name: str, out: Path, mc, checkpoint: dict, training: dict | None, metrics: dict | None, *,
               bundled: bool) -> str:
    """README.md: YAML metadata for the Hub, then what the model is, how it was trained, how well it does, and the
    commands that load it."""
    import yaml

    llm, cfg = mc.llm, checkpoint.get("config", {})
    counts = checkpoint.get("counts") or {}
    meta: dict[str, Any] = {"library_name": "llm2slm", "tags": ["llm2slm", "llm-to-slm", "text-generation"]}
    base = [b for b in (_hub_id(llm["name"]) if llm else None, _hub_id(mc.slm)) if b]
    if base:
        meta["base_model"] = base
    if metrics:
        pred_dir = Path((metrics.get("predictions") or {}).get("dir") or ".")
        data = A.read_json_or_none(pred_dir / A.MANIFEST, "inputs") or [pred_dir.name]
        dataset = ", ".join(Path(str(p)).name for p in data)
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation"}, "dataset": {"type": dataset, "name": dataset},
            "metrics": [{"type": k, "value": v} for k, v in _scores(metrics).items()]}]}]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    if llm:
        lines += [f"An LLM-to-SLM model ([arXiv 2402.16844](https://arxiv.org/abs/2402.16844)): the frozen LLM "
                  f"`{llm['name']}` encodes the prompt once, a projector maps its features into the SLM "
                  f"`{mc.slm}`, which does all of the decoding. Made with llm2slm.", ""]
    else:
        lines += [f"The SLM `{mc.slm}` fine-tuned alone (the LLM-to-SLM paper's baseline), made with llm2slm.", ""]
    rows = []
    if llm:
        rows.append(("LLM", f"`{llm['name']}` ({llm['kind']}, layer {llm['layer']}, {llm['dtype']}, d={llm['d_model']})"
                            + (", copied into `llm/`" if bundled else ", loaded by that name")))
        rows.append(("LLM fingerprint", f"sha256 `{llm['fingerprint']}` (loading refuses an LLM whose weights "
                                        "differ)"))
    rows.append(("SLM", f"`{mc.slm}` ({mc.slm_kind}" + (f", first {mc.slm_layers} layers" if mc.slm_layers else "")
                        + (f", PEFT {mc.peft.get('peft_type')}" if mc.peft else "") + ")"))
    if llm:
        rows.append(("method", f"fusion `{mc.fusion}`, tokenizer `{mc.tokenizer}`"
                               + (", vocabulary adapter" if mc.vocab_adapter else "")
                               + (f", vocabulary trimmed to {mc.trim_vocab['kept']:,} tokens" if mc.trim_vocab
                                  else "")))
    rows.append(("prompt template", f"`{mc.template}` (applied by `load` and `serve`)" if mc.template else "none"))
    rows.append(("longest prompt", f"{mc.max_prompt_length} tokens"))
    if counts.get("parameters"):
        rows.append(("parameters", f"{counts['parameters']:,} ({counts.get('trainable_parameters', 0):,} trained)"))
    inputs = cfg.get("inputs") or []
    if inputs:
        sha = (training or {}).get("inputs", {}).get("train_sha256")
        data = ", ".join(f"`{p}`" for p in inputs) + (f" (sha256 `{sha}`)" if sha else "")
        if counts.get("train_examples"):
            data += f", {counts['train_examples']:,} examples"
        rows.append(("training data", data))
        if cfg.get("dev"):
            rows.append(("dev data", ", ".join(f"`{p}`" for p in cfg["dev"])))
    budget = [f"step {checkpoint['step']}" if checkpoint.get("step") is not None else None,
              f"batch {cfg['batch_size']}" if cfg.get("batch_size") else None,
              f"max steps {cfg['max_steps']}" if cfg.get("max_steps") else
              (f"{cfg['epochs']} epoch(s)" if cfg.get("epochs") else None),
              f"lr {cfg['lr']}" if cfg.get("lr") is not None else None,
              f"weight decay {cfg['weight_decay']}" if cfg.get("weight_decay") is not None else None,
              f"seed {cfg['seed']}" if cfg.get("seed") is not None else None]
    if training and training.get("timing", {}).get("seconds") is not None:
        budget.append(f"{training['timing']['seconds']:,} s")
    if any(budget):
        rows.append(("training budget", ", ".join(b for b in budget if b)))
    result = (training or {}).get("result") or {}
    if result.get("train_loss") is not None:
        rows.append(("final loss", f"train {result['train_loss']:.4f}" + (
            f", dev {result['dev_loss']:.4f}" if result.get("dev_loss") is not None else "")))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | score |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in _scores(metrics).items()], ""]
        for metric in ("bleu", "chrf"):
            signature = (metrics.get("metrics", {}).get(metric) or {}).get("signature")
            if signature:
                lines += [f"{metric} signature: `{signature}`", ""]
    where = str(out)
    lines += ["## Use", "", "```bash", "pip install llm2slm-cli", "```", "", "```python",
              "from llm2slm_cli import load", "", f"model = load({where!r})",
              'print(model.generate(["..."], num_beams=4))   # the training template is applied', "```", "",
              "```bash", f"llm2slm generate --model {where} --prompt '...' --num-beams 4",
              f"llm2slm serve --model {where}                 # OpenAI-compatible API on 127.0.0.1:8000", "```", "",
              "## Files", "",
              "`llm2slm.json` (the method's configuration), `slm_config.json`, `model.safetensors` (projector and "
              "SLM), `tokenizer/`" + (", `llm/` (the frozen LLM)" if bundled else "") +
              ", `manifest.json` (sizes and sha256 of the weights, the training configuration).", ""]
    return "\n".join(lines)


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
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
