#!/usr/bin/env python3
"""claudeflare: a local proxy that spreads Claude API traffic over a pool of accounts.

Point any Claude API client at it (Claude Code: ANTHROPIC_BASE_URL=http://localhost:8080) and it
relays every /v1 request to the Anthropic API, streaming answers through as they arrive.

  python3 claudeflare.py serve [--host H] [--port N]   run the proxy and its status page
  python3 claudeflare.py COMMAND --help                 what each command does, with an example
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = [
    "App", "ClaudeflareError", "ProxyHandler", "ProxyServer", "SETTINGS", "Settings",
    "Upstream", "UpstreamError", "load_settings", "main", "make_server", "redact",
]

import argparse
import dataclasses
import datetime
import http.client
import http.server
import json
import logging
import logging.handlers
import os
import queue
import re
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterable

###############################################################################
# Constants & settings ########################################################
###############################################################################

#: The largest request body accepted; the upstream refuses larger ones with 413 anyway.
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Seconds to wait for a TCP (and TLS) connection to the upstream.
CONNECT_TIMEOUT_S = 10.0
#: Seconds an idle client keep-alive connection may hold a thread before it is closed.
CLIENT_IDLE_TIMEOUT_S = 120.0
#: Idle upstream connections kept for reuse; more concurrent requests open more, then close them.
UPSTREAM_POOL_SIZE = 32
#: Bodies up to this size are read whole and sent with the headers in one write.
SMALL_BODY_BYTES = 64 * 1024
#: Read size while relaying a large or streamed body.
RELAY_CHUNK_BYTES = 64 * 1024
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


def parse_count(text: str) -> int:
    """Read a whole number that may be zero but not negative."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise ValueError(f"must not be negative, not {value}")
    return value


def parse_positive_int(text: str) -> int:
    """Read a whole number greater than zero."""
    value = parse_count(text)
    if value == 0:
        raise ValueError("must be greater than 0")
    return value


def parse_positive_float(text: str) -> float:
    """Read a number greater than zero."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"expected a number, not {text!r}") from None
    if not value > 0:
        raise ValueError(f"must be greater than 0, not {value}")
    return value


def parse_backoff(text: str) -> float:
    """Read a retry backoff multiplier: 1 keeps the delay fixed, 2 doubles it."""
    value = parse_positive_float(text)
    if value < 1:
        raise ValueError(f"must be 1 or more, not {value}")
    return value


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


def parse_strategy(text: str) -> str:
    """Read a load-balancing strategy name, one of STRATEGY_NAMES."""
    name = str(text).strip()
    if name not in STRATEGY_NAMES:
        raise ValueError(f"Invalid strategy: {name} (valid: {', '.join(STRATEGY_NAMES)})")
    return name


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


@dataclass(frozen=True)
class Setting:
    """One key of config.json with its environment variable, default and validator."""

    key: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    help: str


#: The strategy names the CLI and the API accept; the functions live in STRATEGIES below.
STRATEGY_NAMES = ("session", "round-robin", "weighted", "least-requests", "headroom")

#: Every setting, in the order `config list` prints them.
SETTINGS = (
    Setting("port", "PORT", 8080, parse_port, "port the proxy listens on"),
    Setting("host", "CLAUDEFLARE_HOST", "127.0.0.1", parse_text, "address the proxy binds"),
    Setting("lb_strategy", "LB_STRATEGY", "session", parse_strategy,
            "how requests are spread over accounts: " + ", ".join(STRATEGY_NAMES)),
    Setting("client_id", "CLIENT_ID", "9d1c250a-e61b-44d9-88ed-5944d1962f5e", parse_text,
            "OAuth client id"),
    Setting("retry_attempts", "RETRY_ATTEMPTS", 3, parse_count,
            "tries per account on 5xx, 529 and network errors"),
    Setting("retry_delay_ms", "RETRY_DELAY_MS", 1000, parse_count, "first retry delay (ms)"),
    Setting("retry_backoff", "RETRY_BACKOFF", 2, parse_backoff, "retry delay multiplier"),
    Setting("session_duration_ms", "SESSION_DURATION_MS", 5 * 3600 * 1000, parse_positive_int,
            "how long a conversation sticks to its account (ms)"),
    Setting("upstream_url", "CLAUDEFLARE_UPSTREAM_URL", "https://api.anthropic.com", parse_url,
            "where /v1 requests are sent"),
    Setting("oauth_token_url", "CLAUDEFLARE_TOKEN_URL",
            "https://platform.claude.com/v1/oauth/token", parse_url, "OAuth token endpoint"),
    Setting("oauth_redirect_uri", "CLAUDEFLARE_REDIRECT_URI",
            "https://platform.claude.com/oauth/code/callback", parse_url, "OAuth redirect URI"),
    Setting("request_timeout_s", "CLAUDEFLARE_REQUEST_TIMEOUT_S", 600, parse_positive_float,
            "seconds the upstream may stay silent before the request fails"),
    Setting("shutdown_timeout_s", "CLAUDEFLARE_SHUTDOWN_TIMEOUT_S", 30, parse_positive_float,
            "seconds in-flight requests get to finish at shutdown"),
    Setting("request_retention_days", "CLAUDEFLARE_RETENTION_DAYS", 30, parse_positive_int,
            "days the request log is kept"),
    Setting("log_level", "LOG_LEVEL", "INFO", parse_log_level, "DEBUG, INFO, WARN or ERROR"),
    Setting("log_format", "LOG_FORMAT", "pretty", parse_log_format, "pretty or json"),
)
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}
#: Keys a running server picks up from config.json without a restart.
LIVE_SETTINGS = frozenset({
    "lb_strategy", "retry_attempts", "retry_delay_ms", "retry_backoff", "session_duration_ms",
    "request_timeout_s",
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


class UpstreamError(Exception):
    """The upstream could not be reached or stopped answering; the message says how."""


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


def json_bytes(value: Any) -> bytes:
    """Encode a value as compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


