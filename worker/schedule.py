"""Cron schedules as supercronic reads them: a syntax check and fire times.

`check(expr)` is on the hot path (every `akm tasks run` loads its task file),
so this module imports only `re` at module level; croniter is imported inside
`next_fire`/`prev_fire`, which only listings and health call.

The rules are those of the cronexpr fork inside supercronic 0.2.45
(`cronexpr/cronexpr_parse.go` and `crontab/crontab.go`), read from its source
and confirmed with `supercronic -test`:

- 5 fields `min hour dom month dow` (second 0); 6 fields = those 5 + YEAR
  (not seconds); 7 fields = `sec min hour dom month dow year`; or one of the
  macros @yearly @annually @monthly @weekly @daily @hourly (case-sensitive;
  supercronic rejects @every, @reboot and @midnight).
- Entries: `*` or `?`, a value, `a-b`, `*/n`, `a/n`, `a-b/n`, comma lists;
  month and weekday names (jan, january, mon, monday; any case); day of month
  also `L`, `LW`, `15W`; day of week also `5L` and `5#3`.
- Years 1970-2099. A step is 1..the field's maximum (and at most 59: cronexpr
  looks steps up in a table of the numbers 0-59 and 1970-2099).

`check` is stricter than supercronic where supercronic accepts something that
does not do what it says (a subset is safe: we never accept what it rejects):
- `01` in month/day-of-week: cronexpr's name tables lack it and read it as 0.
- 7 in a day-of-week range or step start: cronexpr turns 7 into 0 first, so
  `1-7` is an error and `0-7` means Sunday only.
- a reversed `a-b/n` (an empty set there) and empty list entries (`1,,2`).

Why the stakes are higher than "valid or not": supercronic tries 7, 6, then 5
fields for each crontab line, so a 6-field schedule with a bad year would be
read as 5 fields and the year glued onto the command. Only a checker that
rejects the bad year keeps that from happening.
"""

import re

MACROS = {
    # The 5-field equivalents, for croniter and for people.
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@hourly": "0 * * * *",
}

FIX = ("write 5 fields `minute hour day-of-month month day-of-week`, e.g. `*/15 * * * *`, "
       "or @hourly, @daily, @weekly, @monthly, @yearly")

_MONTHS = "jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec|january|february|march|april|june|july|august|september|october|november|december"
_DAYS = "sun|mon|tue|wed|thu|fri|sat|sunday|monday|tuesday|wednesday|thursday|friday|saturday"
_MONTH_NUM = {m: i for i, m in enumerate(_MONTHS.split("|")[:12], 1)}
_MONTH_NUM.update({m: _MONTH_NUM[m[:3]] for m in _MONTHS.split("|")[12:]})
_DAY_NUM = {d: i for i, d in enumerate(_DAYS.split("|")[:7])}
_DAY_NUM.update({d: _DAY_NUM[d[:3]] for d in _DAYS.split("|")[7:]})


class _Field:
    def __init__(self, name, lo, hi, value_re, names=None):
        self.name, self.lo, self.hi = name, lo, hi
        self.value = re.compile(value_re)
        self.names = names or {}

    def number(self, tok):
        """The number a value token stands for (already matched by self.value)."""
        return self.names[tok] if tok in self.names else int(tok)


# Value patterns copied from cronexpr, minus the leading-zero forms that its
# month and weekday tables misread (see the module docstring).
_SECOND = _Field("second", 0, 59, r"0?[0-9]|[1-5][0-9]")
_MINUTE = _Field("minute", 0, 59, r"0?[0-9]|[1-5][0-9]")
_HOUR = _Field("hour", 0, 23, r"0?[0-9]|1[0-9]|2[0-3]")
_DOM = _Field("day-of-month", 1, 31, r"0?[1-9]|[12][0-9]|3[01]")
_MONTH = _Field("month", 1, 12, r"[1-9]|1[012]|" + _MONTHS, _MONTH_NUM)
_DOW = _Field("day-of-week", 0, 6, r"[0-7]|" + _DAYS, _DAY_NUM)
_YEAR = _Field("year", 1970, 2099, r"19[789][0-9]|20[0-9][0-9]")

