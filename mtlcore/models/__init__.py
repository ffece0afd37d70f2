"""Encoders and the multi-task model (shared encoder + one head per task)."""
from mtlcore.models.lenet import LeNetEncoder
from mtlcore.models.multitask import MultiTaskModel, build_model

__all__ = ["LeNetEncoder", "MultiTaskModel", "build_model"]