#: What a credential looks like wherever it might leak: Anthropic keys and tokens, Bearer values,
#: and the JSON fields that carry them.
SECRET_PATTERNS = (
    re.compile(r"sk-ant-[A-Za-z0-9]+-[A-Za-z0-9_\-]+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/\-]+=*"),
    re.compile(r'(?i)("(?:access_token|refresh_token|api_key|raw_key|code_verifier|code)"\s*:\s*")'
               r'[^"]+'),
    re.compile(r"(?i)((?:x-api-key|authorization)\s*[:=]\s*)\S+"),
)


def redact(text: str) -> str:
    """Mask every credential in a text before it leaves through a log or an error message."""
    text = SECRET_PATTERNS[0].sub("[REDACTED]", text)
    for pattern in SECRET_PATTERNS[1:]:
        text = pattern.sub(r"\1[REDACTED]", text)
    return text


def ensure_private_dir(path: str) -> None:
    """Create a folder (and its parents) readable only by the user, if it is missing."""
    if path and not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)


def create_private_file(path: str) -> None:
    """Create an empty file with mode 0600 unless it exists, so no secret is ever world-readable."""
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


###############################################################################
# Logging #####################################################################
###############################################################################

log = logging.getLogger("claudeflare")
LOG_FILE_NAME = "app.log"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
LOG_KEEP_FILES = 3
#: Python's level names as the guide spells them.
LEVEL_NAMES = {"WARNING": "WARN", "CRITICAL": "ERROR"}


def component_logger(component: str) -> logging.Logger:
    """Return the logger whose lines carry `[component]`, such as Proxy or Server."""
    return logging.getLogger("claudeflare." + component)


def record_fields(record: logging.LogRecord) -> tuple[str, str, str]:
    """Return a record's level, component and redacted message."""
    level = LEVEL_NAMES.get(record.levelname, record.levelname)
    component = record.name.rpartition(".")[2] if "." in record.name else "App"
    return level, component, redact(record.getMessage())


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


