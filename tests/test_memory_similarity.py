"""memory_similarity: raw and centred cosines between written memories, on vectors whose
structure is known."""

import pytest
import torch

from hmt_plugin.eval.memory_similarity import memory_similarity


def test_one_vector_everywhere_is_all_shared():
    memories = torch.randn(1, 1, 1, 16).expand(3, 5, 1, 16)
    sim = memory_similarity(memories)
    assert sim["raw"] == pytest.approx(1.0, abs=1e-6)
    assert sim["shared_fraction"] == pytest.approx(1.0, abs=1e-6)


def test_a_large_shared_direction_hides_what_centring_shows():
    # Each document walks away from its own point; every memory also has a large common part.
    g = torch.Generator().manual_seed(0)
    b, s, d = 4, 12, 64
    shared = 100.0 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    documents = 2.0 * torch.randn(b, 1, d, generator=g)
    walk = 0.5 * torch.randn(b, s, d, generator=g).cumsum(dim=1)
    memories = shared + documents + walk
    sim = memory_similarity(memories)
    assert sim["raw"] > 0.95 and sim["shared_fraction"] > 0.9
    # Neighbours closer than any two segments of a document, which are closer than documents.
    assert sim["centred_neighbours"] > sim["centred_same_document"] > sim["centred_across_documents"]
    assert sim["centred_same_document"] > 0.3


def test_unrelated_memories_have_no_document_signal():
    memories = torch.randn(6, 20, 1, 128, generator=torch.Generator().manual_seed(1))
    sim = memory_similarity(memories)
    n = 6 * 20
    for key in ("centred_neighbours", "centred_same_document", "centred_across_documents"):
        assert sim[key] == pytest.approx(-1 / (n - 1), abs=0.03)
    assert sim["shared_fraction"] < 0.05


@pytest.mark.parametrize("shape", [(1, 4, 1, 8), (3, 1, 1, 8), (4, 8), (2, 2, 1, 1, 8)])
def test_shapes_it_cannot_compare_are_refused(shape):
    with pytest.raises(ValueError, match="memories"):
        memory_similarity(torch.randn(*shape))
