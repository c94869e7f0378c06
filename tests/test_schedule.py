"""schedule.py: supercronic's syntax rules, checked against the real supercronic,
and fire times in the schedule's zone."""

import re
import subprocess
import sys
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from conftest import supercronic_exe
from hypothesis import HealthCheck, given, settings, strategies as st

from worker.schedule import check, next_fire, normalise, prev_fire, to_croniter

UTC = timezone.utc
NOW = datetime(2026, 11, 25, 6, 20, 30, tzinfo=UTC)

ACCEPTED = [
    "* * * * *", "*/15 * * * *", "0 9 * * 1-5", "0,30 8-18/2 * * mon-fri", "? ? ? ? ?",
    "0 0 1 jan *", "0 0 1 January *", "0 0 * * Sunday", "0 0 * * 7",
    "0 0 L * *", "0 0 LW * *", "0 0 15W * *", "0 0 1,L * *", "0 0 * * 5L", "0 0 * * friL",
    "0 0 * * 5#3", "0 0 * * mon#1", "05 * * * *", "0 0 01 * *", "1/5 * * * *", "0 */23 * * *",
    "0 0 1-31/31 * *", "0 0 * */12 *", "0 0 * * */6", "0 0 * * *,5", "0 0 * * 7#1",
    "0 0 * * * 2027", "0 0 * * * 1970-2099", "0 0 * * * */2", "0 0 1 1 * 2030/5",
    "30 0 0 * * * *", "*/10 * * * * * 2026-2030", "59 59 23 31 12 6 2099",
    "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly",
]

# (expression, words the problem must contain)
REJECTED = [
    ("", "empty"), ("   ", "empty"), ("@every 5m", "fields"), ("@reboot", "unknown macro"),
    ("@midnight", "unknown macro"), ("@HOURLY", "unknown macro"), ("* * * *", "has 4 fields"),
    ("* * * * * * * *", "has 8 fields"), ("60 * * * *", "`60` is not a valid minute"),
    ("* 24 * * *", "hour"), ("0 0 0 * *", "day-of-month"), ("0 0 * 13 *", "month"),
    ("0 0 * * 8", "day-of-week"), ("*/0 * * * *", "step"), ("*/60 * * * *", "step"),
    ("0 */24 * * *", "step"), ("0 0 * * */7", "step"), ("0 0 * * * */129", "step"),
    ("5-1 * * * *", "backwards"), ("5-1/2 * * * *", "backwards"), ("0 0 * * 1-7", "use 0-6"),
    ("0 0 * * 0-7", "Sunday only"), ("0 0 * 01 *", "not `01`"), ("0 0 * * 01", "not `01`"), ("0 0 * * 07", "not `07`"),
    ("0 0 * * * 2101", "year"), ("0 0 * * * 1969", "year"), ("0 0 * * * 2100", "year"),
    ("0 0 W * *", "day-of-month"), ("0 0 * * L", "day-of-week"), ("0 0 * * 5#6", "day-of-week"),
    ("L * * * *", "minute"), ("?/5 * * * *", "`*/n`"), ("1,,2 * * * *", "empty entry"),
    ("0 0 * Sept *", "month"), ("000 * * * *", "minute"), ("*/5/2 * * * *", "not a value"),
    ("0 0 * * * ?x", "year"), ("0 0 * * 7/2", "start a day-of-week step at 0"),
    ("０ * * * *", "characters"), ("0 0 * * \u00a0*", "characters"),
]


@pytest.mark.parametrize("expr", ACCEPTED)
def test_check_accepts_what_supercronic_reads(expr):
    assert check(expr) is None


@pytest.mark.parametrize("expr,words", REJECTED)
def test_check_rejects_with_a_reason(expr, words):
    problem = check(expr)
    assert problem is not None and words in problem


def test_check_of_a_non_string_is_a_problem_not_a_crash():
    assert check(None) and check(5)


def test_normalise_strips_and_single_spaces():
    assert normalise("  */5\t*  * * *\n") == "*/5 * * * *"


