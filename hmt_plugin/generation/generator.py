"""Text generation with an HMT model: a prompt of any length, outputs longer than a segment.

How a document is read while generating (segment n holds ``tokens_per_segment`` new tokens):

* Complete segments of the prompt go through ``model(...)`` (batched, exactly as in
  training) with the recurrent :class:`~hmt_plugin.modules.HMTState` carried along.
* The current, unfinished segment lives in a KV cache of ``segment_length`` positions per
  layer, filled with ``[P_n; sensory; x_n[:t]]`` at RoPE positions ``0..``, the same layout as
  the training pass. Each new token costs one cached step.
* When the segment holds ``tokens_per_segment`` tokens and another token arrives, the
  trailing ``P_n`` is run through the cache: the final-norm hidden state there is the memory
  M_n, exactly the training pass's last position. M_n joins the state (memory cache, recall
  key, sensory tokens = the segment's last k tokens), the KV cache is emptied and the token
  starts segment n+1. Outputs of any length work this way.

Which memory the segment starts from (``P_n``):

* ``baseline``: none. ``rmt`` / ``hmt_stage1``: ``P_n = M_{n-1}`` (``initial_memory`` for a
  document's first segment), known before the segment starts, so everything is exact.
* ``hmt``: ``P_n`` is recalled with the summary S_n of the segment's first ``summary_tokens``
  tokens, which do not exist yet when decoding starts a segment. Policy: the segment starts
  with ``P_n`` recalled from a *provisional* summary, that of the previous segment's last
  ``summary_tokens`` tokens (the most recent text there is). Once the segment holds
  ``summary_tokens`` tokens, S_n is computed from them, ``P_n`` recalled again and the KV cache
  re-filled with ``[P_n; sensory; x_n[:summary_tokens]]`` (``refresh_recall=True``, the
  default; it costs one pass over ``summary_tokens`` tokens per segment). From then on every
  position, the memory M_n included, is computed exactly as training computes it; only the
  predictions of the segment's tokens ``1 .. summary_tokens - 1`` used the provisional memory.
  With ``refresh_recall=False`` the provisional ``P_n`` stays for the whole segment (cheaper,
  and M_n then follows from it). When a segment already holds ``summary_tokens`` tokens as
  its pass starts (a long enough prompt tail), S_n is exact from the start.

No step waits for the device except to read the sampled token itself.
"""

import warnings
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Union

import torch

from hmt_plugin.generation.kv_cache import SegmentCaches, caches_removed
from hmt_plugin.generation.sampling import check_sampling_args, sample_next_token
from hmt_plugin.modules.backbone import embed_tokens, project, run_layers
from hmt_plugin.modules.hmt import HMT
from hmt_plugin.modules.state import HMTState

PromptLike = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


