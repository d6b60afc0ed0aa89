"""segment_collate: layout, padding, labels, and batch invariance on a real HMT model."""

import functools

import numpy as np
import pytest
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from hmt_plugin.data import SegmentWindows, TokenizedDocuments, segment_collate
from hmt_plugin.models import hmt_tiny


def _item(tokens, labels=None, **extra):
    item = {"tokens": np.asarray(tokens, dtype=np.int64)}
    if labels is not None:
        item["labels"] = np.asarray(labels, dtype=np.int64)
    item.update(extra)
    return item


def test_layout_pads_to_whole_segments():
    batch = [_item([5, 6, 7]), _item(list(range(10, 21))), _item([9])]
    out = segment_collate(batch, tokens_per_segment=4, pad_id=3)
    assert set(out) == {"tokens", "labels", "mask", "seq_lens"}
    # longest is 11 tokens -> 3 segments of 4
    assert out["tokens"].shape == (3, 12) and out["tokens"].dtype == torch.long
    assert out["labels"].dtype == torch.long and out["mask"].dtype == torch.bool
    assert out["seq_lens"].tolist() == [3, 11, 1]
    assert out["tokens"][0].tolist() == [5, 6, 7] + [3] * 9
    assert out["tokens"][1, :11].tolist() == list(range(10, 21)) and out["tokens"][1, 11] == 3
    assert out["mask"].sum(1).tolist() == [3, 11, 1]
    assert out["mask"][0].tolist() == [True] * 3 + [False] * 9
    # labels: the tokens, ignore index at padding
    assert out["labels"][0].tolist() == [5, 6, 7] + [CROSS_ENTROPY_IGNORE_IDX] * 9
    assert (out["labels"][~out["mask"]] == CROSS_ENTROPY_IGNORE_IDX).all()
    assert torch.equal(out["labels"][out["mask"]], out["tokens"][out["mask"]])


def test_exact_multiple_adds_no_segment_and_item_labels_win():
    batch = [_item([1, 2, 3, 4], labels=[-100, -100, 30, 40]), _item([7, 8])]
    out = segment_collate(batch, tokens_per_segment=4)
    assert out["tokens"].shape == (2, 4)
    assert out["labels"][0].tolist() == [-100, -100, 30, 40]
    assert out["labels"][1].tolist() == [7, 8, -100, -100]


def test_negative_pad_id_becomes_zero():
    out = segment_collate([_item([5]), _item([5, 6, 7])], tokens_per_segment=2, pad_id=-1)
    assert out["tokens"].min() >= 0
    assert out["tokens"][0].tolist() == [5, 0, 0, 0]


def test_extra_keys_and_errors():
    batch = [_item([1, 2], distance=3), _item([4], distance=1)]
    out = segment_collate(batch, tokens_per_segment=2, extra_keys=("distance",))
    assert out["distance"].tolist() == [3, 1]
    with pytest.raises(KeyError, match="start"):
        segment_collate(batch, tokens_per_segment=2, extra_keys=("start",))
    with pytest.raises(ValueError, match="labels"):
        segment_collate([_item([1, 2], labels=[1])], tokens_per_segment=2)
    with pytest.raises(ValueError, match="tokens_per_segment"):
        segment_collate(batch, tokens_per_segment=0)


def test_usable_as_dataloader_collate_fn():
    docs = TokenizedDocuments.from_sequences([list(range(1, n + 1)) for n in (5, 17, 9, 2)])
    windows = SegmentWindows(docs, tokens_per_segment=4)
    loader = torch.utils.data.DataLoader(
        windows, batch_size=2, collate_fn=functools.partial(segment_collate, tokens_per_segment=4)
    )
    shapes = [b["tokens"].shape for b in loader]
    assert shapes == [(2, 20), (2, 12)]


@torch.no_grad()
def test_batch_invariance_on_hmt_tiny():
    """A document's nll and logits do not depend on what it is batched with."""
    vocab = 64
    torch.manual_seed(0)
    model = hmt_tiny(vocab_size=vocab, segment_length=32, num_sensory=4, cache_size=8).eval()
    L = model.config.tokens_per_segment
    rng = np.random.default_rng(0)
    target = rng.integers(3, vocab, size=2 * L + 5)  # between two and three segments
    longer = rng.integers(3, vocab, size=5 * L + 1)
    shorter = rng.integers(3, vocab, size=L // 2)
    collate = functools.partial(segment_collate, tokens_per_segment=L, pad_id=0)

    def run(items):
        batch = collate([_item(x) for x in items])
        return model(batch["tokens"], mask=batch["mask"], labels=batch["labels"])

    alone = run([target])
    n = target.size
    for batch_items, row in (
        ([longer, target, shorter], 1),
        ([shorter, target], 1),
        ([target, longer], 0),
    ):
        out = run(batch_items)
        torch.testing.assert_close(out.nll[row, :n], alone.nll[0, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.logits[row, :n], alone.logits[0, :n], atol=1e-5, rtol=0)
        # padding carries no loss
        assert (out.nll[row, n:] == 0).all()
    # the comparison is not vacuous: the target's own loss is non-zero and differs by row
    assert alone.nll[0, 1:n].abs().sum() > 0
    out = run([longer, target])
    assert not torch.allclose(out.nll[0, :n], alone.nll[0, :n])


def test_min_segments_pads_short_batches_to_the_window_width():
    from hmt_plugin.data import segment_collate

    batch = [{"tokens": np.arange(5)}, {"tokens": np.arange(3)}]
    out = segment_collate(batch, tokens_per_segment=4, min_segments=3)
    assert out["tokens"].shape == (2, 12)
    assert out["seq_lens"].tolist() == [5, 3]
    assert not out["mask"][:, 5:].any()
