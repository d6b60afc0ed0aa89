from hmt_plugin.modules.backbone import BackboneError
from hmt_plugin.modules.hmt import HMT, HMTOutput
from hmt_plugin.modules.hmt_config import HMTConfig, HMTConfigError
from hmt_plugin.modules.recall import MemoryRecall
from hmt_plugin.modules.state import HMTState

__all__ = [
    "BackboneError",
    "HMT",
    "HMTConfig",
    "HMTConfigError",
    "HMTOutput",
    "HMTState",
    "MemoryRecall",
]
