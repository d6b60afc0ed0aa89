"""Step checkpoints live with the rest of the checkpoint code, in
:mod:`hmt_plugin.checkpointing.step_checkpoints`; this path stays importable."""

from hmt_plugin.checkpointing.step_checkpoints import *  # noqa: F401,F403
