"""training: data layer, models, losses and training loops for chest X-ray models.

A plain library (no mlflow, no bentoml); :mod:`mlflow_projects` is the glue that logs and registers.
"""
