"""One redaction step for every message that can reach a client or a log: secrets never leave.

:func:`redact` is applied where messages are made (the model's not-ready reason, gRPC error
details, REST error bodies) and, so that no line can slip past, to every log record of the
process (:func:`install_logging`: a log-record factory, a :class:`RedactingFilter` on the
handlers of the serving, KServe and uvicorn loggers, and the hooks that print uncaught
exceptions).

What it removes:

- the userinfo, query and fragment of every ``scheme://`` URI
  (``s3://user:pass@host/path?X-Amz-Signature=...`` -> ``s3://host/path``): credentials and
  presigned signatures live there;
- every value the process holds as a secret: the values of environment variables whose names
  look like credentials (``*KEY*``, ``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``, ``*CREDENTIAL*``),
  the userinfo (and its password) and query values of every ``*_URI`` / ``*_URL`` variable, and
  whatever :func:`add_secret` / :func:`add_uri_secrets` registered (the control token, the
  model URI given as a flag). Values shorter than :data:`MIN_SECRET` characters are left alone:
  they are not secrets worth the name, and replacing them would garble every message.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit

MASK = "***"
MIN_SECRET = 6
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
URI_NAME = re.compile(r"(^|_)(URI|URL|ENDPOINT|DSN)$", re.IGNORECASE)
# scheme://[userinfo@]host/path[?query][#fragment]; a URI ends at whitespace, a quote, <>, or a
# backslash (a JSON or repr escape, kept intact). Userinfo has no '/' (RFC 3986).
_URI = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
    r"(?:[^\s/?#@'\"<>\\]*@)?"
    r"(?P<rest>[^\s?#'\"<>\\]*)"
    r"(?:[?#][^\s'\"<>\\]*)?"
)
# The loggers whose handlers get the filter (the record factory covers every logger anyway).
LOGGERS = ("", "serving", "kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access", "grpc")

_registered: set[str] = set()
_lock = threading.Lock()


def _variants(value: str) -> set[str]:
    """The forms a secret may take in a message: as is, percent-decoded and percent-encoded."""
    return {v for v in (value, unquote(value), quote(value, safe="")) if len(v) >= MIN_SECRET}


def uri_secrets(uri: str) -> set[str]:
    """The secret parts of one URI: its userinfo (whole, and the password) and its query values."""
    found: set[str] = set()
    uri = uri.strip()
    try:
        parts = urlsplit(uri)
    except ValueError:
        return found
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    if not userinfo and "://" in uri:
        # A password with a raw '/' ends urlsplit's netloc early: user:pa/ss@host.
        head = re.split(r"[?#]", uri.split("://", 1)[1], maxsplit=1)[0]
        candidate = head.rpartition("@")[0]
        if ":" in candidate.split("/", 1)[0]:
            userinfo = candidate
    if userinfo:
        found |= _variants(userinfo)
        password = userinfo.partition(":")[2]
        if password:
            found |= _variants(password)
    for _, value in parse_qsl(parts.query, keep_blank_values=False):
        found |= _variants(value)
    return found


def env_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Secrets the environment holds (see the module docstring)."""
    found: set[str] = set()
    for name, value in (os.environ if environ is None else environ).items():
        if not value:
            continue
        if SECRET_NAME.search(name):
            found |= _variants(value)
        if URI_NAME.search(name) or "://" in value:
            found |= uri_secrets(value)
    return found


def add_secret(value: str | bytes | None) -> None:
    """Register a value (e.g. the control token) that must never appear in a message."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value:
        with _lock:
            _registered.update(_variants(value.strip()))


def add_uri_secrets(uri: str | None) -> None:
    """Register the userinfo and query values of a URI given outside the environment (a flag)."""
    if uri:
        found = uri_secrets(uri)
        with _lock:
            _registered.update(found)


_cache: tuple[tuple[int, ...], list[str]] = ((), [])


def secrets() -> list[str]:
    """Every value to hide, longest first (so that a secret containing another goes whole).

    Recomputed when a variable or a registered secret comes or goes (the counts change): a pod may
    hold hundreds of variables, every log record asks, and a server's environment is set when it
    starts. :func:`refresh` forces it after a variable's value changed in place.
    """
    global _cache
    key = (len(_registered), len(os.environ))
    if key != _cache[0]:
        with _lock:
            found = _registered | env_secrets()
        _cache = (key, sorted(found, key=len, reverse=True))
    return _cache[1]


def refresh() -> None:
    """Recompute the secrets at the next :func:`redact` (after ``os.environ[name] = value``)."""
    global _cache
    _cache = ((), [])


def redact_uris(text: str) -> str:
    return _URI.sub(lambda m: m.group("scheme") + m.group("rest"), text)


def redact(text: object) -> str:
    """``text`` with URI credentials and queries removed and every known secret masked."""
    text = text if isinstance(text, str) else str(text)
    if not text:
        return text
    text = redact_uris(text)
    for secret in secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    return text


# --- logging ------------------------------------------------------------------------------------
def scrub(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a log record in place: its message (arguments merged in), exception and stack text."""
    if getattr(record, "_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a malformed format/arguments pair: keep what can be shown
        message = f"{record.msg} {record.args}"
    clean = redact(message)
    if clean != message:  # else msg and args stay: some formatters (uvicorn's access log) read the args
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._redacted = True
    return record


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record (it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub(record)
        return True


_FILTER = RedactingFilter()
_installed = False


def attach_filters(names: Iterable[str] = LOGGERS) -> None:
    """Put the filter on every handler these loggers have now (idempotent)."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def install_logging() -> None:
    """Redact every log record of the process, and the uncaught exceptions printed to stderr.

    The log-record factory redacts each record as it is made, whatever logger or handler takes
    it, including those that KServe's and uvicorn's logging configuration create later; the
    filters on today's handlers are a second net. Idempotent.
    """
    global _installed
    attach_filters()
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        return scrub(make_record(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    print_thread_exception = threading.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        import traceback

        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return print_thread_exception(args)
        import traceback

        name = args.thread.name if args.thread else "?"
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))
        return None

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


# --- REST answers -------------------------------------------------------------------------------
class RedactAnswers:
    """Pure-ASGI middleware: every REST answer but a successful inference is redacted.

    Error bodies come from many handlers (KServe's, ours, FastAPI's); this is the one place they
    all pass. Successful ``/infer`` answers (large, possibly binary, made of numbers) go through
    untouched, without buffering.
    """

    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # type: ignore[operator]
            return
        is_infer = scope.get("path", "").endswith("/infer")
        start: dict | None = None
        chunks: list[bytes] = []
        passthrough = False

        async def redacting_send(message: dict) -> None:
            nonlocal start, passthrough
            if message["type"] == "http.response.start":
                if is_infer and message["status"] < 400:
                    passthrough = True
                    await send(message)  # type: ignore[operator]
                else:
                    start = message
                return
            if passthrough or message["type"] != "http.response.body":
                await send(message)  # type: ignore[operator]
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            clean = redact(body.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
            if clean != body:
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                start["headers"] = [*headers, (b"content-length", str(len(clean)).encode())]
            await send(start)  # type: ignore[operator]
            await send({"type": "http.response.body", "body": clean})  # type: ignore[operator]

        await self.app(scope, receive, redacting_send)  # type: ignore[operator]
