"""What two calls give against one call, at every split point of a document.

The later call always gives what one call gives (logits, NLL, state). The first call does
too, at every position, except in ``hmt`` mode for the tokens of a segment it ends inside of
before that segment's first ``summary_tokens`` tokens are all there: its recall query (the
summary of those tokens) does not exist yet, so they are read with a memory recalled from
the summary of the tokens so far, as if the document ended there (from the third segment on:
with one memory cached the recall does not depend on its query). One call's outputs at
those positions depend on tokens after them, so no streaming call can give them; the next
call reads that segment again with its continuation."""

import pytest
import torch

from hmt_plugin.models import hmt_tiny

SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=3, bptt_depth=8)
TOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["published-layout", "memory-sink"])
def model(request):
    torch.manual_seed(0)
    return hmt_tiny(**SMALL, memory_sink=request.param).eval()


def _ids(length=80):
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["hmt", "hmt_stage1", "rmt", "baseline"])
def test_every_split_point(model, mode):
    model.set_mode(mode)
    try:
        cfg = model.config
        block, summary = cfg.tokens_per_segment, cfg.summary_tokens
        ids = _ids()
        inexact = []
        with torch.no_grad():
            whole = model(ids, labels=ids)
            for split in range(1, ids.shape[1]):
                first = model(ids[:, :split], labels=ids[:, :split])
                second = model(ids[:, split:], labels=ids[:, split:], state=first.state)
                torch.testing.assert_close(second.logits, whole.logits[:, split:], atol=TOL, rtol=0)
                torch.testing.assert_close(second.nll, whole.nll[:, split:], atol=TOL, rtol=0)
                assert second.state.segments_seen == whole.state.segments_seen
                boundary = (split // block) * block
                # Everything before the unfinished segment, and its first target, are exact.
                torch.testing.assert_close(first.logits[:, :boundary], whole.logits[:, :boundary], atol=TOL, rtol=0)
                n = min(boundary + 1, split)
                torch.testing.assert_close(first.nll[:, :n], whole.nll[:, :n], atol=TOL, rtol=0)
                gap = (first.logits[:, boundary:] - whole.logits[:, boundary:split]).abs().max().item() \
                    if split > boundary else 0.0
                # With one memory cached (segment 1) the recall does not depend on the query.
                if cfg.uses_recall and boundary >= 2 * block and 0 < split - boundary < summary:
                    inexact.append(split)
                    assert gap > TOL, f"split {split}: expected the documented difference"
                else:
                    assert gap <= TOL, f"split {split}: the first call differs by {gap}"
        if cfg.uses_recall:
            # The documented case: inside a later segment, before its summary tokens exist.
            expected = [s for s in range(1, ids.shape[1]) if s >= 2 * block and 0 < s % block < summary]
            assert inexact == expected and 41 in inexact
    finally:
        model.set_mode("hmt")