class RecentLines(logging.Handler):
    """Keep the last formatted log lines in memory for /api/logs."""

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.capacity = capacity

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        del self.lines[:-self.capacity]


class DeferredQueueHandler(logging.handlers.QueueHandler):
    """Queue records unformatted: formatting and redaction happen on the writer thread.

    Every argument claudeflare logs is an immutable value, so handing the record to another
    thread as it is is safe, and the request path pays only for creating it.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class LogSetup:
    """The logging pipeline: callers enqueue records, one thread writes the file and console."""

    def __init__(self, level: str, fmt: str, log_dir: str, debug_console: bool) -> None:
        formatter = JsonFormatter() if fmt == "json" else PrettyFormatter()
        ensure_private_dir(log_dir)
        self.path = os.path.join(log_dir, LOG_FILE_NAME)
        create_private_file(self.path)
        file_handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=LOG_ROTATE_BYTES, backupCount=LOG_KEEP_FILES, encoding="utf-8")
        self.recent = RecentLines()
        handlers: list[logging.Handler] = [file_handler, self.recent]
        if debug_console:
            handlers.append(logging.StreamHandler(sys.stderr))
        for handler in handlers:
            handler.setFormatter(formatter)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.listener = logging.handlers.QueueListener(self.queue, *handlers)
        self.handler = DeferredQueueHandler(self.queue)
        numeric = logging.DEBUG if debug_console else getattr(logging, level.replace(
            "WARN", "WARNING"))
        log.setLevel(numeric)
        log.addHandler(self.handler)
        log.propagate = False
        self.listener.start()

    def close(self) -> None:
        """Write every queued line and detach, so nothing logged before shutdown is lost."""
        log.removeHandler(self.handler)
        self.listener.stop()
        for handler in self.listener.handlers:
            handler.close()


###############################################################################
# Settings ####################################################################
###############################################################################

class ConfigFile:
    """config.json: read leniently (a corrupt file is kept aside), written atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: Messages about a corrupt file, for the caller to log once logging is set up.
        self.problems: list[str] = []

    def read(self) -> dict:
        """Return the file's settings, creating it with defaults on first run."""
        try:
            with open(self.path, encoding="utf-8") as source:
                text = source.read()
        except FileNotFoundError:
            defaults = {setting.key: setting.default for setting in SETTINGS}
            self.write(defaults)
            return defaults
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise ValueError("the top level must be a JSON object")
        except ValueError as error:
            kept = f"{self.path}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(self.path, kept)
            self.problems.append(f"Failed to parse config file {self.path}: {error}; kept it as "
                                 f"{kept} and started with defaults")
            return {}
        return values

    def write(self, values: dict) -> None:
        """Save settings atomically with mode 0600."""
        write_private_file(self.path, json.dumps(values, indent=2) + "\n")

    def mtime(self) -> float:
        """Return the file's modification time, 0 when it is missing."""
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return 0

    def update(self, key: str, value: Any) -> None:
        """Set one key, keeping the others as they are."""
        values = self.read()
        values[key] = value
        self.write(values)


def validate_setting(key: str, raw: Any, origin: str) -> Any:
    """Parse one setting's raw value, naming where it came from if it is wrong."""
    try:
        return SETTINGS_BY_KEY[key].parse(raw)
    except ValueError as error:
        if str(error).startswith("Invalid strategy"):
            raise ClaudeflareError(f"{error} (from {origin})") from None
        raise ClaudeflareError(f"Invalid value for {key} from {origin}: {error}") from None


class Settings:
    """Resolved settings: command-line flag > environment > config file > default.

    Each value remembers where it came from (`sources`), which `config list` shows.
    """

    def __init__(self, config: ConfigFile, values: dict, sources: dict, file_values: dict) -> None:
        self.config = config
        self.values = values
        self.sources = sources
        self.file_values = file_values
        self.file_mtime = config.mtime()
        self.lock = threading.Lock()

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def reload_if_changed(self) -> list[str]:
        """Apply live keys changed in config.json since the last look; return what changed.

        A key written to the file while running wins over the environment: the user just asked
        for it (`config set`), so it must take effect.
        """
        mtime = self.config.mtime()
        if mtime == self.file_mtime:
            return []
        with self.lock:
            if mtime == self.file_mtime:
                return []
            self.file_mtime = mtime
            fresh = self.config.read()
            for problem in self.config.problems:
                component_logger("Config").error("%s", problem)
            self.config.problems.clear()
            changed = []
            for key in LIVE_SETTINGS:
                if key in fresh and fresh.get(key) != self.file_values.get(key):
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
            self.file_mtime = self.config.mtime()