# --- against the real supercronic -------------------------------------------

def _supercronic():
    return supercronic_exe()


def supercronic_reads(exe, expr, tmp_path) -> bool:
    """True iff supercronic accepts `<expr> akm tasks run x` AND takes all of
    `expr` as the schedule. (It tries 7, 6, then 5 fields, so `-test` alone
    would pass "0 0 * * * 2101" as 5 fields with "2101" glued to the command.)"""
    crontab = tmp_path / "crontab"
    crontab.write_text(f"{expr} akm tasks run x --trigger schedule --detach\n")
    out = subprocess.run([exe, "-debug", "-test", str(crontab)], capture_output=True,
                         text=True, timeout=30).stderr
    if "crontab is valid" not in out:
        return False
    tried = re.findall(r"try parse \(\d+ fields\): '(.*?)'\"?$", out, re.M)
    return bool(tried) and tried[-1] == expr


def test_curated_expressions_agree_with_supercronic(tmp_path):
    exe = _supercronic()
    for expr in ACCEPTED:
        assert supercronic_reads(exe, expr, tmp_path), expr
    for expr, _ in REJECTED:
        if expr.strip():
            # We may be stricter than supercronic (01, 0-7, 5-1/2), never looser.
            assert check(expr) is not None


# Field-aware generation: values near each field's bounds, names, L/W/#, and
# now and then junk, so that a good share of expressions is accepted and the
# comparison with supercronic means something.
_BOUNDS = {"sec": (0, 59), "min": (0, 59), "hour": (0, 23), "dom": (1, 31),
           "month": (1, 12), "dow": (0, 7), "year": (1970, 2099)}
_NAMES = {"month": ["jan", "Feb", "december", "sept", "MAY"],
          "dow": ["mon", "SUN", "friday", "thurs", "sat"]}
_LAYOUT = {5: ["min", "hour", "dom", "month", "dow"],
           6: ["min", "hour", "dom", "month", "dow", "year"],
           7: ["sec", "min", "hour", "dom", "month", "dow", "year"]}


def _value(kind):
    lo, hi = _BOUNDS[kind]
    nums = st.integers(lo - 1, hi + 1).map(str)
    padded = st.integers(0, 9).map(lambda n: f"0{n}")
    return st.one_of(nums, nums, padded, st.sampled_from(_NAMES.get(kind, ["x"])))


def _entry(kind):
    v, step = _value(kind), st.integers(0, 61).map(str)
    forms = [st.sampled_from(["*", "?"]), v, v, st.tuples(v, v).map("-".join),
             step.map("*/".__add__), st.tuples(v, step).map("/".join),
             st.tuples(v, v, step).map(lambda t: f"{t[0]}-{t[1]}/{t[2]}"),
             st.text(alphabet="*?/-,#LW0123456789", min_size=1, max_size=4)]
    if kind == "dom":
        forms += [st.sampled_from(["L", "LW", "lw"]), v.map(lambda x: x + "W")]
    if kind == "dow":
        forms += [v.map(lambda x: x + "L"),
                  st.tuples(v, st.integers(0, 6)).map(lambda t: f"{t[0]}#{t[1]}")]
    return st.one_of(*forms)


def _good_entry(kind):
    lo, hi = _BOUNDS[kind]
    hi = 6 if kind == "dow" else hi
    v = st.integers(lo, hi)
    step = st.integers(1, min(hi, 59)).map(str)
    span = st.tuples(v, v).map(sorted).map(lambda p: f"{p[0]}-{p[1]}")
    return st.one_of(st.just("*"), v.map(str), span, step.map("*/".__add__),
                     st.tuples(span, step).map("/".join))


def _field(kind):
    good = st.lists(_good_entry(kind), min_size=1, max_size=2).map(",".join)
    # Mostly well-formed fields, so whole expressions are often accepted.
    return st.one_of(good, good, good, good, good,
                     st.lists(_entry(kind), min_size=1, max_size=3).map(",".join))


