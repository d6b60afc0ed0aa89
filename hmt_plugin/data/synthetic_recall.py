"""A synthetic long-range recall task: a value planted ``d`` segments before a question.

Each document is ``(lead + d + 1)`` segments of predictable filler. A needle holding the
value (and, with ``key_length > 0``, a key) sits in segment ``lead``; the question sits at
the very end of the last segment and is followed by the answer (the value again), then EOS:

    segment:   0 .. lead-1     lead            ...      lead+d (last)
    content:   filler          filler NEEDLE filler ... filler QUESTION [key] ANSWER value EOS

Labels are -100 everywhere except on the answer's value tokens, so the loss and accuracy
measure recall alone. The filler is periodic (and the markers fixed), so once learnt it costs
nothing: the planted value is the only thing that is hard to predict, and a model can only
predict it by carrying it across ``d`` segment boundaries.

Two renderings:

* token level (``tokenizer=None``, give ``vocab_size``): ids 1/2 = BOS/EOS, 3 = needle
  start, 4 = needle end, 5 = question, 6 = answer marker, then ``filler_period`` filler ids
  cycling with the position, then key/value ids. Small enough for a tiny model trained from
  scratch on CPU.
* text (a torchtune tokenizer): the classic pass-key wording ("The grass is green. ..."
  filler, "The pass key is 71432. Remember it. ..."), each piece tokenized separately so the
  answer tokens are known exactly.
"""

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from hmt_plugin.data.documents import TokenizedDocuments
from hmt_plugin.data.tokenizer_utils import check_ids, encode, vocab_size_of

BOS, EOS, NEEDLE, NEEDLE_END, QUESTION, ANSWER = 1, 2, 3, 4, 5, 6
FIRST_FILLER = 7
DEFAULT_FILLER_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE_POSITIONS = ("random", "start")


def _distances(
    distance_segments: Union[int, Sequence[int]], n: int, rng: np.random.Generator
) -> np.ndarray:
    choices = [distance_segments] if isinstance(distance_segments, int) else list(distance_segments)
    if not choices or any(not isinstance(d, (int, np.integer)) or d < 0 for d in choices):
        raise ValueError(
            f"distance_segments={distance_segments!r} must be an integer >= 0 or a non-empty "
            "list of them."
        )
    return rng.choice(np.asarray(choices, dtype=np.int64), size=n)


