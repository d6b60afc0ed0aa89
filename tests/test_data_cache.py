"""The token cache: a second run does not tokenize; the key follows files, tokenizer and
options; entries are written atomically and damaged ones rebuilt."""

import os

import numpy as np
import pytest

from hmt_plugin.data import CACHE_ENV, default_cache_dir, long_text_dataset, tokenizer_fingerprint
from hmt_plugin.data.cache import TokenCacheWriter, load_cached
from tests.data_fixtures import (  # noqa: F401
    byte_qwen2_tokenizer,
    byte_tiktoken_tokenizer,
    other_spm_tokenizer,
    spm_path,
    spm_tokenizer,
)


class Counting:
    """Wraps a tokenizer and counts encode calls (its fingerprint probe included)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, add_bos=True, add_eos=True):
        self.calls += 1
        return self.inner.encode(text, add_bos=add_bos, add_eos=add_eos)


def _books(root, n=3):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{i}.txt").write_text(
            f"Book {i}. The grass is green. " * (i + 1), encoding="utf-8"
        )
    return root


def _entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_second_run_reads_the_cache(tmp_path, spm_tokenizer):
    src, cache = _books(tmp_path / "books"), tmp_path / "cache"
    tok = Counting(spm_tokenizer)
    first = long_text_dataset(tok, src, cache_dir=cache, progress=False)
    calls_first = tok.calls
    assert calls_first >= 3  # one per book (plus the fingerprint probe)
    second = long_text_dataset(tok, src, cache_dir=cache, progress=False)
    assert tok.calls - calls_first <= 1  # at most the fingerprint probe, no document
    assert len(_entries(cache)) == 1 and not any(n.startswith(".tmp") for n in _entries(cache))
    assert [x["tokens"].tolist() for x in first] == [x["tokens"].tolist() for x in second]
    entry = cache / _entries(cache)[0]
    assert sorted(p.name for p in entry.iterdir()) == [
        "meta.json",
        "names.json",
        "offsets.npy",
        "tokens.npy",
    ]
    assert np.load(entry / "tokens.npy", mmap_mode="r").dtype == np.uint32


def test_key_follows_files_tokenizer_and_options(tmp_path, spm_tokenizer, other_spm_tokenizer):
    src, cache = _books(tmp_path / "books"), tmp_path / "cache"

    def build(tok=spm_tokenizer, **kw):
        return long_text_dataset(tok, src, cache_dir=cache, progress=False, **kw)

    base = build()
    assert len(_entries(cache)) == 1
    build(add_eos=False)
    build(strip_gutenberg=True)
    build(max_documents=2)
    assert len(_entries(cache)) == 4
    other = build(other_spm_tokenizer)
    assert len(_entries(cache)) == 5
    assert (
        other.num_tokens != base.num_tokens
        or other[0]["tokens"].tolist() != base[0]["tokens"].tolist()
    )
    # a changed file (size and mtime) gives a new entry with the new text
    (src / "1.txt").write_text("Changed text entirely.", encoding="utf-8")
    changed = build()
    assert len(_entries(cache)) == 6
    assert changed[1]["tokens"].tolist() == spm_tokenizer.encode("Changed text entirely.")
    # a file touched to a new mtime with the same size also counts as changed
    st = (src / "0.txt").stat()
    os.utime(src / "0.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build()
    assert len(_entries(cache)) == 7


def test_fingerprint_identifies_tokenizers(tmp_path, spm_path, spm_tokenizer, other_spm_tokenizer):
    from torchtune.models.llama2 import llama2_tokenizer

    same = llama2_tokenizer(str(spm_path))
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(spm_tokenizer)
    tik = byte_tiktoken_tokenizer(tmp_path)
    qwen = byte_qwen2_tokenizer(tmp_path)
    prints = {tokenizer_fingerprint(t) for t in (spm_tokenizer, other_spm_tokenizer, tik, qwen)}
    assert len(prints) == 4


@pytest.mark.parametrize("kind", ["tiktoken", "qwen2"])
def test_other_torchtune_tokenizers(tmp_path, kind):
    tok = (
        byte_tiktoken_tokenizer(tmp_path) if kind == "tiktoken" else byte_qwen2_tokenizer(tmp_path)
    )
    (tmp_path / "a.txt").write_text("caf\u00e9 \u2014 ok", encoding="utf-8")
    ds = long_text_dataset(tok, tmp_path / "a.txt", cache_dir=tmp_path / "c", progress=False)
    assert ds[0]["tokens"].tolist() == tok.encode("caf\u00e9 \u2014 ok", add_bos=True, add_eos=True)
    if kind == "qwen2":  # no BOS: nothing added, nothing recorded
        assert ds.bos_id is None and ds[0]["tokens"][-1] == tok.eos_id


def test_default_dir_from_environment(tmp_path, monkeypatch, spm_tokenizer):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    (tmp_path / "a.txt").write_text("hello")
    long_text_dataset(spm_tokenizer, tmp_path / "a.txt", progress=False)
    assert len(_entries(tmp_path / "envcache")) == 1
    monkeypatch.delenv(CACHE_ENV)
    assert str(default_cache_dir()).endswith(os.path.join(".cache", "hmt_plugin"))


def test_failed_build_leaves_nothing_and_damaged_entry_is_rebuilt(tmp_path, spm_tokenizer):
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        with TokenCacheWriter(cache, "k") as writer:
            writer.append(np.arange(5), "doc")
            raise RuntimeError("interrupted")
    assert _entries(cache) == [] and load_cached(cache, "k") is None

    (tmp_path / "a.txt").write_text("hello there")
    first = long_text_dataset(spm_tokenizer, tmp_path / "a.txt", cache_dir=cache, progress=False)
    entry = cache / _entries(cache)[0]
    (entry / "offsets.npy").write_bytes(b"garbage")
    again = long_text_dataset(spm_tokenizer, tmp_path / "a.txt", cache_dir=cache, progress=False)
    assert again[0]["tokens"].tolist() == first[0]["tokens"].tolist()
    assert np.load(entry / "offsets.npy").tolist() == [0, again.num_tokens]


def test_parallel_tokenization_matches(tmp_path, spm_tokenizer):
    src = _books(tmp_path / "books", n=5)
    serial = long_text_dataset(spm_tokenizer, src, cache_dir=tmp_path / "a", progress=False)
    forked = long_text_dataset(
        spm_tokenizer, src, cache_dir=tmp_path / "b", num_workers=2, progress=False
    )
    assert [x["tokens"].tolist() for x in serial] == [x["tokens"].tolist() for x in forked]


def test_pickling_sends_the_token_file_by_path(tmp_path, spm_tokenizer):
    import pickle

    from hmt_plugin.data import SegmentWindows

    (tmp_path / "a.txt").write_text("The grass is green. " * 200)
    ds = long_text_dataset(
        spm_tokenizer, tmp_path / "a.txt", cache_dir=tmp_path / "c", progress=False
    )
    windows = SegmentWindows(ds, tokens_per_segment=8, segments_per_window=2)
    blob = pickle.dumps(windows)
    assert len(blob) < ds.tokens.nbytes  # not a copy of the tokens
    back = pickle.loads(blob)
    assert isinstance(back.documents.tokens, np.memmap)
    assert all(np.array_equal(back[i]["tokens"], windows[i]["tokens"]) for i in range(len(windows)))
