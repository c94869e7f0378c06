"""The health report as a Discord webhook body, and posting it.

`render` turns a health Report into an execute-webhook body that Discord
accepts whatever the report holds: every documented limit is respected and
what does not fit is cut with "…and N more" (a rejected message tells nobody
anything). `post` sends it with urllib: a timeout on every request, 429
waits for what Discord asks, 5xx and network errors back off a little, and
401/403/404 stop at once (Discord asks callers not to retry a dead webhook).

The webhook URL is a credential (anyone holding it can post): nothing here
prints it; `mask_url` is the only form of it that reaches a log or a record.
"""

import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import StrEnum

from . import __version__

# Discord's documented limits (Execute Webhook; Message resource, embed limits).
CONTENT_MAX = 2000
EMBEDS_MAX = 10
TITLE_MAX = 256
DESCRIPTION_MAX = 4096
FIELDS_MAX = 25
FIELD_NAME_MAX = 256
FIELD_VALUE_MAX = 1024
FOOTER_MAX = 2048
AUTHOR_NAME_MAX = 256
EMBEDS_TOTAL_MAX = 6000   # title + description + field names/values + footer + author, all embeds
USERNAME_MAX = 80         # webhook names: 1-80, and never "clyde" or "discord"

GREEN, AMBER, RED = 0x2ECC71, 0xF1C40F, 0xE74C3C
ELLIPSIS = "…"

_WEBHOOK_PATH = re.compile(r"^/api(?:/v\d+)?/webhooks/(\d+)/([A-Za-z0-9_.\-]+)/?$")

# Retry policy. Waits are bounded so one post never outlives the next tick.
MAX_RETRY_AFTER = 60.0      # a longer 429 ("retry in 20 minutes") is a failed post
BACKOFF = (1.0, 2.0, 5.0, 10.0)
READ_MAX = 64 * 1024        # of an error body


class Outcome(StrEnum):
    OK = "ok"
    REJECTED = "rejected"            # 400 and other 4xx: the body or request is wrong
    GONE = "gone"                    # 401/403/404: the webhook is deleted or the token wrong
    RATE_LIMITED = "rate_limited"    # 429 after every attempt, or a wait too long to honour
    SERVER_ERROR = "server_error"    # 5xx after every attempt
    NETWORK_ERROR = "network_error"  # DNS, refused, reset, timeout
    NOT_CONFIGURED = "not_configured"  # no usable DISCORD_WEBHOOK_URL (recorded by report.py)


@dataclass(frozen=True)
class PostResult:
    outcome: Outcome
    http_status: int | None
    detail: str          # one line for the log; never contains the URL
    attempts: int

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


# -- the webhook URL ----------------------------------------------------------

def check_url(url: str | None) -> str | None:
    """None if URL looks like a Discord webhook URL, else what is wrong (no URL in it)."""
    if not url or not url.strip():
        return "DISCORD_WEBHOOK_URL is not set"
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "DISCORD_WEBHOOK_URL is not a URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "DISCORD_WEBHOOK_URL must start with https://"
    if not _WEBHOOK_PATH.match(parts.path):
        return ("DISCORD_WEBHOOK_URL does not look like a webhook URL "
                "(expected https://discord.com/api/webhooks/<id>/<token>)")
    return None


