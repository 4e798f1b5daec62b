"""int8 weights for decoding on a CPU, applied in place: torchao's weight-only and dynamic int8, composed with
torch.compile; torch.ao's dynamic quantization as the deprecated fallback.

Every nn.Linear of what decodes (the SLM, and the LLM's encoder where it runs in this process) gets int8 weights,
one scale per output channel. GPT2's Conv1D layers (a Linear with a transposed weight) are made nn.Linear first, so
they are quantized too. What stays float: embedding lookups (one row read per token: nothing to gain), norms, the
projector (it runs once per prompt), and with "int8-body" the output head.

- "int8-weight": torchao's Int8WeightOnlyConfig. Activations stay float32, so the outputs stay close to float32's
  (on Gemma-family weights too, whose hidden states have a few very large channels). With --compile a decoding
  step's products are fused int8 loops (int8_linear.py); without it each call dequantizes its weight (slow: for
  memory, not speed).
- "int8-dynamic": torchao's Int8DynamicActivationInt8WeightConfig: activations quantized per row on every call, int8
  products (torchao's own kernels, compiled with --compile). Gemma-family outputs may suffer as torch.ao's did (the
  large channels take the 8-bit range; per-row scales were not measured on them).
- "int8", "int8-body" (head float32): torch.ao's quantize_dynamic (fbgemm kernels, eager only, activations scaled per
  tensor): deprecated by torch in favour of torchao and kept as a fallback for machines without torchao; its
  deprecation notices are silenced here. It moves Gemma-family outputs far from float32's (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from llm2slm_cli.errors import UserError

Quantize = Literal["none", "int8-weight", "int8-dynamic", "int8", "int8-body"]
QUANTIZE_CHOICES = ["none", "int8-weight", "int8-dynamic", "int8", "int8-body"]
TORCHAO = ("int8-weight", "int8-dynamic")  # through torchao.quantization.quantize_
LEGACY = ("int8", "int8-body")  # through torch.ao.quantization.quantize_dynamic (deprecated)
TORCHAO_INSTALL = "pip install 'llm2slm-cli[int8]' (torchao)"


def check_quantize(quantize: str, *, device: Any, dtype: str = "float32") -> None:
    """Refuse what int8 decoding cannot do: another device than the CPU, or weights in half precision."""
    if quantize == "none":
        return
    if getattr(device, "type", str(device).split(":")[0]) != "cpu":
        raise UserError(f"--quantize {quantize} is for decoding on a CPU (torch's int8 kernels), not on {device}: "
                        "add --device cpu, or use --dtype bfloat16 on an accelerator")
    if dtype not in ("float32", "fp32"):
        raise UserError(f"--quantize {quantize} quantizes float32 weights: leave --dtype {dtype} out")


def check_decode_options(*, quantize: str = "none", compile: bool = False, speculative: bool = False) -> None:
    """Refuse the combinations of --quantize, --compile and --speculative that do not work together."""
    if quantize != "none" and speculative:
        raise UserError(f"--quantize {quantize} is not for speculative decoding: the LLM that checks the drafts "
                        "would no longer give its own output")
    if compile and speculative:
        raise UserError("--compile is not for speculative decoding (it rewinds its caches; a static cache cannot)")
    if compile and quantize in LEGACY:
        raise UserError(f"--compile and --quantize {quantize} do not go together: torch.ao's quantized kernels run "
                        "eagerly; use --quantize int8-weight (or int8-dynamic) with --compile")


def conv1d_to_linear(root) -> int:
    """In place: GPT2's Conv1D modules (y = x W + b, W of shape (in, out)) -> nn.Linear(in, out) with W transposed.
    Returns how many were replaced."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    found = [(name, m) for name, m in root.named_modules() if isinstance(m, Conv1D)]
    for name, conv in found:
        d_in, d_out = conv.weight.shape
        linear = nn.Linear(d_in, d_out, bias=conv.bias is not None, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        linear.weight.data.copy_(conv.weight.data.t())
        if conv.bias is not None:
            linear.bias.data.copy_(conv.bias.data)
        linear.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, linear)
    return len(found)


