"""``python -m training.data``: make the phantom, convert public annotation files, collect reports.

Commands (DESIGN.md "Data CLI")::

    python -m training.data phantom --out DIR --n N --size S --seed K
    python -m training.data convert nih --data-entry CSV[.gz] --bbox CSV[.gz] [--images DIR] --out M
    python -m training.data convert chestx-det --json FILE [--json FILE ...] [--images DIR] --out M
    python -m training.data convert vindr --csv FILE[.gz] [--images DIR] --out M
    python -m training.data reports --iu-xml DIR_OR_TGZ | --text FILE_OR_DIR --out FILE.txt

Each prints what it wrote (counts per split and class). Bad input (a missing file, a malformed
row, an unreadable image) prints ``error: ...`` on stderr and exits with code 2, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import pandas as pd

from training.data.imageio import ImageReadError

logger = logging.getLogger(__name__)

__all__ = ["main", "build_parser", "summarize"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m training.data``."""
    p = argparse.ArgumentParser(prog="python -m training.data", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="{phantom,convert,reports}")

    ph = sub.add_parser("phantom", help="generate the synthetic phantom data set")
    ph.add_argument("--out", required=True, type=Path, help="output folder (manifest.parquet, images/)")
    ph.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    ph.add_argument("--size", type=int, default=224, help="image side in pixels, 64..1024 (default 224)")
    ph.add_argument("--seed", type=int, default=0, help="data-set seed (default 0)")
    ph.add_argument("--masks", action="store_true", help="also write per-class masks")

    cv = sub.add_parser("convert", help="convert annotation files into a manifest")
    fmt = cv.add_subparsers(dest="format", required=True, metavar="{nih,chestx-det,vindr}")
    nih = fmt.add_parser("nih", help="NIH ChestX-ray14")
    nih.add_argument("--data-entry", required=True, type=Path, help="Data_Entry_2017.csv[.gz]")
    nih.add_argument("--bbox", type=Path, help="BBox_List_2017.csv[.gz]")
    nih.add_argument("--train-val-list", type=Path, help="official train_val_list.txt")
    nih.add_argument("--test-list", type=Path, help="official test_list.txt")
    cx = fmt.add_parser("chestx-det", help="ChestX-Det JSON")
    cx.add_argument("--json", required=True, type=Path, action="append", help="JSON file (repeatable)")
    vd = fmt.add_parser("vindr", help="VinDr-CXR annotation CSV")
    vd.add_argument("--csv", required=True, type=Path, help="train CSV[.gz]")
    for sp in (nih, cx, vd):
        sp.add_argument("--images", type=Path, help="image folder (optional; sets path and sizes)")
        sp.add_argument("--out", required=True, type=Path, help="output manifest .parquet")
        sp.add_argument("--seed", type=int, default=0, help="seed of the patient-wise split (default 0)")

    rp = sub.add_parser("reports", help="collect reports into a text file, one a line")
    src = rp.add_mutually_exclusive_group(required=True)
    src.add_argument("--iu-xml", type=Path, help="IU/OpenI XML folder or .tgz")
    src.add_argument("--text", type=Path, help="text file (one report a line) or folder of .txt reports")
    rp.add_argument("--out", required=True, type=Path, help="output .txt")
    return p


def summarize(df: pd.DataFrame) -> str:
    """A short human summary of a manifest: rows, splits, boxes and images per class."""
    splits = df["split"].value_counts()
    classes = Counter(lab for labs in df["labels"] for lab in labs)
    n_boxes = int(sum(len(b) for b in df["boxes"]))
    lines = [f"{len(df)} images ({', '.join(f'{s} {int(splits.get(s, 0))}' for s in ('train', 'val', 'test'))}), "
             f"{df['patient_id'].nunique()} patients, {n_boxes} boxes, {int(df['path'].notna().sum())} with image paths,"
             f" {sum(1 for labs in df['labels'] if not labs)} without findings"]
    if classes:
        lines.append("classes: " + ", ".join(f"{c} {n}" for c, n in classes.most_common()))
    return "\n".join(lines)


def _phantom(a: argparse.Namespace) -> int:
    from training.data.phantom import generate_phantom
    from training.data.schema import read_manifest

    path = generate_phantom(a.out, n=a.n, size=a.size, seed=a.seed, **({"masks": True} if a.masks else {}))
    df = read_manifest(path)
    print(f"phantom: wrote {path} and {len(df)} images of {a.size} px under {Path(a.out) / 'images'} (seed {a.seed})")
    print(summarize(df))
    return 0


def _convert(a: argparse.Namespace) -> int:
    from training.data import readers
    from training.data.schema import write_manifest

    if a.format == "nih":
        df = readers.read_nih(a.data_entry, a.bbox, a.images, train_val_list=a.train_val_list,
                              test_list=a.test_list, seed=a.seed)
    elif a.format == "chestx-det":
        df = readers.read_chestx_det(a.json, a.images, seed=a.seed)
    else:
        df = readers.read_vindr(a.csv, a.images, seed=a.seed)
    out = write_manifest(df, a.out)
    print(f"convert {a.format}: wrote {out}")
    print(summarize(df))
    return 0


def _reports(a: argparse.Namespace) -> int:
    from training.data import readers

    reps = readers.read_iu_xml(a.iu_xml) if a.iu_xml is not None else readers.read_text_reports(a.text)
    if not reps:
        raise ValueError(f"no reports found in {a.iu_xml or a.text}")
    out = readers.write_reports(reps, a.out)
    print(f"reports: wrote {len(reps)} reports, one a line, to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the data CLI.

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad input (argparse errors exit with 2 as well).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logger.info("resolved arguments: %s", vars(args))
    commands = {"phantom": _phantom, "convert": _convert, "reports": _reports}
    try:
        return commands[args.command](args)
    except (ValueError, OSError, ImageReadError) as e:   # ManifestError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
