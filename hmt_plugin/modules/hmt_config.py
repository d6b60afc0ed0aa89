"""HMT hyperparameters: one frozen dataclass, validated once, shared by the model,
the data pipeline (which needs the number of new tokens per segment) and the
checkpoint files (which store it as JSON beside the weights)."""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

MODES = ("baseline", "rmt", "hmt_stage1", "hmt")
MEMORY_INITS = ("mean_embedding", "published")
MEMORY_SCALES = ("published", "embedding")
SCORE_SCALES = ("sqrt", "linear", "published", "cosine")
RECALL_DTYPES = (None, "bfloat16", "float16", "float32")


class HMTConfigError(ValueError):
    """A bad HMT setting. The message names the setting and says how to fix it."""


@dataclass(frozen=True)
class HMTConfig:
    """Settings of a Hierarchical Memory Transformer.

    Args:
        segment_length (int): tokens per backbone call on a segment, memory and sensory
            tokens included (the published code's ``segment_length``). The number of new
            document tokens each segment reads is :attr:`tokens_per_segment`.
        mode (str): ``"hmt"`` (full model), ``"hmt_stage1"`` (sensory memory and a memory
            embedding carried from the previous segment, no recall), ``"rmt"`` (carried memory
            embedding only) or ``"baseline"`` (the backbone on each segment, no memory).
        num_memory_tokens (int): memory embeddings per segment (the paper uses 1).
        num_sensory (int): k, tokens of the previous segment repeated in front of the
            current one (``hmt`` and ``hmt_stage1`` only).
        sum_fraction (float): the representation pass reads the first
            ``round(tokens_per_segment * sum_fraction)`` tokens of a segment.
        recall_hidden_dim (Optional[int]): d_h, hidden size of the recall query/key
            projections. ``None`` means the backbone's embedding dim.
        cache_size (int): N, memory embeddings kept for recall (``mem_recall_context``).
        bptt_depth (int): gradients flow back through at most this many segments.
        score_scale (str): recall scores are divided by ``sqrt(d_h)`` (``"sqrt"``), by ``d_h``
            (``"linear"``), or as the published code does (``"published"``: by ``d_h`` when the
            embedding dim and d_h are both at least 4096, else by ``sqrt(d_h)``). ``"cosine"``
            (not the published function) scores unit-length query and keys, ``sqrt(d_h) * cos``,
            so large hidden states cannot saturate the softmax (see
            :func:`~hmt_plugin.modules.recall.recall_scale`).
        recall_dtype (Optional[str]): precision of the memory search. ``None`` (default):
            the model's dtype, scores in float32. ``"bfloat16"``: as the published code runs
            it (projections, query, cached memories and scores in bfloat16, softmax in float32
            and cast back, P_n in bfloat16); converting a published checkpoint sets it.
        memory_init (str): how a model without an HMT checkpoint starts its memory
            embeddings (``initial_memory``, ``summary_token``): ``"mean_embedding"`` (default,
            the backbone's mean token embedding: an untrained HMT then reads its first
            segments as well as the backbone does) or ``"published"`` (~ N(0, std of the token
            embeddings), as the published code draws them). It only matters before training.
        memory_scale (str): the length of the memory M_n a segment writes. ``"published"``
            (default): the final-norm hidden state as it is, as the published code writes it;
            its length is the backbone's output scale (on SmolLM2-135M about 54, against 3.2
            for a token embedding). ``"embedding"``: M_n keeps its direction and is rescaled to
            a learned length ``memory_norm``, initialised to the median token-embedding norm.
            Not the published function: a published checkpoint cannot hold it.
        memory_sink (bool): False (default): a segment reads ``[P_n; sensory; x_n; P_n]``, as
            in the paper. True: ``[sink; P_n; sensory; x_n; P_n]``, with a learned ``sink``
            embedding (the mean token embedding at first) at position 0 of every segment that
            reads a memory. Pretrained decoders park much of every token's attention on
            position 0 (the attention sink), so a memory placed there is mixed into every
            token: on an untrained SmolLM2-135M, carrying the memory costs 0.125 NLL, and 0.002
            with the sink. One more position per segment; not the published layout.
    """

    segment_length: int = 256
    mode: str = "hmt"
    num_memory_tokens: int = 1
    num_sensory: int = 32
    sum_fraction: float = 0.5
    recall_hidden_dim: Optional[int] = None
    cache_size: int = 300
    bptt_depth: int = 2
    score_scale: str = "sqrt"
    recall_dtype: Optional[str] = None
    memory_init: str = "mean_embedding"
    memory_scale: str = "published"
    memory_sink: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise HMTConfigError(message)

        need(
            self.mode in MODES,
            f"mode={self.mode!r} is not an HMT mode; use one of {', '.join(MODES)}.",
        )
        for name in ("segment_length", "num_memory_tokens", "cache_size", "bptt_depth"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name}={value!r} must be an integer >= 1.",
            )
        need(
            isinstance(self.num_sensory, int) and self.num_sensory >= 0,
            f"num_sensory={self.num_sensory!r} must be an integer >= 0.",
        )
        need(
            self.recall_hidden_dim is None
            or (isinstance(self.recall_hidden_dim, int) and self.recall_hidden_dim >= 1),
            f"recall_hidden_dim={self.recall_hidden_dim!r} must be a positive integer "
            "(or null for the backbone's embedding dim).",
        )
        need(
            isinstance(self.sum_fraction, (int, float)) and 0.0 < self.sum_fraction <= 1.0,
            f"sum_fraction={self.sum_fraction!r} must be in (0, 1].",
        )
        need(
            self.score_scale in SCORE_SCALES,
            f"score_scale={self.score_scale!r} is unknown; use one of {', '.join(SCORE_SCALES)}.",
        )
        need(
            self.memory_init in MEMORY_INITS,
            f"memory_init={self.memory_init!r} is unknown; use one of {', '.join(MEMORY_INITS)}.",
        )
        need(
            self.memory_scale in MEMORY_SCALES,
            f"memory_scale={self.memory_scale!r} is unknown; use one of {', '.join(MEMORY_SCALES)}.",
        )
        need(
            isinstance(self.memory_sink, bool),
            f"memory_sink={self.memory_sink!r} must be true or false.",
        )
        need(
            self.recall_dtype in RECALL_DTYPES,
            f"recall_dtype={self.recall_dtype!r} is unknown; use null (the model's dtype), "
            "'bfloat16' (the published code's recall), 'float16' or 'float32'.",
        )
        overhead = self.segment_length - self.tokens_per_segment
        need(
            self.tokens_per_segment >= 1,
            f"segment_length={self.segment_length} leaves no room for new tokens in mode "
            f"{self.mode!r}: {overhead} positions go to memory ({overhead - self.sensory_tokens_used}) and "
            f"sensory ({self.sensory_tokens_used}) tokens. Increase segment_length or lower "
            "num_sensory / num_memory_tokens.",
        )
        need(
            self.sensory_tokens_used < self.tokens_per_segment,
            f"num_sensory={self.num_sensory} must be smaller than the {self.tokens_per_segment} new "
            f"tokens per segment (segment_length={self.segment_length} minus "
            f"{overhead - self.sensory_tokens_used} memory positions minus num_sensory). Lower num_sensory "
            "or increase segment_length.",
        )

        need(
            not self.uses_recall or self.summary_tokens >= 1,
            f"sum_fraction={self.sum_fraction} reads no token of a {self.tokens_per_segment}-token "
            "segment in the representation pass; raise sum_fraction.",
        )

    # ---------------------------------------------------------------- derived sizes
    @property
    def uses_memory(self) -> bool:
        return self.mode != "baseline"

    @property
    def uses_recall(self) -> bool:
        return self.mode == "hmt"

    @property
    def memory_tokens_used(self) -> int:
        """Memory embeddings actually placed at each end of a segment in this mode."""
        return self.num_memory_tokens if self.uses_memory else 0

    @property
    def sink_tokens_used(self) -> int:
        """Sink positions in front of a segment's memory in this mode (``memory_sink``)."""
        return 1 if self.memory_sink and self.uses_memory else 0

    @property
    def sensory_tokens_used(self) -> int:
        """Sensory tokens used in this mode (the published code uses none in rmt/baseline)."""
        return self.num_sensory if self.mode in ("hmt", "hmt_stage1") else 0

    def _positions_besides_text(self, mode: str, num_sensory: Optional[int] = None) -> int:
        """Backbone positions of a segment that hold memory or sensory tokens in ``mode``
        (with ``num_sensory`` sensory tokens; default: this config's)."""
        num_sensory = self.num_sensory if num_sensory is None else num_sensory
        memory = self.num_memory_tokens if mode != "baseline" else 0
        sensory = num_sensory if mode in ("hmt", "hmt_stage1") else 0
        sink = 1 if self.memory_sink and mode != "baseline" else 0
        return sink + 2 * memory + sensory

    @property
    def tokens_per_segment(self) -> int:
        """New document tokens read per segment (the published code's ``block_size``)."""
        return self.segment_length - self._positions_besides_text(self.mode)

    @property
    def summary_tokens(self) -> int:
        """Tokens of a segment read by the representation pass.

        Python's ``round`` (half to even) on purpose: the published code does the same,
        and checkpoints trained with it expect exactly this many tokens."""
        return int(round(self.tokens_per_segment * self.sum_fraction))

    def with_mode(self, mode: str, *, keep_tokens_per_segment: bool = False) -> "HMTConfig":
        """The same settings in another mode (e.g. stage 1 -> stage 2).

        With ``keep_tokens_per_segment`` the segment length changes instead so that the new
        mode reads as many new tokens per segment as this one: the memory and sensory
        positions a mode does not use are dropped from the backbone call, not filled with
        more text. That is how modes are compared (only memory differs, every mode scores
        the same tokens at a given T). For example segment_length 256, k = 32: ``hmt`` reads
        222 tokens per segment in a 256-position call, and ``baseline`` then reads the same
        222 in a 222-position call (without it: 256 in 256)."""
        if not keep_tokens_per_segment:
            return dataclasses.replace(self, mode=mode)
        return self._same_new_tokens(mode=mode)

    def with_sensory(self, num_sensory: int) -> "HMTConfig":
        """The same settings with ``num_sensory`` sensory tokens and as many new tokens per
        segment: the backbone call grows or shrinks instead. Reading a model at ``k = 0``
        this way asks what its memory carries apart from the sensory tokens."""
        return self._same_new_tokens(num_sensory=num_sensory)

    def _same_new_tokens(self, *, mode: Optional[str] = None,
                         num_sensory: Optional[int] = None) -> "HMTConfig":
        """This config in ``mode`` with ``num_sensory`` (default: as now), its segment_length
        set so that a segment reads as many new tokens as now."""
        mode = self.mode if mode is None else mode
        num_sensory = self.num_sensory if num_sensory is None else num_sensory
        length = self.tokens_per_segment + self._positions_besides_text(mode, num_sensory)
        return dataclasses.replace(self, mode=mode, num_sensory=num_sensory, segment_length=length)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "HMTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise HMTConfigError(
                f"unknown HMT setting(s) {unknown}; known settings are {sorted(known)}."
            )
        return cls(**values)
