"""Generation with an HMT model: prompts of any length read segment by segment, KV-cached
decoding inside the current segment, memory written when a segment fills."""

from hmt_plugin.generation.generator import GenerationOutput, HMTGenerator
from hmt_plugin.generation.kv_cache import SegmentCaches, SegmentKVCache, caches_removed
from hmt_plugin.generation.sampling import sample_next_token

__all__ = [
    "GenerationOutput",
    "HMTGenerator",
    "SegmentCaches",
    "SegmentKVCache",
    "caches_removed",
    "sample_next_token",
]