class _TokenLevel:
    """Token-id rendering for a vocabulary of ``vocab_size`` ids."""

    def __init__(self, vocab_size: int, filler_period: int, num_symbols: Optional[int]) -> None:
        first_symbol = FIRST_FILLER + filler_period
        available = vocab_size - first_symbol
        if available < 2:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no ids for values: {first_symbol} ids go to "
                f"markers and filler (filler_period={filler_period}). Raise vocab_size or lower "
                "filler_period."
            )
        self.num_symbols = available if num_symbols is None else int(num_symbols)
        if not 2 <= self.num_symbols <= available:
            raise ValueError(
                f"num_symbols={num_symbols} must be in [2, {available}] for "
                f"vocab_size={vocab_size}."
            )
        self.first_symbol = first_symbol
        self.period = filler_period
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = BOS, EOS

    def filler(self, length: int) -> np.ndarray:
        return FIRST_FILLER + np.arange(length, dtype=np.int64) % self.period

    def symbols(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.first_symbol + rng.integers(0, self.num_symbols, size=n)

    def needle(self, key: np.ndarray, value: np.ndarray) -> np.ndarray:
        return np.concatenate([[NEEDLE], key, [ANSWER], value, [NEEDLE_END]]).astype(np.int64)

    def question(self, key: np.ndarray, value: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(question tokens up to the answer, answer tokens)."""
        return np.concatenate([[QUESTION], key, [ANSWER]]).astype(np.int64), value.astype(np.int64)


class _TextLevel:
    """Text rendering through a torchtune tokenizer; keys and values are digit strings."""

    def __init__(self, tokenizer: Any, filler_text: str) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size_of(tokenizer)
        self.bos_id = getattr(tokenizer, "bos_id", None)
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._filler = self._encode(" " + filler_text.strip())
        if self._filler.size == 0:
            raise ValueError("filler_text tokenizes to nothing; give some words.")

    def _encode(self, text: str) -> np.ndarray:
        ids = encode(self.tokenizer, text, add_bos=False, add_eos=False)
        check_ids(ids, self.vocab_size, "synthetic recall text")
        return ids

    def filler(self, length: int) -> np.ndarray:
        return self._filler[np.arange(length) % self._filler.size]

    def symbols(self, rng: np.random.Generator, n: int) -> str:
        return "".join(str(d) for d in rng.integers(0, 10, size=n))

    def needle(self, key: str, value: str) -> np.ndarray:
        if key:
            return self._encode(
                f" The value of key {key} is {value}. Remember it. {key} holds {value}."
            )
        return self._encode(f" The pass key is {value}. Remember it. {value} is the pass key.")

    def question(self, key: str, value: str) -> Tuple[np.ndarray, np.ndarray]:
        if key:
            q = f" What is the value of key {key}? The value of key {key} is"
        else:
            q = " What is the pass key? The pass key is"
        return self._encode(q), self._encode(f" {value}")


def synthetic_recall_dataset(
    tokenizer: Any = None,
    *,
    num_documents: int,
    tokens_per_segment: int,
    distance_segments: Union[int, Sequence[int]],
    vocab_size: Optional[int] = None,
    value_length: int = 1,
    key_length: int = 0,
    lead_segments: int = 0,
    needle_position: str = "random",
    filler_period: int = 4,
    num_symbols: Optional[int] = 16,
    filler_text: str = DEFAULT_FILLER_TEXT,
    token_level: Optional[bool] = None,
    add_bos: bool = True,
    add_eos: bool = True,
    seed: int = 0,
) -> TokenizedDocuments:
    """Generate the recall set (deterministic given ``seed``).

    Args:
        tokenizer: a torchtune tokenizer (text rendering) or None (token ids).
        num_documents (int): documents to generate.
        tokens_per_segment (int): new tokens per HMT segment; documents are whole segments.
        distance_segments (int or list of int): d, segments between the needle's segment and
            the question's; a list is sampled from uniformly per document.
        vocab_size (Optional[int]): token level: ids are below this (default: the tokenizer's).
        value_length (int): value symbols (token level: ids; text: digits).
        key_length (int): key symbols; 0 gives a pass key (nothing to look up by).
        lead_segments (int): filler segments before the needle's segment.
        needle_position (str): ``"random"`` anywhere in its segment, or ``"start"`` at its
            beginning (inside the part HMT's summary reads).
        filler_period (int): token level: distinct filler ids, cycling with the position.
        num_symbols (Optional[int]): token level: key/value alphabet size (None: all ids
            left). The default 16 keeps the task learnable by a tiny model in minutes; chance
            accuracy per value token is ``1 / num_symbols``.
        filler_text (str): text rendering: the sentence repeated as filler.
        token_level (Optional[bool]): force the token-id rendering even with a tokenizer
            (default: token level iff ``tokenizer`` is None).
        add_bos / add_eos (bool): start with BOS / end with EOS.
        seed (int): generator seed.

    Returns:
        TokenizedDocuments: items ``{"tokens", "labels", "distance", "answer_start",
        "needle_start"}``; ``labels`` are -100 except on the answer tokens.
    """
    for name, value in (
        ("num_documents", num_documents),
        ("tokens_per_segment", tokens_per_segment),
        ("value_length", value_length),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if key_length < 0 or lead_segments < 0:
        raise ValueError("key_length and lead_segments must be >= 0.")
    if needle_position not in NEEDLE_POSITIONS:
        raise ValueError(f"needle_position={needle_position!r}: use 'random' or 'start'.")
    use_tokens = tokenizer is None if token_level is None else token_level
    if use_tokens:
        size = vocab_size if vocab_size is not None else vocab_size_of(tokenizer)
        if size is None:
            raise ValueError("token-level recall data needs vocab_size= (no tokenizer given).")
        render: Any = _TokenLevel(size, filler_period, num_symbols)
    else:
        render = _TextLevel(tokenizer, filler_text)

    rng = np.random.default_rng(seed)
    L = tokens_per_segment
    distances = _distances(distance_segments, num_documents, rng)
    bos = render.bos_id if add_bos and render.bos_id is not None else None
    eos = render.eos_id if add_eos and render.eos_id is not None else None

    docs: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    answer_starts: List[int] = []
    needle_starts: List[int] = []
    for d in distances.tolist():
        key = render.symbols(rng, key_length)
        value = render.symbols(rng, value_length)
        needle = render.needle(key, value)
        question, answer = render.question(key, value)
        tail = np.concatenate([question, answer] + ([[eos]] if eos is not None else [])).astype(
            np.int64
        )
        total = (lead_segments + d + 1) * L
        q_start = total - tail.size
        last_seg = total - L
        needle_seg = lead_segments * L
        lo = needle_seg + (1 if bos is not None and needle_seg == 0 else 0)
        hi = min(needle_seg + L, q_start) - needle.size  # last allowed needle start
        if tail.size > L - (1 if bos is not None and last_seg == 0 else 0) or hi < lo:
            raise ValueError(
                f"tokens_per_segment={L} is too small for a needle of {needle.size} and a "
                f"question+answer of {tail.size} tokens at distance {d}; raise "
                "tokens_per_segment or lower key_length/value_length."
            )
        pos = lo if needle_position == "start" else int(rng.integers(lo, hi + 1))
        doc = render.filler(total)
        if bos is not None:
            doc[0] = bos
        doc[pos : pos + needle.size] = needle
        doc[q_start:] = tail
        lab = np.full(total, CROSS_ENTROPY_IGNORE_IDX, dtype=np.int64)
        a_start = q_start + question.size
        lab[a_start : a_start + answer.size] = answer
        docs.append(doc)
        labels.append(lab)
        answer_starts.append(a_start)
        needle_starts.append(pos)

    out = TokenizedDocuments.from_sequences(
        docs,
        labels=labels,
        fields={
            "distance": distances,
            "answer_start": np.asarray(answer_starts, dtype=np.int64),
            "needle_start": np.asarray(needle_starts, dtype=np.int64),
        },
        vocab_size=render.vocab_size,
        bos_id=bos,
        eos_id=eos,
    )
    check_ids(out.tokens, render.vocab_size, "synthetic recall data")
    return out
