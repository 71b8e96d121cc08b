"""The names of a label map's structures: which anatomy each id of a full label map is.

Two formats, those the real cases come in:

- JSON, one object ``{"id": "name"}`` (TotalSegmentator's ``class_map_total_v2.json``);
- CSV with a header naming at least the columns ``id`` and ``structure`` (other columns,
  e.g. ``group``, are ignored; ``structures.csv`` of case E).

Id 0 is the background: a name given for it is dropped. The result is what
``train.synth.synthesize`` and ``train.repaint.repaint`` take as ``names``.

>>> read_structure_names("class_map_total_v2.json")[5]  # doctest: +SKIP
'liver'
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_structure_names(path: str | Path) -> dict[int, str]:
    """``{id: structure name}`` (ids >= 1) from a JSON or CSV file (module docstring).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file
    (and the CSV line) for anything malformed: an id that is not a non-negative integer,
    an id given twice, an empty name, a CSV without the ``id``/``structure`` columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure names file {path} does not exist")
    if path.suffix.lower() == ".json":
        pairs = _json_pairs(path)
    elif path.suffix.lower() == ".csv":
        pairs = _csv_pairs(path)
    else:
        raise ValueError(f"{path}: structure names must be a .json or .csv file")
    names: dict[int, str] = {}
    for where, key, value in pairs:
        try:
            sid = int(str(key).strip())
        except ValueError:
            sid = -1
        if sid < 0:
            raise ValueError(f"{where}: id {key!r} is not an integer >= 0")
        name = str(value).strip() if isinstance(value, str) else ""
        if not name:
            raise ValueError(f"{where}: id {sid} has no structure name")
        if sid in names:
            raise ValueError(f"{where}: id {sid} is named twice ({names[sid]!r}, {name!r})")
        names[sid] = name
    names.pop(0, None)
    if not names:
        raise ValueError(f"{path} names no structures (ids >= 1)")
    return names


def _json_pairs(path: Path) -> list[tuple[str, object, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f'{path} must hold one JSON object {{"id": "name"}}')
    return [(str(path), k, v) for k, v in data.items()]


def _csv_pairs(path: Path) -> list[tuple[str, object, object]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or ()]
        if "id" not in columns or "structure" not in columns:
            raise ValueError(
                f"{path}: expected a header with the columns 'id' and 'structure', "
                f"got {reader.fieldnames}"
            )
        reader.fieldnames = columns
        return [
            (f"{path}:{reader.line_num}", row["id"], row["structure"])
            for row in reader
            if any((v or "").strip() for v in row.values() if isinstance(v, str))
        ]
