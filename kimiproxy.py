"""kimiproxy: an OpenAI- and Anthropic-compatible proxy that repairs Kimi-K2 tool calls for SGLang.

What and why
    SGLang's ``kimi_k2`` parsers leave Kimi-K2-Thinking's tool-call markup
    (``<|tool_calls_section_begin|>...``) in ``reasoning_content`` or ``content``, break the structured
    calls they return, or drop the ones they cannot parse; coding agents (Kilo Code, Roo Code, Cline,
    Claude Code, the OpenAI and Anthropic SDKs) then see no call, or a wrong one, and stall. kimiproxy
    sits between the agent and SGLang, forwards every request, streams every token and every call as it
    is generated, repairs what the model wrote into real tool calls, and closes the upstream request the
    moment its client goes away, so the GPU stops generating for nobody. REPAIR.md is the specification.

How to run
    hypercorn kimiproxy:app -k trio -b 0.0.0.0:8000     (the trio worker is required)
    python kimiproxy.py --port 8000 --upstream http://127.0.0.1:30000/v1
    Configuration comes from the environment and a ``.env`` file (see ``Settings``).

Rules the repair never breaks (REPAIR.md 4 has them all)
    1. Nothing the model wrote is lost: text outside the markup stays in its channel, in order; a call
       is never dropped, except as a duplicate of another that goes out; a file a call writes arrives
       byte for byte, marker text inside it included.
    2. Nothing sent is taken back: text and arguments go out as soon as no repair can change them.
    3. Streamed and whole responses give the same message for the same upstream text.
    4. An upstream event that needs no repair goes out as the very bytes that came in.

Layout (top to bottom, each part using only what stands above it): constants, errors, the SSE and JSON
codecs, the repair core (pure: no I/O, no async, no logging), what a client got (one message for the
log, the capture, the reasoning store and replay), configuration, logging, metrics, the
client edge (what a request must be, and what kimiproxy writes anew of it), the client protocols
(OpenAI's chat completions and Anthropic's Messages, each an encoder of the repair's events), the
upstream edge (httpx), files only kimiproxy's user can touch, reasoning continuity, the page (what
the box is doing, for people), capture and replay, fair use (limits per key, shared by the workers),
what the exchanges share, one exchange (a request from its first byte in to its last byte out), the
server process, the app, main().
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import contextvars
import dataclasses
import difflib
import enum
import functools
import gc
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import logging.handlers
import math
import multiprocessing
import os
import pwd
import re
import resource
import secrets
import signal
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter, deque
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import httpx
import sniffio
import trio
from quart import jsonify, request
from quart_trio import QuartTrio

try:  # 2-4x faster JSON (README: Dependencies); without it the stdlib does the same work
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    orjson = None

__version__ = "0.1.0"

# ---------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------

# The repair (REPAIR.md). Text is held back at most one character less than the longest marker.
# A tail at least this long that never became a marker by the end of the text is a marker cut off
# by max_tokens ("<|tool_call_e"): it is removed. Shorter ones ("<|", "<|x") stay as text.
MIN_TRUNCATED_MARKER = 6  # characters
# Text inside a section is noise (vLLM PR #28543). Past this much it is prose after a section that
# was never closed, and goes back to its channel.
MAX_SECTION_NOISE = 2048  # characters
MAX_CALL_HEADER = 512  # characters: a longer "id" is not one
# At the start of a line, what may still become a call's id is held this long at most: it heads a
# call if <|tool_call_argument_begin|> follows (a header with no <|tool_call_begin|>).
MAX_LINE_HEADER = 64  # characters
MAX_ROLE_WORD = 16  # characters between a leaked role marker and <|im_middle|>
# One call's arguments beyond this end the call (file writes are large, but not this large).
MAX_CALL_ARGUMENTS = 32 * 1024 * 1024  # characters

# The edge.
CHAT_PATHS = ("/v1/chat/completions", "/api/chat/completions")  # the routes that are repaired
MESSAGES_PATHS = {"/v1/messages": "messages", "/v1/messages/count_tokens": "count_tokens"}  # Anthropic's
DEFAULT_UPSTREAM = "http://127.0.0.1:30000/v1"  # SGLang's own default port
DEFAULT_PORT = 8000
DEFAULT_FORWARD_TIMEOUT = 600.0  # seconds the upstream may stay silent (prefill of a long context)
UPSTREAM_CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the upstream
DEFAULT_HEARTBEAT_INTERVAL = 15.0  # seconds between SSE comments while nothing else comes to be sent
# A streaming request waits this long for the upstream's headers before committing to a 200 and
# heartbeats: a refused connection or an SGLang validation error arrives sooner and keeps its status.
HEADER_GRACE = 0.5  # seconds
DEFAULT_MAX_BODY_MB = 64  # agents send multi-MB contexts; Quart's own default is 16 MiB
# What one request may cost the worker, whose event loop parses it (a thread would not help: the JSON
# parsers hold the GIL). Kimi-K2's context is 256K tokens, about 1 MB of text: a request with more
# JSON values than this could never be served, and parsing this many takes about 25-90 ms and 50 MB.
# Counted before parsing, in a body that could hold more (a value takes 2 bytes at the least), as its
# "{", "[" and "," bytes (each object, array and element after the first has one; strings count too:
# an upper bound). The count is one pass over the body: about 1 ms per MB.
MAX_REQUEST_VALUES = 500_000  # JSON values in one request
_VALUE_BYTES = b"{[,"
MAX_REQUEST_MESSAGES = 20_000  # messages in one request
MAX_RESTORED_TURNS = 1000  # the tool loop's latest assistant turns whose reasoning may be restored
DEFAULT_MAX_BODIES_MB = 256  # request bodies one worker holds at once, across its requests (GPU boxes
#                              keep their memory for the model)
RETRY_AFTER_BUSY = 1  # seconds a client is told to wait when the worker holds MAX_BODIES_MB of bodies
BODY_READ_TIMEOUT = 60.0  # seconds a client may take to send its request body
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # of an oversized body, read and dropped so the 413 arrives
MAX_SSE_EVENT_BYTES = 16 * 1024 * 1024  # one SSE line from upstream; longer ones are dropped
MAX_UPSTREAM_BODY_BYTES = 256 * 1024 * 1024  # a non-streamed upstream response
# Pieces of the upstream body (each one HTTP chunk's frames, at most one socket read) waiting for the
# writer: a burst goes out in one write; past this many (a slow client) the relay stops reading the
# upstream: backpressure.
STREAM_QUEUE = 64  # pieces
PARSER_CHECK_INTERVAL = 60.0  # seconds between asking SGLang for its parsers, until it answers
GC_THRESHOLD = 20_000  # allocations between young-generation collections (CPython: 700)
IDLE_COLLECT_AFTER = 1.0  # seconds with no request in flight before a full garbage collection
COLLECT_EVERY = 1000  # finished requests between full collections when the proxy is never idle
# Idle upstream connections kept for reuse. httpcore checks every idle one with a syscall on each
# new request, so after a burst of 500 streams a large pool makes every later request slower.
IDLE_UPSTREAM_CONNECTIONS = 8
UPSTREAM_CLOSE_TIMEOUT = 1.0  # seconds allowed to close the upstream connection on cancel
FINAL_SEND_GRACE = 5.0  # seconds a Quart route's last write may take, shielded (_shield_final_send)
LOG_PREVIEW_CHARS = 400  # characters of content/reasoning in INFO log lines
DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_LOG_BACKUPS = 5
DEFAULT_SHUTDOWN_GRACE = 30.0  # seconds in-flight requests may finish after SIGTERM/SIGINT
SUPERVISOR_SIGNAL_WAIT = 0.5  # seconds a worker waits before handing a SIGTERM to Hypercorn's supervisor
HEALTH_UPSTREAM_TIMEOUT = 2.0  # seconds: GET /health?upstream=1 asks the upstream's /models
DEFAULT_REASONING_MAX_ENTRIES = 50_000  # assistant turns whose reasoning is remembered
DEFAULT_REASONING_MAX_MB = 256  # MiB of reasoning text remembered
DEFAULT_REASONING_MAX_HOURS = 24  # a tool loop idle longer than this has lost its reasoning
STORE_BUSY_TIMEOUT = 2.0  # seconds a worker waits for another one's write to the reasoning store
STORE_PRUNE_EVERY = 200  # writes between enforcing the store's bounds, per worker
STORE_KEYS_PER_QUERY = 500  # keys looked up in one query (SQLite limits a query's parameters)
DEFAULT_CAPTURE_MAX_FILES = 200  # captures kept in CAPTURE_DIR; the oldest go first
DEFAULT_CAPTURE_MAX_MB = 500  # MiB of captures kept in CAPTURE_DIR
CAPTURE_EXCHANGE_BYTES = 32 * 1024 * 1024  # recorded of one exchange; past it the capture says "truncated"
CAPTURE_EVENT_OVERHEAD = 100  # bytes counted per recorded event on top of its data (the list entry)
CAPTURE_PREFIX = "kimiproxy-capture-"  # of every capture file: pruning touches nothing else

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front must not buffer the stream
]
HEARTBEAT_FRAME = b": keep-alive\n\n"
DONE_FRAME = b"data: [DONE]\n\n"

# Hop-by-hop headers (RFC 9110 section 7.6.1; also every header the Connection header names, see
# end_to_end_headers), the ones that only make sense on one connection (Expect, HTTP2-Settings), and
# the ones httpx or Hypercorn set themselves.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"host", b"content-length",
    b"expect", b"http2-settings",
})
REQUEST_HEADERS_DROPPED = HOP_BY_HOP | {b"accept-encoding"}  # set per route, see Upstream.headers
RESPONSE_HEADERS_DROPPED = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}  # Hypercorn and we set these
# An upstream's CORS headers would let a web page on another site read kimiproxy's answers: never relayed.
CORS_HEADER_PREFIX = b"access-control-"
SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie",
})

log = logging.getLogger("kimiproxy")
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("kimiproxy_request_id", default="-")


# ---------------------------------------------------------------------------------------------------
# Errors: split by who is at fault, each carrying its HTTP status and OpenAI error type
# ---------------------------------------------------------------------------------------------------

class ProxyError(Exception):
    status = 500
    error_type = "server_error"

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.message = message  # what the client reads
        self.detail = detail  # what only the log gets: upstream addresses, bytes the upstream sent
        if status is not None:
            self.status = status

    headers: tuple[tuple[bytes, bytes], ...] = ()  # sent with the error (Retry-After)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "code": self.status}}


class ClientError(ProxyError):
    """The request is wrong: the client must change it."""
    status = 400
    error_type = "invalid_request_error"


class UpstreamError(ProxyError):
    """The upstream failed or could not be reached."""
    status = 502
    error_type = "upstream_error"
    kind = "protocol"  # for the metrics: connect, timeout, protocol or http


class ConfigError(Exception):
    """A bad setting: start-up stops with this one line."""


class _ClientGone(Exception):
    """The client left: mid-request, or a write to it failed. Not an error of anyone's to report."""


# ---------------------------------------------------------------------------------------------------
# SSE and JSON codecs
# ---------------------------------------------------------------------------------------------------

def json_loads(data: bytes | str) -> Any:
    """json.loads, by orjson when it is installed. Whatever orjson refuses (invalid JSON, but also
    NaN and infinities, which the stdlib accepts) is left to the stdlib. orjson reads an integer past
    64 bits as a float: what is read here is read for the repair, and a client's request is never
    written anew from it (``rewrite_request`` edits it in place)."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def json_dumps_compact(value: Any) -> bytes:
    """Compact UTF-8 JSON, as SGLang writes its chunks."""
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:  # integers past 64 bits, lone surrogates
            pass
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate (a client cut a string mid-emoji): as an escape
        return json.dumps(value, separators=(",", ":")).encode()


class SSEDecoder:
    """Bytes from the upstream in, the data of each complete event out (``decode``/``flush``).
    Lines end in LF, as SGLang writes them, or CRLF; a lone CR (allowed by the SSE spec, used by no
    OpenAI-compatible server we know) is not a line end here. A line longer than ``max_line`` bytes is
    dropped whole (memory stays bounded) and counted in ``oversized``."""

    def __init__(self, max_line: int = MAX_SSE_EVENT_BYTES) -> None:
        self.max_line = max_line
        self.oversized = 0
        self._buffer = b""
        self._data: list[bytes] = []
        self._discarding = False  # inside an oversized line, until its end

    def decode(self, chunk: bytes) -> list[bytes]:
        if not self._buffer and not self._data and not self._discarding and chunk.startswith(b"data: ") \
                and chunk.endswith(b"\n\n") and chunk.count(b"\n") == 2 and b"\r" not in chunk:
            return [chunk[6:-2]]  # one whole event of one line, as SGLang writes each chunk: nothing to keep
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if self._discarding:
                self._discarding = False
                continue
            self._line(line, events)
        if len(self._buffer) > self.max_line:
            self._drop_oversized()
        return events

    def flush(self) -> list[bytes]:
        events: list[bytes] = []
        if self._buffer and not self._discarding:
            self._line(self._buffer, events)
        self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if self._data:
                events.append(self._data[0] if len(self._data) == 1 else b"\n".join(self._data))
                self._data = []
        elif line.startswith(b"data:"):
            self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        # comments (":...") and other fields (event:, id:, retry:) carry nothing for us

    def _drop_oversized(self) -> None:
        self.oversized += 1
        log.warning("upstream SSE line longer than %d bytes dropped", self.max_line)
        self._buffer = b""
        self._data = []
        self._discarding = True


# ---------------------------------------------------------------------------------------------------
# Repair core: markers
# ---------------------------------------------------------------------------------------------------

class Marker(enum.Enum):
    """What a marker means (REPAIR.md 1); the tokenizer gives text as str and markers as these."""
    SECTION_BEGIN = "section-begin"
    SECTION_END = "section-end"
    CALL_BEGIN = "call-begin"
    ARGUMENT_BEGIN = "argument-begin"
    CALL_END = "call-end"
    IM_END = "im-end"
    ROLE = "role"  # <|im_user|>, <|im_assistant|>, <|im_system|>
    IM_MIDDLE = "im-middle"
    THINK_OPEN = "think-open"
    THINK_CLOSE = "think-close"
    TRUNCATED = "truncated-marker"  # cut off at the end of the text: "<|tool_call_e"
    END = "end"  # of the text


# Short names for the parser's code, each bound to its member by name.
SECTION_BEGIN, SECTION_END = Marker.SECTION_BEGIN, Marker.SECTION_END
CALL_BEGIN, ARGUMENT_BEGIN, CALL_END = Marker.CALL_BEGIN, Marker.ARGUMENT_BEGIN, Marker.CALL_END
IM_END, ROLE, IM_MIDDLE = Marker.IM_END, Marker.ROLE, Marker.IM_MIDDLE
THINK_OPEN, THINK_CLOSE = Marker.THINK_OPEN, Marker.THINK_CLOSE
TRUNCATED, EOF = Marker.TRUNCATED, Marker.END
MARKERS = {
    "<|tool_calls_section_begin|>": SECTION_BEGIN, "<|tool_call_section_begin|>": SECTION_BEGIN,
    "<|tool_calls_section_end|>": SECTION_END, "<|tool_call_section_end|>": SECTION_END,
    "<|tool_call_begin|>": CALL_BEGIN, "<|tool_call_argument_begin|>": ARGUMENT_BEGIN,
    "<|tool_call_end|>": CALL_END, "<|im_end|>": IM_END, "<|im_middle|>": IM_MIDDLE,
    "<|im_user|>": ROLE, "<|im_assistant|>": ROLE, "<|im_system|>": ROLE,
    "<think>": THINK_OPEN, "</think>": THINK_CLOSE,
}
LONGEST_MARKER = max(map(len, MARKERS))  # 28 characters
THINK_CLOSE_TEXT = "</think>"
SECTION_BEGIN_TEXTS = tuple(text for text, kind in MARKERS.items() if kind is SECTION_BEGIN)

_MARKER_RE = re.compile(r"<\|([a-z_]{1,32})\|(>?)|</?think>")
_MARKER_PREFIXES = frozenset(m[:k] for m in MARKERS for k in range(1, len(m)))
_ID = r"[\w.\-:]"
_ID_RE = re.compile(rf"{_ID}{{1,{MAX_CALL_HEADER}}}")
_LINE_HEADER_RE = re.compile(rf"[ \t]*({_ID}{{1,{MAX_LINE_HEADER}}}[ \t]{{0,8}})?")  # indentation, a word
_TRAILING_ID_RE = re.compile(rf"({_ID}+[:.]\d{{1,18}}|functions{_ID}*)\s*\Z")  # an id just sent
_ROLE_WORD_RE = re.compile(r"\s*[a-z]*\s*")
_COUNTER_TAIL_RE = re.compile(r"[:.]\d*\Z")
NEED = object()  # a parser has read all its input and waits for more


def match_marker(buf: str, i: int, final: bool) -> tuple[Marker | str | None, int]:
    """What starts at buf[i], a "<": (kind, end), ("partial", 0) while more text could still make it a
    marker, or (None, 0) for plain text. ``final``: no more text follows this buffer."""
    m = _MARKER_RE.match(buf, i)
    if m is not None:
        # "<|tool_call_end|" without its ">" (REPAIR.md 4.2) is that marker where the text ends or the
        # next marker begins ("" in group 2; None for the think markers)
        cut = m[2] == ""
        end = m.end()
        kind = MARKERS.get(m[0] + ">" if cut else m[0])
        if kind is None or (cut and end < len(buf) and buf[end] != "<"):
            return None, 0
        if cut and end == len(buf) and not final:
            return "partial", 0  # its ">" may still come
        return kind, end
    if len(buf) - i < LONGEST_MARKER and buf[i:] in _MARKER_PREFIXES:
        if not final:
            return "partial", 0
        if buf.startswith("<|", i) and len(buf) - i >= MIN_TRUNCATED_MARKER:
            return TRUNCATED, len(buf)
    return None, 0


# ---------------------------------------------------------------------------------------------------
# Repair core: a call's arguments
# ---------------------------------------------------------------------------------------------------

_STRING_RUN = re.compile(r'[^"\\<\x00-\x1f]+')
_LITERAL_RUN = re.compile(r"[\w.+\-]+")
_LITERAL_RE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+\-]?\d+)?|true|false|null")
_ESCAPE_RE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')
_CUT_ESCAPE_RE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?")  # all that is left of the text: wait, or cut
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
# Where ArgumentRepair stands in the JSON text.
_START, _KEY, _KEY_STRING, _COLON, _VALUE, _STRING, _LITERAL, _AFTER, _DONE, _JUNK, _RAW = range(11)


_JSON_DECODER = json.JSONDecoder(strict=False)


def _load_lenient(text: str) -> Any:
    """JSON with raw control characters allowed in strings, or None; never raises (deep nesting)."""
    try:
        return _JSON_DECODER.decode(text)
    except (ValueError, RecursionError):
        return None


class Checkpoint(NamedTuple):
    """Where ArgumentRepair stood at a marker inside a string, to go back to if it ended the call."""
    position: int  # of the marker, in the arguments as written
    state: int
    closers: list[str]
    safe: int  # what was certain then


class ArgumentRepair:
    """One call's arguments, repaired while they stream (REPAIR.md 4.3 and 4.6).

    ``scan(buf, i, final)`` reads JSON text from buf[i] and returns where it stopped: at the end, at a
    marker outside every string (the caller decides what it ends), or where it needs more text. The
    arguments as they will be written pile up in one list; what no later character can change (up to
    ``_safe``) goes out through ``take()``. Not yet certain: a comma, a key and its colon until the
    value begins, a number until it ends, a top-level string (it may be double-encoded) or literal or
    text that is not JSON, the text from where the JSON broke (passed as written or dropped: the end
    decides), and everything after what was certain at a marker inside a string, until the value is
    whole (the marker was text), or the string never closes, or the JSON after it breaks (it ended the
    call: the caller calls ``rewind()`` and reads the marker again). ``finish()`` closes what is open.
    Positions are counted from the start (``_base`` pieces were taken already).
    """

    def __init__(self, markers: bool = True, objects_only: bool = False) -> None:
        self.markers = markers  # False for the decoded text of a double-encoded string
        # The client takes only an object (Anthropic's tool input): broken JSON is closed as a cut-off
        # is, never passed as written, and a value that is no object becomes {} (with a rule).
        self.objects_only = objects_only
        self.rules: dict[str, None] = {}  # the repairs made, in order
        self.consumed = 0  # characters read: a call ends at MAX_CALL_ARGUMENTS, wherever chunks end
        self.rewind_now = False
        self._out: list[str] = []
        self._base = 0  # pieces already taken
        self._safe = 0  # pieces before this position are certain
        self._literal = 0  # where the literal being read starts
        self._state = _START
        self._closers: list[str] = []
        self._scalar = False  # a top-level string, literal or non-JSON text: decided at the end
        self._check: Checkpoint | None = None  # at the first marker in a string
        self._check_open = False  # still inside that string
        self._raw: list[str] = []  # the raw text from that marker on, to read again
        self._junk = ""  # after the value or where it broke: the next call's id, or dropped

    @property
    def in_string(self) -> bool:
        return self._state in (_STRING, _KEY_STRING)

    @property
    def complete(self) -> bool:
        """The value is whole (or broke beyond repair): nothing more can belong to it."""
        return self._state == _DONE or self._state == _JUNK

    def must_rewind(self, eof: bool) -> bool:
        """Whether the marker held inside a string ended the call (REPAIR.md 4.3): the JSON broke after
        it, or the text ended (``eof``) inside that string."""
        return self.rewind_now or (eof and self._check is not None and self._check_open)

    def take_junk(self) -> str:
        """The last MAX_CALL_HEADER characters after the value: an id, if the next call's header ran in."""
        junk, self._junk = self._junk[-MAX_CALL_HEADER:], ""
        return junk

    def take(self) -> str:
        # After a marker inside a string, only what was certain at that marker is: a key whose value
        # began after it is no key if the marker ended the call (REPAIR.md 4.3).
        end = self._safe if self._check is None else self._check.safe
        count = end - self._base
        if self._scalar or count <= 0:
            return ""
        text = "".join(self._out[:count])
        del self._out[:count]
        self._base = end
        return text

    def _put(self, text: str, certain: bool) -> None:
        self._out.append(text)
        if certain:
            self._safe = self._base + len(self._out)

    def _rule(self, rule: str) -> None:
        self.rules[rule] = None

    # -- scanning ----------------------------------------------------------------------------------

    def scan(self, buf: str, i: int, final: bool) -> int:
        start = raw_from = i
        n = min(len(buf), i + MAX_CALL_ARGUMENTS - self.consumed)
        final = final or n < len(buf)
        while i < n and not self.rewind_now:
            state, ch = self._state, buf[i]
            if state == _STRING or state == _KEY_STRING:
                value = state == _STRING
                if m := _STRING_RUN.match(buf, i, n):
                    self._put(m.group(), value)
                    i = m.end()
                elif ch == '"':
                    self._put(ch, value)
                    self._check_open = False
                    self._state = self._after_value() if value else _COLON
                    i += 1
                elif ch == "\\":
                    if m := _ESCAPE_RE.match(buf, i, n):
                        self._put(m.group(), value)
                        i = m.end()
                    elif _CUT_ESCAPE_RE.fullmatch(buf, i, n):  # the rest of the escape may follow
                        if not final:
                            break
                        self._rule("incomplete-escape-cut")
                        i = n
                    else:  # a backslash before anything else was meant literally (a Windows path)
                        self._put("\\\\", value)
                        self._rule("invalid-escape-repaired")
                        i += 1
                elif ch == "<":
                    kind, end = match_marker(buf, i, final) if self.markers else (None, 0)
                    if kind == "partial":
                        break
                    if kind is None:
                        end = i + 1
                    elif self._check is None:  # REPAIR.md 4.3: text of the string, unless it never closes
                        self._check = Checkpoint(self._base + len(self._out), state, list(self._closers), self._safe)
                        self._check_open = True
                        raw_from = i
                    self._put(buf[i:end], value)
                    i = end
                else:  # a raw control character (pretty-printed JSON): escaped
                    self._put(_CONTROL_ESCAPES.get(ch) or f"\\u{ord(ch):04x}", value)
                    self._rule("control-character-escaped")
                    i += 1
            elif state == _LITERAL and (m := _LITERAL_RUN.match(buf, i, n)):
                self._put(m.group(), False)
                i = m.end()
            elif state == _LITERAL:
                self._end_literal()  # and read this character again
            elif ch == "<" and self.markers and match_marker(buf, i, final)[0] is not None:
                break  # a marker, or the start of one: the caller decides
            elif state >= _DONE:  # after the value, broken, or not JSON: up to the next "<"
                j = buf.find("<", i + 1, n) if self.markers else -1
                j = n if j < 0 else j
                if state != _DONE:  # text that is no JSON, or where the JSON broke: finish() decides
                    self._put(buf[i:j], False)
                if state != _RAW:  # after the value, or where it broke: its end may be the next call's id
                    self._junk += buf[i:j]
                    if len(self._junk) > 2 * MAX_CALL_HEADER:  # only its end can be an id
                        self._junk = self._junk[-MAX_CALL_HEADER:]
                i = j
            elif ch in " \t\r\n":
                if state != _START:
                    self._put(ch, state == _AFTER)
                i += 1
            else:
                i = self._structure(ch, i)
        if self._check is not None:
            self._raw.append(buf[raw_from:i])
        self.consumed += i - start
        return i

    def _structure(self, ch: str, i: int) -> int:
        """One character outside strings: where JSON allows it, or where the text breaks."""
        state = self._state
        top = self._closers[-1] if self._closers else ""
        if state == _START or state == _VALUE:
            if ch in "{[":
                self._put(ch, True)  # in a container the value began: its key is certain now
                self._closers.append("}" if ch == "{" else "]")
                self._state = _KEY if ch == "{" else _VALUE
                return i + 1
            if state == _START:  # a top-level string, literal or text: decided at the end
                self._scalar = True
            if ch == '"':
                self._put(ch, True)  # (a top-level string is held whole all the same: take)
                self._state = _STRING
                return i + 1
            if ch in "-0123456789tfn" or state == _START:  # a literal, or at the top a word that may be none
                self._state, self._literal = _LITERAL, self._base + len(self._out)
                return i
        if state == _KEY and ch == '"' or state == _COLON and ch == ":":
            self._put(ch, False)
            self._state = _KEY_STRING if ch == '"' else _VALUE
            return i + 1
        if state == _AFTER and ch == ",":
            self._put(ch, False)
            self._state = _KEY if top == "}" else _VALUE
            return i + 1
        if ch == top and (state == _AFTER or state == _KEY or state == _VALUE and top == "]"):
            if "," in "".join(self._out[self._safe - self._base:]):  # {"a": 1,}
                del self._out[self._safe - self._base:]
                self._rule("trailing-comma-dropped")
            self._put(ch, True)
            self._closers.pop()
            self._state = self._after_value()
            return i + 1
        return self._broken(i)

    def _after_value(self) -> int:
        if self._closers:
            return _AFTER
        if self._check is not None:  # the value is complete: the marker in it was text
            self._check = None
            self._raw.clear()
        return _DONE

    def _end_literal(self) -> None:
        literal = "".join(self._out[self._literal - self._base:])
        if _LITERAL_RE.fullmatch(literal):
            self._safe = self._base + len(self._out)
            self._state = self._after_value()
        elif self._scalar:
            self._state = _RAW  # a top-level word that is no JSON literal
        else:
            self._broken(0)

    def _broken(self, i: int) -> int:
        """The JSON cannot go on here. With a marker held inside a string, that marker ended the call
        (REPAIR.md 4.3); otherwise what follows is junk, or the next call's id."""
        if self._check is not None:
            self.rewind_now = True
        else:
            self._rule("arguments-broken-off")
            self._state = _JUNK
        return i

    def rewind(self) -> str:
        """The held marker was the real one: forget what followed it and return the raw text from it on
        (``finish()`` follows). What was certain at the marker is again all that is: it has only grown since."""
        at, self._state, self._closers, self._safe = self._check
        del self._out[at - self._base:]
        self._check = None
        self._rule("marker-in-unclosed-string")
        return "".join(self._raw)

    # -- the end -----------------------------------------------------------------------------------

    def finish(self, ended: bool = False) -> str:
        """The arguments ended: close what is open, and return the rest of them. ``ended``: the model
        ended the call itself (<|tool_call_end|>, the section's end), so JSON that broke before it was not
        cut off: it is passed as written from where it broke, with a warning, never shortened (REPAIR.md 4.6).
        It is the last call made to an ArgumentRepair."""
        self._check = None
        if self._state == _LITERAL:
            self._end_literal()
        if ended and self._state == _JUNK and not self.objects_only:
            del self.rules["arguments-broken-off"]
            self._rule("arguments-not-json")
            return "".join(self._out)
        if self._scalar:
            value = self._finish_scalar()
            if self.objects_only and not isinstance(_load_lenient(value), dict):
                self._rule("arguments-not-an-object")
                return "{}"
            return value
        if self._state == _START:
            self._rule("arguments-empty")
            return "{}"
        if self._state == _STRING:
            self._put('"', True)
        del self._out[self._safe - self._base:]  # a comma, or a member whose value never began
        if self._closers:
            self._rule("arguments-closed")
            self._put("".join(reversed(self._closers)), True)
        if self._junk.strip():
            self._rule("junk-dropped")
        return self.take()

    def _finish_scalar(self) -> str:
        """A top-level string (double-encoded arguments, unwrapped if it holds JSON), literal, or text."""
        text = "".join(self._out).strip()
        value = _load_lenient(text)
        if value is None and self._state == _STRING:  # cut off inside the string
            value = _load_lenient(text + '"')  # (an incomplete escape was dropped already)
            if isinstance(value, str):
                text = json.dumps(value, ensure_ascii=False)
                self._rule("string-closed")
        if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
            inner = ArgumentRepair(markers=False)
            inner.scan(value, 0, True)
            unwrapped = inner.finish()
            if not {"arguments-broken-off", "junk-dropped"} & inner.rules.keys():
                self._rule("arguments-double-encoded")
                return unwrapped
        if value is None and self._state != _STRING:
            self._rule("arguments-not-json")
        return text


# ---------------------------------------------------------------------------------------------------
# Repair core: the model's text in, typed events out
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class Text:
    channel: str  # where it goes: "reasoning" or "content"
    text: str


@dataclasses.dataclass(slots=True)
class CallStart:
    key: int
    header: str  # the id as the model wrote it, or a structured call's name
    channel: str  # where SGLang put it: "reasoning", "content" or "tool_calls"
    group: int  # calls of one group (a section) may repeat each other; across groups, a repeat is a duplicate


@dataclasses.dataclass(slots=True)
class CallText:
    key: int
    text: str  # repaired arguments: nothing before it is ever changed


@dataclasses.dataclass(slots=True)
class CallEnd:
    key: int
    rules: list[str]  # the repairs this call needed


@dataclasses.dataclass(frozen=True, slots=True)
class StructuredCall:
    """A structured call from the upstream, read as if the model had written its markup (REPAIR.md 4.1)."""
    name: str
    group: int


CHANNEL_FIELDS = {"reasoning": "reasoning_content", "content": "content", "tool_calls": "tool_calls"}
_ENDING_RULES = {SECTION_END: "section-end-as-call-end", CALL_BEGIN: "no-call-end", EOF: "unterminated-call",
                 SECTION_BEGIN: "no-call-end", TRUNCATED: "truncated-marker-removed", IM_END: "ended-by-im-end",
                 THINK_CLOSE: "ended-by-think-close", ROLE: "ended-by-role-marker"}


class Think(enum.Enum):
    NONE = "none"  # not thinking: the answer
    OPEN = "open"  # thinking
    MAYBE = "maybe"  # after a tool section that interrupted the thinking: thinking if a </think> follows


ANSWER, THINKING = Think.NONE, Think.OPEN  # read for every chunk: module names are quicker to reach


class Thinking:
    """REPAIR.md 4.8 in one place: where the model's text stands with its thinking, and so which channel
    each piece of text goes to. SGLang's reasoning channel is thinking; ``<think>`` at the start opens it;
    a tool section in content interrupts it, and the text after it is held (a ``</think>`` makes it
    reasoning, the end of the text the answer); ``</think>`` closes it, and is text only in an answer.
    SGLang's reasoning parser ends the reasoning at the first content after it, at a ``</think>`` that it
    removes or at a tool section that it keeps: ``switch`` tells which. A whole message does not say
    whether its content came before its structured calls: ``after_calls``. The repairs it makes, it
    counts in ``rules`` (the parser's)."""

    __slots__ = ("rules", "state", "in_reasoning", "held", "answered", "content_came", "head", "prefilled")

    def __init__(self, rules: Counter[str], prefilled: bool = False) -> None:
        self.rules = rules
        # K2.5 and later: the chat template pre-fills <think>, so the text starts inside the thinking
        # (RepairContext.think_prefilled says so, from the request, before the first token).
        self.prefilled = prefilled
        self.state = Think.OPEN if prefilled else Think.NONE
        self.in_reasoning = False  # the text comes from SGLang's reasoning channel
        self.held: list[str] = []  # while MAYBE
        self.answered = False  # answer text went out
        self.content_came = False  # SGLang's content channel had text (held or not)
        self.head: str | None = None  # reasoning came before any content: the first content, until ``switch``

    @property
    def channel(self) -> str:
        """Where SGLang put the text: a call found in it says so (``Call.channel``)."""
        return "reasoning" if self.in_reasoning else "content"

    def channel_changes(self, reasoning: bool) -> list:
        """SGLang's channel for the text that follows. (Back) in reasoning: thinking, whatever came
        before, and what was held is thinking too. Reasoning before any content: a switch is ahead."""
        if not reasoning:
            self.content_came, self.in_reasoning = True, False
            return []
        if not self.content_came:
            self.head = ""
        if self.in_reasoning:
            return []
        self.in_reasoning = True
        events = self.end("reasoning")
        self.state = Think.OPEN
        return events

    def switch(self, content: str = "", end: bool = False, at_section: bool = False) -> tuple[bool, str] | None:
        """The first content after the reasoning: did SGLang end the reasoning at a </think> (removed) or at
        a tool section (kept)? Decided once the content shows whether it starts with a section, at the end
        of the content (``end``), or at a structured call (``at_section``: SGLang's tool parser read that
        section). Returns (whether a </think> was removed, the content held), or None: no switch is ahead,
        or it is too early to tell."""
        if self.head is None or end and not self.head:
            return None
        if content:
            self.content_came = True
        head = self.head = self.head + content
        lead = head.lstrip()
        # Too early to tell while what follows the whitespace may still become a section's marker: the
        # whitespace itself, however the upstream's chunks cut it, counts for nothing (REPAIR.md 4.12).
        if not (end or at_section) and len(lead) < LONGEST_MARKER and len(head) - len(lead) <= MAX_LINE_HEADER \
                and any(text.startswith(lead) for text in SECTION_BEGIN_TEXTS):
            return None
        self.head, self.in_reasoning = None, False
        return not at_section and not lead.startswith(SECTION_BEGIN_TEXTS), head

    @staticmethod
    def after_calls(content: Any) -> bool:
        """Whether a whole message's content came after its structured calls: content with a </think> did
        (the thinking went on past a section; SGLang streams it so)."""
        return isinstance(content, str) and THINK_CLOSE_TEXT in content

    def open(self) -> None:
        """``<think>`` opens the text: thinking (a repair when it came in content)."""
        self.state = Think.OPEN
        if not self.in_reasoning:
            self.rules["think-moved-to-reasoning"] += 1

    def interrupt(self) -> None:
        """A tool section starts in content while the model is thinking: the text after it may still be
        thinking. It is held until a </think> says so, or the end says it was the answer."""
        if self.state is Think.OPEN and not self.in_reasoning:
            self.state = Think.MAYBE

    def route(self, text: str) -> list:
        """The events for text released by the parser: reasoning, the answer, or none while held."""
        state = self.state
        if state is ANSWER:  # first: the answer flowing is what most chunks are
            if not self.answered and not text.isspace():
                self.answered = True
            return [Text("content", text)]
        if state is THINKING:
            return [Text("reasoning", text)]
        self.held.append(text)
        return []

    def close(self) -> list | None:
        """``</think>`` at the top level: its events, or None when it is text."""
        if self.state is Think.MAYBE:  # the thinking went on after a tool section
            self.rules["thinking-after-section-moved"] += 1
            return self.end("reasoning")
        if self.state is Think.OPEN:
            self.state = Think.NONE
            if self.prefilled and not self.in_reasoning:
                self.rules["prefilled-thinking-moved-to-reasoning"] += 1
            return []
        if self.answered:
            return None  # inside an answer it is text like any other
        self.rules["stray-think-close-removed"] += 1
        return []

    def end(self, channel: str) -> list:
        """What was held, no longer held, as text of ``channel``: reasoning when a </think> or SGLang's
        reasoning channel says so, the answer at the end of the text (no </think> came)."""
        if self.state is not Think.MAYBE:
            return []
        self.state = Think.NONE
        text = "".join(self.held)
        self.held.clear()
        return [Text(channel, text)] if text else []


