"""Interpolation and masking, called directly (the runner tests cover them end to end)."""

import pytest
from hypothesis import given, settings, strategies as st

from worker.environment import LineSplitter, Masker, interpolate, looks_secret, secret_values
from worker.errors import MissingVariable


def test_interpolation_forms():
    env, used = interpolate("t", "tasks/t.yml", {"A": "${X}", "B": "${Y:-dflt}", "C": "$$HOME",
                                                "D": "x${X}y", "E": "$PLAIN"}, {"X": "1"})
    assert env == {"A": "1", "B": "dflt", "C": "$HOME", "D": "x1y", "E": "$PLAIN"}
    assert used == ["1", "1"]


def test_empty_value_takes_the_default_like_the_shell():
    env, _ = interpolate("t", "f", {"B": "${Y:-dflt}"}, {"Y": ""})
    assert env == {"B": "dflt"}


def test_missing_variable_names_task_variable_file_and_fix():
    with pytest.raises(MissingVariable) as e:
        interpolate("backup", "tasks/backup.yml", {"TOKEN": "${S3_TOKEN}"}, {})
    msg = str(e.value)
    assert "backup" in msg and "S3_TOKEN" in msg and "tasks/backup.yml" in msg and ".env" in msg
    assert e.value.exit_code == 65


@pytest.mark.parametrize("name", ["API_KEY", "github_token", "DB_PASSWORD", "DISCORD_WEBHOOK_URL",
                                  "SENTRY_DSN", "AWS_SECRET_ACCESS_KEY", "GOOGLE_CREDENTIALS"])
def test_secret_looking_names(name):
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["HOME", "PATH", "TZ", "LANG", "HOSTNAME", "PWD", "GIT_AUTHOR_NAME"])
def test_ordinary_names(name):
    assert not looks_secret(name)


def test_secret_values_skip_short_ones_and_split_multiline():
    values = secret_values({"API_KEY": "abc", "PEM_KEY": "-----BEGIN-----\nMIIBOgIBAAJB\n-----END-----"},
                           ["interpolated-value"])
    assert "abc" not in values and "interpolated-value" in values and "MIIBOgIBAAJB" in values


def feed_all(splitter, chunks):
    out = b""
    for c in chunks:
        block, piece = splitter.feed(c)
        out += block + piece
    return out + splitter.flush()


@given(st.binary(max_size=300), st.binary(max_size=300), st.lists(st.integers(0, 700), max_size=8))
@settings(max_examples=300, deadline=None)
def test_a_secret_never_survives_any_chunking(before, after, cuts):
    secret = b"TOPSECRET-1234567"
    data = before + secret + after + secret
    pieces, last = [], 0
    for c in sorted(set(min(c, len(data)) for c in cuts)):
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    splitter = LineSplitter(Masker([secret.decode()]))
    splitter.MAX_LINE = 16  # force the long-line path too
    out = feed_all(splitter, pieces)
    assert secret not in out
    assert out.count(b"***") >= 2


def test_long_line_is_cut_into_pieces_without_holding_it_all():
    splitter = LineSplitter(Masker(["abcdefgh"]))
    block, piece = splitter.feed(b"x" * (LineSplitter.MAX_LINE + 100))
    assert block == b"" and len(piece) >= LineSplitter.MAX_LINE
    assert len(splitter.rest) <= 7