_LAYOUTS = {5: (_MINUTE, _HOUR, _DOM, _MONTH, _DOW),
            6: (_MINUTE, _HOUR, _DOM, _MONTH, _DOW, _YEAR),
            7: (_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW, _YEAR)}

_PRINTABLE = re.compile(r"[!-~ \t]+")
_STEP = re.compile(r"0?[0-9]|[1-5][0-9]")
_ENTRY = re.compile(r"(?P<base>[^/]+)(?:/(?P<step>[0-9]+))?")
_WORKDAY = re.compile(r"(?P<v>.+)w")
_NTH = re.compile(r"(?P<v>.+)#(?P<n>[1-5])")


def normalise(expr: str) -> str:
    """Stripped, single spaces: the form stored in Task.schedule."""
    return " ".join(expr.split())


def check(expr: str) -> str | None:
    """None if supercronic accepts `expr`, else the problem in a few words.

    Returns rather than raises so the caller (taskfile) can wrap the problem
    in its own one-line error naming the file and field.
    """
    if not isinstance(expr, str) or not expr.strip():
        return "is empty"
    # Outer whitespace goes away in normalise(); inside, only spaces and tabs
    # separate fields (a newline would split the crontab line).
    expr = expr.strip()
    if not _PRINTABLE.fullmatch(expr):
        return "contains characters cron does not use"
    fields = expr.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        if fields[0] in MACROS:
            return None
        return f"unknown macro `{fields[0]}` (supercronic knows {', '.join(MACROS)}, lowercase)"
    layout = _LAYOUTS.get(len(fields))
    if layout is None:
        return (f"has {len(fields)} fields; supercronic reads 5, 6 (5 + year) "
                f"or 7 (seconds first, year last)")
    for text, field in zip(fields, layout):
        problem = _check_field(text, field)
        if problem:
            return f"{field.name} field `{text}`: {problem}"
    return None


def _check_field(text: str, field: _Field) -> str | None:
    for entry in text.lower().split(","):
        if not entry:
            return "empty entry in the list (remove the extra comma)"
        problem = _check_entry(entry, field)
        if problem:
            return problem
    return None


def _check_entry(entry: str, field: _Field) -> str | None:
    m = _ENTRY.fullmatch(entry)
    if m is None:
        return f"`{entry}` is not a value, range or step"
    base, step = m["base"], m["step"]
    if step is not None:
        if not _STEP.fullmatch(step) or not 1 <= int(step) <= field.hi:
            return f"step `/{step}` must be 1-{min(field.hi, 59)}"
    if base in ("*", "?"):
        return "`?/n` is not supported (write `*/n`)" if base == "?" and step else None
    if "-" in base:
        return _check_range(base, field)
    if field.value.fullmatch(base):
        if field is _DOW and step is not None and base == "7":
            return "start a day-of-week step at 0, not 7"
        return None
    if step is None:
        special = _check_special(base, field)
        if special is not True:
            return special
        return None
    return _bad_value(base, field)


def _check_range(base: str, field: _Field) -> str | None:
    first, _, last = base.partition("-")
    for tok in (first, last):
        if not field.value.fullmatch(tok):
            return _bad_value(tok, field)
    if field is _DOW and "7" in (first, last):
        return "supercronic reads 7 as 0 in a range (`1-7` fails, `0-7` is Sunday only): use 0-6"
    if field.number(first) > field.number(last):
        return f"range `{base}` runs backwards"
    return None


def _check_special(base: str, field: _Field):
    """True if `base` is one of cronexpr's L/W/# forms valid in this field."""
    if field is _DOM:
        m = _WORKDAY.fullmatch(base)
        if base in ("l", "lw") or (m and _DOM.value.fullmatch(m["v"])):
            return True
    elif field is _DOW:
        m = _NTH.fullmatch(base)
        if (base.endswith("l") and _DOW.value.fullmatch(base[:-1])) or (
                m and _DOW.value.fullmatch(m["v"])):
            return True
    return _bad_value(base, field)


