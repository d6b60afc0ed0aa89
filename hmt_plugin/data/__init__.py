"""Data pipeline for HMT: long documents, tokenized once and cached, cut into windows and
batched for segment recurrence.

Builders (tokenizer first, usable as ``_component_``) return :class:`TokenizedDocuments`;
:class:`SegmentWindows` turns them into training or evaluation windows; :func:`segment_collate`
batches those as ``tokens/labels/mask/seq_lens``::

    docs = long_text_dataset(tokenizer, "/data/books", strip_gutenberg=True)
    L = model.config.tokens_per_segment
    train = SegmentWindows(docs, tokens_per_segment=L, segments_per_window=model.config.bptt_depth,
                           random_offset=True, seed=0)
    loader = DataLoader(train, batch_size=8, shuffle=True,
                        collate_fn=partial(segment_collate, tokens_per_segment=L,
                                           pad_id=tokenizer.pad_id))
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for batch in loader:
            out = model(batch["tokens"], mask=batch["mask"], labels=batch["labels"])

For the recall demo without a tokenizer::

    recall = synthetic_recall_dataset(num_documents=4000, tokens_per_segment=L,
                                      distance_segments=[1, 2], vocab_size=256, seed=0)
"""

from hmt_plugin.data.cache import CACHE_ENV, default_cache_dir
from hmt_plugin.data.collate import segment_collate
from hmt_plugin.data.documents import TokenizedDocuments
from hmt_plugin.data.gutenberg import strip_gutenberg
from hmt_plugin.data.hf_tokenizer import HFTokenizer, hf_tokenizer
from hmt_plugin.data.long_text import long_text_dataset
from hmt_plugin.data.synthetic_recall import synthetic_recall_dataset
from hmt_plugin.data.text_sources import DataSourceError
from hmt_plugin.data.tokenizer_utils import tokenizer_fingerprint, vocab_size_of
from hmt_plugin.data.topic_switch import dilated_dataset, interleaved_dataset
from hmt_plugin.data.wikitext import split_wikitext_articles
from hmt_plugin.data.windows import SegmentWindows

__all__ = [
    "CACHE_ENV",
    "DataSourceError",
    "HFTokenizer",
    "SegmentWindows",
    "TokenizedDocuments",
    "default_cache_dir",
    "dilated_dataset",
    "hf_tokenizer",
    "interleaved_dataset",
    "long_text_dataset",
    "segment_collate",
    "split_wikitext_articles",
    "strip_gutenberg",
    "synthetic_recall_dataset",
    "tokenizer_fingerprint",
    "vocab_size_of",
]
