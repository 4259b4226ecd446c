#!/usr/bin/env python3
"""Tests for claudeflare.py, end to end through real sockets, and its benchmark.

  python3 -X dev -W error test_claudeflare.py     run every test (make test), in 4 processes
  python3 -X dev -W error test_claudeflare.py TestRelay TestApi.test_mutating_endpoints
                                                  run some tests, in this process
  python3 test_claudeflare.py bench               direct-to-upstream vs through-the-proxy
  python3 test_claudeflare.py upstream            run the fake Anthropic API alone (prints its URL)

A fake Anthropic upstream (FakeUpstream) speaks the wire format of anthropic-wire.md: JSON and SSE
messages, rate-limit headers, the OAuth token endpoint, and scripted faults. Each test starts a
real claudeflare server on 127.0.0.1 port 0 with its own temporary data folder.
"""
from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import datetime
import email.utils
import hashlib
import re
import select
import selectors
import shutil
import signal
import html.parser
import http.client
import http.server
import io
import json
import logging
import math
import os
import plistlib
import pty
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.parse
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
# Nothing a test runs may touch the real home folder or the real Anthropic endpoints.
SANDBOX = tempfile.mkdtemp(prefix="claudeflare-test-")
atexit.register(shutil.rmtree, SANDBOX, True)
os.environ.update({
    "HOME": SANDBOX, "XDG_CONFIG_HOME": os.path.join(SANDBOX, "config"),
    "XDG_DATA_HOME": os.path.join(SANDBOX, "data"),
    "CLAUDEFLARE_LOG_DIR": os.path.join(SANDBOX, "logs"),
    "CLAUDEFLARE_UPSTREAM_URL": "http://127.0.0.1:9",
    "CLAUDEFLARE_TOKEN_URL": "http://127.0.0.1:9",
})
for _name in ("PORT", "LB_STRATEGY", "CLIENT_ID", "RETRY_ATTEMPTS", "RETRY_DELAY_MS",
              "SESSION_DURATION_MS", "CLAUDEFLARE_DEBUG", "LOG_LEVEL", "LOG_FORMAT",
              "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy",
              "CLAUDEFLARE_CONFIG_PATH", "CLAUDEFLARE_DB_PATH"):
    os.environ.pop(_name, None)

sys.path.insert(0, HERE)
import claudeflare  # noqa: E402

DEADLINE_S = 10.0


class LogCapture(logging.Handler):
    """Keeps what claudeflare logs during the tests, for them to read (stderr stays clean)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.json_lines: list[str] = []
        self.setFormatter(claudeflare.PrettyFormatter())
        self.json = claudeflare.JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.json_lines.append(self.json.format(record))

    def text(self) -> str:
        """Every line logged since the test began, in both formats."""
        return "\n".join(self.lines + self.json_lines)

    def clear(self) -> None:
        self.lines.clear()
        self.json_lines.clear()


#: Exceptions that -W error cannot raise where they happen (in __del__, as a ResourceWarning of
#: a leaked socket, or in a thread): collected here, and the run fails if there are any.
HIDDEN_ERRORS: list[str] = []
sys.unraisablehook = lambda hook: HIDDEN_ERRORS.append(
    f"{hook.exc_type.__name__}: {hook.exc_value} in {hook.object!r}")
threading.excepthook = lambda hook: HIDDEN_ERRORS.append(
    f"{hook.exc_type.__name__}: {hook.exc_value} in thread {hook.thread.name}")

CAPTURED_LOG = LogCapture()
claudeflare.log.addHandler(CAPTURED_LOG)
claudeflare.log.setLevel(logging.DEBUG)
claudeflare.log.propagate = False


def wait_for(condition, timeout: float = DEADLINE_S, what: str = "condition"):
    """Poll a condition until it is true or the deadline passes (tests never sleep blindly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


###############################################################################
# Fake Anthropic upstream #####################################################
###############################################################################

class Recorded:
    """One request the fake upstream received."""

    def __init__(self, method: str, target: str, headers, body: bytes, connection: int) -> None:
        self.method = method
        self.target = target
        self.path = target.partition("?")[0]
        self.headers = headers
        self.body = body
        self.connection = connection
        self.arrived = time.monotonic()

    def json(self):
        return json.loads(self.body)


def message_body(model: str = "claude-sonnet-4-5", text: str = "Hello!", usage=None) -> dict:
    """A non-streamed Messages API answer."""
    return {"id": "msg_fake", "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": text}], "model": model,
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": usage or {"input_tokens": 12, "output_tokens": 5,
                               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def sse(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def message_events(model: str = "claude-sonnet-4-5", words=("Hello", " world"),
                   input_tokens: int = 12) -> list[bytes]:
    """The SSE events of a streamed Messages API answer."""
    events = [sse("message_start", {"type": "message_start", "message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "content": [], "model": model,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        sse("ping", {"type": "ping"})]
    for word in words:
        events.append(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta", "text": word}}))
    events += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
               sse("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "end_turn"},
                                     "usage": {"output_tokens": len(words)}}),
               sse("message_stop", {"type": "message_stop"})]
    return events


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fake = self.server.fake
        with fake.lock:
            fake.connections += 1
            self.connection_id = fake.connections

    def log_message(self, format, *args) -> None:
        pass

    def handle_any(self) -> None:
        fake = self.server.fake
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = Recorded(self.command, self.path, self.headers, body, self.connection_id)
        if fake.observer is not None:
            fake.observer(request)
        with fake.lock:
            fake.requests.append(request)
            action = fake.next_action(request)
        action(self, request)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any

    # -- building blocks for actions -----------------------------------------------------------

    def send_whole(self, status: int, body: bytes, content_type: str = "application/json",
                   headers=()) -> None:
        head = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'X')}",
                f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                "request-id: req_fake"]
        head += [f"{name}: {value}" for name, value in (*self.api_headers(), *headers)]
        data = ("\r\n".join(head) + "\r\n\r\n").encode()
        self.wfile.write(data if self.command == "HEAD" else data + body)

    def start_chunked(self, status: int = 200, content_type: str = "text/event-stream",
                      headers=()) -> None:
        head = [f"HTTP/1.1 {status} OK", f"Content-Type: {content_type}",
                "Transfer-Encoding: chunked", "Cache-Control: no-cache", "request-id: req_fake"]
        head += [f"{name}: {value}" for name, value in (*self.api_headers(), *headers)]
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())

    def api_headers(self) -> list[tuple[str, str]]:
        """The rest of the real API's header set, when the fake plays it (the bench's fake).

        The rate-limit headers of the account kind the credential belongs to: the twelve
        request and token ones of an API key, or the unified ones of a subscription.
        """
        if not self.server.fake.real_headers:
            return []
        now = time.time()
        if self.headers["x-api-key"]:
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 1))
            limits = [(f"anthropic-ratelimit-{kind}-{field}", value)
                      for kind, limit in (("requests", "4000"), ("input-tokens", "2000000"),
                                          ("output-tokens", "400000"), ("tokens", "2400000"))
                      for field, value in (("limit", limit), ("remaining", str(int(limit) - 1)),
                                           ("reset", reset))]
        else:
            five, seven = int(now // 18000 + 1) * 18000, int(now // 604800 + 1) * 604800
            limits = [(f"anthropic-ratelimit-unified-{name}", str(value)) for name, value in (
                ("status", "allowed"), ("reset", five), ("representative-claim", "five_hour"),
                ("5h-status", "allowed"), ("5h-reset", five), ("5h-utilization", 0.12),
                ("7d-status", "allowed"), ("7d-reset", seven), ("7d-utilization", 0.34),
                ("fallback-percentage", 0.5), ("overage-status", "rejected"),
                ("overage-disabled-reason", "org_level_disabled"))]
        return [("Date", email.utils.formatdate(now, usegmt=True)),
                ("anthropic-organization-id", "4f9c1a2e-8b3d-4e5f-9a6b-7c8d9e0f1a2b"),
                *limits, ("x-robots-tag", "none"), ("Server", "cloudflare"),
                ("cf-ray", "8f1e2d3c4b5a6978-AMS")]

    def send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


# Actions: what the fake upstream does with one request. Each is `action(handler, request)`.

def reply_default(handler: FakeHandler, request: Recorded) -> None:
    """Behave like the Anthropic API for the paths the tests use."""
    oauth = handler.server.fake.oauth
    if request.path == "/v1/oauth/token":
        oauth.handle(handler, request)
    elif request.path == "/api/oauth/claude_cli/create_api_key":
        oauth.create_api_key(handler, request)
    elif request.path == "/api/oauth/usage":
        oauth.usage(handler, request)
    elif oauth.refuses_the_client(request):
        handler.send_whole(400, json.dumps({"type": "error", "error": {
            "type": "invalid_request_error", "message": "This credential is only authorized for "
            "use with Claude Code and cannot be used for other API requests."},
            "request_id": "req_fake"}).encode())
    elif oauth.refuses(request):
        handler.send_whole(401, json.dumps({"type": "error", "error": {
            "type": "authentication_error", "message": "OAuth token has expired. Please obtain a "
            "new token or refresh your existing token."}}).encode())
    elif request.path == "/v1/echo":
        handler.send_whole(200, request.body, "application/octet-stream",
                           [("X-Body-Sha256", hashlib.sha256(request.body).hexdigest())])
    elif request.path == "/v1/messages" and request.method == "POST":
        payload = json.loads(request.body or b"{}")
        model = payload.get("model", "claude-sonnet-4-5")
        refused, limits = handler.server.fake.meter(request, model)
        if refused:
            handler.send_whole(429, json.dumps({"type": "error", "error": {
                "type": "rate_limit_error", "message": "Rate limited"}}).encode(),
                headers=limits)
        elif payload.get("fake_stream_bytes"):
            handler.start_chunked()
            delta = {"type": "text_delta", "text": "x" * 8000}
            event = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": delta})
            for _ in range(payload["fake_stream_bytes"] // len(event)):
                handler.send_chunk(event)
            handler.end_chunked()
        elif payload.get("stream"):
            # The bench asks for fake_words words (11 events for 5) and fake_interval seconds
            # between events (a slow stream).
            words = (" word",) * payload["fake_words"] if "fake_words" in payload else None
            interval = payload.get("fake_interval", 0)
            handler.start_chunked(headers=limits)
            for index, event in enumerate(message_events(model, words or ("Hello", " world"))):
                if index and interval:
                    time.sleep(interval)
                handler.send_chunk(event)
            handler.end_chunked()
        else:
            handler.send_whole(200, json.dumps(message_body(model)).encode(), headers=limits)
    elif request.path == "/v1/models":
        handler.send_whole(200, b'{"data":[{"id":"claude-sonnet-4-5","type":"model"}]}')
    else:
        handler.send_whole(404, json.dumps({"type": "error", "error": {
            "type": "not_found_error", "message": "Not found"}}).encode())


def reply_json(status: int, body, headers=()):
    """Answer with a fixed JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda handler, request: handler.send_whole(status, data, headers=headers)


def reply_error(status: int, error_type: str, message: str, headers=()):
    """Answer with an Anthropic error."""
    return reply_json(status, {"type": "error", "error": {"type": error_type, "message": message},
                               "request_id": "req_fake"}, headers)


def reply_stream(events, hold_after: int | None = None, gate: threading.Event | None = None,
                 drop_after: int | None = None, headers=()):
    """Stream SSE events; optionally hold after some until `gate` is set, or drop the line."""
    def action(handler: FakeHandler, request: Recorded) -> None:
        fake = handler.server.fake
        handler.start_chunked(headers=headers)
        try:
            for index, event in enumerate(events):
                if index == drop_after:
                    handler.close_connection = True
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return
                if index == hold_after:
                    fake.holding.set()
                    gate.wait(DEADLINE_S)
                handler.send_chunk(event)
            handler.end_chunked()
        except OSError:
            fake.stream_aborted.set()
            handler.close_connection = True
    return action


def reply_stream_split(events, piece: int = 7, stop_after: int | None = None):
    """Stream SSE events cut into small pieces, so events straddle reads; maybe stop early."""
    def action(handler: FakeHandler, request: Recorded) -> None:
        handler.start_chunked()
        data = b"".join(events[:stop_after])
        for start in range(0, len(data), piece):
            handler.send_chunk(data[start:start + piece])
            time.sleep(0.0005)
        if stop_after is None:
            handler.end_chunked()
        else:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
    return action


def keep_streaming_until_client_gone(gate: threading.Event):
    """Send one event, wait for `gate`, then keep sending pings until the proxy hangs up."""
    def action(handler: FakeHandler, request: Recorded) -> None:
        fake = handler.server.fake
        handler.start_chunked()
        try:
            handler.send_chunk(message_events()[0])
            fake.holding.set()
            gate.wait(DEADLINE_S)
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline:
                handler.send_chunk(sse("ping", {"type": "ping"}))
                time.sleep(0.01)
        except OSError:
            fake.stream_aborted.set()
            handler.close_connection = True
    return action


def hang(gate: threading.Event):
    """Read the request, then send nothing until `gate` is set."""
    def action(handler: FakeHandler, request: Recorded) -> None:
        gate.wait(DEADLINE_S * 2)
        handler.close_connection = True
    return action


def send_in_pieces(handler: FakeHandler, data: bytes, piece: int | None) -> None:
    """Write a raw answer whole, or in pieces of `piece` bytes that arrive one by one."""
    try:
        for start in range(0, len(data), piece or len(data)):
            handler.wfile.write(data[start:start + (piece or len(data))])
            if piece:
                time.sleep(0.0005)
    except OSError:  # the proxy refused what it read so far
        handler.close_connection = True


def drop_connection(handler: FakeHandler, request: Recorded) -> None:
    """Close the connection without answering."""
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def reply_then_close_silently(handler: FakeHandler, request: Recorded) -> None:
    """Answer normally, then close the keep-alive connection without saying so (idle timeout)."""
    reply_default(handler, request)
    handler.close_connection = True


def pkce_challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(
        b"=").decode()


class FakeOAuth:
    """The OAuth side of the fake: authorization codes checked with PKCE, rotating refresh tokens.

    Like the real endpoint, a refresh kills the refresh token it used.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: dict[str, dict] = {}
        self.refresh_tokens: dict[str, str] = {}  # live refresh token -> its access token
        self.access_tokens: set[str] = set()
        self.refresh_requests = 0
        self.failures: collections.deque = collections.deque()
        self.delay = 0.0
        self.expires_in = 28800
        #: False: a refresh answers without a refresh_token, and the old one stays live.
        self.rotates = True
        self.serial = 0
        #: What GET /api/oauth/usage answers (a plan without windows unless a test sets them),
        #: scripted failures for it, and the token each read carried.
        self.usage_answer: dict = {"five_hour": None, "seven_day": None, "extra_usage": None}
        self.usage_failures: collections.deque = collections.deque()
        self.usage_reads: list[str] = []
        #: True: like the real API since 2026, subscription tokens serve Claude Code only.
        self.claude_code_only = False
        #: The scopes logins were granted, when a refresh may not ask for more (RFC 6749).
        self.granted_scopes: str | None = None

    def authorize(self, url: str) -> str:
        """Play the login page: return the `code#state` it would show for an authorize URL."""
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["code_challenge_method"] == "S256", query
        with self.lock:
            self.serial += 1
            code = f"code{self.serial}"
            self.codes[code] = query
        return f"{code}#{query['state']}"

    def issue(self) -> tuple[str, str]:
        """Issue a new live access and refresh token pair."""
        with self.lock:
            self.serial += 1
            access, refresh = (f"sk-ant-oat01-access{self.serial}",
                               f"sk-ant-ort01-refresh{self.serial}")
            self.access_tokens.add(access)
            self.refresh_tokens[refresh] = access
        return access, refresh

    def token_answer(self) -> dict:
        access, refresh = self.issue()
        return {"token_type": "Bearer", "access_token": access, "refresh_token": refresh,
                "expires_in": self.expires_in, "scope": "user:inference",
                "organization": {"uuid": "org-1", "name": "Acme"},
                "account": {"uuid": "acct-1", "email_address": "dev@example.com"}}

    def handle(self, handler: "FakeHandler", request: "Recorded") -> None:
        payload = request.json()
        if payload.get("grant_type") == "refresh_token":
            with self.lock:
                self.refresh_requests += 1
            time.sleep(self.delay)
        if self.failures:  # (status, JSON body), or an action such as drop_connection
            failure = self.failures.popleft()
            if callable(failure):
                return failure(handler, request)
            status, body = failure
            handler.send_whole(status, json.dumps(body).encode())
            return
        if payload.get("grant_type") == "authorization_code":
            with self.lock:
                query = self.codes.pop(payload.get("code"), None)
            if query is None:
                return handler.send_whole(400, b'{"error":"invalid_grant",'
                                               b'"error_description":"Invalid code"}')
            if pkce_challenge(payload.get("code_verifier", "")) != query["code_challenge"]:
                return handler.send_whole(400, b'{"error":"invalid_grant",'
                                               b'"error_description":"Invalid code_verifier"}')
            if (payload.get("state"), payload.get("client_id"), payload.get("redirect_uri")) != (
                    query["state"], query["client_id"], query["redirect_uri"]):
                return handler.send_whole(400, b'{"error":"invalid_request"}')
            return handler.send_whole(200, json.dumps(self.token_answer()).encode())
        if payload.get("grant_type") == "refresh_token":
            if self.granted_scopes is not None and not set(
                    payload.get("scope", self.granted_scopes).split()) <= set(
                    self.granted_scopes.split()):
                return handler.send_whole(400, b'{"error":"invalid_scope","error_description":'
                                               b'"The requested scope exceeds the grant"}')
            with self.lock:
                live = self.refresh_tokens.pop(payload.get("refresh_token"), None)
            if live is None:
                return handler.send_whole(400, b'{"error":"invalid_grant","error_description":'
                                               b'"Refresh token not found or invalid"}')
            answer = self.token_answer()
            if not self.rotates:
                with self.lock:
                    del self.refresh_tokens[answer.pop("refresh_token")]
                    self.refresh_tokens[payload["refresh_token"]] = answer["access_token"]
            return handler.send_whole(200, json.dumps(answer).encode())
        handler.send_whole(400, b'{"error":"unsupported_grant_type"}')

    def create_api_key(self, handler: "FakeHandler", request: "Recorded") -> None:
        token = (request.headers["Authorization"] or "").replace("Bearer ", "")
        if token not in self.access_tokens:
            return handler.send_whole(401, b'{"error":{"message":"Invalid token"}}')
        handler.send_whole(200, json.dumps({"raw_key": "sk-ant-api03-minted"}).encode())

    def usage(self, handler: "FakeHandler", request: "Recorded") -> None:
        """Answer a usage read as the real endpoint does: 401 for a token it does not know."""
        token = (request.headers["Authorization"] or "").replace("Bearer ", "")
        with self.lock:
            self.usage_reads.append(token)
            failure = self.usage_failures.popleft() if self.usage_failures else None
        if failure is not None:
            return failure(handler, request)
        if token not in self.access_tokens or "oauth-2025-04-20" not in (
                request.headers["anthropic-beta"] or ""):
            return handler.send_whole(401, b'{"type":"error","error":{"type":'
                                           b'"authentication_error","message":"Invalid token"}}')
        handler.send_whole(200, json.dumps(self.usage_answer).encode())

    def refuses_the_client(self, request: "Recorded") -> bool:
        """Tell whether a subscription token is used by a client other than Claude Code."""
        token = (request.headers["Authorization"] or "").replace("Bearer ", "")
        claude_code = ((request.headers["User-Agent"] or "").startswith("claude-cli/")
                       and request.headers["x-app"] == "cli")
        return self.claude_code_only and token.startswith("sk-ant-oat01-") and not claude_code

    def refuses(self, request: "Recorded") -> bool:
        """Tell whether a Messages request carries an OAuth token this fake does not accept."""
        token = (request.headers["Authorization"] or "").replace("Bearer ", "")
        return token.startswith("sk-ant-oat01-") and token not in self.access_tokens


class Quota:
    """A rate-limit window of the fake: `limit` requests per `seconds`, counted from the first
    request after a reset, as the real windows are. Resets fall on whole seconds (the headers
    give epoch seconds)."""

    def __init__(self, limit: int, seconds: float, used: int = 0) -> None:
        self.limit, self.seconds, self.used = limit, seconds, used
        self.reset = math.ceil(time.time() + seconds) if used else None

    def current(self, now: float) -> tuple[int, int]:
        """Return the requests used and the reset (epoch s), a passed reset starting afresh."""
        if self.reset is not None and now >= self.reset:
            self.used, self.reset = 0, None
        return self.used, self.reset or math.ceil(now + self.seconds)

    def take(self, now: float) -> None:
        used, reset = self.current(now)
        self.used, self.reset = used + 1, reset


class FakeUpstream:
    """A fake Anthropic API on 127.0.0.1 port 0 that records requests and runs scripted faults."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.oauth = FakeOAuth()
        #: Called with each request as it arrives, before it is answered.
        self.observer = None
        self.requests: list[Recorded] = []
        self.connections = 0
        self.queued: collections.deque = collections.deque()
        self.per_account: dict[str, collections.deque] = collections.defaultdict(
            collections.deque)
        self.holding = threading.Event()
        self.stream_aborted = threading.Event()
        #: credential -> window (5h, 7d, 7d_sonnet, 7d_opus, ...) -> its Quota: the windows
        #: each answer's headers report and a spent one refuses with a 429. A 7d_<family>
        #: window counts only the requests for that family's models.
        self.quotas: dict[str, dict[str, Quota]] = {}
        #: True: answer with the real API's whole header set (FakeHandler.api_headers).
        self.real_headers = False
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler,
                                                      bind_and_activate=False)
        self.server.daemon_threads = True
        self.server.request_queue_size = 1024  # the listen backlog: set before listening
        self.server.fake = self
        self.server.server_bind()
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def push(self, *actions) -> None:
        """Use these actions, in order, for the next requests."""
        with self.lock:
            self.queued.extend(actions)

    def push_for(self, credential: str, *actions) -> None:
        """Use these actions for the next requests carrying this API key or Bearer token."""
        with self.lock:
            self.per_account[credential].extend(actions)

    def next_action(self, request: Recorded):
        if request.path.startswith(("/v1/oauth", "/api/oauth")):
            return reply_default
        credential = request.headers["x-api-key"] or (
            request.headers["Authorization"] or "").replace("Bearer ", "")
        if self.per_account.get(credential):
            return self.per_account[credential].popleft()
        if self.queued:
            return self.queued.popleft()
        return reply_default

    def meter(self, request: Recorded, model: str) -> tuple[bool, list]:
        """Count a Messages request against its account's windows: return whether a spent
        window refuses it (a 429) and the rate-limit headers of the answer."""
        credential = request.headers["x-api-key"] or (
            request.headers["Authorization"] or "").replace("Bearer ", "")
        now, headers = time.time(), []
        with self.lock:
            windows = self.quotas.get(credential, {})
            counting = [name for name in windows
                        if "_" not in name or name.split("_", 1)[1] in model.split("-")]
            refused = [name for name in counting
                       if windows[name].current(now)[0] >= windows[name].limit]
            if not refused:
                for name in counting:
                    windows[name].take(now)
            resets = []
            for name, quota in windows.items():
                used, reset = quota.current(now)
                resets += [reset] if name in refused else []
                headers += [(f"anthropic-ratelimit-unified-{name}-status",
                             "rejected" if used >= quota.limit else "allowed"),
                            (f"anthropic-ratelimit-unified-{name}-utilization",
                             f"{used / quota.limit if quota.limit else 1.0:.2f}"),
                            (f"anthropic-ratelimit-unified-{name}-reset", str(reset))]
        if refused:
            claim = refused[0].replace("5h", "five_hour").replace("7d", "seven_day")
            headers += [("anthropic-ratelimit-unified-status", "rejected"),
                        ("anthropic-ratelimit-unified-representative-claim", claim),
                        ("retry-after", str(max(1, math.ceil(min(resets) - now))))]
        return bool(refused), headers

    def messages(self) -> list[Recorded]:
        """The requests that were not for the OAuth endpoints."""
        return [request for request in self.requests
                if not request.path.startswith(("/v1/oauth", "/api/oauth"))]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


###############################################################################
# A real claudeflare server ###################################################
###############################################################################

class Proxy:
    """A real claudeflare server on port 0 with its own temporary config, database and logs."""

    def __init__(self, upstream_url: str, environ: dict | None = None, **settings) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="claudeflare-")
        self.config_path = os.path.join(self.dir.name, "config.json")
        self.db_path = os.path.join(self.dir.name, "claudeflare.db")
        values = {"upstream_url": upstream_url,
                  "oauth_token_url": upstream_url + "/v1/oauth/token"}
        values.update(settings)
        with open(self.config_path, "w") as out:
            json.dump(values, out)
        loaded = claudeflare.load_settings(self.config_path, {"host": "127.0.0.1", "port": 0},
                                           environ=environ or {})
        self.server = claudeflare.make_server(loaded, self.db_path)
        self.app = self.server.app
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def connect(self, timeout: float = DEADLINE_S) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None):
        """Send one request on a fresh connection; return (status, headers, body bytes)."""
        connection = self.connect()
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def settle(self) -> None:
        """Wait until no request is in flight and the request log holds every finished one.

        A client has its answer a moment before the server has recorded it.
        """
        wait_for(lambda: self.server.life.running == 0, what="requests in flight to finish")
        self.app.writer.flush()

    def stop(self) -> None:
        """Stop as `serve` does at SIGTERM: no new connections, drain, then write and close."""
        self.server.shutdown()
        self.server.server_close()
        self.server.life.drain(DEADLINE_S)
        self.app.close()
        self.thread.join()

    def close(self) -> None:
        if self.thread.is_alive():
            self.stop()
        self.dir.cleanup()


class ProxyTestCase(unittest.TestCase):
    """Starts a fake upstream and a real claudeflare server for each test."""

    settings: dict = {}

    def setUp(self) -> None:
        CAPTURED_LOG.clear()
        self.upstream = FakeUpstream()
        self.addCleanup(self.upstream.close)
        self.proxy = Proxy(self.upstream.url, **self.settings)
        self.addCleanup(self.proxy.close)

    def post_message(self, stream: bool = False, headers=None, path: str = "/v1/messages"):
        body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
                "messages": [{"role": "user", "content": "Hi"}]}
        return self.proxy.request("POST", path, body,
                                  {"content-type": "application/json", **(headers or {})})


def assert_all_accounts_failed(test: unittest.TestCase, status: int, body: bytes, attempts: int,
                               cause: str) -> None:
    """Check the guide's 503: every account tried, none answered, and why the last one failed."""
    test.assertEqual(status, 503)
    error = json.loads(body)
    test.assertEqual(error["error"], "All accounts failed to proxy the request")
    test.assertEqual(error["attempts"], attempts)
    test.assertIn(cause, error["lastError"])


def raw_http(port: int, data: bytes, timeout: float = DEADLINE_S) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


###############################################################################
# Settings, storage and the account commands ##################################
###############################################################################

def run_cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the real command line in this process; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = claudeflare.main(list(args))
            except SystemExit as exit:
                code = exit.code
    finally:
        sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


class CliTestCase(unittest.TestCase):
    """A temporary config and database for CLI commands."""

    def setUp(self) -> None:
        folder = tempfile.TemporaryDirectory(prefix="claudeflare-cli-")
        self.addCleanup(folder.cleanup)
        self.folder = folder.name
        self.config_path = os.path.join(self.folder, "config.json")
        self.db_path = os.path.join(self.folder, "claudeflare.db")

    def cli(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        return run_cli("--config", self.config_path, "--db", self.db_path, *args, stdin=stdin)

    def ok(self, *args: str, stdin: str = "") -> str:
        code, out, err = self.cli(*args, stdin=stdin)
        self.assertEqual(code, 0, err)
        return out

    def fails(self, expected: str, *args: str, stdin: str = "") -> str:
        code, out, err = self.cli(*args, stdin=stdin)
        self.assertEqual(code, 1, out)
        self.assertIn(expected, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("claudeflare: error: "), err)
        return err

    def accounts(self) -> dict:
        return {account["name"]: account for account in json.loads(self.ok("list", "--json"))}


class TestSettings(CliTestCase):
    def test_flag_beats_environment_beats_file_beats_default(self):
        with open(self.config_path, "w") as out:
            json.dump({"port": 7001, "retry_attempts": 5, "lb_strategy": "weighted"}, out)
        environ = {"PORT": "7002", "RETRY_ATTEMPTS": "6"}
        settings = claudeflare.load_settings(self.config_path, {"port": 7003}, environ)
        self.assertEqual((settings.port, settings.sources["port"]), (7003, "flag"))
        settings = claudeflare.load_settings(self.config_path, {}, environ)
        self.assertEqual((settings.port, settings.sources["port"]), (7002, "env"))
        self.assertEqual(settings.retry_attempts, 6)
        self.assertEqual((settings.lb_strategy, settings.sources["lb_strategy"]),
                         ("weighted", "config"))
        self.assertEqual((settings.retry_delay_ms, settings.sources["retry_delay_ms"]),
                         (1000, "default"))
        os.unlink(self.config_path)
        settings = claudeflare.load_settings(self.config_path, {}, {})
        self.assertEqual((settings.lb_strategy, settings.port), ("session", 8080))
        self.assertEqual(settings.sources["port"], "default")
        with open(self.config_path) as written:
            self.assertEqual(json.load(written), {})  # a new config holds only what is set

    #: Two valid values for every setting, neither the default: one for the file, one for the
    #: environment.
    OTHER_VALUES = {
        "port": ("7001", "7002"), "host": ("127.0.0.2", "127.0.0.3"),
        "lb_strategy": ("weighted", "headroom"), "client_id": ("id-file", "id-env"),
        "retry_attempts": ("5", "6"), "retry_delay_ms": ("10", "20"),
        "retry_backoff": ("1.5", "3"), "session_duration_ms": ("1000", "2000"),
        "upstream_url": ("http://file.test", "http://env.test"),
        "oauth_token_url": ("http://file.test/t", "http://env.test/t"),
        "oauth_redirect_uri": ("http://file.test/r", "http://env.test/r"),
        "request_timeout_s": ("11", "12"), "shutdown_timeout_s": ("13", "14"),
        "request_retention_days": ("7", "8"), "log_level": ("WARN", "ERROR"),
        "log_format": ("json", "pretty"), "max_connections": ("50", "60"),
        "tls_cert": ("/file/cert.pem", "/env/cert.pem"),
        "tls_key": ("/file/key.pem", "/env/key.pem"), "overage": ("never", "allow"),
        "usage_poll_s": ("60", "0"), "login_timeout_s": ("30", "40"),
        "budget_timezone": ("UTC+02:00", "Europe/Paris"),
        "hold_s": ("300", "0"), "hold_max": ("5", "6"),
        "alert_url": ("http://file.test/hook", "http://env.test/hook"),
        "alert_format": ("slack", "ntfy"), "alert_command": ("notify-send", "mail ops"),
        "alert_thresholds": ("50", "60,90"), "alert_repeat_s": ("600", "700"),
    }

    def test_every_setting_follows_the_precedence(self):
        self.assertEqual(set(self.OTHER_VALUES), set(claudeflare.SETTINGS_BY_KEY))
        for setting in claudeflare.SETTINGS:
            file_value, env_value = self.OTHER_VALUES[setting.key]
            with self.subTest(setting=setting.key):
                with open(self.config_path, "w") as out:
                    json.dump({setting.key: file_value}, out)
                loaded = claudeflare.load_settings(self.config_path, {}, {})
                self.assertEqual(loaded.values[setting.key], setting.parse(file_value))
                loaded = claudeflare.load_settings(self.config_path, {},
                                                   {setting.env: env_value})
                self.assertEqual((loaded.values[setting.key], loaded.sources[setting.key]),
                                 (setting.parse(env_value), "env"))
                os.unlink(self.config_path)
                loaded = claudeflare.load_settings(self.config_path, {}, {})
                self.assertEqual((loaded.values[setting.key], loaded.sources[setting.key]),
                                 (setting.default, "default"))

    def test_environment_overrides_the_file_in_a_real_process(self):
        self.ok("config", "set", "port", "7001")
        env = dict(os.environ, PORT="7002")
        done = subprocess.run([sys.executable, os.path.join(HERE, "claudeflare.py"), "--config",
                               self.config_path, "--db", self.db_path, "config", "get", "port"],
                              env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.stdout.strip(), "7002", done.stderr)
        self.assertEqual(self.ok("config", "get", "port").strip(), "7001")

    def reloaded_after_config_set(self, environ: dict, before=None) -> dict:
        """Run a server with this environment, `config set retry_attempts 5`, return its config.

        `before(proxy)` runs first, while the server runs.
        """
        proxy = Proxy("http://127.0.0.1:9", environ, lb_strategy="weighted", retry_attempts=2)
        self.addCleanup(proxy.close)
        if before is not None:
            before(proxy)
        code, _, err = run_cli("--config", proxy.config_path, "--db", proxy.db_path, "config",
                               "set", "retry_attempts", "5")
        self.assertEqual(code, 0, err)
        return json.loads(proxy.request("GET", "/api/config")[2])

    def test_environment_keeps_winning_when_the_server_reloads_the_file(self):
        config = self.reloaded_after_config_set({"LB_STRATEGY": "headroom"})
        self.assertEqual(config["settings"]["retryAttempts"], 5)  # the file was read again
        self.assertEqual((config["settings"]["lbStrategy"], config["sources"]["lbStrategy"]),
                         ("headroom", "env"))

    def test_environment_keeps_winning_after_a_corrupt_file_is_replaced(self):
        def corrupt(proxy: Proxy) -> None:
            with open(proxy.config_path, "w") as out:
                out.write("{broken")
            self.assertEqual(proxy.request("GET", "/health")[0], 200)  # the server saw it

        config = self.reloaded_after_config_set({"LB_STRATEGY": "headroom"}, corrupt)
        self.assertIn("Failed to parse config file", CAPTURED_LOG.text())
        self.assertEqual(config["settings"]["retryAttempts"], 5)
        self.assertEqual((config["settings"]["lbStrategy"], config["sources"]["lbStrategy"]),
                         ("headroom", "env"))

    def test_invalid_values_are_refused_with_the_valid_ones(self):
        err = self.fails("Invalid strategy: fastest", "config", "set", "lb_strategy", "fastest")
        self.assertIn("round-robin", err)
        self.fails("must not be negative", "config", "set", "retry_attempts", "-1")
        self.fails("port must be a number", "config", "set", "port", "eighty")
        self.fails("Unknown setting: colour", "config", "set", "colour", "blue")
        with self.assertRaises(claudeflare.ClaudeflareError) as caught:
            claudeflare.load_settings(self.config_path, {}, {"LB_STRATEGY": "fastest"})
        self.assertIn("Invalid strategy: fastest", str(caught.exception))
        code, _, err = self.cli("serve", "--port", "http")
        self.assertEqual(code, 2)
        self.assertIn("port must be a number", err)

    def test_config_set_get_and_list(self):
        self.ok("config", "set", "lb_strategy", "round-robin")
        self.assertEqual(self.ok("config", "get", "lb_strategy").strip(), "round-robin")
        listing = self.ok("config", "list")
        self.assertRegex(listing, r"lb_strategy\s+round-robin\s+config")
        self.assertRegex(listing, r"session_duration_ms\s+18000000")
        with open(self.config_path) as written:
            self.assertEqual(json.load(written)["lb_strategy"], "round-robin")

    def test_corrupt_config_is_kept_aside_and_defaults_are_used(self):
        with open(self.config_path, "w") as out:
            out.write('{"port": 7001,')
        code, out, err = self.cli("config", "get", "port")
        self.assertEqual((code, out.strip()), (0, "8080"))
        self.assertIn("Failed to parse config file", err)
        kept = [name for name in os.listdir(self.folder) if name.startswith("config.json.bad-")]
        self.assertEqual(len(kept), 1)
        with open(os.path.join(self.folder, kept[0])) as bad:
            self.assertEqual(bad.read(), '{"port": 7001,')
        self.ok("config", "set", "port", "7005")
        self.assertEqual(self.ok("config", "get", "port").strip(), "7005")

    def test_files_are_private(self):
        nested = os.path.join(self.folder, "new", "place")
        store = claudeflare.Store(os.path.join(nested, "data", "claudeflare.db"))
        store.close()
        claudeflare.ConfigFile(os.path.join(nested, "config", "config.json")).read()
        logs = claudeflare.LogSetup("INFO", "pretty", os.path.join(nested, "logs"), False)
        logs.close()
        claudeflare.log.setLevel(logging.DEBUG)  # as the other tests expect
        for path in ("data/claudeflare.db", "data/claudeflare.db-wal", "config/config.json",
                     "logs/app.log"):
            full = os.path.join(nested, path)
            if os.path.exists(full):
                self.assertEqual(os.stat(full).st_mode & 0o777, 0o600, path)
        for folder in ("data", "config", "logs"):
            self.assertEqual(os.stat(os.path.join(nested, folder)).st_mode & 0o777, 0o700)


class TestSettingsThatCannotWork(CliTestCase):
    """Values and files that could never work are refused when loaded, in one line."""

    def test_non_finite_and_huge_numbers_are_refused(self):
        for key, value in (("request_timeout_s", "inf"), ("request_timeout_s", "nan"),
                           ("shutdown_timeout_s", "1e300"), ("request_timeout_s", "-1"),
                           ("request_retention_days", str(10 ** 30)),
                           ("session_duration_ms", str(10 ** 20)), ("retry_backoff", "inf"),
                           ("max_connections", "0")):
            self.fails(f"(for {key}, from the command line)", "config", "set", key, value)
            with open(self.config_path, "w") as out:
                json.dump({key: value}, out)
            with self.assertRaises(claudeflare.ClaudeflareError, msg=value):
                claudeflare.load_settings(self.config_path, {}, {})
            os.unlink(self.config_path)
        env = dict(os.environ, CLAUDEFLARE_REQUEST_TIMEOUT_S="inf")
        done = subprocess.run([sys.executable, os.path.join(HERE, "claudeflare.py"), "--config",
                               self.config_path, "--db", self.db_path, "serve", "--port", "0"],
                              env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 1)
        self.assertIn("must be a finite number", done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def serve(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        """Run serve on a database in a folder of its own; it must fail to start."""
        return subprocess.run(
            [sys.executable, os.path.join(HERE, "claudeflare.py"), "--config", self.config_path,
             "--db", os.path.join(self.folder, "new", "other.db"), "serve", *args],
            env=dict(os.environ, CLAUDEFLARE_LOG_DIR=os.path.join(self.folder, "logs"), **env),
            capture_output=True, text=True, timeout=60)

    def test_a_bad_environment_value_warns_commands_and_stops_serve(self):
        with unittest.mock.patch.dict(os.environ, {"LB_STRATEGY": "fastest"}):
            code, out, err = self.cli("config", "get", "lb_strategy")
        self.assertEqual((code, out), (0, "session\n"))
        self.assertEqual(err, "claudeflare: warning: Invalid strategy: fastest; valid: session, "
                              "round-robin, weighted, least-requests, headroom, reset-first "
                              "(for lb_strategy, from LB_STRATEGY); using the default, "
                              "session\n")
        done = self.serve("--port", "0", LB_STRATEGY="fastest")
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertTrue(done.stderr.startswith("claudeflare: error: Invalid strategy: fastest"),
                        done.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.folder, "new")))

    def test_a_serve_that_cannot_listen_says_why_and_leaves_no_database(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            done = self.serve("--port", str(taken.getsockname()[1]))
        self.assertEqual(done.returncode, 1)
        self.assertIn("Address already in use. Is another server running there?", done.stderr)
        done = self.serve("--host", "192.0.2.1", "--port", "0")  # TEST-NET-1: nobody's address
        self.assertEqual(done.returncode, 1)
        self.assertRegex(done.stderr, r"^claudeflare: error: Cannot listen on 192\.0\.2\.1:0: "
                                      r"192\.0\.2\.1 is not an address of this machine \(it "
                                      r"has 127\.0\.0\.1[^)]*\)\. Bind one of those, or "
                                      r"0\.0\.0\.0 for all of them, with --host or "
                                      r"CLAUDEFLARE_HOST\.\n$")
        self.assertFalse(os.path.exists(os.path.join(self.folder, "new")))

    def test_a_config_path_that_is_a_folder_gets_one_line(self):
        os.mkdir(self.config_path)
        self.fails(f"Cannot read config file {self.config_path}", "list")
        self.fails(f"Cannot read config file {self.config_path}", "config", "set", "port", "1")

    def test_a_config_saved_with_a_bom_is_read(self):
        with open(self.config_path, "w", encoding="utf-8-sig") as out:
            json.dump({"lb_strategy": "headroom"}, out)
        code, out, err = self.cli("config", "get", "lb_strategy")
        self.assertEqual((code, out.strip(), err), (0, "headroom", ""))
        self.assertEqual([name for name in os.listdir(self.folder) if ".bad-" in name], [])

    def test_config_set_repairs_a_config_whose_other_values_are_invalid(self):
        with open(self.config_path, "w") as out:
            json.dump({"retry_attempts": -5, "lb_strategy": "fastest"}, out)
        code, _, err = self.cli("config", "set", "retry_attempts", "2")
        self.assertEqual(code, 0, err)
        self.assertIn("Invalid strategy: fastest", err)  # still reported, as a warning
        self.ok("config", "set", "lb_strategy", "weighted")
        code, _, err = self.cli("config", "list")
        self.assertEqual((code, err), (0, ""))
        with open(self.config_path) as written:
            self.assertEqual(json.load(written), {"retry_attempts": 2, "lb_strategy": "weighted"})

    def test_another_programs_database_is_refused_untouched(self):
        foreign = sqlite3.connect(self.db_path)
        foreign.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        foreign.execute("INSERT INTO notes (text) VALUES ('mine')")
        foreign.commit()
        foreign.close()
        with open(self.db_path, "rb") as before:
            content = before.read()
        err = self.fails("another program's SQLite database (tables notes)", "list")
        self.assertIn("untouched", err)
        with open(self.db_path, "rb") as after:
            self.assertEqual(after.read(), content)
        self.assertFalse(os.path.exists(self.db_path + "-wal"))
        versioned = sqlite3.connect(self.db_path)  # one that keeps a schema version of its own
        versioned.execute("PRAGMA user_version = 3")
        versioned.commit()
        versioned.close()
        with open(self.db_path, "rb") as before:
            content = before.read()
        self.fails("another program's SQLite database (tables notes)", "list")
        with open(self.db_path, "rb") as after:
            self.assertEqual(after.read(), content)
        self.assertFalse(os.path.exists(self.db_path + "-wal"))

    def test_config_holds_only_what_the_user_set(self):
        self.ok("config", "get", "port")
        with open(self.config_path) as written:
            self.assertEqual(json.load(written), {})
        listing = self.ok("config", "list")
        self.assertRegex(listing, r"lb_strategy\s+session\s+default")
        legacy = {key: claudeflare.SETTINGS_BY_KEY[key].default
                  for key in claudeflare.FIRST_RUN_KEYS}
        legacy["port"] = 9090
        with open(self.config_path, "w") as out:
            json.dump(legacy, out)
        self.assertRegex(self.ok("config", "list"), r"port\s+9090\s+config")
        with open(self.config_path) as written:
            self.assertEqual(json.load(written), {"port": 9090})
        self.assertRegex(self.ok("config", "list"), r"retry_attempts\s+3\s+default")


class TestAccountCommands(CliTestCase):
    def test_add_api_key_account_reads_the_key_from_stdin(self):
        out = self.ok("add", "work", "--api-key", "--tier", "5", stdin="sk-ant-api03-secret\n")
        self.assertIn("Added", out)
        account = self.accounts()["work"]
        self.assertEqual((account["type"], account["tier"], account["status"]),
                         ("api_key", 5, "active"))
        self.assertNotIn("secret", self.ok("list") + self.ok("list", "--json"))
        store = claudeflare.Store(self.db_path)
        self.addCleanup(store.close)
        self.assertEqual(store.account("work").api_key, "sk-ant-api03-secret")

    def test_add_refuses_bad_input(self):
        self.fails("No valid API key read from stdin", "add", "work", "--api-key", stdin="")
        self.fails("No valid API key read from stdin", "add", "work", "--api-key",
                   stdin="sk-ant-api03-pasted\u2026\n")
        self.fails("Invalid account name", "add", "bad/name", "--api-key", stdin="k\n")
        self.fails("Invalid account name", "add", "x" * 101, "--api-key", stdin="k\n")
        for name in (".", "..", " work", "work ", "wo\trk", "wo\x1brk", "a/b", ""):
            self.fails("no space at the start or end, and not . or ..", "add", name,
                       "--api-key", stdin="k\n")
            err = self.fails("no space at the start or end", "add", name, "--no-browser")
            self.assertNotIn("http", err)  # refused before any login starts
            if name:
                self.fails("no space at the start or end", "keys", "add", name)
        self.assertEqual(json.loads(self.ok("list", "--json")), [])
        self.ok("add", "ok name-1_@.+", "--api-key", stdin="k\n")
        self.fails("Account already exists: ok name-1_@.+", "add", "ok name-1_@.+",
                   "--api-key", stdin="k\n")
        code, _, err = self.cli("add", "work", "--api-key", "--tier", "3", stdin="k\n")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice", err)

    def test_list_shows_the_table_users_read(self):
        self.ok("add", "alpha", "--api-key", stdin="k1\n")
        self.ok("add", "beta", "--api-key", "--tier", "20", stdin="k2\n")
        self.ok("pause", "beta")
        lines = self.ok("list").splitlines()
        for column in ("NAME", "TYPE", "TIER", "PRIORITY", "STATUS", "REQUESTS",
                       "TOKEN EXPIRES", "RATE LIMIT", "RESETS", "LAST USED"):
            self.assertIn(column, lines[0])
        self.assertRegex(lines[1], r"^alpha\s+api_key\s+1\s+0\s+active\s+0/0")
        self.assertRegex(lines[2], r"^beta\s+api_key\s+20\s+0\s+paused")

    def test_unknown_account_is_named(self):
        self.ok("add", "work", "--api-key", stdin="sk-ant-api03-x\n")
        for command in (("pause", "ghost"), ("resume", "ghost"), ("unpause", "ghost"),
                        ("tier", "ghost", "5"), ("remove", "ghost", "--force")):
            self.fails("Account not found: ghost", *command)

    def test_paths_may_follow_the_command(self):
        code, out, err = run_cli("add", "late", "--api-key", "--db", self.db_path, "--config",
                                 self.config_path, stdin="sk-ant-api03-x\n")
        self.assertEqual(code, 0, err)
        self.assertIn("late", self.accounts())

    def test_pause_resume_and_tier(self):
        self.ok("add", "work", "--api-key", stdin="k\n")
        self.ok("pause", "work")
        self.assertEqual(self.accounts()["work"]["status"], "paused")
        self.ok("unpause", "work")
        self.assertEqual(self.accounts()["work"]["status"], "active")
        self.ok("tier", "work", "20")
        self.assertEqual(self.accounts()["work"]["tier"], 20)

    def test_resume_clears_a_rate_limit_mark(self):
        self.ok("add", "work", "--api-key", stdin="k\n")
        store = claudeflare.Store(self.db_path)
        self.addCleanup(store.close)
        store.update_account("work", rate_limited_until=claudeflare.now_ms() + 3_600_000,
                             rate_limit_status="rejected")
        self.assertEqual(self.accounts()["work"]["status"], "rate_limited")
        self.assertIn("rate_limited until", self.ok("list"))
        self.ok("resume", "work")
        self.assertEqual(self.accounts()["work"]["status"], "active")

    def test_remove_asks_for_the_name_unless_forced(self):
        self.ok("add", "work", "--api-key", stdin="k\n")
        self.ok("add", "home", "--api-key", stdin="k\n")
        self.fails("Confirmation did not match", "remove", "work", stdin="wrok\n")
        self.fails("Confirmation did not match", "remove", "work", stdin="")
        self.assertIn("work", self.accounts())
        self.ok("remove", "work", stdin="work\n")
        self.ok("remove", "home", "--force")
        self.assertEqual(self.accounts(), {})

    def test_clear_history_and_reset_stats(self):
        self.ok("add", "work", "--api-key", stdin="k\n")
        store = claudeflare.Store(self.db_path)
        self.addCleanup(store.close)
        account = store.account("work")
        store.write_requests([claudeflare.RequestRecord(
            id=str(index), timestamp=claudeflare.now_ms(), method="POST", path="/v1/messages",
            account_name="work", account_id=account.id, status=200, success=True)
            for index in range(3)], 3_600_000)
        self.assertEqual(self.accounts()["work"]["requests"], 3)
        self.assertEqual(self.accounts()["work"]["sessionRequests"], 3)
        self.fails("Not confirmed: nothing was changed (--yes skips the question)",
                   "clear-history", stdin="n\n")
        self.fails("Not confirmed", "reset-stats", stdin="")
        self.assertEqual(self.accounts()["work"]["requests"], 3)
        self.assertTrue(self.ok("clear-history", stdin="y\n").endswith(
            "[y/N] Cleared 3 request records\n"))
        self.assertEqual(self.ok("clear-history", "--yes").strip(), "Cleared 0 request records")
        self.ok("reset-stats", "--yes")
        self.assertEqual(self.accounts()["work"]["requests"], 0)

    def test_output_to_a_reader_that_went_away_ends_quietly(self):
        self.ok("add", "work", "--api-key", stdin="sk-ant-api03-work\n")
        command = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "claudeflare.py"), "--config", self.config_path,
             "--db", self.db_path, "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        command.stdout.close()  # as `list | head -0` does
        error = command.stderr.read()
        command.stderr.close()
        self.assertEqual(command.wait(DEADLINE_S), 1)
        self.assertEqual(error, b"")

    def test_read_only_commands_never_create_a_database(self):
        typo = os.path.join(self.folder, "typo", "x.db")
        for command in (("list",), ("stats",), ("requests",), ("keys", "list"),
                        ("clear-history", "--yes"), ("reset-stats", "--yes"), ("pause", "w"),
                        ("remove", "w", "--force"), ("backup", os.path.join(self.folder, "b.db"))):
            with self.subTest(command=command):
                code, out, err = run_cli("--config", self.config_path, "--db", typo, *command)
                self.assertEqual((code, out), (1, ""))
                self.assertEqual(err, f"claudeflare: error: No database at {typo}: nothing is "
                                      f"stored there yet. Check --db or CLAUDEFLARE_DB_PATH, or "
                                      f"add an account: python3 claudeflare.py add NAME\n")
        self.assertEqual(sorted(os.listdir(self.folder)), ["config.json"])
        self.ok("add", "work", "--api-key", stdin="sk-ant-api03-x\n")
        nowhere = os.path.join(self.folder, "nonexistent", "dir")
        self.fails(f"The folder {nowhere} does not exist: create it first", "backup",
                   os.path.join(nowhere, "x.db"))
        self.assertFalse(os.path.exists(os.path.dirname(nowhere)))
        self.assertIn("Backed up", self.ok("backup", os.path.join(self.folder, "b.db")))

    def test_repeated_changes_say_what_they_did(self):
        self.ok("add", "work", "--api-key", stdin="sk-ant-api03-x\n")
        self.assertEqual(self.ok("pause", "work"), "Paused account work\n")
        self.assertEqual(self.ok("pause", "work"), "Account work is already paused\n")
        self.assertEqual(self.ok("config", "unset", "overage"),
                         f"overage is not set in {self.config_path}: nothing to remove\n")
        self.ok("config", "set", "overage", "never")
        self.assertIn("Removed overage", self.ok("config", "unset", "overage"))
        notes = [self.cli("config", "set", "lb_strategy", strategy)[2]
                 for strategy in ("round-robin", "round-robin", "weighted", "session",
                                  "weighted")]
        self.assertEqual([bool(note) for note in notes], [True, False, False, False, True])
        self.assertIn("note: round-robin moves a conversation", notes[0])

    def test_a_key_that_does_not_look_like_one_is_stored_with_a_warning(self):
        code, out, err = self.cli("add", "y", "--api-key", stdin="not-a-key\n")
        self.assertEqual((code, out), (0, "Added API-key account y (tier 1)\n"))
        self.assertEqual(err, "claudeflare: warning: this does not look like an Anthropic API "
                              "key (sk-ant-...); stored anyway\n")
        self.assertEqual(self.cli("add", "z", "--api-key", stdin="sk-ant-api03-z\n")[2], "")

    def test_reauth_api_key_replaces_the_key_keeping_the_account(self):
        self.ok("add", "ci", "--api-key", "--tier", "5", "--priority", "2",
                stdin="sk-ant-api03-old\n")
        store = claudeflare.Store(self.db_path)
        self.addCleanup(store.close)
        store.update_account("ci", request_count=7, needs_reauth=1, reauth_reason="bad key")
        self.fails("ci is an API-key account: give it a new key with reauth ci --api-key (read "
                   "from stdin), or mint one with --mode console", "reauth", "ci")
        self.fails("No valid API key read from stdin", "reauth", "ci", "--api-key", stdin="")
        self.assertEqual(self.ok("reauth", "ci", "--api-key", stdin="sk-ant-api03-new\n"),
                         "Replaced the API key of account ci\n")
        account = store.account("ci")
        self.assertEqual((account.api_key, account.account_tier, account.priority,
                          account.request_count, account.needs_reauth),
                         ("sk-ant-api03-new", 5, 2, 7, 0))
        store.add_account("max", "oauth", 1, access_token="sk-ant-oat01-x")
        self.fails("max is an oauth account: --api-key would change its kind", "reauth", "max",
                   "--api-key", stdin="sk-ant-api03-y\n")
        self.assertEqual(store.account("max").access_token, "sk-ant-oat01-x")

    def test_every_command_has_help_with_an_example(self):
        for command in ("serve", "add", "list", "remove", "pause", "resume", "unpause", "tier",
                        "reauth", "keys", "config", "clear-history", "reset-stats", "stats",
                        "requests", "health", "backup", "doctor", "service"):
            code, out, _ = self.cli(command, "--help")
            self.assertEqual(code, 0, command)
            self.assertIn("example:", out, command)
            self.assertIn("python3 claudeflare.py", out, command)


#: Makes the terminal on its stdin the controlling terminal of a session of its own (getpass
#: and Ctrl+C need one), then runs the command line given after it.
ON_A_TERMINAL = ("import os, sys\n"
                 "os.close(os.open(os.ttyname(0), os.O_RDWR))\n"
                 "os.execv(sys.executable, sys.argv[1:])\n")


@unittest.skipUnless(os.path.exists("/proc/self/stat"), "needs /proc to see a program wait")
class TestPrompts(CliTestCase):
    """Ctrl+D and Ctrl+C typed at each prompt, on a real terminal (a pty)."""

    def type_at_prompt(self, prompt: str, key: bytes, *args: str) -> tuple[int, str]:
        """Run the CLI on a terminal; once it shows prompt, type key; return status, screen."""
        master, slave = pty.openpty()
        environ = {name: value for name, value in os.environ.items()
                   if name not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
        process = subprocess.Popen(
            [sys.executable, "-c", ON_A_TERMINAL, sys.executable,
             os.path.join(HERE, "claudeflare.py"), "--config", self.config_path, "--db",
             self.db_path, *args],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=environ)
        os.close(slave)
        screen, typed = b"", False
        try:
            while select.select([master], [], [], DEADLINE_S * 3)[0]:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the program is gone and its terminal with it
                    break
                if not data:
                    break
                screen += data
                if not typed and prompt.encode() in screen:
                    # A signal that came before the read began would not interrupt it: type
                    # once the program sleeps, waiting for the key.
                    wait_for(lambda: self.sleeping(process.pid), what="the program to wait")
                    os.write(master, key)
                    typed = True
            code = process.wait(timeout=DEADLINE_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            os.close(master)
        self.assertTrue(typed, screen)
        return code, screen.decode().replace("\r\n", "\n")

    @staticmethod
    def sleeping(pid: int) -> bool:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "S"

    def test_ctrl_d_and_ctrl_c_at_every_prompt_change_nothing(self):
        cancelled = "\nclaudeflare: error: Cancelled (end of input): nothing was changed\n"
        interrupted = "\nclaudeflare: interrupted; nothing was changed\n"
        for prompt, args in (("Paste the API key: ", ("add", "ci", "--api-key")),
                             ("Paste the authorization code: ", ("add", "max", "--no-browser")),
                             ("to remove it: ", ("remove", "work")),
                             ("[y/N] ", ("clear-history",)), ("[y/N] ", ("reset-stats",))):
            if args[0] == "remove":  # the adds created nothing; these need an account
                self.assertFalse(os.path.exists(self.db_path))
                self.ok("add", "work", "--api-key", stdin="sk-ant-api03-x\n")
            for key, expected in ((b"\x04", (1, cancelled)), (b"\x03", (130, interrupted))):
                with self.subTest(args=args, key=key):
                    code, screen = self.type_at_prompt(prompt, key, *args)
                    shown = screen[screen.rindex(prompt) + len(prompt):]
                    self.assertEqual((code, shown[2:] if shown.startswith("^C") else shown),
                                     expected)  # the terminal may echo ^C
        self.assertEqual(list(self.accounts()), ["work"])


class TestSchema(CliTestCase):
    def test_database_from_an_older_version_is_upgraded(self):
        old = sqlite3.connect(self.db_path)
        for statement in claudeflare.MIGRATIONS[0]:
            old.execute(statement)
        old.execute("INSERT INTO accounts (name, type, account_tier, api_key, created_at, "
                    "request_count) VALUES ('legacy', 'api_key', 5, 'sk-old', 1, 42)")
        old.execute("PRAGMA user_version = 1")
        old.commit()
        old.close()
        account = self.accounts()["legacy"]
        self.assertEqual((account["tier"], account["requests"], account["needsReauth"]),
                         (5, 42, False))
        check = sqlite3.connect(self.db_path)
        self.addCleanup(check.close)
        self.assertEqual(check.execute("PRAGMA user_version").fetchone()[0],
                         claudeflare.SCHEMA_VERSION)
        self.assertEqual(check.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_a_commit_by_another_process_changes_the_data_version(self):
        # Read from the mapped WAL index header where there is one (POSIX), else with PRAGMA
        # data_version, as where there is none: either way another process's commit shows.
        store = claudeflare.Store(self.db_path)
        self.addCleanup(store.close)
        self.assertEqual(store.wal_header is not None, os.name == "posix")
        for name in ("first", "second"):
            if name == "second" and store.wal_header is not None:
                store.wal_header.close()
                store.wal_header = None  # the fallback
            before = store.data_version()
            self.assertEqual(store.data_version(), before)  # nothing changed: the same value
            self.ok("add", name, "--api-key", stdin="sk-ant-api03-" + name + "\n")
            self.assertNotEqual(store.data_version(), before, name)

    def test_database_from_a_newer_version_is_refused_untouched(self):
        newer = sqlite3.connect(self.db_path)
        newer.execute("PRAGMA user_version = 99")
        newer.commit()
        newer.close()
        err = self.fails("schema version 99, newer than this claudeflare", "list")
        self.assertIn("--db", err)
        check = sqlite3.connect(self.db_path)
        self.addCleanup(check.close)
        self.assertEqual(check.execute("PRAGMA user_version").fetchone()[0], 99)

    def test_a_file_that_is_not_a_database_is_refused(self):
        with open(self.db_path, "w") as out:
            out.write("not a database at all" * 100)
        self.fails("Is it a claudeflare database?", "list")


class ServerWithAccounts(ProxyTestCase):
    """A real server plus the CLI on the same database."""

    def cli(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        return run_cli("--config", self.proxy.config_path, "--db", self.proxy.db_path, *args,
                       stdin=stdin)

    def ok(self, *args: str, stdin: str = "") -> str:
        code, out, err = self.cli(*args, stdin=stdin)
        self.assertEqual(code, 0, err)
        return out

    def add_key(self, name: str, tier: int = 1) -> None:
        self.ok("add", name, "--api-key", "--tier", str(tier), stdin=f"sk-ant-api03-{name}\n")

    def add_oauth(self, name: str, expires_in_ms: int = 3_600_000, tier: int = 1,
                  refresh_token: str | None = "issue") -> tuple[str, str]:
        """Add an OAuth account holding a live token pair of the fake; return the pair."""
        access, refresh = self.upstream.oauth.issue()
        if refresh_token != "issue":
            refresh = refresh_token
        self.proxy.app.store.add_account(name, "oauth", tier, access_token=access,
                                         refresh_token=refresh,
                                         expires_at=claudeflare.now_ms() + expires_in_ms)
        return access, refresh

    def stored(self, name: str):
        self.proxy.settle()  # routing marks are written behind the request, like its record
        store = claudeflare.Store(self.proxy.db_path)
        try:
            return store.account(name)
        finally:
            store.close()

    def served_by(self, count: int = 1) -> list[str]:
        """Send requests; return which account's key the upstream saw for each."""
        first = len(self.upstream.requests)
        for _ in range(count):
            status, _, body = self.post_message()
            self.assertEqual(status, 200, body)
        return [(request.headers["x-api-key"] or "").replace("sk-ant-api03-", "")
                for request in self.upstream.requests[first:]]

    def listed(self) -> dict:
        self.proxy.settle()  # routing marks are written behind the request, like its record
        return {account["name"]: account for account in json.loads(self.ok("list", "--json"))}


class TestUsingAccounts(ServerWithAccounts):
    settings = {"lb_strategy": "round-robin"}
    def test_api_key_account_replaces_the_client_credentials(self):
        self.add_key("work")
        status, _, _ = self.post_message(headers={"x-api-key": "client-own",
                                                  "Authorization": "Bearer client-own"})
        self.assertEqual(status, 200)
        seen = self.upstream.requests[0].headers
        self.assertEqual(seen["x-api-key"], "sk-ant-api03-work")
        self.assertIsNone(seen["Authorization"])

    def test_oauth_account_sends_bearer_with_the_oauth_beta_added(self):
        access, _ = self.add_oauth("max")
        status, _, _ = self.post_message(headers={"x-api-key": "client-own",
                                                  "anthropic-beta": "tools-2024,cache-x"})
        self.assertEqual(status, 200)
        seen = self.upstream.requests[0].headers
        self.assertEqual(seen["Authorization"], f"Bearer {access}")
        self.assertIsNone(seen["x-api-key"])
        self.assertEqual(seen["anthropic-beta"], "tools-2024,cache-x,oauth-2025-04-20")

    def test_oauth_beta_is_added_once_and_only_for_oauth_accounts(self):
        self.add_oauth("max")
        self.add_key("keyed")
        for _ in range(2):  # round-robin: one request on each account
            self.assertEqual(self.post_message(headers={
                "anthropic-beta": "oauth-2025-04-20,tools-2024"})[0], 200)
        betas = {("oauth" if request.headers["Authorization"] else "api_key"):
                 request.headers["anthropic-beta"] for request in self.upstream.messages()}
        self.assertEqual(betas, {"oauth": "oauth-2025-04-20,tools-2024",
                                 "api_key": "oauth-2025-04-20,tools-2024"})
        self.assertEqual(self.post_message(headers={"anthropic-beta": "tools-2024"})[0], 200)
        self.assertEqual(self.post_message(headers={"anthropic-beta": "tools-2024"})[0], 200)
        self.assertEqual(sorted(request.headers["anthropic-beta"]
                                for request in self.upstream.messages()[2:]),
                         ["tools-2024", "tools-2024,oauth-2025-04-20"])

    def test_requests_rotate_over_accounts_and_are_counted(self):
        self.add_key("a")
        self.add_key("b")
        self.assertEqual(sorted(self.served_by(4)), ["a", "a", "b", "b"])
        self.proxy.settle()
        listed = self.listed()
        self.assertEqual((listed["a"]["requests"], listed["b"]["requests"]), (2, 2))
        self.assertIsNotNone(listed["a"]["lastUsed"])

    def test_cli_pause_takes_effect_on_the_next_request(self):
        self.add_key("a")
        self.add_key("b")
        self.assertEqual(set(self.served_by(2)), {"a", "b"})
        self.ok("pause", "a")
        self.assertEqual(set(self.served_by(4)), {"b"})
        self.ok("tier", "b", "5")
        self.ok("resume", "a")
        self.assertEqual(set(self.served_by(2)), {"a", "b"})
        self.ok("remove", "b", "--force")
        self.assertEqual(set(self.served_by(2)), {"a"})

    def test_config_set_reaches_the_running_server(self):
        self.assertEqual(json.loads(self.proxy.request("GET", "/health")[2])["strategy"],
                         "round-robin")
        self.ok("config", "set", "lb_strategy", "weighted")
        self.assertEqual(json.loads(self.proxy.request("GET", "/health")[2])["strategy"],
                         "weighted")
        with open(self.proxy.config_path, "w") as out:
            out.write("{broken")
        self.assertEqual(json.loads(self.proxy.request("GET", "/health")[2])["strategy"],
                         "weighted")
        self.assertIn("Failed to parse config file", CAPTURED_LOG.text())

    def test_config_set_request_timeout_reaches_the_running_server(self):
        self.ok("config", "set", "retry_attempts", "0")
        self.ok("config", "set", "request_timeout_s", "0.3")
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.upstream.push(hang(gate))
        started = time.monotonic()
        status, _, body = self.post_message()
        self.assertLess(time.monotonic() - started, 5)
        assert_all_accounts_failed(self, status, body, 1, "sent nothing for 0.3s")

    def test_without_usable_accounts_the_client_credentials_pass(self):
        self.add_key("a")
        self.ok("pause", "a")
        status, _, _ = self.post_message(headers={"x-api-key": "client-own"})
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.requests[0].headers["x-api-key"], "client-own")
        self.assertIn("No active accounts available", CAPTURED_LOG.text())

    def test_health_reports_account_counts(self):
        self.add_key("a")
        self.add_key("b")
        self.add_key("c")
        self.ok("pause", "c")
        status, _, body = self.proxy.request("GET", "/health")
        health = json.loads(body)
        self.assertEqual((status, health["status"]), (200, "ok"))
        self.assertEqual(health["accounts"]["total"], 3)
        self.assertEqual((health["accounts"]["active"], health["accounts"]["paused"]), (2, 1))
        self.proxy.app.store.update_account("b", rate_limited_until=claudeflare.now_ms() + 60_000)
        health = json.loads(self.proxy.request("GET", "/health")[2])
        self.assertEqual((health["status"], health["accounts"]["rate_limited"]), ("degraded", 1))
        self.ok("pause", "a")
        status, _, body = self.proxy.request("GET", "/health")
        self.assertEqual((status, json.loads(body)["status"]), (503, "unavailable"))

    def test_a_key_removed_from_the_config_falls_back_in_the_running_server(self):
        def in_force() -> tuple[str, str]:
            config = json.loads(self.proxy.request("GET", "/api/config")[2])
            return config["settings"]["overage"], config["sources"]["overage"]

        self.ok("config", "set", "overage", "never")
        self.assertEqual(in_force(), ("never", "config"))
        out = self.ok("config", "unset", "overage")
        self.assertIn("the default, last, applies", out)
        self.assertEqual(in_force(), ("last", "default"))
        with open(self.proxy.config_path) as written:
            self.assertNotIn("overage", json.load(written))

    def test_list_shows_last_used_as_a_relative_time(self):
        self.add_key("work")
        self.assertEqual(self.post_message()[0], 200)
        self.proxy.settle()
        line = next(line for line in self.ok("list").splitlines() if line.startswith("work"))
        self.assertRegex(line, r"\s\d+s ago(\s|$)")
        self.assertNotIn("(past)", line)

    def test_text_from_outside_reaches_the_terminal_with_its_controls_escaped(self):
        escapes = "\x1b]0;pwned\x07\x1b[2J\r\nfake"
        self.add_key("work")
        self.proxy.app.store.change_account("work", organization="Acme" + escapes)
        self.proxy.request("POST", "/v1/messages", {"model": "claude" + escapes},
                           {"content-type": "application/json"})
        self.upstream.push(reply_error(500, "api_error", "Overloaded" + escapes))
        self.proxy.request("POST", "/v1/messages", {"model": "claude" + escapes},
                           {"content-type": "application/json"})
        self.proxy.settle()
        for command in ("list", "requests", "stats"):
            out = self.ok(command)
            self.assertNotIn("\x1b", out, command)
            self.assertNotIn("\x07", out, command)
            self.assertIn("\\x1b]0;pwned\\x07\\x1b[2J\\r\\nfake", out, command)

    def test_setting_a_rotating_strategy_warns_about_conversations(self):
        for strategy in ("round-robin", "weighted", "least-requests"):
            self.ok("config", "set", "lb_strategy", "session")
            code, _, err = self.cli("config", "set", "lb_strategy", strategy)
            self.assertEqual(code, 0)
            self.assertIn("loses prompt-cache hits", err)
            self.assertEqual(len(err.strip().splitlines()), 1)
        for strategy in ("session", "headroom"):
            self.assertEqual(self.cli("config", "set", "lb_strategy", strategy)[2], "")

    def test_cli_and_server_share_the_database_under_load(self):
        self.add_key("a")
        self.add_key("b")
        stop = threading.Event()
        failures = []

        def load() -> None:
            connection = self.proxy.connect()
            try:
                while not stop.is_set():
                    connection.request("POST", "/v1/messages", body=b'{"model":"m"}')
                    response = connection.getresponse()
                    response.read()
                    if response.status != 200:
                        failures.append(response.status)
            finally:
                connection.close()

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            for round_number in range(15):
                for command in (("pause", "a"), ("resume", "a"), ("tier", "b", "5"), ("list",),
                                ("add", f"extra{round_number}", "--api-key"),
                                ("remove", f"extra{round_number}", "--force")):
                    code, _, err = self.cli(*command, stdin="sk-ant-api03-x\n")
                    self.assertEqual(code, 0, err)
                    self.assertNotIn("locked", err)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        self.assertEqual(failures, [])
        self.proxy.settle()
        self.assertGreater(self.listed()["b"]["requests"], 0)

    def test_backup_while_requests_are_logged_is_consistent(self):
        self.add_key("a")
        self.add_key("b")
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                self.post_message()

        worker = threading.Thread(target=load)
        worker.start()
        target = os.path.join(self.proxy.dir.name, "backup.db")
        try:
            wait_for(lambda: len(self.upstream.requests) > 20, what="some traffic")
            self.proxy.app.writer.flush()
            logged_before = self.proxy.app.store.query("SELECT COUNT(*) FROM requests")[0][0]
            self.ok("backup", target)
        finally:
            stop.set()
            worker.join()
        self.assertEqual(os.stat(target).st_mode & 0o777, 0o600)
        copy = sqlite3.connect(target)
        self.addCleanup(copy.close)
        self.assertEqual(copy.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        self.assertEqual([row[0] for row in copy.execute("SELECT name FROM accounts ORDER BY id")],
                         ["a", "b"])
        self.assertGreaterEqual(copy.execute("SELECT COUNT(*) FROM requests").fetchone()[0],
                                logged_before)
        self.assertGreater(logged_before, 0)
        code, _, err = self.cli("backup", target)
        self.assertIn("Backup target exists", err)


class DatabaseHolder:
    """Another process that opens the database and holds its write lock, as an sqlite3 shell
    in a transaction (or a backup tool) would."""

    def __init__(self, path: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sqlite3, sys\n"
             "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
             "db.execute('BEGIN IMMEDIATE')\nprint('held', flush=True)\nsys.stdin.read()\n"
             "db.execute('ROLLBACK')\n", path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(DEADLINE_S)
            self.process.stdout.close()


class TestLockedDatabase(ServerWithAccounts):
    """Another process holding the database never holds up a request, nor loses a write."""

    def hold(self) -> DatabaseHolder:
        holder = DatabaseHolder(self.proxy.db_path)
        self.addCleanup(holder.release)
        return holder

    def timed_post(self) -> tuple[int, float]:
        started = time.monotonic()
        status = self.post_message()[0]
        return status, time.monotonic() - started

    def test_refresh_and_rate_limit_marks_do_not_wait_for_a_locked_database(self):
        access, refresh = self.add_oauth("max", expires_in_ms=-1000)
        self.add_key("limited")
        self.add_key("spare")
        self.ok("config", "set", "lb_strategy", "round-robin")
        self.upstream.push_for("sk-ant-api03-limited", reply_error(
            429, "rate_limit_error", "limited", unified_headers("rejected", 3600)))
        holder = self.hold()
        for _ in range(3):  # round-robin: one request starts at each account
            status, elapsed = self.timed_post()
            self.assertEqual(status, 200)
            self.assertLess(elapsed, 2.0)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        seen = [request.headers["Authorization"] for request in self.upstream.messages()]
        fresh = next(token for token in seen if token and token != f"Bearer {access}")
        for _ in range(3):  # the refreshed token and the bench hold while nothing is written
            self.assertEqual(self.post_message()[0], 200)
        self.assertEqual([r.headers["x-api-key"] for r in self.upstream.messages()
                          ].count("sk-ant-api03-limited"), 1)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        self.assertIn("keeping it in memory", CAPTURED_LOG.text())
        holder.release()
        wait_for(lambda: f"Bearer {self.stored('max').access_token}" == fresh,
                 what="the refreshed pair to be saved")
        self.assertEqual(self.listed()["limited"]["status"], "rate_limited")
        self.assertEqual(self.proxy.app.store.query("SELECT COUNT(*) FROM requests")[0][0], 6)

    def test_a_refreshed_pair_the_database_refused_survives_a_restart(self):
        self.add_oauth("max", expires_in_ms=-1000)
        holder = self.hold()
        self.assertEqual(self.post_message()[0], 200)
        live = set(self.upstream.oauth.refresh_tokens)
        self.proxy.stop()  # still locked: the pair is kept in a private file
        kept = self.proxy.db_path + ".unsaved-tokens"
        self.assertEqual(os.stat(kept).st_mode & 0o777, 0o600)
        self.assertIn("kept them in", CAPTURED_LOG.text())
        holder.release()
        again = claudeflare.make_server(self.proxy.app.settings, self.proxy.db_path)
        try:
            store = claudeflare.Store(self.proxy.db_path)
            self.addCleanup(store.close)
            self.assertIn(store.account("max").refresh_token, live)
            self.assertFalse(os.path.exists(kept))
        finally:
            again.server_close()
            again.app.close()

    def test_reading_commands_work_and_writing_commands_say_who_holds_the_lock(self):
        self.add_key("work")
        self.assertEqual(self.post_message()[0], 200)
        self.proxy.settle()
        holder = self.hold()
        self.assertIn("work", self.ok("list"))
        self.assertIn("1 requests", self.ok("stats"))
        started = time.monotonic()
        code, _, err = self.cli("pause", "work")
        self.assertLess(time.monotonic() - started, 6)
        self.assertEqual(code, 1)
        self.assertIn("is locked by another process", err)
        self.assertIn(f"pid {holder.process.pid}", err)
        self.assertIn("try again", err)
        self.assertNotIn("Is it a claudeflare database", err)
        status, _, body = self.proxy.request("POST", "/api/accounts/work/pause", b"{}",
                                             {"Content-Type": "application/json"})
        self.assertEqual(status, 503)
        self.assertIn("locked by another process", json.loads(body)["error"])
        holder.release()
        self.ok("pause", "work")

    def test_records_that_meet_a_full_disk_are_kept_and_written_when_space_returns(self):
        self.add_key("work")
        store = self.proxy.app.store
        with store.lock:
            pages = store.db.execute("PRAGMA page_count").fetchone()[0]
            store.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from now on
        sent = 0
        while self.proxy.app.writer.failing_since is None:
            self.assertEqual(self.post_message()[0], 200)
            sent += 1
            self.proxy.settle()
            self.assertLess(sent, 500)
        written = store.query("SELECT COUNT(*) FROM requests")[0][0]
        self.assertLess(written, sent)
        self.assertIn("keeping them in memory", CAPTURED_LOG.text())
        with store.lock:
            store.db.execute("PRAGMA max_page_count = 1073741823")  # space again
        wait_for(lambda: store.query("SELECT COUNT(*) FROM requests")[0][0] == sent,
                 what="the kept records to be written")
        self.assertEqual(self.stored("work").request_count, sent)


###############################################################################
# OAuth #######################################################################
###############################################################################

def query_of(url: str) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


class TestOAuthLogin(ServerWithAccounts):
    """The login goes through the real CLI process; the test plays the user and the browser."""

    PROMPT = "Paste the authorization code: "

    def start_login(self, *args: str, **env: str) -> tuple[subprocess.Popen, dict, str]:
        """Start a login command; return it once it shows both URLs and the prompt."""
        environ = {name: value for name, value in os.environ.items()
                   if name not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
        environ.update(CLAUDEFLARE_UPSTREAM_URL=self.upstream.url,
                       CLAUDEFLARE_TOKEN_URL=self.upstream.url + "/v1/oauth/token",
                       PYTHONDEVMODE="1", **env)
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "claudeflare.py"), "--config",
             self.proxy.config_path, "--db", self.proxy.db_path, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=environ)
        urls, shown = {}, ""
        while len(urls) < 2:
            line = process.stdout.readline()
            shown += line
            if not line:
                break
            if line.startswith("https://"):
                redirect = query_of(line.strip())["redirect_uri"]
                urls["browser" if redirect.startswith("http://localhost:") else "paste"] = \
                    line.strip()
        if len(urls) == 2:
            shown += process.stdout.read(len(self.PROMPT))
        return process, urls, shown

    def login(self, *args: str, paste=None, browser=None,
              **env: str) -> tuple[int, dict, str, str]:
        """Run a login command; return its exit status, the URLs it printed, stdout, stderr.

        `paste(url)` gets the URL for another machine and returns what the user pastes
        (default: the code its page shows); `browser(url)` gets the loopback URL and plays the
        browser instead, and nothing is pasted.
        """
        process, urls, shown = self.start_login(*args, **env)
        with process:
            try:
                answer = ""
                if len(urls) == 2 and browser is not None:
                    browser(urls["browser"])
                elif len(urls) == 2:
                    answer = (paste or self.upstream.oauth.authorize)(urls["paste"]) + "\n"
                out, err = process.communicate(answer, timeout=DEADLINE_S * 3)
            except BaseException:
                process.kill()
                raise
        self.assertNotIn("Warning", err)
        return process.returncode, urls, shown + out, err

    def callback(self, url: str, query: str) -> tuple[int, str]:
        """GET the login's loopback callback with a query, as a browser coming back would."""
        port = urllib.parse.urlsplit(query_of(url)["redirect_uri"]).port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
        try:
            connection.request("GET", "/callback" + query)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def come_back(self, url: str) -> tuple[int, str]:
        """Log in at the (fake) login page, then come back to the loopback callback."""
        code, state = self.upstream.oauth.authorize(url).split("#")
        return self.callback(url, f"?code={code}&state={state}")

    def exchanges(self) -> list[dict]:
        return [request.json() for request in self.upstream.requests
                if request.path == "/v1/oauth/token"
                and request.json()["grant_type"] == "authorization_code"]

    def test_login_through_the_browser_finishes_by_itself(self):
        pages = []
        code, urls, out, err = self.login("add", "work", "--tier", "20", "--no-browser",
                                          browser=lambda url: pages.append(self.come_back(url)))
        self.assertEqual(code, 0, err)
        self.assertEqual(pages[0][0], 200)
        self.assertIn("You can close this tab", pages[0][1])
        self.assertIn("Added work (dev@example.com, Acme)", out)
        self.assertIn("No browser was started here", out)
        browser, paste = query_of(urls["browser"]), query_of(urls["paste"])
        parts = urllib.parse.urlsplit(urls["browser"])
        self.assertEqual(parts.netloc + parts.path, "claude.com/cai/oauth/authorize")
        self.assertEqual(browser["scope"], "user:profile user:inference "
                                           "user:sessions:claude_code user:mcp_servers "
                                           "user:file_upload")
        self.assertRegex(browser["redirect_uri"], r"^http://localhost:\d+/callback$")
        self.assertEqual(paste["redirect_uri"], "https://platform.claude.com/oauth/code/callback")
        self.assertEqual(browser["code_challenge"], paste["code_challenge"])  # one PKCE pair
        self.assertNotEqual(browser["state"], browser["code_challenge"])
        self.assertEqual([exchange["redirect_uri"] for exchange in self.exchanges()],
                         [browser["redirect_uri"]])
        account = self.stored("work")
        self.assertEqual((account.type, account.account_tier), ("oauth", 20))
        self.assertIn(account.access_token, self.upstream.oauth.access_tokens)
        self.assertNotIn(account.access_token, out + err)
        self.assertEqual(self.post_message()[0], 200)

    def test_the_page_says_the_login_failed_when_the_token_endpoint_refuses_the_code(self):
        self.upstream.oauth.failures.append((400, {"error": "invalid_grant",
                                                   "error_description": "Invalid code"}))
        pages = []
        code, _, out, err = self.login("add", "work", "--no-browser",
                                       browser=lambda url: pages.append(self.come_back(url)))
        self.assertEqual(code, 1)
        self.assertIn("Exchange failed", err)
        self.assertEqual(pages[0][0], 400)
        self.assertIn("The login failed: Exchange failed", pages[0][1])
        self.assertIn("Invalid code", pages[0][1])
        self.assertNotIn("Logged in", pages[0][1])
        self.assertEqual(json.loads(self.ok("list", "--json")), [])

    def test_a_wrong_state_gets_a_400_page_and_the_login_keeps_waiting(self):
        answers = []

        def browser(url: str) -> None:
            answers.append(self.callback(url, "?code=stolen&state=forged"))
            answers.append(self.callback(url, "?code=stolen"))
            answers.append(self.callback(url.replace("/callback", "/other"), ""))
            port = urllib.parse.urlsplit(query_of(url)["redirect_uri"]).port
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
            connection.request("GET", "/favicon.ico")
            answers.append((connection.getresponse().status, ""))
            connection.close()
            answers.append(self.come_back(url))

        code, _, out, err = self.login("add", "work", "--no-browser", browser=browser)
        self.assertEqual(code, 0, err)
        self.assertEqual([status for status, _ in answers], [400, 400, 400, 404, 200])
        self.assertIn("does not belong to the login", answers[0][1])
        self.assertEqual(len(self.exchanges()), 1)
        self.assertIn("Added work", out)

    def test_paste_path_still_works_with_both_urls_printed(self):
        code, urls, out, err = self.login("add", "work")
        self.assertEqual(code, 0, err)
        self.assertIn(self.PROMPT, out)
        self.assertIn("Added work (dev@example.com, Acme)", out)
        self.assertEqual([exchange["redirect_uri"] for exchange in self.exchanges()],
                         ["https://platform.claude.com/oauth/code/callback"])
        self.assertEqual(self.exchanges()[0]["state"], query_of(urls["paste"])["state"])
        self.assertEqual(self.ok("list").count("dev@example.com / Acme"), 1)

    def test_the_login_times_out_with_a_clear_message(self):
        started = time.monotonic()
        code, urls, _, err = self.login("add", "work", "--no-browser", browser=lambda url: None,
                                        CLAUDEFLARE_LOGIN_TIMEOUT_S="1")
        self.assertEqual(code, 1)
        self.assertIn("The login timed out after 1s", err)
        self.assertLess(time.monotonic() - started, DEADLINE_S)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(json.loads(self.ok("list", "--json")), [])
        with self.assertRaises(OSError):  # the listener is gone
            self.callback(urls["browser"], "")

    def test_ctrl_c_stops_the_login_cleanly(self):
        process, urls, _ = self.start_login("add", "work", "--no-browser")
        with process:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=DEADLINE_S)
        self.assertEqual(process.returncode, 130)
        self.assertIn("interrupted; nothing was changed", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(json.loads(self.ok("list", "--json")), [])
        with self.assertRaises(OSError):
            self.callback(urls["browser"], "")

    def test_console_login_mints_an_api_key(self):
        code, urls, out, err = self.login("add", "console", "--mode", "console")
        self.assertEqual(code, 0, err)
        self.assertTrue(urls["paste"].startswith("https://platform.claude.com/oauth/authorize?"))
        self.assertEqual(query_of(urls["paste"])["scope"].split(),
                         ["org:create_api_key", "user:profile", "user:inference",
                          "user:sessions:claude_code", "user:mcp_servers", "user:file_upload"])
        account = self.stored("console")
        self.assertEqual((account.type, account.api_key), ("api_key", "sk-ant-api03-minted"))
        self.assertIn("with a new API key", out)
        self.assertNotIn("minted", out + err)

    def test_login_failures_say_what_to_do(self):
        code, _, _, err = self.login("add", "a", paste=lambda url: "codeonly")
        self.assertEqual(code, 1)
        self.assertIn("truncated", err)
        self.assertIn("code#state", err)
        code, _, _, err = self.login(
            "add", "a", paste=lambda url: self.upstream.oauth.authorize(url).split("#")[0]
            + "#otherstate")
        self.assertEqual(code, 1)
        self.assertIn("State mismatch", err)
        self.upstream.oauth.failures.append(
            (400, {"error": "invalid_grant", "error_description": "Invalid code_verifier"}))
        code, _, _, err = self.login("add", "a")
        self.assertEqual(code, 1)
        self.assertIn("Exchange failed: Bad Request: Invalid code_verifier", err)
        code, _, _, err = self.login("add", "a",
                                     paste=lambda url: "expired#" + query_of(url)["state"])
        self.assertEqual(code, 1)
        self.assertIn("Exchange failed: Bad Request", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(json.loads(self.ok("list", "--json")), [])

    def test_a_wrong_paste_is_explained_and_asked_for_again(self):
        process, urls, _ = self.start_login("add", "work", "--no-browser")
        with process:
            try:
                code, state = self.upstream.oauth.authorize(urls["paste"]).split("#")
                for wrong, said in ((code, "The authorization code looks truncated: paste the "
                                           "whole value the page shows, in the form code#state, "
                                           "without changing it.\n"),
                                    (code + "#otherstate",
                                     "State mismatch: the pasted code belongs to another login "
                                     "attempt: paste the code shown for this one.\n")):
                    process.stdin.write(wrong + "\n")
                    process.stdin.flush()
                    self.assertEqual(process.stdout.readline(), said)
                    self.assertEqual(process.stdout.read(len(self.PROMPT)), self.PROMPT)
                out, err = process.communicate(f"{code}#{state}\n", timeout=DEADLINE_S * 3)
            except BaseException:
                process.kill()
                raise
        self.assertEqual(process.returncode, 0, err)
        self.assertIn("Added work (dev@example.com, Acme)", out)

    def test_reauth_restores_an_account_keeping_its_history(self):
        self.add_oauth("work", tier=5, refresh_token="sk-ant-ort01-dead")
        self.proxy.app.store.update_account("work", needs_reauth=1, reauth_reason="refused",
                                            request_count=7)
        self.assertEqual(self.listed()["work"]["status"], "needs_reauth")
        code, _, out, err = self.login("reauth", "work", "--no-browser",
                                       browser=self.come_back)
        self.assertEqual(code, 0, err)
        self.assertIn("Logged in account work again (dev@example.com, Acme)", out)
        account = self.stored("work")
        self.assertEqual((account.needs_reauth, account.account_tier, account.request_count),
                         (0, 5, 7))
        self.assertIn(account.refresh_token, self.upstream.oauth.refresh_tokens)
        self.assertEqual(self.listed()["work"]["status"], "active")
        code, _, _, err = self.login("reauth", "ghost")
        self.assertIn("Account not found: ghost", err)


class TestTokenRefresh(ServerWithAccounts):
    def test_fifty_requests_on_an_expired_token_make_one_refresh(self):
        self.add_oauth("work", expires_in_ms=-1000)
        self.upstream.oauth.delay = 0.3
        statuses = []

        def send() -> None:
            statuses.append(self.post_message()[0])

        threads = [threading.Thread(target=send) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(statuses, [200] * 50)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        fresh = self.stored("work")
        self.assertEqual({request.headers["Authorization"]
                          for request in self.upstream.messages()},
                         {f"Bearer {fresh.access_token}"})

    def test_rotated_refresh_token_is_stored_before_the_new_access_token_is_used(self):
        self.add_oauth("work", expires_in_ms=60_000)
        checks = []

        def observe(request) -> None:
            token = (request.headers["Authorization"] or "").replace("Bearer ", "")
            if request.path == "/v1/messages" and token:
                pair = [refresh for refresh, access in self.upstream.oauth.refresh_tokens.items()
                        if access == token]
                store = claudeflare.Store(self.proxy.db_path)  # what is on disk right now
                try:
                    checks.append(store.account("work").refresh_token in pair)
                finally:
                    store.close()

        self.upstream.observer = observe
        self.assertEqual(self.post_message()[0], 200)
        self.assertEqual(checks, [True])
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)

    def test_background_refresher_renews_a_token_nearing_expiry(self):
        access, _ = self.add_oauth("work", expires_in_ms=10 * 60_000)
        wait_for(lambda: self.stored("work").access_token != access, what="a background refresh")
        self.assertEqual(self.upstream.messages(), [])
        self.assertGreater(self.stored("work").expires_at, claudeflare.now_ms() + 3_600_000)
        wait_for(lambda: "Refreshed token for account work" in CAPTURED_LOG.text(),
                 what="the refresh to be logged")

    def assert_refused_refresh_marks_needs_reauth(self, reason: str, logged: str) -> None:
        """The account whose refresh the token endpoint refused is marked; spare serves."""
        wait_for(lambda: self.listed()["broken"]["status"] == "needs_reauth",
                 what="the refresh to be refused")
        for _ in range(3):
            self.assertEqual(self.post_message()[0], 200)
        self.assertEqual([request.headers["x-api-key"] for request in self.upstream.messages()],
                         ["sk-ant-api03-spare"] * 3)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        listed = self.listed()["broken"]
        self.assertEqual(listed["status"], "needs_reauth")
        self.assertIn(reason, listed["reauthReason"])
        self.assertIn("needs_reauth", self.ok("list"))
        self.assertIn(f"Failed to refresh token for account broken: {logged}",
                      CAPTURED_LOG.text())
        health = json.loads(self.proxy.request("GET", "/health")[2])
        self.assertEqual((health["status"], health["accounts"]["needs_reauth"]), ("degraded", 1))

    def test_invalid_grant_marks_needs_reauth_and_traffic_moves_on(self):
        self.add_oauth("broken", expires_in_ms=-1000, refresh_token="sk-ant-ort01-revoked")
        self.add_key("spare")
        self.assert_refused_refresh_marks_needs_reauth("invalid_grant", "Bad Request")

    def test_token_endpoint_401_marks_needs_reauth_and_traffic_moves_on(self):
        self.add_oauth("broken", expires_in_ms=-1000)
        self.add_key("spare")
        self.upstream.oauth.failures.append(
            (401, {"error": "invalid_client", "error_description": "Client authentication "
                                                                    "failed"}))
        self.assert_refused_refresh_marks_needs_reauth("invalid_client", "Unauthorized")

    def test_refresh_answer_without_a_refresh_token_keeps_the_old_one(self):
        _, refresh = self.add_oauth("work", expires_in_ms=-1000)
        self.upstream.oauth.rotates = False
        self.assertEqual(self.post_message()[0], 200)
        account = self.stored("work")
        self.assertEqual(account.refresh_token, refresh)
        self.assertEqual(self.upstream.messages()[0].headers["Authorization"],
                         f"Bearer {account.access_token}")
        self.proxy.app.store.update_account("work", expires_at=claudeflare.now_ms() - 1000)
        self.assertEqual(self.post_message()[0], 200)  # the kept token refreshes again
        self.assertEqual(self.upstream.oauth.refresh_requests, 2)
        self.assertEqual(self.listed()["work"]["status"], "active")

    def test_upstream_401_refreshes_once_and_retries_on_the_same_account(self):
        access, _ = self.add_oauth("work")
        self.upstream.oauth.access_tokens.discard(access)
        status, _, body = self.post_message()
        self.assertEqual(status, 200, body)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        tokens = [request.headers["Authorization"] for request in self.upstream.messages()]
        self.assertEqual(tokens, [f"Bearer {access}",
                                  f"Bearer {self.stored('work').access_token}"])

    def test_upstream_401_and_a_refused_refresh_move_the_request_on(self):
        access, _ = self.add_oauth("max", refresh_token="sk-ant-ort01-revoked")
        self.upstream.oauth.access_tokens.discard(access)
        self.add_key("spare")
        self.ok("config", "set", "lb_strategy", "round-robin")
        for _ in range(2):
            self.assertEqual(self.post_message()[0], 200)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        self.assertIn(f"Bearer {access}",
                      [request.headers["Authorization"] for request in self.upstream.messages()])
        accounts = {a["name"]: a for a in json.loads(self.proxy.request("GET",
                                                                        "/api/accounts")[2])}
        self.assertEqual((accounts["max"]["status"], accounts["max"]["needsReauth"]),
                         ("needs_reauth", True))
        self.assertIn("invalid_grant", accounts["max"]["reauthReason"])

    def test_upstream_401_that_a_refresh_does_not_cure_marks_needs_reauth(self):
        access, _ = self.add_oauth("max")
        refused = reply_error(401, "authentication_error", "OAuth token revoked")
        self.upstream.push(refused, refused)
        status, _, body = self.post_message()
        self.assertEqual(status, 401, body)  # the only account: its answer comes back
        tokens = [request.headers["Authorization"] for request in self.upstream.messages()]
        self.assertEqual(tokens, [f"Bearer {access}",
                                  f"Bearer {self.stored('max').access_token}"])
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        account = self.listed()["max"]
        self.assertEqual(account["status"], "needs_reauth")
        self.assertIn("OAuth token revoked", account["reauthReason"])

    def test_a_refresh_that_loses_its_connection_is_not_sent_again(self):
        _, first = self.add_oauth("work", expires_in_ms=60_000)
        self.assertEqual(self.post_message()[0], 200)
        wait_for(lambda: self.stored("work").refresh_token != first, what="the first refresh")
        kept = self.stored("work")
        self.proxy.app.store.update_account("work", expires_at=claudeflare.now_ms() + 60_000)
        # A resent refresh could spend a refresh token the endpoint already rotated.
        self.upstream.oauth.failures.append(drop_connection)
        self.assertEqual(self.post_message()[0], 200)
        wait_for(lambda: "Failed to refresh token for account work" in CAPTURED_LOG.text() or
                 CAPTURED_LOG.text().count("Refreshed token for account work") > 1,
                 what="the second refresh to end")
        self.assertEqual(self.upstream.oauth.refresh_requests, 2)
        self.assertEqual(self.stored("work").refresh_token, kept.refresh_token)
        self.assertIn("ECONNRESET", CAPTURED_LOG.text())

    def test_background_renewal_starts_fifteen_minutes_before_expiry(self):
        self.add_oauth("soon", expires_in_ms=14 * 60_000)
        self.add_oauth("later", expires_in_ms=16 * 60_000)
        now = claudeflare.now_ms()
        self.assertEqual([self.proxy.app.tokens.due(self.stored(name), now)
                          for name in ("soon", "later")], [True, False])

    def test_refresh_asks_with_the_configured_client_id_and_claude_codes_scopes(self):
        self.proxy.stop()  # client_id is read at start
        self.proxy = Proxy(self.upstream.url, client_id="my-client-id")
        self.addCleanup(self.proxy.close)
        _, refresh = self.add_oauth("work", expires_in_ms=-1000)
        self.assertEqual(self.post_message()[0], 200)
        asked = [request.json() for request in self.upstream.requests
                 if request.path == "/v1/oauth/token"]
        self.assertEqual(asked[:1], [{"grant_type": "refresh_token", "refresh_token": refresh,
                                      "client_id": "my-client-id",
                                      "scope": "user:profile user:inference "
                                               "user:sessions:claude_code user:mcp_servers "
                                               "user:file_upload"}])

    def test_an_account_granted_fewer_scopes_still_refreshes(self):
        self.upstream.oauth.granted_scopes = "org:create_api_key user:profile user:inference"
        _, refresh = self.add_oauth("old", expires_in_ms=-1000)
        self.assertEqual(self.post_message()[0], 200)
        asked = [request.json() for request in self.upstream.requests
                 if request.path == "/v1/oauth/token"]
        self.assertEqual(["scope" in payload for payload in asked], [True, False])
        self.assertEqual({payload["refresh_token"] for payload in asked}, {refresh})
        self.assertEqual(self.listed()["old"]["status"], "active")

    def test_refresh_backoff_starts_at_a_minute_and_doubles(self):
        keeper = self.proxy.app.tokens
        waits = [keeper.note_transient_failure(99, 0) for _ in range(7)]
        self.assertEqual(waits, [60_000, 120_000, 240_000, 480_000, 960_000, 1_800_000,
                                 1_800_000])

    def test_a_refresh_asked_with_a_stale_account_uses_the_stored_new_token(self):
        self.add_oauth("work", expires_in_ms=-1000)
        stale = self.stored("work")
        now = claudeflare.now_ms()
        fresh = self.proxy.app.tokens.refresh(stale, now)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        again = self.proxy.app.tokens.refresh(stale, now)  # as a request holding the old copy
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        self.assertEqual(again.access_token, fresh.access_token)
        self.assertEqual(self.stored("work").refresh_token, fresh.refresh_token)

    def test_transient_refresh_failure_keeps_the_valid_token_and_backs_off(self):
        access, refresh = self.add_oauth("work", expires_in_ms=3 * 60_000)
        self.upstream.oauth.failures.append((503, {"error": "temporarily_unavailable"}))
        for _ in range(3):
            self.assertEqual(self.post_message()[0], 200)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        self.assertEqual({request.headers["Authorization"]
                          for request in self.upstream.messages()}, {f"Bearer {access}"})
        account = self.stored("work")
        self.assertEqual((account.refresh_token, account.needs_reauth), (refresh, 0))
        self.assertIn("next try in 60s", CAPTURED_LOG.text())

    def test_removing_an_account_during_its_refresh_moves_the_request_on(self):
        self.add_oauth("leaving", expires_in_ms=-1000)
        self.add_key("spare")
        # The session strategy tries the account with the most headroom first: "leaving".
        self.proxy.app.store.update_account("spare", utilization_5h=0.9,
                                            reset_5h=claudeflare.now_ms() + 3_600_000)
        self.upstream.oauth.delay = 0.5
        results = []
        worker = threading.Thread(target=lambda: results.append(self.post_message()))
        worker.start()
        wait_for(lambda: self.upstream.oauth.refresh_requests, what="the refresh to start")
        self.ok("remove", "leaving", "--force")
        worker.join()
        status, _, body = results[0]
        self.assertEqual(status, 200, body)
        self.assertEqual([request.headers["x-api-key"] for request in self.upstream.messages()],
                         ["sk-ant-api03-spare"])
        self.assertNotIn("Unexpected error", CAPTURED_LOG.text())
        self.assertIn("Account leaving was removed", CAPTURED_LOG.text())
        self.assertEqual(list(self.listed()), ["spare"])

    def test_short_lived_tokens_are_renewed_once_per_lifetime(self):
        self.upstream.oauth.expires_in = 120  # every new token lives two minutes
        access, _ = self.add_oauth("brief", expires_in_ms=10 * 60_000)
        wait_for(lambda: self.upstream.oauth.refresh_requests == 1, what="the first renewal")
        time.sleep(2.2)  # two turns of the background refresher, once a second each
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        for _ in range(3):
            self.assertEqual(self.post_message()[0], 200)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        self.assertNotEqual(self.stored("brief").access_token, access)

    def test_expired_token_without_refresh_token_is_reported(self):
        self.add_oauth("stale", expires_in_ms=-1000, refresh_token=None)
        self.add_key("spare")
        self.assertEqual(self.post_message()[0], 200)
        self.assertEqual(self.listed()["stale"]["status"], "expired")
        wait_for(lambda: "Token expired or missing for account: stale" in CAPTURED_LOG.text(),
                 what="the expiry to be logged")


###############################################################################
# Rate limits, strategies, retries and failover ###############################
###############################################################################

def unified_headers(status: str = "rejected", reset_in_s: int = 3600, five_hour: float = 1.01,
                    seven_day: float = 0.69, claim: str = "five_hour") -> list:
    """The headers a subscription account's answer carries."""
    reset = int(time.time()) + reset_in_s
    return [("anthropic-ratelimit-unified-status", status),
            ("anthropic-ratelimit-unified-reset", str(reset)),
            ("anthropic-ratelimit-unified-representative-claim", claim),
            ("anthropic-ratelimit-unified-5h-status", status),
            ("anthropic-ratelimit-unified-5h-reset", str(reset)),
            ("anthropic-ratelimit-unified-5h-utilization", str(five_hour)),
            ("anthropic-ratelimit-unified-7d-status", "allowed"),
            ("anthropic-ratelimit-unified-7d-reset", str(reset + 86400)),
            ("anthropic-ratelimit-unified-7d-utilization", str(seven_day)),
            ("retry-after", str(reset_in_s))]


class TestRateLimitParsing(unittest.TestCase):
    def parse(self, headers, now=None):
        return claudeflare.parse_rate_limit(claudeflare.Headers(headers),
                                            now or claudeflare.now_ms())

    def test_unified_headers_are_read(self):
        limit = self.parse(unified_headers(reset_in_s=7200))
        self.assertTrue(limit.hard)
        self.assertEqual((limit.status, limit.claim, limit.utilization_5h, limit.utilization_7d),
                         ("rejected", "five_hour", 1.01, 0.69))
        self.assertAlmostEqual(limit.reset_5h / 1000, time.time() + 7200, delta=5)
        self.assertEqual(limit.retry_after_ms, 7_200_000)

    def test_window_only_headers_count_as_hard(self):
        reset = int(time.time()) + 600
        limit = self.parse([("anthropic-ratelimit-unified-5h-status", "rejected"),
                            ("anthropic-ratelimit-unified-5h-reset", str(reset))])
        self.assertTrue(limit.hard)
        self.assertIsNone(limit.status)
        now = claudeflare.now_ms()
        self.assertEqual(limit.limited_until(now), reset * 1000)

    def test_statuses_are_classified(self):
        for status in ("rejected", "rate_limited", "blocked", "queueing_hard",
                       "payment_required"):
            self.assertTrue(self.parse(unified_headers(status)).hard, status)
        for status in ("allowed_warning", "queueing_soft"):
            limit = self.parse(unified_headers(status))
            self.assertFalse(limit.hard, status)
            self.assertIn(limit.summary()[0], claudeflare.SOFT_LIMIT_STATUSES)
        self.assertFalse(self.parse(unified_headers("allowed")).hard)

    def test_limit_is_capped_and_has_fallbacks(self):
        now = claudeflare.now_ms()
        far = self.parse(unified_headers(reset_in_s=30 * 86400))
        self.assertEqual(far.limited_until(now), now + 8 * 86400 * 1000)
        only_retry = self.parse([("anthropic-ratelimit-unified-status", "rejected"),
                                 ("retry-after", "120")], now)
        self.assertEqual(only_retry.limited_until(now), now + 120_000)
        bare = self.parse([("anthropic-ratelimit-unified-status", "rejected")], now)
        self.assertEqual(bare.limited_until(now), now + 60_000)
        self.assertFalse(self.parse([]).names_window())
        allowed = self.parse(unified_headers("allowed", 7200, 0.5, 0.2) + [("retry-after", "2")])
        self.assertFalse(allowed.names_window())  # a 429 with every window allowed: throttling

    def test_api_key_limits_and_retry_after_forms(self):
        reset = "2030-01-01T00:00:00Z"
        limit = self.parse([("anthropic-ratelimit-requests-remaining", "0"),
                            ("anthropic-ratelimit-requests-reset", reset),
                            ("anthropic-ratelimit-tokens-remaining", "5000"),
                            ("retry-after-ms", "1500"), ("retry-after", "9"),
                            ("x-should-retry", "false")])
        self.assertEqual(limit.exhausted_reset, 1893456000000)
        self.assertEqual(limit.limited_until(1893455000000), 1893456000000)
        self.assertEqual((limit.retry_after_ms, limit.should_retry), (1500, False))


class TestConversationKey(unittest.TestCase):
    def key(self, body, headers=()):
        return claudeflare.conversation_key(dict(headers).get("X-Claude-Code-Session-Id"),
                                            json.dumps(body).encode())

    def test_header_then_metadata_then_opening_hash(self):
        body = {"messages": [{"role": "user", "content": "hi"}], "system": "be brief",
                "metadata": {"user_id": "user_ab12_account_1234-5678_session_"
                                        "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"}}
        self.assertEqual(self.key(body, [("X-Claude-Code-Session-Id", "s-1")]), "session:s-1")
        self.assertEqual(self.key(body), "session:aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
        body["metadata"]["user_id"] = json.dumps({"device_id": "d", "session_id": "s-2"})
        self.assertEqual(self.key(body), "session:s-2")
        del body["metadata"]
        first = self.key(body)
        self.assertTrue(first.startswith("hash:"))
        body["messages"].append({"role": "assistant", "content": "hello"})
        self.assertEqual(self.key(body), first)
        body["system"] = "be verbose"
        self.assertNotEqual(self.key(body), first)
        self.assertIsNone(claudeflare.conversation_key(None, b"not json"))

    def test_large_bodies_give_the_keys_a_whole_parse_gives(self):
        session = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
        user_id = f"user_ab12_account_1234-5678_session_{session}"
        turns = [{"role": "user", "content": "a long turn " * 8000}]
        nested = {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x",
                                                    "input": {"metadata": {"user_id": "x"}}}]}
        bodies = [
            {"messages": turns, "metadata": {"user_id": user_id}, "stream": True},
            {"messages": turns, "metadata": {"user_id": user_id}},
            {"metadata": {"user_id": user_id}, "messages": turns},
            {"messages": turns + [nested], "metadata": {"user_id": "no session here"}},
            {"messages": turns, "metadata": {"user_id": user_id}, "system": [nested]},
            {"messages": turns, "system": 'say "metadata": {"user_id": "_session_12345678"}'},
            {"messages": turns, "metadata": {"user_id": "someone"}, "x": {"metadata": 1}},
            {"messages": turns, "metadata": {"user_id": json.dumps({"session_id": "s-3"})}},
            {"messages": turns, "metadata": "metadata", "z": 1},
        ]
        for body in bodies:
            data = json.dumps(body).encode()
            self.assertGreater(len(data), claudeflare.FULL_PARSE_BYTES)
            whole = claudeflare.conversation_key(None, data)
            payload = json.loads(data)
            expected = claudeflare.metadata_session(payload.get("metadata")) or (
                "hash:" + hashlib.sha256(json.dumps(
                    [payload.get("system"), payload["messages"][0]], sort_keys=True,
                    default=str).encode()).hexdigest()[:32])
            self.assertEqual(whole, expected, body.keys())
            self.assertEqual(self.key(body, [("X-Claude-Code-Session-Id", "s-9")]),
                             "session:s-9")
        self.assertEqual(self.key(bodies[0]), f"session:{session}")
        self.assertEqual(self.key(bodies[7]), "session:s-3")
        tail = [claudeflare.tail_metadata(json.dumps(body).encode()) for body in bodies]
        self.assertEqual([found is not None for found in tail],
                         [True, True, False, True, False, False, False, True, True])


class TestStrategyFunctions(unittest.TestCase):
    def accounts(self, tiers=(1, 1, 1)):
        now = claudeflare.now_ms()
        return [claudeflare.Account(
            id=index + 1, name=f"a{index + 1}", type="api_key", account_tier=tier, api_key="k",
            access_token=None, refresh_token=None, expires_at=None, email=None,
            organization=None, paused=False, needs_reauth=False, reauth_reason=None,
            rate_limit_status=None, rate_limit_reset=None, rate_limited_until=None,
            utilization_5h=None, reset_5h=None, utilization_7d=None, reset_7d=None,
            session_start=now, session_requests=0, request_count=0, created_at=now,
            last_used=None) for index, tier in enumerate(tiers)]

    def test_table_holds_every_strategy_name(self):
        self.assertEqual(tuple(claudeflare.STRATEGIES), claudeflare.STRATEGY_NAMES)

    def test_weighted_split_follows_tiers(self):
        accounts = self.accounts((1, 5, 20))
        firsts = collections.Counter(
            claudeflare.weighted(accounts, claudeflare.RouteContext(turn=turn), 0)[0].name
            for turn in range(260))
        self.assertEqual(firsts, {"a1": 10, "a2": 50, "a3": 200})

    def test_rate_limited_account_is_usable_again_after_its_reset(self):
        accounts = self.accounts()
        now = claudeflare.now_ms()
        accounts[0].rate_limited_until = now + 3_600_000
        context = claudeflare.RouteContext()
        names = [a.name for a in claudeflare.order_accounts(accounts, "round-robin", context, now)]
        self.assertNotIn("a1", names)
        later = now + 3_600_001
        names = [a.name for a in claudeflare.order_accounts(accounts, "round-robin", context,
                                                             later)]
        self.assertIn("a1", names)

    def test_soft_limited_accounts_come_last_and_headroom_orders_by_use(self):
        accounts = self.accounts()
        now = claudeflare.now_ms()
        for account, used in zip(accounts, (0.9, 0.2, 0.5)):
            account.utilization_5h, account.reset_5h = used, now + 3_600_000
        context = claudeflare.RouteContext()
        self.assertEqual([a.name for a in claudeflare.headroom(accounts, context, now)],
                         ["a2", "a3", "a1"])
        accounts[1].rate_limit_status, accounts[1].rate_limit_reset = "allowed_warning", now + 60
        self.assertEqual([a.name for a in claudeflare.order_accounts(accounts, "headroom",
                                                                      context, now)],
                         ["a3", "a1", "a2"])
        accounts[0].reset_5h = now - 1  # the 5h window of a1 has reset: it is empty again
        self.assertEqual(claudeflare.headroom(accounts, context, now)[0].name, "a1")


class RoutingTestCase(ServerWithAccounts):
    """Three API-key accounts a, b, c behind a real server."""

    settings = {"lb_strategy": "round-robin", "retry_delay_ms": 1, "retry_attempts": 2}

    def setUp(self) -> None:
        super().setUp()
        for name in ("a", "b", "c"):
            self.add_key(name)

    def fault(self, name: str, *actions) -> None:
        self.upstream.push_for(f"sk-ant-api03-{name}", *actions)

    def key_of(self, request) -> str:
        return (request.headers["x-api-key"] or "").replace("sk-ant-api03-", "")

    def records(self) -> list:
        self.proxy.settle()
        return self.proxy.app.store.db.execute(
            "SELECT account_name, status, failover_attempts FROM requests ORDER BY timestamp"
        ).fetchall()

    def distribution(self, count: int, headers=None, stream: bool = False) -> collections.Counter:
        """Send requests (each must succeed); count which account the upstream saw for each."""
        first = len(self.upstream.messages())
        for _ in range(count):
            self.assertEqual(self.post_message(stream=stream, headers=headers)[0], 200)
        return collections.Counter(self.key_of(r) for r in self.upstream.messages()[first:])


class TestFailover(RoutingTestCase):
    @staticmethod
    def faults() -> dict:
        """The fault matrix, with reset times counted from now."""
        return {
            "hard 429 with reset": reply_error(429, "rate_limit_error", "5-hour limit reached",
                                               unified_headers("rejected", 7200)),
            "windowless 429": reply_error(429, "rate_limit_error", "Rate limited"),
            "429 with every window allowed": reply_error(
                429, "rate_limit_error", "Too many concurrent requests",
                unified_headers("allowed", 7200, 0.4, 0.2)[:-1] + [("retry-after", "2")]),
            "credit balance too low": reply_error(
                400, "invalid_request_error", "Your credit balance is too low to access the "
                "Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."),
            "5h-only headers": reply_error(429, "rate_limit_error", "limited", [
                ("anthropic-ratelimit-unified-5h-status", "rejected"),
                ("anthropic-ratelimit-unified-5h-reset", str(int(time.time()) + 5400))]),
            "529": reply_error(529, "overloaded_error", "Overloaded"),
            "500": reply_error(500, "api_error", "Internal server error"),
            "dropped before headers": drop_connection,
            "disabled organization": reply_error(400, "invalid_request_error",
                                                 "This organization has been disabled."),
            "oauth not allowed": reply_error(
                403, "permission_error",
                "OAuth authentication is currently not allowed for this organization.",
                [("x-should-retry", "false")]),
            "extra usage": reply_error(
                400, "invalid_request_error",
                "This request would use extra usage, which is not enabled."),
        }

    def test_every_fault_on_one_account_is_served_by_another(self):
        for fault, action in self.faults().items():
            with self.subTest(fault=fault):
                self.proxy.app.store.db.execute(
                    "UPDATE accounts SET paused = 0, needs_reauth = 0, rate_limited_until = NULL,"
                    " rate_limit_status = NULL")
                self.proxy.app.cooldowns.clear()  # each fault starts without a 429 streak
                self.upstream.requests.clear()
                self.fault("a", *[action] * 20)
                for _ in range(6):
                    status, _, body = self.post_message()
                    self.assertEqual(status, 200, body)
                hits_a = [r for r in self.upstream.messages() if self.key_of(r) == "a"]
                self.assertTrue(hits_a, "the faulted account was never tried")
                self.upstream.per_account.clear()
                account = self.listed()["a"]
                now = claudeflare.now_ms()
                if fault in ("hard 429 with reset", "5h-only headers"):
                    self.assertEqual(account["status"], "rate_limited")
                    expected = 7200 if fault.startswith("hard") else 5400
                    self.assertAlmostEqual((account["rateLimitedUntil"] - now) / 1000, expected,
                                           delta=5)
                    self.assertEqual(len(hits_a), 1)  # benched at once, never retried
                elif fault in ("windowless 429", "429 with every window allowed"):
                    self.assertEqual(account["status"], "rate_limited")
                    self.assertAlmostEqual((account["rateLimitedUntil"] - now) / 1000, 30,
                                           delta=5)
                elif fault in ("disabled organization", "credit balance too low",
                               "oauth not allowed"):
                    self.assertEqual(account["status"], "needs_reauth")
                    self.assertIn({"disabled organization": "organization has been disabled",
                                   "credit balance too low": "credit balance is too low",
                                   "oauth not allowed": "OAuth authentication is currently not "
                                                        "allowed"}[fault],
                                  account["reauthReason"])
                    self.ok("resume", "a")
                    self.assertEqual(self.listed()["a"]["status"], "active")
                else:
                    self.assertEqual(account["status"], "active")
                if fault in ("529", "500"):
                    self.assertEqual(len(hits_a) % 3, 0)  # 1 try + 2 retries per request
                if fault == "dropped before headers":
                    self.assertGreaterEqual(len(hits_a), 3)
                until = account["rateLimitedUntil"]
                if until and until > now:
                    later = claudeflare.now_ms() + (until - now) + 1
                    self.assertIn("a", [a.name for a in self.proxy.app.accounts_to_try(
                        self.proxy.app.accounts(), None, later)])

    def benched_for(self, headers) -> float:
        """Let b, tried first, answer 429 with these headers; return how long it is benched (s).

        c serves the request at once; b's mark is read as `list` shows it.
        """
        self.fault("b", reply_error(429, "rate_limit_error", "limited", headers))
        started = time.monotonic()
        self.assertEqual(self.post_message()[0], 200)  # turn 1 starts at b
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual([self.key_of(r) for r in self.upstream.messages()], ["b", "c"])
        account = self.listed()["b"]
        self.assertEqual(account["status"], "rate_limited")
        return (account["rateLimitedUntil"] - claudeflare.now_ms()) / 1000

    def test_both_windows_refused_bench_the_account_until_the_later_reset(self):
        now = int(time.time())
        self.assertAlmostEqual(self.benched_for([
            ("anthropic-ratelimit-unified-status", "rejected"),
            ("anthropic-ratelimit-unified-reset", str(now + 3600)),
            ("anthropic-ratelimit-unified-7d-status", "rejected"),
            ("anthropic-ratelimit-unified-7d-reset", str(now + 3 * 86400)),
            ("anthropic-ratelimit-unified-5h-status", "rejected"),
            ("anthropic-ratelimit-unified-5h-reset", str(now + 3600)),
            ("retry-after", "3600")]), 3 * 86400, delta=5)

    def test_a_reset_already_past_falls_back_to_retry_after(self):
        self.assertAlmostEqual(self.benched_for([
            ("anthropic-ratelimit-unified-5h-status", "rejected"),
            ("anthropic-ratelimit-unified-5h-reset", str(int(time.time()) - 60)),
            ("retry-after", "120")]), 120, delta=5)

    def test_a_reset_already_past_without_retry_after_benches_a_minute(self):
        self.assertAlmostEqual(self.benched_for([
            ("anthropic-ratelimit-unified-status", "rejected"),
            ("anthropic-ratelimit-unified-reset", str(int(time.time()) - 60))]), 60, delta=5)

    def test_retry_after_as_an_http_date_sets_the_bench(self):
        self.assertAlmostEqual(self.benched_for([
            ("anthropic-ratelimit-unified-status", "rejected"),
            ("retry-after", email.utils.formatdate(time.time() + 600, usegmt=True))]),
            600, delta=5)

    def test_api_key_limit_at_zero_benches_the_account_until_its_reset(self):
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))
        self.assertAlmostEqual(self.benched_for([
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", reset),
            ("anthropic-ratelimit-tokens-remaining", "20000"), ("retry-after", "20")]),
            7200, delta=5)

    def test_429_naming_no_window_cools_down_for_its_retry_after(self):
        self.assertAlmostEqual(self.benched_for([("retry-after", "120")]), 120, delta=5)

    def test_408_is_retried_on_the_same_account(self):
        self.fault("b", reply_error(408, "timeout_error", "Request timed out"))
        status, _, body = self.post_message()
        self.assertEqual(status, 200, body)
        self.assertEqual([self.key_of(r) for r in self.upstream.messages()], ["b", "b"])

    def test_5xx_saying_not_to_retry_goes_to_the_next_account(self):
        self.fault("b", *[reply_error(500, "api_error", "boom", [("x-should-retry", "false")])]
                   * 3)
        status, _, body = self.post_message()
        self.assertEqual(status, 200, body)
        self.assertEqual([self.key_of(r) for r in self.upstream.messages()], ["b", "c"])
        self.assertEqual(self.listed()["b"]["status"], "active")

    def test_retry_after_beyond_thirty_seconds_goes_to_the_next_account_at_once(self):
        self.fault("b", *[reply_error(529, "overloaded_error", "Overloaded",
                                      [("retry-after", "45")])] * 3)
        started = time.monotonic()
        status, _, body = self.post_message()
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(status, 200, body)
        self.assertEqual([self.key_of(r) for r in self.upstream.messages()], ["b", "c"])
        self.assertEqual(self.listed()["b"]["status"], "active")

    def test_401_on_an_api_key_account_moves_on_and_marks_the_account(self):
        self.fault("b", reply_error(401, "authentication_error", "invalid x-api-key"))
        status, _, body = self.post_message()
        self.assertEqual(status, 200, body)
        self.assertEqual([self.key_of(r) for r in self.upstream.messages()], ["b", "c"])
        account = self.listed()["b"]
        self.assertEqual(account["status"], "needs_reauth")
        self.assertIn("invalid x-api-key", account["reauthReason"])
        self.assertNotIn("b", self.served_by(3))

    def test_every_dead_pooled_connection_is_replaced_by_a_new_one(self):
        gate = threading.Event()
        self.addCleanup(gate.set)

        def held(handler, request) -> None:
            gate.wait(DEADLINE_S)
            reply_default(handler, request)

        self.upstream.push(held, held, held)
        workers = [threading.Thread(target=self.post_message) for _ in range(3)]
        for worker in workers:
            worker.start()
        wait_for(lambda: len(self.upstream.messages()) == 3, what="three requests at once")
        gate.set()
        for worker in workers:
            worker.join()
        pooled = list(self.proxy.app.upstream.idle)
        self.assertEqual(len(pooled), 3)
        for connection in pooled:
            connection.sock.shutdown(socket.SHUT_RDWR)  # as if the upstream had closed them all
        self.assertEqual(self.post_message()[0], 200)

    def test_windowless_429_cooldown_doubles_while_it_repeats(self):
        app = self.proxy.app
        account = app.store.account("a")
        bare = claudeflare.RateLimit()
        now = claudeflare.now_ms()
        waits = []
        for step in range(6):
            waits.append(app.mark_rate_limited(account, bare, now) - now)
        self.assertEqual(waits, [30_000, 60_000, 120_000, 240_000, 300_000, 300_000])
        app.note_success(account)
        self.assertEqual(app.mark_rate_limited(account, bare, now) - now, 30_000)

    def test_streaming_request_fails_over_before_the_first_byte(self):
        self.fault("b", self.faults()["hard 429 with reset"])
        status, headers, body = self.post_message(stream=True)  # turn 1 starts at b
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/event-stream")
        self.assertTrue(body.startswith(b"event: message_start"))
        self.assertIn(b"message_stop", body)
        self.assertEqual([self.key_of(r) for r in self.upstream.messages()], ["b", "c"])
        self.assertEqual([tuple(row) for row in self.records()], [("c", 200, 1)])

    def test_client_errors_are_returned_at_once_and_never_retried(self):
        self.fault("a", reply_error(400, "invalid_request_error", "messages: field required"))
        self.fault("b", reply_error(400, "invalid_request_error", "messages: field required"))
        self.fault("c", reply_error(400, "invalid_request_error", "messages: field required"))
        status, _, body = self.post_message()
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["error"]["message"], "messages: field required")
        self.assertEqual(len(self.upstream.messages()), 1)

    def test_retry_after_is_honoured(self):
        for name in "abc":
            self.fault(name, reply_error(529, "overloaded_error", "Overloaded",
                                         [("retry-after-ms", "300")]))
        self.assertEqual(self.post_message()[0], 200)
        first, second = self.upstream.messages()[:2]
        self.assertEqual(self.key_of(first), self.key_of(second))
        self.assertGreaterEqual(second.arrived - first.arrived, 0.29)

    def test_every_account_limited_returns_the_last_429_with_the_earliest_reset(self):
        for name, reset_in in (("a", 7200), ("b", 600), ("c", 3600)):
            self.fault(name, reply_error(429, "rate_limit_error", f"limited {name}",
                                         unified_headers("rejected", reset_in)))
        status, headers, body = self.post_message()
        self.assertEqual(status, 429)
        self.assertEqual(json.loads(body)["error"]["type"], "rate_limit_error")
        self.assertAlmostEqual(int(headers["retry-after"]), 600, delta=5)
        self.assertEqual(len(self.upstream.messages()), 3)
        for placeholder in ({}, {"x-api-key": "claudeflare"},
                            {"Authorization": "Bearer placeholder"}):
            status, headers, body = self.post_message(headers=placeholder)
            self.assertEqual(status, 429, placeholder)
            self.assertIn("All accounts are rate limited",
                          json.loads(body)["error"]["message"])
            self.assertAlmostEqual(int(headers["retry-after"]), 600, delta=5)
        self.assertEqual(len(self.upstream.messages()), 3)
        status, _, _ = self.post_message(headers={"x-api-key": "sk-ant-api03-client-own"})
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.messages()[-1].headers["x-api-key"],
                         "sk-ant-api03-client-own")
        self.assertIn("No active accounts available", CAPTURED_LOG.text())

    def test_retry_after_counts_only_accounts_that_come_back_by_themselves(self):
        now = claudeflare.now_ms()
        store = self.proxy.app.store
        store.update_account("a", paused=1, rate_limited_until=now + 60_000)
        store.update_account("b", needs_reauth=1, rate_limited_until=now + 120_000)
        store.update_account("c", rate_limited_until=now + 3_600_000)
        status, headers, _ = self.post_message()
        self.assertEqual(status, 429)
        self.assertAlmostEqual(int(headers["retry-after"]), 3600, delta=5)
        self.assertEqual(self.upstream.messages(), [])

    def test_every_account_failing_without_an_answer_gives_503(self):
        for name in "abc":
            self.fault(name, *[drop_connection] * 3)
        status, _, body = self.post_message()
        assert_all_accounts_failed(self, status, body, 9, "ECONNRESET")

    def test_every_account_overloaded_returns_the_last_529(self):
        for name in "abc":
            self.fault(name, *[reply_error(529, "overloaded_error", "Overloaded")] * 3)
        status, _, body = self.post_message()
        self.assertEqual(status, 529)
        self.assertEqual(json.loads(body)["error"]["type"], "overloaded_error")

    def test_each_request_records_its_account_and_failovers(self):
        self.fault("b", reply_error(429, "rate_limit_error", "limited",
                                    unified_headers("rejected", 600)))
        self.fault("c", reply_error(429, "rate_limit_error", "limited",
                                    unified_headers("rejected", 600)))
        self.assertEqual(self.post_message()[0], 200)  # turn 1 starts at b: b, c fail, a serves
        self.assertEqual([tuple(row) for row in self.records()], [("a", 200, 2)])


class TestFailoverEdges(RoutingTestCase):
    settings = {"lb_strategy": "round-robin", "retry_delay_ms": 1, "retry_attempts": 2,
                "request_timeout_s": 0.5}

    def test_a_silent_upstream_is_not_asked_again_past_the_time_budget(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        for name in "abc":
            self.fault(name, hang(gate))
        status, _, body = self.post_message()
        self.assertEqual(status, 503)
        error = json.loads(body)
        self.assertIn("ETIMEDOUT", error["lastError"])
        self.assertIn("gave up after 0.5s", error["lastError"])
        self.assertEqual(len(self.upstream.messages()), 1)  # neither resent nor sent elsewhere
        self.assertEqual(self.listed()["b"]["status"], "active")

    def test_refused_token_with_the_token_endpoint_down_fails_over_without_marking(self):
        access, refresh = self.add_oauth("max")
        self.upstream.oauth.access_tokens.discard(access)
        self.upstream.oauth.failures.append((503, {"error": "temporarily_unavailable"}))
        self.ok("pause", "a")
        self.ok("pause", "b")
        self.ok("pause", "c")
        self.ok("config", "set", "lb_strategy", "round-robin")
        self.ok("add", "spare", "--api-key", stdin="sk-ant-api03-spare\n")
        for _ in range(2):
            self.assertEqual(self.post_message()[0], 200)
        self.assertIn(f"Bearer {access}",
                      [request.headers["Authorization"] for request in self.upstream.messages()])
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        account = self.listed()["max"]
        self.assertEqual((account["status"], account["needsReauth"]), ("active", False))
        self.assertEqual(self.stored("max").refresh_token, refresh)

    def test_negative_chunk_size_is_refused(self):
        reply = raw_http(self.proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                                          b"Transfer-Encoding: chunked\r\n\r\n-1\r\n"
                         + b"x" * 1000)
        self.assertIn(b" 400 ", reply.split(b"\r\n")[0])
        self.assertEqual(self.upstream.messages(), [])


class TestStrategies(RoutingTestCase):
    def test_round_robin_spreads_evenly(self):
        self.assertEqual(self.distribution(30), {"a": 10, "b": 10, "c": 10})

    def test_weighted_follows_tiers(self):
        self.ok("tier", "b", "5")
        self.ok("tier", "c", "20")
        self.ok("config", "set", "lb_strategy", "weighted")
        split = self.distribution(260)
        for name, expected in (("a", 10), ("b", 50), ("c", 200)):
            self.assertAlmostEqual(split[name], expected, delta=3)

    def test_least_requests_fills_the_emptiest_account_first(self):
        store = self.proxy.app.store
        now = claudeflare.now_ms()
        store.update_account("a", session_requests=6, session_start=now)
        store.update_account("c", session_requests=3, session_start=now)
        self.ok("config", "set", "lb_strategy", "least-requests")
        self.assertEqual(self.distribution(3), {"b": 3})
        self.assertEqual(self.distribution(6), {"b": 3, "c": 3})

    def test_least_requests_counts_only_the_current_window(self):
        store = self.proxy.app.store
        now = claudeflare.now_ms()
        window = self.proxy.app.settings.session_duration_ms
        store.update_account("a", session_requests=50, session_start=now - window - 60_000)
        store.update_account("b", session_requests=3, session_start=now)
        store.update_account("c", session_requests=3, session_start=now)
        self.ok("config", "set", "lb_strategy", "least-requests")
        self.assertEqual(self.distribution(3), {"a": 3})  # a's 50 belong to a past window

    def test_session_sticks_spreads_and_moves(self):
        self.ok("config", "set", "lb_strategy", "session")
        first = self.distribution(5, {"X-Claude-Code-Session-Id": "conv-1"})
        self.assertEqual(len(first), 1)
        home = next(iter(first))
        others = set()
        for conversation in ("conv-2", "conv-3"):
            others |= set(self.distribution(3, {"X-Claude-Code-Session-Id": conversation}))
        self.assertEqual(others | {home}, {"a", "b", "c"})
        self.ok("pause", home)
        moved = self.distribution(3, {"X-Claude-Code-Session-Id": "conv-1"})
        self.assertEqual(len(moved), 1)
        self.assertNotIn(home, moved)
        self.ok("resume", home)
        self.assertEqual(self.distribution(3, {"X-Claude-Code-Session-Id": "conv-1"}), moved)

    def test_headroom_prefers_the_least_used_account(self):
        for name, used in (("a", 0.9), ("b", 0.2), ("c", 0.5)):
            self.fault(name, reply_json(200, message_body(), unified_headers("allowed", 3600,
                                                                             used, 0.1)))
        self.distribution(3)
        self.ok("config", "set", "lb_strategy", "headroom")
        self.assertEqual(self.distribution(2), {"b": 2})
        self.proxy.settle()
        self.assertAlmostEqual(self.listed()["a"]["utilization5h"], 0.9)

    def test_limits_are_read_from_streamed_answers_too(self):
        self.fault("b", reply_stream(message_events(), headers=unified_headers("allowed", 3600,
                                                                              0.77, 0.33)))
        self.assertEqual(self.post_message(stream=True)[0], 200)
        self.proxy.settle()
        account = self.listed()["b"]
        self.assertEqual((account["utilization5h"], account["utilization7d"]), (0.77, 0.33))
        self.assertEqual(account["rateLimitStatus"], "allowed")

    def test_retry_delay_grows_by_the_backoff(self):
        self.ok("config", "set", "retry_delay_ms", "100")
        self.ok("config", "set", "retry_backoff", "3")
        self.fault("b", *[reply_error(500, "api_error", "boom")] * 2)
        self.assertEqual(self.post_message()[0], 200)
        first, second, third = self.upstream.messages()[:3]
        self.assertGreaterEqual(second.arrived - first.arrived, 0.099)
        self.assertGreaterEqual(third.arrived - second.arrived, 0.299)
        self.assertEqual([self.key_of(r) for r in (first, second, third)], ["b", "b", "b"])

    def test_session_stickiness_ends_after_the_session_duration(self):
        self.ok("config", "set", "lb_strategy", "session")
        home = next(iter(self.distribution(1, {"X-Claude-Code-Session-Id": "long"})))
        app, now = self.proxy.app, claudeflare.now_ms()
        self.assertEqual(app.accounts_to_try(app.accounts(), "session:long", now)[0].name, home)
        later = now + app.settings.session_duration_ms + 1
        firsts = {app.accounts_to_try(app.accounts(), "session:long", later)[0].name
                  for _ in range(6)}
        self.assertGreater(len(firsts), 1)  # no longer bound: it rotates like a new one

    def test_new_conversations_go_to_the_account_with_most_headroom(self):
        for name, used in (("a", 0.55), ("b", 0.85), ("c", 0.15)):
            self.fault(name, reply_json(200, message_body(), unified_headers("allowed", 3600,
                                                                             used, 0.1)))
        self.distribution(3)
        self.ok("config", "set", "lb_strategy", "session")
        # Three turns: the rotation starts at b, then c, then a; headroom picks c each time.
        for conversation in ("fresh-1", "fresh-2", "fresh-3"):
            self.assertEqual(self.distribution(1, {"X-Claude-Code-Session-Id": conversation}),
                             {"c": 1}, conversation)

    def test_close_headroom_does_not_pile_new_conversations_on_one_account(self):
        for name, used in (("a", 0.12), ("b", 0.14), ("c", 0.9)):
            self.fault(name, reply_json(200, message_body(), unified_headers("allowed", 3600,
                                                                             used, 0.1)))
        self.distribution(3)
        self.ok("config", "set", "lb_strategy", "session")
        split = collections.Counter()
        for index in range(4):
            split += self.distribution(1, {"X-Claude-Code-Session-Id": f"new-{index}"})
        self.assertEqual(set(split), {"a", "b"})  # 12% and 14% count as the same headroom

    def test_weighted_failover_tries_the_rest_by_tier_after_the_scheduled_account(self):
        tiers = {"a": 1, "b": 5, "c": 20}
        self.ok("tier", "b", "5")
        self.ok("tier", "c", "20")
        self.ok("config", "set", "lb_strategy", "weighted")
        orders = []
        for _ in range(11):  # the schedule's first picks include all three by turn 11
            for name in "abc":
                self.fault(name, reply_error(400, "invalid_request_error", "This request would "
                                             "use extra usage, which is not enabled."))
            first = len(self.upstream.messages())
            self.assertEqual(self.post_message()[0], 400)
            orders.append([self.key_of(r) for r in self.upstream.messages()[first:]])
        self.assertEqual({order[0] for order in orders}, {"a", "b", "c"})
        for order in orders:
            rest = sorted(set(tiers) - {order[0]}, key=lambda name: -tiers[name])
            self.assertEqual(order, [order[0]] + rest)

    def test_metadata_user_id_keeps_a_conversation_together(self):
        self.ok("config", "set", "lb_strategy", "session")
        first = len(self.upstream.messages())
        for index in range(4):
            body = {"model": "claude-sonnet-4-5", "max_tokens": 8,
                    "metadata": {"user_id": json.dumps({"device_id": "d",
                                                        "session_id": "conv-meta"})},
                    "messages": [{"role": "user", "content": f"turn {index}"}]}
            self.assertEqual(self.proxy.request("POST", "/v1/messages", body)[0], 200)
        self.assertEqual(len({self.key_of(r) for r in self.upstream.messages()[first:]}), 1)

    def test_soft_warning_keeps_serving_but_goes_last(self):
        self.fault("b", reply_json(200, message_body(), unified_headers("allowed_warning", 3600,
                                                                        0.95)))
        self.distribution(3)
        self.assertEqual(self.distribution(6), {"a": 3, "c": 3})
        self.assertEqual(self.listed()["b"]["status"], "active")


CLAUDE_CODE = {"User-Agent": "claude-cli/2.1.3 (external, cli)", "x-app": "cli"}
SDK = {"User-Agent": "Anthropic/Python 0.71.0"}


class TestClaudeCodeOnly(ServerWithAccounts):
    """Subscription tokens serve Claude Code only: other clients go to API-key accounts, and no
    account is blamed for it."""

    def setUp(self) -> None:
        super().setUp()
        self.upstream.oauth.claude_code_only = True
        self.tokens = {self.add_oauth(name)[0]: name for name in ("max1", "max2")}

    def who(self, request) -> str:
        token = (request.headers["Authorization"] or "").replace("Bearer ", "")
        return self.tokens.get(token) or request.headers["x-api-key"] or "-"

    def served(self, headers: dict, count: int = 3, connection=None,
               status: int = 200) -> list[list[str]]:
        """Send requests on one connection, as SDKs do; return, for each, whom the upstream
        saw, in order."""
        if connection is None:
            connection = self.proxy.connect()
            self.addCleanup(connection.close)
        seen = []
        for _ in range(count):
            first = len(self.upstream.messages())
            connection.request("POST", "/v1/messages", json.dumps({
                "model": "claude-sonnet-4-5", "max_tokens": 64,
                "messages": [{"role": "user", "content": "Hi"}]}), headers)
            response = connection.getresponse()
            self.last_answer = response, response.read()
            self.assertEqual(response.status, status, self.last_answer[1])
            seen.append([self.who(request) for request in self.upstream.messages()[first:]])
        return seen

    def assert_no_account_marked(self) -> None:
        for name, account in self.listed().items():
            self.assertEqual((account["status"], account["needsReauth"]), ("active", False), name)

    def test_other_clients_are_served_by_the_api_key_under_every_strategy(self):
        self.ok("add", "ci", "--api-key", "--priority", "1", stdin="sk-ant-api03-ci\n")
        for strategy in claudeflare.STRATEGY_NAMES:
            with self.subTest(strategy=strategy):
                self.proxy.app.not_claude_code.clear()
                self.ok("config", "set", "lb_strategy", strategy)
                self.assertIn(self.served(CLAUDE_CODE, 1)[0], (["max1"], ["max2"]))
                first, *rest = self.served(SDK)
                self.assertEqual(len(first), 2)  # one subscription account, then the key
                self.assertIn(first[0], ("max1", "max2"))
                self.assertEqual(first[1], "sk-ant-api03-ci")
                self.assertEqual(rest, [["sk-ant-api03-ci"]] * 2)  # remembered: key first
        self.assert_no_account_marked()
        self.proxy.settle()
        stats = json.loads(self.proxy.request("GET", "/api/stats")[2])
        strategies = len(claudeflare.STRATEGY_NAMES)
        self.assertEqual(stats["totals"]["claudeCodeOnlyRefusals"], strategies)
        self.assertEqual(stats["totals"]["failures"], 0)
        self.assertEqual(self.listed()["max1"]["requests"] + self.listed()["max2"]["requests"],
                         strategies)  # the Claude Code requests only
        self.assertIn("go to API-key accounts first", CAPTURED_LOG.text())

    def test_claude_code_is_not_sent_to_api_keys_because_a_script_sharing_its_name_was(self):
        self.ok("add", "ci", "--api-key", "--priority", "1", stdin="sk-ant-api03-ci\n")
        script = {"User-Agent": "claude-cli/2.1.3 (external, sdk-py)", "x-app": "sdk"}
        self.assertEqual(self.served(script, 2)[1], ["sk-ant-api03-ci"])
        for seen in self.served(CLAUDE_CODE, 3):
            self.assertIn(seen, (["max1"], ["max2"]))

    def test_one_spoofed_request_never_sends_claude_code_to_the_paid_key(self):
        self.ok("add", "ci", "--api-key", "--priority", "1", stdin="sk-ant-api03-ci\n")
        refusal = reply_error(400, "invalid_request_error", "This credential is only "
                              "authorized for use with Claude Code and cannot be used for other "
                              "API requests.")
        self.upstream.push(refusal)  # Claude Code's headers without its system prompt
        spoofer = self.proxy.connect()
        self.addCleanup(spoofer.close)
        self.assertEqual(self.served(CLAUDE_CODE, 1, spoofer)[0][1:], ["sk-ant-api03-ci"])
        for seen in self.served(CLAUDE_CODE, 3):  # Claude Code itself, on its own connection
            self.assertIn(seen, (["max1"], ["max2"]))
        self.assertEqual(self.served(CLAUDE_CODE, 1, spoofer), [["sk-ant-api03-ci"]])
        # A subscription account that serves the client clears what was remembered about it.
        self.ok("pause", "ci")
        self.assertIn(self.served(CLAUDE_CODE, 1, spoofer)[0], (["max1"], ["max2"]))
        self.ok("resume", "ci")
        self.assertIn(self.served(CLAUDE_CODE, 1, spoofer)[0], (["max1"], ["max2"]))
        # With client keys, the memory is the key's: another key's requests keep their route.
        keys = {name: self.proxy.app.store.add_client_key(name) for name in ("spoof", "cc")}
        self.upstream.push(refusal)
        self.assertEqual(self.served({**CLAUDE_CODE, "x-api-key": keys["spoof"]}, 1)[0][-1],
                         "sk-ant-api03-ci")
        self.assertEqual(self.served({**CLAUDE_CODE, "x-api-key": keys["spoof"]}, 1),
                         [["sk-ant-api03-ci"]])  # its own requests, on any connection
        self.assertIn(self.served({**CLAUDE_CODE, "x-api-key": keys["cc"]}, 1)[0],
                      (["max1"], ["max2"]))
        self.assert_no_account_marked()

    def test_a_remembered_client_gets_the_api_keys_429_not_the_subscriptions_400(self):
        self.ok("add", "ci", "--api-key", "--priority", "1", stdin="sk-ant-api03-ci\n")
        script = self.proxy.connect()
        self.addCleanup(script.close)
        self.assertEqual(self.served(SDK, 1, script)[0][-1], "sk-ant-api03-ci")
        self.upstream.push_for("sk-ant-api03-ci", reply_error(
            429, "rate_limit_error", "Number of requests has exceeded your rate limit",
            [("retry-after", "120")]))
        self.assertEqual(self.served(SDK, 1, script, status=429)[0][0], "sk-ant-api03-ci")
        response, body = self.last_answer
        self.assertEqual(json.loads(body)["error"]["type"], "rate_limit_error")
        self.assertIn(int(response.headers["retry-after"]), range(100, 121))

    def test_without_an_api_key_the_client_gets_the_400_and_the_log_says_why_once(self):
        for strategy in claudeflare.STRATEGY_NAMES:
            self.ok("config", "set", "lb_strategy", strategy)
            first = len(self.upstream.messages())
            status, _, body = self.post_message(headers=SDK)
            self.assertEqual(status, 400, strategy)
            self.assertIn("only authorized for use with Claude Code",
                          json.loads(body)["error"]["message"])
            self.assertEqual(len(self.upstream.messages()) - first, 1, strategy)
        self.assertEqual(CAPTURED_LOG.text().count("Subscription (OAuth) accounts serve Claude "
                                                   "Code only"), 2)  # once, in both formats
        self.assertIn("Anthropic/Python", CAPTURED_LOG.text())
        self.assertIn("add NAME --api-key", CAPTURED_LOG.text())
        self.assert_no_account_marked()
        self.proxy.settle()
        stats = json.loads(self.proxy.request("GET", "/api/stats")[2])
        self.assertEqual(stats["totals"]["claudeCodeOnlyRefusals"],
                         len(claudeflare.STRATEGY_NAMES))
        self.assertEqual({item["name"] for item in stats["accounts"]}, {None})
        self.assertEqual(self.listed()["max1"]["requests"], 0)
        self.assertEqual(self.served(CLAUDE_CODE, 1)[0][0][:3], "max")  # Claude Code still is


def overage_headers(reset_in_s: int = 3600, overage: str = "allowed") -> list:
    """The headers of an answer served on extra usage: the 5-hour window is spent."""
    reset = int(time.time()) + reset_in_s
    return [("anthropic-ratelimit-unified-status", "rejected"),
            ("anthropic-ratelimit-unified-reset", str(reset)),
            ("anthropic-ratelimit-unified-representative-claim", "five_hour"),
            ("anthropic-ratelimit-unified-5h-status", "rejected"),
            ("anthropic-ratelimit-unified-5h-reset", str(reset)),
            ("anthropic-ratelimit-unified-5h-utilization", "1.02"),
            ("anthropic-ratelimit-unified-overage-status", overage),
            ("anthropic-ratelimit-unified-overage-in-use", "true"),
            ("anthropic-ratelimit-unified-overage-reset", str(reset + 20 * 86400))]


def on_overage(reset_in_s: int = 3600):
    """An answer served on extra usage."""
    return reply_json(200, message_body(), overage_headers(reset_in_s))


class TestExtraUsage(RoutingTestCase):
    """Included quota first, paid capacity last; never a 429 while Anthropic would serve."""

    def test_an_account_on_extra_usage_is_marked_overage_and_tried_after_the_others(self):
        self.fault("a", on_overage(3600))
        self.assertEqual(self.distribution(3), {"a": 1, "b": 1, "c": 1})  # a served, billed
        account, now = self.listed()["a"], claudeflare.now_ms()
        self.assertEqual(account["status"], "overage")
        self.assertAlmostEqual((account["overageUntil"] - now) / 1000, 3600, delta=5)
        self.assertTrue(account["extraUsage"]["enabled"])
        self.assertAlmostEqual((account["extraUsage"]["resetsAt"] - now) / 86400000, 20,
                               delta=0.1)
        self.assertEqual(self.distribution(6), {"b": 3, "c": 3})
        self.assertRegex(self.ok("list"), r"\na\s.*overage until .* \(extra usage, billed\)")
        health = json.loads(self.proxy.request("GET", "/health")[2])
        self.assertEqual((health["status"], health["accounts"]["overage"]), ("degraded", 1))
        self.assertIn('claudeflare_account_status{account="a",status="overage"} 1',
                      self.proxy.request("GET", "/metrics")[2].decode().splitlines())
        page = self.proxy.request("GET", "/")[2].decode()
        self.assertIn('<span class="status overage">overage</span>', page)
        self.assertIn("extra usage on", page)
        records = json.loads(self.proxy.request("GET", "/api/requests")[2])
        self.assertEqual({type(record["overage"]) for record in records}, {bool})
        self.assertEqual([record["overage"] for record in records if
                          record["accountName"] == "a"], [True])
        self.assertEqual({record["overage"] for record in records if
                          record["accountName"] != "a"}, {False})

    def test_extra_usage_serves_when_every_account_has_spent_its_quota(self):
        for name in "abc":
            self.fault(name, *[on_overage(3600)] * 10)
        self.distribution(3)
        self.assertEqual({account["status"] for account in self.listed().values()},
                         {"overage"})
        self.assertEqual(sum(self.distribution(6).values()), 6)  # served: no 429
        self.assertNotIn("rate limited", CAPTURED_LOG.text())

    def test_overage_never_bills_once_then_benches_and_answers_429(self):
        self.ok("config", "set", "overage", "never")
        self.fault("b", on_overage(600))  # round-robin: the first request starts at b
        for name, reset_in in (("c", 1200), ("a", 1800)):
            self.fault(name, reply_error(429, "rate_limit_error", "limited",
                                         unified_headers("rejected", reset_in)))
        self.assertEqual(self.post_message()[0], 200)  # the one answer that cannot be avoided
        self.assertEqual(self.listed()["b"]["status"], "overage")
        for _ in range(2):
            status, headers, _ = self.post_message()
            self.assertEqual(status, 429)
            self.assertAlmostEqual(int(headers["retry-after"]), 600, delta=5)
        self.assertEqual([self.key_of(r) for r in self.upstream.messages()].count("b"), 1)
        health = json.loads(self.proxy.request("GET", "/health")[2])
        self.assertEqual(health["status"], "unavailable")
        for policy in ("last", "allow"):  # on the running server, b serves again at once
            self.ok("config", "set", "overage", policy)
            self.assertEqual(self.post_message()[0], 200, policy)
            self.assertEqual(self.key_of(self.upstream.messages()[-1]), "b")
            self.ok("config", "set", "overage", "never")
            self.assertEqual(self.post_message()[0], 429)

    def test_overage_allow_keeps_extra_usage_in_the_rotation(self):
        self.ok("config", "set", "overage", "allow")
        self.fault("a", on_overage(3600))
        self.distribution(3)
        self.assertEqual(self.listed()["a"]["status"], "overage")
        self.assertEqual(self.distribution(6), {"a": 2, "b": 2, "c": 2})

    def test_included_quota_back_ends_the_overage_state(self):
        self.ok("config", "set", "overage", "allow")
        self.fault("a", on_overage(3600), reply_json(200, message_body(), unified_headers(
            "allowed", 3600, 0.1, 0.1)))
        self.distribution(6)
        self.assertEqual(self.listed()["a"]["status"], "active")
        self.assertIn("Account a has included quota again", CAPTURED_LOG.text())

    def test_extra_usage_is_recorded_from_streams_and_reported_apart(self):
        self.fault("b", reply_stream(message_events("claude-opus-4-5"),
                                     headers=overage_headers(3600)))
        served = self.distribution(2, stream=True)
        self.assertEqual((served["b"], sum(served.values())), (1, 2))
        self.proxy.settle()
        stats = json.loads(self.proxy.request("GET", "/api/stats")[2])
        billed = [record for record in json.loads(self.proxy.request("GET",
                                                                     "/api/requests")[2])
                  if record["overage"]]
        self.assertEqual([record["accountName"] for record in billed], ["b"])
        self.assertEqual(stats["totals"]["overageRequests"], 1)
        self.assertAlmostEqual(stats["totals"]["overageCostUsd"], billed[0]["costUsd"])
        self.assertGreater(stats["totals"]["costUsd"], stats["totals"]["overageCostUsd"])
        self.assertEqual(sorted(item["overageRequests"] for item in stats["accounts"]), [0, 1])
        self.assertIn(f"1 on extra usage, ${billed[0]['costUsd']:.2f} billed", self.ok("stats"))
        page = self.proxy.request("GET", "/")[2].decode()
        self.assertIn(f"1 (${billed[0]['costUsd']:.2f})", page)


class TestPriority(RoutingTestCase):
    """A preferred account serves while it can; backups only while it cannot."""

    def test_a_lower_priority_group_serves_only_while_no_better_account_can(self):
        self.ok("priority", "b", "1")
        self.ok("priority", "c", "1")
        self.assertEqual(self.distribution(4), {"a": 4})
        self.fault("a", reply_error(429, "rate_limit_error", "limited",
                                    unified_headers("rejected", 3600)))
        self.assertEqual(self.distribution(4), {"a": 1, "b": 2, "c": 2})
        self.ok("resume", "a")  # as when its reset passes
        self.assertEqual(self.distribution(3), {"a": 3})

    def test_a_session_conversation_moved_to_a_backup_moves_back(self):
        self.ok("config", "set", "lb_strategy", "session")
        self.ok("priority", "b", "1")
        self.ok("pause", "c")
        conversation = {"X-Claude-Code-Session-Id": "conv-back"}
        self.assertEqual(self.distribution(2, conversation), {"a": 2})
        self.fault("a", reply_error(429, "rate_limit_error", "limited",
                                    unified_headers("rejected", 3600)))
        self.assertEqual(self.distribution(2, conversation), {"a": 1, "b": 2})
        self.ok("resume", "a")
        self.assertEqual(self.distribution(2, conversation), {"a": 2})

    def test_every_strategy_works_within_the_best_group(self):
        self.ok("priority", "a", "2")
        for strategy in claudeflare.STRATEGY_NAMES:
            self.ok("config", "set", "lb_strategy", strategy)
            served = set(self.distribution(4))
            self.assertTrue(served and served <= {"b", "c"}, (strategy, served))

    def test_extra_usage_comes_after_every_priority_group(self):
        self.ok("priority", "b", "5")
        self.ok("pause", "c")
        self.fault("a", on_overage(3600))
        self.assertEqual(self.distribution(1), {"a": 1})
        self.assertEqual(self.distribution(3), {"b": 3})

    def test_priority_is_set_shown_and_checked(self):
        self.ok("priority", "b", "3")
        self.ok("add", "backup", "--api-key", "--priority", "7", stdin="sk-ant-api03-x\n")
        self.assertEqual({name: account["priority"] for name, account in self.listed().items()},
                         {"a": 0, "b": 3, "c": 0, "backup": 7})
        self.assertRegex(self.ok("list"), r"\nb\s+api_key\s+1\s+3\s+active")
        accounts = json.loads(self.proxy.request("GET", "/api/accounts")[2])
        self.assertEqual(accounts[1]["priority"], 3)
        self.assertIn('data-label="Priority">7</td>', self.proxy.request("GET", "/")[2].decode())
        code, _, err = self.cli("priority", "b", "first")
        self.assertEqual(code, 2)
        self.assertIn("expected a whole number", err)
        code, _, err = self.cli("priority", "ghost", "1")
        self.assertIn("Account not found: ghost", err)


class TestResetFirst(RoutingTestCase):
    """reset-first spends first the quota that expires first."""

    settings = {**RoutingTestCase.settings, "lb_strategy": "reset-first"}

    def windows(self, **accounts) -> None:
        """Set each account's 5h window: (utilization, seconds to its reset)."""
        now = claudeflare.now_ms()
        for name, (used, reset_in) in accounts.items():
            self.proxy.app.store.update_account(name, utilization_5h=used,
                                                reset_5h=now + reset_in * 1000)

    def test_new_conversations_go_to_the_soonest_reset_and_stay(self):
        self.windows(a=(0.5, 3 * 3600), b=(0.3, 600))
        conversation = {"X-Claude-Code-Session-Id": "soon"}
        self.assertEqual(self.distribution(2, conversation), {"b": 2})
        self.assertEqual(self.distribution(2, {"X-Claude-Code-Session-Id": "other"}), {"b": 2})
        self.windows(a=(0.5, 60))  # a now resets sooner: new conversations go there
        self.assertEqual(self.distribution(1, {"X-Claude-Code-Session-Id": "new"}), {"a": 1})
        self.assertEqual(self.distribution(2, conversation), {"b": 2})  # sticky as session

    def new_conversations(self, count: int) -> collections.Counter:
        """Send one request for each of `count` new conversations; count who served them."""
        served = collections.Counter()
        for _ in range(count):
            self.turn = getattr(self, "turn", 0) + 1
            served += self.distribution(1, {"X-Claude-Code-Session-Id": f"new-{self.turn}"})
        return served

    def test_unknown_windows_come_last_soft_limited_after_and_ties_by_utilization(self):
        self.assertEqual(len(self.new_conversations(3)), 3)  # nothing known: they rotate
        self.windows(a=(0.6, 600), b=(0.2, 600))
        self.assertEqual(self.new_conversations(2), {"b": 2})
        self.proxy.app.store.update_account("b", rate_limit_status="allowed_warning",
                                            rate_limit_reset=claudeflare.now_ms() + 60_000)
        self.assertEqual(self.new_conversations(2), {"a": 2})
        self.ok("pause", "a")
        self.assertEqual(self.new_conversations(2), {"c": 2})  # unknown, still before b

    def test_the_strategy_is_validated_and_listed(self):
        self.ok("config", "set", "lb_strategy", "round-robin")
        self.ok("config", "set", "lb_strategy", "reset-first")
        code, _, err = self.cli("config", "set", "lb_strategy", "soonest")
        self.assertEqual(code, 1)
        self.assertIn("Invalid strategy: soonest", err)
        self.assertIn("reset-first", err)
        config = json.loads(self.proxy.request("GET", "/api/config")[2])
        self.assertIn("reset-first", config["strategies"])


SONNET, HAIKU, OPUS = "claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"


def ask(proxy: Proxy, model: str, stream: bool = False, headers=None):
    """Send a Messages request for a model; return (status, headers, body)."""
    body = {"model": model, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": "Hi"}]}
    return proxy.request("POST", "/v1/messages", body,
                         {"content-type": "application/json", **(headers or {})})


class TestModelWindows(RoutingTestCase):
    """A spent per-model weekly window keeps that family's models off the account, only them."""

    def served(self, model: str, count: int) -> collections.Counter:
        """Send requests for a model (each must succeed); count the accounts that served."""
        first = len(self.upstream.messages())
        for _ in range(count):
            status, _, body = ask(self.proxy, model)
            self.assertEqual(status, 200, body)
        return collections.Counter(self.key_of(request) for request in
                                   self.upstream.messages()[first:]
                                   if json.loads(request.body)["model"] == model)

    def test_a_spent_sonnet_window_sends_sonnet_elsewhere_and_keeps_haiku_and_opus(self):
        self.upstream.quotas["sk-ant-api03-a"] = {"7d_sonnet": Quota(0, 3600)}
        tried = self.served(SONNET, 6)
        self.assertEqual(tried["a"], 1)  # its 429, once: then it is known
        self.assertEqual(self.served(SONNET, 6)["a"], 0)
        self.assertEqual(self.served(HAIKU, 3), {"a": 1, "b": 1, "c": 1})
        self.assertEqual(self.served(OPUS, 3), {"a": 1, "b": 1, "c": 1})
        account = self.listed()["a"]
        self.assertEqual((account["status"], account["rateLimitedUntil"]), ("active", None))
        window = account["modelWindows"]["seven_day_sonnet"]
        self.assertTrue(window["limited"])
        self.assertAlmostEqual(window["resetsAt"] / 1000, time.time() + 3600, delta=5)
        self.assertIn("Account a has spent its weekly seven_day_sonnet", CAPTURED_LOG.text())
        self.assertRegex(self.ok("list"), r"\na\s.*active, weekly Sonnet limited until")
        api = {entry["name"]: entry for entry in
               json.loads(self.proxy.request("GET", "/api/accounts")[2])}
        self.assertTrue(api["a"]["modelWindows"]["seven_day_sonnet"]["limited"])
        self.assertFalse(api["b"]["modelWindows"])
        page = self.proxy.request("GET", "/")[2].decode()
        self.assertIn("weekly Sonnet: </span>limited", page)
        metrics = self.proxy.request("GET", "/metrics")[2].decode()
        self.assertIn('claudeflare_account_utilization{account="a",window="7d_sonnet"} 1', metrics)
        self.assertIn('claudeflare_account_model_limited{account="a",window="7d_sonnet"} 1',
                      metrics)

    def test_a_200_for_another_model_teaches_the_spent_window(self):
        self.upstream.quotas["sk-ant-api03-b"] = {"7d_opus": Quota(5, 3600, used=5)}
        self.assertEqual(self.served(HAIKU, 3), {"a": 1, "b": 1, "c": 1})
        self.assertEqual(self.served(OPUS, 6), {"a": 3, "c": 3})  # b is never asked
        self.assertEqual(self.listed()["b"]["status"], "active")

    def test_the_window_is_forgotten_at_its_reset(self):
        self.ok("pause", "b")
        self.ok("pause", "c")
        self.upstream.quotas["sk-ant-api03-a"] = {"7d_opus": Quota(1, 2)}
        self.assertEqual(self.served(OPUS, 1), {"a": 1})  # uses it up: 100%, learned
        self.assertEqual(ask(self.proxy, OPUS)[0], 429)
        self.assertEqual(len(self.upstream.messages()), 1)
        reset = self.listed()["a"]["modelWindows"]["seven_day_opus"]["resetsAt"]
        wait_for(lambda: claudeflare.now_ms() >= reset, what="the window's reset")
        self.assertEqual(self.served(OPUS, 1), {"a": 1})

    def test_every_account_spent_for_a_family_gives_a_429_naming_it(self):
        for name, reset_in in (("a", 900), ("b", 300), ("c", 600)):
            self.upstream.quotas[f"sk-ant-api03-{name}"] = {
                "7d_opus": Quota(2, reset_in, used=2)}
        status, headers, body = ask(self.proxy, OPUS)
        self.assertEqual(status, 429)
        self.assertAlmostEqual(int(headers["retry-after"]), 300, delta=5)
        self.assertEqual(len(self.upstream.messages()), 3)
        for _ in range(2):  # now known: no account is asked
            status, headers, body = ask(self.proxy, OPUS)
            self.assertEqual(status, 429)
            self.assertIn("weekly Opus limit (seven_day_opus)",
                          json.loads(body)["error"]["message"])
            self.assertAlmostEqual(int(headers["retry-after"]), 300, delta=5)
        self.assertEqual(len(self.upstream.messages()), 3)
        self.assertEqual(self.served(SONNET, 3), {"a": 1, "b": 1, "c": 1})
        self.assertEqual({account["status"] for account in self.listed().values()}, {"active"})

    def test_headroom_ranks_by_the_windows_of_the_model(self):
        self.ok("config", "set", "lb_strategy", "headroom")
        self.ok("pause", "c")
        later = claudeflare.now_ms() + 3_600_000
        store = self.proxy.app.store
        store.update_account("a", utilization_5h=0.1, reset_5h=later, model_windows=json.dumps(
            {"seven_day_sonnet": {"utilization": 0.9, "resetsAt": later}}))
        store.update_account("b", utilization_5h=0.5, reset_5h=later)
        self.assertEqual(self.served(SONNET, 2), {"b": 2})
        self.assertEqual(self.served(HAIKU, 2), {"a": 2})


class TestHold(ServerWithAccounts):
    """hold_s: a request waits for a window's real reset instead of getting the 429."""

    settings = {"hold_s": 30, "retry_delay_ms": 1}

    def setUp(self) -> None:
        super().setUp()
        self.add_key("a")
        # The documented knob, as a test reaches it: pings every 0.2 s instead of 15 s.
        self.proxy.app.holds.ping_interval_s = 0.2

    def spend(self, seconds: float = 2) -> float:
        """Spend account a's 5-hour window of the fake; return its reset (epoch s)."""
        quota = Quota(1, seconds, used=1)
        self.upstream.quotas["sk-ant-api03-a"] = {"5h": quota}
        return quota.reset

    def waiting(self) -> int:
        return json.loads(self.proxy.request("GET", "/api/stats")[2])["waiting"]

    def in_background(self, *args, **kwargs) -> dict:
        """Send ask(...) on a thread of its own; the dict gets its answer."""
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            answer=ask(self.proxy, *args, **kwargs)))
        worker.start()
        self.addCleanup(worker.join, DEADLINE_S)
        result["thread"] = worker
        return result

    def test_a_wait_for_a_reset_keeps_to_the_keys_priority_floor(self):
        self.add_key("b")
        self.ok("priority", "b", "1")
        key = re.search(r"cfk-\S+", self.ok("keys", "add", "ci", "--priority-floor", "1"))[0]
        self.upstream.quotas["sk-ant-api03-b"] = {"5h": Quota(1, 2, used=1)}
        status, _, body = ask(self.proxy, SONNET, headers={"x-api-key": key})
        self.assertEqual(status, 200, body)
        self.assertEqual({request.headers["x-api-key"] for request in self.upstream.messages()},
                         {"sk-ant-api03-b"})

    def ask_for_a_stream(self) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Ask for a stream on a connection of its own; return the connection and answer."""
        connection = self.proxy.connect()
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/messages", json.dumps(
            {"model": SONNET, "stream": True, "messages": []}).encode(),
            {"content-type": "application/json"})
        return connection, connection.getresponse()

    def test_the_next_request_after_a_held_stream_gets_a_whole_answer(self):
        self.spend(2)
        connection, first = self.ask_for_a_stream()
        self.assertIn(b"event: message_stop", first.read())
        connection.request("GET", "/api/stats")
        second = connection.getresponse()
        self.assertEqual(second.status, 200)
        self.assertIn("waiting", json.loads(second.read()))

    def test_a_plain_request_waits_for_the_reset_and_is_served(self):
        reset = self.spend()
        result = self.in_background(SONNET)
        wait_for(lambda: self.waiting() == 1, what="the request to wait")
        self.assertIn("Waiting for a reset</span><b>1</b>",
                      self.proxy.request("GET", "/")[2].decode())
        result["thread"].join(DEADLINE_S)
        status, _, body = result["answer"]
        self.assertEqual(status, 200, body)
        self.assertEqual(len(self.upstream.messages()), 2)  # its 429; no try while it waited
        quota = self.upstream.quotas["sk-ant-api03-a"]["5h"]
        self.assertEqual(quota.used, 1)
        self.assertGreater(quota.reset, reset)  # served in the window after the reset
        self.assertEqual(self.waiting(), 0)

    def test_a_stream_gets_its_200_at_once_pings_while_it_waits_then_the_events(self):
        self.spend(3)
        _, response = self.ask_for_a_stream()
        self.assertEqual((response.status, response.getheader("Content-Type")),
                         (200, "text/event-stream"))
        self.assertEqual(self.waiting(), 1)  # the 200 came before the wait ended
        data = response.read()
        self.assertTrue(data.startswith(b'event: ping\ndata: {"type": "ping"}\n\n'), data)
        self.assertEqual(data[data.index(b"event: message_start"):],
                         b"".join(message_events()))
        self.assertNotIn(b"error", data)

    def test_a_stream_whose_wait_ends_without_an_account_gets_an_error_event(self):
        self.upstream.push_for("sk-ant-api03-a", *[
            reply_error(429, "rate_limit_error", "limited", unified_headers("rejected", reset))
            for reset in (2, 3600)])
        connection = self.proxy.connect()
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/messages", json.dumps(
            {"model": SONNET, "stream": True, "messages": []}).encode())
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        data = response.read()
        self.assertIn(b"event: ping", data)
        event = json.loads(data[data.index(b"event: error"):].split(b"data: ", 1)[1])
        self.assertEqual(event["error"]["type"], "rate_limit_error")
        self.assertRegex(event["error"]["message"], r"retry after 3[56]\d\ds")
        self.assertEqual(len(self.upstream.messages()), 2)

    def test_past_hold_max_the_429_comes_at_once(self):
        self.ok("config", "set", "hold_max", "1")
        self.spend()
        result = self.in_background(SONNET)
        wait_for(lambda: self.waiting() == 1, what="the first request to wait")
        for stream in (False, True):
            status, headers, body = ask(self.proxy, SONNET, stream=stream)
            self.assertEqual(status, 429)
            self.assertIn("All accounts are rate limited", json.loads(body)["error"]["message"])
        self.assertIn("hold_max", CAPTURED_LOG.text())
        result["thread"].join(DEADLINE_S)
        self.assertEqual(result["answer"][0], 200)

    def test_a_reset_beyond_hold_s_gets_the_429_at_once(self):
        self.ok("config", "set", "hold_s", "1")
        self.spend(5)
        self.assertEqual(ask(self.proxy, SONNET)[0], 429)
        self.assertEqual(self.waiting(), 0)

    def test_a_client_gone_while_waiting_is_forgotten(self):
        reset = self.spend()
        body = json.dumps({"model": SONNET, "messages": []}).encode()
        client = socket.create_connection(("127.0.0.1", self.proxy.port))
        client.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: self.waiting() == 1, what="the request to wait")
        client.close()
        wait_for(lambda: self.waiting() == 0, what="the waiter to be forgotten")
        wait_for(lambda: time.time() >= reset, what="the reset")
        self.assertEqual(ask(self.proxy, SONNET)[0], 200)
        self.assertEqual(len(self.upstream.messages()), 2)  # the 429, then the new request
        self.proxy.settle()
        records = json.loads(self.proxy.request("GET", "/api/requests")[2])
        self.assertIn("Client disconnected while waiting", records[-1]["error"])

    def test_waiters_whose_reset_passed_go_on_in_arrival_order(self):
        holds, until = claudeflare.HoldQueue(), claudeflare.now_ms() + 300
        order, first_picked = [], threading.Event()

        def waiter(name: str) -> None:
            self.assertEqual(holds.wait(name, until, 10, None, lambda: False), "ready")
            order.append((name, holds.waiting))
            if name == "first":
                first_picked.wait(DEADLINE_S)  # still picking its account
            holds.done(name)

        threads = []
        for name in ("first", "second", "third"):
            threads.append(threading.Thread(target=waiter, args=(name,)))
            threads[-1].start()
            wait_for(lambda: holds.waiting == len(threads), what=f"{name} to wait")
        wait_for(lambda: order, what="the first to be ready")
        first_picked.set()
        for thread in threads:
            thread.join(DEADLINE_S)
        self.assertEqual(order, [("first", 3), ("second", 2), ("third", 1)])
        self.assertEqual(holds.wait("late", until, 3, None, lambda: False), "ready")
        holds.done("late")
        # A request that waits again (its account was taken meanwhile) keeps its first place.
        again, newcomer = claudeflare.now_ms() + 300, {}
        waiting = threading.Thread(target=lambda: newcomer.update(
            outcome=holds.wait("newcomer", again, 10, None, lambda: False)))
        waiting.start()
        wait_for(lambda: holds.waiting == 1, what="the newcomer to wait")
        self.assertEqual(holds.wait("returning", again, 10, None, lambda: False,
                                    arrived=time.monotonic() - 60), "ready")
        self.assertEqual((holds.waiting, newcomer), (2, {}))
        holds.done("returning")
        waiting.join(DEADLINE_S)
        self.assertEqual(newcomer, {"outcome": "ready"})
        holds.done("newcomer")
        holds.close()
        self.assertEqual(holds.wait("later", until, 3, None, lambda: False), "closed")


def usage_window(percent: float, resets_in_s: int) -> dict:
    """A window as GET /api/oauth/usage describes it (utilization in percent)."""
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
        seconds=resets_in_s)
    return {"utilization": percent, "resets_at": moment.isoformat()}


class TestUsageReads(ServerWithAccounts):
    """Idle accounts' windows are read without spending a request, and never on its path."""

    settings = {"usage_poll_s": 1}

    def reads(self) -> int:
        return len(self.upstream.oauth.usage_reads)

    def test_idle_account_windows_are_read_and_folded_in(self):
        self.upstream.oauth.usage_answer = {
            "five_hour": usage_window(15.0, 7200), "seven_day": usage_window(48.0, 3 * 86400),
            "seven_day_opus": usage_window(30.0, 3 * 86400), "seven_day_sonnet": None,
            "seven_day_oauth_apps": None, "brand_new_window": {"utilization": 99},
            "extra_usage": {"is_enabled": False, "monthly_limit": None, "used_credits": 0.0,
                            "utilization": None, "currency": "USD",
                            "disabled_reason": "org_level_disabled"},
            "limits": [{"kind": "session", "percent": 15}]}
        access, _ = self.add_oauth("max")
        wait_for(lambda: self.listed()["max"]["utilization5h"] == 0.15, what="a usage read")
        account, now = self.listed()["max"], claudeflare.now_ms()
        self.assertEqual(account["utilization7d"], 0.48)
        self.assertAlmostEqual((account["reset5h"] - now) / 1000, 7200, delta=5)
        self.assertEqual(list(account["modelWindows"]), ["seven_day_opus"])
        self.assertEqual(account["modelWindows"]["seven_day_opus"]["utilization"], 0.3)
        self.assertEqual(account["extraUsage"]["enabled"], False)
        self.assertEqual(account["extraUsage"]["disabledReason"], "org_level_disabled")
        self.assertIsNotNone(account["usageReadAt"])
        self.assertEqual(self.upstream.messages(), [])  # not a single request spent
        self.assertEqual(set(self.upstream.oauth.usage_reads), {access})
        self.assertIn("15%", self.proxy.request("GET", "/")[2].decode())

    def test_usage_answers_are_held_to_percentages_and_a_few_windows(self):
        answer = {f"seven_day_model_{index:05}": usage_window(10.0, 3600)
                  for index in range(50_000)}
        answer.update({"five_hour": usage_window(1e308, 7200),
                       "seven_day": usage_window(-5.0, 86400),
                       "seven_day_opus": usage_window(250.0, 86400)})
        self.upstream.oauth.usage_answer = answer
        self.add_oauth("max")
        wait_for(lambda: self.listed()["max"]["usageReadAt"] is not None, what="a usage read")
        account = self.listed()["max"]
        self.assertEqual((account["utilization5h"], account["utilization7d"]), (1.0, 0.0))
        self.assertEqual(account["modelWindows"]["seven_day_opus"]["utilization"], 1.0)
        self.assertEqual(len(account["modelWindows"]), 1 + claudeflare.MAX_OTHER_WINDOWS)
        self.assertIn("seven_day_model_00000", account["modelWindows"])
        self.assertLess(len(self.proxy.request("GET", "/api/accounts")[2]), 10_000)
        self.assertIn("100%", self.proxy.request("GET", "/")[2].decode())

    def test_a_spent_model_window_read_keeps_that_model_off_the_account(self):
        self.upstream.oauth.usage_answer = {"seven_day_sonnet": usage_window(100.0, 3600)}
        access, _ = self.add_oauth("max")
        self.add_key("key")
        wait_for(lambda: self.listed()["max"]["modelWindows"].get("seven_day_sonnet", {}).get(
            "limited"), what="the read of a spent window")
        self.ok("config", "set", "lb_strategy", "round-robin")
        for model in (SONNET, SONNET, SONNET, SONNET, HAIKU, HAIKU, HAIKU, HAIKU):
            self.assertEqual(ask(self.proxy, model)[0], 200)
        served = collections.Counter(
            (request.json()["model"], request.headers["x-api-key"] or "max")
            for request in self.upstream.messages())
        self.assertEqual(served, {(SONNET, "sk-ant-api03-key"): 4, (HAIKU, "max"): 2,
                                  (HAIKU, "sk-ant-api03-key"): 2})

    def test_reads_are_paced_and_can_be_turned_off(self):
        self.add_oauth("max")
        self.add_key("key")  # API-key accounts have no usage endpoint
        wait_for(lambda: self.reads() >= 1, what="the first read")
        first = self.reads()
        time.sleep(2.0)
        self.assertLessEqual(self.reads() - first, 3)  # one a second at most
        self.assertGreaterEqual(self.reads() - first, 1)
        self.ok("config", "set", "usage_poll_s", "0")
        self.assertEqual(self.post_message()[0], 200)  # the server applies the file
        settled = self.reads()
        time.sleep(1.2)
        self.assertEqual(self.reads(), settled)

    def test_a_429_from_the_usage_endpoint_backs_off_and_marks_nothing(self):
        self.upstream.oauth.usage_failures.append(reply_error(
            429, "rate_limit_error", "slow down", [("retry-after", "30")]))
        self.add_oauth("max")
        wait_for(lambda: self.reads() == 1, what="the first read")
        time.sleep(1.5)  # the reader looks once a second
        self.assertEqual(self.reads(), 1)
        account = self.listed()["max"]
        self.assertEqual((account["status"], account["needsReauth"], account["utilization5h"]),
                         ("active", False, None))
        self.assertIn("Usage read of account max failed: 429", CAPTURED_LOG.text())
        self.assertIn("next try in 60s", CAPTURED_LOG.text())

    def test_a_refused_token_is_not_read_again_until_it_is_renewed(self):
        access, _ = self.add_oauth("max")
        self.upstream.oauth.access_tokens.discard(access)
        wait_for(lambda: self.reads() == 1, what="the first read")
        time.sleep(1.5)  # the reader looks once a second
        self.assertEqual(self.reads(), 1)
        account = self.listed()["max"]
        self.assertEqual((account["status"], account["needsReauth"]), ("active", False))
        fresh = self.proxy.app.tokens.refresh(self.stored("max"), claudeflare.now_ms())
        wait_for(lambda: self.upstream.oauth.usage_reads[-1] == fresh.access_token,
                 what="a read with the new token")

    def poll_rarely(self) -> None:
        """Read each account once, then not for ten minutes."""
        self.ok("config", "set", "usage_poll_s", "600")
        self.assertEqual(self.proxy.request("GET", "/health")[0], 200)  # applies the file

    def test_a_header_seen_after_the_read_wins(self):
        self.poll_rarely()
        self.upstream.oauth.usage_answer = {"five_hour": usage_window(15.0, 7200)}
        access, _ = self.add_oauth("max")
        wait_for(lambda: self.listed()["max"]["utilization5h"] == 0.15, what="a usage read")
        self.upstream.push_for(access, reply_json(200, message_body(), unified_headers(
            "allowed", 3600, 0.9, 0.2)))
        self.assertEqual(self.post_message()[0], 200)
        self.assertEqual(self.listed()["max"]["utilization5h"], 0.9)
        self.assertEqual(self.reads(), 1)

    def test_a_read_does_not_replace_a_header_seen_while_it_ran(self):
        self.poll_rarely()
        self.upstream.oauth.usage_answer = {"five_hour": usage_window(15.0, 7200)}
        request_done = threading.Event()
        self.addCleanup(request_done.set)

        def slow_read(handler, request) -> None:
            request_done.wait(DEADLINE_S)
            handler.send_whole(200, json.dumps(self.upstream.oauth.usage_answer).encode())

        self.upstream.oauth.usage_failures.append(slow_read)
        access, _ = self.add_oauth("max")
        wait_for(lambda: self.reads() == 1, what="the read to begin")
        self.upstream.push_for(access, reply_json(200, message_body(), unified_headers(
            "allowed", 3600, 0.9, 0.2)))
        self.assertEqual(self.post_message()[0], 200)
        request_done.set()
        wait_for(lambda: self.listed()["max"]["usageReadAt"], what="the read to end")
        self.assertEqual(self.listed()["max"]["utilization5h"], 0.9)

    def test_a_stream_that_began_before_a_read_does_not_replace_it(self):
        self.upstream.oauth.usage_answer = {"five_hour": usage_window(15.0, 7200)}
        access, _ = self.add_oauth("max")
        wait_for(lambda: self.reads() >= 1, what="the first read")
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.upstream.push_for(access, reply_stream(message_events(), hold_after=2, gate=gate,
                                                    headers=unified_headers("allowed", 3600,
                                                                            0.9, 0.2)))
        worker = threading.Thread(target=self.post_message, kwargs={"stream": True})
        worker.start()
        wait_for(lambda: self.upstream.holding.is_set(), what="the stream to begin")
        reads = self.reads()
        wait_for(lambda: self.reads() > reads, what="a read while the stream runs")
        wait_for(lambda: self.proxy.app.accounts()[0].utilization_5h == 0.15,
                 what="the read to be folded in")
        self.proxy.app.writer.flush()  # the read is stored before the stream's record
        gate.set()
        worker.join()
        self.assertEqual(self.listed()["max"]["utilization5h"], 0.15)

    def test_an_account_marked_limited_is_read_again_soon(self):
        self.poll_rarely()
        access, _ = self.add_oauth("max")
        self.add_key("spare")
        wait_for(lambda: self.reads() == 1, what="the first read")
        self.proxy.app.store.update_account("spare", utilization_5h=0.99,
                                            reset_5h=claudeflare.now_ms() + 3_600_000)
        self.upstream.push_for(access, reply_error(429, "rate_limit_error", "limited",
                                                   unified_headers("rejected", 3600)))
        self.assertEqual(self.post_message()[0], 200)
        self.assertEqual(self.listed()["max"]["status"], "rate_limited")
        wait_for(lambda: self.reads() == 2, timeout=6, what="a read soon after the mark")


###############################################################################
# Alerts ######################################################################
###############################################################################

class WebhookReceiver:
    """A local webhook destination: records every alert that arrives, and can answer 500 or
    hang (hold the connection without a word until released) when told to."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[str, dict, bytes]] = []
        #: What to do with the next posts, in order: 500 or "hang"; then 200.
        self.faults: collections.deque = collections.deque()
        self.hanging = threading.Event()
        self.released = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.received.append((self.path, dict(self.headers), body))
                    fault = receiver.faults.popleft() if receiver.faults else 200
                if fault == "hang":
                    receiver.hanging.set()
                    receiver.released.wait(DEADLINE_S * 3)
                    self.close_connection = True
                    return
                self.send_response(fault)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook/T0SECRET/B0SECRET") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def events(self, name: str | None = None) -> list[dict]:
        """The JSON alerts that arrived (optionally of one event), oldest first."""
        with self.lock:
            bodies = [json.loads(body) for _, _, body in self.received]
        return [body for body in bodies if name is None or body.get("event") == name]

    def texts(self) -> list[str]:
        with self.lock:
            return [body.decode() for _, _, body in self.received]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


ALERT_SCRIPT = """import json, os, sys
alert = json.load(sys.stdin)
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"alert": alert, "event": os.environ["CLAUDEFLARE_ALERT_EVENT"],
                          "severity": os.environ["CLAUDEFLARE_ALERT_SEVERITY"]}) + "\\n")
if os.path.exists(sys.argv[1] + ".fail"):
    sys.stderr.write("mailbox full\\nsecond line\\n")
    sys.exit(3)
"""


class TestAlerts(ServerWithAccounts):
    """Each event comes from its real condition, in each format, once; sending never slows a
    request, and no secret leaves."""

    alert_format = "json"

    def setUp(self) -> None:
        self.hook = WebhookReceiver()
        self.addCleanup(self.hook.close)
        self.settings = {"alert_url": self.hook.url(), "alert_format": self.alert_format}
        super().setUp()
        self.addCleanup(self.hook.released.set)  # before the server stops
        self.alerts = self.proxy.app.alerts
        self.alerts.retry_delays_s = (0.05, 0.05)

    def arrived(self, count: int = 1, event: str | None = None) -> list:
        """Wait for count alerts (of an event) at the receiver; return them."""
        return wait_for(lambda: len(self.hook.events(event)) >= count and
                        self.hook.events(event), what=f"{count} {event or 'alerts'}")

    def api_alerts(self) -> list[dict]:
        return json.loads(self.proxy.request("GET", "/api/alerts")[2])["alerts"]

    def assert_no_secret_anywhere(self, *secrets: str) -> None:
        """Neither the webhook's path nor a credential in what went out or is shown."""
        shown = [*self.hook.texts(), self.proxy.request("GET", "/api/alerts")[2].decode(),
                 self.proxy.request("GET", "/api/config")[2].decode(),
                 self.proxy.request("GET", "/")[2].decode(), self.ok("alerts", "list"),
                 CAPTURED_LOG.text()]
        for text in shown:
            for secret in ("T0SECRET", "sk-ant-") + secrets:
                self.assertNotIn(secret, text)

    def test_a_refused_refresh_sends_account_needs_login_once(self):
        access, refresh = self.add_oauth("max", expires_in_ms=-1000)
        self.add_key("spare")
        self.upstream.oauth.failures.append((400, {
            "error": "invalid_grant", "error_description": f"Refresh token {refresh} revoked"}))
        for _ in range(3):
            self.assertEqual(self.post_message()[0], 200)
        alert = self.arrived(event="account_needs_login")[0]
        self.assertEqual((alert["severity"], alert["account"], alert["fix"]),
                         ("error", "max", "python3 claudeflare.py reauth max"))
        self.assertIn("Account max needs a new login: refresh refused", alert["message"])
        self.assertIn("[REDACTED] revoked", alert["message"])
        self.upstream.push_for("sk-ant-api03-spare", reply_json(
            200, message_body(), unified_headers("allowed", 3600, five_hour=0.81)))
        self.assertEqual(self.post_message()[0], 200)
        self.arrived(event="window_threshold")  # a later alert: a repeat would have come first
        self.assertEqual(len(self.hook.events("account_needs_login")), 1)
        stored = wait_for(lambda: [alert for alert in self.api_alerts()
                                   if alert["event"] == "account_needs_login"
                                   and alert["deliveries"][0]["result"] == "sent"],
                          what="the delivery to be recorded")
        self.assertEqual(stored[0]["deliveries"][0]["destination"], "127.0.0.1")
        self.assertEqual(stored[0]["deliveries"][0]["answer"], "200 OK")
        self.assertIn("account_needs_login", self.ok("alerts", "list"))
        page = self.proxy.request("GET", "/")[2].decode()
        self.assertIn("<h2>Alerts</h2>", page)
        self.assertIn("127.0.0.1: sent (200 OK)", page)
        metrics = self.proxy.request("GET", "/metrics")[2].decode().splitlines()
        self.assertIn('claudeflare_alerts_total{event="account_needs_login",result="sent"} 1',
                      metrics)
        self.assert_no_secret_anywhere(access[10:], refresh[10:])

    def test_a_usage_read_over_a_threshold_is_alerted_without_any_request(self):
        self.upstream.oauth.usage_answer = {"five_hour": usage_window(15.0, 7200),
                                            "seven_day": usage_window(96.0, 3 * 86400)}
        self.add_oauth("max")
        alert = self.arrived(event="window_threshold")[0]
        self.assertIn("Account max has used 96% of its 7-day window (threshold 95%)",
                      alert["message"])
        self.assertEqual(self.upstream.messages(), [])

    def test_refresh_failing_for_long_is_alerted_with_the_error(self):
        self.alerts.refresh_failing_after_ms = 0
        self.add_oauth("max", expires_in_ms=-1000)
        self.add_key("spare")
        self.upstream.oauth.failures.append((503, {"error": "temporarily_unavailable"}))
        self.assertEqual(self.post_message()[0], 200)
        alert = self.arrived(event="refresh_failing")[0]
        self.assertEqual(alert["account"], "max")
        self.assertIn("Refreshing the token of account max has failed", alert["message"])
        self.assertIn("temporarily_unavailable", alert["message"])

    def test_a_refresh_failure_from_before_a_new_login_is_not_alerted(self):
        self.add_oauth("max", expires_in_ms=-1000)
        self.add_key("spare")
        self.upstream.oauth.failures.append((503, {"error": "temporarily_unavailable"}))
        self.assertEqual(self.post_message()[0], 200)
        wait_for(lambda: self.proxy.app.tokens.refresh_failures, what="the failure")
        access, refresh = self.upstream.oauth.issue()  # what `reauth max` stores
        self.proxy.app.store.change_account("max", access_token=access, refresh_token=refresh,
                                            expires_at=claudeflare.now_ms() + 3_600_000)
        self.alerts.refresh_failing_after_ms = 0
        for credential in ("sk-ant-api03-spare", access):  # whichever serves next
            self.upstream.push_for(credential, reply_json(
                200, message_body(), unified_headers("allowed", 3600, five_hour=0.81)))
        self.assertEqual(self.post_message()[0], 200)
        self.arrived(event="window_threshold")
        self.assertEqual(self.hook.events("refresh_failing"), [])

    def test_the_database_refusing_records_is_alerted_and_the_alert_still_sent(self):
        self.alerts.records_unsaved_after_s = 0
        self.add_key("spare")
        holder = DatabaseHolder(self.proxy.db_path)
        self.addCleanup(holder.release)
        self.assertEqual(self.post_message()[0], 200)
        alert = self.arrived(event="records_unsaved")[0]
        self.assertEqual(alert["severity"], "critical")
        self.assertIn("request records held in memory", alert["message"])
        self.assertIn("Could not store an alert", CAPTURED_LOG.text())
        holder.release()

    def test_a_destination_answering_500_is_retried_then_recorded_as_failed(self):
        self.hook.faults.extend([500, 500, 500])
        self.add_key("a")
        self.upstream.push_for("sk-ant-api03-a", reply_json(200, message_body(), unified_headers(
            "allowed", 3600, five_hour=0.9)))
        self.assertEqual(self.post_message()[0], 200)
        self.arrived(3)
        delivery = wait_for(lambda: [alert["deliveries"][0] for alert in self.api_alerts()
                                     if alert["deliveries"][0]["result"] == "failed"],
                            what="the delivery to be given up")[0]
        self.assertEqual(delivery["attempts"], 3)
        self.assertEqual(delivery["answer"], "500 Internal Server Error: ok")
        self.assertEqual(len(self.hook.events()), 3)
        metrics = self.proxy.request("GET", "/metrics")[2].decode().splitlines()
        self.assertIn('claudeflare_alerts_total{event="window_threshold",result="failed"} 1',
                      metrics)

    def test_a_hanging_destination_never_delays_a_request_and_is_tried_again(self):
        self.hook.faults.extend(["hang", "hang"])
        self.add_key("a")
        self.upstream.push_for("sk-ant-api03-a", reply_json(200, message_body(), unified_headers(
            "allowed", 3600, five_hour=0.9)))
        self.assertEqual(self.post_message()[0], 200)
        self.assertTrue(self.hook.hanging.wait(DEADLINE_S))
        for _ in range(5):  # served while the destination still holds the alert
            self.assertEqual(self.post_message()[0], 200)
        self.assertFalse(self.hook.released.is_set())
        self.hook.released.set()
        wait_for(lambda: [alert for alert in self.api_alerts()
                          if alert["deliveries"][0]["result"] == "sent"
                          and alert["deliveries"][0]["attempts"] == 3],
                 what="the third try to be recorded")
        self.assertEqual(len(self.hook.events("window_threshold")), 3)

    def test_alert_command_gets_the_json_and_its_failure_is_recorded(self):
        script = os.path.join(self.proxy.dir.name, "alert.py")
        out = os.path.join(self.proxy.dir.name, "alerts.jsonl")
        with open(script, "w") as file:
            file.write(ALERT_SCRIPT)
        self.ok("config", "set", "alert_url", "")
        self.ok("config", "set", "alert_command", f"{sys.executable} {script} {out}")
        printed = self.ok("alerts", "test")
        self.assertRegex(printed, r"command python[\d.]* \(command\): sent: exit 0")
        with open(out) as file:
            line = json.loads(file.readline())
        self.assertEqual((line["event"], line["severity"], line["alert"]["event"]),
                         ("test", "info", "test"))
        with open(out + ".fail", "w"):
            pass
        code, printed, err = self.cli("alerts", "test")
        self.assertEqual(code, 1)
        self.assertIn("FAILED: exit 3: mailbox full", printed)
        self.assertIn("1 of 1 alert destinations did not take the test alert", err)
        listed = json.loads(self.ok("alerts", "list", "--json"))
        self.assertEqual(listed["alerts"][0]["deliveries"][0]["result"], "failed")
        self.assertEqual(listed["alerts"][1]["deliveries"][0]["answer"], "exit 0")
        self.assertEqual(self.hook.events(), [])

    def test_alerts_test_posts_through_the_outbound_proxy(self):
        tunnel = ConnectProxy()
        self.addCleanup(tunnel.close)
        with unittest.mock.patch.dict(os.environ, {"HTTP_PROXY": tunnel.url}):
            printed = self.ok("alerts", "test")
        self.assertIn("127.0.0.1 (json): sent: 200 OK", printed)
        self.assertEqual(tunnel.tunnels, [self.hook.url("").split("//")[1]])
        self.assertEqual(self.hook.events()[0]["event"], "test")

    def test_doctor_checks_each_destination_and_sends_a_test_when_asked(self):
        self.ok("config", "set", "alert_command", "no-such-notifier --to ops")
        out = self.cli("doctor")[1]
        self.assertIn("ok    alerts: 127.0.0.1: json webhook\n", out)
        self.assertIn("FAIL  alerts: command no-such-notifier: no-such-notifier is not found or "
                      "not executable", out)
        self.assertEqual(self.hook.events(), [])
        out = self.cli("doctor", "--send-test")[1]
        self.assertIn("ok    alerts: 127.0.0.1: json webhook; test alert: 200 OK", out)
        self.assertEqual(self.hook.events()[0]["event"], "test")
        self.assertNotIn("T0SECRET", out)
        self.assertIn("alert_url=http://127.0.0.1:", out)

    def test_alert_settings_are_checked_and_shown_without_their_secrets(self):
        for key, value, error in (
                ("alert_url", "ftp://example.com/x", "URL 1 is not one"),
                ("alert_format", "teams", "expected one of auto, json, slack, discord, ntfy"),
                ("alert_thresholds", "80,120", "must be 100 or less"),
                ("alert_command", "'unbalanced", "cannot split"),
                ("alert_repeat_s", "5", "must be 60 or more")):
            code, _, err = self.cli("config", "set", key, value)
            self.assertEqual(code, 1)
            self.assertIn(error, err)
        self.ok("config", "set", "alert_thresholds", "95, 80")
        self.assertEqual(self.ok("config", "get", "alert_thresholds").strip(), "80,95")
        self.ok("config", "set", "alert_command", "notify-send --token=abcSECRET")
        self.assertEqual(self.proxy.request("GET", "/health")[0], 200)  # reloads the settings
        settings = json.loads(self.proxy.request("GET", "/api/config")[2])["settings"]
        self.assertEqual(settings["alertUrl"], self.hook.url("/..."))
        self.assertEqual(settings["alertCommand"], "notify-send ...")
        self.assertNotIn("SECRET", CAPTURED_LOG.text())

    def test_stored_alerts_and_waiting_deliveries_are_bounded(self):
        alerts = claudeflare.Alerts(self.proxy.app.settings, self.proxy.app.store,
                                    lambda: claudeflare.Watched([]), self.proxy.app.writer.flush)
        alerts.close()  # nothing is delivered: every alert waits
        for number in range(claudeflare.ALERT_QUEUE_MAX + 5):
            alerts.raise_alert(claudeflare.Alert("test", f"number {number}", "", None, "test"),
                               claudeflare.now_ms())
        self.assertEqual(len(alerts.deliveries), claudeflare.ALERT_QUEUE_MAX)
        self.assertEqual(alerts.counts["test", "dropped"], 5)
        oldest = self.proxy.app.store.recent_alerts(claudeflare.MAX_STORED_ALERTS)[-1]
        self.assertEqual((oldest["message"], oldest["deliveries"][0]["result"]),
                         ("number 0", "dropped"))
        store = self.proxy.app.store
        for number in range(claudeflare.MAX_STORED_ALERTS):
            store.add_alert(claudeflare.Alert("test", f"more {number}", created_at=1), ["x"])
        self.assertEqual(store.query("SELECT COUNT(*) FROM alerts")[0][0],
                         claudeflare.MAX_STORED_ALERTS)
        self.assertEqual(store.query("SELECT COUNT(*) FROM alert_deliveries")[0][0],
                         claudeflare.MAX_STORED_ALERTS)

    def test_auto_format_follows_the_host(self):
        for url, expected in (("https://hooks.slack.com/services/T/B/X", "slack"),
                              ("https://discord.com/api/webhooks/1/x", "discord"),
                              ("https://ntfy.sh/topic", "ntfy"),
                              ("https://ntfy.example.org/topic", "ntfy"),
                              ("https://example.com/hook", "json")):
            self.assertEqual(claudeflare.alert_format_for(url, "auto"), expected)
        self.assertEqual(claudeflare.alert_format_for("https://ntfy.sh/t", "json"), "json")

    def test_a_condition_repeats_after_alert_repeat_s_and_a_flapping_one_does_not_flood(self):
        self.proxy.app.store.add_account("lost", "api_key", 1, api_key="sk-ant-api03-lost",
                                         needs_reauth=1, reauth_reason="invalid x-api-key",
                                         utilization_7d=0.9, reset_7d=claudeflare.now_ms()
                                         + 3 * claudeflare.DAY_S * 1000)
        self.arrived(event="account_needs_login")
        self.arrived(event="window_threshold")
        state = {"accounts": self.proxy.app.store.accounts()}
        alerts = claudeflare.Alerts(self.proxy.app.settings, self.proxy.app.store,
                                    lambda: claudeflare.Watched(state["accounts"]),
                                    self.proxy.app.writer.flush)
        alerts.close()  # its thread stops: time is given below
        raised = lambda: alerts.counts["account_needs_login", "raised"]  # noqa: E731
        start = claudeflare.now_ms()
        alerts.look(start, 0)
        self.assertEqual(raised(), 0)  # sent by the server just now: not again after a restart
        repeat_ms = self.proxy.app.settings.alert_repeat_s * 1000
        alerts.look(start + repeat_ms + 1, 0)
        self.assertEqual(raised(), 1)
        self.assertEqual(alerts.counts["window_threshold", "raised"], 0)  # once per window
        healthy = [claudeflare.dataclasses.replace(account, needs_reauth=False)
                   for account in state["accounts"]]
        minute = 60_000
        moment = start + repeat_ms + 1
        for _ in range(10):  # flapping once a minute
            moment += minute
            state["accounts"] = healthy
            alerts.look(moment, 0)
            moment += minute
            state["accounts"] = self.proxy.app.store.accounts()
            alerts.look(moment, 0)
        self.assertEqual(raised(), 2)  # one comeback after the quiet time, not ten


class TestAlertFormats(ServerWithAccounts):
    """Slack, Discord and ntfy get their own shapes; every event from its real condition."""

    def setUp(self) -> None:
        self.hook = WebhookReceiver()
        self.addCleanup(self.hook.close)
        super().setUp()

    def use(self, format: str) -> None:
        """Point alerts at the receiver while the server runs (live reload)."""
        self.ok("config", "set", "alert_url", self.hook.url())
        self.ok("config", "set", "alert_format", format)

    def with_text(self, text: str, count: int = 1) -> list[tuple[dict, bytes]]:
        """Wait for count alerts whose body says a text; return their headers and bodies.

        A rate-limited answer's headers also put its window over the thresholds: those
        alerts arrive too.
        """
        def found() -> list[tuple[dict, bytes]]:
            with self.hook.lock:
                return [(headers, body) for _, headers, body in self.hook.received
                        if text in body.decode()]
        return wait_for(lambda: len(found()) >= count and found(), what=f"alerts with {text}")

    def test_slack_gets_pool_exhausted_once_then_pool_recovered(self):
        self.use("slack")
        for name in ("a", "b"):
            self.add_key(name)
            self.upstream.push_for(f"sk-ant-api03-{name}", reply_error(
                429, "rate_limit_error", "limited", unified_headers("rejected", 3600)))
        for _ in range(4):
            self.post_message()
        _, body = self.with_text("No account can serve")[0]
        self.assertEqual(list(json.loads(body)), ["text"])
        self.assertTrue(json.loads(body)["text"].startswith(
            "*claudeflare critical*: No account can serve (2 rate_limited); the first resets "
            "at "))
        self.ok("resume", "a")
        _, body = self.with_text("can serve again")[0]
        self.assertIn("Accounts can serve again: a", json.loads(body)["text"])
        self.assertEqual(len(self.with_text("No account can serve")), 1)

    def test_discord_gets_overage_started_with_the_policy(self):
        self.use("discord")
        self.add_key("a")
        self.upstream.push_for("sk-ant-api03-a", on_overage(3600))
        for _ in range(3):
            self.assertEqual(self.post_message()[0], 200)
        _, body = self.with_text("extra usage")[0]
        content = json.loads(body)["content"]
        self.assertIn("**claudeflare warning**: Account a is serving on extra usage (billed to "
                      "its owner) until", content)
        self.assertIn("overage is last\nFix: python3 claudeflare.py config set overage never",
                      content)
        self.assertEqual(len(self.with_text("extra usage")), 1)

    def test_ntfy_gets_each_window_threshold_once_as_plain_text_with_headers(self):
        self.use("ntfy")
        self.add_key("a")
        for used, expected in ((0.85, "threshold 80%"), (0.86, "threshold 80%"),
                               (0.97, "threshold 95%")):
            self.upstream.push_for("sk-ant-api03-a", reply_json(200, message_body(),
                                                                unified_headers("allowed", 3600,
                                                                                five_hour=used)))
            self.assertEqual(self.post_message()[0], 200)
            self.with_text(expected)
        headers, body = self.with_text("threshold 80%")[0]
        self.assertEqual(headers["Title"], "claudeflare: window_threshold (a)")
        self.assertEqual(headers["Priority"], "default")
        self.assertEqual(headers["Tags"], "warning,window_threshold")
        self.assertTrue(body.decode().startswith("Account a has used 85% of its 5-hour window "
                                                 "(threshold 80%)"))
        self.assertIn("\nFix: python3 claudeflare.py list", body.decode())
        self.assertEqual(len(self.with_text("threshold 80%")), 1)  # arrived before the 95%


###############################################################################
# The request path: its pure parts, without a server ##########################
###############################################################################

def client_key(name: str, secret: str) -> claudeflare.ClientKey:
    """A client key as the database holds it: its salted hash, never the secret."""
    return claudeflare.ClientKey(id=1, name=name, salt="salt", created_at=0,
                                 key_hash=claudeflare.ClientKey.digest("salt", secret))


def local_request(method: str, path: str, body: bytes = b"", **headers: str):
    """A request as the route table's endpoints see it, with no socket behind it."""
    pairs = [(name.replace("_", "-"), value) for name, value in headers.items()]
    return claudeflare.LocalRequest(method, path, {}, claudeflare.Headers(pairs), lambda: body,
                                    None)


class TestStrictHTTP(unittest.TestCase):
    """The strict HTTP/1.1 server's parsing, as functions of bytes."""

    def test_header_lines_are_tokens_with_values_free_of_controls(self):
        parse = claudeflare.StrictHTTPHandler.parse_header_lines
        headers = parse([b"Host: localhost\r", b"X-Folded: a", b"  b", b"x-api-key:  k  "])
        self.assertEqual(headers.items(), [("Host", "localhost"), ("X-Folded", "a b"),
                                           ("x-api-key", "k")])
        for line, status in ((b"Bad Name: x", 400), (b"X: a\rb", 400), (b"X: a\x00", 400),
                             (b"NoColon", 400), (b"X: " + b"a" * 70_000, 431)):
            with self.subTest(line=line[:20]):
                with self.assertRaises(claudeflare.RequestRefused) as refused:
                    parse([line])
                self.assertEqual(refused.exception.status, status)
        with self.assertRaises(claudeflare.RequestRefused) as refused:
            parse([b"X: y"] * (claudeflare.MAX_HEADER_LINES + 1))
        self.assertEqual(refused.exception.status, 431)

    def test_chunk_size_lines_are_read_as_rfc_9112_says(self):
        line = claudeflare.CHUNK_LINE.fullmatch
        for good in (b"1a\r\n", b"0\n", b"A;name\r\n", b"5 ; n = v\r\n", b'5;n="q \\" x"\r\n'):
            self.assertIsNotNone(line(good), good)
        for bad in (b"\r\n", b"zz\r\n", b"5;\r\n", b"5;n=\r\n", b'5;n="open\r\n', b"5 x\r\n",
                    b"1" * 17 + b"\r\n"):
            self.assertIsNone(line(bad), bad)

    def test_the_head_ends_at_the_first_blank_line(self):
        self.assertEqual(claudeflare.head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), 24)
        self.assertEqual(claudeflare.head_end(b"GET / HTTP/1.1\nA: b\n\nbody"), 21)
        self.assertEqual(claudeflare.head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), -1)


class TestAccessControl(unittest.TestCase):
    """Who may use the proxy, decided from headers alone."""

    def test_a_loopback_server_answers_only_loopback_host_names(self):
        allowed = claudeflare.host_allowed
        for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "app.localhost"):
            self.assertTrue(allowed("127.0.0.1", claudeflare.Headers([("Host", host)])), host)
        for host in ("evil.example", "127.0.0.1.nip.io", "", "[::1"):
            self.assertFalse(allowed("127.0.0.1", claudeflare.Headers([("Host", host)])), host)
        self.assertTrue(allowed("0.0.0.0", claudeflare.Headers([("Host", "box.lan")])))

    def test_a_page_of_another_site_is_told_apart_from_api_clients(self):
        foreign = lambda **headers: claudeflare.cross_site(  # noqa: E731
            claudeflare.Headers([(name.replace("_", "-"), value)
                                 for name, value in headers.items()]))
        self.assertFalse(foreign(Host="localhost:8080"))
        self.assertFalse(foreign(Host="localhost:8080", Origin="http://localhost:8080"))
        self.assertFalse(foreign(Host="localhost:8080", Sec_Fetch_Site="same-origin"))
        self.assertTrue(foreign(Host="localhost:8080", Origin="https://evil.example"))
        self.assertTrue(foreign(Host="localhost:8080", Origin="null"))
        self.assertTrue(foreign(Host="localhost:8080", Origin="http://[::1"))
        self.assertTrue(foreign(Host="localhost:8080", Sec_Fetch_Site="cross-site"))

    def test_a_client_key_is_found_in_each_header_clients_send_it_in(self):
        keys = [client_key("ci", "cfk-ci"), client_key("alice", "cfk-alice")]
        found = lambda *pairs: claudeflare.authenticate(  # noqa: E731
            claudeflare.Headers(list(pairs)), keys)
        basic = base64.b64encode(b"user:cfk-ci").decode()
        self.assertEqual(found(("x-api-key", " cfk-alice ")), (keys[1], "x-api-key"))
        self.assertEqual(found(("Authorization", "Bearer cfk-ci")), (keys[0], "authorization"))
        self.assertEqual(found(("Authorization", f"Basic {basic}")), (keys[0], "authorization"))
        self.assertIsNone(found(("x-api-key", "cfk-bob")))
        self.assertIsNone(found(("Authorization", "Basic !!!")))
        self.assertIsNone(found())


class TestKeyRequestRules(unittest.TestCase):
    """What a client key with limits may send, decided from the request alone."""

    def test_the_model_is_read_as_the_upstream_reads_it(self):
        named = claudeflare.named_model
        self.assertEqual(named(b' \n{"messages": [{"model": "x"}], "model": "claude-haiku-4-5"}'),
                         "claude-haiku-4-5")
        self.assertEqual(named(b'{"mod\\u0065l": "claude-opus-4-5"}'), "claude-opus-4-5")
        self.assertIsNone(named(b'{"messages": []}'))
        self.assertIsNone(named(b'{}'))
        for body in (b'{"model": "a", "model": "b"}', b'[{"model": "a"}]', b"", b"{",
                     b'{"model": "a",}', b'{"model" "a"}', b"\xff", b"[" * 100_000,
                     b'{"model": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
            with self.assertRaises(ValueError, msg=body[:30]):
                named(body)

    def test_a_key_is_limited_by_what_it_carries(self):
        key = client_key("boss", "cfk-boss")
        self.assertFalse(claudeflare.key_is_limited(key))
        key.models = ""  # stored by an older `keys add --models ,`: no pattern, no limit
        self.assertFalse(claudeflare.key_is_limited(key))
        key.rpm = 10
        self.assertTrue(claudeflare.key_is_limited(key))

    def test_a_limited_key_sends_only_what_its_limits_can_measure(self):
        key = client_key("ci", "cfk-ci")
        key.budget_day = 5.0
        refusal = claudeflare.key_request_refusal
        haiku = b'{"model": "claude-haiku-4-5", "messages": []}'
        self.assertEqual(refusal(key, "POST", "/v1/messages", haiku), ("claude-haiku-4-5", None))
        self.assertEqual(refusal(key, "HEAD", "/v1/models", b""), (None, None))
        self.assertEqual(refusal(key, "GET", "/v1/models/claude-haiku-4-5?x=1", b""),
                         (None, None))
        for method, path in (("POST", "/v1/messages/batches"), ("GET", "/v1/files"),
                             ("POST", "/v1/complete")):
            self.assertEqual(refusal(key, method, path, haiku)[1].reason, "unmeasured")
        unpriced = refusal(key, "POST", "/v1/messages", b'{"model": "claude-future-9"}')[1]
        self.assertEqual((unpriced.status, unpriced.reason), (403, "unpriced"))
        key.models = "claude-haiku-*"
        self.assertEqual(refusal(key, "POST", "/v1/messages", haiku),
                         ("claude-haiku-4-5", None))


class TestRouteTable(unittest.TestCase):
    """The local API's routes: method and path to an endpoint."""

    def test_each_endpoint_is_found_by_method_and_path(self):
        find = claudeflare.find_endpoint
        self.assertIs(find("GET", "/api/stats"), claudeflare.stats_endpoint)
        self.assertIs(find("HEAD", "/health"), claudeflare.health_endpoint)
        self.assertIs(find("GET", "/dashboard"), claudeflare.status_page_endpoint)
        self.assertIs(find("POST", "/api/accounts/work/pause"), claudeflare.account_endpoint)
        self.assertIs(find("POST", "/api/accounts/work/resume"), claudeflare.account_endpoint)
        for method, path in (("POST", "/api/stats"), ("GET", "/api/stats/reset"),
                             ("POST", "/api/accounts/work/explode"), ("GET", "/api"),
                             ("POST", "/api/accounts/a/b/pause"), ("DELETE", "/health")):
            self.assertIsNone(find(method, path), (method, path))

    def test_a_state_change_needs_json_from_this_site(self):
        changing = claudeflare.changing
        json_type = {"Content_Type": "application/json"}

        def refused(request) -> tuple[int, str]:
            with self.assertRaises(claudeflare.BadRequest) as error:
                changing(request)
            return error.exception.status, str(error.exception)

        self.assertEqual(changing(local_request("POST", "/x", b'{"a": 1}', **json_type)),
                         {"a": 1})
        self.assertEqual(changing(local_request("POST", "/x", b"", **json_type)), {})
        self.assertEqual(refused(local_request("POST", "/x", b"{}"))[0], 415)
        self.assertEqual(refused(local_request("POST", "/x", b"{}", Origin="https://evil.example",
                                               Host="localhost", **json_type))[0], 403)
        self.assertIn("not valid JSON", refused(local_request("POST", "/x", b"{", **json_type))[1])
        self.assertIn("JSON object", refused(local_request("POST", "/x", b"[]", **json_type))[1])


###############################################################################
# The request path through a real server ######################################
###############################################################################

class TestRelay(ProxyTestCase):
    """Requests and answers pass through unchanged, byte for byte."""

    def test_five_megabyte_body_is_relayed_byte_exact_both_ways(self):
        payload = os.urandom(5 * 1024 * 1024)
        status, headers, body = self.proxy.request(
            "POST", "/v1/echo", payload, {"content-type": "application/octet-stream"})
        self.assertEqual(status, 200)
        self.assertEqual(hashlib.sha256(self.upstream.requests[0].body).digest(),
                         hashlib.sha256(payload).digest())
        self.assertEqual(body, payload)
        self.assertEqual(headers["X-Body-Sha256"], hashlib.sha256(payload).hexdigest())

    def test_chunked_request_body_is_relayed(self):
        payload = b'{"model":"claude-sonnet-4-5","messages":[]}' * 1000
        connection = self.proxy.connect()
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/echo", body=iter([payload[:100], payload[100:]]),
                           headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = connection.getresponse()
        self.assertEqual(response.read(), payload)
        self.assertEqual(self.upstream.requests[0].headers["Content-Length"], str(len(payload)))
        self.assertIsNone(self.upstream.requests[0].headers["Transfer-Encoding"])

    def test_query_string_and_headers_are_kept_and_hop_by_hop_headers_dropped(self):
        status, _, _ = self.post_message(path="/v1/messages?beta=true", headers={
            "anthropic-beta": "tools-2024", "X-Custom": "kept", "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped", "Keep-Alive": "timeout=5", "TE": "trailers",
            "Proxy-Authorization": "Basic abc", "Accept-Encoding": "gzip, br"})
        self.assertEqual(status, 200)
        seen = self.upstream.requests[0]
        self.assertEqual(seen.target, "/v1/messages?beta=true")
        self.assertEqual(seen.headers["X-Custom"], "kept")
        self.assertEqual(seen.headers["anthropic-beta"], "tools-2024")
        self.assertEqual(seen.headers["Host"], self.upstream.url.split("//")[1])
        self.assertEqual(seen.headers["Accept-Encoding"], "identity")
        for name in ("X-Hop", "Keep-Alive", "TE", "Proxy-Authorization"):
            self.assertIsNone(seen.headers[name], name)
        self.assertNotIn("X-Hop", seen.headers.get("Connection", ""))

    def test_response_status_and_headers_come_back_without_hop_by_hop_ones(self):
        self.upstream.push(reply_json(418, {"ok": True}, headers=[
            ("X-Upstream", "yes"), ("Connection", "X-Secret-Hop"), ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"), ("anthropic-ratelimit-unified-status", "allowed")]))
        status, headers, body = self.post_message()
        self.assertEqual((status, json.loads(body)), (418, {"ok": True}))
        self.assertEqual(headers["X-Upstream"], "yes")
        self.assertEqual(headers["anthropic-ratelimit-unified-status"], "allowed")
        self.assertEqual(headers["request-id"], "req_fake")
        self.assertIsNone(headers["X-Secret-Hop"])
        self.assertIsNone(headers["Keep-Alive"])

    def test_client_error_from_upstream_is_passed_through(self):
        self.upstream.push(reply_error(400, "invalid_request_error", "max_tokens: required"))
        status, _, body = self.post_message()
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["error"]["message"], "max_tokens: required")
        self.assertEqual(len(self.upstream.requests), 1)

    def test_get_and_head_requests_are_relayed(self):
        status, _, body = self.proxy.request("GET", "/v1/models")
        self.assertEqual((status, json.loads(body)["data"][0]["id"]), (200, "claude-sonnet-4-5"))
        status, headers, body = self.proxy.request("HEAD", "/v1/models")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headers["Content-Length"], str(len(json.dumps(
            {"data": [{"id": "claude-sonnet-4-5", "type": "model"}]}, separators=(",", ":")))))
        self.assertEqual(self.upstream.requests[-1].method, "HEAD")
        self.upstream.push(lambda handler, request: handler.wfile.write(
            b"HTTP/1.1 204 No Content\r\nrequest-id: req_fake\r\n\r\n"))
        status, headers, body = self.proxy.request("DELETE", "/v1/files/file_1")
        self.assertEqual((status, body, headers["Content-Length"]), (204, b"", None))

    def test_client_connection_is_kept_alive_across_requests(self):
        connection = self.proxy.connect()
        self.addCleanup(connection.close)
        client_ports = set()
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/messages", b'{"model":"claude-sonnet-4-5"}'),
                                   ("POST", "/v1/messages", b'{"stream":true}'),
                                   ("GET", "/v1/models", None), ("GET", "/health", None),
                                   ("GET", "/api/stats", None)):
            connection.request(method, path, body=body)
            response = connection.getresponse()
            self.assertEqual(response.status, 200, path)
            self.assertTrue(response.read(), path)
            # http.client reconnects silently after `Connection: close`: its own port shows
            # whether the requests really share one connection.
            self.assertIsNotNone(connection.sock, f"{method} {path} closed the connection")
            client_ports.add(connection.sock.getsockname()[1])
        self.assertEqual(len(client_ports), 1)
        self.assertEqual(len(self.upstream.requests), 4)

    def test_other_paths_get_provider_error(self):
        for method, path in (("GET", "/v2/messages"), ("POST", "/api/unknown"),
                             ("GET", "/v1beta"), ("GET", "/favicon.ico")):
            status, _, body = self.proxy.request(method, path, b"{}" if method == "POST" else None)
            self.assertEqual(status, 404, path)
            self.assertEqual(json.loads(body),
                             {"error": "Provider cannot handle this request path"})
        self.assertEqual(self.upstream.requests, [])

    def test_foreign_host_names_are_refused_on_loopback(self):
        for host in ("evil.example:8080", "attacker.test"):
            status, _, body = self.proxy.request("GET", "/api/stats", headers={"Host": host})
            self.assertEqual(status, 403, host)
            self.assertIn("answers only localhost names", json.loads(body)["error"])
            self.assertEqual(self.proxy.request("POST", "/v1/messages", b"{}",
                                                {"Host": host})[0], 403)
        self.assertEqual(self.upstream.requests, [])
        for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "app.localhost"):
            self.assertEqual(self.proxy.request("GET", "/health", headers={"Host": host})[0],
                             200, host)

    def test_health_answers(self):
        status, _, body = self.proxy.request("GET", "/health")
        health = json.loads(body)
        self.assertEqual((status, health["status"]), (200, "ok"))
        self.assertEqual(health["accounts"]["total"], 0)
        self.assertEqual(health["version"], claudeflare.__version__)
        self.assertIn("uptime", health)


class TestRequestLimits(ProxyTestCase):
    """Bodies over 32 MB are refused without being read into memory."""

    def test_a_body_of_exactly_the_limit_passes(self):
        payload = b"x" * claudeflare.MAX_BODY_BYTES
        status, _, body = self.proxy.request("POST", "/v1/echo", payload)
        self.assertEqual((status, len(body)), (200, len(payload)))

    def test_oversized_content_length_gets_413_without_sending_the_body(self):
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=DEADLINE_S) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % (claudeflare.MAX_BODY_BYTES + 1))
            reply = sock.makefile("rb")
            self.assertIn(b" 413 ", reply.readline())
            headers = http.client.parse_headers(reply)
            error = json.loads(reply.read(int(headers["Content-Length"])))
            reply.close()
        self.assertEqual(error["type"], "error")
        self.assertEqual(error["error"]["type"], "request_too_large")
        self.assertEqual(headers["Connection"], "close")
        self.assertEqual(self.upstream.requests, [])

    def test_client_still_sending_its_oversized_body_reads_the_413(self):
        size = claudeflare.MAX_BODY_BYTES + 1024 * 1024
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=DEADLINE_S) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Length: %d\r\n\r\n" % size)
            with contextlib.suppress(OSError):
                sock.sendall(b"x" * size)
            reply = sock.makefile("rb")
            self.assertIn(b" 413 ", reply.readline())
            reply.close()

    def test_oversized_chunked_body_gets_413(self):
        chunk = b"x" * (1024 * 1024)
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=DEADLINE_S) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(40):
                    sock.sendall(b"%X\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass  # the proxy answered and closed while we were still sending
            reply = sock.makefile("rb")
            self.assertIn(b" 413 ", reply.readline())
            reply.close()
        self.assertEqual(self.upstream.requests, [])

    def test_malformed_content_length_gets_400(self):
        reply = raw_http(self.proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                                          b"Content-Length: ten\r\n\r\n")
        self.assertIn(b" 400 ", reply.split(b"\r\n")[0])
        self.assertIn(b"invalid_request_error", reply)


def raw_answer(port: int, data: bytes, timeout: float = DEADLINE_S) -> tuple[int, dict, dict]:
    """Send raw bytes; return the status, headers and JSON body of the answer (then closed)."""
    reply = raw_http(port, data, timeout)
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


class TestHostileRequests(ProxyTestCase):
    """Web pages, broken clients and smugglers get a clear 4xx, and no account is used."""

    def setUp(self) -> None:
        super().setUp()
        self.proxy.app.store.add_account("work", "api_key", 1, api_key="sk-ant-api03-work")

    def test_names_that_only_begin_with_127_are_not_loopback(self):
        for host in ("127.0.0.1.evil.example", "127.evil.example", "127.0.0.1.nip.io:8080",
                     "[::1"):
            status, _, body = self.proxy.request("GET", "/api/accounts", headers={"Host": host})
            self.assertEqual(status, 403, host)
            self.assertNotIn(b"work", body)
            self.assertEqual(self.proxy.request("POST", "/v1/messages", b"{}",
                                                {"Host": host})[0], 403, host)
            origin = f"http://{host}"
            self.assertEqual(self.proxy.request("POST", "/api/accounts/work/pause", b"{}", {
                "Host": host, "Origin": origin, "Content-Type": "application/json"})[0], 403)
        self.assertEqual(self.upstream.requests, [])
        self.assertFalse(self.proxy.app.store.account("work").paused)
        for host in ("127.0.0.1", "127.1.2.3:80", "[::1]", "localhost", "app.localhost:1"):
            self.assertEqual(self.proxy.request("GET", "/api/accounts",
                                                headers={"Host": host})[0], 200, host)

    def test_cross_site_requests_to_v1_are_refused_before_any_account_is_used(self):
        page = {"Content-Type": "text/plain", "anthropic-version": "2023-06-01"}
        for browser in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Origin": "http://[::1"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
            status, headers, body = self.proxy.request("POST", "/v1/messages", b"{}",
                                                       {**page, **browser})
            self.assertEqual(status, 403, browser)
            self.assertEqual(json.loads(body)["error"]["type"], "permission_error")
            self.assertIsNone(headers["Access-Control-Allow-Origin"])
        status, headers, _ = self.proxy.request("OPTIONS", "/v1/messages", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key"})
        self.assertEqual(status, 403)
        self.assertIsNone(headers["Access-Control-Allow-Origin"])
        self.assertEqual(self.upstream.requests, [])
        own = {"Origin": self.proxy.url, "Sec-Fetch-Site": "same-origin"}
        for client in ({}, own):  # API clients send neither header; the page itself is fine
            self.assertEqual(self.proxy.request("POST", "/v1/messages", b"{}", client)[0], 200)
        self.assertEqual(len(self.upstream.requests), 2)

    def test_cross_site_request_with_a_client_key_is_served(self):
        key = self.proxy.app.store.add_client_key("page")
        status, _, _ = self.proxy.request("POST", "/v1/messages", b"{}", {
            "Origin": "https://tool.example", "x-api-key": key})
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.requests[0].headers["x-api-key"], "sk-ant-api03-work")

    def test_paths_that_leave_v1_are_refused(self):
        for path in ("/v1/../api/oauth/claude_cli/create_api_key",
                     "/v1/%2e%2e/api/oauth/claude_cli/create_api_key",
                     "/v1/%2E%2E/%2e%2e/x", "/v1/./../api/stats", "/v1/..",
                     "/v1/messages/%2e%2e%2f%2e%2e%2fapi", "/v1/a%5c..%5c..%5capi"):
            status, _, body = raw_answer(self.proxy.port, f"POST {path} HTTP/1.1\r\n"
                                         f"Host: localhost\r\nContent-Length: 2\r\n\r\n{{}}"
                                         .encode())
            self.assertEqual(status, 400, path)
            self.assertEqual(body["error"]["type"], "invalid_request_error")
        self.assertEqual(self.upstream.requests, [])
        status, _, _ = raw_answer(self.proxy.port, b"POST /v1/./x/../messages?beta=true "
                                  b"HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
                                  b"Connection: close\r\n\r\n{}")
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.requests[0].target, "/v1/messages?beta=true")

    def test_invalid_header_names_and_values_are_refused_and_the_pool_stays_in_step(self):
        for header in (b"Bad Name: x", b"Name : x", b"(x): y", b"NoColon", b"X-A: a\rb",
                       b"X-A: a\x00b", b"X-A: a\x7fb"):
            status, headers, body = raw_answer(
                self.proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                + header + b"\r\nContent-Length: 2\r\n\r\n{}")
            self.assertEqual((status, headers["Connection"]), (400, "close"), header)
            self.assertEqual(body["error"]["type"], "invalid_request_error")
        self.assertEqual(self.upstream.requests, [])
        for _ in range(3):
            self.assertEqual(self.proxy.request("POST", "/v1/messages", b"{}")[0], 200)
        self.assertEqual([r.headers["x-api-key"] for r in self.upstream.requests],
                         ["sk-ant-api03-work"] * 3)
        self.assertEqual(self.upstream.connections, 1)  # one pooled connection, still in step
        self.assertEqual(self.proxy.app.store.account("work").needs_reauth, 0)

    def test_ambiguous_framing_is_refused_with_the_rfc_status(self):
        cases = {
            b"Content-Length: 2\r\nContent-Length: 3\r\n": 400,
            b"Content-Length: 2, 3\r\n": 400,
            b"Transfer-Encoding: gzip\r\n": 501,
            b"Transfer-Encoding: gzip, chunked\r\n": 501,
            b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n": 400,
            "Content-Length: \u0662\r\n".encode(): 400,
            b"Content-Length: -2\r\n": 400,
            b"Content-Length: 2\r\nHost: evil.example\r\n": 400,
        }
        for headers, expected in cases.items():
            status, answer_headers, body = raw_answer(
                self.proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                + headers + b"\r\n{}")
            self.assertEqual(status, expected, headers)
            self.assertEqual(answer_headers["Connection"], "close")
            self.assertIn("message", body["error"])
        for line, expected in ((b"GET /v1/models HTTP/2.0", 505),
                               (b"GET /v1/models HTTP/0.9", 505), (b"GET /v1/models", 400),
                               (b"\x16\x03\x01\x02\x00", 400),
                               (b"GET /v1/models HTTP/1.1 extra", 400),
                               (b"G(T /v1/models HTTP/1.1", 400),
                               (b"BREW /v1/models HTTP/1.1", 501)):
            status, _, body = raw_answer(self.proxy.port, line + b"\r\nHost: localhost\r\n\r\n")
            self.assertEqual(status, expected, line)
            self.assertEqual(body["type"], "error")
        status, _, body = raw_answer(self.proxy.port, "GET /api/requests?limit=\u0661\u0662 "
                                     "HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                                     .encode())
        self.assertEqual(status, 400)
        self.assertEqual(self.upstream.requests, [])

    def test_long_chunk_lines_never_hide_a_request(self):
        hidden = b"GET /v1/models?x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        chunked = (b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
        # A 1 KB extension is read whole: "ab" is the body, the next request only carries text.
        second = b"0\r\n\r\n" + hidden
        head = (b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                b"Content-Length: %d\r\nX-Pad: " % len(second))
        head += b"p" * (166 - 2 - len(head)) + b"\r\n"  # a cut line would end right there
        reply = raw_http(self.proxy.port, chunked + b"2;" + b"e" * 1022 + b"zz\r\nab\r\n0\r\n"
                         b"\r\n" + head + b"\r\n" + second)
        self.assertEqual([(r.method, r.body) for r in self.upstream.requests],
                         [("POST", b"ab"), ("POST", second)])
        self.assertEqual(reply.count(b"HTTP/1.1 200 "), 2)
        # Lines past the bound, or a trailer hiding a request line, end the connection.
        for body, status in ((b"2;" + b"e" * 5000 + b"\r\nab\r\n0\r\n\r\n", 400),
                             (b"2\r\nab\r\n0\r\nX-T: " + b"t" * 1019 + b"\r\n", 400),
                             (b"2\r\nab\r\n0\r\nX-T: " + b"t" * 5000 + b"\r\n\r\n", 431),
                             (b"2\r\nab\r\n0\r\n" + b"X-T: t\r\n" * 3000 + b"\r\n", 431)):
            reply = raw_http(self.proxy.port, chunked + body + hidden)
            self.assertEqual(reply.count(b"HTTP/1.1 "), 1, body[:20])
            status_line, _, rest = reply.partition(b"\r\n")
            self.assertIn(b" %d " % status, status_line)
            self.assertIn(b"Connection: close", rest.partition(b"\r\n\r\n")[0])
        self.assertEqual(len(self.upstream.requests), 2)

    def test_client_mistakes_get_400_at_once_without_trying_accounts(self):
        status, _, body = raw_answer(self.proxy.port, "POST /v1/messages/caf\u00e9 HTTP/1.1\r\n"
                                     "Host: localhost\r\nContent-Length: 2\r\n\r\n{}"
                                     .encode())
        self.assertEqual(status, 400)
        self.assertIn("visible ASCII", body["error"]["message"])
        status, _, body = raw_answer(self.proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: "
                                     b"localhost\r\nanthropic-beta: a\rb\r\nContent-Length: "
                                     b"2\r\n\r\n{}")
        self.assertEqual(status, 400)
        self.assertEqual(self.upstream.requests, [])

    def test_headers_trickled_past_the_deadline_get_408_and_free_the_thread(self):
        self.proxy.server.head_deadline_s = 0.5
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=DEADLINE_S) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            reply = b""
            for _ in range(40):
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")
                ready, _, _ = select.select([sock], [], [], 0.1)
                if ready:
                    reply = sock.recv(65536)
                    break
            elapsed = time.monotonic() - started
        self.assertIn(b" 408 ", reply.split(b"\r\n")[0])
        self.assertIn(b"Connection: close", reply)
        self.assertLess(elapsed, 2.0)
        self.assertGreater(elapsed, 0.4)

    def test_connections_past_max_connections_get_503_and_the_others_are_served(self):
        self.proxy.app.settings.values["max_connections"] = 3
        held = [self.proxy.connect() for _ in range(3)]
        for connection in held:
            self.addCleanup(connection.close)
            connection.connect()
        wait_for(lambda: self.proxy.server.connections == 3, what="three connections served")
        status, headers, body = raw_answer(self.proxy.port, b"GET /health HTTP/1.1\r\n"
                                           b"Host: localhost\r\n\r\n")
        self.assertEqual((status, headers["Connection"]), (503, "close"))
        self.assertIn("max_connections", body["error"]["message"])
        held[0].request("POST", "/v1/messages", b"{}")
        self.assertEqual(held[0].getresponse().status, 200)  # a held connection still works
        held[1].close()
        wait_for(lambda: self.proxy.server.connections == 2, what="a connection to end")
        self.assertEqual(self.proxy.request("GET", "/health")[0], 200)


class TestHostileBodies(ProxyTestCase):
    """Bodies built to break a parser cost the client its request at most, never the server."""

    def test_a_body_nested_too_deep_to_parse_is_relayed_and_the_connection_stays_in_step(self):
        self.proxy.app.store.add_account("a", "api_key", 1, api_key="sk-ant-api03-aaaa")
        deep = b'{"messages": [' + b'{"x": ' * 20000 + b'1' + b'}' * 20000 + b']}'
        connection = self.proxy.connect()
        self.addCleanup(connection.close)
        for accounts in (1, 2):  # the conversation read after the answer, then before routing
            if accounts == 2:
                self.proxy.app.store.add_account("b", "api_key", 1, api_key="sk-ant-api03-bbbb")
            connection.request("POST", "/v1/echo", deep)
            response = connection.getresponse()
            self.assertEqual((response.status, response.read()), (200, deep))
            connection.request("GET", "/v1/models")  # the same connection answers in step
            response = connection.getresponse()
            self.assertEqual(response.status, 200)
            self.assertIn(b"claude-sonnet-4-5", response.read())
        self.proxy.settle()
        self.assertEqual(self.proxy.app.store.query(
            "SELECT COUNT(*) FROM requests WHERE path = '/v1/echo'")[0][0], 2)
        self.assertNotIn("Unexpected error", CAPTURED_LOG.text())

    def test_a_huge_chunk_cut_short_ends_the_stream_without_padding_it(self):
        def cut_in_a_huge_chunk(handler, request) -> None:
            handler.start_chunked()
            handler.send_chunk(message_events()[0])
            handler.wfile.write(b"40000000\r\nevent: content_block_delta")
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)

        self.upstream.push(cut_in_a_huge_chunk)
        started = time.monotonic()
        connection = self.proxy.connect()
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/messages", b'{"stream": true}')
        response = connection.getresponse()
        received = response.read1(65536)
        with self.assertRaises(http.client.IncompleteRead):
            while response.read(65536):
                pass
        self.assertLess(time.monotonic() - started, 5)
        self.assertTrue(received.startswith(b"event: message_start"))
        self.assertNotIn("Unexpected error", CAPTURED_LOG.text())


class TestStreaming(ProxyTestCase):
    """SSE events reach the client the moment they arrive."""

    def test_first_event_arrives_while_upstream_holds_back_the_rest(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        events = message_events()
        self.upstream.push(reply_stream(events, hold_after=1, gate=gate))
        connection = self.proxy.connect(timeout=DEADLINE_S / 3)  # well before the gate gives up
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/messages", body=b'{"stream":true}',
                           headers={"content-type": "application/json"})
        response = connection.getresponse()
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        first = response.read1(65536)  # a proxy holding the event back times out here
        # The fake marks itself holding just after it sent the first event: wait for the mark.
        self.assertTrue(self.upstream.holding.wait(DEADLINE_S))
        self.assertFalse(gate.is_set())
        self.assertEqual(first, events[0])
        gate.set()
        self.assertEqual(first + response.read(), b"".join(events))

    def test_fifty_megabyte_stream_passes_whole(self):
        events = [sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": "x" * 8000}})
                  ] * 6400
        self.upstream.push(reply_stream(events))
        status, _, body = self.post_message(stream=True)
        self.assertEqual(status, 200)
        self.assertEqual(hashlib.sha256(body).digest(),
                         hashlib.sha256(b"".join(events)).digest())

    def test_client_disconnect_mid_stream_closes_upstream_side(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.upstream.push(keep_streaming_until_client_gone(gate))
        connection = self.proxy.connect()
        connection.request("POST", "/v1/messages", body=b'{"stream":true}')
        response = connection.getresponse()
        self.assertTrue(response.read1(65536).startswith(b"event: message_start"))
        response.close()
        connection.close()
        gate.set()
        self.assertTrue(self.upstream.stream_aborted.wait(DEADLINE_S))
        wait_for(lambda: self.proxy.server.life.running == 0,
                 what="the handler thread to be freed")

    def test_upstream_failure_mid_stream_becomes_an_error_event(self):
        events = message_events()
        self.upstream.push(reply_stream(events, drop_after=3))
        status, _, body = self.post_message(stream=True)
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"".join(events[:3])))
        tail = body[len(b"".join(events[:3])):]
        self.assertTrue(tail.startswith(b"event: error\ndata: "), tail)
        error = json.loads(tail.split(b"data: ", 1)[1])
        self.assertEqual(error["error"]["type"], "api_error")

    def test_upstream_cut_inside_a_chunk_or_sending_broken_chunks_ends_in_an_error_event(self):
        events = message_events()
        for rest, sent in ((b"%X\r\n%s" % (len(events[1]), events[1][:10]), events[1][:10]),
                           (b"zz\r\n" + events[1] + b"\r\n", b""),
                           (b"%X\r\n%sjunk" % (len(events[1]), events[1]), events[1])):
            def cut(handler: FakeHandler, request: Recorded) -> None:
                handler.start_chunked()
                handler.send_chunk(events[0])
                handler.wfile.write(rest)
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
            self.upstream.push(cut)
            status, _, body = self.post_message(stream=True)
            self.assertEqual(status, 200)
            self.assertTrue(body.startswith(events[0] + sent), body)
            tail = body[len(events[0] + sent):].lstrip(b"\n")
            self.assertTrue(tail.startswith(b"event: error\ndata: "), tail)
            self.assertTrue(body.endswith(b"\n\n"), body)


class TestUpstreamConnections(ProxyTestCase):
    """Upstream connections are pooled, reused, and their failures are clear."""

    settings = {"request_timeout_s": 0.5, "retry_attempts": 0}

    def test_connections_are_reused_across_requests(self):
        for _ in range(20):
            self.assertEqual(self.post_message()[0], 200)
        self.assertEqual(len(self.upstream.requests), 20)
        self.assertEqual(self.upstream.connections, 1)

    def test_answer_heads_are_read_alike_whole_or_in_pieces_crlf_or_lf_folded_or_not(self):
        head = ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Folded: one\r\n"
                "\ttwo\r\nanthropic-ratelimit-unified-status:  allowed \r\nX-Empty:\r\n"
                "Content-Length: 2\r\nX-Last: end\r\n\r\n")
        for ending in ("\r\n", "\n"):
            for piece in (None, 7):
                data = head.replace("\r\n", ending).encode() + b"{}"
                self.upstream.push(lambda handler, request: send_in_pieces(handler, data, piece))
                status, headers, body = self.post_message()
                shape = f"{ending!r} in pieces of {piece}"
                self.assertEqual((status, body), (200, b"{}"), shape)
                self.assertEqual(headers["X-Folded"], "one two", shape)
                self.assertEqual(headers["anthropic-ratelimit-unified-status"], "allowed", shape)
                self.assertEqual((headers["X-Empty"], headers["X-Last"]), ("", "end"), shape)
        self.assertEqual(self.upstream.connections, 1)  # each answer ended where it should
        for piece in (None, 7):  # past 100 header lines: refused, whole or in pieces
            data = (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 101
                    + b"Content-Length: 0\r\n\r\n")
            self.upstream.push(lambda handler, request: send_in_pieces(handler, data, piece))
            status, _, body = self.post_message()
            assert_all_accounts_failed(self, status, body, 1, "header line")

    def test_a_credential_that_would_split_the_request_head_is_never_sent(self):
        self.proxy.app.store.add_account("bad", "api_key", 1,
                                         api_key="sk-ant-api03-bad\r\nX-Injected: 1")
        status, _, body = self.post_message()
        assert_all_accounts_failed(self, status, body, 1, "a header value is not valid HTTP")
        self.assertEqual(self.upstream.messages(), [])

    def test_pooled_connection_closed_by_upstream_is_retried_on_a_fresh_one(self):
        self.upstream.push(reply_then_close_silently)
        self.assertEqual(self.post_message()[0], 200)
        wait_for(lambda: claudeflare.connection_is_stale(self.proxy.app.upstream.idle[0]),
                 what="the upstream to close its side")
        status, _, body = self.post_message()
        self.assertEqual(status, 200, body)
        self.assertEqual(self.upstream.connections, 2)

    def test_pooled_connection_idle_a_while_is_looked_at_before_it_carries_a_request(self):
        # An upstream may write on an idle connection (a 408 before it closes). A connection
        # that has been idle TRUST_IDLE_S is checked, so the stray answer is never read as the
        # answer to the next request.
        def reply_then_stray(handler, request) -> None:
            reply_default(handler, request)
            time.sleep(0.05)
            handler.wfile.write(b"HTTP/1.1 418 Stray\r\nContent-Length: 0\r\n\r\n")

        self.upstream.push(reply_then_stray)
        self.assertEqual(self.post_message()[0], 200)
        time.sleep(claudeflare.TRUST_IDLE_S + 0.1)
        status, _, body = self.post_message()
        self.assertEqual(status, 200, body)
        self.assertEqual(self.upstream.connections, 2)

    def test_request_meeting_a_connection_the_upstream_dropped_is_sent_again_once(self):
        self.assertEqual(self.post_message()[0], 200)  # connection 1 now waits in the pool
        # Connection 1 looks alive when it is taken, then closes on the request it carries:
        # as when the upstream's idle timeout fires just as the proxy sends.
        self.upstream.push(drop_connection)
        status, _, body = self.post_message()
        self.assertEqual(status, 200, body)  # retry_attempts is 0: only the resend can do this
        dropped, resent = self.upstream.requests[1:]
        self.assertEqual((dropped.connection, resent.connection), (1, 2))
        self.assertEqual(dropped.body, resent.body)
        self.upstream.push(drop_connection, drop_connection)
        status, _, body = self.post_message()
        assert_all_accounts_failed(self, status, body, 1, "ECONNRESET")
        self.assertEqual(len(self.upstream.requests), 5)  # sent again once, not twice

    def test_upstream_that_hangs_times_out_with_a_clear_error(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.upstream.push(hang(gate))
        status, _, body = self.post_message()
        assert_all_accounts_failed(self, status, body, 1, "ETIMEDOUT")

    def test_upstream_silent_in_the_middle_of_a_stream_gives_an_error_event(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        events = message_events()
        self.upstream.push(reply_stream(events, hold_after=2, gate=gate))
        status, _, body = self.post_message(stream=True)
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"".join(events[:2])))
        tail = body[len(b"".join(events[:2])):]
        self.assertTrue(tail.startswith(b"event: error\n"), tail)
        self.assertIn(b"ETIMEDOUT", tail)

    def test_upstream_that_drops_the_connection_gives_a_clear_error(self):
        self.upstream.push(drop_connection, drop_connection)
        status, _, body = self.post_message()
        self.assertEqual(status, 503)
        self.assertIn("ECONNRESET", json.loads(body)["lastError"])


class TestUnreachableUpstream(unittest.TestCase):
    def test_refused_connection_gives_all_accounts_failed(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        proxy = Proxy(f"http://127.0.0.1:{closed_port}", retry_attempts=0)
        self.addCleanup(proxy.close)
        status, _, body = proxy.request("POST", "/v1/messages", b"{}")
        assert_all_accounts_failed(self, status, body, 1, "ECONNREFUSED")


###############################################################################
# Usage, the JSON API and the status page #####################################
###############################################################################

class PageChecker(html.parser.HTMLParser):
    """Checks that a page's tags nest and close, and collects its text."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.problems: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag) -> None:
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()

    def handle_data(self, data) -> None:
        self.text.append(data)


class TestUsage(ServerWithAccounts):
    def setUp(self) -> None:
        super().setUp()
        self.add_key("work")

    def last_record(self) -> dict:
        self.proxy.settle()
        return json.loads(self.proxy.request("GET", "/api/requests?limit=1")[2])[0]

    def test_plain_answer_usage_and_cost(self):
        self.upstream.push(reply_json(200, message_body("claude-sonnet-4-5-20250929", usage={
            "input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000,
            "cache_read_input_tokens": 10000})))
        self.assertEqual(self.post_message()[0], 200)
        record = self.last_record()
        self.assertEqual((record["model"], record["inputTokens"], record["outputTokens"],
                          record["cacheCreationTokens"], record["cacheReadTokens"]),
                         ("claude-sonnet-4-5-20250929", 1000, 500, 2000, 10000))
        # 1000 x $3 + 500 x $15 + 2000 x $3 x 1.25 + 10000 x $3 x 0.1, per million
        self.assertAlmostEqual(record["costUsd"], 0.021)
        self.assertEqual((record["accountName"], record["success"], record["streaming"]),
                         ("work", True, False))

    def test_a_refused_request_keeps_the_model_its_body_named(self):
        self.upstream.push(reply_error(400, "invalid_request_error", "max_tokens: too large"))
        self.assertEqual(self.post_message()[0], 400)
        record = self.last_record()
        self.assertEqual((record["status"], record["model"]), (400, "claude-sonnet-4-5"))
        self.assertRegex(self.ok("requests"), r"\n\S+\s+work\s+claude-sonnet-4-5\s+400 ")

    def test_stats_show_zero_milliseconds_as_a_figure(self):
        account = self.proxy.app.store.account("work")
        self.proxy.app.store.write_requests([claudeflare.RequestRecord(
            id="fast", timestamp=claudeflare.now_ms(), method="POST", path="/v1/messages",
            account_name="work", account_id=account.id, model="claude-haiku-4-5", status=200,
            success=True, response_time_ms=0)], 3_600_000)
        text = self.ok("stats")
        self.assertRegex(text, r"\nclaude-haiku-4-5\s+1\s+100\.0%\s+0\s+0\s+\$0\.00\s+0\n")
        self.assertIn("avg 0 ms, p95 0 ms", text)

    def test_requests_limited_at_once_log_the_limit_once(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        limited = reply_error(429, "rate_limit_error", "limited", unified_headers())

        def held(handler: FakeHandler, request: Recorded) -> None:
            gate.wait(DEADLINE_S)
            limited(handler, request)

        self.upstream.push(held, held)
        clients = [threading.Thread(target=self.post_message) for _ in range(2)]
        for client in clients:
            client.start()
        wait_for(lambda: len(self.upstream.messages()) == 2, what="both requests upstream")
        gate.set()
        for client in clients:
            client.join()
        self.proxy.settle()
        self.assertEqual(CAPTURED_LOG.text().count("[Proxy] Account work rate limited until"),
                         1)

    def test_record_keeps_the_client_product_and_the_conversation(self):
        self.post_message(headers={"User-Agent": "claude-cli/2.1.3 (external, cli)",
                                   "X-Claude-Code-Session-Id": "conv-42"})
        record = self.last_record()
        self.assertEqual((record["userAgent"], record["conversation"]),
                         ("claude-cli/2.1.3", "session:conv-42"))

    def test_one_hour_cache_writes_cost_twice_the_input_price(self):
        self.upstream.push(reply_json(200, message_body("claude-opus-4-5", usage={
            "input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 3000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1000,
                               "ephemeral_1h_input_tokens": 2000}})))
        self.post_message()
        self.assertAlmostEqual(self.last_record()["costUsd"], (1000 * 5 * 1.25 + 2000 * 5 * 2)
                               / 1e6)

    def test_unknown_model_is_unpriced_not_guessed(self):
        self.upstream.push(reply_json(200, message_body("claude-future-9")))
        self.post_message()
        record = self.last_record()
        self.assertEqual((record["model"], record["costUsd"]), ("claude-future-9", None))
        stats = json.loads(self.proxy.request("GET", "/api/stats")[2])
        self.assertEqual(stats["totals"]["unpricedRequests"], 1)
        for span in ("1h", "24h"):
            series = json.loads(self.proxy.request("GET", f"/api/analytics?range={span}")[2])
            self.assertEqual(sum(p["unpricedRequests"] for p in series["series"]), 1, span)

    def test_stream_usage_read_from_events_split_across_reads(self):
        events = message_events("claude-haiku-4-5", words=["a"] * 40, input_tokens=321)
        self.upstream.push(reply_stream_split(events, piece=7))
        status, _, body = self.post_message(stream=True)
        self.assertEqual((status, body), (200, b"".join(events)))
        record = self.last_record()
        self.assertEqual((record["model"], record["inputTokens"], record["outputTokens"]),
                         ("claude-haiku-4-5", 321, 40))
        self.assertTrue(record["streaming"])
        self.assertAlmostEqual(record["costUsd"], (321 * 1 + 40 * 5) / 1e6)
        self.assertGreater(record["tokensPerSecond"], 0)

    def test_stream_with_crlf_line_endings_is_read_for_usage(self):
        events = [event.replace(b"\n", b"\r\n") for event in
                  message_events("claude-haiku-4-5", words=["a"] * 3, input_tokens=77)]
        self.upstream.push(reply_stream_split(events, piece=5))
        status, _, body = self.post_message(stream=True)
        self.assertEqual((status, body), (200, b"".join(events)))
        record = self.last_record()
        self.assertEqual((record["model"], record["inputTokens"], record["outputTokens"]),
                         ("claude-haiku-4-5", 77, 3))

    #: Every row of the price table: model ids -> USD per million input and output tokens.
    PRICES = (
        (("claude-opus-4-5", "claude-opus-4-5-20251101", "claude-opus-4-6", "claude-opus-5"),
         5, 25),
        (("claude-opus-4-20250514", "claude-opus-4-1", "claude-opus-4-1-20250805"), 15, 75),
        (("claude-3-7-sonnet-20250219", "claude-sonnet-4-20250514", "claude-sonnet-4-5",
          "claude-sonnet-4-5-20250929", "claude-sonnet-5"), 3, 15),
        (("claude-haiku-4-5", "claude-haiku-4-5-20251001"), 1, 5),
        (("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"), 0.80, 4),
        (("claude-3-haiku-20240307",), 0.25, 1.25),
    )

    def test_every_price_table_row_and_cache_multiplier(self):
        usage = {"input_tokens": 1000, "output_tokens": 100, "cache_creation_input_tokens": 300,
                 "cache_read_input_tokens": 2000,
                 "cache_creation": {"ephemeral_5m_input_tokens": 200,
                                    "ephemeral_1h_input_tokens": 100}}
        expected = {}
        for models, input_price, output_price in self.PRICES:
            for model in models:
                self.upstream.push(reply_json(200, message_body(model, usage=usage)))
                self.assertEqual(self.post_message()[0], 200)
                # input, output, 5-minute writes at 1.25x, 1-hour writes at 2x, reads at 0.1x
                expected[model] = (1000 * input_price + 100 * output_price
                                   + 200 * input_price * 1.25 + 100 * input_price * 2
                                   + 2000 * input_price * 0.1) / 1e6
        self.proxy.settle()
        records = json.loads(self.proxy.request("GET", "/api/requests?limit=100")[2])
        costs = {record["model"]: record["costUsd"] for record in records}
        self.assertEqual(set(costs), set(expected))
        for model, cost in expected.items():
            self.assertIsNotNone(costs[model], f"{model} is unpriced")
            self.assertAlmostEqual(costs[model], cost, places=12, msg=model)

    def test_stream_that_ends_early_keeps_what_it_reported(self):
        events = message_events("claude-sonnet-4-5", words=["a"] * 5, input_tokens=50)
        self.upstream.push(reply_stream_split(events, piece=11, stop_after=4))
        status, _, body = self.post_message(stream=True)
        self.assertEqual(status, 200)
        self.assertIn(b"event: error", body)
        record = self.last_record()
        self.assertEqual((record["inputTokens"], record["outputTokens"]), (50, 1))
        self.assertFalse(record["success"])
        self.assertIn("Upstream failed during the response", record["error"])

    def test_writer_flushes_at_shutdown(self):
        for _ in range(5):
            self.post_message()
        self.proxy.stop()
        store = claudeflare.Store(self.proxy.db_path)
        try:
            self.assertEqual(store.query("SELECT COUNT(*) FROM requests")[0][0], 5)
            self.assertEqual(store.account("work").request_count, 5)
        finally:
            store.close()

    def kept_after_pruning(self, proxy: Proxy, ages_in_days: dict) -> set:
        """Log records of these ages, let the server prune; return the ids still kept."""
        store, now = proxy.app.store, claudeflare.now_ms()
        store.write_requests([claudeflare.RequestRecord(
            id=name, timestamp=now - days * 86400 * 1000, method="POST", path="/v1/messages",
            status=200, success=True, response_time_ms=10)
            for name, days in ages_in_days.items()], 1000)
        self.assertEqual(proxy.request("POST", "/v1/messages", b"{}")[0], 200)
        proxy.settle()
        return {row[0] for row in store.query("SELECT id FROM requests")} & set(ages_in_days)

    def test_old_records_are_pruned_past_the_retention(self):
        self.assertEqual(self.kept_after_pruning(self.proxy, {"29 days": 29, "31 days": 31}),
                         {"29 days"})
        store, old = self.proxy.app.store, claudeflare.now_ms() - 31 * 86400 * 1000
        self.assertEqual(store.query("SELECT COUNT(*) FROM usage_hourly WHERE hour < ?",
                                     (old + 86400 * 1000,))[0][0], 0)
        self.assertEqual(store.query("SELECT COUNT(*) FROM usage_hourly")[0][0], 2)

    def test_retention_follows_the_setting_in_days(self):
        proxy = Proxy(self.upstream.url, request_retention_days=7)
        self.addCleanup(proxy.close)
        self.assertEqual(self.kept_after_pruning(proxy, {"6 days": 6, "8 days": 8}), {"6 days"})


def assert_cross_site_refused(test: ServerWithAccounts, auth: dict) -> None:
    """Changes asked by another site's page, or not as JSON, are refused and change nothing."""
    proxy = test.proxy
    headers = {**auth, "content-type": "application/json"}
    for strategy, extra, expected in (
            ("weighted", {"Origin": "https://evil.example"}, 403),
            ("headroom", {"Sec-Fetch-Site": "cross-site"}, 403),
            ("least-requests", {"content-type": "application/x-www-form-urlencoded"}, 415),
            ("weighted", {"Origin": proxy.url, "Sec-Fetch-Site": "same-origin"}, 200)):
        before = json.loads(proxy.request("GET", "/health")[2])["strategy"]
        status, _, _ = proxy.request("POST", "/api/config/strategy",
                                     json.dumps({"strategy": strategy}).encode(),
                                     {**headers, **extra})
        test.assertEqual(status, expected, extra)
        after = json.loads(proxy.request("GET", "/health")[2])["strategy"]
        test.assertEqual(after, strategy if expected == 200 else before, extra)
    name = next(iter(test.listed()))
    status, _, _ = proxy.request("POST", f"/api/accounts/{name}/pause", b"",
                                 {**headers, "Origin": "https://evil.example"})
    test.assertEqual(status, 403)
    test.assertEqual(test.listed()[name]["status"], "active")


class TestApi(ServerWithAccounts):
    settings = {"lb_strategy": "round-robin"}

    def setUp(self) -> None:
        super().setUp()
        self.add_key("a")
        self.add_key("b", tier=5)
        for index in range(4):
            self.upstream.push(reply_json(200, message_body("claude-sonnet-4-5")))
        self.upstream.push(reply_error(400, "invalid_request_error", "bad <request>"))
        for _ in range(5):
            self.post_message()
        self.proxy.settle()

    def get(self, path: str):
        status, headers, body = self.proxy.request("GET", path)
        return status, (json.loads(body) if headers["Content-Type"].startswith(
            "application/json") else body.decode())

    def post(self, path: str, body=None, headers=None):
        status, _, data = self.proxy.request("POST", path, body if body is not None else b"",
                                             {"content-type": "application/json",
                                              **(headers or {})})
        return status, json.loads(data)

    def test_stats_shape(self):
        status, stats = self.get("/api/stats")
        self.assertEqual(status, 200)
        totals = stats["totals"]
        self.assertEqual((totals["requests"], totals["failures"], totals["successRate"]),
                         (5, 1, 0.8))
        self.assertEqual(totals["inputTokens"], 48)
        self.assertGreater(totals["costUsd"], 0)
        self.assertIsNotNone(totals["avgLatencyMs"])
        slowest = max(record["responseTimeMs"] for record in self.get("/api/requests")[1])
        self.assertLessEqual(totals["p95LatencyMs"], slowest)
        self.assertEqual(stats["last24h"]["requests"], 5)
        self.assertEqual({item["name"]: item["requests"] for item in stats["accounts"]},
                         {"a": 2, "b": 3})
        self.assertEqual([item["name"] for item in stats["models"]][:1], ["claude-sonnet-4-5"])
        self.assertEqual(stats["recentErrors"][0]["status"], 400)

    def test_accounts_requests_config_and_logs(self):
        status, accounts = self.get("/api/accounts")
        self.assertEqual([account["name"] for account in accounts], ["a", "b"])
        for key in ("type", "tier", "status", "requests", "sessionRequests", "tokenExpiresAt",
                    "rateLimitStatus", "rateLimitedUntil", "utilization5h", "reset5h",
                    "utilization7d", "reset7d", "lastUsed"):
            self.assertIn(key, accounts[0])
        status, requests = self.get("/api/requests?limit=3")
        self.assertEqual(len(requests), 3)
        self.assertEqual(len(self.get("/api/requests")[1]), 5)
        for key in ("id", "timestamp", "method", "path", "model", "accountName", "status",
                    "success", "error", "responseTimeMs", "ttfbMs", "failoverAttempts",
                    "streaming", "inputTokens", "outputTokens", "cacheCreationTokens",
                    "cacheReadTokens", "costUsd", "tokensPerSecond", "userAgent",
                    "conversation"):
            self.assertIn(key, requests[0])
        status, config = self.get("/api/config")
        self.assertEqual(config["settings"]["lbStrategy"], "round-robin")
        self.assertEqual(config["strategies"], list(claudeflare.STRATEGY_NAMES))
        status, lines = self.get("/api/logs?limit=5")
        self.assertTrue(lines and len(lines) <= 5)
        self.assertRegex(lines[-1], r"^\[\d{4}-\d\d-\d\dT[\d:.]+Z\] [A-Z]+: \[\w+\] ")

    def test_request_log_lists_fifty_unless_asked_for_more(self):
        now = claudeflare.now_ms()
        self.proxy.app.store.write_requests([claudeflare.RequestRecord(
            id=f"r{index}", timestamp=now - index, method="POST", path="/v1/messages",
            status=200, success=True, response_time_ms=1) for index in range(60)], 1000)
        self.assertEqual(len(self.get("/api/requests")[1]), 50)
        self.assertEqual(len(self.get("/api/requests?limit=1000")[1]), 65)

    def test_analytics_for_every_range(self):
        for span, buckets in (("1h", 61), ("6h", 73), ("24h", 25), ("7d", 29), ("30d", 31)):
            status, analytics = self.get(f"/api/analytics?range={span}")
            self.assertEqual(status, 200, span)
            self.assertIn(len(analytics["series"]), (buckets - 1, buckets, buckets + 1), span)
            self.assertEqual(sum(point["requests"] for point in analytics["series"]), 5, span)
            self.assertEqual(sum(item["requests"] for item in analytics["accounts"]), 5, span)
            self.assertEqual(analytics["models"][0]["name"], "claude-sonnet-4-5")

    def test_bad_parameters_name_the_valid_values(self):
        for path, text in (("/api/requests?limit=0", "1 to 1000"),
                           ("/api/requests?limit=5000", "1 to 1000"),
                           ("/api/requests?limit=ten", "1 to 1000"),
                           ("/api/logs?limit=-1", "1 to 1000"),
                           ("/api/analytics?range=2d", "1h, 6h, 24h, 7d, 30d")):
            status, body = self.get(path)
            self.assertEqual(status, 400, path)
            self.assertIn(text, body["error"], path)
        status, body = self.post("/api/config/strategy", b'{"strategy": "fastest"}')
        self.assertEqual(status, 400)
        self.assertIn("Invalid strategy: fastest", body["error"])
        self.assertIn("round-robin", body["error"])
        self.assertEqual(self.post("/api/config/strategy", b"{nope")[0], 400)
        self.assertEqual(self.post("/api/accounts/ghost/pause")[0], 404)
        self.assertEqual(self.post("/api/accounts/a/explode")[0], 404)

    def test_mutating_endpoints(self):
        status, body = self.post("/api/config/strategy", b'{"strategy": "weighted"}')
        self.assertEqual((status, body), (200, {"strategy": "weighted"}))
        self.assertEqual(self.get("/health")[1]["strategy"], "weighted")
        with open(self.proxy.config_path) as config:
            self.assertEqual(json.load(config)["lb_strategy"], "weighted")
        status, account = self.post("/api/accounts/a/pause")
        self.assertEqual((status, account["status"]), (200, "paused"))
        self.assertEqual(set(self.served_by(2)), {"b"})
        self.assertEqual(self.post("/api/accounts/a/resume")[1]["status"], "active")
        self.assertEqual(self.post("/api/stats/reset")[1], {"reset": 2})
        self.assertEqual({a["name"]: a["requests"] for a in self.get("/api/accounts")[1]},
                         {"a": 0, "b": 0})

    def test_cross_site_changes_are_refused_without_keys_too(self):
        assert_cross_site_refused(self, {})

    def test_metrics_in_prometheus_text(self):
        status, text = self.get("/metrics")
        self.assertEqual(status, 200)
        for line in ('claudeflare_requests_total{account="a",status="200"} 2',
                     'claudeflare_requests_total{account="b",status="400"} 1',
                     'claudeflare_tokens_total{type="input"} 48',
                     'claudeflare_request_duration_seconds_bucket{le="+Inf"} 5',
                     'claudeflare_request_duration_seconds_count 5',
                     'claudeflare_account_status{account="a",status="active"} 1'):
            self.assertIn(line, text.splitlines())
        self.assertIn("# TYPE claudeflare_request_duration_seconds histogram", text)

    def test_metrics_show_the_cost_and_each_window_utilization(self):
        self.upstream.push(reply_json(200, message_body(), unified_headers("allowed", 3600, 0.42,
                                                                           0.93)))
        self.assertEqual(self.post_message()[0], 200)
        served = self.upstream.messages()[-1].headers["x-api-key"].replace("sk-ant-api03-", "")
        self.proxy.settle()
        lines = self.get("/metrics")[1].splitlines()
        # five priced answers of 12 input and 5 output tokens of claude-sonnet-4-5 at $3/$15
        self.assertIn("claudeflare_cost_usd_total 0.000555", lines)
        self.assertIn(f'claudeflare_account_utilization{{account="{served}",window="5h"}} 0.42',
                      lines)
        self.assertIn(f'claudeflare_account_utilization{{account="{served}",window="7d"}} 0.93',
                      lines)
        self.assertEqual(len([line for line in lines
                              if line.startswith("claudeflare_account_utilization{")]), 2)

    def test_status_page_parses_and_shows_every_account(self):
        self.ok("add", "zephyr-pool", "--api-key", stdin="sk-ant-api03-zephyr\n")
        self.proxy.app.mark_needs_attention(self.proxy.app.store.account("b"),
                                            "<script>alert(1)</script> disabled")
        now = claudeflare.now_ms()
        self.proxy.app.store.update_account("a", utilization_5h=0.42, reset_5h=now + 7_230_000,
                                            utilization_7d=0.93, reset_7d=now + 86_430_000)
        for path in ("/", "/dashboard"):
            status, page = self.get(path)
            self.assertEqual(status, 200)
            checker = PageChecker()
            checker.feed(page)
            checker.close()
            self.assertEqual((checker.problems, checker.open), ([], []))
            text = " ".join(checker.text)
            for expected in ("zephyr-pool", "needs_reauth", "round-robin", "Requests per hour",
                             "Last 20 requests", "Recent errors", "bad <request>", "42%",
                             "93%", "resets in 2h 0m", "resets in 1d 0h", "Cost, 24 h"):
                self.assertIn(expected, text)
            self.assertIn('style="width:42%"', page)
            self.assertIn('class="full" style="width:93%"', page)
            cost = self.get("/api/stats")[1]["last24h"]["costUsd"]
            self.assertIn(f"${cost:.2f}", text)
            self.assertNotIn("<script>alert", page)
            self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
            self.assertIn('<meta name="viewport"', page)
            self.assertIn("<svg", page)
            self.assertNotIn("http://", page.replace("http://www.w3.org", ""))

    def account_cells(self, page: str, name: str) -> dict:
        """Return an account row's cells on the status page: label -> text."""
        row = re.search(rf'<tr><td class="name wrap"><b>{name}</b>.*?</tr>', page).group(0)
        return {label: " ".join(re.sub(r"<[^>]+>", " ", cell).split())
                for label, cell in re.findall(r'<td[^>]* data-label="([^"]+)">(.*?)</td>', row)}

    def test_status_page_accounts_are_cards_on_a_phone(self):
        page = self.get("/")[1]
        media = re.findall(r"@media \(max-width: (\d+)px\) \{\n(.*?)\n\}", page, re.S)
        cards = [rules for width, rules in media if ".accounts tr { display: grid;" in rules]
        self.assertEqual(len(cards), 1, media)
        self.assertIn(".accounts thead { display: none; }", cards[0])
        self.assertIn("content: attr(data-label)", cards[0])
        headers = re.search(r'<table class="accounts">\n<thead>(.*?)</thead>', page, re.S)
        labels = [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<th[^>]*>.*?</th>",
                                                                     headers.group(1))]
        self.assertEqual(labels[0], "Name")
        self.assertEqual(list(self.account_cells(page, "b")), labels[1:])

    def test_status_page_chart_has_a_legend_and_labels_that_keep_their_size(self):
        page = self.get("/")[1]
        chart = re.search(r'<figure class="chart">.*?</figure>', page, re.S).group(0)
        self.assertIn('<rect class="errors"', chart)  # the 400 of setUp
        self.assertIn('<span class="key"></span>requests</span>', chart)
        self.assertIn('<span class="key errors"></span>of which failed</span>', chart)
        svg = re.search(r"<svg.*?</svg>", chart, re.S).group(0)
        self.assertNotIn("<text", svg)  # it stretches to the page: its text would shrink
        self.assertEqual(len(re.findall(r'<div class="hours">(<span style="left:[\d.]+%">'
                                        r'\d\d:00</span>){4}</div>', chart)), 1)
        sizes = [int(size) for size in re.findall(r"font-size: (\d+)px", page)]
        self.assertGreaterEqual(min(sizes), 11, sizes)

    def test_status_page_says_what_is_known_of_limits_and_windows(self):
        reset = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        self.upstream.push_for("sk-ant-api03-a", reply_error(
            429, "rate_limit_error", "Number of requests has exceeded your rate limit", [
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", reset.isoformat())]))
        self.post_message()  # a is tried first, benched, and b serves
        self.add_oauth("subscription")
        self.add_oauth("weekly")
        now = claudeflare.now_ms()
        self.proxy.app.store.update_account("weekly", utilization_5h=0.97,
                                            reset_5h=now - 600_000, utilization_7d=0.4,
                                            reset_7d=now + 86_430_000)
        self.proxy.settle()
        page = self.get("/")[1]
        limited = self.account_cells(page, "a")
        self.assertRegex(limited["Status"], r"^rate_limited limited, resets in (59m|1h 0m)$")
        self.assertEqual((limited["5-hour window"], limited["7-day window"]), ("n/a", "n/a"))
        self.assertEqual(self.account_cells(page, "subscription")["5-hour window"],
                         "no data yet")
        weekly = self.account_cells(page, "weekly")
        self.assertEqual(weekly["5-hour window"], "0% reset 10m ago")
        self.assertEqual(weekly["7-day window"], "40% resets in 1d 0h")

    def test_cli_stats_and_requests_print_the_same_figures(self):
        stats = json.loads(self.ok("stats", "--json"))
        self.assertEqual(stats["totals"], self.get("/api/stats")[1]["totals"])
        text = self.ok("stats")
        self.assertIn("5 requests, 80.0% ok, 48 in / ", text)
        listing = self.ok("requests", "--limit", "2").splitlines()
        self.assertEqual(len(listing), 3)
        self.assertIn("STATUS", listing[0])

    def test_cli_health_asks_the_server(self):
        code, out, _ = self.cli("health", "--url", self.proxy.url)
        self.assertEqual((code, out.split(":")[0]), (0, "ok"))
        self.ok("pause", "a")
        self.ok("pause", "b")
        code, out, _ = self.cli("health", "--url", self.proxy.url)
        self.assertEqual((code, out.split(":")[0]), (1, "unavailable"))
        code, _, err = self.cli("health", "--url", "http://127.0.0.1:9")
        self.assertEqual(code, 1)
        self.assertIn("Is the server running", err)


class TestSecrets(ServerWithAccounts):
    def test_account_credentials_echoed_by_the_upstream_never_reach_the_client(self):
        self.ok("add", "odd", "--api-key", stdin="custom-key-0123456789\n")
        self.upstream.push(reply_error(400, "invalid_request_error",
                                       "header x-api-key custom-key-0123456789 is malformed"))
        status, _, body = self.post_message()
        self.assertEqual(status, 400)
        self.assertNotIn(b"custom-key-0123456789", body)
        self.assertIn("[REDACTED]", json.loads(body)["error"]["message"])
        self.proxy.settle()
        self.assertNotIn("custom-key-0123456789", self.ok("requests"))

    def test_credentials_echoed_in_a_stream_error_event_never_reach_the_client(self):
        self.ok("add", "odd", "--api-key", stdin="custom-key-0123456789\n")
        event = sse("error", {"type": "error", "error": {"type": "api_error", "message":
                              "key custom-key-0123456789 (also sk-ant-api03-other-key) failed"}})

        def chunked(handler, request) -> None:
            handler.start_chunked()
            handler.send_chunk(message_events()[0])
            handler.send_chunk(event)
            handler.end_chunked()

        def sized(handler, request) -> None:
            handler.send_whole(200, message_events()[0] + event, "text/event-stream")

        for action in (chunked, sized):
            self.upstream.push(action)
            status, _, body = self.post_message(stream=True)
            self.assertEqual(status, 200)
            self.assertIn(b"message_start", body)
            self.assertNotIn(b"custom-key-0123456789", body)
            self.assertNotIn(b"other-key", body)
            self.assertIn("[REDACTED]", body.decode())

    def test_a_refresh_token_the_token_endpoint_echoes_is_masked_in_the_503_and_the_account(
            self):
        _, refresh = self.add_oauth("max", expires_in_ms=-1000)
        self.upstream.oauth.failures.append((400, {
            "error": "invalid_grant", "error_description": f"refresh token {refresh} is revoked"}))
        status, _, body = self.post_message()
        self.assertEqual(status, 503)
        self.assertIn("revoked", json.loads(body)["lastError"])
        account = self.listed()["max"]
        self.assertIn("revoked", account["reauthReason"])
        shown = body.decode() + json.dumps(account) + self.ok("requests") + self.ok("list")
        self.assertNotIn(refresh, shown)
        self.assertNotIn(refresh[-12:], shown)

    def test_no_secret_reaches_the_api_the_page_or_the_log(self):
        self.add_key("keyed")
        access, refresh = self.add_oauth("subscription", expires_in_ms=60_000)
        client_key = re.search(r"cfk-\S+", self.ok("keys", "add", "tester")).group(0)
        auth = {"x-api-key": client_key}
        self.assertEqual(self.post_message(headers=auth)[0], 200)
        self.assertEqual(self.post_message(headers={"Authorization": f"Bearer {client_key}"})[0],
                         200)
        self.assertEqual(self.post_message(headers={"x-api-key": client_key + "x"})[0], 401)
        self.proxy.settle()
        wait_for(lambda: self.stored("subscription").access_token != access,
                 what="a refresh")
        fresh = self.stored("subscription")
        secrets = ["sk-ant-api03-keyed", access, refresh, fresh.access_token,
                   fresh.refresh_token, client_key]
        seen = []
        for path in ("/", "/dashboard", "/health", "/api/stats", "/api/accounts",
                     "/api/requests", "/api/analytics?range=1h", "/api/config", "/api/logs",
                     "/metrics"):
            seen.append(self.proxy.request("GET", path, headers=auth)[2].decode())
        seen.append(CAPTURED_LOG.text())
        seen += [self.ok("list"), self.ok("list", "--json"), self.ok("stats", "--json"),
                 self.ok("requests"), self.ok("config", "list"), self.ok("keys", "list")]
        self.assertIn('"level": "DEBUG"', CAPTURED_LOG.text())  # every level was scanned
        for secret in secrets:
            for text in seen:
                self.assertNotIn(secret, text)
                self.assertNotIn(secret[-16:], text)


    def test_redact_masks_every_secret_form(self):
        prefixed = ("sk-ant-api03-Ab_c-1XyZ", "sk-ant-oat01-Ab_c-2XyZ", "sk-ant-ort01-Ab_c-3XyZ",
                    "cfk-Ab_c-4XyZ")
        for secret in prefixed:
            for text in (
                    f"[2026-01-20T10:30:45.123Z] WARN: [Proxy] Request via work got 401 invalid "
                    f"token {secret}",
                    f'refresh refused: Bad Request: {{"error": "invalid_grant", "token": '
                    f'"{secret}"}}',
                    f"POST /v1/messages?beta=true&key={secret}&x=1"):
                masked = claudeflare.redact(text)
                self.assertNotIn(secret[-6:], masked, text)
                self.assertEqual(masked, text.replace(secret, "[REDACTED]"))
        for text, expected in (
                ("x-api-key: opaque-key-1", "x-api-key: [REDACTED]"),
                ("POST /v1/messages?x-api-key=opaque-key-2",
                 "POST /v1/messages?x-api-key=[REDACTED]"),
                ("upstream said: bearer opaque/token+4= then",
                 "upstream said: bearer [REDACTED] then"),
                ('{"access_token": "opaque-5", "expires_in": 60}',
                 '{"access_token": "[REDACTED]", "expires_in": 60}'),
                ('{"refresh_token":"opaque-6"}', '{"refresh_token":"[REDACTED]"}'),
                ('{"api_key": "opaque-7"}', '{"api_key": "[REDACTED]"}'),
                ('{"raw_key": "opaque-8"}', '{"raw_key": "[REDACTED]"}'),
                ('{"code_verifier": "opaque-9"}', '{"code_verifier": "[REDACTED]"}'),
                ('{"code": "opaque-10"}', '{"code": "[REDACTED]"}')):
            self.assertEqual(claudeflare.redact(text), expected)
        masked = claudeflare.redact("Authorization: Bearer opaque.token~3")
        self.assertTrue(masked.startswith("Authorization: [REDACTED]"), masked)
        self.assertNotIn("opaque", masked)
        plain = "Request completed for work: 200 in 12ms (claude-sonnet-4-5, session abc-123)"
        self.assertEqual(claudeflare.redact(plain), plain)

    def test_redact_masks_authorization_values_of_any_scheme_and_quoting(self):
        for text, secret in (("Authorization: Basic dXNlcjpjZmstc2VjcmV0", "dXNlcjpjZmstc2VjcmV0"),
                             ("Proxy-Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
                             ('{"x-api-key": "opaque-json-key"}', "opaque-json-key"),
                             ('{"Authorization": "Basic dXNlcjpwYXNz"}', "dXNlcjpwYXNz")):
            self.assertNotIn(secret, claudeflare.redact(text), text)

    def send_secrets_from_outside(self) -> None:
        """Send a request whose query string and upstream error carry secrets; spare serves it."""
        self.add_key("keyed")
        self.add_key("spare")
        self.upstream.push(reply_error(401, "authentication_error",
                                       "invalid credentials sk-ant-oat01-EchoedByUpstream"))
        self.assertEqual(self.post_message(
            path="/v1/messages?beta=true&key=sk-ant-api03-InTheQuery")[0], 200)
        self.upstream.push(reply_error(400, "invalid_request_error",
                                       "unexpected field near sk-ant-ort01-EchoedAgain"))
        self.assertEqual(self.post_message()[0], 400)
        self.proxy.settle()

    SECRETS_FROM_OUTSIDE = ("EchoedByUpstream", "InTheQuery", "EchoedAgain")

    def test_secrets_that_reach_a_log_line_are_masked(self):
        self.send_secrets_from_outside()
        logged = CAPTURED_LOG.text() + "\n".join(json.loads(self.proxy.request(
            "GET", "/api/logs?limit=1000")[2]))
        # The lines that carried them are there, masked: the check below is not vacuous.
        self.assertIn("POST /v1/messages?beta=true&key=[REDACTED]: strategy", logged)
        self.assertIn("needs attention and is skipped: 401 invalid credentials [REDACTED]",
                      logged)
        for secret in self.SECRETS_FROM_OUTSIDE:
            self.assertNotIn(secret, logged)

    def shown_after_secrets_from_outside(self) -> list:
        """Send secrets from outside; return what `list`, `requests`, the API and page show."""
        self.send_secrets_from_outside()
        shown = [self.ok("list", "--json"), self.ok("requests"), self.ok("stats", "--json")]
        return shown + [self.proxy.request("GET", path)[2].decode()
                        for path in ("/api/accounts", "/api/requests", "/api/stats", "/")]

    def test_a_secret_in_an_upstream_error_is_masked_where_it_is_stored(self):
        shown = "\n".join(self.shown_after_secrets_from_outside())
        for secret in ("EchoedByUpstream", "EchoedAgain"):
            self.assertNotIn(secret, shown)
        self.assertIn("401 invalid credentials [REDACTED]", shown)

    def test_a_secret_in_the_query_string_is_masked_in_the_request_log(self):
        shown = "\n".join(self.shown_after_secrets_from_outside())
        self.assertNotIn("InTheQuery", shown)
        self.assertIn("/v1/messages?beta=true&key=[REDACTED]", shown)
        stored = [row[0] for row in self.proxy.app.store.db.execute("SELECT path FROM requests")]
        self.assertIn("/v1/messages?beta=true&key=[REDACTED]", stored)  # masked where stored too


###############################################################################
# Operations and security #####################################################
###############################################################################

class ServeProcess:
    """`python3 claudeflare.py serve` in a process of its own, with its own files."""

    def __init__(self, upstream_url: str, folder: str, *args: str, **env: str) -> None:
        self.folder = folder
        self.db_path = os.path.join(folder, "claudeflare.db")
        self.log_path = os.path.join(folder, "logs", "app.log")
        self.env = dict(os.environ, CLAUDEFLARE_UPSTREAM_URL=upstream_url,
                        CLAUDEFLARE_TOKEN_URL=upstream_url + "/v1/oauth/token",
                        CLAUDEFLARE_CONFIG_PATH=os.path.join(folder, "config.json"),
                        CLAUDEFLARE_DB_PATH=self.db_path,
                        CLAUDEFLARE_LOG_DIR=os.path.join(folder, "logs"))
        self.env.update(env, PYTHONDEVMODE="1")  # ResourceWarnings show on its stderr
        self.stderr_file = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.stderr = ""
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "claudeflare.py"), "serve", "--port", "0", *args],
            env=self.env, stdout=subprocess.PIPE, stderr=self.stderr_file, text=True)
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE_S * 3)
        line = self.process.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.stop(signal.SIGKILL)
            raise AssertionError(f"server did not start: {line}{self.stderr}")
        self.port = int(line.rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"
        #: What it printed on the terminal, complete once it stopped.
        self.stdout = line

    def request(self, method: str, path: str, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def stop(self, signum: int | None = signal.SIGTERM) -> int:
        """Signal the server (unless signum is None: it is stopping already) and wait for it."""
        if self.process.poll() is None and signum is not None:
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout=DEADLINE_S * 3)  # it prints a few lines: the pipe holds them
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if not self.process.stdout.closed:
            self.stdout += self.process.stdout.read()
            self.process.stdout.close()
        if not self.stderr_file.closed:
            self.stderr_file.seek(0)
            self.stderr = self.stderr_file.read()
            self.stderr_file.close()
        return self.process.returncode

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8") as lines:
            return lines.read()


class ServeTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.addCleanup(self.upstream.close)
        folder = tempfile.TemporaryDirectory(prefix="claudeflare-serve-")
        self.addCleanup(folder.cleanup)
        self.folder = folder.name

    def serve(self, *args: str, **env: str) -> ServeProcess:
        server = ServeProcess(self.upstream.url, self.folder, *args, **env)
        self.addCleanup(self.check_clean_exit, server)
        return server

    def check_clean_exit(self, server: ServeProcess) -> None:
        """Stop the server if the test did not, and fail on any warning it printed."""
        server.stop()
        self.assertNotIn("Warning", server.stderr.replace("WARNING: Listening", ""))
        self.assertNotIn("Traceback", server.stderr)

    def serve_fails(self, **env: str) -> str:
        """Start serve expecting it to refuse; return the one line it printed."""
        done = subprocess.run(
            [sys.executable, os.path.join(HERE, "claudeflare.py"), "serve", "--port", "0"],
            env={**os.environ, "CLAUDEFLARE_UPSTREAM_URL": self.upstream.url,
                 "CLAUDEFLARE_CONFIG_PATH": os.path.join(self.folder, "config.json"),
                 "CLAUDEFLARE_DB_PATH": os.path.join(self.folder, "claudeflare.db"), **env},
            capture_output=True, text=True, timeout=DEADLINE_S * 3)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        return done.stderr

    def cli(self, *args: str, stdin: str = "") -> str:
        code, out, err = run_cli("--config", os.path.join(self.folder, "config.json"), "--db",
                                 os.path.join(self.folder, "claudeflare.db"), *args, stdin=stdin)
        self.assertEqual(code, 0, err)
        return out


class TestLogging(ServeTestCase):
    PRETTY = re.compile(r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] (DEBUG|INFO|WARN|ERROR): "
                        r"\[(\w+)\] .+$")

    def test_pretty_lines_with_components_and_levels(self):
        self.cli("add", "work", "--api-key", stdin="sk-ant-api03-secretvalue\n")
        server = self.serve()
        self.assertEqual(server.request("POST", "/v1/messages", b'{"model":"m"}')[0], 200)
        self.assertEqual(server.stop(), 0)
        lines = server.log().splitlines()
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, self.PRETTY)
        text = "\n".join(lines)
        self.assertRegex(text, r"INFO: \[Proxy\] Request completed for work: 200 in \d+ms")
        self.assertIn("INFO: [Server] claudeflare", text)
        self.assertIn("INFO: [Server] Server stopped", text)
        self.assertNotIn("DEBUG:", text)
        self.assertNotIn("secretvalue", text)

    def test_json_lines_and_debug_level(self):
        server = self.serve(LOG_FORMAT="json", LOG_LEVEL="DEBUG")
        server.request("GET", "/v1/models", headers={"x-api-key": "sk-ant-api03-mine"})
        server.request("GET", "/nowhere")
        self.assertEqual(server.stop(), 0)
        entries = [json.loads(line) for line in server.log().splitlines()]
        for entry in entries:
            self.assertTrue({"ts", "level", "component", "msg"} <= set(entry), entry)
        completed = [entry for entry in entries if entry["msg"].startswith("Request completed")]
        self.assertEqual((completed[0]["status"], completed[0]["component"]), (200, "Proxy"))
        self.assertIn("DEBUG", {entry["level"] for entry in entries})
        self.assertNotIn("sk-ant-api03-mine", server.log())

    def test_warn_level_keeps_info_out_and_debug_flag_logs_to_the_console(self):
        server = self.serve(LOG_LEVEL="WARN")
        server.request("GET", "/v1/models")
        server.stop()
        self.assertNotIn("INFO:", server.log())
        os.unlink(server.log_path)
        debug = self.serve(CLAUDEFLARE_DEBUG="1")
        debug.request("GET", "/v1/models")
        debug.stop()
        self.assertIn("DEBUG: [Proxy]", debug.stderr)
        self.assertIn("Request completed", debug.stderr)

    def test_text_from_outside_cannot_add_a_line_of_its_own(self):
        self.cli("add", "work", "--api-key", stdin="sk-ant-api03-secretvalue\n")
        forged = "[2030-01-01T00:00:00.000Z] ERROR: [OAuth] Failed to refresh token for work"
        self.upstream.push(reply_error(500, "api_error", f"Overloaded\n{forged}\r\x1b[2J"))
        server = self.serve(RETRY_ATTEMPTS="0")
        self.assertEqual(server.request("POST", "/v1/messages", b'{"model":"m"}')[0], 500)
        self.assertEqual(server.stop(), 0)
        lines = server.log().splitlines()
        for line in lines:
            self.assertRegex(line, self.PRETTY)
        self.assertIn(f"got 500 Overloaded\\n{forged}\\r\\x1b[2J", server.log())
        out = self.doctor(CLAUDEFLARE_LOG_DIR=os.path.dirname(server.log_path))
        self.assertNotIn("warn  log: [2030", out)

    def doctor(self, temp: str | None = None, **env: str) -> str:
        """Run doctor in this process (with `temp` as the temp folder); return its output."""
        with unittest.mock.patch.dict(os.environ, CLAUDEFLARE_UPSTREAM_URL=self.upstream.url,
                                      **env), \
                unittest.mock.patch.object(tempfile, "tempdir", temp or tempfile.gettempdir()):
            return run_cli("--config", os.path.join(self.folder, "config.json"), "--db",
                           os.path.join(self.folder, "claudeflare.db"), "doctor")[1]

    def temp_folder(self) -> tuple[str, str, str]:
        """Make a temp folder for serve; return it, its shared log folder and the private one."""
        temp = os.path.join(self.folder, "tmp")
        os.mkdir(temp)
        shared = os.path.join(temp, "claudeflare-logs")
        return temp, shared, f"{shared}-{os.getuid()}"

    def test_the_shared_default_log_folder_is_made_private(self):
        temp, shared, private = self.temp_folder()
        server = self.serve(TMPDIR=temp, CLAUDEFLARE_LOG_DIR="")
        self.assertEqual(server.stop(), 0)
        self.assertEqual(server.stderr, "")
        self.assertEqual(os.stat(shared).st_mode & 0o777, 0o700)
        log_file = os.path.join(shared, "app.log")
        self.assertEqual(os.stat(log_file).st_mode & 0o777, 0o600)
        with open(log_file) as lines:
            self.assertIn("Server stopped", lines.read())
        self.assertFalse(os.path.exists(private))
        self.assertIn(f"\nok    logs: {log_file}: ", self.doctor(temp, CLAUDEFLARE_LOG_DIR=""))

    def test_a_shared_log_folder_others_can_write_is_passed_over_for_a_private_one(self):
        temp, shared, private = self.temp_folder()
        os.mkdir(shared)
        os.chmod(shared, 0o777)
        victim = os.path.join(self.folder, "victim")
        with open(victim, "w") as out:
            out.write("mine\n")
        os.symlink(victim, os.path.join(shared, "app.log"))
        server = self.serve(TMPDIR=temp, CLAUDEFLARE_LOG_DIR="")
        self.assertEqual(server.stop(), 0)
        warning = (f"{shared} can be written by other users: logging to {private} instead (to "
                   f"choose the folder, set CLAUDEFLARE_LOG_DIR to a folder of yours)")
        self.assertEqual(server.stderr, f"claudeflare: warning: {warning}\n")
        with open(victim) as kept:
            self.assertEqual(kept.read(), "mine\n")
        self.assertEqual(os.stat(private).st_mode & 0o777, 0o700)
        with open(os.path.join(private, "app.log")) as lines:
            self.assertIn("Server stopped", lines.read())
        self.assertIn(f"\nwarn  logs: {warning}\n", self.doctor(temp, CLAUDEFLARE_LOG_DIR=""))

    def test_a_shared_log_folder_of_another_user_is_passed_over(self):
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            self.skipTest("only root can give a folder to another user")
        temp, shared, private = self.temp_folder()
        os.mkdir(shared, 0o700)
        os.chown(shared, 54321, 54321)
        server = self.serve(TMPDIR=temp, CLAUDEFLARE_LOG_DIR="")
        self.assertEqual(server.stop(), 0)
        self.assertIn(f"warning: {shared} belongs to another user: logging to {private}",
                      server.stderr)
        self.assertTrue(os.path.exists(os.path.join(private, "app.log")))
        self.assertFalse(os.path.exists(os.path.join(shared, "app.log")))

    def test_a_log_file_serve_cannot_use_is_named_in_one_line_by_serve_and_doctor(self):
        victim = os.path.join(self.folder, "victim")
        with open(victim, "w") as out:
            out.write("mine\n")
        linked = os.path.join(self.folder, "linked")
        os.mkdir(linked)
        os.symlink(victim, os.path.join(linked, "app.log"))
        for folder, problem in ((linked, f"{linked}/app.log is a symbolic link"),
                                (victim, f"{victim} is a file, not a folder")):
            error = self.serve_fails(CLAUDEFLARE_LOG_DIR=folder)
            self.assertIn(f"Cannot write the log: {problem}", error)
            self.assertIn(f"\nFAIL  logs: Cannot write the log: {problem}",
                          self.doctor(CLAUDEFLARE_LOG_DIR=folder))
        with open(victim) as kept:
            self.assertEqual(kept.read(), "mine\n")

    def test_rotation_keeps_three_files_and_the_newest_lines(self):
        folder = os.path.join(self.folder, "rotating")
        logs = claudeflare.LogSetup("INFO", "pretty", folder, False, rotate_bytes=4000)
        try:
            for index in range(400):
                claudeflare.component_logger("Test").info("line %04d %s", index, "x" * 40)
        finally:
            logs.close()
            claudeflare.log.setLevel(logging.DEBUG)
        names = sorted(os.listdir(folder))
        self.assertEqual(names, ["app.log", "app.log.1", "app.log.2", "app.log.3"])
        with open(os.path.join(folder, "app.log")) as newest:
            self.assertIn("line 0399", newest.read().splitlines()[-1])
        for name in names:
            self.assertLessEqual(os.path.getsize(os.path.join(folder, name)), 4000)
            self.assertEqual(os.stat(os.path.join(folder, name)).st_mode & 0o777, 0o600)


class TestServeOnTheTerminal(ServeTestCase):
    def test_serve_says_where_it_answers_and_when_it_stopped(self):
        server = self.serve()
        with open(f"/proc/{server.process.pid}/cmdline", "rb") as cmdline:
            shown = cmdline.read().decode().replace("\0", " ")  # what ps shows
        self.assertIn(f" {os.path.join(HERE, 'claudeflare.py')} serve --port 0", shown)
        self.assertNotIn("\n", shown)
        self.assertLess(len(shown), 250)
        self.assertEqual(server.stop(signal.SIGINT), 0)
        self.assertEqual(server.stdout, (
            f"claudeflare {claudeflare.__version__} listening on {server.url}\n"
            f"  status page: {server.url}/\n"
            f"  log:         {server.log_path}\n"
            f"  accounts:    none: requests go upstream with each client's own credentials; add "
            f"one: python3 claudeflare.py add NAME (or add NAME --api-key)\n"
            f"  strategy:    session\n"
            f"Ctrl+C stops it.\n"
            f"stopping: waiting up to 30s for 0 requests in flight (Ctrl+C again quits at once)\n"
            f"stopped\n"))
        self.cli("add", "work", "--api-key", stdin="sk-ant-api03-x\n")
        self.cli("add", "home", "--api-key", stdin="sk-ant-api03-y\n")
        self.cli("pause", "home")
        server = self.serve(LB_STRATEGY="headroom")
        self.assertEqual(server.stop(), 0)
        self.assertIn("\n  accounts:    1 of 2 can serve\n  strategy:    headroom\n",
                      server.stdout)
        self.cli("pause", "work")
        server = self.serve()
        self.assertEqual(server.stop(), 0)
        self.assertIn("\n  accounts:    none can serve (python3 claudeflare.py list says why); "
                      "add one: python3 claudeflare.py add NAME (or add NAME --api-key)\n",
                      server.stdout)


class TestShutdown(ServeTestCase):
    def test_sigterm_lets_a_stream_finish_and_keeps_its_record(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        events = message_events()
        self.upstream.push(reply_stream(events, hold_after=2, gate=gate))
        server = self.serve()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE_S)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/messages", body=b'{"stream": true}')
        response = connection.getresponse()
        first = response.read1(65536)
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "Shutting down" in server.log(), what="shutdown to begin")
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        gate.set()
        self.assertEqual(first + response.read(), b"".join(events))
        self.assertEqual(server.stop(None), 0)
        store = claudeflare.Store(server.db_path)
        try:
            rows = store.query("SELECT status, streaming, output_tokens FROM requests")
        finally:
            store.close()
        self.assertEqual([tuple(row) for row in rows], [(200, 1, 2)])
        self.assertIn("Server stopped", server.log())

    def test_a_stream_cut_at_the_shutdown_timeout_ends_with_an_error_event_and_is_recorded(
            self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        events = message_events()
        # Connection: close: the upstream side is let go of by its connection, and still cut.
        self.upstream.push(reply_stream(events, hold_after=2, gate=gate,
                                        headers=[("Connection", "close")]))
        server = self.serve(CLAUDEFLARE_SHUTDOWN_TIMEOUT_S="0.5")
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE_S)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/messages", body=b'{"stream": true}')
        response = connection.getresponse()
        received = response.read1(65536)
        wait_for(lambda: self.upstream.holding.is_set(), what="the stream to be held")
        server.process.send_signal(signal.SIGTERM)
        received += response.read()  # ends cleanly: no IncompleteRead
        self.assertTrue(received.startswith(b"".join(events[:2])))
        self.assertIn(b"event: error", received)
        self.assertIn(b"Cut at shutdown", received)
        self.assertEqual(server.stop(None), 0)
        store = claudeflare.Store(server.db_path)
        try:
            rows = store.query("SELECT status, success, error, input_tokens FROM requests")
        finally:
            store.close()
        self.assertEqual(len(rows), 1)
        self.assertEqual((rows[0]["status"], rows[0]["success"], rows[0]["input_tokens"]),
                         (200, 0, 12))
        self.assertIn("Cut at shutdown: shutdown_timeout_s (0.5s) ran out", rows[0]["error"])
        self.assertIn("cut 1 answers short", server.log())

    def test_an_alert_delivery_that_hangs_waits_no_longer_than_the_shutdown_timeout(self):
        hook = WebhookReceiver()
        self.addCleanup(hook.close)
        hook.faults.append("hang")
        store = claudeflare.Store(os.path.join(self.folder, "claudeflare.db"))
        store.add_account("idle", "api_key", 1, api_key="sk-ant-api03-idle")
        store.change_account("idle", paused=1)  # no account can serve: pool_exhausted
        store.close()
        server = self.serve(CLAUDEFLARE_SHUTDOWN_TIMEOUT_S="1", CLAUDEFLARE_ALERT_URL=hook.url())
        self.assertTrue(hook.hanging.wait(DEADLINE_S))
        started = time.monotonic()
        self.assertEqual(server.stop(), 0)
        self.assertLess(time.monotonic() - started, 1 + 3)

    def test_hung_usage_reads_and_refreshes_wait_no_longer_than_the_shutdown_timeout(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        oauth = self.upstream.oauth
        oauth.usage_failures.append(hang(gate))
        oauth.failures.append(hang(gate))
        store = claudeflare.Store(os.path.join(self.folder, "claudeflare.db"))
        access, refresh = oauth.issue()
        store.add_account("soon", "oauth", 5, access_token=access, refresh_token=refresh,
                          expires_at=claudeflare.now_ms() + 600_000)  # due for a refresh
        store.close()
        server = self.serve(CLAUDEFLARE_SHUTDOWN_TIMEOUT_S="1")
        wait_for(lambda: oauth.usage_reads and oauth.refresh_requests,
                 what="a usage read and a refresh to hang")
        started = time.monotonic()
        self.assertEqual(server.stop(), 0)
        self.assertLess(time.monotonic() - started, 1 + 3)
        store = claudeflare.Store(server.db_path)
        try:
            kept = store.account("soon")
        finally:
            store.close()
        self.assertEqual((kept.access_token, kept.refresh_token), (access, refresh))
        self.assertIn("Server stopped", server.log())

    def test_a_refresh_that_finishes_within_the_shutdown_timeout_keeps_its_new_pair(self):
        oauth = self.upstream.oauth
        oauth.delay = 1.0
        store = claudeflare.Store(os.path.join(self.folder, "claudeflare.db"))
        access, refresh = oauth.issue()
        store.add_account("soon", "oauth", 5, access_token=access, refresh_token=refresh,
                          expires_at=claudeflare.now_ms() + 600_000)  # due for a refresh
        store.close()
        server = self.serve(CLAUDEFLARE_SHUTDOWN_TIMEOUT_S="20")
        wait_for(lambda: oauth.refresh_requests, what="a refresh to begin")
        self.assertEqual(server.stop(), 0)
        store = claudeflare.Store(server.db_path)
        try:
            kept = store.account("soon")
        finally:
            store.close()
        self.assertNotEqual(kept.refresh_token, refresh)
        self.assertIn(kept.refresh_token, oauth.refresh_tokens)

    def test_sigterm_releases_the_requests_waiting_for_a_reset_with_a_clear_error(self):
        server = self.serve(CLAUDEFLARE_HOLD_S="120", CLAUDEFLARE_SHUTDOWN_TIMEOUT_S="60")
        self.cli("add", "a", "--api-key", stdin="sk-ant-api03-a\n")
        self.upstream.quotas["sk-ant-api03-a"] = {"5h": Quota(1, 60, used=1)}
        body = json.dumps({"model": SONNET, "messages": []}).encode()
        plain = {}
        worker = threading.Thread(target=lambda: plain.update(
            answer=server.request("POST", "/v1/messages", body)))
        worker.start()
        self.addCleanup(worker.join, DEADLINE_S)
        wait_for(lambda: "waiting for the reset" in server.log(), what="a request to wait")
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE_S)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/messages", json.dumps(
            {"model": SONNET, "stream": True, "messages": []}).encode())
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        wait_for(lambda: server.log().count("waiting for the reset") == 2,
                 what="the stream to wait too")
        server.process.send_signal(signal.SIGTERM)
        data = response.read()  # at once, not after shutdown_timeout_s
        worker.join(DEADLINE_S)
        self.assertIn(b"event: error", data)
        self.assertIn(b"claudeflare is shutting down", data)
        status, _, answer = plain["answer"]
        self.assertEqual(status, 503)
        self.assertIn("claudeflare is shutting down", json.loads(answer)["error"]["message"])
        self.assertEqual(server.stop(None), 0)
        self.assertEqual(len(self.upstream.messages()), 1)

    def test_serve_runs_from_another_folder_under_another_name(self):
        elsewhere = os.path.join(self.folder, "bin", "cf")  # no .py: installed as a command
        os.makedirs(os.path.dirname(elsewhere))
        shutil.copy(os.path.join(HERE, "claudeflare.py"), elsewhere)
        work = os.path.join(self.folder, "work")
        os.makedirs(work)
        for name in ("queue.py", "secrets.py", "json.py"):  # files that would shadow modules
            with open(os.path.join(work, name), "w") as out:
                out.write("raise SystemExit(7)\n")
        env = dict(os.environ, CLAUDEFLARE_UPSTREAM_URL=self.upstream.url,
                   CLAUDEFLARE_CONFIG_PATH=os.path.join(self.folder, "config.json"),
                   CLAUDEFLARE_DB_PATH=os.path.join(self.folder, "claudeflare.db"),
                   CLAUDEFLARE_LOG_DIR=os.path.join(self.folder, "logs"))
        with subprocess.Popen([sys.executable, elsewhere, "serve", "--port", "0"], cwd=work,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as process:
            try:
                line = process.stdout.readline()
                self.assertIn("listening on", line, process.stderr.read() if not line else "")
                port = int(line.rsplit(":", 1)[1])
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
                connection.request("GET", "/health")
                self.assertEqual(connection.getresponse().status, 200)
                connection.close()
            finally:
                process.send_signal(signal.SIGTERM)
                out, err = process.communicate(timeout=DEADLINE_S)
        self.assertEqual(process.returncode, 0, err)
        self.assertFalse(os.path.exists(os.path.join(self.folder, "bin", "__pycache__")))

    def test_a_second_signal_exits_at_once(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.upstream.push(hang(gate))
        server = self.serve(CLAUDEFLARE_SHUTDOWN_TIMEOUT_S="60")

        def hanging_request() -> None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                server.request("POST", "/v1/messages", b"{}")

        worker = threading.Thread(target=hanging_request)
        worker.start()
        self.addCleanup(worker.join)
        wait_for(lambda: self.upstream.requests, what="the request to reach the upstream")
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "Shutting down" in server.log(), what="shutdown to begin")
        server.process.send_signal(signal.SIGINT)  # the second Ctrl+C
        try:
            code = server.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.fail("a second Ctrl+C did not end the server within a second")
        self.assertNotEqual(code, 0)
        gate.set()

    def test_second_server_on_the_same_database_is_refused(self):
        first = self.serve()
        second = subprocess.run(
            [sys.executable, os.path.join(HERE, "claudeflare.py"), "serve", "--port", "0"],
            env=first.env, capture_output=True, text=True, timeout=DEADLINE_S * 3)
        self.assertEqual(second.returncode, 1)
        self.assertIn("Another claudeflare server is already running", second.stderr)
        self.assertIn(f"pid {first.process.pid}, port {first.port}", second.stderr)
        self.assertEqual(first.request("GET", "/health")[0], 200)
        self.assertEqual(first.stop(), 0)
        again = self.serve()
        self.assertEqual(again.request("GET", "/health")[0], 200)

    def test_binding_beyond_loopback_without_keys_warns_loudly(self):
        server = self.serve("--host", "0.0.0.0")
        server.stop()
        self.assertIn("WARNING: Listening on 0.0.0.0", server.stderr)
        self.assertIn("with no client keys", server.log())


class ConnectProxy:
    """An HTTP proxy that opens CONNECT tunnels, optionally demanding credentials."""

    def __init__(self, credentials: str | None = None) -> None:
        self.tunnels: list[str] = []
        self.credentials = credentials
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format, *args) -> None:
                pass

            def do_CONNECT(self) -> None:
                expected = "Basic " + base64.b64encode(outer.credentials.encode()).decode() \
                    if outer.credentials else None
                if expected and self.headers["Proxy-Authorization"] != expected:
                    self.send_response(407)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                host, port = self.path.rsplit(":", 1)
                outer.tunnels.append(self.path)
                with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as far:
                    self.send_response(200, "Connection established")
                    self.end_headers()
                    self.pump(self.connection, far)
                self.close_connection = True

            def pump(self, near: socket.socket, far: socket.socket) -> None:
                pending = self.rfile.peek() if hasattr(self.rfile, "peek") else b""
                if pending:
                    far.sendall(self.rfile.read(len(pending)))
                while True:
                    ready, _, _ = select.select([near, far], [], [], DEADLINE_S)
                    if not ready:
                        return
                    for source in ready:
                        data = source.recv(65536)
                        if not data:
                            return
                        (far if source is near else near).sendall(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class TestOutboundProxy(unittest.TestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.addCleanup(self.upstream.close)

    def proxy_with(self, **env: str) -> Proxy:
        with unittest.mock.patch.dict(os.environ, env):
            proxy = Proxy(self.upstream.url, retry_attempts=0)
        self.addCleanup(proxy.close)
        return proxy

    def test_upstream_traffic_goes_through_the_proxy_with_its_credentials(self):
        tunnel = ConnectProxy("user@corp:p@ss")
        self.addCleanup(tunnel.close)
        address = tunnel.url.replace("http://", "http://user%40corp:p%40ss@")
        proxy = self.proxy_with(HTTP_PROXY=address, NO_PROXY="example.com")
        for _ in range(3):
            self.assertEqual(proxy.request("POST", "/v1/messages", b'{"model":"m"}')[0], 200)
        self.assertEqual(tunnel.tunnels, [self.upstream.url.split("//")[1]])
        self.assertEqual(len(self.upstream.requests), 3)

    def test_lower_case_variable_and_no_proxy_bypass(self):
        tunnel = ConnectProxy()
        self.addCleanup(tunnel.close)
        proxy = self.proxy_with(http_proxy=tunnel.url)
        self.assertEqual(proxy.request("GET", "/v1/models")[0], 200)
        self.assertEqual(len(tunnel.tunnels), 1)
        bypassed = self.proxy_with(http_proxy=tunnel.url, NO_PROXY="localhost,127.0.0.1")
        self.assertEqual(bypassed.request("GET", "/v1/models")[0], 200)
        self.assertEqual(len(tunnel.tunnels), 1)

    def test_errors_name_the_proxy_when_the_proxy_failed(self):
        tunnel = ConnectProxy("right:secret")
        self.addCleanup(tunnel.close)
        refused = self.proxy_with(HTTP_PROXY=tunnel.url)
        status, _, body = refused.request("POST", "/v1/messages", b"{}")
        self.assertEqual(status, 503)
        self.assertIn(f"Proxy {tunnel.url} refused to open a tunnel",
                      json.loads(body)["lastError"])
        self.assertIn("407", json.loads(body)["lastError"])
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
        status, _, body = self.proxy_with(HTTP_PROXY=dead).request("POST", "/v1/messages", b"{}")
        self.assertIn(f"Proxy ECONNREFUSED: {dead}", json.loads(body)["lastError"])

    def test_token_endpoint_goes_through_the_proxy_too(self):
        tunnel = ConnectProxy()
        self.addCleanup(tunnel.close)
        proxy = self.proxy_with(HTTP_PROXY=tunnel.url)
        access, refresh = self.upstream.oauth.issue()
        proxy.app.store.add_account("max", "oauth", 1, access_token=access,
                                    refresh_token=refresh, expires_at=claudeflare.now_ms())
        self.assertEqual(proxy.request("POST", "/v1/messages", b'{"model":"m"}')[0], 200)
        self.assertEqual(self.upstream.oauth.refresh_requests, 1)
        self.assertEqual(len(tunnel.tunnels), 2)


class TestClientKeys(ServerWithAccounts):
    def setUp(self) -> None:
        super().setUp()
        self.add_key("account")
        out = self.ok("keys", "add", "laptop")
        self.key = re.search(r"cfk-\S+", out).group(0)
        self.assertIn("shown this once", out)

    def test_keys_are_listed_and_stored_only_as_hashes(self):
        self.assertIn("laptop", self.ok("keys", "list"))
        self.assertNotIn(self.key, self.ok("keys", "list"))
        dump = "\n".join(self.proxy.app.store.db.iterdump())
        self.assertNotIn(self.key, dump)
        self.assertNotIn(self.key[4:20], dump)

    def test_proxy_requires_a_key_and_strips_it(self):
        status, _, body = self.post_message()
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body)["error"]["type"], "authentication_error")
        self.assertEqual(self.post_message(headers={"x-api-key": "cfk-wrong"})[0], 401)
        self.assertEqual(self.upstream.messages(), [])
        for headers in ({"x-api-key": self.key}, {"Authorization": f"Bearer {self.key}"}):
            self.assertEqual(self.post_message(headers=headers)[0], 200)
            seen = self.upstream.messages()[-1].headers
            self.assertEqual(seen["x-api-key"], "sk-ant-api03-account")
            self.assertNotIn(self.key, str(seen.items()))
        self.proxy.settle()
        stats = json.loads(self.proxy.request("GET", "/api/stats",
                                              headers={"x-api-key": self.key})[2])
        self.assertEqual({item["name"]: item["requests"] for item in stats["clientKeys"]},
                         {"laptop": 2})
        self.assertIn("without a valid client key", CAPTURED_LOG.text())

    def test_api_page_and_metrics_require_a_key_but_health_does_not(self):
        for path in ("/", "/dashboard", "/api/stats", "/api/accounts", "/metrics",
                     "/api/logs"):
            status, headers, _ = self.proxy.request("GET", path)
            self.assertEqual(status, 401, path)
            self.assertIn("Basic", headers["WWW-Authenticate"])
            basic = base64.b64encode(f"me:{self.key}".encode()).decode()
            self.assertEqual(self.proxy.request("GET", path, headers={
                "Authorization": f"Basic {basic}"})[0], 200, path)
            self.assertEqual(self.proxy.request("GET", path, headers={
                "Authorization": "Basic " + base64.b64encode(b"me:wrong").decode()})[0], 401)
        status, _, body = self.proxy.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertNotIn(b"account", body.replace(b'"accounts"', b""))

    def test_cross_site_changes_are_refused(self):
        assert_cross_site_refused(self, {"x-api-key": self.key})

    def test_without_usable_accounts_the_client_key_stays_behind(self):
        self.ok("pause", "account")
        for headers, own in (
                ({"x-api-key": self.key, "Authorization": "Bearer sk-ant-api03-own"},
                 ("Authorization", "Bearer sk-ant-api03-own")),
                ({"Authorization": f"Bearer {self.key}", "x-api-key": "sk-ant-api03-own"},
                 ("x-api-key", "sk-ant-api03-own"))):
            self.assertEqual(self.post_message(headers=headers)[0], 200)
            seen = self.upstream.messages()[-1].headers
            self.assertEqual(seen[own[0]], own[1])
            self.assertNotIn(self.key, str(seen.items()))
        self.assertIn("No active accounts available", CAPTURED_LOG.text())

    def test_with_client_keys_any_host_name_is_answered(self):
        for path in ("/v1/messages", "/api/stats"):
            status, _, _ = self.proxy.request("POST" if path == "/v1/messages" else "GET", path,
                                              b"{}" if path == "/v1/messages" else None,
                                              {"Host": "proxy.corp.example",
                                               "x-api-key": self.key})
            self.assertEqual(status, 200, path)

    def test_removing_the_last_key_opens_the_proxy_again(self):
        self.ok("keys", "remove", "laptop")
        self.assertEqual(self.post_message()[0], 200)
        code, _, err = self.cli("keys", "remove", "laptop")
        self.assertIn("Client key not found: laptop", err)


#: budget_timezone in the budget tests: half an hour off UTC, so UTC days would not match.
BUDGET_ZONE = datetime.timezone(datetime.timedelta(hours=5, minutes=30))


def costly_answer(input_tokens: int = 100_000, cache_read: int = 0):
    """A Sonnet answer whose usage costs $0.30 per 100,000 input tokens."""
    return reply_json(200, message_body(usage={
        "input_tokens": input_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read}))


class TestClientKeyLimits(ServerWithAccounts):
    """Budgets, limits and owners on client keys, enforced on real requests."""

    settings = {"budget_timezone": "UTC+05:30"}

    def setUp(self) -> None:
        super().setUp()
        self.add_key("account")

    def new_key(self, name: str, *options: str) -> str:
        """Add a client key with limits through the CLI; return its secret."""
        return re.search(r"cfk-\S+", self.ok("keys", "add", name, *options)).group(0)

    def post_as(self, key: str, model: str = "claude-sonnet-4-5", counted: bool = True):
        """Send a message with a client key; unless told not to, wait until the server has
        counted it (a client has its answer a moment before that)."""
        body = {"model": model, "max_tokens": 64,
                "messages": [{"role": "user", "content": "Hi"}]}
        answer = self.proxy.request("POST", "/v1/messages", body,
                                    {"content-type": "application/json", "x-api-key": key})
        if counted:
            wait_for(lambda: self.proxy.server.life.running == 0,
                     what="the request to be counted")
        return answer

    def refusal(self, answer, status: int, error_type: str) -> str:
        """Check an Anthropic-shaped refusal; return its message."""
        self.assertEqual(answer[0], status, answer[2])
        error = json.loads(answer[2])["error"]
        self.assertEqual(error["type"], error_type)
        return error["message"]

    def restart(self) -> None:
        """Stop the server and start another on the same database and settings."""
        proxy = self.proxy
        proxy.stop()
        proxy.server = claudeflare.make_server(proxy.app.settings, proxy.db_path)
        proxy.app, proxy.port = proxy.server.app, proxy.server.server_address[1]
        proxy.thread = threading.Thread(target=proxy.server.serve_forever, args=(0.05,),
                                        daemon=True)
        proxy.thread.start()

    def spend_past_a_day_budget(self) -> str:
        """Cross a $0.50 day budget with two $0.30 answers; return the key."""
        key = self.new_key("alice", "--owner", "Alice", "--budget-day", "0.5")
        self.upstream.push(costly_answer(), costly_answer())
        self.assertEqual(self.post_as(key)[0], 200)
        self.assertEqual(self.post_as(key)[0], 200)  # under budget when it starts: it runs
        return key

    def test_a_day_budget_crossed_by_recorded_costs_refuses_until_the_day_resets(self):
        key = self.spend_past_a_day_budget()
        answer = self.post_as(key)
        message = self.refusal(answer, 429, "rate_limit_error")
        local = datetime.datetime.now(BUDGET_ZONE)
        reset = local.replace(hour=0, minute=0, second=0, microsecond=0) + \
            datetime.timedelta(days=1)
        self.assertIn("day budget (budget_day): $0.6000 spent of $0.5000", message)
        self.assertIn(f"resets at {claudeflare.iso_time(int(reset.timestamp() * 1000))}",
                      message)
        self.assertAlmostEqual(int(answer[1]["retry-after"]),
                               (reset - local).total_seconds(), delta=30)
        self.assertEqual(len(self.upstream.messages()), 2)  # no account was used

    def test_counters_survive_a_restart_and_a_new_day_serves_again(self):
        key = self.spend_past_a_day_budget()
        self.proxy.settle()
        self.restart()
        self.refusal(self.post_as(key), 429, "rate_limit_error")
        self.proxy.stop()
        # The day's requests become yesterday's: a minute before midnight in budget_timezone.
        day_start = datetime.datetime.now(BUDGET_ZONE).replace(hour=0, minute=0, second=0,
                                                               microsecond=0)
        with contextlib.closing(sqlite3.connect(self.proxy.db_path)) as db, db:
            db.execute("UPDATE requests SET timestamp = ?",
                       (int(day_start.timestamp() * 1000) - 60_000,))
        self.restart()
        self.upstream.push(costly_answer(), costly_answer())
        self.assertEqual(self.post_as(key)[0], 200)
        self.assertEqual(self.post_as(key)[0], 200)  # the new day counts from 0
        self.refusal(self.post_as(key), 429, "rate_limit_error")

    def test_week_and_month_budgets_count_the_same_spending(self):
        key = self.new_key("bob", "--budget-week", "0.2")
        self.upstream.push(costly_answer())
        self.assertEqual(self.post_as(key)[0], 200)
        self.assertIn("week budget (budget_week)",
                      self.refusal(self.post_as(key), 429, "rate_limit_error"))
        self.ok("keys", "set", "bob", "--no-budget", "--budget-month", "0.25")
        self.assertIn("month budget (budget_month): $0.3000 spent of $0.2500",
                      self.refusal(self.post_as(key), 429, "rate_limit_error"))

    def test_key_budget_reached_is_alerted_once_at_80_and_once_at_100_percent(self):
        hook = WebhookReceiver()
        self.addCleanup(hook.close)
        self.ok("config", "set", "alert_url", hook.url())
        key = self.new_key("alice", "--owner", "Alice Martin", "--budget-day", "0.5")
        self.upstream.push(costly_answer(), costly_answer(50_000), costly_answer(10_000),
                           costly_answer(20_000))

        def alerted(count: int) -> list[dict]:
            return wait_for(lambda: len(hook.events("key_budget_reached")) >= count
                            and hook.events("key_budget_reached"), what=f"{count} alerts")

        self.assertEqual(self.post_as(key)[0], 200)  # $0.30: 60%
        self.assertEqual(self.post_as(key)[0], 200)  # $0.45: 90%
        alerted(1)
        self.assertEqual(self.post_as(key)[0], 200)  # $0.48: 96%, still the 80% condition
        # Each budget set later is alerted later: a repeat of the day's would come first.
        self.ok("keys", "set", "alice", "--budget-week", "0.55")  # 87%
        alerted(2)
        self.assertEqual(self.post_as(key)[0], 200)  # $0.54: 108% (98% of the week)
        alerted(3)
        self.refusal(self.post_as(key), 429, "rate_limit_error")
        self.ok("keys", "set", "alice", "--budget-month", "0.5")
        alerts = alerted(4)
        fix = "python3 claudeflare.py keys set alice --budget-"
        self.assertEqual([(alert["severity"], alert["account"], alert["fix"])
                          for alert in alerts],
                         [("warning", None, fix + "day USD"), ("warning", None, fix + "week USD"),
                          ("critical", None, fix + "day USD"),
                          ("critical", None, fix + "month USD")])
        day_end = datetime.datetime.now(BUDGET_ZONE).replace(
            hour=0, minute=0, second=0, microsecond=0) + datetime.timedelta(days=1)
        resets = claudeflare.iso_time(int(day_end.timestamp() * 1000))
        self.assertEqual(alerts[0]["message"], "Client key alice (owner Alice Martin) has used "
                         f"90% of its day budget: $0.4500 spent of $0.5000; it resets at {resets}")
        self.assertEqual(alerts[2]["message"], "Client key alice (owner Alice Martin) has "
                         "reached its day budget: $0.5400 spent of $0.5000; it is refused until "
                         f"the budget resets at {resets}")
        self.assertEqual(len(hook.events()), 4)
        stored = self.proxy.app.client_keys()[0]
        for text in hook.texts():
            for secret in (key, "cfk-", stored.key_hash, stored.salt, "T0SECRET"):
                self.assertNotIn(secret, text)

    def test_the_token_limit_weighs_cache_reads_as_the_price_table_does(self):
        key = self.new_key("carol", "--tokens-day", "25")
        self.upstream.push(costly_answer(input_tokens=10, cache_read=100),
                           costly_answer(input_tokens=10, cache_read=100))
        self.assertEqual(self.post_as(key)[0], 200)  # 10 + 100 x 0.1 = 20 tokens
        self.assertEqual(self.post_as(key)[0], 200)
        message = self.refusal(self.post_as(key), 429, "rate_limit_error")
        self.assertIn("daily token limit (tokens_day): 40 tokens used of 25", message)

    def test_max_concurrent_refuses_with_a_short_retry_after_while_one_runs(self):
        key = self.new_key("dave", "--max-concurrent", "1")
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.upstream.push(reply_stream(message_events(), hold_after=2, gate=gate))
        body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                "messages": [{"role": "user", "content": "Hi"}]}
        connection = self.proxy.connect()
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/messages", json.dumps(body),
                           {"content-type": "application/json", "x-api-key": key})
        self.assertTrue(self.upstream.holding.wait(DEADLINE_S))
        answer = self.post_as(key, counted=False)
        self.assertIn("requests in flight", self.refusal(answer, 429, "rate_limit_error"))
        self.assertEqual(answer[1]["retry-after"], "1")
        gate.set()
        connection.getresponse().read()
        self.proxy.settle()
        self.assertEqual(self.post_as(key)[0], 200)

    def test_rpm_refuses_the_requests_past_it_within_a_minute(self):
        key = self.new_key("erin", "--rpm", "2")
        self.assertEqual(self.post_as(key)[0], 200)
        self.assertEqual(self.post_as(key)[0], 200)
        answer = self.post_as(key)
        self.assertIn("(rpm 2)", self.refusal(answer, 429, "rate_limit_error"))
        self.assertTrue(1 <= int(answer[1]["retry-after"]) <= 60)
        self.assertEqual(len(self.upstream.messages()), 2)

    def test_a_model_outside_the_patterns_gets_403_naming_the_allowed_ones(self):
        key = self.new_key("frank", "--models", "claude-haiku-*, claude-sonnet-4-*")
        self.assertEqual(self.post_as(key, "claude-sonnet-4-5")[0], 200)
        message = self.refusal(self.post_as(key, "claude-opus-4-5"), 403, "permission_error")
        self.assertIn("may not use claude-opus-4-5; it may use claude-haiku-*, "
                      "claude-sonnet-4-*", message)
        self.assertEqual(len(self.upstream.messages()), 1)

    def test_a_key_with_limits_changes_nothing_through_the_api(self):
        owner, member = self.new_key("owner"), self.new_key("member", "--rpm", "100")
        strategy = b'{"strategy": "round-robin"}'

        def post(path: str, key: str, body: bytes = b"{}"):
            return self.proxy.request("POST", path, body, {"content-type": "application/json",
                                                           "x-api-key": key})

        status, _, body = post("/api/config/strategy", member, strategy)
        self.assertEqual(status, 403)
        self.assertIn("member has limits, so it may not change claudeflare",
                      json.loads(body)["error"])
        self.assertEqual(post("/api/accounts/account/pause", member)[0], 403)
        self.assertEqual(post("/api/stats/reset", member)[0], 403)
        self.assertEqual(self.listed()["account"]["status"], "active")
        self.assertEqual(self.proxy.request("GET", "/api/keys", headers={"x-api-key": member})[0],
                         200)  # it may see how the pool is used
        self.assertEqual(post("/api/config/strategy", owner, strategy)[0], 200)

    def test_a_model_limit_reads_the_model_the_upstream_will_use(self):
        key = self.new_key("frank", "--models", "claude-haiku-*")
        headers = {"content-type": "application/json", "x-api-key": key}
        opus = json.dumps({"model": "claude-opus-4-5", "max_tokens": 5, "messages": []})

        def send(body: str, path: str = "/v1/messages"):
            return self.proxy.request("POST", path, body.encode(), headers)

        self.refusal(send(" \n" + opus), 403, "permission_error")
        self.assertIn("more than once", self.refusal(send(
            '{"model": "claude-haiku-4-5", "messages": [], "model": "claude-opus-4-5"}'), 400,
            "invalid_request_error"))
        self.assertIn("names no model", self.refusal(send('{"messages": []}'), 400,
                                                     "invalid_request_error"))
        self.assertEqual(send(" " + opus.replace("opus", "haiku"))[0], 200)
        batch = json.dumps({"requests": [{"custom_id": "1", "params": json.loads(opus)}]})
        self.assertIn("cannot be measured", self.refusal(send(batch, "/v1/messages/batches"),
                                                         403, "permission_error"))
        self.assertEqual(self.proxy.request("GET", "/v1/models", headers=headers)[0], 200)
        self.assertEqual([(request.method, request.path) for request in self.upstream.messages()],
                         [("POST", "/v1/messages"), ("GET", "/v1/models")])
        self.assertEqual(self.upstream.messages()[0].json()["model"], "claude-haiku-4-5")
        budgeted = self.new_key("bob", "--budget-day", "5")
        self.refusal(self.proxy.request("POST", "/v1/messages/batches", batch.encode(),
                                        {**headers, "x-api-key": budgeted}), 403,
                     "permission_error")
        code, _, err = self.cli("keys", "add", "eve", "--models", " , ")
        self.assertEqual(code, 1)
        self.assertIn("--models takes one or more patterns", err)

    def test_expired_and_paused_keys_get_401_saying_so_and_keys_set_applies_at_once(self):
        key = self.new_key("gina", "--expires", "2020-01-31")
        self.assertIn("expired at 2020-01-31T18:30:00",  # the day's end in budget_timezone
                      self.refusal(self.post_as(key), 401, "authentication_error"))
        self.ok("keys", "set", "gina", "--no-expires")
        self.assertEqual(self.post_as(key)[0], 200)
        self.ok("keys", "set", "gina", "--pause")
        self.assertIn("gina is paused", self.refusal(self.post_as(key), 401,
                                                     "authentication_error"))
        status, _, body = self.proxy.request("GET", "/api/keys", headers={"x-api-key": key})
        self.assertEqual(status, 401)
        self.assertIn(b"paused", body)
        self.ok("keys", "set", "gina", "--resume", "--budget-day", "0")
        self.refusal(self.post_as(key), 429, "rate_limit_error")
        self.ok("keys", "set", "gina", "--no-budget-day")
        self.assertEqual(self.post_as(key)[0], 200)

    def test_a_priority_floor_keeps_the_key_off_better_accounts(self):
        self.add_key("team")
        self.ok("priority", "team", "1")
        key = self.new_key("ci", "--priority-floor", "1")
        for _ in range(3):
            self.assertEqual(self.post_as(key)[0], 200)
        self.assertEqual({request.headers["x-api-key"] for request in self.upstream.messages()},
                         {"sk-ant-api03-team"})
        self.ok("keys", "set", "ci", "--priority-floor", "2")
        self.assertIn("priority 2 or more", self.refusal(self.post_as(key), 403,
                                                         "permission_error"))
        self.assertEqual(len(self.upstream.messages()), 3)

    def test_no_database_query_on_the_request_path_even_while_the_writer_lags(self):
        key = self.new_key("hank", "--budget-day", "0.5")
        self.upstream.push(costly_answer(), costly_answer())
        store = self.proxy.app.store
        statements: list[str] = []
        for connection in (store.db, store.reader, store.stats_reader):
            connection.set_trace_callback(statements.append)
        self.addCleanup(lambda: [connection.set_trace_callback(None) for connection in
                                 (store.db, store.reader, store.stats_reader)])
        holder = DatabaseHolder(self.proxy.db_path)  # the request log cannot be written
        self.addCleanup(holder.release)
        self.assertEqual(self.post_as(key)[0], 200)
        self.assertEqual(self.post_as(key)[0], 200)
        self.refusal(self.post_as(key), 429, "rate_limit_error")
        self.assertEqual([statement for statement in statements
                          if re.search(r"SELECT .*FROM requests", statement, re.S)], [])
        self.assertEqual(store.query("SELECT COUNT(*) FROM requests")[0][0], 0)

    def test_owner_limits_and_spending_in_keys_list_the_api_the_page_and_metrics(self):
        key = self.spend_past_a_day_budget()
        self.new_key("ivan", "--rpm", "10", "--models", "claude-haiku-*")
        self.refusal(self.post_as(key), 429, "rate_limit_error")
        self.proxy.settle()
        listed = self.ok("keys", "list")
        self.assertRegex(listed, r"alice +Alice +active +\$0\.6000/\$0\.5000 +\$0\.6000 ")
        self.assertIn("10/min; models claude-haiku-*", listed)
        self.assertNotIn(key, listed)
        headers = {"x-api-key": key}
        keys = json.loads(self.proxy.request("GET", "/api/keys", headers=headers)[2])
        alice = keys[0]
        self.assertEqual((alice["owner"], alice["limits"]["budgetDay"], alice["spent"]["day"],
                          alice["inFlight"]), ("Alice", 0.5, 0.6, 0))
        self.assertEqual(keys[1]["limits"]["models"], ["claude-haiku-*"])
        text = json.dumps(keys)
        self.assertNotIn(key, text)
        self.assertNotIn("hash", text)
        page = self.proxy.request("GET", "/", headers=headers)[2].decode()
        self.assertIn("<h2>Client keys</h2>", page)
        self.assertIn('<i class="full" style="width:100%"></i></span>$0.6000', page)
        # Cards on a phone, as the accounts are: every cell but the name says what it is.
        keys = re.search(r'<table class="accounts keys">.*?</table>', page, re.S).group(0)
        cells = re.findall(r"<td([^>]*)>", keys)
        self.assertTrue(cells and all("data-label=" in cell or "name" in cell
                                      for cell in cells), cells)
        metrics = self.proxy.request("GET", "/metrics", headers=headers)[2].decode()
        self.assertIn('claudeflare_client_key_spend_usd{key="alice",period="day"} 0.600000',
                      metrics)
        self.assertIn('claudeflare_client_key_refusals_total{key="alice",reason="budget_day"} 1',
                      metrics)

    def test_budget_timezone_and_limit_options_are_checked(self):
        self.assertIn("Unknown time zone: 'Mars/Base'",
                      self.cli("config", "set", "budget_timezone", "Mars/Base")[2])
        self.assertIn("contradict", self.cli("keys", "add", "x", "--rpm", "2", "--no-rpm")[2])
        self.assertIn("Invalid --expires", self.cli("keys", "add", "x", "--expires", "soon")[2])
        self.assertIn("Client key not found: nobody",
                      self.cli("keys", "set", "nobody", "--pause")[2])
        self.assertIn("takes no limit options", self.cli("keys", "list", "--rpm", "2")[2])


###############################################################################
# TLS, doctor and service #####################################################
###############################################################################

#: A self-signed certificate for localhost and 127.0.0.1, valid from 2000 to 2100, its key, and
#: a key of another certificate.
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBjDCCATKgAwIBAgIBATAKBggqhkjOPQQDAjAUMRIwEAYDVQQDDAlsb2NhbGhv
c3QwIBcNMDAwMTAxMDAwMDAwWhgPMjEwMDAxMDEwMDAwMDBaMBQxEjAQBgNVBAMM
CWxvY2FsaG9zdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMLxUqMgOEv2YIeg
Xezl1uTN2DVRPd7l5JgcBE+pPXKAnMcHYbI11kjJB1+yABl27rqotB/34MfzEkgM
mbCPIzWjczBxMBoGA1UdEQQTMBGCCWxvY2FsaG9zdIcEfwAAATAPBgNVHRMBAf8E
BTADAQH/MA4GA1UdDwEB/wQEAwIChDATBgNVHSUEDDAKBggrBgEFBQcDATAdBgNV
HQ4EFgQU01YBU8dVv4e41e8MSKmMf6cdRj0wCgYIKoZIzj0EAwIDSAAwRQIhAIsM
G58QCxJ3WPsWOARCldk0rRfCFb1ru5RRF/8COWwDAiAKhtcDfBDoOGyqg/fB5lj7
XVsu4BtmUPC/mES8F5pC1Q==
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg5MvWQ2+tq3UOyLnS
EVbBAaAyTC2KXI+DBo46rDmdsgehRANCAATC8VKjIDhL9mCHoF3s5dbkzdg1UT3e
5eSYHARPqT1ygJzHB2GyNdZIyQdfsgAZdu66qLQf9+DH8xJIDJmwjyM1
-----END PRIVATE KEY-----
"""
OTHER_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgjpazTAcn5ACO1GlH
7MDHNHaHky55XnntrGUnwDjp38ehRANCAAQBbvL7s5QKvPqLMHbK7us+o6S3L06h
QFMdYUfzBgAGV5kdDX46cB1XxURCWNe0/HUWClDfmnEnH6cQMXwUfJuy
-----END PRIVATE KEY-----
"""


def write_pem_files(folder: str) -> tuple[str, str, str]:
    """Write the test certificate, its key and the other key; return their paths."""
    paths = []
    for name, text in (("cert.pem", TEST_CERT), ("key.pem", TEST_KEY), ("other.pem", OTHER_KEY)):
        paths.append(os.path.join(folder, name))
        with open(paths[-1], "w") as out:
            out.write(text)
    return paths[0], paths[1], paths[2]


def free_port() -> int:
    """Return a port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TestTLS(ServeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.cert, self.key, self.other_key = write_pem_files(self.folder)
        self.trust = ssl.create_default_context(cafile=self.cert)

    def https(self, port: int, method: str, path: str, body=None, host: str = "127.0.0.1"):
        connection = http.client.HTTPSConnection(host, port, timeout=DEADLINE_S,
                                                 context=self.trust)
        try:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def test_health_and_v1_requests_over_https(self):
        proxy = Proxy(self.upstream.url, tls_cert=self.cert, tls_key=self.key)
        self.addCleanup(proxy.close)
        status, body = self.https(proxy.port, "GET", "/health", host="localhost")
        self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))
        status, body = self.https(proxy.port, "POST", "/v1/messages",
                                  json.dumps({"model": "claude-sonnet-4-5"}).encode())
        self.assertEqual((status, json.loads(body)["id"]), (200, "msg_fake"))
        self.assertEqual(len(self.upstream.messages()), 1)
        code, out, err = run_cli("--config", proxy.config_path, "--db", proxy.db_path, "health",
                                 "--url", f"https://127.0.0.1:{proxy.port}")
        self.assertEqual((code, out.split(":")[0]), (0, "ok"), err)

    def test_plain_http_and_silent_clients_hold_up_nobody(self):
        proxy = Proxy(self.upstream.url, tls_cert=self.cert, tls_key=self.key)
        self.addCleanup(proxy.close)
        silent = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE_S)
        self.addCleanup(silent.close)
        self.assertEqual(raw_http(proxy.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"),
                         b"")
        self.assertEqual(self.https(proxy.port, "GET", "/health")[0], 200)
        wait_for(lambda: "spoke plain HTTP: give it an https:// URL" in CAPTURED_LOG.text(),
                 what="the failed handshake to be logged")

    def test_served_with_tls_the_server_says_https_and_doctor_reaches_it(self):
        server = self.serve("--tls-cert", self.cert, "--tls-key", self.key)
        self.assertEqual(self.https(server.port, "GET", "/health")[0], 200)
        with open(server.db_path + ".lock") as lock:
            self.assertIn(f"https://127.0.0.1:{server.port}", lock.read())
        env = {"CLAUDEFLARE_TLS_CERT": self.cert, "CLAUDEFLARE_TLS_KEY": self.key,
               "PORT": str(server.port), "CLAUDEFLARE_UPSTREAM_URL": self.upstream.url}
        with unittest.mock.patch.dict(os.environ, env):
            code, out, _ = run_cli("--config", os.path.join(self.folder, "config.json"),
                                   "--db", server.db_path, "doctor")
        self.assertIn(f"ok    server: pid {server.process.pid} answers at "
                      f"https://127.0.0.1:{server.port}/health: ok", out)
        self.assertIn(f"ok    tls: serves HTTPS with {self.cert}", out)

    def test_a_server_started_with_tls_flags_is_found_and_trusted(self):
        server = self.serve("--tls-cert", self.cert, "--tls-key", self.key)
        url = f"https://127.0.0.1:{server.port}"
        paths = ("--config", os.path.join(self.folder, "config.json"), "--db", server.db_path)
        for args in ((), ("--url", url), ("--url", f"https://localhost:{server.port}")):
            code, out, err = run_cli(*paths, "health", *args)
            self.assertEqual((code, out.split(":")[0], err), (0, "ok", ""))
        code, out, err = run_cli(*paths, "health", "--url", f"http://127.0.0.1:{server.port}")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"claudeflare: error: No answer from http://127.0.0.1:"
                              f"{server.port}: ECONNRESET: http://127.0.0.1:{server.port} closed "
                              f"the connection. An HTTPS server closes plain-HTTP connections "
                              f"like this: if it serves HTTPS, ask {url}\n")
        with unittest.mock.patch.dict(os.environ, {"CLAUDEFLARE_UPSTREAM_URL": self.upstream.url}):
            code, out, _ = run_cli(*paths, "doctor")
        self.assertIn(f"\nok    server: pid {server.process.pid} answers at {url}/health: ok",
                      out)
        self.assertEqual(os.stat(server.db_path + ".lock").st_mode & 0o777, 0o600)

    def test_a_wrong_or_missing_key_is_refused_at_start(self):
        env = dict(os.environ, CLAUDEFLARE_CONFIG_PATH=os.path.join(self.folder, "config.json"),
                   CLAUDEFLARE_DB_PATH=os.path.join(self.folder, "claudeflare.db"))
        for args, expected in (
                (("--tls-key", self.other_key),
                 f"claudeflare: error: The TLS key {self.other_key} does not belong to the "
                 f"certificate {self.cert}"),
                ((), "claudeflare: error: tls_cert and tls_key go together")):
            with self.subTest(args=args):
                done = subprocess.run(
                    [sys.executable, os.path.join(HERE, "claudeflare.py"), "serve", "--port", "0",
                     "--tls-cert", self.cert, *args],
                    env=env, capture_output=True, text=True, timeout=DEADLINE_S * 3)
                self.assertEqual(done.returncode, 1)
                self.assertTrue(done.stderr.startswith(expected), done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
                self.assertEqual(done.stdout, "")


class TestDoctor(ServeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config_path = os.path.join(self.folder, "config.json")
        self.db_path = os.path.join(self.folder, "claudeflare.db")
        self.env = {"CLAUDEFLARE_UPSTREAM_URL": self.upstream.url,
                    "CLAUDEFLARE_TOKEN_URL": self.upstream.url + "/v1/oauth/token",
                    "CLAUDEFLARE_LOG_DIR": os.path.join(self.folder, "logs"), "PORT": "0"}

    def doctor(self, *args: str, **env: str) -> tuple[int, str]:
        """Run doctor in this process; return its exit status and output (stderr must be empty)."""
        with unittest.mock.patch.dict(os.environ, {**self.env, **env}):
            code, out, err = run_cli("--config", self.config_path, "--db", self.db_path,
                                     "doctor", *args)
        self.assertEqual(err, "")
        return code, out

    def store(self) -> claudeflare.Store:
        store = claudeflare.Store(self.db_path)
        self.addCleanup(store.close)
        return store

    def answer_with_date(self, offset_s: float = 0) -> None:
        """Have the upstream's next answer (the doctor's probe) carry a Date header."""
        date = email.utils.formatdate(time.time() + offset_s, usegmt=True)
        self.upstream.push(reply_json(200, {"data": []}, [("Date", date)]))

    def test_healthy_setup_passes_every_check(self):
        self.cli("add", "work", "--api-key", stdin="sk-ant-api03-doctorsecret\n")
        access, refresh = self.upstream.oauth.issue()
        self.store().add_account("max", "oauth", 5, access_token=access, refresh_token=refresh,
                                 expires_at=claudeflare.now_ms() + 3_600_000)
        server = self.serve()
        self.answer_with_date()
        code, out = self.doctor(PORT=str(server.port))
        self.assertEqual(code, 0, out)
        lines = out.splitlines()
        for line in lines[:-1]:
            self.assertTrue(line.startswith("ok    "), line)
        self.assertRegex(lines[-1], r"^\d+ ok, 0 warn, 0 FAIL$")
        for expected in (
                f"ok    server: pid {server.process.pid} answers at "
                f"http://127.0.0.1:{server.port}/health: ok (2 of 2 accounts active",
                f"ok    port: 127.0.0.1:{server.port} is this database's server",
                f"ok    database: {self.db_path}: schema {claudeflare.SCHEMA_VERSION}, "
                f"integrity ok, mode 0600; accounts: 2, client keys: 0",
                "ok    account work: active (api_key, tier 1)",
                "ok    account max: active (oauth, tier 5), token valid for 59m",
                "ok    accounts: 2 of 2 can serve",
                f"ok    upstream: {self.upstream.url}/v1/models: resolved in ",
                "ok    clock: within ",
                f"ok    token endpoint: {self.upstream.url}/v1/oauth/token: resolved in ",
                f"ok    config: {self.config_path} is valid"):
            self.assertIn("\n" + expected, "\n" + out)
        for secret in ("doctorsecret", access, refresh):
            self.assertNotIn(secret, out)
        self.answer_with_date()
        code, out = self.doctor("--json", PORT=str(server.port))
        report = json.loads(out)
        self.assertEqual((code, report["ok"]), (0, True))
        self.assertEqual({check["status"] for check in report["checks"]}, {"ok"})

    def test_upstream_down_fails_and_names_the_proxy_when_it_is_the_cause(self):
        dead = f"http://127.0.0.1:{free_port()}"
        code, out = self.doctor(CLAUDEFLARE_UPSTREAM_URL=dead)
        self.assertEqual(code, 1)
        self.assertIn(f"\nFAIL  upstream: ECONNREFUSED: {dead} refused the connection; fix: "
                      f"check the network and upstream_url\n", out)
        self.assertIn("\nok    token endpoint: ", out)
        code, out = self.doctor(HTTP_PROXY=dead)
        self.assertEqual(code, 1)
        self.assertIn(f"\nFAIL  upstream: Proxy ECONNREFUSED: {dead} refused the connection; "
                      f"fix: check HTTPS_PROXY (HTTP_PROXY for http:// URLs), its credentials "
                      f"and NO_PROXY\n", out)
        tunnel = ConnectProxy()
        self.addCleanup(tunnel.close)
        self.answer_with_date()
        code, out = self.doctor(HTTP_PROXY=tunnel.url)
        self.assertIn(f"\nok    upstream: {self.upstream.url}/v1/models via proxy {tunnel.url}: "
                      f"resolved in ", out)
        self.assertEqual(len(tunnel.tunnels), 2)

    def test_every_account_state_gets_its_line(self):
        now = claudeflare.now_ms()
        store = self.store()
        store.add_account("lost", "oauth", 1, access_token="sk-ant-oat01-lostsecret",
                          refresh_token="sk-ant-ort01-lostrefresh", expires_at=now + 3_600_000,
                          needs_reauth=1, reauth_reason="refresh refused: Bad Request: Refresh "
                          "token not found or invalid (invalid_grant)")
        store.add_account("old", "oauth", 1, access_token="sk-ant-oat01-oldsecret",
                          expires_at=now - 1000)
        store.add_account("busy", "api_key", 1, api_key="sk-ant-api03-busysecret",
                          rate_limited_until=now + 7_200_000, rate_limit_status="rejected")
        store.add_account("off", "api_key", 1, api_key="sk-ant-api03-offsecret", paused=1)
        code, out = self.doctor()
        self.assertEqual(code, 1)
        for expected in (
                "FAIL  account lost: needs_reauth (refresh refused: Bad Request: Refresh token "
                "not found or invalid (invalid_grant)); fix: log it in again: python3 "
                "claudeflare.py reauth lost",
                "FAIL  account old: Token expired or missing for account: old (and no refresh "
                "token); fix: log it in again: python3 claudeflare.py reauth old",
                f"warn  account busy: rate_limited until "
                f"{claudeflare.iso_time(now + 7_200_000)} (in 1h 59m, rejected); fix: nothing: "
                f"other accounts serve; it comes back then (python3 claudeflare.py resume busy "
                f"to try now)",
                "warn  account off: paused: no request goes to it; fix: python3 claudeflare.py "
                "resume off",
                "FAIL  accounts: No active accounts available: every account is paused, "
                "rate-limited or needs a login; fix: python3 claudeflare.py list; resume NAME; "
                "or add an account"):
            self.assertIn("\n" + expected + "\n", out)
        self.assertNotIn("secret", out)
        self.assertNotIn("lostrefresh", out)

    def test_corrupt_config_fails_and_stays_as_it_was(self):
        with open(self.config_path, "w") as out:
            out.write('{"port": 7001,')
        code, out = self.doctor()
        self.assertEqual(code, 1)
        self.assertRegex(out, rf"\nFAIL  config: Failed to parse config file "
                              rf"{re.escape(self.config_path)}: .+; fix: fix the JSON \(jq \. ")
        self.assertEqual(sorted(os.listdir(self.folder)), ["config.json"])
        with open(self.config_path) as kept:
            self.assertEqual(kept.read(), '{"port": 7001,')
        with open(self.config_path, "w") as out:
            json.dump({"lb_strategy": "fastest", "retry_attempts": -1}, out)
        code, out = self.doctor(LB_STRATEGY="")
        self.assertEqual(code, 1)
        self.assertIn("\nFAIL  config: Invalid strategy: fastest; valid: session, round-robin, "
                      "weighted, least-requests, headroom, reset-first (for lb_strategy, from "
                      f"{self.config_path}); fix: python3 claudeflare.py config set lb_strategy "
                      f"VALUE\n", out)
        self.assertIn("\nFAIL  config: must not be negative, not -1 (for retry_attempts", out)
        self.assertIn("\nok    upstream: ", out)

    def test_port_taken_by_another_program_fails(self):
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            code, out = self.doctor(PORT=str(port))
        self.assertEqual(code, 1)
        self.assertIn(f"\nFAIL  port: 127.0.0.1:{port} is taken by another program; fix: serve "
                      f"--port {port + 1} (or PORT), or stop the program that uses it (lsof -i "
                      f":{port})\n", out)

    def test_clock_skew_fails_past_five_minutes(self):
        self.answer_with_date(offset_s=-600)
        code, out = self.doctor()
        self.assertEqual(code, 1)
        self.assertRegex(out, r"\nFAIL  clock: this machine's clock is 10m ahead of the "
                              r"upstream's: .+; fix: turn on network time \(NTP\)")

    def test_last_log_errors_are_shown_redacted(self):
        os.makedirs(os.path.join(self.folder, "logs"))
        now = claudeflare.now_ms()
        with open(os.path.join(self.folder, "logs", "app.log"), "w") as log:
            for number, minutes in enumerate((121, 50, 40, 30, 20)):
                log.write(f"[{claudeflare.iso_time(now - minutes * 60_000)}] ERROR: [Proxy] "
                          f"failure {number} x-api-key: sk-ant-api03-leaked{number}\n")
                log.write(f"[{claudeflare.iso_time(now)}] INFO: [Proxy] Request completed\n")
            log.write(json.dumps({"ts": claudeflare.iso_time(now - 10 * 60_000),
                                  "level": "ERROR", "msg": "failure 5"}) + "\n")
        code, out = self.doctor()
        shown = [line for line in out.splitlines() if line.startswith("warn  log: ")]
        self.assertEqual([line.split("failure ")[1][0] for line in shown], ["3", "4", "5"])
        self.assertEqual([line.split(": ")[1] for line in shown], ["30m ago", "20m ago",
                                                                    "10m ago"])
        self.assertNotIn("leaked", out)
        self.assertIn("[REDACTED]", shown[0])
        server = self.serve()  # from now on, only what this server logged counts
        code, out = self.doctor(PORT=str(server.port))
        self.assertNotIn("\nwarn  log: ", out)
        with open(self.config_path, "w") as config:
            json.dump({"overage": "never"}, config)
        code, out = self.doctor()
        self.assertIn(f"\nok    config: {self.config_path} is valid (1 key)\n", out)

    def test_a_database_serve_cannot_reach_is_named_by_doctor_and_serve(self):
        blocker = os.path.join(self.folder, "a-file")
        open(blocker, "w").close()
        cases = [(os.path.join(blocker, "claudeflare.db"), "Not a directory")]
        if os.geteuid() != 0:  # root enters every folder
            locked = os.path.join(self.folder, "locked")
            os.mkdir(locked, 0)
            self.addCleanup(os.chmod, locked, 0o700)
            cases.append((os.path.join(locked, "claudeflare.db"), "Permission denied"))
        for self.db_path, reason in cases:
            problem = f"Cannot reach database {self.db_path}: {reason} (a folder on its path"
            code, out = self.doctor()
            self.assertEqual(code, 1)
            self.assertIn(f"\nFAIL  database: {problem}", out)
            self.assertIn(problem, self.serve_fails(CLAUDEFLARE_DB_PATH=self.db_path,
                                                    **self.env))

    def test_a_wal_left_without_its_shm_is_read_and_nothing_is_created(self):
        self.cli("add", "first", "--api-key", stdin="sk-ant-api03-first\n")
        crash = os.path.join(self.folder, "crash")
        os.mkdir(crash)
        db = sqlite3.connect(self.db_path)
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute("UPDATE accounts SET name = 'renamed'")
        db.commit()
        for suffix in ("", "-wal"):  # what a crash leaves: the change only in the -wal
            shutil.copyfile(self.db_path + suffix, os.path.join(crash, "claudeflare.db" + suffix))
        db.close()
        self.db_path = os.path.join(crash, "claudeflare.db")
        code, out = self.doctor()
        self.assertIn("account renamed: active", out)
        self.assertEqual(sorted(os.listdir(crash)), ["claudeflare.db", "claudeflare.db-wal"])

    def test_text_in_a_number_column_crashes_neither_doctor_nor_list(self):
        self.cli("add", "work", "--api-key", stdin="sk-ant-api03-work\n")
        db = sqlite3.connect(self.db_path)
        db.execute("UPDATE accounts SET rate_limited_until = 'soon', account_tier = 'x'")
        db.commit()
        db.close()
        code, out = self.doctor()
        self.assertIn("\nwarn  database: ", out)
        self.assertIn("work.account_tier = 'x', work.rate_limited_until = 'soon'", out)
        self.assertIn("\nok    account work: active (api_key, tier 0)", out)
        listed = self.cli("list")
        self.assertRegex(listed, r"\nwork +api_key +0 +0 +active ")

    def test_doctor_creates_and_changes_nothing(self):
        def snapshot() -> dict:
            return {name: os.stat(os.path.join(self.folder, name)).st_mtime_ns
                    for name in os.listdir(self.folder)}

        self.doctor()
        self.assertEqual(snapshot(), {})
        self.cli("add", "work", "--api-key", stdin="sk-ant-api03-doctor\n")
        before = snapshot()
        self.assertEqual(sorted(before), ["claudeflare.db", "config.json"])
        self.doctor()
        self.assertEqual(snapshot(), before)


class TestService(CliTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config_path = os.path.join(self.folder, "my %data", "config.json")
        self.command = [sys.executable, os.path.join(HERE, "claudeflare.py"), "serve",
                        "--config", self.config_path, "--db", self.db_path]

    def test_systemd_unit_runs_serve_with_the_settings_of_this_command_line(self):
        self.ok("config", "set", "retry_attempts", "5")
        with unittest.mock.patch.dict(os.environ, {"LB_STRATEGY": "weighted"}):
            unit = self.ok("service", "install", "--print", "--system", "systemd", "--port",
                           "8123")
        lines = unit.splitlines()
        self.assertIn(f'ExecStart={self.command[0]} {self.command[1]} serve --config '
                      f'"{self.folder}/my %%data/config.json" --db {self.db_path}', lines)
        for expected in ('Environment=PORT=8123', 'Environment=LB_STRATEGY=weighted',
                         'Environment=CLAUDEFLARE_UPSTREAM_URL=http://127.0.0.1:9',
                         f'Environment=CLAUDEFLARE_LOG_DIR={os.environ["CLAUDEFLARE_LOG_DIR"]}',
                         "Restart=on-failure", "TimeoutStopSec=45", "[Install]",
                         "WantedBy=default.target"):
            self.assertIn(expected, lines)
        self.assertNotIn("RETRY_ATTEMPTS", unit)  # the service reads the config file itself
        self.assertFalse(os.path.exists(claudeflare.service_path("systemd")))

    def test_launchd_plist_runs_serve_and_restarts_it_after_a_failure(self):
        plist = plistlib.loads(self.ok("service", "install", "--print", "--system", "launchd",
                                       "--host", "0.0.0.0").encode())
        self.assertEqual(plist["Label"], "local.claudeflare")
        self.assertEqual(plist["ProgramArguments"], self.command)
        self.assertEqual(plist["EnvironmentVariables"]["CLAUDEFLARE_HOST"], "0.0.0.0")
        self.assertNotIn("PORT", plist["EnvironmentVariables"])
        self.assertEqual((plist["RunAtLoad"], plist["KeepAlive"]),
                         (True, {"SuccessfulExit": False}))
        self.assertFalse(os.path.exists(claudeflare.service_path("launchd")))

    def test_this_systems_manager_is_the_default(self):
        if sys.platform not in ("linux", "darwin"):
            self.skipTest("no per-user service manager claudeflare knows here")
        printed = self.ok("service", "install", "--print")
        self.assertIn("[Service]" if sys.platform == "linux" else "<plist", printed)

    def test_a_value_with_a_control_character_is_refused_and_the_rest_is_quoted(self):
        injected = "/x\nExecStartPre=/bin/touch /tmp/p\n.db"
        for system in ("systemd", "launchd"):
            code, out, err = run_cli("--config", self.config_path, "--db", injected, "service",
                                     "install", "--print", "--system", system)
            self.assertEqual((code, out), (1, ""))
            self.assertEqual(err, "claudeflare: error: --db holds a control character "
                                  "(/x\\nExecStartPre=/bin/touch /tmp/p\\n.db), which a service "
                                  "file cannot carry: choose a value without\n")
            for name, value in (("CLIENT_ID", "id\nExecStartPre=/bin/true"),
                                ("HTTPS_PROXY", "http://proxy:3128\x1b")):
                with unittest.mock.patch.dict(os.environ, {name: value}):
                    self.fails(f"{name} holds a control character", "service", "install",
                               "--print", "--system", system)
        odd = os.path.join(self.folder, 'a"b\\c$d;e f.db')
        code, unit, err = run_cli("--config", self.config_path, "--db", odd, "service",
                                  "install", "--print", "--system", "systemd")
        self.assertEqual(code, 0, err)
        self.assertIn(f'--db "{self.folder}/a\\"b\\\\c$$d;e f.db"\n', unit)
        code, plist, err = run_cli("--config", self.config_path, "--db", odd, "service",
                                   "install", "--print", "--system", "launchd")
        self.assertEqual(plistlib.loads(plist.encode())["ProgramArguments"][-1], odd)

    def fake_systemctl(self) -> str:
        """Put a fake systemctl first on PATH (FAKE_SYSTEMCTL: unreachable, failing or ok) and
        the units under the test's folder; return the file where it notes its arguments."""
        if os.name != "posix":
            self.skipTest("the fake systemctl is a shell script")
        folder = os.path.join(self.folder, "bin")
        os.mkdir(folder)
        calls = os.path.join(self.folder, "systemctl-calls")
        with open(os.path.join(folder, "systemctl"), "w") as out:
            out.write(f'#!/bin/sh\necho "$*" >> "{calls}"\n'
                      f'case "$FAKE_SYSTEMCTL/$2" in\n'
                      f'  unreachable/*) echo "Failed to connect to bus: No medium found" >&2;'
                      f' exit 1;;\n'
                      f'  failing/show-environment) exit 0;;\n'
                      f'  failing/*) exit 1;;\n'
                      f'esac\n')
        os.chmod(os.path.join(folder, "systemctl"), 0o755)
        patcher = unittest.mock.patch.dict(os.environ, {
            "PATH": folder + os.pathsep + os.environ["PATH"],
            "XDG_CONFIG_HOME": os.path.join(self.folder, "xdg"), "FAKE_SYSTEMCTL": "ok"})
        patcher.start()
        self.addCleanup(patcher.stop)
        return calls

    def test_an_unreachable_user_systemd_is_named_before_anything_is_written(self):
        calls = self.fake_systemctl()
        os.environ["FAKE_SYSTEMCTL"] = "unreachable"
        unit = claudeflare.service_path("systemd")
        for action in ("install", "status"):
            err = self.fails("systemctl --user cannot reach your user's systemd (Failed to "
                             "connect to bus: No medium found)", "service", action, "--system",
                             "systemd")
            for what_to_do in ("loginctl enable-linger", "service install --print",
                               "systemctl --system"):
                self.assertIn(what_to_do, err)
            self.assertFalse(os.path.exists(unit))
        os.makedirs(os.path.dirname(unit))
        with open(unit, "w") as out:
            out.write("[Service]\n")
        out = self.ok("service", "uninstall", "--system", "systemd")
        self.assertIn(f"Removed {unit}; nothing was stopped", out)
        self.assertFalse(os.path.exists(unit))
        with open(calls) as made:
            self.assertEqual(made.read().splitlines(), ["--user show-environment"] * 3)

    def test_install_runs_systemctl_and_uninstall_removes_the_unit_whatever_it_says(self):
        calls = self.fake_systemctl()
        unit = claudeflare.service_path("systemd")
        out = self.ok("service", "install", "--system", "systemd")
        self.assertIn(f"Wrote {unit}", out)
        self.assertTrue(os.path.exists(unit))
        os.environ["FAKE_SYSTEMCTL"] = "failing"
        out = self.ok("service", "uninstall", "--system", "systemd")
        self.assertFalse(os.path.exists(unit))
        with open(calls) as made:
            self.assertEqual(made.read().splitlines(), [
                "--user show-environment", "--user daemon-reload",
                "--user enable claudeflare.service", "--user restart claudeflare.service",
                "--user show-environment", "--user disable --now claudeflare.service",
                "--user daemon-reload"])

    def test_print_goes_with_install(self):
        self.fails("--print writes what service install would install", "service", "status",
                   "--print")


###############################################################################
# Benchmark (make bench) ######################################################
###############################################################################

#: The bench's plain request: a short question.
BENCH_REQUEST = {"model": "claude-sonnet-4-5", "max_tokens": 64,
                 "messages": [{"role": "user", "content": "Hi " * 200}]}
#: A streamed answer of 5 words comes as 11 events, one upstream chunk each; 95 words make 101.
BENCH_WORDS = 5
BENCH_LONG_WORDS = 95
BENCH_SESSION_HEADER = {"X-Claude-Code-Session-Id": "0b5e7c1e-4f7a-4c2b-9a43-5d2f0e6b8c11"}
#: The access token of the bench's subscription account, which its fake upstream takes.
BENCH_OAUTH_TOKEN = "sk-ant-oat01-bench"
#: The bench's rounds: each measures every scenario direct and through the proxy, in turns.
BENCH_ROUNDS = 5


def bench_body(**fields) -> bytes:
    """The bench's request with these fields added (stream, fake_words, fake_interval)."""
    return json.dumps({**BENCH_REQUEST, **fields}).encode()


def events_of(words: int) -> int:
    """How many SSE events (upstream chunks) the fake sends for a stream of `words` words."""
    return len(message_events(words=("w",) * words))


def claude_code_body(size: int = 300 * 1024) -> bytes:
    """A request the size Claude Code sends deep into a session.

    A long system prompt, a set of tools, 100 turns of text, tool calls and tool results, and
    metadata.user_id naming the session, in the order Claude Code writes them.
    """
    sentence = "Use the tools to read, edit and test the code; say what changed and why. "
    session_id = "0b5e7c1e-4f7a-4c2b-9a43-5d2f0e6b8c11"

    def build(filler: int) -> dict:
        messages = []
        for turn in range(50):
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": f"toolu_{turn:04d}",
                 "content": "x = 1\n" * (filler // 6)} if turn else
                {"type": "text", "text": "Please fix the failing test. " * (filler // 29)}]})
            messages.append({"role": "assistant", "content": [
                {"type": "text", "text": sentence * (filler // len(sentence) // 2)},
                {"type": "tool_use", "id": f"toolu_{turn + 1:04d}", "name": "Read",
                 "input": {"file_path": f"/work/src/module{turn}.py"}}]})
        return {"model": "claude-sonnet-4-5", "messages": messages,
                "system": [{"type": "text", "text": "You are Claude Code, Anthropic's CLI."},
                           {"type": "text", "text": sentence * 400,
                            "cache_control": {"type": "ephemeral"}}],
                "tools": [{"name": f"Tool{index}", "description": sentence * 10,
                           "input_schema": {"type": "object", "required": ["path"],
                                            "properties": {"path": {"type": "string"},
                                                           "limit": {"type": "integer"}}}}
                          for index in range(15)],
                "metadata": {"user_id": f"user_{'ab' * 32}_account_"
                                        f"6e1a9c1f-0000-4000-8000-000000000000_session_"
                                        f"{session_id}"},
                "max_tokens": 32000, "stream": False}

    base, more = len(json.dumps(build(0))), len(json.dumps(build(1000)))
    return json.dumps(build(max(0, (size - base) * 1000 // (more - base)))).encode()


def run_fake_upstream() -> int:
    """Serve the fake upstream until standard input closes; print its URL first.

    It answers with the real API's header set, and takes the bench's subscription token.
    """
    fake = FakeUpstream()
    fake.real_headers = True
    fake.oauth.access_tokens.add(BENCH_OAUTH_TOKEN)
    print(fake.url, flush=True)
    try:
        sys.stdin.read()
    finally:
        fake.close()
    return 0


def run_bare_relay(upstream_url: str) -> int:
    """Serve the thinnest relay the standard library makes, until standard input closes.

    ThreadingHTTPServer and one kept-alive http.client connection per thread, one API key, no
    checks, no routing, no records: `make bench` measures its CPU beside the proxy's, as the
    floor a relay in this Python pays on this machine. Print its URL first.
    """
    upstream = urllib.parse.urlsplit(upstream_url)
    connections = threading.local()

    class Relay(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            connection = getattr(connections, "upstream", None)
            if connection is None:
                connection = connections.upstream = http.client.HTTPConnection(
                    upstream.hostname, upstream.port)
            connection.request("POST", self.path, body, {
                "Content-Type": "application/json", "x-api-key": "sk-ant-api03-bench",
                "anthropic-version": "2023-06-01"})
            response = connection.getresponse()
            answer = response.read()
            head = [b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason.encode())]
            head += [b"%s: %s\r\n" % (name.encode(), value.encode())
                     for name, value in response.getheaders()
                     if name.lower() not in ("connection", "content-length", "transfer-encoding")]
            self.wfile.write(b"".join(head) + b"Content-Length: %d\r\n\r\n" % len(answer)
                             + answer)

        def log_message(self, *args: object) -> None:
            pass

    relay = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    relay.daemon_threads = True
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{relay.server_address[1]}", flush=True)
    sys.stdin.read()
    relay.shutdown()
    relay.server_close()
    return 0


def bench_load(port: int, bodies: list[bytes], concurrency: int, total: int,
               headers: dict | None = None) -> tuple[float, list[float], list[float]]:
    """Send `total` requests over `concurrency` keep-alive connections, cycling the bodies.

    Return requests per second, each request's latency and each one's time to the first byte
    of its body (the first SSE event of a stream), in seconds.
    """
    headers = {"content-type": "application/json", **(headers or {})}
    latencies: list[float] = []
    first_bytes: list[float] = []
    lock = threading.Lock()
    remaining = [total]

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, firsts = [], []
        try:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        break
                    remaining[0] -= 1
                    number = remaining[0]
                started = time.perf_counter()
                connection.request("POST", "/v1/messages", bodies[number % len(bodies)],
                                   headers)
                response = connection.getresponse()
                first = response.read1(65536)
                firsts.append(time.perf_counter() - started)
                rest = response.read()
                mine.append(time.perf_counter() - started)
                if response.status != 200 or not first + rest:
                    raise RuntimeError(f"bench request failed: {response.status}")
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)
                first_bytes.extend(firsts)

    started = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if len(latencies) < total:
        raise RuntimeError(f"bench: only {len(latencies)} of {total} requests were answered")
    return len(latencies) / (time.perf_counter() - started), latencies, first_bytes


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads), 0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pid: int) -> int:
    """Resident memory of a process in KiB (Linux), 0 where /proc is missing."""
    return proc_status(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (Linux), 0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def start_bench_proxy(folder: str, upstream_url: str, kind: str) -> tuple[subprocess.Popen, int]:
    """Start a claudeflare server with one account of this kind (api_key or oauth) in a folder.

    The server runs with its default settings (INFO logging), unless BENCH_LOG_LEVEL says.
    """
    os.makedirs(folder)
    env = dict(os.environ, CLAUDEFLARE_UPSTREAM_URL=upstream_url,
               CLAUDEFLARE_TOKEN_URL=upstream_url + "/v1/oauth/token",
               CLAUDEFLARE_CONFIG_PATH=os.path.join(folder, "config.json"),
               CLAUDEFLARE_DB_PATH=os.path.join(folder, "claudeflare.db"),
               CLAUDEFLARE_LOG_DIR=os.path.join(folder, "logs"),
               LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "INFO"),
               # Room for the 1,000 slow streams and the probes beside them (default 1,000).
               CLAUDEFLARE_MAX_CONNECTIONS="2000")
    store = claudeflare.Store(env["CLAUDEFLARE_DB_PATH"])
    if kind == "oauth":
        store.add_account("bench", "oauth", 1, access_token=BENCH_OAUTH_TOKEN,
                          refresh_token="sk-ant-ort01-bench",
                          expires_at=claudeflare.now_ms() + 24 * 3_600_000)
    else:
        store.add_account("bench", "api_key", 1, api_key="sk-ant-api03-bench")
    store.close()
    proxy = subprocess.Popen([sys.executable, os.path.join(HERE, "claudeflare.py"), "serve",
                              "--port", "0"], env=env, stdout=subprocess.PIPE, text=True)
    return proxy, int(proxy.stdout.readline().rsplit(":", 1)[1])


def bench_scenarios(scale: float) -> list[tuple[str, list[bytes], dict, int, int, str]]:
    """Return the measured workloads: name, bodies, headers, concurrency, requests, and the
    kind of account that serves them."""
    plain = [bench_body(stream=False)]
    stream = [bench_body(stream=True, fake_words=BENCH_WORDS)]
    long_stream = [bench_body(stream=True, fake_words=BENCH_LONG_WORDS)]
    big = [claude_code_body()]
    count = lambda base: max(20, int(base * scale))  # noqa: E731
    return [("plain c=1", plain, {}, 1, count(1000), "api_key"),
            (f"stream{events_of(BENCH_WORDS)} c=1", stream, {}, 1, count(1000), "api_key"),
            (f"stream{events_of(BENCH_LONG_WORDS)} c=1", long_stream, {}, 1, count(300),
             "api_key"),
            ("plain c=8", plain, {}, 8, count(3000), "api_key"),
            (f"stream{events_of(BENCH_WORDS)} c=8", stream, {}, 8, count(3000), "api_key"),
            ("sub plain c=1", plain, {}, 1, count(1000), "oauth"),
            ("sub plain c=8", plain, {}, 8, count(3000), "oauth"),
            ("300KB+sid c=1", big, BENCH_SESSION_HEADER, 1, count(300), "api_key"),
            ("300KB c=1", big, {}, 1, count(300), "api_key")]


def measure(port: int, proxy_pid: int, bodies: list[bytes], headers: dict, concurrency: int,
            total: int) -> dict:
    """Warm up, then run one load: rate, latency and first-byte percentiles (ms), proxy CPU."""
    bench_load(port, bodies, concurrency, 5 * concurrency, headers)
    cpu_before = cpu_seconds(proxy_pid)
    rate, latencies, first_bytes = bench_load(port, bodies, concurrency, total, headers)
    return {"rate": rate, "p50": percentile(latencies, 0.5) * 1000,
            "p99": percentile(latencies, 0.99) * 1000,
            "first50": percentile(first_bytes, 0.5) * 1000,
            "first99": percentile(first_bytes, 0.99) * 1000,
            "cpu": (cpu_seconds(proxy_pid) - cpu_before) / total * 1e6}


def spread(values: list[float], digits: int = 2) -> str:
    """Median and range of repeated measurements: `1.23 [1.10-1.40]`."""
    return (f"{statistics.median(values):.{digits}f} "
            f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")


def bench_long_stream(proxy: subprocess.Popen, port: int, size: int = 50 * 1024 * 1024) -> None:
    """Stream 50 MB through the proxy, watching its memory while it passes."""
    peak = [rss_kb(proxy.pid)]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_kb(proxy.pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    try:
        connection.request("POST", "/v1/messages", json.dumps(
            {"model": "claude-sonnet-4-5", "stream": True, "fake_stream_bytes": size}))
        response = connection.getresponse()
        received = 0
        while True:
            chunk = response.read1(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    finally:
        connection.close()
        done.set()
        watcher.join()
    seconds = time.perf_counter() - started
    print(f"50 MB stream: {received / 1e6:.0f} MB in {seconds:.2f}s "
          f"({received / 1e6 / seconds:.0f} MB/s), proxy RSS peak {peak[0] / 1024:.1f} MB")


def fill_request_log(path: str, rows: int) -> None:
    """Write a database of the previous schema (2) holding `rows` requests over 30 days."""
    connection = sqlite3.connect(path)
    for statements in claudeflare.MIGRATIONS[:2]:
        for statement in statements:
            connection.execute(statement)
    now = claudeflare.now_ms()
    for index in range(4):
        connection.execute("INSERT INTO accounts (name, type, account_tier, api_key, created_at)"
                           " VALUES (?, 'api_key', 1, 'sk-ant-api03-bench', ?)",
                           (f"account{index}", now))
    connection.execute(f"""
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
        INSERT INTO requests (id, timestamp, method, path, account_name, status, success,
            error, response_time_ms, failover_attempts, model, ttfb_ms, streaming,
            input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens, cost_usd,
            tokens_per_second, user_agent, conversation)
        SELECT printf('%032x', i), {now} - (i * 2591) % 2592000000, 'POST', '/v1/messages',
            'account' || (i % 4), CASE WHEN i % 50 = 0 THEN 529 ELSE 200 END, i % 50 != 0,
            CASE WHEN i % 50 = 0 THEN 'Overloaded' END, (i * 7919) % 9000 + 40, 0,
            CASE i % 3 WHEN 0 THEN 'claude-sonnet-4-5' WHEN 1 THEN 'claude-opus-4-5'
                ELSE 'claude-haiku-4-5' END, 30, 1, 2000, 300, 0, 1500, 0.0117, 55.0,
            'claude-cli/2.1.0', 'session:' || (i % 997)
        FROM n""")
    connection.execute("PRAGMA user_version = 2")
    connection.commit()
    connection.close()


def bench_request_log(folder: str, rows: int) -> None:
    """Time the API on a request log of `rows` records (1,000,000 by default)."""
    path = os.path.join(folder, "big.db")
    started = time.perf_counter()
    fill_request_log(path, rows)
    print(f"\n{rows:,} request records written in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    claudeflare.Store(path).close()
    print(f"upgrade to schema {claudeflare.SCHEMA_VERSION} (hourly totals built) in "
          f"{time.perf_counter() - started:.1f}s")
    env = dict(os.environ, CLAUDEFLARE_DB_PATH=path, LOG_LEVEL="WARN",
               CLAUDEFLARE_CONFIG_PATH=os.path.join(folder, "big.json"),
               CLAUDEFLARE_LOG_DIR=os.path.join(folder, "logs"))
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "claudeflare.py"), "serve",
                               "--port", "0"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        print(f"{'endpoint':<28}{'p50 ms':>9}{'max ms':>9}")
        for path in ("/api/stats", "/api/analytics?range=30d", "/api/analytics?range=7d",
                     "/api/analytics?range=24h", "/api/analytics?range=1h",
                     "/api/requests?limit=1000", "/metrics", "/"):
            times = []
            for _ in range(5):
                began = time.perf_counter()
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                times.append((time.perf_counter() - began) * 1000)
                if response.status != 200:
                    raise RuntimeError(f"{path} answered {response.status}")
            print(f"{path:<28}{statistics.median(times):>9.1f}{max(times):>9.1f}", flush=True)
        connection.close()
    finally:
        server.terminate()
        server.wait(30)
        server.stdout.close()


def bench_slow_streams(port: int, pid: int, count: int, interval: float) -> dict:
    """Hold `count` slow streams open at once (11 events, `interval` s apart); watch memory.

    One selector drives every client socket, so the bench itself needs no thread per stream.
    Return how many completed, the first-event times (ms), and the process's peak RSS (KiB)
    and threads.
    """
    body = bench_body(stream=True, fake_words=BENCH_WORDS, fake_interval=interval)
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (port, len(body), body))
    peak = {"rss": rss_kb(pid), "threads": proc_status(pid, "Threads")}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            peak["rss"] = max(peak["rss"], rss_kb(pid))
            peak["threads"] = max(peak["threads"], proc_status(pid, "Threads"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    selector = selectors.DefaultSelector()
    first_events: list[float] = []
    completed = 0
    probe: dict = {}

    def run_probe() -> None:
        """Once every stream is open, time the first event of ordinary streams meanwhile."""
        while len(first_events) < count and not done.wait(0.05):
            pass
        _, _, first_bytes = bench_load(port, [bench_body(stream=True, fake_words=BENCH_WORDS)],
                                       1, 200)
        probe["first50"] = percentile(first_bytes, 0.5) * 1000
        probe["first99"] = percentile(first_bytes, 0.99) * 1000

    prober = threading.Thread(target=run_probe)
    prober.start()
    try:
        for _ in range(count):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            selector.register(client, selectors.EVENT_WRITE,
                              {"started": time.perf_counter(), "data": bytearray()})
        deadline = time.monotonic() + interval * 10 + 60
        while selector.get_map() and time.monotonic() < deadline:
            for key, mask in selector.select(1):
                client, state = key.fileobj, key.data
                if mask & selectors.EVENT_WRITE:
                    client.sendall(request)
                    selector.modify(client, selectors.EVENT_READ, state)
                    continue
                try:
                    data = client.recv(65536)
                except ConnectionError:
                    data = b""
                state["data"] += data
                if "first" not in state and b"event:" in state["data"]:
                    state["first"] = time.perf_counter() - state["started"]
                    first_events.append(state["first"])
                if not data or state["data"].endswith(b"\r\n0\r\n\r\n"):
                    completed += b"message_stop" in state["data"] and bool(data)
                    selector.unregister(client)
                    client.close()
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
        done.set()
        watcher.join()
        prober.join()
    return {"completed": completed, "first50": percentile(first_events or [0], 0.5) * 1000,
            "first99": percentile(first_events or [0], 0.99) * 1000,
            "probe50": probe.get("first50", math.inf), "probe99": probe.get("first99", math.inf),
            "peak_rss": peak["rss"], "peak_threads": peak["threads"]}


def run_bench(argv: list[str]) -> int:
    """Measure direct-to-upstream against through-the-proxy in one run; print the targets.

    BENCH_ROUNDS rounds measure each workload direct and proxied in turns (medians and ranges
    over the rounds); then 1,000 slow streams at once, a 100,000-request soak, a 50 MB stream,
    and the API on a request log of a million records. `bench 0.2` runs a fifth of each.
    """
    import resource  # Unix only, as the bench is
    scale = float(argv[0]) if argv else 1.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    streams = max(100, int(1000 * min(scale, 1.0)))
    wanted = 4 * streams + 256  # the bench's, the proxy's (two each) and the upstream's sockets
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    folder = tempfile.mkdtemp(prefix="claudeflare-bench-")
    upstream = subprocess.Popen([sys.executable, __file__, "upstream"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    upstream_url = upstream.stdout.readline().strip()
    upstream_port = int(upstream_url.rsplit(":", 1)[1])
    proxies = {kind: start_bench_proxy(os.path.join(folder, kind), upstream_url, kind)
               for kind in ("api_key", "oauth")}
    proxy, proxy_port = proxies["api_key"]
    targets = (("direct", upstream_port), ("proxy", proxy_port))
    bare = subprocess.Popen([sys.executable, __file__, "bare", upstream_url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    bare_port = int(bare.stdout.readline().rsplit(":", 1)[1])
    try:
        time.sleep(1.0)
        idle_rss = rss_kb(proxy.pid)
        scenarios = bench_scenarios(scale)
        runs: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
        print(f"{BENCH_ROUNDS} rounds; each measures every workload direct and through the "
              f"proxy (one account, default settings), the order alternating by round; the "
              f"upstream answers with the real API's 20 headers; `sub`: a subscription account")
        print(f"{'round':<7}{'scenario':<16}{'direct r/s':>11}{'proxy r/s':>10}{'ratio':>7}"
              f"{'+p50 ms':>9}{'+p99 ms':>9}{'+1st ms':>9}{'CPU us/req':>12}")
        for round_number in range(BENCH_ROUNDS):
            for name, bodies, headers, concurrency, total, kind in scenarios:
                served = [("direct", upstream_port, proxies[kind][0].pid),
                          ("proxy", proxies[kind][1], proxies[kind][0].pid)]
                if name.startswith("plain"):
                    served.append(("bare", bare_port, bare.pid))
                for target, port, pid in (served if round_number % 2 == 0 else served[::-1]):
                    runs[name, target].append(measure(port, pid, bodies, headers, concurrency,
                                                      total))
                direct, through = runs[name, "direct"][-1], runs[name, "proxy"][-1]
                print(f"{round_number + 1:<7}{name:<16}{direct['rate']:>11.0f}"
                      f"{through['rate']:>10.0f}{through['rate'] / direct['rate']:>7.2f}"
                      f"{through['p50'] - direct['p50']:>9.3f}"
                      f"{through['p99'] - direct['p99']:>9.3f}"
                      f"{through['first50'] - direct['first50']:>9.3f}"
                      f"{through['cpu']:>12.0f}", flush=True)
        loaded_rss = rss_kb(proxy.pid)

        def per_round(name: str, value: Callable[[dict, dict], float]) -> list[float]:
            return [value(direct, through) for direct, through
                    in zip(runs[name, "direct"], runs[name, "proxy"])]

        print(f"\n{'scenario':<16}{'throughput ratio':>20}{'added p50 ms':>22}"
              f"{'added p99 ms':>22}{'proxy CPU us/req':>22}")
        for name, *_ in scenarios:
            print(f"{name:<16}"
                  f"{spread(per_round(name, lambda d, t: t['rate'] / d['rate'])):>20}"
                  f"{spread(per_round(name, lambda d, t: t['p50'] - d['p50']), 3):>22}"
                  f"{spread(per_round(name, lambda d, t: t['p99'] - d['p99']), 3):>22}"
                  f"{spread(per_round(name, lambda d, t: t['cpu']), 0):>22}")

        print(f"\n{streams} slow streams at once, each {BENCH_WORDS * 2 + 1} events 0.5 s apart:")
        slow = {}
        for target, port in targets:
            before = rss_kb(proxy.pid)
            slow[target] = bench_slow_streams(port, proxy.pid, streams, 0.5)
            time.sleep(2.0)  # the proxy's threads end with their connections
            slow[target]["before"], slow[target]["after"] = before, rss_kb(proxy.pid)
            print(f"  {target:<7} completed {slow[target]['completed']}/{streams}, first event "
                  f"p50 {slow[target]['first50']:.1f} ms, p99 {slow[target]['first99']:.1f} ms; "
                  f"meanwhile a short stream's first event p50 {slow[target]['probe50']:.2f} ms,"
                  f" p99 {slow[target]['probe99']:.2f} ms"
                  + (f"; proxy RSS {before / 1024:.1f} MB before, peak "
                     f"{slow[target]['peak_rss'] / 1024:.1f} MB "
                     f"({slow[target]['peak_threads']} threads), "
                     f"{slow[target]['after'] / 1024:.1f} MB after" if target == "proxy"
                     else ""), flush=True)

        soak = int(100_000 * scale)
        soak_bodies = [bench_body(stream=False), bench_body(stream=True, fake_words=BENCH_WORDS)]
        started = time.perf_counter()
        bench_load(proxy_port, soak_bodies, 4, soak // 10)
        soak_first = rss_kb(proxy.pid)
        bench_load(proxy_port, soak_bodies, 4, soak - soak // 10)
        soak_end = rss_kb(proxy.pid)
        print(f"\nsoak: {soak:,} requests (plain and streamed, 4 connections) in "
              f"{time.perf_counter() - started:.0f}s: proxy RSS {soak_first / 1024:.1f} MB "
              f"after {soak // 10:,}, {soak_end / 1024:.1f} MB at the end")
        print(f"proxy RSS: {idle_rss / 1024:.1f} MB idle after start, "
              f"{loaded_rss / 1024:.1f} MB after the rounds")

        def cpu(name: str) -> list[float]:
            return [run["cpu"] for run in runs[name, "proxy"]]

        short, long = (f"stream{events_of(words)} c=1" for words in (BENCH_WORDS,
                                                                     BENCH_LONG_WORDS))
        chunks = events_of(BENCH_LONG_WORDS) - events_of(BENCH_WORDS)
        per_chunk = [(b - a) / chunks for a, b in zip(cpu(short), cpu(long))]
        stream_base = [a - c * events_of(BENCH_WORDS) for a, c in zip(cpu(short), per_chunk)]
        added = {name: per_round(name, lambda d, t: t["p50"] - d["p50"])
                 for name, *_ in scenarios}
        rows = [
            ("CPU per plain request, c=1 (us)", cpu("plain c=1"), 0, "<=", 300),
            ("CPU per plain request, c=8 (us)", cpu("plain c=8"), 0, "<=", 330),
            ("CPU per plain request, sub c=1 (us)", cpu("sub plain c=1"), 0, "<=", 300),
            ("CPU per plain request, sub c=8 (us)", cpu("sub plain c=8"), 0, "<=", 330),
            ("CPU per stream, fixed part (us)", stream_base, 0, "<=", 300),
            ("CPU per stream, c=8 (us)", cpu(short.replace("c=1", "c=8")), 0, "<=",
             330 + 40 * events_of(BENCH_WORDS)),
            ("CPU per upstream chunk (us)", per_chunk, 1, "<=", 40),
            ("added p50, plain c=1 (ms)", added["plain c=1"], 3, "<=", 0.25),
            ("added p50, first SSE byte c=1 (ms)",
             per_round(short, lambda d, t: t["first50"] - d["first50"]), 3, "<=", 0.25),
            ("added p99, plain c=1 (ms)", per_round("plain c=1",
                                                    lambda d, t: t["p99"] - d["p99"]),
             3, "<=", 1.2),
            ("added p99, first SSE byte c=1 (ms)",
             per_round(short, lambda d, t: t["first99"] - d["first99"]), 3, "<=", 1.2),
            ("c=8 throughput ratio, plain", per_round(
                "plain c=8", lambda d, t: t["rate"] / d["rate"]), 2, ">=", 0.7),
            ("c=8 throughput ratio, stream", per_round(
                short.replace("c=1", "c=8"), lambda d, t: t["rate"] / d["rate"]), 2, ">=", 0.7),
            ("300 KB body added p50, session id (ms)", added["300KB+sid c=1"], 3, "<=", 0.6),
            ("300 KB body added p50, no id (ms)", added["300KB c=1"], 3, "<=", 0.6),
            (f"slow streams completed (of {streams})", [slow["proxy"]["completed"]], 0, ">=",
             streams),
            ("first event added meanwhile, p50 (ms)",
             [slow["proxy"]["probe50"] - slow["direct"]["probe50"]], 3, "<=", 0.3),
            ("first event added meanwhile, p99 (ms)",
             [slow["proxy"]["probe99"] - slow["direct"]["probe99"]], 3, "<=", 1.5),
            ("slow streams peak RSS (MB)", [slow["proxy"]["peak_rss"] / 1024], 1, "<=", 150),
            ("slow streams RSS after, above before (MB)",
             [(slow["proxy"]["after"] - slow["proxy"]["before"]) / 1024], 1, "<=", 5),
            ("soak RSS growth after the first 10% (MB)", [(soak_end - soak_first) / 1024],
             1, "<=", 5),
            ("idle RSS (MB)", [idle_rss / 1024], 1, "<=", 30),
        ]
        print("\nthe thinnest relay the standard library makes (ThreadingHTTPServer, http.client, "
              "no checks, routing or records), as a floor: CPU per plain request (us) c=1 "
              + spread([run["cpu"] for run in runs["plain c=1", "bare"]], 0) + ", c=8 "
              + spread([run["cpu"] for run in runs["plain c=8", "bare"]], 0))
        print(f"\n{'target':<42}{'measured: median [range]':>28}{'goal':>10}  met")
        for label, values, digits, sense, goal in rows:
            value = statistics.median(values)
            met = value <= goal if sense == "<=" else value >= goal
            shown = spread(values, digits) if len(values) > 1 else f"{value:.{digits}f}"
            print(f"{label:<42}{shown:>28}{sense + ' ' + str(goal):>10}  "
                  f"{'yes' if met else 'NO'}")
        print()
        bench_long_stream(proxy, proxy_port)
    finally:
        for process, _ in proxies.values():
            process.terminate()
            process.wait(30)
            process.stdout.close()
        for helper in (upstream, bare):
            helper.stdin.close()
            helper.wait(30)
            helper.stdout.close()
    try:
        bench_request_log(folder, int(1_000_000 * min(scale, 1.0)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


###############################################################################
# Runner ######################################################################
###############################################################################

#: Processes the whole suite is spread over. Its tests mostly wait (for servers, timeouts,
#: background threads' turns), so several at once finish far sooner, even on two cores.
TEST_WORKERS = 4
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$", re.M)


def run_in_parallel() -> int:
    """Run every TestCase class in TEST_WORKERS processes; print their summaries added up.

    Each process runs with the interpreter flags of this one (-X dev -W error), so each fails
    on what the whole run would fail on; what a failing one printed is shown whole.
    """
    loader = unittest.defaultTestLoader
    tests = [f"{name}.{test}" for name, value in vars(sys.modules[__name__]).items()
             if isinstance(value, type) and issubclass(value, unittest.TestCase)
             for test in loader.getTestCaseNames(value)]
    groups = [tests[start::TEST_WORKERS] for start in range(TEST_WORKERS)]  # slow ones spread
    started = time.monotonic()
    workers = [subprocess.Popen([sys.executable, *subprocess._args_from_interpreter_flags(),
                                 __file__, *group], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
               for group in groups if group]
    totals = [0, 0, 0]
    for worker in workers:
        out, _ = worker.communicate()
        summary = SUMMARY.findall(out)
        if worker.returncode or not summary:
            print(out, end="")
        else:
            print(next(line for line in out.splitlines() if line.startswith("Ran ")))
        counts = summary[-1] if summary else (0, 1, 0)  # a process that died: one failure
        totals = [total + int(count) for total, count in zip(totals, counts)]
    print(f"{sum(totals)} tests in {time.monotonic() - started:.1f}s, {len(workers)} processes")
    print(f"{totals[0]} passed, {totals[1]} failed, {totals[2]} skipped")
    return 1 if totals[1] else 0


def run_tests(argv: list[str]) -> int:
    """Run the suite; print `N passed, N failed, N skipped` last and return the exit status."""
    if not argv:
        return run_in_parallel()
    loader = unittest.defaultTestLoader
    module = sys.modules[__name__]
    suite = (loader.loadTestsFromNames(argv, module) if argv
             else loader.loadTestsFromModule(module))
    result = unittest.TextTestRunner(verbosity=1).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    if HIDDEN_ERRORS:
        print("Errors raised where no test could see them (leaked resources, thread crashes):")
        for error in HIDDEN_ERRORS:
            print("  " + error)
        failed += 1
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped - len(result.expectedFailures)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        sys.exit(run_bench(sys.argv[2:]))
    if sys.argv[1:2] == ["upstream"]:
        sys.exit(run_fake_upstream())
    if sys.argv[1:2] == ["bare"]:
        sys.exit(run_bare_relay(sys.argv[2]))
    sys.exit(run_tests(sys.argv[1:]))
