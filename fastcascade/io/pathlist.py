"""CSV lists of file paths: the case lists of ``fastcascade train`` and ``evaluate``.

One case a line, comma-separated paths (relative to the CSV's folder, or absolute);
blank lines and lines starting with ``#`` are skipped; a first non-comment line naming
the columns is a header; a UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def read_path_rows(
    csv_path: str | Path, columns: Sequence[str], optional: int = 0
) -> list[tuple[int, list[Path]]]:
    """``(line number, paths)`` for each case of ``csv_path``.

    ``columns``: the column names; the last ``optional`` of them may be left out (every
    row then has ``len(columns) - optional`` to ``len(columns)`` non-empty cells).
    Raises ``FileNotFoundError`` for a missing CSV and ``ValueError`` naming the line for
    a malformed row. Whether the listed files exist is the caller's to check.

    >>> read_path_rows("pairs.csv", ("ct", "labels"))  # doctest: +SKIP
    [(2, [PosixPath('x/ct.nii.gz'), PosixPath('x/seg.nii.gz')])]
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"case list {csv_path} does not exist")
    required = len(columns) - optional
    allowed = range(required, len(columns) + 1)
    expected = ",".join(columns[:required]) + "".join(f"[,{c}]" for c in columns[required:])
    rows = []
    header_allowed = True
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not any(row) or row[0].startswith("#"):
                continue
            is_header = [c.lower() for c in row] == list(columns[: len(row)])
            if header_allowed and len(row) in allowed and is_header:
                header_allowed = False
                continue
            header_allowed = False
            if len(row) not in allowed or not all(row):
                raise ValueError(f"{csv_path}:{line}: expected {expected!r}, got {','.join(row)!r}")
            rows.append(
                (line, [p if p.is_absolute() else csv_path.parent / p for p in map(Path, row)])
            )
    return rows
