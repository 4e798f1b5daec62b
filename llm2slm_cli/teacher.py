"""The LLM as a teacher: its top-K next-token distributions over every target token, stored once, read by `train`.

Logit distillation from the frozen LLM (the way NVIDIA's Minitron heals depth-pruned models, and DistillKit stores
top-k teacher logits offline). `distill-labels --top-k-logits K` runs the LLM teacher-forced over [prompt ; target]
for each example (the input's targets with --teacher-forced, else the LLM's own generated labels) and keeps, for
every target token, the K most likely next tokens and their log-probabilities (log-softmax over the LLM's whole
vocabulary, temperature 1). One safetensors file per shard, beside the examples:

    logits-NNNNN.safetensors   ids (tokens, K) int32, logprobs (tokens, K) float16, targets (tokens,) int32 (the
                               target token ids the distributions were computed on), offsets (examples + 1,) int64
    examples.parquet           gains logits_shard and logits_row: where each example's rows are

The targets are tokenized exactly as `train` tokenizes them (the text's tokens, then the end token, at most
--max-target-length), so train can check token for token that it distils the distributions of its own targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli.data import length_sorted_batches, pad
from llm2slm_cli.errors import UserError
from llm2slm_cli.padding import right_to_left

LOGITS_SHARD = "logits-{:05d}.safetensors"
TENSORS = ("ids", "logprobs", "targets", "offsets")


def teacher_topk(model, kind: str, prompt_ids: list, target_ids: list, k: int, *, pad_id: int,
                 decoder_start: int | None = None, batch_size: int = 8) -> list[tuple[Any, Any]]:
    """(ids (T, k) int32, logprobs (T, k) float16) per example: the teacher's top-k at every target position.

    Decoder-only: [left-padded prompt ; right-padded target], position ids counted from the first real token (the
    layout training uses), logits only at the positions that predict a target token. Encoder-decoder: the prompt
    is the encoder's input, the decoder reads [start ; target[:-1]]."""
    import torch

    device = next(model.parameters()).device
    lengths = [len(p) + len(t) for p, t in zip(prompt_ids, target_ids)]
    out: list[Any] = [None] * len(prompt_ids)
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, batch_size):
            p, pm = pad([prompt_ids[i] for i in batch], pad_id)
            t, tm = pad([target_ids[i] for i in batch], pad_id)
            p, pm, t, tm = p.to(device), pm.to(device), t.to(device), tm.to(device)
            if kind == "encoder-decoder":
                start = torch.full_like(t[:, :1], decoder_start if decoder_start is not None else pad_id)
                logits = model(input_ids=p, attention_mask=pm, decoder_input_ids=torch.cat([start, t[:, :-1]], 1),
                               use_cache=False).logits
            else:
                p, pm = right_to_left(p, pm)
                ids, mask = torch.cat([p, t], 1), torch.cat([pm, tm], 1)
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                               logits_to_keep=t.shape[1] + 1).logits[:, :-1]
            for row, i in enumerate(batch):
                n = len(target_ids[i])
                logprobs = logits[row, :n].float().log_softmax(-1)
                values, top = logprobs.topk(k, -1)
                out[i] = (top.to(torch.int32).cpu(), values.to(torch.float16).cpu())
    return out


def write_shard(path: Path, rows: list[tuple[Any, Any]], targets: list) -> None:
    """One shard's rows in example order, written under a temporary name and renamed."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    offsets = np.cumsum([0] + [len(t) for t in targets]).astype(np.int64)
    tensors = {"ids": torch.cat([r[0] for r in rows]), "logprobs": torch.cat([r[1] for r in rows]),
               "targets": torch.from_numpy(np.concatenate([np.asarray(t, dtype=np.int32) for t in targets])),
               "offsets": torch.from_numpy(offsets)}
    tmp = A.atomic_path(path)
    save_file(tensors, str(tmp))
    tmp.replace(path)


class TeacherLogits:
    """A distill-labels directory's stored distributions, verified against its manifest before any use."""

    def __init__(self, directory: Path) -> None:
        import numpy as np
        import pyarrow.parquet as pq
        from safetensors.numpy import load_file

        self.directory = Path(directory)
        manifest = A.read_manifest(self.directory, A.KIND_LABELS)
        info = manifest.get("logits")
        if not isinstance(info, dict):
            raise UserError("these labels hold no teacher distributions: make them with distill-labels "
                            "--top-k-logits K", path=self.directory)
        try:
            self.top_k, self.max_target_length = int(info["top_k"]), int(info["max_target_length"])
            files, self.llm = dict(info["files"]), dict(manifest["llm"])
            self.tokenizer_fingerprint = info["tokenizer_fingerprint"]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed 'logits' entry in the manifest ({e!r})", path=self.directory) from None
        labels = self.directory / A.LABELS
        A.verify_file(labels, manifest.get("files", {}).get(A.LABELS), "labels file")
        table = pq.read_table(labels, columns=["id", "logits_shard", "logits_row"])
        self.shards: list[dict[str, Any]] = []
        for k in range(len(files)):
            name = LOGITS_SHARD.format(k)
            if name not in files:
                raise UserError(f"the manifest lists no {name}", path=self.directory)
            A.verify_file(self.directory / name, files[name], "teacher logits shard")
            tensors = load_file(str(self.directory / name))
            if set(tensors) != set(TENSORS):
                raise UserError(f"holds {sorted(tensors)}, expected {list(TENSORS)}", path=self.directory / name)
            self.shards.append(tensors)
        self._where = dict(zip(table["id"].to_pylist(), zip(table["logits_shard"].to_pylist(),
                                                            table["logits_row"].to_pylist())))
        for shard in self.shards:
            if (shard["ids"].shape != shard["logprobs"].shape or shard["ids"].shape[1:] != (self.top_k,)
                    or shard["ids"].shape[0] != shard["targets"].shape[0]
                    or shard["offsets"][-1] != len(shard["targets"]) or not np.all(np.diff(shard["offsets"]) >= 0)):
                raise UserError("a teacher logits shard has inconsistent shapes", path=self.directory)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._where

    def rows(self, example_id: str) -> tuple[Any, Any, Any]:
        """(ids (T, K), logprobs (T, K), targets (T,)) of one example, as numpy arrays."""
        shard, row = self._where[example_id]
        s = self.shards[shard]
        a, b = s["offsets"][row], s["offsets"][row + 1]
        return s["ids"][a:b], s["logprobs"][a:b], s["targets"][a:b]

    def check(self, targets, tokenizer_fingerprint: str | None, what: str) -> None:
        """Refuse distributions that were not computed on these very target tokens, before any training. `targets`:
        (example id, target token ids) of every example."""
        import numpy as np

        if tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise UserError(f"the teacher logits in {self.directory} are over the tokens of "
                            f"{self.llm.get('name')!r}, but the SLM writes another vocabulary: distil only into an "
                            "SLM that writes the LLM's tokens")
        for ex_id, ids in targets:
            if ex_id not in self:
                raise UserError(f"{what} example {ex_id!r} has no teacher logits in {self.directory}")
            stored = self.rows(ex_id)[2]
            if not np.array_equal(stored, ids):
                raise UserError(f"{what} example {ex_id!r}: its target tokens differ from those the teacher logits "
                                f"in {self.directory} were computed on (another target, tokenizer or "
                                f"--max-target-length? they were made with {self.max_target_length})")
