"""The Hierarchical Memory Transformer wrapper (He et al., NAACL 2025, arXiv 2405.06067)."""

import math
from dataclasses import replace
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import TransformerDecoder

from hmt_plugin.modules.backbone import drive_decoder, embed_dim_of, embed_tokens, run_layers
from hmt_plugin.modules.hmt_config import HMTConfig, HMTConfigError
from hmt_plugin.modules.layout import ragged_layout
from hmt_plugin.modules.outputs import HMTOutput, LogitsPolicy, SegmentOutputs
from hmt_plugin.modules.recall import MemoryRecall
from hmt_plugin.modules.segment_checkpoint import maybe_checkpoint, maybe_checkpoint_rows
from hmt_plugin.modules.state import HMTState
from hmt_plugin.modules.streaming import StreamRows, final_state, merge_pending, starts_fresh
from hmt_plugin.modules.validation import validate_inputs

__all__ = ["HMT", "HMTOutput"]


class HMT(nn.Module):
    """Hierarchical Memory Transformer around a torchtune ``TransformerDecoder``.

    A document is read in segments of ``config.tokens_per_segment`` new tokens. For segment n,
    the paper's four steps, each a public method (:meth:`forward`, the generator and the speed
    profiler all read through them):

    1. sensory memory (:meth:`sensory_memory`): the last ``num_sensory`` tokens of segment
       n-1, read again in front of x_n;
    2. representation encoding (:meth:`summarize`): S_n = final-norm hidden state at the end
       of the backbone run on ``[mem; first summary_tokens of x_n; mem]`` (all segments of a
       call in one batched call);
    3. memory search (:meth:`search_memory`): P_n = softmax(q(S_n) k(C)^T / scale) C over the
       cache C of the last ``cache_size`` memory embeddings (the learnable ``initial_memory``
       for the first segment);
    4. memory recall and write (:meth:`read_segment`, :meth:`write_memory`): the backbone reads
       ``[P_n; sensory; x_n; P_n]``, giving the logits of x_n and the new memory M_n =
       final-norm hidden state of the last position, which joins the cache.

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
            if config.memory_scale == "embedding":
                self.memory_norm = nn.Parameter(torch.empty(1))
            if config.memory_sink:
                self.sink = nn.Parameter(torch.empty(1, dim))
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
        the published code does. ``memory_norm`` (``memory_scale="embedding"``) starts at the
        median token-embedding norm, ``sink`` (``memory_sink``) at the mean token embedding.
        The recall projections are drawn as ``nn.Linear`` draws its weights.

        Args:
            embeddings (torch.Tensor): ``[vocab, d]`` the backbone's token embeddings.
            generator (Optional[torch.Generator]): for the random draws.
        """
        embeddings = embeddings.detach()
        means: List[torch.Tensor] = []

        def mean_embedding() -> torch.Tensor:
            # One pass over the embedding matrix, however many rows start from its mean.
            if not means:
                means.append(embeddings.mean(dim=0, dtype=torch.float32).cpu())
            return means[0]

        out = {}
        for name, param in self.named_parameters():
            if name.startswith("backbone."):
                continue
            value = torch.empty(param.shape, dtype=torch.float32)
            if name == "memory_norm":
                # The length of a typical token embedding: what position 0 held in pretraining.
                value.fill_(embeddings.float().norm(dim=-1).median().item())
            elif name == "sink":
                # What position 0 held in pretraining: a token, not a memory.
                value.copy_(mean_embedding().expand_as(value))
            elif name in ("initial_memory", "summary_token"):
                if self.config.memory_init == "mean_embedding":
                    value.copy_(mean_embedding().expand_as(value))
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
        self._use_config(self.config.with_mode(mode, keep_tokens_per_segment=keep_tokens_per_segment))

    def set_num_sensory(self, num_sensory: int) -> None:
        """Read with ``num_sensory`` sensory tokens and as many new tokens per segment as now
        (:meth:`HMTConfig.with_sensory`): e.g. 0, to ask what the memory carries alone."""
        self._use_config(self.config.with_sensory(num_sensory))

    def _use_config(self, new: HMTConfig) -> None:
        """Switch to ``new`` settings for the same weights, refusing what they cannot run."""
        mode = new.mode
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
                f"mode={mode!r} with num_sensory={new.num_sensory} needs segment_length="
                f"{new.segment_length}, more than the backbone's max_seq_len="
                f"{self.backbone.max_seq_len}."
            )
        self.config = new

    # ------------------------------------------------------------------ the four steps
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
        # Only the trailing mem's outputs are read: the last layer computes those alone.
        hidden = maybe_checkpoint_rows(
            checkpoint_rows is not None, checkpoint_rows or rows,
            partial(run_layers, rows_from=x.shape[1] - m), self.backbone, x,
            mask=attn_mask, input_pos=positions,
        )
        return self.backbone.norm(hidden)

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
        """The backbone input of segment n, ``[P_n; sensory; x_n; P_n]``: ``[b, m + k + w + m, d]``
        (``[sink; P_n; ...]``, one position more, with ``memory_sink``).

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
        parts = [prefix, h, prefix] if closed else [prefix, h]
        if self.config.sink_tokens_used:
            parts.insert(0, self.sink.to(prefix.dtype).expand(prefix.shape[0], 1, -1))
        return torch.cat(parts, dim=1)

    def read_segment(
        self,
        prefix: Optional[torch.Tensor],
        sensory: Optional[torch.Tensor],
        segment: torch.Tensor,
        real_tokens: Sequence[int],
        *,
        tokens_from: int = 0,
        checkpoint: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Memory recall: the backbone reads :meth:`segment_embeddings` ``[P_n; sensory; x_n; P_n]``.

        Args:
            prefix, sensory, segment: as in :meth:`segment_embeddings`.
            real_tokens (Sequence[int]): per row, how many of the ``w`` tokens are real.
            tokens_from (int): the first of x_n's positions whose hidden state the caller
                reads (``< w``); the last layer computes only those and the trailing P_n.
            checkpoint (bool): recompute the call in backward instead of keeping activations.

        Returns:
            Tuple: ``[b, w - tokens_from, d]`` hidden states of x_n's positions
            ``tokens_from..`` and ``[b, m, d]`` those of the trailing P_n (None in
            ``baseline``), before the final norm.
        """
        m, z = self.config.memory_tokens_used, self.config.sink_tokens_used
        sensory = self._sensory_read(sensory)
        k, w = (0 if sensory is None else sensory.shape[1]), segment.shape[1]
        x = self.segment_embeddings(prefix, sensory, segment)
        counts = [[z, m, k, n, m] for n in real_tokens]
        attn_mask, positions = ragged_layout(counts, [z, m, k, w, m], segment.device)
        hidden = maybe_checkpoint(
            checkpoint, run_layers, self.backbone, x, mask=attn_mask, input_pos=positions,
            rows_from=z + m + k + tokens_from,
        )
        closing = hidden[:, hidden.shape[1] - m :] if prefix is not None else None
        return hidden[:, : w - tokens_from], closing

    def write_memory(self, closing: torch.Tensor, state: HMTState) -> HMTState:
        """Memory write: M_n = final norm of the hidden state at segment n's trailing P_n
        (rescaled to length ``memory_norm`` with ``memory_scale="embedding"``), which joins the
        cache (``hmt``; the newest ``cache_size`` vectors are kept).

        Args:
            closing (torch.Tensor): ``[b, m, d]`` from :meth:`read_segment`.
            state (HMTState): after segment n-1.

        Returns:
            HMTState: ``state`` with ``memory`` M_n and the updated cache.
        """
        memory = self.backbone.norm(closing)
        if self.config.memory_scale == "embedding":
            length = memory.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(memory.dtype).tiny)
            memory = memory * (self.memory_norm.to(memory.dtype) / length)
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
        lengths, state = validate_inputs(
            self.backbone, tokens, mask=mask, seq_lens=seq_lens, labels=labels, state=state,
            logits=logits, loss_scope=loss_scope, outputs=outputs,
        )
        rows = merge_pending(tokens, labels, lengths, state, self.config.tokens_per_segment)
        heads = SegmentOutputs(
            self.backbone, rows, logits_policy=logits, loss_scope=loss_scope,
            all_outputs=outputs == "all", checkpoint=bool(checkpoint_segments),
        )
        return self._read(rows, state, heads)

    def _read(self, rows: StreamRows, state: HMTState, heads: SegmentOutputs) -> HMTOutput:
        """The segment loop: the batched representation pass, then segment by segment."""
        cfg, checkpoint = self.config, heads.checkpoint
        fresh = starts_fresh(rows, state)
        summaries = None
        if cfg.uses_recall and rows.n_segments:
            # A fresh document's first segment starts from initial_memory: its summary is
            # only an output, computed unless the caller asked for the loss alone.
            skip = 1 if fresh and not heads.all_outputs else 0
            summaries = self._summaries(rows, skip, checkpoint)
        carry = self._carried_state(state)
        heads.first_target(carry.last_hidden if rows.n_segments else None, state)
        # Rows end in different segments: keep the state after each row's last complete one.
        snap_rows = rows.snapshot_rows()
        snaps = {-1: state} if -1 in snap_rows else {}
        memories, scores = [], []
        for n in range(rows.n_segments):
            x, first = rows.segment(n), fresh and n == 0
            summary = None if summaries is None else summaries[:, n]
            prefix, recalled = self.search_memory(carry, summary, first=first, batch=rows.batch)
            # The state keeps the last position's hidden state whatever the heads read.
            reads_from = min(heads.reads_from(n, x.shape[1]), x.shape[1] - 1)
            token_hidden, closing = self.read_segment(
                prefix, None if first else carry.sensory, x, rows.seg_lens[n],
                tokens_from=reads_from, checkpoint=checkpoint,
            )
            heads.add(n, token_hidden, x.shape[1])
            if cfg.uses_memory:
                carry = self.write_memory(closing, carry)
                memories.append(carry.memory)
            if cfg.uses_recall:
                scores.append(recalled)
            carry = replace(
                carry, sensory=self.sensory_memory(x, carry.sensory), last_hidden=token_hidden[:, -1:]
            )
            if (n + 1) % cfg.bptt_depth == 0:
                carry = self._truncated(carry)
            if n in snap_rows:
                snaps[n] = carry
        return heads.result(cfg, memories, scores, summaries, final_state(rows, state, snaps))

    def _summaries(self, rows: StreamRows, skip: int, checkpoint: bool) -> torch.Tensor:
        """:meth:`summarize` of every segment (but the first ``skip``, returned as zeros) in
        one batched backbone call: ``[b, s, m, d]``."""
        b, s, m = rows.batch, rows.n_segments, self.config.num_memory_tokens
        h = self.config.summary_tokens
        zeros = torch.zeros(
            b, skip, m, embed_dim_of(self.backbone), dtype=self._dtype(), device=rows.tokens.device
        )
        read = s - skip
        if read == 0:
            return zeros
        grid = F.pad(rows.tokens, (0, s * rows.block - rows.width)).view(b, s, rows.block)
        ids = grid[:, skip:, :h].reshape(b * read, h)
        real = [min(h, rows.seg_lens[n][row]) for row in range(b) for n in range(skip, s)]
        out = self.summarize(ids, real, checkpoint_rows=b if checkpoint else None).view(b, read, m, -1)
        return torch.cat([zeros.to(out.dtype), out], dim=1) if skip else out

    def _carried_state(self, state: HMTState) -> HMTState:
        """The incoming state as the loop carries it (memory, sensory, cache, last hidden)."""
        keys = state.cache_keys
        if state.cache is not None and torch.is_grad_enabled():
            # The state is detached; keys projected again keep the key projection's gradient.
            keys = self.recall.keys(state.cache)
        return HMTState(
            segments_seen=state.segments_seen,
            memory=state.memory,
            sensory=state.sensory,
            cache=state.cache,
            cache_keys=keys,
            cache_valid=state.cache_valid,
            last_hidden=state.last_hidden,
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
            keys = self.recall.keys(cache) if torch.is_grad_enabled() else keys.detach()
        return replace(carry, memory=memory, cache=cache, cache_keys=keys)
