"""The Hierarchical Memory Transformer wrapper (He et al., NAACL 2025, arXiv 2405.06067)."""

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules import TransformerDecoder

from hmt_plugin.modules.backbone import (
    drive_decoder,
    embed_dim_of,
    embed_tokens,
    project,
    run_layers,
    vocab_size_of,
)
from hmt_plugin.modules.hmt_config import HMTConfig, HMTConfigError
from hmt_plugin.modules.layout import ragged_layout
from hmt_plugin.modules.recall import MemoryRecall
from hmt_plugin.modules.segment_checkpoint import maybe_checkpoint, maybe_checkpoint_rows
from hmt_plugin.modules.state import HMTState

LogitsPolicy = Union[str, int]


@dataclass
class HMTOutput:
    """What one :class:`HMT` call returns.

    Attributes:
        logits (Optional[torch.Tensor]): ``[b, t_k, v]`` float32 logits of the input positions
            ``logits_start .. t-1`` (all of them, the last ``k`` segments', or None, as asked).
        logits_start (int): input position of ``logits[:, 0]``.
        nll (Optional[torch.Tensor]): ``[b, t]`` float32, ``-log p(labels[:, j] | everything
            before j)`` where labels are given and not ignored, else 0. Position 0 of a
            continued document is predicted from the previous call's last token.
        memories (Optional[torch.Tensor]): ``[b, s, m, d]`` memory embedding M_n written by
            each segment of this call (None in ``baseline`` mode).
        summaries (Optional[torch.Tensor]): ``[b, s, m, d]`` segment summaries S_n, the recall
            queries (``hmt`` mode only).
        recall_scores (Optional[torch.Tensor]): ``[b, s, m, cache_size]`` float32 recall
            weights, right-aligned: index ``-j`` is the memory written ``j`` memory vectors
            before the segment (``hmt`` mode; zeros where nothing was recalled).
        state (HMTState): pass to the next call to continue the same documents.
    """

    logits: Optional[torch.Tensor]
    logits_start: int
    nll: Optional[torch.Tensor]
    memories: Optional[torch.Tensor]
    summaries: Optional[torch.Tensor]
    recall_scores: Optional[torch.Tensor]
    state: HMTState

    def recall_distance(self, num_memory_tokens: int = 1) -> Optional[torch.Tensor]:
        """``[b, s]`` how many segments back each segment's strongest recall looks (the
        paper's Figure 11, the published code's "hist"); -1 where nothing was recalled."""
        if self.recall_scores is None:
            return None
        scores = self.recall_scores[:, :, 0]
        n = scores.shape[-1]
        vectors_back = n - scores.argmax(dim=-1)
        segments_back = (vectors_back + num_memory_tokens - 1) // num_memory_tokens
        return torch.where(scores.sum(-1) > 0, segments_back, torch.full_like(segments_back, -1))


