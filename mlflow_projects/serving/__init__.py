"""Request handling of the explanation service (``service.py`` is the thin BentoML layer: routes only).

One module per concern:

- :mod:`~mlflow_projects.serving.settings`: :class:`ServeConfig` from the ``CXR_*`` environment; where
  the service binds and the refusal to expose it without API keys (:func:`check_bind_address`).
- :mod:`~mlflow_projects.serving.startup`: what ``service.py`` decides at import: the model packaged in a
  Bento (found next to the service's source, no ``envs`` needed) and the bind check.
- :mod:`~mlflow_projects.serving.runtime`: model loading; ONNX Runtime / torch / maps-pyfunc runtimes
  behind :class:`LoadedModel`.
- :mod:`~mlflow_projects.serving.explain`: the explanation core, :class:`ExplanationService`
  (predict, explain, concepts, feedback) and :func:`explanation_maps`, the maps ``/explain`` serves,
  computed with the library calls the audit uses.
- :mod:`~mlflow_projects.serving.verdicts`: what the service takes from the latest passing audit: the
  served unit concepts (with their evidence), per-class verdicts and unfit warnings, the OOD score.
- :mod:`~mlflow_projects.serving.batching`: :class:`MicroBatcher` and :class:`LRUCache`.
- :mod:`~mlflow_projects.serving.images`: upload decoding (4xx on bad input), preprocessing, PNGs.
- :mod:`~mlflow_projects.serving.middleware`: access log, Bearer auth, body limit, upload checks (one
  ASGI middleware each).
- :mod:`~mlflow_projects.serving.metrics`: the service's Prometheus lines.
- :mod:`~mlflow_projects.serving.feedback`: the append-only clinician feedback store.
- :mod:`~mlflow_projects.serving.errors`: :class:`ServingError` (HTTP status + message).

Registry look-ups (``ModelIdentity``, ``resolve_model_uri``, ``find_passing_audit``) live in
:mod:`mlflow_projects.common`. Nothing here imports bentoml except
:func:`~mlflow_projects.serving.startup.find_packaged_model` for a ``CXR_BENTO_MODEL`` outside a Bento.
"""
from mlflow_projects.serving.batching import LRUCache, MicroBatcher
from mlflow_projects.serving.errors import ServingError
from mlflow_projects.serving.explain import ExplanationService, explanation_maps, top_units
from mlflow_projects.serving.images import DecodedImage, decode_upload, grey_png, overlay_png, preprocess
from mlflow_projects.serving.middleware import check_multipart_fields, middleware_stack
from mlflow_projects.serving.runtime import CLASSIFIER_METHODS, MAPS_METHODS, LoadedModel, list_methods, load_model
from mlflow_projects.serving.settings import (DEFAULT_HOST, DEFAULT_MODEL_URI, ServeConfig, UnsafeBindError,
                                              check_bind_address)
from mlflow_projects.serving.startup import find_packaged_model, startup_config

__all__ = ["ServeConfig", "ServingError", "LoadedModel", "ExplanationService", "explanation_maps", "top_units",
           "MicroBatcher", "LRUCache", "decode_upload", "preprocess", "overlay_png", "grey_png", "DecodedImage",
           "list_methods", "load_model", "check_multipart_fields", "middleware_stack", "check_bind_address",
           "UnsafeBindError", "find_packaged_model", "startup_config", "DEFAULT_MODEL_URI", "DEFAULT_HOST",
           "CLASSIFIER_METHODS", "MAPS_METHODS"]
