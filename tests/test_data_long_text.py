"""long_text_dataset from local files and through datasets.load_dataset, with bad data."""

import json
import logging

import numpy as np
import pytest

from hmt_plugin.data import DataSourceError, SegmentWindows, long_text_dataset
from tests.data_fixtures import MODERN_BODY, MODERN_BOOK, spm_path, spm_tokenizer  # noqa: F401

TEXTS = [
    "Call me Ishmael. Some years ago I thought I would sail about a little.",
    "It was the best of times, it was the worst of times.",
    "The grass is green. The sky is blue.",
]


def _encode(tok, text, bos=True, eos=True):
    return tok.encode(text, add_bos=bos, add_eos=eos)


def _as_lists(ds):
    return [ds[i]["tokens"].tolist() for i in range(len(ds))]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_directory_of_txt_files_keeps_documents_apart(tmp_path, spm_tokenizer):
    src = tmp_path / "books"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (src / "sub" / "b.txt").write_text(TEXTS[1], encoding="utf-8")
    (src / "notes.md").write_text("ignored")
    ds = long_text_dataset(spm_tokenizer, str(src), cache_dir=tmp_path / "cache", progress=False)
    assert len(ds) == 2 and ds.skipped_empty == 0
    assert _as_lists(ds) == [_encode(spm_tokenizer, TEXTS[0]), _encode(spm_tokenizer, TEXTS[1])]
    assert (
        ds[0]["tokens"][0] == spm_tokenizer.bos_id and ds[0]["tokens"][-1] == spm_tokenizer.eos_id
    )
    assert ds.num_tokens == sum(len(x) for x in _as_lists(ds))
    assert "labels" not in ds[0]
    assert ds.names[1].endswith("b.txt")
    # windows never mix the two books
    windows = SegmentWindows(ds, tokens_per_segment=4, segments_per_window=2)
    for i in range(len(windows)):
        item = windows[i]
        doc = _as_lists(ds)[item["doc_id"]]
        assert item["tokens"].tolist() == doc[item["start"] : item["start"] + item["tokens"].size]


def test_bos_eos_options_and_concatenate(tmp_path, spm_tokenizer):
    src = tmp_path / "d"
    src.mkdir()
    for i, t in enumerate(TEXTS):
        (src / f"{i}.txt").write_text(t, encoding="utf-8")
    bare = long_text_dataset(
        spm_tokenizer, src, add_bos=False, add_eos=False, cache_dir=tmp_path / "c", progress=False
    )
    assert _as_lists(bare) == [_encode(spm_tokenizer, t, False, False) for t in TEXTS]
    assert bare.bos_id is None and bare.eos_id is None
    joined = long_text_dataset(
        spm_tokenizer, src, concatenate=True, cache_dir=tmp_path / "c", progress=False
    )
    assert len(joined) == 1
    assert joined[0]["tokens"].tolist() == sum((_encode(spm_tokenizer, t) for t in TEXTS), [])


def test_jsonl_parquet_single_file_and_max_documents(tmp_path, spm_tokenizer):
    rows = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    _write_jsonl(tmp_path / "x.jsonl", rows)
    _write_parquet(tmp_path / "y.parquet", rows)
    expected = [_encode(spm_tokenizer, t) for t in TEXTS]
    for name in ("x.jsonl", "y.parquet"):
        ds = long_text_dataset(
            spm_tokenizer, tmp_path / name, cache_dir=tmp_path / "c", progress=False
        )
        assert _as_lists(ds) == expected
        two = long_text_dataset(
            spm_tokenizer,
            tmp_path / name,
            max_documents=2,
            cache_dir=tmp_path / "c",
            progress=False,
        )
        assert _as_lists(two) == expected[:2]


