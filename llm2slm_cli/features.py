"""The features artifact: LLM hidden states of every prompt, stored once and read memory-mapped.

Layout of a features directory:

    features-00000.safetensors   one tensor "features" (tokens in the shard, d_llm), half precision; the prompts'
                                 rows are concatenated without padding
    index.parquet                id, shard, offset, length, input_ids (the prompt's LLM token ids), truncated
    manifest.json                the LLM (name, layer, dtype, fingerprint, tokenizer), template, input sha256,
                                 counts, size and sha256 of every shard and of the index, timing

Reading a prompt's features maps only its rows: training memory does not grow with the dataset. Each shard's
size and sha256 are checked against the manifest when it is first opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli.errors import UserError

INDEX_COLUMNS = ("id", "shard", "offset", "length", "input_ids", "truncated")
ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def feature_bytes(tokens: int, d_model: int, dtype: str) -> int:
    """The size of the stored features of `tokens` prompt tokens: one row of `d_model` values of `dtype` each, exact
    (the shards' safetensors headers, about a hundred bytes each, aside)."""
    return tokens * d_model * ELEMENT_BYTES[dtype]


def index_bytes(tokens: int, examples: int) -> int:
    """An allowance for an index of `examples` prompts of `tokens` tokens in all, estimated, not exact: the token ids
    as int32 plus 64 bytes a row (id, shard, offset, length, flag); parquet's compression usually makes it less."""
    return 4 * tokens + 64 * examples


def index_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    return pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "shard": pa.array([r["shard"] for r in rows], pa.int32()),
        "offset": pa.array([r["offset"] for r in rows], pa.int64()),
        "length": pa.array([r["length"] for r in rows], pa.int32()),
        "input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
        "truncated": pa.array([r["truncated"] for r in rows], pa.bool_()),
    })


class FeatureStore:
    """Read access to a features directory by example id."""

    def __init__(self, directory: Path) -> None:
        import pyarrow.parquet as pq

        self.directory = Path(directory)
        self.manifest = A.read_manifest(self.directory, A.KIND_FEATURES)
        index = self.directory / A.FEATURES_INDEX
        A.verify_file(index, self.manifest.get("files", {}).get(A.FEATURES_INDEX), "features index")
        try:
            table = pq.read_table(index)
        except Exception as e:  # a damaged index is a damaged artifact, whatever arrow calls it
            raise UserError(f"unreadable features index ({e})", path=index) from None
        # Columns stay as arrays: a Python object per token would cost more memory than the features themselves.
        self._row = {example_id: r for r, example_id in enumerate(table.column("id").to_pylist())}
        self._shard_of = table.column("shard").to_numpy()
        self._offset = table.column("offset").to_numpy()
        self._length = table.column("length").to_numpy()
        shards = len(self.manifest["shards"])
        if len(self._shard_of) and not 0 <= int(self._shard_of.min()) <= int(self._shard_of.max()) < shards:
            raise UserError(f"the index names shard {int(self._shard_of.max())}, the manifest lists {shards} "
                            "(a damaged or foreign artifact)", path=index)
        ids = table.column("input_ids").combine_chunks()
        self._id_values, self._id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
        self._files: dict[int, Any] = {}
        self._verified: set[int] = set()  # shards whose sha256 was checked (a DataLoader worker need not again)

    def __getstate__(self) -> dict[str, Any]:  # for DataLoader workers that are not forked: files reopen there
        return {**self.__dict__, "_files": {}}

    @property
    def dtype(self):
        """The torch dtype the features are stored in."""
        import torch

        return getattr(torch, self.manifest["feature_dtype"])

    @property
    def llm(self) -> dict[str, Any]:
        return self.manifest["llm"]

    @property
    def template(self) -> str | None:
        return self.manifest["template"]

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._row

    def check_prompts(self, tokens, examples, what: str = "") -> None:
        """Every example has features here, encoded from these very prompt tokens (corpus.Tokens and Examples);
        else one line naming the example."""
        for indices, rows in tokens.chunks("prompt_ids"):
            for ex_id, ids in zip(examples.ids(indices), rows):
                self.check_prompt(ex_id, ids, what)

    def check_prompt(self, ex_id: str, ids, what: str = "") -> None:
        """The example `ex_id` has features here, encoded from these prompt token ids; else one line naming it."""
        import numpy as np

        name = f"{what} example" if what else "example"
        if ex_id not in self:
            raise UserError(f"{name} {ex_id!r} has no features in {self.directory}: encode this file with the same "
                            "options")
        if not np.array_equal(self.input_ids(ex_id), ids):
            raise UserError(f"{name} {ex_id!r}: its prompt differs from the one encoded in {self.directory} "
                            "(another file, template or --max-length?)")

    def input_ids(self, example_id: str):
        """The prompt's LLM token ids, as an int32 numpy array."""
        r = self._row[example_id]
        return self._id_values[self._id_offsets[r]: self._id_offsets[r + 1]]

    def _shard(self, shard: int):
        from safetensors import safe_open

        if shard not in self._files:
            path = self.directory / A.FEATURES_SHARD.format(shard)
            # checked once, when first read: a damaged shard is named before it can feed training
            if shard not in self._verified:
                A.verify_file(path, self.manifest["shards"][shard], "feature shard")
                self._verified.add(shard)
            try:
                self._files[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise UserError(f"feature shard is damaged ({e})", path=path) from None
        return self._files[shard]

    def open_all(self) -> None:
        """Check and open every shard now (before DataLoader workers fork, which then share the open files)."""
        for shard in range(len(self.manifest["shards"])):
            self._shard(shard)

    def features(self, example_id: str):
        """(length, d_llm) half-precision tensor of one prompt."""
        r = self._row[example_id]
        offset = int(self._offset[r])
        return self._shard(int(self._shard_of[r])).get_slice("features")[offset: offset + int(self._length[r])]
