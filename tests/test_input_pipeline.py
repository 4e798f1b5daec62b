"""Issue 17, part 1: the training input pipeline (batching.py). The order is the one train always had; a DataLoader
with workers prepares the same micro-batches ahead (features half precision until the device), so results are
bitwise the same with any --num-workers; --bucket-by-length is another seeded order that still resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from test_load_only import same_weights

from llm2slm_cli.batching import TrainLoader, TrainPlan, epoch_order, to_device


def old_step_batches(n, seed, batch_size, micro, prompt_lengths, target_lengths, steps, rank=0, world=1):
    """train's order as it was written inline before batching.py (kept here verbatim as the reference)."""
    steps_per_epoch = -(-n // batch_size)
    perm, perm_epoch = None, -1
    for step in range(steps):
        epoch, s = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm, perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        global_batch = perm[s * batch_size: (s + 1) * batch_size]
        global_tokens = sum(target_lengths[i] for i in global_batch)
        local = sorted(global_batch[rank::world], key=lambda i: (prompt_lengths[i] + target_lengths[i], i))
        m = [local[j: j + micro] for j in range(0, len(local), micro)]
        weight = world / global_tokens
        if not m:
            m, weight = [global_batch[:1]], 0.0
        yield epoch, global_batch, global_tokens, m, weight


@pytest.mark.parametrize("n,batch,micro,world", [(37, 8, 4, 1), (37, 8, 2, 2), (9, 8, 4, 3), (16, 16, 16, 1)])
def test_the_plan_is_the_order_train_always_had(n, batch, micro, world):
    prompt = [(i * 7) % 11 + 1 for i in range(n)]
    target = [(i * 5) % 13 + 1 for i in range(n)]
    steps = 3 * -(-n // batch) + 1  # several epochs, the short last batch included
    for rank in range(world):
        plan = TrainPlan(n, seed=3, batch_size=batch, micro_batch_size=micro, prompt_lengths=prompt,
                         target_lengths=target, rank=rank, world=world)
        got = [(p.epoch, p.global_batch, p.global_tokens, p.micro, p.weight) for p in map(plan, range(steps))]
        assert got == list(old_step_batches(n, 3, batch, micro, prompt, target, steps, rank, world))
        assert [plan.micro_count(s) for s in range(steps)] == [len(g[3]) for g in got]


def _python_epoch_order(n, seed, epoch, lengths=None, batch_size=None):
    """epoch_order as it was written in Python lists before it was vectorised: the order must not change."""
    import torch

    from llm2slm_cli.batching import BUCKET_BATCHES

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return perm
    full = n - n % batch_size
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, full, window):
        chunk = sorted(perm[start: min(start + window, full)], key=lambda i: (lengths[i], i))
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=g).tolist()
    return [i for b in shuffled for i in batches[b]] + perm[full:]


@pytest.mark.parametrize("n,batch", [(200, 8), (1000, 7), (5, 8), (8 * 64 * 3 + 5, 8)])
def test_vectorised_epoch_order_is_the_python_order(n, batch):
    lengths = [(i * 37) % 11 + 1 for i in range(n)]  # many ties: the index breaks them
    for seed, epoch in [(0, 0), (3, 2)]:
        assert epoch_order(n, seed, epoch).tolist() == _python_epoch_order(n, seed, epoch)
        got = epoch_order(n, seed, epoch, lengths=lengths, batch_size=batch).tolist()
        assert got == _python_epoch_order(n, seed, epoch, lengths, batch)


def test_bucketed_order_is_a_seeded_permutation_with_less_padding():
    n, batch = 200, 8
    lengths = [(i * 37) % 97 + 1 for i in range(n)]
    order = epoch_order(n, 0, 0, lengths=lengths, batch_size=batch).tolist()
    assert sorted(order) == list(range(n))
    assert order == epoch_order(n, 0, 0, lengths=lengths, batch_size=batch).tolist()
    assert order != epoch_order(n, 0, 1, lengths=lengths, batch_size=batch).tolist()

    def padding(o):
        return sum(max(lengths[i] for i in o[k: k + batch]) * len(o[k: k + batch]) - sum(lengths[i] for i in
                   o[k: k + batch]) for k in range(0, n, batch))

    assert padding(order) < padding(epoch_order(n, 0, 0).tolist()) / 4


def test_loader_gives_the_plan_in_order_from_workers_without_touching_the_global_generator():
    n = 21
    plan = TrainPlan(n, seed=1, batch_size=6, micro_batch_size=2, prompt_lengths=[i % 5 + 1 for i in range(n)],
                     target_lengths=[i % 3 + 1 for i in range(n)])

    def make(indices):
        return list(indices), {"x": torch.tensor(indices, dtype=torch.float16)}

    expected = [m for s in range(2, 9) for m in plan(s).micro]
    for workers in (0, 2):
        torch.manual_seed(5)
        loader = TrainLoader(plan, 2, 9, make, num_workers=workers)
        got = [loader.next_batch() for _ in expected]
        loader.close()
        assert [g[0] for g in got] == expected
        torch.manual_seed(5)
        reference = torch.rand(3)
        torch.manual_seed(5)
        loader = TrainLoader(plan, 2, 9, make, num_workers=workers)
        loader.next_batch()
        loader.close()
        assert torch.equal(torch.rand(3), reference), "the loader drew from the global generator"
        assert loader.waited >= 0 and loader.batches == 1
    batch = to_device(got[0][1] | {"features": torch.ones(2, 3, dtype=torch.float16)}, "cpu", torch.float32)
    assert batch["features"].dtype == torch.float32 and batch["x"].dtype == torch.float16


def _train(cli, toy_files, feats, out, *extra):
    cli("train", toy_files["train"], "--llm", "tiny-t5-large", "--slm", "tiny-t5", "--features", feats, "--out", out,
        "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "2", "--device", "cpu", "--quiet", *extra)
    return out


@pytest.fixture(scope="module")
def stored(cli, toy_files, tmp_path_factory):
    feats = tmp_path_factory.mktemp("pipeline") / "feats"
    cli("encode", toy_files["train"], "--model", "tiny-t5-large", "--out", feats, "--quiet")
    return feats


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_workers_give_bitwise_the_same_run(cli, toy_files, stored, tmp_path):
    a = _train(cli, toy_files, stored, tmp_path / "w0")
    b = _train(cli, toy_files, stored, tmp_path / "w2", "--num-workers", "2")
    assert same_weights(a / "final", b / "final") and _losses(a) == _losses(b)
    timing = json.loads((b / "manifest.json").read_text())["timing"]
    assert timing["num_workers"] == 2 and 0 <= timing["data_wait_share"] < 1


def test_bucketed_run_resumes_exactly(cli, toy_files, stored, tmp_path):
    whole = _train(cli, toy_files, stored, tmp_path / "whole", "--bucket-by-length")
    assert _losses(whole) != _losses(_train(cli, toy_files, stored, tmp_path / "plain"))  # another order
    part = tmp_path / "part"
    _train(cli, toy_files, stored, part, "--bucket-by-length", "--stop-after", "3", "--num-workers", "1")
    _train(cli, toy_files, stored, part, "--bucket-by-length", "--resume")  # --num-workers may change on resume
    assert same_weights(whole / "final", part / "final") and _losses(whole) == _losses(part)
