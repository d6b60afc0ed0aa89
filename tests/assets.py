"""Tiny real assets built inside the tests: a SentencePiece tokenizer trained on text the test
writes. (Tiny HF checkpoints come from ``hmt_plugin.checkpointing.tiny_checkpoint``.)"""

from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with "
    "a single step. All happy families are alike; each unhappy family is unhappy in its own "
    "way. It was the best of times, it was the worst of times. Call me Ishmael. "
)


def write_sentencepiece(directory: Path, vocab_size: int = 256) -> Path:
    """A SentencePiece BPE model in the Llama 2 layout (unk 0, bos 1, eos 2, no pad id)."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(TEXT.split(". ")) * 20)
    prefix = directory / "tok"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")
