"""The service's own Prometheus lines, appended to BentoML's ``/metrics`` (``__metrics__`` of the service).

Series: ``cxr_model_info{name, version, alias, kind}`` (1 for the served model), ``cxr_model_ready``,
``cxr_requests_total{route}``, ``cxr_explain_cache_hits_total``, ``cxr_explain_cache_misses_total``,
``cxr_batches_total``, ``cxr_batched_items_total`` (their ratio is the mean micro-batch size),
``cxr_ood_flagged_total`` (responses whose image the audit's OOD detector flagged).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow_projects.serving.explain import ExplanationService

__all__ = ["metrics_text"]


def metrics_text(service: "ExplanationService") -> str:
    """Prometheus text lines of the service's counters (see the module docstring).

    Args:
        service: the explanation core whose model, counters, cache and batcher are reported.
    """
    lines = ["# HELP cxr_model_info Served model (value 1).", "# TYPE cxr_model_info gauge"]
    if service.model is not None:
        i = service.model.identity
        lines.append(f'cxr_model_info{{name="{i.name}",version="{i.version}",alias="{i.alias}",'
                     f'kind="{service.model.kind}"}} 1')
    lines += ["# TYPE cxr_model_ready gauge", f"cxr_model_ready {int(service.ready)}",
              "# TYPE cxr_requests_total counter"]
    lines += [f'cxr_requests_total{{route="{k}"}} {v}' for k, v in sorted(service.counts.items())]
    lines += ["# TYPE cxr_explain_cache_hits_total counter", f"cxr_explain_cache_hits_total {service.cache.hits}",
              "# TYPE cxr_explain_cache_misses_total counter",
              f"cxr_explain_cache_misses_total {service.cache.misses}",
              "# TYPE cxr_batches_total counter", f"cxr_batches_total {service.batcher.batches}",
              "# TYPE cxr_batched_items_total counter", f"cxr_batched_items_total {service.batcher.items}",
              "# TYPE cxr_ood_flagged_total counter", f"cxr_ood_flagged_total {getattr(service, 'ood_flagged', 0)}"]
    return "\n".join(lines) + "\n"