def test_empty_documents_skipped_and_logged(tmp_path, spm_tokenizer, caplog):
    rows = [{"text": TEXTS[0]}, {"text": ""}, {"text": "   \n"}, {"text": None}, {"text": "Hi."}]
    _write_jsonl(tmp_path / "x.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="hmt_plugin.data"):
        ds = long_text_dataset(
            spm_tokenizer, tmp_path / "x.jsonl", cache_dir=tmp_path / "c", progress=False
        )
    assert len(ds) == 2 and ds.skipped_empty == 3
    assert "Skipped 3 empty documents" in caplog.text
    # a document shorter than one segment still makes one (short) evaluation window
    short = SegmentWindows(ds, tokens_per_segment=64)
    assert len(short) == 2 and short[1]["tokens"].size < 64


def test_bad_data_errors_name_the_problem(tmp_path, spm_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no data here")
    with pytest.raises(DataSourceError, match=r"empty.*no \.txt.*readme\.md"):
        long_text_dataset(spm_tokenizer, empty, cache_dir=tmp_path / "c")

    with pytest.raises(DataSourceError, match="does not exist"):
        long_text_dataset(spm_tokenizer, tmp_path / "nope.txt", cache_dir=tmp_path / "c")

    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "good.txt").write_text("fine", encoding="utf-8")
    (latin / "bad.txt").write_bytes("caf\u00e9 na\u00efve".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"bad\.txt is not UTF-8.*iconv"):
        long_text_dataset(spm_tokenizer, latin, cache_dir=tmp_path / "c", progress=False)

    _write_jsonl(tmp_path / "x.jsonl", [{"body": "a", "id": 1}])
    with pytest.raises(DataSourceError, match=r"x\.jsonl:1.*'text'.*\['body', 'id'\]"):
        long_text_dataset(
            spm_tokenizer, tmp_path / "x.jsonl", cache_dir=tmp_path / "c", progress=False
        )
    _write_parquet(tmp_path / "y.parquet", [{"body": "a", "id": 1}])
    with pytest.raises(DataSourceError, match=r"y\.parquet.*'content'.*\['body', 'id'\]"):
        long_text_dataset(
            spm_tokenizer,
            tmp_path / "y.parquet",
            column="content",
            cache_dir=tmp_path / "c",
            progress=False,
        )

    _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}])
    with pytest.raises(ValueError, match="no non-empty documents"):
        long_text_dataset(
            spm_tokenizer, tmp_path / "blank.jsonl", cache_dir=tmp_path / "c", progress=False
        )


def test_ids_never_exceed_the_vocabulary(tmp_path, spm_tokenizer):
    class Broken:
        """A tokenizer that returns an id outside its vocabulary."""

        vocab_size, bos_id, eos_id, pad_id = 10, 1, 2, 0

        def encode(self, text, add_bos=True, add_eos=True):
            return [1, 5, 10, 2]

    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"a\.txt.*\[0, 10\)"):
        long_text_dataset(Broken(), tmp_path / "a.txt", cache_dir=tmp_path / "c", progress=False)
    ds = long_text_dataset(
        spm_tokenizer, tmp_path / "a.txt", cache_dir=tmp_path / "c", progress=False
    )
    assert int(ds.tokens.max()) < spm_tokenizer.vocab_size