class LineStart:
    """REPAIR.md 4.2's header without <|tool_call_begin|>, in one place: an id at the start of a line
    heads a call when <|tool_call_argument_begin|> follows. What the parser keeps for it: the word held
    back at the start of a line (``lead``: ``functions...`` or a declared tool's name and counter),
    whether the text stands at a line's start, the end of the text sent (an id already sent may still
    head a call; it stays in the text), and the declared tools' names."""

    __slots__ = ("tools", "lead", "at_start", "tail")

    def __init__(self, tools: Iterable[str]) -> None:
        self.tools = tuple(tool.casefold() for tool in tools)
        self.lead = ""  # held only at a line's start: when not ``at_start``, it is empty
        self.at_start = True
        self.tail = ""

    def may_head(self, word: str, whole: bool = False) -> bool:
        """Whether ``word`` may (be the start of) a call's id: ``functions...``, or a declared tool's name
        and counter (``whole``: the complete id, whose last dotted part names a tool)."""
        name = _COUNTER_TAIL_RE.sub("", word).casefold()
        if whole:
            return word.startswith("functions") or name.rsplit(".", 1)[-1] in self.tools
        return "functions".startswith(word) or word.startswith("functions") or \
            any(tool.startswith(name) for tool in self.tools)

    def text(self, text: str) -> str:
        """Of ``text``, what can go out now: a word at the start of a line that may still become a
        call's id is held back (``lead``) until what follows shows whether it heads a call."""
        if self.lead:
            text, self.lead = self.lead + text, ""
        start = text.rfind("\n") + 1
        if start or self.at_start:
            m = _LINE_HEADER_RE.fullmatch(text, start)
            if m and m[1] and self.may_head(m[1].strip()):
                text, self.lead = text[:m.start(1)], m[1]
            self.at_start = bool(m and (self.lead or not m[1]))
        return text

    def take_lead(self) -> str:
        lead, self.lead = self.lead, ""
        return lead

    def id_sent(self) -> str | None:
        """An id at the end of the text sent, which may head a call: one ``may_head`` names, or any
        NAME:IDX at the start of a line (an undeclared name is kept as written, rule 4.4; not being
        held for it, it was sent as text, and stays there)."""
        m = _TRAILING_ID_RE.search(self.tail)
        if m is None:
            return None
        if self.may_head(m[1], whole=True):
            return m[1]
        before = self.tail[:m.start()].rstrip(" \t")
        line_start = before.endswith("\n") or not before and len(self.tail) < MAX_LINE_HEADER  # all sent so far
        return m[1] if line_start and ":" in m[1] else None


class ParserInput:
    """What a MarkupParser has yet to read, as email.feedparser's BufferedSubFile is for its parser:
    the text fed and not read yet (``text`` from ``pos``), the tokens injected after it (``queue``: the
    parser reads them all before it waits for more, so no text is ever fed behind one), and whether the
    end has come. ``token()`` is the tokenizer: text and markers, holding back only a possible marker
    prefix."""

    __slots__ = ("text", "pos", "queue", "eof")

    def __init__(self) -> None:
        self.text, self.pos = "", 0
        self.queue: deque = deque()
        self.eof = False

    def push(self, text: str) -> None:
        self.text = self.text[self.pos:] + text if self.pos < len(self.text) else text
        self.pos = 0

    def final(self) -> bool:
        """Whether no more text can follow ``text``: the end, or an injected token is next."""
        return self.eof or bool(self.queue)

    def unread(self, text: str) -> None:
        self.text = text + self.text[self.pos:]
        self.pos = 0

    def after_text(self) -> Any:
        """Once the text is read: the next injected token, EOF at the end, else NEED."""
        if self.queue:
            return self.queue.popleft()
        return EOF if self.eof else NEED

    def token(self) -> Any:
        """The next token: text (a str), a Marker, a StructuredCall, EOF, or NEED while more input must
        come first."""
        final = self.final()
        buf, pos = self.text, self.pos
        if pos < len(buf):
            i = buf.find("<", pos)
            if i == pos:  # a marker, or a "<" that starts none: text up to the next "<"
                kind, end = match_marker(buf, i, final)
                if kind == "partial":
                    return NEED
                if kind is not None:
                    self.pos = end
                    return kind
                i = buf.find("<", i + 1)
            self.pos = len(buf) if i < 0 else i  # text up to the next "<" (most tokens: one find, nothing else)
            return buf[pos:self.pos]
        return self.after_text()


class MarkupParser:
    """The parser of what the model wrote: ``feed(text)`` and ``close()`` return events (REPAIR.md 4.2-4.8).

    The model writes one stream, ``<think>`` reasoning ``</think>`` answer, with tool sections
    anywhere; SGLang cuts it into ``reasoning_content`` and ``content``. One parser reads both, in
    order (``feed(text, reasoning=True)``, then the content), so a call that SGLang cut in two at a
    ``</think>`` inside its arguments is read whole. Structured calls get a parser of their own, into
    which they are ``inject``ed as tokens: the same road as markup.

    Its input is a ParserInput (the tokenizer with it), as email.feedparser's is a BufferedSubFile.
    ``_parse`` is a generator that reads tokens; where it stands in its own code is the parser's state
    (the top, a section, a call's header, its arguments). It yields events, and NEED when its input
    runs out. The rest of its state is a value each: Thinking (rule 4.8), LineStart (rule 4.2's header
    at the start of a line), whether a structured call needs a section's and a call's end markers, and
    whether plain text may pass without the tokenizer (``_plain``).
    """

    def __init__(self, keys: Iterator[int], tools: Iterable[str] = (), structured: bool = False,
                 prefilled: bool = False, objects_only: bool = False) -> None:
        self.structured = structured
        self.rules: Counter[str] = Counter()  # text-level repairs
        self._keys = keys  # call keys and group ids, unique within the choice
        self._input = ParserInput()
        # Whether the parser waits at the top level with nothing held at a line's start and no marker
        # begun: text without "<" or a newline then needs no tokenizer and passes at once (``feed``).
        self._plain = False
        self.thinking = Thinking(self.rules, prefilled)
        self._line = LineStart(tools)
        self.in_section = False  # for the choice: whether a structured call needs a section's end marker
        self.objects_only = objects_only  # arguments must be objects (ArgumentRepair.objects_only)
        self.arguments: ArgumentRepair | None = None  # the call's, while they are read: it needs its end marker
        self._gen = self._parse()

    # -- the two-call contract ---------------------------------------------------------------------

    def feed(self, text: str, reasoning: bool = False) -> list:
        thinking = self.thinking
        events = []
        if reasoning is not thinking.in_reasoning or not thinking.content_came:  # not for most chunks
            if not reasoning and thinking.head is not None:
                return self.switch(text)
            events = thinking.channel_changes(reasoning)
        if self._plain and "<" not in text and "\n" not in text:  # nothing in it can be markup
            return self._release(text) if not events else events + self._release(text)
        self._input.push(text)
        return events + self._run()

    def inject(self, token: Any) -> list:
        self._input.queue.append(token)
        return self._run()

    def close(self) -> list:
        self._input.eof = True
        return self._run()

    def _run(self) -> list:
        self._plain = False
        events = []
        for event in self._gen:
            if event is NEED:
                break
            events.append(event)
        return events

    def switch(self, content: str = "", end: bool = False, at_section: bool = False) -> list:
        """SGLang's channel changes from reasoning to content (``Thinking.switch``): a </think> that its
        reasoning parser removed is put back (wherever it was: in a string of arguments it is part of the
        string), then the content held is read."""
        switched = self.thinking.switch(content, end, at_section)
        if switched is None:
            return []
        lost_think, head = switched
        events = self.feed(THINK_CLOSE_TEXT) if lost_think else []
        return events + self.feed(head) if head else events

    def new_group(self) -> int:
        """REPAIR.md 4.9, the one place a group begins: a section, a call outside one, or (for the
        choice) the structured calls until text comes between them. A call is dropped only as the
        duplicate of an earlier call of another group (``ChoiceRepair._decide``)."""
        return next(self._keys)

    # -- the tokenizer -----------------------------------------------------------------------------

    def _token(self, top: bool = False):
        """The next token (ParserInput.token), waiting for input while there is none (``top``: at the
        top level, where plain text may pass without the tokenizer)."""
        source = self._input
        while (token := source.token()) is NEED:
            # Not at a line's start, so no word held there either, and no marker begun: plain text passes.
            self._plain = top and not self._line.at_start and source.pos >= len(source.text)
            yield NEED
        return token

    # -- the parser: where it stands in this code is its state -------------------------------------

    def _parse(self):
        """The top level: text, and the markup in it (``_markup``), token after token."""
        token = yield from self._opening()
        while token is not EOF:
            if token is None:
                token = yield from self._token(top=True)
            elif isinstance(token, str):
                yield from self._text(token)
                token = None
            else:
                token = yield from self._markup(token)
        yield from self._release(self._line.take_lead())
        yield from self.thinking.end("content")  # no </think> came: what was held is the answer

    def _opening(self):
        """Text that opens with <think> (SGLang without a reasoning parser, or one that left the tag):
        reasoning, up to </think> or a tool section (REPAIR.md 4.8). Returns the token after it, if any."""
        space, token = yield from self._collect(lambda text: len(text) < LONGEST_MARKER and not text.strip())
        if token is THINK_OPEN:
            self.thinking.open()
            return None
        if space:
            yield from self._text(space)
        return token

    def _collect(self, fits: Any):
        """Text while ``fits`` the text so far; returns (that text, the token after it)."""
        text = ""
        while True:
            token = yield from self._token()
            if not isinstance(token, str) or not fits(text + token):
                return text, token
            text += token

    def _markup(self, marker: Any):
        """A marker (or a structured call) at the top level, and what it begins. Returns the token that
        ended that, for the top level to read next, or None (nothing, or an end marker done with)."""
        if marker is not ARGUMENT_BEGIN:  # which may make the word held at the start of the line a call's id
            yield from self._release(self._line.take_lead())
            self._line.at_start = True
        token = None
        if marker is ARGUMENT_BEGIN:
            token = yield from self._headless_call()
        elif marker is SECTION_BEGIN:
            self.thinking.interrupt()
            token = yield from self._section()
        elif marker is CALL_BEGIN or isinstance(marker, StructuredCall):
            self.thinking.interrupt()
            token = yield from self._calls(marker, [] if self.structured else ["no-section-wrapper"], self.new_group())
        elif marker is THINK_CLOSE:
            closed = self.thinking.close()  # its events, or None inside an answer, where it is text
            if closed is None:
                yield from self._text(THINK_CLOSE_TEXT)
            else:
                yield from closed
        elif marker is ROLE:
            token = yield from self._role()
        elif marker is THINK_OPEN:
            yield from self._text("<think>")  # only the start of the text opens a think block
        else:
            self._count_removed(marker)
        return None if token in (CALL_END, SECTION_END, TRUNCATED) else token

    def _count_removed(self, token: Any) -> None:
        """<|im_end|>, <|im_middle|>, stray end markers, a marker cut off at the end: removed."""
        self.rules["control-token-removed" if token in (IM_END, IM_MIDDLE) else
                   "truncated-marker-removed" if token is TRUNCATED else "stray-marker-removed"] += 1

    def _headless_call(self):
        """<|tool_call_argument_begin|> outside a call: the id held at the start of the line heads a
        call (REPAIR.md 4.2). Without one, the marker is stray."""
        header = self._line.take_lead().strip()
        if not header and (sent := self._line.id_sent()):
            header = sent  # sent already, as text, where it stays: nothing sent is taken back
            self.rules["call-id-left-in-text"] += 1
        if not header:
            self.rules["stray-marker-removed"] += 1
            return None
        self._line.at_start = True
        self.thinking.interrupt()
        return (yield from self._calls(header, ["no-call-begin", "no-section-wrapper"], self.new_group()))

    def _text(self, text: str):
        """Text. A word at the start of a line that may still become a call's id (``functions...``, or
        a declared tool's name) is held back: it heads a call if <|tool_call_argument_begin|> follows."""
        yield from self._release(self._line.text(text))

    def _release(self, text: str) -> list:
        events = self.thinking.route(text) if text else []
        if events:  # sent, not held: an id at its end may still head a call (LineStart.id_sent)
            line = self._line
            line.tail = (line.tail + text)[-MAX_LINE_HEADER:]
        return events

    def _role(self):
        """A leaked role header, <|im_assistant|>assistant<|im_middle|>: removed whole."""
        word, token = yield from self._collect(lambda text: len(text) <= MAX_ROLE_WORD and _ROLE_WORD_RE.fullmatch(text))
        self.rules["control-token-removed"] += 1
        if token is IM_MIDDLE:
            return None
        if word:
            yield from self._text(word)
        return token

    def _section(self):
        """Inside <|tool_calls_section_begin|>: calls, and noise between them (REPAIR.md 4.7). Returns the
        token that ended the section, or None when it never closed and prose followed."""
        self.in_section = True
        group, noise, token = self.new_group(), "", None
        while token in (None, CALL_END, TRUNCATED, SECTION_BEGIN):  # the section goes on
            token = yield from self._token()
            if isinstance(token, str):
                noise += token
                brace = noise.find("{")
                if brace >= 0 and _ID_RE.fullmatch(noise[:brace].strip()):  # "functions.x:0 {": no markers
                    self._input.unread(noise[brace:])
                    header, noise = noise[:brace].strip(), ""
                    token = yield from self._calls(header, ["no-call-begin", "no-argument-marker"], group)
                elif len(noise) > MAX_SECTION_NOISE:  # too long for noise: the section never closed
                    token = None
                    break
                else:
                    token = None  # noise so far: read on
                continue
            if token is EOF:  # the section never closed: the noise since its last marker is text after it
                break
            if token is CALL_BEGIN or isinstance(token, StructuredCall):
                token = yield from self._calls(token, [], group)
            elif token is ARGUMENT_BEGIN and _ID_RE.fullmatch(noise.strip()):
                header, noise = noise.strip(), ""
                token = yield from self._calls(header, ["no-call-begin"], group)
            elif token in (CALL_END, ARGUMENT_BEGIN, IM_MIDDLE, TRUNCATED, THINK_OPEN):
                self._count_removed(token)
                token = None
            if noise.strip():
                self.rules["section-noise-removed"] += 1
            noise = ""
        self.in_section = False
        if token is None or noise.strip():  # it never closed: what followed its last marker is text
            self.rules["unclosed-section"] += 1
            yield from self._text(noise)
        return token

    def _calls(self, header: Any, rules: list[str], group: int):
        """A call, and those that follow it with nothing between; returns the token after the last. A call's
        ``header``: CALL_BEGIN (the id follows), a StructuredCall, or the id (read already)."""
        follow = [r for r in rules if r == "no-section-wrapper"]
        while True:
            token, header = yield from self._call(header, rules, group)
            if header is not None:  # the arguments ran into the next call's id
                rules = follow + ["no-call-begin", "polluted-arguments-split"]
            elif token is CALL_BEGIN or isinstance(token, StructuredCall):
                header, rules = token, follow
            else:
                return token

    def _call(self, header: Any, rules: list[str], group: int):
        """One call, from its header to the token that ends it. Returns (that token, the next call's id
        when the arguments ran into one)."""
        rules = list(rules)
        channel = "tool_calls" if self.structured else self.thinking.channel
        token = None
        if isinstance(header, StructuredCall):
            header, group = header.name, header.group
        elif header is CALL_BEGIN:
            header, token = yield from self._header(rules)
            if token is not None and not header:  # no id, no arguments: no call the model made
                self.rules["empty-call-removed"] += 1
                return token, None
        key = next(self._keys)
        yield CallStart(key, header, channel, group)
        if token is not None:  # another marker before any arguments
            yield CallText(key, "{}")
            yield CallEnd(key, rules + ["arguments-empty", _ENDING_RULES.get(token, "call-ended")])
            return token, None
        token, next_header, rules = yield from self._arguments(key, rules)
        if next_header is None and token is not CALL_END:  # (a call's id ran in: it ended there)
            rules.append(_ENDING_RULES.get(token, "call-ended"))
        yield CallEnd(key, rules)
        return token, next_header

    def _arguments(self, key: int, rules: list[str]):
        """A call's arguments, through ArgumentRepair, up to the token that ends them. Where the scan
        stops outside a string, the tokenizer reads what is there: a marker, or what comes once the text
        is read (inside a string the scan stops only for the rest of an escape or a marker)."""
        args = self.arguments = ArgumentRepair(objects_only=self.objects_only)
        text = self._input
        next_header = None
        while True:
            buf = text.text
            text.pos = args.scan(buf, text.pos, text.final())
            if out := args.take():
                yield CallText(key, out)
            if args.rewind_now:  # the JSON broke after a marker inside a string: read again below
                token = None
                break
            if args.consumed >= MAX_CALL_ARGUMENTS:  # the rest of the text is read as text
                rules.append("arguments-overflow")
                token = CALL_END
                break
            if text.pos < len(buf) and args.in_string:
                token = NEED  # the rest of an escape or of a marker inside a string is still to come
            else:
                token = text.token()
            if token is NEED:
                yield NEED
                continue
            if token is not ARGUMENT_BEGIN:
                break
            junk = args.take_junk().strip()
            if _ID_RE.fullmatch(junk):  # the arguments ran into the next call's id (REPAIR.md 4.6)
                next_header, token = junk, None
                break
            self.rules["stray-marker-removed"] += 1
        if args.must_rewind(token is EOF):  # a marker inside a string ended the call: read from it on again
            text.unread(args.rewind())
            token = text.token()
        self.arguments = None
        if tail := args.finish(ended=token in (CALL_END, SECTION_END) and "arguments-overflow" not in rules):
            yield CallText(key, tail)
        return token, next_header, rules + list(args.rules)

    def _header(self, rules: list[str]):
        """After <|tool_call_begin|>: the id, up to <|tool_call_argument_begin|>, or up to the JSON when
        that marker is missing (REPAIR.md 4.2). Returns (id, None), or (id, token) when another marker
        came first."""
        header, token = yield from self._collect(lambda text: len(text) <= MAX_CALL_HEADER and "{" not in text)
        if not isinstance(token, str):
            return header.strip(), None if token is ARGUMENT_BEGIN else token
        header += token
        brace = header.find("{", 0, MAX_CALL_HEADER + 1)
        if brace >= 0:
            self._input.unread(header[brace:])
            rules.append("no-argument-marker")
            return header[:brace].strip(), None
        self._input.unread(header)  # not an id: read it as the arguments
        rules.append("no-id")
        return "", None


# ---------------------------------------------------------------------------------------------------
# Repair core: names and ids
# ---------------------------------------------------------------------------------------------------

CANONICAL_ID_RE = re.compile(r"functions\.([^\s:]+):(\d+)")
# K2.5, K2.6, K2.7 (Kimi-K2.5, kimi-k2-6, Kimi-K2.7-Code): their chat template pre-fills <think> (REPAIR.md 4.8).
_PREFILLED_THINK_MODEL_RE = re.compile(r"k2[._-]?[5-9](?![\d])", re.IGNORECASE)
_NAME_COUNTER_RE = re.compile(r"(?:functions\.)?([^\s:]+?)[:.](\d{1,18})")  # search:2, functions.x.0
_GLUED_RE = re.compile(r"functions([A-Za-z_][\w\-.]*?)(\d{0,18})")  # functionsexec5
_COUNTER_RE = re.compile(r"(?:call[_\-]?)?(\d{1,18})")  # call_2, call00003, a bare 0


@dataclasses.dataclass
class RepairContext:
    """What the repair needs to know about the request."""
    tools: dict[str, dict]  # declared tool name -> its parameters schema
    history_calls: int = 0  # tool calls already in the dialog: the next dialog-wide counter
    enabled: bool = True
    forced: bool = False  # tool_choice "required" or a named tool: SGLang constrains the output to JSON
    history_ids: frozenset[str] = frozenset()  # the ids the history's calls hold: never given again
    think_prefilled: bool = False  # the model's text starts inside its thinking (K2.5 and later)
    objects_only: bool = False  # the client takes a call's arguments only as an object (Anthropic's)

    @classmethod
    def from_request(cls, request: dict, enabled: bool = True) -> "RepairContext":
        tools: dict[str, dict] = {}
        for tool in request.get("tools") or ():
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                params = function.get("parameters")
                tools[function["name"]] = params if isinstance(params, dict) else {}
        messages = request.get("messages")
        calls = [c for m in messages if isinstance(m, dict) and m.get("role") == "assistant"
                 and isinstance(m.get("tool_calls"), list) for c in m["tool_calls"]] if isinstance(messages, list) else []
        ids = frozenset(c["id"] for c in calls if isinstance(c, dict) and isinstance(c.get("id"), str))
        choice, model, kwargs = request.get("tool_choice"), request.get("model"), request.get("chat_template_kwargs")
        thinking_off = isinstance(kwargs, dict) and (kwargs.get("thinking") is False or kwargs.get("enable_thinking") is False)
        prefilled = isinstance(model, str) and bool(_PREFILLED_THINK_MODEL_RE.search(model)) and not thinking_off
        return cls(tools, len(calls), enabled, bool(tools) and (choice == "required" or isinstance(choice, dict)),
                   ids, prefilled)

    def resolve(self, header: str) -> tuple[str | None, int | None, bool, str]:
        """REPAIR.md 4.4 and 4.5: (the declared name, or None when it takes the argument keys to know;
        the model's own counter; whether the id is canonical and names that tool as written, so it is
        kept; the name as written). Readings of the id, most literal first: NAME:IDX, functionsNAMEIDX
        with every split of the trailing digits (read_file_v2 + 7), a counter alone, the id as a name."""
        header = header.strip()[:MAX_CALL_HEADER]
        readings: list[tuple[str | None, int | None]] = []
        if m := _NAME_COUNTER_RE.fullmatch(header):
            readings.append((m[1], int(m[2])))
        if m := _GLUED_RE.fullmatch(header):
            name, digits = m[1], m[2]
            readings += [(name + digits[:k], int(digits[k:])) for k in range(len(digits) - 1, -1, -1)]
            readings.append((name + digits, None))
        if m := _COUNTER_RE.fullmatch(header):
            readings.append((None, int(m[1])))
        if (stem := _COUNTER_TAIL_RE.sub("", header)) != header and stem:  # cut off after the name:
            readings.append((stem.removeprefix("functions."), None))  # "functions.read_file:" is read_file
        readings.append((header or None, None))  # the id as written may be the name ("get_weather")
        written = next((n for n, _ in readings if n and not _COUNTER_TAIL_RE.search(n)), None) or \
            next((n for n, _ in readings if n), "unknown")  # never a name an id cannot be built from
        counter = next((c for _, c in readings if c is not None), None)
        for name, count in readings:
            found = name and (self._declared(name) if self.tools else name)
            if found:
                canonical = CANONICAL_ID_RE.fullmatch(header)
                return found, count, bool(canonical) and canonical[1] == found, name
        return None, counter, False, written

    def _declared(self, name: str) -> str | None:
        """A declared tool's name for ``name``: as written, a dotted namespace's last parts, or the one
        declared name equal to it but for case."""
        parts = name.split(".")
        for k in range(min(len(parts), 8)):  # k = 0: the name as written
            if (suffix := ".".join(parts[k:])) in self.tools:
                return suffix
        folded = [t for t in self.tools if t.casefold() == name.casefold()]
        return folded[0] if len(folded) == 1 else None

    def infer_name(self, arguments: str) -> str | None:
        """The one declared tool whose parameters fit the argument keys, if exactly one does."""
        value = _load_lenient(arguments)
        if not isinstance(value, dict):
            return None
        fits = []
        for name, params in self.tools.items():
            props, required = params.get("properties"), params.get("required")
            allowed = set(props) if isinstance(props, dict) else set()
            needed = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
            if needed <= value.keys() <= allowed:
                fits.append(name)
        return fits[0] if len(fits) == 1 else None


# ---------------------------------------------------------------------------------------------------
# Repair core: one choice, its calls resolved, numbered and sent
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class ToolDelta:
    """A piece of a tool call for the client: the first carries id and name."""
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclasses.dataclass(slots=True)
class Call:
    key: int
    channel: str  # where SGLang put it: "reasoning", "content" or "tool_calls"
    group: int
    header: str
    name: str | None = None  # None until it is resolved
    written: str = ""  # the name as the model wrote it, kept when nothing resolves
    counter: int | None = None  # the model's own counter
    verbatim: bool = False  # a canonical id whose name resolved as written: kept as it is
    index: int = -1  # once sent
    id: str = ""
    args: list[str] = dataclasses.field(default_factory=list)
    rules: list[str] = dataclasses.field(default_factory=list)
    canonical: str | None = None  # the arguments, parsed and written in one form, once complete
    dropped: bool = False

    @property
    def arguments(self) -> str:
        if len(self.args) > 1:
            self.args[:] = ["".join(self.args)]
        return self.args[0] if self.args else ""

    @property
    def held(self) -> bool:
        return self.index < 0 and not self.dropped


REASONING_KEYS = ("reasoning_content", "reasoning")  # SGLang's; vLLM's (since v0.11) and others'
_SGLANG_REASONING = REASONING_KEYS[:1]


def reasoning_keys(fields: dict) -> tuple[str | None, tuple[str, ...]]:
    """Where this server put the reasoning of a message or delta (REPAIR.md 4.1): (the text, every key
    that holds it). Some send one key, some ``reasoning`` beside ``reasoning_content: null``, some the
    same text under both (mlx-vlm): the text is the first one given, and each key holding it gets the
    repaired text back. (None, ()) when there is none."""
    text = fields.get("reasoning_content")
    if "reasoning" not in fields:  # SGLang's own shape: one key (this runs for every chunk)
        return (text, _SGLANG_REASONING) if type(text) is str and text else (None, ())
    text = next((v for k in REASONING_KEYS if type(v := fields.get(k)) is str and v), None)
    if text is None:
        return None, ()
    return text, tuple(k for k in REASONING_KEYS if fields.get(k) == text)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _call_tuples(calls: Any) -> list:
    out = []
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else {}
        out.append((call.get("id") if isinstance(call, dict) else None, function.get("name"), function.get("arguments")))
    return out


def _choices(completion: dict) -> Iterator[tuple[dict, dict]]:
    """A whole chat completion's (choice, message) pairs that are well-formed."""
    choices = completion.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            yield choice, choice["message"]


def _canonical(arguments: str) -> str:
    """Arguments in one form, to see whether two calls are the same."""
    value = _load_lenient(arguments)
    try:
        return arguments if value is None else json.dumps(value, sort_keys=True)
    except (ValueError, RecursionError):
        return arguments


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class ChoiceRepair:
    """The repair of one choice (REPAIR.md 4.4-4.10): the model's text (reasoning, then content) through
    one parser, structured calls through another, and the calls they find resolved, numbered and sent
    in the order they go out. ``feed()`` per upstream delta, ``finish()`` at the end; both return Text
    and ToolDelta events, the same for a stream and a whole response.

    A call goes out live, its first delta as soon as its name is known, unless its name needs its
    argument keys, or an earlier call of another group has that name (it may be the same call twice):
    then it is held until that is decided (its arguments and those of the earlier one are complete, or
    the earlier one was dropped), or another call is going out live: then it waits for that one's end."""

    def __init__(self, ctx: RepairContext) -> None:
        self.ctx = ctx
        keys = itertools.count()
        self.text = MarkupParser(keys, ctx.tools, prefilled=ctx.think_prefilled, objects_only=ctx.objects_only)
        self.structured = MarkupParser(keys, structured=True, objects_only=ctx.objects_only)
        self.calls: dict[int, Call] = {}
        self.sent: list[Call] = []
        self.texts: dict[str, list[str]] = {"reasoning": [], "content": []}
        self._forced: list[str] | None = [] if ctx.forced else None  # content while it may be calls as JSON
        self._forced_array = False  # and it began as an array: held to the end
        self._open: Any = None  # the upstream index of the structured call being read
        # Every structured call begun, by its key here, in order (the open one, if any, is the last), with
        # its upstream id as it began: SGLang's id for the call at that position (_start).
        self._opened: dict[Any, str | None] = {}
        self._group = -1  # the structured calls' group: a new one after text came between them
        self._call_ids: dict[Any, str] = {}  # the upstream id of each structured call, by its key here
        self._later: list[tuple[dict, Any]] = []  # deltas of other structured calls, until it is complete
        self._current: dict[int, Any] = {}  # an upstream index's current call, once a new id reused it
        self._surrogate: dict[Any, str] = {}

    def feed(self, reasoning: str | None = None, content: str | None = None,
             tool_calls: list | None = None, whole: bool = False) -> list:
        out: list = []
        # (the check for a surrogate half before the call: every chunk passes here)
        if reasoning and (reasoning := self._pair("reasoning", reasoning) if self._surrogate or
                          "\ud800" <= reasoning[-1] <= "\udbff" else reasoning):
            self._read_text(reasoning, out, reasoning=True)
        if content and (content := self._pair("content", content) if self._surrogate or
                        "\ud800" <= content[-1] <= "\udbff" else content):
            self._read_text(content, out)
        for position, delta in enumerate(tool_calls or ()):
            if isinstance(delta, dict):
                self._structured(delta, ("whole", position) if whole else None, out)
        return out

    def finish(self) -> list:
        out: list = []
        for channel in ("reasoning", "content"):
            if held := self._surrogate.pop(channel, ""):  # a lone half at the very end stays (as an escape)
                self._read_text(held, out, reasoning=channel == "reasoning")
        if self._forced:
            self._forced_calls(out)
        self._take(self.text.switch(end=True), out)
        while self._open is not None:  # the call being read ends, then those that waited for it, in turn
            self._end_structured(out)
        if self.structured.in_section:
            self._take(self.structured.inject(SECTION_END), out)
        for parser in (self.text, self.structured):
            self._take(parser.close(), out)
        self._release(out, final=True)  # every call is complete now, none live
        return out

    def finish_reason(self, upstream: str | None) -> str | None:
        """REPAIR.md 4.10: follow the calls delivered."""
        if upstream == "length":
            return upstream
        if self.sent:
            return "tool_calls"
        return "stop" if upstream == "tool_calls" else upstream

    def repairs(self) -> Counter[str]:
        """The text-level repairs (each call carries its own ``rules``)."""
        total = self.text.rules + self.structured.rules
        if dropped := sum(call.dropped for call in self.calls.values()):
            total["duplicate-call-dropped"] += dropped
        return total

    # -- SGLang's channels back into one text --------------------------------------------------------

    def _read_text(self, text: str, out: list, reasoning: bool = False) -> None:
        """Text from SGLang's reasoning or content channel, into the one parser of the model's text."""
        self._group = -1
        if self._forced is not None and not reasoning:  # content that may be the calls as a JSON array: held
            self.text.thinking.content_came = True  # content all the same (REPAIR.md 4.8)
            self._forced.append(text)  # (pieces, joined once: a file the array writes may be megabytes)
            if self._forced_array or not text.strip():  # what came before it was whitespace, or the array's
                return
            if text.lstrip().startswith("["):
                self._forced_array = True
                return
            text, self._forced = "".join(self._forced), None
        self._take(self.text.feed(text, reasoning), out)

    def _forced_calls(self, out: list) -> None:
        """tool_choice "required" or a named tool: SGLang's grammar makes the model write its calls as a
        JSON array, ``[{"name": ..., "parameters": {...}}]``, which only SGLang's tool parser turns into
        tool calls. Without it the array arrives as content: it becomes the calls (REPAIR.md 4.1)."""
        text = "".join(self._forced)
        self._forced = None
        stripped = text.strip()
        array = ArgumentRepair()
        try:  # a whole array, and whatever follows it
            calls, end = _JSON_DECODER.raw_decode(stripped)
        except (ValueError, RecursionError):  # cut by max_tokens, a marker inside, too deep: as arguments are
            end = array.scan(stripped, 0, True)
            calls = _load_lenient(array.take() + array.finish())
        if isinstance(calls, list) and calls and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                     for c in calls):
            self.structured.rules["calls-from-json-array"] += 1
            self.structured.rules.update(array.rules.keys())  # arguments-closed: the array was cut off
            for position, call in enumerate(calls):
                arguments = call.get("parameters", call.get("arguments", {}))
                arguments = arguments if isinstance(arguments, str) else _dumps(arguments)
                self._structured({"function": {"name": call["name"], "arguments": arguments}}, ("json", position), out)
            if stripped[end:]:  # what follows the calls (a leaked <|im_end|>, more text) is content after them
                self._read_text(stripped[end:], out)
        else:
            self._take(self.text.feed(text), out)

    def _pair(self, stream: Any, text: str) -> str:
        """A surrogate pair split across two events (JSON escapes of UTF-16 halves) is joined."""
        if held := self._surrogate.pop(stream, ""):
            text = (held + text).encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
        if "\ud800" <= text[-1] <= "\udbff":
            self._surrogate[stream] = text[-1]
            text = text[:-1]
        return text

    # -- structured calls: given to a parser as markup -----------------------------------------------

    def _structured(self, delta: dict, index: Any, out: list) -> None:
        """One structured tool-call delta. Which call it continues: its ``index`` (a new ``id`` on an
        index already in use starts another call: two calls sharing one index, as some engines send),
        or without one, the open call unless it brings an id. Arguments given as a JSON value rather
        than a string are that value's JSON text."""
        given, call_id = index, _str(delta.get("id")) or None
        if index is None:
            index = delta.get("index")
            if type(index) is not int:
                index = self._open if self._open is not None and call_id in (None, self._call_ids.get(self._open)) \
                    else ("new", len(self._opened))  # a key no call has had
            elif self._current or call_id:  # (most deltas continue their call: no look-ups for them)
                index = self._current.get(index, index)
                if call_id and self._call_ids.get(index, call_id) != call_id:
                    index = self._current[delta["index"]] = ("again", delta["index"], call_id)
        if call_id:
            self._call_ids.setdefault(index, call_id)
        function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
        if index != self._open and self._open is not None and (self._later or self.structured.arguments is not None
                                                                and not self.structured.arguments.complete):
            self._later.append((delta, given))
            return  # another call began while this one's arguments go on (some engines interleave): after it
        if index != self._open:
            if index in self._opened:
                return  # a late piece of a call already ended
            self._end_structured(out)
            if not self.structured.in_section:
                self._take(self.structured.inject(SECTION_BEGIN), out)
            self._take(self.text.switch(at_section=True), out)  # SGLang's reasoning parser stopped here
            self.text.thinking.interrupt()
            if self._group < 0:
                self._group = self.structured.new_group()
            self._open = index
            self._opened[index] = self._call_ids.get(index)
            name = (_str(function.get("name")) or "")[:MAX_CALL_HEADER]
            self._take(self.structured.inject(StructuredCall(name, self._group)), out)
        arguments = function.get("arguments")
        if type(arguments) is not str:  # a JSON value instead of its text (KTransformers, Ollama)
            arguments = _dumps(arguments) if isinstance(arguments, (dict, list)) else None
        if arguments and (arguments := self._pair(index, arguments)):
            self._take(self.structured.feed(arguments), out)
            if self._later and (self.structured.arguments is None or self.structured.arguments.complete):
                self._end_structured(out)

    def _end_structured(self, out: list) -> None:
        """The structured call being read is complete: its end, unless its arguments held one. Then the
        deltas that waited for it are read, in the order they came (they may wait again, for another)."""
        if self._open is not None:
            if held := self._surrogate.pop(self._open, ""):
                self._take(self.structured.feed(held), out)
            self._open = None
            if self.structured.arguments is not None:
                self._take(self.structured.inject(CALL_END), out)
        later, self._later = self._later, []
        for delta, index in later:
            self._structured(delta, index, out)

    # -- calls -------------------------------------------------------------------------------------

    def _take(self, events: list, out: list) -> None:
        for event in events:
            kind = type(event)
            if kind is Text:
                self.texts[event.channel].append(event.text)
                out.append(event)
            elif kind is CallText:
                call = self.calls[event.key]
                call.args.append(event.text)
                if not call.held:
                    out.append(ToolDelta(call.index, None, None, event.text))
            elif kind is CallStart:
                self._decide(self._start(event), out)
            else:
                call = self.calls[event.key]
                call.rules += event.rules
                call.canonical = _canonical(call.arguments)
                # Its end decides it, and the calls that waited for it: to stop streaming live, or to be
                # complete as the twin a later call may repeat (REPAIR.md 4.11: held no longer than that).
                self._release(out)

    def _start(self, event: CallStart) -> Call:
        call = self.calls[event.key] = Call(event.key, event.channel, event.group, event.header)
        call.name, call.counter, call.verbatim, call.written = self.ctx.resolve(event.header)
        if event.channel == "tool_calls":  # SGLang's id, when it is the dialog counter for its position, stays
            upstream_ids = list(self._opened.values())  # of the structured calls begun: this one is the last
            counter = self.ctx.history_calls + len(upstream_ids) - 1
            m = CANONICAL_ID_RE.fullmatch(upstream_ids[-1] or "")
            call.counter = counter if m and m[1] == call.name and int(m[2]) == counter else None
        if call.name is not None and call.name != call.written:
            call.rules.append("name-resolved")
        return call

    def _live(self) -> bool:
        """Whether a call is going out as it streams: the others wait (REPAIR.md 4.9). Calls go out one
        at a time, so it is the last one sent, until its arguments are complete."""
        return bool(self.sent) and self.sent[-1].canonical is None

    def _release(self, out: list, final: bool = False) -> None:
        """A call ended (or the text did, ``final``): the calls that waited, for it to stop streaming live
        or to be complete as a call they may repeat, are decided in the order they started, until one
        goes out live (then the rest wait for it in turn)."""
        for call in list(self.calls.values()):
            if self._live():
                return
            if call.held:
                self._decide(call, out, final)

    def _decide(self, call: Call, out: list, final: bool = False) -> None:
        """A held call, as it starts, when a call (it or another) ends, or at the end of the text (``final``): sent
        live while it streams if it can repeat no call; once complete, dropped if it repeats a call of
        another group (REPAIR.md 4.9), else sent whole; held while that is not known yet, or another call
        is live (then it is decided again when a call ends: ``_release``)."""
        if call.name is None:  # an id that names nothing: decided at the end, where a call it repeats,
            if not final:  # before it or after it, is known (and named)
                return
            if call.canonical != "{}" and any(c.canonical == call.canonical for c in self.calls.values()
                                               if c.group != call.group and not c.dropped and c.name is not None):
                call.dropped = True
                return
            call.name = self.ctx.infer_name(call.arguments)
            call.rules.append("name-inferred-from-arguments" if call.name else "name-unresolved")
            call.name = call.name or call.written
        # Its twins: earlier calls of another group with its name.
        twins = [c for c in self.calls.values() if c.key < call.key and c.name == call.name and c.group != call.group
                 and not c.dropped]
        if twins and (call.canonical is None or any(t.canonical is None for t in twins)):
            return  # it may repeat one of them: decided when it and they are complete
        if any(t.canonical == call.canonical for t in twins):
            call.dropped = True
        elif not self._live():
            self._send(call, out)

    def _send(self, call: Call, out: list) -> None:
        """Number the call and give it its id (REPAIR.md 4.5): the next index, in the order calls go out."""
        call.index = len(self.sent)
        self.sent.append(call)
        structured, written = call.channel == "tool_calls", call.header.strip()
        # The first of these that neither this answer nor the history holds: the id as written (canonical,
        # its name as written), the model's own counter (or SGLang's), the dialog-wide counters.
        kept = [written] if call.verbatim and not structured else []
        own = [] if call.counter is None else [call.counter]
        counters = itertools.chain(own, itertools.count(self.ctx.history_calls + call.index))
        taken = self.ctx.history_ids.union(c.id for c in self.sent)
        ids = itertools.chain(kept, (f"functions.{call.name}:{counter}" for counter in counters))
        call.id = next(candidate for candidate in ids if candidate not in taken)
        if not structured and call.id != written:
            call.rules.append("id-rewritten")
        out.append(ToolDelta(call.index, call.id, call.name, call.arguments))


