"""The synthetic recall set: structure, labels, distances, determinism, text rendering."""

import numpy as np
import pytest

from hmt_plugin.data import SegmentWindows, segment_collate, synthetic_recall_dataset
from hmt_plugin.data.synthetic_recall import ANSWER, NEEDLE, QUESTION
from tests.data_fixtures import spm_path, spm_tokenizer  # noqa: F401

L = 24


def _recall(**kw):
    args = dict(
        num_documents=30, tokens_per_segment=L, distance_segments=[0, 1, 3], vocab_size=64, seed=3
    )
    args.update(kw)
    return synthetic_recall_dataset(**args)


def test_token_level_layout_and_labels():
    ds = _recall(value_length=2, key_length=1)
    assert len(ds) == 30 and sorted(set(ds.fields["distance"].tolist())) == [0, 1, 3]
    for i in range(len(ds)):
        item = ds[i]
        tokens, labels, d = item["tokens"], item["labels"], item["distance"]
        assert tokens.size == (d + 1) * L  # whole segments, question in the last
        assert tokens[0] == 1 and tokens[-1] == 2  # BOS, EOS
        assert tokens.max() < 64 and tokens.min() >= 0
        answer = np.flatnonzero(labels != -100)
        a = item["answer_start"]
        assert answer.tolist() == [a, a + 1]  # only the value tokens carry a loss
        assert (labels[answer] == tokens[answer]).all()
        assert tokens[a - 1] == ANSWER and tokens[a - 3] == QUESTION  # [Q, key, A] value
        n = item["needle_start"]
        assert tokens[n] == NEEDLE
        needle_key, needle_value = tokens[n + 1], tokens[n + 3 : n + 5]
        assert needle_key == tokens[a - 2] and (needle_value == tokens[a : a + 2]).all()
        # the needle sits d segments before the question's segment, wholly inside it
        assert n // L == (a // L) - d and (n + 5) // L == n // L
        assert a // L == tokens.size // L - 1


def test_filler_is_periodic_so_only_the_value_is_hard():
    ds = _recall(distance_segments=2, value_length=1)
    item = ds[0]
    tokens = item["tokens"]
    special = np.zeros(tokens.size, bool)
    special[0] = special[-1] = True
    n = item["needle_start"]
    special[n : n + 4] = True
    special[item["answer_start"] - 2 :] = True
    filler = np.flatnonzero(~special)
    # filler id is a function of the position alone
    assert (tokens[filler] == 7 + filler % 4).all()


def test_seeded_and_distances_sampled_from_the_list():
    a, b, c = _recall(seed=1), _recall(seed=1), _recall(seed=2)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.tokens, c.tokens)
    values = [a[i]["tokens"][a[i]["answer_start"]] for i in range(len(a))]
    assert len(set(values)) > 5  # the value really varies
    fixed = _recall(distance_segments=2)
    assert set(fixed.fields["distance"].tolist()) == {2}


def test_needle_at_segment_start_and_lead_segments():
    ds = _recall(distance_segments=2, lead_segments=1, needle_position="start")
    for i in range(len(ds)):
        item = ds[i]
        assert item["needle_start"] == L and item["tokens"].size == 4 * L


def test_batches_carry_distance_and_only_answer_labels():
    ds = _recall()
    batch = segment_collate(
        [SegmentWindows(ds, tokens_per_segment=L)[i] for i in range(4)],
        tokens_per_segment=L,
        extra_keys=("distance",),
    )
    assert batch["distance"].tolist() == ds.fields["distance"][:4].tolist()
    assert ((batch["labels"] != -100).sum(1) == 1).all()


def test_text_rendering_with_a_tokenizer(spm_tokenizer):
    ds = synthetic_recall_dataset(
        spm_tokenizer,
        num_documents=6,
        tokens_per_segment=96,
        distance_segments=[1, 2],
        value_length=5,
        seed=0,
    )
    for i in range(len(ds)):
        item = ds[i]
        tokens, labels = item["tokens"], item["labels"]
        assert tokens.max() < spm_tokenizer.vocab_size
        answer = tokens[labels != -100].tolist()
        value = spm_tokenizer.decode(answer).strip()
        assert len(value) == 5 and value.isdigit()
        text = spm_tokenizer.decode(tokens.tolist())
        assert f"The pass key is {value}" in text and text.rstrip().endswith(
            f"The pass key is {value}"
        )
        assert tokens.size == (item["distance"] + 1) * 96
    keyed = synthetic_recall_dataset(
        spm_tokenizer,
        num_documents=2,
        tokens_per_segment=128,
        distance_segments=1,
        key_length=3,
        seed=0,
    )
    text = spm_tokenizer.decode(keyed[0]["tokens"].tolist())
    assert "What is the value of key" in text


def test_errors():
    with pytest.raises(ValueError, match="tokens_per_segment=8 is too small"):
        _recall(tokens_per_segment=8, value_length=4, key_length=2)
    with pytest.raises(ValueError, match="vocab_size"):
        synthetic_recall_dataset(num_documents=1, tokens_per_segment=16, distance_segments=1)
    with pytest.raises(ValueError, match="distance_segments"):
        _recall(distance_segments=[])
