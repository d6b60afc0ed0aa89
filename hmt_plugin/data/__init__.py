"""Data pipeline for HMT: long documents, tokenized once and cached, cut into windows and
batched for segment recurrence.

Builders (tokenizer first, usable as ``_component_``) return :class:`TokenizedDocuments`;
:class:`SegmentWindows` turns them into training or evaluation windows; :func:`segment_collate`
batches those as ``tokens/labels/mask/seq_lens``.
"""

from hmt_plugin.data.cache import CACHE_ENV, default_cache_dir
from hmt_plugin.data.collate import segment_collate
from hmt_plugin.data.documents import TokenizedDocuments
from hmt_plugin.data.gutenberg import strip_gutenberg
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
    "SegmentWindows",
    "TokenizedDocuments",
    "default_cache_dir",
    "dilated_dataset",
    "interleaved_dataset",
    "long_text_dataset",
    "segment_collate",
    "split_wikitext_articles",
    "strip_gutenberg",
    "synthetic_recall_dataset",
    "tokenizer_fingerprint",
    "vocab_size_of",
]
