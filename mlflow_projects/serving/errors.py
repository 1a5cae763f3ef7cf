"""The one error type of the service: a request it cannot answer, with the HTTP status to return."""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ServingError"]


class ServingError(Exception):
    """A request the service cannot answer; ``status`` is the HTTP status to return.

    Args:
        status: 400 bad request, 401, 413 too large, 415 unsupported type, 503 not ready.
        message: what was wrong and what to send instead.
        valid: the valid values, when the error is about a choice.

    Example:
        >>> ServingError(400, "unknown method 'lime'", valid=["cam"]).to_dict()
        {'error': "unknown method 'lime'", 'status': 400, 'valid': ['cam']}
    """

    def __init__(self, status: int, message: str, valid: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.valid = list(valid) if valid is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body: ``{"error", "status"}`` plus ``"valid"`` when the error is about a choice."""
        out: dict[str, Any] = {"error": self.message, "status": self.status}
        if self.valid is not None:
            out["valid"] = self.valid
        return out