def _bad_value(tok: str, field: _Field) -> str:
    if field in (_MONTH, _DOW) and re.fullmatch(r"0[0-9]", tok):
        return f"write `{int(tok)}`, not `{tok}` (supercronic reads a leading zero here as 0)"
    return f"`{tok}` is not a valid {field.name} ({field.lo}-{field.hi if field is not _DOW else 7})"


# --- fire times (croniter, imported lazily) ----------------------------------

def zone(name: str | None = None):
    """The zone supercronic schedules in: $TZ (or `name`), UTC if unset or unknown.

    supercronic runs Go's time.Local, which follows TZ; the image leaves it
    unset, so UTC. An unknown name falls back to UTC, as Go does.
    """
    import os
    from zoneinfo import ZoneInfo
    name = name if name is not None else os.environ.get("TZ", "")
    name = name.lstrip(":") or "UTC"
    try:
        return ZoneInfo(name)
    except (ValueError, OSError, KeyError):
        return ZoneInfo("UTC")


def next_fire(expr: str, after, tz=None):
    """The first fire time strictly after `after` (aware), as aware UTC.

    None if it never fires again, if croniter cannot find one within its
    search window (about 50 years: `0 0 1 1 * 2099` today), or for the one
    form croniter lacks (`LW`). Callers show None as "-".

    Cron arithmetic happens in the schedule's zone `tz` (a tzinfo or a name;
    default `zone()`): "0 9 * * *" means 09:00 local across DST changes, which
    UTC arithmetic would get wrong twice a year.
    """
    return _fire(expr, after, tz, forward=True)


def prev_fire(expr: str, before, tz=None):
    """The last fire time strictly before `before` (aware), as aware UTC; None if none."""
    return _fire(expr, before, tz, forward=False)


def _fire(expr, when, tz, forward):
    from datetime import timezone
    from croniter import croniter, CroniterError
    if when.tzinfo is None:
        raise ValueError("pass an aware datetime (e.g. datetime.now(timezone.utc))")
    if tz is None or isinstance(tz, str):
        tz = zone(tz)
    try:
        text, kwargs = to_croniter(expr)
        it = croniter(text, when.astimezone(tz), **kwargs)
        found = it.get_next(type(when)) if forward else it.get_prev(type(when))
    except (CroniterError, ValueError, KeyError, OverflowError):
        # A form croniter lacks (LW, nL in 6/7 fields...) or no fire time in
        # its search window (30 Feb, a past year): "unknown" to the caller.
        return None
    return found.astimezone(timezone.utc)


def to_croniter(expr: str) -> tuple[str, dict]:
    """cronexpr text -> (croniter text, croniter kwargs); ValueError if it has no equivalent."""
    fields = normalise(expr).lower().split()
    if len(fields) == 1:
        fields = MACROS[fields[0]].split()
    fields = [f.replace("?", "*") for f in fields]
    dom_i, mon_i, dow_i = (2, 3, 4) if len(fields) < 7 else (3, 4, 5)
    fields[mon_i] = _short_names(fields[mon_i], _MONTH_NUM)
    fields[dow_i] = ",".join(_croniter_dow(e) for e in _short_names(fields[dow_i], _DAY_NUM).split(","))
    if "lw" in fields[dom_i].split(","):
        raise ValueError("croniter has no LW")
    if len(fields) == 5:
        return " ".join(fields), {}
    if len(fields) == 6:
        # cronexpr's 6th field is a year; croniter's is seconds. Spell it out
        # as 7 fields with seconds first, which croniter reads as year last.
        fields = ["0"] + fields
    return " ".join(fields), {"second_at_beginning": True}


def _short_names(field: str, table: dict) -> str:
    # croniter knows jan/mon but not january/monday.
    return re.sub(r"[a-z]{4,}", lambda m: m.group(0)[:3] if m.group(0) in table else m.group(0), field)


def _croniter_dow(entry: str) -> str:
    # cronexpr's "5l" (last Friday) is croniter's "l5".
    if entry.endswith("l") and len(entry) > 1:
        day = entry[:-1]
        return "l" + str(_DAY_NUM[day] if day in _DAY_NUM else int(day) % 7)
    return entry
