"""The one seam between HMT and a torchtune ``TransformerDecoder``.

HMT needs four things from a decoder: embed token ids, run its layers on a sequence
of embeddings (some of which are memory vectors, not tokens), apply the final norm,
and project selected hidden states to the vocabulary. torchtune 0.6.1's decoder has
no ``input_embeds`` argument and always projects every position to the vocabulary, so
:func:`drive_decoder` adjusts two behaviours of one decoder *instance*, without touching
its parameters, its state-dict keys or torchtune's code:

* ``tok_embeddings`` passes floating-point input through unchanged (token ids are
  embedded as before), so ``decoder(embeds)`` runs the layers on embeddings;
* ``unembed`` returns the last hidden state, so ``decoder(...)`` ends before the final
  norm and HMT projects only the positions a loss or a caller needs, with the decoder's
  own (class-level) ``unembed``: norm, output projection (``nn.Linear``, LoRA or
  ``TiedLinear``) and the cast to float32;
* the last layer can compute the trailing positions alone (:class:`RowSelectingLayer`):
  most of HMT's backbone calls read only their last few outputs (a summary, the new
  memory), and nothing depends on the others.
"""

import math
from typing import Any, Optional

import torch
from torch import nn
from torchtune.models.gemma.gemma_norm_embedding import GemmaNormEmbeddings
from torchtune.modules import TransformerDecoder, TransformerSelfAttentionLayer


class BackboneError(TypeError):
    """The model handed to HMT is not a decoder HMT can drive."""


