from hmt_plugin.training.loss import SegmentLoss, segment_loss
from hmt_plugin.training.lr_schedules import step_decay_schedule

__all__ = ["SegmentLoss", "segment_loss", "step_decay_schedule"]
