"""Surgery on a loaded transformers model, in place: its dropout rates, which of its layers it keeps (--slm-layers),
which rows of its vocabulary it keeps (and widening a trimmed one back to the full vocabulary: for decoding in
memory, `widen_vocabulary`, or as a model to save, `widen_rows`)."""

from __future__ import annotations

from llm2slm_cli.errors import UserError
from llm2slm_cli.loading import T5_TYPES, model_kind, num_layers


def set_dropout(model, p: float) -> int:
    """Every dropout of a transformers model set to `p`: its nn.Dropout layers, and the rate its attention layers keep
    as a float (`dropout` in T5, `attention_dropout` in Llama/Gemma/Qwen; GPT2 reads its attn_dropout layer's p).
    PEFT's own dropouts (lora_dropout: --peft-lora-dropout) are left alone. Returns how many were set."""
    import torch.nn as nn

    n = 0
    for name, module in model.named_modules():
        if "lora_" in name:
            continue
        if isinstance(module, nn.Dropout):
            module.p = p
            n += 1
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, p)
                n += 1
    return n


def truncate_layers(model, layers: int | list[int], spec: str) -> None:
    """Keep some layers of `model` with their weights, in place: the first d (an int; paper Figure 4: GPT2 cut to 1,
    2, 4 layers) or the blocks at the given indices, in order (a list; negative counts from the end, e.g. [0, 1, -1]:
    the first two and the last, so the kept last block still writes into the space the head reads).

    Decoder-only: those blocks. Encoder-decoder: those blocks of the encoder and of the decoder (T5: block 0, which
    holds the relative position bias, must be kept). Embeddings, final norms and the head stay. The config's layer
    counts (and per-layer attention kinds) follow and each kept block is renumbered, so a checkpoint rebuilds the
    same shape and the KV cache sees consecutive layers."""
    from torch import nn

    config = model.config
    if model_kind(config) == "encoder-decoder":
        if config.model_type not in T5_TYPES:
            raise UserError(f"--slm-layers supports T5-family encoder-decoder SLMs, not {config.model_type!r}")
        stacks = [(model.get_encoder().block, "num_layers"), (model.get_decoder().block, "num_decoder_layers")]
    else:
        n = num_layers(config)
        lists = [m for m in model.base_model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        if not lists:
            raise UserError(f"cannot find the layer list of {spec!r} to keep {layers} of its layers")
        stacks = [(lists[0], "num_hidden_layers")]  # GPT2 maps num_hidden_layers to n_layer
    depth = min(len(blocks) for blocks, _ in stacks)
    if isinstance(layers, int):
        if not 1 <= layers <= depth:
            raise UserError(f"--slm-layers {layers}: the SLM {spec!r} has {depth} layers")
        keep = list(range(layers))
    else:
        keep = [i + depth if i < 0 else i for i in layers]
        if not keep or any(not 0 <= i < depth for i in keep) or keep != sorted(set(keep)):
            raise UserError(f"--slm-layers {','.join(map(str, layers))}: give distinct block indices in increasing "
                            f"order, each in [-{depth}, {depth - 1}] (the SLM {spec!r} has {depth} layers)")
        if model_kind(config) == "encoder-decoder" and keep[0] != 0:
            raise UserError("--slm-layers: a T5 SLM must keep block 0 (it holds the relative position bias)")
    for blocks, key in stacks:
        kept = [blocks[i] for i in keep]
        del blocks[:]
        for new, block in enumerate(kept):
            for m in block.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new
            blocks.append(block)
        setattr(config, key, len(keep))
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Gemma, Qwen, ...)
        config.layer_types = [config.layer_types[i] for i in keep]