class _FloatPassthroughEmbedding(nn.Embedding):
    """``nn.Embedding`` that returns floating-point input as it is (already embedded)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return x
        return super().forward(x)


class _FloatPassthroughGemmaEmbedding(GemmaNormEmbeddings):
    """Gemma scales embeddings by ``sqrt(dim)``; Hugging Face Gemma applies the same scale to
    ``inputs_embeds``, so memory vectors get it too (what the published code does on Gemma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return x * torch.tensor(math.sqrt(self.embedding_dim), dtype=x.dtype)
        return super().forward(x)


_PASSTHROUGH = {
    nn.Embedding: _FloatPassthroughEmbedding,
    GemmaNormEmbeddings: _FloatPassthroughGemmaEmbedding,
    _FloatPassthroughEmbedding: _FloatPassthroughEmbedding,
    _FloatPassthroughGemmaEmbedding: _FloatPassthroughGemmaEmbedding,
}


class TrailingQueryRoPE(nn.Module):
    """A layer's rotary embedding, for queries that are the trailing rows of the keys' sequence.

    torchtune's attention applies one ``input_pos`` to its queries and to its keys. Given the
    keys' positions, this rotates a shorter query by their last ``q.shape[1]`` entries, which
    lets :class:`RowSelectingLayer` compute queries for the kept rows alone. For a query as
    long as its keys (every other call: training, prefill, KV-cache decoding) it is ``rope``.
    No parameters and no persistent buffers: state-dict keys do not change.
    """

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.rope = rope

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[b, s_x, n_h, h_d]`` -> the same, rotated; ``input_pos`` ``[b, s_y]`` or ``[s_y]``."""
        if input_pos is not None and input_pos.shape[-1] != x.shape[1]:
            input_pos = input_pos[..., input_pos.shape[-1] - x.shape[1]:]
        return self.rope(x, input_pos=input_pos)


class RowSelectingLayer(TransformerSelfAttentionLayer):
    """torchtune's self-attention layer, with the outputs of positions ``rows_from..`` only.

    The kept positions attend to every position as before (keys and values are computed for
    all of them); their queries, the attention output projection, the residual, the
    feed-forward norm and the feed-forward network are computed for the kept positions alone.
    With ``rows_from=0`` (how ``TransformerDecoder.forward`` calls it) it is the parent layer.
    Same parameters and state-dict keys; FSDP2 and activation checkpointing wrap it as they
    wrap the parent (they pass ``rows_from`` through). Its attention's rotary embedding is a
    :class:`TrailingQueryRoPE` (:func:`drive_decoder` installs both).
    """

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        rows_from: int = 0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``[b, s, d]`` -> ``[b, s - rows_from, d]``: the layer's outputs at ``rows_from..``."""
        h = self.sa_norm(x)
        # Queries for the kept rows alone need their positions (TrailingQueryRoPE) and a
        # tensor mask; otherwise every row is computed and the kept ones sliced out.
        rope = self.attn.pos_embeddings
        if (rows_from and (rope is None or isinstance(rope, TrailingQueryRoPE))
                and (mask is None or isinstance(mask, torch.Tensor))):
            s = x.shape[1]
            if mask is None:  # causal: kept row i (position rows_from + i) sees keys 0..rows_from + i
                mask = torch.ones(s - rows_from, s, dtype=torch.bool, device=x.device)
                mask = mask.tril(diagonal=rows_from)[None]
            else:
                mask = mask[:, rows_from:]
            if input_pos is None:
                input_pos = torch.arange(s, device=x.device)
            attn_out = self.attn(h[:, rows_from:], h, mask=mask, input_pos=input_pos)
        else:
            attn_out = self.attn(h, h, mask=mask, input_pos=input_pos)[:, rows_from:]
        h = self.sa_scale(attn_out) + x[:, rows_from:]
        return h + self.mlp_scale(self.mlp(self.mlp_norm(h)))


def _unwrapped(layer: nn.Module) -> nn.Module:
    # torch's activation-checkpoint wrapper keeps the layer here (and passes kwargs on).
    return getattr(layer, "_checkpoint_wrapped_module", layer)


def _return_hidden(h: torch.Tensor) -> torch.Tensor:
    return h


def drive_decoder(decoder: nn.Module) -> TransformerDecoder:
    """Check that ``decoder`` is a text ``TransformerDecoder`` and adjust it as described in
    the module docstring. Idempotent. Returns the same object.

    Raises:
        BackboneError: for anything else (vision/fusion models, a custom embedding class,
            chunked output already switched on, ...), naming what is wrong.
    """
    if not isinstance(decoder, TransformerDecoder):
        raise BackboneError(
            f"HMT wraps a torchtune TransformerDecoder (llama2/3, qwen2, mistral, gemma, phi3 "
            f"builders and their LoRA/QLoRA variants); got {type(decoder).__name__}. Pass a "
            "text decoder builder as `backbone`."
        )
    embedding = decoder.tok_embeddings
    passthrough = _PASSTHROUGH.get(type(embedding))
    if passthrough is None:
        raise BackboneError(
            f"HMT cannot feed memory embeddings through tok_embeddings of type "
            f"{type(embedding).__name__} (fusion/vision models are not supported). Use a "
            "text-only decoder."
        )
    if not all(isinstance(layer, TransformerSelfAttentionLayer) for layer in decoder.layers):
        raise BackboneError(
            "HMT needs a decoder made only of self-attention layers; this one has "
            "cross-attention or fusion layers. Use a text-only decoder."
        )
    embedding.__class__ = passthrough
    last = decoder.layers[-1]
    if type(last) is TransformerSelfAttentionLayer:  # a subclass may compute something else
        last.__class__ = RowSelectingLayer
        if last.attn.pos_embeddings is not None:
            last.attn.pos_embeddings = TrailingQueryRoPE(last.attn.pos_embeddings)
    # Chunked output returns a list meant for CEWithChunkedOutputLoss; HMT computes its
    # cross-entropy itself, segment by segment, on the positions that need it.
    decoder.num_output_chunks = 0
    # An instance attribute shadows TransformerDecoder.unembed for this object only.
    decoder.unembed = _return_hidden
    return decoder


def embed_dim_of(decoder: TransformerDecoder) -> int:
    return decoder.tok_embeddings.embedding_dim


def vocab_size_of(decoder: TransformerDecoder) -> int:
    return decoder.tok_embeddings.num_embeddings


def embed_tokens(decoder: TransformerDecoder, ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` token ids -> ``[b, s, d]`` raw embedding rows, in the same space as memory
    vectors: whatever input transform the embedding module has (Gemma's ``sqrt(dim)``
    scale) is applied once, to every position, when :func:`run_layers` feeds the decoder."""
    return nn.Embedding.forward(decoder.tok_embeddings, ids)


def run_layers(
    decoder: TransformerDecoder,
    embeds: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    input_pos: Optional[torch.Tensor] = None,
    rows_from: int = 0,
) -> torch.Tensor:
    """Decoder layers on embeddings.

    Args:
        decoder: a decoder prepared by :func:`drive_decoder`.
        embeds (torch.Tensor): ``[b, s, d]`` input embeddings.
        mask (Optional[torch.Tensor]): ``[b, s, s]`` bool attention mask (True = attend), or
            None for plain causal attention.
        input_pos (Optional[torch.Tensor]): ``[b, s]`` or ``[s]`` RoPE positions, or None
            for ``0..s-1``.
        rows_from (int): the caller reads positions ``rows_from..`` only; the last layer then
            computes those alone (:class:`RowSelectingLayer`).

    Returns:
        torch.Tensor: ``[b, s - rows_from, d]`` hidden state before the final norm.
    """
    if mask is None and decoder.caches_are_setup():
        # With a KV cache present (even disabled) torchtune's attention is not causal by
        # default when no mask is given: spell the causal mask out.
        s = embeds.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=embeds.device).tril()[None]
    *body, last = decoder.layers
    if not rows_from or decoder.caches_are_enabled() or not isinstance(_unwrapped(last), RowSelectingLayer):
        return decoder(embeds, mask=mask, input_pos=input_pos)[:, rows_from:]
    # TransformerDecoder.forward, with rows_from for the last layer (HMT's calls are checked
    # against max_seq_len when the model is built, and use no KV cache here).
    h = decoder.tok_embeddings(embeds)
    for layer in body:
        h = layer(h, mask=mask, input_pos=input_pos)
    return last(h, mask=mask, input_pos=input_pos, rows_from=rows_from)


def project(decoder: TransformerDecoder, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + output projection (the decoder's own ``unembed``) on ``[b, s, d]`` hidden
    states before the norm. Returns ``[b, s, v]`` float32 logits."""
    return type(decoder).unembed(decoder, hidden)
