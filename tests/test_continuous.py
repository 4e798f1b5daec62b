"""Step-level (continuous) batching in the server's Engine: requests submitted one after another while the others
decode join the running batch at a step boundary and leave it when they end, and every response is token for token
what the Python API gives for that request alone. For a plain decoder-only model, a decoder-only LLM-to-SLM
checkpoint and an encoder-decoder one (T5 SLM, T5 LLM): greedy rows with different lengths, seeded sampling rows
(each from its own generator) and a beam-search request (decoded in a request-level batch between the running
batch's turns).

Fresh weights never end a response and a fresh T5 emits only padding, so the tests shape the SLM's head: padding is
never the winner, and the end token wins wherever the winner's id is a multiple of 6 (data-dependent, so rows end at
different steps; the same hook runs alone and batched)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from llm2slm_cli import checkpoint, load
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM
from llm2slm_cli.server.serving import Engine, Job, _key

PROMPTS = ["alpha beta", "a much longer prompt, with more words in it", "x", "gamma delta epsilon",
           "zeta eta theta iota kappa", "one"]


def _shape_head(model) -> None:
    decoder = model.impl.decoder
    eos, pad = decoder.generation_config.eos_token_id, decoder.generation_config.pad_token_id

    def hook(module, args, out):
        out = out.clone()
        if pad is not None and pad != eos:
            out[..., pad] = -1e4
        fire = out.argmax(-1) % 6 == 0
        out[..., eos] = torch.where(fire, out.max(-1).values + 0.5, out[..., eos])
        return out

    decoder.get_output_embeddings().register_forward_hook(hook)


@pytest.fixture(scope="module", params=["plain tiny-gpt2", "llm2slm tiny-llama -> tiny-gpt2",
                                        "llm2slm tiny-t5-large -> tiny-t5"])
def model(request, tmp_path_factory):
    kind, *names = request.param.split()
    if kind == "plain":
        m = load(names[0], device="cpu")
    else:
        llm, slm = names[0], names[2]
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp("ckpt") / "model"
        checkpoint.save(LLMToSLM.build(slm, FrozenLLM(llm)), directory)
        m = load(directory, device="cpu")
    _shape_head(m)
    return m


def _requests(model) -> list[dict]:
    """Greedy rows of different lengths, two seeded sampling rows, and a beam search last."""
    options = [dict(num_beams=1, max_new_tokens=10 + 4 * i) for i in range(len(PROMPTS))]
    options[2] = dict(sample=True, temperature=0.9, top_p=0.9, seed=11, max_new_tokens=18)
    options[4] = dict(sample=True, temperature=1.2, seed=12, max_new_tokens=20)
    return [*zip(PROMPTS, options), ("delta kappa", dict(num_beams=2, max_new_tokens=8))]


def _staggered(engine: Engine, model, requests) -> list:
    """Submit each request two decoding steps after the one before it (or once the engine is idle), so that it
    joins a batch in flight; then wait for them all: their Completions in order."""

    async def main():
        loop = asyncio.get_running_loop()
        queues = []
        for prompt, options in requests:
            decoding = model.decoding(**options)
            events: asyncio.Queue = asyncio.Queue()
            steps = len(engine.step_sizes)
            engine.submit([Job(0, model.prompt_ids([prompt])[0], decoding, _key(decoding), loop, events)])
            queues.append(events)
            await asyncio.sleep(0.005)
            while len(engine.step_sizes) < steps + 2 and (engine.pending or engine.decoding):
                await asyncio.sleep(0.002)
        results = []
        for events in queues:
            while (event := await asyncio.wait_for(events.get(), 120))[1] != "done":
                assert event[1] == "text", event
            results.append(event[2])
        return results

    return asyncio.run(main())


def test_rows_joining_a_running_batch_decode_as_alone(model):
    requests = _requests(model)
    alone = [model.complete([prompt], **options)[0] for prompt, options in requests]
    assert len({len(c.token_ids) for c in alone}) > 3  # rows end at different steps
    engine = Engine(model, max_batch_size=8, batching="step")
    assert engine.batching == "step"
    joined_into: list[int] = []  # rows already running at each join
    join, step = engine.steps.join, engine.steps.step
    engine.steps.join = lambda *a: joined_into.append(len(engine.steps)) or join(*a)
    engine.steps.step = lambda: time.sleep(0.01) or step()  # 10 ms a step: the next request comes within one
    engine.start()
    try:
        got = _staggered(engine, model, requests)
    finally:
        engine.stop()
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert [(c.text, c.finish_reason, c.prompt_tokens) for c in got] == \
        [(c.text, c.finish_reason, c.prompt_tokens) for c in alone]
    # six rows joined one by one (the beam search decoded in a request-level batch), most into a batch in flight
    assert len(joined_into) == 6 and joined_into[0] == 0 and sum(n > 0 for n in joined_into) >= 3
    assert max(engine.step_sizes) >= 3 and list(engine.batches) == [1]  # the beam search's batch
    assert engine.active == 0 and len(engine.steps) == 0 and engine.completed == len(requests)


def test_request_level_batching_is_still_there(model):
    """--batching request: the same outputs, from request-level batches only."""
    requests = _requests(model)[:3]
    alone = [model.complete([prompt], **options)[0] for prompt, options in requests]
    engine = Engine(model, batching="request")
    assert engine.steps is None and engine.batching == "request"
    engine.start()
    try:
        got = _staggered(engine, model, requests)
    finally:
        engine.stop()
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert not engine.step_sizes and sum(engine.batches) == 3


def test_speculative_models_keep_request_level_batches(tmp_path):
    torch.manual_seed(0)
    checkpoint.save(LLMToSLM.build("tiny-gpt2", FrozenLLM("tiny-llama")), tmp_path / "draft")
    spec = load("tiny-llama", draft=tmp_path / "draft", device="cpu")
    assert spec.steps() is None and Engine(spec, batching="step").batching == "request"