# ---------------------------------------------------------------------------------------------------
# Repair core: whole responses and streams
# ---------------------------------------------------------------------------------------------------

def repair_completion(body: dict, ctx: RepairContext) -> tuple[list[ChoiceRepair], bool]:
    """Repair a whole chat.completion in place: the same machinery as a stream, fed each field whole.
    Returns the choices' repairs and whether anything changed."""
    repairs, changed = [], False
    for choice, message in _choices(body):
        before = dict(message), choice.get("finish_reason")  # every edit below changes what it edits
        repair = ChoiceRepair(ctx)
        reasoning_in, keys = reasoning_keys(message)
        content_in, calls_in = message.get("content"), message.get("tool_calls")
        calls = calls_in if isinstance(calls_in, list) else None
        late = calls and Thinking.after_calls(content_in)  # fed after the calls (REPAIR.md 4.8)
        repair.feed(reasoning_in, None if late else _str(content_in), calls, whole=True)
        if late:
            repair.feed(content=content_in)
        repair.finish()
        content, reasoning = "".join(repair.texts["content"]), "".join(repair.texts["reasoning"])
        if isinstance(content_in, (str, type(None))) and content != (content_in or ""):
            message["content"] = content or ("" if content_in is not None and not repair.sent else None)
        if reasoning != (reasoning_in or ""):
            for key in keys or _SGLANG_REASONING:
                message[key] = reasoning or None
        entries = [{"id": c.id, "index": c.index, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}} for c in repair.sent]
        if _call_tuples(entries) != _call_tuples(calls_in):
            message["tool_calls"] = entries or None
        finish = repair.finish_reason(_str(choice.get("finish_reason")))
        if finish != choice.get("finish_reason"):
            choice["finish_reason"] = finish
        changed = changed or before != (message, choice.get("finish_reason"))
        repairs.append(repair)
    return repairs, changed


def _unchanged(events: list, content: str | None, reasoning: str | None, calls: list | None) -> bool:
    """Whether the events say exactly what the upstream delta said (text only: a delta with calls is
    written anew, byte for byte the same when nothing changed)."""
    if not events:
        return not content and not reasoning and not calls
    return len(events) == 1 and type(events[0]) is Text and not calls and not (content and reasoning) and \
        events[0].text == (content if events[0].channel == "content" else reasoning)


def _deltas(events: list, template: dict, keys: tuple[str, ...]) -> list[dict]:
    """Events as chunk deltas: one per run of events that a client may read in one delta (reasoning,
    under each of ``keys``, then content, then tool calls); the first keeps the upstream delta's other
    fields (a reasoning key among ``keys`` never with its raw text; another one, with other text, as it
    came, as a whole response keeps it)."""
    deltas: list[dict] = []
    rank = 3
    for event in events:
        r = (0 if event.channel == "reasoning" else 1) if type(event) is Text else 2
        if r < rank:
            current: dict = {}
            deltas.append(current)
        rank = r
        if r < 2:
            for key in keys if r == 0 else ("content",):
                current[key] = current.get(key, "") + event.text
        else:
            calls = current.setdefault("tool_calls", [])
            if event.id is None and calls and calls[-1]["index"] == event.index:
                calls[-1]["function"]["arguments"] += event.arguments
            elif event.id is None:
                calls.append({"index": event.index, "function": {"arguments": event.arguments}})
            else:
                calls.append({"index": event.index, "id": event.id, "type": "function",
                              "function": {"name": event.name, "arguments": event.arguments}})
    if deltas and template:
        first = {k: (None if k in ("content", "tool_calls") or k in keys else v) for k, v in template.items()}
        first.update(deltas[0])
        deltas[0] = first
    return deltas


class StreamRepair:
    """Upstream SSE event data in, downstream SSE frames out: ``feed(data)`` per event, ``close()`` at
    the end of the upstream stream. An event the repair leaves as it was goes out as the very bytes
    that came in. With ``ctx.enabled`` false it only relays (and keeps the final message for the log).
    ``pass_usage`` false: the usage chunk (no choices) is read, not passed on; kimiproxy asked for it."""

    def __init__(self, ctx: RepairContext, pass_usage: bool = True) -> None:
        self.ctx = ctx
        self.pass_usage = pass_usage
        self.choices: dict[int, ChoiceRepair] = {}
        self.keys: dict[int, tuple[str, ...]] = {}  # the reasoning keys each choice's upstream used
        self.finish: dict[int, str | None] = {}  # the finish reason each choice got
        self.done = False
        self.usage: Any = None
        self.skipped = 0  # events that were not JSON objects
        self._envelope: dict = {}

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            return []
        if data == b"[DONE]":
            return self.close()
        try:
            chunk = json_loads(data)
        except (ValueError, RecursionError):  # also invalid UTF-8, or nesting too deep
            chunk = None
        if not isinstance(chunk, dict):
            self.skipped += 1
            return []
        raw = b"data: " + data + b"\n\n"
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return [raw] if self.pass_usage or not chunk.get("usage") else []
        self._envelope = chunk
        outputs: list[dict] = []
        changed = False  # (a loop, not comprehensions: this runs for every chunk)
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            produced = self._choice(choice)
            if produced is None:
                outputs.append(choice)
            else:
                changed = True
                outputs += produced
        if not changed:
            return [raw]
        return [self._frame(choice) for choice in outputs]

    def close(self) -> list[bytes]:
        """The upstream stream ended ([DONE], or its end without one): each choice it never finished gets
        what it held and its finish, as if a last event had said "stop" (finish_reason(None) or "stop" is
        finish_reason("stop")); then [DONE]."""
        if self.done:
            return []
        self.done = True
        frames: list[bytes] = []
        for index in self.choices:
            if index in self.finish or not self.ctx.enabled:
                self.finish.setdefault(index, None)
                continue
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "stop"}
            # (None, as for an upstream event that needs no repair: then that event is the finish chunk)
            frames += [self._frame(c) for c in self._choice(choice) or [choice]]
        return frames + [DONE_FRAME]

    def _choice(self, choice: dict) -> list[dict] | None:
        """The choice dicts this event becomes, or None when it passes unchanged."""
        index = choice.get("index", 0)
        if type(index) is not int:
            index = 0
        repair = self.choices.get(index)
        if repair is None:
            repair = self.choices[index] = ChoiceRepair(self.ctx)
        elif index in self.finish:
            return None  # past its finish: nothing left to repair
        delta = choice.get("delta")
        if type(delta) is not dict:
            delta = {}
        content = delta.get("content")
        reasoning, keys = reasoning_keys(delta)
        keys = self.keys[index] = keys or self.keys.get(index, _SGLANG_REASONING)  # answered in kind
        content = content if type(content) is str else None
        calls = delta.get("tool_calls")
        calls = calls if type(calls) is list else None
        finish = choice.get("finish_reason")
        if not self.ctx.enabled:
            repair.texts["content"].append(content or "")
            repair.texts["reasoning"].append(reasoning or "")
            if finish is not None:
                self.finish[index] = finish
            return None
        events = repair.feed(reasoning, content, calls) if content or reasoning or calls else []
        if finish is None:
            if _unchanged(events, content, reasoning, calls):
                return None
            return [dict(choice, delta=d) for d in _deltas(events, delta, keys)]
        finish = finish if isinstance(finish, str) else "stop"  # malformed, but still the end
        events += repair.finish()
        final = self.finish[index] = repair.finish_reason(finish)
        if final == finish and _unchanged(events, content, reasoning, calls):
            return None
        out = [dict(choice, delta=d, finish_reason=None) for d in _deltas(events, delta, keys)]
        return out + [dict(choice, delta={}, finish_reason=final)]  # the finish in a chunk of its own

    def _frame(self, choice: dict) -> bytes:
        """One choice in the envelope of the last chunk that had choices."""
        chunk = dict(self._envelope, choices=[choice])
        if "usage" in self._envelope:
            chunk["usage"] = None  # the usage chunk passes on its own
        return b"data: " + json_dumps_compact(chunk) + b"\n\n"


# ---------------------------------------------------------------------------------------------------
# What a client got: one message, for the log line, the capture, the reasoning store and replay
# ---------------------------------------------------------------------------------------------------

def _preview(text: str) -> str:
    return text if len(text) <= LOG_PREVIEW_CHARS else text[:LOG_PREVIEW_CHARS] + f"...(+{len(text) - LOG_PREVIEW_CHARS})"


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A choice's final message as the client got it, streamed or whole: the one shape that the log
    line, the capture's verdict, the reasoning store and replay read."""
    content: str = ""
    reasoning: str = ""
    calls: tuple[tuple[Any, Any, Any], ...] = ()  # (id, name, arguments) of each call, in order
    finish_reason: str | None = None
    index: int = 0  # the choice's

    @classmethod
    def of_choice(cls, choice: dict, message: dict, index: int = 0) -> "Message":
        """A whole completion's choice."""
        content, given = message.get("content"), choice.get("index")
        return cls(content if isinstance(content, str) else "", reasoning_keys(message)[0] or "",
                   tuple(_call_tuples(message.get("tool_calls"))), _str(choice.get("finish_reason")),
                   given if type(given) is int else index)

    @classmethod
    def of_repair(cls, repair: ChoiceRepair, finish_reason: str | None = None, index: int = 0) -> "Message":
        """A choice as the repair gave it to the client (a stream's, as it went out)."""
        return cls("".join(repair.texts["content"]), "".join(repair.texts["reasoning"]),
                   tuple((c.id, c.name, c.arguments) for c in repair.sent), finish_reason, index)

    def describe(self) -> str:
        """For the log line: text cut to LOG_PREVIEW_CHARS, calls whole."""
        return json.dumps({"content": _preview(self.content), "reasoning_content": _preview(self.reasoning),
                           "tool_calls": [{"id": i, "name": n, "arguments": a} for i, n, a in self.calls],
                           "finish_reason": self.finish_reason}, ensure_ascii=False)

    def as_dict(self) -> dict:
        """For replay's printout and its diff."""
        return {"index": self.index, "content": self.content, "reasoning_content": self.reasoning,
                "tool_calls": [{"id": i, "name": n, "arguments": a} for i, n, a in self.calls],
                "finish_reason": self.finish_reason}


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

