"""Topic switching: interleaved document pairs and dilated documents."""

import pytest

from hmt_plugin.data import TokenizedDocuments, dilated_dataset, interleaved_dataset
from tests.data_fixtures import spm_path, spm_tokenizer  # noqa: F401

BOS, EOS = 1, 2


def _docs(bodies, labels=None):
    seqs = [[BOS] + list(b) + [EOS] for b in bodies]
    return TokenizedDocuments.from_sequences(seqs, labels=labels, bos_id=BOS, eos_id=EOS)


def test_interleave_alternates_chunks_until_the_shorter_ends():
    a = list(range(100, 110))  # 10 tokens
    b = list(range(200, 207))  # 7 tokens
    out = interleaved_dataset(_docs([a, b]), every_n_tokens=3)
    assert (
        len(out) == 1
        and out.fields["doc_a"].tolist() == [0]
        and out.fields["doc_b"].tolist() == [1]
    )
    expected = a[0:3] + b[0:3] + a[3:6] + b[3:6] + a[6:9] + b[6:7]
    assert out[0]["tokens"].tolist() == [BOS] + expected + [EOS]
    assert out.bos_id == BOS and out.eos_id == EOS


def test_interleave_pairs_labels_and_random_pairing():
    bodies = [[10 * i + j for j in range(4)] for i in range(1, 6)]  # 5 documents
    labels = [[-100] + [-(10 * i + j) for j in range(4)] + [-100] for i in range(1, 6)]
    out = interleaved_dataset(_docs(bodies, labels), every_n_tokens=2)
    assert len(out) == 2  # the odd document out is left out
    item = out[1]  # documents 2 and 3
    assert item["tokens"].tolist() == [BOS, 30, 31, 40, 41, 32, 33, 42, 43, EOS]
    assert item["labels"].tolist() == [BOS, -30, -31, -40, -41, -32, -33, -42, -43, -100]
    shuffled = interleaved_dataset(_docs(bodies), every_n_tokens=2, pairing="random", seed=4)
    pairs = set(zip(shuffled.fields["doc_a"].tolist(), shuffled.fields["doc_b"].tolist()))
    assert pairs != {(0, 1), (2, 3)} and all(a != b for a, b in pairs)
    with pytest.raises(ValueError, match="at least two"):
        interleaved_dataset(_docs(bodies[:1]), every_n_tokens=2)


def test_dilation_inserts_filler_with_ignored_labels():
    out = dilated_dataset(
        _docs([[11, 12, 13, 14, 15]]), every_n_tokens=2, filler_tokens=3, filler_id=9
    )
    item = out[0]
    assert item["tokens"].tolist() == [BOS, 11, 12, 9, 9, 9, 13, 14, 9, 9, 9, 15, EOS]
    assert item["labels"].tolist() == [
        BOS,
        11,
        12,
        -100,
        -100,
        -100,
        13,
        14,
        -100,
        -100,
        -100,
        15,
        EOS,
    ]
    every = dilated_dataset(_docs([[5, 6, 7]]), filler_id=0, label_filler=True)
    assert every[0]["tokens"].tolist() == [BOS, 5, 0, 6, 0, 7, EOS]
    assert every[0]["labels"].tolist() == [BOS, 5, 0, 6, 0, 7, EOS]
    with pytest.raises(ValueError, match="filler_id"):
        dilated_dataset(_docs([[5]]))


def test_builders_take_a_tokenizer_and_source(tmp_path, spm_tokenizer):
    for i, text in enumerate(
        ["The grass is green. The sky is blue.", "Call me Ishmael. Some years ago."]
    ):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    base = dict(cache_dir=tmp_path / "c", progress=False)
    docs = [
        spm_tokenizer.encode(t.read_text(), add_bos=False, add_eos=False)
        for t in sorted(tmp_path.glob("*.txt"))
    ]
    mixed = interleaved_dataset(spm_tokenizer, str(tmp_path), every_n_tokens=4, **base)
    tokens = mixed[0]["tokens"].tolist()
    assert tokens[0] == spm_tokenizer.bos_id and tokens[-1] == spm_tokenizer.eos_id
    assert tokens[1:5] == docs[0][:4] and tokens[5:9] == docs[1][:4]
    # pad_id of torchtune's Llama 2 tokenizer (0) is the default filler
    dilated = dilated_dataset(spm_tokenizer, str(tmp_path), **base)
    body = dilated[0]["tokens"][1:-1]
    assert body[1::2].tolist() == [0] * (len(docs[0]) - 1) and body[::2].tolist() == docs[0]
    with pytest.raises(ValueError, match="cannot be combined"):
        interleaved_dataset(_docs([[1], [2]]), "somewhere", every_n_tokens=2)