def load_settings(config_path: str | None = None, flags: dict | None = None,
                  environ: dict | None = None) -> Settings:
    """Resolve every setting from flags, the environment, config.json and the defaults."""
    environ = os.environ if environ is None else environ
    config = ConfigFile(config_path or default_config_path())
    file_values = config.read()
    values, sources = {}, {}
    for setting in SETTINGS:
        flag = (flags or {}).get(setting.key)
        if flag is not None:
            values[setting.key], sources[setting.key] = flag, "flag"
        elif environ.get(setting.env):
            values[setting.key] = validate_setting(setting.key, environ[setting.env], setting.env)
            sources[setting.key] = "env"
        elif setting.key in file_values:
            values[setting.key] = validate_setting(setting.key, file_values[setting.key],
                                                   config.path)
            sources[setting.key] = "config"
        else:
            values[setting.key], sources[setting.key] = setting.default, "default"
    if environ.get("CLAUDEFLARE_DEBUG") == "1":
        values["log_level"], sources["log_level"] = "DEBUG", "env"
    return Settings(config, values, sources, file_values)


###############################################################################
# Upstream client #############################################################
###############################################################################

class Headers:
    """Request headers in arrival order, looked up without regard to case.

    The subset of email.message.Message that the handler uses; parsing into it costs a tenth of
    what the email package takes, on every request.
    """

    __slots__ = ("pairs", "names")

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs
        self.names = [name.lower() for name, _ in pairs]

    def get(self, name: str, default: Any = None) -> Any:
        name = name.lower()
        for index, candidate in enumerate(self.names):
            if candidate == name:
                return self.pairs[index][1]
        return default

    def __getitem__(self, name: str) -> str | None:
        return self.get(name)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.names

    def get_all(self, name: str, default: Any = None) -> Any:
        name = name.lower()
        values = [value for (_, value), candidate in zip(self.pairs, self.names)
                  if candidate == name]
        return values or default

    def items(self) -> list[tuple[str, str]]:
        return list(self.pairs)


#: Limits on a header block, as http.server and http.client have them.
MAX_HEADER_LINES = 100
MAX_HEADER_LINE_BYTES = 65536


def read_header_block(stream: Any) -> Headers:
    """Read header lines up to the blank line; raise LineTooLong past the limits."""
    pairs: list[tuple[str, str]] = []
    while True:
        line = stream.readline(MAX_HEADER_LINE_BYTES + 1)
        if line in (b"\r\n", b"\n", b""):
            return Headers(pairs)
        if len(line) > MAX_HEADER_LINE_BYTES or len(pairs) >= MAX_HEADER_LINES:
            raise http.client.LineTooLong("header line")
        if line[:1] in (b" ", b"\t") and pairs:
            name, value = pairs[-1]
            pairs[-1] = (name, value + " " + line.decode("iso-8859-1").strip())
            continue
        name, _, value = line.decode("iso-8859-1").partition(":")
        pairs.append((name.strip(), value.strip()))


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


class OneWriteRequests:
    """Mixin: send a request's headers and small body in one write.

    Two small writes in a row meet the peer's delayed ACK; one write also saves a system call.
    While `held` is a list, send() collects what http.client writes instead of sending it.
    """

    response_class = UpstreamResponse
    held: list | None = None

    def send(self, data: Any) -> None:
        if self.held is not None:
            self.held.append(data)
        else:
            super().send(data)


class UpstreamConnection(OneWriteRequests, http.client.HTTPConnection):
    """A plain-HTTP upstream connection."""