def split_credentials(url: str) -> tuple[str, str]:
    """(the URL without its userinfo, "user:password" percent-decoded): the URL is what kimiproxy
    shows (on /, in the log), the credentials are only ever sent upstream."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not sep or not at:
        return url, ""
    user, colon, password = userinfo.partition(":")
    return f"{scheme}://{host}{slash}{path}", f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"


_KEY_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def parse_api_keys(raw: str) -> tuple[tuple[str, str], ...]:
    """PROXY_API_KEY: keys separated by commas, each bare or with a name (``alice:KEY``). The name is what
    the log and /metrics show; a bare key shows as a fingerprint of it (``key-1a2b3c4d``), never as itself.
    So a key that itself holds a ':' needs a name."""
    keys = []
    for entry in raw.split(","):
        entry = entry.strip()
        name, colon, key = entry.partition(":")
        if colon and not key.strip() and _KEY_NAME_RE.fullmatch(name.strip()):
            raise ConfigError(f"PROXY_API_KEY: the entry for {name.strip()!r} has a name but no key")
        if colon and not key.strip() and not name.strip():
            raise ConfigError("PROXY_API_KEY: an entry is a ':' alone")
        if colon and key.strip() and _KEY_NAME_RE.fullmatch(name.strip()):
            keys.append((name.strip(), key.strip()))
        elif entry:
            keys.append(("key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry))
    if raw.strip() and not keys:  # " , " would otherwise turn the check off
        raise ConfigError("PROXY_API_KEY is set but holds no key: give at least one, or leave it empty to "
                          "run without keys")
    return tuple(keys)


def usable_upstream_url(url: str) -> bool:
    """Whether httpx can send to ``url`` as an upstream's base: http(s), a host, no query or fragment
    (what a request's path is appended to). Checked where the setting is read, so a bad one is a
    ConfigError line at start or a refused reload, never an exception in a serving worker."""
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        return False
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    return bool(parsed.host) and not parsed.query and not parsed.fragment


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, with the environment variable that sets it. Names kept from the proxy kimiproxy
    replaced, so the .env files users already have still work: SGLANG_API_BASE, PROXY_HOST, PROXY_PORT, LOG_LEVEL,
    LOG_FILE, ENABLE_FILE_LOGGING, FORWARD_TIMEOUT, ENABLE_STREAMING_TOOL_PARSER."""
    upstream: str = DEFAULT_UPSTREAM  # SGLANG_API_BASE: the upstream's /v1 base URL
    host: str = "127.0.0.1"  # PROXY_HOST (python kimiproxy.py only; hypercorn takes -b)
    port: int = DEFAULT_PORT  # PROXY_PORT
    log_level: str = "INFO"  # LOG_LEVEL
    log_file: str = "kimiproxy.log"  # LOG_FILE
    file_logging: bool = False  # ENABLE_FILE_LOGGING
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES  # LOG_MAX_BYTES: rotate the log file at this size
    log_backups: int = DEFAULT_LOG_BACKUPS  # LOG_BACKUPS: rotated files kept
    forward_timeout: float = DEFAULT_FORWARD_TIMEOUT  # FORWARD_TIMEOUT: upstream silence, seconds
    repair: bool = True  # ENABLE_STREAMING_TOOL_PARSER: the Kimi-K2 repair (off: transparent)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL  # HEARTBEAT_INTERVAL: seconds, 0 = off
    max_body_mb: float = DEFAULT_MAX_BODY_MB  # MAX_BODY_MB: largest request body
    max_bodies_mb: float = DEFAULT_MAX_BODIES_MB  # MAX_BODIES_MB: request bodies a worker holds at once
    body_timeout: float = BODY_READ_TIMEOUT  # BODY_TIMEOUT: seconds to receive a request body
    api_keys: tuple[tuple[str, str], ...] = ()  # PROXY_API_KEY: (name, key) pairs clients may present
    upstream_api_key: str = ""  # UPSTREAM_API_KEY: sent to the upstream instead of the client's key
    upstream_credentials: str = ""  # "user:password" from SGLANG_API_BASE's userinfo (never shown)
    allowed_hosts: tuple[str, ...] = ()  # ALLOWED_HOSTS: host names an anonymous proxy answers to, * = any
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE  # SHUTDOWN_GRACE: seconds in-flight requests get
    restore_reasoning: bool = True  # RESTORE_REASONING: put back the reasoning a client dropped
    reasoning_store: str = ""  # REASONING_STORE: the SQLite file the workers share ("" = default_store)
    reasoning_max_entries: int = DEFAULT_REASONING_MAX_ENTRIES  # REASONING_MAX_ENTRIES: turns remembered
    reasoning_max_mb: float = DEFAULT_REASONING_MAX_MB  # REASONING_MAX_MB: of reasoning text remembered
    reasoning_max_hours: float = DEFAULT_REASONING_MAX_HOURS  # REASONING_MAX_HOURS: then it is forgotten
    capture_dir: str = ""  # CAPTURE_DIR: write the exchanges that needed a repair or broke here ("" = off)
    capture_max_files: int = DEFAULT_CAPTURE_MAX_FILES  # CAPTURE_MAX_FILES
    capture_max_mb: float = DEFAULT_CAPTURE_MAX_MB  # CAPTURE_MAX_MB
    config_file: str = ""  # KIMIPROXY_CONFIG: the configuration file (upstreams, models, keys); "" = none

    def __repr__(self) -> str:  # never print a key
        return (f"Settings(upstream={self.upstream!r}, repair={self.repair}, "
                f"auth={'on' if self.api_keys else 'off'})")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        defaults = cls()

        def text(name: str, default: str) -> str:
            value = env.get(name, "").strip()
            return value or default

        def number(name: str, default: float, minimum: float = 0.0) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number") from None
            if not math.isfinite(value) or value < minimum:
                raise ConfigError(f"{name}={raw!r} must be a number >= {minimum:g}")
            return value

        def flag(name: str, default: bool) -> bool:
            raw = env.get(name, "").strip().lower()
            if not raw:
                return default
            if raw in ("1", "true", "yes", "on"):
                return True
            if raw in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")

        upstream, credentials = split_credentials(text("SGLANG_API_BASE", defaults.upstream).rstrip("/"))
        if credentials and env.get("UPSTREAM_API_KEY", "").strip():
            raise ConfigError("SGLANG_API_BASE holds a user and password and UPSTREAM_API_KEY is set: give the "
                              "upstream one credential")
        if not usable_upstream_url(upstream):
            raise ConfigError(f"SGLANG_API_BASE={upstream!r} must be an http:// or https:// URL, "
                              f"like {DEFAULT_UPSTREAM}")
        level = text("LOG_LEVEL", defaults.log_level).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL={level!r} must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        port = number("PROXY_PORT", defaults.port)
        if port != int(port) or not 0 < port < 65536:
            raise ConfigError(f"PROXY_PORT={env.get('PROXY_PORT')!r} must be a port number")
        return cls(
            upstream=upstream,
            host=text("PROXY_HOST", defaults.host),
            port=int(port),
            log_level=level,
            log_file=text("LOG_FILE", defaults.log_file),
            file_logging=flag("ENABLE_FILE_LOGGING", defaults.file_logging),
            log_max_bytes=int(number("LOG_MAX_BYTES", defaults.log_max_bytes, 1024)),
            log_backups=int(number("LOG_BACKUPS", defaults.log_backups)),
            forward_timeout=number("FORWARD_TIMEOUT", defaults.forward_timeout, 0.001),
            repair=flag("ENABLE_STREAMING_TOOL_PARSER", defaults.repair),
            heartbeat_interval=number("HEARTBEAT_INTERVAL", defaults.heartbeat_interval),
            max_body_mb=number("MAX_BODY_MB", defaults.max_body_mb, 0.001),
            max_bodies_mb=number("MAX_BODIES_MB", defaults.max_bodies_mb, 0.001),
            body_timeout=number("BODY_TIMEOUT", defaults.body_timeout, 0.001),
            api_keys=parse_api_keys(env.get("PROXY_API_KEY", "")),
            upstream_api_key=env.get("UPSTREAM_API_KEY", "").strip(),
            upstream_credentials=credentials,
            allowed_hosts=tuple(h.strip().lower() for h in env.get("ALLOWED_HOSTS", "").split(",") if h.strip()),
            shutdown_grace=number("SHUTDOWN_GRACE", defaults.shutdown_grace),
            restore_reasoning=flag("RESTORE_REASONING", defaults.restore_reasoning),
            reasoning_store=text("REASONING_STORE", defaults.reasoning_store),
            reasoning_max_entries=int(number("REASONING_MAX_ENTRIES", defaults.reasoning_max_entries, 1)),
            reasoning_max_mb=number("REASONING_MAX_MB", defaults.reasoning_max_mb, 0.001),
            reasoning_max_hours=number("REASONING_MAX_HOURS", defaults.reasoning_max_hours, 0.001),
            capture_dir=text("CAPTURE_DIR", defaults.capture_dir),
            capture_max_files=int(number("CAPTURE_MAX_FILES", defaults.capture_max_files, 1)),
            capture_max_mb=number("CAPTURE_MAX_MB", defaults.capture_max_mb, 0.001),
            config_file=text("KIMIPROXY_CONFIG", defaults.config_file),
        )


def read_dotenv(paths: Iterable[Path]) -> dict[str, str]:
    """KEY=VALUE lines from the first .env file that exists (comments, quotes and "export " allowed).
    Variables already in the environment win, as with every dotenv tool."""
    for path in paths:
        if not path.is_file():
            continue
        values = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.removeprefix("export ").partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            else:
                value = value.split(" #", 1)[0].strip()
            values[key.strip()] = value
        return values
    return {}


def load_settings() -> Settings:
    dotenv = read_dotenv([Path.cwd() / ".env", Path(__file__).resolve().parent / ".env"])
    return Settings.from_env({**dotenv, **os.environ})


# The configuration file (KIMIPROXY_CONFIG, README: Several upstreams). JSON: the one structured format
# the standard library reads on every Python kimiproxy runs on (tomllib is 3.11+).
CONFIG_FIELDS = ("upstreams", "default_upstream", "models", "keys", "limits")
UPSTREAM_FIELDS = ("url", "api_key", "models")
MODEL_FIELDS = ("defaults", "overrides")
# A chat request's fields that a model's defaults and overrides may not set: kimiproxy reads them (the
# route, the stream flag, the history) or edits them itself (stream_options asks for the usage chunk).
UNSETTABLE_FIELDS = ("model", "messages", "stream", "stream_options")
MAX_CONFIG_BYTES = 1024 * 1024  # a configuration file larger than this is a mistake (a log, a dump)
_UPSTREAM_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # shown in the log, /health and /v1/models


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    """One upstream of the configuration file: where it is, its key, the model ids it serves."""
    name: str
    url: str  # the /v1 base URL, without credentials (what the log shows)
    api_key: str = ""  # sent instead of the client's key, as UPSTREAM_API_KEY is for the single upstream
    credentials: str = ""  # "user:password" from the URL's userinfo (never shown)
    models: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never print a key
        return f"UpstreamConfig(name={self.name!r}, url={self.url!r}, models={self.models!r})"


@dataclasses.dataclass(frozen=True)
class ModelFields:
    """A model's request fields: ``defaults`` go upstream where the client sent no such field,
    ``overrides`` go upstream whatever the client sent (replacing its value, or added)."""
    defaults: tuple[tuple[str, Any], ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class FileConfig:
    """The configuration file, validated: nothing in it can fail later."""
    path: str  # absolute: a reload reads the same file whatever the working directory
    upstreams: tuple[UpstreamConfig, ...]
    default_upstream: str | None = None  # takes the models no upstream lists, and the pass-through routes
    models: tuple[tuple[str, ModelFields], ...] = ()
    api_keys: tuple[tuple[str, str], ...] | None = None  # "keys": (name, key); None = PROXY_API_KEY's
    limits: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # "limits": name -> its fields (fair use)

    def __repr__(self) -> str:  # never print a key
        return f"FileConfig(path={self.path!r}, upstreams={self.upstreams!r})"


def _object(value: Any, where: str, fields: Iterable[str] | None = None) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a JSON object, not {type(value).__name__}")
    if fields is not None:
        for key in value:
            if key not in fields:
                raise ConfigError(f"{where}.{key}: unknown field (known: {', '.join(fields)})")
    return value


def _config_upstream(name: str, entry: Any, where: str) -> UpstreamConfig:
    entry = _object(entry, where, UPSTREAM_FIELDS)
    if not _UPSTREAM_NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: an upstream's name is 1 to 64 letters, digits, '_', '.' or '-'")
    raw = entry.get("url")
    if not isinstance(raw, str):
        raise ConfigError(f"{where}.url: must be an http(s) URL, like {DEFAULT_UPSTREAM}")
    url, credentials = split_credentials(raw.strip().rstrip("/"))
    if not usable_upstream_url(url):
        raise ConfigError(f"{where}.url: must be an http(s) URL, like {DEFAULT_UPSTREAM}")
    api_key = entry.get("api_key", "")
    if not isinstance(api_key, str):
        raise ConfigError(f"{where}.api_key: must be a string")
    if credentials and api_key.strip():
        raise ConfigError(f"{where}: the url holds a user and password and api_key is set: give the upstream "
                          "one credential")
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{where}.models: must be a list of model ids (strings)")
    return UpstreamConfig(name, url, api_key.strip(), credentials, tuple(models))


def _config_fields(value: Any, where: str) -> tuple[tuple[str, Any], ...]:
    fields = _object(value, where)
    for key in fields:
        if key in UNSETTABLE_FIELDS:
            raise ConfigError(f"{where}.{key}: kimiproxy decides this field itself; it cannot be set per model")
    return tuple(fields.items())


# Fair use (README: Fair use): the limits one access key's requests are held to, per key name, in the
# file's "limits". Each limit is a positive whole number, or null for none.
LIMIT_NAMES = ("concurrent", "requests_per_minute", "tokens_per_minute", "tokens_per_day")
LIMIT_FIELDS = (*LIMIT_NAMES, "queue_seconds")
DEFAULT_LIMITS = "default"  # the entry that applies to every key, under each key's own entry
# A request over "concurrent" waits this long for one of its key's requests to end before its 429: an
# agent that fires a few calls at once gets them served in turn rather than failed.
DEFAULT_QUEUE_SECONDS = 10.0
# Nothing reaches the client while a request waits (the answer is decided before the response starts):
# past this, clients give up on their own (Node's 300 s without a byte is the longest we know).
MAX_QUEUE_SECONDS = 120.0


@dataclasses.dataclass(frozen=True)
class Limits:
    """One key's limits, ``None`` = none. Tokens are prompt plus completion tokens, from SGLang's usage."""
    concurrent: int | None = None  # requests in flight at once
    requests_per_minute: int | None = None  # requests admitted in the last 60 s, to the second
    tokens_per_minute: int | None = None  # tokens of the requests that ended in the last 60 s, to the second
    tokens_per_day: int | None = None  # ... in the last 24 hours, to the minute
    queue_seconds: float = DEFAULT_QUEUE_SECONDS  # how long a request over "concurrent" waits for a slot

    def __bool__(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMIT_NAMES)

    def shown(self) -> dict:
        return {name: getattr(self, name) for name in LIMIT_FIELDS}


def _config_limits(value: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """The file's "limits": name -> the fields its entry sets (a key's entry is laid over "default",
    field by field: limits_of). Which names are keys is checked where the keys are known (Routing)."""
    entries = []
    for name, entry in _object(value, "limits").items():
        where = f"limits.{name[:64]}"
        entry = _object(entry, where, LIMIT_FIELDS)
        for field, limit in entry.items():
            if field == "queue_seconds":
                if type(limit) not in (int, float) or not 0 <= limit <= MAX_QUEUE_SECONDS:
                    raise ConfigError(f"{where}.queue_seconds: must be a number of seconds from 0 to "
                                      f"{MAX_QUEUE_SECONDS:g}")
            elif limit is not None and (type(limit) is not int or limit < 1):
                raise ConfigError(f"{where}.{field}: must be a whole number >= 1, or null for no limit")
        entries.append((name, tuple(entry.items())))
    return tuple(entries)


def limits_of(entries: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...], name: str) -> Limits:
    """The limits of key ``name``: "default"'s fields, then its own entry's over them."""
    fields = dict(dict(entries).get(DEFAULT_LIMITS, ()))
    fields.update(dict(entries).get(name, ()))
    return Limits(**fields)


def _config_of(path: str, doc: Any) -> FileConfig:
    doc = _object(doc, "the file", CONFIG_FIELDS)
    entries = _object(doc.get("upstreams"), "upstreams")
    if not entries:
        raise ConfigError("upstreams: name at least one upstream")
    upstreams = tuple(_config_upstream(name, entry, f"upstreams.{name}") for name, entry in entries.items())
    default = doc.get("default_upstream")
    if default is not None and default not in entries:
        raise ConfigError(f"default_upstream: {str(default)[:64]!r} is not one of the upstreams "
                          f"({', '.join(entries)})")
    served: dict[str, str] = {}
    for upstream in upstreams:
        if not upstream.models and upstream.name != default:
            raise ConfigError(f"upstreams.{upstream.name}.models: list the model ids it serves (only the "
                              "default_upstream may list none)")
        for at, model in enumerate(upstream.models):
            if model in served:
                raise ConfigError(f"upstreams.{upstream.name}.models.{at}: {model[:64]!r} is served by "
                                  f"upstream {served[model]!r} already")
            served[model] = upstream.name
    models = []
    for model, entry in _object(doc.get("models", {}), "models").items():
        where = f"models.{model}"
        entry = _object(entry, where, MODEL_FIELDS)
        if model not in served:
            raise ConfigError(f"{where}: no upstream lists this model")
        fields = ModelFields(_config_fields(entry.get("defaults", {}), where + ".defaults"),
                             _config_fields(entry.get("overrides", {}), where + ".overrides"))
        both = {k for k, _ in fields.defaults} & {k for k, _ in fields.overrides}
        if both:
            raise ConfigError(f"{where}: {', '.join(sorted(both))} both a default and an override (an override "
                              "is always sent: keep one)")
        models.append((model, fields))
    api_keys = None
    if "keys" in doc:
        keys = _object(doc["keys"], "keys")
        for name, key in keys.items():
            if not _KEY_NAME_RE.fullmatch(name):
                raise ConfigError(f"keys.{name[:64]}: a key's name is 1 to 64 letters, digits, '_', '.' or '-'")
            if not isinstance(key, str) or not key.strip():
                raise ConfigError(f"keys.{name}: must be a non-empty string (the key)")
        if not keys:  # an empty object would otherwise turn the check off
            raise ConfigError("keys: holds no key: give at least one, or leave keys out (PROXY_API_KEY then "
                              "applies)")
        api_keys = tuple((name, key.strip()) for name, key in keys.items())
    limits = _config_limits(doc.get("limits", {}))
    return FileConfig(path, upstreams, default, tuple(models), api_keys, limits)


def load_config_file(path: str) -> FileConfig:
    """The configuration file at ``path``, validated, or ConfigError saying what is wrong and where
    (``/etc/kimiproxy.json: upstreams.small.url: must be an http(s) URL``), in one line."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB: not a configuration file")
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno} column {exc.colno}: not JSON: {exc.msg}") from None
    except ValueError as exc:  # not UTF-8
        raise ConfigError(f"{path}: not JSON: {exc}") from None
    try:
        return _config_of(path, doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# Logging: one logger, the request id on every line, secrets never written
# ---------------------------------------------------------------------------------------------------

# Control characters (C0, DEL, C1 with CSI, Unicode line breaks) in a log message: a client's path, model
# name or body could otherwise forge a log line of its own or drive a terminal that shows the log.
_UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """Text with every control character written as its escape (``\\x0a``): one record, one line."""
    return _UNPRINTABLE_RE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


class RequestIdFilter(logging.Filter):
    """Puts the request id on every record of the kimiproxy logger, whichever handler writes it, and
    makes its message printable: whatever a client wrote, a record stays one line (a traceback, which
    is the formatter's, keeps its own lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        message = record.getMessage()  # formatted once: the handlers then use it as it is
        record.msg, record.args = printable(message) if _UNPRINTABLE_RE.search(message) else message, ()
        return True


log.addFilter(RequestIdFilter())


class ColorFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m",
              "CRITICAL": "\033[1;31m"}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        color = self.COLORS.get(record.levelname)
        return f"{color}{line}\033[0m" if color else line


LOG_FORMAT = "%(asctime)s %(levelname)-7s [%(request_id)s] %(message)s"


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Log files created readable by their owner only (they hold previews of prompts and answers), and
    never opened through a symlink someone planted where the log goes."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def file_handler(settings: Settings) -> logging.Handler:
    """LOG_FILE, rotated at LOG_MAX_BYTES with LOG_BACKUPS old files kept."""
    try:
        handler = PrivateRotatingFileHandler(
            settings.log_file, maxBytes=settings.log_max_bytes, backupCount=settings.log_backups,
            encoding="utf-8")
    except OSError as exc:  # a symlink, a directory that is not there
        raise ConfigError(f"LOG_FILE={settings.log_file!r} cannot be opened: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    return handler


def setup_logging(settings: Settings) -> None:
    """Called by the entry points only (main(), or the app's start-up under hypercorn). Idempotent."""
    log.setLevel(settings.log_level)
    if getattr(log, "_kimiproxy_configured", False):
        return
    log._kimiproxy_configured = True  # type: ignore[attr-defined]
    log.propagate = False
    console = logging.StreamHandler(sys.stderr)
    formatter = ColorFormatter if sys.stderr.isatty() else logging.Formatter
    console.setFormatter(formatter(LOG_FORMAT))
    console.addFilter(RequestIdFilter())  # also for records of child loggers
    log.addHandler(console)
    if settings.file_logging:
        log.addHandler(file_handler(settings))


def redact_headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    out = {}
    for name, value in headers:
        key = name.decode("latin-1").lower()
        out[key] = "[redacted]" if key in SECRET_HEADERS else value.decode("latin-1")
    return out


def summarize_request(request: dict, size: int) -> str:
    messages = request.get("messages")
    tools = [t.get("function", {}).get("name") for t in request.get("tools") or ()
             if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    return (f"model={request.get('model')!r} stream={request.get('stream', False)} "
            f"messages={len(messages) if isinstance(messages, list) else '-'} "
            f"tools={tools} bytes={size}")


# ---------------------------------------------------------------------------------------------------
# Metrics: GET /metrics in Prometheus' text format, per process
# ---------------------------------------------------------------------------------------------------

TTFB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)  # seconds
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800)  # seconds
METRICS_HELP = {
    "kimiproxy_requests_total": ("counter", "Requests by route and response status (499: client left)"),
    "kimiproxy_streams_in_flight": ("gauge", "Streamed chat completions being relayed now"),
    "kimiproxy_upstream_errors_total": ("counter", "Upstream failures by kind (connect, timeout, "
                                                   "protocol, http) and HTTP status"),
    "kimiproxy_client_disconnects_total": ("counter", "Clients that left before their response was "
                                                      "complete, by whether the upstream was closed"),
    "kimiproxy_tool_calls_recovered_total": ("counter", "Tool calls recovered from leaked markup, by channel"),
    "kimiproxy_repairs_total": ("counter", "Repairs applied, by rule (failure family)"),
    "kimiproxy_key_requests_total": ("counter", "Requests by access key name (PROXY_API_KEY)"),
    "kimiproxy_key_tokens_total": ("counter", "Prompt and completion tokens, from the upstream's usage, by key name"),
    "kimiproxy_key_repairs_total": ("counter", "Repairs applied to the responses of each key name"),
    "kimiproxy_key_refused_total": ("counter", "Requests refused with a 429, by key name and the limit it was over"),
    "kimiproxy_reasoning_restored_total": ("counter", "Assistant turns whose dropped reasoning was put back"),
    "kimiproxy_reasoning_missed_total": ("counter", "Assistant turns without reasoning that the store did not have"),
    "kimiproxy_upstream_first_byte_seconds": ("histogram", "Time from request to the upstream's response headers"),
    "kimiproxy_request_duration_seconds": ("histogram", "Time from request to the end of the response, by route"),
}


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


class Metrics:
    """Counters for the life of the process. Scraping renders a few dozen lines: cheap. Under
    ``hypercorn -w N`` each worker process has its own (a scrape reaches one worker)."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter[tuple[tuple[str, str], ...]]] = {
            name: Counter() for name, (kind, _) in METRICS_HELP.items() if kind == "counter"}
        self.streams_in_flight = 0
        self.histograms: dict[str, dict[tuple, list[float]]] = {
            "kimiproxy_upstream_first_byte_seconds": {}, "kimiproxy_request_duration_seconds": {}}
        self._buckets = {"kimiproxy_upstream_first_byte_seconds": TTFB_BUCKETS,
                         "kimiproxy_request_duration_seconds": DURATION_BUCKETS}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        self.counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = self._buckets[name]
        key = tuple(sorted(labels.items()))
        series = self.histograms[name].get(key)
        if series is None:
            series = self.histograms[name][key] = [0.0] * (len(buckets) + 2)  # buckets, sum, count
        for i, bound in enumerate(buckets):
            if value <= bound:
                series[i] += 1
        series[-2] += value
        series[-1] += 1

    def render(self) -> str:
        lines = []
        for name, (kind, text) in METRICS_HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                for labels, value in sorted(self.counters[name].items()):
                    lines.append(f"{name}{_labels(labels)} {value:.15g}")  # token counts: every digit
            elif kind == "gauge":
                lines.append(f"{name} {self.streams_in_flight}")
            else:
                for labels, series in sorted(self.histograms[name].items()):
                    for bound, count in zip(self._buckets[name], series):
                        lines.append(f"{name}_bucket{_labels(labels + (('le', f'{bound:g}'),))} {count:g}")
                    lines.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {series[-1]:g}")
                    lines.append(f"{name}_sum{_labels(labels)} {series[-2]:.6f}")
                    lines.append(f"{name}_count{_labels(labels)} {series[-1]:g}")
        return "\n".join(lines) + "\n"


def route_label(path: str) -> str:
    """A bounded set of route labels: the known routes, else the first path segments."""
    if path in CHAT_PATHS or path in MESSAGES_PATHS or path in ("/v1/models", "/v1/completions", "/v1/embeddings"):
        return path
    return "/v1/other" if path.startswith("/v1/") else "other"


# ---------------------------------------------------------------------------------------------------
# The client edge: what a request must be, and what kimiproxy writes anew of it
# ---------------------------------------------------------------------------------------------------

# A path segment as RFC 3986 allows it (pchar), percent-escapes included; one trailing slash allowed.
_RAW_PATH_RE = re.compile(rb"(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+)+/?")
_UNSAFE_SEGMENT_RE = re.compile(rb"[\x00-\x1f\x7f/\\]")  # in a segment once decoded


def checked_path(scope: dict) -> bytes:
    """The path a proxied request goes upstream with: the raw path the client sent, if it stays under
    the route it names. SGLang serves its admin routes (/shutdown, /update_weights_from_disk,
    /abort_request...) beside /v1, and httpx resolves dot segments in a URL, so ``/v1/../shutdown``
    would reach them: a path with an empty segment, a "." or ".." segment in any spelling (``%2e``), a
    slash or backslash inside a segment (``%2f``, ``%5c``, ``\\``) or a control character is refused,
    before any upstream connection. ``Upstream.request`` checks that httpx sends exactly this path."""
    raw = scope.get("raw_path") or urllib.parse.quote(scope["path"]).encode()
    refused = ClientError("the request path must not hold empty, '.' or '..' segments (in any spelling), "
                          "encoded slashes, backslashes or control characters", 400)
    if not _RAW_PATH_RE.fullmatch(raw):
        raise refused
    for segment in raw.strip(b"/").split(b"/"):
        decoded = urllib.parse.unquote_to_bytes(segment)
        if decoded in (b".", b"..") or _UNSAFE_SEGMENT_RE.search(decoded) or \
                _UNPRINTABLE_RE.search(decoded.decode("utf-8", "replace")):  # C1, U+2028 as UTF-8 too
            raise refused
    return raw


def require_json(scope: dict) -> None:
    """A POST to a proxied route must say its body is JSON (application/json, or a +json type). A web
    page on another site can send a POST without asking first (a CORS preflight, which kimiproxy never
    grants) only as a form, multipart or text/plain, or with no content type: none of them gets here,
    so no page a user visits can spend the GPU through an anonymous kimiproxy on their machine."""
    content_type = next((v for k, v in scope["headers"] if k.lower() == b"content-type"), b"")
    media = content_type.split(b";", 1)[0].strip().lower()
    if media != b"application/json" and not (media.startswith(b"application/") and media.endswith(b"+json")):
        sent = f"not {content_type.decode('latin-1')!r}" if content_type else "none was sent"
        raise ClientError(f"Content-Type must be application/json ({sent})", 415)


def parse_json_request(scope: dict, body: bytes) -> dict:
    """A request body as a JSON object, within the bounds a worker can parse (MAX_REQUEST_VALUES)."""
    require_json(scope)
    for name, value in scope["headers"]:
        if name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise ClientError("compressed request bodies are not supported", 415)
    if len(body) > 2 * MAX_REQUEST_VALUES and len(body) - len(body.translate(None, _VALUE_BYTES)) > MAX_REQUEST_VALUES:
        raise ClientError(f"request body holds more than {MAX_REQUEST_VALUES} JSON values", 413)
    try:
        request = json_loads(body)
    except (ValueError, RecursionError) as exc:
        raise ClientError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ClientError(f"request body must be a JSON object, not {type(request).__name__}")
    return request


def parse_chat_request(scope: dict, body: bytes) -> dict:
    """A chat completion request, with the checks that give a clear 4xx instead of an upstream 500."""
    request = parse_json_request(scope, body)
    if not isinstance(request.get("messages"), list):
        raise ClientError("'messages' must be a list of messages")
    if len(request["messages"]) > MAX_REQUEST_MESSAGES:
        raise ClientError(f"request holds more than {MAX_REQUEST_MESSAGES} messages", 413)
    if "stream" in request and not isinstance(request["stream"], bool) and request["stream"] is not None:
        raise ClientError("'stream' must be true or false")
    if "tools" in request and not isinstance(request["tools"], (list, type(None))):
        raise ClientError("'tools' must be a list")
    return request


def _usage_asked(request: dict) -> bool:
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage_option(request: dict) -> list[tuple[tuple, Any]]:
    """The edit that asks the upstream for the stream's usage chunk (tokens are counted per key); the
    client, which did not ask, does not get it. None when stream_options is not an object: SGLang says
    what is wrong with it."""
    options = request.get("stream_options", None)
    if isinstance(options, dict) or options is None:
        return [(("stream_options",), {**(options or {}), "include_usage": True})]
    return []


def canonicalize_history(request: dict) -> list[tuple[tuple, Any]]:
    """REPAIR.md 4.13: tool-call ids in the history that are not canonical (``call_abc``, ``toolu_1``), or
    that an earlier call already holds, become ``functions.NAME:COUNTER`` with the dialog-wide counter,
    and the tool results' ``tool_call_id`` with them, so the model keeps seeing its own id format.
    Returns the edits it made, each (its path in the request, the new value), for ``rewrite_request``
    (none: the request is untouched)."""
    messages = request.get("messages")
    counter = 0
    edits: list[tuple[tuple, Any]] = []
    used: set[str] = set()
    mapping: dict[str, str] = {}  # the latest assistant turn's id for each id as sent
    for at, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict):
            continue
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if not isinstance(call, dict):
                    continue
                function = call.get("function") if isinstance(call.get("function"), dict) else {}
                name, old = function.get("name"), call.get("id")
                canonical = CANONICAL_ID_RE.fullmatch(old) if isinstance(old, str) else None
                new = old
                if isinstance(name, str) and not (canonical and canonical[1] == name and old not in used):
                    while (new := f"functions.{name}:{counter}") in used:
                        counter += 1
                    call["id"] = new
                    edits.append((("messages", at, "tool_calls", position, "id"), new))
                if isinstance(old, str):
                    mapping[old] = new
                if isinstance(new, str):
                    used.add(new)
                counter += 1
        elif message.get("role") == "tool" and isinstance(message.get("tool_call_id"), str) \
                and mapping.get(message["tool_call_id"], message["tool_call_id"]) != message["tool_call_id"]:
            message["tool_call_id"] = mapping[message["tool_call_id"]]
            edits.append((("messages", at, "tool_call_id"), message["tool_call_id"]))
    return edits


_JSON_SPACE_RE = re.compile(r"[ \t\n\r]*")
_scan_value = json.JSONDecoder().scan_once  # (text, index) -> (value, end): the stdlib's own C scanner


def _members(text: str, i: int, inner: str | None = None) -> tuple[list[tuple[Any, int, int]], list]:
    """The (key, start, end) of each member of the JSON object at text[i], or (index, start, end) of
    each element of the array there; with ``inner``, the elements of that member's array too (walked
    once, not scanned twice). ValueError or IndexError where the text is not what it should be."""
    closing = {"{": "}", "[": "]"}[text[i]]
    found: list[tuple[Any, int, int]] = []
    items: list = []
    i = _JSON_SPACE_RE.match(text, i + 1).end()
    while text[i] != closing:
        if found:
            if text[i] != ",":
                raise ValueError("no ',' between members")
            i = _JSON_SPACE_RE.match(text, i + 1).end()
        key: Any = len(found)
        if closing == "}":
            if text[i] != '"':
                raise ValueError("not a JSON object key")
            key, i = json.decoder.scanstring(text, i + 1)
            i = _JSON_SPACE_RE.match(text, i).end()
            if text[i] != ":":
                raise ValueError("no ':' after a key")
            i = _JSON_SPACE_RE.match(text, i + 1).end()
        if key == inner and text[i] == "[":
            items, _ = _members(text, i)
            end = _JSON_SPACE_RE.match(text, items[-1][2] if items else i + 1).end() + 1
        else:
            _, end = _scan_value(text, i)
        found.append((key, i, end))
        i = _JSON_SPACE_RE.match(text, end).end()
    return found, items


class _Places:
    """Where each value of a JSON text is, found as the edits need them: each container's members
    are walked once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.top = _JSON_SPACE_RE.match(text).end()
        self._seen: dict[int, list] = {}

    def _of(self, start: int) -> list[tuple[Any, int, int]]:
        if start not in self._seen:
            found, items = _members(self.text, start, "messages" if start == self.top else None)
            self._seen[start] = found
            messages = [a for key, a, _ in found if key == "messages"]
            if messages and self.text[messages[-1]] == "[":  # walked on the way: the last one, as parsed
                self._seen[messages[-1]] = items
        return self._seen[start]

    def edit(self, path: tuple, value: Any) -> tuple[int, int, str]:
        """(start, end, new text) that gives the value at ``path`` the new value; a member missing from
        its object is added first in it."""
        start = self.top
        for depth, step in enumerate(path):
            members = self._of(start)
            place = next((m for m in reversed(members) if m[0] == step), None)  # the last of a repeated key
            if place is None:
                if depth < len(path) - 1 or not isinstance(step, str) or self.text[start] != "{":
                    raise KeyError(step)
                new = json_dumps_compact(step).decode() + ":" + json_dumps_compact(value).decode()
                return start + 1, start + 1, new + ("," if members else "")
            start = place[1]
        return place[1], place[2], json_dumps_compact(value).decode()


def rewrite_request(body: bytes, request: dict, edits: list[tuple[tuple, Any]]) -> bytes:
    """The body for the upstream with kimiproxy's edits (each a path from the top of the request and
    its new value: a restored reasoning, a history id, the usage option) written in place, and nothing
    else written anew: every other byte is the client's, so what kimiproxy does not mean to change
    arrives as sent (a 30-digit seed, 1e999, any nesting), in the body's own encoding. A body that
    cannot be walked (nested past what the stdlib's scanner reads) goes as it came, unedited."""
    if not edits:
        return body
    start = len(body) - len(body.lstrip())
    if all(len(path) == 1 and path[0] not in request for path, _ in edits) and body[start:start + 1] == b"{" \
            and body[start + 1:start + 2] != b"\x00":  # new top-level members only, in UTF-8: no walk needed
        added = b"".join(json_dumps_compact(path[0]) + b":" + json_dumps_compact(value) + b"," for path, value in edits)
        return body[:start + 1] + added + body[start + 1:]
    try:
        encoding = json.detect_encoding(body)
        text = body.decode(encoding)
        places = _Places(text)
        spliced = sorted(places.edit(path, value) for path, value in edits)
    except (UnicodeError, ValueError, IndexError, KeyError, TypeError, RecursionError) as exc:
        log.warning("request not rewritten (%s: %s): sent upstream as it came", type(exc).__name__, exc)
        return body
    out, pos = [], 0
    for a, b, new in spliced:
        out += [text[pos:a], new]
        pos = b
    out.append(text[pos:])
    return "".join(out).encode(encoding)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # 1 is not 1.0, nor True: such a value is sent as configured


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def apply_model_fields(request: dict, fields: ModelFields) -> tuple[list[tuple[tuple, Any]], str]:
    """A model's defaults (for fields the client did not send) and overrides (whatever it sent) applied
    to a chat request, in place; returns the edits for ``rewrite_request`` and what changed, for the
    log (``defaults: temperature=1.0; overrides: max_tokens 100->32000``). A field that already has
    its value is no edit: a request that needs none goes upstream byte for byte."""
    edits: list[tuple[tuple, Any]] = []
    defaults, overrides = [], []
    for key, value in fields.defaults:
        if key not in request:
            request[key] = value
            edits.append(((key,), value))
            defaults.append(f"{key}={_shown(value)}")
    for key, value in fields.overrides:
        if key in request and _same(request[key], value):
            continue
        overrides.append(f"{key} {_shown(request[key])}->{_shown(value)}" if key in request else f"{key}={_shown(value)}")
        request[key] = value
        edits.append(((key,), value))
    said = ([f"defaults: {', '.join(defaults)}"] if defaults else []) + \
        ([f"overrides: {', '.join(overrides)}"] if overrides else [])
    return edits, "; ".join(said)


# ---------------------------------------------------------------------------------------------------
# The client protocols: OpenAI's chat completions and Anthropic's Messages, each an encoder at the edge
# ---------------------------------------------------------------------------------------------------

class OpenAIChat:
    """The protocol of /v1/chat/completions, which SGLang speaks too: the request goes upstream as it
    came (less kimiproxy's edits), a stream's events go out as StreamRepair writes them, and errors are
    OpenAI's ``{"error": {...}}``. One per exchange, like AnthropicMessages."""

    name = "openai"
    objects_only = False  # a call's arguments may be any JSON, or text (RepairContext.objects_only)
    heartbeat = HEARTBEAT_FRAME
    counting = False  # a token count, not a completion (AnthropicMessages: count_tokens)

    def parse(self, scope: dict, body: bytes) -> dict:
        return parse_chat_request(scope, body)

    def upstream_target(self, target: bytes, query: bytes) -> tuple[bytes, bytes]:
        return target, query

    def upstream_body(self, body: bytes, sent: dict, request: dict, edits: list[tuple[tuple, Any]]) -> bytes:
        """The client's body with the edits written in (``sent``: the request as the client sent it, whose
        top-level fields say which edits add a field)."""
        return rewrite_request(body, sent, edits) if edits else body

    def error(self, err: ProxyError) -> tuple[int, dict]:
        return err.status, err.body()

    def error_frame(self, payload: dict) -> bytes:
        """An error inside the event stream: a data event, which the OpenAI SDKs raise."""
        return b"data: " + json_dumps_compact(payload) + b"\n\n"

    def stream(self, ctx: RepairContext, pass_usage: bool) -> Any:
        return StreamRepair(ctx, pass_usage=pass_usage)

    def opening(self) -> bytes:
        """What a stream starts with, before anything of the upstream's: nothing, in OpenAI's protocol."""
        return b""

    def broken_off(self, repair: Any) -> list[bytes]:
        """What ends a stream whose upstream broke off, before the error: the held text and calls, no [DONE]."""
        return repair.close()[:-1]

    def reply(self, completion: Any, changed: bool, data: bytes) -> bytes:
        """A whole response's body: the very bytes that came, unless the repair changed them."""
        return json_dumps_compact(completion) if changed else data


# Anthropic's error types by HTTP status (docs.anthropic.com, "Errors"); an overloaded upstream or a
# busy kimiproxy (503) is Anthropic's 529, which its SDKs and Claude Code retry.
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 504: "timeout_error", 529: "overloaded_error"}
ANTHROPIC_STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens", "stop": "end_turn"}
ANTHROPIC_PING_FRAME = b'event: ping\ndata: {"type":"ping"}\n\n'
ANTHROPIC_TOOL_ID_PREFIX = "toolu_"
# Anthropic's clients send a thinking block back with its signature; kimiproxy has nothing to sign
# with (its thinking blocks are the model's reasoning, put back as reasoning_content) and says so.
ANTHROPIC_SIGNATURE = "kimiproxy-unsigned"
CHARS_PER_TOKEN_ESTIMATE = 4  # count_tokens without the upstream's tokenizer: an estimate, said as one
_TOOL_USE_ID_RE = re.compile(r"[A-Za-z0-9_-]+")


def anthropic_error(status: int, message: str) -> tuple[int, dict]:
    """(status, body) of an error in Anthropic's shape: a 503 is Anthropic's 529 (overloaded)."""
    status = 529 if status == 503 else status
    kind = ANTHROPIC_ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def tool_use_id(call_id: str) -> str:
    """A call's id as Anthropic's clients get it: its pattern is ``^[a-zA-Z0-9_-]+$`` (gateways and
    some clients enforce it), which ``functions.NAME:IDX`` is not. base64url of the id, after a prefix:
    reversible, so the history SGLang sees has the model's own ids back (``call_id_of``)."""
    if _TOOL_USE_ID_RE.fullmatch(call_id) and not call_id.startswith(ANTHROPIC_TOOL_ID_PREFIX):
        return call_id
    return ANTHROPIC_TOOL_ID_PREFIX + base64.urlsafe_b64encode(call_id.encode()).decode().rstrip("=")


def call_id_of(tool_id: Any) -> Any:
    """The id kimiproxy gave a call, from the ``tool_use`` id a client sent back; any other id as it came
    (``canonicalize_history`` gives it a canonical one)."""
    if not isinstance(tool_id, str) or not tool_id.startswith(ANTHROPIC_TOOL_ID_PREFIX):
        return tool_id
    encoded = tool_id[len(ANTHROPIC_TOOL_ID_PREFIX):]
    try:
        decoded = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are both ValueErrors
        return tool_id
    return decoded if CANONICAL_ID_RE.fullmatch(decoded) else tool_id


def _text_of_blocks(value: Any, where: str) -> str:
    """A ``system`` or tool result: a string, or text blocks (``cache_control`` and other fields ignored)."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise ClientError(f"{where}: a string or a list of text blocks")
    return "\n".join(block["text"] for block in value if isinstance(block, dict) and isinstance(block.get("text"), str))


def _image_part(block: dict, where: str) -> dict:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        url = f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise ClientError(f"{where}.source: a base64 or url image source")
    return {"type": "image_url", "image_url": {"url": url}}


def _user_turn(blocks: list, where: str, out: list[dict]) -> None:
    """A user turn's blocks: each tool_result a tool message (in place: text before it stays before it),
    text and images a user message."""
    parts: list[dict] = []

    def flush() -> None:
        if parts:
            only_text = len(parts) == 1 and parts[0]["type"] == "text"
            out.append({"role": "user", "content": parts[0]["text"] if only_text else list(parts)})
            parts.clear()

    for at, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_part(block, f"{where}.{at}"))
        elif kind == "tool_result":
            flush()
            content = block.get("content")
            images = [_image_part(b, f"{where}.{at}.content") for b in content
                      if isinstance(b, dict) and b.get("type") == "image"] if isinstance(content, list) else []
            text = _text_of_blocks(content, f"{where}.{at}.content")
            out.append({"role": "tool", "tool_call_id": call_id_of(block.get("tool_use_id")),
                        "content": [{"type": "text", "text": text}, *images] if images else text})
        elif kind is None:
            raise ClientError(f"{where}.{at}: a content block is an object with a type")
    flush()


def _assistant_turn(blocks: list, where: str) -> dict:
    """An assistant turn's blocks: text to content, thinking to reasoning_content (what K2-Thinking's
    template renders as the turn's thinking; never folded into the text), tool_use to tool_calls with
    the ids kimiproxy gave them; redacted_thinking is dropped (nothing here can read it)."""
    text, thinking, calls = [], [], []
    for at, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str):
                raise ClientError(f"{where}.{at}.name: a string is required")
            calls.append({"id": call_id_of(block.get("id")), "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        elif kind is None:
            raise ClientError(f"{where}.{at}: a content block is an object with a type")
    message: dict = {"role": "assistant", "content": "".join(text)}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """Anthropic's tool_choice as OpenAI's, and parallel_tool_calls (None: not said)."""
    if not isinstance(choice, dict):
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") is True else None
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    return ("none" if kind == "none" else "auto"), parallel


def chat_request_of_messages(request: dict, counting: bool = False) -> dict:
    """An Anthropic Messages request as the chat completion request SGLang serves, so the whole repair
    applies. What the Messages API requires is required (model, messages, max_tokens); fields and block
    types kimiproxy has no use for are ignored, as Anthropic's API ignores betas it does not know.
    ``thinking`` and ``output_config`` are accepted: K2-Thinking always thinks. ``counting``: for
    count_tokens, which takes no max_tokens."""
    model, messages, max_tokens = request.get("model"), request.get("messages"), request.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise ClientError("model: a string is required")
    if not isinstance(messages, list):
        raise ClientError("messages: a list of messages is required")
    if len(messages) > MAX_REQUEST_MESSAGES:
        raise ClientError(f"request holds more than {MAX_REQUEST_MESSAGES} messages", 413)
    if not (counting and max_tokens is None) and (type(max_tokens) is not int or max_tokens < 1):
        raise ClientError("max_tokens: a positive integer is required")
    if "stream" in request and not isinstance(request["stream"], (bool, type(None))):
        raise ClientError("stream: true or false")
    chat: list[dict] = []
    if system := _text_of_blocks(request.get("system"), "system"):
        chat.append({"role": "system", "content": system})
    for at, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise ClientError(f"messages.{at}.content: a string or a list of content blocks")
        if role == "user":
            _user_turn(blocks, f"messages.{at}.content", chat)
        elif role == "assistant":
            chat.append(_assistant_turn(blocks, f"messages.{at}.content"))
        elif role == "system":  # Claude Code sends its environment so; kept where it stands
            chat.append({"role": "system", "content": _text_of_blocks(blocks, f"messages.{at}.content")})
        else:
            raise ClientError(f"messages.{at}.role: 'user' or 'assistant', not {str(role)[:40]!r}")
    out: dict = {"model": model, "messages": chat, "max_tokens": max_tokens, "stream": request.get("stream") is True}
    if out["stream"]:
        out["stream_options"] = {"include_usage": True}
    tools = [{"type": "function", "function": {"name": tool["name"], "description": tool.get("description") or "",
                                               "parameters": tool["input_schema"]}}
             for tool in request.get("tools") or () if isinstance(tool, dict) and isinstance(tool.get("name"), str)
             and isinstance(tool.get("input_schema"), dict)]  # Anthropic's server tools have no schema: not ours
    if tools:
        out["tools"] = tools
        out["tool_choice"], parallel = _tool_choice(request.get("tool_choice"))
        if out["tool_choice"] is None:
            out["tool_choice"] = "auto"
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    for name, value in (("temperature", request.get("temperature")), ("top_p", request.get("top_p")),
                        ("top_k", request.get("top_k")), ("stop", request.get("stop_sequences"))):
        if value is not None:
            out[name] = value
    metadata = request.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    return out


def _anthropic_usage(usage: Any) -> dict:
    """SGLang's token counts as Anthropic's: input without what the prefix cache held, which is counted apart."""
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    cached = details.get("cached_tokens") if type(details.get("cached_tokens")) is int else 0
    out = {"input_tokens": max(prompt - cached, 0) if type(prompt) is int else 0,
           "output_tokens": completion if type(completion) is int else 0}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _stop(finish: str | None, matched: Any, stops: Any) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). SGLang says which stop string ended the text in ``matched_stop``."""
    if finish == "stop" and isinstance(matched, str) and isinstance(stops, list) and matched in stops:
        return "stop_sequence", matched
    return ANTHROPIC_STOP_REASONS.get(finish or "stop", "end_turn"), None


def _tool_input(arguments: str) -> dict:
    value = _load_lenient(arguments)
    return value if isinstance(value, dict) else {}


def _event(kind: str, payload: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json_dumps_compact(payload) + b"\n\n"


def message_start(message_id: str, model: str) -> bytes:
    """The Messages stream's first event: it owes nothing to SGLang, so it goes out when the stream does."""
    return _event("message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})


class AnthropicStream:
    """The repair's events as Anthropic's Messages stream: ``message_start`` (``opening``), content
    blocks one after another (``thinking`` with its ``thinking_delta``s and a ``signature_delta``,
    ``text``, ``tool_use`` with ``input_json_delta``s as the model writes the arguments), then
    ``message_delta`` (stop reason, usage) and ``message_stop``. The same face to the exchange as
    StreamRepair: ``feed(data)`` per upstream event, ``close()``, and the choice's repair and finish."""

    def __init__(self, ctx: RepairContext, message_id: str, model: str, stops: Any) -> None:
        self.repair = ChoiceRepair(ctx)
        self.choices = {0: self.repair}  # Anthropic's Messages have one choice
        self.finish: dict[int, str | None] = {}
        self.usage: Any = None
        self.skipped = 0
        self.done = False
        self._id, self._model, self._stops = message_id, model, stops
        self._matched: Any = None  # SGLang's matched_stop
        self._block = -1  # the open content block's index
        self._kind: Any = None  # what it holds: "thinking", "text", or a call's index
        self._space = ""  # whitespace while no block of its kind is open: it opens none on its own
        self._tools: dict[int, int] = {}  # a call's index -> its block's
        self._held: list[Text] = []  # text that came while a tool_use block's input is incomplete

    def opening(self) -> bytes:
        return message_start(self._id, self._model)

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            return []
        if data == b"[DONE]":
            return self._end()
        try:
            chunk = json_loads(data)
        except (ValueError, RecursionError):
            chunk = None
        if not isinstance(chunk, dict):
            self.skipped += 1
            return []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        frames: list[bytes] = []
        choices = chunk.get("choices")
        failed = chunk.get("error") if isinstance(chunk.get("error"), dict) else chunk if chunk.get("object") == "error" \
            else None
        if failed is not None and not choices:  # SGLang's error event mid-stream: the end, as Anthropic says it
            code = failed.get("code")
            _, body = anthropic_error(code if type(code) is int and 400 <= code < 600 else 500,
                                      str(failed.get("message") or "upstream error"))
            return self.broken_off() + [_event("error", body)]
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0 or 0 in self.finish:
                continue
            delta = choice.get("delta") if type(choice.get("delta")) is dict else {}
            reasoning, content, calls = reasoning_keys(delta)[0], delta.get("content"), delta.get("tool_calls")
            content, calls = _str(content), calls if type(calls) is list else None
            events = self.repair.feed(reasoning, content, calls) if reasoning or content or calls else []
            finish = choice.get("finish_reason")
            if finish is not None:
                events += self.repair.finish()
                self.finish[0] = self.repair.finish_reason(finish if isinstance(finish, str) else "stop")
                self._matched = choice.get("matched_stop")
            self._encode(events, frames)
        return frames

    def close(self) -> list[bytes]:
        return [] if self.done else self._end()

    def broken_off(self) -> list[bytes]:
        """The upstream broke off: what was held, its blocks closed, and no message_delta (an error follows)."""
        frames: list[bytes] = []
        if 0 not in self.finish:
            self._encode(self.repair.finish(), frames)
            self.finish[0] = self.repair.finish_reason(None)
        self._release(frames)
        self._close_block(frames)
        self.done = True
        return frames

    def _end(self) -> list[bytes]:
        frames = [] if self.done else self.broken_off()
        reason, sequence = _stop(self.finish.get(0) or "stop", self._matched, self._stops)
        frames.append(_event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": reason, "stop_sequence": sequence}, "usage": _anthropic_usage(self.usage)}))
        frames.append(_event("message_stop", {"type": "message_stop"}))
        return frames

    def _encode(self, events: list, frames: list[bytes]) -> None:
        for event in events:
            if type(event) is Text:
                if type(self._kind) is int:  # blocks come one after another: text that the repair gives
                    self._held.append(event)  # while a call's input streams (engines that interleave) waits
                    continue
                kind = "thinking" if event.channel == "reasoning" else "text"
                text = event.text
                if self._kind != kind:
                    if not text.strip():  # between blocks: no block of its own
                        self._space += text
                        continue
                    text, self._space = self._space + text, ""
                    self._open(kind, {"type": kind, kind: ""} | ({"signature": ""} if kind == "thinking" else {}),
                               frames)
                delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else \
                    {"type": "text_delta", "text": text}
                frames.append(_event("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                             "delta": delta}))
                continue
            if event.id is not None:  # a call's first delta: its block starts, name before arguments
                self._release(frames)  # (the call before it has ended: the repair sends one at a time)
                self._space = ""
                self._open(event.index, {"type": "tool_use", "id": tool_use_id(event.id), "name": event.name,
                                         "input": {}}, frames)
                self._tools[event.index] = self._block
            if event.arguments:
                frames.append(_event("content_block_delta", {
                    "type": "content_block_delta", "index": self._tools[event.index],
                    "delta": {"type": "input_json_delta", "partial_json": event.arguments}}))
        if type(self._kind) is int and self.repair.sent[self._kind].canonical is not None:  # its input is whole:
            self._release(frames)  # the block stops now, not when the next begins (Claude Code runs a tool
            self._close_block(frames)  # as soon as its block stops)

    def _release(self, frames: list[bytes]) -> None:
        """The tool_use block ends: the text that waited for it follows."""
        if self._held:
            self._close_block(frames)
            held, self._held = self._held, []
            self._encode(held, frames)

    def _open(self, kind: Any, block: dict, frames: list[bytes]) -> None:
        self._close_block(frames)
        self._block += 1
        self._kind = kind
        frames.append(_event("content_block_start", {"type": "content_block_start", "index": self._block,
                                                     "content_block": block}))

    def _close_block(self, frames: list[bytes]) -> None:
        if self._kind is None:
            return
        if self._kind == "thinking":
            frames.append(_event("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                         "delta": {"type": "signature_delta",
                                                                   "signature": ANTHROPIC_SIGNATURE}}))
        frames.append(_event("content_block_stop", {"type": "content_block_stop", "index": self._block}))
        self._kind = None


def message_of_completion(completion: dict, message_id: str, model: str, stops: Any) -> dict:
    """A repaired whole chat completion as Anthropic's ``message`` object (its first choice)."""
    choice, message = next(_choices(completion), ({}, {}))
    blocks: list[dict] = []
    if reasoning := reasoning_keys(message)[0]:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ANTHROPIC_SIGNATURE})
    content = message.get("content")
    if isinstance(content, str) and content.strip():
        blocks.append({"type": "text", "text": content})
    for call_id, name, arguments in _call_tuples(message.get("tool_calls")):
        blocks.append({"type": "tool_use", "id": tool_use_id(str(call_id)), "name": name,
                       "input": _tool_input(arguments if isinstance(arguments, str) else "")})
    reason, sequence = _stop(_str(choice.get("finish_reason")), choice.get("matched_stop"), stops)
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": reason, "stop_sequence": sequence, "usage": _anthropic_usage(completion.get("usage"))}


class AnthropicMessages:
    """The protocol of POST /v1/messages (and /v1/messages/count_tokens): the request is translated to a
    chat completion request for SGLang's /v1/chat/completions (``chat_request_of_messages``), repaired
    as every chat completion is, and encoded back as the Messages stream or message; errors are
    Anthropic's ``{"type": "error", "error": {...}}``, with its statuses and types."""

    name = "anthropic"
    objects_only = True  # a tool_use input is an object
    heartbeat = ANTHROPIC_PING_FRAME

    def __init__(self, message_id: str, counting: bool = False) -> None:
        self.id = "msg_" + re.sub(r"[^A-Za-z0-9_-]", "_", message_id)
        self.counting = counting
        self.model = ""
        self.stops: Any = None

    def parse(self, scope: dict, body: bytes) -> dict:
        if scope["method"] != "POST":
            raise ClientError(f"{scope['path']} takes POST", 405)
        request = chat_request_of_messages(parse_json_request(scope, body), self.counting)
        self.model, self.stops = request["model"], request.get("stop")
        return request

    def upstream_target(self, target: bytes, query: bytes) -> tuple[bytes, bytes]:
        return b"/v1/chat/completions", b""  # ?beta=true is Anthropic's, not SGLang's

    def upstream_body(self, body: bytes, sent: dict, request: dict, edits: list[tuple[tuple, Any]]) -> bytes:
        return json_dumps_compact(request)  # written anew: the edits are in the request already

    def error(self, err: ProxyError) -> tuple[int, dict]:
        return anthropic_error(err.status, err.message)

    def error_frame(self, payload: dict) -> bytes:
        return _event("error", payload)

    def stream(self, ctx: RepairContext, pass_usage: bool) -> AnthropicStream:
        return AnthropicStream(ctx, self.id, self.model, self.stops)

    def opening(self) -> bytes:
        return message_start(self.id, self.model)

    def broken_off(self, repair: AnthropicStream) -> list[bytes]:
        return repair.broken_off()

    def reply(self, completion: Any, changed: bool, data: bytes) -> bytes:
        if not isinstance(completion, dict):
            raise UpstreamError("upstream answered without a JSON chat completion", detail=repr(data[:200]))
        return json_dumps_compact(message_of_completion(completion, self.id, self.model, self.stops))


def estimated_tokens(request: dict) -> int:
    """count_tokens without the upstream's tokenizer: the characters of the request's text and tool
    schemas over CHARS_PER_TOKEN_ESTIMATE (Kimi's tokenizer gives about that for English and code)."""
    return math.ceil(len(json.dumps([request["messages"], request.get("tools")], ensure_ascii=False))
                     / CHARS_PER_TOKEN_ESTIMATE)


# ---------------------------------------------------------------------------------------------------
# The upstream edge: SGLang over httpx
# ---------------------------------------------------------------------------------------------------

def upstream_failure(exc: httpx.HTTPError, url: Any) -> UpstreamError:
    """The one place where httpx's exceptions become ours. The client learns what kind of failure it
    was; where, and what the upstream sent (a misbehaving one may send another request's bytes), go
    to the log only."""
    detail = f"{type(exc).__name__} at {url}: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        err = UpstreamError("upstream timed out", 504, detail)
        err.kind = "timeout"
    elif isinstance(exc, httpx.ConnectError):
        err = UpstreamError("upstream unreachable", 502, detail)
        err.kind = "connect"
    else:
        err = UpstreamError("upstream connection failed", 502, detail)
    return err


def upstream_http_error(status: int, body: bytes) -> UpstreamError:
    """An upstream 4xx/5xx on a chat request, in OpenAI's error shape, keeping the upstream's status
    and message. SGLang sends {"object": "error", "message": ..., "code": N}."""
    message, error_type = body.decode("utf-8", "replace")[:2000].strip(), None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error") if isinstance(parsed.get("error"), dict) else parsed
        if isinstance(inner.get("message"), str):
            message = inner["message"]
        error_type = inner.get("type") if isinstance(inner.get("type"), str) else None
    err = UpstreamError(message or f"upstream answered HTTP {status}", status)
    err.kind = "http"
    err.error_type = error_type or ("invalid_request_error" if status < 500 else "upstream_error")
    return err


def end_to_end_headers(headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes],
                       keep_content_encoding: bool) -> list[tuple[bytes, bytes]]:
    """Headers less the dropped names (lower-cased), the names the Connection header lists (hop-by-hop
    by RFC 9110 7.6.1: ``Connection: keep-alive, Cookie`` keeps the cookie on this hop), CORS headers,
    and Content-Encoding where the body is decoded on the way."""
    headers = [(name.lower(), value) for name, value in headers]
    named = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    out = []
    for key, value in headers:
        if key in dropped or key in named or key.startswith(CORS_HEADER_PREFIX) or (
                key == b"content-encoding" and not keep_content_encoding):
            continue
        out.append((key, value))
    return out


