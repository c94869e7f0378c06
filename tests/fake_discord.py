"""A fake Discord webhook endpoint: a real HTTP server on loopback for tests.

Importing this module starts nothing. `FakeDiscord()` binds an ephemeral
port on 127.0.0.1 (or HOST) in a thread; `.url` is a webhook URL for it.
Every POST is checked against Discord's documented limits (an invalid body
gets 400 with Discord's error JSON, like the real one) and recorded in
`.requests`. What it answers is scripted, one entry per request, then the
default (204):

    with FakeDiscord() as d:
        d.script("rate_limit", "server_error", "ok")
        result = discord.post(d.url, body, sleep=fake_sleep)

Script entries: "ok" (204), "bad_request" (400 Invalid Form Body),
"unauthorized" (401 Invalid Webhook Token), "forbidden" (403),
"not_found" (404 Unknown Webhook), "rate_limit" (429 with Retry-After,
X-RateLimit-* and {"message", "retry_after", "global"}), "server_error"
(500), "bad_gateway" (502), ("hang", seconds) (answers nothing for that
long), ("rate_limit", retry_after[, header]) for other waits, or
(status, json_body, headers) for anything else.

For a test in another process (the image test), run it as a program:
`python tests/fake_discord.py --host 0.0.0.0 --port 8080`; it prints its
webhook URL, takes a script as `POST /_control/script` (a JSON list) and
shows what it received at `GET /_control/requests`.
"""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WEBHOOK_ID = "112233445566778899"
WEBHOOK_TOKEN = "fake-token_ABCdef123"
PATH = re.compile(r"^/api(?:/v\d+)?/webhooks/(\d+)/([A-Za-z0-9_.\-]+)/?(?:\?.*)?$")

LIMITS = {"content": 2000, "embeds": 10, "title": 256, "description": 4096, "fields": 25,
          "field.name": 256, "field.value": 1024, "footer": 2048, "author": 256,
          "total": 6000, "username": 80}

RETRY_AFTER = 0.5


def validate(body) -> list[tuple[str, str]]:
    """(path, message) for every limit BODY breaks, as Discord would list them."""
    if not isinstance(body, dict):
        return [("", "Invalid JSON body")]
    errors = []

    def over(path, value, limit):
        if isinstance(value, str) and _ulen(value) > limit:
            errors.append((path, f"Must be {limit} or fewer in length."))

    over("content", body.get("content"), LIMITS["content"])
    if "username" in body:
        name = body["username"]
        if not isinstance(name, str) or not 1 <= len(name) <= LIMITS["username"]:
            errors.append(("username", "Must be between 1 and 80 in length."))
        elif re.search(r"clyde|discord", name, re.I):
            errors.append(("username", "Username cannot contain \"discord\" or \"clyde\""))
    embeds = body.get("embeds") or []
    if not isinstance(embeds, list) or len(embeds) > LIMITS["embeds"]:
        errors.append(("embeds", "Must be 10 or fewer in length."))
        embeds = []
    total = 0
    for i, e in enumerate(embeds):
        total += _embed(e, f"embeds.{i}", over, errors)
    if total > LIMITS["total"]:
        errors.append(("embeds", f"Embed size exceeds maximum size of {LIMITS['total']}"))
    if not body.get("content") and not embeds:
        errors.append(("", "Cannot send an empty message"))
    return errors


def _embed(e, where, over, errors) -> int:
    over(f"{where}.title", e.get("title"), LIMITS["title"])
    over(f"{where}.description", e.get("description"), LIMITS["description"])
    footer = (e.get("footer") or {}).get("text", "")
    author = (e.get("author") or {}).get("name", "")
    over(f"{where}.footer.text", footer, LIMITS["footer"])
    over(f"{where}.author.name", author, LIMITS["author"])
    fields = e.get("fields") or []
    if len(fields) > LIMITS["fields"]:
        errors.append((f"{where}.fields", "Must be 25 or fewer in length."))
    size = sum(_ulen(x or "") for x in (e.get("title"), e.get("description"), footer, author))
    for j, f in enumerate(fields):
        over(f"{where}.fields.{j}.name", f.get("name"), LIMITS["field.name"])
        over(f"{where}.fields.{j}.value", f.get("value"), LIMITS["field.value"])
        for key in ("name", "value"):
            if not f.get(key):
                errors.append((f"{where}.fields.{j}.{key}", "This field is required"))
        size += _ulen(f.get("name") or "") + _ulen(f.get("value") or "")
    return size


