"""Format readers: each turns a public data set's annotation files into a manifest.

Registry: :func:`get_reader` by name, :func:`list_readers` for the names (the ``convert``
sub-commands of ``python -m training.data``).
"""
from __future__ import annotations

from typing import Callable

import pandas as pd

from training.data.readers.chestx_det import read_chestx_det
from training.data.readers.nih import read_nih
from training.data.readers.reports import Report, read_iu_xml, read_text_reports, write_reports
from training.data.readers.vindr import read_vindr, union_boxes

__all__ = ["read_nih", "read_chestx_det", "read_vindr", "union_boxes", "Report", "read_iu_xml",
           "read_text_reports", "write_reports", "get_reader", "list_readers"]

_READERS: dict[str, Callable[..., pd.DataFrame]] = {
    "nih": read_nih, "chestx-det": read_chestx_det, "vindr": read_vindr,
}


def list_readers() -> list[str]:
    """Names of the manifest readers."""
    return sorted(_READERS)


def get_reader(name: str) -> Callable[..., pd.DataFrame]:
    """The reader called ``name``.

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    try:
        return _READERS[name]
    except KeyError:
        raise ValueError(f"unknown reader {name!r}; valid: {list_readers()}") from None
