"""A KV cache for one HMT segment, attached to a torchtune decoder only while it decodes.

Why not torchtune's own ``setup_caches``:

* ``KVCache.update`` asserts on a device tensor (``cache_pos[0] + seq_len <= ...``) and
  ``KVCache.reset`` reads ``cache_pos[0].item()``: a host sync in every layer at every step.
  Here the write position is a host integer (the generator always knows it), so a decoding
  step costs no sync beyond the sampled token.
* torchtune's cache hands back its whole buffer, so every step attends over
  ``decoder_max_seq_len`` keys; this one hands back the filled prefix only.
* With any cache set up, torchtune's attention falls back to *non-causal* attention when it
  gets ``mask=None`` (``is_causal`` is only used when ``kv_cache is None``), even inside
  ``disable_kv_cache``. HMT's own forward passes ``mask=None`` whenever no padding is
  involved, so caches must be *absent*, not just disabled, whenever ``model(...)`` runs.
  :class:`SegmentCaches` therefore attaches its caches for the cached passes only and puts
  back whatever was there before.

The attention modules still do all the work: they call ``kv_cache.update(k, v)`` and attend
to what it returns, with the mask the caller passes (``[b, s, filled + s]``).
"""

from contextlib import contextmanager
from typing import ContextManager, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchtune.modules import TransformerDecoder


class SegmentKVCache(nn.Module):
    """Keys and values of up to ``length`` positions of one attention layer.

    Args:
        batch_size (int): rows.
        length (int): positions it can hold (the segment length).
        num_kv_heads (int): key/value heads of the layer.
        head_dim (int): per-head width.
        dtype (torch.dtype): dtype of the keys and values.
        device (torch.device): where they live.
    """

    def __init__(
        self,
        batch_size: int,
        length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, length, head_dim)
        self.register_buffer(
            "k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.batch_size = batch_size
        self.length = length
        self.filled = 0

    @property
    def size(self) -> int:
        return self.filled

    def reset(self) -> None:
        """Forget every position. Stale values stay in the buffer but are never handed out."""
        self.filled = 0

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append ``[b, n_kv, s, h_d]`` keys and values; return the ``[b, n_kv, filled, h_d]``
        keys and values held so far (views of the buffers)."""
        s = k_val.shape[2]
        end = self.filled + s
        if end > self.length:
            raise RuntimeError(
                f"segment KV cache overflow: {self.filled} + {s} positions > {self.length}. "
                "This is a bug in the generator's segment bookkeeping."
            )
        self.k_cache[:, :, self.filled : end] = k_val
        self.v_cache[:, :, self.filled : end] = v_val
        self.filled = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


class SegmentCaches:
    """One :class:`SegmentKVCache` per self-attention layer of ``decoder``.

    Args:
        decoder (TransformerDecoder): the backbone (driven by HMT).
        batch_size (int): rows decoded together.
        length (int): positions per segment pass, ``HMTConfig.segment_length``.
    """

    def __init__(self, decoder: TransformerDecoder, batch_size: int, length: int) -> None:
        weight = decoder.tok_embeddings.weight
        self.decoder = decoder
        self.batch_size = batch_size
        self.length = length
        self.caches: List[SegmentKVCache] = []
        for layer in decoder.layers:
            attn = layer.attn
            self.caches.append(
                SegmentKVCache(
                    batch_size,
                    length,
                    attn.num_kv_heads,
                    attn.head_dim,
                    weight.dtype,
                    weight.device,
                )
            )
        # causal[i, j]: position i may attend to position j. Rows are sliced per pass.
        self._causal = torch.ones(length, length, dtype=torch.bool, device=weight.device).tril()
        self._positions = torch.arange(length, device=weight.device)

    @property
    def filled(self) -> int:
        return self.caches[0].filled

    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()

    def mask_and_positions(self, s: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[b, s, filled + s]`` causal mask and ``[b, s]`` RoPE positions for the next ``s``
        positions (slices of tensors built once: no host-device traffic)."""
        start = self.filled
        mask = self._causal[start : start + s, : start + s]
        pos = self._positions[start : start + s]
        b = self.batch_size
        return mask[None].expand(b, -1, -1), pos[None].expand(b, -1)

    def attached(self) -> ContextManager[None]:
        """Inside: every attention layer of the decoder reads and writes these caches."""
        return _layer_caches(self.decoder, self.caches)


def caches_removed(decoder: TransformerDecoder) -> ContextManager[None]:
    """Inside: no attention layer has a KV cache, so passes without an explicit mask are
    causal (see the module docstring). Restores what was there on exit."""
    return _layer_caches(decoder, [None] * len(decoder.layers))


@contextmanager
def _layer_caches(
    decoder: TransformerDecoder, caches: Sequence[Optional[nn.Module]]
) -> Iterator[None]:
    """Inside: attention layer i of ``decoder`` uses ``caches[i]`` (None: no cache, caching
    disabled). Puts back what was there on exit."""
    saved: List[Tuple[nn.Module, Optional[nn.Module], bool]] = []
    try:
        for layer, cache in zip(decoder.layers, caches):
            attn = layer.attn
            saved.append((attn, attn.kv_cache, attn.cache_enabled))
            attn.kv_cache = cache
            attn.cache_enabled = cache is not None
        yield
    finally:
        for attn, cache, enabled in saved:
            attn.kv_cache = cache
            attn.cache_enabled = enabled
