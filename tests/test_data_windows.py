"""SegmentWindows: evaluation and training windows, strides, random offsets, determinism."""

import numpy as np
import pytest

from hmt_plugin.data import SegmentWindows, TokenizedDocuments


def _docs(lengths, labels=False):
    # document d holds d*1000 + position, so a window shows where it came from
    seqs = [1000 * d + np.arange(n) for d, n in enumerate(lengths)]
    labs = [-s for s in seqs] if labels else None
    return TokenizedDocuments.from_sequences(seqs, labels=labs)


def _spans(windows):
    return [windows.window(i) for i in range(len(windows))]


def test_eval_mode_whole_documents_and_max_tokens():
    docs = _docs([7, 1, 30, 0, 2])
    w = SegmentWindows(docs, tokens_per_segment=4)
    # documents of fewer than 2 tokens give no window
    assert _spans(w) == [(0, 0, 7), (2, 0, 30), (4, 0, 2)]
    item = w[1]
    assert item["doc_id"] == 2 and item["start"] == 0
    assert item["tokens"].tolist() == (2000 + np.arange(30)).tolist()
    capped = SegmentWindows(docs, tokens_per_segment=4, max_tokens=10)
    assert [b - a for _, a, b in _spans(capped)] == [7, 10, 2]


def test_training_windows_tile_documents_without_crossing():
    docs = _docs([25, 8, 9, 3])
    w = SegmentWindows(docs, tokens_per_segment=4, segments_per_window=2)  # W = 8
    # 25 = 3*8 + 1 and 9 = 8 + 1: their 1-token tails give no window
    assert _spans(w) == [(0, 0, 8), (0, 8, 16), (0, 16, 24), (1, 0, 8), (2, 0, 8), (3, 0, 3)]
    for i in range(len(w)):
        item = w[i]
        assert item["tokens"].size <= 8
        # every token of a window belongs to its document
        assert (item["tokens"] // 1000 == item["doc_id"]).all()
        assert item["tokens"][0] % 1000 == item["start"]


def test_short_last_window_kept_when_two_tokens_or_more():
    w = SegmentWindows(_docs([18]), tokens_per_segment=4, segments_per_window=2)
    assert _spans(w) == [(0, 0, 8), (0, 8, 16), (0, 16, 18)]


def test_stride_overlap_and_gaps():
    docs = _docs([20])
    overlap = SegmentWindows(docs, tokens_per_segment=4, segments_per_window=2, stride=4)
    # stops at the first window that reaches the end: no window inside the last one
    assert _spans(overlap) == [(0, 0, 8), (0, 4, 12), (0, 8, 16), (0, 12, 20)]
    gaps = SegmentWindows(docs, tokens_per_segment=2, segments_per_window=2, stride=6)
    assert _spans(gaps) == [(0, 0, 4), (0, 6, 10), (0, 12, 16), (0, 18, 20)]


def test_labels_travel_with_windows():
    w = SegmentWindows(_docs([10, 6], labels=True), tokens_per_segment=2, segments_per_window=2)
    for i in range(len(w)):
        item = w[i]
        assert (item["labels"] == -item["tokens"]).all()
    assert "labels" not in SegmentWindows(_docs([10]), tokens_per_segment=2)[0]


def test_random_offsets_are_deterministic_and_vary_by_epoch():
    lengths = [100] * 40 + [8, 5]
    docs = _docs(lengths)

    def grid(seed, epoch):
        w = SegmentWindows(
            docs, tokens_per_segment=4, segments_per_window=4, random_offset=True, seed=seed
        )
        w.set_epoch(epoch)
        return _spans(w)

    a = grid(0, 0)
    assert a == grid(0, 0)  # same (seed, epoch): same windows, e.g. after a resume
    assert a != grid(0, 1) and a != grid(1, 0)
    firsts = {}
    for doc, start, stop in a:
        firsts.setdefault(doc, (start, stop))
    offsets = np.array([firsts[d][0] for d in range(40)])
    assert offsets.min() >= 0 and offsets.max() < 16  # offset in [0, stride)
    assert len(set(offsets.tolist())) > 5  # really random
    # the first window is full; documents no longer than a window are never cut
    assert all(firsts[d][1] - firsts[d][0] == 16 for d in range(40))
    assert firsts[40] == (0, 8) and firsts[41] == (0, 5)
    # a shifted grid is still a stride-16 grid inside the document
    for doc, start, stop in a:
        assert (start - firsts[doc][0]) % 16 == 0 and stop <= lengths[doc]


def test_set_epoch_matches_a_fresh_dataset_at_that_epoch():
    docs = _docs([50, 70, 33])
    kwargs = dict(tokens_per_segment=4, segments_per_window=2, stride=6, random_offset=True, seed=7)
    running = SegmentWindows(docs, **kwargs)
    for epoch in range(3):
        running.set_epoch(epoch)
    resumed = SegmentWindows(docs, **kwargs)
    resumed.set_epoch(2)
    assert _spans(running) == _spans(resumed)
    assert all(
        np.array_equal(running[i]["tokens"], resumed[i]["tokens"]) for i in range(len(resumed))
    )


def test_concatenated_documents_let_windows_cross_boundaries():
    docs = _docs([5, 5])
    apart = SegmentWindows(docs, tokens_per_segment=4, segments_per_window=2)
    joined = SegmentWindows(docs.concatenated(), tokens_per_segment=4, segments_per_window=2)
    assert [w["tokens"].size for w in apart] == [5, 5]
    assert joined[0]["tokens"].tolist() == [0, 1, 2, 3, 4, 1000, 1001, 1002]


def test_bad_arguments():
    docs = _docs([10])
    # training-only settings are ignored (with a warning) in evaluation mode
    ignored = SegmentWindows(docs, tokens_per_segment=4, stride=2, random_offset=True)
    assert [ignored.window(i) for i in range(len(ignored))] == [(0, 0, 10)]
    with pytest.raises(ValueError, match="tokens_per_segment"):
        SegmentWindows(docs, tokens_per_segment=0)
    with pytest.raises(IndexError):
        SegmentWindows(docs, tokens_per_segment=4)[1]
