"""A model's tokenizer.json (torchtune's HuggingFaceBaseTokenizer) through hf_tokenizer: BOS
and EOS as the model's files say, and the data pipeline and token cache on top of it."""

import pytest
from omegaconf import OmegaConf
from torchtune import config
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

from hmt_plugin.data import hf_tokenizer, long_text_dataset, tokenizer_fingerprint
from hmt_plugin.training.data_setup import build_tokenizer
from tests.assets import TEXT, write_hf_tokenizer


def test_bos_follows_the_template_and_eos_is_appended(tmp_path):
    write_hf_tokenizer(tmp_path / "llama_like", generation_config={"eos_token_id": [2, 0]})
    tok = config.instantiate(OmegaConf.create(
        {"_component_": "hmt_plugin.data.hf_tokenizer", "path": str(tmp_path / "llama_like")}))
    assert isinstance(tok, HuggingFaceBaseTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.adds_bos, tok.stop_tokens) == (1, 2, True, [0, 2])
    ids = tok.encode("The quick brown fox.")
    assert ids[0] == 1 and ids[1] != 1 and ids[-1] == 2  # BOS once, though the template adds it
    assert tok.encode("The quick brown fox.", add_bos=False, add_eos=False) == ids[1:-1]
    assert tok.decode(ids) == "The quick brown fox."
    assert tok.vocab_size == 300


def test_add_bos_token_and_models_without_bos(tmp_path):
    # GPT-2 style (SmolLM2): a BOS token exists, the tokenizer never puts it in front.
    write_hf_tokenizer(tmp_path / "gpt2_like", bos_in_template=False)
    gpt2 = hf_tokenizer(tmp_path / "gpt2_like" / "tokenizer.json")
    assert gpt2.bos_id == 1 and not gpt2.adds_bos and gpt2.encode("Call me Ishmael.")[0] != 1
    # tokenizer_config.json's add_bos_token decides over the template, as in transformers.
    write_hf_tokenizer(tmp_path / "off", tokenizer_config={"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": False})
    assert hf_tokenizer(tmp_path / "off").encode("Call me Ishmael.")[0] != 1
    # Qwen2 style: bos_token null, EOS from generation_config.json (torchtune's class refuses).
    write_hf_tokenizer(tmp_path / "qwen_like", tokenizer_config={"bos_token": None},
                       generation_config={"eos_token_id": 2})
    qwen = hf_tokenizer(tmp_path / "qwen_like")
    assert qwen.bos_id is None and qwen.eos_id == 2 and qwen.encode("Call me.")[0] != 1


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json there"):
        hf_tokenizer(tmp_path)
    write_hf_tokenizer(tmp_path / "bare")
    (tmp_path / "bare" / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="which tokens are BOS and EOS"):
        hf_tokenizer(tmp_path / "bare")
    write_hf_tokenizer(tmp_path / "wrong", tokenizer_config={"bos_token": "<s>", "eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match="eos_token='<\\|im_end\\|>'"):
        hf_tokenizer(tmp_path / "wrong")
    with pytest.raises(FileNotFoundError, match="tokenizer.path="):
        build_tokenizer(OmegaConf.create({"_component_": "hmt_plugin.data.hf_tokenizer",
                                          "path": str(tmp_path / "nowhere")}))


def test_dataset_and_cache_follow_the_tokenizer(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for i in range(3):
        (books / f"{i}.txt").write_text(TEXT * (i + 2), encoding="utf-8")
    cache = tmp_path / "cache"
    write_hf_tokenizer(tmp_path / "a")
    tok = hf_tokenizer(tmp_path / "a")
    docs = long_text_dataset(tok, str(books), cache_dir=str(cache), progress=False)
    assert len(docs) == 3
    first = docs[0]["tokens"].tolist()
    assert first[0] == tok.bos_id and first[-1] == tok.eos_id
    assert tok.decode(first).strip() == (books / "0.txt").read_text().strip()
    entries = set(cache.rglob("*"))
    # The same files again: read from the cache, same tokens.
    again = long_text_dataset(hf_tokenizer(tmp_path / "a"), str(books), cache_dir=str(cache), progress=False)
    assert again[0]["tokens"].tolist() == first and set(cache.rglob("*")) == entries
    # Another tokenizer.json (other merges), or the same one with BOS switched off: new keys.
    write_hf_tokenizer(tmp_path / "b", vocab_size=280)
    write_hf_tokenizer(tmp_path / "c", tokenizer_config={"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": False})
    prints = {tokenizer_fingerprint(hf_tokenizer(tmp_path / n)) for n in "abc"}
    assert len(prints) == 3
    other = long_text_dataset(hf_tokenizer(tmp_path / "b"), str(books), cache_dir=str(cache), progress=False)
    assert other[0]["tokens"].tolist() != first and set(cache.rglob("*")) != entries


def _tiny_model_and_tokenizer(tmp_path, **tokenizer_kwargs):
    """A tiny tied Llama as an HF directory with a tokenizer.json beside it, as HMT + tokenizer."""
    import torch

    from hmt_plugin.models import hf_backbone, hmt
    from tests.hf_checkpoints import write_hf_checkpoint

    directory = write_hf_checkpoint(tmp_path / "model", "llama_tied_gqa", vocab_size=320)
    write_hf_tokenizer(directory, **tokenizer_kwargs)
    torch.manual_seed(0)
    model = hmt(hf_backbone(directory), segment_length=24, num_sensory=4, recall_hidden_dim=16,
                cache_size=4).eval()
    return model, hf_tokenizer(directory)


def test_generation_stream_and_lm_eval_read_through_it(tmp_path):
    import io

    import torch

    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from hmt_plugin.eval.lm_eval_harness import HMTEvalWrapper
    from hmt_plugin.generation import HMTGenerator
    from hmt_plugin.recipes.hmt_generate import TextStream

    model, tok = _tiny_model_and_tokenizer(tmp_path, bos_in_template=False)
    prompt = tok.encode("It was the best of times", add_bos=True, add_eos=False)
    out = HMTGenerator(model).generate(prompt, 30, stop_tokens=tok.stop_tokens).sequences()[0]
    sink = io.StringIO()
    stream = TextStream(tok, prompt, out=sink)
    for t in out:
        stream(t)
    assert sink.getvalue() == tok.decode(out) or tok.decode(out).startswith(sink.getvalue())

    lm = HMTEvalWrapper(model, tok, progress=False, chunk_segments=2)
    # No BOS in front of a context, as transformers encodes it for this model; the prefix
    # (BOS id) only stands in for an empty context and starts a rolling document.
    assert lm.tok_encode("Call me Ishmael.") == tok.encode("Call me Ishmael.", add_bos=False, add_eos=False)
    ctx, cont = lm.encode_pair("", "Call me")
    assert ctx == [tok.bos_id]
    text = (TEXT * 2).strip()
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = torch.tensor([[tok.bos_id] + tok.encode(text, add_bos=False, add_eos=False)])
    with torch.no_grad():
        want = -float(model(ids, labels=ids, logits="none").nll.sum())
    assert rolling == pytest.approx(want, rel=1e-5)
    (ll, _), = lm.loglikelihood([SimpleNamespace(args=("It was the best", " of times"))])
    assert ll < 0
    assert lm.tok_decode(lm.tok_encode("a single step")) == "a single step"
