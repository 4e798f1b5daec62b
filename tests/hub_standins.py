"""Stand-ins for the Hugging Face hub, so that the paper recipes run end to end offline.

`fill_hf_home(home, tokenizers)` writes, under HF_HOME=`home`:
- hub/models--ORG--NAME/: tiny fresh-weight models under the exact hub ids the paper recipes name (same architecture
  class and family as the real model: T5 with ReLU and tied embeddings, T5 v1.1 / Flan-T5 with gated GELU, GPT2 with
  its real layer count where a recipe selects layers), in the hub cache's layout (blobs/, snapshots/<commit>/,
  refs/main), so that `from_pretrained("t5-large")` resolves with HF_HUB_OFFLINE=1. Tokenizers are the real T5 and
  GPT2 vocabularies (../shared/data/tokenizers).
- datasets/NAME/CONFIG/...: a few dozen rows of each hub dataset the recipes read, with the real column schema, in
  the prepared-dataset cache that `datasets.load_dataset(NAME, CONFIG, split=...)` falls back to when offline
  (datasets' own builder writes it, from a local dataset repository with the hub's configs).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot every stand-in model is filed under

_T5 = dict(vocab_size=32128, d_kv=8, num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
           dropout_rate=0.0)
_GPT2 = dict(vocab_size=50257, n_positions=1024, n_head=2, bos_token_id=50256, eos_token_id=50256,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

# hub id -> (family, config): tiny shapes of the models the paper recipes name.
MODELS: dict[str, tuple[str, dict]] = {
    "t5-large": ("t5", dict(_T5, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                            feed_forward_proj="relu", tie_word_embeddings=True)),
    "t5-small": ("t5", dict(_T5, d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2,
                            feed_forward_proj="relu", tie_word_embeddings=True)),
    "google/t5-v1_1-small": ("t5", dict(_T5, d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2,
                                        feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "google/flan-t5-base": ("t5", dict(_T5, d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2,
                                       feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "declare-lab/flan-alpaca-xxl": ("t5", dict(_T5, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                                               feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    # GPT2's 12 layers and GPT2-XL's 48, as the real ones: the ablations cut GPT2 to 1-4 layers and read GPT2-XL's
    # layers 4, 12 and 24.
    "gpt2": ("gpt2", dict(_GPT2, n_embd=16, n_layer=12)),
    "gpt2-xl": ("gpt2", dict(_GPT2, n_embd=16, n_layer=48)),
}

_WORDS = {
    "en": "the a house cat dog tree river city small big old new red green walks sees runs finds",
    "de": "der die das Haus Katze Hund Baum Fluss Stadt klein gross alt neu rot gruen geht sieht",
    "fr": "le la maison chat chien arbre fleuve ville petit grand vieux neuf rouge vert marche voit",
    "ro": "casa pisica cainele copacul raul orasul mic mare vechi nou rosu verde merge vede",
}
# An 11B model is published in shards: its stand-in is too (weights found through model.safetensors.index.json).
SHARDED = {"declare-lab/flan-alpaca-xxl"}
SPLITS = {"train": 32, "validation": 8, "test": 8}


def _sentence(rng: random.Random, lang: str, n: int) -> str:
    return " ".join(rng.choice(_WORDS[lang].split()) for _ in range(n)).capitalize() + "."


def translation_rows(pair: str, n: int, seed: int) -> list[dict]:
    """WMT14/WMT16 rows: {"translation": {"de": ..., "en": ...}} (pair is "de-en", "fr-en", "ro-en")."""
    other = pair.split("-")[0]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(3, 9)
        rows.append({"translation": {other: _sentence(rng, other, k), "en": _sentence(rng, "en", k)}})
    return rows


def cnn_dailymail_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sentences = [_sentence(rng, "en", rng.randint(5, 12)) for _ in range(rng.randint(3, 6))]
        rows.append({"article": " ".join(sentences), "highlights": "\n".join(sentences[:2]),
                     "id": hashlib.sha1(f"{seed}-{i}".encode()).hexdigest()})
    return rows


def alpaca_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction = f"Describe the {rng.choice(_WORDS['en'].split()[2:9])} in one sentence."
        given = _sentence(rng, "en", 4) if i % 3 == 0 else ""  # Alpaca's input is empty for most records
        output = _sentence(rng, "en", rng.randint(4, 10))
        text = (f"Below is an instruction that describes a task. Write a response that appropriately completes the "
                f"request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")
        rows.append({"instruction": instruction, "input": given, "output": output, "text": text})
    return rows


# dataset -> config -> split -> rows (config None: the dataset's one default config)
def datasets_rows() -> dict[str, dict[str | None, dict[str, list[dict]]]]:
    wmt = {"wmt14": ["de-en", "fr-en"], "wmt16": ["ro-en"]}
    out: dict[str, dict[str | None, dict[str, list[dict]]]] = {
        name: {pair: {split: translation_rows(pair, n, seed) for seed, (split, n) in enumerate(SPLITS.items())}
               for pair in pairs}
        for name, pairs in wmt.items()}
    out["cnn_dailymail"] = {"3.0.0": {split: cnn_dailymail_rows(n, seed)
                                      for seed, (split, n) in enumerate(SPLITS.items())}}
    out["tatsu-lab/alpaca"] = {None: {"train": alpaca_rows(40, 0)}}
    return out


def _features(name: str, config: str | None):
    import datasets

    if name.startswith("wmt"):
        return datasets.Features({"translation": datasets.Translation(languages=config.split("-"))})
    if name == "cnn_dailymail":
        return datasets.Features({c: datasets.Value("string") for c in ("article", "highlights", "id")})
    return datasets.Features({c: datasets.Value("string") for c in ("instruction", "input", "output", "text")})


# ------------------------------------------------------------------------------------------------- the hub cache


def _file_into_cache(repo_dir: Path, source: Path) -> None:
    """Copy a snapshot directory's files into the hub cache layout: blobs named by their sha256, snapshot symlinks."""
    snapshot = repo_dir / "snapshots" / COMMIT
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        blob = repo_dir / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)


