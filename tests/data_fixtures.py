"""Assets for the data-pipeline tests, built from text the tests write themselves: a
SentencePiece model in the Llama 2 layout (unk 0, bos 1, eos 2, pad -1), byte-level Llama 3
(tiktoken) and Qwen2 tokenizers, and Project Gutenberg-style books."""

import base64
import json
from pathlib import Path
from typing import Dict

import pytest

CORPUS = (
    "It was the best of times, it was the worst of times, it was the age of wisdom. "
    "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail. "
    "\u201cQuite so,\u201d said he, \u2014 and the caf\u00e9 was closed. "
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "What is the pass key? The pass key is 71432. Remember it. 0123456789 "
    "The Project Gutenberg EBook of a tale. CHAPTER I. THE END. Finis. "
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. The quick brown fox jumps over the lazy dog. "
    'Section 1. LICENSE: *** [Etext #9999] (see: www) - it\'s "small print"; ok? yes! '
)

_built: Dict[str, Path] = {}


def write_sentencepiece(directory: Path, vocab_size: int = 256, corpus: str = CORPUS) -> Path:
    """Train a small BPE SentencePiece model (characters it never saw become unk, id 0)."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    text_file = directory / "corpus.txt"
    text_file.write_text("\n".join(corpus.split(". ")) * 30, encoding="utf-8")
    prefix = directory / "spm"
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def _shared_model(tmp_path_factory, name: str, **kwargs) -> Path:
    # Trained once per session (the fixture is imported into several modules).
    if name not in _built:
        _built[name] = write_sentencepiece(tmp_path_factory.mktemp(name), **kwargs)
    return _built[name]


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory) -> Path:
    return _shared_model(tmp_path_factory, "spm256", vocab_size=256)


@pytest.fixture(scope="session")
def spm_tokenizer(spm_path):
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(str(spm_path))


@pytest.fixture(scope="session")
def other_spm_tokenizer(tmp_path_factory):
    """A second SentencePiece model with a different vocabulary (cache-key tests)."""
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(str(_shared_model(tmp_path_factory, "spm300", vocab_size=300)))


def byte_tiktoken_tokenizer(directory: Path):
    """torchtune's Llama 3 (tiktoken) tokenizer over a ranks file of the 256 single bytes;
    its special tokens keep their Llama 3 ids (BOS 128000, EOS 128001)."""
    from torchtune.models.llama3 import llama3_tokenizer

    path = directory / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return llama3_tokenizer(str(path))


def byte_qwen2_tokenizer(directory: Path):
    """torchtune's Qwen2 tokenizer with a byte-level vocabulary and no merges."""
    from torchtune.models.qwen2._tokenizer import Qwen2Tokenizer, bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    return Qwen2Tokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), special_tokens=special
    )


MODERN_BOOK = (
    "\ufeffThe Project Gutenberg EBook of Tiny Tales, by A. Writer\r\n"
    "\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n"
    "Title: Tiny Tales\r\nRelease Date: May 1, 2005 [EBook #9999]\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***\r\n\r\n\r\n"
    "Produced by A Volunteer\r\n\r\n\r\n"
    "TINY TALES\r\n\r\nCHAPTER I\r\n\r\nCall me Ishmael. It was the best of times.\r\n"
    "The grass is green.\r\n\r\n"
    "End of the Project Gutenberg EBook of Tiny Tales, by A. Writer\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***\r\n\r\n"
    "***** This file should be named 9999.txt *****\r\n"
    "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works\r\n"
    "LICENSE LICENSE LICENSE\r\n"
)
MODERN_BODY = (
    "TINY TALES\n\nCHAPTER I\n\nCall me Ishmael. It was the best of times.\nThe grass is green."
)

OLD_STYLE_BOOK = (
    "The Project Gutenberg Etext of Old Tale by Some One\n\n"
    "Please take a look at the important information in this header.\n\n"
    "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n\n"
    "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\n"
    'Why is this "Small Print!" statement here?  You know: lawyers.\n'
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n\n\n"
    "The Project Gutenberg Etext of Old Tale by Some One\n\n\n"
    "OLD TALE\n\nThe sky is blue. Quite so, said he.\n\n        Finis\n\n\n"
    "End of the Project Gutenberg Etext of Old Tale by Some One\n\n"
)
OLD_STYLE_BODY = "OLD TALE\n\nThe sky is blue. Quite so, said he.\n\n        Finis"