def _ulen(text) -> int:
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def error_tree(errors) -> dict:
    """Discord's nested `errors` object: {"embeds": {"0": {"title": {"_errors": [...]}}}}."""
    tree: dict = {}
    for path, message in errors:
        node = tree
        for part in filter(None, path.split(".")):
            node = node.setdefault(part, {})
        node.setdefault("_errors", []).append({"code": "BASE_TYPE_MAX_LENGTH", "message": message})
    return tree


CANNED = {
    "ok": (204, None, {}),
    "bad_request": (400, {"message": "Invalid Form Body", "code": 50035,
                          "errors": {"content": {"_errors": [{
                              "code": "BASE_TYPE_MAX_LENGTH",
                              "message": "Must be 2000 or fewer in length."}]}}}, {}),
    "unauthorized": (401, {"message": "Invalid Webhook Token", "code": 50027}, {}),
    "forbidden": (403, {"message": "Missing Permissions", "code": 50013}, {}),
    "not_found": (404, {"message": "Unknown Webhook", "code": 10015}, {}),
    "server_error": (500, {"message": "500: Internal Server Error", "code": 0}, {}),
    "bad_gateway": (502, None, {}),
}


def rate_limit(retry_after=RETRY_AFTER, header=None, global_=False):
    """A 429 as Discord sends it: headers and body (HEADER overrides Retry-After)."""
    headers = {"Retry-After": str(header if header is not None else max(1, int(retry_after + 0.999))),
               "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
               "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
               "X-RateLimit-Reset-After": f"{retry_after:.3f}",
               "X-RateLimit-Bucket": "fakebucket", "X-RateLimit-Scope": "user"}
    if global_:
        headers["X-RateLimit-Global"] = "true"
    body = {"message": "You are being rate limited.", "retry_after": retry_after,
            "global": global_}
    return (429, body, headers)


class FakeDiscord:
    def __init__(self, host="127.0.0.1", port=0, token=WEBHOOK_TOKEN, webhook_id=WEBHOOK_ID):
        self.token, self.webhook_id = token, webhook_id
        self.requests: list[dict] = []
        self._script: list = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread = None

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        return f"{self.base}/api/webhooks/{self.webhook_id}/{self.token}"

    def script(self, *entries):
        with self._lock:
            self._script.extend(entries)

    def start(self):
        # A short poll interval: shutdown() waits up to one interval.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def next_answer(self, body_errors):
        with self._lock:
            entry = self._script.pop(0) if self._script else "ok"
        if body_errors and entry == "ok":
            return (400, {"message": "Invalid Form Body", "code": 50035,
                          "errors": error_tree(body_errors)}, {})
        if entry == "rate_limit":
            return rate_limit()
        if isinstance(entry, (list, tuple)) and entry and entry[0] == "rate_limit":
            return rate_limit(*entry[1:])
        if isinstance(entry, (list, tuple)) and entry and entry[0] == "hang":
            time.sleep(float(entry[1]))
            return None
        if isinstance(entry, str):
            return CANNED[entry]
        return tuple(entry)


def _handler(fake: FakeDiscord):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: tests read .requests instead
            pass

        def do_GET(self):
            if self.path == "/_control/requests":
                return self._send(200, fake.requests)
            self._send(405, {"message": "405: Method Not Allowed", "code": 0})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/_control/script":
                fake.script(*json.loads(raw or b"[]"))
                return self._send(204, None)
            m = PATH.match(self.path)
            if not m or m.group(1) != fake.webhook_id:
                return self._send(404, CANNED["not_found"][1])
            if m.group(2) != fake.token:
                return self._send(401, CANNED["unauthorized"][1])
            try:
                body = json.loads(raw)
            except ValueError:
                return self._send(400, {"message": "The request body contains invalid JSON.",
                                        "code": 50109})
            errors = validate(body)
            fake.requests.append({"path": self.path, "body": body, "errors": errors,
                                  "headers": dict(self.headers), "at": time.monotonic()})
            answer = fake.next_answer(errors)
            if answer is None:  # hung: close without a word
                self.close_connection = True
                return
            self._send(*answer)

        def _send(self, status, body, headers=None):
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="a fake Discord webhook endpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    fake = FakeDiscord(args.host, args.port)
    print(fake.url, flush=True)
    try:
        fake._server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
