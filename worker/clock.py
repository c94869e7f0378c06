"""Time as the worker writes it: ISO 8601 UTC text, and human durations.

Stored times are text like `2026-11-25T06:15:00.123Z`: they sort as strings,
read the same in `sqlite3`, and compare correctly in SQL without parsing.
"""

import time

# datetime and re are imported where needed: `akm tasks run` only calls iso().
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def iso(t: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds for a Unix time (now by default)."""
    if t is None:
        t = time.time()
    ms = int(t * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"


def iso_dt(dt) -> str:
    return iso(dt.timestamp())


def parse_iso(text: str):
    """The inverse of iso(): an aware UTC datetime."""
    from datetime import datetime, timezone
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def compact(t: float) -> str:
    """A timestamp safe in file names on any filesystem (no `:`)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def parse_duration(text: str):
    """`30d`, `12h`, `90m`, `45s`, `2w` -> timedelta; ValueError with the fix."""
    import re
    from datetime import timedelta
    m = re.match(r"^\s*(\d+)\s*([smhdw])\s*$", str(text))
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration: use a positive number "
                         f"and a unit, like 30d, 12h, 90m, 45s or 2w")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def duration_option(flag: str, text: str):
    """parse_duration for a command-line option: a UsageError naming FLAG."""
    from .errors import UsageError
    try:
        return parse_duration(text)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None
