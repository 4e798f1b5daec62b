"""cpu_head: a wide vocabulary head computes its few decoding rows as W @ h.T inside our loop's steps, and is the
plain Linear everywhere else."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.nn import functional as F

from llm2slm_cli import cpu_head
from llm2slm_cli.decoding import Search, generate_plain
from llm2slm_cli.padding import strip_generated


def _head(bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(48, cpu_head.MIN_VOCAB, bias=bias)
    cpu_head.prepare(_Holder(head))
    return head


class _Holder(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_agree_with_linear_and_the_rest_is_linear_itself(bias):
    head = _head(bias)
    assert type(head) is cpu_head.WideHead
    with torch.inference_mode():
        for shape in [(1, 48), (1, 1, 48), (2, 3, 48), (5, 48), (cpu_head.ROWS, 48)]:
            x = torch.randn(*shape)
            want = F.linear(x, head.weight, head.bias)
            assert torch.equal(head(x), want)  # outside fast_heads(): the plain product
            with cpu_head.fast_heads():
                got = head(x)
            assert got.shape == want.shape and got.is_contiguous()
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        with cpu_head.fast_heads():
            x = torch.randn(cpu_head.ROWS + 1, 48)  # more rows than the fast path takes
            assert torch.equal(head(x), F.linear(x, head.weight, head.bias))
            x64 = x.double()
            assert torch.equal(head.double()(x64), F.linear(x64, head.weight, head.bias))  # float32 only
    # training: gradients flow through the plain Linear, also inside the block
    head = _head(bias).float()
    x = torch.randn(3, 48, requires_grad=True)
    with cpu_head.fast_heads():
        y = head(x)
    assert torch.equal(y, F.linear(x, head.weight, head.bias))
    y.sum().backward()
    assert head.weight.grad is not None


def test_prepare_marks_only_a_plain_wide_head_and_keeps_its_tie():
    from transformers import GPT2Config, GPT2LMHeadModel

    wide = GPT2LMHeadModel(GPT2Config(vocab_size=cpu_head.MIN_VOCAB, n_embd=32, n_layer=1, n_head=2))
    narrow = GPT2LMHeadModel(GPT2Config(vocab_size=cpu_head.MIN_VOCAB - 1, n_embd=32, n_layer=1, n_head=2))
    before = set(wide.state_dict())
    cpu_head.prepare(wide)
    cpu_head.prepare(narrow)
    assert type(wide.lm_head) is cpu_head.WideHead and type(narrow.lm_head) is torch.nn.Linear
    assert wide.lm_head.weight is wide.transformer.wte.weight and set(wide.state_dict()) == before
    from llm2slm_cli.quantize import quantize_linears

    for mode in ("int8", "int8-weight") if importlib.util.find_spec("torchao") else ("int8",):
        quantized = GPT2LMHeadModel(GPT2Config(vocab_size=cpu_head.MIN_VOCAB, n_embd=32, n_layer=1, n_head=2,
                                               tie_word_embeddings=False))
        quantize_linears(quantized, quantize=mode)  # torch.ao's packed Linear; torchao's tensor-subclass weight
        cpu_head.prepare(quantized)
        assert type(quantized.lm_head) is not cpu_head.WideHead, mode


def test_our_greedy_loop_with_a_wide_head_takes_the_fast_path_and_gives_transformers_tokens(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=cpu_head.MIN_VOCAB + 100, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=3, eos_token_id=1, pad_token_id=0)).eval()
    fast = []
    real = cpu_head.WideHead.forward
    monkeypatch.setattr(cpu_head.WideHead, "forward",
                        lambda self, x: fast.append(getattr(cpu_head._state, "on", False)) or real(self, x))
    ids = torch.randint(4, 1000, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    search = Search(max_new_tokens=12, eos_token_id=1, pad_token_id=0)
    ours = generate_plain(model, ids, mask, search)
    assert fast and all(fast)  # every step went through the fast head
    fast.clear()
    with torch.inference_mode():
        theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                pad_token_id=0, eos_token_id=1)[:, ids.shape[1]:]
    assert fast and not any(fast)  # transformers' generate: the plain Linear
    assert strip_generated(ours, 1, 0) == strip_generated(theirs, 1, 0)