_expr = st.one_of(
    st.sampled_from(sorted(_LAYOUT)).flatmap(
        lambda n: st.tuples(*[_field(k) for k in _LAYOUT[n]]).map(" ".join)),
    st.lists(_field("min"), min_size=1, max_size=8).map(" ".join),
    st.sampled_from(["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly",
                     "@every 1h", "@reboot", "@Daily", "@midnight", "@"]),
)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(expr=_expr)
def test_check_never_accepts_what_supercronic_rejects(expr, tmp_path_factory):
    exe = _supercronic()
    if check(expr) is None:
        tmp = tmp_path_factory.mktemp("cron")
        assert supercronic_reads(exe, normalise(expr), tmp), expr


def _random_schedule(rng):
    kinds = _LAYOUT[rng.choice([5, 5, 5, 6, 7])]
    fields = []
    for kind in kinds:
        lo, hi = _BOUNDS[kind]
        hi = 6 if kind == "dow" else hi
        a, b = sorted((rng.randint(lo, hi), rng.randint(lo, hi)))
        fields.append(rng.choice(["*", str(a), f"{a}-{b}", f"*/{rng.randint(1, min(hi, 59))}",
                                  f"{a},{b}", f"{a}/{rng.randint(1, 9)}", "?"]))
    return " ".join(fields)


def test_a_thousand_accepted_schedules_in_one_crontab_all_read_whole(tmp_path):
    """The crontab-sized case: one supercronic run over many lines; every line
    must parse with its whole schedule (not 5 fields + junk in the command)."""
    import random
    exe = _supercronic()
    rng = random.Random(20261125)
    exprs = [e for e in (_random_schedule(rng) for _ in range(1000)) if check(e) is None]
    assert len(exprs) > 900
    crontab = tmp_path / "crontab"
    crontab.write_text("".join(f"{e} akm tasks run t{i} --trigger schedule --detach\n"
                               for i, e in enumerate(exprs)))
    out = subprocess.run([exe, "-debug", "-test", str(crontab)], capture_output=True,
                         text=True, timeout=60).stderr
    assert "crontab is valid" in out
    tries = re.findall(r"(try|failed to) parse \((\d+) fields\): '(.*?)'", out)
    parsed = [t[2] for i, t in enumerate(tries)
              if t[0] == "try" and not (i + 1 < len(tries) and tries[i + 1][0] == "failed to")]
    assert parsed == exprs


# --- fire times ---------------------------------------------------------------

def test_next_and_prev_of_a_five_field_schedule_are_utc():
    assert next_fire("*/15 * * * *", NOW) == datetime(2026, 11, 25, 6, 30, tzinfo=UTC)
    assert prev_fire("*/15 * * * *", NOW) == datetime(2026, 11, 25, 6, 15, tzinfo=UTC)


def test_next_fire_is_strictly_after():
    at = datetime(2026, 11, 25, 6, 30, tzinfo=UTC)
    assert next_fire("*/15 * * * *", at) == datetime(2026, 11, 25, 6, 45, tzinfo=UTC)


def test_six_fields_means_a_year_not_seconds():
    assert next_fire("0 0 1 1 * 2028", NOW) == datetime(2028, 1, 1, tzinfo=UTC)
    assert prev_fire("0 0 1 1 * 2028", NOW) is None


def test_year_range_in_six_and_seven_fields():
    assert next_fire("0 12 * * * 2027-2028", NOW) == datetime(2027, 1, 1, 12, tzinfo=UTC)
    assert prev_fire("0 12 * * * 2020-2025", NOW) == datetime(2025, 12, 31, 12, tzinfo=UTC)
    assert next_fire("15 0 12 * * * 2027-2028", NOW) == datetime(2027, 1, 1, 12, 0, 15, tzinfo=UTC)


def test_seven_fields_put_seconds_first():
    assert next_fire("45 20 6 * * * *", NOW) == datetime(2026, 11, 25, 6, 20, 45, tzinfo=UTC)