class UpstreamTLSConnection(OneWriteRequests, http.client.HTTPSConnection):
    """An HTTPS upstream connection."""


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
    """Tell whether an idle pooled connection was closed (or sent junk) by the other side."""
    try:
        return bool(select.select([connection.sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class Upstream:
    """Keep-alive connections to one origin, pooled and reused across requests.

    A handshake per request costs more than everything else the proxy does, so idle connections
    wait here for the next request; beyond `pool_size` idle ones, extras are closed.
    """

    def __init__(self, base_url: str, pool_size: int = UPSTREAM_POOL_SIZE) -> None:
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
        #: Connections opened so far, for the status page and the tests of reuse.
        self.opened = 0

    def new_connection(self) -> http.client.HTTPConnection:
        """Return an unconnected connection; it connects on first use."""
        if self.https:
            return UpstreamTLSConnection(self.host, self.port, timeout=CONNECT_TIMEOUT_S)
        return UpstreamConnection(self.host, self.port, timeout=CONNECT_TIMEOUT_S)

    def acquire(self) -> tuple[UpstreamConnection, bool]:
        """Return an idle connection that is still open, else a new one, and whether reused."""
        stale = []
        connection = None
        with self.lock:
            while self.idle and connection is None:
                candidate = self.idle.pop()
                if connection_is_stale(candidate):
                    stale.append(candidate)
                else:
                    connection = candidate
        for candidate in stale:
            candidate.close()
        if connection is not None:
            return connection, True
        return self.new_connection(), False

    def release(self, connection: http.client.HTTPConnection,
                response: http.client.HTTPResponse) -> None:
        """Return a connection whose response was read to the end to the pool, else close it."""
        finished = response.isclosed() or response.length == 0
        response.close()
        if finished and not response.will_close and connection.sock is not None:
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

    def send(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
             timeout: float) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """Send one request and return the response (headers read, body not) and its connection.

        A pooled connection the upstream closed while it sat idle fails before any answer
        arrives; that request is sent once more on a fresh connection.
        """
        for attempt in (1, 2):
            connection, reused = self.acquire()
            try:
                if connection.sock is None:
                    connection.connect()
                    self.opened += 1
                if connection.sock.gettimeout() != timeout:
                    connection.sock.settimeout(timeout)
                connection.putrequest(method, self.prefix + target, skip_host=True,
                                      skip_accept_encoding=True)
                for name, value in headers:
                    connection.putheader(name, value)
                if len(body) <= SMALL_BODY_BYTES:
                    connection.held = []
                    connection.endheaders(body or None)
                    data, connection.held = b"".join(connection.held), None
                    connection.send(data)
                else:
                    connection.endheaders(body)
                return connection.getresponse(), connection
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as error:
                connection.close()
                if not (reused and attempt == 1):
                    raise UpstreamError(describe_network_error(error, self.base_url,
                                                               timeout)) from None
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise UpstreamError(describe_network_error(error, self.base_url,
                                                           timeout)) from None
        raise AssertionError("unreachable")


def forwardable_headers(message: http.client.HTTPMessage) -> list[tuple[str, str]]:
    """Copy a message's end-to-end headers: hop-by-hop ones and those Connection names go."""
    named = {token.strip().lower()
             for value in message.get_all("Connection", []) for token in value.split(",")}
    return [(name, value) for name, value in message.items()
            if name.lower() not in HOP_BY_HOP_HEADERS and name.lower() not in named]


###############################################################################
# Proxy handler & server ######################################################
###############################################################################

class RequestBodyError(Exception):
    """The client's request body cannot be accepted; carries the status and Anthropic's shape."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def anthropic_error(error_type: str, message: str) -> dict:
    """Build an error body in the shape the Anthropic API uses, which SDKs know how to show."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def sse_error_event(message: str) -> bytes:
    """Build the SSE `error` event a client gets when the upstream fails mid-stream."""
    return b"event: error\ndata: " + json_bytes(anthropic_error("api_error", message)) + b"\n\n"


class App:
    """Everything the server shares between requests; the handler reaches it as server.app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upstream = Upstream(settings.upstream_url)
        self.started = time.monotonic()

    def health(self) -> tuple[int, dict]:
        """Return /health's status code and body."""
        counts = {"total": 0, "active": 0, "paused": 0, "rate_limited": 0, "needs_reauth": 0}
        body = {"status": "ok", "accounts": counts, "strategy": self.settings.lb_strategy,
                "uptime": int((time.monotonic() - self.started) * 1000), "version": __version__}
        return 200, body

    def close(self) -> None:
        """Release the upstream connections."""
        self.upstream.close()


class ProxyServer(http.server.ThreadingHTTPServer):
    """The one listening socket: proxy, API and status page, a thread per client connection."""

    daemon_threads = True
    #: The default backlog of 5 drops connections in a burst of parallel clients.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, ProxyHandler)


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Relay /v1 requests upstream and answer the local endpoints."""

    protocol_version = "HTTP/1.1"
    server_version = "claudeflare/" + __version__
    timeout = CLIENT_IDLE_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        # Responses go out in as few writes as possible; no write may wait for a delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.app: App = self.server.app
        self.body_read = False

    def log_message(self, format: str, *args: Any) -> None:
        component_logger("Server").debug("%s - " + format, self.address_string(), *args)

    def parse_request(self) -> bool:
        """Parse the request line and headers of an HTTP/1.x request into Headers.

        Anything unusual (HTTP/0.9, a version from the future) goes to http.server's own parser.
        """
        words = self.raw_requestline.rstrip(b"\r\n").split()
        if len(words) != 3 or words[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            return super().parse_request()
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.command, self.path, self.request_version = (word.decode("iso-8859-1")
                                                         for word in words)
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = read_header_block(self.rfile)
        except http.client.LineTooLong:
            self.close_connection = True
            self.send_error(431, "Request header fields too large")
            return False
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = ("close" in connection
                                 or (self.request_version == "HTTP/1.0"
                                     and "keep-alive" not in connection))
        if self.headers.get("Expect", "").lower() == "100-continue" and \
                self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Route one request by its path."""
        self.body_read = False
        path = self.path.partition("?")[0]
        if path == "/v1" or path.startswith("/v1/"):
            self.proxy()
        elif path == "/health" and self.command in ("GET", "HEAD"):
            status, body = self.app.health()
            self.send_json(status, body)
        else:
            self.send_json(404, {"error": PROVIDER_PATH_ERROR})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = dispatch

    # -- writing -------------------------------------------------------------------------------

    def head_bytes(self, status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
        """Build a status line and header block, closing the connection when it must close."""
        if not self.body_read and self.request_has_body():
            # The unread body would be taken for the next request: end this connection instead.
            self.close_connection = True
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
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

    # -- reading -------------------------------------------------------------------------------

    def request_has_body(self) -> bool:
        """Tell whether the client announced a request body."""
        return ("chunked" in self.headers.get("Transfer-Encoding", "").lower()
                or self.headers.get("Content-Length", "0").strip() not in ("", "0"))

    def read_body(self) -> bytes:
        """Read the request body (Content-Length or chunked), refusing more than 32 MB unread."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self.read_chunked_body()
        else:
            text = self.headers.get("Content-Length", "0").strip() or "0"
            if not text.isdigit():
                raise RequestBodyError(400, "invalid_request_error",
                                       f"Invalid Content-Length header: {text!r}")
            length = int(text)
            if length > MAX_BODY_BYTES:
                raise RequestBodyError(413, "request_too_large", too_large_message(length))
            body = self.rfile.read(length)
            if len(body) < length:
                raise RequestBodyError(400, "invalid_request_error",
                                       "The request body ended before its Content-Length")
        self.body_read = True
        return body

    def read_chunked_body(self) -> bytes:
        """Decode a chunked request body, stopping as soon as it passes the size limit."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise RequestBodyError(400, "invalid_request_error",
                                       "Malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise RequestBodyError(413, "request_too_large", too_large_message(total))
            parts.append(self.rfile.read(size))
            if len(parts[-1]) < size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise RequestBodyError(400, "invalid_request_error",
                                       "Malformed chunked request body")

    # -- proxying ------------------------------------------------------------------------------

    def upstream_headers(self, body: bytes) -> list[tuple[str, str]]:
        """Build the headers sent upstream: the client's, minus hop-by-hop, for the upstream host.

        Identity encoding is asked for so that usage can be read out of every response.
        """
        headers = [(name, value) for name, value in forwardable_headers(self.headers)
                   if name.lower() not in ("host", "content-length", "accept-encoding")]
        headers.append(("Host", self.app.upstream.host_header))
        headers.append(("Accept-Encoding", "identity"))
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        return headers

    def proxy(self) -> None:
        """Forward one /v1 request upstream and relay the answer."""
        started = time.monotonic()
        try:
            body = self.read_body()
        except RequestBodyError as error:
            self.close_connection = True
            self.send_json(error.status, anthropic_error(error.error_type, str(error)))
            return
        settings = self.app.settings
        headers = self.upstream_headers(body)
        attempts, last_error = 0, ""
        for account_name in ("client credentials",):
            attempts += 1
            try:
                response, connection = self.app.upstream.send(
                    self.command, self.path, headers, body, settings.request_timeout_s)
            except UpstreamError as error:
                last_error = str(error)
                component_logger("Proxy").warning("Request via %s failed: %s", account_name,
                                                  last_error)
                continue
            try:
                self.relay(response, connection)
            finally:
                component_logger("Proxy").info(
                    "Request completed for %s: %d in %dms", account_name, response.status,
                    (time.monotonic() - started) * 1000)
            return
        component_logger("Proxy").error("%s after %d attempts: %s", ALL_ACCOUNTS_FAILED,
                                         attempts, last_error)
        self.send_json(503, {"error": ALL_ACCOUNTS_FAILED, "attempts": attempts,
                             "lastError": last_error})

    def relay(self, response: http.client.HTTPResponse,
              connection: http.client.HTTPConnection) -> None:
        """Send the upstream's answer to the client unchanged, each piece as soon as it arrives."""
        upstream = self.app.upstream
        headers = [(name, value) for name, value in forwardable_headers(response.msg)
                   if name.lower() != "content-length"]
        status, reason = response.status, response.reason
        try:
            if self.command == "HEAD" or status in (204, 304) or status < 200:
                length = response.getheader("Content-Length")
                if length is not None:
                    headers.append(("Content-Length", length))
                self.wfile.write(self.head_bytes(status, reason, headers))
            elif response.length is not None and response.length <= SMALL_BODY_BYTES:
                data = self.read_upstream(response, response.read)
                headers.append(("Content-Length", str(len(data))))
                self.wfile.write(self.head_bytes(status, reason, headers) + data)
            elif response.length is not None:
                headers.append(("Content-Length", str(response.length)))
                self.wfile.write(self.head_bytes(status, reason, headers))
                self.copy_body(response, self.wfile.write)
            else:
                self.relay_unsized(response, status, reason, headers)
        except (ConnectionError, socket.timeout, TimeoutError):
            # The client went away (or stopped reading): stop, and do not reuse the upstream side.
            self.close_connection = True
            connection.close()
            component_logger("Proxy").info("Client disconnected during the response")
            return
        except UpstreamError as error:
            self.close_connection = True
            connection.close()
            component_logger("Proxy").warning("Upstream failed during the response: %s", error)
            return
        upstream.release(connection, response)

    def relay_unsized(self, response: http.client.HTTPResponse, status: int, reason: str,
                      headers: list[tuple[str, str]]) -> None:
        """Relay a body of unknown length (SSE streams) chunk by chunk, flushing each one.

        When the upstream fails mid-stream, an SSE client gets a proper `error` event and a clean
        end instead of a cut connection.
        """
        chunked = self.request_version == "HTTP/1.1"
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            self.close_connection = True
        self.wfile.write(self.head_bytes(status, reason, headers))
        write = self.wfile.write
        if chunked:
            def write(data: bytes) -> None:
                self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        tail = bytearray(b"\n\n")
        try:
            self.copy_body(response, write, tail)
        except UpstreamError as error:
            if "text/event-stream" not in (response.getheader("Content-Type") or ""):
                raise
            separator = b"" if tail.endswith(b"\n\n") else b"\n\n"
            write(separator + sse_error_event(f"Upstream stream failed: {error}"))
            self.close_connection = True
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            raise
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def read_upstream(self, response: http.client.HTTPResponse, read: Callable[..., bytes],
                      *args: Any) -> bytes:
        """Read from the upstream, turning its failures into UpstreamError."""
        try:
            return read(*args)
        except (OSError, http.client.HTTPException) as error:
            raise UpstreamError(describe_network_error(
                error, self.app.upstream.base_url, self.app.settings.request_timeout_s)) from None

    def copy_body(self, response: http.client.HTTPResponse, write: Callable[[bytes], Any],
                  tail: bytearray | None = None) -> None:
        """Copy a response body to the client as it arrives; `read1` never waits for more."""
        while True:
            data = self.read_upstream(response, response.read1, RELAY_CHUNK_BYTES)
            if not data:
                break
            write(data)
            if tail is not None:
                tail[:] = (tail + data[-2:])[-2:]
        if response.length:
            raise UpstreamError(f"ECONNRESET: {self.app.upstream.base_url} ended the body "
                                f"{response.length} bytes short")


def too_large_message(size: int) -> str:
    """Explain a 413 to the client."""
    return (f"Request body of {size} bytes or more is larger than the "
            f"{MAX_BODY_BYTES // (1024 * 1024)} MB limit")


def make_server(settings: Settings) -> ProxyServer:
    """Build the listening server for the settings' host and port."""
    try:
        return ProxyServer((settings.host, settings.port), App(settings))
    except OSError as error:
        raise ClaudeflareError(f"Cannot listen on {settings.host}:{settings.port}: "
                               f"{error.strerror or error}. Is another server running there? "
                               f"Choose another port with --port or PORT.") from None


###############################################################################
# CLI #########################################################################
###############################################################################

def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the proxy until SIGINT or SIGTERM."""
    logs = LogSetup(settings.log_level, settings.log_format, default_log_dir(),
                    os.environ.get("CLAUDEFLARE_DEBUG") == "1")
    server_log = component_logger("Server")
    for problem in settings.config.problems:
        server_log.error("%s", problem)
    try:
        server = make_server(settings)
    except ClaudeflareError:
        logs.close()
        raise
    host, port = server.server_address[:2]
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server_log.info("claudeflare %s listening on http://%s:%d (upstream %s, log %s)",
                    __version__, host, port, settings.upstream_url, logs.path)
    print(f"claudeflare {__version__} listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        server.app.close()
        server_log.info("Server stopped")
        logs.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser: global options, then one subcommand per action."""
    parser = argparse.ArgumentParser(
        prog="claudeflare.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"claudeflare {__version__}")
    parser.add_argument("--config", metavar="PATH",
                        help="config.json to use (env CLAUDEFLARE_CONFIG_PATH)")
    parser.add_argument("--db", metavar="PATH",
                        help="database to use (env CLAUDEFLARE_DB_PATH)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name: str, handler: Callable, summary: str, example: str,
                aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, aliases=list(aliases), description=summary,
            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", cmd_serve, "run the proxy, the API and the status page",
                    "python3 claudeflare.py serve --port 8080")
    serve.add_argument("--host", type=parse_text, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=parse_port, help="port to listen on (default 8080)")
    return parser


###############################################################################
# main ########################################################################
###############################################################################

def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures become one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    flags = {key: getattr(args, key, None) for key in ("host", "port")}
    try:
        settings = load_settings(args.config, flags)
        return args.handler(args, settings)
    except ClaudeflareError as error:
        print(f"claudeflare: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