@dataclass
class GenerationOutput:
    """What :meth:`HMTGenerator.generate` returns.

    Attributes:
        tokens (torch.Tensor): ``[b, n]`` generated ids (CPU), ``n`` the steps taken. A row that
            stopped early keeps being sampled until every row stops; ignore what follows its
            stop token.
        lengths (List[int]): per row, generated tokens before its first stop token (or all).
        stopped (List[bool]): per row, whether a stop token (or the callback) ended it.
    """

    tokens: torch.Tensor
    lengths: List[int]
    stopped: List[bool]

    def sequences(self) -> List[List[int]]:
        """Per row, the generated ids without the stop token and what follows it."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths)]


class HMTGenerator:
    """Segment-by-segment reader and decoder around an :class:`HMT` model (see the module
    docstring for the memory policy).

    Example::

        gen = HMTGenerator(model)
        out = gen.generate(prompt_ids, max_new_tokens=500, temperature=0.8, top_k=50,
                           stop_tokens=tokenizer.stop_tokens, callback=print_token)

    Args:
        model (HMT): the model, in eval mode and in the HMT mode to generate with
            (``model.eval()``, ``model.set_mode(...)`` first).
        max_batch_size (int): most rows decoded together (rows share a length, so their
            segment boundaries line up).
        refresh_recall (bool): ``hmt`` mode: recompute the recall once a segment holds
            ``summary_tokens`` tokens (exact from there on) or keep the provisional one.
        prefill_chunk_segments (int): complete prompt segments per ``model(...)`` call; bounds
            the memory a long prompt needs.
    """

    def __init__(
        self,
        model: HMT,
        *,
        max_batch_size: int = 1,
        refresh_recall: bool = True,
        prefill_chunk_segments: int = 16,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive integer.")
        if not isinstance(prefill_chunk_segments, int) or prefill_chunk_segments < 1:
            raise ValueError(
                f"prefill_chunk_segments={prefill_chunk_segments!r} must be a positive integer."
            )
        self.model = model
        self.decoder = model.backbone
        self.max_batch_size = max_batch_size
        self.refresh_recall = bool(refresh_recall)
        self.prefill_chunk_segments = prefill_chunk_segments
        self.device = self.decoder.tok_embeddings.weight.device
        self.dtype = self.decoder.tok_embeddings.weight.dtype
        self._caches: Optional[SegmentCaches] = None
        self._cfg = None
        self._batch = 0

    # ------------------------------------------------------------------ public
    @property
    def state(self) -> HMTState:
        """The recurrent state of everything read so far, in :class:`HMT`'s terms: complete
        segments plus the unfinished one as ``pending``. ``model(more, state=gen.state)``
        continues the document exactly as one ``model(...)`` call over all of it would (with
        ``refresh_recall`` or outside ``hmt`` mode)."""
        self._require_document()
        if self._len == self._block:
            # A full segment is closed lazily (when the next token comes); close it now so
            # the state matches what model(...) returns for the same tokens.
            with torch.no_grad():
                self._close_segment()
        if self._len == 0:
            return self._state
        return replace(
            self._state,
            pending=self._seg[:, : self._len].clone(),
            pending_lengths=[self._len] * self._batch,
        )

    @property
    def tokens_in_segment(self) -> int:
        """Tokens of the current, unfinished segment."""
        self._require_document()
        return self._len

    @torch.no_grad()
    def prefill(self, prompt: PromptLike) -> torch.Tensor:
        """Start a new document with ``prompt`` (``[L]`` ids, or ``[b, L]`` rows of equal length).

        Returns:
            torch.Tensor: ``[b, v]`` float32 logits of the token after the prompt.
        """
        ids = self._as_batch(prompt, "prompt")
        if self.model.training:
            warnings.warn(
                "HMTGenerator: the model is in training mode (dropout is on); call model.eval() "
                "for reproducible outputs.",
                stacklevel=2,
            )
        self._start(ids.shape[0])
        self._read(ids)
        return self.next_logits()

    @torch.no_grad()
    def append(self, tokens: PromptLike) -> torch.Tensor:
        """Read more tokens of the current document (same rows as the prompt).

        Returns:
            torch.Tensor: ``[b, v]`` float32 logits of the token after them.
        """
        self._require_document()
        ids = self._as_batch(tokens, "tokens")
        if ids.shape[0] != self._batch:
            raise ValueError(
                f"tokens have {ids.shape[0]} rows but the document has {self._batch}; append one "
                "row per prompt row."
            )
        self._read(ids)
        return self.next_logits()

    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        """``[b, v]`` float32 logits of the next token (only this position is projected)."""
        self._require_document()
        return project(self.decoder, self._last_hidden)[:, -1]

    @torch.no_grad()
    def generate(
        self,
        prompt: Optional[PromptLike],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        stop_tokens: Optional[Sequence[int]] = None,
        generator: Optional[torch.Generator] = None,
        callback: Optional[Callable[[Union[int, List[int]]], Optional[bool]]] = None,
    ) -> GenerationOutput:
        """Read ``prompt`` as a new document (None: continue the current one) and generate.

        Every generated token is read into the document as it is produced (the state then
        covers the prompt and the output), so outputs longer than a segment work.

        Args:
            prompt: ``[L]`` ids or ``[b, L]`` rows of equal length; None to go on from the
                current document (after :meth:`prefill`, :meth:`append` or ``generate``).
            max_new_tokens (int): most tokens to generate.
            temperature (float): 0 for greedy decoding.
            top_k (Optional[int]): sample among the k most likely tokens.
            stop_tokens: ids that end a row (e.g. ``tokenizer.stop_tokens``).
            generator (Optional[torch.Generator]): random source (on the model's device) for
                reproducible sampling.
            callback: called after each step with the new token (an int for a 1-D prompt,
                else one id per row); returning True stops the generation (e.g. a stop string
                was produced).

        Returns:
            GenerationOutput
        """
        check_sampling_args(temperature, top_k)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0.")
        squeeze = False
        if prompt is not None:
            squeeze = _is_one_row(prompt)
            self.prefill(prompt)
        else:
            self._require_document()
            squeeze = self._batch == 1
        stop = set(int(t) for t in (stop_tokens or ()))
        b = self._batch
        lengths = [0] * b
        stopped = [False] * b
        produced: List[torch.Tensor] = []
        for _ in range(max_new_tokens):
            token = sample_next_token(
                self.next_logits(), temperature=temperature, top_k=top_k, generator=generator
            )
            produced.append(token)
            host = token.tolist()  # the one device sync of a step
            for r, t in enumerate(host):
                if not stopped[r]:
                    if t in stop:
                        stopped[r] = True
                    else:
                        lengths[r] += 1
            self._read(token[:, None])
            if callback is not None and callback(host[0] if squeeze else host):
                stopped = [True] * b
            if all(stopped):
                break
        tokens = (
            torch.stack(produced, dim=1).cpu() if produced else torch.zeros(b, 0, dtype=torch.long)
        )
        return GenerationOutput(tokens=tokens, lengths=lengths, stopped=stopped)

    # ------------------------------------------------------------------ reading
    def _start(self, batch: int) -> None:
        if batch > self.max_batch_size:
            raise ValueError(
                f"the prompt has {batch} rows but max_batch_size={self.max_batch_size}; raise "
                "max_batch_size or generate in smaller batches."
            )
        cfg = self.model.config
        self._cfg = cfg
        self._batch = batch
        if (
            self._caches is None
            or self._caches.batch_size != batch
            or self._caches.length != cfg.segment_length
        ):
            self._caches = SegmentCaches(self.decoder, batch, cfg.segment_length)
        self._caches.reset()
        self._block = cfg.tokens_per_segment
        self._state = HMTState(segments_seen=[0] * batch)
        self._seg = torch.zeros(batch, self._block, dtype=torch.long, device=self.device)
        self._len = 0  # tokens of the current segment
        self._done = 0  # of them, how many the cached pass has read
        self._begun = False  # whether the cached pass of this segment has started
        self._prefix: Optional[torch.Tensor] = None  # P_n of the cached pass, [b, m, d]
        self._provisional = False  # P_n recalled from the provisional summary
        self._prev_tail: Optional[torch.Tensor] = None  # last summary_tokens of segment n-1
        self._last_hidden: Optional[torch.Tensor] = None  # [b, 1, d] of the last token read

    def _require_document(self) -> None:
        if self._cfg is None:
            raise RuntimeError(
                "no document yet: call prefill(prompt) or generate(prompt, ...) first."
            )
        if self.model.config != self._cfg:
            raise RuntimeError(
                f"the model's settings changed since the prompt was read (mode "
                f"{self._cfg.mode!r} -> {self.model.config.mode!r}); read the prompt again."
            )

    def _as_batch(self, tokens: PromptLike, name: str) -> torch.Tensor:
        if torch.is_tensor(tokens):
            ids = tokens
        else:
            rows = list(tokens)
            if rows and not isinstance(rows[0], int) and hasattr(rows[0], "__len__"):
                lengths = {len(r) for r in rows}
                if len(lengths) > 1:
                    raise ValueError(
                        f"{name} rows have different lengths {sorted(lengths)}; rows decoded "
                        "together must have the same length (generate them separately)."
                    )
            ids = torch.tensor(rows, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(
                f"{name} must be [length] or [batch, length]; got shape {tuple(ids.shape)}."
            )
        if ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(
                f"{name} is empty: give at least one token (e.g. the tokenizer's BOS id)."
            )
        if ids.is_floating_point():
            raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}.")
        vocab = self.decoder.tok_embeddings.num_embeddings
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"{name} holds ids in [{low}, {high}] outside the model's vocabulary [0, {vocab}); "
                "check that the tokenizer matches the model."
            )
        return ids.to(self.device, torch.long)

    def _read(self, ids: torch.Tensor) -> None:
        """Read ``[b, L]`` tokens: whole segments through ``model(...)`` when the current
        segment is empty, the rest through the KV cache."""
        width = ids.shape[1]
        pos = 0
        block = self._block
        while pos < width:
            if self._len == block:
                self._close_segment()
            if self._len == 0 and width - pos >= block:
                n = ((width - pos) // block) * block
                self._read_whole_segments(ids[:, pos : pos + n])
                pos += n
                continue
            take = min(width - pos, block - self._len)
            self._feed(ids[:, pos : pos + take])
            pos += take

    def _read_whole_segments(self, ids: torch.Tensor) -> None:
        """Complete segments, in calls of ``prefill_chunk_segments`` segments, as in training."""
        step = self.prefill_chunk_segments * self._block
        state = self._state
        with caches_removed(self.decoder):
            for start in range(0, ids.shape[1], step):
                out = self.model(ids[:, start : start + step], state=state, logits="none")
                state = out.state
        self._state = state
        self._last_hidden = state.last_hidden
        if self._cfg.uses_recall:
            self._prev_tail = ids[:, ids.shape[1] - self._cfg.summary_tokens :].clone()

    def _feed(self, ids: torch.Tensor) -> None:
        """Tokens that fit into the current segment."""
        s = ids.shape[1]
        self._seg[:, self._len : self._len + s] = ids
        self._len += s
        refresh = (
            self._provisional and self.refresh_recall and self._len >= self._cfg.summary_tokens
        )
        if not self._begun or refresh:
            self._begin_segment()
        else:
            embeds = embed_tokens(self.decoder, self._seg[:, self._done : self._len])
            self._last_hidden = self._cached_pass(embeds)[:, -1:]
            self._done = self._len

    def _begin_segment(self) -> None:
        """(Re)fill the KV cache with ``[P_n; sensory; x_n[:len]]``."""
        prefix, provisional = self._choose_prefix()
        first = self._state.segments_seen[0] == 0
        sensory = None if first else self._state.sensory
        embeds = self.model.segment_embeddings(
            prefix, sensory, self._seg[:, : self._len], closed=False
        )
        self._caches.reset()
        self._last_hidden = self._cached_pass(embeds)[:, -1:]
        self._done = self._len
        self._begun = True
        self._prefix = prefix
        self._provisional = provisional

    def _choose_prefix(self):
        """``(P_n or None, provisional)`` for the current segment."""
        cfg = self._cfg
        first = self._state.segments_seen[0] == 0
        summary, provisional = None, False
        if cfg.uses_recall and not first:
            h = cfg.summary_tokens
            provisional = self._len < h
            summary = self._summary(self._prev_tail if provisional else self._seg[:, :h])
        prefix, _ = self.model.search_memory(self._state, summary, first=first, batch=self._batch)
        return prefix, provisional

    def _summary(self, ids: torch.Tensor) -> torch.Tensor:
        """``[b, m, d]`` :meth:`HMT.summarize` of ``ids`` (the representation pass of
        training, on one segment)."""
        with caches_removed(self.decoder):
            return self.model.summarize(ids)

    def _cached_pass(self, embeds: torch.Tensor) -> torch.Tensor:
        """The next ``s`` positions through the KV cache; returns their ``[b, s, d]`` hidden
        states (before the final norm)."""
        mask, positions = self._caches.mask_and_positions(embeds.shape[1])
        with self._caches.attached():
            return run_layers(self.decoder, embeds, mask=mask, input_pos=positions)

    def _close_segment(self) -> None:
        """Write M_n for the full current segment and start an empty one."""
        cfg = self._cfg
        st = self._state
        if cfg.uses_memory:
            st = self.model.write_memory(self._cached_pass(self._prefix), st)
        if cfg.uses_recall:
            self._prev_tail = self._seg[:, self._block - cfg.summary_tokens :].clone()
        self._state = replace(
            st,
            segments_seen=[n + 1 for n in st.segments_seen],
            # A copy: the segment buffer is overwritten by the next segment.
            sensory=self.model.sensory_memory(self._seg.clone(), st.sensory),
            last_hidden=self._last_hidden,
        )
        self._len = self._done = 0
        self._begun = False
        self._prefix = None
        self._provisional = False
        self._caches.reset()


def _is_one_row(prompt: PromptLike) -> bool:
    if torch.is_tensor(prompt):
        return prompt.dim() == 1
    rows = list(prompt)
    return not rows or isinstance(rows[0], int) or not hasattr(rows[0], "__len__")
