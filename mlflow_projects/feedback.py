"""Moved to :mod:`mlflow_projects.serving.feedback` (the feedback store is part of the service).

This name stays importable until its last user outside the service (``tests/mlflow_projects/test_train_dwarf.py``)
imports the new one; nothing is defined here.
"""
from mlflow_projects.serving.feedback import (FeedbackError, FeedbackStore, default_feedback_dir,  # noqa: F401
                                              validate_boxes, validate_mask_png)

__all__ = ["FeedbackStore", "FeedbackError", "default_feedback_dir", "validate_boxes", "validate_mask_png"]
