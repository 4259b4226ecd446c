#!/usr/bin/env python3
"""claudeflare: a local proxy that spreads Claude API traffic over a pool of accounts.

Point any Claude API client at it (Claude Code: ANTHROPIC_BASE_URL=http://localhost:8080) and it
relays every /v1 request to the Anthropic API, streaming answers through as they arrive.

  python3 claudeflare.py serve [--host H] [--port N]   run the proxy and its status page
  python3 claudeflare.py COMMAND --help                 what each command does, with an example
"""
from __future__ import annotations

__version__ = "0.3.0"
__all__ = [
    "Account", "Alert", "Alerts", "AnswerRelay", "App", "Check", "ChunkedFraming",
    "ClaudeflareError", "ClientKey", "HoldQueue", "KeyLedger", "LocalRequest", "LoginListener",
    "OAuthClient", "Page", "PkceLogin", "ProxyHandler", "ProxyServer", "RateLimit", "Router",
    "SETTINGS", "STRATEGIES", "ServerLife", "Settings", "Store", "StrictHTTPHandler",
    "TokenKeeper", "Upstream", "UpstreamError", "Usage", "UsagePoller", "UsageReader",
    "answer_local", "authenticate", "build_parser", "can_serve", "check_key_limits",
    "conversation_key", "cross_site", "find_endpoint", "host_allowed", "is_loopback",
    "launchd_plist", "load_settings", "main", "make_server", "order_accounts", "parse_rate_limit",
    "price_of", "redact", "render_status_page", "resolve_dot_segments", "route", "run_doctor",
    "server_tls_context", "service_plan", "systemd_unit", "usage_fields",
]

import argparse
import base64
import bisect
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import fnmatch
import functools
import getpass
import hashlib
import hmac
import html
import http.client
import http.server
import ipaddress
import itertools
import json
import logging
import math
import mmap
import operator
import os
import plistlib
import queue
import re
import secrets
import select
import shlex
import shutil
import signal
import sqlite3
import socket
import ssl
import stat
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import weakref
import zoneinfo
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows locks files with msvcrt instead
    fcntl = None
    import msvcrt

# Contents (the banners below, in order; grep for lines of `# Name` and a row of hashes):
#   Foundations   Constants & settings, Errors, Utilities, Logging, Settings
#   The database  Database schema, Records, Storage, Request log writer
#   Upstream      Upstream client, OAuth, Rate limits, Usage reads, Alerts, Usage & cost,
#                 Client key limits, Strategies, TLS, Holds
#   The request path, as a request meets it:
#                 Strict HTTP/1.1 server (knows nothing of Claude), Access control (functions of
#                 a request), The pool (App: accounts, marks, routing), Local API (the route
#                 table), Status page, The front door (Router), The relay (ProxyHandler),
#                 The server's life (in-flight requests, shutdown, the listening socket)
#   Operations    Doctor, Service, CLI, serve, Logins: add, reauth, Commands, Argument parser,
#                 main

###############################################################################
# Constants & settings ########################################################
###############################################################################

#: The largest request body accepted; the upstream refuses larger ones with 413 anyway.
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Seconds to wait for a TCP (and TLS) connection to the upstream.
CONNECT_TIMEOUT_S = 10.0
#: A pooled connection idle for less than this is taken without looking whether the upstream
#: closed it (a poll per request): one that did fails before any answer and is sent again on
#: a new connection.
TRUST_IDLE_S = 1.0
#: Stack size of the server's threads, one per client connection. Only the pages used count
#: towards memory, but every thread reserves all of it: at glibc's default of 8 MB, 1,000
#: streams reserve 9 GB, which a system that does not overcommit memory refuses. Python code
#: recursing through C (json.loads of deeply nested input) crashes below 1 MB. Python 3.13
#: lets C recurse 10,000 levels deep, sized for the default stack: there, 0 keeps the default.
THREAD_STACK_BYTES = 2 * 1024 * 1024 if sys.version_info < (3, 13) else 0
#: Seconds an idle client keep-alive connection may hold a thread before it is closed.
CLIENT_IDLE_TIMEOUT_S = 120.0
#: Seconds answers cut at shutdown get to tell their clients and be recorded.
CUT_GRACE_S = 3.0
#: Idle upstream connections kept for reuse; more concurrent requests open more, then close them.
UPSTREAM_POOL_SIZE = 32
#: Seconds to keep reading a request body the proxy refused, so the client sees the refusal.
LINGER_S = 2.0
#: Bodies up to this size are read whole and sent with the headers in one write.
SMALL_BODY_BYTES = 64 * 1024
#: Read size while relaying a large body.
RELAY_CHUNK_BYTES = 64 * 1024
#: Read size while relaying a stream: what the connection's read buffer holds.
STREAM_READ_BYTES = 8 * 1024
#: Headers that describe one connection, not the message: never forwarded in either direction.
HOP_BY_HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
PROVIDER_PATH_ERROR = "Provider cannot handle this request path"
ALL_ACCOUNTS_FAILED = "All accounts failed to proxy the request"

LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
LOG_FORMATS = ("pretty", "json")


def parse_port(text: str) -> int:
    """Read a TCP port; 0 asks the system for a free one."""
    try:
        port = int(str(text).strip())
    except ValueError:
        raise ValueError(f"port must be a number from 0 to 65535, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, not {port}")
    return port


def whole_number(minimum: int, maximum: int) -> Callable[[str], int]:
    """Return a parser of whole numbers from minimum to maximum.

    The bounds keep out values that validate but cannot work (a retention of 10**30 days
    overflows SQLite, a timeout of 1e300 s overflows every wait).
    """
    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError(f"expected a whole number, not {text!r}") from None
        if value < minimum:
            raise ValueError(f"must not be negative, not {value}" if minimum == 0
                             else f"must be {minimum} or more, not {value}")
        if value > maximum:
            raise ValueError(f"must be {maximum} or less, not {value}")
        return value
    return parse


def number(minimum: float, maximum: float, inclusive: bool = False) -> Callable[[str], float]:
    """Return a parser of finite numbers above minimum (or equal, if inclusive) to maximum."""
    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise ValueError(f"expected a number, not {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, not {text!r}")
        if value < minimum or (value == minimum and not inclusive):
            raise ValueError(f"must be {minimum:g} or more, not {value:g}" if inclusive
                             else f"must be greater than {minimum:g}, not {value:g}")
        if value > maximum:
            raise ValueError(f"must be {maximum:g} or less, not {value:g}")
        return int(value) if value.is_integer() else value
    return parse


#: A whole number greater than zero.
parse_positive_int = whole_number(1, 10 ** 9)
DAY_S = 24 * 3600
#: Seconds for a timeout: more than 0, at most a day.
parse_timeout = number(0, DAY_S)
#: A retry backoff multiplier: 1 keeps the delay fixed, 2 doubles it.
parse_backoff = number(1, 100, inclusive=True)


def parse_url(text: str) -> str:
    """Read an http(s) URL, dropping a trailing slash."""
    url = str(text).strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, not {text!r}")
    return url


def parse_text(text: str) -> str:
    """Read a non-empty string."""
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def parse_path(text: str) -> str:
    """Read a file path, made absolute so that a service started elsewhere finds it; "" is none."""
    value = str(text or "").strip()
    return os.path.abspath(os.path.expanduser(value)) if value else ""


def parse_strategy(text: str) -> str:
    """Read a load-balancing strategy name, one of STRATEGY_NAMES."""
    name = str(text).strip()
    if name not in STRATEGY_NAMES:
        raise ValueError(f"Invalid strategy: {name}; valid: {', '.join(STRATEGY_NAMES)}")
    return name


#: When an account serving on extra usage (billed) may take requests: `overage`'s values.
OVERAGE_POLICIES = ("last", "never", "allow")


def parse_overage(text: str) -> str:
    """Read the extra-usage policy, one of OVERAGE_POLICIES."""
    name = str(text).strip().lower()
    if name not in OVERAGE_POLICIES:
        raise ValueError(f"Invalid overage policy: {name}; valid: {', '.join(OVERAGE_POLICIES)}")
    return name


#: How alerts are shaped for a URL: `alert_format`'s values (auto: by the URL's host).
ALERT_FORMATS = ("auto", "json", "slack", "discord", "ntfy")


def parse_alert_urls(text: str) -> str:
    """Read comma-separated http(s) webhook URLs; "" is none."""
    urls = [url.strip() for url in str(text or "").split(",") if url.strip()]
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # The URL itself is not repeated: a webhook's path is its secret.
            raise ValueError(f"expected http:// or https:// URLs separated by commas; URL "
                             f"{urls.index(url) + 1} is not one")
    return ",".join(urls)


def parse_alert_format(text: str) -> str:
    """Read an alert format name, one of ALERT_FORMATS."""
    name = str(text).strip().lower()
    if name not in ALERT_FORMATS:
        raise ValueError(f"expected one of {', '.join(ALERT_FORMATS)}, not {text!r}")
    return name


def parse_alert_command(text: str) -> str:
    """Read a command line (split as a POSIX shell would, but run without one); "" is none."""
    value = str(text or "").strip()
    try:
        shlex.split(value)
    except ValueError as error:
        raise ValueError(f"cannot split {value!r} into a command: {error}") from None
    return value


def parse_thresholds(text: str) -> str:
    """Read comma-separated percentages of a window, above 0 up to 100; "" is none."""
    parse = number(0, 100)
    values = sorted({parse(part) for part in str(text or "").split(",") if part.strip()})
    return ",".join(f"{value:g}" for value in values)


def parse_log_level(text: str) -> str:
    """Read a log level; WARNING is accepted for WARN."""
    level = str(text).strip().upper().replace("WARNING", "WARN")
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return level


def parse_log_format(text: str) -> str:
    """Read a log format name."""
    name = str(text).strip().lower()
    if name not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, not {text!r}")
    return name


#: A fixed offset from UTC: UTC+2, UTC-05:30, +0530.
UTC_OFFSET = re.compile(r"(?:UTC)?([+-])(\d{1,2})(?::?(\d{2}))?", re.IGNORECASE)


def parse_timezone(text: str) -> str:
    """Read a time zone: "" or local (the machine's), UTC, UTC+HH:MM, or an IANA name."""
    name = str(text or "").strip()
    time_zone(name)
    return name


def time_zone(name: str) -> datetime.tzinfo | None:
    """Return the tzinfo a time-zone setting names; None is the machine's local time."""
    if name.lower() in ("", "local"):
        return None
    if name.upper() in ("UTC", "Z"):
        return datetime.timezone.utc
    offset = UTC_OFFSET.fullmatch(name)
    if offset:
        sign, hours, minutes = offset.groups()
        delta = datetime.timedelta(hours=int(hours), minutes=int(minutes or 0))
        if delta > datetime.timedelta(hours=14):
            raise ValueError(f"a UTC offset is at most 14 hours, not {name!r}")
        return datetime.timezone(-delta if sign == "-" else delta)
    try:
        return zoneinfo.ZoneInfo(name)
    except (ValueError, OSError, LookupError):  # no such zone, or no zone database
        raise ValueError(f"Unknown time zone: {name!r}; use local, UTC, UTC+HH:MM or a name "
                         f"such as Europe/Paris") from None


@dataclass(frozen=True)
class Setting:
    """One key of config.json with its environment variable, default and validator."""

    key: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    help: str


#: The strategy names the CLI and the API accept; the functions live in STRATEGIES below.
STRATEGY_NAMES = ("session", "round-robin", "weighted", "least-requests", "headroom",
                  "reset-first")

#: Every setting, in the order `config list` prints them.
SETTINGS = (
    Setting("port", "PORT", 8080, parse_port, "port the proxy listens on"),
    Setting("host", "CLAUDEFLARE_HOST", "127.0.0.1", parse_text, "address the proxy binds"),
    Setting("tls_cert", "CLAUDEFLARE_TLS_CERT", "", parse_path,
            "PEM certificate (chain) to serve HTTPS with; none: plain HTTP"),
    Setting("tls_key", "CLAUDEFLARE_TLS_KEY", "", parse_path,
            "PEM private key of tls_cert (unencrypted)"),
    Setting("lb_strategy", "LB_STRATEGY", "session", parse_strategy,
            "how requests are spread over accounts: " + ", ".join(STRATEGY_NAMES)),
    Setting("client_id", "CLIENT_ID", "9d1c250a-e61b-44d9-88ed-5944d1962f5e", parse_text,
            "OAuth client id"),
    Setting("retry_attempts", "RETRY_ATTEMPTS", 3, whole_number(0, 100),
            "extra tries on the same account after a 5xx, 529 or network error"),
    Setting("retry_delay_ms", "RETRY_DELAY_MS", 1000, whole_number(0, 600_000),
            "first retry delay (ms)"),
    Setting("retry_backoff", "RETRY_BACKOFF", 2, parse_backoff, "retry delay multiplier"),
    Setting("session_duration_ms", "SESSION_DURATION_MS", 5 * 3600 * 1000,
            whole_number(1, 30 * DAY_S * 1000),
            "how long a conversation sticks to its account (ms)"),
    Setting("upstream_url", "CLAUDEFLARE_UPSTREAM_URL", "https://api.anthropic.com", parse_url,
            "where /v1 requests are sent"),
    Setting("oauth_token_url", "CLAUDEFLARE_TOKEN_URL",
            "https://platform.claude.com/v1/oauth/token", parse_url, "OAuth token endpoint"),
    Setting("oauth_redirect_uri", "CLAUDEFLARE_REDIRECT_URI",
            "https://platform.claude.com/oauth/code/callback", parse_url, "OAuth redirect URI"),
    Setting("request_timeout_s", "CLAUDEFLARE_REQUEST_TIMEOUT_S", 600, parse_timeout,
            "seconds the upstream may stay silent before the request fails"),
    Setting("shutdown_timeout_s", "CLAUDEFLARE_SHUTDOWN_TIMEOUT_S", 30, parse_timeout,
            "seconds in-flight requests get to finish at shutdown"),
    Setting("request_retention_days", "CLAUDEFLARE_RETENTION_DAYS", 30, whole_number(1, 36500),
            "days the request log is kept"),
    Setting("max_connections", "CLAUDEFLARE_MAX_CONNECTIONS", 1000, whole_number(1, 100_000),
            "client connections served at once; more get 503"),
    Setting("overage", "CLAUDEFLARE_OVERAGE", "last", parse_overage,
            "when an account on extra usage (billed) serves: last, never or allow"),
    Setting("usage_poll_s", "CLAUDEFLARE_USAGE_POLL_S", 300, number(0, DAY_S, inclusive=True),
            "seconds between reads of each OAuth account's usage windows; 0: never"),
    Setting("budget_timezone", "CLAUDEFLARE_BUDGET_TIMEZONE", "", parse_timezone,
            "when client-key budgets' days, weeks (Monday) and months begin: local (the "
            "machine's time), UTC, UTC+HH:MM or a name such as Europe/Paris"),
    Setting("hold_s", "CLAUDEFLARE_HOLD_S", 0, number(0, DAY_S, inclusive=True),
            "seconds a request may wait for a window's reset instead of a 429; 0: never"),
    Setting("hold_max", "CLAUDEFLARE_HOLD_MAX", 100, whole_number(0, 100_000),
            "requests that may wait for a reset at once (hold_s); more get the 429"),
    Setting("login_timeout_s", "CLAUDEFLARE_LOGIN_TIMEOUT_S", 600, parse_timeout,
            "seconds `add` and `reauth` wait for the browser or a pasted code"),
    Setting("alert_url", "CLAUDEFLARE_ALERT_URL", "", parse_alert_urls,
            "comma-separated webhook URLs alerts are posted to; none: nothing is sent"),
    Setting("alert_format", "CLAUDEFLARE_ALERT_FORMAT", "auto", parse_alert_format,
            "alert body: " + ", ".join(ALERT_FORMATS) + " (auto: by the URL's host)"),
    Setting("alert_command", "CLAUDEFLARE_ALERT_COMMAND", "", parse_alert_command,
            "a command run with each alert's JSON on stdin; none: nothing is run"),
    Setting("alert_thresholds", "CLAUDEFLARE_ALERT_THRESHOLDS", "80,95", parse_thresholds,
            "% of a 5-hour or 7-day window whose crossing is alerted"),
    Setting("alert_repeat_s", "CLAUDEFLARE_ALERT_REPEAT_S", 21600, whole_number(60, 30 * DAY_S),
            "seconds after which a condition that still holds is alerted again"),
    Setting("log_level", "LOG_LEVEL", "INFO", parse_log_level, "DEBUG, INFO, WARN or ERROR"),
    Setting("log_format", "LOG_FORMAT", "pretty", parse_log_format, "pretty or json"),
)
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}
#: Keys a running server picks up from config.json without a restart.
LIVE_SETTINGS = frozenset({
    "lb_strategy", "retry_attempts", "retry_delay_ms", "retry_backoff", "session_duration_ms",
    "request_timeout_s", "overage", "usage_poll_s", "hold_s", "hold_max", "alert_url",
    "alert_format", "alert_command", "alert_thresholds", "alert_repeat_s",
})


def platform_dir(kind: str) -> str:
    """Return the per-OS folder for claudeflare's config ("config") or data ("data")."""
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        variable = "APPDATA" if kind == "config" else "LOCALAPPDATA"
        base = os.environ.get(variable) or os.path.join(home, "AppData",
                                                        "Roaming" if kind == "config" else "Local")
    elif sys.platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    elif kind == "config":
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    else:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return os.path.join(base, "claudeflare")


def default_config_path() -> str:
    """Return config.json's path: CLAUDEFLARE_CONFIG_PATH, else the per-OS default."""
    return (os.environ.get("CLAUDEFLARE_CONFIG_PATH")
            or os.path.join(platform_dir("config"), "config.json"))


def default_db_path() -> str:
    """Return the database's path: CLAUDEFLARE_DB_PATH, else the per-OS default."""
    return (os.environ.get("CLAUDEFLARE_DB_PATH")
            or os.path.join(platform_dir("data"), "claudeflare.db"))


def default_log_dir() -> str:
    """Return the log folder: CLAUDEFLARE_LOG_DIR, else claudeflare-logs in the temp folder."""
    return os.environ.get("CLAUDEFLARE_LOG_DIR") or os.path.join(tempfile.gettempdir(),
                                                                  "claudeflare-logs")


###############################################################################
# Errors ######################################################################
###############################################################################

class ClaudeflareError(Exception):
    """An expected failure whose message tells the user what went wrong and what to do."""


class NotFound(ClaudeflareError):
    """The account or client key named does not exist."""


class UpstreamError(Exception):
    """The upstream could not be reached or stopped answering; the message says how.

    `retry` is False when sending the request again could repeat work the upstream may be
    doing already (it timed out after receiving the whole request).
    """

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


def anthropic_error(error_type: str, message: str) -> dict:
    """Build an error body in the shape the Anthropic API uses, which SDKs know how to show."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


#: The error type of each status, as the Anthropic API names them.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}


###############################################################################
# Utilities ###################################################################
###############################################################################

def now_ms() -> int:
    """Return the wall-clock time in epoch milliseconds, the unit the database stores."""
    return int(time.time() * 1000)


def iso_time(ms: int | None) -> str:
    """Format epoch milliseconds as an ISO 8601 UTC time, or '-' for none."""
    if not ms:
        return "-"
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: What reading JSON from outside can raise: it is invalid, or nested deeper than Python
#: recurses (a RecursionError, which no `except ValueError` catches).
JSON_ERRORS = (ValueError, RecursionError)
#: Decodes one JSON value at a time (raw_decode), in C.
JSON_DECODER = json.JSONDecoder()


def json_bytes(value: Any) -> bytes:
    """Encode a value as compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


#: What a credential looks like wherever it might leak: Anthropic keys and tokens, Bearer values,
#: the JSON fields and headers that carry them, and query parameters named like them.
SECRET_PATTERNS = (
    re.compile(r"(?:sk-ant-[A-Za-z0-9]+-|cfk-)[A-Za-z0-9_\-]+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/\-]+=*"),
    re.compile(r'(?i)("(?:access_token|refresh_token|api_key|raw_key|code_verifier|code)"\s*:\s*")'
               r'[^"]+'),
    re.compile(r'(?i)((?:x-api-key|(?:proxy-)?authorization)"?\s*[:=]\s*"?)[^"\r\n]+'),
    re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access_token|refresh_token|secret|password)=)"
               r"(?!\[REDACTED\])[^&\s\"']+"),
)
#: Account credentials shorter than this are not masked verbatim (they would mask common words).
MIN_SECRET_LENGTH = 8


#: Matches wherever any of SECRET_PATTERNS does: most texts hold no credential, and one search
#: tells so for the price of one.
ANY_SECRET = re.compile("|".join(
    "(?i:" + pattern.pattern[4:] + ")" if pattern.pattern.startswith("(?i)")
    else "(?:" + pattern.pattern + ")" for pattern in SECRET_PATTERNS))


def redact(text: str) -> str:
    """Mask every credential in a text before it leaves through a log or an error message."""
    if not ANY_SECRET.search(text):
        return text
    text = SECRET_PATTERNS[0].sub("[REDACTED]", text)
    for pattern in SECRET_PATTERNS[1:]:
        text = pattern.sub(r"\1[REDACTED]", text)
    return text


#: What must not reach a log line or a terminal as it is: controls but tab (newlines, ESC),
#: DEL, C1 controls, and the Unicode line and paragraph separators.
CONTROL_CHARACTER = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """Escape control characters in text from outside (\\n, \\x1b), so that it shows as one line
    that can neither forge another log line nor move a terminal's cursor."""
    return CONTROL_CHARACTER.sub(
        lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def ensure_private_dir(path: str) -> None:
    """Create a folder (and its parents) readable only by the user, if it is missing."""
    if path and not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)


def create_private_file(path: str) -> None:
    """Create an empty file with mode 0600 unless it exists: no secret is ever world-readable."""
    ensure_private_dir(os.path.dirname(os.path.abspath(path)))
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))


def write_private_file(path: str, text: str) -> None:
    """Replace a file atomically (temporary file and rename) with mode 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    ensure_private_dir(folder)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def release_free_memory() -> None:
    """Give the memory the process freed back to the system, where the C library allows.

    The C allocator keeps what Python frees (such as what the threads of a burst of streams
    used) for reuse; glibc's malloc_trim returns it. Elsewhere this does nothing.
    """
    try:
        import ctypes  # only the server needs it, once in a while
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError, TypeError):
        pass  # not glibc (macOS, musl, Windows), or no ctypes: nothing to trim this way


###############################################################################
# Logging #####################################################################
###############################################################################

log = logging.getLogger("claudeflare")
LOG_FILE_NAME = "app.log"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
LOG_KEEP_FILES = 3
#: How long the log thread gathers lines before writing them together.
LOG_BATCH_S = 0.02
#: Python's level names as the guide spells them.
LEVEL_NAMES = {"WARNING": "WARN", "CRITICAL": "ERROR"}
#: Opens app.log itself, never a file a symbolic link put in its place (0 where there is none).
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: How to choose another log folder, where one cannot be used.
CHOOSE_LOG_DIR = "set CLAUDEFLARE_LOG_DIR to a folder of yours"


def log_folder_problem(path: str) -> str | None:
    """Say why an existing folder is no safe place for this user's log, or None if it is.

    In a folder another user owns or can write to, that user can read the log or put a link
    at app.log. A missing folder is fine: it is created private. Windows gives every user a
    temp folder of their own.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is a file, not a folder"
    if os.name == "nt":
        return None
    if info.st_uid != os.getuid():
        return "belongs to another user"
    return "can be written by other users" if info.st_mode & 0o022 else None


def log_folder() -> tuple[str, str]:
    """Return the log folder, and a warning when the shared default could not be used.

    CLAUDEFLARE_LOG_DIR is used as it is. The default, claudeflare-logs in the temp folder
    that all users share, is passed over for claudeflare-logs-<uid> when it is not safe.
    """
    shared = default_log_dir()
    if os.environ.get("CLAUDEFLARE_LOG_DIR"):
        return shared, ""
    problem = log_folder_problem(shared)
    if problem is None:
        return shared, ""
    private = f"{shared}-{os.getuid()}"
    other = log_folder_problem(private)
    if other is not None:
        raise ClaudeflareError(f"Cannot log in {shared} ({problem}) nor in {private} ({other}): "
                               f"{CHOOSE_LOG_DIR}")
    return private, (f"{shared} {problem}: logging to {private} instead (to choose the "
                     f"folder, {CHOOSE_LOG_DIR})")


@functools.lru_cache(maxsize=None)
def component_logger(component: str) -> logging.Logger:
    """Return the logger whose lines carry `[component]`, such as Proxy or Server.

    Kept once looked up: logging.getLogger takes the logging module's lock on every call.
    """
    return logging.getLogger("claudeflare." + component)


def survive(component: str, work: Callable[[], Any]) -> None:
    """Run one turn of a background thread's work; an unexpected error is logged with its
    traceback and the thread carries on (a dead writer or refresher would lose data silently).

    With the request boundary in Router.handle_request, the only catch-alls of the program.
    """
    try:
        work()
    except Exception:
        component_logger(component).exception("Unexpected error; carrying on")


def record_fields(record: logging.LogRecord) -> tuple[str, str, str]:
    """Return a record's level, component and redacted message (with its traceback, if any).

    The message is one line whatever it quotes; a traceback's lines follow it indented, so
    no line of either can pass for a log line of its own.
    """
    level = LEVEL_NAMES.get(record.levelname, record.levelname)
    component = record.name.rpartition(".")[2] if "." in record.name else "App"
    message = printable(redact(record.getMessage()))
    if record.exc_info:
        trace = redact(logging.Formatter().formatException(record.exc_info))
        message += "".join("\n    " + printable(line) for line in trace.splitlines())
    return level, component, message


class PrettyFormatter(logging.Formatter):
    """`[2024-01-20T10:30:45.123Z] INFO: [Proxy] Request completed ...`, the guide's format."""

    def format(self, record: logging.LogRecord) -> str:
        level, component, message = record_fields(record)
        return f"[{iso_time(int(record.created * 1000))}] {level}: [{component}] {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, component, msg and any `fields` passed as extra."""

    def format(self, record: logging.LogRecord) -> str:
        level, component, message = record_fields(record)
        entry = {"ts": iso_time(int(record.created * 1000)), "level": level,
                 "component": component, "msg": message}
        entry.update(getattr(record, "fields", {}))
        return redact(json.dumps(entry, ensure_ascii=False, default=str))


class LockFreeHandler(logging.Handler):
    """A handler whose emit needs no lock: one append to a deque or a queue, safe as it is.

    logging.Handler.handle takes the handler's lock around emit for every record; under load,
    threads queue on it (and on the interpreter lock, while holding it) for nothing.
    """

    def handle(self, record: logging.LogRecord) -> Any:
        checked = self.filter(record)
        if isinstance(checked, logging.LogRecord):
            record = checked
        if checked:
            self.emit(record)
        return checked


class RecentLines(LockFreeHandler):
    """Keep the last log records in memory for /api/logs; they are formatted when asked for."""

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__()
        self.records: collections.deque = collections.deque(maxlen=capacity)
        self.setFormatter(PrettyFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, limit: int) -> list[str]:
        """Return the last `limit` lines, oldest first."""
        return [self.format(record) for record in list(self.records)[-limit:]]


class DeferredQueueHandler(LockFreeHandler):
    """Queue records unformatted: formatting and redaction happen on the writer thread.

    Every argument claudeflare logs is an immutable value, so handing the record to another
    thread as it is is safe, and the request path pays only for creating it. (Not
    logging.handlers.QueueHandler: that module and what it imports cost a megabyte.)
    """

    def __init__(self, records: queue.SimpleQueue) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.put(record)


class LogSetup:
    """The logging pipeline: callers enqueue records; one thread formats and writes them.

    The thread writes whatever has queued up in one write, so a busy server pays one system
    call per batch of lines rather than several per line. app.log rotates at rotate_bytes,
    keeping app.log.1 to app.log.3; a batch is never split, so no line is lost or cut.
    """

    STOP = None

    def __init__(self, level: str, fmt: str, log_dir: str, debug_console: bool,
                 rotate_bytes: int = LOG_ROTATE_BYTES) -> None:
        self.formatter = JsonFormatter() if fmt == "json" else PrettyFormatter()
        self.path = os.path.join(log_dir, LOG_FILE_NAME)
        self.rotate_bytes = rotate_bytes
        self.console = sys.stderr if debug_console else None
        self.file = self.open()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closing = threading.Event()
        self.handler = DeferredQueueHandler(self.queue)
        # No line shows the caller's source line, thread or process: skip finding them for each
        # record (the logging HOWTO's "Optimization" knobs). The request path pays only for
        # the record itself.
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        log.setLevel(getattr(logging, level.replace("WARN", "WARNING")))
        log.addHandler(self.handler)
        log.propagate = False
        self.thread = threading.Thread(target=self.run, name="claudeflare-log", daemon=True)
        self.thread.start()

    def open(self) -> Any:
        """Open app.log for appending, creating it (and its folder) private.

        Never through a symbolic link, nor a file another user owns: both would let another
        user choose what the log overwrites, or read it.
        """
        folder = os.path.dirname(self.path)
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise ClaudeflareError(f"Cannot write the log: {folder} is a file, not a folder; "
                                   f"{CHOOSE_LOG_DIR}")
        try:
            ensure_private_dir(folder)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | NO_FOLLOW, 0o600)
        except OSError as error:
            problem = ("is a symbolic link" if error.errno == errno.ELOOP
                       else f"cannot be written: {error.strerror or error}")
            raise ClaudeflareError(f"Cannot write the log: {self.path} {problem}; "
                                   f"{CHOOSE_LOG_DIR}") from None
        info = os.fstat(fd)
        if os.name != "nt" and (info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode)):
            os.close(fd)
            raise ClaudeflareError(f"Cannot write the log: {self.path} belongs to another "
                                   f"user; {CHOOSE_LOG_DIR}")
        if os.name != "nt" and info.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def run(self) -> None:
        """Write what queued, in batches: one wake-up per LOG_BATCH_S at most, not per line."""
        while True:
            records = [self.queue.get()]
            self.closing.wait(LOG_BATCH_S)
            while True:
                try:
                    records.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            lines = [self.formatter.format(record) + "\n" for record in records
                     if record is not self.STOP]
            if lines:
                self.write(lines)
            if self.STOP in records:
                return

    def write(self, lines: list[str]) -> None:
        """Append lines to app.log, rotating whenever the next line would pass the size."""
        try:
            size, chunk = self.file.tell(), []
            for line in lines:
                if size and size + len(line) > self.rotate_bytes:
                    self.file.write("".join(chunk))
                    self.rotate()
                    size, chunk = 0, []
                chunk.append(line)
                size += len(line)
            self.file.write("".join(chunk))
            self.file.flush()
        except (OSError, ClaudeflareError) as error:
            sys.stderr.write(f"claudeflare: cannot write {self.path}: {error}\n")
        if self.console is not None:
            self.console.write("".join(lines))
            self.console.flush()

    def rotate(self) -> None:
        """Shift app.log.N to app.log.N+1 (the oldest goes) and start an empty app.log."""
        self.file.close()
        for number in range(LOG_KEEP_FILES - 1, 0, -1):
            older = f"{self.path}.{number}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{number + 1}")
        os.replace(self.path, f"{self.path}.1")
        self.file = self.open()

    def close(self) -> None:
        """Write every queued line and detach, so nothing logged before shutdown is lost."""
        log.removeHandler(self.handler)
        self.closing.set()
        self.queue.put(self.STOP)
        self.thread.join()
        self.file.close()


###############################################################################
# Settings ####################################################################
###############################################################################

#: The keys claudeflare 0.1 wrote into a new config.json, every one at its default. A file that
#: holds them all came from that first run, not from the user: its defaults are dropped, so that
#: `config list` tells defaults from choices and a default changed in a release reaches it.
FIRST_RUN_KEYS = frozenset({
    "port", "host", "lb_strategy", "client_id", "retry_attempts", "retry_delay_ms",
    "retry_backoff", "session_duration_ms", "upstream_url", "oauth_token_url",
    "oauth_redirect_uri", "request_timeout_s", "shutdown_timeout_s", "request_retention_days",
    "log_level", "log_format",
})


class ConfigFile:
    """config.json: only what the user set, read leniently (a corrupt file is kept aside),
    written atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: Messages about a corrupt file, for the caller to log once logging is set up.
        self.problems: list[str] = []

    def read(self, writable: bool = True) -> dict:
        """Return the file's settings; on first run create it empty.

        Unless writable, nothing is created, renamed or rewritten (a running server's reload,
        `doctor`).
        """
        try:
            with open(self.path, encoding="utf-8-sig") as source:
                text = source.read()
        except FileNotFoundError:
            if writable:
                self.write({})
            return {}
        except OSError as error:
            raise ClaudeflareError(
                f"Cannot read config file {self.path}: {error.strerror or error}. Fix its "
                f"permissions, or point --config or CLAUDEFLARE_CONFIG_PATH at a file.") from None
        except ValueError as error:  # not UTF-8
            return self.set_aside(error, writable)
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise ValueError("the top level must be a JSON object")
        except JSON_ERRORS as error:
            return self.set_aside(error, writable)
        if writable and FIRST_RUN_KEYS <= set(values):
            chosen = {key: value for key, value in values.items()
                      if key not in SETTINGS_BY_KEY or value != SETTINGS_BY_KEY[key].default}
            if chosen != values:
                self.write(chosen)
                values = chosen
        return values

    def set_aside(self, error: ValueError, writable: bool) -> dict:
        """Keep a corrupt file as config.json.bad-<time> (when writable) and read no settings."""
        if not writable:
            self.problems.append(f"Failed to parse config file {self.path}: {error}")
            return {}
        kept = f"{self.path}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(self.path, kept)
        self.problems.append(f"Failed to parse config file {self.path}: {error}; kept it as "
                             f"{kept} and started with defaults")
        return {}

    def write(self, values: dict) -> None:
        """Save settings atomically with mode 0600."""
        try:
            write_private_file(self.path, json.dumps(values, indent=2) + "\n")
        except OSError as error:
            raise ClaudeflareError(
                f"Cannot write config file {self.path}: {error.strerror or error}. Fix its "
                f"permissions, or point --config or CLAUDEFLARE_CONFIG_PATH at a file.") from None

    def signature(self) -> tuple[int, int, int]:
        """Return what changes when the file is rewritten (a rename gives a new inode)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return (0, 0, 0)
        return (stat.st_mtime_ns, stat.st_ino, stat.st_size)

    def update(self, key: str, value: Any) -> None:
        """Set one key (remove it, for None), keeping the others as they are."""
        values = self.read()
        values[key] = value
        if value is None:
            del values[key]
        self.write(values)


def validate_setting(key: str, raw: Any, origin: str) -> Any:
    """Parse one setting's raw value, naming where it came from if it is wrong."""
    try:
        return SETTINGS_BY_KEY[key].parse(raw)
    except ValueError as error:
        raise ClaudeflareError(f"{error} (for {key}, from {origin})") from None


class Settings:
    """Resolved settings: command-line flag > environment > config file > default.

    Each value remembers where it came from (`sources`), which `config list` shows.
    """

    def __init__(self, config: ConfigFile, values: dict, sources: dict, file_values: dict,
                 environ: Any = None) -> None:
        self.config = config
        #: The environment the settings came from: a key leaving the file falls back to it.
        self.environ = {} if environ is None else environ
        self.values = values
        self.sources = sources
        self.file_values = file_values
        self.file_signature = config.signature()
        self.lock = threading.Lock()

    def reload_if_changed(self) -> list[str]:
        """Apply live keys changed in config.json since the last look; return what changed.

        A key written to the file while running wins over the environment: the user just asked
        for it (`config set`), so it must take effect.
        """
        signature = self.config.signature()
        if signature == self.file_signature:
            return []
        with self.lock:
            if signature == self.file_signature:
                return []
            self.file_signature = signature
            try:
                fresh = self.config.read(writable=False)
            except ClaudeflareError as error:
                component_logger("Config").error("%s; keeping the settings in force", error)
                return []
            if self.config.problems:  # a corrupt file says nothing: keep what is in force
                for problem in self.config.problems:
                    component_logger("Config").error("%s; keeping the settings in force", problem)
                self.config.problems.clear()
                return []
            changed = []
            for key in LIVE_SETTINGS:
                if key not in fresh and key in self.file_values and \
                        self.sources[key] == "config":
                    setting = SETTINGS_BY_KEY[key]  # removed from the file: environment, default
                    from_env = self.environ.get(setting.env)
                    self.values[key], self.sources[key] = (
                        (setting.parse(from_env), "env") if from_env
                        else (setting.default, "default"))
                    changed.append(key)
                elif key in fresh and fresh.get(key) != self.file_values.get(key):
                    try:
                        self.values[key] = validate_setting(key, fresh[key], self.config.path)
                    except ClaudeflareError as error:
                        component_logger("Config").error("%s; keeping %s", error, key)
                        continue
                    self.sources[key] = "config"
                    changed.append(key)
            self.file_values = fresh
            return changed

    def set_live(self, key: str, value: Any) -> None:
        """Change a setting in the running server and persist it to config.json."""
        value = validate_setting(key, value, "the request")
        self.config.update(key, value)
        with self.lock:
            self.values[key] = value
            self.sources[key] = "config"
            self.file_values = self.config.read()
            self.file_signature = self.config.signature()


def shown_setting(key: str, value: Any) -> Any:
    """Return a setting as logs, the API and `doctor` show it: a webhook URL's path and a
    command's arguments (where secrets go) cut off."""
    if key == "alert_url" and value:
        return ",".join(f"{parts.scheme}://{parts.hostname}{':' if parts.port else ''}"
                        f"{parts.port or ''}/..." for parts in map(urllib.parse.urlsplit,
                                                                   value.split(",")))
    if key == "alert_command" and value:
        words = shlex.split(value)
        return words[0] + (" ..." if len(words) > 1 else "")
    return value


def setting_property(key: str) -> property:
    """Read one setting as an attribute (settings.port): a property, found at once.

    A __getattr__ would first fail the normal lookup, building an AttributeError each time.
    """
    return property(lambda settings: settings.values[key], doc=SETTINGS_BY_KEY[key].help)


for _setting in SETTINGS:
    setattr(Settings, _setting.key, setting_property(_setting.key))
del _setting


def load_settings(config_path: str | None = None, flags: dict | None = None,
                  environ: dict | None = None, strict: bool = True,
                  config: ConfigFile | None = None) -> Settings:
    """Resolve every setting from flags, the environment, config.json and the defaults.

    Unless strict, an invalid value in the environment or the file is reported in
    config.problems and the default used instead, so that read-only commands run and `config
    set` can repair the file. `config` replaces the file at config_path (the doctor passes one
    that never writes).
    """
    environ = os.environ if environ is None else environ
    config = config or ConfigFile(config_path or default_config_path())
    file_values = config.read()
    values, sources = {}, {}
    for setting in SETTINGS:
        flag = (flags or {}).get(setting.key)
        values[setting.key], sources[setting.key] = setting.default, "default"
        if flag is not None:
            values[setting.key], sources[setting.key] = flag, "flag"
        elif environ.get(setting.env) or setting.key in file_values:
            raw, origin, source = ((environ[setting.env], setting.env, "env")
                                   if environ.get(setting.env)
                                   else (file_values[setting.key], config.path, "config"))
            try:
                values[setting.key] = validate_setting(setting.key, raw, origin)
                sources[setting.key] = source
            except ClaudeflareError as error:
                if strict:
                    raise
                config.problems.append(f"{error}; using the default, {setting.default}")
    if environ.get("CLAUDEFLARE_DEBUG") == "1":
        values["log_level"], sources["log_level"] = "DEBUG", "env"
    return Settings(config, values, sources, file_values, environ)


###############################################################################
# Database schema #############################################################
###############################################################################

#: The oldest SQLite with what the schema uses (UPSERT).
MIN_SQLITE = (3, 24, 0)
#: Seconds a connection waits for another writer (the server or a CLI command) before failing.
#: The server writes in batches of milliseconds, so only a foreign lock lasts longer.
BUSY_TIMEOUT_S = 2.0
#: The first copy of the WAL index header, at the start of the -shm file.
WAL_INDEX_HEADER_BYTES = 48
TIERS = (1, 5, 20)
#: An account's priority: lower serves first.
parse_priority = whole_number(-1000, 1000)
ACCOUNT_NAME_PATTERN = re.compile(r"(?! )[A-Za-z0-9 _\-@.+]{1,100}(?<! )")

HOUR_MS = 3600 * 1000
#: Upper bounds (ms) of the latency histogram kept per hour; part of schema version 3.
LATENCY_BUCKETS_MS = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
                      300000)
LATENCY_COLUMNS = tuple(f"latency_le_{bound}" for bound in LATENCY_BUCKETS_MS) + ("latency_over",)
#: What usage_hourly adds up per (hour, account, model, client key), as schema 3 made it.
ROLLUP_COUNTERS_V3 = ("requests", "failures", "input_tokens", "output_tokens",
                      "cache_creation_tokens", "cache_read_tokens", "cost_usd", "unpriced",
                      "latency_ms_total") + LATENCY_COLUMNS
#: The same figures summed over request-log rows, in the same order.
REQUEST_LOG_SUMS_V3 = (
    "COUNT(*)", "SUM(1 - success)", "SUM(input_tokens)", "SUM(output_tokens)",
    "SUM(cache_creation_tokens)", "SUM(cache_read_tokens)", "COALESCE(SUM(cost_usd), 0)",
    "SUM(cost_usd IS NULL AND input_tokens + output_tokens > 0)",
    "COALESCE(SUM(response_time_ms), 0)",
    *[f"COALESCE(SUM(response_time_ms > {low} AND response_time_ms <= {high}), 0)"
      for low, high in zip((-1,) + LATENCY_BUCKETS_MS, LATENCY_BUCKETS_MS)],
    f"COALESCE(SUM(response_time_ms > {LATENCY_BUCKETS_MS[-1]}), 0)")
#: Schema 5 adds requests billed as extra usage and what they cost, and the requests the API
#: refused because subscription accounts serve Claude Code only.
ROLLUP_COUNTERS = ROLLUP_COUNTERS_V3 + ("overage_requests", "overage_cost_usd",
                                        "claude_code_only")
#: And the slowest request: every column of usage_hourly after its key, and how to sum each
#: over request-log rows.
ROLLUP_COLUMNS = ROLLUP_COUNTERS + ("latency_ms_max",)
MAX_LATENCY_SUM = "COALESCE(MAX(response_time_ms), 0)"
REQUEST_LOG_SUMS = REQUEST_LOG_SUMS_V3 + (
    "COALESCE(SUM(overage), 0)", "COALESCE(SUM(CASE WHEN overage THEN cost_usd END), 0)",
    "COALESCE(SUM(claude_code_only), 0)", MAX_LATENCY_SUM)

#: Schema history: migration N brings a database from user_version N-1 to N. Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: accounts and the request log
        """CREATE TABLE accounts (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            account_tier INTEGER NOT NULL DEFAULT 1,
            api_key TEXT,
            access_token TEXT,
            refresh_token TEXT,
            expires_at INTEGER,
            paused INTEGER NOT NULL DEFAULT 0,
            rate_limit_status TEXT,
            rate_limit_reset INTEGER,
            rate_limited_until INTEGER,
            session_start INTEGER,
            session_requests INTEGER NOT NULL DEFAULT 0,
            request_count INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            last_used INTEGER)""",
        """CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            timestamp INTEGER NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            account_name TEXT,
            status INTEGER,
            success INTEGER NOT NULL,
            error TEXT,
            response_time_ms INTEGER,
            failover_attempts INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX requests_by_time ON requests(timestamp)",
    ),
    (  # 2: who an account is, how close it is to its limits, whether it must log in again;
       #    and the usage of each request
        "ALTER TABLE accounts ADD COLUMN email TEXT",
        "ALTER TABLE accounts ADD COLUMN organization TEXT",
        "ALTER TABLE accounts ADD COLUMN needs_reauth INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE accounts ADD COLUMN reauth_reason TEXT",
        "ALTER TABLE accounts ADD COLUMN utilization_5h REAL",
        "ALTER TABLE accounts ADD COLUMN reset_5h INTEGER",
        "ALTER TABLE accounts ADD COLUMN utilization_7d REAL",
        "ALTER TABLE accounts ADD COLUMN reset_7d INTEGER",
        "ALTER TABLE requests ADD COLUMN model TEXT",
        "ALTER TABLE requests ADD COLUMN ttfb_ms INTEGER",
        "ALTER TABLE requests ADD COLUMN streaming INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN cache_creation_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN cost_usd REAL",
        "ALTER TABLE requests ADD COLUMN tokens_per_second REAL",
        "ALTER TABLE requests ADD COLUMN user_agent TEXT",
        "ALTER TABLE requests ADD COLUMN conversation TEXT",
        "CREATE INDEX requests_by_account ON requests(account_name, timestamp)",
    ),
    (  # 3: hourly usage rollups (so stats stay instant at millions of requests) and client keys
        "ALTER TABLE requests ADD COLUMN client_key TEXT",
        f"""CREATE TABLE usage_hourly (
            hour INTEGER NOT NULL,
            account_name TEXT NOT NULL,
            model TEXT NOT NULL,
            client_key TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
            cache_read_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0,
            unpriced INTEGER NOT NULL DEFAULT 0,
            latency_ms_total INTEGER NOT NULL DEFAULT 0,
            latency_ms_max INTEGER NOT NULL DEFAULT 0,
            {", ".join(f"{column} INTEGER NOT NULL DEFAULT 0" for column in LATENCY_COLUMNS)},
            PRIMARY KEY (hour, account_name, model, client_key))""",
        f"""INSERT INTO usage_hourly (hour, account_name, model, client_key,
                                      {", ".join(ROLLUP_COUNTERS_V3)}, latency_ms_max)
            SELECT timestamp / {HOUR_MS} * {HOUR_MS}, COALESCE(account_name, ''),
                   COALESCE(model, ''), '', {", ".join(REQUEST_LOG_SUMS_V3)},
                   {MAX_LATENCY_SUM}
            FROM requests GROUP BY 1, 2, 3""",
    ),
    (  # 4: client keys, stored only as salted hashes
        """CREATE TABLE client_keys (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            salt TEXT NOT NULL,
            key_hash TEXT NOT NULL,
            created_at INTEGER NOT NULL)""",
    ),
    (  # 5: priority; extra usage (overage); windows read from /api/oauth/usage, and when the
       #    windows were last seen; requests billed as extra usage or refused as not Claude Code
        "ALTER TABLE accounts ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE accounts ADD COLUMN overage_until INTEGER",
        "ALTER TABLE accounts ADD COLUMN overage_enabled INTEGER",
        "ALTER TABLE accounts ADD COLUMN overage_disabled_reason TEXT",
        "ALTER TABLE accounts ADD COLUMN overage_reset INTEGER",
        "ALTER TABLE accounts ADD COLUMN model_windows TEXT",
        "ALTER TABLE accounts ADD COLUMN windows_at INTEGER",
        "ALTER TABLE accounts ADD COLUMN usage_read_at INTEGER",
        "ALTER TABLE accounts ADD COLUMN changed_at INTEGER",
        "ALTER TABLE requests ADD COLUMN overage INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE requests ADD COLUMN claude_code_only INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE usage_hourly ADD COLUMN overage_requests INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE usage_hourly ADD COLUMN overage_cost_usd REAL NOT NULL DEFAULT 0",
        "ALTER TABLE usage_hourly ADD COLUMN claude_code_only INTEGER NOT NULL DEFAULT 0",
    ),
    (  # 6: an owner, budgets and limits on each client key; its spending read back at start
        "ALTER TABLE client_keys ADD COLUMN owner TEXT",
        "ALTER TABLE client_keys ADD COLUMN budget_day REAL",
        "ALTER TABLE client_keys ADD COLUMN budget_week REAL",
        "ALTER TABLE client_keys ADD COLUMN budget_month REAL",
        "ALTER TABLE client_keys ADD COLUMN tokens_day INTEGER",
        "ALTER TABLE client_keys ADD COLUMN max_concurrent INTEGER",
        "ALTER TABLE client_keys ADD COLUMN rpm INTEGER",
        "ALTER TABLE client_keys ADD COLUMN models TEXT",
        "ALTER TABLE client_keys ADD COLUMN expires_at INTEGER",
        "ALTER TABLE client_keys ADD COLUMN priority_floor INTEGER",
        "ALTER TABLE client_keys ADD COLUMN paused INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX requests_by_client_key ON requests(client_key, timestamp)",
    ),
    (  # 7: alerts raised, and what each destination made of them
        """CREATE TABLE alerts (
            id INTEGER PRIMARY KEY,
            created_at INTEGER NOT NULL,
            event TEXT NOT NULL,
            severity TEXT NOT NULL,
            account_name TEXT,
            condition TEXT NOT NULL,
            message TEXT NOT NULL,
            fix TEXT NOT NULL DEFAULT '')""",
        """CREATE TABLE alert_deliveries (
            alert_id INTEGER NOT NULL,
            destination TEXT NOT NULL,
            result TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            answer TEXT,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (alert_id, destination))""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


###############################################################################
# Records #####################################################################
###############################################################################

# What the database holds, as the rest of the module sees it: accounts, client keys, request
# records and alerts, each a dataclass read from its row.

@dataclass
class Account:
    """One account of the pool, as stored; times are epoch milliseconds."""

    id: int
    name: str
    type: str
    account_tier: int
    api_key: str | None
    access_token: str | None
    refresh_token: str | None
    expires_at: int | None
    email: str | None
    organization: str | None
    paused: bool
    needs_reauth: bool
    reauth_reason: str | None
    rate_limit_status: str | None
    rate_limit_reset: int | None
    rate_limited_until: int | None
    utilization_5h: float | None
    reset_5h: int | None
    utilization_7d: float | None
    reset_7d: int | None
    session_start: int | None
    session_requests: int
    request_count: int
    created_at: int
    last_used: int | None
    #: Lower serves first: a group serves only while no account of a better one can.
    priority: int = 0
    #: When an account found serving on extra usage (billed) gets its included quota back.
    overage_until: int | None = None
    #: Whether extra usage is on for the account (None: not known yet), why not, and when
    #: its monthly extra-usage allowance resets.
    overage_enabled: bool | None = None
    overage_disabled_reason: str | None = None
    overage_reset: int | None = None
    #: Further weekly windows read from /api/oauth/usage (per model), as JSON.
    model_windows: str | None = None
    #: When the utilization and reset columns were last seen (a newer reading replaces them).
    windows_at: int | None = None
    usage_read_at: int | None = None
    #: When a person last changed the account (pause, resume, tier, priority, login): a
    #: routing mark the server decided before that is not applied.
    changed_at: int | None = None

    def status(self, now: int) -> str:
        """Return active, paused, needs_reauth, rate_limited, overage or expired."""
        if self.paused:
            return "paused"
        if self.needs_reauth:
            return "needs_reauth"
        if self.rate_limited_until and self.rate_limited_until > now:
            return "rate_limited"
        if self.overage_until and self.overage_until > now:
            return "overage"
        if self.type == "oauth" and not self.refresh_token and not self.token_valid(now):
            return "expired"
        return "active"

    def token_valid(self, now: int, margin_ms: int = 0) -> bool:
        """Whether the access token is there and has at least margin_ms left."""
        return bool(self.access_token) and (self.expires_at or 0) - now > margin_ms

    def session_count(self, now: int, session_duration_ms: int) -> int:
        """Return the requests of the current usage window (0 once the window has passed)."""
        if self.session_start is None or now - self.session_start >= session_duration_ms:
            return 0
        return self.session_requests

    def credentials(self) -> list[str]:
        """Return the account's secrets, those long enough to be masked where echoed."""
        return [secret for secret in (self.api_key, self.access_token, self.refresh_token)
                if secret and len(secret) >= MIN_SECRET_LENGTH]


def account_json(account: Account, now: int, session_duration_ms: int) -> dict:
    """Describe an account for `list --json` and the API: never a credential."""
    return {
        "name": account.name, "type": account.type, "tier": account.account_tier,
        "status": account.status(now), "paused": bool(account.paused),
        "email": account.email, "organization": account.organization,
        "requests": account.request_count,
        "sessionRequests": account.session_count(now, session_duration_ms),
        "sessionStart": account.session_start, "tokenExpiresAt": account.expires_at,
        "rateLimitStatus": account.rate_limit_status, "rateLimitReset": account.rate_limit_reset,
        "rateLimitedUntil": account.rate_limited_until,
        "needsReauth": bool(account.needs_reauth),
        "reauthReason": account.reauth_reason and redact(account.reauth_reason),
        "utilization5h": account.utilization_5h, "reset5h": account.reset_5h,
        "utilization7d": account.utilization_7d, "reset7d": account.reset_7d,
        "modelWindows": {name: {**window, "limited": window_spent(window, now)}
                         for name, window in model_windows(account).items()},
        "windowsSeenAt": account.windows_at,
        "usageReadAt": account.usage_read_at, "priority": account.priority,
        "overageUntil": account.overage_until,
        "extraUsage": {"enabled": None if account.overage_enabled is None
                       else bool(account.overage_enabled),
                       "disabledReason": account.overage_disabled_reason,
                       "resetsAt": account.overage_reset},
        "createdAt": account.created_at, "lastUsed": account.last_used,
    }


def model_windows(account: Account) -> dict:
    """Return the per-model weekly windows usage reads and headers found: name ->
    utilization, resetsAt and, from headers, status."""
    try:
        windows = json.loads(account.model_windows or "{}")
    except ValueError:
        return {}
    return windows if isinstance(windows, dict) else {}


@dataclass
class ClientKey:
    """A key clients present to use the proxy; only its salted hash is stored."""

    id: int
    name: str
    salt: str
    key_hash: str
    created_at: int
    #: Who the key belongs to (a person, a CI job).
    owner: str | None = None
    #: The most it may spend (USD, API-equivalent) in the calendar day, week and month.
    budget_day: float | None = None
    budget_week: float | None = None
    budget_month: float | None = None
    #: The most weighted tokens a day (see weighted_tokens).
    tokens_day: int | None = None
    #: Requests in flight at once, and requests per minute.
    max_concurrent: int | None = None
    rpm: int | None = None
    #: The models it may use: comma-separated patterns (claude-sonnet-*).
    models: str | None = None
    #: After this, the key is refused.
    expires_at: int | None = None
    #: It may use only accounts whose priority number is at least this.
    priority_floor: int | None = None
    paused: bool = False

    @staticmethod
    def digest(salt: str, key: str) -> str:
        """Hash a key with its salt (keys are random and long: one SHA-256 is enough)."""
        return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()

    def matches(self, presented: str) -> bool:
        """Compare in constant time, so timing tells nothing about the key."""
        return hmac.compare_digest(self.digest(self.salt, presented), self.key_hash)


SELECT_CLIENT_KEYS = (f"SELECT {', '.join(field.name for field in dataclasses.fields(ClientKey))}"
                      " FROM client_keys ORDER BY id")
ACCOUNT_COLUMNS = ", ".join(field.name for field in dataclasses.fields(Account))
SELECT_ACCOUNTS = f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY id"
SELECT_ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = ?"
#: The columns of accounts that hold numbers: column -> (the type read, whether it may be NULL).
NUMBER_COLUMNS = {
    field.name: (float if field.type.startswith("float") else int, "None" in field.type)
    for field in dataclasses.fields(Account) if field.type.split()[0] in ("int", "float", "bool")}


def account_from_row(row: sqlite3.Row) -> Account:
    """Build an Account from its row; a number column holding text (an edit by hand) reads as
    the number it spells, else as unset, rather than crash whatever compares it."""
    values = dict(row)
    for column, (kind, nullable) in NUMBER_COLUMNS.items():
        value = values[column]
        if value is not None and not isinstance(value, (int, float)):
            try:
                values[column] = kind(value)
            except (TypeError, ValueError):
                values[column] = None if nullable else 0
    return Account(**values)


def database_problem(path: str) -> str | None:
    """Say why the database at path cannot be reached, or None if it exists or can be made.

    A folder on its way that is a file, or that this user may not enter, hides it: it looks
    missing, and making it fails.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        return (f"Cannot reach database {path}: {error.strerror or error} (a folder on its path "
                f"is a file, or this user may not enter it)")
    return None


@dataclass
class RequestRecord:
    """One proxied request, as the request log keeps it."""

    id: str
    timestamp: int
    method: str
    path: str
    account_name: str | None = None
    account_id: int | None = None
    status: int | None = None
    success: bool = False
    error: str | None = None
    response_time_ms: int | None = None
    ttfb_ms: int | None = None
    failover_attempts: int = 0
    streaming: bool = False
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: float | None = None
    tokens_per_second: float | None = None
    user_agent: str | None = None
    conversation: str | None = None
    client_key: str | None = None
    #: Billed as extra usage (the answer's headers said so).
    overage: bool = False
    #: A subscription account refused it: subscription tokens serve Claude Code only.
    claude_code_only: bool = False
    #: What the answer's headers said of the account's limits (stored on the account).
    limits: RateLimit | None = None
    #: What is left to work out of the record (its usage, its conversation) and say of it, done
    #: on the writer's thread before the record is stored: off the request's thread.
    finishing: Callable[[], None] | None = None


#: The most recent alerts kept (with their deliveries); older ones are deleted.
MAX_STORED_ALERTS = 1000
#: Seconds storing an alert may wait for the database: it is sent whether stored or not.
ALERT_STORE_WAIT_S = 0.5
#: Events alerts are raised for, and their severity.
ALERT_SEVERITIES = {
    "account_needs_login": "error", "refresh_failing": "error", "pool_exhausted": "critical",
    "pool_recovered": "info", "overage_started": "warning", "window_threshold": "warning",
    "records_unsaved": "critical", "key_budget_reached": "warning", "test": "info"}
INSERT_ALERT = ("INSERT INTO alerts (created_at, event, severity, account_name, condition, "
                "message, fix) VALUES (?, ?, ?, ?, ?, ?, ?)")


@dataclass
class Alert:
    """Something a person should hear of: an account to log in again, a dry pool, billing.

    Built from names and states only (redacted like the log), never from a credential.
    """

    event: str
    message: str
    #: The command (or step) that fixes it.
    fix: str = ""
    account: str | None = None
    #: What makes two alerts the same condition: alerted once, again only when it comes back
    #: or after alert_repeat_s.
    condition: str = ""
    created_at: int = 0
    #: The event's own (ALERT_SEVERITIES) unless one moment of it is graver.
    severity: str = ""

    def __post_init__(self) -> None:
        self.severity = self.severity or ALERT_SEVERITIES[self.event]

    def payload(self) -> dict:
        """Return the alert as the JSON format and alert_command send it."""
        return {"event": self.event, "severity": self.severity, "account": self.account,
                "message": self.message, "fix": self.fix, "time": iso_time(self.created_at),
                "source": "claudeflare", "version": __version__}


###############################################################################
# Storage #####################################################################
###############################################################################

REQUEST_COLUMNS = tuple(field.name for field in dataclasses.fields(RequestRecord)
                        if field.name not in ("account_id", "limits", "finishing"))
INSERT_REQUEST = (f"INSERT OR REPLACE INTO requests ({', '.join(REQUEST_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(REQUEST_COLUMNS))})")
#: A record's INSERT_REQUEST parameters, in one call.
request_values = operator.attrgetter(*REQUEST_COLUMNS)
#: Count one request against an account; a request past the usage window starts a new window.
COUNT_REQUEST = """UPDATE accounts SET
    request_count = request_count + 1,
    last_used = :now,
    session_requests = CASE WHEN session_start IS NULL OR :now - session_start >= :window
                            THEN 1 ELSE session_requests + 1 END,
    session_start = CASE WHEN session_start IS NULL OR :now - session_start >= :window
                         THEN :now ELSE session_start END,
    rate_limit_status = CASE WHEN :status IS NULL OR COALESCE(rate_limited_until, 0) > :now
                             THEN rate_limit_status ELSE :status END,
    rate_limit_reset = CASE WHEN :status IS NULL OR COALESCE(rate_limited_until, 0) > :now
                            THEN rate_limit_reset ELSE :reset END,
    utilization_5h = CASE WHEN :seen_at >= COALESCE(windows_at, 0)
                          THEN COALESCE(:utilization_5h, utilization_5h) ELSE utilization_5h END,
    reset_5h = CASE WHEN :seen_at >= COALESCE(windows_at, 0)
                    THEN COALESCE(:reset_5h, reset_5h) ELSE reset_5h END,
    utilization_7d = CASE WHEN :seen_at >= COALESCE(windows_at, 0)
                          THEN COALESCE(:utilization_7d, utilization_7d) ELSE utilization_7d END,
    reset_7d = CASE WHEN :seen_at >= COALESCE(windows_at, 0)
                    THEN COALESCE(:reset_7d, reset_7d) ELSE reset_7d END,
    windows_at = CASE WHEN :utilization_5h IS NULL AND :utilization_7d IS NULL THEN windows_at
                      ELSE MAX(COALESCE(windows_at, 0), :seen_at) END,
    overage_enabled = COALESCE(:overage_enabled, overage_enabled),
    overage_disabled_reason = CASE WHEN :overage_enabled IS NULL THEN overage_disabled_reason
                                   ELSE :overage_disabled_reason END,
    overage_reset = COALESCE(:overage_reset, overage_reset)
    WHERE id = :id"""
UPSERT_ROLLUP = (
    f"INSERT INTO usage_hourly (hour, account_name, model, client_key, "
    f"{', '.join(ROLLUP_COLUMNS)}) VALUES ({', '.join('?' * (4 + len(ROLLUP_COLUMNS)))}) "
    f"ON CONFLICT (hour, account_name, model, client_key) DO UPDATE SET "
    + ", ".join(f"{column} = {column} + excluded.{column}" for column in ROLLUP_COUNTERS)
    + ", latency_ms_max = MAX(latency_ms_max, excluded.latency_ms_max)")
#: Where each column of a usage_hourly row sits in the lists rollup_rows builds.
ROLLUP_INDEX = {column: index for index, column in enumerate(ROLLUP_COLUMNS)}
LATENCY_START = ROLLUP_INDEX[LATENCY_COLUMNS[0]]
ROLLUP_SUMS = ", ".join([f"SUM({column}) AS {column}" for column in ROLLUP_COUNTERS]
                        + ["MAX(latency_ms_max) AS latency_ms_max"])


def hour_of(ms: int) -> int:
    """Return the start of the hour a time falls in (usage_hourly's key)."""
    return ms // HOUR_MS * HOUR_MS


def latency_bucket(milliseconds: int | None) -> int:
    """Return the index of the histogram bucket a response time falls in."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, milliseconds or 0)


def rollup_rows(records: list[RequestRecord]) -> list[list]:
    """Add up a batch of records per hour, account, model and client key, for one upsert each."""
    rows: dict[tuple, list] = {}
    for record in records:
        key = (hour_of(record.timestamp), record.account_name or "",
               record.model or "", record.client_key or "")
        row = rows.setdefault(key, [0] * len(ROLLUP_COLUMNS))
        tokens = record.input_tokens + record.output_tokens
        for index, value in enumerate((
                1, not record.success, record.input_tokens, record.output_tokens,
                record.cache_creation_tokens, record.cache_read_tokens, record.cost_usd or 0.0,
                record.cost_usd is None and tokens > 0, record.response_time_ms or 0)):
            row[index] += value
        row[LATENCY_START + latency_bucket(record.response_time_ms)] += 1
        if record.overage:
            row[ROLLUP_INDEX["overage_requests"]] += 1
            row[ROLLUP_INDEX["overage_cost_usd"]] += record.cost_usd or 0.0
        row[ROLLUP_INDEX["claude_code_only"]] += record.claude_code_only
        row[-1] = max(row[-1], record.response_time_ms or 0)
    return [list(key) + row for key, row in rows.items()]


def percentile_from_histogram(buckets: list[int], fraction: float) -> int | None:
    """Estimate a latency percentile (ms) from bucket counts, interpolating inside the bucket."""
    total = sum(buckets)
    if not total:
        return None
    target, seen = fraction * total, 0
    bounds = (0,) + LATENCY_BUCKETS_MS + (LATENCY_BUCKETS_MS[-1] * 2,)
    for index, count in enumerate(buckets):
        if count and seen + count >= target:
            low, high = bounds[index], bounds[index + 1]
            return int(low + (high - low) * (target - seen) / count)
        seen += count
    return bounds[-1]


#: The window fields COUNT_REQUEST stores when the answer carried them.
WINDOW_FIELDS = ("utilization_5h", "reset_5h", "utilization_7d", "reset_7d")
#: And with the time they were seen: a reading replaces only an older one.
WINDOW_COLUMNS = frozenset(WINDOW_FIELDS + ("windows_at",))


def count_parameters(record: RequestRecord, session_duration_ms: int) -> dict:
    """Return COUNT_REQUEST's parameters for a record: its time and what its answer said."""
    limits = record.limits
    status, reset = limits.summary() if limits is not None else (None, None)
    enabled, reason = limits.extra_usage() if limits is not None else (None, None)
    return {"now": record.timestamp, "window": session_duration_ms, "id": record.account_id,
            "status": status, "reset": reset,
            "seen_at": record.timestamp + (record.ttfb_ms or 0),
            "overage_enabled": enabled, "overage_disabled_reason": reason,
            "overage_reset": getattr(limits, "overage_reset", None),
            **{field: getattr(limits, field, None) for field in WINDOW_FIELDS}}


#: An API key as it can travel in a header: printable ASCII without spaces.
API_KEY_PATTERN = re.compile(r"[!-~]{1,512}")
#: Client keys start with this, so a leaked one is easy to recognise.
CLIENT_KEY_PREFIX = "cfk-"
#: What `resume` sets: usable again, whatever mark it had (a refused OAuth account just gets
#: its refresh tried again, and is marked again if it still fails).
RESUMED = {"paused": 0, "rate_limited_until": None, "needs_reauth": 0, "reauth_reason": None,
           "overage_until": None}
#: What routing marks set on an account, and a person's change can overrule.
ROUTING_COLUMNS = frozenset(RESUMED) | {"access_token", "refresh_token", "api_key"}


def validate_account_name(name: str) -> str:
    """Check an account name: 1-100 letters, digits, spaces or -_@.+, no space at either end
    (`list` would show `work ` as `work`), and not . or .. (no URL can name those)."""
    if not ACCOUNT_NAME_PATTERN.fullmatch(name or "") or name in (".", ".."):
        raise ClaudeflareError(
            f"Invalid account name: {name!r}. Use 1-100 letters, digits, spaces or - _ @ . +, "
            f"with no space at the start or end, and not . or ..")
    return name


def is_locked(error: sqlite3.Error) -> bool:
    """Tell whether an SQLite error means another connection holds the database."""
    return isinstance(error, sqlite3.OperationalError) and (
        "locked" in str(error) or "busy" in str(error))


def lock_holders(path: str) -> list[str]:
    """Name the other processes that have the database open ("pid 42 sqlite3"), on Linux."""
    wanted = {os.path.realpath(path + suffix) for suffix in ("", "-wal", "-shm")}
    holders = []
    with contextlib.suppress(OSError):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                folder = f"/proc/{pid}/fd"
                if any(os.readlink(os.path.join(folder, fd)) in wanted
                       for fd in os.listdir(folder)):
                    with open(f"/proc/{pid}/comm", encoding="utf-8") as comm:
                        holders.append(f"pid {pid} {comm.read().strip()}")
    return holders


def locked_message(path: str) -> str:
    """Say that the database is locked, by whom if that can be found, and what to do."""
    holders = lock_holders(path)
    return (f"The database {path} is locked by another process"
            f"{' (' + ', '.join(holders) + ')' if holders else ''}; try again when it is done "
            f"(a backup or an sqlite3 shell holding a transaction)")


# NULL and booleans bound as they are. Without an adapter of their own, sqlite3 asks each such
# value to adapt itself, building and discarding an AttributeError each time: a dozen times
# for every request logged.
sqlite3.register_adapter(type(None), lambda value: None)
sqlite3.register_adapter(bool, int)


class Store:
    """The SQLite database of accounts and requests, shared by the server and CLI commands.

    WAL mode lets readers run while one connection writes; every read-modify-write is one short
    BEGIN IMMEDIATE transaction, so two processes never deadlock on a lock upgrade.
    """

    def __init__(self, path: str, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 create: bool = True) -> None:
        """Open the database at path; unless create, a missing one is an error, not a new file."""
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise ClaudeflareError(
                f"This Python's SQLite is {sqlite3.sqlite_version}; claudeflare needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer. Use a newer Python build.")
        if os.path.isdir(path):
            raise ClaudeflareError(f"Cannot use database {path}: it is a folder. Point --db or "
                                   f"CLAUDEFLARE_DB_PATH at a file.")
        if not os.path.exists(path):
            if not create:
                raise ClaudeflareError(
                    f"No database at {path}: nothing is stored there yet. Check --db or "
                    f"CLAUDEFLARE_DB_PATH, or add an account: python3 claudeflare.py add NAME")
            create_private_file(path)
        self.db = self.connect(busy_timeout_s)
        #: Guards the connection: the server's threads share it.
        self.lock = threading.RLock()
        try:
            self.check_owner()
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self.migrate()
        except sqlite3.OperationalError as error:
            self.db.close()
            if is_locked(error):
                raise ClaudeflareError(locked_message(path)) from None
            raise ClaudeflareError(f"Cannot use database {path}: {error}") from None
        except sqlite3.DatabaseError as error:
            self.db.close()
            raise ClaudeflareError(f"Cannot use database {path}: {error}. Is it a claudeflare "
                                   f"database? Point --db or CLAUDEFLARE_DB_PATH at the right "
                                   f"file.") from None
        except ClaudeflareError:
            self.db.close()
            raise
        #: A second connection for the request path's reads: in WAL mode it never waits for a
        #: write in progress, and PRAGMA data_version on it sees every commit of self.db too.
        self.reader = self.connect(busy_timeout_s)
        self.read_lock = threading.Lock()
        #: data_version's own cursor, giving plain tuples: it runs on every request.
        self.version_cursor = self.reader.cursor()
        self.version_cursor.row_factory = None
        #: A third one for the API and the status page, whose queries may take a while.
        self.stats_reader = self.connect(busy_timeout_s)
        self.stats_lock = threading.Lock()
        self.wal_header = self.map_wal_header()

    def connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        """Open a connection in autocommit mode, shareable between threads (each has a lock)."""
        try:
            connection = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as error:
            raise ClaudeflareError(f"Cannot open database {self.path}: {error}") from None
        connection.row_factory = sqlite3.Row
        return connection

    def check_owner(self) -> None:
        """Refuse, untouched, a file this claudeflare cannot use: one a newer claudeflare wrote,
        or another program's SQLite database (tables, but not claudeflare's)."""
        self.refuse_newer(self.db.execute("PRAGMA user_version").fetchone()[0])
        tables = [row[0] for row in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        if tables and "accounts" not in tables:
            tables = tables[:5]
            raise ClaudeflareError(
                f"{self.path} is another program's SQLite database (tables {', '.join(tables)}); "
                f"claudeflare leaves it untouched. Point --db or CLAUDEFLARE_DB_PATH at "
                f"claudeflare's own database, or at a new file.")

    def close(self) -> None:
        """Close the connections."""
        with self.stats_lock:
            self.stats_reader.close()
        with self.read_lock:
            self.reader.close()
            if self.wal_header is not None:
                self.wal_header.close()
                self.wal_header = None
        with self.lock:
            self.db.close()

    @contextlib.contextmanager
    def transaction(self, durable: bool = True,
                    wait_s: float | None = None) -> Iterator[sqlite3.Connection]:
        """Run a block as one immediate transaction: all of it is written, or none.

        A durable commit reaches the disk before it returns, so accounts and tokens survive a
        power cut; the request log (durable=False) may lose its last moments instead of paying
        for a disk flush on every batch. wait_s bounds the wait for the database (and for
        other threads of this process) below the connection's busy timeout.
        """
        if not self.lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise sqlite3.OperationalError("database is locked (busy in this process)")
        try:
            if wait_s is not None:
                self.db.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
            if durable:
                self.db.execute("PRAGMA synchronous = FULL")
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:  # a failed COMMIT (disk full) leaves it open
                        with contextlib.suppress(sqlite3.Error):
                            self.db.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    self.db.execute("PRAGMA synchronous = NORMAL")
                if wait_s is not None:
                    self.db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        finally:
            self.lock.release()

    def migrate(self) -> None:
        """Bring the schema up to SCHEMA_VERSION; refuse a database from a newer claudeflare."""
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            self.refuse_newer(version)
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def refuse_newer(self, version: int) -> None:
        """Refuse a database a newer claudeflare wrote: its schema is not known here."""
        if version > SCHEMA_VERSION:
            raise ClaudeflareError(
                f"Database {self.path} has schema version {version}, newer than this "
                f"claudeflare {__version__} understands ({SCHEMA_VERSION}). Run the newer "
                f"claudeflare.py that wrote it, or point --db at another database.")

    def map_wal_header(self) -> mmap.mmap | None:
        """Map the header of the WAL index (the -shm file), or return None where it cannot be.

        Every commit, by any process, rewrites it (https://www.sqlite.org/walformat.html, 2.1:
        a change counter, the last frame, the salts), and every SQLite version reads it the
        same way. Reading it costs no system call, where PRAGMA data_version takes a read
        transaction (file locks) on every request.
        """
        if os.name != "posix":
            return None
        try:
            fd = os.open(self.path + "-shm", os.O_RDONLY | NO_FOLLOW)
        except OSError:  # not in WAL mode (a file system without shared memory)
            return None
        try:
            return mmap.mmap(fd, WAL_INDEX_HEADER_BYTES, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def data_version(self) -> int | bytes:
        """Return a value that changes whenever anyone, in any process, commits a change."""
        header = self.wal_header
        if header is not None:
            with contextlib.suppress(ValueError):  # closed meanwhile: the connection says so
                return header[:WAL_INDEX_HEADER_BYTES]
        with self.read_lock:
            return self.version_cursor.execute("PRAGMA data_version").fetchone()[0]

    # -- accounts ------------------------------------------------------------------------------

    def accounts(self) -> list[Account]:
        """Return every account, oldest first."""
        with self.read_lock:
            rows = self.reader.execute(SELECT_ACCOUNTS).fetchall()
        return [account_from_row(row) for row in rows]

    def account(self, name: str) -> Account:
        """Return one account by name, or fail with `Account not found: NAME`."""
        with self.read_lock:
            row = self.reader.execute(SELECT_ACCOUNT, (name,)).fetchone()
        if row is None:
            raise NotFound(f"Account not found: {name}")
        return account_from_row(row)

    def add_account(self, name: str, account_type: str, tier: int, **fields: Any) -> Account:
        """Create an account; credentials and identity come as column=value fields."""
        validate_account_name(name)
        columns = {"name": name, "type": account_type, "account_tier": tier,
                   "created_at": now_ms(), "changed_at": now_ms(), **fields}
        try:
            with self.transaction() as db:
                db.execute(f"INSERT INTO accounts ({', '.join(columns)}) "
                           f"VALUES ({', '.join('?' * len(columns))})", tuple(columns.values()))
        except sqlite3.IntegrityError:
            raise ClaudeflareError(f"Account already exists: {name}. Choose another name, or "
                                   f"remove it first.") from None
        return self.account(name)

    def change_account(self, name: str, **fields: Any) -> Account:
        """Make a person's change to an account (pause, resume, tier, login).

        One that touches what routing marks set (pause, resume, a new login) wins over any
        mark the server decided before it.
        """
        if ROUTING_COLUMNS & set(fields):
            fields["changed_at"] = now_ms()
        return self.update_account(name, **fields)

    def update_account(self, name: str, wait_s: float | None = None, **fields: Any) -> Account:
        """Set some columns of one account in one transaction and return it."""
        assignments = ", ".join(f"{column} = ?" for column in fields)
        with self.transaction(wait_s=wait_s) as db:
            cursor = db.execute(f"UPDATE accounts SET {assignments} WHERE name = ?",
                                (*fields.values(), name))
        if cursor.rowcount == 0:
            raise NotFound(f"Account not found: {name}")
        return self.account(name)

    def remove_account(self, name: str) -> None:
        """Delete an account; its request history stays, under its name."""
        with self.transaction() as db:
            if db.execute("DELETE FROM accounts WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"Account not found: {name}")

    def reset_stats(self) -> int:
        """Zero every account's request counters; return how many accounts there are."""
        with self.transaction() as db:
            return db.execute("UPDATE accounts SET request_count = 0, session_requests = 0, "
                              "session_start = NULL").rowcount

    # -- client keys ---------------------------------------------------------------------------

    def client_keys(self) -> list[ClientKey]:
        """Return every client key (hashes only), oldest first."""
        with self.read_lock:
            rows = self.reader.execute(SELECT_CLIENT_KEYS).fetchall()
        return [ClientKey(**row) for row in rows]

    def add_client_key(self, name: str, **limits: Any) -> str:
        """Create a client key with its limits (column=value) and return it: the only time it
        exists in clear."""
        validate_account_name(name)
        key = CLIENT_KEY_PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        columns = {"name": name, "salt": salt, "key_hash": ClientKey.digest(salt, key),
                   "created_at": now_ms(), **limits}
        try:
            with self.transaction() as db:
                db.execute(f"INSERT INTO client_keys ({', '.join(columns)}) "
                           f"VALUES ({', '.join('?' * len(columns))})", tuple(columns.values()))
        except sqlite3.IntegrityError:
            raise ClaudeflareError(f"Client key already exists: {name}. Choose another name, or "
                                   f"remove it first.") from None
        return key

    def change_client_key(self, name: str, **limits: Any) -> None:
        """Set some limits of a client key (None removes one); its secret stays."""
        assignments = ", ".join(f"{column} = ?" for column in limits)
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM client_keys WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"Client key not found: {name}")
            if limits:
                db.execute(f"UPDATE client_keys SET {assignments} WHERE name = ?",
                           (*limits.values(), name))

    def key_spending(self, since: int) -> tuple[list[sqlite3.Row], dict[str, int]]:
        """Return the client keys' usage since a time, summed per key and minute (every time
        zone's day begins on a minute), and when each key was last used. Read at start and by
        the CLI, never on the request path."""
        with self.stats_lock:
            rows = self.stats_reader.execute(
                "SELECT client_key, timestamp / 60000 * 60000 AS minute, "
                "COALESCE(SUM(cost_usd), 0) AS cost_usd, SUM(input_tokens) AS input_tokens, "
                "SUM(output_tokens) AS output_tokens, "
                "SUM(cache_creation_tokens) AS cache_creation_tokens, "
                "SUM(cache_read_tokens) AS cache_read_tokens FROM requests "
                "WHERE client_key IS NOT NULL AND timestamp >= ? GROUP BY 1, 2",
                (since,)).fetchall()
            last_used = dict(self.stats_reader.execute(
                "SELECT client_key, MAX(timestamp) FROM requests WHERE client_key IS NOT NULL "
                "GROUP BY client_key").fetchall())
        return rows, last_used

    def remove_client_key(self, name: str) -> None:
        """Delete a client key; clients using it are refused from the next request."""
        with self.transaction() as db:
            if db.execute("DELETE FROM client_keys WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"Client key not found: {name}")

    # -- alerts --------------------------------------------------------------------------------

    def add_alert(self, alert: Alert, destinations: list[str]) -> int:
        """Store an alert with a pending delivery per destination; keep only the latest ones."""
        with self.transaction(durable=False, wait_s=ALERT_STORE_WAIT_S) as db:
            alert_id = db.execute(INSERT_ALERT, (alert.created_at, alert.event, alert.severity,
                                                 alert.account, alert.condition, alert.message,
                                                 alert.fix)).lastrowid
            db.executemany("INSERT INTO alert_deliveries (alert_id, destination, result, "
                           "updated_at) VALUES (?, ?, 'pending', ?)",
                           [(alert_id, name, alert.created_at) for name in destinations])
            db.execute("DELETE FROM alerts WHERE id <= ?", (alert_id - MAX_STORED_ALERTS,))
            db.execute("DELETE FROM alert_deliveries WHERE alert_id <= ?",
                       (alert_id - MAX_STORED_ALERTS,))
        return alert_id

    def note_delivery(self, alert_id: int, destination: str, result: str, attempts: int,
                      answer: str) -> None:
        """Record what became of one delivery of a stored alert."""
        with self.transaction(durable=False, wait_s=ALERT_STORE_WAIT_S) as db:
            db.execute("UPDATE alert_deliveries SET result = ?, attempts = ?, answer = ?, "
                       "updated_at = ? WHERE alert_id = ? AND destination = ?",
                       (result, attempts, answer, now_ms(), alert_id, destination))

    def recent_alerts(self, limit: int, since_ms: int = 0) -> list[dict]:
        """Return the latest alerts from a time on, newest first, each with its deliveries."""
        alerts = [dict(row) for row in self.query(
            "SELECT * FROM alerts WHERE created_at >= ? ORDER BY id DESC LIMIT ?",
            (since_ms, limit))]
        deliveries = collections.defaultdict(list)
        if alerts:
            for row in self.query("SELECT * FROM alert_deliveries WHERE alert_id >= ? "
                                  "ORDER BY destination", (alerts[-1]["id"],)):
                deliveries[row["alert_id"]].append(dict(row))
        for alert in alerts:
            alert["deliveries"] = deliveries[alert["id"]]
        return alerts

    # -- request log ---------------------------------------------------------------------------

    def write_requests(self, records: list[RequestRecord], session_duration_ms: int,
                       marks: list[tuple[str, dict, int]] = ()) -> None:
        """Log finished requests, count them against their accounts and store routing marks
        ((account name, column=value, when decided)), in one transaction; durable when it holds
        marks. A mark decided before a person changed the account is not applied."""
        with self.transaction(durable=bool(marks)) as db:
            db.executemany(INSERT_REQUEST, [request_values(record) for record in records])
            db.executemany(COUNT_REQUEST, [count_parameters(record, session_duration_ms)
                                           for record in records
                                           if record.account_id is not None])
            db.executemany(UPSERT_ROLLUP, rollup_rows(records))
            for name, fields, decided_at in marks:
                seen_at = fields.get("windows_at")
                windows = {column: value for column, value in fields.items()
                           if seen_at is not None and column in WINDOW_COLUMNS}
                rest = {column: value for column, value in fields.items()
                        if column not in windows}
                # Windows carrying the time they were seen replace only older ones.
                for part, newer in ((rest, ""), (windows, " AND COALESCE(windows_at, 0) <= ?")):
                    if part:
                        db.execute(f"UPDATE accounts SET "
                                   f"{', '.join(f'{column} = ?' for column in part)} WHERE "
                                   f"name = ? AND COALESCE(changed_at, 0) <= ?{newer}",
                                   (*part.values(), name, decided_at,
                                    *((seen_at,) if newer else ())))

    def clear_history(self) -> int:
        """Delete the request log and its hourly totals; return how many records went."""
        with self.transaction() as db:
            db.execute("DELETE FROM usage_hourly")
            return db.execute("DELETE FROM requests").rowcount

    def prune_requests(self, older_than_ms: int) -> int:
        """Delete request records (and hourly totals) older than a time; return how many went."""
        with self.transaction(durable=False) as db:
            db.execute("DELETE FROM usage_hourly WHERE hour < ?",
                       (hour_of(older_than_ms),))
            return db.execute("DELETE FROM requests WHERE timestamp < ?",
                              (older_than_ms,)).rowcount

    # -- statistics ----------------------------------------------------------------------------

    def query(self, sql: str, parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only query (statistics) on its own connection."""
        with self.stats_lock:
            return self.stats_reader.execute(sql, tuple(parameters)).fetchall()

    def usage(self, since_ms: int = 0, group: str | None = None) -> list[sqlite3.Row]:
        """Add up usage_hourly from an hour on, in all or per account_name / model / client_key."""
        assert group in (None, "account_name", "model", "client_key")
        select = f"{group} AS name, " if group else ""
        grouping = f" GROUP BY {group} ORDER BY requests DESC" if group else ""
        return self.query(f"SELECT {select}{ROLLUP_SUMS} FROM usage_hourly WHERE hour >= ?"
                          f"{grouping}", (hour_of(since_ms),))

    def usage_series(self, since_ms: int, bucket_ms: int) -> list[sqlite3.Row]:
        """Return usage per time bucket from a time on.

        Buckets of an hour or more come from usage_hourly; finer ones from the request log,
        which for those short ranges holds few rows.
        """
        if bucket_ms >= HOUR_MS:
            return self.query(
                f"SELECT hour / ? * ? AS bucket, {ROLLUP_SUMS} FROM usage_hourly "
                f"WHERE hour >= ? GROUP BY bucket ORDER BY bucket",
                (bucket_ms, bucket_ms, hour_of(since_ms)))
        sums = ", ".join(f"{total} AS {column}"
                         for total, column in zip(REQUEST_LOG_SUMS, ROLLUP_COLUMNS))
        return self.query(f"SELECT timestamp / ? * ? AS bucket, {sums} FROM requests "
                          f"WHERE timestamp >= ? GROUP BY bucket ORDER BY bucket",
                          (bucket_ms, bucket_ms, since_ms))

    def recent_requests(self, limit: int, failures_only: bool = False) -> list[sqlite3.Row]:
        """Return the latest request records, newest first."""
        where = "WHERE success = 0 " if failures_only else ""
        return self.query(f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests {where}"
                          f"ORDER BY timestamp DESC LIMIT ?", (limit,))

    def backup(self, path: str) -> None:
        """Copy the database consistently, even while the server is writing, to a new file."""
        if os.path.exists(path):
            raise ClaudeflareError(f"Backup target exists: {path}. Choose a new file name.")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ClaudeflareError(f"The folder {folder} does not exist: create it first, or "
                                   f"choose another path for the backup.")
        create_private_file(path)
        target = sqlite3.connect(path)
        try:
            with self.lock:
                self.db.backup(target)
        finally:
            target.close()


###############################################################################
# Request log writer ##########################################################
###############################################################################

# The one writer thread: request records and routing marks are written in batches behind the
# requests, never on their path, and kept in memory while the database refuses them.

#: How long the writer gathers records before it finishes them (finish_off) and one
#: transaction writes them all. Longer batches cost less per record, but a batch holds the
#: CPU and the interpreter lock a while: under full load 25 ms kept the tail latency where
#: 50 ms raised it by half a millisecond, and cost no more.
WRITE_BATCH_WINDOW_S = 0.025
WRITE_BATCH_MAX = 1000
#: Records kept in memory while the database cannot take them (locked, disk full); past this,
#: the oldest go.
MAX_UNWRITTEN_RECORDS = 100_000
#: After a failed write, wait this long before the next try, doubling up to the maximum.
WRITE_RETRY_S = 0.5
WRITE_RETRY_MAX_S = 10.0


class BackgroundWriter:
    """The one thread that writes the request log, account counters and routing marks.

    Nothing on a request's path waits for the database. Records queue up while a batch is
    being written, so under load each transaction carries many of them. What the database
    refuses (locked by another process, disk full) stays in memory and is written when it
    takes it again.
    """

    STOP = object()

    def __init__(self, store: Store, settings: Settings,
                 on_written: Callable[[list[RequestRecord], list[tuple[str, dict, int]]], None]
                 = lambda records, marks: None) -> None:
        self.store = store
        self.settings = settings
        self.on_written = on_written
        self.pruned_at = 0
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.urgent = threading.Event()
        #: What the database refused so far, oldest first: records, and routing marks.
        self.unwritten: list[RequestRecord] = []
        self.unwritten_marks: list[tuple[str, dict, int]] = []
        self.failing_since: float | None = None
        self.retry_wait = WRITE_RETRY_S
        self.retry_at = 0.0
        self.dropped = 0
        self.log = component_logger("Store")
        self.thread = threading.Thread(target=self.run, name="claudeflare-writer", daemon=True)
        self.thread.start()

    def record(self, record: RequestRecord) -> None:
        """Queue a finished request for writing."""
        self.queue.put(record)

    def mark(self, name: str, fields: dict, decided_at: int) -> None:
        """Queue a change to an account's routing state (rate limits, needs_reauth)."""
        self.queue.put((name, fields, decided_at))

    def flush(self, timeout: float = BUSY_TIMEOUT_S * 2) -> bool:
        """Wait until everything queued so far is written (or found unwritable)."""
        done = threading.Event()
        self.queue.put(done)
        self.urgent.set()
        return done.wait(timeout)

    def run(self) -> None:
        """Write batches until close(): each wait, drain what queued, one transaction."""
        while True:
            waiting = bool(self.unwritten or self.unwritten_marks)
            try:
                items = [self.queue.get(timeout=max(0.0, self.retry_at - time.monotonic())
                                        if waiting else None)]
            except queue.Empty:
                items = []
            # Sleep through the window instead of waking for every record: one wake-up and one
            # transaction per batch. flush() and close() cut the wait short.
            if items:
                self.urgent.wait(WRITE_BATCH_WINDOW_S)
                self.urgent.clear()
            while len(items) < WRITE_BATCH_MAX:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            asked = False
            for item in items:
                if isinstance(item, RequestRecord):
                    if item.finishing is not None:
                        survive("Store", item.finishing)
                        item.finishing = None
                    self.unwritten.append(item)
                elif isinstance(item, tuple):
                    self.unwritten_marks.append(item)
                else:
                    asked = True  # flush() or close(): try now, even while failing
            if (self.unwritten or self.unwritten_marks) and (
                    self.failing_since is None or asked or time.monotonic() >= self.retry_at):
                survive("Store", self.write)
            for item in items:
                if item is self.STOP:
                    return
                if isinstance(item, threading.Event):
                    item.set()

    def write(self) -> None:
        """Write what is waiting, and prune past the retention once an hour; never raise."""
        batch, marks = self.unwritten, self.unwritten_marks
        try:
            self.store.write_requests(batch, self.settings.session_duration_ms, marks)
        except (sqlite3.Error, ValueError, OverflowError) as error:
            self.keep_unwritten(error)
            return
        self.unwritten, self.unwritten_marks = [], []
        if self.failing_since is not None:
            self.log.info("The database takes writes again: wrote %d request records held "
                          "for %.0fs", len(batch), time.monotonic() - self.failing_since)
            self.failing_since, self.retry_wait = None, WRITE_RETRY_S
        self.on_written(batch, marks)
        now = now_ms()
        if now - self.pruned_at >= HOUR_MS:
            self.pruned_at = now
            days = self.settings.request_retention_days
            try:
                pruned = self.store.prune_requests(now - days * 24 * HOUR_MS)
            except sqlite3.Error as error:
                self.log.error("Could not prune old request records: %s", error)
                return
            if pruned:
                self.log.info("Pruned %d request records older than %d days", pruned, days)

    def write_one_by_one(self) -> None:
        """Write the waiting records and marks one at a time, dropping the ones that fail."""
        batch, marks = self.unwritten, self.unwritten_marks
        self.unwritten, self.unwritten_marks = [], []
        written: tuple[list[RequestRecord], list[tuple[str, dict, int]]] = ([], [])
        for records, some_marks in [([record], []) for record in batch] + [
                ([], [mark]) for mark in marks]:
            try:
                self.store.write_requests(records, self.settings.session_duration_ms, some_marks)
            except (sqlite3.Error, ValueError, OverflowError) as error:
                self.log.error("Could not write %s: %s; dropped it", records[0].id if records
                               else f"a mark of account {some_marks[0][0]}", error)
                continue
            written[0].extend(records)
            written[1].extend(some_marks)
        self.on_written(*written)

    def keep_unwritten(self, error: Exception) -> None:
        """Hold what the database refused, within bounds, and say so once per episode."""
        if not isinstance(error, sqlite3.OperationalError):
            # Something in the batch the database can never take: retrying it whole would block
            # the log for good. Write each item alone, and drop only what fails.
            self.write_one_by_one()
            return
        if len(self.unwritten) > MAX_UNWRITTEN_RECORDS:
            excess = len(self.unwritten) - MAX_UNWRITTEN_RECORDS
            del self.unwritten[:excess]
            self.dropped += excess
            self.log.error("Dropped the %d oldest unwritten request records (%d so far): the "
                           "database has refused writes for too long", excess, self.dropped)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self.log.error("Could not write %d request records: %s; keeping them in memory and "
                           "retrying", len(self.unwritten), error)
        else:
            self.retry_wait = min(self.retry_wait * 2, WRITE_RETRY_MAX_S)
        self.retry_at = time.monotonic() + self.retry_wait

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self.queue.put(self.STOP)
        self.urgent.set()
        self.thread.join()
        if self.unwritten or self.unwritten_marks:
            self.log.error("Stopped with %d request records the database would not take",
                           len(self.unwritten))


###############################################################################
# Upstream client #############################################################
###############################################################################

#: The name and the value of a (name, value) header pair; the third part of a partition.
FIRST, SECOND, THIRD = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)


class Headers:
    """Request headers in arrival order, looked up without regard to case.

    The subset of email.message.Message that the handler uses; parsing into it costs a tenth of
    what the email package takes, on every request. Built and searched with map, zip and
    compress, which run per header in C rather than in interpreted loops.
    """

    __slots__ = ("pairs", "names", "first")

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs
        self.names = list(map(str.lower, map(FIRST, pairs)))
        #: Lower-case name -> its first value: built backwards, so the first one stays.
        self.first = dict(zip(reversed(self.names), map(SECOND, reversed(pairs))))

    def get(self, name: str, default: Any = None) -> Any:
        return self.first.get(name.lower(), default)

    def get_all(self, name: str, default: Any = None) -> Any:
        name = name.lower()
        if name not in self.first:
            return default
        if self.names.count(name) == 1:
            return [self.first[name]]
        return [value for (_, value), candidate in zip(self.pairs, self.names)
                if candidate == name]

    def items(self) -> list[tuple[str, str]]:
        return list(self.pairs)

    def starting(self, prefix: str) -> list[tuple[str, str]]:
        """Return the headers whose lower-case name starts with prefix, as (that name, value)."""
        chosen = list(map(operator.methodcaller("startswith", prefix), self.names))
        return list(zip(itertools.compress(self.names, chosen),
                        itertools.compress(map(SECOND, self.pairs), chosen)))

    def without(self, names: frozenset[str]) -> list[tuple[str, str]]:
        """Return the headers but those whose lower-case name is in names."""
        return list(itertools.compress(self.pairs, map(operator.not_,
                                                       map(names.__contains__, self.names))))


#: Limits on a header block, as http.server and http.client have them.
MAX_HEADER_LINES = 100
MAX_HEADER_LINE_BYTES = 65536


def head_end(data: bytes, start: int = 0) -> int:
    """Return where the header block ends (just past its blank line) in data, or -1."""
    crlf, lf = data.find(b"\n\r\n", start), data.find(b"\n\n", start)
    if crlf < 0 or 0 <= lf < crlf:
        return lf + 2 if lf >= 0 else -1
    return crlf + 3


def read_header_block(stream: Any) -> Headers:
    """Read header lines up to the blank line; raise LineTooLong past the limits.

    A block the stream has buffered whole, as an answer's head usually is, is taken in one
    read and split at once rather than read a line per call.
    """
    buffered = stream.peek()
    end = head_end(buffered) if buffered[:1] not in (b"\r", b"\n") else -1
    if end >= 0:
        text = stream.read(end).decode("iso-8859-1")
        lines = text.split("\n")[:-2]
        if len(lines) > MAX_HEADER_LINES:
            raise http.client.LineTooLong("header line")
        if "\n " not in text and "\n\t" not in text:  # nothing folded: every line a header
            parts = list(map(str.partition, lines, itertools.repeat(":")))
            return Headers(list(zip(map(str.strip, map(FIRST, parts)),
                                    map(str.strip, map(THIRD, parts)))))
    else:
        lines = []
        while True:
            line = stream.readline(MAX_HEADER_LINE_BYTES + 1)
            if line in (b"\r\n", b"\n", b""):
                break
            if len(line) > MAX_HEADER_LINE_BYTES or len(lines) >= MAX_HEADER_LINES:
                raise http.client.LineTooLong("header line")
            lines.append(line.decode("iso-8859-1"))
    pairs: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and pairs:
            name, value = pairs[-1]
            pairs[-1] = (name, value + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        pairs.append((name.strip(), value.strip()))
    return Headers(pairs)


#: A chunk size line: hexadecimal digits only (int() would also take "-1" or "0x10").
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: The most of a cut chunk that is padded so that an error event can follow it.
MAX_CHUNK_PADDING = 64 * 1024
#: The longest chunk size line (with extensions) or trailer line of a relayed body.
MAX_CHUNK_LINE_BYTES = 4096
#: The largest trailer section of a request body.
MAX_TRAILER_BYTES = 16 * 1024


class ChunkedFraming:
    """Follow the framing of a chunked body as it passes, so it can be relayed as it came.

    feed() takes the bytes read and returns what may go to the client now and the payload in
    them. A line not yet whole (a size line, the end of a chunk) waits until it is, so the
    client only ever gets whole framing; the last chunk and the trailers go out together once
    complete, so that until then an error event can still be added.
    """

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)

    def __init__(self) -> None:
        self.state = self.SIZE
        #: Payload bytes still to come in the current chunk.
        self.left = 0
        #: The start of a line not yet whole; the last chunk and trailers read so far.
        self.partial = self.unsent = b""
        #: The upstream sent bytes after the body's end: the connection must not be reused.
        self.extra = False
        #: What is wrong with the framing, once something is; nothing after it is forwarded.
        self.broken: str | None = None

    @property
    def done(self) -> bool:
        return self.state == self.DONE

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Take the next bytes read; return (the bytes to forward now, the payload in them).

        Broken framing sets `broken`; what came before it is still returned.
        """
        buffer = self.partial + data if self.partial else data
        position, end = 0, len(buffer)
        hold_from = 0 if self.state == self.TRAILER else None
        payload = []
        while position < end:
            if self.state == self.DATA:
                take = min(self.left, end - position)
                payload.append(buffer[position:position + take])
                position += take
                self.left -= take
                if not self.left:
                    self.state = self.DATA_END
                continue
            if self.state == self.DONE:
                self.extra = True
                break
            newline = buffer.find(b"\n", position, position + MAX_CHUNK_LINE_BYTES)
            if newline < 0:
                if end - position >= MAX_CHUNK_LINE_BYTES:
                    self.broken = "a chunk line too long"
                break
            line_start, position = position, newline + 1
            line = buffer[line_start:position]
            if self.state == self.DATA_END:
                if line not in (b"\r\n", b"\n"):
                    self.broken, position = "chunk data longer than its size", line_start
                    break
                self.state = self.SIZE
            elif self.state == self.SIZE:
                digits = line.split(b";", 1)[0].strip()
                if not CHUNK_SIZE.fullmatch(digits):
                    self.broken, position = "a chunk size that is not one", line_start
                    break
                self.left = int(digits, 16)
                if self.left:
                    self.state = self.DATA
                else:
                    self.state, hold_from = self.TRAILER, line_start
            elif line in (b"\r\n", b"\n"):
                self.state = self.DONE
        self.partial = b"" if self.extra else buffer[position:]
        if self.state == self.TRAILER:
            self.unsent += buffer[hold_from:position]
            forward = buffer[:hold_from]
        elif hold_from is not None:
            forward, self.unsent = self.unsent + buffer[:position], b""
        else:
            forward = buffer[:position]
        return forward, b"".join(payload)

    def close_chunk(self) -> bytes | None:
        """Return what ends a chunk the client got part of: newlines for the rest, and CRLF;
        None when too much of it is missing to pad (the client then sees a cut)."""
        if self.state == self.DATA:
            return b"\n" * self.left + b"\r\n" if self.left <= MAX_CHUNK_PADDING else None
        if self.state == self.DATA_END:
            return b"\r\n"
        return b""


class UpstreamResponse(http.client.HTTPResponse):
    """http.client's response, with its headers read by read_header_block.

    Same framing rules as HTTPResponse.begin; only the email-package header parser, a large
    share of the proxy's time per request, is replaced.
    """

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            read_header_block(self.fp)
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = read_header_block(self.fp)
        self.chunked = (self.headers.get("transfer-encoding") or "").lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        length = self.headers.get("content-length")
        self.length = int(length) if length and length.isdigit() and not self.chunked else None
        if status in (204, 304) or status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


#: The checks http.client's putrequest and putheader make, made once per request head.
URL_CONTROL_CHARACTER = re.compile("[\x00-\x20\x7f]")
HEADER_NAME = re.compile(r"[^:\s][^:\r\n]*", re.ASCII)
BAD_HEADER_VALUE = re.compile(r"\n(?![ \t])|\r(?![ \t\n])")
#: HEADER_NAME for all the names of a head at once, each followed by a newline.
HEADER_NAMES = re.compile(r"(?:[^:\s][^:\r\n]*\n)*", re.ASCII)


class ClosesItsResponse:
    """Mixin: closing a connection also closes the response being read from it.

    http.client's getresponse keeps this link; read_response, which replaces it, keeps it here.
    """

    response: http.client.HTTPResponse | None = None

    def close(self) -> None:
        super().close()
        response, self.response = self.response, None
        if response is not None:
            response.close()


#: Whether the kernel can time out a socket's reads and writes (SO_RCVTIMEO takes a timeval
#: here; Windows takes milliseconds, and keeps Python's timeouts).
KERNEL_TIMEOUTS = sys.platform != "win32" and hasattr(socket, "SO_RCVTIMEO")


class KernelTimedSocket(socket.socket):
    """A plain TCP socket whose reads and writes the kernel times out (SO_RCVTIMEO/SNDTIMEO).

    With Python's own timeout every recv and send is preceded by a poll(): two system calls,
    and two hand-overs of the GIL between busy threads, where one does. settimeout() keeps
    its meaning: a read or write that waits longer raises socket.timeout as before; a
    sendall is timed per write that makes no progress rather than as a whole. settimeout(0)
    (non-blocking) is Python's own.
    """

    __slots__ = ("kernel_timeout",)

    @classmethod
    def adopt(cls, sock: socket.socket, timeout: float | None) -> socket.socket:
        """Return sock as one of these (the same connection) with this timeout; a TLS or
        non-TCP socket, or one on Windows, is returned as it is."""
        if not KERNEL_TIMEOUTS or type(sock) is not socket.socket or \
                sock.type != socket.SOCK_STREAM:
            return sock
        adopted = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        adopted.kernel_timeout = None
        adopted.settimeout(timeout)
        return adopted

    def settimeout(self, timeout: float | None) -> None:
        if timeout == 0:
            self.kernel_timeout = None
            super().settimeout(0.0)
            return
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        whole = 0.0 if timeout is None else max(timeout, 1e-6)
        timeval = struct.pack("@ll", int(whole), int(whole % 1 * 1_000_000))
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        super().settimeout(None)
        self.kernel_timeout = timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def gettimeout(self) -> float | None:
        return self.kernel_timeout if super().gettimeout() is None else super().gettimeout()

    def timed_out(self, error: BlockingIOError, flags: int) -> OSError:
        """What a read or write that found nothing within the kernel's timeout raises (a call
        asked not to wait, MSG_DONTWAIT, gets its BlockingIOError)."""
        if self.kernel_timeout and super().gettimeout() is None and \
                not flags & getattr(socket, "MSG_DONTWAIT", 0):
            return socket.timeout("timed out")
        return error

    def recv(self, size: int, flags: int = 0) -> bytes:
        try:
            return super().recv(size, flags)
        except BlockingIOError as error:
            raise self.timed_out(error, flags) from None

    def recv_into(self, buffer: Any, size: int = 0, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, size, flags)
        except BlockingIOError as error:
            raise self.timed_out(error, flags) from None

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except BlockingIOError as error:
            raise self.timed_out(error, flags) from None

    def sendall(self, data: Any, flags: int = 0) -> None:
        try:
            super().sendall(data, flags)
        except BlockingIOError as error:
            raise self.timed_out(error, flags) from None


class UpstreamConnection(ClosesItsResponse, http.client.HTTPConnection):
    """A plain-HTTP upstream connection, timed out by the kernel (KernelTimedSocket)."""

    def connect(self) -> None:
        super().connect()
        self.sock = KernelTimedSocket.adopt(self.sock, self.timeout)


class UpstreamTLSConnection(ClosesItsResponse, http.client.HTTPSConnection):
    """An HTTPS upstream connection."""


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """Build an HTTP/1.1 request line and header block, refusing what http.client refuses.

    One string joined and encoded once, instead of http.client's putrequest and a putheader
    call per header, each encoding, checking and appending on its own.
    """
    match = URL_CONTROL_CHARACTER.search(target)
    if match:
        raise http.client.InvalidURL(f"URL can't contain control characters. {target!r} "
                                     f"(found at least {match.group()!r})")
    if not target.isascii():
        raise ValueError(f"URL can't contain non-ASCII characters: {target!r}")
    names = "\n".join(map(FIRST, headers)) + "\n" if headers else ""
    values = "".join(map(SECOND, headers))
    if not (names.isascii() and HEADER_NAMES.fullmatch(names)) or \
            names.count("\n") != len(headers) or "\r" in values or "\n" in values:
        # Something to look at closely (folded values pass): find what is wrong, if anything.
        for name, value in headers:
            if not (name.isascii() and HEADER_NAME.fullmatch(name)):
                raise ValueError(f"Invalid header name {name!r}")
            if BAD_HEADER_VALUE.search(value):
                raise ValueError(f"Invalid header value {value!r}")
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(map(": ".join, headers))
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


#: select.poll, which Windows lacks.
POLL = getattr(select, "poll", None)


def describe_network_error(error: BaseException, where: str, timeout: float) -> str:
    """Say in the guide's words (ECONNREFUSED, ETIMEDOUT) why a connection failed."""
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"ETIMEDOUT: {where} sent nothing for {timeout:g}s"
    if isinstance(error, ConnectionRefusedError):
        return f"ECONNREFUSED: {where} refused the connection"
    if isinstance(error, socket.gaierror):
        return f"ENOTFOUND: cannot resolve the host of {where}"
    if isinstance(error, (http.client.RemoteDisconnected, http.client.IncompleteRead,
                          ConnectionResetError, BrokenPipeError)):
        return f"ECONNRESET: {where} closed the connection"
    return f"Error forwarding request to {where}: {error.__class__.__name__}: {error}"


def connection_is_stale(connection: http.client.HTTPConnection) -> bool:
    """Tell whether an idle pooled connection was closed (or sent junk) by the other side.

    poll, where there is one: select refuses a descriptor numbered 1024 or more, so with a
    thousand streams open every pooled connection looked stale and was replaced.
    """
    try:
        if POLL is None:
            return bool(select.select([connection.sock], [], [], 0)[0])
        poller = POLL()
        poller.register(connection.sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


@dataclass(frozen=True)
class OutboundProxy:
    """An HTTP proxy that outbound connections tunnel through with CONNECT."""

    host: str
    port: int
    #: The Proxy-Authorization value, from credentials in the proxy URL.
    authorization: str | None
    #: The proxy's URL without credentials, for messages.
    display: str


def proxy_for(url: str, environ: Any = None) -> OutboundProxy | None:
    """Return the proxy HTTPS_PROXY / HTTP_PROXY name for a URL, unless NO_PROXY exempts it.

    Upper- and lower-case names both count, as curl and urllib read them.
    """
    environ = os.environ if environ is None else environ
    parts = urllib.parse.urlsplit(url)
    names = ("HTTPS_PROXY", "https_proxy") if parts.scheme == "https" else ("HTTP_PROXY",
                                                                            "http_proxy")
    proxy_url = next((environ[name] for name in names if environ.get(name)), "")
    if not proxy_url:
        return None
    no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    if no_proxy.strip() == "*":
        return None
    host = (parts.hostname or "").lower()
    for entry in no_proxy.split(","):
        suffix = entry.strip().lower().split(":")[0].lstrip("*").lstrip(".")
        if suffix and (host == suffix or host.endswith("." + suffix)):
            return None
    if "://" not in proxy_url:
        proxy_url = "http://" + proxy_url
    proxy = urllib.parse.urlsplit(proxy_url)
    authorization = None
    if proxy.username is not None:
        user = urllib.parse.unquote(proxy.username)
        pair = f"{user}:{urllib.parse.unquote(proxy.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    port = proxy.port or (443 if proxy.scheme == "https" else 80)
    return OutboundProxy(proxy.hostname or "", port, authorization,
                         f"{proxy.scheme}://{proxy.hostname}:{port}")


class Upstream:
    """Keep-alive connections to one origin, pooled and reused across requests.

    A handshake per request costs more than everything else the proxy does, so idle connections
    wait here for the next request; beyond `pool_size` idle ones, extras are closed.
    """

    def __init__(self, base_url: str, pool_size: int = UPSTREAM_POOL_SIZE,
                 context: ssl.SSLContext | None = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.base_url = base_url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.host_header = self.host if parts.port is None else f"{self.host}:{parts.port}"
        self.prefix = parts.path.rstrip("/")
        self.pool_size = pool_size
        self.idle: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()
        #: Connections opened so far (the debug log numbers them).
        self.opened = 0
        self.proxy = proxy_for(base_url)
        #: How failures name the far end: the upstream, and the proxy on the way if any.
        self.where = base_url + (f" via proxy {self.proxy.display}" if self.proxy else "")
        #: How https connections verify the far end; None: the system's trusted CAs.
        self.tls = {"context": context} if self.https and context is not None else {}
        #: The sockets of requests sent, for cut to end; and whether cut was called.
        self.lent: weakref.WeakSet = weakref.WeakSet()
        self.cut_off = False

    def new_connection(self) -> http.client.HTTPConnection:
        """Return an unconnected connection (through the proxy's tunnel, if there is one)."""
        kind = UpstreamTLSConnection if self.https else UpstreamConnection
        if self.proxy is None:
            return kind(self.host, self.port, timeout=CONNECT_TIMEOUT_S, **self.tls)
        connection = kind(self.proxy.host, self.proxy.port, timeout=CONNECT_TIMEOUT_S,
                          **self.tls)
        headers = {"Proxy-Authorization": self.proxy.authorization} if self.proxy.authorization \
            else None
        connection.set_tunnel(self.host, self.port, headers)
        return connection

    def connect(self, connection: http.client.HTTPConnection, timeout: float) -> None:
        """Open a new connection; a failure to reach (or tunnel through) a proxy names it."""
        try:
            connection.connect()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            # Python 3.9's http.client leaves a refused tunnel's answer open in its frame: let it
            # go now rather than whenever the collector finds it (an unclosed socket).
            traceback.clear_frames(error.__traceback__)
            if self.proxy is None:
                raise
            if "Tunnel connection failed" in str(error):
                raise UpstreamError(f"Proxy {self.proxy.display} refused to open a tunnel to "
                                    f"{self.host}:{self.port}: {str(error).split(': ', 1)[-1]}"
                                    ) from None
            if isinstance(error, (ConnectionRefusedError, socket.gaierror)) or \
                    "timed out" in str(error):
                raise UpstreamError("Proxy " + describe_network_error(
                    error, self.proxy.display, timeout)) from None
            raise
        self.opened += 1
        component_logger("Upstream").debug("Opened connection %d to %s", self.opened, self.where)

    def acquire(self) -> tuple[UpstreamConnection, bool]:
        """Return an idle connection that is still open, else a new one, and whether reused."""
        while True:
            with self.lock:  # the check below waits on the kernel: not with the lock held
                candidate = self.idle.pop() if self.idle else None
            if candidate is None:
                return self.new_connection(), False
            if time.monotonic() - candidate.released_at < TRUST_IDLE_S or \
                    not connection_is_stale(candidate):
                return candidate, True
            candidate.close()

    def release(self, connection: http.client.HTTPConnection,
                response: http.client.HTTPResponse) -> None:
        """Return a connection whose response was read to the end to the pool, else close it."""
        finished = response.isclosed() or response.length == 0
        response.close()
        if finished and not response.will_close and connection.sock is not None:
            connection.released_at = time.monotonic()
            with self.lock:
                if len(self.idle) < self.pool_size:
                    self.idle.append(connection)
                    return
        connection.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self.lock:
            idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()

    def lend(self, connection: http.client.HTTPConnection) -> None:
        """Note a connection about to carry a request, unless cut has ended this client."""
        with self.lock:
            if not self.cut_off:
                self.lent.add(connection.sock)
                return
        connection.close()
        raise UpstreamError(f"{self.where}: not sent, the server is shutting down", retry=False)

    def cut(self) -> None:
        """End every request in progress (its read fails at once) and send no more."""
        with self.lock:
            self.cut_off = True
            lent = list(self.lent)
        for sock in lent:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.close()

    def send(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
             timeout: float) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """Send one request and return the response (headers read, body not) and its connection.

        A pooled connection the upstream closed while it sat idle fails before any answer
        arrives; that request is sent once more, on a new connection. A pool of size 0 (the
        token endpoint's) never reuses a connection, so it never resends: a resent refresh
        would spend a refresh token twice.
        """
        connection, reused = self.acquire()
        for attempt in (1, 2):
            try:
                if connection.sock is None:
                    self.connect(connection, timeout)
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise UpstreamError(describe_network_error(error, self.where, timeout)) from None
            self.lend(connection)
            try:
                self.write_request(connection, method, target, headers, body, timeout)
                return self.read_response(connection, method), connection
            except (UnicodeError, ValueError) as error:
                connection.close()
                raise UpstreamError(f"Cannot send this request: a header value is not valid "
                                    f"HTTP ({error})", retry=False) from None
            except (ConnectionResetError, BrokenPipeError) as error:  # RemoteDisconnected too
                connection.close()
                if not (reused and attempt == 1):
                    raise UpstreamError(describe_network_error(error, self.where,
                                                               timeout)) from None
                connection, reused = self.new_connection(), False
            except (socket.timeout, TimeoutError) as error:
                # The upstream has the whole request and may be working on it: no resend.
                connection.close()
                raise UpstreamError(describe_network_error(error, self.where, timeout),
                                    retry=False) from None
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise UpstreamError(describe_network_error(error, self.where, timeout)) from None
        raise AssertionError("unreachable")

    def write_request(self, connection: http.client.HTTPConnection, method: str, target: str,
                      headers: list[tuple[str, str]], body: bytes, timeout: float) -> None:
        """Write the request line, headers and body: a small body in the same write.

        Two small writes in a row meet the peer's delayed ACK; one write also saves a system
        call.
        """
        sock = connection.sock
        if sock.gettimeout() != timeout:
            sock.settimeout(timeout)
        head = request_head(method, self.prefix + target, headers)
        if len(body) <= SMALL_BODY_BYTES:
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            sock.sendall(body)

    @staticmethod
    def read_response(connection: UpstreamConnection, method: str) -> http.client.HTTPResponse:
        """Read a response's status and headers, as HTTPConnection.getresponse does.

        The request went out through write_request, not http.client's request methods, so
        the response is read here too; a response that ends its connection takes it along.
        """
        response = UpstreamResponse(connection.sock, method=method)
        try:
            response.begin()
        except BaseException:
            response.close()
            raise
        if response.will_close:
            connection.close()
        else:
            connection.response = response
        return response


def finish_or_cut(thread: threading.Thread, client: Upstream, deadline: float) -> None:
    """Let a background thread's call to client end until deadline (time.monotonic()), then
    cut it short, so that shutdown waits on it no longer than on requests."""
    thread.join(max(0.0, deadline - time.monotonic()))
    client.cut()
    thread.join()


#: For forwardable_headers: a body read whole is sent with a length of its own.
CONTENT_LENGTH_NAME = frozenset({"content-length"})


def forwardable_headers(message: Headers, also: frozenset[str] = frozenset()
                        ) -> list[tuple[str, str]]:
    """Copy a message's end-to-end headers: hop-by-hop ones, those Connection names and the
    lower-case names `also` gives go."""
    named = {token.strip().lower()
             for value in message.get_all("Connection", []) for token in value.split(",")}
    return message.without(HOP_BY_HOP_HEADERS | named | also)


###############################################################################
# OAuth #######################################################################
###############################################################################

#: Where a person logs in, by `add --mode`, and the scopes asked for: as Claude Code does it.
OAUTH_AUTHORIZE_URLS = {"max": "https://claude.com/cai/oauth/authorize",
                        "console": "https://platform.claude.com/oauth/authorize"}
SUBSCRIPTION_SCOPES = ("user:profile user:inference user:sessions:claude_code user:mcp_servers "
                       "user:file_upload")
OAUTH_SCOPES = {"max": SUBSCRIPTION_SCOPES,
                "console": "org:create_api_key " + SUBSCRIPTION_SCOPES}
#: The beta flag that lets an OAuth access token call the Messages API.
OAUTH_BETA = "oauth-2025-04-20"
#: Console logins turn their OAuth token into an API key here, on the upstream.
CREATE_API_KEY_PATH = "/api/oauth/claude_cli/create_api_key"
#: A token with less time left than this is refreshed before it is used.
REFRESH_BEFORE_USE_MS = 5 * 60 * 1000
#: The background refresher renews tokens this long before they expire.
REFRESH_AHEAD_MS = 15 * 60 * 1000
#: After a transient refresh failure, wait this long, doubling up to the maximum.
REFRESH_RETRY_MS = 60 * 1000
REFRESH_RETRY_MAX_MS = 30 * 60 * 1000
#: Seconds the token endpoint gets to answer.
TOKEN_TIMEOUT_S = 30.0
#: Seconds a refreshed pair may wait for the database before it is kept in memory instead.
TOKEN_SAVE_WAIT_S = 0.5
#: How often the background refresher looks for tokens to renew.
REFRESHER_INTERVAL_S = 1.0


class TokenUnavailable(Exception):
    """An OAuth account has no usable access token right now; the request must go elsewhere."""


class TokenRejected(Exception):
    """The token endpoint refused the grant (400/401): the account needs a new login."""


class TokenEndpointDown(Exception):
    """The token endpoint failed in a way that may pass (network, 429, 5xx)."""


def base64url(data: bytes) -> str:
    """Encode bytes as base64url without padding, as PKCE wants."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class PkceLogin:
    """One login attempt: one PKCE pair and the ways back from the login page.

    Each authorize URL (the loopback callback, the page showing a code to paste) carries a
    random state of its own, so the state that comes back tells which URL was used, and with it
    the redirect_uri the token exchange must repeat.
    """

    mode: str
    verifier: str
    challenge: str
    #: state -> the redirect_uri of the authorize URL that carries it.
    redirects: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, mode: str) -> PkceLogin:
        verifier = base64url(secrets.token_bytes(32))
        challenge = base64url(hashlib.sha256(verifier.encode()).digest())
        return cls(mode, verifier, challenge)

    def authorize_url(self, client_id: str, redirect_uri: str) -> str:
        """Return a login URL that comes back to redirect_uri, with a state of its own."""
        state = base64url(secrets.token_bytes(32))
        self.redirects[state] = redirect_uri
        query = urllib.parse.urlencode({
            "code": "true", "client_id": client_id, "response_type": "code",
            "redirect_uri": redirect_uri, "scope": OAUTH_SCOPES[self.mode],
            "code_challenge": self.challenge, "code_challenge_method": "S256",
            "state": state}, quote_via=urllib.parse.quote)
        return f"{OAUTH_AUTHORIZE_URLS[self.mode]}?{query}"

    def code_from(self, pasted: str) -> tuple[str, str]:
        """Check a pasted `code#state` against this attempt; return the code and state."""
        code, separator, state = pasted.strip().partition("#")
        if not separator or not code or not state:
            raise ClaudeflareError(
                "The authorization code looks truncated: paste the whole value the page shows, "
                "in the form code#state, without changing it")
        if state not in self.redirects:
            raise ClaudeflareError(
                "State mismatch: the pasted code belongs to another login attempt: paste the "
                "code shown for this one")
        return code, state


#: What the browser shows once it has come back from the login page.
LOGIN_PAGE = string.Template("""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>claudeflare login</title></head><body style="font: 16px system-ui, sans-serif;
margin: 15vh auto; max-width: 36em; text-align: center"><h1>claudeflare</h1><p>$message</p>
</body></html>""")


class LoginCallback(http.server.BaseHTTPRequestHandler):
    """Takes the browser's return from the login page at /callback, and answers nothing else."""

    def do_GET(self) -> None:
        listener = self.server.listener
        path, _, query = self.path.partition("?")
        if path != "/callback":
            self.answer(404, "Nothing here.")
            return
        values = dict(urllib.parse.parse_qsl(query))
        state = values.get("state", "")
        if listener.login.redirects.get(state) != listener.redirect_uri:
            self.answer(400, "This sign-in does not belong to the login claudeflare is waiting "
                             "for. Open the URL the terminal shows.")
            return
        if values.get("error") or not values.get("code"):
            problem = values.get("error_description") or values.get("error") or "no code"
            listener.results.put(("refused", problem))
            self.answer(400, "The login did not go through. See the terminal.")
            return
        listener.waiting = True
        listener.results.put(("callback", (values["code"], state)))
        # The page says how the login ended, once the code was traded for tokens (or not).
        listener.ended.wait(2 * TOKEN_TIMEOUT_S + 5)
        served, message = listener.outcome
        self.answer(200 if served else 400, message)
        listener.answered.set()

    def answer(self, status: int, message: str) -> None:
        page = LOGIN_PAGE.substitute(message=html.escape(message)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the terminal belongs to the login's own messages


class LoginListener:
    """Listens on a free loopback port for the browser coming back from the login page, as
    Claude Code does, so that nobody has to paste a code."""

    def __init__(self, login: PkceLogin, results: queue.Queue) -> None:
        self.login = login
        self.results = results
        #: A browser waits at /callback for how the login ended: (logged in, what to say).
        self.waiting = False
        self.outcome = (False, "The login did not finish. See the terminal.")
        self.ended, self.answered = threading.Event(), threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoginCallback)
        self.server.daemon_threads = True
        self.server.listener = self
        self.redirect_uri = f"http://localhost:{self.server.server_address[1]}/callback"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,),
                                       name="claudeflare-login", daemon=True)
        self.thread.start()

    def finish(self, served: bool, message: str) -> None:
        """Tell a browser waiting at /callback how the login ended, and let it have the page."""
        if not self.ended.is_set():
            self.outcome = (served, message)
            self.ended.set()
        if self.waiting:
            self.answered.wait(5)

    def close(self) -> None:
        self.finish(False, "The login did not finish. See the terminal.")
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@dataclass
class Tokens:
    """What the token endpoint hands out."""

    access_token: str
    refresh_token: str | None
    expires_at: int
    email: str | None = None
    organization: str | None = None
    #: How long the access token lives from when it was issued, in ms.
    lifetime_ms: int = 3_600_000


def split_url(url: str) -> tuple[str, str]:
    """Split a URL into its origin and its path with query."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path or "/"
    return f"{parts.scheme}://{parts.netloc}", target + (f"?{parts.query}" if parts.query else "")


def json_call(client: Upstream, path: str, payload: dict,
              headers: Iterable[tuple[str, str]] = ()) -> tuple[int, str, dict]:
    """POST a JSON body and return the status, reason and decoded JSON answer ({} if none)."""
    body = json_bytes(payload)
    response, connection = client.send(
        "POST", path, [("Host", client.host_header), ("Content-Type", "application/json"),
                       ("Accept", "application/json"), ("Content-Length", str(len(body))),
                       *headers], body, TOKEN_TIMEOUT_S)
    try:
        data = response.read()
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        raise UpstreamError(describe_network_error(error, client.base_url,
                                                   TOKEN_TIMEOUT_S)) from None
    client.release(connection, response)
    try:
        answer = json.loads(data) if data else {}
    except JSON_ERRORS:
        answer = {}
    return response.status, response.reason, answer if isinstance(answer, dict) else {}


def describe_oauth_failure(status: int, reason: str, answer: dict) -> str:
    """Say why the token endpoint refused, in its own words where it gave any."""
    error = answer.get("error")
    code = error if isinstance(error, str) else None
    detail = answer.get("error_description") or (
        error.get("message") if isinstance(error, dict) else None)
    text = reason or http.client.responses.get(status, str(status))
    if detail and code:
        return f"{text}: {detail} ({code})"
    return f"{text}: {detail or code}" if detail or code else text


def tokens_from(answer: dict, previous_refresh_token: str | None = None) -> Tokens:
    """Read a token response; a response without a new refresh token keeps the old one."""
    access_token = answer.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise TokenEndpointDown("the token endpoint answered without an access_token")
    expires_in = answer.get("expires_in")
    lifetime_ms = (int(expires_in * 1000) if type(expires_in) in (int, float)
                   and 0 < expires_in <= 366 * DAY_S else 3_600_000)
    account, organization = answer.get("account") or {}, answer.get("organization") or {}
    return Tokens(access_token, answer.get("refresh_token") or previous_refresh_token,
                  now_ms() + lifetime_ms,
                  account.get("email_address") if isinstance(account, dict) else None,
                  organization.get("name") if isinstance(organization, dict) else None,
                  lifetime_ms)


class OAuthClient:
    """Talks to the OAuth token endpoint (and mints console API keys on the upstream)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        origin, self.token_path = split_url(settings.oauth_token_url)
        self.http = Upstream(origin, pool_size=0)

    def exchange(self, login: PkceLogin, code: str, state: str) -> Tokens:
        """Trade an authorization code for tokens; failures say what to do.

        The redirect_uri sent is the one of the authorize URL the code came back through.
        """
        try:
            status, reason, answer = json_call(self.http, self.token_path, {
                "grant_type": "authorization_code", "code": code, "state": state,
                "client_id": self.settings.client_id, "redirect_uri": login.redirects[state],
                "code_verifier": login.verifier})
        except UpstreamError as error:
            raise ClaudeflareError(f"Exchange failed: {error}. Check the network (and "
                                   f"oauth_token_url), then start the login again.") from None
        if status != 200:
            raise ClaudeflareError(
                f"Exchange failed: {describe_oauth_failure(status, reason, answer)}. Paste the "
                f"whole code (code#state) from this login attempt within a few minutes, or "
                f"start the login again.")
        try:
            return tokens_from(answer)
        except TokenEndpointDown as error:
            raise ClaudeflareError(f"Exchange failed: {error}") from None

    def refresh(self, refresh_token: str) -> Tokens:
        """Trade a refresh token for a new pair; the old refresh token dies on success.

        Claude Code asks for its scopes again; an account logged in for fewer (by an older
        claudeflare) is refused them with invalid_scope, which spends nothing: it then asks
        for what it was granted.
        """
        payload = {"grant_type": "refresh_token", "refresh_token": refresh_token,
                   "client_id": self.settings.client_id, "scope": SUBSCRIPTION_SCOPES}
        try:
            status, reason, answer = json_call(self.http, self.token_path, payload)
            if status == 400 and answer.get("error") == "invalid_scope":
                del payload["scope"]
                status, reason, answer = json_call(self.http, self.token_path, payload)
        except UpstreamError as error:
            raise TokenEndpointDown(str(error)) from None
        if status in (400, 401):
            raise TokenRejected(describe_oauth_failure(status, reason, answer))
        if status != 200:
            raise TokenEndpointDown(describe_oauth_failure(status, reason, answer))
        return tokens_from(answer, refresh_token)

    def create_api_key(self, access_token: str) -> str:
        """Mint an API key with a console login's token."""
        origin, prefix = split_url(self.settings.upstream_url)
        client = Upstream(origin)
        try:
            status, reason, answer = json_call(
                client, prefix.rstrip("/") + CREATE_API_KEY_PATH, {},
                [("Authorization", f"Bearer {access_token}")])
        except UpstreamError as error:
            raise ClaudeflareError(f"Could not create an API key: {error}") from None
        finally:
            client.close()
        key = answer.get("raw_key")
        if status != 200 or not isinstance(key, str) or not key:
            raise ClaudeflareError(
                f"Could not create an API key: {describe_oauth_failure(status, reason, answer)}. "
                f"Does this console account have permission to create keys?")
        return key

    def close(self) -> None:
        self.http.close()


class SingleFlight:
    """Run at most one call per key at a time; callers arriving meanwhile share its result."""

    class Call:
        def __init__(self) -> None:
            self.done = threading.Event()
            self.result: Any = None
            self.error: BaseException | None = None

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[Any, SingleFlight.Call] = {}

    def run(self, key: Any, function: Callable[[], Any]) -> Any:
        """Run function for key, or wait for the call already running for key and share it."""
        with self.lock:
            call = self.calls.get(key)
            leader = call is None
            if leader:
                call = self.calls[key] = self.Call()
        if not leader:
            call.done.wait()
            if call.error is not None:
                raise call.error
            return call.result
        try:
            call.result = function()
        except BaseException as error:
            call.error = error
            raise
        finally:
            with self.lock:
                del self.calls[key]
            call.done.set()
        return call.result


class TokenKeeper:
    """Keeps OAuth access tokens fresh without ever losing a refresh token.

    Refresh tokens rotate: a refresh kills the old one. So each account has at most one refresh
    in flight (SingleFlight); the refresh re-reads the account first and does nothing if someone
    already refreshed it; and the new pair is committed to the database before the new access
    token is handed to anyone.
    """

    def __init__(self, store: Store, oauth: OAuthClient,
                 mark: Callable[..., None]) -> None:
        self.store = store
        self.oauth = oauth
        #: Stores a routing mark on an account without making the caller wait (App.mark).
        self.mark = mark
        self.flights = SingleFlight()
        self.lock = threading.Lock()
        #: account id -> (no refresh before this time, the next wait), after transient failures.
        self.backoff: dict[int, tuple[int, int]] = {}
        #: account name -> tokens the database refused to store; used and retried until saved.
        self.unsaved: dict[str, Tokens] = {}
        #: account id -> how long its current access token lives (known once refreshed here).
        self.lifetimes: dict[int, int] = {}
        #: account name -> (when refreshing began to fail transiently, the last error, and
        #: the expiry of the token then held: a new login makes the entry stale).
        self.refresh_failures: dict[str, tuple[int, str, int | None]] = {}
        #: Where pairs the database would not take are kept over a restart.
        self.kept_path = store.path + ".unsaved-tokens"
        self.log = component_logger("OAuth")

    def with_unsaved(self, account: Account) -> Account:
        """Return the account with any refreshed tokens that are not in the database yet."""
        with self.lock:
            tokens = self.unsaved.get(account.name)
        if tokens is None:
            return account
        return dataclasses.replace(account, access_token=tokens.access_token,
                                   refresh_token=tokens.refresh_token,
                                   expires_at=tokens.expires_at)

    def margin(self, account: Account, standard_ms: int) -> int:
        """Return how early to renew a token: standard_ms, or half the life of a short one.

        A token that lives 10 minutes is always within 15 minutes of expiry; renewing it at
        half its life renews it once per lifetime instead of on every look.
        """
        with self.lock:
            lifetime = self.lifetimes.get(account.id)
        return standard_ms if lifetime is None else min(standard_ms, lifetime // 2)

    def save(self, account: Account, tokens: Tokens,
             wait_s: float = TOKEN_SAVE_WAIT_S) -> Account:
        """Commit a new token pair before anyone uses it, if the database lets us at once.

        Should the database refuse or keep us waiting (locked by another process, disk full),
        the pair is the only live one: keep it in memory, use it, and retry saving in the
        background, rather than lose the account or hold up the request.
        """
        try:
            updated = self.store.update_account(
                account.name, wait_s=wait_s, access_token=tokens.access_token,
                refresh_token=tokens.refresh_token, expires_at=tokens.expires_at)
        except NotFound:
            raise TokenUnavailable(f"Account {account.name} was removed") from None
        except sqlite3.Error as error:
            with self.lock:
                first = account.name not in self.unsaved
                self.unsaved[account.name] = tokens
            if first:
                self.log.error("Could not save the refreshed token of account %s: %s; keeping "
                               "it in memory and retrying", account.name, error)
            return self.with_unsaved(account)
        with self.lock:
            if self.unsaved.pop(account.name, None) is not None:
                self.log.info("Saved the refreshed token of account %s", account.name)
        return updated

    def save_unsaved(self, wait_s: float = TOKEN_SAVE_WAIT_S) -> None:
        """Retry saving tokens the database refused earlier.

        Each save runs as the account's single flight, so no refresh can rotate the pair while
        it is written (a save joining a refresh in flight leaves the saving to that refresh).
        Once all are saved, a file of pairs a previous run could not save is removed.
        """
        with self.lock:
            pending = list(self.unsaved.items())
        for name, tokens in pending:
            try:
                account = self.store.account(name)
            except ClaudeflareError:
                with self.lock:
                    self.unsaved.pop(name, None)
                continue
            with contextlib.suppress(TokenUnavailable):
                self.flights.run(account.id,
                                 lambda: self.save_if_unsaved(account, tokens, wait_s))
        if not self.unsaved and os.path.exists(self.kept_path):
            with contextlib.suppress(OSError):
                os.unlink(self.kept_path)

    def save_if_unsaved(self, account: Account, tokens: Tokens, wait_s: float) -> Account:
        """Save a pair unless a newer one replaced it meanwhile."""
        with self.lock:
            if self.unsaved.get(account.name) is not tokens:
                return account
        return self.save(account, tokens, wait_s)

    def keep_unsaved(self) -> None:
        """At shutdown: save what the database refused so far, or keep it in a private file.

        Refresh tokens rotate, so such a pair is the account's only live one: losing it would
        mean logging in again. The next start reads the file and saves the pairs.
        """
        self.save_unsaved(BUSY_TIMEOUT_S)
        with self.lock:
            pending = dict(self.unsaved)
        if not pending:
            return
        kept = {}
        for name, tokens in pending.items():
            with contextlib.suppress(ClaudeflareError, sqlite3.Error):
                kept[name] = {"access_token": tokens.access_token,
                              "refresh_token": tokens.refresh_token,
                              "expires_at": tokens.expires_at,
                              "replaces": self.store.account(name).refresh_token}
        try:
            write_private_file(self.kept_path, json.dumps(kept))
        except OSError as error:
            self.log.error("Could not save nor keep the refreshed tokens of %s (%s): log them "
                           "in again with reauth", ", ".join(kept), error)
            return
        self.log.error("Could not save the refreshed tokens of %s: kept them in %s; the next "
                       "start saves them", ", ".join(kept), self.kept_path)

    def load_kept(self) -> None:
        """Take up the pairs a previous run kept aside, unless the account changed since."""
        try:
            with open(self.kept_path, encoding="utf-8") as source:
                kept = json.load(source)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            self.log.error("Cannot read kept tokens %s: %s", self.kept_path, error)
            return
        for name, pair in (kept.items() if isinstance(kept, dict) else ()):
            with contextlib.suppress(ClaudeflareError, sqlite3.Error, KeyError, TypeError):
                if self.store.account(name).refresh_token == pair["replaces"]:
                    with self.lock:
                        self.unsaved[name] = Tokens(pair["access_token"],
                                                    pair["refresh_token"], pair["expires_at"])
        self.save_unsaved()

    def fresh(self, account: Account, now: int) -> Account:
        """Return the account with an access token valid for 5 more minutes, refreshing if due."""
        if account.type != "oauth":
            return account
        account = self.with_unsaved(account)
        if account.token_valid(now, self.margin(account, REFRESH_BEFORE_USE_MS)):
            return account
        return self.refresh(account, now)

    def refresh(self, account: Account, now: int) -> Account:
        """Refresh an account's token (the one it holds is stale or was refused).

        Raise TokenUnavailable when no valid token can be had now.
        """
        token_valid = account.token_valid(now)
        if not account.refresh_token:
            if token_valid:
                return account
            raise TokenUnavailable(f"Token expired or missing for account: {account.name}")
        with self.lock:
            retry_at = self.backoff.get(account.id, (0, 0))[0]
        if retry_at > now:
            if token_valid:
                return account
            raise TokenUnavailable(
                f"Token expired or missing for account: {account.name} (refresh failing; next "
                f"try at {iso_time(retry_at)})")
        return self.flights.run(account.id, lambda: self.refresh_stored(account, now))

    def refresh_stored(self, seen: Account, now: int) -> Account:
        """Refresh the stored account unless its token changed since `seen` was read."""
        try:
            account = self.with_unsaved(self.store.account(seen.name))
        except ClaudeflareError:
            raise TokenUnavailable(f"Account {seen.name} was removed") from None
        if account.access_token != seen.access_token and account.token_valid(now):
            return account
        if account.needs_reauth:
            raise TokenUnavailable(f"Account {account.name} needs a new login: "
                                   f"{account.reauth_reason}")
        try:
            tokens = self.oauth.refresh(account.refresh_token or "")
        except TokenRejected as error:
            self.log.error("Failed to refresh token for account %s: %s", account.name, error)
            self.mark(account, needs_reauth=1,
                      reauth_reason=redact(f"refresh refused: {error}")[:300])
            raise TokenUnavailable(f"Failed to refresh token for account {account.name}: "
                                   f"{error}. Log in again: reauth {account.name}") from None
        except TokenEndpointDown as error:
            wait = self.note_transient_failure(account.id, now)
            with self.lock:
                since = self.refresh_failures.get(account.name, (now,))[0]
                self.refresh_failures[account.name] = (since, str(error), account.expires_at)
            self.log.warning("Failed to refresh token for account %s: %s (next try in %ds)",
                             account.name, error, wait // 1000)
            if account.token_valid(now):
                return account
            raise TokenUnavailable(f"Token expired or missing for account: {account.name} "
                                   f"(refresh failed: {error})") from None
        with self.lock:
            self.lifetimes[account.id] = tokens.lifetime_ms
        updated = self.save(account, tokens)
        with self.lock:
            self.backoff.pop(account.id, None)
            self.refresh_failures.pop(account.name, None)
        self.log.info("Refreshed token for account %s (valid until %s)", account.name,
                      iso_time(tokens.expires_at))
        return updated

    def note_transient_failure(self, account_id: int, now: int) -> int:
        """Back off after a transient failure: 60 s, then twice as long each time, to 30 min."""
        with self.lock:
            wait = min(self.backoff.get(account_id, (0, REFRESH_RETRY_MS // 2))[1] * 2,
                       REFRESH_RETRY_MAX_MS)
            self.backoff[account_id] = (now + wait, wait)
        return wait

    def due(self, account: Account, now: int) -> bool:
        """Tell whether the background refresher should renew this account's token now."""
        with self.lock:
            retry_at = self.backoff.get(account.id, (0, 0))[0]
        return (account.type == "oauth" and bool(account.refresh_token)
                and not account.needs_reauth and retry_at <= now
                and (account.expires_at or 0) - now < self.margin(account, REFRESH_AHEAD_MS))


class BackgroundRefresher:
    """A thread that renews tokens 15 minutes before they expire, so requests rarely wait."""

    def __init__(self, keeper: TokenKeeper, accounts: Callable[[], list[Account]]) -> None:
        self.keeper = keeper
        self.accounts = accounts
        #: Accounts already reported as expired, so the log says it once, not every second.
        self.reported_expired: set[str] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="claudeflare-refresher",
                                       daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(REFRESHER_INTERVAL_S):
            survive("OAuth", self.keeper.save_unsaved)
            survive("OAuth", lambda: self.renew_due(now_ms()))

    def renew_due(self, now: int) -> None:
        """Refresh every account whose token expires within REFRESH_AHEAD_MS."""
        for account in self.accounts():
            account = self.keeper.with_unsaved(account)
            if account.status(now) != "expired":
                self.reported_expired.discard(account.name)
            elif account.name not in self.reported_expired:
                self.reported_expired.add(account.name)
                self.keeper.log.error("Token expired or missing for account: %s. Log in again: "
                                      "reauth %s", account.name, account.name)
            if self.keeper.due(account, now) and not self.stopping.is_set():
                try:
                    self.keeper.refresh(account, now)
                except TokenUnavailable:
                    pass  # already logged by the keeper, and shown on the account

    def close(self, deadline: float) -> None:
        """Stop; a refresh still running at deadline is cut short and keeps the old pair."""
        self.stopping.set()
        finish_or_cut(self.thread, self.keeper.oauth.http, deadline)


###############################################################################
# Rate limits #################################################################
###############################################################################

#: Unified statuses that stop an account until its window resets.
HARD_LIMIT_STATUSES = frozenset({"rejected", "rate_limited", "blocked", "queueing_hard",
                                 "payment_required"})
#: Unified statuses that still serve, but say the account is close: prefer others.
SOFT_LIMIT_STATUSES = frozenset({"allowed_warning", "queueing_soft"})
#: Extra-usage (overage) statuses under which a spent account still serves, billed.
OVERAGE_SERVING_STATUSES = frozenset({"allowed", "allowed_warning"})
#: A rate-limit mark never lasts longer than this, whatever a header says.
MAX_RATE_LIMIT_MS = 8 * 24 * 3600 * 1000
#: A hard limit without any reset time benches the account this long.
DEFAULT_RATE_LIMIT_MS = 60 * 1000
#: A 429 that names no window: a short cooldown, doubling while it repeats, up to the maximum.
COOLDOWN_MS = 30 * 1000
MAX_COOLDOWN_MS = 5 * 60 * 1000
RATE_LIMIT_PREFIX = "anthropic-ratelimit-"
UNIFIED_PREFIX = "anthropic-ratelimit-unified-"
#: API-key accounts' limit families: anthropic-ratelimit-<family>-{limit,remaining,reset}.
API_LIMIT_FAMILIES = ("requests", "tokens", "input-tokens", "output-tokens")


@dataclass
class RateLimit:
    """What one response's headers say about its account's limits; times in epoch ms."""

    status: str | None = None
    reset: int | None = None
    claim: str | None = None
    status_5h: str | None = None
    reset_5h: int | None = None
    utilization_5h: float | None = None
    status_7d: str | None = None
    reset_7d: int | None = None
    utilization_7d: float | None = None
    retry_after_ms: int | None = None
    should_retry: bool | None = None
    #: When an API-key limit at zero (anthropic-ratelimit-*-remaining: 0) resets.
    exhausted_reset: int | None = None
    #: Extra usage: whether it serves (allowed, allowed_warning) or not (rejected), whether
    #: this answer was billed to it, why it is off, and when its monthly allowance resets.
    overage_status: str | None = None
    overage_in_use: bool | None = None
    overage_disabled_reason: str | None = None
    overage_reset: int | None = None
    #: Per-model weekly windows (anthropic-ratelimit-unified-7d_<family>-*), by the name the
    #: usage endpoint gives them (seven_day_sonnet): {"status", "utilization", "resetsAt"}.
    families: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def family_only(self) -> bool:
        """Whether only a per-model window is refused: the account serves other models."""
        return (any(window.get("status") in HARD_LIMIT_STATUSES
                    for window in self.families.values())
                and not {self.status_5h, self.status_7d} & HARD_LIMIT_STATUSES
                and self.exhausted_reset is None)

    @property
    def on_overage(self) -> bool:
        """Whether the answer was served on extra usage, billed to the account's owner.

        As Claude Code reads it: a window refused, and extra usage allowed.
        """
        return bool(self.overage_in_use) or (
            self.hard and self.overage_status in OVERAGE_SERVING_STATUSES)

    def extra_usage(self) -> tuple[bool | None, str | None]:
        """Return whether extra usage is on for the account (None: the headers do not say) and,
        if it is off, why."""
        if self.overage_disabled_reason:
            return False, self.overage_disabled_reason
        if self.overage_status in OVERAGE_SERVING_STATUSES or self.overage_in_use:
            return True, None
        return None, None

    @property
    def hard(self) -> bool:
        """Whether the account is (or a window of it is) refused until a reset; a refused
        per-model window alone refuses only that model family (family_only)."""
        return (bool({self.status_5h, self.status_7d} & HARD_LIMIT_STATUSES)
                or self.status in HARD_LIMIT_STATUSES and not self.family_only)

    def window_reset(self) -> int | None:
        """Return when the exhausted window resets: the latest refused unified window, else
        the unified reset if the aggregate is refused, else an API-key limit at zero."""
        resets = [reset for status, reset in ((self.status_5h, self.reset_5h),
                                              (self.status_7d, self.reset_7d))
                  if status in HARD_LIMIT_STATUSES and reset]
        if resets:
            return max(resets)
        if self.hard and self.status in HARD_LIMIT_STATUSES and self.reset:
            return self.reset
        return self.exhausted_reset

    def summary(self) -> tuple[str | None, int | None]:
        """Return the account's status and reset to show: the aggregate, else a window's."""
        status = (None if self.family_only else self.status) or self.status_5h or self.status_7d
        return status, self.window_reset() or self.reset or self.reset_5h or self.reset_7d

    def names_window(self) -> bool:
        """Whether the headers say which limit was hit (so the bench lasts until its reset)."""
        return self.hard or self.window_reset() is not None

    def limited_until(self, now: int) -> int:
        """Return when a hard-limited account may be used again, capped at 8 days."""
        until = self.window_reset()
        if not until or until <= now:
            until = now + (self.retry_after_ms or DEFAULT_RATE_LIMIT_MS)
        return min(until, now + MAX_RATE_LIMIT_MS)


#: A time or a wait from a header is believed up to this (ms): year 2100, and a year. Past
#: them, numbers such as 1e20 or inf would overflow where they are stored or waited on.
LATEST_EPOCH_MS = 4_102_444_800_000
LONGEST_WAIT_MS = 366 * DAY_S * 1000


def parse_number(value: str) -> float | None:
    """Read a finite number, or None."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_epoch(value: str) -> int | None:
    """Read a reset time: epoch seconds (unified headers) or RFC 3339 (API-key headers)."""
    value = value.strip()
    seconds = parse_number(value)
    if seconds is None:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        seconds = moment.timestamp()
    return int(seconds * 1000) if 0 < seconds * 1000 < LATEST_EPOCH_MS else None


def parse_retry_after(headers: Any, now: int) -> int | None:
    """Return the wait the upstream asks for in ms: retry-after-ms, else retry-after."""
    milliseconds = parse_number(headers.get("retry-after-ms") or "")
    if milliseconds is None:
        value = headers.get("retry-after")
        if not value:
            return None
        seconds = parse_number(value)
        if seconds is not None:
            milliseconds = seconds * 1000
        else:
            try:
                milliseconds = email.utils.parsedate_to_datetime(value).timestamp() * 1000 - now
            except (TypeError, ValueError, OverflowError):
                return None
    return int(min(max(0.0, milliseconds), LONGEST_WAIT_MS))


def parse_float(value: str | None) -> float | None:
    """Read a utilization, or None when it is not a number."""
    return parse_number(value) if value is not None else None


def parse_status(value: str) -> str:
    """Read a window status: allowed, allowed_warning, rejected, ..."""
    return value.strip().lower()


#: anthropic-ratelimit-unified-<suffix> -> the RateLimit field it fills, and how to read it.
UNIFIED_HEADERS = {
    "status": ("status", parse_status), "reset": ("reset", parse_epoch),
    "representative-claim": ("claim", str.strip),
    "5h-status": ("status_5h", parse_status), "5h-reset": ("reset_5h", parse_epoch),
    "5h-utilization": ("utilization_5h", parse_float),
    "7d-status": ("status_7d", parse_status), "7d-reset": ("reset_7d", parse_epoch),
    "7d-utilization": ("utilization_7d", parse_float),
    "overage-status": ("overage_status", parse_status),
    "overage-in-use": ("overage_in_use", lambda value: value.strip().lower() == "true"),
    "overage-disabled-reason": ("overage_disabled_reason", lambda value: value.strip()[:100]),
    "overage-reset": ("overage_reset", parse_epoch),
}


#: anthropic-ratelimit-unified-7d_<family>-<field>: a per-model weekly window.
FAMILY_HEADER = re.compile(r"7d_([a-z0-9]{1,40})-(status|utilization|reset)")
#: A per-model window's field -> its key in model_windows, and how to read it.
FAMILY_FIELDS = {"status": ("status", parse_status), "utilization": ("utilization", parse_float),
                 "reset": ("resetsAt", parse_epoch)}


def parse_rate_limit(headers: Any, now: int) -> RateLimit:
    """Read every anthropic-ratelimit-* header (and retry-after) of a response."""
    limit = RateLimit(retry_after_ms=parse_retry_after(headers, now))
    should_retry = headers.get("x-should-retry")
    if should_retry is not None:
        limit.should_retry = should_retry.strip().lower() == "true"
    # Passes over the names (in C) pick the rate-limit headers; only those are looked at.
    unified = headers.starting(UNIFIED_PREFIX)
    for name, value in unified:
        suffix = name[len(UNIFIED_PREFIX):]
        field, parse = UNIFIED_HEADERS.get(suffix, (None, None))
        family = FAMILY_HEADER.fullmatch(suffix) if field is None else None
        if field is not None:
            setattr(limit, field, parse(value))
        elif family is not None:
            key, parse = FAMILY_FIELDS[family.group(2)]
            limit.families.setdefault(f"seven_day_{family.group(1)}", {})[key] = parse(value)
    for window in limit.families.values():
        if window.get("status") in HARD_LIMIT_STATUSES and not window.get("resetsAt"):
            window["resetsAt"] = now + (limit.retry_after_ms or DEFAULT_RATE_LIMIT_MS)
    if len(headers.starting(RATE_LIMIT_PREFIX)) > len(unified):
        # API-key accounts: a limit at zero remaining resets at its -reset time.
        exhausted = [
            parse_epoch(headers.get(f"anthropic-ratelimit-{family}-reset") or "")
            for family in API_LIMIT_FAMILIES
            if (headers.get(f"anthropic-ratelimit-{family}-remaining") or "").strip() == "0"]
        limit.exhausted_reset = max(filter(None, exhausted), default=None)
    return limit


def window_applies(name: str, model: str | None) -> bool:
    """Whether a per-model window (seven_day_sonnet) counts a model (claude-sonnet-4-5).

    The family is a dash-separated word of the model id, whatever its place
    (claude-3-7-sonnet-20250219 too); a request naming no model meets none.
    """
    family = name[len("seven_day_"):]
    return bool(model) and family in model.lower().split("-")


def family_windows(account: Account, model: str | None) -> dict[str, dict]:
    """Return the per-model windows of an account that count a model's requests."""
    if not model or not account.model_windows:
        return {}
    return {name: window for name, window in model_windows(account).items()
            if isinstance(window, dict) and window_applies(name, model)}


def window_spent(window: dict, now: int) -> bool:
    """Whether a per-model window refuses until its reset: refused, or used up (100%).

    At its reset it is forgotten; a window without a known reset is never taken as spent.
    """
    reset, used = window.get("resetsAt"), window.get("utilization")
    return (isinstance(reset, int) and reset > now
            and (window.get("status") in HARD_LIMIT_STATUSES
                 or isinstance(used, (int, float)) and used >= 1.0))


def family_refusal(account: Account, model: str | None, now: int) -> tuple[str, int] | None:
    """Return the spent per-model window that refuses a model on an account and its reset
    (the latest, if several), or None."""
    spent = [(window["resetsAt"], name) for name, window in
             family_windows(account, model).items() if window_spent(window, now)]
    if not spent:
        return None
    reset, name = max(spent)
    return name, reset


def spent_windows(account: Account, now: int) -> list[tuple[str, int]]:
    """Return the account's spent per-model windows and their resets, for display."""
    return sorted((name, window["resetsAt"]) for name, window in model_windows(account).items()
                  if isinstance(window, dict) and window_spent(window, now))


def family_label(name: str) -> str:
    """Name a per-model window for people: seven_day_opus -> weekly Opus."""
    return f"weekly {name[len('seven_day_'):].capitalize()}"


def windows_in_force(account: Account, now: int,
                     model: str | None = None) -> list[tuple[float, int | None]]:
    """Return (utilization, reset) of every window that counts a request for a model: the 5h
    and 7d ones and the model's per-model windows, leaving out those already reset."""
    windows = [(account.utilization_5h, account.reset_5h),
               (account.utilization_7d, account.reset_7d)]
    windows += [(window.get("utilization"), window.get("resetsAt"))
                for window in family_windows(account, model).values()]
    return [(float(used), reset) for used, reset in windows
            if isinstance(used, (int, float)) and (reset is None or reset > now)]


def utilization(account: Account, now: int, model: str | None = None) -> float:
    """Return how used an account is for a model: the fullest window that counts it (5h, 7d,
    the model's weekly one; 0 after a reset)."""
    return max([used for used, _ in windows_in_force(account, now, model)] or [0.0])


def merge_windows(account: Account, seen: dict[str, dict]) -> str | None:
    """Return the account's model_windows with newly seen per-model windows folded in, or
    None when nothing changed."""
    windows = model_windows(account)
    merged = {**windows, **{name: {**windows.get(name, {}), **window}
                            for name, window in seen.items()}}
    return json.dumps(merged, sort_keys=True) if merged != windows else None


#: How long an account found on extra usage, with no window reset given, is taken to stay on
#: it: the 5-hour window, the shortest that extra usage stands in for.
OVERAGE_FALLBACK_MS = 5 * 3600 * 1000


def overage_ends(limit: RateLimit, now: int) -> int:
    """Return when an account serving on extra usage gets its included quota back."""
    reset = limit.window_reset()
    until = reset if reset and reset > now else now + OVERAGE_FALLBACK_MS
    return min(until, now + MAX_RATE_LIMIT_MS)


def can_serve(account: Account, now: int, overage: str) -> bool:
    """Whether routing may send an account requests now, under the extra-usage policy."""
    status = account.status(now)
    return status == "active" or (status == "overage" and overage != "never")


def soft_limited(account: Account, now: int) -> bool:
    """Whether an account's last answer warned it is close to its limit (and still is)."""
    return (account.rate_limit_status in SOFT_LIMIT_STATUSES
            and (account.rate_limit_reset or 0) > now)


###############################################################################
# Usage reads #################################################################
###############################################################################

#: Where Claude Code reads an OAuth account's windows without spending a request.
USAGE_PATH = "/api/oauth/usage"
#: After an account is marked limited, or one of its resets passes, its windows are read this
#: much later (the upstream needs a moment to count).
USAGE_SOON_MS = 2_000
#: After a 429 or 5xx from the usage endpoint, wait this long, doubling up to the maximum.
USAGE_BACKOFF_MS = 60_000
USAGE_BACKOFF_MAX_MS = 3600_000
USAGE_TIMEOUT_S = 15.0
#: How often the reader looks for accounts due a read.
USAGE_TICK_S = 1.0
#: The answer's windows that have columns of their own; the other seven_day_* windows (per
#: model) are kept together in model_windows.
USAGE_WINDOWS = {"five_hour": ("utilization_5h", "reset_5h"),
                 "seven_day": ("utilization_7d", "reset_7d")}
#: The per-model windows known today; at most MAX_OTHER_WINDOWS others (names up to 64
#: characters, the first in name order) are kept too, so an answer cannot grow an account.
KNOWN_MODEL_WINDOWS = ("seven_day_oauth_apps", "seven_day_opus", "seven_day_sonnet")
MAX_OTHER_WINDOWS = 8


def usage_fields(answer: dict) -> dict:
    """Turn /api/oauth/usage's answer into account columns, ignoring what is not known.

    Utilization comes in percent there (the rate-limit headers give a fraction), held to
    0-100; a window a plan lacks is null.
    """
    fields: dict[str, Any] = {}
    models = {}
    others = sorted(name for name in answer if name.startswith("seven_day_")
                    and name not in KNOWN_MODEL_WINDOWS and len(name) <= 64)
    for name in (*USAGE_WINDOWS, *KNOWN_MODEL_WINDOWS, *others[:MAX_OTHER_WINDOWS]):
        window = answer.get(name)
        if not isinstance(window, dict):
            continue
        used = window.get("utilization")
        if type(used) not in (int, float) or not math.isfinite(used):
            continue
        used = min(max(used, 0), 100)
        resets_at = window.get("resets_at")
        reset = parse_epoch(resets_at) if isinstance(resets_at, str) else None
        if name in USAGE_WINDOWS:
            utilization_column, reset_column = USAGE_WINDOWS[name]
            fields[utilization_column], fields[reset_column] = used / 100, reset
        else:
            models[name] = {"utilization": used / 100, "resetsAt": reset}
    if models:
        fields["model_windows"] = json.dumps(models, sort_keys=True)
    extra = answer.get("extra_usage")
    if isinstance(extra, dict) and isinstance(extra.get("is_enabled"), bool):
        reason = extra.get("disabled_reason")
        fields["overage_enabled"] = int(extra["is_enabled"])
        fields["overage_disabled_reason"] = (str(reason)[:100] if reason and
                                             not extra["is_enabled"] else None)
    return fields


class UsagePoller:
    """Reads each OAuth account's windows, as Claude Code's /usage screen does.

    An account that has been idle otherwise shows old figures, and `headroom` and `session`
    place new conversations on them. Reads never happen on a request's path: at most every
    usage_poll_s per account, plus once soon after an account is marked limited or one of its
    resets passes; a 429 or 5xx backs off, a refused token waits for the next one, and a failed
    read never marks the account.
    """

    def __init__(self, settings: Settings, accounts: Callable[[], list[Account]],
                 tokens: TokenKeeper, apply: Callable[[Account, dict, int], None]) -> None:
        self.settings = settings
        self.accounts = accounts
        self.tokens = tokens
        self.apply = apply
        origin, prefix = split_url(settings.upstream_url)
        self.client = Upstream(origin, pool_size=2)
        self.path = prefix.rstrip("/") + USAGE_PATH
        self.lock = threading.Lock()
        #: account id -> when its next read is due (epoch ms).
        self.next_read: dict[int, int] = {}
        #: account id -> the current wait after the endpoint pushed back (429, 5xx).
        self.backoff: dict[int, int] = {}
        #: account id -> when it was last read: a reset passing after that calls for a read.
        self.read_at: dict[int, int] = {}
        #: account id -> the access token the endpoint refused: no read until a new one.
        self.refused: dict[int, str] = {}
        self.log = component_logger("Usage")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="claudeflare-usage", daemon=True)
        self.thread.start()

    def soon(self, account: Account, now: int) -> None:
        """Read an account's windows shortly: it was just marked limited."""
        with self.lock:
            if account.id not in self.backoff:
                self.next_read[account.id] = min(self.next_read.get(account.id, now),
                                                 now + USAGE_SOON_MS)

    def run(self) -> None:
        while not self.stopping.wait(USAGE_TICK_S):
            if self.settings.usage_poll_s:
                survive("Usage", self.read_due)

    def read_due(self) -> None:
        """Read every account whose turn has come."""
        for account in self.accounts():
            now = now_ms()
            account = self.tokens.with_unsaved(account)
            if self.stopping.is_set():
                return
            if self.due(account, now):
                self.read(account, now)

    def due(self, account: Account, now: int) -> bool:
        """Tell whether an account's windows should be read now."""
        if (account.type != "oauth" or account.paused or account.needs_reauth
                or not account.token_valid(now)):
            return False
        with self.lock:
            if self.refused.get(account.id) == account.access_token:
                return False
            next_read = self.next_read.get(account.id, 0)
            if account.id in self.backoff:
                return now >= next_read
            last = self.read_at.get(account.id, 0)
        passed = max((reset for reset in (account.rate_limited_until, account.overage_until,
                                          account.reset_5h, account.reset_7d)
                      if reset and reset + USAGE_SOON_MS <= now), default=0)
        return now >= next_read or passed > last

    def read(self, account: Account, now: int) -> None:
        """Read one account's windows and fold them in; on trouble, change nothing."""
        with self.lock:
            self.read_at[account.id] = now
            self.next_read[account.id] = now + int(self.settings.usage_poll_s * 1000)
        headers = [("Host", self.client.host_header),
                   ("Authorization", f"Bearer {account.access_token}"),
                   ("anthropic-beta", OAUTH_BETA), ("Accept", "application/json"),
                   ("User-Agent", f"claudeflare/{__version__}")]
        try:
            response, connection = self.client.send("GET", self.path, headers, b"",
                                                    USAGE_TIMEOUT_S)
            try:
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise UpstreamError(describe_network_error(error, self.client.where,
                                                           USAGE_TIMEOUT_S)) from None
            self.client.release(connection, response)
        except UpstreamError as error:
            self.back_off(account, now, None, str(error))
            return
        if response.status == 429 or response.status >= 500:
            self.back_off(account, now, parse_retry_after(response.msg, now),
                          f"{response.status} {response.reason}")
            return
        with self.lock:
            self.backoff.pop(account.id, None)
        if response.status == 401:
            with self.lock:
                self.refused[account.id] = account.access_token or ""
            self.log.info("The usage endpoint refused the token of account %s; reading again "
                          "once it is renewed", account.name)
            return
        try:
            answer = json.loads(data) if response.status == 200 else None
        except JSON_ERRORS:
            answer = None
        if not isinstance(answer, dict):
            self.log.debug("Usage read of account %s answered %d without usage", account.name,
                           response.status)
            return
        self.apply(account, usage_fields(answer), now)

    def back_off(self, account: Account, now: int, retry_after_ms: int | None,
                 error: str) -> None:
        """Wait before the next read of an account: retry-after, else 60 s doubling to 1 h."""
        with self.lock:
            wait = min(self.backoff.get(account.id, USAGE_BACKOFF_MS // 2) * 2,
                       USAGE_BACKOFF_MAX_MS)
            self.backoff[account.id] = wait
            wait = max(wait, retry_after_ms or 0)
            self.next_read[account.id] = now + wait
        self.log.info("Usage read of account %s failed: %s; next try in %ds", account.name,
                      redact(error), wait // 1000)

    def close(self, deadline: float) -> None:
        """Stop; a read still running at deadline (time.monotonic()) is cut short."""
        self.stopping.set()
        finish_or_cut(self.thread, self.client, deadline)


###############################################################################
# Alerts ######################################################################
###############################################################################

#: Events sent again every alert_repeat_s while their condition holds; the others are sent
#: once per episode (a window, a bout of extra usage).
REPEATED_EVENTS = frozenset({"account_needs_login", "refresh_failing", "pool_exhausted",
                             "records_unsaved"})
#: A condition that comes back within this long of its last alert waits out the rest of it:
#: a flapping pool sends one exhausted/recovered pair per quarter hour, not one a minute.
ALERT_QUIET_MS = 15 * 60 * 1000
#: Conditions once alerted per episode are remembered this long (longer than any window or
#: client key budget's month).
ALERT_MEMORY_MS = 32 * DAY_S * 1000
#: Alerts waiting for delivery; past this, the oldest are dropped (and counted).
ALERT_QUEUE_MAX = 100
#: How often the alert thread looks at the pool's state.
ALERT_TICK_S = 0.25
#: ntfy's Priority and Tags headers by severity.
NTFY_PRIORITIES = {"critical": "urgent", "error": "high", "warning": "default", "info": "low"}
NTFY_TAGS = {"critical": "rotating_light", "error": "warning", "warning": "warning",
             "info": "information_source"}
#: The first line of a destination's answer kept with a delivery.
MAX_ANSWER_CHARS = 200


@dataclass(frozen=True)
class Destination:
    """Where alerts go: a webhook URL in a format, or a command."""

    #: What users see: the URL's host (its path is the webhook's secret) or the command's name.
    name: str
    format: str
    url: str = ""
    command: str = ""


def alert_format_for(url: str, chosen: str) -> str:
    """Return the body format for a URL: the one chosen, or for auto, the host's own."""
    if chosen != "auto":
        return chosen
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if host == "hooks.slack.com":
        return "slack"
    if host in ("discord.com", "discordapp.com") and parts.path.startswith("/api/webhooks/"):
        return "discord"
    if host == "ntfy.sh" or host.startswith("ntfy."):
        return "ntfy"
    return "json"


def alert_destinations(settings: Settings) -> list[Destination]:
    """Return every destination the settings name, each under a name of its own."""
    destinations, seen = [], collections.Counter()
    for url in filter(None, settings.alert_url.split(",")):
        host = urllib.parse.urlsplit(url).hostname or "?"
        seen[host] += 1
        name = host if seen[host] == 1 else f"{host} #{seen[host]}"
        destinations.append(Destination(name, alert_format_for(url, settings.alert_format), url))
    if settings.alert_command:
        program = os.path.basename(shlex.split(settings.alert_command)[0])
        destinations.append(Destination(f"command {program}", "command",
                                        command=settings.alert_command))
    return destinations


def alert_text(alert: Alert) -> str:
    """Say an alert in plain text: the message, then the fix."""
    return alert.message + (f"\nFix: {alert.fix}" if alert.fix else "")


def webhook_request(alert: Alert, format: str) -> tuple[bytes, list[tuple[str, str]]]:
    """Return a webhook's body and headers for an alert in a format."""
    if format == "ntfy":
        title = f"claudeflare: {alert.event}" + (f" ({alert.account})" if alert.account else "")
        return alert_text(alert).encode(), [
            ("Content-Type", "text/plain; charset=utf-8"), ("Title", title),
            ("Priority", NTFY_PRIORITIES[alert.severity]),
            ("Tags", f"{NTFY_TAGS[alert.severity]},{alert.event}")]
    if format == "slack":
        body = {"text": f"*claudeflare {alert.severity}*: {alert_text(alert)}"}
    elif format == "discord":
        body = {"content": f"**claudeflare {alert.severity}**: {alert_text(alert)}"}
    else:
        body = alert.payload()
    return json_bytes(body), [("Content-Type", "application/json")]


def send_alert(destination: Destination, alert: Alert, timeout: float) -> tuple[bool, str]:
    """Deliver an alert once; return whether the destination took it and what it answered."""
    if destination.command:
        return run_alert_command(destination.command, alert, timeout)
    origin, target = split_url(destination.url)
    client = Upstream(origin, pool_size=0)
    body, headers = webhook_request(alert, destination.format)
    headers = [("Host", client.host_header), ("Content-Length", str(len(body))),
               ("User-Agent", f"claudeflare/{__version__}"), *headers]
    try:
        response, connection = client.send("POST", target, headers, body, timeout)
        try:
            answer = response.read(MAX_ANSWER_CHARS).decode("utf-8", "replace")
        finally:
            response.close()
            connection.close()
    except (UpstreamError, OSError, http.client.HTTPException) as error:
        return False, redact(str(error))
    finally:
        client.close()
    text = f"{response.status} {response.reason}"
    if not 200 <= response.status < 300 and answer.strip():
        text += ": " + answer.strip().splitlines()[0]
    return 200 <= response.status < 300, redact(text)[:MAX_ANSWER_CHARS]


def run_alert_command(command: str, alert: Alert, timeout: float) -> tuple[bool, str]:
    """Run alert_command with the alert's JSON on stdin and CLAUDEFLARE_ALERT_* set."""
    environ = dict(os.environ)
    for key, value in alert.payload().items():
        environ[f"CLAUDEFLARE_ALERT_{key.upper()}"] = str(value or "")
    argv = shlex.split(command)
    try:
        done = subprocess.run(argv, input=json_bytes(alert.payload()), env=environ,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g}s"
    except OSError as error:
        return False, f"cannot run {argv[0]}: {error.strerror or error}"
    first = (done.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[0]
    text = f"exit {done.returncode}" + (f": {first}" if first else "")
    return done.returncode == 0, redact(text)[:MAX_ANSWER_CHARS]


def parse_percentages(text: str) -> list[float]:
    """Read alert_thresholds (already validated) as numbers."""
    return [float(part) for part in text.split(",") if part]


@dataclass
class Watched:
    """What the alert thread reads from the server each turn."""

    accounts: list[Account]
    #: When the first limited account becomes usable again by itself.
    earliest_reset: int | None = None
    #: account name -> (when refreshing its token began to fail, the last error, the expiry
    #: of the token it held then).
    refresh_failures: dict[str, tuple[int, str, int | None]] = dataclasses.field(
        default_factory=dict)
    #: Request records the database refused, and since when (time.monotonic()), if any.
    records_held: int = 0
    held_since: float | None = None
    #: Client keys at a threshold of a budget, said by the ledger that counts their spending
    #: (KeyLedger.budgets_reached).
    key_budgets: list[Alert] = dataclasses.field(default_factory=list)


def login_fix(account: Account) -> str:
    """Return the command that logs an account in again."""
    return (f"python3 claudeflare.py reauth {shlex.quote(account.name)}"
            + (" --api-key" if account.type == "api_key" else ""))


def overage_alert(account: Account, until: int, policy: str) -> Alert:
    """Say that an account began serving on extra usage, billed to its owner."""
    benched = " (benched until then)" if policy == "never" else ""
    return Alert("overage_started",
                 f"Account {account.name} is serving on extra usage (billed to its owner) until "
                 f"{iso_time(until)}{benched}; overage is {policy}",
                 "python3 claudeflare.py config set overage never" if policy != "never" else "",
                 account.name, f"overage_started:{account.name}:{until // HOUR_MS}")


def held_conditions(watched: Watched, now: int, settings: Settings, held: float,
                    refresh_failing_after_ms: int, records_unsaved_after_s: float
                    ) -> list[Alert]:
    """Return an alert for every condition that holds now (held: time.monotonic() now)."""
    alerts = []
    thresholds = parse_percentages(settings.alert_thresholds)
    for account in watched.accounts:
        name = account.name
        if account.needs_reauth:
            alerts.append(Alert("account_needs_login", f"Account {name} needs a new login: "
                                f"{redact(account.reauth_reason or 'refused')}",
                                login_fix(account), name, f"account_needs_login:{name}"))
        failing = watched.refresh_failures.get(name)
        if (failing and failing[2] == account.expires_at and not account.needs_reauth
                and now - failing[0] >= refresh_failing_after_ms):
            alerts.append(Alert(
                "refresh_failing", f"Refreshing the token of account {name} has failed for "
                f"{(now - failing[0]) // 60000} min: {redact(failing[1])}; its token expires at "
                f"{iso_time(account.expires_at)}", "check the network and oauth_token_url: "
                "python3 claudeflare.py doctor", name, f"refresh_failing:{name}"))
        for window, label in (("5h", "5-hour"), ("7d", "7-day")):
            used, reset = getattr(account, f"utilization_{window}"), getattr(account,
                                                                               f"reset_{window}")
            crossed = [threshold for threshold in thresholds
                       if used is not None and used * 100 >= threshold]
            if crossed and not (reset and reset <= now):
                alerts.append(Alert(
                    "window_threshold", f"Account {name} has used {used * 100:.0f}% of its "
                    f"{label} window (threshold {crossed[-1]:g}%); it resets at "
                    f"{iso_time(reset)}", "python3 claudeflare.py list", name,
                    f"window_threshold:{name}:{window}:{crossed[-1]:g}:"
                    f"{round((reset or 0) / HOUR_MS)}"))
    statuses = collections.Counter(account.status(now) for account in watched.accounts)
    if watched.accounts and not any(can_serve(account, now, settings.overage)
                                    for account in watched.accounts):
        reset = (f"; the first resets at {iso_time(watched.earliest_reset)}"
                 if watched.earliest_reset else "")
        alerts.append(Alert(
            "pool_exhausted", f"No account can serve ("
            f"{', '.join(f'{count} {status}' for status, count in sorted(statuses.items()))})"
            f"{reset}", "wait for the reset, or resume or add an account: python3 "
            "claudeflare.py list", None, "pool_exhausted"))
    if watched.held_since is not None and held - watched.held_since >= records_unsaved_after_s:
        alerts.append(Alert(
            "records_unsaved", f"{watched.records_held} request records held in memory for "
            f"{held - watched.held_since:.0f}s: the database refuses them (locked by another "
            f"process, or the disk is full)",
            "python3 claudeflare.py doctor", None, "records_unsaved"))
    return alerts + watched.key_budgets


@dataclass
class Delivery:
    """One alert on its way to one destination."""

    alert: Alert
    alert_id: int | None
    destination: Destination
    attempts: int = 0
    #: When the next try is due (time.monotonic()).
    due: float = 0.0


@dataclass
class ConditionState:
    """What the alert thread remembers of one condition."""

    last_sent: int
    holds: bool = True
    #: Whether its current episode was alerted (a comeback in the quiet time is not).
    alerted: bool = True


class Alerts:
    """Tells someone when the pool needs a person: watches the server's state, raises alerts,
    stores them, and delivers them from a thread of its own.

    Nothing here runs on a request's path: the thread reads the state (accounts, failing
    refreshes, records the database refused) every ALERT_TICK_S, and overage_started arrives
    through notice(), which only queues. A destination that hangs or fails is retried with
    backoff, then the delivery is recorded as failed; it never affects the proxy.
    """

    #: Seconds a destination gets to answer (a command, to finish).
    timeout_s = 10.0
    #: Waits between the tries of one delivery: five tries within about ten minutes.
    retry_delays_s = (15.0, 60.0, 180.0, 360.0)
    #: How long the token endpoint must fail before refresh_failing is raised.
    refresh_failing_after_ms = 15 * 60 * 1000
    #: How long records must be held before records_unsaved is raised.
    records_unsaved_after_s = 60.0

    def __init__(self, settings: Settings, store: Store, watch: Callable[[], Watched],
                 settle: Callable[[], Any]) -> None:
        self.settings = settings
        self.store = store
        self.watch = watch
        #: Waits until the request log queued so far is written. Storing an alert makes the
        #: server re-read its accounts; what the answers said of them (a window's use, a soft
        #: limit) is in the database by then, not lost from memory until the writer's turn.
        self.settle = settle
        self.lock = threading.Lock()
        #: Alerts raised by a moment rather than a state (overage_started), not yet looked at.
        self.noticed: collections.deque = collections.deque(maxlen=ALERT_QUEUE_MAX)
        self.deliveries: list[Delivery] = []
        self.conditions: dict[str, ConditionState] = {}
        #: (event, result) -> how many: raised, sent, failed, dropped; for /metrics.
        self.counts: collections.Counter = collections.Counter()
        self.log = component_logger("Alerts")
        #: Whether storing alerts failed last time (said once per episode).
        self.store_failing = False
        self.remember_stored(now_ms())
        self.wake = threading.Event()
        self.stopping = threading.Event()
        #: Set when shutdown stopped waiting for a delivery in progress.
        self.abandoned = False
        self.thread = threading.Thread(target=self.run, name="claudeflare-alerts", daemon=True)
        self.thread.start()

    def remember_stored(self, now: int) -> None:
        """Take up what a previous run alerted, so that a restart does not alert it again."""
        since = now - max(self.settings.alert_repeat_s * 1000, ALERT_MEMORY_MS)
        with contextlib.suppress(sqlite3.Error):
            for row in reversed(self.store.recent_alerts(MAX_STORED_ALERTS, since)):
                recovered = row["event"] == "pool_recovered"
                self.conditions[row["condition"]] = ConditionState(row["created_at"],
                                                                   not recovered)

    def notice(self, alert: Alert) -> None:
        """Queue an alert raised by a moment (never blocks: for the request path)."""
        self.noticed.append(alert)
        self.wake.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(ALERT_TICK_S)
            self.wake.clear()
            if self.stopping.is_set():
                return
            survive("Alerts", lambda: self.look(now_ms(), time.monotonic()))
            survive("Alerts", self.deliver_due)

    def look(self, now: int, held: float) -> None:
        """Compare the conditions that hold now with those already alerted; raise the news."""
        current = held_conditions(self.watch(), now, self.settings, held,
                                  self.refresh_failing_after_ms, self.records_unsaved_after_s)
        while self.noticed:
            current.append(self.noticed.popleft())
        holding = {alert.condition for alert in current}
        repeat_ms = self.settings.alert_repeat_s * 1000
        for alert in current:
            state = self.conditions.get(alert.condition)
            if state is None:
                self.conditions[alert.condition] = ConditionState(now)
                self.raise_alert(alert, now)
            elif alert.event not in REPEATED_EVENTS:
                state.holds = True
            elif now - state.last_sent >= (repeat_ms if state.holds and state.alerted
                                           else ALERT_QUIET_MS):
                state.last_sent, state.holds, state.alerted = now, True, True
                self.raise_alert(alert, now)
            elif not state.holds:
                state.holds, state.alerted = True, False  # back too soon: wait out the quiet
        for condition, state in list(self.conditions.items()):
            if condition in holding or not state.holds:
                if now - state.last_sent > ALERT_MEMORY_MS:
                    del self.conditions[condition]
                continue
            state.holds = False
            if condition == "pool_exhausted" and state.alerted:
                state.last_sent = now
                accounts = [account.name for account in self.watch().accounts
                            if can_serve(account, now, self.settings.overage)]
                self.raise_alert(Alert("pool_recovered", f"Accounts can serve again: "
                                       f"{', '.join(accounts) or 'none'}", "", None,
                                       "pool_exhausted"), now)

    def raise_alert(self, alert: Alert, now: int) -> None:
        """Store an alert, log it, and queue it for every destination."""
        alert.created_at = now
        destinations = alert_destinations(self.settings)
        self.log.log(logging.INFO if alert.severity == "info" else logging.WARNING,
                     "Alert %s: %s", alert.event, alert.message)
        with self.lock:
            self.counts[alert.event, "raised"] += 1
        self.settle()
        alert_id = self.stored(lambda: self.store.add_alert(
            alert, [destination.name for destination in destinations]))
        with self.lock:
            for destination in destinations:
                self.deliveries.append(Delivery(alert, alert_id, destination))
            dropped = self.deliveries[:-ALERT_QUEUE_MAX]
        for delivery in dropped:
            self.finish(delivery, "dropped", "too many alerts waiting")

    def stored(self, write: Callable[[], Any]) -> Any:
        """Write to the database if it lets us soon; else say so once, and carry on (after
        shutdown stopped waiting for this thread, the database is closed: write nothing)."""
        if self.abandoned:
            return None
        try:
            result = write()
        except sqlite3.Error as error:
            if not self.store_failing:
                self.log.error("Could not store an alert: %s; sending it all the same", error)
            self.store_failing = True
            return None
        self.store_failing = False
        return result

    def deliver_due(self) -> None:
        """Try every delivery whose time has come, one after the other."""
        with self.lock:
            due = [delivery for delivery in self.deliveries
                   if delivery.due <= time.monotonic()]
        for delivery in due:
            if self.stopping.is_set():
                return
            delivery.attempts += 1
            sent, answer = send_alert(delivery.destination, delivery.alert, self.timeout_s)
            if sent or delivery.attempts > len(self.retry_delays_s):
                self.finish(delivery, "sent" if sent else "failed", answer)
                continue
            delivery.due = time.monotonic() + self.retry_delays_s[delivery.attempts - 1]
            self.log.info("Alert %s to %s failed (%s); trying again in %gs",
                          delivery.alert.event, delivery.destination.name, answer,
                          self.retry_delays_s[delivery.attempts - 1])
            self.record(delivery, "retrying", answer)

    def finish(self, delivery: Delivery, result: str, answer: str) -> None:
        """Record a delivery's outcome and stop trying it."""
        with self.lock:
            if delivery in self.deliveries:
                self.deliveries.remove(delivery)
            self.counts[delivery.alert.event, result] += 1
        if result != "sent":
            self.log.error("Alert %s to %s %s after %d tries: %s", delivery.alert.event,
                           delivery.destination.name, result, delivery.attempts, answer)
        self.record(delivery, result, answer)

    def record(self, delivery: Delivery, result: str, answer: str) -> None:
        """Store where a delivery stands, if its alert was stored."""
        if delivery.alert_id is not None:
            self.stored(lambda: self.store.note_delivery(
                delivery.alert_id, delivery.destination.name, result, delivery.attempts, answer))

    def metrics_text(self) -> str:
        """Write the alert counters in the Prometheus text format."""
        lines = ["# HELP claudeflare_alerts_total Alerts by event and result (raised, then "
                 "sent, failed or dropped per destination).", "# TYPE claudeflare_alerts_total "
                 "counter"]
        with self.lock:
            lines += [f'claudeflare_alerts_total{{event="{event}",result="{result}"}} {count}'
                      for (event, result), count in sorted(self.counts.items())]
        return "\n".join(lines) + "\n"

    def close(self, deadline: float = 0.0) -> None:
        """Stop the thread; deliveries still waiting are logged as not sent.

        A delivery in progress may finish until deadline (time.monotonic(); none: its own
        timeout), so that shutdown waits on it no longer than on requests.
        """
        self.stopping.set()
        self.wake.set()
        self.thread.join(max(0.0, deadline - time.monotonic()) if deadline else
                         self.timeout_s + 1)
        self.abandoned = self.thread.is_alive()
        if self.deliveries:
            self.log.error("Stopped with %d alert deliveries not done", len(self.deliveries))


def alert_json(row: dict) -> dict:
    """Describe a stored alert and its deliveries for the API."""
    return {"id": row["id"], "time": row["created_at"], "event": row["event"],
            "severity": row["severity"], "account": row["account_name"],
            "message": row["message"], "fix": row["fix"],
            "deliveries": [{"destination": delivery["destination"],
                            "result": delivery["result"], "attempts": delivery["attempts"],
                            "answer": delivery["answer"], "updatedAt": delivery["updated_at"]}
                           for delivery in row["deliveries"]]}


def delivery_summary(alert: dict) -> str:
    """Say in one line what each destination made of an alert (as alert_json has it)."""
    return "; ".join(f"{item['destination']}: {item['result']}"
                     + (f" ({item['answer']})" if item["answer"] else "")
                     for item in alert["deliveries"]) or "stored only"


def alerts_report(settings: Settings, store: Store, limit: int) -> dict:
    """Return /api/alerts (and `alerts list --json`): the destinations, the latest alerts."""
    return {"destinations": [{"name": destination.name, "format": destination.format}
                             for destination in alert_destinations(settings)],
            "alerts": [alert_json(row) for row in store.recent_alerts(limit)]}


def make_test_alert() -> Alert:
    """Return the alert `alerts test` and `doctor --send-test` send."""
    return Alert("test", f"Test alert from claudeflare on {socket.gethostname()}: alerts "
                 f"reach this destination", "", None, "test", now_ms())


###############################################################################
# Usage & cost ################################################################
###############################################################################

#: USD per million tokens (input, output) by model family, newest patterns first. Cache writes
#: cost 1.25x input (5 minutes) or 2x (1 hour); cache reads 0.1x. Unknown models stay unpriced.
#: "4.5 and later" in a model id: 4-5 .. 4-99, or a major version from 5 on. The lookahead
#: keeps a date (claude-opus-4-20250514) from reading as a minor version.
FROM_4_5 = r"(?:4-(?:[5-9]|[1-9]\d)|[5-9]|[1-9]\d)(?!\d)"
PRICING = (
    (re.compile(rf"claude-opus-{FROM_4_5}"), 5.0, 25.0),
    (re.compile(r"claude-opus-4\b"), 15.0, 75.0),
    (re.compile(r"claude-(3-7-sonnet|sonnet-(?:4|[5-9]|[1-9]\d)(?!\d))"), 3.0, 15.0),
    (re.compile(rf"claude-haiku-{FROM_4_5}"), 1.0, 5.0),
    (re.compile(r"claude-3-5-haiku\b"), 0.80, 4.0),
    (re.compile(r"claude-3-haiku\b"), 0.25, 1.25),
)
CACHE_WRITE_5M = 1.25
CACHE_WRITE_1H = 2.0
CACHE_READ = 0.1
#: A response body larger than this is passed on without being read for usage.
MAX_USAGE_BODY_BYTES = 4 * 1024 * 1024


@functools.lru_cache(maxsize=256)
def price_of(model: str | None) -> tuple[float, float] | None:
    """Return the (input, output) price per million tokens of a model, or None if unknown.

    Kept per model name: a few names come back with every answer.
    """
    for pattern, input_price, output_price in PRICING:
        if model and pattern.match(model):
            return input_price, output_price
    return None


def token_count(value: Any) -> bool:
    """Tell whether a value is a token count SQLite can store (no bool, no huge number)."""
    return type(value) is int and 0 <= value < 2 ** 63


@dataclass
class Usage:
    """Token counts of one answer, as the Messages API reports them."""

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_1h_tokens: int = 0

    def add(self, usage: Any, model: Any = None) -> None:
        """Take the counts of a `usage` object; later ones (message_delta) overwrite earlier."""
        if isinstance(model, str) and model:
            self.model = model
        if not isinstance(usage, dict):
            return
        for name, field in (("input_tokens", "input_tokens"),
                            ("output_tokens", "output_tokens"),
                            ("cache_creation_input_tokens", "cache_creation_tokens"),
                            ("cache_read_input_tokens", "cache_read_tokens")):
            if token_count(usage.get(name)):
                setattr(self, field, usage[name])
        split = usage.get("cache_creation")
        if isinstance(split, dict) and token_count(split.get("ephemeral_1h_input_tokens")):
            self.cache_creation_1h_tokens = split["ephemeral_1h_input_tokens"]

    def cost(self) -> float | None:
        """Return the API-equivalent cost in USD, or None for a model without a known price."""
        price = price_of(self.model)
        if price is None:
            return None
        input_price, output_price = price
        write_1h = min(self.cache_creation_1h_tokens, self.cache_creation_tokens)
        write_5m = self.cache_creation_tokens - write_1h
        return (self.input_tokens * input_price + self.output_tokens * output_price
                + write_5m * input_price * CACHE_WRITE_5M
                + write_1h * input_price * CACHE_WRITE_1H
                + self.cache_read_tokens * input_price * CACHE_READ) / 1_000_000


class UsageReader:
    """Reads usage out of a copy of the response bytes as they pass, never holding them up.

    JSON answers are parsed once complete. SSE streams are cut into events as the bytes come
    (an event may be split across reads); only message_start (input and cache tokens, model)
    and message_delta (the running output total) are decoded.
    """

    EVENT_END = re.compile(rb"\r?\n\r?\n")

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.usage = Usage()
        self.pending = bytearray()
        self.overflow = False

    def feed(self, data: bytes) -> None:
        """Take the next piece of the body, as it was sent to the client."""
        if self.overflow:
            return
        searched = len(self.pending)
        self.pending += data
        if not self.streaming:
            if len(self.pending) > MAX_USAGE_BODY_BYTES:
                self.overflow = True
                self.pending.clear()
            return
        # Only the new bytes can end an event (with the last three, for an event end that
        # straddles two pieces); only an event that names a message_ type can carry usage.
        start = 0
        for end in self.EVENT_END.finditer(self.pending, max(0, searched - 3)):
            if self.pending.find(b"message_", start, end.start()) >= 0:
                self.read_event(bytes(self.pending[start:end.start()]))
            start = end.end()
        del self.pending[:start]
        if len(self.pending) > MAX_USAGE_BODY_BYTES:
            self.pending.clear()  # one event this large carries text, not usage

    def read_event(self, event: bytes) -> None:
        """Decode one SSE event if it can carry usage (message_start, message_delta)."""
        if b"message_start" not in event and b"message_delta" not in event:
            return
        data = b"".join(line[5:].strip() for line in event.splitlines()
                        if line.startswith(b"data:"))
        try:
            payload = json.loads(data)
        except JSON_ERRORS:
            return
        if not isinstance(payload, dict):
            return
        if payload.get("type") == "message_start" and isinstance(payload.get("message"), dict):
            message = payload["message"]
            self.usage.add(message.get("usage"), message.get("model"))
        elif payload.get("type") == "message_delta":
            self.usage.add(payload.get("usage"))

    def finish(self) -> Usage:
        """Return the usage read; a JSON body is decoded now that it is whole."""
        if not self.streaming and self.pending:
            try:
                payload = json.loads(bytes(self.pending))
            except JSON_ERRORS:
                payload = None
            if isinstance(payload, dict):
                self.usage.add(payload.get("usage"), payload.get("model"))
            self.pending.clear()
        return self.usage


def metric_label(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Prometheus counters since the server started; the writer thread feeds them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.tokens: collections.Counter = collections.Counter()
        self.cost_usd = 0.0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum_ms = 0

    def observe(self, records: list[RequestRecord]) -> None:
        """Count a batch of written requests."""
        with self.lock:
            for record in records:
                self.requests[record.account_name or "", str(record.status or 0)] += 1
                for kind in ("input", "output", "cache_creation", "cache_read"):
                    self.tokens[kind] += getattr(record, f"{kind}_tokens")
                self.cost_usd += record.cost_usd or 0.0
                self.latency_buckets[latency_bucket(record.response_time_ms)] += 1
                self.latency_sum_ms += record.response_time_ms or 0

    def render(self, accounts: list[Account], now: int, uptime_s: float) -> str:
        """Write the Prometheus text format, with account gauges read now."""
        label = metric_label
        lines = ["# HELP claudeflare_requests_total Proxied requests by account and status.",
                 "# TYPE claudeflare_requests_total counter"]
        with self.lock:
            for (account, status), count in sorted(self.requests.items()):
                lines.append(f'claudeflare_requests_total{{account="{label(account)}",'
                             f'status="{status}"}} {count}')
            lines += ["# HELP claudeflare_tokens_total Tokens by type.",
                      "# TYPE claudeflare_tokens_total counter"]
            lines += [f'claudeflare_tokens_total{{type="{kind}"}} {self.tokens[kind]}'
                      for kind in ("input", "output", "cache_creation", "cache_read")]
            lines += ["# HELP claudeflare_cost_usd_total API-equivalent cost in USD.",
                      "# TYPE claudeflare_cost_usd_total counter",
                      f"claudeflare_cost_usd_total {self.cost_usd:.6f}",
                      "# HELP claudeflare_request_duration_seconds Time to answer a request.",
                      "# TYPE claudeflare_request_duration_seconds histogram"]
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS_MS + (None,), self.latency_buckets):
                cumulative += count
                le = "+Inf" if bound is None else f"{bound / 1000:g}"
                lines.append(f'claudeflare_request_duration_seconds_bucket{{le="{le}"}} '
                             f'{cumulative}')
            lines += [f"claudeflare_request_duration_seconds_sum {self.latency_sum_ms / 1000:.3f}",
                      f"claudeflare_request_duration_seconds_count {cumulative}"]
        lines += ["# HELP claudeflare_account_status 1 for the status each account is in.",
                  "# TYPE claudeflare_account_status gauge"]
        for account in accounts:
            lines.append(f'claudeflare_account_status{{account="{label(account.name)}",'
                         f'status="{account.status(now)}"}} 1')
        lines += ["# HELP claudeflare_account_utilization Used share of a rate-limit window.",
                  "# TYPE claudeflare_account_utilization gauge"]
        for account in accounts:
            for window in ("5h", "7d"):
                used = getattr(account, f"utilization_{window}")
                if used is not None:
                    lines.append(f'claudeflare_account_utilization{{account='
                                 f'"{label(account.name)}",window="{window}"}} {used:g}')
            for name, window in sorted(model_windows(account).items()):
                used = window.get("utilization") if isinstance(window, dict) else None
                if isinstance(used, (int, float)):
                    lines.append(f'claudeflare_account_utilization{{account='
                                 f'"{label(account.name)}",window="7d_'
                                 f'{label(name[len("seven_day_"):])}"}} {used:g}')
        lines += ["# HELP claudeflare_account_model_limited 1 for each spent per-model window.",
                  "# TYPE claudeflare_account_model_limited gauge"]
        for account in accounts:
            for name, _ in spent_windows(account, now):
                lines.append(f'claudeflare_account_model_limited{{account='
                             f'"{label(account.name)}",window="7d_'
                             f'{label(name[len("seven_day_"):])}"}} 1')
        lines += ["# HELP claudeflare_uptime_seconds Seconds since the server started.",
                  "# TYPE claudeflare_uptime_seconds gauge",
                  f"claudeflare_uptime_seconds {uptime_s:.0f}"]
        return "\n".join(lines) + "\n"


###############################################################################
# Client key limits ###########################################################
###############################################################################

#: The calendar periods a key's budgets count over.
PERIODS = ("day", "week", "month")
#: The window of --rpm, and the retry-after (s) a refusal for load (--max-concurrent) carries.
RPM_WINDOW_MS = 60_000
BUSY_RETRY_S = 1
#: The percentages of a budget at which key_budget_reached is alerted: a warning, the limit.
KEY_BUDGET_THRESHOLDS = (80, 100)


def weighted_tokens(input_tokens: int, output_tokens: int, cache_creation_tokens: int,
                    cache_read_tokens: int) -> int:
    """Count tokens against --tokens-day: input and output whole, cache writes and reads as the
    price table weighs them against input (1.25x and 0.1x)."""
    return round(input_tokens + output_tokens + cache_creation_tokens * CACHE_WRITE_5M
                 + cache_read_tokens * CACHE_READ)


def period_bounds(when: int, zone: datetime.tzinfo | None) -> dict[str, tuple[int, int]]:
    """Return the start and end (epoch ms) of the calendar day, week (from Monday) and month
    holding a time, in a time zone (None: the machine's)."""
    day = datetime.datetime.fromtimestamp(when / 1000, zone).replace(
        hour=0, minute=0, second=0, microsecond=0)
    week = day - datetime.timedelta(days=day.weekday())
    month = day.replace(day=1)
    ends = (day + datetime.timedelta(days=1), week + datetime.timedelta(days=7),
            (month + datetime.timedelta(days=32)).replace(day=1))
    return {period: (int(start.timestamp() * 1000), int(end.timestamp() * 1000))
            for period, start, end in zip(PERIODS, (day, week, month), ends)}


def usd(value: float) -> str:
    """Say an amount of dollars: cents, or four decimals below one dollar."""
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"


def model_patterns(key: ClientKey) -> list[str]:
    """Return the model patterns a key is limited to (none: every model)."""
    return [pattern.strip() for pattern in (key.models or "").split(",") if pattern.strip()]


#: A body that opens with its model, as Claude Code and the SDKs write it.
LEADING_MODEL = re.compile(rb'\{\s*"model"\s*:\s*"([^"\\]{1,200})"')


def requested_model(body: bytes) -> str | None:
    """Return the model a Messages request body names, or None; a body opening with it is not
    parsed whole."""
    found = LEADING_MODEL.match(body)
    if found:
        return found.group(1).decode("utf-8", "replace")
    if body.lstrip()[:1] != b"{":
        return None
    try:
        model = json.loads(body).get("model")
    except (*JSON_ERRORS, AttributeError):
        return None
    return model[:200] if isinstance(model, str) and model else None


def key_accounts(key: ClientKey | None, accounts: list[Account]) -> list[Account]:
    """Keep the accounts a key may use: those whose priority is at least its floor."""
    if key is None or key.priority_floor is None:
        return accounts
    return [account for account in accounts if account.priority >= key.priority_floor]


def key_status(key: ClientKey, now: int) -> str:
    """Return active, paused or expired."""
    if key.paused:
        return "paused"
    if key.expires_at is not None and now >= key.expires_at:
        return "expired"
    return "active"


@dataclass
class KeyUsage:
    """What a client key spent in its current periods, and its load, at one moment."""

    #: period -> USD spent since it began; and weighted tokens today.
    spent: dict[str, float]
    tokens_day: int
    #: period -> when it ends (and the spending starts again from 0).
    resets: dict[str, int]
    in_flight: int = 0
    #: Requests begun in the last minute, and when the oldest of them leaves that minute.
    last_minute: int = 0
    rpm_free_at: int | None = None
    last_used: int | None = None


@dataclass
class KeyRefusal:
    """Why a client key's request is refused, in the words the client gets."""

    status: int
    error_type: str
    message: str
    #: A short name for /metrics: paused, expired, model, budget_day, tokens_day, ...
    reason: str
    retry_after_s: int | None = None


def key_access_refusal(key: ClientKey, now: int) -> KeyRefusal | None:
    """Refuse a paused or expired key (401), saying which: not the generic "key required"."""
    status = key_status(key, now)
    if status == "paused":
        return KeyRefusal(401, "authentication_error",
                          f"The claudeflare client key {key.name} is paused. Its owner can "
                          f"resume it: python3 claudeflare.py keys set {key.name} --resume",
                          "paused")
    if status == "expired":
        return KeyRefusal(401, "authentication_error",
                          f"The claudeflare client key {key.name} expired at "
                          f"{iso_time(key.expires_at)}", "expired")
    return None


#: The /v1 requests a key with model limits or budgets may send: those whose model and cost the
#: proxy reads (a Message Batch names a model per request and is billed after the answer).
MEASURED_REQUESTS = re.compile(r"(POST /v1/messages(/count_tokens)?|(GET|HEAD) /v1/models"
                               r"(/[^/?]+)?)/?(\?.*)?")


#: The white space JSON allows between tokens.
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def named_model(body: bytes) -> str | None:
    """Return the model a request body names, from the whole body as the upstream reads it.

    Raise ValueError when the body is not a JSON object or names its model more than once: a
    limit must see the model the upstream will use, and a regex or a first match need not.
    Only the top level's keys are read here; each value is decoded by json's C scanner.
    """
    space = JSON_WHITESPACE.match
    try:
        text = body.decode("utf-8")
        index = space(text).end()
        if text[index:index + 1] != "{":
            raise ValueError("the request body is not a JSON object")
        models, index = [], space(text, index + 1).end()
        closed = text[index:index + 1] == "}"
        while not closed:
            if text[index:index + 1] != '"':
                raise ValueError("the request body is not valid JSON")
            key, index = json.decoder.scanstring(text, index + 1)
            index = space(text, index).end()
            if text[index:index + 1] != ":":
                raise ValueError("the request body is not valid JSON")
            value, index = JSON_DECODER.raw_decode(text, space(text, index + 1).end())
            if key == "model":
                models.append(value)
            index = space(text, index).end()
            closed = text[index:index + 1] == "}"
            if not closed and text[index:index + 1] != ",":
                raise ValueError("the request body is not valid JSON")
            index = space(text, index + 1).end()
    except (UnicodeDecodeError, RecursionError):
        raise ValueError("the request body is not valid JSON (or nested too deeply)") from None
    if len(models) > 1:
        raise ValueError("the request body names its model more than once")
    return models[0] if models and isinstance(models[0], str) else None


#: The columns that limit a key: a key with none of them is the pool owner's.
LIMIT_COLUMNS = ("budget_day", "budget_week", "budget_month", "tokens_day", "max_concurrent",
                 "rpm", "expires_at", "priority_floor")


def key_is_limited(key: ClientKey) -> bool:
    """Tell whether a key carries any limit: then it is a member's, who may use the pool and
    see how it is used, but not change it."""
    return bool(model_patterns(key)) or any(getattr(key, column) is not None
                                            for column in LIMIT_COLUMNS)


def key_request_refusal(key: ClientKey, method: str, path: str,
                        body: bytes) -> tuple[str | None, KeyRefusal | None]:
    """Return the model a limited key's request uses (for its model patterns and budgets), or
    the refusal of a request whose model or cost the key's limits cannot see."""
    measured = bool(model_patterns(key) or key.tokens_day is not None
                    or any(getattr(key, f"budget_{period}") is not None for period in PERIODS))
    if not measured:
        return None, None
    if not MEASURED_REQUESTS.fullmatch(f"{method} {path}"):
        return None, KeyRefusal(
            403, "permission_error", f"The claudeflare client key {key.name} has model limits or "
            f"budgets, so it may send only /v1/messages, /v1/messages/count_tokens and "
            f"/v1/models: the model and cost of {method} {path.partition('?')[0]} cannot be "
            f"measured", "unmeasured")
    budgets = [period for period in PERIODS if getattr(key, f"budget_{period}") is not None]
    if method != "POST" or not (model_patterns(key) or budgets):
        return None, None
    try:
        model = named_model(body)
    except ValueError as error:
        return None, KeyRefusal(400, "invalid_request_error", f"Invalid request: {error}",
                                "model")
    if model is None:
        return None, KeyRefusal(400, "invalid_request_error",
                                "The request body names no model (a JSON object with \"model\")",
                                "model")
    if budgets and price_of(model) is None:
        return None, KeyRefusal(
            403, "permission_error", f"The claudeflare client key {key.name} has budgets, and "
            f"the price of {model} is not known, so its cost cannot be counted", "unpriced")
    return model, None


def check_key_limits(key: ClientKey, usage: KeyUsage, model: str | None,
                     now: int) -> KeyRefusal | None:
    """Decide whether a key may start one more request; return the refusal, or None."""
    patterns = model_patterns(key)
    if patterns and model is not None and \
            not any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns):
        return KeyRefusal(403, "permission_error",
                          f"The claudeflare client key {key.name} may not use {model}; it may "
                          f"use {', '.join(patterns)}", "model")
    for period in PERIODS:
        budget = getattr(key, f"budget_{period}")
        if budget is not None and usage.spent[period] >= budget:
            return over_limit(key, f"budget_{period}", f"{period} budget",
                              f"{usd(usage.spent[period])} spent of {usd(budget)}",
                              usage.resets[period], now)
    if key.tokens_day is not None and usage.tokens_day >= key.tokens_day:
        return over_limit(key, "tokens_day", "daily token limit",
                          f"{usage.tokens_day:,} tokens used of {key.tokens_day:,}",
                          usage.resets["day"], now)
    if key.max_concurrent is not None and usage.in_flight >= key.max_concurrent:
        return KeyRefusal(429, "rate_limit_error",
                          f"The claudeflare client key {key.name} has {usage.in_flight} "
                          f"requests in flight, its most at once (max_concurrent); retry when "
                          f"one finishes", "max_concurrent", BUSY_RETRY_S)
    if key.rpm is not None and usage.last_minute >= key.rpm:
        wait_ms = (usage.rpm_free_at or now) - now
        return KeyRefusal(429, "rate_limit_error",
                          f"The claudeflare client key {key.name} sent {usage.last_minute} "
                          f"requests in the last minute, its most (rpm {key.rpm})", "rpm",
                          max(1, -(-wait_ms // 1000)))
    return None


def over_limit(key: ClientKey, reason: str, limit: str, spent: str, reset: int,
               now: int) -> KeyRefusal:
    """Refuse a key over a budget or its token limit until the period resets."""
    return KeyRefusal(429, "rate_limit_error",
                      f"The claudeflare client key {key.name} reached its {limit} ({reason}): "
                      f"{spent}. It resets at {iso_time(reset)}", reason,
                      max(1, -(-(reset - now) // 1000)))


def budget_alerts(key: ClientKey, usage: KeyUsage) -> list[Alert]:
    """Return key_budget_reached for each budget a key spent 80% or 100% of: one condition per
    period and threshold, and the period's end in it, so each is alerted once per period."""
    alerts = []
    for period in PERIODS:
        budget, spent = getattr(key, f"budget_{period}"), usage.spent[period]
        crossed = [threshold for threshold in KEY_BUDGET_THRESHOLDS
                   if budget and spent * 100 >= budget * threshold]
        if not crossed:
            continue
        reached = crossed[-1] == 100
        owner = f" (owner {key.owner})" if key.owner else ""
        share = "reached" if reached else f"used {spent / budget * 100:.0f}% of"
        then = "it is refused until the budget resets" if reached else "it resets"
        alerts.append(Alert(
            "key_budget_reached", f"Client key {key.name}{owner} has {share} its {period} "
            f"budget: {usd(spent)} spent of {usd(budget)}; {then} at "
            f"{iso_time(usage.resets[period])}",
            f"python3 claudeflare.py keys set {shlex.quote(key.name)} --budget-{period} USD",
            None, f"key_budget_reached:{key.name}:{period}:{crossed[-1]}:"
            f"{usage.resets[period]}", severity="critical" if reached else ""))
    return alerts


@dataclass
class KeySpend:
    """One client key's running totals: per period, (its start, USD, weighted tokens)."""

    periods: dict[str, tuple[int, float, int]] = dataclasses.field(default_factory=dict)
    in_flight: int = 0
    #: When its requests of the last minute began, oldest first.
    recent: collections.deque = dataclasses.field(default_factory=collections.deque)
    last_used: int | None = None

    def add(self, bounds: dict[str, tuple[int, int]], cost: float, tokens: int) -> None:
        """Count a request into the periods that hold it; a newer period starts from 0."""
        for period, (start, _) in bounds.items():
            known, spent, used = self.periods.get(period, (start, 0.0, 0))
            if start > known:
                known, spent, used = start, 0.0, 0
            if start == known:
                self.periods[period] = (start, spent + cost, used + tokens)

    def usage(self, bounds: dict[str, tuple[int, int]], now: int) -> KeyUsage:
        """Read the totals of the periods holding now (0 for one that has not begun here)."""
        while self.recent and self.recent[0] <= now - RPM_WINDOW_MS:
            self.recent.popleft()
        current = {period: self.periods[period][1:] if period in self.periods
                   and self.periods[period][0] == start else (0.0, 0)
                   for period, (start, _) in bounds.items()}
        return KeyUsage({period: spent for period, (spent, _) in current.items()},
                        current["day"][1], {period: end for period, (_, end) in bounds.items()},
                        self.in_flight, len(self.recent),
                        self.recent[0] + RPM_WINDOW_MS if self.recent else None, self.last_used)


class KeyLedger:
    """Every client key's spending and load, in memory: kept current as requests finish and
    rebuilt from the request log at start, so that no limit check waits for the database."""

    def __init__(self, zone: datetime.tzinfo | None) -> None:
        self.zone = zone
        self.lock = threading.Lock()
        self.spends: dict[str, KeySpend] = collections.defaultdict(KeySpend)
        #: (key name, reason) -> requests refused.
        self.refusals: collections.Counter = collections.Counter()
        #: The periods holding the latest time asked about: computed again once a day.
        self.current = period_bounds(0, zone)

    def bounds(self, when: int) -> dict[str, tuple[int, int]]:
        """Return the periods holding a time (called with the lock held)."""
        day_start, day_end = self.current["day"]
        if day_start <= when < day_end:
            return self.current
        bounds = period_bounds(when, self.zone)
        if when >= day_end:
            self.current = bounds
        return bounds

    def load(self, store: Store, now: int) -> None:
        """Rebuild the totals from the request log (at start, and for the CLI)."""
        since = min(start for start, _ in period_bounds(now, self.zone).values())
        rows, last_used = store.key_spending(since)
        with self.lock:
            for row in rows:
                self.spends[row["client_key"]].add(
                    self.bounds(row["minute"]), row["cost_usd"],
                    weighted_tokens(row["input_tokens"], row["output_tokens"],
                                    row["cache_creation_tokens"], row["cache_read_tokens"]))
            for name, when in last_used.items():
                self.spends[name].last_used = when

    def add(self, record: RequestRecord) -> None:
        """Count a finished request against its key, at once: the next check sees it."""
        if record.client_key is None:
            return
        tokens = weighted_tokens(record.input_tokens, record.output_tokens,
                                 record.cache_creation_tokens, record.cache_read_tokens)
        with self.lock:
            spend = self.spends[record.client_key]
            spend.add(self.bounds(record.timestamp), record.cost_usd or 0.0, tokens)
            spend.last_used = max(spend.last_used or 0, record.timestamp)

    def admit(self, key: ClientKey, model: str | None, now: int) -> KeyRefusal | None:
        """Check a key's limits and, when it may go, count the request as in flight."""
        with self.lock:
            spend = self.spends[key.name]
            refusal = check_key_limits(key, spend.usage(self.bounds(now), now), model, now)
            if refusal is not None:
                self.refusals[key.name, refusal.reason] += 1
                return refusal
            spend.in_flight += 1
            spend.recent.append(now)
        return None

    def release(self, name: str) -> None:
        """Count an admitted request as finished."""
        with self.lock:
            self.spends[name].in_flight -= 1

    def refused(self, name: str, reason: str) -> None:
        """Count a request refused before the limits were checked (paused, expired, floor)."""
        with self.lock:
            self.refusals[name, reason] += 1

    def usage(self, name: str, now: int) -> KeyUsage:
        """Return what a key spent and its load now."""
        with self.lock:
            return self.spends[name].usage(self.bounds(now), now)

    def budgets_reached(self, keys: list[ClientKey], now: int) -> list[Alert]:
        """Return what alerts watch of the keys: each budget spent to a threshold."""
        return [alert for key in keys for alert in budget_alerts(key, self.usage(key.name, now))]

    def metrics(self, keys: list[ClientKey], now: int) -> list[str]:
        """Write each key's spending, budgets and refusals in the Prometheus text format."""
        lines = ["# HELP claudeflare_client_key_spend_usd API-equivalent USD a client key "
                 "spent in the current period.", "# TYPE claudeflare_client_key_spend_usd gauge"]
        budgets = ["# HELP claudeflare_client_key_budget_usd A client key's budget.",
                   "# TYPE claudeflare_client_key_budget_usd gauge"]
        for key in keys:
            usage = self.usage(key.name, now)
            for period in PERIODS:
                labels = f'key="{metric_label(key.name)}",period="{period}"'
                lines.append(f"claudeflare_client_key_spend_usd{{{labels}}} "
                             f"{usage.spent[period]:.6f}")
                if getattr(key, f"budget_{period}") is not None:
                    budgets.append(f"claudeflare_client_key_budget_usd{{{labels}}} "
                                   f"{getattr(key, f'budget_{period}'):g}")
        lines += budgets + ["# HELP claudeflare_client_key_refusals_total Requests a client "
                            "key's limits refused, by reason.",
                            "# TYPE claudeflare_client_key_refusals_total counter"]
        with self.lock:
            refusals = sorted(self.refusals.items())
        lines += [f'claudeflare_client_key_refusals_total{{key="{metric_label(name)}",'
                  f'reason="{reason}"}} {count}' for (name, reason), count in refusals]
        return lines


def key_json(key: ClientKey, usage: KeyUsage, now: int) -> dict:
    """Describe a client key for `keys list --json`, /api/keys and the page: never its hash."""
    return {
        "name": key.name, "owner": key.owner, "status": key_status(key, now),
        "paused": bool(key.paused), "createdAt": key.created_at, "expiresAt": key.expires_at,
        "limits": {"budgetDay": key.budget_day, "budgetWeek": key.budget_week,
                   "budgetMonth": key.budget_month, "tokensDay": key.tokens_day,
                   "maxConcurrent": key.max_concurrent, "rpm": key.rpm,
                   "models": model_patterns(key), "priorityFloor": key.priority_floor},
        "spent": {"day": round(usage.spent["day"], 6), "week": round(usage.spent["week"], 6),
                  "month": round(usage.spent["month"], 6), "tokensDay": usage.tokens_day},
        "resets": usage.resets, "inFlight": usage.in_flight,
        "requestsLastMinute": usage.last_minute, "lastUsed": usage.last_used,
    }


def limits_text(key: dict) -> str:
    """Say a key's limits other than budgets briefly, for `keys list`."""
    limits = key["limits"]
    parts = [f"{limits['tokensDay']:,} tokens/day" if limits["tokensDay"] else "",
             f"{limits['maxConcurrent']} at once" if limits["maxConcurrent"] else "",
             f"{limits['rpm']}/min" if limits["rpm"] else "",
             "models " + ",".join(limits["models"]) if limits["models"] else "",
             f"priority >= {limits['priorityFloor']}" if limits["priorityFloor"] is not None
             else ""]
    return "; ".join(part for part in parts if part) or "-"


def spent_text(key: dict, period: str) -> str:
    """Say what a key spent in a period, against its budget if it has one."""
    budget = key["limits"][f"budget{period.title()}"]
    spent = usd(key["spent"][period])
    return spent if budget is None else f"{spent}/{usd(budget)}"


###############################################################################
# Strategies ##################################################################
###############################################################################

@dataclass
class RouteContext:
    """What a strategy may know besides the accounts and the time."""

    #: Grows by one with every request: the rotation of round-robin and of ties.
    turn: int = 0
    session_duration_ms: int = 5 * 3600 * 1000
    #: The account the request's conversation is bound to (session strategy), if any.
    bound_account: int | None = None
    #: Live conversations per account id (session strategy spreads new ones).
    conversations: dict[int, int] = dataclasses.field(default_factory=dict)
    #: The model the request names: its per-model windows count too.
    model: str | None = None


def rotated(accounts: list[Account], context: RouteContext) -> list[Account]:
    """Rotate the list by the turn, so ties do not always fall to the same account."""
    start = context.turn % len(accounts)
    return accounts[start:] + accounts[:start]


def round_robin(accounts: list[Account], context: RouteContext, now: int) -> list[Account]:
    """Equal distribution: each request starts one account further along."""
    return rotated(accounts, context)


@functools.lru_cache(maxsize=64)
def weighted_schedule(weights: tuple[int, ...]) -> tuple[int, ...]:
    """Return one cycle of smooth weighted round-robin: index i appears weights[i] times, spread.

    Each step adds every weight to its running score and picks the highest, then takes the
    total off the winner: (1, 5, 20) gives a cycle of 26 where the tier-1 account comes once.
    """
    scores = [0] * len(weights)
    total, cycle = sum(weights), []
    for _ in range(total):
        scores = [score + weight for score, weight in zip(scores, weights)]
        winner = max(range(len(weights)), key=lambda index: scores[index])
        scores[winner] -= total
        cycle.append(winner)
    return tuple(cycle)


def weighted(accounts: list[Account], context: RouteContext, now: int) -> list[Account]:
    """In proportion to tier: over 26 requests, tiers 1/5/20 get 1, 5 and 20."""
    cycle = weighted_schedule(tuple(account.account_tier for account in accounts))
    first = accounts[cycle[context.turn % len(cycle)]]
    rest = sorted((account for account in accounts if account is not first),
                  key=lambda account: -account.account_tier)
    return [first] + rest


def least_requests(accounts: list[Account], context: RouteContext, now: int) -> list[Account]:
    """The account with the fewest requests in its current window first."""
    return sorted(rotated(accounts, context),
                  key=lambda account: account.session_count(now, context.session_duration_ms))


def headroom(accounts: list[Account], context: RouteContext, now: int) -> list[Account]:
    """The account with the lowest utilization first (5h, 7d and the model's weekly window),
    so accounts drain evenly."""
    return sorted(rotated(accounts, context),
                  key=lambda account: utilization(account, now, context.model))


def session(accounts: list[Account], context: RouteContext, now: int) -> list[Account]:
    """Sticky per conversation, so its prompt cache keeps hitting; new ones where room is.

    New conversations go to the account with the most headroom (in steps of 10%, so small
    differences do not pile every conversation onto one account), then the fewest live ones.
    """
    def preference(account: Account) -> tuple:
        return (account.id != context.bound_account,
                round(utilization(account, now, context.model), 1),
                context.conversations.get(account.id, 0))
    return sorted(rotated(accounts, context), key=preference)


def reset_first(accounts: list[Account], context: RouteContext, now: int) -> list[Account]:
    """Spend first the quota that expires first; sticky per conversation as `session`.

    A new conversation goes to the account whose binding window (the fullest that counts the
    model) resets soonest; accounts whose windows are not known yet come after those whose
    are; ties go to the lower utilization. Soft-limited accounts come after these anyway
    (order_accounts).
    """
    def preference(account: Account) -> tuple:
        windows = windows_in_force(account, now, context.model)
        used, reset = max(windows, key=lambda window: window[0]) if windows else (0.0, None)
        return (account.id != context.bound_account, reset is None, reset or 0, used)
    return sorted(rotated(accounts, context), key=preference)


#: The strategy table: name -> function(accounts, context, now) -> accounts in the order to try.
STRATEGIES: dict[str, Callable[[list[Account], RouteContext, int], list[Account]]] = {
    "session": session,
    "round-robin": round_robin,
    "weighted": weighted,
    "least-requests": least_requests,
    "headroom": headroom,
    "reset-first": reset_first,
}
assert tuple(STRATEGIES) == STRATEGY_NAMES
#: The strategies that keep a conversation on its account (they need its key).
STICKY_STRATEGIES = frozenset({"session", "reset-first"})


def order_accounts(accounts: list[Account], strategy: str, context: RouteContext, now: int,
                   overage: str = "last") -> list[Account]:
    """Order the usable accounts to try: by priority group, each group by the strategy.

    Included quota comes before money: within each group, best (lowest priority) first, the
    accounts with room come before the soft-limited ones; accounts serving on extra usage
    (billed) come after every group under `overage last`, count as any other under `allow`,
    and are never tried under `never`. An account whose weekly window for the request's model
    is spent is not tried at all.
    """
    choose = STRATEGIES[strategy]
    included, billed = [], []
    for account in accounts:
        if family_refusal(account, context.model, now):
            continue
        status = account.status(now)
        if status == "active" or (status == "overage" and overage == "allow"):
            included.append(account)
        elif status == "overage" and overage == "last":
            billed.append(account)
    ordered: list[Account] = []
    for pool in (included, billed):
        for priority in sorted({account.priority for account in pool}):
            group = [account for account in pool if account.priority == priority]
            for soft in (False, True):
                part = [account for account in group if soft_limited(account, now) == soft]
                if part:
                    ordered += choose(part, context, now)
    return ordered


#: metadata.user_id as Claude Code writes it: user_<hex>_account_<uuid>_session_<uuid>.
USER_ID_SESSION = re.compile(r"_session_([0-9a-fA-F-]{8,})")
#: A body larger than this has its metadata looked for from its end before it is parsed whole:
#: Claude Code writes metadata after the conversation, which grows to megabytes.
FULL_PARSE_BYTES = 64 * 1024
#: How far from the end the metadata is looked for, and at most how much follows it.
METADATA_TAIL_BYTES = 64 * 1024
JSON_SPACE = " \t\r\n"
KEY_COLON = re.compile(r"[ \t\r\n]*:[ \t\r\n]*")


def tail_metadata(body: bytes) -> tuple[Any] | None:
    """Return (metadata,) of a JSON object body, read near its end; None if not found there.

    The last `"metadata":` key is parsed with what follows it; it is the top-level one when
    the members after it close the body's object. A body that is not valid JSON may thus give
    metadata where parsing it whole would fail (the upstream refuses such a body anyway).
    """
    end = len(body)
    start = max(0, end - METADATA_TAIL_BYTES)
    while True:
        at = body.rfind(b'"metadata"', start, end)
        if at < 0:
            return None
        end = at
        quote = at
        while quote > 0 and body[quote - 1] == 0x5C:  # backslashes before the quote
            quote -= 1
        if (at - quote) % 2:
            continue  # an escaped quote: the word is inside a string
        try:
            tail = body[at:].decode()
        except UnicodeDecodeError:
            return None
        colon = KEY_COLON.match(tail, len('"metadata"'))
        if colon is None:
            continue  # a string value, not a key
        try:
            metadata, stop = JSON_DECODER.raw_decode(tail, colon.end())
            rest = tail[stop:].strip(JSON_SPACE)
            if rest.startswith(",") and not rest[1:].lstrip(JSON_SPACE).startswith("}"):
                members, stop = JSON_DECODER.raw_decode("{" + rest[1:])
                if stop == len(rest) and "metadata" not in members:
                    return (metadata,)
            elif rest == "}":
                return (metadata,)
        except JSON_ERRORS:
            pass  # not at the top level, or not valid JSON: parse the body whole
        return None


def metadata_session(metadata: Any) -> str | None:
    """Return the session metadata.user_id names (either format), or None."""
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str) or not user_id:
        return None
    match = USER_ID_SESSION.search(user_id)
    if match:
        return "session:" + match.group(1)
    try:
        described = json.loads(user_id)
    except JSON_ERRORS:
        return None
    if isinstance(described, dict) and described.get("session_id"):
        return "session:" + str(described["session_id"])[:200]
    return None


def conversation_key(session_id: str | None, body: bytes) -> str | None:
    """Identify the conversation a request belongs to, for sticky routing.

    The X-Claude-Code-Session-Id it came with (session_id), else the session in
    metadata.user_id (either format), else a hash of the system prompt and the first message.
    A large body's metadata is read from its end, sparing the parse of the whole conversation.
    """
    if session_id:
        return "session:" + session_id.strip()[:200]
    if not body or body[:1] != b"{":
        return None
    if len(body) > FULL_PARSE_BYTES:
        found = tail_metadata(body)
        session = metadata_session(found[0]) if found else None
        if session:
            return session
    try:
        payload = json.loads(body)
        if not isinstance(payload, dict):
            return None
        session = metadata_session(payload.get("metadata"))
        if session:
            return session
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        opening = json.dumps([payload.get("system"), messages[0]], sort_keys=True, default=str)
    except JSON_ERRORS:  # not JSON, or nested too deep to walk
        return None
    return "hash:" + hashlib.sha256(opening.encode()).hexdigest()[:32]


###############################################################################
# TLS #########################################################################
###############################################################################

#: Seconds a client gets to complete its TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
#: Let a trusted certificate anchor a chain even when it is no root (a mkcert leaf). Python
#: names the OpenSSL flag from 3.10 on; 3.9 needs its value.
VERIFY_PARTIAL_CHAIN = getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    """Return the context that serves HTTPS (TLS 1.2 or newer), or None for plain HTTP.

    Every problem with the files surfaces here, at start, as one line, rather than later in
    each client's failed handshake.
    """
    if not cert and not key:
        return None
    if not cert or not key:
        raise ClaudeflareError("tls_cert and tls_key go together: give both (serve --tls-cert "
                               "FILE --tls-key FILE) for HTTPS, or neither for plain HTTP")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cert)
    except ssl.SSLError as error:
        raise ClaudeflareError(f"The TLS certificate {cert} is not a PEM certificate "
                               f"({error.reason or error}). Make one as the README shows "
                               f"(openssl req -x509 ... or mkcert).") from None
    except OSError as error:
        raise ClaudeflareError(f"Cannot read the TLS certificate {cert}: "
                               f"{error.strerror or error}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # An encrypted key gets an empty password and fails, instead of OpenSSL asking for one
        # on a terminal that a service does not have.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ClaudeflareError(f"The TLS key {key} does not belong to the certificate "
                                   f"{cert}: give the key the certificate was made with") from None
        raise ClaudeflareError(f"The TLS key {key} is not an unencrypted PEM private key "
                               f"({error.reason or error}). Decrypt it: openssl pkey -in "
                               f"{key} -out plain-key.pem") from None
    except OSError as error:
        raise ClaudeflareError(f"Cannot read the TLS key {key}: "
                               f"{error.strerror or error}") from None
    return context


def tls_handshake(connection: ssl.SSLSocket, address: Any) -> bool:
    """Complete a client's TLS handshake; on failure log why and return False.

    It runs on the connection's own thread with its own deadline, never on the accepting
    thread, so a client that connects and stays silent holds up nobody else.
    """
    timeout = connection.gettimeout()
    connection.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
    try:
        connection.do_handshake()
    except OSError as error:
        plain = "HTTP_REQUEST" in str(error)
        component_logger("Server").info("TLS handshake with %s failed: %s%s", address[0], error,
                                        " (it spoke plain HTTP: give it an https:// URL)"
                                        if plain else "")
        return False
    connection.settimeout(timeout)
    return True


def pinned_tls_context(cert: str) -> ssl.SSLContext | None:
    """Return a client context trusting exactly this certificate; None if it cannot be read.

    `health` and `doctor` ask this machine's own server, which serves that very file: trusting
    it alone, whatever name the server is reached by, is stricter than the system's CAs and
    works for a self-signed certificate too.
    """
    try:
        context = ssl.create_default_context(cafile=cert)
    except OSError:
        return None
    context.check_hostname = False
    context.verify_flags |= VERIFY_PARTIAL_CHAIN
    return context


def local_url(host: str, port: int, tls: bool) -> str:
    """Return the URL at which this machine reaches a server bound to host and port."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


###############################################################################
# Holds #######################################################################
###############################################################################

class HoldQueue:
    """Requests waiting for a window's reset instead of a 429 (hold_s), served in arrival order.

    A waiter sleeps on one condition variable until its reset, a ping is due, a request ahead
    of it leaves, or it is time to look whether its client went away: never in a busy loop.
    Of the waiters whose reset has passed, the earliest to arrive goes first, and the next one
    only once it has picked its account (done). close() releases every waiter at shutdown.
    """

    #: Seconds between the SSE `ping` events a waiting stream gets, so that neither the client
    #: nor anything between takes the silence for a dead connection (clients ignore pings).
    ping_interval_s = 15.0
    #: Seconds between looks at whether a waiting client closed its connection.
    check_interval_s = 1.0

    def __init__(self) -> None:
        self.changed = threading.Condition()
        #: waiter -> (when it first began to wait (time.monotonic()), the reset it waits for
        #: (epoch ms)).
        self.waiters: dict[Any, tuple[float, int]] = {}
        self.closed = False

    @property
    def waiting(self) -> int:
        """How many requests are waiting (or picking their account after the wait)."""
        return len(self.waiters)

    def wait(self, waiter: Any, until: int, limit: int, ping: Callable[[], None] | None,
             gone: Callable[[], bool], arrived: float | None = None) -> str:
        """Wait until `until` (epoch ms) and every earlier waiter whose reset passed has left.

        A request that waits again (its account was taken meanwhile) passes its first
        `arrived` (time.monotonic()) and keeps its place. Return "ready" (then call done once
        the account is picked), "full" (limit requests wait already), "gone" (the client went
        away; a failing ping says so too) or "closed" (shutdown).
        """
        with self.changed:
            if self.closed:
                return "closed"
            if len(self.waiters) >= limit:
                return "full"
            self.waiters[waiter] = (time.monotonic() if arrived is None else arrived, until)
        next_ping, ready = time.monotonic() + self.ping_interval_s, False
        try:
            while True:
                with self.changed:
                    if self.closed:
                        return "closed"
                    now = now_ms()
                    ready = self.first_ready(now) is waiter
                    if ready:
                        return "ready"
                    pauses = [self.check_interval_s]
                    if until > now:
                        pauses.append((until - now) / 1000)
                    if ping is not None:
                        pauses.append(max(0.0, next_ping - time.monotonic()))
                    self.changed.wait(min(pauses))
                if ping is not None and time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + self.ping_interval_s
                    try:
                        ping()
                    except OSError:
                        return "gone"
                if gone():
                    return "gone"
        finally:
            if not ready:
                self.done(waiter)

    def first_ready(self, now: int) -> Any:
        """Return the earliest-arrived waiter whose reset has passed, or None."""
        ready = [(arrived, waiter) for waiter, (arrived, until) in self.waiters.items()
                 if until <= now]
        return min(ready, key=operator.itemgetter(0))[1] if ready else None

    def done(self, waiter: Any) -> None:
        """Take a waiter off the queue and let the next one go on."""
        with self.changed:
            self.waiters.pop(waiter, None)
            self.changed.notify_all()

    def close(self) -> None:
        """Release every waiter (shutdown): each answers its client with an error."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()


def client_gone(connection: socket.socket) -> bool:
    """Tell whether a client waiting for its answer closed its connection.

    Its socket then reads as ready with nothing to read. The peek is made on the raw socket,
    so a TLS connection is looked at the same way, and without select() where it can be:
    select() refuses descriptors past 1023, which a busy server hands out.
    """
    dont_wait = getattr(socket, "MSG_DONTWAIT", 0)
    try:
        if not dont_wait:  # Windows, whose select() takes any socket
            readable, _, _ = select.select([connection], [], [], 0)
            if not readable:
                return False
        raw = socket.socket(fileno=connection.fileno())
        try:
            return raw.recv(1, socket.MSG_PEEK | dont_wait) == b""
        finally:
            raw.detach()
    except BlockingIOError:
        return False
    except OSError:
        return True


###############################################################################
# Strict HTTP/1.1 server ######################################################
###############################################################################

# A server that knows nothing of Claude or accounts, as CPython's BaseHTTPRequestHandler keeps
# parse_request apart from do_GET: it reads a request's head against a deadline, refuses what
# RFC 9112 does not allow (smuggling lives in ambiguous framing and cut lines), frames the body,
# and hands the checked request to handle_request().

#: What RFC 9110 allows in a method or a header name.
HTTP_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Header lines, each a token, a colon and a value, ending in LF.
HEADER_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\n]*\n)*")
#: A request target in origin form: a path (and query) of visible ASCII characters.
ORIGIN_FORM = re.compile(rb"/[!-~]*")
HTTP_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
#: Bytes no request line or header may hold once lines end in LF: controls but HTAB (a bare
#: CR, NUL, ...). Bytes from 0x80 are obs-text, allowed in values.
FORBIDDEN_HEAD_BYTES = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
#: A chunk size line (RFC 9112 section 7.1.1): the size, then ;name or ;name=value extensions
#: (a token or a quoted string), optional whitespace around ; and =.
CHUNK_LINE = re.compile(
    rb"(" + CHUNK_SIZE.pattern + rb")(?:[ \t]*;[ \t]*" + HTTP_TOKEN.pattern
    + rb"(?:[ \t]*=[ \t]*(?:" + HTTP_TOKEN.pattern
    + rb'|"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"))?)*[ \t]*\r?\n')
#: Methods the proxy relays (and the local endpoints answer); others get 501.
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
#: The request line and headers together may be at most this large.
MAX_HEAD_BYTES = 256 * 1024


class RequestRefused(Exception):
    """A client request (its head or its body) that cannot be accepted: answered with status,
    and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def too_large_message(size: int) -> str:
    """Explain a 413 to the client."""
    return (f"Request body of {size} bytes or more is larger than the "
            f"{MAX_BODY_BYTES // (1024 * 1024)} MB limit")


class StrictHTTPHandler(http.server.BaseHTTPRequestHandler):
    """Read, check and frame HTTP/1.1 requests; a subclass answers them in handle_request()."""

    protocol_version = "HTTP/1.1"
    timeout = CLIENT_IDLE_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        # Responses go out in as few writes as possible; no write may wait for a delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.body_read = False

    def log_message(self, format: str, *args: Any) -> None:
        component_logger("Server").debug("%s - " + format, self.address_string(), *args)

    @staticmethod
    def error_body(status: int, message: str) -> Any:
        """Describe an error for the client; a subclass gives it the shape its clients know."""
        return {"error": message}

    # -- reading a request's head ---------------------------------------------------------------

    def handle_one_request(self) -> None:
        """Read one request's line and headers, check them (RFC 9112), and answer it.

        Waiting for a request may take the idle timeout; once its first byte is in, the line
        and headers must all arrive within head_deadline_s.
        """
        self.close_connection = True
        self.command, self.path, self.request_version = "", "", "HTTP/1.1"
        self.headers = Headers([])
        self.body_read = self.answered = False
        try:
            head = self.read_head()
            if head is None:
                return
            self.parse_head(head)
        except RequestRefused as refusal:
            component_logger("Server").debug("Refused a request from %s: %d %s",
                                             self.client_address[0], refusal.status, refusal)
            with contextlib.suppress(OSError):
                self.send_json(refusal.status, self.error_body(refusal.status, str(refusal)))
            self.close_connection = True
            return
        except (ConnectionError, socket.timeout, TimeoutError):
            self.close_connection = True
            return
        if self.command not in METHODS:
            self.close_connection = True
            self.send_json(501, self.error_body(501, f"Method {self.command} is not supported"))
            return
        if self.headers.get("Expect", "").lower() == "100-continue" and \
                self.request_version == "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.handle_request()

    def handle_request(self) -> None:
        """Answer the request whose head was read and checked (command, path, headers)."""
        raise NotImplementedError

    def read_head(self) -> bytes | None:
        """Return the request line and headers, or None when the client closed the connection.

        Each read waits at most for what is left of the deadline, so a client sending a byte a
        second still runs out of time.
        """
        data = self.rfile.peek()  # waits up to the idle timeout for a request to begin
        end = head_end(data)
        if end >= 0 and data[:1] not in (b"\r", b"\n"):
            return self.rfile.read(end)
        deadline = time.monotonic() + self.server.head_deadline_s
        head = bytearray()
        try:
            while True:
                if not data:
                    return None
                if not head:  # blank lines before a request line are skipped (RFC 9112)
                    blank = len(data) - len(data.lstrip(b"\r\n"))
                    self.rfile.read(blank)
                    data = data[blank:]
                start = max(0, len(head) - 2)
                head += data
                end = head_end(head, start)
                if end >= 0:
                    self.rfile.read(end - (len(head) - len(data)))
                    return bytes(head[:end])
                self.rfile.read(len(data))
                if len(head) > MAX_HEAD_BYTES:
                    raise RequestRefused(431, f"The request line and headers are larger than "
                                              f"{MAX_HEAD_BYTES // 1024} KB")
                try:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    self.connection.settimeout(remaining)
                    data = self.rfile.peek()
                except (socket.timeout, TimeoutError):
                    raise RequestRefused(408, f"The request line and headers took longer than "
                                              f"{self.server.head_deadline_s:g}s to arrive"
                                         ) from None
        finally:
            self.connection.settimeout(self.timeout)

    def parse_head(self, head: bytes) -> None:
        """Parse and check a request line and its headers; raise RequestRefused if invalid."""
        lines = head.split(b"\n")[:-2]
        request_line = lines[0].rstrip(b"\r")
        self.raw_requestline = lines[0] + b"\n"
        self.requestline = request_line.decode("latin-1")
        words = request_line.split()
        if len(words) != 3:
            raise RequestRefused(400, "Malformed request line: expected METHOD /path HTTP/1.1")
        method, target, version = words
        match = HTTP_VERSION.fullmatch(version)
        if match is None:
            raise RequestRefused(400, "Malformed request line: expected METHOD /path HTTP/1.1")
        if match.group(1) != b"1":
            raise RequestRefused(505, f"HTTP version {version.decode('latin-1')} is not "
                                      f"supported on this port; use HTTP/1.1")
        if not HTTP_TOKEN.fullmatch(method):
            raise RequestRefused(400, "Malformed request line: the method is not a token")
        if not ORIGIN_FORM.fullmatch(target):
            raise RequestRefused(400, "The request target must be a path of visible ASCII "
                                      "characters (percent-encode anything else)")
        self.command = method.decode("ascii")
        self.path = target.decode("ascii")
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        self.request_version = "HTTP/1.0" if version == b"HTTP/1.0" else "HTTP/1.1"
        self.headers = self.parse_header_lines(lines[1:])
        if len(self.headers.get_all("Host", [])) > 1:  # RFC 9112 section 3.2
            raise RequestRefused(400, "More than one Host header: send one")
        self.check_framing()
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = ("close" in connection
                                 or (self.request_version == "HTTP/1.0"
                                     and "keep-alive" not in connection))

    @staticmethod
    def parse_header_lines(lines: list[bytes]) -> Headers:
        """Read header lines: names must be tokens, values free of control characters."""
        if len(lines) > MAX_HEADER_LINES:
            raise RequestRefused(431, f"More than {MAX_HEADER_LINES} header lines")
        # Every line checked at once; line by line only to say what is wrong, if anything.
        block = b"\n".join(lines + [b""]).replace(b"\r\n", b"\n")
        if len(block) <= MAX_HEADER_LINE_BYTES and HEADER_LINES.fullmatch(block) and \
                not FORBIDDEN_HEAD_BYTES.search(block):
            parts = list(map(str.partition, block.decode("latin-1").split("\n")[:-1],
                             itertools.repeat(":")))
            return Headers(list(zip(map(FIRST, parts),
                                    map(str.strip, map(THIRD, parts), itertools.repeat(" \t")))))
        pairs: list[tuple[str, str]] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_HEADER_LINE_BYTES:
                raise RequestRefused(431, "A header line is longer than 64 KB")
            if FORBIDDEN_HEAD_BYTES.search(line):
                raise RequestRefused(400, "A header holds a control character (a bare CR, "
                                          "NUL, ...), which HTTP does not allow")
            if line[:1] in (b" ", b"\t") and pairs:  # obsolete line folding: join with a space
                name, value = pairs[-1]
                pairs[-1] = (name, value + " " + line.strip(b" \t").decode("latin-1"))
                continue
            name, colon, value = line.partition(b":")
            if not colon or not HTTP_TOKEN.fullmatch(name):
                shown = name.decode("latin-1")[:40]
                raise RequestRefused(400, f"Invalid header name {shown!r}: a header name is a "
                                          f"token (letters, digits, -) followed by a colon")
            pairs.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return Headers(pairs)

    def check_framing(self) -> None:
        """Refuse a body whose length is ambiguous (RFC 9112 section 6): smuggling lives there."""
        lengths = {length.strip() for value in self.headers.get_all("Content-Length", [])
                   for length in value.split(",")}
        codings = [coding.strip().lower()
                   for value in self.headers.get_all("Transfer-Encoding", [])
                   for coding in value.split(",") if coding.strip()]
        if len(lengths) > 1:
            raise RequestRefused(400, "Conflicting Content-Length headers")
        if lengths and not CONTENT_LENGTH.fullmatch(next(iter(lengths))):
            raise RequestRefused(400, f"Invalid Content-Length header: {next(iter(lengths))!r}")
        if self.headers.get("Transfer-Encoding") is not None:
            if lengths:
                raise RequestRefused(400, "Both Transfer-Encoding and Content-Length: send one")
            if self.request_version == "HTTP/1.0":
                raise RequestRefused(400, "Transfer-Encoding is not allowed in HTTP/1.0")
            if codings != ["chunked"]:
                raise RequestRefused(501, f"Transfer-Encoding {', '.join(codings) or '(empty)'}"
                                          f" is not supported: send chunked or Content-Length")

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Answer an error in JSON with a status line, whatever asks for it."""
        self.close_connection = True
        self.send_json(code, self.error_body(code, message or http.client.responses.get(code, "")))

    # -- writing -------------------------------------------------------------------------------

    def head_bytes(self, status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
        """Build a status line and header block, closing the connection when it must close."""
        self.answered = True
        if not self.body_read and self.request_has_body():
            # The unread body would be taken for the next request: end this connection instead.
            self.close_connection = True
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines.extend(map(": ".join, headers))
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send_bytes(self, status: int, body: bytes, content_type: str,
                   extra: Iterable[tuple[str, str]] = ()) -> None:
        """Send a whole response in one write."""
        reason = http.client.responses.get(status, "")
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        headers.extend(extra)
        head = self.head_bytes(status, reason, headers)
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def send_json(self, status: int, value: Any, extra: Iterable[tuple[str, str]] = ()) -> None:
        """Send a JSON response."""
        self.send_bytes(status, json_bytes(value), "application/json", extra)

    # -- reading the body ----------------------------------------------------------------------

    def request_has_body(self) -> bool:
        """Tell whether the client announced a request body."""
        return ("chunked" in self.headers.get("Transfer-Encoding", "").lower()
                or self.headers.get("Content-Length", "0").strip() not in ("", "0"))

    def read_body(self) -> bytes:
        """Read the request body (Content-Length or chunked), refusing more than 32 MB unread."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self.read_chunked_body()
        else:
            text = self.headers.get("Content-Length", "0").split(",")[0].strip() or "0"
            if not CONTENT_LENGTH.fullmatch(text):
                raise RequestRefused(400, f"Invalid Content-Length header: {text!r}")
            length = int(text)
            if length > MAX_BODY_BYTES:
                raise RequestRefused(413, too_large_message(length))
            body = self.rfile.read(length)
            if len(body) < length:
                raise RequestRefused(400, "The request body ended before its Content-Length")
        self.body_read = True
        return body

    def read_chunked_body(self) -> bytes:
        """Decode a chunked request body (RFC 9112 section 7.1), stopping as soon as it passes
        the size limit.

        Every line is read whole or refused: a line cut at a bound would leave its tail to be
        read as body or as the next request (smuggling).
        """
        parts, total = [], 0
        while True:
            match = CHUNK_LINE.fullmatch(self.read_chunk_line(400, "A chunk size line"))
            if match is None:
                raise RequestRefused(400, "Malformed chunked request body: a chunk size line is "
                                       "hexadecimal digits, then ;name=value extensions")
            size = int(match.group(1), 16)
            if size == 0:
                self.read_trailer_section()
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise RequestRefused(413, too_large_message(total))
            parts.append(self.rfile.read(size))
            if len(parts[-1]) < size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise RequestRefused(400, "Malformed chunked request body: chunk data longer "
                                       "than its size, or cut short")

    def read_chunk_line(self, status: int, what: str) -> bytes:
        """Read one whole line of chunked framing, refusing it with `status` past the bound."""
        line = self.rfile.readline(MAX_CHUNK_LINE_BYTES + 1)
        if line.endswith(b"\n"):
            return line
        if len(line) > MAX_CHUNK_LINE_BYTES:
            raise RequestRefused(status, f"{what} is longer than {MAX_CHUNK_LINE_BYTES} bytes")
        raise RequestRefused(400, "The chunked request body ended before its last chunk")

    def read_trailer_section(self) -> None:
        """Read and check the trailer fields after the last chunk; they are not relayed."""
        lines, size = [], 0
        while True:
            line = self.read_chunk_line(431, "A trailer line")
            if line in (b"\r\n", b"\n"):
                break
            size += len(line)
            if size > MAX_TRAILER_BYTES:
                raise RequestRefused(431, f"The trailer section is larger than "
                                       f"{MAX_TRAILER_BYTES // 1024} KB")
            lines.append(line[:-1])
        try:
            self.parse_header_lines(lines)
        except RequestRefused as refusal:
            raise RequestRefused(refusal.status, f"In the trailer section: {refusal}") from None

    def discard_rest_of_request(self) -> None:
        """Read and drop what the client is still sending after an early error answer.

        Closing a socket with unread data makes the kernel reset the connection, and a client
        still sending its body would then lose the answer instead of reading it.
        """
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline and self.connection.recv(65536):
                pass


###############################################################################
# Access control ##############################################################
###############################################################################

# Who may use the proxy, as small functions of a request's headers: a web page of another site
# (cross_site), a page that renamed itself to reach a loopback server (host_allowed) and, once
# client keys exist, a client without one (authenticate). The relay answers their refusals.

@functools.lru_cache(maxsize=64)
def host_name(host_header: str) -> str:
    """Return the host name of a Host header value (no port, no brackets), '' if none.

    Kept for the few values a server sees: splitting a URL costs more than the rest of the
    check, on every request.
    """
    try:
        return urllib.parse.urlsplit("//" + host_header).hostname or ""
    except ValueError:  # "[::1" and other malformed values name no host
        return ""


@functools.lru_cache(maxsize=64)
def is_loopback(host: str) -> bool:
    """Tell whether a host name or address is one only this machine can reach.

    Only localhost, names under .localhost and loopback addresses count: a name that merely
    starts with "127." (127.0.0.1.evil.example) belongs to whoever owns its domain.
    """
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_dot_segments(path: str) -> str:
    """Resolve . and .. path segments (percent-encoded ones too) as the upstream would.

    Raise ValueError for a segment that hides a slash or a backslash, so that no path can
    reach a different place upstream from the one it was routed as.
    """
    if "." not in path and "%" not in path and "\\" not in path:
        return path
    segments = path.split("/")[1:]
    resolved: list[str] = []
    for index, segment in enumerate(segments):
        decoded = urllib.parse.unquote(segment)
        if "/" in decoded or "\\" in decoded:
            raise ValueError(f"The path segment {segment!r} hides a slash or a backslash; "
                             f"send the path without it")
        if decoded not in (".", ".."):
            resolved.append(segment)
            continue
        if decoded == ".." and resolved:
            resolved.pop()
        if index == len(segments) - 1:
            resolved.append("")
    return "/" + "/".join(resolved)


def presented_credentials(headers: Headers) -> Iterator[tuple[str, str]]:
    """Yield (header, secret) for each credential the request carries."""
    api_key = headers.get("x-api-key")
    if api_key:
        yield "x-api-key", api_key.strip()
    scheme, _, value = (headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        yield "authorization", value.strip()
    elif scheme.lower() == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return
        yield "authorization", decoded.partition(":")[2]


def authenticate(headers: Headers, keys: list[ClientKey]) -> tuple[ClientKey, str] | None:
    """Return the client key a request presents (x-api-key, Bearer, or Basic password) and the
    header it came in, or None."""
    for header, value in presented_credentials(headers):
        for key in keys:
            if key.matches(value):
                return key, header
    return None


#: What a client without a valid client key is told.
CLIENT_KEY_REQUIRED = ("A valid claudeflare client key is required: send it as x-api-key or "
                       "Authorization: Bearer (ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN). "
                       "Create one with: python3 claudeflare.py keys add NAME")


def host_allowed(bound_host: str, headers: Headers) -> bool:
    """On a loopback address, allow only loopback host names.

    A web page can point its own name at 127.0.0.1 (DNS rebinding) and then talk to the
    proxy as same-origin; its Host header still carries its own name, so refuse that.
    """
    return not is_loopback(bound_host) or is_loopback(host_name(headers.get("Host") or ""))


def cross_site(headers: Headers) -> bool:
    """Tell whether a browser marks the request as sent by a page of another site.

    Browsers send Sec-Fetch-Site and Origin; API clients (SDKs, Claude Code, curl) send
    neither. An Origin of "null" (a sandboxed page) is foreign too.
    """
    site = (headers.get("Sec-Fetch-Site") or "").lower()
    if site and site not in ("same-origin", "none"):
        return True
    origin = headers.get("Origin")
    if origin is None:
        return False
    try:
        return (urllib.parse.urlsplit(origin).netloc.lower()
                != (headers.get("Host") or "").lower())
    except ValueError:  # not a URL at all ("http://[::1"): no page of this server's
        return True


###############################################################################
# The pool ####################################################################
###############################################################################

# The pool's shared state and every routing decision: the accounts as the database and the
# marks of recent answers say, the order to try them in, conversations and the clients the API
# refused as not Claude Code. The handler reaches it as server.app.

#: Every this many requests, conversations past their session are forgotten.
SESSION_PRUNE_EVERY = 256


#: The most clients remembered as not Claude Code; past it, those remembered longest go.
MAX_REMEMBERED_CLIENTS = 1000


class App:
    """The pool: accounts, marks and routing memory, and the workers that keep them current."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.metrics = Metrics()
        #: The last log lines for /api/logs.
        self.recent_logs = RecentLines()
        log.addHandler(self.recent_logs)
        self.upstream = Upstream(settings.upstream_url)
        self.oauth = OAuthClient(settings)
        self.tokens = TokenKeeper(store, self.oauth, self.mark)
        self.tokens.load_kept()
        self.started = time.monotonic()
        #: Guards the account cache and the routing state.
        self.lock = threading.Lock()
        #: (data_version, accounts, client keys) as last read; reread_lock guards a re-read.
        self.cache: tuple[int | None, list[Account], list[ClientKey]] = (None, [], [])
        self.reread_lock = threading.Lock()
        #: account name -> {column: (value, when decided)}: routing marks not yet in the
        #: database; they outlive re-reads, unless a person changed the account since.
        self.pending_marks: dict[str, dict[str, tuple[Any, int]]] = {}
        #: The accounts' credentials, masked in whatever the upstream echoes (see scrub), and
        #: account name -> (its credentials, one pattern for them) for the answers it relays.
        self.secrets: tuple[str, ...] = ()
        self.credential_patterns: dict[str, tuple[tuple[bytes, ...], re.Pattern]] = {}
        self.id_prefix = f"{now_ms():x}{secrets.token_hex(3)}"
        self.request_numbers = itertools.count(1)
        self.turn = 0
        #: conversation key -> (account id, when it was bound): the session strategy's memory.
        self.conversations: dict[str, tuple[int, int]] = {}
        self.conversation_counts: dict[int, int] = {}
        #: account id -> how many windowless 429s in a row it got.
        self.cooldowns: dict[int, int] = {}
        #: Clients the API refused on subscription accounts as not Claude Code, and until when
        #: that is remembered: (who sends, their whole User-Agent and x-app) -> until. Who sends
        #: is the client key, or the connection without keys, never what another client can send.
        self.not_claude_code: dict[tuple[str, str], int] = {}
        self.connection_numbers = itertools.count(1)
        #: What each client key spent, and its requests in flight.
        self.key_ledger = KeyLedger(time_zone(settings.budget_timezone))
        self.key_ledger.load(store, now_ms())
        #: Requests waiting for a window's reset instead of a 429 (hold_s).
        self.holds = HoldQueue()
        self.writer = BackgroundWriter(store, settings, self.after_write)
        self.refresher = BackgroundRefresher(self.tokens, self.accounts)
        self.usage = UsagePoller(settings, self.accounts, self.tokens, self.apply_usage)
        self.alerts = Alerts(settings, store, self.watched,
                             lambda: self.writer.flush(ALERT_STORE_WAIT_S))

    def after_write(self, records: list[RequestRecord],
                    marks: list[tuple[str, dict, int]]) -> None:
        """Count written requests for /metrics, and re-read the accounts the batch changed.

        Marks now in the database leave the overlay, unless a newer one replaced them.
        Re-reading here, on the writer's thread, keeps that work off the request path.
        """
        self.metrics.observe(records)
        # Not while a re-read is between reading the database and applying the overlay: it
        # may have read the accounts before these marks were written.
        with self.reread_lock, self.lock:
            for name, fields, decided_at in marks:
                pending = self.pending_marks.get(name, {})
                for field, value in fields.items():
                    if pending.get(field) == (value, decided_at):
                        del pending[field]
                if not pending:
                    self.pending_marks.pop(name, None)
        self.snapshot()

    def watched(self) -> Watched:
        """Return what alerts watch: accounts, failing refreshes, unsaved records, key budgets."""
        with self.tokens.lock:
            failures = dict(self.tokens.refresh_failures)
        return Watched(self.accounts(), self.earliest_reset(now_ms()), failures,
                       len(self.writer.unwritten), self.writer.failing_since,
                       self.key_ledger.budgets_reached(self.client_keys(), now_ms()))

    def accounts(self) -> list[Account]:
        """Return the accounts, re-read from the database whenever anyone changed it.

        A CLI command in another process (pause, tier, add) thus takes effect on the next request.
        """
        return self.snapshot()[0]

    def client_keys(self) -> list[ClientKey]:
        """Return the client keys, as fresh as the accounts."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[list[Account], list[ClientKey]]:
        """Return the accounts and client keys, re-read whenever anyone changed the database.

        The cache is one tuple, read without a lock. A re-read takes reread_lock, never the
        pool's lock while the database is read: requests go on routing meanwhile.
        """
        version = self.store.data_version()
        cache = self.cache
        if version == cache[0]:
            return cache[1], cache[2]
        with self.reread_lock:
            cache = self.cache
            if version != cache[0]:
                accounts, keys = self.store.accounts(), self.store.client_keys()
                with self.lock:
                    for account in accounts:
                        pending = self.pending_marks.get(account.name, {})
                        for field, (value, decided_at) in list(pending.items()):
                            if (account.changed_at or 0) <= decided_at:
                                setattr(account, field, value)
                            else:  # a person changed the account since: their change wins
                                del pending[field]
                    self.secrets = tuple(secret for account in accounts
                                         for secret in account.credentials())
                    cache = self.cache = (version, accounts, keys)
        return cache[1], cache[2]

    @property
    def cached_accounts(self) -> list[Account]:
        return self.cache[1]

    def credential_pattern(self, account: Account) -> re.Pattern | None:
        """Return one pattern for an account's credentials, to mask them in what it answers:
        built again only when they change, so it holds none the account no longer has."""
        secrets = tuple(secret.encode("latin-1", "replace") for secret in account.credentials())
        if not secrets:
            return None
        known = self.credential_patterns.get(account.name)  # a dict read needs no lock
        if known is None or known[0] != secrets:
            known = (secrets, re.compile(b"|".join(map(re.escape, secrets))))
            with self.lock:
                self.credential_patterns[account.name] = known
        return known[1]

    def scrub(self, text: str) -> str:
        """Redact a text from outside (an upstream error, a path) before it is stored or shown:
        every credential pattern, and every account credential verbatim."""
        text = redact(text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[REDACTED]")
        return text

    def new_request_id(self) -> str:
        """Return a unique request id: this run's random prefix and a counter."""
        return f"{self.id_prefix}-{next(self.request_numbers)}"

    def accounts_to_try(self, accounts: list[Account], conversation: str | None, now: int,
                        client: tuple[str, str] = ("", ""),
                        model: str | None = None) -> list[Account]:
        """Return the usable accounts in the order the strategy wants them tried.

        A client the API refused as not Claude Code gets the API-key accounts first: every
        subscription account would refuse it again. Accounts whose weekly window for the model
        is spent are left out.
        """
        settings = self.settings
        with self.lock:
            self.turn += 1
            if self.turn % SESSION_PRUNE_EVERY == 0:
                self.prune_conversations(now)
            binding = self.conversations.get(conversation) if conversation else None
            if binding and now - binding[1] >= settings.session_duration_ms:
                binding = None
            context = RouteContext(self.turn, settings.session_duration_ms,
                                   binding[0] if binding else None, self.conversation_counts,
                                   model)
            ordered = order_accounts(accounts, settings.lb_strategy, context, now,
                                     settings.overage)
            if self.not_claude_code.get(client, 0) > now:
                ordered.sort(key=lambda account: account.type == "oauth")
            if ordered:
                self.count_use(ordered[0], now)
        return ordered

    def count_use(self, account: Account, now: int) -> None:
        """Count a request against the cached account at once (the writer persists it later)."""
        if account.session_count(now, self.settings.session_duration_ms) == 0:
            account.session_start, account.session_requests = now, 0
        account.session_requests += 1

    def bind_conversation(self, conversation: str | None, account_id: int, now: int) -> None:
        """Stick a conversation to the account that served it, for session_duration_ms."""
        if not conversation:
            return
        with self.lock:
            previous = self.conversations.get(conversation)
            if previous and previous[0] == account_id and \
                    now - previous[1] < self.settings.session_duration_ms:
                return
            if previous:
                self.conversation_counts[previous[0]] -= 1
            self.conversations[conversation] = (account_id, now)
            self.conversation_counts[account_id] = self.conversation_counts.get(account_id, 0) + 1

    def prune_conversations(self, now: int) -> None:
        """Forget conversations whose stickiness ran out (called with the lock held)."""
        expired = [key for key, (_, since) in self.conversations.items()
                   if now - since >= self.settings.session_duration_ms]
        for key in expired:
            account_id, _ = self.conversations.pop(key)
            self.conversation_counts[account_id] -= 1

    def remember_not_claude_code(self, client: tuple[str, str], now: int) -> None:
        """Remember for a while a client subscription accounts refuse; the first time, say what
        serves it.

        The client is who sends (see not_claude_code) with its whole User-Agent and x-app:
        Claude Code itself and scripts built on its SDK share a product name, and only the
        scripts are refused.
        """
        with self.lock:
            known = any(until > now and key[1] == client[1]
                        for key, until in self.not_claude_code.items())
            if len(self.not_claude_code) >= MAX_REMEMBERED_CLIENTS:
                kept = sorted(((until, key) for key, until in self.not_claude_code.items()
                               if until > now), reverse=True)[:MAX_REMEMBERED_CLIENTS // 2]
                self.not_claude_code = {key: until for until, key in kept}
            self.not_claude_code[client] = now + self.settings.session_duration_ms
            api_keys = any(account.type == "api_key" for account in self.cached_accounts)
        if known:
            return
        component_logger("Proxy").warning(
            "Subscription (OAuth) accounts serve Claude Code only, and the API refused them to "
            "the client %s.%s", client[1].partition("|")[0] or "without a User-Agent",
            " Its requests go to API-key accounts first from now on." if api_keys else
            " Add an API-key account for other clients: python3 claudeflare.py add NAME "
            "--api-key")

    def forget_not_claude_code(self, client: tuple[str, str]) -> None:
        """Forget a client a subscription account just served: it is Claude Code after all."""
        with self.lock:
            self.not_claude_code.pop(client, None)

    def note_limits(self, account: Account, limit: RateLimit, now: int) -> None:
        """Keep what a response said of its account's windows, for ordering (headroom, soft).

        The cached account changes at once; the writer stores it with the request's record.
        """
        status, reset = limit.summary()
        with self.lock:
            if status is not None:
                account.rate_limit_status, account.rate_limit_reset = status, reset
            for field in WINDOW_FIELDS:
                if getattr(limit, field) is not None:
                    setattr(account, field, getattr(limit, field))
                    account.windows_at = now
            merged = merge_windows(account, limit.families) if limit.families else None
        if merged is not None:
            self.mark(account, model_windows=merged)

    def note_served(self, account: Account, limit: RateLimit, now: int) -> None:
        """Act on what the headers of an answer an account served say: extra usage in use, a
        window spent (bench it), or included quota back after extra usage."""
        if limit.on_overage:
            self.note_overage(account, limit, now)
        elif limit.hard:
            self.mark_rate_limited(account, limit, now)
        elif (account.overage_until or 0) > now and limit.status is not None:
            self.mark(account, overage_until=None)
            component_logger("Proxy").info("Account %s has included quota again", account.name)

    def note_overage(self, account: Account, limit: RateLimit, now: int) -> None:
        """An account answered on extra usage, billed to its owner: follow the overage policy.

        It is marked `overage` until its window resets, and routing follows the policy when it
        routes: last (`last`), anywhere (`allow`) or not at all (`never`: this one answer could
        not be avoided; nothing more is billed). So a policy changed on a running server
        applies at once, to an account benched by `never` too.
        """
        until = overage_ends(limit, now)
        serving = (account.overage_until or 0) > now
        if serving and abs(until - account.overage_until) < 1000:
            return  # known already: no write per request
        self.mark(account, overage_until=until)
        if serving:
            return
        self.alerts.notice(overage_alert(account, until, self.settings.overage))
        if self.settings.overage == "never":
            component_logger("Proxy").warning(
                "Account %s answered on extra usage (billed); overage is never: benched until %s",
                account.name, iso_time(until))
        else:
            component_logger("Proxy").warning(
                "Account %s is serving on extra usage (billed to its owner) until %s; overage "
                "is %s", account.name, iso_time(until), self.settings.overage)

    def apply_usage(self, account: Account, fields: dict, started: int) -> None:
        """Fold a usage read into an account, keeping windows a newer header reported."""
        with self.lock:
            cached = next((cached for cached in self.cached_accounts
                           if cached.name == account.name), account)
            newer = (cached.windows_at or 0) > started
        if newer or not any(field in fields for field in WINDOW_FIELDS):
            fields = {field: value for field, value in fields.items()
                      if field not in WINDOW_FIELDS and (field != "model_windows" or not newer)}
        else:
            fields["windows_at"] = started
        self.mark(account, usage_read_at=now_ms(), **fields)

    def mark_rate_limited(self, account: Account, limit: RateLimit, now: int,
                          until: int | None = None) -> int:
        """Bench an account until its window resets (or until); a 429 naming no window gets a
        cooldown."""
        with self.lock:
            if until is None and limit.names_window():
                self.cooldowns.pop(account.id, None)
                until = limit.limited_until(now)
            elif until is None:
                streak = self.cooldowns.get(account.id, 0)
                self.cooldowns[account.id] = streak + 1
                wait = max(COOLDOWN_MS * 2 ** min(streak, 10), limit.retry_after_ms or 0)
                until = now + min(wait, MAX_COOLDOWN_MS)
        status, reset = limit.summary()
        status = status or "rate_limited"
        known = account.rate_limited_until == until  # requests answered at once say it once
        self.mark(account, rate_limited_until=until, rate_limit_status=status,
                  rate_limit_reset=reset or until,
                  **{field: getattr(limit, field) for field in WINDOW_FIELDS
                     if getattr(limit, field) is not None})
        self.usage.soon(account, now)
        if not known:
            component_logger("Proxy").warning(
                "Account %s rate limited until %s (%s%s); moving on", account.name,
                iso_time(until), status, f", {limit.claim}" if limit.claim else "")
        return until

    def note_success(self, account: Account) -> None:
        """End a run of windowless 429s: the next one starts the cooldown afresh."""
        if account.id in self.cooldowns:
            with self.lock:
                self.cooldowns.pop(account.id, None)

    def mark(self, account: Account, **fields: Any) -> None:
        """Put a routing mark on an account now; the writer stores it behind the request.

        Routing sees it at once, in the cached account and in an overlay that outlives
        re-reads until the mark is in the database: a request never waits for the database,
        which another process may hold locked.
        """
        decided_at = now_ms()
        with self.lock:
            for cached in [account] + [cached for cached in self.cached_accounts
                                       if cached.name == account.name]:
                for field, value in fields.items():
                    setattr(cached, field, value)
            self.pending_marks.setdefault(account.name, {}).update(
                (field, (value, decided_at)) for field, value in fields.items())
        self.writer.mark(account.name, fields, decided_at)

    def mark_needs_attention(self, account: Account, reason: str) -> None:
        """Stop using an account the upstream refuses for good (banned, not allowed, bad key)."""
        reason = self.scrub(reason)
        self.mark(account, needs_reauth=1, reauth_reason=reason[:300])
        component_logger("Proxy").error("Account %s needs attention and is skipped: %s",
                                        account.name, reason)

    def earliest_reset(self, now: int, model: str | None = None,
                       accounts: list[Account] | None = None) -> int | None:
        """Return when the first account (of the pool, or of accounts) benched by a limit (or,
        under `overage never`, by extra usage, or for the model by its spent weekly window)
        becomes usable again by itself."""
        resets = []
        for account in self.accounts() if accounts is None else accounts:
            status = account.status(now)
            refusal = family_refusal(account, model, now)
            if status == "rate_limited":
                until = account.rate_limited_until
            elif status == "overage" and self.settings.overage == "never":
                until = account.overage_until
            elif status not in ("active", "overage") or refusal is None:
                continue
            else:
                until = now
            resets.append(max(until, refusal[1]) if refusal else until)
        return min(resets) if resets else None

    def refused_family(self, now: int, model: str | None,
                       accounts: list[Account]) -> str | None:
        """Return the per-model window (seven_day_opus) that keeps a model off one of the
        accounts that could otherwise serve it, or None: the 429 for that model names it."""
        return next((refusal[0] for account in accounts
                     for refusal in [family_refusal(account, model, now)] if refusal), None)

    def stop_background(self) -> None:
        """Start no more usage reads or token refreshes: the server is shutting down."""
        self.usage.stopping.set()
        self.refresher.stopping.set()

    def close(self, deadline: float = 0.0) -> None:
        """Write the queued request log, then release the upstream connections and database.

        Usage reads and token refreshes still running at deadline (time.monotonic()) are cut.
        """
        log.removeHandler(self.recent_logs)
        self.alerts.close(deadline)
        self.usage.close(deadline)
        self.refresher.close(deadline)
        self.writer.close()
        self.tokens.keep_unsaved()
        self.upstream.close()
        self.oauth.close()
        self.store.close()


###############################################################################
# Local API ###################################################################
###############################################################################

# /health, /metrics, the JSON API and the status page, as a route table (as bottle's Router maps
# method and path to a callback): a new endpoint is one function and one @route line. Errors of
# every endpoint are answered in one place, answer_local().

class BadRequest(Exception):
    """A local API request that cannot be answered as asked; the message says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def query_limit(query: dict[str, list[str]], default: int, maximum: int) -> int:
    """Read the `limit` query parameter: a whole number from 1 to maximum."""
    text = (query.get("limit") or [str(default)])[-1]
    if not re.fullmatch(r"[0-9]{1,7}", text) or not 1 <= int(text) <= maximum:
        raise BadRequest(f"Invalid limit: {text} (valid: a whole number from 1 to {maximum})")
    return int(text)


#: /api/analytics ranges: how far back, and the bucket size that suits it.
ANALYTICS_RANGES = {"1h": (HOUR_MS, 60_000), "6h": (6 * HOUR_MS, 5 * 60_000),
                    "24h": (24 * HOUR_MS, HOUR_MS), "7d": (7 * 24 * HOUR_MS, 6 * HOUR_MS),
                    "30d": (30 * 24 * HOUR_MS, 24 * HOUR_MS)}


def camel(name: str) -> str:
    """Turn a snake_case name into the API's camelCase."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def usage_json(row: Any) -> dict:
    """Describe summed usage (a usage_hourly or usage_series row; None for nothing)."""
    def value(column: str) -> Any:
        return (row[column] if row is not None else None) or 0

    requests, failures = value("requests"), value("failures")
    buckets = [value(column) for column in LATENCY_COLUMNS]
    tokens = value("input_tokens") + value("output_tokens")
    return {"requests": requests, "successes": requests - failures, "failures": failures,
            "successRate": round((requests - failures) / requests, 4) if requests else None,
            "inputTokens": value("input_tokens"), "outputTokens": value("output_tokens"),
            "cacheCreationTokens": value("cache_creation_tokens"),
            "cacheReadTokens": value("cache_read_tokens"), "totalTokens": tokens,
            "costUsd": round(value("cost_usd"), 6), "unpricedRequests": value("unpriced"),
            "overageRequests": value("overage_requests"),
            "overageCostUsd": round(value("overage_cost_usd"), 6),
            "claudeCodeOnlyRefusals": value("claude_code_only"),
            "avgLatencyMs": round(value("latency_ms_total") / requests) if requests else None,
            "p95LatencyMs": min_known(percentile_from_histogram(buckets, 0.95),
                                      value("latency_ms_max"))}


def min_known(estimate: int | None, ceiling: int) -> int | None:
    """Cap a histogram estimate at the largest value seen (the estimate cannot exceed it)."""
    return estimate if estimate is None else min(estimate, ceiling)


#: Request-log columns shown as booleans, and those that came from outside (masked again when
#: shown, for records an older claudeflare stored unmasked).
BOOLEAN_COLUMNS = frozenset({"success", "streaming", "overage", "claude_code_only"})
OUTSIDE_COLUMNS = frozenset({"path", "error"})


def request_json(row: Any) -> dict:
    """Describe one request record for the API."""
    described = {}
    for column in row.keys():
        value = row[column]
        if column in BOOLEAN_COLUMNS:
            value = bool(value)
        elif column in OUTSIDE_COLUMNS and value:
            value = redact(value)
        described[camel(column)] = value
    return described


def named_usage(rows: list[Any]) -> list[dict]:
    """Describe usage grouped by account, model or client key ('' becomes null)."""
    return [{"name": row["name"] or None, **usage_json(row)} for row in rows]


def stats_report(store: Store, now: int) -> dict:
    """Return /api/stats (and `stats`): totals, the last 24 hours, breakdowns, recent errors."""
    return {"totals": usage_json(store.usage()[0]),
            "last24h": usage_json(store.usage(now - 24 * HOUR_MS)[0]),
            "accounts": named_usage(store.usage(0, "account_name")),
            "models": named_usage(store.usage(0, "model")),
            "clientKeys": named_usage(store.usage(0, "client_key")),
            "recentErrors": [request_json(row)
                             for row in store.recent_requests(10, failures_only=True)]}


def health_report(app: App) -> tuple[int, dict]:
    """Return /health's status code and body: unavailable (503) when no account can serve."""
    now = now_ms()
    accounts = app.accounts()
    statuses = [account.status(now) for account in accounts]
    counts = {"total": len(statuses)}
    for status in ("active", "paused", "rate_limited", "overage", "needs_reauth", "expired"):
        counts[status] = statuses.count(status)
    if accounts and not any(can_serve(account, now, app.settings.overage)
                            for account in accounts):
        state = "unavailable"
    elif counts["active"] + counts["paused"] < len(statuses):
        state = "degraded"
    else:
        state = "ok"
    body = {"status": state, "accounts": counts, "strategy": app.settings.lb_strategy,
            "uptime": int((time.monotonic() - app.started) * 1000), "version": __version__}
    return (503 if state == "unavailable" else 200), body


def usage_series(app: App, span: str, now: int) -> list[dict]:
    """Return usage per bucket over a range, every bucket present (empty ones as zeros)."""
    length, bucket = ANALYTICS_RANGES[span]
    since = now - length
    rows = {row["bucket"]: row for row in app.store.usage_series(since, bucket)}
    return [{"time": start, **usage_json(rows.get(start))}
            for start in range(since // bucket * bucket, now + 1, bucket)]


def analytics_report(app: App, span: str, now: int) -> dict:
    """Return /api/analytics: a series in buckets that suit the range, and breakdowns."""
    length, bucket = ANALYTICS_RANGES[span]
    since = now - length
    return {"range": span, "bucketMs": bucket, "since": since,
            "series": usage_series(app, span, now),
            "models": named_usage(app.store.usage(since, "model")),
            "accounts": named_usage(app.store.usage(since, "account_name"))}


def accounts_report(app: App, now: int) -> list[dict]:
    """Return /api/accounts: everything `list` shows, never a credential."""
    return [account_json(account, now, app.settings.session_duration_ms)
            for account in app.accounts()]


def config_report(app: App) -> dict:
    """Return /api/config: the settings in force and where each came from."""
    settings = app.settings
    return {"settings": {camel(key): shown_setting(key, value)
                         for key, value in settings.values.items()},
            "sources": {camel(key): source for key, source in settings.sources.items()},
            "strategies": list(STRATEGY_NAMES), "configPath": settings.config.path,
            "databasePath": app.store.path, "logDir": log_folder()[0],
            "version": __version__}


def keys_report(app: App, now: int) -> list[dict]:
    """Describe every client key with its spending and load, for /api/keys."""
    return [key_json(key, app.key_ledger.usage(key.name, now), now)
            for key in app.client_keys()]


@dataclass
class LocalRequest:
    """What an endpoint sees of a request: its method, path and query, its headers, a way to
    read its body, the server's life (in-flight requests) and its client key."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Headers
    read_body: Callable[[], bytes]
    life: ServerLife
    #: The client key the request came with (None: no keys exist).
    key: ClientKey | None = None


@dataclass
class Page:
    """An answer that is not JSON: the status page, /metrics."""

    body: bytes
    content_type: str
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


#: (method, path) -> endpoint(app, request) -> (status, JSON value or Page). A path segment "*"
#: matches any one segment; GET routes answer HEAD too.
ROUTES: dict[tuple[str, str], Callable[[App, LocalRequest], tuple[int, Any]]] = {}


def route(method: str, *paths: str) -> Callable:
    """Register an endpoint for a method and its paths: one row of the route table."""
    def register(endpoint: Callable[[App, LocalRequest], tuple[int, Any]]) -> Callable:
        for path in paths:
            ROUTES[method, path] = endpoint
        return endpoint
    return register


def find_endpoint(method: str, path: str) -> Callable[[App, LocalRequest], tuple[int, Any]] | None:
    """Return the endpoint of a method and path, or None."""
    method = "GET" if method == "HEAD" else method
    endpoint = ROUTES.get((method, path))
    if endpoint is not None:
        return endpoint
    segments = path.split("/")
    for (route_method, pattern), endpoint in ROUTES.items():
        parts = pattern.split("/")
        if route_method == method and "*" in parts and len(parts) == len(segments) and all(
                part in ("*", segment) for part, segment in zip(parts, segments)):
            return endpoint
    return None


def answer_local(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer a local request through the route table; every endpoint's error is said here."""
    endpoint = find_endpoint(request.method, request.path)
    try:
        if endpoint is None:
            raise BadRequest(PROVIDER_PATH_ERROR, 404)
        return endpoint(app, request)
    except BadRequest as error:
        return error.status, {"error": str(error)}
    except ClaudeflareError as error:
        return (404 if isinstance(error, NotFound) else 400), {"error": str(error)}
    except sqlite3.OperationalError as error:
        if not is_locked(error):
            raise
        return 503, {"error": locked_message(app.store.path)}


def changing(request: LocalRequest) -> dict:
    """Refuse a state change a web page of another site asks for (CSRF); read its JSON body.

    A plain form cannot send a JSON content type, so one is required too. An empty body reads
    as {}.
    """
    if cross_site(request.headers):
        raise BadRequest("Cross-site requests may not change claudeflare", 403)
    if not (request.headers.get("Content-Type") or "").lower().startswith("application/json"):
        raise BadRequest("Send the request with Content-Type: application/json", 415)
    if request.key is not None and key_is_limited(request.key):
        raise BadRequest(f"The client key {request.key.name} has limits, so it may not change "
                         f"claudeflare: use a key without limits, or the CLI", 403)
    try:
        body = request.read_body()
    except RequestRefused as error:
        raise BadRequest(str(error), error.status) from None
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except JSON_ERRORS:
        raise BadRequest("The request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("The request body must be a JSON object")
    return value


@route("GET", "/health")
def health_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Say whether any account can serve: the cron line's check."""
    return health_report(app)


@route("GET", "/metrics")
def metrics_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer Prometheus text: requests, accounts, client keys and alerts."""
    now = now_ms()
    text = (app.metrics.render(app.accounts(), now, time.monotonic() - app.started)
            + "".join(line + "\n" for line in app.key_ledger.metrics(app.client_keys(), now))
            + app.alerts.metrics_text())
    return 200, Page(text.encode(), "text/plain; version=0.0.4; charset=utf-8")


@route("GET", "/api/stats")
def stats_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer totals, breakdowns and recent errors, and how many requests wait for a reset."""
    return 200, {**stats_report(app.store, now_ms()), "waiting": app.holds.waiting}


@route("GET", "/api/accounts")
def accounts_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer every account as `list --json` shows it."""
    return 200, accounts_report(app, now_ms())


@route("GET", "/api/keys")
def keys_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer every client key with its limits, spending and load."""
    return 200, keys_report(app, now_ms())


@route("GET", "/api/requests")
def requests_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer the latest request records."""
    limit = query_limit(request.query, 50, 1000)
    return 200, [request_json(row) for row in app.store.recent_requests(limit)]


@route("GET", "/api/analytics")
def analytics_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer usage over a range in buckets that suit it."""
    span = (request.query.get("range") or ["24h"])[-1]
    if span not in ANALYTICS_RANGES:
        raise BadRequest(f"Invalid range: {span} (valid: {', '.join(ANALYTICS_RANGES)})")
    return 200, analytics_report(app, span, now_ms())


@route("GET", "/api/config")
def config_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer the settings in force and where each came from."""
    return 200, config_report(app)


@route("GET", "/api/alerts")
def alerts_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer where alerts go and the latest alerts with their deliveries."""
    return 200, alerts_report(app.settings, app.store,
                              query_limit(request.query, 50, MAX_STORED_ALERTS))


@route("GET", "/api/logs")
def logs_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer the latest log lines."""
    return 200, app.recent_logs.lines(query_limit(request.query, 100, 1000))


@route("POST", "/api/config/strategy")
def strategy_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Switch the strategy now and save it to the config file."""
    strategy = changing(request).get("strategy")
    if not isinstance(strategy, str):
        raise BadRequest(f"Send {{\"strategy\": NAME}} with NAME one of "
                         f"{', '.join(STRATEGY_NAMES)}")
    app.settings.set_live("lb_strategy", strategy)
    component_logger("Config").info("Strategy set to %s through the API", strategy)
    return 200, {"strategy": strategy}


@route("POST", "/api/stats/reset")
def reset_stats_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Zero the per-account counters, after the requests already answered are counted."""
    changing(request)
    request.life.settle(1.0)
    app.writer.flush()
    return 200, {"reset": app.store.reset_stats()}


@route("POST", "/api/accounts/*/pause", "/api/accounts/*/resume")
def account_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Pause or resume an account, as the commands do."""
    changing(request)
    *_, quoted, action = request.path.split("/")
    name = urllib.parse.unquote(quoted)
    account = app.store.change_account(name, **({"paused": 1} if action == "pause"
                                                else RESUMED))
    component_logger("Proxy").info("Account %s %sd through the API", name, action)
    return 200, account_json(account, now_ms(), app.settings.session_duration_ms)


###############################################################################
# Status page #################################################################
###############################################################################

#: The status page. Every $value is escaped before it is put in; the CSS is never formatted.
STATUS_PAGE = string.Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="15">
<title>claudeflare: $status</title>
<style>
:root { color-scheme: light dark; --ok: #1a7f37; --warn: #bf8700; --bad: #cf222e;
        --muted: #6e7781; --line: #d0d7de88; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 0 auto; max-width: 1280px; padding: 12px 16px 32px; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 12px; }
h1 { font-size: 22px; margin: 0; }
h2 { font-size: 16px; margin: 24px 0 8px; }
.badge { padding: 1px 10px; border-radius: 10px; color: #fff; font-weight: 600; }
.ok, .active { background: var(--ok); }
.degraded, .paused, .rate_limited { background: var(--warn); }
.unavailable, .needs_reauth, .expired { background: var(--bad); }
.overage { background: #bc4c00; }
.status { padding: 0 6px; border-radius: 6px; color: #fff; font-size: 12px; }
.muted { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr));
         gap: 8px; margin-top: 16px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
.card b { display: block; font-size: 20px; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 6px; border-bottom: 1px solid var(--line);
         white-space: nowrap; vertical-align: top; }
th { font-weight: 600; font-size: 12px; color: var(--muted); white-space: normal; }
td.num, th.num { text-align: right; }
td.wrap { white-space: normal; overflow-wrap: anywhere; min-width: 9em; }
td.name { min-width: 10em; }
table.keys td { white-space: normal; }
.keys .bar { display: block; margin: 3px 0; }
.line { display: block; font-size: 12px; }
.bar { display: inline-block; width: 56px; height: 8px; border-radius: 4px;
       background: var(--line); vertical-align: middle; margin-right: 6px; overflow: hidden; }
.bar i { display: block; height: 100%; background: var(--ok); }
.bar i.high { background: var(--warn); }
.bar i.full { background: var(--bad); }
.chart { margin: 0; }
.legend { display: flex; flex-wrap: wrap; gap: 2px 16px; font-size: 12px; color: var(--muted);
          margin-bottom: 4px; }
.key { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
       margin-right: 4px; background: #0969da; }
.key.errors { background: var(--bad); }
svg { display: block; width: 100%; height: 140px; border-bottom: 1px solid var(--line); }
svg rect { fill: #0969da; }
svg rect.errors { fill: var(--bad); }
.hours { position: relative; height: 18px; font-size: 12px; color: var(--muted); }
.hours span { position: absolute; transform: translateX(-50%); }
.error { color: var(--bad); white-space: normal; min-width: 240px; overflow-wrap: anywhere; }
@media (max-width: 999px) {
  table.accounts, .accounts tbody { display: block; }
  .accounts thead { display: none; }
  .accounts tr { display: grid; grid-template-columns: repeat(6, minmax(0, 1fr)); gap: 6px 8px;
                 border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px;
                 margin-bottom: 8px; }
  .accounts td { grid-column: span 2; border: 0; padding: 0; text-align: left;
                 white-space: normal; overflow-wrap: anywhere; min-width: 0; }
  .accounts td.wrap, .accounts td[colspan] { grid-column: 1 / -1; }
  .accounts td.window { grid-column: span 3; order: 1; }
  .accounts td.name { font-size: 16px; }
  .accounts td::before { content: attr(data-label); display: block; font-size: 12px;
                         color: var(--muted); }
}
@media (max-width: 720px) {
  .flow thead { display: none; }
  table.flow, .flow tbody { display: block; }
  .flow tr { display: flex; flex-wrap: wrap; gap: 0 12px; padding: 4px 0;
             border-bottom: 1px solid var(--line); }
  .flow td { border: 0; padding: 0; white-space: normal; overflow-wrap: anywhere; min-width: 0; }
  .flow td.label::before { content: attr(data-label) " "; color: var(--muted); }
  .flow td.error { flex-basis: 100%; }
}
</style>
</head>
<body>
<header>
<h1>claudeflare</h1>
<span class="badge $status">$status</span>
<span class="muted">version $version · up $uptime · strategy <b>$strategy</b> · $updated</span>
</header>
<section class="cards">
<div class="card"><span class="muted">Requests, 24 h</span><b>$requests</b></div>
<div class="card"><span class="muted">Success rate</span><b>$success_rate</b></div>
<div class="card"><span class="muted">Tokens, 24 h</span><b>$tokens</b></div>
<div class="card"><span class="muted">Cost, 24 h</span><b>$cost</b></div>
<div class="card"><span class="muted">Extra usage, 24 h</span><b>$overage</b></div>
<div class="card"><span class="muted">p95 latency</span><b>$p95</b></div>
<div class="card"><span class="muted">Accounts active</span><b>$active</b></div>
<div class="card"><span class="muted">Waiting for a reset</span><b>$waiting</b></div>
</section>
<h2>Accounts</h2>
<div class="scroll"><table class="accounts">
<thead><tr><th>Name</th><th>Type</th><th class="num">Tier</th><th class="num">Priority</th>
<th>Status</th><th class="num">Requests</th><th>Token expires</th><th>5-hour window</th>
<th>7-day window</th><th>Last used</th></tr></thead>
<tbody>
$accounts
</tbody>
</table></div>
<h2>Client keys</h2>
<div class="scroll"><table class="accounts keys">
<thead><tr><th>Name</th><th>Owner</th><th>Status</th><th>Today</th><th>This week</th>
<th>This month</th><th class="num">Tokens today</th><th class="num">In flight</th>
<th>Limits</th><th>Last used</th><th>Expires</th></tr></thead>
<tbody>
$keys
</tbody>
</table></div>
<h2>Requests per hour, last 24 hours</h2>
$chart
<h2>Last 20 requests</h2>
<div class="scroll"><table class="flow">
<thead><tr><th>Time</th><th>Account</th><th>Model</th><th class="num">Status</th>
<th class="num">Time</th><th class="num">Tokens in/out</th><th class="num">Cost</th></tr>
</thead>
<tbody>
$requests_rows
</tbody>
</table></div>
<h2>Recent errors</h2>
<div class="scroll"><table class="flow">
<thead><tr><th>Time</th><th>Account</th><th class="num">Status</th><th>Error</th></tr></thead>
<tbody>
$errors
</tbody>
</table></div>
<h2>Alerts</h2>
<p class="muted">$alert_destinations</p>
<div class="scroll"><table class="flow">
<thead><tr><th>Time</th><th>Event</th><th>Account</th><th>Message</th><th>Delivery</th></tr>
</thead>
<tbody>
$alerts
</tbody>
</table></div>
</body>
</html>
""")


def escape(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def duration_text(milliseconds: int) -> str:
    """Say a duration briefly: 45s, 12m, 3h 5m, 2d 4h."""
    seconds = max(0, milliseconds // 1000)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def when_text(ms: int | None, now: int) -> str:
    """Say when something happens or happened, relative to now."""
    if not ms:
        return "-"
    return f"in {duration_text(ms - now)}" if ms > now else f"{duration_text(now - ms)} ago"


def window_cell(label: str, used: float | None, reset: int | None, now: int,
                windowed: bool, notes: str = "") -> str:
    """Draw a rate-limit window: a bar of its real utilization and when it resets (and, under
    it, notes in HTML). Only subscription (OAuth) accounts have these windows: for the others
    they are n/a."""
    if used is None:
        return (f'<td class="window muted" data-label="{label}">'
                f'{"no data yet" if windowed else "n/a"}{notes}</td>')
    if reset and reset <= now:
        used = 0.0
    level = "full" if used >= 0.9 else "high" if used >= 0.7 else ""
    resets = ("resets " if reset > now else "reset ") + when_text(reset, now) if reset else ""
    return (f'<td class="window" data-label="{label}"><span class="bar"><i class="{level}" '
            f'style="width:{min(used, 1) * 100:.0f}%"></i></span>{used * 100:.0f}%'
            f'<span class="line muted">{escape(resets)}</span>{notes}</td>')


def account_row(account: Account, now: int, session_duration_ms: int) -> str:
    """Draw one account as a table row (a card on a phone: each cell says what it is)."""
    status = account.status(now)
    detail = ""
    if status == "rate_limited":
        detail = f"limited, resets {when_text(account.rate_limited_until, now)}"
    elif status == "overage":
        detail = f"extra usage (billed), quota back {when_text(account.overage_until, now)}"
    elif status == "needs_reauth":
        detail = redact(account.reauth_reason or "")
    windowed = account.type == "oauth"
    expires = when_text(account.expires_at, now) if windowed else "-"
    five_hours = window_cell("5-hour window", account.utilization_5h, account.reset_5h, now,
                             windowed)
    seven_days = window_cell("7-day window", account.utilization_7d, account.reset_7d, now,
                             windowed, model_window_notes(account, now))
    return (f'<tr><td class="name wrap"><b>{escape(account.name)}</b>'
            f'<span class="line muted">{escape(account.email or "")}</span></td>'
            f'<td data-label="Type">{escape(account.type)}</td>'
            f'<td class="num" data-label="Tier">{account.account_tier}</td>'
            f'<td class="num" data-label="Priority">{account.priority}</td>'
            f'<td class="wrap" data-label="Status"><span class="status {escape(status)}">'
            f'{escape(status)}</span><span class="line muted">{escape(detail)}</span>'
            f'{extra_usage_note(account, now)}</td>'
            f'<td class="num" data-label="Requests">'
            f'{account.session_count(now, session_duration_ms)}/<wbr>{account.request_count}</td>'
            f'<td data-label="Token expires">{escape(expires)}</td>'
            f'{five_hours}{seven_days}'
            f'<td data-label="Last used">{escape(when_text(account.last_used, now))}</td></tr>')


def key_row(key: dict, now: int) -> str:
    """Draw one client key as a table row: what it spent against each budget as a bar."""
    cells = "".join(budget_cell(label, key["spent"][period],
                                key["limits"][f"budget{period.title()}"])
                    for period, label in zip(PERIODS, ("Today", "This week", "This month")))
    status = escape(key["status"])
    return (f'<tr><td class="name wrap"><b>{escape(key["name"])}</b></td>'
            f'<td data-label="Owner">{escape(key["owner"] or "-")}</td>'
            f'<td data-label="Status"><span class="status {status}">{status}</span></td>{cells}'
            f'<td class="num" data-label="Tokens today">{key["spent"]["tokensDay"]:,}</td>'
            f'<td class="num" data-label="In flight">{key["inFlight"]}</td>'
            f'<td class="wrap" data-label="Limits">{escape(limits_text(key))}</td>'
            f'<td data-label="Last used">{escape(when_text(key["lastUsed"], now))}</td>'
            f'<td data-label="Expires">{escape(when_text(key["expiresAt"], now))}</td></tr>')


def budget_cell(label: str, spent: float, budget: float | None) -> str:
    """Draw what a key spent in a period: against its budget as a bar, if it has one."""
    if budget is None:
        return f'<td data-label="{label}">{escape(usd(spent))}</td>'
    used = spent / budget if budget else 1.0
    level = "full" if used >= 1 else "high" if used >= 0.8 else ""
    return (f'<td data-label="{label}"><span class="bar"><i class="{level}" '
            f'style="width:{min(used, 1) * 100:.0f}%"></i></span>{escape(usd(spent))} '
            f'<span class="muted">of {escape(usd(budget))}</span></td>')


def model_window_notes(account: Account, now: int) -> str:
    """Draw an account's per-model weekly windows under its 7-day one: use, limited, reset."""
    notes = []
    for name, window in sorted(model_windows(account).items()):
        used = window.get("utilization") if isinstance(window, dict) else None
        if not isinstance(used, (int, float)):
            continue
        reset = window.get("resetsAt")
        state = "limited" if window_spent(window, now) else f"{used * 100:.0f}%"
        if reset and reset <= now:
            state = "0%"
        notes.append(f'<span class="line"><span class="muted">{escape(family_label(name))}: '
                     f'</span>{escape(state)} <span class="muted">resets '
                     f'{escape(when_text(reset, now))}</span></span>')
    return "".join(notes)


def extra_usage_note(account: Account, now: int) -> str:
    """Say, under an account's status, whether extra usage is on for it, where known."""
    if account.overage_enabled is None:
        return ""
    if not account.overage_enabled:
        reason = f" ({account.overage_disabled_reason})" if account.overage_disabled_reason else ""
        return f'<span class="line muted">extra usage off{escape(reason)}</span>'
    reset = (f", allowance resets {when_text(account.overage_reset, now)}"
             if account.overage_reset else "")
    return f'<span class="line muted">extra usage on{escape(reset)}</span>'


def hourly_chart(series: list[dict]) -> str:
    """Draw requests per hour as an inline SVG bar chart, the failed part of each bar in red.

    The SVG stretches to the page's width, so its legend and hours are HTML around it: text
    inside it would shrink with a narrow page."""
    width, height, top = 720, 120, max([point["requests"] for point in series] + [1])
    step = width / max(len(series), 1)
    bars, hours = [], []
    for index, point in enumerate(series):
        x = index * step
        total = point["requests"] / top * (height - 4)
        failed = point["failures"] / top * (height - 4)
        moment = time.strftime("%H:00", time.gmtime(point["time"] / 1000))
        bars.append(f'<rect x="{x + 1:.1f}" y="{height - total:.1f}" '
                    f'width="{step - 2:.1f}" height="{total:.1f}"><title>{moment} UTC: '
                    f'{point["requests"]} requests, {point["failures"]} failed</title></rect>')
        if failed:
            bars.append(f'<rect class="errors" x="{x + 1:.1f}" y="{height - failed:.1f}" '
                        f'width="{step - 2:.1f}" height="{failed:.1f}"></rect>')
        if index % 6 == 3:  # under its bar, and never past either edge
            hours.append(f'<span style="left:{(x + step / 2) / width * 100:.1f}%">'
                         f'{moment}</span>')
    return (f'<figure class="chart"><figcaption class="legend">'
            f'<span><span class="key"></span>requests</span>'
            f'<span><span class="key errors"></span>of which failed</span>'
            f'<span>max {top} requests/hour · hours in UTC</span></figcaption>'
            f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" '
            f'aria-label="Requests per hour">{"".join(bars)}</svg>'
            f'<div class="hours">{"".join(hours)}</div></figure>')


def request_row(row: dict, now: int) -> str:
    """Draw one request record as a table row."""
    cost = "-" if row["costUsd"] is None else f"${row['costUsd']:.4f}"
    return (f"<tr><td>{escape(when_text(row['timestamp'], now))}</td>"
            f"<td class=\"wrap\">{escape(row['accountName'] or 'client credentials')}</td>"
            f"<td>{escape(row['model'] or '-')}</td>"
            f"<td class=\"num label\" data-label=\"status\">{escape(row['status'])}</td>"
            f"<td class=\"num\">{escape(row['responseTimeMs'])} ms</td>"
            f"<td class=\"num label\" data-label=\"tokens\">"
            f"{row['inputTokens']}/{row['outputTokens']}</td>"
            f"<td class=\"num\">{escape(cost)}</td></tr>")


def error_row(row: dict, now: int) -> str:
    """Draw one failed request as a table row."""
    return (f"<tr><td>{escape(when_text(row['timestamp'], now))}</td>"
            f"<td class=\"wrap\">{escape(row['accountName'] or 'client credentials')}</td>"
            f"<td class=\"num label\" data-label=\"status\">{escape(row['status'])}</td>"
            f"<td class=\"error\">{escape(row['error'] or '')}</td></tr>")


def alert_row(alert: dict, now: int) -> str:
    """Draw one stored alert, with what each destination made of it, as a table row."""
    return (f"<tr><td>{escape(when_text(alert['time'], now))}</td>"
            f"<td>{escape(alert['event'])} <span class=\"muted\">{escape(alert['severity'])}"
            f"</span></td><td class=\"label\" data-label=\"account\">"
            f"{escape(alert['account'] or '-')}</td>"
            f"<td class=\"error\">{escape(alert['message'])}</td>"
            f"<td class=\"error\">{escape(delivery_summary(alert))}</td></tr>")


@route("GET", "/", "/dashboard")
def status_page_endpoint(app: App, request: LocalRequest) -> tuple[int, Any]:
    """Answer the status page."""
    return 200, Page(render_status_page(app, now_ms()).encode(), "text/html; charset=utf-8",
                     [("Cache-Control", "no-store")])


def render_status_page(app: App, now: int) -> str:
    """Render the status page: health, accounts with real window use, 24 h totals, requests."""
    _, health = health_report(app)
    last_day = usage_json(app.store.usage(now - 24 * HOUR_MS)[0])
    series = usage_series(app, "24h", now)
    recent = [request_json(row) for row in app.store.recent_requests(20)]
    errors = [request_json(row) for row in app.store.recent_requests(10, failures_only=True)]
    empty = '<tr><td colspan="10" class="muted">{}</td></tr>'
    rate = last_day["successRate"]
    return STATUS_PAGE.substitute(
        status=escape(health["status"]), version=escape(__version__),
        uptime=escape(duration_text(health["uptime"])),
        strategy=escape(health["strategy"]), updated=escape(iso_time(now)),
        requests=last_day["requests"],
        success_rate="-" if rate is None else f"{rate * 100:.1f}%",
        tokens=f"{last_day['totalTokens']:,}", cost=escape(f"${last_day['costUsd']:.2f}"),
        overage=escape(f"{last_day['overageRequests']} (${last_day['overageCostUsd']:.2f})"),
        p95="-" if last_day["p95LatencyMs"] is None else f"{last_day['p95LatencyMs']} ms",
        active=f"{health['accounts']['active']}/{health['accounts']['total']}",
        waiting=app.holds.waiting,
        accounts="".join(account_row(account, now, app.settings.session_duration_ms)
                         for account in app.accounts())
        or empty.format("No accounts yet: python3 claudeflare.py add NAME"),
        keys="".join(key_row(key, now) for key in keys_report(app, now))
        or empty.format("No client keys: anyone who can reach the proxy may use it. Add one: "
                        "python3 claudeflare.py keys add NAME"),
        chart=hourly_chart(series),
        requests_rows="".join(request_row(row, now) for row in recent)
        or empty.format("No requests yet"),
        errors="".join(error_row(row, now) for row in errors) or empty.format("No errors"),
        **alerts_section(app, now))


def alerts_section(app: App, now: int) -> dict:
    """Return the status page's Alerts section: where alerts go, and the latest ten."""
    report = alerts_report(app.settings, app.store, 10)
    names = ", ".join(destination["name"] for destination in report["destinations"])
    return {"alert_destinations": escape(
                f"Sent to {names}." if names else "No destination: alerts are only kept here "
                "(set alert_url or alert_command to be told)."),
            "alerts": "".join(alert_row(alert, now) for alert in report["alerts"])
            or '<tr><td colspan="5" class="muted">No alerts</td></tr>'}


###############################################################################
# The front door ##############################################################
###############################################################################

# What every request meets once the strict server has read it: turned away while the server
# stops, checked for who sends it (Access control), then answered locally from the route
# table or relayed (the relay's proxy()).

class Router(StrictHTTPHandler):
    """Send each request where it goes: refused, the local API, or the relay's proxy()."""

    def setup(self) -> None:
        super().setup()
        self.app: App = self.server.app
        self.connection_number = next(self.app.connection_numbers)

    @staticmethod
    def error_body(status: int, message: str) -> Any:
        """Describe an error in the shape the Anthropic API uses, which SDKs know how to show."""
        return anthropic_error(ERROR_TYPES.get(status, "invalid_request_error"), message)

    def handle_request(self) -> None:
        """Route one request by its path; the one catch-all for unexpected errors is here."""
        life = self.server.life
        life.begin(self)
        try:
            self.route()
        except (ConnectionError, socket.timeout, TimeoutError):
            self.close_connection = True
        except Exception:
            component_logger("Server").exception("Unexpected error answering %s %s",
                                                 self.command, self.path.partition("?")[0])
            self.close_connection = True
            if not self.answered:  # else the client has an answer: only the connection ends
                with contextlib.suppress(OSError):
                    self.send_json(500, self.error_body(500, "claudeflare failed "
                                                             "unexpectedly; see its log"))
        finally:
            life.end(self)

    def route(self) -> None:
        """Answer one request: refuse it while stopping, check its path and who sends it, then
        relay it or answer it locally (the route table)."""
        self.key_name = self.key_header = None
        #: The client key the request came with, and its name once its limits admitted it.
        self.client_key: ClientKey | None = None
        self.admitted: str | None = None
        app = self.app
        if self.server.life.stopping:
            self.close_connection = True
            self.send_json(503, {"error": "claudeflare is shutting down"})
            return
        for key in app.settings.reload_if_changed():
            component_logger("Config").info("Applied %s = %s from %s", key,
                                            shown_setting(key, app.settings.values[key]),
                                            app.settings.config.path)
        raw_path, question, query = self.path.partition("?")
        try:
            path = resolve_dot_segments(raw_path)
        except ValueError as error:
            self.send_json(400, anthropic_error("invalid_request_error", str(error)))
            return
        proxied = path == "/v1" or path.startswith("/v1/")
        if not proxied and (raw_path == "/v1" or raw_path.startswith("/v1/")):
            self.send_json(400, anthropic_error(
                "invalid_request_error", f"The path {redact(raw_path)!r} leaves /v1/ once its "
                                         f"dot segments are resolved; only /v1/ is proxied"))
            return
        self.target = path + question + query
        accounts, keys = app.snapshot()
        if not self.allowed(keys, path, proxied):
            return
        if proxied:
            try:
                self.proxy(accounts)
            finally:
                if self.admitted is not None:
                    app.key_ledger.release(self.admitted)
            return
        status, answer = answer_local(app, LocalRequest(
            self.command, path, urllib.parse.parse_qs(query), self.headers, self.read_body,
            self.server.life, self.client_key))
        if isinstance(answer, Page):
            self.send_bytes(status, answer.body, answer.content_type, answer.headers)
        else:
            self.send_json(status, answer)

    def allowed(self, keys: list[ClientKey], path: str, proxied: bool) -> bool:
        """Check the request's host name, client key and site (see Access control); answer a
        refusal and return False when one fails."""
        bound = self.server.server_address[0]
        if not keys and not host_allowed(bound, self.headers):
            host = host_name(self.headers.get("Host") or "")
            self.send_json(403, {"error": f"Host {host!r} is not allowed: a claudeflare bound to "
                                          f"{bound} answers only localhost names. Use "
                                          f"http://localhost:PORT, or add client keys."})
            return False
        if keys and path != "/health":
            found = authenticate(self.headers, keys)
            if found is None:
                component_logger("Server").warning(
                    "Refused %s %s from %s without a valid client key", self.command,
                    self.path.partition("?")[0], self.client_address[0])
                self.close_connection = self.close_connection or self.request_has_body()
                if proxied:
                    self.send_json(401, anthropic_error("authentication_error",
                                                        CLIENT_KEY_REQUIRED))
                else:
                    self.send_json(401, {"error": CLIENT_KEY_REQUIRED}, [(
                        "WWW-Authenticate", 'Basic realm="claudeflare", charset="UTF-8"')])
                return False
            self.client_key, self.key_header = found
            self.key_name = self.client_key.name
            if not self.key_usable(self.client_key, proxied):
                return False
        if proxied and self.key_name is None and cross_site(self.headers):
            self.send_json(403, anthropic_error(
                "permission_error", "A web page of another site may not use claudeflare's "
                                    "accounts: cross-site request refused"))
            return False
        return True

    def key_usable(self, key: ClientKey, proxied: bool) -> bool:
        """Answer 401 for a paused or expired key, saying which, and return False."""
        refusal = key_access_refusal(key, now_ms())
        if refusal is None:
            return True
        self.app.key_ledger.refused(key.name, refusal.reason)
        component_logger("Server").warning("Refused %s %s: %s", self.command,
                                           self.path.partition("?")[0], refusal.message)
        self.close_connection = self.close_connection or self.request_has_body()
        self.send_json(401, anthropic_error(refusal.error_type, refusal.message) if proxied
                       else {"error": refusal.message})
        return False

    def proxy(self, accounts: list[Account]) -> None:
        """Relay a /v1 request over the accounts (ProxyHandler)."""
        raise NotImplementedError


###############################################################################
# The relay ###################################################################
###############################################################################

# A /v1 request as it travels: pick the accounts, send, classify the answer, retry or move on,
# deliver, record.

def sse_error_event(message: str, error_type: str = "api_error") -> bytes:
    """Build the SSE `error` event a client gets when the upstream fails mid-stream."""
    return b"event: error\ndata: " + json_bytes(anthropic_error(error_type, message)) + b"\n\n"


#: The SSE event a stream waiting for a reset gets now and then (HoldQueue.ping_interval_s).
SSE_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def request_streams(body: bytes) -> bool:
    """Tell whether a request body asks for a stream ("stream": true)."""
    try:
        return json.loads(body).get("stream") is True
    except (*JSON_ERRORS, AttributeError):
        return False


#: A retry waits at most this long; an upstream asking for more sends the request elsewhere.
MAX_RETRY_WAIT_MS = 30 * 1000


#: Error messages that mean an account itself is unusable, not the request.
ACCOUNT_REFUSED_MESSAGES = ("organization has been disabled",
                            "oauth authentication is currently not allowed",
                            "credit balance is too low")


@dataclass
class Answer:
    """An upstream answer read whole: relayed at once, or kept in case no account does better."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    @functools.cached_property
    def error_message(self) -> str:
        """The message of an Anthropic error body, or '' when it is not one."""
        try:
            error = json.loads(self.body).get("error")
        except (*JSON_ERRORS, AttributeError):
            return ""
        return str(error.get("message", "")) if isinstance(error, dict) else str(error or "")


@dataclass
class Tries:
    """What the attempts of one request met so far."""

    count: int = 0
    last_error: str = ""
    last_answer: Answer | None = None
    #: A subscription account refused the request as not Claude Code's: only API keys are left.
    claude_code_only: bool = False


#: What the API answers a subscription token used by any client but Claude Code (lower case).
CLAUDE_CODE_ONLY_MESSAGE = "only authorized for use with claude code"


def failure_kind(answer: Answer, limit: RateLimit, account: Account | None) -> str:
    """Say what an upstream error means for routing.

    rate_limited: bench the account, try the next. family_limited: the account's weekly window
    for the model is spent (kept, not benched), try the next. retry: the same account again,
    then the next.
    refused: the account itself is unusable. next: try another, no bench. claude_code_only: the
    request (its client), not the account, is refused: try API-key accounts only. client: the
    client's own mistake, passed through at once.
    """
    message = answer.error_message.lower()
    if answer.status == 429 and limit.family_only:
        return "family_limited"
    if answer.status == 429 or limit.hard:
        return "rate_limited"
    if answer.status >= 500 or answer.status == 408:
        return "retry"
    if answer.status in (400, 403) and any(text in message for text in ACCOUNT_REFUSED_MESSAGES):
        return "refused"
    if answer.status == 401 and account is not None:
        return "refused"
    if answer.status == 400 and "extra usage" in message:
        return "next"
    if (answer.status == 400 and CLAUDE_CODE_ONLY_MESSAGE in message and account is not None
            and account.type == "oauth"):
        return "claude_code_only"
    return "client"


#: Headers that carry the client's own credentials; replaced whenever an account is used.
CREDENTIAL_HEADERS = frozenset({"x-api-key", "authorization"})


def with_credentials(headers: list[tuple[str, str]],
                     account: Account | None) -> list[tuple[str, str]]:
    """Put an account's credentials on a request in place of the client's own.

    API-key accounts go as x-api-key; OAuth accounts as a Bearer token with the OAuth beta added
    to whatever betas the client asked for. Upstream never sees both kinds at once.
    """
    if account is None:
        return headers
    kept = [(name, value) for name, value in headers
            if name.lower() not in CREDENTIAL_HEADERS and name.lower() != "anthropic-beta"]
    betas = [beta.strip() for name, value in headers if name.lower() == "anthropic-beta"
             for beta in value.split(",") if beta.strip()]
    if account.type == "api_key":
        kept.append(("x-api-key", account.api_key or ""))
    else:
        kept.append(("Authorization", f"Bearer {account.access_token or ''}"))
        if OAUTH_BETA not in betas:
            betas.append(OAUTH_BETA)
    if betas:
        kept.append(("anthropic-beta", ",".join(betas)))
    return kept


#: Anthropic credentials and client keys as they appear in a body.
CREDENTIAL_BYTES = re.compile(rb"(?:sk-ant-[A-Za-z0-9]+-|cfk-)[A-Za-z0-9_\-]+")


def scrub_credentials(body: bytes, account: Account) -> bytes:
    """Mask an account's credentials (and any Anthropic key) in an error body the upstream
    echoes, before it reaches a client that must never learn them."""
    for secret in account.credentials():
        body = body.replace(secret.encode("latin-1", "replace"), b"[REDACTED]")
    return CREDENTIAL_BYTES.sub(b"[REDACTED]", body)


def same_length_mask(found: re.Match) -> bytes:
    """Return a mask as long as what it hides."""
    return b"[REDACTED]".ljust(len(found.group()), b"*")[:len(found.group())]


def scrub_relayed(data: bytes, secrets: re.Pattern | None) -> bytes:
    """Mask credentials in a piece of a relayed answer without changing its length, so that its
    framing (Content-Length, chunk sizes) still holds: the account's own anywhere, any
    Anthropic key in a stream's error event as in an error body."""
    if secrets is not None:
        data = secrets.sub(same_length_mask, data)
    if b"event: error" in data and (b"sk-ant-" in data or b"cfk-" in data):
        data = CREDENTIAL_BYTES.sub(same_length_mask, data)
    return data


def user_agent_product(user_agent: str | None) -> str | None:
    """Return the first product of a User-Agent, such as claude-cli/2.1.3."""
    return user_agent.split()[0][:100] if user_agent and user_agent.strip() else None


class AnswerRelay(StrictHTTPHandler):
    """Deliver upstream answers to the client: read whole, copied as sized, or relayed piece by
    piece with their framing; and the SSE stream of a request that waits for a reset.

    How the bytes move, apart from which account they came from (ProxyHandler).
    """

    #: The upstream answer being relayed, for shutdown to cut.
    relaying: http.client.HTTPResponse | None = None
    #: Whether a streaming request waiting for a reset has its 200 already (hold_s).
    held_stream = False

    def handle_one_request(self) -> None:
        """Read and answer one request: none is held when it begins (a held stream that ended
        leaves its connection to the next request)."""
        self.held_stream = False
        super().handle_one_request()

    def send_bytes(self, status: int, body: bytes, content_type: str,
                   extra: Iterable[tuple[str, str]] = ()) -> None:
        """Send a whole response in one write; into a held stream, as its end."""
        if self.held_stream:
            self.end_held_stream(status, body, None)
            return
        super().send_bytes(status, body, content_type, extra)

    def send_answer(self, answer: Answer) -> None:
        """Send an answer that was read whole, in one write (into a held stream: as its end)."""
        if self.held_stream:
            self.end_held_stream(answer.status, answer.body,
                                 dict((name.lower(), value) for name, value in answer.headers)
                                 .get("retry-after"))
            return
        headers = answer.headers + [("Content-Length", str(len(answer.body)))]
        head = self.head_bytes(answer.status, answer.reason, headers)
        self.wfile.write(head if self.command == "HEAD" else head + answer.body)

    def open_held_stream(self) -> None:
        """Answer a streaming request that is to wait: 200 and text/event-stream at once."""
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        if self.request_version == "HTTP/1.1":
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            self.close_connection = True
        self.wfile.write(self.head_bytes(200, "OK", headers))
        self.held_stream = True

    def write_held(self, data: bytes) -> None:
        """Write to a held stream, in chunks when the client speaks HTTP/1.1."""
        if self.request_version == "HTTP/1.1":
            data = b"%X\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)

    def end_held_stream(self, status: int, body: bytes, retry_after: str | None) -> None:
        """End a held stream with an answer read whole: a success as it came, an error as an
        SSE `error` event (a 429's says when to try again)."""
        if status < 400:
            self.write_held(body)
        else:
            message = (Answer(status, "", [], body).error_message
                       or http.client.responses.get(status, "Error"))
            if status == 429 and retry_after:
                message += f" (retry after {retry_after}s)"
            self.write_held(sse_error_event(
                message, "rate_limit_error" if status == 429 else "api_error"))
        if self.request_version == "HTTP/1.1":
            self.wfile.write(b"0\r\n\r\n")

    def read_upstream(self, read: Callable[..., bytes], *args: Any) -> bytes:
        """Read from the upstream, turning its failures into UpstreamError."""
        try:
            return read(*args)
        except (OSError, http.client.HTTPException) as error:
            raise UpstreamError(describe_network_error(
                error, self.app.upstream.where, self.app.settings.request_timeout_s)) from None

    def read_to_end(self, response: http.client.HTTPResponse,
                    connection: http.client.HTTPConnection) -> bytes:
        """Read an answer's whole body, keeping the connection if it stays usable."""
        try:
            data = self.read_upstream(response.read)
        except UpstreamError:
            connection.close()
            raise
        self.app.upstream.release(connection, response)
        return data

    def read_answer(self, response: http.client.HTTPResponse,
                    connection: http.client.HTTPConnection) -> Answer:
        """Read a whole (small or error) answer, keeping the connection if it stays usable."""
        body = self.read_to_end(response, connection)
        headers = forwardable_headers(response.msg, CONTENT_LENGTH_NAME)
        return Answer(response.status, response.reason, headers, body)

    def relay(self, response: http.client.HTTPResponse,
              connection: http.client.HTTPConnection,
              tap: Callable[[bytes], None]) -> str | None:
        """Send the upstream's answer to the client unchanged, each piece as soon as it arrives.

        `tap` sees a copy of each piece after the client has it. Return what went wrong on the
        way, or None.
        """
        upstream = self.app.upstream
        headers = forwardable_headers(response.msg, CONTENT_LENGTH_NAME)
        status, reason = response.status, response.reason
        self.relaying = response
        try:
            if self.held_stream:  # its 200 is out: the upstream's events follow the pings
                self.relay_unsized(response, status, reason, headers, tap)
            elif self.command == "HEAD" or status in (204, 304) or status < 200:
                length = response.getheader("Content-Length")
                if length is not None:
                    headers.append(("Content-Length", length))
                self.wfile.write(self.head_bytes(status, reason, headers))
            elif response.length is not None:
                headers.append(("Content-Length", str(response.length)))
                self.wfile.write(self.head_bytes(status, reason, headers))
                self.copy_body(response, self.wfile.write, tap)
            else:
                self.relay_unsized(response, status, reason, headers, tap)
        except (ConnectionError, socket.timeout, TimeoutError):
            # The client went away (or stopped reading): stop, and do not reuse the upstream side.
            self.close_connection = True
            connection.close()
            component_logger("Proxy").info("Client disconnected during the response")
            return "Client disconnected during the response"
        except UpstreamError as error:
            self.close_connection = True
            connection.close()
            if self.server.life.cutting:
                component_logger("Proxy").warning("%s", self.cut_message())
                return self.cut_message()
            component_logger("Proxy").warning("Upstream failed during the response: %s", error)
            return f"Upstream failed during the response: {error}"
        except BaseException:
            self.close_connection = True
            connection.close()
            raise
        finally:
            self.relaying = None
        upstream.release(connection, response)
        return None

    def cut_message(self) -> str:
        """Say that shutdown cut this answer short."""
        return (f"Cut at shutdown: shutdown_timeout_s "
                f"({self.app.settings.shutdown_timeout_s:g}s) ran out before the answer ended")

    def relay_unsized(self, response: http.client.HTTPResponse, status: int, reason: str,
                      headers: list[tuple[str, str]], tap: Callable[[bytes], None]) -> None:
        """Relay a body of unknown length (SSE streams) piece by piece, each as it arrives.

        An upstream's chunked body goes to an HTTP/1.1 client as it came, framing and all: one
        write for whatever one read brought, however many events. When the upstream fails
        mid-stream, an SSE client gets a proper `error` event and a clean end instead of a cut
        connection.
        """
        chunked = self.request_version == "HTTP/1.1"
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            self.close_connection = True
        if not self.held_stream:
            self.wfile.write(self.head_bytes(status, reason, headers))
        write = self.wfile.write
        if chunked:
            def write(data: bytes) -> None:
                self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        tail = bytearray(b"\n\n")

        def watch(data: bytes) -> None:
            tail[:] = (tail + data[-2:])[-2:]
            tap(data)

        framing = ChunkedFraming() if chunked and response.chunked else None
        try:
            if framing is None:
                self.copy_body(response, write, watch)
            else:
                self.copy_chunks(response, framing, watch)
        except UpstreamError as error:
            if "text/event-stream" not in (response.getheader("Content-Type") or ""):
                raise
            if framing is not None:
                padding = framing.close_chunk()
                if padding is None:
                    self.close_connection = True
                    raise
                self.wfile.write(padding)
                tail[:] = (tail + padding[:-2])[-2:]
            separator = b"" if tail.endswith(b"\n\n") else b"\n\n"
            write(separator + sse_error_event(self.cut_message() if self.server.life.cutting
                                              else f"Upstream stream failed: {error}"))
            self.close_connection = True
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            raise
        if chunked and framing is None:
            self.wfile.write(b"0\r\n\r\n")

    def copy_chunks(self, response: http.client.HTTPResponse, framing: ChunkedFraming,
                    tap: Callable[[bytes], None]) -> None:
        """Pass a chunked body through with its framing; `tap` sees the payload.

        The response is read past http.client's chunk decoding, from the connection's buffer,
        so it is closed here once the body ended: the connection may then be reused, unless
        the upstream sent something after the body.
        """
        where = self.app.upstream.where
        while not framing.done:
            # Wait in peek, which fills the connection's read buffer, not in read1, which
            # would wait in a new buffer of its own: a thousand streams, a thousand buffers.
            self.read_upstream(response.fp.peek)
            data = self.read_upstream(response.fp.read1, STREAM_READ_BYTES)
            if not data:
                raise UpstreamError(f"ECONNRESET: {where} closed the connection")
            forward, payload = framing.feed(data)
            if forward:
                self.wfile.write(scrub_relayed(forward, self.secrets))
            if payload:
                tap(payload)
            if framing.broken:
                raise UpstreamError(f"ECONNRESET: {where} sent a broken chunked body "
                                    f"({framing.broken})")
        if framing.extra:
            response.will_close = True
        response.close()

    def copy_body(self, response: http.client.HTTPResponse, write: Callable[[bytes], Any],
                  tap: Callable[[bytes], None]) -> None:
        """Copy a response body to the client as it arrives; `read1` never waits for more."""
        while True:
            data = self.read_upstream(response.read1, RELAY_CHUNK_BYTES)
            if not data:
                break
            write(scrub_relayed(data, self.secrets))
            tap(data)
        if response.length:
            raise UpstreamError(f"ECONNRESET: {self.app.upstream.where} ended the body "
                                f"{response.length} bytes short")


class ProxyHandler(Router, AnswerRelay):
    """Relay /v1 requests over the pool's accounts.

    A request travels down this class: the client key's limits (admit_key), the accounts to
    try (proxy), each try and what its answer means (serve_from, send_via), a wait for a reset
    (hold), delivering (deliver) and recording (finish_record).
    """

    server_version = "claudeflare/" + __version__

    def setup(self) -> None:
        super().setup()
        #: The upstream answer being relayed, for shutdown to cut.
        self.relaying: http.client.HTTPResponse | None = None
        #: A body whose conversation is read once the answer is out (routing did not need it).
        self.unread_conversation: bytes | None = None
        #: The credentials of the account whose answer is relayed, masked in it.
        self.secrets: re.Pattern | None = None
        #: The request's body, for the model of an answer that names none.
        self.request_body = b""
        #: The request's model, where routing needs it (per-model windows); whether a streaming
        #: request waiting for a reset has its 200 already, and until when it may wait (hold_s).
        self.model: str | None = None
        self.held_stream = False
        self.hold_until: int | None = None
        self.hold_since: float | None = None

    def upstream_headers(self, body: bytes) -> list[tuple[str, str]]:
        """Build the headers sent upstream: the client's, minus hop-by-hop, for the upstream host.

        Identity encoding is asked for so that usage can be read out of every response.
        """
        headers = forwardable_headers(self.headers, frozenset(
            {"host", "content-length", "accept-encoding", self.key_header}))
        headers.append(("Host", self.app.upstream.host_header))
        headers.append(("Accept-Encoding", "identity"))
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        return headers

    def proxy(self, accounts: list[Account]) -> None:
        """Forward one /v1 request over the accounts in strategy order and relay the answer.

        Rate limits, refused accounts and upstream failures move the request to the next
        account before the client has seen a byte, streams included.
        """
        self.unread_conversation, self.request_body = None, b""
        started = time.monotonic()
        record = RequestRecord(id=self.app.new_request_id(), timestamp=now_ms(),
                               method=self.command,
                               path=self.target[:1000], client_key=self.key_name,
                               user_agent=user_agent_product(self.headers.get("User-Agent")))
        try:
            body = self.read_body()
        except RequestRefused as error:
            self.close_connection = True
            self.send_json(error.status, self.error_body(error.status, str(error)))
            self.finish_record(record, started, error.status, str(error))
            self.discard_rest_of_request()
            return
        accounts = self.admit_key(body, accounts, record, started)
        if accounts is None:
            return
        self.request_body = body
        app, proxy_log = self.app, component_logger("Proxy")
        # The conversation picks the account only when there is a choice (a sticky strategy
        # over several accounts); otherwise it is read once the answer is out.
        if len(accounts) > 1 and app.settings.lb_strategy in STICKY_STRATEGIES:
            record.conversation = conversation_key(
                self.headers.get("X-Claude-Code-Session-Id"), body)
        elif accounts:
            self.unread_conversation = body
        #: Who sends the request, as the API tells clients apart (Claude Code or not).
        self.client = (f"key {self.key_name}" if self.key_name is not None
                       else f"connection {self.connection_number}",
                       f"{(self.headers.get('User-Agent') or '')[:200]}|"
                       f"{self.headers.get('x-app', '')}")
        #: The model, read only when an account has a per-model window that may refuse it.
        self.model = (requested_model(body) if any(account.model_windows for account in accounts)
                      else None)
        self.held_stream, self.hold_until, self.hold_since = False, None, None
        candidates = app.accounts_to_try(accounts, record.conversation, record.timestamp,
                                         self.client, self.model)
        headers = self.upstream_headers(body)
        while True:
            if not candidates and accounts:
                if not self.own_credentials():
                    outcome, candidates = self.hold(record, started, body)
                    if outcome == "ended":
                        return
                    if outcome == "ready":
                        continue
                    if self.all_limited(record, started):
                        return
                proxy_log.warning("No active accounts available; forwarding with the client's "
                                  "own credentials")
            if proxy_log.isEnabledFor(logging.DEBUG):
                proxy_log.debug("%s %s: strategy %s, conversation %s, trying %s", self.command,
                                record.path, app.settings.lb_strategy, record.conversation,
                                ", ".join(account.name for account in candidates) or
                                "client credentials")
            tries, round_started = Tries(), time.monotonic()  # a wait for a reset is not spent
            budget_s = app.settings.request_timeout_s
            for account in candidates or [None]:  # None: the client's own credentials
                if tries.count and time.monotonic() - round_started > budget_s:
                    tries.last_error += f" (gave up after {budget_s:g}s, request_timeout_s)"
                    break
                if tries.claude_code_only and account is not None and account.type == "oauth":
                    continue  # every subscription account would refuse it the same way
                if self.serve_from(account, headers, body, record, tries, started):
                    return
            answer = tries.last_answer
            if answer is not None and answer.status == 429:
                self.model = self.model or requested_model(body)  # its weekly window may be why
                if candidates:
                    outcome, candidates = self.hold(record, started, body)
                    if outcome == "ended":
                        return
                    if outcome == "ready":
                        continue
            break
        record.failover_attempts = max(0, tries.count - 1)
        if answer is None:
            last_error = app.scrub(tries.last_error)
            proxy_log.error("%s after %d attempts: %s", ALL_ACCOUNTS_FAILED, tries.count,
                            last_error)
            self.send_json(503, {"error": ALL_ACCOUNTS_FAILED, "attempts": tries.count,
                                 "lastError": last_error})
            self.finish_record(record, started, 503, f"{ALL_ACCOUNTS_FAILED}: {last_error}")
            return
        if answer.status == 429:
            self.set_retry_after(answer, now_ms())
        self.send_answer(answer)
        self.finish_record(record, started, answer.status, answer.error_message or None)

    def admit_key(self, body: bytes, accounts: list[Account], record: RequestRecord,
                  started: float) -> list[Account] | None:
        """Apply the client key's limits before any account is used: return the accounts it
        may use, or answer its refusal and return None."""
        key, ledger = self.client_key, self.app.key_ledger
        if key is None:
            return accounts
        allowed = key_accounts(key, accounts)
        if accounts and not allowed:
            ledger.refused(key.name, "priority_floor")
            refusal = KeyRefusal(403, "permission_error",
                                 f"The claudeflare client key {key.name} may use only accounts "
                                 f"of priority {key.priority_floor} or more, and the pool has "
                                 f"none", "priority_floor")
        else:
            model, refusal = key_request_refusal(key, self.command, self.target, body)
            if refusal is None:
                refusal = ledger.admit(key, model, record.timestamp)
            else:
                ledger.refused(key.name, refusal.reason)
        if refusal is None:
            self.admitted = key.name
            return allowed
        component_logger("Proxy").warning("Refused %s %s: %s", self.command,
                                          self.path.partition("?")[0], refusal.message)
        self.send_json(refusal.status, anthropic_error(refusal.error_type, refusal.message),
                       [("retry-after", str(refusal.retry_after_s))]
                       if refusal.retry_after_s else [])
        self.finish_record(record, started, refusal.status, refusal.message)
        return None

    def key_pool(self) -> list[Account]:
        """Return the accounts of the pool the request's client key may use (a priority floor
        keeps it off some), as they are now."""
        return key_accounts(self.client_key, self.app.accounts())

    def own_credentials(self) -> bool:
        """Whether the client presents an Anthropic credential of its own (not a client key)."""
        return any(header != self.key_header and secret.startswith("sk-ant-")
                   for header, secret in presented_credentials(self.headers))

    def all_limited(self, record: RequestRecord, started: float) -> bool:
        """Answer 429 when every account is rate-limited and the client has no credentials.

        Forwarding without credentials the API could accept (none, a client key, a placeholder
        such as ANTHROPIC_API_KEY=claudeflare) could only fail, with a 401 that Claude Code
        takes for a failed login; a 429 with retry-after set to the earliest reset lets the
        client wait exactly as long as needed. When accounts are kept off the request's model
        by its weekly window, the message names that window.
        """
        now = now_ms()
        reset = self.app.earliest_reset(now, self.model, self.key_pool())
        if reset is None:
            return False
        family = self.app.refused_family(now, self.model, self.key_pool())
        if family:
            message = (f"No account can serve {self.model} now: every account has reached its "
                       f"weekly {family[len('seven_day_'):].capitalize()} limit ({family}) or "
                       f"is rate limited; the first resets at {iso_time(reset)}")
        else:
            message = f"All accounts are rate limited; the first resets at {iso_time(reset)}"
        answer = Answer(429, "Too Many Requests", [("Content-Type", "application/json")],
                        json_bytes(anthropic_error("rate_limit_error", message)))
        self.set_retry_after(answer, now)
        self.send_answer(answer)
        component_logger("Proxy").warning("No active accounts available: %s", message)
        self.finish_record(record, started, 429, message)
        return True

    def hold(self, record: RequestRecord, started: float,
             body: bytes) -> tuple[str, list[Account]]:
        """Wait for the earliest reset within hold_s instead of answering 429 (see HoldQueue).

        A streaming request gets its 200 and text/event-stream at once, then a ping every
        HoldQueue.ping_interval_s. Return ("ready", the accounts to try now), ("skip", [])
        when the request may not wait (hold_s off, no reset soon enough, hold_max waiting), or
        ("ended", []) when the wait ended without an account (client gone, shutdown): then the
        client has its answer and the request its record.
        """
        app, settings = self.app, self.app.settings
        now = now_ms()
        if self.hold_until is None:  # the first wait: its deadline, and its place in the queue
            self.hold_until = now + int(settings.hold_s * 1000)
            self.hold_since = time.monotonic()
        reset = app.earliest_reset(now, self.model, self.key_pool())
        if not settings.hold_s or reset is None or reset > self.hold_until:
            return "skip", []
        outcome = "full" if app.holds.waiting >= settings.hold_max else None
        if outcome is None:  # a stream past hold_max gets its 429 as a 429, not in a 200
            if not self.held_stream and request_streams(body):
                self.open_held_stream()
            ping = (lambda: self.write_held(SSE_PING)) if self.held_stream else None
            component_logger("Proxy").info("No account can serve a request now; waiting for "
                                           "the reset at %s (hold_s)", iso_time(reset))
            outcome = app.holds.wait(self, reset, settings.hold_max, ping,
                                     lambda: client_gone(self.connection), self.hold_since)
        if outcome == "full":
            component_logger("Proxy").warning("%d requests wait for a reset already (hold_max); "
                                              "answering 429", settings.hold_max)
            return "skip", []
        if outcome == "ready":
            try:
                return "ready", app.accounts_to_try(self.key_pool(), record.conversation,
                                                    now_ms(), self.client, self.model)
            finally:
                app.holds.done(self)
        self.close_connection = True
        if outcome == "gone":
            component_logger("Proxy").info("Client disconnected while waiting for a reset")
            self.finish_record(record, started, 499, "Client disconnected while waiting for "
                                                     "a reset; nothing was sent upstream")
        else:
            message = "claudeflare is shutting down; the request waited for a reset in vain"
            self.send_json(503, anthropic_error("api_error", message))
            self.finish_record(record, started, 503, message)
        return "ended", []

    def set_retry_after(self, answer: Answer, now: int) -> None:
        """Point a 429's retry-after at the earliest reset among the accounts."""
        reset = self.app.earliest_reset(now, self.model, self.key_pool())
        if reset is None:
            return
        answer.headers = [(name, value) for name, value in answer.headers
                          if name.lower() not in ("retry-after", "retry-after-ms")]
        answer.headers.append(("retry-after", str(max(1, -(-(reset - now) // 1000)))))

    def serve_from(self, account: Account | None, headers: list[tuple[str, str]], body: bytes,
                   record: RequestRecord, tries: Tries, started: float) -> bool:
        """Try one account, retrying 5xx, 529 and network errors; return True once answered."""
        app, settings, proxy_log = self.app, self.app.settings, component_logger("Proxy")
        name = account.name if account else "client credentials"
        delay_ms = float(settings.retry_delay_ms)
        for retry in range(settings.retry_attempts + 1):
            tries.count += 1
            now = now_ms()
            wait_ms: int | None = None
            try:
                response, connection, account = self.send_via(account, headers, body, now)
                now = now_ms()  # the answer's headers are this recent
                if response.status < 400:
                    self.deliver(response, connection, account, now, record, tries, started)
                    return True
                limit = parse_rate_limit(response.msg, now)
                if account is not None:
                    app.note_limits(account, limit, now)
                answer = self.read_answer(response, connection)
                if account is not None:
                    answer.body = scrub_credentials(answer.body, account)
            except TokenUnavailable as error:
                tries.last_error = str(error)
                proxy_log.warning("Skipping account %s: %s", name, error)
                return False
            except UpstreamError as error:
                tries.last_error = str(error)
                proxy_log.warning("Request via %s failed: %s", name, error)
                if not error.retry:
                    return False
            else:
                kind = failure_kind(answer, limit, account)
                if kind != "claude_code_only" or tries.last_answer is None:
                    # An answer from an account that could serve the client (a 429 and its
                    # retry-after) says more than a subscription's refusal of the client.
                    tries.last_answer = answer
                tries.last_error = f"{answer.status} {answer.error_message or answer.reason}"
                if kind == "client":
                    record.failover_attempts = tries.count - 1
                    self.take_record(record, account, started, streaming=False)
                    self.send_answer(answer)
                    self.finish_record(record, started, answer.status,
                                       answer.error_message or None)
                    return True
                if kind == "claude_code_only":
                    tries.claude_code_only = record.claude_code_only = True
                    app.remember_not_claude_code(self.client, now)
                    return False
                proxy_log.warning("Request via %s got %s", name, tries.last_error)
                if account is not None and kind == "rate_limited":
                    app.mark_rate_limited(account, limit, now)
                if account is not None and kind == "family_limited":
                    proxy_log.warning(
                        "Account %s has spent its weekly %s; it keeps serving other models",
                        name, ", ".join(window for window, seen in limit.families.items()
                                        if seen.get("status") in HARD_LIMIT_STATUSES))
                if account is not None and kind == "refused":
                    app.mark_needs_attention(account, tries.last_error)
                if kind != "retry" or limit.should_retry is False:
                    return False
                wait_ms = limit.retry_after_ms
            if retry == settings.retry_attempts:
                return False
            wait_ms = max(int(delay_ms), wait_ms or 0)
            if wait_ms > MAX_RETRY_WAIT_MS:
                return False
            time.sleep(wait_ms / 1000)
            delay_ms *= settings.retry_backoff
        return False

    def deliver(self, response: http.client.HTTPResponse,
                connection: http.client.HTTPConnection, account: Account | None,
                seen_at: int, record: RequestRecord, tries: Tries, started: float) -> None:
        """Send a successful upstream answer to the client and record who served it.

        What the answer's headers say of the account's windows is taken in once a whole
        answer is out, off the client's wait, but before a stream, which may last minutes.
        """
        app = self.app
        record.failover_attempts = tries.count - 1
        streaming = "text/event-stream" in (response.getheader("Content-Type") or "")
        self.take_record(record, account, started, streaming)
        if account is not None:
            app.note_success(account)
            app.bind_conversation(record.conversation, account.id, record.timestamp)
        reader = UsageReader(streaming)
        self.secrets = app.credential_pattern(account) if account else None
        bodiless = self.command == "HEAD" or response.status in (204, 304)
        if response.length is not None and response.length <= SMALL_BODY_BYTES and not bodiless:
            try:
                answer = self.read_answer(response, connection)
            except UpstreamError as error:
                self.close_connection = True
                self.send_json(502, anthropic_error("api_error", str(error)))
                self.note_answer(response, account, seen_at, record)
                self.finish_record(record, started, 502, str(error))
                return
            reader.feed(answer.body)
            answer.body = scrub_relayed(answer.body, self.secrets)
            self.send_answer(answer)
            self.note_answer(response, account, seen_at, record)
            error = None
        else:
            self.note_answer(response, account, seen_at, record)
            error = self.relay(response, connection, reader.feed)
        self.finish_record(record, started, response.status, error, reader, announce=True)

    def note_answer(self, response: http.client.HTTPResponse, account: Account | None,
                    seen_at: int, record: RequestRecord) -> None:
        """Take in what a successful answer's headers say: its account's windows, extra usage
        in use, and that a subscription account served this client (Claude Code after all)."""
        limit = record.limits = parse_rate_limit(response.msg, seen_at)
        record.overage = limit.on_overage
        if account is not None:
            self.app.note_limits(account, limit, seen_at)
            self.app.note_served(account, limit, seen_at)
            if account.type == "oauth":
                self.app.forget_not_claude_code(self.client)

    def take_record(self, record: RequestRecord, account: Account | None, started: float,
                    streaming: bool) -> None:
        """Note in the record which account answered, and when the answer began."""
        record.account_name = account.name if account else None
        record.account_id = account.id if account else None
        record.streaming = streaming
        record.ttfb_ms = int((time.monotonic() - started) * 1000)

    def send_via(self, account: Account | None, headers: list[tuple[str, str]], body: bytes,
                 now: int) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection,
                                    Account | None]:
        """Send the request with one account's credentials, its OAuth token fresh.

        An OAuth account whose token the upstream refuses (401) is refreshed once and the request
        sent again on it; if the refresh fails, TokenUnavailable moves the request on.
        """
        app = self.app
        if account is not None:
            account = app.tokens.fresh(account, now)
        response, connection = app.upstream.send(
            self.command, self.target, with_credentials(headers, account), body,
            app.settings.request_timeout_s)
        if response.status == 401 and account is not None and account.type == "oauth":
            self.read_to_end(response, connection)
            component_logger("Proxy").warning("Upstream refused the token of account %s; "
                                              "refreshing it", account.name)
            refreshed = app.tokens.refresh(account, now)
            if refreshed.access_token == account.access_token:
                raise TokenUnavailable(f"The upstream refused the token of account "
                                       f"{account.name} and no new one can be had right now")
            account = refreshed
            response, connection = app.upstream.send(
                self.command, self.target, with_credentials(headers, account), body,
                app.settings.request_timeout_s)
        return response, connection, account

    def finish_record(self, record: RequestRecord, started: float, status: int,
                      error: str | None, reader: UsageReader | None = None,
                      announce: bool = False) -> None:
        """Complete a request's record and hand it to the writer.

        What only the record and the log need (the usage in the answer, the conversation,
        the "Request completed" line) is worked out on the writer's thread, unless a client
        key's spending must count the answer's cost before the next request.
        """
        record.status = status
        record.success = status < 400 and error is None
        record.error = self.app.scrub(error)[:2000] if error is not None else (
            None if status < 400 else http.client.responses.get(status, "Error"))
        record.response_time_ms = int((time.monotonic() - started) * 1000)
        body, self.unread_conversation = self.unread_conversation, None
        finishing = functools.partial(
            finish_off, self.app, record, reader, body,
            self.headers.get("X-Claude-Code-Session-Id") if body is not None else None,
            announce and record.account_id is not None, announce, time.time())
        if record.client_key is not None or status >= 400:
            finishing()  # the key's ledger counts it now; an error's model is read below
            self.app.key_ledger.add(record)
        else:
            record.finishing = finishing
        if record.model is None and status >= 400:
            record.model = requested_model(self.request_body)
        self.app.writer.record(record)


def finish_off(app: App, record: RequestRecord, reader: UsageReader | None, body: bytes | None,
               session_id: str | None, bind: bool, announce: bool, finished_at: float) -> None:
    """Work out what a finished request's record holds of its answer and its conversation
    (binding the conversation to the account that served it), mask its path, and log its
    line."""
    record.path = app.scrub(record.path)
    if reader is not None:
        usage = reader.finish()
        record.model = usage.model
        record.input_tokens, record.output_tokens = usage.input_tokens, usage.output_tokens
        record.cache_creation_tokens = usage.cache_creation_tokens
        record.cache_read_tokens = usage.cache_read_tokens
        record.cost_usd = usage.cost()
        generating_ms = record.response_time_ms - (record.ttfb_ms or 0 if record.streaming
                                                   else 0)
        if usage.output_tokens and generating_ms > 0:
            record.tokens_per_second = round(usage.output_tokens * 1000 / generating_ms, 1)
    if body is not None:
        record.conversation = conversation_key(session_id, body)
        if bind:
            app.bind_conversation(record.conversation, record.account_id, record.timestamp)
    proxy_log = component_logger("Proxy")
    if announce and proxy_log.isEnabledFor(logging.INFO):
        name = record.account_name or "client credentials"
        line = proxy_log.makeRecord(
            proxy_log.name, logging.INFO, "(unknown file)", 0, "Request completed for %s: %d in "
            "%dms", (name, record.status, record.response_time_ms), None, extra={"fields": {
                "account": name, "status": record.status, "ms": record.response_time_ms,
                "model": record.model, "failovers": record.failover_attempts}})
        line.created = finished_at  # when the request ended, not when this thread got to it
        proxy_log.handle(line)


###############################################################################
# The server's life ###########################################################
###############################################################################

#: After this many requests were in flight at once, memory is given back once none is.
RELEASE_AFTER_BUSIEST = 64


class ServerLife:
    """The server's life, apart from the pool: requests in flight, and shutdown.

    Shutdown waits for the requests in flight (drain), then cuts the answers still being
    relayed (cut_streams); the handler reaches it as server.life.
    """

    def __init__(self) -> None:
        #: Requests in flight (their handlers), and the condition shutdown waits on.
        self.handlers: set = set()
        #: The most requests in flight at once since there were none.
        self.busiest = 0
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        #: How many wait in drain() or settle(): only then does the end of a request notify.
        self.waiters = 0
        #: Set once shutdown begins: requests that still arrive are turned away.
        self.stopping = False
        #: Set when shutdown_timeout_s ran out and the streams still running are cut.
        self.cutting = False

    @property
    def running(self) -> int:
        """How many requests are in flight."""
        return len(self.handlers)

    def begin(self, handler: Any) -> None:
        """Count a request as in flight until end(), so shutdown can wait for it."""
        with self.lock:
            self.handlers.add(handler)
            self.busiest = max(self.busiest, len(self.handlers))

    def end(self, handler: Any) -> None:
        """A request is over. When a burst of requests is over, the memory its threads used is
        given back."""
        with self.lock:
            self.handlers.discard(handler)
            burst_over = not self.handlers and self.busiest >= RELEASE_AFTER_BUSIEST
            if self.waiters:
                self.idle.notify_all()
            if not self.handlers:
                self.busiest = 0
        if burst_over:
            release_free_memory()

    def wait_until(self, settled: Callable[[], bool], timeout: float) -> None:
        """Wait (at most timeout s) until settled() holds; each request's end looks again."""
        with self.idle:
            self.waiters += 1
            try:
                self.idle.wait_for(settled, timeout)
            finally:
                self.waiters -= 1

    def drain(self, timeout: float) -> int:
        """Wait until no request is in flight (at most timeout s); return how many still are."""
        self.wait_until(lambda: not self.handlers, timeout)
        return len(self.handlers)

    def settle(self, timeout: float) -> None:
        """Wait until the asking request is the only one in flight (at most timeout s), so that
        what the others answered is recorded."""
        self.wait_until(lambda: len(self.handlers) <= 1, timeout)

    def cut_streams(self) -> int:
        """End the answers still being relayed once shutdown_timeout_s has run out.

        Closing their upstream side makes each relay stop, send its client an SSE error event
        and record the request as cut; return how many were cut.
        """
        self.cutting = True
        with self.lock:
            relaying = [handler.relaying for handler in self.handlers if handler.relaying]
        for response in relaying:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                # The response's own socket: its connection may have let go of it already
                # (an upstream answering Connection: close).
                far = socket.socket(fileno=response.fp.fileno())
                try:
                    far.shutdown(socket.SHUT_RDWR)
                finally:
                    far.detach()
        return len(relaying)


class ProxyServer(http.server.ThreadingHTTPServer):
    """The one listening socket: proxy, API and status page, a thread per client connection.

    At most max_connections clients are served at once; one more is answered 503 at once, so a
    flood of idle or slow clients cannot take a thread each without end.
    """

    daemon_threads = True
    #: The default backlog of 5 drops connections in a burst of parallel clients.
    request_queue_size = 1024
    #: Seconds a request line and its headers may take to arrive, from their first byte: a
    #: client trickling them cannot hold a thread past this.
    head_deadline_s = 30.0

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self.life = ServerLife()
        self.connections = 0
        self.connections_lock = threading.Lock()
        self.turned_away = 0
        super().__init__(address, ProxyHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; a plain one is timed out by the kernel (KernelTimedSocket)."""
        request, client_address = super().get_request()
        return KernelTimedSocket.adopt(request, None), client_address

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.connections_lock:
            full = self.connections >= self.app.settings.max_connections
            if not full:
                self.connections += 1
        if full:
            self.turn_away(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError as error:  # no thread could be started
            self.connection_done()
            component_logger("Server").error("Cannot serve a connection: %s", error)
            self.shutdown_request(request)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_done()

    def connection_done(self) -> None:
        with self.connections_lock:
            self.connections -= 1

    def turn_away(self, request: socket.socket) -> None:
        """Answer 503 on a connection past max_connections and close it, from the accept loop.

        The answer is small enough for the socket's buffer, so this never blocks. An HTTPS
        connection is closed without one: nothing can be said before a TLS handshake.
        """
        limit = self.app.settings.max_connections
        body = json_bytes(self.RequestHandlerClass.error_body(
            503, f"claudeflare is serving {limit} connections (max_connections); try again "
                 f"shortly"))
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            if not isinstance(request, ssl.SSLSocket):
                request.setblocking(False)
                request.send(head.encode() + body)
                request.recv(65536)  # what the client sent: closing with it unread would reset
        self.shutdown_request(request)
        self.turned_away += 1
        if self.turned_away in (1, 10, 100) or self.turned_away % 1000 == 0:
            component_logger("Server").warning(
                "Turned away %d connections so far: max_connections (%d) are being served",
                self.turned_away, limit)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Serve one connection, on its own thread; an HTTPS one after its TLS handshake."""
        if isinstance(request, ssl.SSLSocket) and not tls_handshake(request, client_address):
            return
        super().finish_request(request, client_address)


def machine_addresses() -> list[str]:
    """Return the IPv4 addresses this machine is known by, loopback first (as far as the
    standard library can tell: those its host name resolves to)."""
    found = ["127.0.0.1"]
    with contextlib.suppress(OSError):
        for *_, address in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            if address[0] not in found:
                found.append(address[0])
    return found


def make_server(settings: Settings, db_path: str) -> ProxyServer:
    """Build the listening server for the settings' host and port, on the database at db_path."""
    tls = server_tls_context(settings.tls_cert, settings.tls_key)
    app = App(settings, Store(db_path))
    try:
        server = ProxyServer((settings.host, settings.port), app)
    except OSError as error:
        app.close()
        where = f"Cannot listen on {settings.host}:{settings.port}"
        if error.errno == errno.EADDRNOTAVAIL:
            raise ClaudeflareError(
                f"{where}: {settings.host} is not an address of this machine (it has "
                f"{', '.join(machine_addresses())}). Bind one of those, or 0.0.0.0 for all of "
                f"them, with --host or CLAUDEFLARE_HOST.") from None
        if error.errno == errno.EADDRINUSE:
            raise ClaudeflareError(f"{where}: {error.strerror}. Is another server running "
                                   f"there? Choose another port with --port or PORT.") from None
        raise ClaudeflareError(f"{where}: {error.strerror or error}") from None
    if tls is not None:
        # Accepting only wraps the socket; the handshake waits for the connection's thread.
        server.socket = tls.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    return server


###############################################################################
# Doctor ######################################################################
###############################################################################

#: The oldest Python claudeflare runs on.
MIN_PYTHON = (3, 9)
#: Seconds each probe (the upstream, the token endpoint, the server's /health) may take.
DOCTOR_TIMEOUT_S = 10.0
#: Clock skew against the upstream's Date header worth a warning, and a failure: tokens are
#: renewed five minutes before they expire, and rate-limit resets come in the upstream's time.
CLOCK_SKEW_WARN_MS = 60 * 1000
CLOCK_SKEW_FAIL_MS = REFRESH_BEFORE_USE_MS
#: How much of the end of app.log is searched for ERROR lines, and how many are shown.
LOG_TAIL_BYTES = 256 * 1024
LOG_ERRORS_SHOWN = 3
#: What the server's lock file says while it runs: see ServerLock.note.
LOCK_HOLDER = re.compile(r"pid (\d+), port (\d+), (https?)://(\S*):\d+(?:, certificate (.+))?$")
#: The guide's fixes, where several checks share one.
FIX_PROXY = "check HTTPS_PROXY (HTTP_PROXY for http:// URLs), its credentials and NO_PROXY"
FIX_REAUTH = "log it in again: python3 claudeflare.py reauth {name}"


@dataclass
class Check:
    """One finding of `doctor`: ok, warn or fail, what was seen, and what to do about it."""

    status: str
    name: str
    message: str
    fix: str = ""


def server_lock_path(db_path: str) -> str:
    """Return the file whose OS lock says a server runs on the database at db_path."""
    return db_path + ".lock"


def server_lock_holder(db_path: str) -> str | None:
    """Return what the server holding the database's lock wrote in it, or None if none does.

    The file is opened read-only, never created, and any lock taken to test it is let go
    at once: a server starting meanwhile is not held up.
    """
    try:
        lock = open(server_lock_path(db_path), encoding="utf-8")
    except OSError:
        return None
    with lock:
        try:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            else:
                lock.seek(1 << 20)
                msvcrt.locking(lock.fileno(), msvcrt.LK_NBRLCK, 1)
                lock.seek(1 << 20)
                msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)
        except OSError:
            lock.seek(0)
            return lock.read().strip() or "starting up"
    return None


class ConfigSnapshot(ConfigFile):
    """config.json's values, read once: settings resolve without creating or moving the file."""

    def __init__(self, path: str, values: dict) -> None:
        super().__init__(path)
        self.values = values

    def read(self, writable: bool = True) -> dict:
        return dict(self.values)


@dataclass
class RunningServer:
    """The server that holds a database's lock, as it described itself there."""

    pid: int
    port: int
    url: str
    #: The certificate it serves HTTPS with (absolute), which the CLI trusts to reach it.
    cert: str | None


def running_server(db_path: str) -> RunningServer | None:
    """Return the server running on the database, or None (none, or one still starting)."""
    match = LOCK_HOLDER.search(server_lock_holder(db_path) or "")
    if match is None:
        return None
    port = int(match.group(2))
    return RunningServer(int(match.group(1)), port,
                         local_url(match.group(4), port, match.group(3) == "https"),
                         match.group(5))


def ask_health(url: str, context: ssl.SSLContext | None) -> dict:
    """GET a server's /health and return its JSON; a ClaudeflareError says why that failed,
    and whose mistake it is when the client spoke the wrong protocol."""
    origin, prefix = split_url(url)
    client = Upstream(origin, context=context)
    try:
        response, connection = client.send("GET", prefix.rstrip("/") + "/health",
                                           [("Host", client.host_header)], b"",
                                           DOCTOR_TIMEOUT_S)
        body = response.read()
        connection.close()
    except (UpstreamError, OSError, http.client.HTTPException) as error:
        text, scheme = str(error), url.partition(":")[0]
        if "CERTIFICATE_VERIFY_FAILED" in text:
            hint = "Set tls_cert to the server's certificate to trust it"
        elif scheme == "http" and "ECONNRESET" in text:
            hint = ("An HTTPS server closes plain-HTTP connections like this: if it serves "
                    "HTTPS, ask https://" + url.partition("://")[2])
        elif scheme == "https" and "WRONG_VERSION_NUMBER" in text:
            hint = "It answered in plain HTTP: ask http://" + url.partition("://")[2]
        else:
            hint = "Is the server running (python3 claudeflare.py serve)?"
        raise ClaudeflareError(f"No answer from {url}: {error}. {hint}") from None
    finally:
        client.close()
    try:
        health = json.loads(body)
        if not isinstance(health["status"], str) or not isinstance(health["accounts"], dict):
            raise ValueError("not claudeflare's shape")
    except (ValueError, KeyError, TypeError):
        raise ClaudeflareError(f"{url}/health did not answer like claudeflare") from None
    return health


def health_context(settings: Settings | None,
                   server: RunningServer | None) -> ssl.SSLContext | None:
    """Return how to verify this machine's own HTTPS server: pinned to its certificate, the
    configured one or else the one the running server said it serves."""
    cert = (settings.tls_cert if settings else None) or (server.cert if server else None)
    return pinned_tls_context(cert) if cert else None


def check_runtime() -> Check:
    """Check the Python and SQLite versions against what claudeflare needs."""
    versions = (f"Python {'.'.join(map(str, sys.version_info[:3]))}, "
                f"SQLite {sqlite3.sqlite_version}")
    if sys.version_info < MIN_PYTHON or sqlite3.sqlite_version_info < MIN_SQLITE:
        return Check("fail", "python", f"{versions}: claudeflare needs Python "
                     f"{'.'.join(map(str, MIN_PYTHON))} and SQLite "
                     f"{'.'.join(map(str, MIN_SQLITE))} or newer", "use a newer Python build")
    return Check("ok", "python", versions)


def check_config(path: str) -> tuple[list[Check], dict]:
    """Read config.json as it is, without creating or moving it; return checks, valid values."""
    try:
        with open(path, encoding="utf-8") as source:
            text = source.read()
    except FileNotFoundError:
        return [Check("ok", "config", f"{path} does not exist yet: the defaults apply")], {}
    except OSError as error:
        return [Check("fail", "config", f"Cannot read config file {path}: "
                      f"{error.strerror or error}",
                      f"make it readable (chmod 600 {path}) or point --config elsewhere")], {}
    try:
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError("the top level must be a JSON object")
    except ValueError as error:
        return [Check("fail", "config", f"Failed to parse config file {path}: {error}",
                      f"fix the JSON (jq . {path} shows where) or delete the file to start on "
                      f"the defaults; a server would set it aside as config.json.bad-<time>")], {}
    checks, valid = [], {}
    for key, raw in values.items():
        if key not in SETTINGS_BY_KEY:
            checks.append(Check("warn", "config", f"unknown key {key} in {path} is ignored",
                                f"known keys: {', '.join(SETTINGS_BY_KEY)}"))
            continue
        try:
            validate_setting(key, raw, path)
        except ClaudeflareError as error:
            checks.append(Check("fail", "config", str(error),
                                f"python3 claudeflare.py config set {key} VALUE"))
            continue
        valid[key] = raw
    if not checks:
        checks.append(Check("ok", "config", f"{path} is valid ({len(values)} "
                            f"key{'' if len(values) == 1 else 's'})"))
    return checks, valid


def check_environment() -> tuple[list[Check], dict]:
    """Check every setting given by an environment variable; return checks, the valid ones."""
    checks, environ = [], dict(os.environ)
    for setting in SETTINGS:
        if environ.get(setting.env):
            try:
                validate_setting(setting.key, environ[setting.env], setting.env)
            except ClaudeflareError as error:
                checks.append(Check("fail", "environment", str(error),
                                    f"fix or unset {setting.env}"))
                del environ[setting.env]
    return checks, environ


def check_settings(settings: Settings) -> list[Check]:
    """Say which settings are not the defaults and where each comes from; check TLS files."""
    origins = {"flag": "flag", "config": "config file"}
    changed = [f"{setting.key}={shown_setting(setting.key, settings.values[setting.key])} "
               f"({origins.get(settings.sources[setting.key], 'env ' + setting.env)})"
               for setting in SETTINGS if settings.sources[setting.key] in ("flag", "env")
               or settings.values[setting.key] != setting.default]
    checks = [Check("ok", "settings", "; ".join(changed) + "; the rest are defaults"
                    if changed else "all defaults")]
    try:
        if server_tls_context(settings.tls_cert, settings.tls_key) is not None:
            checks.append(Check("ok", "tls", f"serves HTTPS with {settings.tls_cert}"))
    except ClaudeflareError as error:
        checks.append(Check("fail", "tls", str(error),
                            "see the README's HTTPS section to make a certificate"))
    return checks


def open_read_only(path: str) -> sqlite3.Connection:
    """Open a database for reading only, creating nothing, not even its -wal and -shm files.

    Without a -wal file nobody has the database open, so all of it is in the main file and
    it can be read as immutable, the one way SQLite reads WAL databases without making them.
    A -wal without its -shm (left by a crash) would make SQLite create the -shm even read-only:
    then a copy of both, in a private temporary folder, is read into memory instead.
    """
    if os.path.exists(path + "-wal") and not os.path.exists(path + "-shm"):
        connection = sqlite3.connect(":memory:")
        with tempfile.TemporaryDirectory(prefix="claudeflare-doctor-") as folder:
            copy = os.path.join(folder, "copy.db")
            shutil.copyfile(path, copy)
            shutil.copyfile(path + "-wal", copy + "-wal")
            source = sqlite3.connect(copy)
            try:
                source.backup(connection)
            finally:
                source.close()
    else:
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        if not os.path.exists(path + "-wal"):
            uri += "&immutable=1"
        connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
    connection.row_factory = sqlite3.Row
    return connection


def number_column_checks(db: sqlite3.Connection, path: str) -> list[Check]:
    """Name the accounts whose number columns hold something else (text put in by hand)."""
    found = [f"{row[0]}.{column} = {row[1]!r}" for column in NUMBER_COLUMNS
             for row in db.execute(f"SELECT name, {column} FROM accounts WHERE typeof({column}) "
                                   f"NOT IN ('integer', 'real', 'null')")]
    if not found:
        return []
    return [Check("warn", "database", f"{path}: not a number where accounts needs one: "
                  f"{', '.join(found[:3])}; read as unset (0 where one is required)",
                  "set it again (tier NAME N, priority NAME N, resume NAME), or remove the "
                  "account and add it again")]


def check_database(path: str) -> tuple[list[Check], list[Account] | None, int]:
    """Check the database read-only: schema, integrity, file modes; return its accounts too.

    Returns the checks, the accounts (None when they cannot be read) and the client key count.
    """
    problem = database_problem(path)
    if problem is not None:
        return [Check("fail", "database", problem, "make every folder on the way one this user "
                      "can enter, or point --db elsewhere")], None, 0
    if not os.path.exists(path):
        return [Check("ok", "database", f"{path} does not exist yet: the first command "
                      f"creates it")], [], 0
    checks = []
    try:
        db = open_read_only(path)
    except (sqlite3.Error, OSError) as error:
        return [Check("fail", "database", f"Cannot open database {path}: {error}",
                      "make it readable by this user, or point --db elsewhere")], None, 0
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            return [Check("fail", "database", f"Database {path} has schema version {version}, "
                          f"newer than this claudeflare {__version__} understands "
                          f"({SCHEMA_VERSION})", "run the newer claudeflare.py that wrote it, "
                          "or point --db at another database")], None, 0
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            checks.append(Check("fail", "database", f"{path} failed its integrity check: "
                                f"{'; '.join(problems[:3])}", "restore a backup "
                                "(python3 claudeflare.py backup makes them)"))
        if version < SCHEMA_VERSION:
            checks.append(Check("ok", "database", f"{path} has schema version {version}; the "
                                f"next command or server upgrades it to {SCHEMA_VERSION}"))
            accounts, keys = None, 0
        else:
            accounts = [account_from_row(row) for row in db.execute(SELECT_ACCOUNTS)]
            checks += number_column_checks(db, path)
            keys = db.execute("SELECT COUNT(*) FROM client_keys").fetchone()[0]
    except sqlite3.DatabaseError as error:
        return [Check("fail", "database", f"Cannot use database {path}: {error}. Is it a "
                      f"claudeflare database?", "point --db or CLAUDEFLARE_DB_PATH at the "
                      "right file")], None, 0
    finally:
        db.close()
    for name in (path, path + "-wal"):
        mode = os.stat(name).st_mode & 0o777 if os.path.exists(name) else 0o600
        if os.name != "nt" and mode & 0o077:
            checks.append(Check("fail", "database", f"{name} has mode {mode:04o}: others may "
                                f"read the tokens and keys in it", f"chmod 600 {name}"))
    if not checks:
        checks.append(Check("ok", "database", f"{path}: schema {version}, integrity ok, "
                            f"mode 0600; accounts: {len(accounts or [])}, client keys: {keys}"))
    return checks, accounts, keys


def check_server(db_path: str, settings: Settings | None) -> tuple[Check, int | None]:
    """Check whether a server runs on the database and answers; return it and its port."""
    holder = server_lock_holder(db_path)
    if holder is None:
        return Check("warn", "server", f"no claudeflare server is running on {db_path}",
                     "start one: python3 claudeflare.py serve (or keep one running: "
                     "python3 claudeflare.py service install)"), None
    server = running_server(db_path)
    if server is None:
        return Check("warn", "server", f"a server is starting on {db_path} ({holder})"), None
    pid, port, url = server.pid, server.port, server.url
    try:
        health = ask_health(url, health_context(settings, server))
    except ClaudeflareError as error:
        return Check("fail", "server", f"pid {pid} holds {db_path}, but: {error}",
                     "see its log; stop it and start it again"), port
    counts = health["accounts"]
    state = {"ok": "ok", "degraded": "warn"}.get(health["status"], "fail")
    return Check(state, "server", f"pid {pid} answers at {url}/health: {health['status']} "
                 f"({counts.get('active', 0)} of {counts.get('total', 0)} accounts active, up "
                 f"{duration_text(health.get('uptime', 0))})"), port


def check_port(host: str, port: int, server_port: int | None) -> Check:
    """Check that the configured port is this database's server's, or free to listen on."""
    if port == 0:
        return Check("ok", "port", "0: the system picks a free port at each start")
    if port == server_port:
        return Check("ok", "port", f"{host}:{port} is this database's server")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if os.name != "nt":
            # As the server binds: a port whose last connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return Check("fail", "port", f"{host}:{port} is taken by another program",
                             f"serve --port {port + 1} (or PORT), or stop the program that "
                             f"uses it (lsof -i :{port})")
            return Check("fail", "port", f"Cannot listen on {host}:{port}: "
                         f"{error.strerror or error}",
                         "set host to an address of this machine, and port to 1024 or above")
    return Check("ok", "port", f"{host}:{port} is free")


def check_access(host: str, tls: bool, keys: int) -> list[Check]:
    """Warn when other machines can reach the server without a key, or see keys in clear."""
    if is_loopback(host):
        return []
    if not keys:
        return [Check("warn", "access", f"{host} is reachable from other machines and there "
                      f"are no client keys: anyone who can reach it can use your accounts",
                      "python3 claudeflare.py keys add NAME, or bind 127.0.0.1")]
    if not tls:
        return [Check("warn", "access", f"{host} is reachable from other machines over plain "
                      f"HTTP: client keys cross the network readable",
                      "serve HTTPS: set tls_cert and tls_key (see the README)")]
    return [Check("ok", "access", f"{host}: HTTPS, with {keys} client keys")]


def check_account(account: Account, now: int, server_running: bool) -> Check:
    """Describe one account's state: usable, or what stops it and how to fix that."""
    status = account.status(now)
    name = f"account {account.name}"
    if status == "needs_reauth":
        reason = account.reauth_reason or "no reason recorded"
        fix = (f"Anthropic disabled that organization: python3 claudeflare.py remove "
               f"{account.name}" if "organization has been disabled" in reason.lower()
               else FIX_REAUTH.format(name=account.name))
        return Check("fail", name, f"needs_reauth ({reason})", fix)
    if status == "expired":
        return Check("fail", name, f"Token expired or missing for account: {account.name} "
                     f"(and no refresh token)", FIX_REAUTH.format(name=account.name))
    if status == "rate_limited":
        return Check("warn", name, f"rate_limited until {iso_time(account.rate_limited_until)} "
                     f"({when_text(account.rate_limited_until, now)}, "
                     f"{account.rate_limit_status or 'no status'})",
                     f"nothing: other accounts serve; it comes back then (python3 "
                     f"claudeflare.py resume {account.name} to try now)")
    if status == "paused":
        return Check("warn", name, "paused: no request goes to it",
                     f"python3 claudeflare.py resume {account.name}")
    if status == "overage":
        return Check("warn", name, "overage: serving on extra usage, billed beyond the plan")
    if status != "active":
        return Check("warn", name, status, "python3 claudeflare.py list")
    kind = f"{account.type}, tier {account.account_tier}"
    if account.type != "oauth":
        return Check("ok", name, f"active ({kind})")
    left = (account.expires_at or 0) - now
    if left >= REFRESH_BEFORE_USE_MS // 2:  # tokens that live under 30 minutes renew late
        return Check("ok", name, f"active ({kind}), token valid for {duration_text(left)}")
    when = f"expired {when_text(account.expires_at, now)}" if left <= 0 else \
        f"expires {when_text(account.expires_at, now)}"
    if not server_running:
        return Check("ok", name, f"active ({kind}), token {when}: refreshed on its next use")
    return Check("warn", name, f"active ({kind}), token {when} though a running server "
                 f"renews tokens before they run out: refreshing is failing",
                 "look for 'Failed to refresh token' in the log; reauth if it says refused")


def check_pool(accounts: list[Account], now: int, overage: str) -> Check:
    """Check that some account can serve requests."""
    if not accounts:
        return Check("warn", "accounts", "none: requests go upstream with each client's own "
                     "credentials", "add one: python3 claudeflare.py add NAME")
    serving = [account for account in accounts if can_serve(account, now, overage)]
    if not serving:
        return Check("fail", "accounts", "No active accounts available: every account is "
                     "paused, rate-limited or needs a login",
                     "python3 claudeflare.py list; resume NAME; or add an account")
    return Check("ok", "accounts", f"{len(serving)} of {len(accounts)} can serve")


def probe(url: str, method: str, body: bytes) -> tuple[int, Any, str]:
    """Send one request that changes nothing; return the status, the headers and what it took.

    A failure raises UpstreamError in the guide's words, naming the outbound proxy when the
    proxy is what failed.
    """
    origin, target = split_url(url)
    client = Upstream(origin, pool_size=0)
    proxy = client.proxy
    host, port = (proxy.host, proxy.port) if proxy else (client.host, client.port)
    started = time.monotonic()
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise UpstreamError(("Proxy " if proxy else "") + describe_network_error(
            error, proxy.display if proxy else origin, DOCTOR_TIMEOUT_S)) from None
    resolved = time.monotonic()
    headers = [("Host", client.host_header), ("anthropic-version", "2023-06-01")]
    if body:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    response, connection = client.send(method, target, headers, body, DOCTOR_TIMEOUT_S)
    answered = time.monotonic()
    response.close()
    connection.close()
    via = f" via proxy {proxy.display}" if proxy else ""
    return response.status, response.headers, (
        f"{url}{via}: resolved in {(resolved - started) * 1000:.0f} ms, answered "
        f"{response.status} in {(answered - resolved) * 1000:.0f} ms")


def check_endpoint(name: str, url: str, method: str, body: bytes,
                   fix: str) -> tuple[Check, Any]:
    """Check that an endpoint resolves and answers; return the check and the answer's headers."""
    try:
        status, headers, what = probe(url, method, body)
    except UpstreamError as error:
        message = str(error)
        return Check("fail", name, message,
                     FIX_PROXY if message.startswith("Proxy ") else fix), None
    return Check("ok" if status < 500 else "warn", name, what), headers


def check_clock(date: str | None, local_ms: int) -> Check:
    """Compare this machine's clock with the upstream's Date header (OAuth expiry relies on it)."""
    try:
        upstream_ms = int(email.utils.parsedate_to_datetime(date or "").timestamp() * 1000)
    except (TypeError, ValueError):
        return Check("warn", "clock", "not checked: the upstream's answer had no readable Date "
                     "header")
    skew = local_ms - upstream_ms
    text = f"{duration_text(abs(skew))} {'ahead of' if skew > 0 else 'behind'} the upstream's"
    if abs(skew) < CLOCK_SKEW_WARN_MS:
        return Check("ok", "clock", f"within {duration_text(abs(skew))} of the upstream's "
                     f"(its Date header counts whole seconds)")
    return Check("fail" if abs(skew) >= CLOCK_SKEW_FAIL_MS else "warn", "clock",
                 f"this machine's clock is {text}: token expiry and rate-limit resets are "
                 f"judged by it", "turn on network time (NTP) on this machine")


def size_text(size: int) -> str:
    """Say a file size briefly: 512 B, 12.3 KB, 4.5 MB."""
    for unit in ("B", "KB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} MB"


#: The time a log line begins with (pretty) or carries as its "ts" (JSON).
LOG_LINE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
#: How far back `doctor` shows log errors when no server runs on the database.
LOG_ERRORS_WITHIN_MS = 3_600_000


def log_line_time(line: str) -> int:
    """Return when a log line was written, in epoch ms (0 if it does not say)."""
    found = LOG_LINE_TIME.search(line)
    if found is None:
        return 0
    moment = datetime.datetime.strptime(found.group(), "%Y-%m-%dT%H:%M:%S.%fZ")
    return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)


def log_error_lines(path: str) -> list[str]:
    """Return the ERROR lines near the end of a log file, pretty or JSON, oldest first."""
    try:
        with open(path, "rb") as source:
            size = source.seek(0, os.SEEK_END)
            source.seek(max(0, size - LOG_TAIL_BYTES))
            lines = source.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    if size > LOG_TAIL_BYTES:
        lines = lines[1:]
    return [line for line in lines
            if re.match(r"\[[^\]]*\] ERROR: ", line) or '"level": "ERROR"' in line]


def check_logs(since: int, now: int) -> list[Check]:
    """Check the log folder as serve will meet it, say how big app.log is, and show its
    last errors written since `since` (when the server started), each with its age."""
    try:
        log_dir, warning = log_folder()
    except ClaudeflareError as error:
        return [Check("fail", "logs", str(error))]
    log_dir = os.path.abspath(log_dir)
    path = os.path.join(log_dir, LOG_FILE_NAME)
    existing = log_dir
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    below = os.path.join(existing, os.path.relpath(log_dir, existing).split(os.sep)[0])
    fix = "fix its permissions, or set CLAUDEFLARE_LOG_DIR to a folder this user can write"
    info = os.lstat(path) if os.path.lexists(path) else None
    if warning:
        checks = [Check("warn", "logs", warning)]
    elif existing != log_dir and os.path.lexists(below):
        checks = [Check("fail", "logs", f"Cannot write the log: {below} is a file, not a "
                        f"folder", CHOOSE_LOG_DIR)]
    elif not os.access(existing, os.W_OK | os.X_OK):
        checks = [Check("fail", "logs", f"cannot write in {existing}", fix)]
    elif info is not None and stat.S_ISLNK(info.st_mode):
        checks = [Check("fail", "logs", f"Cannot write the log: {path} is a symbolic link",
                        CHOOSE_LOG_DIR)]
    elif info is not None and os.name != "nt" and info.st_uid != os.getuid():
        checks = [Check("fail", "logs", f"Cannot write the log: {path} belongs to another "
                        f"user", CHOOSE_LOG_DIR)]
    elif existing != log_dir:
        checks = [Check("ok", "logs", f"{log_dir} does not exist yet: serve creates it")]
    elif not os.path.exists(path):
        checks = [Check("ok", "logs", f"{log_dir} is writable; no {LOG_FILE_NAME} yet")]
    elif not os.access(path, os.W_OK):
        checks = [Check("fail", "logs", f"cannot write {path}", fix)]
    else:
        checks = [Check("ok", "logs", f"{path}: {size_text(os.path.getsize(path))} (rotates "
                        f"at {LOG_ROTATE_BYTES // (1024 * 1024)} MB)")]
    recent = [line for line in log_error_lines(path) if log_line_time(line) >= since]
    checks += [Check("warn", "log", f"{when_text(log_line_time(line), now)}: {line[:300]}")
               for line in recent[-LOG_ERRORS_SHOWN:]]
    return checks


def check_alerts(settings: Settings, send_test: bool) -> list[Check]:
    """Check each alert destination (the program of a command, the proxy on a URL's way);
    with send_test, send each a test alert."""
    destinations = alert_destinations(settings)
    if not destinations:
        return [Check("ok", "alerts", "no destination: alerts are kept and shown, nothing is "
                      "sent (set alert_url or alert_command)")]
    checks = []
    for destination in destinations:
        if destination.command:
            program = shlex.split(destination.command)[0]
            if not shutil.which(program):
                checks.append(Check("fail", "alerts", f"{destination.name}: {program} is not "
                                    f"found or not executable", "install it, or give "
                                    "alert_command its full path"))
                continue
            what = f"{destination.name}: runs {shutil.which(program)}"
        else:
            proxy = proxy_for(destination.url)
            what = (f"{destination.name}: {destination.format} webhook"
                    + (f" via proxy {proxy.display}" if proxy else ""))
        if not send_test:
            checks.append(Check("ok", "alerts", what))
            continue
        sent, answer = send_alert(destination, make_test_alert(), Alerts.timeout_s)
        checks.append(Check("ok" if sent else "fail", "alerts", f"{what}; test alert: {answer}",
                            "" if sent else FIX_PROXY if answer.startswith("Proxy ")
                            else "check the destination (alert_url, alert_command) and the "
                                 "network"))
    return checks


def run_doctor(config_path: str, db_path: str, flags: dict, now: int,
               send_test: bool = False) -> list[Check]:
    """Run the troubleshooting guide's checks in its order, changing nothing anywhere (but
    sending a test alert, with send_test)."""
    checks = [check_runtime()]
    config_checks, file_values = check_config(config_path)
    environment_checks, environ = check_environment()
    checks += config_checks + environment_checks
    try:
        settings = load_settings(config_path, flags, environ,
                                 config=ConfigSnapshot(config_path, file_values))
    except ClaudeflareError as error:
        settings = None
        checks.append(Check("fail", "settings", str(error)))
    if settings is not None:
        checks += check_settings(settings)
    database_checks, accounts, keys = check_database(db_path)
    checks += database_checks
    server, server_port = check_server(db_path, settings)
    checks.append(server)
    if settings is not None:
        checks.append(check_port(settings.host, settings.port, server_port))
        checks += check_access(settings.host, bool(settings.tls_cert), keys)
    if accounts is not None:
        checks += [check_account(account, now, server_port is not None) for account in accounts]
        checks.append(check_pool(accounts, now, settings.overage if settings else "last"))
    if settings is not None:
        sent = now_ms()
        upstream, headers = check_endpoint(
            "upstream", settings.upstream_url + "/v1/models", "GET", b"",
            "check the network and upstream_url")
        checks.append(upstream)
        if headers is not None:
            checks.append(check_clock(headers.get("date"), (sent + now_ms()) // 2))
        checks.append(check_endpoint("token endpoint", settings.oauth_token_url, "POST", b"{}",
                                     "check the network and oauth_token_url")[0])
        checks += check_alerts(settings, send_test)
    started = (int(os.stat(server_lock_path(db_path)).st_mtime * 1000)
               if server_port is not None else 0)
    return checks + check_logs(started or now - LOG_ERRORS_WITHIN_MS, now)


###############################################################################
# Service #####################################################################
###############################################################################

SERVICE_NAME = "claudeflare"
LAUNCHD_LABEL = "local.claudeflare"
SERVICE_SYSTEMS = ("systemd", "launchd")
#: What the service reaches the network through, as the shell that installs it does.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY",
                   "no_proxy")
#: Seconds a service manager waits past shutdown_timeout_s before it kills the server.
STOP_GRACE_S = 15


@dataclass
class ServicePlan:
    """What a service runs: a command line and its environment, and how long a stop may take."""

    command: list[str]
    environment: dict[str, str]
    stop_timeout_s: int


def service_plan(settings: Settings, config_path: str, db_path: str) -> ServicePlan:
    """Return how a service runs `serve` as this command line would.

    The same Python and this very file, absolute paths, and every setting that came from a flag
    or the environment (the config file is read by the service itself, changes included).
    """
    command = [sys.executable, os.path.abspath(__file__), "serve",
               "--config", os.path.abspath(config_path), "--db", os.path.abspath(db_path)]
    environment = {"CLAUDEFLARE_LOG_DIR": os.path.abspath(log_folder()[0])}
    for setting in SETTINGS:
        if settings.sources[setting.key] in ("flag", "env"):
            environment[setting.env] = str(settings.values[setting.key])
    for name in PROXY_VARIABLES:
        if os.environ.get(name):
            environment[name] = os.environ[name]
    named = [("the path of Python", command[0]), ("the path of claudeflare", command[1]),
             ("--config", command[4]), ("--db", command[6]), *environment.items()]
    for name, value in named:
        if CONTROL_CHARACTER.search(value):
            # A newline would add directives of its own to a unit; a plist cannot hold one.
            raise ClaudeflareError(f"{name} holds a control character ({printable(value)}), "
                                   f"which a service file cannot carry: choose a value without")
    return ServicePlan(command, environment, int(settings.shutdown_timeout_s) + STOP_GRACE_S)


def default_service_system(platform: str) -> str | None:
    """Return the per-user service manager of a platform (as sys.platform names it), if any."""
    if platform.startswith("linux"):
        return "systemd"
    return "launchd" if platform == "darwin" else None


def service_path(system: str) -> str:
    """Return where the unit (systemd) or the agent's plist (launchd) of this user goes."""
    home = os.path.expanduser("~")
    if system == "systemd":
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        return os.path.join(base, "systemd", "user", SERVICE_NAME + ".service")
    return os.path.join(home, "Library", "LaunchAgents", LAUNCHD_LABEL + ".plist")


def systemd_word(text: str, expand: bool = True) -> str:
    """Write one word of a unit file line: % (and in commands $) doubled, quoted if needed."""
    text = text.replace("%", "%%")
    if expand:
        text = text.replace("$", "$$")
    if text and not re.search(r"[\s\"'\\;]", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(plan: ServicePlan) -> str:
    """Return the systemd user unit that runs the plan and restarts it when it fails."""
    lines = [
        "# Written by: python3 claudeflare.py service install",
        "[Unit]",
        "Description=claudeflare: Claude API proxy over a pool of accounts",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_word(word) for word in plan.command),
        *[f"Environment={systemd_word(f'{name}={value}', expand=False)}"
          for name, value in plan.environment.items()],
        "Restart=on-failure",
        "RestartSec=5",
        f"TimeoutStopSec={plan.stop_timeout_s}",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def launchd_plist(plan: ServicePlan) -> str:
    """Return the launchd agent that runs the plan at login and restarts it when it fails."""
    return plistlib.dumps({
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": plan.command,
        "EnvironmentVariables": plan.environment,
        "RunAtLoad": True,
        # Restart after a failure, not after a clean stop.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 5,
        "ExitTimeOut": plan.stop_timeout_s,
    }, sort_keys=False).decode()


def task_scheduler_command(action: str, plan: ServicePlan) -> str:
    """Return the schtasks command that does on Windows what `service ACTION` does elsewhere."""
    if action == "install":
        words = ["schtasks", "/Create", "/TN", SERVICE_NAME, "/SC", "ONLOGON", "/TR",
                 subprocess.list2cmdline(plan.command), "/F"]
    elif action == "uninstall":
        words = ["schtasks", "/Delete", "/TN", SERVICE_NAME, "/F"]
    else:
        words = ["schtasks", "/Query", "/TN", SERVICE_NAME]
    return subprocess.list2cmdline(words)


###############################################################################
# CLI #########################################################################
###############################################################################

def argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a setting's parser for argparse, which shows only ArgumentTypeError messages."""
    def parse_argument(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse_argument


@contextlib.contextmanager
def open_store(args: argparse.Namespace, create: bool = False) -> Iterator[Store]:
    """Open the database a command works on (--db, CLAUDEFLARE_DB_PATH, or the default).

    Only commands that add something create it: a mistyped path must not leave files behind.
    """
    store = Store(args.db or default_db_path(), create=create)
    try:
        yield store
    finally:
        store.close()


#: What Ctrl+D at a prompt says; Ctrl+C is main's KeyboardInterrupt.
CANCELLED = "Cancelled (end of input): nothing was changed"


def ask(prompt: str, secret: bool = False) -> str:
    """Read one line: typed at a prompt (a secret without echo), or piped in, unprompted
    for a secret. Ctrl+D at a terminal cancels the command; the end of a pipe reads ""."""
    if not sys.stdin.isatty():
        if not secret:
            print(prompt, end="", flush=True)
        return sys.stdin.readline().strip()
    try:
        return (getpass.getpass(prompt) if secret else input(prompt)).strip()
    except EOFError:
        print()
        raise ClaudeflareError(CANCELLED) from None


def confirm(question: str, skip: bool) -> None:
    """Go on only when the user answers yes (or skip: --yes); otherwise change nothing."""
    if not skip and ask(f"{question} [y/N] ").lower() not in ("y", "yes"):
        raise ClaudeflareError("Not confirmed: nothing was changed (--yes skips the question)")


def read_api_key() -> str:
    """Read an API key from stdin; warn when it does not look like an Anthropic key."""
    key = ask("Paste the API key: ", secret=True)
    if not key or not API_KEY_PATTERN.fullmatch(key):
        raise ClaudeflareError("No valid API key read from stdin (one line of printable "
                               "ASCII, no spaces). Pipe it in: "
                               "echo \"$ANTHROPIC_API_KEY\" | claudeflare.py add NAME "
                               "--api-key")
    if not key.startswith("sk-ant-"):
        print("claudeflare: warning: this does not look like an Anthropic API key "
              "(sk-ant-...); stored anyway", file=sys.stderr)
    return key


###############################################################################
# serve #######################################################################
###############################################################################

class ServerLock:
    """One server per database: an OS lock on <database>.lock, which names its holder.

    The lock goes with the process however it ends, so a crash never leaves a stale lock.
    """

    def __init__(self, db_path: str) -> None:
        self.path = server_lock_path(db_path)
        create_private_file(self.path)
        self.file = open(self.path, "r+", encoding="utf-8")
        try:
            if fcntl is not None:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                # Windows locks are mandatory: lock a byte far past the text, which stays
                # readable for the message below.
                self.file.seek(1 << 20)
                msvcrt.locking(self.file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "starting up"
            self.file.close()
            raise ClaudeflareError(
                f"Another claudeflare server is already running on {db_path} ({holder}). Stop "
                f"it first, or start this one with another --db.") from None

    def note(self, host: str, port: int, cert: str = "") -> None:
        """Write who holds the lock, for the message a second server shows, and where it
        answers with which certificate, for `health` and `doctor` (see running_server)."""
        self.file.seek(0)
        self.file.truncate()
        scheme, served = ("https", f", certificate {os.path.abspath(cert)}") if cert else \
            ("http", "")
        self.file.write(f"pid {os.getpid()}, port {port}, {scheme}://{host}:{port}{served}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


#: What the interpreter runs to start this file again as an imported module: from this file's
#: folder, never the current one (-c would put that first on the module path), whatever the
#: file is called. It goes in the environment, and the command line (what `ps` shows) reads
#: `python3 -B -c <one short line> /path/claudeflare.py serve ...`.
AS_MODULE = ("import os, sys\n"
             "path = sys.argv.pop(1)\n"
             "sys.path[0] = os.path.dirname(path)\n"
             "import importlib.machinery, importlib.util\n"
             "loader = importlib.machinery.SourceFileLoader('claudeflare', path)\n"
             "spec = importlib.util.spec_from_loader('claudeflare', loader)\n"
             "module = sys.modules['claudeflare'] = importlib.util.module_from_spec(spec)\n"
             "loader.exec_module(module)\n"
             "sys.exit(module.main())\n")
AS_MODULE_ENV = "CLAUDEFLARE_AS_MODULE"
AS_MODULE_BOOT = f"import os; exec(os.environ.pop('{AS_MODULE_ENV}'))"


def serve_as_module() -> None:
    """Run `serve` as an imported module rather than as the script it was started as.

    CPython keeps a script's whole parse tree, and the memory compiling it took, while the
    script runs: for this file about 15 MB that a server running for months never uses. An
    imported module's are freed once it is compiled. exec keeps the process: its pid, open
    files, terminal and signals. (-B: no __pycache__ beside the one file.)
    """
    if not sys.executable:
        return  # an embedded or frozen interpreter: serve as the script, then
    flags = subprocess._args_from_interpreter_flags()  # -X dev, -W error, ...
    if "-B" not in flags:
        flags.insert(0, "-B")
    with contextlib.suppress(OSError):  # could not: serve as the script, then
        os.execve(sys.executable, [sys.executable, *flags, "-c", AS_MODULE_BOOT,
                                   os.path.abspath(__file__), *sys.argv[1:]],
                  {**os.environ, AS_MODULE_ENV: AS_MODULE})


def print_start(app: App, url: str, local: str, log_path: str) -> None:
    """Say on the terminal where the server answers, where it logs, and what it serves with."""
    accounts = app.store.accounts()
    serving = sum(can_serve(account, now_ms(), app.settings.overage) for account in accounts)
    add = "add one: python3 claudeflare.py add NAME (or add NAME --api-key)"
    pool = (f"{serving} of {len(accounts)} can serve" if serving else
            f"none can serve (python3 claudeflare.py list says why); {add}" if accounts else
            f"none: requests go upstream with each client's own credentials; {add}")
    print(f"claudeflare {__version__} listening on {url}\n"
          f"  status page: {local}/\n"
          f"  log:         {log_path}\n"
          f"  accounts:    {pool}\n"
          f"  strategy:    {app.settings.lb_strategy}\n"
          f"Ctrl+C stops it.", flush=True)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the proxy until SIGINT or SIGTERM, then stop gracefully.

    Shutdown stops accepting connections, lets in-flight requests and streams finish (up to
    shutdown_timeout_s), writes the request log, closes the database and flushes the log. A
    second signal exits at once.
    """
    threading.stack_size(THREAD_STACK_BYTES)
    folder, warning = log_folder()
    logs = LogSetup(settings.log_level, settings.log_format, folder,
                    os.environ.get("CLAUDEFLARE_DEBUG") == "1")
    server_log = component_logger("Server")
    if warning:
        server_log.warning("%s", warning)
        print(f"claudeflare: warning: {warning}", file=sys.stderr, flush=True)
    for problem in settings.config.problems:
        server_log.error("%s", problem)
    db_path = args.db or default_db_path()
    db_folder = os.path.dirname(os.path.abspath(db_path))
    made = [name for name in (db_folder, db_path) if not os.path.exists(name)]
    try:
        problem = database_problem(db_path)
        if problem is not None:
            raise ClaudeflareError(problem)
        ensure_private_dir(db_folder)
        lock = ServerLock(db_path)
        try:
            server = make_server(settings, db_path)
        except ClaudeflareError:
            lock.release()
            raise
    except ClaudeflareError as error:
        server_log.error("%s", error)
        logs.close()
        if db_path in made:  # a server that never started leaves no new database behind
            for name in (db_path, db_path + "-wal", db_path + "-shm", server_lock_path(db_path)):
                with contextlib.suppress(OSError):
                    os.unlink(name)
            if db_folder in made:
                with contextlib.suppress(OSError):
                    os.rmdir(db_folder)
        raise
    app = server.app
    host, port = server.server_address[:2]
    scheme = "https" if settings.tls_cert else "http"
    lock.note(host, port, settings.tls_cert)
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server_log.info("claudeflare %s listening on %s://%s:%d (upstream %s, database %s, log %s)",
                    __version__, scheme, host, port, settings.upstream_url, app.store.path,
                    logs.path)
    if not is_loopback(host) and not app.client_keys():
        warning = (f"Listening on {host}, reachable from other machines, with no client keys: "
                   f"anyone who can reach port {port} can use your accounts. Create a key "
                   f"(python3 claudeflare.py keys add NAME) or bind 127.0.0.1.")
        server_log.warning("%s", warning)
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    print_start(app, f"{scheme}://{host}:{port}", local_url(host, port, scheme == "https"),
                logs.path)
    release_free_memory()  # what compiling this file and starting up used, and no longer needs
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.life.stopping = True
        app.holds.close()  # requests waiting for a reset get their error now, not at the timeout
        app.stop_background()
        deadline = time.monotonic() + settings.shutdown_timeout_s
        server.server_close()
        server_log.info("Shutting down: waiting up to %gs for %d requests in flight",
                        settings.shutdown_timeout_s, server.life.running)
        print(f"stopping: waiting up to {settings.shutdown_timeout_s:g}s for "
              f"{server.life.running} requests in flight (Ctrl+C again quits at once)",
              flush=True)
        unfinished = server.life.drain(settings.shutdown_timeout_s)
        if unfinished:
            cut = server.life.cut_streams()
            server_log.warning("shutdown_timeout_s ran out with %d requests in flight; cut %d "
                               "answers short", unfinished, cut)
            unfinished = server.life.drain(CUT_GRACE_S)
        if unfinished:
            server_log.warning("Stopped waiting with %d requests still in flight", unfinished)
        app.close(deadline)
        lock.release()
        server_log.info("Server stopped")
        logs.close()
        print("stopped", flush=True)
    return 0


###############################################################################
# Logins: add, reauth #########################################################
###############################################################################

#: Where a login waits for a code from a browser on another machine.
PASTE_PROMPT = "Paste the authorization code: "


def oauth_login(settings: Settings, mode: str,
                open_browser: bool = True) -> tuple[Tokens, str | None]:
    """Log in as Claude Code does; return the tokens and, for console, a new API key.

    The browser comes back to a loopback listener and the login finishes by itself; a browser
    on another machine uses the second URL, whose page shows a code to paste. Whichever
    arrives first wins.
    """
    login = PkceLogin.start(mode)
    results: queue.Queue = queue.Queue()
    listener = LoginListener(login, results)
    try:
        browser_url = login.authorize_url(settings.client_id, listener.redirect_uri)
        paste_url = login.authorize_url(settings.client_id, settings.oauth_redirect_uri)
        print("Log in with this URL; claudeflare carries on by itself once you are done:")
        print(browser_url)
        if not (open_browser and start_browser(browser_url)):
            print("(No browser was started here: open the URL yourself.)")
        print("Browser on another machine (SSH, no screen)? Open this URL there instead, and "
              "paste the code its page shows:")
        print(paste_url)
        print(PASTE_PROMPT, end="", flush=True)
        threading.Thread(target=read_pasted_code, args=(results,), name="claudeflare-paste",
                         daemon=True).start()
        code, state = wait_for_code(login, results, settings.login_timeout_s)
        print()
        oauth = OAuthClient(settings)
        try:
            tokens = oauth.exchange(login, code, state)
            api_key = oauth.create_api_key(tokens.access_token) if mode == "console" else None
        except ClaudeflareError as error:
            listener.finish(False, f"The login failed: {error}")
            raise
        finally:
            oauth.close()
        listener.finish(True, "Logged in. You can close this tab and go back to the terminal.")
    finally:
        listener.close()
    return tokens, api_key


def start_browser(url: str) -> bool:
    """Open a URL in a graphical browser if this machine has one (never a text browser, which
    would take over the terminal); tell whether one was started."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        return False
    import webbrowser  # only logins need it
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def read_pasted_code(results: queue.Queue) -> None:
    """Pass on each code pasted on standard input (blank lines are skipped), then its end."""
    for line in sys.stdin:
        if line.strip():
            results.put(("paste", line))
    results.put(("end", ""))


def wait_for_code(login: PkceLogin, results: queue.Queue, timeout_s: float) -> tuple[str, str]:
    """Return the code and state of whichever way back arrives first, within timeout_s.

    A pasted code that cannot be right is explained and asked for again; the browser may come
    back meanwhile. Ctrl+D at a terminal cancels; a pipe's end leaves the browser's way open,
    unless what it gave was wrong.
    """
    deadline, wrong = time.monotonic() + timeout_s, None
    while True:
        try:
            kind, value = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise ClaudeflareError(
                f"The login timed out after {timeout_s:g}s: the browser did not come back and "
                f"no code was pasted. Start it again.") from None
        if kind == "end" and (wrong or sys.stdin.isatty()):
            print()
            raise wrong or ClaudeflareError(CANCELLED)
        if kind == "paste":
            try:
                return login.code_from(value)
            except ClaudeflareError as error:
                wrong = error
                print(f"{error}.\n{PASTE_PROMPT}", end="", flush=True)
        elif kind == "refused":
            raise ClaudeflareError(f"The login did not go through: {value}. Start it again.")
        elif kind != "end":
            return value


def identity(tokens: Tokens) -> dict:
    """Return the email and organization columns for a login's tokens."""
    return {"email": tokens.email, "organization": tokens.organization}


def who(tokens: Tokens) -> str:
    """Name whom a login's tokens belong to: "email, organization"."""
    return printable(", ".join(filter(None, (tokens.email, tokens.organization)))
                     or "identity not given")


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    """Add an account: an API key read from stdin, or an OAuth login.

    The database is created once there is an account to put in it: a login given up leaves
    nothing behind.
    """
    validate_account_name(args.name)
    if os.path.exists(args.db or default_db_path()):
        with open_store(args) as store:
            if any(account.name == args.name for account in store.accounts()):
                raise ClaudeflareError(f"Account already exists: {args.name}. Choose another "
                                       f"name, or log it in again with: reauth {args.name}")
    if args.api_key:
        kind, fields = "api_key", {"api_key": read_api_key()}
        done = f"Added API-key account {args.name} (tier {args.tier})"
    else:
        tokens, api_key = oauth_login(settings, args.mode, not args.no_browser)
        kind, fields = ("api_key", {"api_key": api_key}) if api_key is not None else (
            "oauth", {"access_token": tokens.access_token,
                      "refresh_token": tokens.refresh_token, "expires_at": tokens.expires_at})
        fields.update(identity(tokens))
        done = (f"Added {args.name} ({who(tokens)})"
                + (" with a new API key" if api_key is not None else ""))
    with open_store(args, create=True) as store:
        store.add_account(args.name, kind, args.tier, priority=args.priority, **fields)
    print(done)
    return 0


def cmd_reauth(args: argparse.Namespace, settings: Settings) -> int:
    """Log an existing account in again, keeping its name, tier and history."""
    with open_store(args) as store:
        account = store.account(args.name)
        if args.api_key or account.type == "api_key" and args.mode is None:
            if account.type != "api_key":
                raise ClaudeflareError(f"{args.name} is an oauth account: --api-key would change "
                                       f"its kind. Remove it and add it again instead.")
            if not args.api_key:
                raise ClaudeflareError(
                    f"{args.name} is an API-key account: give it a new key with reauth "
                    f"{args.name} --api-key (read from stdin), or mint one with --mode console")
            store.change_account(args.name, api_key=read_api_key(), needs_reauth=0,
                                 reauth_reason=None)
            print(f"Replaced the API key of account {args.name}")
            return 0
        mode = args.mode or "max"
        if (mode == "max") != (account.type == "oauth"):
            raise ClaudeflareError(
                f"{args.name} is an {account.type} account; --mode {mode} would change its kind. "
                f"Remove it and add it again instead.")
        tokens, api_key = oauth_login(settings, mode, not args.no_browser)
        reset = {"needs_reauth": 0, "reauth_reason": None, **identity(tokens)}
        if api_key is not None:
            store.change_account(args.name, api_key=api_key, **reset)
        else:
            store.change_account(args.name, access_token=tokens.access_token,
                                 refresh_token=tokens.refresh_token,
                                 expires_at=tokens.expires_at, **reset)
    print(f"Logged in account {args.name} again ({who(tokens)})")
    return 0


###############################################################################
# Commands ####################################################################
###############################################################################

def short_time(ms: int | None, now: int) -> str:
    """Format a time for a table: '-' for none, else local date and time with minutes."""
    if not ms:
        return "-"
    text = time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))
    return text + (" (past)" if ms <= now else "")


def status_text(account: Account, now: int) -> str:
    """Return the status column of `list`, with the reason or the end time where there is one."""
    status = account.status(now)
    if status == "rate_limited":
        return f"rate_limited until {short_time(account.rate_limited_until, now)}"
    if status == "overage":
        return f"overage until {short_time(account.overage_until, now)} (extra usage, billed)"
    if status == "needs_reauth" and account.reauth_reason:
        return f"needs_reauth ({redact(account.reauth_reason)[:60]})"
    return status + "".join(f", {family_label(name)} limited until {short_time(reset, now)}"
                            for name, reset in spent_windows(account, now))


def print_table(rows: list[list[str]]) -> None:
    """Print rows as columns padded to their widest cell, control characters escaped."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print every account with its status, usage and limits."""
    with open_store(args) as store:
        accounts = store.accounts()
    now = now_ms()
    if args.json:
        print(json.dumps([account_json(account, now, settings.session_duration_ms)
                          for account in accounts], indent=2))
        return 0
    if not accounts:
        print("No accounts. Add one: python3 claudeflare.py add NAME")
        return 0
    rows = [["NAME", "TYPE", "TIER", "PRIORITY", "STATUS", "REQUESTS", "TOKEN EXPIRES",
             "RATE LIMIT", "RESETS", "LAST USED", "IDENTITY"]]
    for account in accounts:
        rows.append([
            account.name, account.type, str(account.account_tier), str(account.priority),
            status_text(account, now),
            f"{account.session_count(now, settings.session_duration_ms)}/"
            f"{account.request_count}",
            short_time(account.expires_at, now) if account.type == "oauth" else "-",
            account.rate_limit_status or "-", short_time(account.rate_limit_reset, now),
            when_text(account.last_used, now),
            " / ".join(filter(None, (account.email, account.organization))) or "-"])
    print_table(rows)
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    """Remove an account after the user types its name again (or with --force)."""
    with open_store(args) as store:
        store.account(args.name)
        if not args.force:
            if ask(f"Type the account name ({args.name}) to remove it: ") != args.name:
                raise ClaudeflareError(f"Confirmation did not match; {args.name} was not "
                                       f"removed (use --force to skip the question)")
        store.remove_account(args.name)
    print(f"Removed account {args.name}")
    return 0


def change_account(args: argparse.Namespace, done: str, **fields: Any) -> int:
    """Set some columns of the named account and say what was done."""
    with open_store(args) as store:
        store.change_account(args.name, **fields)
    print(done)
    return 0


def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    """Stop routing requests to an account until it is resumed."""
    with open_store(args) as store:
        if store.account(args.name).paused:
            print(f"Account {args.name} is already paused")
            return 0
    return change_account(args, f"Paused account {args.name}", paused=1)


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    """Route requests to an account again, clearing any rate-limit or needs_reauth mark."""
    return change_account(args, f"Resumed account {args.name}", **RESUMED)


def cmd_tier(args: argparse.Namespace, settings: Settings) -> int:
    """Set an account's tier (its weight in the weighted strategy)."""
    return change_account(args, f"Set tier of {args.name} to {args.tier}",
                          account_tier=args.tier)


def cmd_priority(args: argparse.Namespace, settings: Settings) -> int:
    """Set an account's priority: lower serves first, higher only while no lower one can."""
    return change_account(args, f"Set priority of {args.name} to {args.priority}",
                          priority=args.priority)


#: Strategies that move a conversation between accounts on every request.
ROTATING_STRATEGIES = frozenset({"round-robin", "weighted", "least-requests"})


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    """Show or change settings in config.json."""
    if args.action == "list":
        rows = [["KEY", "VALUE", "FROM"]]
        rows += [[setting.key, str(settings.values[setting.key]), settings.sources[setting.key]]
                 for setting in SETTINGS]
        print_table(rows)
        print(f"config file: {settings.config.path}")
        return 0
    if args.key not in SETTINGS_BY_KEY:
        raise ClaudeflareError(f"Unknown setting: {args.key} (known: "
                               f"{', '.join(SETTINGS_BY_KEY)})")
    setting = SETTINGS_BY_KEY[args.key]
    if args.action == "get":
        print(settings.values[args.key])
        return 0
    if args.action == "unset":
        if args.key not in settings.file_values:
            print(f"{args.key} is not set in {settings.config.path}: nothing to remove")
            return 0
        settings.config.update(args.key, None)
        print(f"Removed {args.key} from {settings.config.path}: the default, "
              f"{setting.default}, applies unless {setting.env} is set")
        return 0
    if args.value is None:
        raise ClaudeflareError(f"config set needs a value: config set {args.key} VALUE")
    value = validate_setting(args.key, args.value, "the command line")
    settings.config.update(args.key, value)
    print(f"Set {args.key} = {value} in {settings.config.path}")
    if args.key == "lb_strategy" and value in ROTATING_STRATEGIES and \
            settings.lb_strategy not in ROTATING_STRATEGIES:  # said once, when switching
        print(f"note: {value} moves a conversation to another account on every request: it "
              f"loses prompt-cache hits and does not look like one person's use of an account. "
              f"session (the default) keeps each conversation on one account.", file=sys.stderr)
    if os.environ.get(setting.env):
        print(f"note: {setting.env} is set in this environment and overrides the file for "
              f"servers started with it", file=sys.stderr)
    return 0


def cmd_clear_history(args: argparse.Namespace, settings: Settings) -> int:
    """Delete the request log, once the user confirms."""
    with open_store(args) as store:
        confirm("Delete every recorded request?", args.yes)
        count = store.clear_history()
    print(f"Cleared {count} request records")
    return 0


def cmd_reset_stats(args: argparse.Namespace, settings: Settings) -> int:
    """Zero the per-account request counters, once the user confirms."""
    with open_store(args) as store:
        confirm("Zero every account's request counters?", args.yes)
        count = store.reset_stats()
    print(f"Reset request counters of {count} accounts")
    return 0


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the database consistently, even while the server runs."""
    with open_store(args) as store:
        store.backup(args.path)
    print(f"Backed up {store.path} to {args.path}")
    return 0


#: The limits `keys add` and `keys set` take: option -> column, and how its value is read.
KEY_OPTIONS = {
    "owner": ("owner", parse_text),
    "budget_day": ("budget_day", number(0, 10 ** 9, inclusive=True)),
    "budget_week": ("budget_week", number(0, 10 ** 9, inclusive=True)),
    "budget_month": ("budget_month", number(0, 10 ** 9, inclusive=True)),
    "tokens_day": ("tokens_day", parse_positive_int),
    "max_concurrent": ("max_concurrent", parse_positive_int),
    "rpm": ("rpm", parse_positive_int), "models": ("models", parse_text),
    "expires": ("expires_at", None), "priority_floor": ("priority_floor", parse_priority),
}


def parse_expiry(text: str, zone: datetime.tzinfo | None) -> int:
    """Read --expires: a date (the key works through that day) or a date and time, in the
    budget time zone unless the text names one; return epoch ms."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ClaudeflareError(f"Invalid --expires {text!r}: use a date (2027-01-31) or a date "
                               f"and time (2027-01-31T18:00)") from None
    if len(text.strip()) == 10:
        moment += datetime.timedelta(days=1)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone) if zone else moment.astimezone()
    return int(moment.timestamp() * 1000)


def key_changes(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Collect the limits a `keys add` or `keys set` asks for: column -> value, None to remove."""
    changes: dict[str, Any] = {}
    for option, (column, _) in KEY_OPTIONS.items():
        value, removed = getattr(args, option), getattr(args, f"no_{option}")
        if value is not None and removed:
            raise ClaudeflareError(f"--{option.replace('_', '-')} and --no-"
                                   f"{option.replace('_', '-')} contradict each other")
        if value is not None:
            changes[column] = (parse_expiry(value, time_zone(settings.budget_timezone))
                               if option == "expires" else value)
        elif removed or (args.no_budget and option.startswith("budget")):
            changes[column] = None
    if changes.get("models") is not None:
        changes["models"] = ",".join(pattern.strip() for pattern in changes["models"].split(",")
                                     if pattern.strip())
        if not changes["models"]:
            raise ClaudeflareError("--models takes one or more patterns, such as "
                                   "claude-sonnet-*,claude-haiku-* (--no-models removes the "
                                   "limit)")
    if args.pause or args.resume:
        changes["paused"] = int(args.pause)
    return changes


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """Manage client keys: once any exists, every client must present one."""
    changes = key_changes(args, settings)
    if changes and args.action in ("list", "remove"):
        raise ClaudeflareError(f"keys {args.action} takes no limit options")
    with open_store(args, create=args.action == "add") as store:
        if args.action == "add":
            key = store.add_client_key(args.name, **changes)
            print(f"Client key {args.name}: {key}")
            print("It is shown this once; claudeflare keeps only a salted hash. Clients send it "
                  "as ANTHROPIC_API_KEY (x-api-key) or ANTHROPIC_AUTH_TOKEN (Bearer).")
            if len(store.client_keys()) == 1:
                print("From now on every /v1 request, the API and the status page need a key.")
        elif args.action == "set":
            if not changes:
                raise ClaudeflareError("Nothing to change: give keys set a limit option, such "
                                       "as --budget-day 5, --no-rpm or --pause")
            store.change_client_key(args.name, **changes)
            print(f"Changed client key {args.name}: "
                  f"{', '.join(sorted(changes))}; a running server applies it at once")
        elif args.action == "remove":
            store.remove_client_key(args.name)
            print(f"Removed client key {args.name}")
            if not store.client_keys():
                print("No client keys left: the proxy is open to anyone who can reach it again.")
        else:
            print_keys(store, settings, args.json)
    return 0


def print_keys(store: Store, settings: Settings, as_json: bool) -> None:
    """Print each key's owner, limits, spending against its budgets, last use and expiry."""
    now, ledger = now_ms(), KeyLedger(time_zone(settings.budget_timezone))
    ledger.load(store, now)
    keys = [key_json(key, ledger.usage(key.name, now), now) for key in store.client_keys()]
    if as_json:
        print(json.dumps(keys, indent=2))
        return
    if not keys:
        print("No client keys: the proxy accepts every client that can reach it. "
              "Add one: python3 claudeflare.py keys add NAME")
        return
    rows = [["NAME", "OWNER", "STATUS", "TODAY", "THIS WEEK", "THIS MONTH", "TOKENS TODAY",
             "LIMITS", "LAST USED", "EXPIRES"]]
    rows += [[key["name"], key["owner"] or "-", key["status"], spent_text(key, "day"),
              spent_text(key, "week"), spent_text(key, "month"),
              f"{key['spent']['tokensDay']:,}", limits_text(key),
              when_text(key["lastUsed"], now), iso_time(key["expiresAt"])] for key in keys]
    print_table(rows)
    print(f"Budgets count API-equivalent cost in {settings.budget_timezone or 'local'} time; "
          f"requests in flight: GET /api/keys or the status page")
def dash(value: Any) -> str:
    """Show a figure, or '-' when there is none (0 ms is a figure)."""
    return "-" if value is None else str(value)


def usage_line(usage: dict) -> str:
    """Summarize usage in one line for the terminal."""
    rate = "-" if usage["successRate"] is None else f"{usage['successRate'] * 100:.1f}%"
    line = (f"{usage['requests']} requests, {rate} ok, {usage['inputTokens']:,} in / "
            f"{usage['outputTokens']:,} out tokens, ${usage['costUsd']:.2f}, avg "
            f"{dash(usage['avgLatencyMs'])} ms, p95 {dash(usage['p95LatencyMs'])} ms")
    if usage["overageRequests"]:
        line += (f"; {usage['overageRequests']} on extra usage, ${usage['overageCostUsd']:.2f} "
                 f"billed")
    return line


def cmd_alerts(args: argparse.Namespace, settings: Settings) -> int:
    """Send a test alert to every destination and say what each answered, or list alerts."""
    with open_store(args) as store:
        if args.action == "list":
            report = alerts_report(settings, store, args.limit)
            if args.json:
                print(json.dumps(report, indent=2))
                return 0
            names = ", ".join(item["name"] for item in report["destinations"])
            print(f"Destinations: {names or 'none (alerts are only kept)'}")
            if not report["alerts"]:
                print("No alerts yet")
                return 0
            rows = [["TIME", "EVENT", "ACCOUNT", "MESSAGE", "DELIVERY"]]
            rows += [[iso_time(alert["time"]), alert["event"], alert["account"] or "-",
                      alert["message"][:80], delivery_summary(alert)[:80]]
                     for alert in report["alerts"]]
            print_table(rows)
            return 0
        destinations = alert_destinations(settings)
        if not destinations:
            raise ClaudeflareError("No alert destination: set one, such as python3 "
                                   "claudeflare.py config set alert_url https://ntfy.sh/TOPIC "
                                   "(or alert_command)")
        alert = make_test_alert()
        alert_id = store.add_alert(alert, [destination.name for destination in destinations])
        failed = 0
        for destination in destinations:
            sent, answer = send_alert(destination, alert, Alerts.timeout_s)
            store.note_delivery(alert_id, destination.name, "sent" if sent else "failed", 1,
                                answer)
            print(f"{destination.name} ({destination.format}): {'sent' if sent else 'FAILED'}: "
                  f"{answer}")
            failed += not sent
    if failed:
        raise ClaudeflareError(f"{failed} of {len(destinations)} alert destinations did not "
                               f"take the test alert")
    return 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    """Print the usage figures /api/stats gives: totals, per account and model, errors."""
    with open_store(args) as store:
        report = stats_report(store, now_ms())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"All time:      {usage_line(report['totals'])}")
    print(f"Last 24 hours: {usage_line(report['last24h'])}")
    for title, key in (("Accounts", "accounts"), ("Models", "models")):
        if report[key]:
            print(f"\n{title}:")
            rows = [["NAME", "REQUESTS", "OK", "INPUT", "OUTPUT", "COST", "AVG MS"]]
            rows += [[item["name"] or "-", str(item["requests"]),
                      f"{(item['successRate'] or 0) * 100:.1f}%", f"{item['inputTokens']:,}",
                      f"{item['outputTokens']:,}", f"${item['costUsd']:.2f}",
                      dash(item["avgLatencyMs"])] for item in report[key]]
            print_table(rows)
    if report["recentErrors"]:
        print("\nRecent errors:")
        for error in report["recentErrors"]:
            print(printable(f"  {iso_time(error['timestamp'])}  "
                            f"{error['accountName'] or '-'}  {error['status']}  "
                            f"{error['error']}"))
    return 0


def cmd_requests(args: argparse.Namespace, settings: Settings) -> int:
    """Print the latest requests, newest first."""
    with open_store(args) as store:
        records = [request_json(row) for row in store.recent_requests(args.limit)]
    if not records:
        print("No requests recorded yet")
        return 0
    rows = [["TIME", "ACCOUNT", "MODEL", "STATUS", "MS", "IN", "OUT", "COST", "RETRIES",
             "ERROR"]]
    rows += [[iso_time(item["timestamp"]), item["accountName"] or "-", item["model"] or "-",
              str(item["status"]), str(item["responseTimeMs"]), str(item["inputTokens"]),
              str(item["outputTokens"]),
              "-" if item["costUsd"] is None else f"${item['costUsd']:.4f}",
              str(item["failoverAttempts"]), (item["error"] or "")[:80]] for item in records]
    print_table(rows)
    return 0


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    """Ask a running server for /health; exit 0 only when it says ok."""
    server = running_server(args.db or default_db_path())
    url = args.url or (server.url if server else
                       local_url(settings.host, settings.port, bool(settings.tls_cert)))
    health = ask_health(url, health_context(settings, server))
    status, counts = health["status"], health["accounts"]
    print(printable(f"{status}: {counts.get('active', 0)} of {counts.get('total', 0)} accounts "
                    f"active, strategy {health.get('strategy')}, up "
                    f"{duration_text(health.get('uptime', 0))}"))
    return 0 if status == "ok" else 1


#: How `doctor` labels each kind of finding.
DOCTOR_LABELS = {"ok": "ok", "warn": "warn", "fail": "FAIL"}


def cmd_doctor(args: argparse.Namespace, flags: dict) -> int:
    """Run the troubleshooting guide's checks, one line each; exit 1 when any failed.

    It takes the flags rather than loaded settings: loading creates config.json and stops at
    the first bad value, while the doctor changes nothing and reports every problem it finds.
    """
    checks = run_doctor(args.config or default_config_path(), args.db or default_db_path(),
                        flags, now_ms(), args.send_test)
    counts = collections.Counter(check.status for check in checks)
    if args.json:
        print(redact(json.dumps({"ok": not counts["fail"],
                                 "checks": [dataclasses.asdict(check) for check in checks]},
                                indent=2)))
    else:
        for check in checks:
            fix = f"; fix: {check.fix}" if check.fix else ""
            print(printable(redact(f"{DOCTOR_LABELS[check.status]:<4}  {check.name}: "
                                   f"{check.message}{fix}")))
        print(f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} FAIL")
    return 1 if counts["fail"] else 0


def run_service_command(command: list[str], check: bool = True) -> int:
    """Run systemctl or launchctl with its output on the terminal; return its exit status."""
    print("$ " + shlex.join(command), flush=True)
    code = subprocess.run(command).returncode
    if check and code != 0:
        raise ClaudeflareError(f"{shlex.join(command)} failed (exit status {code})")
    return code


def systemd_user_problem() -> str | None:
    """Ask whether this user's systemd answers systemctl --user; if not, return what it said.

    A container, or an SSH login without lingering, has no user systemd: every command fails
    with `Failed to connect to bus`.
    """
    done = subprocess.run(["systemctl", "--user", "show-environment"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode == 0:
        return None
    said = done.stderr.strip().splitlines()
    return said[-1] if said else f"exit status {done.returncode}"


def cmd_service(args: argparse.Namespace, settings: Settings) -> int:
    """Install, remove or show the per-user service that runs `serve` and restarts it."""
    plan = service_plan(settings, args.config or default_config_path(),
                        args.db or default_db_path())
    system = args.system or default_service_system(sys.platform)
    if sys.platform == "win32" and not args.print or system is None:
        if sys.platform == "win32":
            raise ClaudeflareError(
                f"Windows has no systemd or launchd; use Task Scheduler: "
                f"{task_scheduler_command(args.action, plan)} (settings from flags and the "
                f"environment do not reach it: put them in the config file with config set)")
        raise ClaudeflareError(
            f"No per-user service manager claudeflare knows on {sys.platform}: write a unit "
            f"with service install --print --system systemd (or launchd) and adapt it, or "
            f"start serve from this system's init")
    if args.print and args.action != "install":
        raise ClaudeflareError("--print writes what service install would install; use it "
                               "with install")
    if args.action == "install":
        server_tls_context(settings.tls_cert, settings.tls_key)  # a bad file stops us here
    if args.print:
        print(systemd_unit(plan) if system == "systemd" else launchd_plist(plan), end="")
        return 0
    tool = "systemctl" if system == "systemd" else "launchctl"
    if shutil.which(tool) is None:
        raise ClaudeflareError(
            f"{tool} not found: this system does not run {system}. Write the file with service "
            f"install --print and hand it to the service manager it has, or start serve "
            f"another way")
    path = service_path(system)
    unit = SERVICE_NAME + ".service"
    target = f"gui/{os.getuid()}" if system == "launchd" else ""
    unreachable = systemd_user_problem() if system == "systemd" else None
    if unreachable is not None and args.action != "uninstall":
        raise ClaudeflareError(
            f"systemctl --user cannot reach your user's systemd ({unreachable}): this session "
            f"has none (a container, or an SSH login without lingering). Turn lingering on "
            f"(loginctl enable-linger {getpass.getuser()}) and log in again, or write the unit "
            f"with service install --print and install it as a system service "
            f"(/etc/systemd/system, systemctl --system)")
    if args.action == "install":
        write_private_file(path, systemd_unit(plan) if system == "systemd"
                           else launchd_plist(plan))
        print(f"Wrote {path}")
        if system == "systemd":
            run_service_command(["systemctl", "--user", "daemon-reload"])
            run_service_command(["systemctl", "--user", "enable", unit])
            run_service_command(["systemctl", "--user", "restart", unit])
        else:
            run_service_command(["launchctl", "bootout", f"{target}/{LAUNCHD_LABEL}"],
                                check=False)
            run_service_command(["launchctl", "bootstrap", target, path])
        print(f"claudeflare runs as a {system} service at "
              f"{local_url(settings.host, settings.port, bool(settings.tls_cert))}; check it "
              f"with: python3 claudeflare.py doctor")
        if system == "systemd":
            print(f"To keep it running while you are logged out: loginctl enable-linger "
                  f"{getpass.getuser()}")
        return 0
    if not os.path.exists(path):
        raise ClaudeflareError(f"claudeflare is not installed as a {system} service ({path} "
                               f"does not exist). Install it: python3 claudeflare.py service "
                               f"install")
    if args.action == "status":
        print(f"Installed: {path}")
        command = (["systemctl", "--user", "status", "--no-pager", unit] if system == "systemd"
                   else ["launchctl", "print", f"{target}/{LAUNCHD_LABEL}"])
        return 0 if run_service_command(command, check=False) == 0 else 1
    # The file goes whatever the service manager says: a unit left behind is not uninstalled.
    if unreachable is not None:
        os.unlink(path)
        print(f"Removed {path}; nothing was stopped: systemctl --user cannot reach your user's "
              f"systemd ({unreachable})")
        return 0
    if system == "systemd":
        run_service_command(["systemctl", "--user", "disable", "--now", unit], check=False)
    else:
        run_service_command(["launchctl", "bootout", f"{target}/{LAUNCHD_LABEL}"],
                            check=False)
    os.unlink(path)
    if system == "systemd":
        run_service_command(["systemctl", "--user", "daemon-reload"], check=False)
    print(f"Stopped claudeflare and removed {path}")
    return 0


###############################################################################
# Argument parser #############################################################
###############################################################################

def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser: global options, then one subcommand per action."""
    settings_help = "\n".join(f"  {setting.env:<31}{setting.key}: {setting.help} "
                              f"(default {str(setting.default) or 'none'})"
                              for setting in SETTINGS)
    parser = argparse.ArgumentParser(
        prog="claudeflare.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"settings (flag > environment > config file > default; see `config list`):\n"
               f"{settings_help}\n"
               f"  CLAUDEFLARE_CONFIG_PATH        the config file ({default_config_path()})\n"
               f"  CLAUDEFLARE_DB_PATH            the database ({default_db_path()})\n"
               f"  CLAUDEFLARE_LOG_DIR            the log folder ({default_log_dir()})\n"
               f"  CLAUDEFLARE_DEBUG=1            DEBUG lines on the console too\n"
               f"  HTTPS_PROXY, HTTP_PROXY, NO_PROXY   outbound proxy\n")
    parser.add_argument("--version", action="version", version=f"claudeflare {__version__}")
    # --config and --db work before the command and after it alike.
    paths = argparse.ArgumentParser(add_help=False)
    for target in (parser, paths):
        default = None if target is parser else argparse.SUPPRESS
        target.add_argument("--config", metavar="PATH", default=default,
                            help="config.json to use (env CLAUDEFLARE_CONFIG_PATH)")
        target.add_argument("--db", metavar="PATH", default=default,
                            help="database to use (env CLAUDEFLARE_DB_PATH)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name: str, handler: Callable, summary: str, example: str,
                aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, aliases=list(aliases), description=summary, parents=[paths],
            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler)
        return sub

    def account_command(name: str, handler: Callable, summary: str,
                        aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        sub = command(name, handler, summary, f"python3 claudeflare.py {name} work", aliases)
        sub.add_argument("name", help="the account's name")
        return sub

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", type=argument(parse_text),
                         help="address to bind (default 127.0.0.1)")
        sub.add_argument("--port", type=argument(parse_port),
                         help="port to listen on (default 8080)")
        sub.add_argument("--tls-cert", metavar="FILE", type=argument(parse_path),
                         help="serve HTTPS with this PEM certificate (with --tls-key)")
        sub.add_argument("--tls-key", metavar="FILE", type=argument(parse_path),
                         help="the certificate's unencrypted PEM private key")

    serve = command("serve", cmd_serve, "run the proxy, the API and the status page",
                    "python3 claudeflare.py serve --port 8080\n"
                    "  python3 claudeflare.py serve --host 0.0.0.0 --tls-cert cert.pem "
                    "--tls-key key.pem")
    server_options(serve)

    add = command("add", cmd_add, "add an account: OAuth login, or an API key read from stdin",
                  "python3 claudeflare.py add work\n"
                  "  echo \"$KEY\" | python3 claudeflare.py add ci --api-key --tier 5")
    add.add_argument("name", help="a name for the account: 1-100 letters, digits, spaces, -_@.+")
    add.add_argument("--api-key", action="store_true",
                     help="an API-key account; the key is read from stdin, never the command line")
    add.add_argument("--mode", choices=("max", "console"), default="max",
                     help="OAuth login: max (Claude Pro/Max, default) or console (mints a key)")
    add.add_argument("--no-browser", action="store_true",
                     help="do not open a browser: print the login URLs only")
    add.add_argument("--tier", type=int, choices=TIERS, default=1,
                     help="weight in the weighted strategy (default 1)")
    add.add_argument("--priority", type=argument(parse_priority), default=0,
                     help="lower serves first; higher only while no lower one can (default 0)")

    reauth = account_command("reauth", cmd_reauth,
                             "log an account in again, keeping its name, tier and history")
    reauth.add_argument("--mode", choices=("max", "console"),
                        help="max for OAuth accounts (default), console for minted API keys")
    reauth.add_argument("--no-browser", action="store_true",
                        help="do not open a browser: print the login URLs only")
    reauth.add_argument("--api-key", action="store_true",
                        help="an API-key account: read its new key from stdin, as add does")

    listing = command("list", cmd_list, "list accounts with status, usage and rate limits",
                      "python3 claudeflare.py list --json")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")

    remove = account_command("remove", cmd_remove, "remove an account (asks to type its name)")
    remove.add_argument("--force", action="store_true", help="do not ask")
    account_command("pause", cmd_pause, "stop routing requests to an account")
    account_command("resume", cmd_resume,
                    "route requests to an account again, clearing any rate-limit or "
                    "needs_reauth mark", aliases=("unpause",))
    tier = command("tier", cmd_tier, "set an account's tier: its weight in the weighted strategy",
                   "python3 claudeflare.py tier work 20")
    tier.add_argument("name", help="the account's name")
    tier.add_argument("tier", type=int, choices=TIERS, help="1, 5 or 20")
    priority = command("priority", cmd_priority,
                       "set an account's priority: lower first; a higher one serves only while "
                       "no lower one can", "python3 claudeflare.py priority ci 1")
    priority.add_argument("name", help="the account's name")
    priority.add_argument("priority", type=argument(parse_priority),
                          help="a whole number; 0 is the default, lower first")

    keys = command("keys", cmd_keys,
                   "manage client keys: once any exists, clients must present one",
                   "python3 claudeflare.py keys add laptop")
    keys.add_argument("action", choices=("add", "set", "list", "remove"))
    keys.add_argument("name", nargs="?", help="the key's name (add, set, remove)")
    keys.add_argument("--json", action="store_true", help="list: print JSON for scripts")
    limits = keys.add_argument_group(
        "limits (add, set)", "budgets count the price table's cost, subscription use at its "
                             "API-equivalent price, per calendar day, week (from Monday) and "
                             "month in budget_timezone; --no-LIMIT removes one")
    for option, metavar, text in (
            ("owner", "TEXT", "who the key belongs to (a person, a CI job)"),
            ("budget-day", "USD", "the most it may spend today"),
            ("budget-week", "USD", "the most it may spend this week"),
            ("budget-month", "USD", "the most it may spend this month"),
            ("tokens-day", "N", "the most tokens a day: input + output, cache writes 1.25x, "
                                "cache reads 0.1x"),
            ("max-concurrent", "N", "requests in flight at once"),
            ("rpm", "N", "requests per minute"),
            ("models", "PATTERN[,PATTERN]", "the models it may use (claude-sonnet-*)"),
            ("expires", "DATE", "refused after this date (it works through that day) or time"),
            ("priority-floor", "N", "use only accounts whose priority is at least N")):
        parse = KEY_OPTIONS[option.replace("-", "_")][1]
        limits.add_argument(f"--{option}", metavar=metavar, help=text,
                            type=argument(parse) if parse else None)
        limits.add_argument(f"--no-{option}", action="store_true", help=argparse.SUPPRESS)
    limits.add_argument("--no-budget", action="store_true",
                        help="remove every budget not given (also --no-owner, --no-rpm, "
                             "...)")
    pausing = limits.add_mutually_exclusive_group()
    pausing.add_argument("--pause", action="store_true",
                         help="refuse the key (401) until --resume")
    pausing.add_argument("--resume", action="store_true", help="accept a paused key again")

    config = command("config", cmd_config, "show or change settings in config.json",
                     "python3 claudeflare.py config set lb_strategy round-robin")
    config.add_argument("action", choices=("get", "set", "unset", "list"))
    config.add_argument("key", nargs="?", help="a setting: " + ", ".join(SETTINGS_BY_KEY))
    config.add_argument("value", nargs="?", help="the new value (with set)")

    for name, handler, summary in (
            ("clear-history", cmd_clear_history, "delete the request log (asks first)"),
            ("reset-stats", cmd_reset_stats, "zero the per-account request counters (asks "
             "first)")):
        command(name, handler, summary, f"python3 claudeflare.py {name} --yes").add_argument(
            "--yes", action="store_true", help="do not ask (for scripts)")
    stats = command("stats", cmd_stats, "print usage: totals, per account and model, errors",
                    "python3 claudeflare.py stats --json")
    stats.add_argument("--json", action="store_true", help="print JSON for scripts")
    requests = command("requests", cmd_requests, "print the latest requests",
                       "python3 claudeflare.py requests --limit 20")
    requests.add_argument("--limit", type=argument(parse_positive_int), default=20,
                          help="how many (default 20)")
    health = command("health", cmd_health,
                     "ask a running server whether it is ok (exit 0) or not (exit 1)",
                     "python3 claudeflare.py health --url http://127.0.0.1:8080")
    health.add_argument("--url", help="the server (default: from the host and port settings)")
    backup = command("backup", cmd_backup,
                     "copy the database consistently, even while the server runs",
                     "python3 claudeflare.py backup ~/claudeflare-backup.db")
    backup.add_argument("path", help="the new file to write")
    doctor = command("doctor", cmd_doctor,
                     "check the setup, the accounts and the network, and say how to fix what "
                     "fails; changes nothing", "python3 claudeflare.py doctor")
    doctor.add_argument("--json", action="store_true", help="print JSON for scripts")
    doctor.add_argument("--send-test", action="store_true",
                        help="also send a test alert to every alert destination")
    alerts = command("alerts", cmd_alerts,
                     "send a test alert to every destination, or show the latest alerts and "
                     "what each destination made of them",
                     "python3 claudeflare.py alerts test\n"
                     "  python3 claudeflare.py alerts list --limit 50")
    alerts.add_argument("action", choices=("test", "list"))
    alerts.add_argument("--limit", type=argument(whole_number(1, MAX_STORED_ALERTS)), default=20,
                        help="how many alerts to list (default 20)")
    alerts.add_argument("--json", action="store_true", help="print JSON for scripts (list)")
    service = command("service", cmd_service,
                      "run serve as a per-user service that starts at login and restarts on "
                      "failure (systemd or launchd)",
                      "python3 claudeflare.py service install --port 8080\n"
                      "  python3 claudeflare.py service install --print --system launchd")
    service.add_argument("action", choices=("install", "uninstall", "status"))
    service.add_argument("--print", action="store_true",
                         help="write the unit or plist to stdout and install nothing")
    service.add_argument("--system", choices=SERVICE_SYSTEMS,
                         help="the service manager (default: this system's)")
    server_options(service)
    return parser


###############################################################################
# main ########################################################################
###############################################################################

def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures become one line on stderr and exit status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "config" and args.action in ("get", "set", "unset") and not args.key:
        parser.error(f"config {args.action} needs a KEY")
    if args.command == "keys" and args.action in ("add", "set", "remove") and not args.name:
        parser.error(f"keys {args.action} needs a NAME")
    if args.command == "serve" and __name__ == "__main__" and os.name == "posix":
        serve_as_module()
    flags = {key: getattr(args, key, None) for key in ("host", "port", "tls_cert", "tls_key")}
    try:
        if args.command == "doctor":
            status = cmd_doctor(args, flags)
        else:
            settings = load_settings(args.config, flags, strict=args.command == "serve")
            if args.command != "serve":
                for problem in settings.config.problems:
                    print(f"claudeflare: warning: {printable(problem)}", file=sys.stderr)
            status = args.handler(args, settings)
        sys.stdout.flush()  # a reader that went away is met here, not at exit
        return status
    except BrokenPipeError:
        # The reader of the output went away (`list | head -1`): stop quietly, as filters do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ClaudeflareError as error:
        print(f"claudeflare: error: {printable(str(error))}", file=sys.stderr)
        return 1
    except sqlite3.Error as error:
        path = args.db or default_db_path()
        problem = locked_message(path) if is_locked(error) else f"database {path}: {error}"
        print(f"claudeflare: error: {printable(problem)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nclaudeflare: interrupted; nothing was changed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
