"""The checks on :meth:`HMT.forward`'s arguments, in one place (as torchtune's
``TransformerDecoder._validate_inputs``). Every message names the argument and says how to
fix it; the checks that read the device share one sync."""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules import TransformerDecoder

from hmt_plugin.modules.backbone import vocab_size_of
from hmt_plugin.modules.state import HMTState


def validate_inputs(
    backbone: TransformerDecoder,
    tokens: torch.Tensor,
    *,
    mask: Optional[torch.Tensor],
    seq_lens: Optional[Union[torch.Tensor, Sequence[int]]],
    labels: Optional[torch.Tensor],
    state: Optional[HMTState],
    logits: Union[str, int],
    loss_scope: str,
    outputs: str,
) -> Tuple[List[int], HMTState]:
    """Check :meth:`HMT.forward`'s arguments (see there) and raise ``ValueError`` (or
    ``RuntimeError`` for a backbone with KV caches enabled) on the first bad one.

    Returns:
        Tuple[List[int], HMTState]: per row, its real tokens; and the incoming state (a fresh
        one when ``state`` is None).
    """
    if loss_scope not in ("all", "last"):
        raise ValueError(f"loss_scope={loss_scope!r}: use 'all' or 'last'.")
    if outputs not in ("all", "loss"):
        raise ValueError(
            f"outputs={outputs!r}: use 'all' (every target's NLL, every summary) or 'loss' "
            "(only what the loss needs)."
        )
    if not (logits in ("all", "none") or (isinstance(logits, int) and logits >= 0)):
        raise ValueError(f"logits={logits!r}: use 'all', 'none' or a number of segments.")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, length]; got shape {tuple(tokens.shape)}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens must be integer token ids (torch.long); got dtype {tokens.dtype}."
        )
    batch = tokens.shape[0]
    if labels is not None and labels.shape != tokens.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} differs from tokens {tuple(tokens.shape)}; "
            "give one label per token, unshifted (normally the tokens themselves, with -100 "
            "where no loss is wanted)."
        )
    if backbone.caches_are_setup() and backbone.caches_are_enabled():
        raise RuntimeError(
            "the backbone has torchtune KV caches set up and enabled; HMT.forward reads "
            "segments without them. Use hmt_plugin.generation.HMTGenerator for cached "
            "decoding, or wrap the call in torchtune's disable_kv_cache(model.backbone)."
        )
    lengths = _row_lengths(backbone, tokens, mask, seq_lens, labels)
    if state is None:
        state = HMTState(segments_seen=[0] * batch)
    elif state.batch_size != batch:
        raise ValueError(
            f"state is for {state.batch_size} rows but tokens have {batch}; pass the state "
            "of a call on the same batch of documents."
        )
    return lengths, state


def _row_lengths(
    backbone: TransformerDecoder,
    tokens: torch.Tensor,
    mask: Optional[torch.Tensor],
    seq_lens: Optional[Union[torch.Tensor, Sequence[int]]],
    labels: Optional[torch.Tensor] = None,
) -> List[int]:
    """Real tokens per row, checked along with the token ids and labels in one device
    sync."""
    batch, width = tokens.shape
    vocab = vocab_size_of(backbone)
    ar = torch.arange(width, device=tokens.device)
    checks = []
    if seq_lens is not None:
        lengths = [int(x) for x in (seq_lens.tolist() if torch.is_tensor(seq_lens) else seq_lens)]
        if len(lengths) != batch or any(not 0 <= n <= width for n in lengths):
            raise ValueError(
                f"seq_lens={lengths} must give one length in [0, {width}] per row."
            )
        real = ar[None, :] < torch.tensor(lengths, device=tokens.device)[:, None]
    elif mask is not None:
        if mask.shape != tokens.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} differs from tokens {tuple(tokens.shape)}; "
                "give one True/False per token (or seq_lens)."
            )
        real = mask.to(torch.bool)
        counts = real.sum(dim=1)
        prefix = ar[None, :] < counts[:, None]
        checks = [counts, (prefix != real).any()[None].long()]
        lengths = None
    else:
        real = None
        lengths = [width] * batch
    bad = (tokens < 0) | (tokens >= vocab)
    if real is not None:
        bad &= real
    if labels is not None:
        # Cross-entropy reports a bad target as a bare "out of bounds" (on CUDA, as a
        # device-side assert); -1, another framework's ignore index, is the usual culprit.
        wrong = (labels != CROSS_ENTROPY_IGNORE_IDX) & ((labels < 0) | (labels >= vocab))
        if real is not None:
            wrong &= real
        checks.append(wrong.any()[None].long())
    checks.append(bad.any()[None].long())
    values = torch.cat(checks).tolist()
    if values[-1]:
        raise ValueError(
            f"tokens hold ids outside the backbone's vocabulary [0, {vocab}); check that the "
            "tokenizer matches the model (vocab_size) and that padding is masked."
        )
    if labels is not None and values[-2]:
        found = labels[wrong]
        raise ValueError(
            f"labels hold {found[0].item()}, outside the backbone's vocabulary [0, {vocab}); "
            f"mark positions without a target with {CROSS_ENTROPY_IGNORE_IDX} "
            "(CROSS_ENTROPY_IGNORE_IDX) and check that the labels come from the model's "
            "tokenizer."
        )
    if lengths is None:
        lengths = values[:batch]
        if values[batch]:
            raise ValueError(
                "mask must be True on a prefix of each row (right padding); got holes or "
                "left padding."
            )
    return lengths