def mask_url(url: str | None) -> str:
    """The URL with its token hidden and its id shortened: safe for logs."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit((url or "").strip())
    except ValueError:
        return "<webhook URL>"
    m = _WEBHOOK_PATH.match(parts.path or "")
    if not parts.hostname or not m:
        return "<webhook URL>"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/api/webhooks/…{m.group(1)[-4:]}/***"


def scrub(text: str, url: str | None) -> str:
    """Remove the URL, and its token on its own, from TEXT (urllib errors quote URLs)."""
    if not url:
        return text
    secret = url.strip()
    m = _WEBHOOK_PATH.match(_path(secret))
    for s in filter(None, [secret, secret.rstrip("/"), m and m.group(2)]):
        text = text.replace(s, mask_url(secret) if s.startswith("http") else "***")
    return text


def _path(url: str) -> str:
    from urllib.parse import urlsplit
    try:
        return urlsplit(url).path
    except ValueError:
        return ""


# -- the message --------------------------------------------------------------

def render(report, username: str | None = None, masker=None) -> dict:
    """The execute-webhook body for a health Report (see worker.health).

    MASKER (an environment.Masker) is applied to every string that came from
    state.db or task files. The error lines there are already masked by the
    runner; this also hides secrets of the sidecar's own environment. Raw
    task output is never included: the error line and `akm logs` are enough.
    """
    from .health import severity, window_label
    mask = masker.mask_text if masker else (lambda s: s)
    window = window_label(report.window)
    n = len(report.problems)
    title = f"akm-worker: {n} problem{'s' if n != 1 else ''}" if n else "akm-worker: all good"
    budget = _Budget(EMBEDS_TOTAL_MAX)
    main = {"title": budget.take(_cut(title, TITLE_MAX)),
            "color": {"red": RED, "amber": AMBER}.get(severity(report), GREEN),
            "timestamp": report.generated_at.isoformat()}
    # The compose file names the container `worker`: the commands work as typed.
    footer = (f"last {window} · {len(report.tasks)} tasks · commands run in the worker: "
              f"docker exec worker akm health --window {window}")
    main["footer"] = {"text": budget.take(_cut(footer, FOOTER_MAX))}
    if n:
        # Keep room for the tasks embed (title and its "…and N more").
        budget.reserve(300)
        main["fields"] = _problem_fields(report.problems, budget, mask)
        budget.reserve(0)
    else:
        main["description"] = budget.take("Nothing wrong: every task ran as scheduled.")
    embeds = [main]
    if report.tasks:
        embeds.append({"title": budget.take("Tasks"), "color": main["color"],
                       "description": budget.take(_tasks_block(report.tasks, budget.left, mask))})
    body = {"content": _cut(f"**{title}** (last {window})", CONTENT_MAX),
            "embeds": embeds[:EMBEDS_MAX],
            # Task output can say @everyone or <@id>: nobody is ever pinged.
            "allowed_mentions": {"parse": []}}
    name = clean_username(username)
    if name:
        body["username"] = name
    return body


def render_error(message: str, username: str | None = None, masker=None) -> dict:
    """A red message for when there is no report at all (state.db unreadable)."""
    mask = masker.mask_text if masker else (lambda s: s)
    body = {"content": "**akm-worker: no health report**",
            "embeds": [{"title": "akm-worker cannot build its health report", "color": RED,
                        "description": _cut(mask(message), DESCRIPTION_MAX)}],
            "allowed_mentions": {"parse": []}}
    name = clean_username(username)
    if name:
        body["username"] = name
    return body


def _problem_fields(problems, budget, mask) -> list[dict]:
    fields = []
    for i, p in enumerate(problems):
        left = len(problems) - i
        more = _more_field(left)
        name = _cut(mask(_field_name(p)), FIELD_NAME_MAX)
        value = _cut(mask(_field_value(p)), FIELD_VALUE_MAX)
        # The last slot, or the last characters, go to "…and N more" when
        # anything would be left out.
        need = ulen(name) + ulen(value) + (_size(_more_field(left - 1)) if left > 1 else 0)
        if (len(fields) == FIELDS_MAX - 1 and left > 1) or not budget.fits(need):
            fields.append({k: budget.take(v) if isinstance(v, str) else v
                           for k, v in more.items()})
            return fields
        fields.append({"name": budget.take(name), "value": budget.take(value), "inline": False})
    return fields


def _field_name(p) -> str:
    dot = "\U0001F534" if p.kind in _red() else "\U0001F7E0"  # red / orange circle
    return f"{dot} {p.kind} · {p.task or 'discord report'}"


def _field_value(p) -> str:
    # The error text is the task's (masked) own words: keep it out of markdown
    # code spans it could break, but let people copy the command.
    value = p.detail.replace("`", "'")
    if p.command:
        value = _cut(value, FIELD_VALUE_MAX - len(p.command) - 4) + f"\n`{p.command}`"
    return value


def _red():
    from .health import RED as red
    return red


def _more_field(n: int) -> dict:
    return {"name": f"{ELLIPSIS}and {n} more", "value": "Run `akm health` for the full list.",
            "inline": False}


def _size(field: dict) -> int:
    return ulen(field["name"]) + ulen(field["value"])


def _tasks_block(tasks, room, mask) -> str:
    """One line per task in a code block (columns stay aligned), within ROOM."""
    limit = min(DESCRIPTION_MAX, room) - len("```\n\n```")
    lines, used = [], 0
    for i, t in enumerate(tasks):
        line = mask(_task_line(t))
        tail = f"{ELLIPSIS}and {len(tasks) - i} more"
        reserve = len(tail) + 1 if i < len(tasks) - 1 else 0
        if used + ulen(line) + 1 + reserve > limit:
            lines.append(tail)
            break
        lines.append(line)
        used += ulen(line) + 1
    return "```\n" + "\n".join(lines) + "\n```"


def _task_line(t) -> str:
    # Narrow enough for a phone: id, runs/failures, the last status.
    last = t.last_status or ("disabled" if t.enabled is False else "never ran")
    return f"{t.task[:24]:<24} {t.runs:>4} runs {t.failures:>3} failed  {last}"


def clean_username(name: str | None) -> str | None:
    """A username Discord accepts, or None to keep the webhook's own name."""
    name = (name or "").strip()[:USERNAME_MAX]
    if not name or re.search(r"clyde|discord", name, re.I):
        return None
    return name


