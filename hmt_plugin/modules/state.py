"""What HMT carries from one call to the next for the same documents."""

from dataclasses import dataclass, replace
from typing import List, Optional

import torch


@dataclass
class HMTState:
    """Recurrent state of a batch of documents after some segments.

    Pass the ``state`` of one :class:`~hmt_plugin.modules.HMT` call to the next call to keep
    reading the same documents (same batch rows). Tensors are detached: gradients do not
    cross calls. The state belongs to the weights that produced it (cached recall keys are
    projections made with them).

    Attributes:
        segments_seen (List[int]): per row, complete segments read so far.
        memory (Optional[torch.Tensor]): ``[b, m, d]`` last memory embedding M_n written
            (what ``rmt`` and ``hmt_stage1`` carry into the next segment).
        sensory (Optional[torch.Tensor]): ``[b, k]`` the last k token ids of the last
            segment (``hmt``/``hmt_stage1``).
        cache (Optional[torch.Tensor]): ``[b, c, d]`` memory embeddings kept for recall,
            oldest first, ``c <= cache_size`` (``hmt``).
        cache_keys (Optional[torch.Tensor]): ``[b, c, d_h]`` their recall keys.
        cache_valid (Optional[torch.Tensor]): ``[b, c]`` bool; slots of rows with a shorter
            history are False (they sit at the oldest end). None when all are valid.
        last_hidden (Optional[torch.Tensor]): ``[b, 1, d]`` hidden state (before the final
            norm) of each row's last token, whose logits predict the next call's first token.
        pending (Optional[torch.Tensor]): ``[b, p]`` tokens of an unfinished segment at the end
            of the last call (right-padded); the next call reads that segment again with
            its continuation, so the result is the same as reading both calls at once.
        pending_lengths (List[int]): per row, how many of ``pending`` are real.
    """

    segments_seen: List[int]
    memory: Optional[torch.Tensor] = None
    sensory: Optional[torch.Tensor] = None
    cache: Optional[torch.Tensor] = None
    cache_keys: Optional[torch.Tensor] = None
    cache_valid: Optional[torch.Tensor] = None
    last_hidden: Optional[torch.Tensor] = None
    pending: Optional[torch.Tensor] = None
    pending_lengths: Optional[List[int]] = None

    @property
    def batch_size(self) -> int:
        return len(self.segments_seen)

    def detach(self) -> "HMTState":
        def d(t):
            return None if t is None else t.detach()

        return replace(
            self,
            memory=d(self.memory),
            cache=d(self.cache),
            cache_keys=d(self.cache_keys),
            last_hidden=d(self.last_hidden),
        )
