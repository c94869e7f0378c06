"""Listings for people (aligned text) and for programs (JSON), one shape for all.

Every listing command takes `--format text|json`; they all print through
`emit`, so the JSON of one listing looks like the JSON of every other: an
array of objects, streamed a row at a time.
"""

import json
import sys


def emit(rows, columns, fmt="text", out=None):
    """Print rows (dicts) as a text table or a JSON array.

    `columns` is a list of (key, heading) pairs; text shows only those, JSON
    shows every key of each row.
    """
    out = out or sys.stdout
    if fmt == "json":
        _emit_json(rows, out)
    else:
        _emit_text(list(rows), columns, out)


def _emit_json(rows, out):
    out.write("[")
    first = True
    for row in rows:
        out.write("\n  " if first else ",\n  ")
        out.write(json.dumps(row, ensure_ascii=False, default=str))
        first = False
    out.write("\n]\n" if not first else "]\n")


def _emit_text(rows, columns, out):
    if not rows:
        return
    cells = [[heading.upper() for _, heading in columns]]
    cells += [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths))
        out.write(line.rstrip() + "\n")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("\n", " ")