def quantize_linears(root, *, skip: tuple[Any, ...] = (), quantize: str = "int8") -> list[str]:
    """In place: every nn.Linear under `root` except the modules in `skip` -> int8 weights per output channel, by
    `quantize` (torchao's int8-weight or int8-dynamic; torch.ao's dynamic quantization for int8 and int8-body).
    Returns the names (under `root`) of the layers quantized."""
    import torch
    from torch import nn

    conv1d_to_linear(root)
    skipped = {id(m) for m in skip if m is not None}
    names = [name for name, m in root.named_modules()
             if type(m) is nn.Linear and id(m) not in skipped and name]
    if not names:
        return []
    if quantize in TORCHAO:
        _torchao_quantize(root, set(names), quantize)
        return names
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, once per layer
        quantize_dynamic(root, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8,
                         inplace=True)
    return names


def quantize_model(model, quantize: str) -> dict[str, Any]:
    """Quantize what decodes in `model` (generation.PlainModel, or an LLMToSLM with its LLM), in place;
    returns what was done, for the manifest: {"quantize", "head", "layers"}."""
    if quantize == "none":
        return {}
    head = quantize != "int8-body"
    from llm2slm_cli.llm2slm import LLMToSLM  # imports torch: off the import of this module

    if isinstance(model, LLMToSLM):
        slm = _merged_slm(model)
        layers = len(quantize_linears(slm, skip=kept_float(slm, head), quantize=quantize))
        if model.llm is not None:
            layers += quantize_llm(model.llm, quantize)
    else:  # a plain transformers model: encoder and decoder (or the decoder-only stack) and the head
        inner = model.model
        layers = len(quantize_linears(inner, skip=kept_float(inner, head), quantize=quantize))
    return {"quantize": quantize, "library": "torchao" if quantize in TORCHAO else "torch.ao",
            "head": "int8" if head else "float32", "layers": layers}


def kept_float(model, head: bool) -> tuple[Any, ...]:
    """The modules of `model` that stay float: its input embedding (the vocabulary adapter's is a Linear over the
    LLM's rows, read as .weight by transformers), and the output head unless `head`."""
    keep = list(model.get_input_embeddings().modules())
    return (*keep, *(() if head else (model.get_output_embeddings(),)))


def quantize_llm(llm, quantize: str = "int8") -> int:
    """The part of a FrozenLLM that computes features (its fingerprint is taken first, from the float weights)."""
    _ = llm.fingerprint
    if llm.kind == "encoder-decoder":  # the encoder (an LLM loaded for features may be its encoder alone)
        part = llm.model.get_encoder() if hasattr(llm.model, "get_encoder") else llm.model
    elif llm.kind == "decoder-only":
        part = llm.model.base_model  # features come from the stack; the LM head never runs
    else:
        part = llm.model
    return len(quantize_linears(part, quantize=quantize))


def _merged_slm(model):
    """The SLM to quantize: a LoRA adapter is merged into its layers first (the same function, plain Linears);
    prompt and prefix tuning keep virtual tokens outside the SLM and are refused."""
    peft = (model.config.peft or {}).get("peft_type")
    if peft in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise UserError("--quantize does not take a prompt- or prefix-tuned checkpoint: use a LoRA, fully "
                        "fine-tuned or LLM-to-SLM one")
    if peft is not None:
        model.__dict__["peft_model"].merge_and_unload()
    return model.slm


def torchao_quantization():
    """torchao.quantization, or a one-line error saying how to install it (the notices its import logs are dropped
    where the package is imported: llm2slm_cli/__init__.py)."""
    try:
        from torchao import quantization
    except ImportError:
        raise UserError(f"--quantize int8-weight and int8-dynamic need torchao: {TORCHAO_INSTALL}") from None
    return quantization


def _torchao_quantize(root, names: set[str], quantize: str) -> None:
    import torch

    from llm2slm_cli import int8_linear  # imports torch: off the import of this module

    q = torchao_quantization()
    # torch.compile notes, once per process, that torchao's Int8Tensor has no stable hash for its autograd cache:
    # nothing a user can act on (the graph is compiled all the same)
    warnings.filterwarnings("ignore", message="Int8Tensor does not implement _stable_hash_for_caching")
    config = (q.Int8WeightOnlyConfig(set_inductor_config=False) if quantize == "int8-weight" else
              q.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    with torch.no_grad():
        q.quantize_(root, config, filter_fn=lambda _m, fqn: fqn in names)
    if quantize == "int8-weight":
        int8_linear.mark(root)
