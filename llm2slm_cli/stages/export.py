"""`llm2slm export`: a trained checkpoint as a self-contained directory with a model card.

The directory is a checkpoint as `train` writes it (llm2slm.json, slm_config.json, model.safetensors, tokenizer/,
manifest.json), without the training state (optimizer, RNG), plus README.md, a Hugging Face model card
(model_card.py), and transformers' files (hf_format.py: config.json, generation_config.json and the model code,
which `AutoModelForCausalLM`/`AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)` load). With the
LLM named by a local path (or --include-llm yes), the LLM's weights are copied into llm/, where loading finds them.
`load`, `generate` and `serve` take the directory; `huggingface_hub.upload_folder` uploads it as it is.
With --gguf, the SLM is also written as slm.gguf (gguf_export.py), which `--backend llama-cpp` decodes with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import fingerprints, gguf_export, hf_format, llama_backend, model_card, runtime
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
    if config.gguf != "none":
        gguf_export.check_quantization(config.gguf)
        gguf_export.check_exportable(model_config, A.read_json_or_none(src / A.SLM_CONFIG, "model_type"),
                                     f"--gguf {config.gguf}")

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
        if config.gguf != "none":
            extra.append(_write_gguf(src, work, config.gguf))
        name = config.name or out.resolve().name
        (work / A.MODEL_CARD).write_text(model_card.render(name, model_config, checkpoint, training, metrics,
                                                           bundled=include,
                                                           unsupported=hf_format.unsupported(model_config)))
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


def _write_gguf(src: Path, work: Path, quantization: str) -> str:
    """--gguf: the SLM as slm.gguf beside the checkpoint's files (the LLM is never loaded for it)."""
    import torch  # off the import of this module

    from llm2slm_cli import checkpoint  # imports torch: off the import of this module

    model = checkpoint.load(src, llm_weights="lazy").eval()
    with torch.inference_mode():
        gguf_export.write(model, work / llama_backend.DEFAULT_GGUF, quantization, threads=torch.get_num_threads())
    return llama_backend.DEFAULT_GGUF


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