def parser_warning(parsers: dict[str, Any]) -> str | None:
    if not parsers.get("tool_call_parser"):
        return None
    return (f"SGLang runs with --tool-call-parser {parsers['tool_call_parser']}: its parser drops the tool calls "
            "it cannot parse before kimiproxy sees them. Restart SGLang without --tool-call-parser (keep "
            "--reasoning-parser kimi_k2): kimiproxy then recovers every call from the model's own markup.")


class UpstreamConnections:
    """The one httpx client that every upstream's requests go through, opened at start-up and closed at
    shutdown by the app. httpx pools connections per origin, so several upstreams share it, and a
    reload that changes the upstreams has nothing to close under a stream still reading one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: httpx.AsyncClient | None = None
        self.transport: httpx.AsyncHTTPTransport | None = None

    async def open(self) -> None:
        s = self.settings
        # No cap on connections: each stream holds one for its whole life.
        self.transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=IDLE_UPSTREAM_CONNECTIONS))
        self.client = httpx.AsyncClient(
            transport=self.transport, follow_redirects=False,
            timeout=httpx.Timeout(s.forward_timeout, connect=UPSTREAM_CONNECT_TIMEOUT, pool=UPSTREAM_CONNECT_TIMEOUT))

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class Upstream:
    """One SGLang as this process sees it: its base URL, the key policy, the models it serves, and what
    it reports of its parsers. Its requests go through the shared ``UpstreamConnections``. Without a
    configuration file there is one, from SGLANG_API_BASE and UPSTREAM_API_KEY; with one, one per
    entry of ``upstreams``, built anew at each reload (it owns nothing but its parser watcher)."""

    def __init__(self, settings: Settings, connections: UpstreamConnections, config: UpstreamConfig | None = None,
                 client_keys: bool | None = None) -> None:
        self.settings = settings
        self.connections = connections
        self.named = config is not None  # one of the file's: its name goes in front of what is said of it
        config = config or UpstreamConfig("default", settings.upstream, settings.upstream_api_key,
                                          settings.upstream_credentials)
        self.name, self.url, self.models = config.name, config.url, config.models
        self.api_key, self.credentials = config.api_key, config.credentials
        # With keys of kimiproxy's own, the client's key stays here (it is not the upstream's).
        self.client_keys = bool(settings.api_keys) if client_keys is None else client_keys
        self.parsers: dict[str, Any] | None = None  # {"tool_call_parser", "reasoning_parser"}, once known
        self._base_path = httpx.URL(self.url).raw_path.rstrip(b"/") + b"/"  # what request() appends to
        self._watcher: trio.CancelScope | None = None

    @property
    def _client(self) -> httpx.AsyncClient | None:
        return self.connections.client

    @property
    def _transport(self) -> httpx.AsyncHTTPTransport | None:
        return self.connections.transport

    def headers(self, client: Iterable[tuple[bytes, bytes]], relay_untouched: bool) -> list[tuple[bytes, bytes]]:
        """The client's end-to-end headers for the upstream: not hop-by-hop ones, Host or Content-Length
        (httpx sets them). Accept-Encoding passes only where the response is relayed untouched; where
        kimiproxy reads the body it asks for identity. With PROXY_API_KEY the client's key stays here;
        UPSTREAM_API_KEY, when set, is sent instead."""
        client = list(client)
        out = end_to_end_headers(client, REQUEST_HEADERS_DROPPED, relay_untouched)
        asked = [(k.lower(), v) for k, v in client if k.lower() == b"accept-encoding"]
        out += asked if relay_untouched and asked else [(b"accept-encoding", b"identity")]
        if self.client_keys or self.api_key or self.credentials:
            out = [(k, v) for k, v in out if k not in (b"authorization", b"api-key", b"x-api-key")]
            if self.api_key:
                out.append((b"authorization", b"Bearer " + self.api_key.encode()))
            elif self.credentials:  # user:password in the URL, as curl would send them
                out.append((b"authorization", b"Basic " + base64.b64encode(self.credentials.encode())))
        return out

    def request(self, method: str, raw_path: bytes, query: bytes, body: bytes,
                headers: list[tuple[bytes, bytes]]) -> httpx.Request:
        """The upstream request for a path ``checked_path`` let through: /v1/models ->
        {SGLANG_API_BASE}/models, /api/chat/completions -> .../chat/completions. Refused unless httpx
        made exactly that path of it (it would resolve a dot segment, say)."""
        assert self._client is not None
        tail = raw_path.split(b"/", 2)[2]
        url = self.url + "/" + tail.decode("ascii")
        request = self._client.build_request(method, url + "?" + query.decode("latin-1") if query else url,
                                             content=body, headers=headers)
        if request.url.raw_path.partition(b"?")[0] != self._base_path + tail:
            raise ClientError("the request path cannot be sent upstream as it is", 400)
        return request

    async def send(self, request: httpx.Request) -> httpx.Response:
        """The response's headers (its body is read by the caller). Through the client's transport, not
        client.send(): a proxy needs none of the auth, redirect, cookie and event-hook layers."""
        assert self._transport is not None
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise upstream_failure(exc, str(request.url)) from None
        response.request = request
        return response

    async def get(self, url: str) -> httpx.Response:
        assert self._client is not None
        return await self._client.get(url, headers=self.headers((), relay_untouched=False))

    async def check_parsers(self) -> dict[str, Any] | None:
        """Which parsers SGLang runs (GET /server_info; /get_server_info before 0.5.2x), or None when the
        upstream is not SGLang or does not answer. With --tool-call-parser, SGLang drops the calls it
        cannot parse before kimiproxy sees them (REPAIR.md 2): warned once, with the fix."""
        root = self.url.removesuffix("/v1")
        for path in ("/server_info", "/get_server_info"):
            try:
                with trio.fail_after(HEALTH_UPSTREAM_TIMEOUT):
                    response = await self.get(root + path)
                info = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, trio.TooSlowError, ValueError):
                return None
            if isinstance(info, dict) and ("tool_call_parser" in info or "reasoning_parser" in info):
                parsers = {k: info.get(k) for k in ("tool_call_parser", "reasoning_parser")}
                if self.parsers is None and parsers["tool_call_parser"]:
                    log.warning("%s%s", f"upstream {self.name}: " if self.named else "", parser_warning(parsers))
                self.parsers = parsers
                return parsers
        return None

    async def watch_parsers(self) -> None:
        """Ask until SGLang answers (it may start after kimiproxy), or until a reload retires this upstream."""
        with trio.CancelScope() as self._watcher:
            while await self.check_parsers() is None:
                await trio.sleep(PARSER_CHECK_INTERVAL)

    def retire(self) -> None:
        """A reload replaced this upstream: its watcher stops (exchanges in flight still use it)."""
        if self._watcher is not None:
            self._watcher.cancel()

    async def health(self) -> tuple[bool, dict]:
        """(whether it answers, what /health?upstream=1 says of it): its /models within
        HEALTH_UPSTREAM_TIMEOUT, then its parsers."""
        try:
            with trio.fail_after(HEALTH_UPSTREAM_TIMEOUT):
                response = await self.get(f"{self.url}/models")
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            return False, {"status": "degraded", "upstream": f"unreachable: {type(exc).__name__}"}
        if response.status_code >= 400:
            return False, {"status": "degraded", "upstream": f"HTTP {response.status_code}"}
        parsers = await self.check_parsers()
        return True, {"status": "ok", "upstream": "ok", "parsers": parsers, "warning": parser_warning(parsers or {})}


def body_chunks(response: httpx.Response) -> Any:
    """The response body as it arrives. kimiproxy asks for identity encoding where it reads bodies, so
    the raw bytes are the body and httpx's decoder layers can be skipped; an upstream that compresses
    anyway is decoded."""
    if response.headers.get("content-encoding", "identity").lower() in ("", "identity"):
        return response.aiter_raw()
    return response.aiter_bytes()


async def read_upstream_body(response: httpx.Response) -> bytes:
    parts, size = [], 0
    try:
        async for chunk in body_chunks(response):
            size += len(chunk)
            if size > MAX_UPSTREAM_BODY_BYTES:
                raise UpstreamError(f"upstream response exceeds {MAX_UPSTREAM_BODY_BYTES} bytes")
            parts.append(chunk)
    except httpx.HTTPError as exc:
        raise upstream_failure(exc, str(response.url)) from None
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------------
# Files only kimiproxy's user can touch: the reasoning store, the captures, the run directory
# ---------------------------------------------------------------------------------------------------

def private_directory(path: Path) -> None:
    """Make ``path`` a directory only this user can enter (0700), or check that it is one: a real
    directory (lstat: not a symlink), this user's, with no group or other bits. Another local user who
    could write into it could plant files (a store's -wal, a capture's name) that kimiproxy would then
    use. ValueError says what is wrong."""
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is not a directory (a symlink is not accepted)")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{path} must belong to this user and be open to it alone (chmod 700 {path})")


def private_file(path: Path | str) -> bool:
    """Whether ``path`` exists; if it does, it must be a regular file (lstat: not a symlink), this
    user's, with no group or other bits, or ValueError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{path} must be a regular file of this user's, readable by it alone (chmod 600)")
    return True


# `python kimiproxy.py reload`: every serving process with a configuration file registers in the run
# directory (one file per pid), and reload signals those that serve the same file, then waits this long
# for each to write what its reload did.
RELOAD_WAIT = 10.0  # seconds
RELOAD_POLL = 0.05  # seconds between looks at the registrations while waiting


def run_directory() -> Path:
    """Where the serving processes register: ``~/.cache/kimiproxy/run`` in the home directory of the
    user they run as, taken from the password database, not from $HOME or $XDG_*, which differ between
    a systemd service and its administrator's shell."""
    try:
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # a uid without an entry: a private directory of our own in the temp directory
        return Path(tempfile.gettempdir()) / f"kimiproxy-{os.getuid()}" / "run"
    return home / ".cache" / "kimiproxy" / "run"


def process_start(pid: int) -> str:
    """When the process began (/proc/PID/stat, field 22, in clock ticks since boot): with the pid, it
    names one process, so a registration left by a process that was killed never gets a SIGHUP sent to
    a later process that reuses its pid. "" where there is no /proc."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat_line.rpartition(")")[2].split()[19]  # after the command name, which may hold spaces


class Registration:
    """This process's file in the run directory, ``PID.json``: its pid and start, the configuration
    file it serves, and how many reloads it did with the last one's outcome (what ``reload`` waits for
    and prints). Written whole each time (a temporary file renamed over it), 0600; removed at shutdown."""

    def __init__(self, config_path: str) -> None:
        self.pid = os.getpid()
        self.entry = {"pid": self.pid, "start": process_start(self.pid), "config": config_path, "reloads": 0,
                      "result": ""}
        self.path: Path | None = None

    def write(self, result: str | None = None) -> None:
        if result is not None:
            self.entry["reloads"] += 1
            self.entry["result"] = result
        directory = run_directory()
        try:
            private_directory(directory)
            temporary = directory / f".{self.pid}.json.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with open(fd, "w", encoding="utf-8") as f:
                json.dump(self.entry, f)
            os.replace(temporary, directory / f"{self.pid}.json")
            self.path = directory / f"{self.pid}.json"
        except (OSError, ValueError) as exc:
            if result is None:  # said once, at start-up
                log.warning("cannot register for `python kimiproxy.py reload` in %s (%s): send SIGHUP to pid %d "
                            "to reload", directory, exc, self.pid)

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None


def registered(config_path: str) -> list[tuple[Path, dict]]:
    """The registrations of running processes that serve ``config_path``; those of processes that are
    gone (killed before they could remove theirs), whatever file they served, are removed."""
    found: list[tuple[Path, dict]] = []
    directory = run_directory()
    try:  # a directory (and files) only this user can write: nobody else can name a pid to signal
        private_directory(directory)
    except (OSError, ValueError):
        return found
    for path in sorted(directory.glob("*.json")):
        try:
            st = os.lstat(path)
            entry = json.loads(path.read_text(encoding="utf-8"))
            pid = entry["pid"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        # A pid of 0 or below names a process group (or every process); without /proc (no start time)
        # a pid reused by another process could not be told apart: neither is ever signalled.
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022 \
                or type(pid) is not int or pid <= 0 or not entry.get("start"):
            continue
        try:
            os.kill(pid, 0)
            alive = process_start(pid) == entry.get("start")
        except ProcessLookupError:
            alive = False
        except (PermissionError, TypeError, OverflowError):
            continue
        if alive:
            if entry.get("config") == config_path:
                found.append((path, entry))
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found


def reload_servers(config_path: str, wait: float = RELOAD_WAIT) -> int:
    """``python kimiproxy.py reload``: SIGHUP to every process serving ``config_path`` (each worker of
    ``hypercorn -w N``, or ``python kimiproxy.py``), then what each says its reload did. Exit status 0
    when every one reloaded, 1 when one refused the file, did not answer or none was found."""
    config_path = os.path.abspath(config_path)
    found = registered(config_path)
    if not found:
        print(f"kimiproxy: no running kimiproxy serves {config_path} (each registers in {run_directory()} "
              "at start-up)", file=sys.stderr)
        return 1
    before = {entry["pid"]: entry.get("reloads", 0) for _, entry in found}
    for _, entry in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry["pid"], signal.SIGHUP)
    results: dict[int, str] = {}
    deadline = time.monotonic() + wait
    while len(results) < len(found) and time.monotonic() < deadline:
        time.sleep(RELOAD_POLL)
        for path, entry in found:
            with contextlib.suppress(OSError, ValueError):
                now = json.loads(path.read_text(encoding="utf-8"))
                if now.get("reloads", 0) > before[entry["pid"]]:
                    results[entry["pid"]] = str(now.get("result"))
    ok = True
    for pid in sorted(before):
        result = results.get(pid, f"no answer within {wait:g}s (see its log)")
        ok = ok and result.startswith("reloaded")
        print(f"kimiproxy: pid {pid}: {result}")
    return 0 if ok else 1


STORE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")  # the files of one SQLite database


class SharedFile:
    """A SQLite file the workers of a box share, one owner object per worker: opened on first use
    (``_open``, the subclass's: ``_connect`` makes it this user's alone, then its tables), each
    operation in a worker thread behind the file's own one-slot limiter (waiting exchanges do not hold
    trio's thread pool). A file that cannot be opened turns its
    feature off in this worker, with one warning; an operation that fails (another worker holding the
    lock past STORE_BUSY_TIMEOUT) is rolled back and skipped, with a warning; the proxy goes on."""

    what = "shared file"  # how the log names it
    off = "its feature is off"  # what a file that cannot be used means

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.refused: str | None = None  # why the file cannot be used, once found
        self._closed = False  # at shutdown: never opened again
        self._limiter = trio.CapacityLimiter(1)

    def _open(self) -> sqlite3.Connection:
        """The subclass's: ``_connect()``, then its own tables."""
        raise NotImplementedError

    def _connect(self, **options: Any) -> sqlite3.Connection:
        """The file, in WAL mode, in a directory only this user can enter, and every file SQLite uses (the
        database, its WAL, shared memory and journal) this user's alone: a -wal planted by someone else
        would let them read (or forge) what the workers share. ``options``: sqlite3.connect's."""
        private_directory(Path(self.path).parent)
        for suffix in STORE_FILE_SUFFIXES:
            private_file(self.path + suffix)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        private_file(self.path)
        db = sqlite3.connect(self.path, timeout=STORE_BUSY_TIMEOUT, check_same_thread=False, **options)
        db.execute("PRAGMA journal_mode=WAL")
        for suffix in STORE_FILE_SUFFIXES:  # as SQLite made them: with the database's own mode
            private_file(self.path + suffix)
        return db

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, operation: Any, *args: Any) -> Any:
        with self._lock:
            if self.refused is not None or self._closed:
                return None
            if self._db is None:
                try:
                    self._db = self._open()
                except (sqlite3.Error, OSError, ValueError) as exc:
                    self.refused = str(exc)
                    log.warning("%s %s cannot be used, %s in this worker: %s", self.what, self.path, self.off, exc)
                    return None
            try:
                return operation(self._db, *args)
            except Exception as exc:  # busy past the timeout, a text SQLite refuses: this operation only
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                log.warning("%s %s: %s skipped: %s", self.what, self.path, operation.__name__.strip("_"), exc)
                return None


# ---------------------------------------------------------------------------------------------------
# Reasoning continuity: the tool loop's reasoning, put back for clients that drop it
# ---------------------------------------------------------------------------------------------------

def turn_key(owner: str, before: Any, calls: Iterable[tuple[Any, Any, Any]]) -> str | None:
    """An assistant turn by what survives a client's round trip: who and which task (``owner``, see
    ``loop_scope``), the message it answered (``before``, its role and content: two tasks opening with
    the same call differ there) and its calls' names and arguments, in order, the arguments in one form
    (clients write them anew, compactly or in their own key order). Never the calls' ids: the clients
    that drop reasoning rewrite them too (Roo Code turns ``functions.read_file:0`` into
    ``functions_read_file_0``). None for a turn too deeply nested to hash: neither remembered nor restored."""
    answered = [before.get("role"), before.get("content")] if isinstance(before, dict) else None
    parts = [owner, answered] + [[name, _canonical(arguments) if isinstance(arguments, str) else arguments]
                                 for _, name, arguments in calls]
    try:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()  # ASCII: escapes
    except (ValueError, TypeError, RecursionError):
        return None