def ulen(text: str) -> int:
    """Length as Discord may count it (UTF-16 units): never under the limit's unit."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def _cut(text: str, limit: int) -> str:
    text = text or ""
    if ulen(text) <= limit:
        return text
    text = text[:limit - 1]
    while ulen(text) > limit - 1:
        text = text[:-1]
    return text + ELLIPSIS


class _Budget:
    """The 6,000 characters shared by every embed of one message."""

    def __init__(self, total):
        self.left = total
        self.reserved = 0

    def fits(self, n) -> bool:
        return n <= self.left - self.reserved

    def take(self, text: str) -> str:
        self.left -= ulen(text)
        return text

    def reserve(self, n):
        self.reserved = n


# -- posting ------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a GET without the body; a
    # webhook never redirects, so a redirect is an answer to report, not follow.
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: dict, timeout: float = 10.0, max_attempts: int = 4,
         sleep=time.sleep) -> PostResult:
    """POST BODY to the webhook; retry what is worth retrying, a bounded number of times."""
    problem = check_url(url)
    if problem:
        return PostResult(Outcome.NOT_CONFIGURED, None, problem, 0)
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    token = _WEBHOOK_PATH.match(_path(url.strip())).group(2)
    if len(token) >= 8:
        # Belt and braces: a task's error line could quote the webhook URL itself.
        data = data.replace(token.encode(), b"***")
    result = None
    for attempt in range(1, max_attempts + 1):
        result, wait = _attempt(url.strip(), data, timeout, attempt)
        if wait is None or attempt == max_attempts:
            break
        sleep(wait)
    return PostResult(result.outcome, result.http_status, scrub(result.detail, url), attempt)


def _attempt(url, data, timeout, attempt) -> tuple[PostResult, float | None]:
    """One request: (its result, seconds to wait before trying again or None to stop)."""
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json",
        # Discord's edge rejects some default library user agents.
        "User-Agent": f"akm-worker/{__version__} (+https://github.com/akm-worker)"})
    backoff = BACKOFF[min(attempt - 1, len(BACKOFF) - 1)]
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return PostResult(Outcome.OK, resp.status, f"HTTP {resp.status}", attempt), None
    except urllib.error.HTTPError as e:
        return _http_error(e, attempt, backoff)
    except (urllib.error.URLError, OSError, ValueError) as e:
        # URLError wraps DNS/refused; socket timeouts and resets arrive bare.
        reason = getattr(e, "reason", e)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            reason = f"no answer within {timeout:g}s"
        return PostResult(Outcome.NETWORK_ERROR, None, f"network error: {reason}", attempt), backoff


def _http_error(e, attempt, backoff) -> tuple[PostResult, float | None]:
    status = e.code
    try:
        raw = e.read(READ_MAX)
    except (OSError, ValueError):
        raw = b""
    info = _json(raw)
    said = _discord_message(info, raw)
    if status == 429:
        wait = _retry_after(e.headers, info)
        detail = f"HTTP 429 rate limited ({said}); Discord asked to wait {wait:g}s"
        result = PostResult(Outcome.RATE_LIMITED, 429, detail, attempt)
        return result, (wait if wait <= MAX_RETRY_AFTER else None)
    if status in (401, 403, 404):
        detail = (f"HTTP {status} {said}: the webhook was deleted or its token is wrong; "
                  f"create a webhook in the channel's Integrations settings and put its URL "
                  f"in DISCORD_WEBHOOK_URL, then restart the sidecar")
        return PostResult(Outcome.GONE, status, detail, attempt), None
    if status >= 500:
        return PostResult(Outcome.SERVER_ERROR, status, f"HTTP {status} {said}", attempt), backoff
    return PostResult(Outcome.REJECTED, status,
                      f"HTTP {status} Discord rejected the message: {said}", attempt), None


def _retry_after(headers, info) -> float:
    """Seconds Discord asks us to wait: the body's float is the precise one."""
    for value in ((info or {}).get("retry_after"), headers.get("Retry-After") if headers else None):
        try:
            if value is not None and float(value) >= 0:
                return float(value)
        except (TypeError, ValueError):
            continue
    return 1.0


def _json(raw: bytes):
    try:
        value = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _discord_message(info, raw) -> str:
    """Discord's error JSON as one line: message, code, and the first field errors."""
    if not info:
        text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
        return text[:200] or "no details"
    out = str(info.get("message", "no message"))
    if info.get("code") is not None:
        out += f" (code {info['code']})"
    errors = list(_field_errors(info.get("errors"), ""))[:3]
    if errors:
        out += ": " + "; ".join(errors)
    return out[:500]


def _field_errors(node, path):
    # {"embeds": {"0": {"title": {"_errors": [{"code", "message"}]}}}}
    if not isinstance(node, dict):
        return
    for err in node.get("_errors", []) if isinstance(node.get("_errors"), list) else []:
        if isinstance(err, dict):
            yield f"{path or 'body'}: {err.get('message', err.get('code', '?'))}"
    for key, child in node.items():
        if key != "_errors":
            yield from _field_errors(child, f"{path}.{key}" if path else key)