@pytest.mark.parametrize("expr,expected", [
    ("@hourly", datetime(2026, 11, 25, 7, tzinfo=UTC)),
    ("@daily", datetime(2026, 11, 26, tzinfo=UTC)),
    ("@weekly", datetime(2026, 11, 29, tzinfo=UTC)),
    ("@monthly", datetime(2026, 12, 1, tzinfo=UTC)),
    ("@yearly", datetime(2027, 1, 1, tzinfo=UTC)),
    ("0 0 * * friday", datetime(2026, 11, 27, tzinfo=UTC)),
    ("0 0 1 february *", datetime(2027, 2, 1, tzinfo=UTC)),
    ("0 0 L * *", datetime(2026, 11, 30, tzinfo=UTC)),
    ("0 0 * * 5L", datetime(2026, 11, 27, tzinfo=UTC)),
    ("0 0 * * 5#3", datetime(2026, 12, 18, tzinfo=UTC)),
    ("0 0 ? * 7", datetime(2026, 11, 29, tzinfo=UTC)),
])
def test_next_fire_of_macros_names_and_specials(expr, expected):
    assert next_fire(expr, NOW) == expected


def test_a_schedule_that_never_fires_gives_none():
    assert next_fire("0 0 30 2 *", NOW) is None
    assert next_fire("0 0 * * * 2020", NOW) is None


def test_forms_croniter_lacks_give_none_not_an_error():
    assert next_fire("0 0 LW * *", NOW) is None


def test_cron_arithmetic_happens_in_the_zone_across_spring_forward():
    # 09:00 New York is 14:00Z in winter and 13:00Z after 8 March 2026.
    before = datetime(2026, 3, 7, 15, tzinfo=UTC)
    ny = ZoneInfo("America/New_York")
    assert next_fire("0 9 * * *", before, ny) == datetime(2026, 3, 8, 13, tzinfo=UTC)
    assert prev_fire("0 9 * * *", before, "America/New_York") == datetime(2026, 3, 7, 14, tzinfo=UTC)


def test_autumn_dst_transition_fires_once_a_day():
    before = datetime(2026, 10, 24, 12, tzinfo=UTC)
    first = next_fire("30 1 * * *", before, "Europe/Berlin")
    second = next_fire("30 1 * * *", first, "Europe/Berlin")
    assert first == datetime(2026, 10, 24, 23, 30, tzinfo=UTC)   # CEST, UTC+2
    assert second == datetime(2026, 10, 26, 0, 30, tzinfo=UTC)   # CET, UTC+1


def test_zone_defaults_to_tz_env_then_utc(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    assert next_fire("0 9 * * *", NOW) == datetime(2026, 11, 26, 0, tzinfo=UTC)
    monkeypatch.setenv("TZ", "Not/AZone")
    assert next_fire("0 9 * * *", NOW) == datetime(2026, 11, 25, 9, tzinfo=UTC)


def test_naive_datetime_is_refused():
    with pytest.raises(ValueError):
        next_fire("* * * * *", datetime(2026, 1, 1))


def test_to_croniter_spells_six_fields_as_seven_with_seconds_first():
    assert to_croniter("0 12 * * * 2027") == ("0 0 12 * * * 2027", {"second_at_beginning": True})
    assert to_croniter("@daily") == ("0 0 * * *", {})


@pytest.mark.parametrize("expr", [e for e in ACCEPTED if "LW" not in e and "2099" not in e])
def test_every_accepted_schedule_has_a_fire_time(expr):
    assert next_fire(expr, NOW) is not None or prev_fire(expr, NOW) is not None


def test_module_imports_only_re_at_import_time():
    code = ("import sys; before = set(sys.modules); import worker.schedule; "
            "new = set(sys.modules) - before - {'worker', 'worker.schedule'}; print(sorted(new))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "croniter" not in out.stdout and "zoneinfo" not in out.stdout and "datetime" not in out.stdout


def test_loading_a_task_never_imports_croniter():
    code = "import sys, worker.taskfile; print('croniter' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
