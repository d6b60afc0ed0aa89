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


def write_hf_tokenizer(
    directory: Path,
    *,
    vocab_size: int = 300,
    bos_in_template: bool = True,
    tokenizer_config: dict = None,
    generation_config: dict = None,
) -> Path:
    """A byte-level BPE ``tokenizer.json`` trained here with the ``tokenizers`` library (ids 0-2:
    ``<unk>``, ``<s>``, ``</s>``), its ``tokenizer_config.json`` (default: BOS ``<s>``, EOS
    ``</s>``) and, if given, ``generation_config.json``. ``bos_in_template``: the post-processor
    puts ``<s>`` in front, as Llama's does; off, as GPT-2-style tokenizers have it."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(TEXT.split(". ") * 20, trainer=trainer)
    if bos_in_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"} if tokenizer_config is None else tokenizer_config
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory / "tokenizer.json"