def _tokenizer(family: str, tokenizers: Path):
    from transformers import GPT2Tokenizer, T5Tokenizer

    return (T5Tokenizer if family == "t5" else GPT2Tokenizer).from_pretrained(str(tokenizers / family))


def write_models(hub_cache: Path, tokenizers: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    toks = {family: _tokenizer(family, tokenizers) for family in ("t5", "gpt2")}
    toks["t5"].model_max_length, toks["gpt2"].model_max_length = 512, 1024  # as the hub's tokenizer configs say
    for i, (hub_id, (family, config)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        if family == "t5":
            model = T5ForConditionalGeneration(T5Config(**config))
        else:
            model = GPT2LMHeadModel(GPT2Config(**config))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, **({"max_shard_size": "400KB"} if hub_id in SHARDED else {}))
            toks[family].save_pretrained(tmp)
            for name in ("spiece.model",) if family == "t5" else ("vocab.json", "merges.txt"):
                shutil.copyfile(tokenizers / family / name, Path(tmp) / name)  # as the hub's repositories hold them
            _file_into_cache(hub_cache / ("models--" + hub_id.replace("/", "--")), Path(tmp))


# --------------------------------------------------------------------------------------------- the datasets cache


def write_datasets(datasets_cache: Path) -> None:
    """Each stand-in as a local dataset repository (parquet files, the configs in its README's YAML, as on the hub),
    loaded once with datasets' own builder into `datasets_cache`, under the hub name: what load_dataset reads back
    offline."""
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        for name, configs in datasets_rows().items():
            repo = Path(tmp) / name.split("/")[-1]
            card = []
            for config, splits in configs.items():
                data_files = []
                for split, rows in splits.items():
                    path = f"{config or 'data'}/{split}-00000-of-00001.parquet"
                    (repo / path).parent.mkdir(parents=True, exist_ok=True)
                    datasets.Dataset.from_list(rows, features=_features(name, config)).to_parquet(repo / path)
                    data_files.append({"split": split, "path": path})
                card.append({"config_name": config or "default", "data_files": data_files})
            (repo / "README.md").write_text("---\n" + json.dumps({"configs": card}) + "\n---\n")
            for config in configs:
                datasets.load_dataset_builder(str(repo), config, cache_dir=str(datasets_cache)).download_and_prepare()
            if "/" in name:  # the cache files a namespaced hub dataset under NAMESPACE___NAME
                (datasets_cache / repo.name).rename(datasets_cache / name.replace("/", "___"))


def fill_hf_home(home: Path, tokenizers: Path) -> dict[str, str]:
    """Write every stand-in under `home`; returns the environment that makes the hub libraries use it, offline."""
    write_models(home / "hub", tokenizers)
    write_datasets(home / "datasets")
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "datasets"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


if __name__ == "__main__":  # python tests/hub_standins.py HF_HOME TOKENIZERS  (what test_paper_recipes.py runs)
    import sys

    for key, value in fill_hf_home(Path(sys.argv[1]), Path(sys.argv[2])).items():
        print(f"export {key}={value}")
