"""The environment a task runs with, and keeping its secrets out of every record.

Interpolation: `${VAR}` and `${VAR:-default}` take values from the worker's
environment (so secrets stay in `.env`, not in the task file), `$$` is a
literal `$`. Any other `$` is left alone for the shell.

Masking: every value interpolated into a task's env, and the value of every
variable whose name looks secret, is replaced by `***` in everything the
worker records or prints. Values under 4 characters are not masked: masking
"1" or "yes" would shred ordinary output and protect nothing.
"""

import re

from .errors import MissingVariable

MASK = b"***"
MIN_SECRET_LEN = 4
_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Names that usually carry credentials (matched on the upper-cased name).
# Not PWD (the working directory) nor AUTHOR (git's GIT_AUTHOR_NAME).
_SECRET_NAME = re.compile(
    r"KEY|TOKEN|SECRET|PASS|WEBHOOK|DSN|CREDENTIAL|AUTH(?!OR)|PRIVATE|COOKIE|SESSION")


def looks_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.upper()))


def interpolate(task_id: str, source: str, task_env: dict, environ) -> tuple[dict, list[str]]:
    """Resolve a task's env block against ENVIRON.

    Returns (resolved env, the values that came from ENVIRON). A reference to
    a variable that is unset, with no default, raises MissingVariable before
    anything runs. SOURCE is the task file, named in that error.
    """
    resolved, used = {}, []
    for key, raw in task_env.items():
        def sub(m, key=key):
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            value = environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    raise MissingVariable(
                        f"task {task_id!r}: variable {name} is not set "
                        f"(needed by env.{key} in {source}); set it in .env or the "
                        f"worker's environment, or give a default: ${{{name}:-value}}")
                return default
            used.append(value)
            return value
        resolved[key] = _REF.sub(sub, str(raw))
    return resolved, used


def secret_values(env, interpolated=()) -> list[str]:
    """The values to mask: interpolated ones plus those of secret-looking names."""
    values = set(interpolated)
    values.update(v for k, v in env.items() if looks_secret(k))
    out = set()
    for v in values:
        # A multi-line secret (a PEM key) is masked line by line, because
        # output is recorded a line at a time.
        for part in [v, *v.splitlines()]:
            if len(part.strip()) >= MIN_SECRET_LEN:
                out.add(part)
    return sorted(out, key=len, reverse=True)


class Masker:
    """Replaces secrets in bytes. Longest first, so a secret that contains
    another is masked whole."""

    def __init__(self, secrets):
        self.secrets = [s.encode("utf-8", "surrogateescape") for s in secrets]
        # The most of a secret that can hide at the end of a chunk, unseen.
        self.holdback = max((len(s) for s in self.secrets), default=1) - 1

    def __bool__(self):
        return bool(self.secrets)

    def mask(self, data: bytes) -> bytes:
        for s in self.secrets:
            if s in data:
                data = data.replace(s, MASK)
        return data

    def mask_text(self, text: str) -> str:
        if not self.secrets or not text:
            return text
        return self.mask(text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")


class LineSplitter:
    """Cuts one output stream into masked lines, whatever the pipe hands over.

    feed() returns (complete lines as one bytes block ending in b"\\n",
    a masked piece of an over-long line or b""). A secret split across two
    reads is still masked: bytes are held back until a newline arrives, and
    a line longer than MAX_LINE is cut only where no secret can straddle
    the cut.
    """

    MAX_LINE = 64 * 1024

    def __init__(self, masker: Masker):
        self.masker = masker
        self.rest = b""

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        buf = self.rest + data if self.rest else data
        nl = buf.rfind(b"\n")
        if nl == -1:
            block, tail = b"", buf
        else:
            block, tail = buf[:nl + 1], buf[nl + 1:]
        piece = b""
        if len(tail) > self.MAX_LINE:
            tail = self.masker.mask(tail)
            # Masking may shrink it below what must be held back.
            cut = max(0, len(tail) - self.masker.holdback)
            piece, tail = tail[:cut], tail[cut:]
        self.rest = tail
        return self.masker.mask(block), piece

    def flush(self) -> bytes:
        """At EOF: what is left, masked (a last line with no newline)."""
        rest, self.rest = self.rest, b""
        return self.masker.mask(rest)