def loop_scope(key_name: str, messages: list) -> str:
    """What a turn's reasoning belongs to: the access key it was delivered to (a user never gets another
    user's reasoning) and the task, the conversation's first user message."""
    first = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    try:
        task = json.dumps(first, sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        task = ""
    return key_name + "\n" + task


def turns_without_reasoning(request: dict) -> list[tuple[int, dict, Any, list]]:
    """The assistant turns with tool calls and no reasoning in the current tool loop: (its position, the
    turn, the message it answered, its calls). The loop is what follows the last assistant message without tool
    calls: Kimi-K2-Thinking's chat template shows the model its earlier reasoning there, and blanks it
    before."""
    turns = []
    messages = request["messages"]
    for i in range(len(messages) - 1, 0, -1):
        message = messages[i]
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        calls = message.get("tool_calls")
        if not calls or not isinstance(calls, list):
            break
        if not (message.get("reasoning_content") or message.get("reasoning")):
            turns.append((i, message, messages[i - 1], _call_tuples(calls)))
            if len(turns) == MAX_RESTORED_TURNS:  # what one request may cost in keys and look-ups
                break
    return turns


def default_store() -> str:
    """REASONING_STORE's default: in this user's cache directory, never the shared temp directory. The
    kimiproxy instances of one user all use it, each under its own port (``Exchange._loop``): they share
    nothing unless they are given one REASONING_STORE."""
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory: a private directory of our own in the temp directory
        cache = Path(tempfile.gettempdir()) / f"kimiproxy-{os.getuid()}"
    return str(cache / "kimiproxy" / "reasoning.sqlite3")


class ReasoningStore(SharedFile):
    """The reasoning of the assistant turns kimiproxy delivered with tool calls, by ``turn_key``, in a
    SQLite file that every worker on the box shares (one writer at a time, WAL: readers never wait).
    Bounded in entries, bytes and age; it outlives a restart (delete the file to forget), and nothing
    else is kept. The file must be its owner's alone, and the text never reaches a log line. Its calls
    block, so they run in a worker thread, one at a time per process. If the file cannot be opened,
    continuity is off in this worker, with a warning; an operation that fails (another worker holding
    the lock past STORE_BUSY_TIMEOUT) is skipped, with a warning; the proxy goes on either way."""

    what, off = "reasoning store", "reasoning continuity is off"

    def __init__(self, settings: Settings, prune_every: int = STORE_PRUNE_EVERY, clock: Any = time.time) -> None:
        super().__init__(settings.reasoning_store or default_store())
        self.max_entries = settings.reasoning_max_entries
        self.max_bytes = int(settings.reasoning_max_mb * 1024 * 1024)
        self.max_age = settings.reasoning_max_hours * 3600
        self._writes = 0
        self._prune_every = prune_every
        self._clock = clock  # wall-clock seconds: the file outlives processes

    @property
    def usable(self) -> bool:
        """False once the store was refused (until then, it has not been tried or it works)."""
        return self.refused is None

    async def remember(self, turns: list[tuple[str, str]]) -> None:
        """(key, reasoning) pairs."""
        await trio.to_thread.run_sync(self._run, self._remember, turns, limiter=self._limiter)

    async def recall(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(keys), STORE_KEYS_PER_QUERY):
            batch = keys[start:start + STORE_KEYS_PER_QUERY]
            found.update(await trio.to_thread.run_sync(self._run, self._recall, batch, limiter=self._limiter) or {})
        return found

    def _open(self) -> sqlite3.Connection:
        db = self._connect()  # this user's alone: a planted -wal would read every turn, forge restored ones
        db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last turns: they are a cache
        db.execute("CREATE TABLE IF NOT EXISTS reasoning (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                   "bytes INTEGER NOT NULL, created REAL NOT NULL)")
        db.execute("CREATE INDEX IF NOT EXISTS reasoning_created ON reasoning (created)")
        return db

    def _remember(self, db: sqlite3.Connection, turns: list[tuple[str, str]]) -> None:
        now = self._clock()
        with db:
            db.executemany("INSERT OR REPLACE INTO reasoning VALUES (?, ?, ?, ?)",
                           [(key, text, len(text.encode("utf-8", "surrogatepass")), now) for key, text in turns])
        if self._writes % self._prune_every == 0:
            self._prune(db, now)
        self._writes += 1

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        """The bounds, kept every ``prune_every`` writes (so passed by at most that many turns): the
        too old go, then the oldest past the entry count, then the oldest past the bytes."""
        with db:
            db.execute("DELETE FROM reasoning WHERE created < ?", (now - self.max_age,))
            db.execute("DELETE FROM reasoning WHERE key IN (SELECT key FROM reasoning ORDER BY created DESC "
                       "LIMIT -1 OFFSET ?)", (self.max_entries,))
            excess = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM reasoning").fetchone()[0] - self.max_bytes
            if excess > 0:
                db.execute("DELETE FROM reasoning WHERE key IN (SELECT key FROM (SELECT key, SUM(bytes) OVER "
                           "(ORDER BY created, key) - bytes AS before FROM reasoning) WHERE before < ?)", (excess,))

    def _recall(self, db: sqlite3.Connection, keys: list[str]) -> dict[str, str]:
        marks = ",".join("?" * len(keys))
        rows = db.execute(f"SELECT key, text FROM reasoning WHERE key IN ({marks}) AND created >= ?",
                          (*keys, self._clock() - self.max_age))
        return dict(rows.fetchall())


# ---------------------------------------------------------------------------------------------------
# The page: what the box is doing, for people (GET / in a browser, its data from GET /status.json)
# ---------------------------------------------------------------------------------------------------

# Each worker keeps what it serves in memory (its last requests, each key's use, what is in flight) and,
# while a page is open on the box, writes it to a small SQLite file beside the reasoning store, one batch
# at most this often, in a thread; nothing is written per chunk (a stream's count is read from its
# Exchange). While no page is open a worker only asks the file, this often, whether one is.
PAGE_FLUSH_INTERVAL = 1.0  # seconds
PAGE_WATCH = 10.0  # seconds a page's last poll keeps the workers writing
PAGE_HEARTBEAT = 5.0  # seconds: a worker with requests in flight says it is alive at least this often
PAGE_WORKER_GONE = 15.0  # seconds without a word from a worker: its requests in flight are not shown
PAGE_REQUESTS = 50  # the last requests the page shows
PAGE_CAPTURES = 20  # the recent captures it shows
PAGE_KEEP_REQUESTS = 5000  # finished requests kept in the file, all instances together
PAGE_KEEP_HOURS = 24  # a key's use is counted over this many hours (by the hour); older rows go
PAGE_PRUNE_EVERY = 60  # batches between enforcing the bounds, per worker
# Parameters in one statement: SQLite's limit (999 before 3.32). A batch goes in a few statements, not one
# per row: the thread gives up and takes back the GIL around every statement, and under load each time
# costs the event loop's thread more than the row (measured: 50 us a row at 450 requests/s, 1 us so).
PAGE_PARAMETERS = 999 if sqlite3.sqlite_version_info < (3, 32) else 32766
PAGE_ADMIN_KEY = "admin"  # with keys, the key of this name sees every key's rows; any other, its own
PAGE_TOKENS = ("estimated: the upstream's chunks so far (SGLang streams one token per chunk; its role, finish and "
               "usage chunks count too); a finished request shows SGLang's own count")


def _quality(accept: str, kind: str) -> float:
    """The q an Accept header gives the media type ``kind`` (``text/html``), from the most specific range
    that names it (``text/html``, ``text/*``, ``*/*``); 0 when none does."""
    family = kind.partition("/")[0] + "/*"
    best, q = -1, 0.0
    for part in accept.split(","):
        media, *params = part.split(";")
        rank = {kind: 2, family: 1, "*/*": 0}.get(media.strip().lower(), -1)
        if rank < best or rank < 0:
            continue
        value = 1.0
        for param in params:
            name, _, raw = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    value = float(raw)
                except ValueError:
                    value = 0.0
        q = value if rank > best else max(q, value)
        best = rank
    return q


def prefers_html(accept: str) -> bool:
    """Whether a request for / wants the page: its Accept prefers text/html to application/json (a
    browser's does; ``*/*``, none at all and ``application/json`` keep the JSON)."""
    return _quality(accept, "text/html") > _quality(accept, "application/json")


def _insert(db: sqlite3.Connection, head: str, rows: list[tuple], tail: str = "") -> None:
    """``head VALUES (...), (...)... tail``: as many rows in one statement as its parameters allow."""
    if not rows:
        return
    width = len(rows[0])
    per = PAGE_PARAMETERS // width
    for start in range(0, len(rows), per):
        part = rows[start:start + per]
        marks = ",".join(["(" + ",".join("?" * width) + ")"] * len(part))
        db.execute(f"{head} VALUES {marks}{tail}", [value for row in part for value in row])


def _model(model: Any) -> str | None:
    return model[:200] if isinstance(model, str) else None


def _finished(row: tuple) -> dict:
    pid, _, rid, name, model, path, started, ended, status, prompt, completion, chunks, repairs, capture, _ = row
    return {"worker": pid, "id": rid, "key": name, "model": model, "path": path, "time": ended,
            "duration": ended - started, "status": status, "prompt_tokens": prompt, "completion_tokens": completion,
            "chunks": chunks, "repairs": json.loads(repairs) if repairs else {}, "capture": capture}


# Each limit (FairUse) beside the use it is held to, as the page shows them.
PAGE_LIMIT_USE = {"concurrent": "in_flight", "requests_per_minute": "requests_last_minute",
                  "tokens_per_minute": "tokens_last_minute", "tokens_per_day": "tokens_last_day"}


class Activity(SharedFile):
    """What the page shows, for the whole box: the requests in flight, the last ones served, the
    captures they left, and each key's use over the last PAGE_KEEP_HOURS. Each worker keeps its own in
    memory (the exchanges in flight, its last requests and captures, each key's use) and, while a page
    is open on the box (it polled within PAGE_WATCH), writes them to a SQLite file that every worker
    shares, beside the reasoning store and checked as it is (a directory and files only this user can
    touch), in one batch per PAGE_FLUSH_INTERVAL, in a worker thread; with no page open it only asks the
    file whether one is. GET /status.json says it is, writes its own worker's batch and reads every
    worker's rows. With the default reasoning store
    each instance (port) has its own rows, as it has its own turns; with a REASONING_STORE of their own,
    the instances that share it share these too. A file that cannot be used leaves each worker showing
    its own requests, with a warning; nothing else depends on it."""

    what, off = "page file", "the page shows its own requests only"

    def __init__(self, settings: Settings, clock: Any = time.time) -> None:
        store = Path(settings.reasoning_store or default_store())
        super().__init__(str(store.with_name(store.stem + ".page" + store.suffix)))
        self.per_port = not settings.reasoning_store
        self.pid = os.getpid()
        self.worker = f"{self.pid}.{secrets.token_hex(4)}"  # a pid comes back; this does not
        self._clock = clock  # wall-clock seconds: the rows outlive processes
        self._serial = itertools.count(1)
        self.running: dict[int, tuple[Any, int, str, float]] = {}  # id(exchange) -> (it, serial, instance, start)
        self._written: dict[int, int | None] = {}  # the serials with a row in the file -> the count written
        self._ended: list[int] = []  # serials whose row in the file goes
        # Finished, not written yet: the last PAGE_REQUESTS (the page shows no more), those that left a
        # capture, and each key's use by the hour ((instance, key, hour) -> requests, prompt, completion, repairs).
        self.done: deque[tuple] = deque(maxlen=PAGE_REQUESTS)
        self.captured: deque[tuple] = deque(maxlen=PAGE_CAPTURES)
        self.use: dict[tuple, list[int]] = {}
        self.recent: deque[tuple] = deque(maxlen=PAGE_REQUESTS)  # this worker's own, for a file that cannot be used
        self.watched = False  # a page was open on the box when this worker last asked
        self._due = trio.Event()
        self._beat = 0.0  # when this worker last said it is alive
        self._batches = 0

    # -- the exchanges' hooks: in memory, no I/O -------------------------------------------------------

    def begin(self, exchange: Any) -> None:
        port = (exchange.scope.get("server") or (None, None))[1]
        started = self._clock() - (time.monotonic() - exchange.started_at)
        self.running[id(exchange)] = (exchange, next(self._serial), str(port) if self.per_port else "", started)
        if not self._due.is_set():
            self._due.set()

    def end(self, exchange: Any) -> None:
        entry = self.running.pop(id(exchange), None)
        if entry is None:
            return
        _, serial, instance, started = entry
        if serial in self._written:
            del self._written[serial]
            self._ended.append(serial)
        usage = exchange.usage if isinstance(exchange.usage, dict) else {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt = prompt if type(prompt) is int else None
        completion = completion if type(completion) is int else None
        captured = exchange.captured
        ended = self._clock()
        row = (self.worker, self.pid, instance, exchange.id, exchange.key_name, _model(exchange.model),
               exchange.path, started, ended, exchange.final_status,
               prompt, completion, exchange.chunks or None, json.dumps(dict(exchange.rules)) if exchange.rules else None,
               captured, json.dumps(sorted(exchange.capture.reasons)) if captured else None)
        self.done.append(row)
        self.recent.append(row)
        if captured:
            self.captured.append(row)
        use = self.use.get(key := (instance, exchange.key_name, int(ended // 3600)))
        if use is None:
            use = self.use[key] = [0, 0, 0, 0]
        use[0] += 1
        use[1] += prompt or 0
        use[2] += completion or 0
        use[3] += exchange.repairs
        if not self._due.is_set():
            self._due.set()

    # -- the batches -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Once something began or ended, PAGE_FLUSH_INTERVAL later (what else happens in that time goes in
        the same batch), and every interval while anything is in flight (its count moves without a word)
        or waits to be written: write a batch if a page is open, else only ask whether one is."""
        while True:
            if not (self.running or self.done or self.captured or self.use or self._ended):
                await self._due.wait()
            await trio.sleep(PAGE_FLUSH_INTERVAL)
            self._due = trio.Event()
            await self.flush()

    def _batch(self, young: bool) -> tuple | None:
        """What changed since the last batch, read on the event loop (the exchanges are its objects):
        rows in flight that are new or whose count moved, those that ended, the finished requests.
        ``young``: also the requests that began within the last interval (for the page)."""
        now = self._clock()
        flight = []
        for exchange, serial, instance, started in self.running.values():
            if not young and started > now - PAGE_FLUSH_INTERVAL:
                continue  # it may well end before the next batch: then it needs no row in flight at all
            tokens = exchange.chunks or None
            if serial in self._written and self._written[serial] == tokens:
                continue
            self._written[serial] = tokens
            first = started + exchange.first_byte if exchange.first_byte is not None else None
            flight.append((self.worker, serial, self.pid, instance, exchange.id, exchange.key_name,
                           _model(exchange.model), exchange.path, started, first, tokens, now))
        changed = flight or self._ended or self.done or self.captured or self.use
        if not changed and not (self._written and now - self._beat >= PAGE_HEARTBEAT):
            return None
        self._beat = now
        ended, self._ended = [(self.worker, serial) for serial in self._ended], []
        done = list(self.done) + [row for row in self.captured if row not in self.done]
        use = [(*key, *counts) for key, counts in self.use.items()]
        self.done.clear()
        self.captured.clear()
        self.use = {}
        return now, flight, ended, done, use

    async def flush(self, young: bool = False, watched: bool = False) -> None:
        """Write what changed if a page is open (``watched``: it is, without asking)."""
        if self.refused is not None:
            return
        if not watched:
            watched = bool(await trio.to_thread.run_sync(self._run, self._watched, limiter=self._limiter))
        if watched and not self.watched:  # the rows in flight may have been pruned meanwhile: all of them again
            self._written = dict.fromkeys(self._written, -1)
        self.watched = watched
        batch = self._batch(young) if watched else None
        if batch is not None:
            await trio.to_thread.run_sync(self._run, self._write, batch, limiter=self._limiter)

    async def aclose(self) -> None:
        """At shutdown: the last batch (watched or not: each key's use is kept), and this worker's rows in
        flight go."""
        with trio.CancelScope(shield=True):
            self.running.clear()
            self._ended += list(self._written)
            self._written.clear()
            await self.flush(watched=True)
            await super().aclose()

    def _open(self) -> sqlite3.Connection:
        db = self._connect()  # nobody else can plant a -wal that would show them every key's use
        db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last second: it is a view
        with db:
            db.execute("CREATE TABLE IF NOT EXISTS flight (worker TEXT, serial INTEGER, pid INTEGER, instance TEXT, "
                       "id TEXT, key TEXT, model TEXT, path TEXT, started REAL, first REAL, tokens INTEGER, "
                       "updated REAL, PRIMARY KEY (worker, serial))")
            db.execute("CREATE TABLE IF NOT EXISTS done (worker TEXT, pid INTEGER, instance TEXT, id TEXT, key TEXT, "
                       "model TEXT, path TEXT, started REAL, ended REAL, status INTEGER, prompt INTEGER, "
                       "completion INTEGER, chunks INTEGER, repairs TEXT, capture TEXT, reasons TEXT)")
            db.execute("CREATE INDEX IF NOT EXISTS done_ended ON done (instance, ended)")
            db.execute("CREATE TABLE IF NOT EXISTS use (instance TEXT, key TEXT, hour INTEGER, requests INTEGER, "
                       "prompt INTEGER, completion INTEGER, repairs INTEGER, PRIMARY KEY (instance, key, hour))")
            db.execute("CREATE TABLE IF NOT EXISTS workers (worker TEXT PRIMARY KEY, seen REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS watch (one INTEGER PRIMARY KEY, until REAL)")
        return db

    def _watched(self, db: sqlite3.Connection) -> bool:
        row = db.execute("SELECT until FROM watch").fetchone()
        return row is not None and row[0] >= self._clock()

    def _write(self, db: sqlite3.Connection, batch: tuple) -> None:
        now, flight, ended, done, sums = batch
        with db:
            _insert(db, "INSERT OR REPLACE INTO flight", flight)
            for start in range(0, len(ended), PAGE_PARAMETERS - 1):
                serials = [serial for _, serial in ended[start:start + PAGE_PARAMETERS - 1]]
                db.execute(f"DELETE FROM flight WHERE worker = ? AND serial IN ({','.join('?' * len(serials))})",
                           (self.worker, *serials))
            _insert(db, "INSERT INTO done", done)
            _insert(db, "INSERT INTO use", sums, " ON CONFLICT (instance, key, hour) DO UPDATE SET requests = "
                    "requests + excluded.requests, prompt = prompt + excluded.prompt, completion = completion + "
                    "excluded.completion, repairs = repairs + excluded.repairs")
            db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?)", (self.worker, now))
            if self._batches % PAGE_PRUNE_EVERY == 0:
                self._prune(db, now)
        self._batches += 1

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        """The bounds: finished requests older than PAGE_KEEP_HOURS or past PAGE_KEEP_REQUESTS, key use
        older than PAGE_KEEP_HOURS, and the rows in flight of workers that are gone (killed: a worker
        that stops removes its own)."""
        keep = now - PAGE_KEEP_HOURS * 3600
        db.execute("DELETE FROM done WHERE ended < ?", (keep,))
        db.execute("DELETE FROM done WHERE rowid IN (SELECT rowid FROM done ORDER BY ended DESC LIMIT -1 OFFSET ?)",
                   (PAGE_KEEP_REQUESTS,))
        db.execute("DELETE FROM use WHERE hour < ?", (int(keep // 3600),))
        db.execute("DELETE FROM workers WHERE seen < ?", (now - PAGE_WORKER_GONE,))
        db.execute("DELETE FROM flight WHERE worker NOT IN (SELECT worker FROM workers)")

    # -- what the page shows --------------------------------------------------------------------------

    async def status(self, port: Any, key: str | None) -> dict:
        """Every worker's rows of this instance (``port``: the one the page was asked on), after this
        worker's own batch; ``key``: only that key's rows (None: everyone's). A file that cannot be used:
        this worker's own, from memory. Each of ``keys`` is one key's row; a ``limits`` entry added to
        it shows as a column of the page's table of keys."""
        await self.flush(young=True, watched=True)
        instance = str(port) if self.per_port else ""
        now = self._clock()
        found = await trio.to_thread.run_sync(self._run, self._read, instance, key, now, limiter=self._limiter)
        if found is None:  # the file cannot be used
            flight = [(self.pid, exchange.id, exchange.key_name, _model(exchange.model), exchange.path, started,
                       started + exchange.first_byte if exchange.first_byte is not None else None,
                       exchange.chunks or None, now)
                      for exchange, _, at, started in self.running.values() if at == instance]
            done = [row[1:] for row in reversed(self.recent) if row[2] == instance]
            if key is not None:
                flight = [row for row in flight if row[2] == key]
                done = [row for row in done if row[3] == key]
            use: dict[str, Counter[str]] = {}
            for row in done:
                use.setdefault(row[3], Counter()).update(requests=1, prompt=row[9] or 0, completion=row[10] or 0,
                                                         repairs=sum(json.loads(row[12]).values()) if row[12] else 0)
            found = flight, done[:PAGE_REQUESTS], [row for row in done if row[13]][:PAGE_CAPTURES], [
                (name, c["requests"], c["prompt"], c["completion"], c["repairs"]) for name, c in use.items()]
        flight, done, captures, use = found
        in_flight = Counter(row[2] for row in flight)
        return {
            "now": now,
            "shared": self.refused is None,
            "shared_note": None if self.refused is None else (
                f"the page's shared file cannot be used ({self.refused}): this shows one worker's requests only"),
            "tokens_note": PAGE_TOKENS,
            "in_flight": [{"worker": pid, "id": rid, "key": name, "model": model, "path": path, "age": now - started,
                           "tokens": tokens, "tokens_per_second": tokens / (updated - first)
                           if tokens and first is not None and updated - first > 0.5 else None}
                          for pid, rid, name, model, path, started, first, tokens, updated in flight],
            "requests": [_finished(row) for row in done],
            "captures": [{"name": row[13], "reasons": json.loads(row[14]), "time": row[7], "key": row[3],
                          "id": row[2]} for row in captures],
            "keys": [{"key": name, "requests": requests, "prompt_tokens": prompt, "completion_tokens": completion,
                      "repairs": repairs, "in_flight": in_flight.get(name, 0)}
                     for name, requests, prompt, completion, repairs in sorted(use)] + [
                {"key": name, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "repairs": 0,
                 "in_flight": count} for name, count in sorted(in_flight.items()) if name not in {u[0] for u in use}],
            "window_hours": PAGE_KEEP_HOURS,
        }

    def _read(self, db: sqlite3.Connection, instance: str, key: str | None, now: float) -> tuple:
        with db:  # the other workers write theirs from now on
            db.execute("INSERT OR REPLACE INTO watch VALUES (1, ?)", (now + PAGE_WATCH,))
        mine, args = ("", ()) if key is None else (" AND key = ?", (key,))
        flight = db.execute(
            "SELECT pid, id, key, model, path, started, first, tokens, updated FROM flight WHERE instance = ?"
            f"{mine} AND worker IN (SELECT worker FROM workers WHERE seen >= ?) ORDER BY started",
            (instance, *args, now - PAGE_WORKER_GONE)).fetchall()
        columns = "pid, instance, id, key, model, path, started, ended, status, prompt, completion, chunks, repairs, " \
                  "capture, reasons"
        done = db.execute(f"SELECT {columns} FROM done WHERE instance = ?{mine} ORDER BY ended DESC LIMIT ?",
                          (instance, *args, PAGE_REQUESTS)).fetchall()
        captures = db.execute(f"SELECT {columns} FROM done WHERE instance = ?{mine} AND capture IS NOT NULL "
                              "ORDER BY ended DESC LIMIT ?", (instance, *args, PAGE_CAPTURES)).fetchall()
        use = db.execute(f"SELECT key, SUM(requests), SUM(prompt), SUM(completion), SUM(repairs) FROM use WHERE "
                         f"instance = ?{mine} AND hour >= ? GROUP BY key",
                         (instance, *args, int((now - PAGE_KEEP_HOURS * 3600) // 3600))).fetchall()
        return flight, done, captures, use


# The page itself: no framework, no CDN, nothing it fetches but /status.json (every 2 s, with the key the
# form keeps in sessionStorage, sent as Authorization). Every value it shows is written as text, never
# as markup; its Content-Security-Policy allows only its own script and style (by hash).
PAGE_STYLE = """
:root{color-scheme:light dark;--fg:#1f2328;--mute:#59636e;--bg:#fff;--line:#d1d9e0;--chip:#eef1f4;--warn:#7d4e00;
--warnbg:#fff8c5;--bad:#cf222e;--live:#1a7f37}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--mute:#9198a1;--bg:#0d1117;--line:#3d444d;--chip:#262c36;
--warn:#e3b341;--warnbg:#2e2308;--bad:#ff7b72;--live:#3fb950}}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;flex-wrap:wrap;gap:.4em 1em;align-items:center;padding:.7em 1em;border-bottom:1px solid var(--line)}
h1{font-size:1.15em;margin:0}h2{font-size:1em;margin:1.3em 0 .4em}h2 small{font-weight:normal;color:var(--mute)}
main{padding:0 1em 2em;max-width:1280px}.mute{color:var(--mute)}.bad{color:var(--bad)}[hidden]{display:none!important}
.warn{background:var(--warnbg);color:var(--warn);padding:.5em .8em;border-radius:6px;margin:.7em 0}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3em .55em;border-bottom:1px solid var(--line);
vertical-align:top}th{font-weight:600;color:var(--mute);font-size:.9em;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.chip{display:inline-block;background:var(--chip);border-radius:4px;padding:0 .35em;margin:0 .25em .15em 0;font-size:.9em}
#flight td:first-child::after{content:" \\25CF";color:var(--live)}
form{display:flex;gap:.4em}input,button{font:inherit;padding:.15em .5em}
@media (max-width:700px){table,tbody,tr,td{display:block}thead{display:none}
tr{border:1px solid var(--line);border-radius:6px;margin:.5em 0;padding:.3em .2em}td{border:0;padding:.1em .4em}
td.n{text-align:left}td::before{content:attr(data-label) ": ";color:var(--mute)}}
"""
PAGE_SCRIPT = """
"use strict";
const KEY = "kimiproxy-key", POLL = 2000, $ = id => document.getElementById(id);
let updates = 0;
if (location.hash.startsWith("#key=")) {  // a fragment never reaches the server, nor its log
  sessionStorage.setItem(KEY, decodeURIComponent(location.hash.slice(5)));
  history.replaceState(null, "", location.pathname + location.search);
}
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
const dash = v => v === null || v === undefined || v === "" ? "\\u2014" : v;
const num = n => n === null || n === undefined ? "\\u2014" : Number(n).toLocaleString("en");
const secs = s => s < 10 ? s.toFixed(2) + " s" : s < 60 ? s.toFixed(1) + " s" : s < 3600 ?
  Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s" : (s / 3600).toFixed(1) + " h";
const clock = t => new Date(t * 1000).toLocaleTimeString();
function chips(items) {
  const f = document.createDocumentFragment();
  for (const [label, count] of items) f.append(el("span", count > 1 ? label + " \\u00d7" + count : label, "chip"));
  return f.childNodes.length ? f : "\\u2014";
}
function table(id, cols, rows, empty) {
  const box = $(id);
  box.replaceChildren();
  if (!rows.length) { box.append(el("p", empty, "mute")); return; }
  const t = el("table"), head = t.createTHead().insertRow(), body = t.createTBody();
  for (const [label] of cols) head.append(el("th", label));
  for (const row of rows) {
    const tr = body.insertRow();
    for (const [label, cell, cls] of cols) {
      const td = el("td", null, cls), v = cell(row);
      td.dataset.label = label;
      if (v instanceof Node) td.append(v); else td.textContent = dash(v);
      tr.append(td);
    }
  }
  box.append(t);
}
function tokens(r) {
  if (r.prompt_tokens !== null || r.completion_tokens !== null) return num(r.prompt_tokens) + " + " + num(r.completion_tokens);
  return r.chunks ? "~" + num(r.chunks) + " (chunks)" : null;
}
function limits(v) { return typeof v === "object" && v !== null ? Object.entries(v).map(e => e.join(": ")).join(", ") : v; }
function render(d) {
  document.body.dataset.updates = ++updates;
  $("state").textContent = d.viewer + " \\u00b7 updated " + clock(d.now) + " \\u00b7 every " + POLL / 1000 + " s";
  const warn = $("warnings");
  warn.replaceChildren();
  for (const u of d.upstreams) if (u.warning) warn.append(el("div", (d.upstreams.length > 1 ? u.name + ": " : "") + u.warning, "warn"));
  if (d.shared_note) warn.append(el("div", d.shared_note, "warn"));
  table("flight", [["key", r => r.key], ["model", r => r.model], ["route", r => r.path], ["age", r => secs(r.age), "n"],
    ["tokens so far (est.)", r => r.tokens === null ? null : "~" + num(r.tokens), "n"],
    ["tokens/s (est.)", r => r.tokens_per_second === null ? null : r.tokens_per_second.toFixed(1), "n"],
    ["worker", r => r.worker, "n"]], d.in_flight, "nothing in flight");
  $("tokens-note").textContent = "Tokens in flight are " + d.tokens_note + ".";
  table("requests", [["time", r => clock(r.time)], ["key", r => r.key], ["model", r => r.model], ["route", r => r.path],
    ["status", r => { const s = el("span", r.status === 499 ? "499 client left" : r.status); if (r.status >= 400) s.className = "bad"; return s; }],
    ["duration", r => secs(r.duration), "n"], ["tokens", tokens, "n"],
    ["repairs", r => chips(Object.entries(r.repairs))], ["worker", r => r.worker, "n"]], d.requests, "no requests yet");
  $("captures-section").hidden = d.captures === null;
  if (d.captures !== null) table("captures", [["time", r => clock(r.time)], ["key", r => r.key],
    ["reasons", r => chips(r.reasons.map(x => [x, 1]))], ["file", r => r.name]], d.captures, "no captures yet");
  table("upstreams", [["upstream", r => r.name], ["models", r => r.models.length ? r.models.join(", ") : "every model"],
    ["tool-call parser", r => r.parsers ? dash(r.parsers.tool_call_parser) : "not known yet"],
    ["reasoning parser", r => r.parsers ? dash(r.parsers.reasoning_parser) : "not known yet"],
    ["warning", r => r.warning ? el("span", "tool-call parser on: see above", "bad") : null]], d.upstreams, "none");
  const keyCols = [["key", r => r.key], ["requests", r => num(r.requests), "n"], ["prompt tokens", r => num(r.prompt_tokens), "n"],
    ["completion tokens", r => num(r.completion_tokens), "n"], ["repairs", r => num(r.repairs), "n"], ["in flight", r => r.in_flight, "n"]];
  if (d.keys.some(k => "limits" in k)) keyCols.push(["limits", r => limits(r.limits)]);
  $("keys-window").textContent = "last " + d.window_hours + " h";
  table("keys", keyCols, d.keys, "no use yet");
}
async function tick() {
  const key = sessionStorage.getItem(KEY);
  try {
    const r = await fetch("status.json", {headers: key ? {Authorization: "Bearer " + key} : {}, cache: "no-store"});
    if (r.status === 401) {
      $("state").textContent = key ? "that key was refused: give another" : "this kimiproxy shows nothing without a key";
      $("keyform").hidden = false;
      for (const id of ["flight", "requests", "captures", "upstreams", "keys"]) $(id).replaceChildren();
    } else if (!r.ok) {
      throw new Error("HTTP " + r.status);
    } else {
      render(await r.json());
      $("keyform").hidden = true;
    }
    $("forget").hidden = !key;
  } catch (e) {
    $("state").textContent = "not updated (" + e.message + "): trying again";
  }
  setTimeout(tick, POLL);
}
$("keyform").addEventListener("submit", e => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
});
$("forget").addEventListener("click", () => sessionStorage.removeItem(KEY));
tick();
"""
PAGE_HTML = ("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>kimiproxy</title><link rel="icon" href="data:,"><style>""" + PAGE_STYLE + """</style></head>
<body><header><h1>kimiproxy</h1><span id="state" class="mute">loading\u2026</span>
<form id="keyform" hidden><input id="key" type="password" placeholder="API key" autocomplete="off" aria-label="API key">
<button>Show</button></form><button id="forget" hidden>Forget the key</button></header>
<main><div id="warnings"></div>
<h2>In flight</h2><div id="flight"></div><p id="tokens-note" class="mute"></p>
<h2>Last requests</h2><div id="requests"></div>
<section id="captures-section" hidden><h2>Recent captures</h2><div id="captures"></div></section>
<h2>Upstreams</h2><div id="upstreams"></div>
<h2>Keys <small id="keys-window"></small></h2><div id="keys"></div>
</main><script>""" + PAGE_SCRIPT + """</script></body></html>
""").encode()


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE_HEADERS = {
    "content-type": "text/html; charset=utf-8",
    "content-security-policy": f"default-src 'none'; script-src {_csp_hash(PAGE_SCRIPT)}; style-src "
                               f"{_csp_hash(PAGE_STYLE)}; connect-src 'self'; img-src data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


# ---------------------------------------------------------------------------------------------------
# Capture and replay: every exchange that went wrong, as a file that replays offline
# ---------------------------------------------------------------------------------------------------

class Capture:
    """One chat exchange as it happened: the request as the client sent it (secret headers redacted),
    the upstream's events as they came (seconds after the request) and what the client got. It keeps
    the bytes the exchange has anyway, up to CAPTURE_EXCHANGE_BYTES; it is written only with reasons."""

    def __init__(self, exchange: "Exchange", body: bytes) -> None:
        self.id, self.path, self.started_at = exchange.id, exchange.path, exchange.started_at
        self.protocol = exchange.protocol.name  # the client's: what ``client`` is written in
        self.headers = redact_headers(exchange.scope["headers"])
        self.body = body
        self.stream = False
        self.status: int | None = None  # the upstream's
        self.upstream: list[tuple[float, bytes]] = []
        self.client: list[bytes] = []
        self.reasons: set[str] = set()
        self.error: dict | None = None  # the error event a stream that broke off ended with
        self.truncated = False
        self._size = len(body)

    def upstream_event(self, data: bytes) -> None:
        if self._room(data):
            self.upstream.append((time.monotonic() - self.started_at, data))

    def client_data(self, data: bytes) -> None:
        if self._room(data):
            self.client.append(data)

    def judge(self, choices: Iterable[tuple["ChoiceRepair", Message]]) -> None:
        """The reasons to keep this exchange: a repair, markup left in the text, arguments not JSON.
        ``choices``: each choice's repair and final message."""
        for choice, final in choices:
            if choice.repairs() or any(call.channel != "tool_calls" or call.rules for call in choice.sent):
                self.reasons.add("repaired")
            if any("arguments-not-json" in call.rules for call in choice.sent):
                self.reasons.add("arguments-not-json")
            if _MARKER_RE.search(final.content) or _MARKER_RE.search(final.reasoning):
                self.reasons.add("markup-left")

    def _room(self, data: bytes) -> bool:
        self._size += len(data) + CAPTURE_EVENT_OVERHEAD
        self.truncated |= self._size > CAPTURE_EXCHANGE_BYTES
        return not self.truncated

    def document(self) -> dict:
        text = functools.partial(str, encoding="utf-8", errors="replace")
        try:
            request: Any = json_loads(self.body)
        except (ValueError, RecursionError):
            request = text(self.body)
        return {"kimiproxy": __version__, "id": self.id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "reasons": sorted(self.reasons), "path": self.path, "protocol": self.protocol,
                "headers": self.headers, "request": request,
                "stream": self.stream, "upstream_status": self.status,
                "upstream_events": [[round(t, 4), text(data)] for t, data in self.upstream],
                "upstream_broke_off": self.error, "client": text(b"".join(self.client)), "truncated": self.truncated}


class CaptureDir:
    """CAPTURE_DIR: one JSON file per kept exchange, readable by its owner only; past CAPTURE_MAX_FILES
    or CAPTURE_MAX_MB the oldest go. Several workers may write and prune it at once."""

    def __init__(self, settings: Settings) -> None:
        self.path = Path(settings.capture_dir)
        self.max_files = settings.capture_max_files
        self.max_bytes = int(settings.capture_max_mb * 1024 * 1024)
        self._refused: str | None = None  # why CAPTURE_DIR cannot be used, once found: captures are off
        self._checking = threading.Lock()  # captures are written in threads: one finds the refusal, and says it

    @property
    def usable(self) -> bool:
        return self._refused is None

    async def write(self, capture: Capture) -> str | None:
        """The capture's file name, once written."""
        return await trio.to_thread.run_sync(self._write, capture)

    def _write(self, capture: Capture) -> str | None:
        with self._checking:
            if self._refused is not None:
                return
            try:
                private_directory(self.path)  # like the store's: nobody else can plant or read a capture
            except (OSError, ValueError) as exc:
                self._refused = str(exc)
                log.warning("CAPTURE_DIR cannot be used, captures are off in this worker: %s", exc)
                return
        # A name nobody can guess (the request id shows in every response): nothing can be planted there.
        name = f"{CAPTURE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{capture.id}-{secrets.token_hex(8)}.json"
        try:
            data = json.dumps(capture.document(), indent=1).encode()
            partial = self.path / (name + ".partial")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with open(fd, "wb") as f:
                f.write(data)
            partial.replace(self.path / name)  # a reader never sees half a capture
        except Exception as exc:  # a full disk, an odd request: the exchange is not the worse for it
            log.warning("capture %s not written: %s", name, exc)
            return
        self._prune()
        log.info("captured (%s) in %s", ", ".join(sorted(capture.reasons)), self.path / name)
        return name

    def _prune(self) -> None:
        """The oldest of kimiproxy's own captures go (regular files of this user's named like one, whatever
        else is there), each on its own: one that cannot be removed does not keep the rest."""
        files = []
        for file in self.path.glob(CAPTURE_PREFIX + "*.json"):
            with contextlib.suppress(OSError):  # another worker's prune got there first
                st = os.lstat(file)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                    files.append((st.st_mtime, file.name, st.st_size, file))
        files.sort()
        total = sum(size for _, _, size, _ in files)
        for count, (_, _, size, file) in zip(range(len(files), 0, -1), files):
            if count <= self.max_files and total <= self.max_bytes:
                break
            try:
                file.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("capture %s not pruned: %s", file, exc)
            total -= size


def stream_messages(body: bytes) -> list[dict]:
    """A streamed chat completion as a client reads it: each choice's final message (``Message.as_dict``),
    then any error event."""
    texts: dict[int, dict] = {}
    errors = []
    decoder = SSEDecoder()
    for data in decoder.decode(body) + decoder.flush():
        try:
            event = json_loads(data) if data != b"[DONE]" else {}
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if "error" in event:
            errors.append(event["error"])
        for choice in event.get("choices") or ():
            m = texts.setdefault(choice.get("index", 0), {"content": "", "reasoning": "", "calls": {}, "finish": None})
            delta = choice.get("delta") or {}
            m["content"] += delta.get("content") or ""
            m["reasoning"] += delta.get("reasoning_content") or delta.get("reasoning") or ""
            for tc in delta.get("tool_calls") or ():
                call = m["calls"].setdefault(tc.get("index", 0), [None, None, ""])
                function = tc.get("function") or {}
                call[0] = tc.get("id") or call[0]
                call[1] = function.get("name") or call[1]
                call[2] += function.get("arguments") or ""
            m["finish"] = choice.get("finish_reason") or m["finish"]
    finals = [Message(m["content"], m["reasoning"], tuple(map(tuple, m["calls"].values())), m["finish"], i)
              for i, m in sorted(texts.items())]
    return [final.as_dict() for final in finals] + [{"error": e} for e in errors]


def completion_messages(completion: dict) -> list[dict]:
    return [Message.of_choice(choice, m, i).as_dict() for i, (choice, m) in enumerate(_choices(completion))]


def anthropic_messages(body: bytes, stream: bool) -> list[dict]:
    """What an Anthropic client read, streamed or whole, as ``stream_messages`` gives it (the calls'
    ids as SGLang knows them, their input as JSON text), then any error event."""
    if not stream:
        message = json_loads(body)
        events = [("message_start", {"message": dict(message, content=[])})]
        for at, block in enumerate(message.get("content") or ()):
            events.append(("content_block_start", {"index": at, "content_block": block}))
            if block.get("type") == "tool_use":
                events.append(("content_block_delta", {"index": at, "delta": {"partial_json": _dumps(block["input"])}}))
        events.append(("message_delta", {"delta": {"stop_reason": message.get("stop_reason")}}))
    else:
        events = []
        for frame in body.split(b"\n\n"):
            kind, _, data = frame.partition(b"\ndata: ")
            with contextlib.suppress(ValueError):
                events.append((kind.removeprefix(b"event: ").decode(), json_loads(data)))
    blocks: dict[int, dict] = {}
    errors, stop = [], None
    for kind, event in events:
        if kind == "content_block_start":
            blocks[event["index"]] = dict(event["content_block"], partial="")
        elif kind == "content_block_delta":
            block, delta = blocks[event["index"]], event["delta"]
            for field, into in (("thinking", "thinking"), ("text", "text"), ("partial_json", "partial")):
                if isinstance(delta.get(field), str):
                    block[into] = block.get(into, "") + delta[field]
        elif kind == "message_delta":
            stop = event["delta"].get("stop_reason")
        elif kind == "error":
            errors.append(event.get("error"))
    of = [b for _, b in sorted(blocks.items())]
    calls = tuple((call_id_of(b.get("id")), b.get("name"), b["partial"]) for b in of if b.get("type") == "tool_use")
    final = Message("".join(b.get("text", "") for b in of if b.get("type") == "text"),
                    "".join(b.get("thinking", "") for b in of if b.get("type") == "thinking"), calls, stop)
    return [final.as_dict()] + [{"error": e} for e in errors]


def replay_capture(capture: dict) -> tuple[list[dict], list[dict]]:
    """(what the client got then, what it gets now), as each choice's final message."""
    if capture.get("truncated"):
        raise ValueError("the capture is truncated (CAPTURE_EXCHANGE_BYTES): it cannot be replayed")
    request = capture["request"]
    ctx = RepairContext.from_request(request if isinstance(request, dict) else {"messages": []})
    events = [data.encode() for _, data in capture["upstream_events"]]
    if capture.get("protocol") == "anthropic":
        then = anthropic_messages(capture["client"].encode(), capture["stream"])
        if not capture["stream"]:
            completion = json_loads(events[0])
            repair_completion(completion, ctx)
            return then, anthropic_messages(AnthropicMessages("replay").reply(completion, True, b""), False)
        encoder = AnthropicStream(ctx, "replay", "", None)
        frames = [encoder.opening()] + [frame for data in events for frame in encoder.feed(data)]
        error = capture.get("upstream_broke_off")  # then ended with this error event, not message_stop
        if error:
            protocol = AnthropicMessages("replay")
            frames += encoder.broken_off() + [protocol.error_frame(protocol.error(UpstreamError(
                error.get("message", ""), error.get("code")))[1])]
        return then, anthropic_messages(b"".join(frames + encoder.close()), True)
    if capture["stream"]:
        repair = StreamRepair(ctx)
        frames = [frame for data in events for frame in repair.feed(data)] + repair.close()
        error = capture.get("upstream_broke_off")  # the stream ended with this error event, not [DONE]
        now = stream_messages(b"".join(frames)) + ([{"error": error}] if error else [])
        return stream_messages(capture["client"].encode()), now
    completion = json_loads(events[0])
    repair_completion(completion, ctx)
    return completion_messages(json_loads(capture["client"])), completion_messages(completion)


def replay(paths: list[str]) -> int:
    """``python kimiproxy.py replay FILE...``: today's repair over each capture's upstream events,
    offline; prints what a client gets now and, where it differs, the difference from what it got then.
    Exit status 1 when any differs, 2 when a file is not a capture."""
    status = 0
    for path in paths:
        try:
            then, now = replay_capture(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            print(f"{path}: not a kimiproxy capture, or a truncated one: {type(exc).__name__}: {exc}")
            status = 2
            continue
        old, new = (json.dumps(m, indent=2, ensure_ascii=False).splitlines() for m in (then, now))
        print(f"{path}: {'same as' if old == new else 'differs from'} what the client got then")
        print("\n".join(new))
        if old != new:
            status = status or 1
            print("\n".join(difflib.unified_diff(old, new, "then", "now", lineterm="")))
    return status


# ---------------------------------------------------------------------------------------------------
# Fair use: each key's requests in flight, requests and tokens, limited across the workers of a box
# ---------------------------------------------------------------------------------------------------

MINUTE = 60.0  # seconds: the window of requests_per_minute and tokens_per_minute
DAY = 86400.0  # seconds: the window of tokens_per_day, counted in minutes (a minute's tokens leave it whole)
# Another worker's request that ends sends no news to this one: a request waiting for a slot looks at the
# shared state again this often (one short transaction), and at once when a request of this worker ends.
QUEUE_POLL = 0.25  # seconds
# When one of the key's requests in flight will end nobody can tell: the client is told to try again soon.
RETRY_AFTER_CONCURRENT = 1  # seconds
LIMITS_PRUNE_EVERY = 200  # requests ended, per worker, between removing the minutes that left the day


class RateLimited(ProxyError):
    """A key over one of its limits: 429 with Retry-After. In OpenAI's shape it is OpenAI's own rate-limit
    error (``type`` "requests" or "tokens", ``code`` "rate_limit_exceeded"), which its SDKs raise as
    RateLimitError (as every 429); in Anthropic's, ``rate_limit_error``."""
    status = 429

    def __init__(self, key: str, limit: str, value: int, used: int, retry_after: int) -> None:
        what = {"concurrent": "requests in flight", "requests_per_minute": "requests in the last minute",
                "tokens_per_minute": "tokens in the last minute", "tokens_per_day": "tokens in the last day"}[limit]
        super().__init__(f"rate limit: key {key!r} has {used} {what}, its limit is {value} ({limit}); retry "
                         f"after {retry_after} s")
        self.limit = limit
        self.error_type = "tokens" if limit.startswith("tokens") else "requests"
        self.headers = ((b"retry-after", str(retry_after).encode()),)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": None,
                          "code": "rate_limit_exceeded"}}


def limits_store(reasoning_store: str) -> str:
    """The limits' SQLite file: beside the reasoning store, named after it (``reasoning.limits.sqlite3``),
    so what decides who shares the one decides who shares the other."""
    path = Path(reasoning_store)
    return str(path.with_name(path.stem + ".limits" + (path.suffix or ".sqlite3")))


def owner_alive(owner: str) -> bool:
    """Whether the process ``pid:start`` (Registration's pair: a pid reused by a later process is not
    it) still runs: a slot it held is free once it does not."""
    pid, _, start = owner.partition(":")
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):  # another user's process (its pid reused): not it
        return False
    return process_start(int(pid)) == start


def _retry_after(leaving: Iterable[tuple[float, int]], used: int, limit: int, now: float) -> int:
    """Seconds until ``used`` falls under ``limit`` as the counted amounts leave their window, each at
    its time (in order); at least 1."""
    for at, amount in leaving:
        used -= amount
        if used < limit:
            return max(1, math.ceil(at - now))
    return 1


class FairUse(SharedFile):
    """The shared state of the limits: in a SQLite file beside the reasoning store that every worker on
    the box shares, as the store is (the same file checks: Exposing it safely, Files). A request with
    limits costs two short transactions, each in a worker thread: one when it starts (is the key under
    its limits? then it takes a slot and counts a request), one when it ends (the slot freed, its tokens
    counted). A slot belongs to a process (pid and start): a worker that dies leaves slots that the next
    look frees. Nothing opens the file until a key with limits sends a request. If the file cannot be
    used, the limits are off in this worker, with a warning: fair use, not access control."""

    what, off = "limits file", "fair use limits are off"

    def __init__(self, settings: Settings, clock: Any = time.time) -> None:
        super().__init__(limits_store(settings.reasoning_store or default_store()))
        # The default file is every instance's of this user: each (port) keeps its own counts in it, as
        # the reasoning store does. A REASONING_STORE given is shared by whoever is given it.
        self.per_port = not settings.reasoning_store
        self.clock = clock  # wall-clock seconds: the file outlives processes
        self._owner = ""
        self._ends = 0
        self._freed = trio.Event()  # set (and replaced) whenever a request of this worker ends
        # Releases the file refused (busy past its timeout): done with the next transaction, else their
        # slots would count against their keys for the worker's whole life (a live owner's are never pruned).
        self._unreleased: list[tuple[str, str, int, int]] = []

    def where(self, scope: dict) -> str:
        """Whose counts: every instance's sharing the file, or this port's."""
        return f"port {(scope.get('server') or (None, None))[1]}" if self.per_port else ""

    async def admit(self, where: str, key: str, limits: Limits) -> int | None:
        """A slot for a request of ``key``, or RateLimited. Over ``concurrent`` it waits up to
        ``limits.queue_seconds`` for one; over the others it is refused at once (a request that waits
        cannot make a minute pass sooner). None: the file cannot be used, and the request goes on."""
        if self._unreleased:
            await self._release_pending([])
        deadline = trio.current_time() + limits.queue_seconds
        waited = False
        while True:
            freed = self._freed
            # Shielded: a transaction that took a slot must get it to the exchange, which frees it. No
            # checkpoint stands between here and the exchange's assignment.
            with trio.CancelScope(shield=True):
                answer = await trio.to_thread.run_sync(self._run, self._admit, where, key, limits,
                                                       limiter=self._limiter)
            if answer is None or isinstance(answer, int):
                return answer
            if answer.limit != "concurrent" or trio.current_time() >= deadline:
                raise answer
            if not waited:
                waited = True
                log.info("fair use: key %s has %d requests in flight (concurrent): waiting up to %gs for one to end",
                         key, limits.concurrent, limits.queue_seconds)
            with trio.move_on_at(min(deadline, trio.current_time() + QUEUE_POLL)):
                await freed.wait()

    async def release(self, where: str, key: str, slot: int, tokens: int) -> None:
        await self._release_pending([(where, key, slot, tokens)])
        self._freed.set()
        self._freed = trio.Event()

    async def _release_pending(self, releases: list[tuple[str, str, int, int]]) -> None:
        pending, self._unreleased = self._unreleased + releases, []
        done = await trio.to_thread.run_sync(self._run, self._release, pending, limiter=self._limiter)
        if done is not True and self.refused is None:  # (a file that cannot be used holds no slots to free)
            self._unreleased = pending + self._unreleased

    async def report(self, where: str, limits: dict[str, Limits]) -> dict:
        """GET /: each key's use against its limits, from the shared state (every worker's)."""
        use = await trio.to_thread.run_sync(self._run, self._use, where, limiter=self._limiter) or {}
        return {name: {"limits": key_limits.shown(), "use": use.get(name, {
            "in_flight": 0, "requests_last_minute": 0, "tokens_last_minute": 0, "tokens_last_day": 0})}
            for name, key_limits in limits.items()}

    def _open(self) -> sqlite3.Connection:
        # This user's alone: another user who could write these files could free anyone's slots, or fill a
        # key's day. Autocommit: each operation is one explicit transaction (BEGIN IMMEDIATE takes the write
        # lock first, so two workers never both see the last slot free).
        db = self._connect(isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")  # a power cut may forget the last counts: every process with them too
        db.execute("CREATE TABLE IF NOT EXISTS slots (id INTEGER PRIMARY KEY, scope TEXT NOT NULL, key TEXT NOT NULL, "
                   "owner TEXT NOT NULL, since REAL NOT NULL)")
        db.execute("CREATE INDEX IF NOT EXISTS slots_key ON slots (scope, key)")
        # The last minute: requests admitted and tokens of requests ended, per key and second (at most 60
        # rows a key, whatever the rate: a look at it costs the same at 1 request a minute and at 500 a second).
        db.execute("CREATE TABLE IF NOT EXISTS recent (scope TEXT NOT NULL, key TEXT NOT NULL, second INTEGER NOT NULL, "
                   "requests INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (scope, key, second))")
        # The last day: tokens per key and minute (at most 1,440 rows a key).
        db.execute("CREATE TABLE IF NOT EXISTS daily (scope TEXT NOT NULL, key TEXT NOT NULL, minute INTEGER NOT NULL, "
                   "tokens INTEGER NOT NULL, PRIMARY KEY (scope, key, minute))")
        self._owner = f"{os.getpid()}:{process_start(os.getpid())}"
        return db

    def _admit(self, db: sqlite3.Connection, where: str, key: str, limits: Limits) -> int | RateLimited:
        now = self.clock()
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM recent WHERE scope = ? AND key = ? AND second <= ?", (where, key, now - MINUTE))
        refused = self._over(db, where, key, limits, now)
        slot: int | RateLimited = refused if refused is not None else 0
        if refused is None:
            db.execute("INSERT INTO recent VALUES (?, ?, ?, 1, 0) ON CONFLICT (scope, key, second) DO UPDATE SET "
                       "requests = requests + 1", (where, key, math.floor(now)))
            slot = db.execute("INSERT INTO slots (scope, key, owner, since) VALUES (?, ?, ?, ?)",
                              (where, key, self._owner, now)).lastrowid or 0
        db.execute("COMMIT")  # a refusal too: the dead processes' slots it found stay freed
        return slot

    def _over(self, db: sqlite3.Connection, where: str, key: str, limits: Limits, now: float) -> RateLimited | None:
        """The first limit the key is at or over, as its refusal. Tokens first: waiting for a slot is no
        use to a key that has spent its tokens."""
        # Sums first, the rows only for a refusal's Retry-After: the common answer is one row of SQLite's.
        if limits.tokens_per_day is not None:
            first = math.floor((now - DAY) / MINUTE)  # the oldest minute still (partly) in the last day
            (used,), = db.execute("SELECT COALESCE(SUM(tokens), 0) FROM daily WHERE scope = ? AND key = ? AND "
                                  "minute >= ?", (where, key, first))
            if used >= limits.tokens_per_day:
                rows = db.execute("SELECT minute, tokens FROM daily WHERE scope = ? AND key = ? AND minute >= ? "
                                  "ORDER BY minute", (where, key, first))
                leaving = (((minute + 1) * MINUTE + DAY, tokens) for minute, tokens in rows)
                return RateLimited(key, "tokens_per_day", limits.tokens_per_day, used,
                                   _retry_after(leaving, used, limits.tokens_per_day, now))
        if limits.tokens_per_minute is not None or limits.requests_per_minute is not None:
            # A second's requests and tokens leave the minute together, at the second's start + 60 s.
            sums = db.execute("SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(tokens), 0) FROM recent WHERE "
                              "scope = ? AND key = ?", (where, key)).fetchone()
            for limit, column in (("requests_per_minute", "requests"), ("tokens_per_minute", "tokens")):
                value = getattr(limits, limit)
                used = sums[column == "tokens"]
                if value is not None and used >= value:
                    rows = db.execute(f"SELECT second, {column} FROM recent WHERE scope = ? AND key = ? ORDER BY "
                                      "second", (where, key))
                    leaving = ((second + MINUTE, amount) for second, amount in rows)
                    return RateLimited(key, limit, value, used, _retry_after(leaving, used, value, now))
        if limits.concurrent is not None:
            owners = db.execute("SELECT owner, COUNT(*) FROM slots WHERE scope = ? AND key = ? GROUP BY owner",
                                (where, key)).fetchall()
            dead = [owner for owner, _ in owners if owner != self._owner and not owner_alive(owner)]
            if dead:  # every key's slots of a process that is gone
                db.execute(f"DELETE FROM slots WHERE owner IN ({','.join('?' * len(dead))})", dead)
                log.info("fair use: freed the slots of %d process(es) that ended without freeing them", len(dead))
            in_flight = sum(count for owner, count in owners if owner not in dead)
            if in_flight >= limits.concurrent:
                return RateLimited(key, "concurrent", limits.concurrent, in_flight, RETRY_AFTER_CONCURRENT)
        return None

    def _release(self, db: sqlite3.Connection, releases: list[tuple[str, str, int, int]]) -> bool:
        now = self.clock()
        db.execute("BEGIN IMMEDIATE")
        for where, key, slot, tokens in releases:
            db.execute("DELETE FROM slots WHERE id = ?", (slot,))
            if tokens > 0:
                db.execute("INSERT INTO recent VALUES (?, ?, ?, 0, ?) ON CONFLICT (scope, key, second) DO UPDATE "
                           "SET tokens = tokens + excluded.tokens", (where, key, math.floor(now), tokens))
                db.execute("INSERT INTO daily VALUES (?, ?, ?, ?) ON CONFLICT (scope, key, minute) DO UPDATE SET "
                           "tokens = tokens + excluded.tokens", (where, key, math.floor(now / MINUTE), tokens))
        if self._ends % LIMITS_PRUNE_EVERY == 0:  # every key's, also of keys that send no more requests
            db.execute("DELETE FROM daily WHERE minute < ?", (math.floor((now - DAY) / MINUTE),))
            db.execute("DELETE FROM recent WHERE second <= ?", (now - MINUTE,))
        self._ends += 1
        db.execute("COMMIT")
        return True

    def _use(self, db: sqlite3.Connection, where: str) -> dict[str, dict[str, int]]:
        now = self.clock()
        use: dict[str, dict[str, int]] = {}

        def of(key: str) -> dict[str, int]:
            return use.setdefault(key, {"in_flight": 0, "requests_last_minute": 0, "tokens_last_minute": 0,
                                        "tokens_last_day": 0})

        alive: dict[str, bool] = {}
        for key, owner, count in db.execute("SELECT key, owner, COUNT(*) FROM slots WHERE scope = ? "
                                            "GROUP BY key, owner", (where,)):
            if owner == self._owner or alive.setdefault(owner, owner_alive(owner)):
                of(key)["in_flight"] += count
        for key, requests, tokens in db.execute("SELECT key, SUM(requests), SUM(tokens) FROM recent WHERE scope = ? "
                                                "AND second > ? GROUP BY key", (where, now - MINUTE)):
            of(key).update(requests_last_minute=requests, tokens_last_minute=tokens)
        for key, tokens in db.execute("SELECT key, SUM(tokens) FROM daily WHERE scope = ? AND minute >= ? GROUP BY key",
                                      (where, math.floor((now - DAY) / MINUTE))):
            of(key)["tokens_last_day"] = tokens
        return use


# ---------------------------------------------------------------------------------------------------
# What the exchanges share
# ---------------------------------------------------------------------------------------------------

NO_KEY = "anonymous"  # the key name of every request when PROXY_API_KEY is not set


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.") or host.startswith("::ffff:127.")


class Collector:
    """Full garbage collections: once the proxy has been idle for ``idle_after`` seconds, or after
    ``every`` finished requests when it never is.

    Each connection leaves about 80 objects in reference cycles (Hypercorn's protocol objects, h11's
    connection, trio's tasks and cancel scopes). A stream lives long enough for them to reach the
    oldest generation, which CPython collects only after millions of allocations (GC_THRESHOLD makes
    that rarer still): left to it, the worker's memory grows with every burst. Collecting when
    nothing is in flight pauses no request; under constant load one pause per ``every`` requests
    bounds the garbage (measured: about 1 ms after small requests, 50-75 ms with 500 streams open)."""

    def __init__(self, idle_after: float = IDLE_COLLECT_AFTER, every: int = COLLECT_EVERY,
                 collect: Any = gc.collect) -> None:
        self.idle_after, self.every, self.collect = idle_after, every, collect
        self.in_flight = 0
        self.finished = 0  # since the last collection
        self._due = trio.Event()

    def begin(self) -> None:
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
        self.finished += 1
        if not self.in_flight or self.finished >= self.every:
            self._due.set()

    async def run(self) -> None:
        while True:
            await self._due.wait()
            self._due = trio.Event()
            if self.finished < self.every:  # the proxy went idle: is it staying so?
                await trio.sleep(self.idle_after)
                if self.in_flight or self._due.is_set():
                    continue
            self.finished = 0
            self.collect()


class Routing:
    """One configuration as the exchanges use it: the upstreams, which one serves which model, each
    model's request fields and the access keys. Built at start-up and at each reload and never changed
    after: an Exchange takes the one in force when it begins and keeps it to its end, so a stream
    finishes with the configuration it began with. Without a configuration file: the one upstream of
    SGLANG_API_BASE takes every request, and /v1/models is passed through, as without routing."""

    def __init__(self, upstreams: list[Upstream], api_keys: tuple[tuple[str, str], ...],
                 file: FileConfig | None = None) -> None:
        self.upstreams = upstreams
        self.api_keys = api_keys
        self.file = file
        self.by_model = {model: upstream for upstream in upstreams for model in upstream.models}
        named = {upstream.name: upstream for upstream in upstreams}
        self.default = named.get(file.default_upstream) if file is not None else upstreams[0]
        # The pass-through routes (/v1/completions, /v1/embeddings...) are relayed unread, so no model
        # routes them: the default upstream takes them, else the first the file lists.
        self.passthrough = self.default or upstreams[0]
        self.fields = dict(file.models) if file is not None else {}
        self.loaded_at = int(time.time())  # /v1/models' "created"
        # Fair use: the limits of each key name that has any. Empty without the file's "limits": then
        # no request touches the limits' file (FairUse).
        self.limits = self._limits(file)

    def _limits(self, file: FileConfig | None) -> dict[str, Limits]:
        if file is None or not file.limits:
            return {}
        names = [name for name, _ in self.api_keys] or [NO_KEY]  # without keys, every request is NO_KEY's
        for name, _ in file.limits:
            if name != DEFAULT_LIMITS and name not in names:
                raise ConfigError(f"{file.path}: limits.{name[:64]}: no key has this name (the keys: "
                                  f"{', '.join(names)}; or {DEFAULT_LIMITS}, for every key)")
        every = {name: limits_of(file.limits, name) for name in names}
        return {name: limits for name, limits in every.items() if limits}

    def route(self, model: Any) -> Upstream:
        """The upstream for a chat request's model; an unknown one goes to the default upstream, or is a 404."""
        upstream = self.by_model.get(model) if isinstance(model, str) else None
        if upstream is None:
            upstream = self.default
        if upstream is None:
            shown = repr(model[:100]) if isinstance(model, str) else "none"
            raise ClientError(f"model {shown} is not served here: GET /v1/models lists the models", 404)
        return upstream

    def model(self, model_id: str) -> dict | None:
        upstream = self.by_model.get(model_id)
        return None if upstream is None else {"id": model_id, "object": "model", "created": self.loaded_at,
                                              "owned_by": upstream.name}

    def models(self) -> dict:
        """GET /v1/models: the ids the file lists, each with the upstream that serves it (``owned_by``),
        in the file's order. The configured ids, not each upstream's own answer: an upstream that is down
        or slow leaves the list as it is, and a client sees only the ids it can use."""
        return {"object": "list", "data": [self.model(m) for u in self.upstreams for m in u.models]}


def reload_summary(old: Routing, new: Routing) -> str:
    """What a reload changed, in counts: ``upstreams 2 (1 added, 0 removed, 1 changed); models 3 ...``."""
    def counts(label: str, before: dict, after: dict, changed: str = "changed") -> str:
        added = sum(1 for k in after if k not in before)
        removed = sum(1 for k in before if k not in after)
        differ = sum(1 for k in after if k in before and before[k] != after[k])
        return f"{label} {len(after)} ({added} added, {removed} removed, {differ} {changed})"

    def upstreams(routing: Routing) -> dict:
        return {u.name: (u.url, u.api_key, u.credentials) for u in routing.upstreams}

    def served(routing: Routing) -> dict:
        return {m: u.name for m, u in routing.by_model.items()}

    def keys(routing: Routing) -> dict:
        return dict(routing.api_keys)

    parts = [counts("upstreams", upstreams(old), upstreams(new)), counts("models", served(old), served(new), "moved"),
             counts("model fields", old.fields, new.fields), counts("keys", keys(old), keys(new))]
    if old.limits or new.limits:  # keys with limits (fair use)
        parts.append(counts("limits", old.limits, new.limits))
    before, after = (r.default.name if r.default is not None else "none" for r in (old, new))
    if before != after:
        parts.append(f"default upstream {before} -> {after}")
    return "; ".join(parts)


class Proxy:
    """What every exchange shares: the settings, the configuration in force (``routing``: the upstreams,
    the models, the access keys; replaced whole by a reload), the connections to the upstreams, the
    metrics, and the count of requests in flight (the garbage collector's clock, in a serving process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections = UpstreamConnections(settings)
        self.routing = self._routing(load_config_file(settings.config_file) if settings.config_file else None)
        self.registration: Registration | None = None  # with a configuration file, in a serving process
        self._nursery: trio.Nursery | None = None  # where the upstreams' parser watchers run
        self.metrics = Metrics()
        self.collector: Collector | None = None
        self.reasoning = ReasoningStore(settings) if settings.restore_reasoning and settings.repair else None
        self.captures = CaptureDir(settings) if settings.capture_dir else None
        self.fair_use = FairUse(settings)  # opens its file only for a key with limits
        self._exposure_checked = False
        self.bodies_held = 0  # bytes of request body the exchanges in flight hold (hold_body)
        self._host_names = frozenset({socket.gethostname().lower(), *settings.allowed_hosts})  # see check_host
        self.activity = Activity(settings)  # what the page shows

    @property
    def upstream(self) -> Upstream:
        """The upstream of the pass-through routes (without a configuration file, the only one)."""
        return self.routing.passthrough

    def _routing(self, file: FileConfig | None, old: Routing | None = None) -> Routing:
        if file is None:
            return Routing([Upstream(self.settings, self.connections)], self.settings.api_keys)
        keys = file.api_keys if file.api_keys is not None else self.settings.api_keys
        known = {u.url: u.parsers for u in old.upstreams} if old is not None else {}
        upstreams = []
        for config in file.upstreams:
            upstream = Upstream(self.settings, self.connections, config, client_keys=bool(keys))
            upstream.parsers = known.get(upstream.url)  # asked once per upstream, not once per reload
            upstreams.append(upstream)
        return Routing(upstreams, keys, file)

    def watch_upstreams(self, nursery: trio.Nursery) -> None:
        """Ask each upstream whose parsers are not known yet for them (Upstream.watch_parsers)."""
        self._nursery = nursery
        for upstream in self.routing.upstreams:
            if upstream.parsers is None:
                nursery.start_soon(upstream.watch_parsers)

    def reload(self) -> str:
        """Read the configuration file again and put it in force for the exchanges that begin from now
        on; those in flight keep theirs (Exchange.routing). A file that does not validate changes
        nothing: one ERROR line says why. Returns what happened, in one line (for ``reload``)."""
        assert self.routing.file is not None
        path = self.routing.file.path
        try:
            routing = self._routing(load_config_file(path), self.routing)  # limits name keys: checked here
        except ConfigError as exc:
            log.error("configuration not reloaded, the running one stays: %s", exc)
            return f"refused: {exc}"
        except Exception as exc:  # whatever a file that validated still breaks: never the serving worker
            log.error("configuration not reloaded, the running one stays: %s: %s", type(exc).__name__, exc)
            return f"refused: {type(exc).__name__}: {exc}"
        old, self.routing = self.routing, routing
        for upstream in old.upstreams:
            upstream.retire()
        if self._nursery is not None:
            self.watch_upstreams(self._nursery)
        summary = reload_summary(old, self.routing)
        log.info("configuration reloaded from %s: %s", path, summary)
        return f"reloaded: {summary}"

    async def reload_on_sighup(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """In a serving process with a configuration file: each SIGHUP reloads it (several at once, one
        reload). The process registers for ``python kimiproxy.py reload`` only once the handler is in
        place: SIGHUP's default would kill it."""
        assert self.routing.file is not None
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            self.registration = Registration(self.routing.file.path)
            self.registration.write()
            task_status.started()
            async for _ in signals:
                self.registration.write(self.reload())

    def hold_body(self, size: int) -> None:
        """Count ``size`` more bytes of request body held by this worker, or refuse with a 503 past
        MAX_BODIES_MB: a few clients each sending a maximal body at once must not take the box's memory."""
        if self.bodies_held + size > self.settings.max_bodies_mb * 1024 * 1024:
            err = ProxyError(f"kimiproxy is holding {self.settings.max_bodies_mb:g} MiB of request bodies "
                             "(MAX_BODIES_MB): retry shortly", 503)
            err.headers = ((b"retry-after", str(RETRY_AFTER_BUSY).encode()),)
            raise err
        self.bodies_held += size

    def release_body(self, size: int) -> None:
        self.bodies_held -= size

    def begin(self) -> None:
        if self.collector is not None:
            self.collector.begin()

    def end(self) -> None:
        if self.collector is not None:
            self.collector.end()

    def check_host(self, scope: dict, keys: tuple[tuple[str, str], ...] | None = None) -> None:
        """Without access keys (``keys``: the exchange's, else those in force), the Host a request names
        must be an IP address, localhost, this machine's name or one in ALLOWED_HOSTS: a web page whose
        own name was made to resolve to 127.0.0.1 (DNS rebinding) names its own host, and is refused.
        With keys, such a page has none."""
        if (self.routing.api_keys if keys is None else keys) or "*" in self.settings.allowed_hosts:
            return
        host = next((v for k, v in scope["headers"] if k == b"host"), None)
        if host is None:
            return  # HTTP/1.0 without Host: no browser sends that
        name = host.decode("latin-1").strip().lower()
        name = name[1:name.index("]")] if name.startswith("[") and "]" in name else name.rpartition(":")[0] or name
        try:
            ipaddress.ip_address(name)
            return
        except ValueError:
            pass
        if name == "localhost" or name.endswith(".localhost") or name in self._host_names:
            return
        raise ClientError(f"this kimiproxy has no PROXY_API_KEY and answers only to IP addresses, localhost and "
                          f"its own host name, not {name[:64]!r}: set PROXY_API_KEY, or add the name to "
                          f"ALLOWED_HOSTS", 403)

    def authorise(self, scope: dict, keys: tuple[tuple[str, str], ...] | None = None) -> str:
        """With access keys (PROXY_API_KEY, or the file's ``keys``): ``Authorization: Bearer <one of the
        keys>``, compared in constant time with every key, or a 401; returns the key's name. Without,
        a warning once if the proxy answers on a non-loopback address: anyone there can use the GPU.
        ``keys``: the exchange's, else those in force."""
        keys = self.routing.api_keys if keys is None else keys
        if not keys:
            if not self._exposure_checked:
                self._exposure_checked = True
                host = (scope.get("server") or ("", 0))[0]
                if not _is_loopback(host):
                    log.warning("kimiproxy is reachable on %s without PROXY_API_KEY: anyone on the network can "
                                "use the GPU. Set PROXY_API_KEY, or bind to 127.0.0.1.", host)
            return NO_KEY
        presented = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = presented[7:].strip() if presented[:7].lower() == b"bearer " else \
            next((v.strip() for k, v in scope["headers"] if k == b"x-api-key"), b"")  # Anthropic's clients
        matched = None
        for name, key in keys:
            if hmac.compare_digest(token, key.encode()):
                matched = name
        if matched is None:
            err = ClientError("invalid or missing API key: send Authorization: Bearer <PROXY_API_KEY> "
                              "(or x-api-key: <PROXY_API_KEY>)", 401)
            err.error_type = "authentication_error"
            raise err
        return matched

    def report_repairs(self, repairs: list[ChoiceRepair], rules: Counter[str] | None = None) -> int:
        """One log line per call that needed a repair (what, from where, by which rules), one for the
        text-level repairs, and the metrics. Returns the number of repairs; ``rules`` counts them by rule
        (a call recovered from markup that needed nothing more counts as ``markup``)."""
        metrics = self.metrics
        total = 0
        for repair in repairs:
            for call in repair.sent:
                if call.channel == "tool_calls" and not call.rules:
                    continue  # a structured call that needed nothing
                channel = CHANNEL_FIELDS[call.channel]
                log.info("repair: %s tool call %s (%s) from %s by rules [%s]",
                         "repaired" if call.channel == "tool_calls" else "recovered", call.id, call.name, channel,
                         ", ".join(call.rules) or "markup")
                if "arguments-not-json" in call.rules:
                    log.warning("repair: arguments of %s are not JSON and could not be repaired; passed on "
                                "as written", call.id)
                if call.channel != "tool_calls":
                    metrics.inc("kimiproxy_tool_calls_recovered_total", channel=channel)
                for rule in call.rules:
                    metrics.inc("kimiproxy_repairs_total", rule=rule)
                if rules is not None:
                    rules.update(call.rules or ("markup",))
                total += len(call.rules) or 1
            text_repairs = repair.repairs()
            if text_repairs:
                log.info("repair: text %s", ", ".join(f"{k}={v}" for k, v in sorted(text_repairs.items())))
            for rule, count in text_repairs.items():
                metrics.inc("kimiproxy_repairs_total", count, rule=rule)
                total += count
            if rules is not None:
                rules.update(text_repairs)
        return total


# ---------------------------------------------------------------------------------------------------
# One exchange: a request from its first byte in to its last byte out
# ---------------------------------------------------------------------------------------------------

class Reply(enum.Enum):
    """Where the response to the client stands: one value, written by ``_start``, ``_body`` and
    ``client_left``, read by ``_fail`` to decide what an error can still be."""
    PENDING = "pending"  # nothing sent: an error is still a status and a JSON body
    BODY = "body"  # a response other than an event stream has begun: an error can only cut it short
    STREAM = "stream"  # an event stream has begun: an error is an error event, then the end
    DONE = "done"  # the whole response went out
    GONE = "gone"  # the client left before the end


@dataclasses.dataclass(slots=True)
class _Last:
    """The last frames of a stream: the response ends with them."""
    data: bytes


class _Frames:
    """A stream's frames on their way from the relay to the writer: a memory channel STREAM_QUEUE
    deep (the relay closes ``sender`` when it is done, the writer ``receiver`` when it leaves), and
    how many of them wait in it, so the writer takes all that piled up without asking the channel:
    its ``statistics()`` builds an object per call, 8 % of the proxy's instructions per chunk
    (valgrind, fast stream)."""

    def __init__(self) -> None:
        self.sender, self.receiver = trio.open_memory_channel(STREAM_QUEUE)
        # Counted once in, and by the writer as it takes one: an item moved into the channel while its
        # sender waited for room is counted when that sender runs again, so this may be below zero for a
        # moment, never above what the channel holds (the writer reads it after counting its own take).
        self.waiting = 0
        self.put_at = trio.current_time()  # when the last item went in (or the stream began)
        self.ended = trio.Event()  # set by the writer when the response has ended

    async def put(self, item: Any) -> None:
        """To the writer, without a checkpoint while there is room: httpx yields the events of one
        socket read one by one without one either, so a burst piles up and goes out in one write, not
        one per event (3x less CPU per event, benchmark); a paced event goes out at once, the writer
        wakes as the relay waits for the upstream."""
        try:
            try:
                self.sender.send_nowait(item)
            except trio.WouldBlock:
                await self.sender.send(item)
        except trio.BrokenResourceError:  # the writer left (the client has gone): this task is cancelled too
            await trio.lowlevel.checkpoint()
            return
        self.waiting += 1
        self.put_at = trio.current_time()

    async def take(self) -> list:
        """The next item and every frame (bytes) behind it that waits, or [None] once the relay is
        done; what comes after the end (an error, or the last frames) is left for the next take."""
        try:
            items = [await self.receiver.receive()]
        except trio.EndOfChannel:
            return [None]
        self.waiting -= 1
        while type(items[-1]) is bytes and self.waiting > 0:
            items.append(self.receiver.receive_nowait())
            self.waiting -= 1
        return items


_REQUEST_ID_PREFIX = os.urandom(4).hex()  # per process: ids stay unique across workers


_REQUEST_COUNTER = itertools.count(1)


def _request_id(scope: dict) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if re.fullmatch(r"[\w.\-:]{1,128}", candidate):
                return candidate
    return f"{_REQUEST_ID_PREFIX}-{next(_REQUEST_COUNTER):06x}"


class Exchange:
    """One proxied request, and the one owner of everything it uses: its nursery (a watcher for the
    client leaving, a stream's writer), the upstream response, the response to the client, its metrics
    and its one log line. ``run()`` is its whole life: authorise, read and parse, open the upstream,
    relay (stream, whole, or pass-through), finish. Every response starts in ``_start``; "the client is
    gone" is decided in ``client_left``, which cancels the nursery; the upstream is closed in ``run``'s
    clean-up, shielded, whatever happened."""

    def __init__(self, proxy: "Proxy", scope: dict, receive: Any, send: Any, anthropic: str | None = None) -> None:
        self.proxy = proxy
        # The configuration this exchange began with, kept to its end (a reload changes the proxy's).
        self.routing = proxy.routing
        self.backend = self.routing.passthrough  # the upstream it goes to, once its model is known
        self.scope = scope
        self._receive = receive
        self._send = send
        self.id = _request_id(scope)
        # The client's protocol: how its request is read, and its answers and errors written.
        # ``anthropic``: the Messages route it came by ("messages" or "count_tokens").
        self.protocol: OpenAIChat | AnthropicMessages = OpenAIChat() if anthropic is None else \
            AnthropicMessages(self.id, counting=anthropic == "count_tokens")
        self.method, self.path = scope["method"], scope["path"]
        self.target = b""  # the raw path sent upstream, once checked_path let it through
        self._held = 0  # bytes of request body this exchange holds, counted in Proxy.bodies_held
        self.started_at = time.monotonic()
        self.status = 0
        self.bytes = 0
        self.reply = Reply.PENDING  # the response to the client
        self.first_byte: float | None = None  # the upstream's headers, seconds after the start
        self.upstream: httpx.Response | None = None
        self.upstream_closed = False
        self._nursery: trio.Nursery | None = None
        self.key_name = "-"  # the access key's name, once authorised
        self.capture: Capture | None = None  # with CAPTURE_DIR: what happened, for a capture file
        self.usage: Any = None  # the upstream's token counts
        self.repairs = 0
        self.delivered: list[Message] = []  # a stream's choices as the client got them
        self.messages: list = []  # the chat request's, as the client sent them
        self._owner: str | None = None  # whose turns, of which task: the reasoning store's scope (loop_scope)
        self._slot: tuple[str, int] | None = None  # fair use: (whose counts, the slot) this request holds
        # For the page (Activity): the model asked for, the upstream's events so far (about its tokens),
        # the repairs by rule, the capture file written.
        self.model: Any = None
        self.chunks = 0
        self.rules: Counter[str] = Counter()
        self.captured: str | None = None

    @property
    def final_status(self) -> int:
        """The status the log, the metrics and the page give this exchange: 499 when the client left first."""
        return 499 if self.reply is Reply.GONE else self.status

    async def run(self, chat: bool) -> None:
        token = REQUEST_ID.set(self.id)
        self.proxy.begin()
        self.proxy.activity.begin(self)
        try:
            async with trio.open_nursery() as self._nursery:
                try:
                    await self._serve(chat)
                except _ClientGone:
                    self.client_left()
                except ProxyError as err:
                    await self._fail(err)
                except Exception as exc:  # the request boundary: the proxy keeps serving
                    log.exception("%s %s: internal error", self.method, self.path)
                    await self._fail(ProxyError("internal proxy error", detail=f"{type(exc).__name__}: {exc}"))
                self._nursery.cancel_scope.cancel()  # the watcher
        finally:
            await self._close_upstream()
            if self._slot is not None:
                await self._release()
            if self.capture is not None and self.capture.reasons and self.proxy.captures is not None:
                with trio.CancelScope(shield=True):
                    self.captured = await self.proxy.captures.write(self.capture)
            self.proxy.release_body(self._held)
            self._log_end()
            self.proxy.activity.end(self)
            self.proxy.end()
            REQUEST_ID.reset(token)

    async def _serve(self, chat: bool) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("headers %s", redact_headers(self.scope["headers"]))
        self.target = checked_path(self.scope)
        self.proxy.check_host(self.scope, self.routing.api_keys)
        self.key_name = self.proxy.authorise(self.scope, self.routing.api_keys)
        body = await self._read_body()
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_client)
        if self.routing.limits:
            await self._admit(chat)
        if not chat:
            if self.routing.file is not None and self.method == "GET" and (
                    self.path == "/v1/models" or self.path.startswith("/v1/models/")):
                await self._models()
            else:
                await self._passthrough(body)
            return
        if self.proxy.captures is not None:
            self.capture = Capture(self, body)
        protocol = self.protocol
        request = protocol.parse(self.scope, body)
        log.info("%s %s %s", self.method, self.path, summarize_request(request, len(body)))
        model = request.get("model")
        self.model = model
        self.backend = self.routing.route(model)
        if protocol.counting:
            await self._count_tokens(request)
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request body %s", body.decode("utf-8", "replace"))
        settings = self.proxy.settings
        sent, edits = request, []  # ``sent``: the request as the client sent it, to its top-level fields
        fields = self.routing.fields.get(model) if isinstance(model, str) and self.routing.fields else None
        if fields is not None:
            sent = dict(request)
            edits, changed = apply_model_fields(request, fields)
            if changed:
                log.info("model %r: %s", model, changed)
        self.messages = request["messages"]
        edits += await self._restore_reasoning(request)
        rewritten = canonicalize_history(request) if settings.repair else []
        if rewritten:
            log.info("repair: rewrote non-canonical tool-call ids in the history for the upstream")
        ctx = RepairContext.from_request(request, enabled=settings.repair)  # the history as SGLang sees it
        ctx.objects_only = protocol.objects_only
        # A pre-filled <think> is SGLang's to read when it runs a reasoning parser (its force_reasoning);
        # kimiproxy reads it only where the upstream says it runs none (REPAIR.md 4.8).
        parsers = self.backend.parsers
        ctx.think_prefilled &= parsers is not None and not parsers.get("reasoning_parser")
        stream = request.get("stream") is True
        # The usage chunk goes to the client if it asked for it; else kimiproxy asks for it (tokens per
        # key) and keeps it. A transparent proxy changes nothing.
        pass_usage = not settings.repair or _usage_asked(request)
        edits += rewritten + (_usage_option(request) if stream and not pass_usage else [])
        body = protocol.upstream_body(body, sent, request, edits)
        if self.capture is not None and protocol.name != "openai":  # what replays: the chat request
            self.capture.body = body
        upstream = self.backend
        outgoing = upstream.request("POST", *protocol.upstream_target(self.target, self.scope["query_string"]), body,
                                    upstream.headers(self.scope["headers"], relay_untouched=False))
        if stream:
            await self._stream(outgoing, ctx, pass_usage)
        else:
            await self._whole(outgoing, ctx)

    async def _restore_reasoning(self, request: dict) -> list[tuple[tuple, Any]]:
        """Put back the reasoning of the tool loop's assistant turns that came without it; never over
        reasoning the client sent. Returns the edits, for ``rewrite_request``."""
        store = self.proxy.reasoning
        missing = turns_without_reasoning(request) if store is not None else []
        keyed = [(at, message, turn_key(self._loop(), before, calls)) for at, message, before, calls in missing]
        turns = [(at, message, key) for at, message, key in keyed if key is not None]
        if not turns:
            return []
        assert store is not None
        found = await store.recall([key for _, _, key in turns])
        edits = []
        for at, message, key in turns:
            if key in found:
                message["reasoning_content"] = found[key]
                edits.append((("messages", at, "reasoning_content"), found[key]))
        restored = len(edits)
        metrics = self.proxy.metrics
        metrics.inc("kimiproxy_reasoning_restored_total", restored)
        metrics.inc("kimiproxy_reasoning_missed_total", len(turns) - restored)
        log.info("reasoning: restored %d of %d assistant turns that came without it", restored, len(turns))
        return edits

    def _loop(self) -> str:
        """Whose turns these are, of which task (loop_scope): what every turn_key of this exchange starts with."""
        if self._owner is None:
            who = self.key_name
            if who == NO_KEY:  # no keys to tell users apart: the address a client comes from stands in
                who += "@" + str((self.scope.get("client") or ("-",))[0])
            if not self.proxy.settings.reasoning_store:  # the default store: each instance (port) its own
                who += " port " + str((self.scope.get("server") or (None, None))[1])
            self._owner = loop_scope(who, self.messages)
        return self._owner

    async def _remember(self, turns: Iterable[Message]) -> None:
        """Remember the reasoning of turns with calls, as delivered, before the client has them: its
        next request may come at once, to another worker."""
        store = self.proxy.reasoning
        if store is not None:
            before = self.messages[-1] if self.messages else None  # what the model answered
            keyed = [(key, turn.reasoning) for turn in turns if turn.reasoning and turn.calls
                     for key in [turn_key(self._loop(), before, turn.calls)] if key is not None]
            if keyed:
                await store.remember(keyed)

    async def _admit(self, chat: bool) -> None:
        """Fair use: the key's limits, decided before anything reaches the upstream or the client (a
        refusal is a 429 of its own, never a stream cut short). Limited are the requests that make the
        model generate: chat completions, Messages, and POSTs passed through (/v1/completions); not
        count_tokens, /v1/models or other GETs. After the body and with the watcher running: a client
        that leaves while its request waits for a slot is noticed, and was not cut off mid-upload."""
        limits = self.routing.limits.get(self.key_name)
        if limits is None or self.protocol.counting or not chat and self.method != "POST":
            return
        fair_use = self.proxy.fair_use
        where = fair_use.where(self.scope)
        try:
            slot = await fair_use.admit(where, self.key_name, limits)
        except RateLimited as refused:
            self.proxy.metrics.inc("kimiproxy_key_refused_total", key=self.key_name, limit=refused.limit)
            raise
        if slot is not None:
            self._slot = (where, slot)

    async def _release(self) -> None:
        """The slot freed and the request's tokens counted (prompt and completion, from SGLang's usage),
        whatever ended it: the key's next request may be waiting for it."""
        assert self._slot is not None
        usage = self.usage if isinstance(self.usage, dict) else {}
        tokens = sum(n for n in (usage.get("prompt_tokens"), usage.get("completion_tokens")) if type(n) is int and n > 0)
        where, slot = self._slot
        self._slot = None
        with trio.CancelScope(shield=True):
            await self.proxy.fair_use.release(where, self.key_name, slot, tokens)

    # -- the client --------------------------------------------------------------------------------

    async def _read_body(self) -> bytes:
        """The whole request body (kimiproxy parses it), or 413 past MAX_BODY_MB, 503 while the worker
        holds MAX_BODIES_MB of bodies, 408 past BODY_TIMEOUT. A refused body is read and dropped (up
        to MAX_DRAIN_BYTES) before answering: a client still sending when the server answers and
        closes gets a connection reset instead of the error."""
        settings = self.proxy.settings
        limit = settings.max_body_bytes
        parts: list[bytes] = []
        size = 0
        refused: ProxyError | None = None
        with trio.move_on_after(settings.body_timeout) as timer:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                more = message.get("more_body", False)
                if refused is None:
                    try:
                        if size > limit:
                            raise ClientError(f"request body exceeds the {limit / 1048576:g} MiB limit "
                                              "(MAX_BODY_MB)", 413)
                        self.proxy.hold_body(len(chunk))
                        self._held += len(chunk)
                        parts.append(chunk)
                    except ProxyError as err:  # from here on the body is only drained
                        refused, parts = err, []
                        self.proxy.release_body(self._held)
                        self._held = 0
                if not more or (refused is not None and size > limit + MAX_DRAIN_BYTES):
                    break
        if timer.cancelled_caught:
            raise ClientError(f"request body not received within {settings.body_timeout:g} s (BODY_TIMEOUT)", 408)
        if refused is not None:
            raise refused
        return b"".join(parts)

    async def _watch_client(self) -> None:
        """After the body, the only message left is http.disconnect: before the response is complete it
        means the client left. (Hypercorn also sends it after a complete response.)"""
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.client_left()

    def client_left(self) -> None:
        """The one place that marks the client gone (unless it had the whole response): everything
        serving it is cancelled, and the upstream request is closed on the way out, so SGLang stops
        generating. Whichever task notices first calls it. After the whole response it is no news
        (Hypercorn says http.disconnect inside the last write, which must not be cancelled: it closes
        the connection)."""
        if self.reply is Reply.DONE:
            return
        self.reply = Reply.GONE
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]], stream: bool = False) -> None:
        """The one place a response starts (``stream``: an event stream)."""
        self.reply, self.status = Reply.STREAM if stream else Reply.BODY, status
        await self._asgi({"type": "http.response.start", "status": status,
                          "headers": headers + [(b"x-request-id", self.id.encode())]})

    async def _start_stream(self) -> None:
        await self._start(200, list(SSE_HEADERS), stream=True)
        if opening := self.protocol.opening():  # Anthropic's message_start: before even a ping
            await self._body(opening)

    async def _body(self, data: bytes, more: bool = True) -> None:
        if not more:
            self.reply = Reply.DONE
        self.bytes += len(data)
        if self.capture is not None:
            self.capture.client_data(data)
        await self._asgi({"type": "http.response.body", "body": data, "more_body": more})

    async def _asgi(self, message: dict) -> None:
        try:
            await self._send(message)
        except Exception as exc:  # Hypercorn refuses writes once the connection is gone
            raise _ClientGone() from exc

    async def _send_json(self, status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        body = json_dumps_compact(payload)
        await self._start(status, [(b"content-type", b"application/json"),
                                   (b"content-length", str(len(body)).encode()), *headers])
        await self._body(body, more=False)

    async def _fail(self, err: ProxyError, pending: bytes = b"") -> None:
        """The one place an error reaches the client, whatever has been sent: before anything, its
        status and JSON body (``pending`` frames not yet sent are dropped: the status says it all);
        inside an event stream, the pending frames and an error event, which the SDKs raise, then the
        end; inside another body (a pass-through), the body cut short; after the end, or with the
        client gone, only the log and the metrics."""
        self._count_failure(err)
        status, payload = self.protocol.error(err)
        try:
            if self.reply is Reply.PENDING:
                await self._send_json(status, payload, err.headers)
            elif self.reply is Reply.STREAM:
                await self._body(pending + self.protocol.error_frame(payload), more=False)
            elif self.reply is Reply.BODY:
                await self._body(b"", more=False)
        except _ClientGone:
            self.client_left()

    def _count_failure(self, err: ProxyError) -> None:
        if isinstance(err, UpstreamError):
            self.proxy.metrics.inc("kimiproxy_upstream_errors_total", kind=err.kind, status=str(err.status))
        log.log(logging.WARNING if err.status < 500 else logging.ERROR, "%s %s failed after %.3fs: %d %s%s",
                self.method, self.path, time.monotonic() - self.started_at, err.status, err.message,
                f" ({err.detail})" if err.detail else "")

    # -- the upstream ------------------------------------------------------------------------------

    async def _open(self, request: httpx.Request) -> httpx.Response:
        self.upstream = await self.backend.send(request)
        self.first_byte = time.monotonic() - self.started_at
        return self.upstream

    async def _close_upstream(self) -> None:
        """Close the upstream response even inside a cancelled scope: SGLang aborts the generation when
        its connection closes, which is what frees the GPU."""
        if self.upstream is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(UPSTREAM_CLOSE_TIMEOUT):
            await self.upstream.aclose()
            self.upstream_closed = True

    # -- the three relays --------------------------------------------------------------------------

    async def _stream(self, request: httpx.Request, ctx: RepairContext, pass_usage: bool) -> None:
        """A streamed chat completion: this task reads and repairs, a writer task writes."""
        frames = _Frames()
        self.proxy.metrics.streams_in_flight += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_stream, frames)
                async with frames.sender:
                    try:
                        await self._relay(await self._open(request), ctx, pass_usage, frames)
                    except ProxyError as err:
                        await frames.put(err)
                    except Exception as exc:
                        log.exception("%s %s: internal error", self.method, self.path)
                        await frames.put(ProxyError("internal proxy error", detail=f"{type(exc).__name__}: {exc}"))
        finally:
            self.proxy.metrics.streams_in_flight -= 1

    async def _relay(self, response: httpx.Response, ctx: RepairContext, pass_usage: bool, frames: _Frames) -> None:
        if response.status_code >= 400:
            raise upstream_http_error(response.status_code, await read_upstream_body(response))
        if "text/event-stream" not in response.headers.get("content-type", ""):
            data = await read_upstream_body(response)
            raise UpstreamError("upstream answered a streaming request without an event stream",
                                detail=f"it sent {response.headers.get('content-type')!r}: {data[:200]!r}")
        decoder, repair = SSEDecoder(), self.protocol.stream(ctx, pass_usage)
        debug = log.isEnabledFor(logging.DEBUG)
        capture = self.capture
        if capture is not None:
            capture.stream, capture.status = True, response.status_code
        chunks = body_chunks(response)
        try:
            async for chunk in chunks:
                out = []
                events = decoder.decode(chunk)
                self.chunks += len(events)
                for data in events:
                    if debug:
                        log.debug("upstream event %s", data.decode("utf-8", "replace"))
                    if capture is not None:
                        capture.upstream_event(data)
                    out += repair.feed(data)
                if repair.done:  # [DONE]: the client gets it all now
                    last = out
                    break
                if out:
                    await frames.put(out[0] if len(out) == 1 else b"".join(out))
            else:
                last = [f for data in decoder.flush() for f in repair.feed(data)] + repair.close()
        except httpx.HTTPError as exc:
            err = upstream_failure(exc, str(response.url))
            err.message = f"upstream stream broke off: {err.message}"
            if capture is not None:
                capture.reasons.add("upstream-broke-off")
                capture.error = err.body()["error"]
            out = [f for data in decoder.flush() for f in repair.feed(data)] + self.protocol.broken_off(repair)
            if out:
                await frames.put(b"".join(out))
            raise err from None
        finally:
            self._report(repair, decoder)
        await self._remember(self.delivered)
        await frames.put(_Last(b"".join(last)))
        with contextlib.suppress(httpx.HTTPError):  # what follows [DONE] is drained: the connection is reused
            async for _ in chunks:
                pass

    async def _write_stream(self, frames: _Frames) -> None:
        """The one writer of a stream's body. Frames go out as they come; what piled up while a write
        was under way goes out in one write. The silences are ``_keep_alive``'s: its frames come this way."""
        async with frames.receiver, trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_alive, frames)
            try:
                while not await self._write_items(await frames.take()):
                    pass
            except _ClientGone:  # a write showed it first: an ordinary disconnect, the relay cancelled with it
                self.client_left()  # before the channel closes, so the relay never sees it broken uncancelled
            frames.ended.set()

    async def _keep_alive(self, frames: _Frames) -> None:
        """A stream's silences. The response starts with the first frame, or after HEADER_GRACE of upstream
        silence (an upstream error that comes sooner keeps its status), and an SSE comment goes out whenever
        HEARTBEAT_INTERVAL passes with no frame from the relay (behind frames a slow client has yet to take,
        if need be): Node clients give up after 300 s without a byte, and a write is what shows that a
        client has gone. A task of its own, sleeping through the frames, not a timeout on each of the
        writer's waits: a cancel scope per frame cost 6 % of the instructions per paced chunk (valgrind)."""
        interval = self.proxy.settings.heartbeat_interval or math.inf
        silence = min(HEADER_GRACE, interval)
        with contextlib.suppress(trio.ClosedResourceError):  # the relay is done: the writer ends the stream
            while True:
                # Asleep until the silence would end as of the last frame so far, or the response does;
                # a silence only if no frame came meanwhile (else asleep again, until the new end).
                with trio.move_on_at(frames.put_at + silence):
                    await frames.ended.wait()
                    return
                if trio.current_time() >= frames.put_at + silence:
                    await frames.put(self.protocol.heartbeat)
                silence = interval

    async def _write_items(self, items: list) -> bool:
        """What the writer took from the relay, in one write; returns whether that was the end."""
        end = items[-1]
        data = b"".join(i.data if isinstance(i, _Last) else i for i in items if isinstance(i, (bytes, _Last)))
        if isinstance(end, ProxyError):
            await self._fail(end, pending=data)
            return True
        if self.reply is Reply.PENDING:
            await self._start_stream()
        done = end is None or isinstance(end, _Last)
        if data or done:
            await self._body(data, more=not done)
        return done

    async def _whole(self, request: httpx.Request, ctx: RepairContext) -> None:
        """A whole chat completion. It is parsed (the repair needs it, and the log line and usage count
        read it), and written anew only when the repair changed it."""
        response = await self._open(request)
        data = await read_upstream_body(response)
        await self._close_upstream()
        if self.capture is not None:
            self.capture.status = response.status_code
            self.capture.upstream_event(data)
        if response.status_code >= 400:
            raise upstream_http_error(response.status_code, data)
        completion, changed = None, False
        if "json" in response.headers.get("content-type", ""):
            try:
                completion = json_loads(data)
            except ValueError:
                log.warning("upstream sent invalid JSON; relayed as it came")
        if isinstance(completion, dict):
            self.usage = completion.get("usage")
            repairs: list[ChoiceRepair] = []
            if ctx.enabled:
                repairs, changed = repair_completion(completion, ctx)
                self.repairs += self.proxy.report_repairs(repairs, self.rules)
            finals = [Message.of_choice(choice, m, i) for i, (choice, m) in enumerate(_choices(completion))]
            if self.capture is not None:
                self.capture.judge(zip(repairs, finals))
            if ctx.enabled:
                await self._remember(finals)
            self._log_finals(finals, completion.get("usage"))
        data = self.protocol.reply(completion, changed, data)
        headers = [(k, v) for k, v in end_to_end_headers(response.headers.raw, RESPONSE_HEADERS_DROPPED, False)
                   if k != b"content-length"]
        await self._start(response.status_code, headers + [(b"content-length", str(len(data)).encode())])
        await self._body(data, more=False)

    async def _passthrough(self, body: bytes) -> None:
        """Any other /v1 route (models, completions, embeddings...), relayed untouched both ways,
        streaming or not, errors included."""
        log.info("%s %s (pass-through, %d bytes)", self.method, self.path, len(body))
        if self.method == "POST":
            require_json(self.scope)
        upstream = self.backend
        response = await self._open(upstream.request(
            self.method, self.target, self.scope["query_string"], body,
            upstream.headers(self.scope["headers"], relay_untouched=True)))
        await self._start(response.status_code,
                          end_to_end_headers(response.headers.raw, RESPONSE_HEADERS_DROPPED, True))
        try:
            async for chunk in response.aiter_raw():
                await self._body(chunk)
        except httpx.HTTPError as exc:  # the response has begun: it can only be cut short
            raise upstream_failure(exc, str(response.url)) from None
        await self._body(b"", more=False)

    async def _models(self) -> None:
        """GET /v1/models (and /v1/models/ID) with a configuration file: the models of every upstream
        (Routing.models), answered here."""
        log.info("%s %s (the configured models)", self.method, self.path)
        if self.path == "/v1/models":
            await self._send_json(200, self.routing.models())
            return
        found = self.routing.model(self.path.removeprefix("/v1/models/"))
        if found is None:
            raise ClientError("no such model: GET /v1/models lists the models", 404)
        await self._send_json(200, found)

    async def _count_tokens(self, request: dict) -> None:
        """POST /v1/messages/count_tokens: the chat request counted by SGLang's own tokenizer and chat
        template (POST /v1/tokenize, SGLang 0.5.2x); an upstream without it gets an estimate, which the
        answer says it is (``estimate``) and the log too."""
        upstream = self.backend
        asked = {"model": request["model"], "messages": request["messages"], **(
            {"tools": request["tools"]} if request.get("tools") else {})}
        count = None
        try:
            headers = upstream.headers(self.scope["headers"], relay_untouched=False)
            response = await self._open(upstream.request("POST", b"/v1/tokenize", b"", json_dumps_compact(asked), headers))
            data = await read_upstream_body(response)
            answer = json_loads(data) if response.status_code == 200 else None
            count = answer.get("count") if isinstance(answer, dict) else None
        except (UpstreamError, ValueError):
            pass
        finally:
            await self._close_upstream()
        if type(count) is int:
            await self._send_json(200, {"input_tokens": count})
            return
        log.info("count_tokens: the upstream has no /v1/tokenize; answered with an estimate (characters / %d)",
                 CHARS_PER_TOKEN_ESTIMATE)
        await self._send_json(200, {"input_tokens": estimated_tokens(request), "estimate": (
            f"characters / {CHARS_PER_TOKEN_ESTIMATE}: the upstream has no tokenizer endpoint (/v1/tokenize)")})

    # -- the end -----------------------------------------------------------------------------------

    def _report(self, repair: StreamRepair, decoder: SSEDecoder) -> None:
        if repair.skipped or decoder.oversized:
            log.warning("upstream stream: %d events not JSON, %d oversized lines dropped",
                        repair.skipped, decoder.oversized)
        self.usage = repair.usage
        # Each choice's final message, built once (if at all) for the log, the capture and the store.
        needed = log.isEnabledFor(logging.INFO) or self.capture is not None or self.proxy.reasoning is not None
        choices = sorted(repair.choices.items())
        self.delivered = [Message.of_repair(choice, repair.finish.get(index), index)
                          for index, choice in choices] if needed else []
        if self.proxy.settings.repair:
            self.repairs += self.proxy.report_repairs([choice for _, choice in choices], self.rules)
            if self.capture is not None:
                self.capture.judge(zip((choice for _, choice in choices), self.delivered))
        self._log_finals(self.delivered, repair.usage)

    def _log_finals(self, finals: list[Message], usage: Any) -> None:
        """One line per choice, the same for a streamed and a whole response with the same message."""
        if log.isEnabledFor(logging.INFO):
            for final in finals:
                log.info("final message %s usage=%s", final.describe(), json.dumps(usage))

    def _log_end(self) -> None:
        """The exchange's one final log line, and its metrics."""
        elapsed = time.monotonic() - self.started_at
        metrics, route = self.proxy.metrics, route_label(self.path)
        gone = self.reply is Reply.GONE
        metrics.inc("kimiproxy_requests_total", route=route, status=str(self.final_status))
        metrics.observe("kimiproxy_request_duration_seconds", elapsed, route=route)
        metrics.inc("kimiproxy_key_requests_total", key=self.key_name)
        usage = self.usage if isinstance(self.usage, dict) else {}
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens")
            if type(tokens) is int and tokens > 0:
                metrics.inc("kimiproxy_key_tokens_total", tokens, key=self.key_name, type=kind)
        if self.repairs:
            metrics.inc("kimiproxy_key_repairs_total", self.repairs, key=self.key_name)
        if self.first_byte is not None:
            metrics.observe("kimiproxy_upstream_first_byte_seconds", self.first_byte)
        if gone:
            metrics.inc("kimiproxy_client_disconnects_total",
                        upstream_closed="true" if self.upstream_closed else "no_upstream")
            log.warning("%s %s: client disconnected after %.3fs (upstream %s, key %s)", self.method, self.path,
                        elapsed, "closed" if self.upstream_closed else "not open", self.key_name)
        else:
            first = f"{self.first_byte:.3f}s" if self.first_byte is not None else "-"
            tokens = f", tokens {usage.get('prompt_tokens')}+{usage.get('completion_tokens')}" if usage else ""
            via = f", upstream {self.backend.name}" if self.routing.file is not None else ""
            log.info("%s %s -> %s in %.3fs (upstream first byte %s, %d bytes out%s, key %s%s)", self.method,
                     self.path, self.status or "-", elapsed, first, self.bytes, tokens, self.key_name, via)


# ---------------------------------------------------------------------------------------------------
# The server process: what a process that exists to serve does at start
# ---------------------------------------------------------------------------------------------------

def tune_process() -> None:
    """Process-wide settings for a serving process (called where the server starts, never on import).

    A proxy allocates many short-lived objects per chunk and keeps few cycles: collecting the youngest
    generation every GC_THRESHOLD allocations instead of CPython's 700, with the start-up objects
    frozen out of the scans, saves measurable CPU per chunk (benchmark). Each stream holds two
    sockets, so 500 streams pass the usual soft limit of 1024 open files: the hard limit is what the
    administrator allows; take all of it."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def forward_sigterm_to_supervisor() -> None:
    """Under Hypercorn's supervisor (``hypercorn kimiproxy:app -k trio``), a SIGTERM sent to the whole
    process group (systemd's default KillMode, ``kill -TERM -- -PGID``, ``timeout``) also reaches this
    worker, whose default is to die at once, cutting every stream. The supervisor turns SIGTERM into a
    graceful shutdown of all its workers (and SIGINT already reaches workers ignored): so here SIGTERM
    is handed to it, and a SIGTERM for this worker alone stops the whole server gracefully, too.

    Handed on only if the supervisor has not begun shutting down by itself after SUPERVISOR_SIGNAL_WAIT:
    its handler is not reentrant (a second SIGTERM that lands while it runs deadlocks it on the
    shutdown event's lock, seen about once in 60 group SIGTERMs on a loaded machine), and with the
    whole group signalled it has its own. Whether it began is the shutdown event Hypercorn hands each
    worker; if that cannot be found, the SIGTERM is handed on after the wait regardless."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return  # not a Hypercorn worker: python kimiproxy.py handles its signals itself
    supervisor = parent.pid
    kwargs = getattr(multiprocessing.current_process(), "_kwargs", None)  # the worker's, as Hypercorn spawned it
    shutdown_event = kwargs.get("shutdown_event") if isinstance(kwargs, dict) else None

    def hand_on() -> None:
        if shutdown_event is not None and shutdown_event.is_set():
            return  # the supervisor got the signal too, and is stopping every worker
        if os.getppid() == supervisor:  # never signal whoever adopted us after the supervisor died
            os.kill(supervisor, signal.SIGTERM)

    def forward(signum: int, frame: Any) -> None:
        timer = threading.Timer(SUPERVISOR_SIGNAL_WAIT, hand_on)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, forward)


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------

EXIT_WRONG_WORKER = 3
TRIO_REQUIRED = ("kimiproxy needs Hypercorn's trio worker: run `hypercorn kimiproxy:app -k trio` "
                 "(or `python kimiproxy.py`)")


def _shield_final_send(send: Any) -> Any:
    """For the routes Quart serves: Hypercorn closes the connection (Connection: close, HTTP/1.0), or
    starts its keep-alive timer, inside the app's last ``send``, and hands the app http.disconnect on
    the way; quart_trio cancels the request on that disconnect, so the rest of that ``send`` is
    cancelled at its next checkpoint and the socket stays open until the client hangs up (Hypercorn's
    behaviour, its issue #106 is the same family). Shielded, for at most FINAL_SEND_GRACE, the last
    ``send`` finishes. The proxied routes send without a concurrent receiver and need none of this."""
    async def shielded(message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FINAL_SEND_GRACE
                await send(message)
        else:
            await send(message)
    return shielded


class KimiProxyApp(QuartTrio):
    """A Quart-Trio app. The proxied routes (/v1/*, /api/chat/completions) are served as raw ASGI by an
    ``Exchange`` each: no framework buffering, time limit or size limit between client and upstream,
    and a client disconnect cancels them directly. /, /health, /metrics and the error pages are
    ordinary Quart routes."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(__name__)
        self.settings = settings
        self.proxy = Proxy(settings)
        # Quart's defaults would cut every response after 60 s and every body over 16 MiB: the proxied
        # routes bypass them, and these keep the Quart routes from doing it either.
        self.config["RESPONSE_TIMEOUT"] = None
        self.config["BODY_TIMEOUT"] = settings.body_timeout
        self.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    async def asgi_app(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if path in CHAT_PATHS and scope["method"] == "POST":
                return await Exchange(self.proxy, scope, receive, send).run(chat=True)
            if path in MESSAGES_PATHS:  # Anthropic's protocol, served here (a pass-through with the repair off)
                exchange = Exchange(self.proxy, scope, receive, send, anthropic=MESSAGES_PATHS[path])
                return await exchange.run(chat=self.settings.repair)
            if path.startswith("/v1/"):
                return await Exchange(self.proxy, scope, receive, send).run(chat=False)
            send = _shield_final_send(send)
        elif kind == "lifespan" and sniffio.current_async_library() != "trio":
            # Under asyncio nothing here would work. Hypercorn would log a lifespan failure with a
            # traceback and still exit 0 from its supervisor, so the worker exits at once, non-zero.
            print(f"kimiproxy: {TRIO_REQUIRED}", file=sys.stderr, flush=True)
            os._exit(EXIT_WRONG_WORKER)
        await super().asgi_app(scope, receive, send)


def create_app(settings: Settings, serving_process: bool = False) -> KimiProxyApp:
    """The app. ``serving_process``: this process exists to serve it (Hypercorn's worker, or
    ``python kimiproxy.py``), so its start-up also tunes the process, collects garbage when idle and
    makes every stop signal graceful; the tests create apps in their own process without that."""
    app = KimiProxyApp(settings)
    proxy = app.proxy

    @app.before_serving
    async def startup() -> None:
        log.setLevel(settings.log_level)
        if serving_process:
            try:
                setup_logging(settings)
            except ConfigError as exc:  # as at import: one line, and the worker stops
                print(f"kimiproxy: bad configuration: {exc}", file=sys.stderr, flush=True)
                os._exit(1)
            tune_process()
            forward_sigterm_to_supervisor()
            proxy.collector = Collector()
            app.nursery.start_soon(proxy.collector.run)
        await proxy.connections.open()
        proxy.watch_upstreams(app.nursery)
        app.nursery.start_soon(proxy.activity.run)
        file = proxy.routing.file
        if serving_process and file is not None:
            await app.nursery.start(proxy.reload_on_sighup)
        where = f"upstream {settings.upstream}" if file is None else f"configuration {file.path} (" + ", ".join(
            f"{u.name} {u.url}: {len(u.models)} models" for u in proxy.routing.upstreams) + ")"
        log.info("kimiproxy %s serving, %s, repair %s, heartbeat %gs", __version__, where,
                 "on" if settings.repair else "off", settings.heartbeat_interval)

    @app.after_serving
    async def shutdown() -> None:
        if proxy.registration is not None:
            proxy.registration.remove()
        await proxy.connections.aclose()
        if proxy.reasoning is not None:
            await proxy.reasoning.aclose()
        await proxy.fair_use.aclose()
        await proxy.activity.aclose()

    @app.before_request
    async def check_host() -> Any:
        try:
            proxy.check_host(request.scope)
        except ClientError as err:
            return jsonify(err.body()), err.status
        return None

    @app.get("/health")
    async def health() -> Any:
        """Liveness; with ?upstream=1 also whether the upstream answers, and its parsers."""
        if request.args.get("upstream") not in ("1", "true", "yes"):
            return jsonify({"status": "ok"})
        routing = proxy.routing
        if routing.file is None:
            ok, report = await proxy.upstream.health()
            return jsonify(report), 200 if ok else 503
        # With a configuration file, every upstream, asked at once: 503 when any one does not answer.
        reports: list[Any] = [None] * len(routing.upstreams)

        async def ask(i: int, upstream: Upstream) -> None:
            ok, report = await upstream.health()
            reports[i] = (ok, {"name": upstream.name, "models": list(upstream.models), **report})

        async with trio.open_nursery() as nursery:
            for i, upstream in enumerate(routing.upstreams):
                nursery.start_soon(ask, i, upstream)
        ok = all(answered for answered, _ in reports)
        return jsonify({"status": "ok" if ok else "degraded", "upstreams": [r for _, r in reports]}), 200 if ok else 503

    @app.get("/metrics")
    async def metrics() -> Any:
        return proxy.metrics.render(), 200, {"content-type": "text/plain; version=0.0.4; charset=utf-8"}

    @app.get("/status.json")
    async def status() -> Any:
        """The page's data (README: The page). With keys, a key is needed (401 without one); the key named
        admin sees every key's rows, any other key its own. Without keys, everything."""
        routing = proxy.routing
        viewer = None
        if routing.api_keys:
            try:
                name = proxy.authorise(request.scope, routing.api_keys)
            except ClientError as err:
                return jsonify(err.body()), err.status, {"www-authenticate": "Bearer", "cache-control": "no-store"}
            viewer = None if name == PAGE_ADMIN_KEY else name
        port = (request.scope.get("server") or (None, None))[1]
        found = await proxy.activity.status(port, viewer)
        if routing.limits:  # each key's use against its limits (fair use, every worker's), as "used / limit"
            report = await proxy.fair_use.report(proxy.fair_use.where(request.scope), routing.limits)
            rows = {row["key"]: row for row in found["keys"]}
            for name, entry in report.items():
                if viewer is not None and name != viewer:
                    continue
                row = rows.get(name) or {"key": name, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                         "repairs": 0, "in_flight": entry["use"]["in_flight"]}
                if name not in rows:
                    found["keys"].append(row)
                row["limits"] = {limit: f"{entry['use'][used]} / {bound}" for limit, used in PAGE_LIMIT_USE.items()
                                 if (bound := entry["limits"].get(limit)) is not None}
        upstreams = [{"name": u.name, "models": list(u.models), "parsers": u.parsers,
                      "warning": parser_warning(u.parsers or {})} for u in routing.upstreams]
        doc = {"name": "kimiproxy", "version": __version__, "viewer": "every key" if routing.api_keys and viewer is None
               else "no keys: everyone" if viewer is None else f"key {viewer}: its own requests",
               **found, "upstreams": upstreams, "captures": found["captures"] if proxy.captures is not None else None}
        return jsonify(doc), 200, {"cache-control": "no-store"}

    @app.after_request
    async def vary(response: Any) -> Any:
        if request.path == "/":  # the page or the JSON, by Accept
            response.headers["vary"] = "Accept"
        return response

    async def fair_use_seen() -> dict | None:
        """With keys, a key's own use only (the key named admin: every key's), and nothing without one:
        the same policy as /status.json's."""
        routing = proxy.routing
        if not routing.limits:
            return None
        viewer = None
        if routing.api_keys:
            try:
                name = proxy.authorise(request.scope, routing.api_keys)
            except ClientError:
                return None
            viewer = None if name == PAGE_ADMIN_KEY else name
        report = await proxy.fair_use.report(proxy.fair_use.where(request.scope), routing.limits)
        return report if viewer is None else {name: entry for name, entry in report.items() if name == viewer}

    @app.get("/")
    async def index() -> Any:
        if prefers_html(request.headers.get("accept", "")):  # a browser: the page (README: The page)
            return PAGE_HTML, 200, PAGE_HEADERS
        routing = proxy.routing
        parsers = proxy.upstream.parsers
        warning = next((w for u in routing.upstreams if (w := parser_warning(u.parsers or {}))), None)
        upstreams = {"upstreams": [{"name": u.name, "models": list(u.models), "parsers": u.parsers}
                                   for u in routing.upstreams]} if routing.file is not None else {}
        return jsonify({
            "name": "kimiproxy", "version": __version__,  # not the upstream's address: it is nobody's business
            "upstream_parsers": parsers, "warning": warning, **upstreams,
            "repairs": {"tool_calls": settings.repair, "think_in_content": settings.repair,
                        "history_ids": settings.repair},
            "heartbeat_interval": settings.heartbeat_interval, "auth": bool(routing.api_keys),
            "reasoning_continuity": proxy.reasoning is not None and proxy.reasoning.usable,
            "capture": proxy.captures is not None and proxy.captures.usable,
            "fair_use": await fair_use_seen(),  # each key's use against its limits, every worker's
        })

    @app.errorhandler(404)
    async def not_found(error: Any) -> Any:
        return jsonify(ClientError("no such route", 404).body()), 404

    @app.errorhandler(405)
    async def not_allowed(error: Any) -> Any:
        return jsonify(ClientError("method not allowed", 405).body()), 405

    return app


def _module_app() -> KimiProxyApp:
    try:
        return create_app(load_settings(), serving_process=True)
    except ConfigError as exc:
        raise SystemExit(f"kimiproxy: bad configuration: {exc}") from None


if __name__ != "__main__":  # python kimiproxy.py builds its own app in main(), with its flags
    app = _module_app()  # what `hypercorn kimiproxy:app` serves; importing it starts nothing


# ---------------------------------------------------------------------------------------------------
# main(): python kimiproxy.py
# ---------------------------------------------------------------------------------------------------

async def _serve(app: KimiProxyApp, config: Any) -> None:
    """Hypercorn's trio server until SIGTERM or SIGINT; then it stops accepting, lets in-flight requests
    finish for config.graceful_timeout (SHUTDOWN_GRACE) seconds and cancels the rest, which closes
    their upstream requests. One process: a signal to it or to its process group is the same."""
    import hypercorn.trio

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: no new connections; in-flight requests have %gs to finish",
                         signal.Signals(signum).name, config.graceful_timeout)
                return

    await hypercorn.trio.serve(app, config, shutdown_trigger=shutdown_trigger)
    log.info("kimiproxy stopped")


def main(argv: list[str] | None = None) -> int:
    import hypercorn.config

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replay"]:
        if len(argv) < 2:
            print("usage: python kimiproxy.py replay CAPTURE.json...", file=sys.stderr)
            return 2
        return replay(argv[1:])
    dotenv = read_dotenv([Path.cwd() / ".env", Path(__file__).resolve().parent / ".env"])
    if argv[:1] == ["reload"]:
        reloading = argparse.ArgumentParser(prog="kimiproxy.py reload", description=(
            "Make every running kimiproxy that serves the configuration file (each worker of hypercorn -w N, "
            "or python kimiproxy.py) read it again, and print what each did."))
        reloading.add_argument("--config", help="the configuration file (KIMIPROXY_CONFIG)")
        path = reloading.parse_args(argv[1:]).config or {**dotenv, **os.environ}.get("KIMIPROXY_CONFIG", "").strip()
        if not path:
            print("kimiproxy: no configuration file to reload: give --config FILE or set KIMIPROXY_CONFIG",
                  file=sys.stderr)
            return 2
        try:  # checked here first: a file that does not validate signals nobody
            load_config_file(path)
        except ConfigError as exc:
            print(f"kimiproxy: bad configuration: {exc}", file=sys.stderr)
            return 1
        return reload_servers(path)
    parser = argparse.ArgumentParser(description="OpenAI- and Anthropic-compatible proxy that repairs "
                                                 "Kimi-K2 tool calls leaked by SGLang.",
                                     epilog="python kimiproxy.py replay CAPTURE.json... replays captures offline; "
                                            "python kimiproxy.py reload [--config FILE] reloads the configuration "
                                            "file of the running ones.")
    parser.add_argument("--host", help="bind address (PROXY_HOST)")
    parser.add_argument("--port", type=int, help="port (PROXY_PORT)")
    parser.add_argument("--upstream", help="SGLang /v1 base URL (SGLANG_API_BASE)")
    parser.add_argument("--config", help="the configuration file: upstreams, models, keys (KIMIPROXY_CONFIG)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING... (LOG_LEVEL)")
    parser.add_argument("--enable-streaming-tool-parser", dest="repair", action=argparse.BooleanOptionalAction,
                        default=None, help="the Kimi-K2 repair (ENABLE_STREAMING_TOOL_PARSER)")
    args = parser.parse_args(argv)
    overrides = {"PROXY_HOST": args.host, "PROXY_PORT": args.port, "SGLANG_API_BASE": args.upstream,
                 "LOG_LEVEL": args.log_level, "KIMIPROXY_CONFIG": args.config,
                 "ENABLE_STREAMING_TOOL_PARSER": None if args.repair is None else str(args.repair)}
    env = {**dotenv, **os.environ, **{k: str(v) for k, v in overrides.items() if v is not None}}
    try:
        settings = Settings.from_env(env)
        app = create_app(settings, serving_process=True)  # reads the configuration file, if any
        setup_logging(settings)
    except ConfigError as exc:
        print(f"kimiproxy: bad configuration: {exc}", file=sys.stderr)
        return 1
    config = hypercorn.config.Config()
    config.bind = [f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.graceful_timeout = settings.shutdown_grace
    if not app.proxy.routing.api_keys and not _is_loopback(settings.host):  # PROXY_API_KEY's or the file's keys
        log.warning("binding %s without PROXY_API_KEY: anyone on the network can use the GPU", settings.host)
    try:  # an address in use, or not this machine's: one line, not the traceback of Hypercorn's task group
        for sock in config.create_sockets().insecure_sockets:
            sock.close()
    except OSError as exc:
        print(f"kimiproxy: cannot listen on {config.bind[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    trio.run(_serve, app, config)
    logging.shutdown()  # flush the log files
    return 0


if __name__ == "__main__":
    sys.exit(main())