def test_gutenberg_stripping_in_the_builder(tmp_path, spm_tokenizer):
    (tmp_path / "book.txt").write_bytes(MODERN_BOOK.encode("utf-8"))
    raw = long_text_dataset(
        spm_tokenizer, tmp_path / "book.txt", cache_dir=tmp_path / "c", progress=False
    )
    clean = long_text_dataset(
        spm_tokenizer,
        tmp_path / "book.txt",
        strip_gutenberg=True,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert clean[0]["tokens"].tolist() == _encode(spm_tokenizer, MODERN_BODY)
    raw_text = spm_tokenizer.decode(raw[0]["tokens"].tolist())
    clean_text = spm_tokenizer.decode(clean[0]["tokens"].tolist())
    assert raw_text.count("LICENSE") == 3 and "Produced by" in raw_text
    assert "LICENSE" not in clean_text and "Gutenberg" not in clean_text
    assert "Produced by" not in clean_text and "Call me Ishmael" in clean_text


def test_wikitext_files_split_into_articles(tmp_path, spm_tokenizer):
    text = (
        " \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n Old . \n"
        " = Beta = \n \n Beta follows . \n"
    )
    (tmp_path / "wikitext_valid.txt").write_text(text, encoding="utf-8")
    ds = long_text_dataset(
        spm_tokenizer, tmp_path / "wikitext_valid.txt", cache_dir=tmp_path / "c", progress=False
    )
    decoded = [spm_tokenizer.decode(x) for x in _as_lists(ds)]
    assert len(ds) == 2 and "History" in decoded[0] and "Beta follows" in decoded[1]
    whole = long_text_dataset(
        spm_tokenizer,
        tmp_path / "wikitext_valid.txt",
        article_split=None,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert len(whole) == 1


# --------------------------------------------------------------------- datasets.load_dataset
def test_hugging_face_json_and_parquet_builders(tmp_path, spm_tokenizer):
    rows = [{"text": t} for t in TEXTS] + [{"text": ""}]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_parquet(tmp_path / "train.parquet", rows)
    expected = [_encode(spm_tokenizer, t) for t in TEXTS]
    hf_cache = str(tmp_path / "hf")
    for builder, fname in (("json", "train.jsonl"), ("parquet", "train.parquet")):
        ds = long_text_dataset(
            spm_tokenizer,
            builder,
            data_files=str(tmp_path / fname),
            split="train",
            cache_dir=tmp_path / "c",
            hf_cache_dir=hf_cache,
            progress=False,
        )
        assert _as_lists(ds) == expected and ds.skipped_empty == 1
    first = long_text_dataset(
        spm_tokenizer,
        "json",
        data_files=str(tmp_path / "train.jsonl"),
        split="train[:2]",
        cache_dir=tmp_path / "c",
        hf_cache_dir=hf_cache,
        progress=False,
    )
    assert _as_lists(first) == expected[:2]
    with pytest.raises(DataSourceError, match=r"no column 'body'.*\['text'\]"):
        long_text_dataset(
            spm_tokenizer,
            "json",
            data_files=str(tmp_path / "train.jsonl"),
            column="body",
            cache_dir=tmp_path / "c",
            hf_cache_dir=hf_cache,
            progress=False,
        )


def test_hugging_face_streaming_takes_the_first_documents(tmp_path, spm_tokenizer):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    ds = long_text_dataset(
        spm_tokenizer,
        "json",
        data_files=str(tmp_path / "train.jsonl"),
        streaming=True,
        max_documents=2,
        cache_dir=tmp_path / "c",
        hf_cache_dir=str(tmp_path / "hf"),
        progress=False,
    )
    assert _as_lists(ds) == [_encode(spm_tokenizer, t) for t in TEXTS[:2]]


def test_saved_dataset_directory_and_wikitext_rows(tmp_path, spm_tokenizer):
    import datasets

    lines = [
        " = Alpha = \n",
        " \n",
        " Alpha is a letter . \n",
        " = = Use = = \n",
        " Often . \n",
        " = Beta = \n",
        " Beta follows . \n",
    ]
    data = datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": lines}),
            "train": datasets.Dataset.from_dict({"text": TEXTS}),
        }
    )
    data.save_to_disk(str(tmp_path / "saved"))
    train = long_text_dataset(
        spm_tokenizer, tmp_path / "saved", cache_dir=tmp_path / "c", progress=False
    )
    assert _as_lists(train) == [_encode(spm_tokenizer, t) for t in TEXTS]
    articles = long_text_dataset(
        spm_tokenizer,
        tmp_path / "saved",
        split="validation",
        article_split="wikitext",
        cache_dir=tmp_path / "c",
        progress=False,
    )
    decoded = [spm_tokenizer.decode(x) for x in _as_lists(articles)]
    assert len(decoded) == 2
    assert "Alpha is a letter" in decoded[0] and "Often" in decoded[0] and "Beta" not in decoded[0]
    assert "Beta follows" in decoded[1] and "Alpha" not in decoded[1]
    with pytest.raises(DataSourceError, match=r"no split 'test'.*validation"):
        long_text_dataset(spm_tokenizer, tmp_path / "saved", split="test", cache_dir=tmp_path / "c")


def test_token_arrays_are_memory_mapped_uint32(tmp_path, spm_tokenizer):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    ds = long_text_dataset(
        spm_tokenizer, tmp_path / "a.txt", cache_dir=tmp_path / "c", progress=False
    )
    assert isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.uint32
    assert ds[0]["tokens"].dtype == np.int64