class HMT(nn.Module):
    """Hierarchical Memory Transformer around a torchtune ``TransformerDecoder``.

    A document is read in segments of ``config.tokens_per_segment`` new tokens. For segment n:

    1. representation encoding: S_n = final-norm hidden state at the end of the backbone run
       on ``[mem; first summary_tokens of x_n; mem]`` (all segments in one batched call);
    2. memory search: P_n = softmax(q(S_n) k(C)^T / scale) C over the cache C of the last
       ``cache_size`` memory embeddings (the learnable ``initial_memory`` for the first segment);
    3. memory recall: the backbone reads ``[P_n; sensory; x_n; P_n]`` (sensory = the last
       ``num_sensory`` tokens of segment n-1), giving the logits of x_n and the new memory
       M_n = final-norm hidden state of the last position, which joins the cache.

    ``rmt`` and ``hmt_stage1`` carry M_{n-1} directly as P_n (without / with sensory tokens),
    ``baseline`` runs the backbone on each segment alone.

    The backbone keeps its own parameter names under ``backbone.``, so torchtune's
    checkpointers and weight converters apply to ``model.backbone`` unchanged. New parameters:
    ``initial_memory`` ``[m, d]``, ``summary_token`` ``[m, d]`` (the paper's ``mem``) and
    ``recall.{q,k}_proj.weight`` ``[d_h, d]``.

    Args:
        backbone (TransformerDecoder): any torchtune text decoder, LoRA/QLoRA variants included.
        config (HMTConfig): HMT settings.
    """

    def __init__(self, backbone: TransformerDecoder, config: HMTConfig) -> None:
        super().__init__()
        self.backbone = drive_decoder(backbone)
        if config.segment_length > self.backbone.max_seq_len:
            raise HMTConfigError(
                f"segment_length={config.segment_length} is longer than the backbone's "
                f"max_seq_len={self.backbone.max_seq_len}; lower segment_length or build the "
                "backbone with a larger max_seq_len."
            )
        self.config = config
        dim = embed_dim_of(self.backbone)
        m = config.num_memory_tokens
        if config.uses_memory:
            self.initial_memory = nn.Parameter(torch.empty(m, dim))
        if config.uses_recall:
            self.summary_token = nn.Parameter(torch.empty(m, dim))
            self.recall = MemoryRecall(
                dim, config.recall_hidden_dim or dim, config.score_scale, config.recall_dtype
            )
        self.reset_hmt_parameters()

    # ------------------------------------------------------------------ parameters
    def hmt_parameter_names(self) -> List[str]:
        """Names of the parameters HMT adds to the backbone."""
        return [n for n, _ in self.named_parameters() if not n.startswith("backbone.")]

    def adapter_params(self) -> List[str]:
        """torchtune's ``get_adapter_params`` collects these, so LoRA recipes train the HMT
        parameters along with the adapters (its ``set_trainable_params`` would freeze them)."""
        return self.hmt_parameter_names()

    def hmt_state_dict(self) -> Dict[str, torch.Tensor]:
        """The HMT parameters alone (the backbone's go through torchtune's checkpointer)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def fresh_hmt_state_dict(
        self, embeddings: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Dict[str, torch.Tensor]:
        """Initial HMT parameters as full CPU float32 tensors. Works on a model built on the
        meta device (only shapes are read), so distributed recipes can initialise before
        sharding.

        The memory embeddings (``initial_memory``, ``summary_token``) follow
        ``config.memory_init``: ``"mean_embedding"`` puts the mean token embedding in every
        row, an input the backbone has seen the like of (a random vector at position 0, where
        pretrained models keep their attention sink, disturbs the first segments of an
        untrained model); ``"published"`` draws them ~ N(0, std of the token embeddings), as
        the published code does. The recall projections are drawn as ``nn.Linear`` draws
        its weights.

        Args:
            embeddings (torch.Tensor): ``[vocab, d]`` the backbone's token embeddings.
            generator (Optional[torch.Generator]): for the random draws.
        """
        embeddings = embeddings.detach()
        out = {}
        for name, param in self.named_parameters():
            if name.startswith("backbone."):
                continue
            value = torch.empty(param.shape, dtype=torch.float32)
            if name in ("initial_memory", "summary_token"):
                if self.config.memory_init == "mean_embedding":
                    mean = embeddings.mean(dim=0, dtype=torch.float32).cpu()
                    value.copy_(mean.expand_as(value))
                else:
                    value.normal_(0.0, embeddings.float().std().item(), generator=generator)
            else:
                nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
            out[name] = value
        return out

    def reset_hmt_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-draw the HMT parameters from the current token embeddings (call it after loading
        pretrained backbone weights when no HMT checkpoint exists). No-op on meta tensors."""
        weight = self.backbone.tok_embeddings.weight
        params = {n: p for n, p in self.named_parameters() if not n.startswith("backbone.")}
        if not params or weight.is_meta or any(p.is_meta for p in params.values()):
            return
        fresh = self.fresh_hmt_state_dict(weight, generator)
        with torch.no_grad():
            for name, value in fresh.items():
                params[name].copy_(value)

    def set_mode(self, mode: str, *, keep_tokens_per_segment: bool = False) -> None:
        """Run the same weights in another mode: ``hmt`` -> ``hmt_stage1`` (recall ablation),
        ``rmt`` or ``baseline``. A mode needing parameters this model lacks is refused.
        ``keep_tokens_per_segment``: read as many new tokens per segment as now, with a
        shorter or longer backbone call (see :meth:`HMTConfig.with_mode`); comparisons of
        modes use it."""
        new = self.config.with_mode(mode, keep_tokens_per_segment=keep_tokens_per_segment)
        if new.uses_recall and not hasattr(self, "recall"):
            raise HMTConfigError(
                f"mode={mode!r} needs recall parameters this {self.config.mode!r} model does not "
                "have; build the model with mode='hmt' and load the stage-1 weights into it."
            )
        if new.uses_memory and not hasattr(self, "initial_memory"):
            raise HMTConfigError(
                f"mode={mode!r} needs memory parameters a 'baseline' model does not have."
            )
        if new.segment_length > self.backbone.max_seq_len:
            raise HMTConfigError(
                f"mode={mode!r} needs segment_length={new.segment_length}, more than the "
                f"backbone's max_seq_len={self.backbone.max_seq_len}."
            )
        self.config = new

    # ------------------------------------------------------------------ the four steps
    # forward, the generator and the speed profiler all read a segment through these.
    def sensory_memory(
        self, segment: torch.Tensor, previous: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """Sensory memory: what segment n+1 reads in front of its own tokens.

        Args:
            segment (torch.Tensor): ``[b, w]`` token ids of segment n.
            previous (Optional[torch.Tensor]): ``[b, k]`` the sensory memory before it.

        Returns:
            Optional[torch.Tensor]: ``[b, k]`` the last ``k = num_sensory`` tokens of the
            segment; ``previous`` in modes without sensory memory, or when the segment is
            shorter than ``k`` (a document's unfinished last segment).
        """
        k = self.config.sensory_tokens_used
        if k and segment.shape[1] >= k:
            return segment[:, segment.shape[1] - k :]
        return previous

    def summarize(
        self,
        ids: torch.Tensor,
        real_tokens: Optional[Sequence[int]] = None,
        *,
        checkpoint_rows: Optional[int] = None,
    ) -> torch.Tensor:
        """Representation encoding: S_n, the recall query of a segment, for many segments in
        one backbone call.

        Args:
            ids (torch.Tensor): ``[r, h]`` the first ``summary_tokens`` token ids of ``r``
                segments (of any documents), right-padded.
            real_tokens (Optional[Sequence[int]]): per row, how many of ``ids`` are real
                (None: all).
            checkpoint_rows (Optional[int]): recompute the call in backward, in chunks of this
                many rows (see :func:`~hmt_plugin.modules.segment_checkpoint.maybe_checkpoint_rows`);
                None keeps the activations.

        Returns:
            torch.Tensor: ``[r, m, d]`` final-norm hidden state at the trailing ``mem`` of
            ``[mem; ids; mem]``.
        """
        rows, h = ids.shape
        m = self.config.num_memory_tokens
        probe = self.summary_token.to(self._dtype()).expand(rows, m, -1)
        x = torch.cat([probe, embed_tokens(self.backbone, ids), probe], dim=1)
        attn_mask = positions = None
        if real_tokens is not None:
            attn_mask, positions = ragged_layout([[m, n, m] for n in real_tokens], [m, h, m], ids.device)
        hidden = maybe_checkpoint_rows(
            checkpoint_rows is not None, checkpoint_rows or rows, run_layers, self.backbone, x,
            mask=attn_mask, input_pos=positions,
        )
        return self.backbone.norm(hidden[:, hidden.shape[1] - m :])

    def search_memory(
        self,
        state: HMTState,
        summary: Optional[torch.Tensor],
        *,
        first: bool,
        batch: int,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Memory search: P_n, the memory segment n reads before and after its tokens.

        Args:
            state (HMTState): after segment n-1 (``memory`` M_{n-1}, the ``cache``).
            summary (Optional[torch.Tensor]): ``[b, m, d]`` S_n (``hmt`` mode).
            first (bool): segment n is its documents' first (P_n is ``initial_memory``).
            batch (int): b.

        Returns:
            Tuple: P_n ``[b, m, d]`` in the backbone's dtype (None in ``baseline``), and the
            recall weights ``[b, m, c]`` over the cache (None where nothing was recalled):
            ``hmt`` recalls with S_n, ``rmt`` and ``hmt_stage1`` carry M_{n-1}.
        """
        cfg = self.config
        if not cfg.uses_memory:
            return None, None
        dtype = self._dtype()
        if first:
            return self.initial_memory.to(dtype).expand(batch, cfg.num_memory_tokens, -1), None
        if not cfg.uses_recall:
            return state.memory.to(dtype), None
        recalled, scores = self.recall(summary, state.cache, state.cache_keys, state.cache_valid)
        return recalled.to(dtype), scores

    def segment_embeddings(
        self,
        prefix: Optional[torch.Tensor],
        sensory: Optional[torch.Tensor],
        segment: torch.Tensor,
        *,
        closed: bool = True,
    ) -> torch.Tensor:
        """The backbone input of segment n, ``[P_n; sensory; x_n; P_n]``: ``[b, m + k + w + m, d]``.

        Args:
            prefix (Optional[torch.Tensor]): ``[b, m, d]`` P_n (:meth:`search_memory`).
            sensory (Optional[torch.Tensor]): ``[b, k]`` :meth:`sensory_memory` of segment n-1;
                None for a document's first segment (ignored in modes without sensory memory).
            segment (torch.Tensor): ``[b, w]`` token ids x_n.
            closed (bool): False leaves out the trailing P_n (the generator adds it when the
                segment is full).
        """
        sensory = self._sensory_read(sensory)
        ids = segment if sensory is None else torch.cat([sensory.to(segment), segment], dim=1)
        h = embed_tokens(self.backbone, ids)
        if prefix is None:
            return h
        return torch.cat([prefix, h, prefix] if closed else [prefix, h], dim=1)

    def read_segment(
        self,
        prefix: Optional[torch.Tensor],
        sensory: Optional[torch.Tensor],
        segment: torch.Tensor,
        real_tokens: Sequence[int],
        *,
        checkpoint: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Memory recall: the backbone reads :meth:`segment_embeddings` ``[P_n; sensory; x_n; P_n]``.

        Args:
            prefix, sensory, segment: as in :meth:`segment_embeddings`.
            real_tokens (Sequence[int]): per row, how many of the ``w`` tokens are real.
            checkpoint (bool): recompute the call in backward instead of keeping activations.

        Returns:
            Tuple: ``[b, w, d]`` hidden states of x_n's positions and ``[b, m, d]`` those of
            the trailing P_n (None in ``baseline``), before the final norm.
        """
        m = self.config.memory_tokens_used
        sensory = self._sensory_read(sensory)
        k, w = (0 if sensory is None else sensory.shape[1]), segment.shape[1]
        x = self.segment_embeddings(prefix, sensory, segment)
        counts = [[m, k, n, m] for n in real_tokens]
        attn_mask, positions = ragged_layout(counts, [m, k, w, m], segment.device)
        hidden = maybe_checkpoint(
            checkpoint, run_layers, self.backbone, x, mask=attn_mask, input_pos=positions
        )
        closing = hidden[:, hidden.shape[1] - m :] if prefix is not None else None
        return hidden[:, m + k : m + k + w], closing

    def write_memory(self, closing: torch.Tensor, state: HMTState) -> HMTState:
        """Memory write: M_n = final norm of the hidden state at segment n's trailing P_n,
        which joins the cache (``hmt``; the newest ``cache_size`` vectors are kept).

        Args:
            closing (torch.Tensor): ``[b, m, d]`` from :meth:`read_segment`.
            state (HMTState): after segment n-1.

        Returns:
            HMTState: ``state`` with ``memory`` M_n and the updated cache.
        """
        memory = self.backbone.norm(closing)
        cache, keys, valid = state.cache, state.cache_keys, state.cache_valid
        if self.config.uses_recall:
            cache, keys, valid = self.recall.remember(memory, cache, keys, valid, self.config.cache_size)
        return replace(state, memory=memory, cache=cache, cache_keys=keys, cache_valid=valid)

    def _sensory_read(self, sensory: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # A state may carry sensory tokens into a mode that reads none (after set_mode).
        return sensory if self.config.sensory_tokens_used else None

    def _dtype(self) -> torch.dtype:
        return self.backbone.tok_embeddings.weight.dtype

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        seq_lens: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        labels: Optional[torch.Tensor] = None,
        state: Optional[HMTState] = None,
        logits: LogitsPolicy = "all",
        loss_scope: str = "all",
        outputs: str = "all",
        checkpoint_segments: bool = False,
    ) -> HMTOutput:
        """Read ``tokens`` segment by segment.

        Args:
            tokens (torch.Tensor): ``[b, t]`` token ids, right-padded.
            mask (Optional[torch.Tensor]): ``[b, t]`` bool, True on real tokens (a prefix of
                each row). Or give ``seq_lens``; neither means every token is real.
            seq_lens (Optional): per row, the number of real tokens.
            labels (Optional[torch.Tensor]): ``[b, t]`` targets, normally ``tokens`` with
                ``CROSS_ENTROPY_IGNORE_IDX`` (-100) where no loss is wanted; not shifted
                (position j is predicted from position j-1). Gives ``nll``.
            state (Optional[HMTState]): the ``state`` of a previous call on the same documents.
            logits: ``"all"``, ``"none"`` or an int k: logits of the last k segments (the
                published code's ``num_seg_save``).
            loss_scope (str): ``"all"`` or ``"last"``: where ``nll`` carries gradients. With
                ``"last"`` only the targets in each row's last segment do (the published
                training loss); the others are computed without a graph, for logging.
            outputs (str): ``"all"``: ``nll`` at every target and ``summaries`` of every
                segment. ``"loss"``: only what the loss needs: ``nll`` only in the segments
                that hold some row's loss targets (``loss_scope``), 0 in the others (with
                ``loss_scope="last"`` this skips the output projection of the earlier
                segments, which only logging reads), and no representation pass for the
                first segment of documents that start here (it recalls nothing; its summary
                is returned as zeros).
            checkpoint_segments (bool): recompute each backbone call in backward instead of
                keeping its activations (see :mod:`hmt_plugin.modules.segment_checkpoint`):
                activation memory grows by a few vectors per segment instead of every
                layer's activations, for one more forward per segment. Same loss and
                gradients.

        Returns:
            HMTOutput
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
        if self.backbone.caches_are_setup() and self.backbone.caches_are_enabled():
            raise RuntimeError(
                "the backbone has torchtune KV caches set up and enabled; HMT.forward reads "
                "segments without them. Use hmt_plugin.generation.HMTGenerator for cached "
                "decoding, or wrap the call in torchtune's disable_kv_cache(model.backbone)."
            )
        lengths = self._row_lengths(tokens, mask, seq_lens, labels)
        if state is None:
            state = HMTState(segments_seen=[0] * batch)
        elif state.batch_size != batch:
            raise ValueError(
                f"state is for {state.batch_size} rows but tokens have {batch}; pass the state "
                "of a call on the same batch of documents."
            )
        reader = _Reader(self, tokens, labels, lengths, state, logits, loss_scope)
        reader.all_outputs = outputs == "all"
        reader.checkpoint = bool(checkpoint_segments)
        return reader.run()

    def _row_lengths(
        self,
        tokens: torch.Tensor,
        mask: Optional[torch.Tensor],
        seq_lens: Optional[Union[torch.Tensor, Sequence[int]]],
        labels: Optional[torch.Tensor] = None,
    ) -> List[int]:
        """Real tokens per row, checked along with the token ids and labels in one device
        sync."""
        batch, width = tokens.shape
        vocab = vocab_size_of(self.backbone)
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


class _Reader:
    """One :meth:`HMT.forward` call: plans the segments on the host from the row lengths (so
    no step needs to wait for the device), then runs the batched representation pass and
    the sequential recall passes."""

    def __init__(
        self,
        model: HMT,
        tokens: torch.Tensor,
        labels: Optional[torch.Tensor],
        lengths: List[int],
        state: HMTState,
        logits_policy: LogitsPolicy,
        loss_scope: str,
    ) -> None:
        self.model = model
        self.cfg = model.config
        self.decoder = model.backbone
        self.device = tokens.device
        self.batch = tokens.shape[0]
        self.new_width = tokens.shape[1]
        self.logits_policy = logits_policy
        self.loss_scope = loss_scope
        # Set by HMT.forward (its ``outputs`` and ``checkpoint_segments``).
        self.all_outputs = True
        self.checkpoint = False
        self.state_in = state
        self.block = self.cfg.tokens_per_segment
        self._merge_pending(tokens, labels, lengths)

    # ------------------------------------------------------------------ planning
    def _merge_pending(
        self, tokens: torch.Tensor, labels: Optional[torch.Tensor], lengths: List[int]
    ) -> None:
        """Put the unfinished segment of the previous call in front of each continued row.

        Rows without new tokens are left as they are (their state passes through)."""
        st = self.state_in
        active = [n > 0 for n in lengths]
        pend = st.pending_lengths if st.pending is not None else [0] * self.batch
        pend = [p if a else 0 for p, a in zip(pend, active)]
        self.active = active
        self.offsets = pend
        self.lengths = [p + n if a else 0 for p, n, a in zip(pend, lengths, active)]
        fill = CROSS_ENTROPY_IGNORE_IDX
        if labels is None:
            targets = None
        else:
            real = torch.tensor(lengths, device=self.device)[:, None] > torch.arange(
                self.new_width, device=self.device
            )
            targets = labels.masked_fill(~real, fill)
        active_pend = {p for p, a in zip(pend, active) if a}
        if max(pend) == 0:
            self.tokens, self.targets = tokens, targets
        elif len(active_pend) == 1:
            p = active_pend.pop()
            self.tokens = torch.cat([st.pending[:, :p].to(tokens), tokens], dim=1)
            self.targets = None if targets is None else F.pad(targets, (p, 0), value=fill)
            self.offsets = [p] * self.batch
        else:
            width = max(pend) + self.new_width
            rows, trows = [], []
            for b in range(self.batch):
                row = torch.cat([st.pending[b, : pend[b]].to(tokens), tokens[b]])
                rows.append(F.pad(row, (0, width - row.numel())))
                if targets is not None:
                    trows.append(F.pad(targets[b], (pend[b], width - row.numel()), value=fill))
            self.tokens = torch.stack(rows)
            self.targets = torch.stack(trows) if targets is not None else None
        self.width = self.tokens.shape[1]
        self.n_segments = -(-self.width // self.block) if self.width else 0
        self.widths = [
            min(self.block, self.width - n * self.block) for n in range(self.n_segments)
        ]
        self.seg_lens = [
            [max(0, min(w, length - n * self.block)) for length in self.lengths]
            for n, w in enumerate(self.widths)
        ]

    def _check_stages(self) -> bool:
        """True when the active rows start fresh (no complete segment read yet)."""
        seen = [s for s, a in zip(self.state_in.segments_seen, self.active) if a]
        fresh = [s == 0 for s in seen]
        if any(fresh) and not all(fresh):
            raise ValueError(
                "this batch mixes documents that start fresh with documents continued from a "
                "state; read them in separate calls (or align their starts)."
            )
        return all(fresh)

    # ------------------------------------------------------------------ the read
    def run(self) -> HMTOutput:
        model, cfg = self.model, self.cfg
        fresh = self._check_stages()
        if self.n_segments == 0:
            return self._finish([], [], [], [], self._first_target_nll(None), None, {-1: self.state_in})
        # A fresh document's first segment starts from initial_memory: its summary is only
        # an output, computed unless the caller asked for the loss alone.
        skip = 1 if fresh and not self.all_outputs else 0
        summaries = self._summaries(skip) if cfg.uses_recall else None
        carry = self._carried_state()
        memories, scores_out, logits_out, nll_pred, snaps = [], [], [], [], {}
        snap_rows = self._snapshot_rows()
        if -1 in snap_rows:
            snaps[-1] = self.state_in
        nll_first = self._first_target_nll(carry.last_hidden)

        for n in range(self.n_segments):
            x = self.tokens[:, n * self.block : n * self.block + self.widths[n]]
            first = fresh and n == 0
            summary = None if summaries is None else summaries[:, n]
            prefix, scores = model.search_memory(carry, summary, first=first, batch=self.batch)
            token_hidden, closing = model.read_segment(
                prefix, None if first else carry.sensory, x, self.seg_lens[n],
                checkpoint=self.checkpoint,
            )
            self._outputs(n, token_hidden, logits_out, nll_pred)
            if cfg.uses_memory:
                carry = model.write_memory(closing, carry)
                memories.append(carry.memory)
            if cfg.uses_recall:
                scores_out.append(scores)
            carry = replace(
                carry, sensory=model.sensory_memory(x, carry.sensory), last_hidden=token_hidden[:, -1:]
            )
            if (n + 1) % cfg.bptt_depth == 0:
                carry = self._truncated(carry)
            if n in snap_rows:
                snaps[n] = carry
        return self._finish(memories, scores_out, logits_out, nll_pred, nll_first, summaries, snaps)

    def _carried_state(self) -> HMTState:
        """The incoming state as the loop carries it (memory, sensory, cache, last hidden)."""
        st = self.state_in
        keys = st.cache_keys
        if st.cache is not None and torch.is_grad_enabled():
            # The state is detached; keys projected again keep the key projection's gradient.
            keys = self.model.recall.keys(st.cache)
        return HMTState(
            segments_seen=st.segments_seen,
            memory=st.memory,
            sensory=st.sensory,
            cache=st.cache,
            cache_keys=keys,
            cache_valid=st.cache_valid,
            last_hidden=st.last_hidden,
        )

    def _truncated(self, carry: HMTState) -> HMTState:
        """Truncated BPTT: nothing later in this call backpropagates into the segments read
        so far. (The published code's manage_gradients rebinds a local name, so its
        truncation never happens.) The recall keys are re-projected from the detached
        memories: the key projection itself must keep its gradient."""
        memory = carry.memory.detach() if carry.memory is not None else None
        cache, keys = carry.cache, carry.cache_keys
        if cache is not None:
            cache = cache.detach()
            keys = self.model.recall.keys(cache) if torch.is_grad_enabled() else keys.detach()
        return replace(carry, memory=memory, cache=cache, cache_keys=keys)

    def _summaries(self, skip: int = 0) -> torch.Tensor:
        """:meth:`HMT.summarize` of every segment (but the first ``skip``, returned as zeros)
        in one batched backbone call: ``[b, s, m, d]``."""
        b, s, m = self.batch, self.n_segments, self.cfg.num_memory_tokens
        h = self.cfg.summary_tokens
        dtype = self.decoder.tok_embeddings.weight.dtype
        zeros = torch.zeros(b, skip, m, embed_dim_of(self.decoder), dtype=dtype, device=self.device)
        read = s - skip
        if read == 0:
            return zeros
        grid = F.pad(self.tokens, (0, s * self.block - self.width)).view(b, s, self.block)
        ids = grid[:, skip:, :h].reshape(b * read, h)
        real = [min(h, self.seg_lens[n][row]) for row in range(b) for n in range(skip, s)]
        rows = b if self.checkpoint else None
        out = self.model.summarize(ids, real, checkpoint_rows=rows).view(b, read, m, -1)
        return torch.cat([zeros.to(out.dtype), out], dim=1) if skip else out

    # ------------------------------------------------------------------ outputs
    def _kept(self, n: int) -> bool:
        policy = self.logits_policy
        if policy == "all":
            return True
        if policy == "none":
            return False
        return n >= self.n_segments - policy

    def _last_segment(self) -> List[int]:
        return [(length - 1) // self.block if length else -1 for length in self.lengths]

    def _outputs(self, n, token_hidden, logits_out, nll_pred) -> None:
        """Logits (if kept) and next-token NLL of segment n's positions, without building a
        graph for positions no loss needs."""
        keep = self._kept(n)
        if not keep and self.targets is None:
            return
        start, w = n * self.block, token_hidden.shape[1]
        targets = None
        if self.targets is not None:
            nxt = self.targets[:, start + 1 : start + w + 1]
            targets = F.pad(nxt, (0, w - nxt.shape[1]), value=CROSS_ENTROPY_IGNORE_IDX)
        if keep:
            logits = project(self.decoder, token_hidden)
            logits_out.append(logits)
            if targets is not None:
                nll_pred.append(_nll(logits, targets))
            return
        # Positions loss_from.. predict a target of the loss (a row's last segment starts at
        # n or n+1: the last position of segment n predicts the first target of n+1).
        loss_from = w
        if self.loss_scope == "all":
            loss_from = 0
        else:
            for last in self._last_segment():
                if last == n:
                    loss_from = 0
                elif last == n + 1:
                    loss_from = min(loss_from, w - 1)
        parts = []
        if loss_from > 0:
            if self.all_outputs:
                with torch.no_grad():  # for logging only: no graph
                    parts.append(_nll(project(self.decoder, token_hidden[:, :loss_from]), targets[:, :loss_from]))
            else:
                parts.append(token_hidden.new_zeros(self.batch, loss_from, dtype=torch.float32))
        if loss_from < w:
            parts.append(
                maybe_checkpoint(self.checkpoint, _projected_nll, self.decoder,
                                 token_hidden[:, loss_from:], targets[:, loss_from:])
            )
        nll_pred.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def _first_target_nll(self, last_hidden: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[b, 1]`` NLL of each row's first target, predicted by the previous call's last
        token (0 for documents that start here)."""
        if self.targets is None:
            return None
        if last_hidden is None:
            return torch.zeros(self.batch, 1, device=self.device)
        continued = torch.tensor(
            [s > 0 for s in self.state_in.segments_seen], device=self.device
        )[:, None]
        first = self.targets[:, :1].masked_fill(~continued, CROSS_ENTROPY_IGNORE_IDX)
        return _nll(project(self.decoder, last_hidden), first)

    def _snapshot_rows(self) -> Dict[int, List[int]]:
        """Segment after which each row's state is final: its last complete segment (-1: the
        incoming state). A trailing partial segment becomes ``pending`` instead."""
        rows: Dict[int, List[int]] = {}
        for b, (length, active) in enumerate(zip(self.lengths, self.active)):
            at = length // self.block - 1 if active else -1
            rows.setdefault(at, []).append(b)
        return rows

    def _finish(self, memories, scores, logits_out, nll_pred, nll_first, summaries, snaps) -> HMTOutput:
        b = self.batch
        cfg = self.cfg
        state = self._final_state(snaps)
        mem = torch.stack(memories, dim=1) if memories else None
        rec = None
        if cfg.uses_recall and memories:
            n_slots = cfg.cache_size
            padded = []
            for s in scores:
                if s is None:
                    padded.append(torch.zeros(b, cfg.num_memory_tokens, n_slots, device=self.device))
                else:
                    padded.append(F.pad(s, (n_slots - s.shape[-1], 0)))
            rec = torch.stack(padded, dim=1)
        logits, logits_start = None, self.new_width
        if logits_out:
            combined = torch.cat(logits_out, dim=1)
            first_kept = self.width - combined.shape[1]
            logits, logits_start = self._to_input_coords(combined, first_kept)
        nll = None
        if nll_first is not None:
            # Position j's target is predicted at position j-1: shift predictions onto targets.
            pred = torch.cat([nll_first, *nll_pred], dim=1)[:, : self.width]
            nll, _ = self._to_input_coords(pred, 0)
        return HMTOutput(
            logits=logits,
            logits_start=logits_start,
            nll=nll,
            memories=mem,
            summaries=summaries,
            recall_scores=rec,
            state=state,
        )

    def _to_input_coords(self, values: torch.Tensor, start: int) -> Tuple[torch.Tensor, int]:
        """Map ``[b, w, ...]`` values covering merged positions ``start..`` back onto the
        caller's token positions (the merged rows may begin with pending tokens)."""
        offsets = self.offsets
        if len(set(offsets)) == 1:
            drop = max(0, offsets[0] - start)
            return values[:, drop:], start + drop - offsets[0]
        if start != 0:
            raise ValueError(
                "rows continue unfinished segments of different lengths; ask for logits='all' "
                "or 'none' (or continue calls on segment boundaries)."
            )
        index = torch.arange(self.new_width, device=self.device)[None, :] + torch.tensor(
            offsets, device=self.device
        )[:, None]
        index = index.clamp(max=values.shape[1] - 1)
        if values.dim() == 3:
            index = index[:, :, None].expand(-1, -1, values.shape[-1])
        return values.gather(1, index), 0

    def _final_state(self, snaps: Dict[int, HMTState]) -> HMTState:
        """Per row, the state after its last complete segment, plus its unfinished tail."""
        b = self.batch
        rows = self._snapshot_rows()
        seen_in = self.state_in.segments_seen
        seen = list(seen_in)
        for at, members in rows.items():
            for r in members:
                seen[r] = seen_in[r] + at + 1
        tails = []
        for r in range(b):
            if not self.active[r]:
                p = self.state_in.pending_lengths[r] if self.state_in.pending is not None else 0
                tails.append(self.state_in.pending[r, :p] if p else None)
            else:
                full = (self.lengths[r] // self.block) * self.block
                tails.append(self.tokens[r, full : self.lengths[r]] if self.lengths[r] > full else None)
        pend_len = [0 if t is None else t.numel() for t in tails]
        pending = None
        if max(pend_len) > 0:
            pending = torch.zeros(b, max(pend_len), dtype=self.tokens.dtype, device=self.device)
            for r, t in enumerate(tails):
                if t is not None:
                    pending[r, : t.numel()] = t
        if len(rows) == 1:
            (at,) = rows
            src = snaps[at]
            merged = HMTState(
                segments_seen=seen,
                memory=src.memory,
                sensory=src.sensory,
                cache=src.cache,
                cache_keys=src.cache_keys,
                cache_valid=src.cache_valid,
                last_hidden=src.last_hidden,
            )
        else:
            merged = _merge_rows(snaps, rows, seen, b)
        merged.pending = pending
        merged.pending_lengths = pend_len if pending is not None else None
        return merged.detach()


def _projected_nll(decoder: TransformerDecoder, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[b, w, d]`` hidden states before the final norm -> ``[b, w]`` NLL of ``targets``."""
    return _nll(project(decoder, hidden), targets)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[b, w, v]`` logits and ``[b, w]`` targets -> ``[b, w]`` float32 NLL (0 where ignored)."""
    b, w = targets.shape
    if w == 0:
        return logits.new_zeros(b, 0, dtype=torch.float32)
    loss = F.cross_entropy(
        logits.reshape(b * w, -1).float(),
        targets.reshape(-1).long(),
        ignore_index=CROSS_ENTROPY_IGNORE_IDX,
        reduction="none",
    )
    return loss.view(b, w)


def _merge_rows(
    snaps: Dict[int, HMTState], rows: Dict[int, List[int]], seen: List[int], batch: int
) -> HMTState:
    """Assemble one state from per-row snapshots taken at different segments. Caches of
    different lengths are left-padded with invalid slots (oldest end)."""
    fields = ("memory", "sensory", "last_hidden")
    picked = {f: [None] * batch for f in fields}
    caches = [None] * batch
    for at, members in rows.items():
        src = snaps[at]
        for r in members:
            for f in fields:
                t = getattr(src, f)
                picked[f][r] = None if t is None else t[r]
            if src.cache is not None:
                v = src.cache_valid[r] if src.cache_valid is not None else None
                caches[r] = (src.cache[r], src.cache_keys[r], v)

    def stack(items):
        ref = next((t for t in items if t is not None), None)
        if ref is None:
            return None
        return torch.stack([t if t is not None else torch.zeros_like(ref) for t in items])

    out = HMTState(segments_seen=seen, **{f: stack(picked[f]) for f in fields})
    ref = next((c for c in caches if c is not None), None)
    if ref is not None:
        size = max(c[0].shape[0] for c in caches if c is not None)
        vals, ks, oks = [], [], []
        for c in caches:
            if c is None:
                c = (ref[0][:0], ref[1][:0], None)
            v, k, ok = c
            if ok is None:
                ok = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
            pad = size - v.shape[0]
            vals.append(F.pad(v, (0, 0, pad, 0)))
            ks.append(F.pad(k, (0, 0, pad, 0)))
            oks.append(F.pad(ok, (pad, 0), value=False))
        out.cache, out.cache_keys, out.cache_valid = torch.stack(vals), torch.stack(ks), torch.stack(oks)
    return out