def keep_vocabulary(model, kept) -> None:
    """Keep only the embedding and output-head rows of the token ids in `kept` (a sorted LongTensor), in place, in
    that order: new id i is old id kept[i]. Tied heads stay tied; the embedding module (e.g. Gemma's scaled one)
    stays the same class."""
    from torch import nn

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    sharing = _sharing(model, emb)
    old_pad = emb.padding_idx
    emb.weight = nn.Parameter(emb.weight.data[kept].clone(), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = len(kept)
    if old_pad is not None:
        where = (kept == old_pad).nonzero()
        emb.padding_idx = int(where[0, 0]) if len(where) else None
    _share(sharing, emb)
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(head.weight.data[kept].clone(), requires_grad=head.weight.requires_grad)
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias.data[kept].clone(), requires_grad=head.bias.requires_grad)
        head.out_features = len(kept)
    model.config.vocab_size = len(kept)
    text = getattr(model.config, "text_config", None)
    if text is not None and hasattr(text, "vocab_size"):
        text.vocab_size = len(kept)


def _sharing(model, emb) -> list:
    """The other embedding modules that read `emb`'s table: T5's encoder and decoder `embed_tokens` share the
    weight of `shared` (tied, not the same module), so replacing only `shared.weight` would leave them the old
    table, indexed by new ids."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not emb and
            getattr(m, "weight", None) is emb.weight]


def _share(modules: list, emb) -> None:
    for m in modules:
        m.weight = emb.weight
        m.num_embeddings = emb.num_embeddings
        m.padding_idx = emb.padding_idx


def widen_vocabulary(model, kept, full: int, *, fill: int) -> None:
    """Undo keep_vocabulary for a model that must read and score the full vocabulary (a draft for transformers'
    assisted generation), in place: row kept[i] gets new row i; other input rows copy row `fill` (the unknown
    token, as trimmed models read them); the head scores other tokens -1e4 through a bias, so they are never picked.
    The head is untied from the input embedding."""
    import torch
    from torch import nn

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = emb.weight.data
    rows = weight[fill].expand(full, -1).clone()
    rows[kept] = weight
    out = nn.Linear(weight.shape[1], full, bias=True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[kept] = head.weight.data
        out.bias.fill_(-1e4)
        out.bias[kept] = head.bias.data if getattr(head, "bias", None) is not None else 0.0
    sharing = _sharing(model, emb)
    emb.weight = nn.Parameter(rows, requires_grad=False)
    emb.num_embeddings = full
    _share(sharing, emb)
    model.set_output_embeddings(out)
    model.config.tie_word_embeddings = False
    model.config.vocab_size = full
    text = getattr(model.config, "text_config", None)
    if text is not None and hasattr(text, "vocab_size"):
        text.vocab_size = full


def widen_rows(model, kept, full: int, *, fill: int) -> list[int]:
    """Undo keep_vocabulary keeping the model's architecture, so that it saves and loads as a plain model of its
    class, in place: row kept[i] gets new row i; the rows of every other token, in the input embedding and in an
    untied head (bias included), copy row `fill` (the unknown token: they read, and score, as trimmed models read
    them). A tied head stays tied. No plain head can score those tokens below every kept one (their logits are the
    unknown token's), so the caller keeps generation from emitting them (generation_config.suppress_tokens).
    Returns the ids of the added rows."""
    import torch
    from torch import nn

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    sharing = _sharing(model, emb)

    def widened(rows: torch.Tensor) -> torch.Tensor:
        out = rows[fill].expand(full, *rows.shape[1:]).clone()
        out[kept] = rows
        return out

    emb.weight = nn.Parameter(widened(emb.weight.data), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = full
    if emb.padding_idx is not None:  # keep_vocabulary renumbered it
        emb.padding_idx = int(kept[emb.padding_idx])
    _share(sharing, emb)
    if head is not None:
        head.weight = emb.weight if tied else nn.Parameter(widened(head.weight.data),
                                                           requires_grad=head.weight.requires_grad)
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(widened(head.bias.data), requires_grad=head.bias.requires_grad)
        head.out_features = full
    model.config.vocab_size = full
    text = getattr(model.config, "text_config", None)
    if text is not None and hasattr(text, "vocab_size"):
        text.vocab_size = full
    missing = torch.ones(full, dtype=torch.bool)
    missing[kept] = False
    return missing.nonzero().flatten().tolist()
