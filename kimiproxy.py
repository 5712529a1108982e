"""kimiproxy: an OpenAI-compatible proxy that repairs Kimi-K2 tool calls leaked by SGLang.

What and why
    SGLang's ``kimi_k2`` tool and reasoning parsers (late 2025) leave Kimi-K2-Thinking's raw tool-call
    markup (``<|tool_calls_section_begin|>...``) in ``reasoning_content`` or ``content`` instead of
    returning OpenAI ``tool_calls``; coding agents (Kilo Code, Roo Code, Cline, the OpenAI SDKs) then
    see no tool call and stall. kimiproxy sits between the agent and SGLang, forwards every request,
    streams every token as it arrives, turns leaked markup into real tool calls, and closes the upstream
    request the moment its client goes away, so the GPU stops generating for nobody.

How to run
    hypercorn kimiproxy:app -k trio -b 0.0.0.0:8000     (the trio worker is required)
    python kimiproxy.py --port 8000 --upstream http://127.0.0.1:30000/v1
    Configuration comes from the environment and a ``.env`` file (see ``Settings``).

Rules the repair never breaks
    1. Text outside tool markup is never dropped, and stays in its own channel, in order. (What is
       removed: the markup itself, noise inside a section, leaked control tokens.)
    2. Text is held back only while it could still be the start of a marker: never more than
       ``LONGEST_MARKER - 1`` characters (plus leading whitespace of ``content`` while deciding
       whether it opens a think block, bounded the same way).
    3. A recovered call is never dropped: what cannot be resolved or repaired passes as written.
       (The one exception: an exact duplicate of a structured call SGLang did return.)
    4. The streamed result equals the non-streamed result for the same upstream text.
    5. A response with no markup passes byte for byte.

Layout (top to bottom): constants, errors, the repair core (pure: no I/O, no async), the SSE codec,
configuration and logging, metrics, the upstream edge (httpx + trio), the app and its routes,
``main()``.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import enum
import functools
import gc
import hmac
import itertools
import json
import logging
import logging.handlers
import math
import os
import re
import resource
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

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

# Kimi-K2 markup (FORMAT.md section 1). The singular section spellings are accepted too: the tech
# report uses them and llama.cpp/vLLM accept them.
SECTION_BEGIN_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
SECTION_END_MARKERS = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN_MARKER = "<|tool_call_begin|>"
ARGUMENT_BEGIN_MARKER = "<|tool_call_argument_begin|>"
CALL_END_MARKER = "<|tool_call_end|>"
# Chat-template control tokens that some servers leak as text: always removed.
CONTROL_TOKENS = ("<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

LONGEST_MARKER = max(
    len(m) for m in (*SECTION_BEGIN_MARKERS, *SECTION_END_MARKERS, CALL_BEGIN_MARKER,
                     ARGUMENT_BEGIN_MARKER, CALL_END_MARKER, *CONTROL_TOKENS, THINK_CLOSE)
)  # 28 characters: the hold-back bound is one less
# A held-back tail this long that never completed into a marker at the end of a message is a marker
# cut off by max_tokens ("<|tool_call_e"): it is removed. Shorter tails ("<|", "<|x") stay as text.
MIN_TRUNCATED_MARKER = 6  # characters
# Text between a section's begin and its first call is noise (vLLM PR #28543). Past this much, it is
# not noise but prose after a section that was never closed: it goes back to its channel.
MAX_SECTION_NOISE = 2048  # characters
# A call id longer than this is not an id: the header is given up and read as arguments.
MAX_CALL_HEADER = 512  # characters
# One call's arguments beyond this end the call (file writes are large, but not this large).
MAX_CALL_ARGUMENTS = 32 * 1024 * 1024  # characters

# The edge.
DEFAULT_UPSTREAM = "http://127.0.0.1:30000/v1"  # SGLang's own default port
DEFAULT_PORT = 8000
DEFAULT_FORWARD_TIMEOUT = 600.0  # seconds the upstream may stay silent (prefill of a long context)
UPSTREAM_CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the upstream
DEFAULT_HEARTBEAT_INTERVAL = 15.0  # seconds between SSE comments while nothing else is written
# A streaming request waits this long for the upstream's headers before committing to a 200 and
# heartbeats: a refused connection or an SGLang validation error arrives sooner and keeps its status.
HEADER_GRACE = 0.5  # seconds
DEFAULT_MAX_BODY_MB = 64  # agents send multi-MB contexts; Quart's own default is 16 MiB
BODY_READ_TIMEOUT = 60.0  # seconds a client may take to send its request body
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # of an oversized body, read and dropped so the 413 arrives
MAX_SSE_EVENT_BYTES = 16 * 1024 * 1024  # one SSE line from upstream; longer ones are dropped
MAX_UPSTREAM_BODY_BYTES = 256 * 1024 * 1024  # a non-streamed upstream response
# Stream bytes waiting for a slow client before the relay stops reading the upstream (backpressure).
MAX_PENDING_BYTES = 1024 * 1024
# Upstream reads closer together than this are a burst, batched into one downstream write; a read
# after a longer pause (a model emitting tokens) is written at once.
BURST_GAP = 0.002  # seconds
GC_THRESHOLD = 20_000  # allocations between young-generation collections (CPython: 700)
IDLE_COLLECT_AFTER = 1.0  # seconds with no request in flight before a full garbage collection
COLLECT_EVERY = 1000  # finished requests between full collections when the proxy is never idle
# Idle upstream connections kept for reuse. httpcore checks every idle one with a syscall on each
# new request, so after a burst of 500 streams a large pool makes every later request slower.
IDLE_UPSTREAM_CONNECTIONS = 8
UPSTREAM_CLOSE_TIMEOUT = 1.0  # seconds allowed to close the upstream connection on cancel
LOG_PREVIEW_CHARS = 400  # characters of content/reasoning in INFO log lines
DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_LOG_BACKUPS = 5
DEFAULT_SHUTDOWN_GRACE = 30.0  # seconds in-flight requests may finish after SIGTERM/SIGINT
HEALTH_UPSTREAM_TIMEOUT = 2.0  # seconds: GET /health?upstream=1 asks the upstream's /models

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front must not buffer the stream
]
HEARTBEAT_FRAME = b": keep-alive\n\n"
DONE_FRAME = b"data: [DONE]\n\n"

# Hop-by-hop headers (RFC 9110 section 7.6.1) and the ones httpx or Hypercorn set themselves.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"host", b"content-length",
})
REQUEST_HEADERS_DROPPED = HOP_BY_HOP | {b"accept-encoding"}  # set per route, see forward_request_headers
RESPONSE_HEADERS_DROPPED = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}  # Hypercorn and we set these
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

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

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
# Repair core: the markup parser (one per channel)
# ---------------------------------------------------------------------------------------------------

class State(enum.Enum):
    START = "start"  # content only: not yet known whether it opens with <think>
    THINK = "think"  # inside the think block at the start of content: text goes to reasoning
    TEXT = "text"  # ordinary text of the channel
    SECTION = "section"  # inside a tool-call section, between calls: text here is noise
    HEADER = "header"  # after <|tool_call_begin|>: the call id
    ARGUMENTS = "arguments"  # the call's JSON arguments


class Marker(enum.Enum):
    SECTION_BEGIN = "section_begin"
    SECTION_END = "section_end"
    CALL_BEGIN = "call_begin"
    ARGUMENT_BEGIN = "argument_begin"
    CALL_END = "call_end"
    CONTROL = "control"
    THINK_CLOSE = "think_close"


MARKERS: dict[str, Marker] = {
    **{m: Marker.SECTION_BEGIN for m in SECTION_BEGIN_MARKERS},
    **{m: Marker.SECTION_END for m in SECTION_END_MARKERS},
    CALL_BEGIN_MARKER: Marker.CALL_BEGIN,
    ARGUMENT_BEGIN_MARKER: Marker.ARGUMENT_BEGIN,
    CALL_END_MARKER: Marker.CALL_END,
    **{m: Marker.CONTROL for m in CONTROL_TOKENS},
}
# Every proper prefix of a "<|...|>" marker: a tail in this set may still become one.
MARKER_PREFIXES = frozenset(m[:k] for m in MARKERS for k in range(1, len(m)))
THINK_CLOSE_PREFIXES = frozenset(THINK_CLOSE[:k] for k in range(1, len(THINK_CLOSE)))
# "<|name|>", or "<|name|" cut short (family 13: "..._end|" without ">").
MARKER_RE = re.compile(r"<\|([a-z_]{1,32})\|(>?)")
# What a call id may look like when no <|tool_call_begin|> announced it (families 10, 26).
ID_LIKE_RE = re.compile(r"[\w.\-:]{1,256}")


@dataclasses.dataclass
class RawCall:
    """A call as the markup wrote it, before its name, id and arguments are resolved."""
    header: str
    arguments: str
    channel: str
    rules: tuple[str, ...] = ()


class MarkupParser:
    """Incremental parser of one channel's text: ``feed(text)`` and ``close()`` each return
    ``(text, moved_to_reasoning, calls)``: the channel's text that can be released now, text of a
    leading think block that belongs in reasoning, and the calls completed so far.

    Like multipart's push parser it holds back only a tail that could still be the start of a marker,
    so text is released as soon as it can no longer be markup. ``repairs`` counts the text-level
    repairs by rule, for the log.
    """

    def __init__(self, channel: str, *, strip_think: bool = False) -> None:
        self.channel = channel
        self.state = State.START if strip_think else State.TEXT
        self.repairs: Counter[str] = Counter()
        self._tail = ""  # held back: a possible marker prefix (rule 2)
        self._start = ""  # START only: leading text while deciding about <think>
        self._in_section = False
        self._think_opened = False
        self._noise = ""  # SECTION only: text that is noise unless the section never closes
        self._header = ""
        self._arguments: list[str] = []
        self._arguments_len = 0
        self._call_rules: list[str] = []
        self._out: list[str] = []
        self._think: list[str] = []
        self._calls: list[RawCall] = []

    @property
    def held(self) -> int:
        """Characters of channel text held back right now."""
        return len(self._tail) + len(self._start)

    # -- the two-call contract ---------------------------------------------------------------------

    def feed(self, text: str) -> tuple[str, str, list[RawCall]]:
        if self.state is State.TEXT and not self._tail and "<" not in text:
            return text, "", []  # fast path: nothing here can be markup
        if self.state is State.START:
            text = self._decide_start(text, final=False)
        if text:
            self._scan(self._tail + text if self._tail else text, final=False)
        return self._drain()

    def close(self) -> tuple[str, str, list[RawCall]]:
        """End of the message: release what is held, finish an open call or section."""
        if self.state is State.START:
            self._scan(self._decide_start("", final=True), final=True)
        elif self._tail:
            self._scan(self._tail, final=True)
        self._tail = ""
        if self.state is State.SECTION:
            self._flush_noise_at_end()
        elif self.state in (State.HEADER, State.ARGUMENTS):
            self._call_rules.append("unterminated-call")
            self._end_call()
        self.state = State.TEXT
        self._in_section = False
        return self._drain()

    # -- scanning ----------------------------------------------------------------------------------

    def _decide_start(self, text: str, final: bool) -> str:
        """Content that opens with <think> (SGLang without a reasoning parser, FORMAT.md 4.7)."""
        self._start += text
        lead = self._start.lstrip()
        if lead.startswith(THINK_OPEN):
            self.state = State.THINK
            self._think_opened = True
            self.repairs["think-moved-to-reasoning"] += 1
            self._start = ""
            return lead[len(THINK_OPEN):]
        undecided = THINK_OPEN.startswith(lead) and len(self._start) < LONGEST_MARKER
        if undecided and not final:
            return ""
        self.state = State.TEXT
        text, self._start = self._start, ""
        return text

    def _scan(self, buf: str, final: bool) -> None:
        self._tail = ""
        segment = i = 0
        while True:
            i = buf.find("<", i)
            if i < 0:
                self._consume(buf[segment:] if segment else buf)
                return
            kind, end = self._match(buf, i, final)
            if kind is None:
                i += 1
                continue
            self._consume(buf[segment:i])
            if kind is _PARTIAL:
                rest = buf[i:]
                if not final:
                    self._tail = rest
                elif len(rest) >= MIN_TRUNCATED_MARKER:
                    self.repairs["truncated-marker-removed"] += 1
                else:
                    self._consume(rest)
                return
            self._on_marker(kind)
            segment = i = end

    def _match(self, buf: str, i: int, final: bool) -> tuple[Any, int]:
        """What starts at buf[i] ("<"): (Marker, end), (_PARTIAL, 0) or (None, 0) for plain text."""
        if buf.startswith("<|", i):
            m = MARKER_RE.match(buf, i)
            if m is None:
                return (_PARTIAL, 0) if buf[i:] in MARKER_PREFIXES else (None, 0)
            if m.group(2):
                return MARKERS.get(m.group(0), None), m.end()
            kind = MARKERS.get(m.group(0) + ">")
            end = m.end()
            if kind is None:
                return None, 0
            if end == len(buf):  # "<|tool_call_end|" so far: the ">" may be in the next chunk
                if final:
                    self.repairs["truncated-marker-repaired"] += 1
                    return kind, end
                return _PARTIAL, 0
            if buf.startswith("<", end):  # "<|tool_call_end|<|tool_calls_section_end|>"
                self.repairs["truncated-marker-repaired"] += 1
                return kind, end
            return None, 0
        if i == len(buf) - 1:  # a lone "<": the "|" may be in the next chunk
            return _PARTIAL, 0
        if self.state is State.THINK or self._think_opened:
            if buf.startswith(THINK_CLOSE, i):
                return Marker.THINK_CLOSE, i + len(THINK_CLOSE)
            if buf[i:] in THINK_CLOSE_PREFIXES:
                return _PARTIAL, 0
        return None, 0

    def _consume(self, text: str) -> None:
        """Text between markers, routed by state."""
        if not text:
            return
        state = self.state
        if state is State.TEXT:
            self._out.append(text)
        elif state is State.THINK:
            self._think.append(text)
        elif state is State.ARGUMENTS:
            self._add_arguments(text)
        elif state is State.HEADER:
            brace = text.find("{")
            if brace < 0:
                self._header += text
                if len(self._header) > MAX_CALL_HEADER:  # not an id: read it as arguments
                    self._call_rules.append("header-overflow")
                    header, self._header = self._header, ""
                    self.state = State.ARGUMENTS
                    self._add_arguments(header)
                return
            self._header += text[:brace]  # family 11: JSON follows the id with no argument marker
            self._call_rules.append("no-argument-marker")
            self.state = State.ARGUMENTS
            self._add_arguments(text[brace:])
        elif state is State.SECTION:
            self._noise += text
            brace = self._noise.find("{")
            if brace >= 0 and ID_LIKE_RE.fullmatch(self._noise[:brace].strip()):
                # family 10: "functions.x:0 {...}" inside a section with no <|tool_call_begin|>
                noise, self._noise = self._noise, ""
                self._begin_call(noise[:brace], "no-call-begin", "no-argument-marker")
                self.state = State.ARGUMENTS
                self._add_arguments(noise[brace:])
            elif len(self._noise) > MAX_SECTION_NOISE:
                self._leave_section_as_text()
        else:  # pragma: no cover - START is resolved before scanning
            raise RuntimeError(f"text consumed in state {state}")

    def _on_marker(self, kind: Marker) -> None:
        """The single dispatch site of the state machine."""
        state = self.state
        if kind is Marker.CONTROL:
            self.repairs["control-token-removed"] += 1
            if state in (State.HEADER, State.ARGUMENTS):  # <|im_end|>: the message is over
                self._call_rules.append("ended-by-control-token")
                self._end_call()
                self.state = State.TEXT
                self._in_section = False
        elif kind is Marker.THINK_CLOSE:
            if state is State.THINK:
                self.state = State.TEXT
            else:
                self.repairs["stray-think-close-removed"] += 1
        elif kind is Marker.SECTION_BEGIN:
            self._close_open_call("section-begin")
            self._drop_noise()
            self.state = State.SECTION
            self._in_section = True
        elif kind is Marker.CALL_BEGIN:
            if not self._close_open_call("next-call-begin"):
                if state is State.SECTION:
                    self._drop_noise()
                else:
                    self._in_section = False
                    self.repairs["no-section-wrapper"] += 1
            self._begin_call("")
        elif kind is Marker.ARGUMENT_BEGIN:
            if state is State.HEADER:
                self.state = State.ARGUMENTS
            elif state is State.ARGUMENTS:
                self._split_polluted_arguments()
            elif state is State.SECTION:  # family 10: a header with no <|tool_call_begin|>
                noise, self._noise = self._noise, ""
                self._begin_call(noise, "no-call-begin")
                self.state = State.ARGUMENTS
            else:
                self.repairs["stray-marker-removed"] += 1
        elif kind is Marker.CALL_END:
            if state in (State.HEADER, State.ARGUMENTS):
                self._end_call()
                self.state = State.SECTION if self._in_section else State.TEXT
            else:
                self.repairs["stray-marker-removed"] += 1
        elif kind is Marker.SECTION_END:
            if not self._close_open_call("section-end-as-call-end") and state is not State.SECTION:
                self.repairs["stray-marker-removed"] += 1
            self._drop_noise()
            self.state = State.TEXT
            self._in_section = False
        else:  # pragma: no cover
            raise RuntimeError(f"unknown marker {kind}")

    # -- calls -------------------------------------------------------------------------------------

    def _begin_call(self, header: str, *rules: str) -> None:
        self.state = State.HEADER
        self._header = header
        self._arguments = []
        self._arguments_len = 0
        self._call_rules = list(rules)
        if not self._in_section:
            self._call_rules.append("no-section-wrapper")

    def _close_open_call(self, rule: str) -> bool:
        """A call still open when another structural marker comes (family 12/13)."""
        if self.state not in (State.HEADER, State.ARGUMENTS):
            return False
        self._call_rules.append(rule)
        self._end_call()
        return True

    def _end_call(self) -> None:
        self._calls.append(RawCall(self._header.strip(), "".join(self._arguments), self.channel,
                                   tuple(self._call_rules)))
        self._header = ""
        self._arguments = []
        self._arguments_len = 0
        self._call_rules = []

    def _add_arguments(self, text: str) -> None:
        self._arguments.append(text)
        self._arguments_len += len(text)
        if self._arguments_len > MAX_CALL_ARGUMENTS:
            log.warning("tool call arguments exceed %d characters: call ended there", MAX_CALL_ARGUMENTS)
            self._call_rules.append("arguments-overflow")
            self._end_call()
            self.state = State.TEXT
            self._in_section = False

    def _split_polluted_arguments(self) -> None:
        """Family 26: "{...}functions.next:1<|tool_call_argument_begin|>": the next call's header ran
        into these arguments because its <|tool_call_begin|> was lost."""
        arguments = "".join(self._arguments)
        end = json_value_end(arguments)
        header = arguments[end:].strip() if end else ""
        if not header or not ID_LIKE_RE.fullmatch(header):
            self.repairs["stray-marker-removed"] += 1
            return
        self._arguments = [arguments[:end]]
        self._call_rules.append("polluted-arguments-split")
        self._end_call()
        self._begin_call(header, "no-call-begin")
        self.state = State.ARGUMENTS

    # -- sections ----------------------------------------------------------------------------------

    def _drop_noise(self) -> None:
        if self._noise.strip():
            self.repairs["section-noise-removed"] += 1
        self._noise = ""

    def _leave_section_as_text(self) -> None:
        """Too much text for noise: the section was never closed and this is prose (rule 1)."""
        self.repairs["unclosed-section"] += 1
        noise, self._noise = self._noise, ""
        self.state = State.TEXT
        self._in_section = False
        self._out.append(noise)

    def _flush_noise_at_end(self) -> None:
        if self._noise.strip():
            self._leave_section_as_text()
        self._noise = ""

    def _drain(self) -> tuple[str, str, list[RawCall]]:
        out, think, calls = self._out, self._think, self._calls
        self._out, self._think, self._calls = [], [], []
        return ("".join(out) if out else "", "".join(think) if think else "", calls)


_PARTIAL = object()  # _match: could still become a marker


def json_loads(data: bytes | str) -> Any:
    """json.loads, by orjson when it is installed. Whatever orjson refuses (invalid JSON, but also
    NaN or integers past 64 bits, which the stdlib accepts) is left to the stdlib, so the result
    never depends on whether orjson is there."""
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
        except TypeError:  # integers past 64 bits
            pass
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def json_value_end(text: str) -> int:
    """Index just past the first JSON value in text (after leading whitespace), or 0."""
    stripped = text.lstrip()
    try:
        _, end = _JSON_DECODER.raw_decode(stripped)
    except ValueError:
        return 0
    return end + len(text) - len(stripped)


_JSON_DECODER = json.JSONDecoder(strict=False)


# ---------------------------------------------------------------------------------------------------
# Repair core: arguments, names and ids
# ---------------------------------------------------------------------------------------------------

def normalize_arguments(raw: str) -> tuple[str, str | None]:
    """FORMAT.md 4.5. Returns (arguments as a JSON text, the rule applied or None).
    The rule "arguments-unrepairable" means the raw text passes on unchanged."""
    text = raw.strip()
    if not text:
        return "{}", "arguments-empty"
    try:
        value = json.loads(text)
    except ValueError:
        value = _load_lenient(text)
        if isinstance(value, dict):  # raw control characters inside strings (pretty-printed JSON)
            return _dumps(value), "arguments-reencoded"
    else:
        if isinstance(value, dict):
            return text, None
        if isinstance(value, str):  # family 23: a JSON string that holds the JSON object
            inner = _load_lenient(value.strip())
            if isinstance(inner, dict):
                return _dumps(inner), "arguments-double-encoded"
    repaired = repair_json(text)
    if repaired is not None:
        return _dumps(repaired), "arguments-repaired"
    return raw, "arguments-unrepairable"


def _load_lenient(text: str) -> Any:
    try:
        return _JSON_DECODER.decode(text)
    except ValueError:
        return None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def repair_json(text: str) -> dict | None:
    """A bounded repair of a broken JSON object: start at the first "{", drop what follows the
    object, close an open string and open brackets; failing that, cut back to the last complete
    member. Two attempts, each one linear scan."""
    start = text.find("{")
    if start < 0:
        return None
    text = text[start:]
    closed, last_comma = _close_json(text)
    for candidate in (closed, _close_json(text[:last_comma])[0] if last_comma > 0 else None):
        if candidate is not None:
            value = _load_lenient(candidate)
            if isinstance(value, dict):
                return value
    return None


def _close_json(text: str) -> tuple[str, int]:
    """(text cut after its first complete value, or completed with closers; index of the last comma
    outside strings)."""
    closers: list[str] = []
    in_string = escaped = False
    last_comma = -1
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            closers.append("}")
        elif ch == "[":
            closers.append("]")
        elif ch in "}]":
            if not closers or closers[-1] != ch:
                return text[:i] + "".join(reversed(closers)), last_comma
            closers.pop()
            if not closers:
                return text[:i + 1], last_comma
        elif ch == ",":
            last_comma = i
    tail = text + ('"' if in_string else "")
    stripped = tail.rstrip()
    if stripped.endswith(","):
        stripped = stripped[:-1]
    elif stripped.endswith(":"):
        stripped += " null"
    return stripped + "".join(reversed(closers)), last_comma


CANONICAL_ID_RE = re.compile(r"functions\.([^\s:]+):(\d+)")
_ID_FORMS = (
    re.compile(r"(?:functions\.)?(?P<name>[^\s:]+?)[:.](?P<idx>\d+)"),  # search:2, functions.x.0
    re.compile(r"functions(?P<name>[A-Za-z_][\w\-.]*?)(?P<idx>\d+)?"),  # functionsexec5
    re.compile(r"call[_\-]?(?P<idx>\d+)"),  # call_2, call00003: a counter, no name
    re.compile(r"(?P<idx>\d+)"),  # a bare counter
)


def id_candidates(header: str) -> list[tuple[str | None, int | None]]:
    """The (name, counter) readings of a call id, most literal first (FORMAT.md 4.3)."""
    header = header.strip()
    candidates: list[tuple[str | None, int | None]] = []
    for form in _ID_FORMS:
        m = form.fullmatch(header)
        if m:
            groups = m.groupdict()
            idx = int(groups["idx"]) if groups.get("idx") else None
            candidates.append((groups.get("name"), idx))
    if header:
        candidates.append((header, None))  # the id as written is a name too ("get_weather")
    return candidates


@dataclasses.dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str
    channel: str  # where the markup was: reasoning_content or content
    rules: tuple[str, ...] = ()

    def delta(self) -> dict:
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def message_entry(self) -> dict:
        return {"id": self.id, "index": self.index, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class RepairContext:
    """What the repair needs to know about the request."""
    tools: dict[str, dict]  # declared tool name -> its parameters schema
    history_calls: int = 0  # tool calls already in the dialog: the next dialog-wide counter
    enabled: bool = True

    @classmethod
    def from_request(cls, request: dict, enabled: bool = True) -> "RepairContext":
        tools: dict[str, dict] = {}
        for tool in request.get("tools") or ():
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                params = function.get("parameters")
                tools[function["name"]] = params if isinstance(params, dict) else {}
        return cls(tools, count_history_calls(request.get("messages")), enabled)

    def resolve_name(self, name: str) -> str | None:
        if not name:
            return None
        tools = self.tools
        if name in tools:
            return name
        parts = name.split(".")  # dotted namespaces: "default_api.get_weather"
        for k in range(1, len(parts)):
            suffix = ".".join(parts[k:])
            if suffix in tools:
                return suffix
        folded = name.casefold()
        matches = [t for t in tools if t.casefold() == folded]
        return matches[0] if len(matches) == 1 else None

    def infer_name(self, arguments: str) -> str | None:
        """The one declared tool whose parameters fit the argument keys, if exactly one does."""
        value = _load_lenient(arguments)
        if not isinstance(value, dict) or not self.tools:
            return None
        keys = set(value)
        fits = []
        for name, params in self.tools.items():
            props = params.get("properties")
            props = set(props) if isinstance(props, dict) else set()
            required = params.get("required")
            required = set(required) if isinstance(required, list) else set()
            if keys <= props and required <= keys:
                fits.append(name)
        return fits[0] if len(fits) == 1 else None


def count_history_calls(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(len(m.get("tool_calls") or ()) for m in messages
               if isinstance(m, dict) and m.get("role") == "assistant"
               and isinstance(m.get("tool_calls"), list))


def canonicalize_history(request: dict) -> int:
    """FORMAT.md 4.12: rewrite non-canonical tool-call ids in the history to functions.NAME:COUNTER,
    and the tool results' tool_call_id with them, so the model keeps seeing its own id format.
    Returns how many ids were rewritten (0: the request is untouched)."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return 0
    counter = rewritten = 0
    mapping: dict[str, str] = {}
    for message in messages:
        if not isinstance(message, dict):
            continue
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if isinstance(calls, list):
            for call in calls:
                if not isinstance(call, dict):
                    continue
                function = call.get("function") if isinstance(call.get("function"), dict) else {}
                name = function.get("name")
                old = call.get("id")
                m = CANONICAL_ID_RE.fullmatch(old) if isinstance(old, str) else None
                if isinstance(name, str) and not (m and m.group(1) == name):
                    new = f"functions.{name}:{counter}"
                    if isinstance(old, str):
                        mapping[old] = new
                    call["id"] = new
                    rewritten += 1
                counter += 1
        elif message.get("role") == "tool" and message.get("tool_call_id") in mapping:
            message["tool_call_id"] = mapping[message["tool_call_id"]]
    return rewritten


class ChoiceRepair:
    """The repair of one choice: both channels' parsers, the structured calls seen, and the
    resolution of recovered calls. The same object serves streamed and whole responses (rule 4)."""

    def __init__(self, ctx: RepairContext) -> None:
        self.ctx = ctx
        self.content = MarkupParser("content", strip_think=True)
        self.reasoning = MarkupParser("reasoning_content")
        self._recovered: dict[str, list[RawCall]] = {"reasoning_content": [], "content": []}
        self.structured: dict[int, dict] = {}  # upstream index -> {"id", "name", "arguments"}
        self.calls: list[ToolCall] = []  # recovered calls, resolved by finish()
        self.dropped_duplicates = 0

    @property
    def held(self) -> int:
        return self.content.held + self.reasoning.held

    def feed(self, content: str | None, reasoning: str | None) -> tuple[str, str]:
        """Channel text in, (content, reasoning) that can be released now out."""
        out_reasoning = ""
        if reasoning:
            out_reasoning, _, calls = self.reasoning.feed(reasoning)
            if calls:
                self._recovered["reasoning_content"].extend(calls)
        out_content = ""
        if content:
            out_content, think, calls = self.content.feed(content)
            if think:
                out_reasoning += think
            if calls:
                self._recovered["content"].extend(calls)
        return out_content, out_reasoning

    def add_structured(self, deltas: Iterable[Any]) -> None:
        """Structured upstream tool-call deltas (streamed pieces or whole entries)."""
        for position, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                continue
            index = delta.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                index = len(self.structured) if delta.get("id") else max(self.structured, default=position)
            entry = self.structured.setdefault(index, {"id": None, "name": "", "arguments": ""})
            if isinstance(delta.get("id"), str) and delta["id"]:
                entry["id"] = delta["id"]
            function = delta.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    entry["name"] += function["name"]
                if isinstance(function.get("arguments"), str):
                    entry["arguments"] += function["arguments"]

    def finish(self) -> tuple[str, str]:
        """End of the message: release held text and resolve the recovered calls into self.calls."""
        out_reasoning, _, calls = self.reasoning.close()
        self._recovered["reasoning_content"].extend(calls)
        out_content, think, calls = self.content.close()
        self._recovered["content"].extend(calls)
        self.calls = self._resolve()
        return out_content, out_reasoning + think

    def _resolve(self) -> list[ToolCall]:
        ctx = self.ctx
        next_index = max(self.structured, default=-1) + 1
        used_ids = {e["id"] for e in self.structured.values() if e["id"]}
        known = {(e["name"], _canonical_args(e["arguments"])) for e in self.structured.values()}
        resolved: list[ToolCall] = []
        for raw in self._recovered["reasoning_content"] + self._recovered["content"]:
            rules = list(raw.rules)
            arguments, arg_rule = normalize_arguments(raw.arguments)
            if arg_rule:
                rules.append(arg_rule)
            name, counter, kept_id = self._resolve_name(raw.header, arguments, rules)
            if (name, _canonical_args(arguments)) in known:
                self.dropped_duplicates += 1
                continue
            call_id = kept_id
            if call_id is None or call_id in used_ids:
                dialog_counter = ctx.history_calls + next_index
                candidates = ([counter] if counter is not None else []) + [dialog_counter]
                call_id = next((f"functions.{name}:{c}" for c in candidates
                                if f"functions.{name}:{c}" not in used_ids), None)
                bump = dialog_counter
                while call_id is None:
                    bump += 1
                    if f"functions.{name}:{bump}" not in used_ids:
                        call_id = f"functions.{name}:{bump}"
                if call_id != raw.header:
                    rules.append("id-rewritten")
            used_ids.add(call_id)
            known.add((name, _canonical_args(arguments)))
            resolved.append(ToolCall(next_index, call_id, name, arguments, raw.channel, tuple(rules)))
            next_index += 1
        return resolved

    def _resolve_name(self, header: str, arguments: str,
                      rules: list[str]) -> tuple[str, int | None, str | None]:
        """(name, the model's own counter or None, the id to keep verbatim or None)."""
        ctx = self.ctx
        candidates = id_candidates(header)
        canonical = CANONICAL_ID_RE.fullmatch(header)
        for cand_name, counter in candidates:
            if cand_name is None:
                continue
            name = ctx.resolve_name(cand_name) if ctx.tools else cand_name
            if name is None:
                continue
            if canonical and name == canonical.group(1):
                return name, counter, header  # rule 4.4: canonical and resolved as written
            if name != cand_name:
                rules.append("name-resolved")
            return name, counter, None
        counter = next((c for _, c in candidates if c is not None), None)
        inferred = ctx.infer_name(arguments)
        if inferred:
            rules.append("name-inferred-from-arguments")
            return inferred, counter, None
        written = next((n for n, _ in candidates if n), "") or header or "unknown"
        rules.append("name-unresolved")
        return written, counter, None

    def finish_reason(self, upstream: str | None) -> str | None:
        """FORMAT.md 4.9: follow the calls actually delivered."""
        has_calls = bool(self.structured or self.calls)
        if upstream == "length":
            return upstream
        if has_calls:
            return "tool_calls"
        if upstream == "tool_calls":
            return "stop"
        return upstream

    def repairs(self) -> Counter[str]:
        total = self.content.repairs + self.reasoning.repairs
        if self.dropped_duplicates:
            total["duplicate-call-dropped"] += self.dropped_duplicates
        return total


def _canonical_args(arguments: str) -> str:
    value = _load_lenient(arguments) if arguments.strip() else {}
    if value is None:
        return arguments
    return json.dumps(value, sort_keys=True)


def reasoning_field(message: dict) -> str:
    """Where this server puts reasoning: ``reasoning_content`` (SGLang), or its alias ``reasoning``."""
    return "reasoning" if "reasoning" in message and "reasoning_content" not in message \
        else "reasoning_content"


def repair_completion(body: dict, ctx: RepairContext) -> tuple[list[ChoiceRepair], bool]:
    """Repair a whole (non-streamed) chat.completion in place; returns the per-choice repairs and
    whether anything changed."""
    repairs = []
    changed = False
    for choice in body.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        repair = ChoiceRepair(ctx)
        structured = message.get("tool_calls")
        if isinstance(structured, list):
            repair.add_structured(structured)
        reasoning_key = reasoning_field(message)
        content_in, reasoning_in = message.get("content"), message.get(reasoning_key)
        content, reasoning = repair.feed(content_in if isinstance(content_in, str) else None,
                                         reasoning_in if isinstance(reasoning_in, str) else None)
        content_end, reasoning_end = repair.finish()
        content += content_end
        reasoning += reasoning_end
        if content != (content_in or "") or reasoning != (reasoning_in or ""):
            changed = True
            message["content"] = content if content or content_in is not None and not repair.calls else None
            message[reasoning_key] = reasoning or None
        if repair.calls:
            changed = True
            message["tool_calls"] = (structured if isinstance(structured, list) else []) + \
                [call.message_entry() for call in repair.calls]
        finish = repair.finish_reason(choice.get("finish_reason"))
        if finish != choice.get("finish_reason"):
            changed = True
            choice["finish_reason"] = finish
        repairs.append(repair)
    return repairs, changed


# ---------------------------------------------------------------------------------------------------
# Repair core: the stream transformer
# ---------------------------------------------------------------------------------------------------

class StreamRepair:
    """Upstream SSE event data in, downstream SSE frames out. ``feed(data)`` per event,
    ``close()`` at the end of the upstream stream.

    Text deltas are repaired as they come; recovered calls are sent, one chunk per call, just before
    the finish chunk, when every structured call has been seen (so duplicates can be dropped and
    indices never collide) and the arguments are complete (so they can be repaired). An event that
    the repair leaves unchanged is forwarded as the very bytes that came in. With ``ctx.enabled``
    false the transformer only relays and aggregates for the log.
    """

    def __init__(self, ctx: RepairContext) -> None:
        self.ctx = ctx
        self.choices: dict[int, ChoiceRepair] = {}
        self.finished: set[int] = set()
        self.done = False  # [DONE] relayed
        self.usage: Any = None
        self.skipped = 0  # events that were not JSON
        self.max_held = 0
        self.aggregate: dict[int, dict] = {}  # choice index -> final message, for the log
        self._envelope: dict = {}

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            return []
        if data == b"[DONE]":
            return self._end() + [DONE_FRAME]
        try:
            chunk = json_loads(data)
        except ValueError:  # also invalid UTF-8
            self.skipped += 1
            log.warning("upstream SSE event is not JSON, skipped: %.200r", data)
            return []
        if not isinstance(chunk, dict):
            self.skipped += 1
            log.warning("upstream SSE event is not a JSON object, skipped: %.200r", data)
            return []
        raw = b"data: " + data + b"\n\n"
        choices = chunk.get("choices")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if not choices or not isinstance(choices, list):
            return [raw]
        self._envelope = chunk
        if not self.ctx.enabled:
            for choice in choices:
                if isinstance(choice, dict):
                    self._aggregate_passthrough(choice)
            return [raw]
        outputs: list[dict] = []
        changed = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            produced = self._choice(choice)
            if produced is None:
                outputs.append(choice)
            else:
                changed = True
                outputs.extend(produced)
        if not changed:
            return [raw]
        return [self._frame(chunk, [choice]) for choice in outputs]

    def feed_all(self, events: list[bytes]) -> list[bytes]:
        return [frame for data in events for frame in self.feed(data)]

    def close(self) -> list[bytes]:
        """The upstream stream ended: finish what it left open, then [DONE] if it never came."""
        if self.done:
            return []
        return self._end() + [DONE_FRAME]

    # -- per choice ----------------------------------------------------------------------------------

    def _choice(self, choice: dict) -> list[dict] | None:
        """Repaired choice dicts for this event, or None when it passes unchanged."""
        index = _choice_index(choice)
        if index in self.finished:  # past its finish chunk: nothing left to repair or to resolve
            return None
        repair, agg = self._state(index)
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        changed = False
        reasoning_key = reasoning_field(delta)
        content_in, reasoning_in = delta.get("content"), delta.get(reasoning_key)
        content_in = content_in if isinstance(content_in, str) else None
        reasoning_in = reasoning_in if isinstance(reasoning_in, str) else None
        if content_in or reasoning_in:
            content, reasoning = repair.feed(content_in, reasoning_in)
            self.max_held = max(self.max_held, repair.held)
            agg["content"].append(content)
            agg["reasoning"].append(reasoning)
            if content != (content_in or "") or reasoning != (reasoning_in or ""):
                changed = True
                delta = dict(delta)
                delta["content"] = content or None
                delta[reasoning_key] = reasoning or None
        if isinstance(delta.get("tool_calls"), list):
            repair.add_structured(delta["tool_calls"])
        upstream_finish = choice.get("finish_reason")
        if upstream_finish is not None and not isinstance(upstream_finish, str):
            upstream_finish = "stop"  # a malformed finish is still the end of the choice
        if upstream_finish is None:
            if not changed:
                return None
            return [dict(choice, delta=delta)] if _has_payload(delta) else []
        # The finish chunk: release held text, then the recovered calls, then the finish itself.
        out = [dict(choice, delta=delta, finish_reason=None)] if changed and _has_payload(delta) else []
        extra = self._finish_choice(index, repair, upstream_finish)
        if not changed and not extra and agg["finish_reason"] == upstream_finish:
            return None
        if not changed and not extra:  # only the finish reason changed
            return [dict(choice, finish_reason=agg["finish_reason"])]
        finish_delta = {} if changed or not _has_payload(delta) else delta
        return out + extra + [dict(choice, delta=finish_delta, finish_reason=agg["finish_reason"])]

    def _finish_choice(self, index: int, repair: ChoiceRepair, upstream_finish: str | None) -> list[dict]:
        """Close one choice: its held text and recovered calls as choice dicts (finish not included)."""
        self.finished.add(index)
        agg = self.aggregate[index]
        content, reasoning = repair.finish()
        agg["content"].append(content)
        agg["reasoning"].append(reasoning)
        agg["finish_reason"] = repair.finish_reason(upstream_finish)
        extra = []
        if content or reasoning:
            extra.append({"index": index, "delta": {"content": content or None,
                                                    "reasoning_content": reasoning or None},
                          "logprobs": None, "finish_reason": None})
        for call in repair.calls:
            extra.append({"index": index, "delta": {"tool_calls": [call.delta()]},
                          "logprobs": None, "finish_reason": None})
        return extra

    def _end(self) -> list[bytes]:
        self.done = True
        frames: list[bytes] = []
        if not self.ctx.enabled:  # transparent: only the [DONE] the caller adds
            return frames
        for index, repair in self.choices.items():
            if index in self.finished:
                continue
            extra = self._finish_choice(index, repair, None)
            finish = self.aggregate[index]["finish_reason"] or "stop"
            self.aggregate[index]["finish_reason"] = finish
            extra.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish})
            frames.extend(self._frame(self._envelope, [c]) for c in extra)
        return frames

    def _aggregate_passthrough(self, choice: dict) -> None:
        index = _choice_index(choice)
        repair, agg = self._state(index)
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        for key, field in (("content", "content"), ("reasoning_content", "reasoning"),
                           ("reasoning", "reasoning")):
            if isinstance(delta.get(key), str):
                agg[field].append(delta[key])
        if isinstance(delta.get("tool_calls"), list):
            repair.add_structured(delta["tool_calls"])
        if choice.get("finish_reason") is not None:
            agg["finish_reason"] = choice["finish_reason"]
            self.finished.add(index)

    def _state(self, index: int) -> tuple[ChoiceRepair, dict]:
        """A choice's repair and its aggregated message (for the log), made at its first chunk."""
        repair = self.choices.get(index)
        if repair is None:
            repair = self.choices[index] = ChoiceRepair(self.ctx)
            self.aggregate[index] = {"content": [], "reasoning": [], "finish_reason": None}
        return repair, self.aggregate[index]

    def _frame(self, envelope: dict, choices: list[dict]) -> bytes:
        chunk = dict(envelope, choices=choices)
        if "usage" in envelope:
            chunk["usage"] = None
        return b"data: " + json_dumps_compact(chunk) + b"\n\n"

    def final_messages(self) -> list[dict]:
        """The aggregated message of each choice, as the client received it: for the log."""
        messages = []
        for index, agg in sorted(self.aggregate.items()):
            repair = self.choices.get(index)
            calls = []
            if repair is not None:
                calls = [{"id": e["id"], "name": e["name"], "arguments": e["arguments"]}
                         for e in repair.structured.values()]
                calls += [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in repair.calls]
            messages.append({"index": index, "content": "".join(agg["content"]),
                             "reasoning_content": "".join(agg["reasoning"]),
                             "tool_calls": calls, "finish_reason": agg["finish_reason"]})
        return messages


def _choice_index(choice: dict) -> int:
    index = choice.get("index", 0)
    return index if isinstance(index, int) and not isinstance(index, bool) else 0


def _has_payload(delta: dict) -> bool:
    return any(v is not None and v != "" for v in delta.values())


# ---------------------------------------------------------------------------------------------------
# SSE codec
# ---------------------------------------------------------------------------------------------------

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
# Configuration
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, with the environment variable that sets it. Names kept from the FastAPI proxy
    that users already have in their .env: SGLANG_API_BASE, PROXY_HOST, PROXY_PORT, LOG_LEVEL,
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
    body_timeout: float = BODY_READ_TIMEOUT  # BODY_TIMEOUT: seconds to receive a request body
    api_keys: tuple[str, ...] = ()  # PROXY_API_KEY: keys clients must present (comma-separated)
    upstream_api_key: str = ""  # UPSTREAM_API_KEY: sent to the upstream instead of the client's key
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE  # SHUTDOWN_GRACE: seconds in-flight requests get

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

        upstream = text("SGLANG_API_BASE", defaults.upstream).rstrip("/")
        if not re.match(r"https?://[^/\s]+", upstream):
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
            body_timeout=number("BODY_TIMEOUT", defaults.body_timeout, 0.001),
            api_keys=tuple(k.strip() for k in env.get("PROXY_API_KEY", "").split(",") if k.strip()),
            upstream_api_key=env.get("UPSTREAM_API_KEY", "").strip(),
            shutdown_grace=number("SHUTDOWN_GRACE", defaults.shutdown_grace),
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


# ---------------------------------------------------------------------------------------------------
# Logging: one logger, the request id on every line, secrets never written
# ---------------------------------------------------------------------------------------------------

class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class ColorFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m",
              "CRITICAL": "\033[1;31m"}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        color = self.COLORS.get(record.levelname)
        return f"{color}{line}\033[0m" if color else line


LOG_FORMAT = "%(asctime)s %(levelname)-7s [%(request_id)s] %(message)s"


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
    console.addFilter(RequestIdFilter())
    log.addHandler(console)
    if settings.file_logging:
        log.addHandler(file_handler(settings))


def file_handler(settings: Settings) -> logging.Handler:
    """LOG_FILE, rotated at LOG_MAX_BYTES with LOG_BACKUPS old files kept."""
    handler = logging.handlers.RotatingFileHandler(
        settings.log_file, maxBytes=settings.log_max_bytes, backupCount=settings.log_backups,
        encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    return handler


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


def _preview(text: str) -> str:
    return text if len(text) <= LOG_PREVIEW_CHARS else text[:LOG_PREVIEW_CHARS] + f"...(+{len(text) - LOG_PREVIEW_CHARS})"


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
    "kimiproxy_upstream_first_byte_seconds": ("histogram", "Time from request to the upstream's response headers"),
    "kimiproxy_request_duration_seconds": ("histogram", "Time from request to the end of the response, by route"),
}


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
                    lines.append(f"{name}{_labels(labels)} {value:g}")
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


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


def route_label(path: str) -> str:
    """A bounded set of route labels: the known routes, else the first path segments."""
    if path in CHAT_PATHS or path in ("/v1/models", "/v1/completions", "/v1/embeddings"):
        return path
    return "/v1/other" if path.startswith("/v1/") else "other"


# ---------------------------------------------------------------------------------------------------
# The upstream edge: one request, from the client's bytes to the upstream and back
# ---------------------------------------------------------------------------------------------------

CHAT_PATHS = ("/v1/chat/completions", "/api/chat/completions")
# A whole response without any of these cannot need a repair: it passes without being parsed.
MAY_NEED_REPAIR_RE = re.compile(rb'<|"tool_calls":\s*\[|"finish_reason":\s*"tool_calls"')


def upstream_failure(exc: httpx.HTTPError, url: str) -> UpstreamError:
    """The one place where httpx's exceptions become ours."""
    if isinstance(exc, httpx.TimeoutException):
        err = UpstreamError(f"upstream timed out ({type(exc).__name__}) at {url}", 504)
        err.kind = "timeout"
    elif isinstance(exc, httpx.ConnectError):
        err = UpstreamError(f"upstream unreachable at {url}: {exc}", 502)
        err.kind = "connect"
    else:
        err = UpstreamError(f"upstream connection failed ({type(exc).__name__}): {exc}", 502)
    return err


def upstream_http_error(status: int, body: bytes) -> UpstreamError:
    """An upstream 4xx/5xx, in OpenAI's error shape, keeping the upstream's status and message.
    SGLang sends {"object": "error", "message": ..., "code": N}."""
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
    """Headers less the dropped names (lower-cased), and Content-Encoding where the body is
    decoded on the way."""
    out = []
    for name, value in headers:
        key = name.lower()
        if key in dropped or (key == b"content-encoding" and not keep_content_encoding):
            continue
        out.append((key, value))
    return out


def forward_request_headers(headers: list[tuple[bytes, bytes]], accept_encoding: bool,
                            keep_content_encoding: bool) -> list[tuple[bytes, bytes]]:
    """End-to-end headers, Authorization included. Not hop-by-hop ones, Host, or a Content-Length
    (httpx sets it for the body it sends). Accept-Encoding passes only where the response is relayed
    untouched; where kimiproxy reads the body it asks for identity."""
    out = end_to_end_headers(headers, REQUEST_HEADERS_DROPPED, keep_content_encoding)
    asked = [(k.lower(), v) for k, v in headers if k.lower() == b"accept-encoding"]
    out.extend(asked if accept_encoding and asked else [(b"accept-encoding", b"identity")])
    return out


def response_headers(upstream: httpx.Response, keep_content_encoding: bool) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers worth relaying (Downstream.start adds X-Request-ID)."""
    return end_to_end_headers(upstream.headers.raw, RESPONSE_HEADERS_DROPPED, keep_content_encoding)


class Downstream:
    """The response to our client, over raw ASGI: a status once, then the body. In a stream only
    the ``SSEWriter`` task writes the body; ``start`` is guarded by a flag set before it awaits, so
    the relay and the writer never both start the response."""

    def __init__(self, send: Any, request_id: str) -> None:
        self._send = send
        self.request_id = request_id
        self.started = False
        self.ended = False
        self.status = 0
        self.bytes = 0
        self.finished = trio.Event()  # the whole response is out
        self.writer: SSEWriter | None = None  # set while a stream's writer owns the body

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self.status = status
        await self._message({"type": "http.response.start", "status": status,
                             "headers": headers + [(b"x-request-id", self.request_id.encode())]})

    async def write(self, data: bytes) -> None:
        self.bytes += len(data)
        await self._message({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        self.ended = True
        self.bytes += len(data)
        await self._message({"type": "http.response.body", "body": data, "more_body": False})
        self.finished.set()

    async def _message(self, message: dict) -> None:
        try:
            await self._send(message)
        except Exception as exc:  # Hypercorn can refuse a write once the connection is gone
            raise _ClientGone() from exc

    async def send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        await self.start(status, [(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body)).encode())])
        await self.end(body)

    async def fail(self, err: ProxyError) -> None:
        """An error: its status and JSON body if nothing was sent yet; in a stream that has begun,
        an error event from its writer; otherwise the response just ends."""
        if self.writer is not None and self.started:
            self.writer.fail(err)
        elif not self.started:
            await self.send_json(err.status, err.body())
        elif not self.ended:
            await self.end()


class SSEWriter:
    """Writes a stream's body. Two ways in, chosen by how the upstream is sending:

    - a chunk that arrives after a pause (a model emitting tokens) is written at once by the relay
      itself when nothing else is being written: no task switch, the lowest latency;
    - chunks of a burst (one upstream read holding many SSE events) are ``put`` and the writer task
      sends everything that piled up in one write: one downstream write per upstream read, not one
      per event.

    The writer task also starts the response if the upstream stays silent past HEADER_GRACE, and
    writes an SSE comment whenever ``interval`` seconds pass with nothing written: they keep Node
    clients (300 s body timeout) and proxies from giving up during a long prefill or a long tool
    call, and make a vanished client visible."""

    def __init__(self, down: Downstream, interval: float, on_client_gone: Any) -> None:
        self.down = down
        down.writer = self
        self._on_client_gone = on_client_gone
        self.interval = interval if interval > 0 else math.inf
        self._frames: list[bytes] = []
        self._pending = 0  # bytes in _frames
        self._writing = False  # a write is in progress, by either way in
        self._closing = False
        self._last_write = trio.current_time()
        self._wake = trio.Event()  # frames were put, or the stream is closing
        self._room = trio.Event()  # the writer took the frames: a blocked relay may go on

    async def send(self, data: bytes, paced: bool) -> None:
        """The relay's way in (see the class docstring)."""
        if paced and not self._writing and not self._frames and self.down.started:
            await self._write(data)
            return
        self.put(data)
        while self._pending > MAX_PENDING_BYTES:  # a slow client: stop reading the upstream
            await self._room.wait()

    def put(self, data: bytes) -> None:
        self._frames.append(data)
        self._pending += len(data)
        self._wake.set()

    def close(self, data: bytes = b"") -> None:
        if data:
            self.put(data)
        self._closing = True
        self._wake.set()

    def fail(self, err: ProxyError) -> None:
        """One OpenAI-style error event and the end: clients raise it as a stream error."""
        self.close(b"data: " + json.dumps(err.body(), ensure_ascii=False).encode() + b"\n\n")

    async def _write(self, data: bytes) -> None:
        self._writing = True
        try:
            await self.down.write(data)
        finally:
            self._writing = False
            self._last_write = trio.current_time()

    async def run(self) -> None:
        try:
            await self._run()
        except _ClientGone:
            if not self._closing:  # a client that hangs up on [DONE] got its whole stream
                self._on_client_gone()
            self.down.finished.set()

    async def _run(self) -> None:
        down = self.down
        if not down.started and self.interval < math.inf:
            with trio.move_on_after(min(HEADER_GRACE, self.interval)):
                await self._wake.wait()
            if not down.started:  # the upstream is still silent: commit to the stream now
                await down.start(200, list(SSE_HEADERS))
                await self._write(HEARTBEAT_FRAME)
        while True:
            with trio.move_on_at(self._last_write + self.interval):
                await self._wake.wait()
            if not self._wake.is_set():  # nothing was put for a while
                if not self._writing and trio.current_time() >= self._last_write + self.interval:
                    await self._write(HEARTBEAT_FRAME)
                continue
            self._wake = trio.Event()
            data = b"".join(self._frames) if len(self._frames) != 1 else self._frames[0]
            self._frames.clear()
            self._pending = 0
            self._room.set()
            self._room = trio.Event()
            if not down.started:  # the relay queued frames for a response it had no time to start
                await down.start(200, list(SSE_HEADERS))
            if self._closing:
                await down.end(data)
                return
            if data:
                await self._write(data)


@dataclasses.dataclass
class Exchange:
    """One proxied request, as the log tells it."""
    request_id: str
    method: str
    path: str
    started: float = dataclasses.field(default_factory=time.monotonic)
    first_byte: float | None = None  # the upstream's response headers (its first bytes), seconds after start
    client_gone: bool = False
    upstream_closed: bool = False

    def client_left(self, scope: trio.CancelScope) -> None:
        """The client left before its response was complete: cancel what serves it (the upstream
        request is closed on the way out)."""
        self.client_gone = True
        scope.cancel()


async def read_body(receive: Any, limit: int, timeout: float) -> bytes:
    """The whole request body, or ClientError 413 past ``limit`` / 408 if the client stalls.

    Past the limit the rest is read and dropped (up to MAX_DRAIN_BYTES) before answering: a client
    still sending when the server answers and closes gets a connection reset instead of the 413."""
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout) as scope:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit:
                parts = []  # from here on the body is only drained
                if not more or size > limit + MAX_DRAIN_BYTES:
                    raise ClientError(f"request body exceeds the {limit / 1048576:g} MiB limit "
                                      "(MAX_BODY_MB)", 413)
                continue
            parts.append(chunk)
            if not more:
                break
    if scope.cancelled_caught:
        raise ClientError(f"request body not received within {timeout:g} s (BODY_TIMEOUT)", 408)
    return b"".join(parts)


async def watch_disconnect(receive: Any, exchange: Exchange, down: Downstream,
                           scope: trio.CancelScope) -> None:
    """After the body is read, the only message left is http.disconnect. Before the response is
    complete it means the client left: the exchange is cancelled, the upstream closed with it.
    (Hypercorn also sends it after a complete response: that one changes nothing.)"""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not down.ended:
                exchange.client_left(scope)
            return


async def close_upstream(response: httpx.Response | None, exchange: Exchange) -> None:
    """Close the upstream response even inside a cancelled scope: SGLang aborts the generation when
    its connection closes, which is what frees the GPU."""
    if response is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(UPSTREAM_CLOSE_TIMEOUT):
        await response.aclose()
        exchange.upstream_closed = True


class Proxy:
    """The proxied routes. Holds the shared httpx client (opened at start-up, closed at shutdown)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.client: httpx.AsyncClient | None = None
        self._exposure_checked = False
        self.transport: httpx.AsyncHTTPTransport | None = None
        self.in_flight = 0  # proxied requests being served
        self.finished_since_collect = 0
        self._collect_due = trio.Event()  # the proxy went idle, or COLLECT_EVERY requests finished
        self._collector: trio.CancelScope | None = None

    async def open(self) -> None:
        s = self.settings
        # No cap on connections: 500 concurrent streams each hold one for their whole life.
        self.transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=IDLE_UPSTREAM_CONNECTIONS))
        self.client = httpx.AsyncClient(
            transport=self.transport,
            timeout=httpx.Timeout(s.forward_timeout, connect=UPSTREAM_CONNECT_TIMEOUT,
                                  pool=UPSTREAM_CONNECT_TIMEOUT),
            follow_redirects=False,
        )

    async def collect_garbage(self) -> None:
        """Full garbage collections: once the proxy has been idle for IDLE_COLLECT_AFTER, or after
        COLLECT_EVERY finished requests when it never is.

        Each connection leaves about 80 objects in reference cycles (Hypercorn's protocol objects,
        h11's connection, trio's tasks and cancel scopes). A stream lives long enough for them to
        reach the oldest generation, which CPython collects only after millions of allocations
        (and GC_THRESHOLD makes that rarer still): left to it, the worker's memory grows with every
        burst. Collecting when nothing is in flight pauses no request; under constant load one pause
        per COLLECT_EVERY requests bounds the garbage (measured: about 1 ms after small
        requests, 50-75 ms with 500 streams open)."""
        with trio.CancelScope() as self._collector:
            while True:
                await self._collect_due.wait()
                self._collect_due = trio.Event()
                if self.finished_since_collect < COLLECT_EVERY:  # the proxy went idle: is it staying so?
                    await trio.sleep(IDLE_COLLECT_AFTER)
                    if self.in_flight or self._collect_due.is_set():
                        continue
                self.finished_since_collect = 0
                gc.collect()

    async def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def upstream_url(self, path: str, query: bytes) -> str:
        """/v1/models -> {SGLANG_API_BASE}/models; /api/chat/completions -> .../chat/completions."""
        tail = path.split("/", 2)[2] if path.count("/") >= 2 else ""
        url = f"{self.settings.upstream}/{tail}"
        return f"{url}?{query.decode('latin-1')}" if query else url

    def upstream_headers(self, headers: list[tuple[bytes, bytes]], accept_encoding: bool,
                         keep_content_encoding: bool) -> list[tuple[bytes, bytes]]:
        """The client's headers for the upstream, with the key policy applied: with PROXY_API_KEY
        the client's key is ours and stays here; UPSTREAM_API_KEY, when set, is sent instead."""
        out = forward_request_headers(headers, accept_encoding, keep_content_encoding)
        settings = self.settings
        if settings.api_keys or settings.upstream_api_key:
            out = [(k, v) for k, v in out if k not in (b"authorization", b"api-key", b"x-api-key")]
            if settings.upstream_api_key:
                out.append((b"authorization", b"Bearer " + settings.upstream_api_key.encode()))
        return out

    def authorized(self, scope: dict) -> bool:
        """Authorization: Bearer <one of PROXY_API_KEY>, compared in constant time with every key."""
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                presented = value
        token = presented[7:].strip() if presented[:7].lower() == b"bearer " else b""
        matched = False
        for key in self.settings.api_keys:
            matched |= hmac.compare_digest(token, key.encode())
        return matched

    def check_exposure(self, scope: dict) -> None:
        """Once: warn when the proxy answers on a non-loopback address with no PROXY_API_KEY."""
        self._exposure_checked = True
        server = scope.get("server") or ("", 0)
        if not self.settings.api_keys and not _is_loopback(server[0]):
            log.warning("kimiproxy is reachable on %s without PROXY_API_KEY: anyone on the network can "
                        "use the GPU. Set PROXY_API_KEY, or bind to 127.0.0.1.", server[0])

    def report_repairs(self, repairs: list[ChoiceRepair]) -> None:
        """One log line per recovered call (what, from where, by which rule), one for the text-level
        repairs, and the metrics."""
        metrics = self.metrics
        for repair in repairs:
            for call in repair.calls:
                log.info("repair: recovered tool call %s (%s) from %s by rules [%s]", call.id, call.name,
                         call.channel, ", ".join(call.rules) or "markup")
                if "arguments-unrepairable" in call.rules:
                    log.warning("repair: arguments of %s are not valid JSON and could not be repaired; "
                                "passed on as written", call.id)
                metrics.inc("kimiproxy_tool_calls_recovered_total", channel=call.channel)
                for rule in call.rules:
                    metrics.inc("kimiproxy_repairs_total", rule=rule)
            text_repairs = repair.repairs()
            if text_repairs:
                log.info("repair: text %s", ", ".join(f"{k}={v}" for k, v in sorted(text_repairs.items())))
            for rule, count in text_repairs.items():
                metrics.inc("kimiproxy_repairs_total", count, rule=rule)

    # -- routes --------------------------------------------------------------------------------------

    async def handle(self, scope: dict, receive: Any, send: Any, chat: bool) -> None:
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        exchange = Exchange(request_id, scope["method"], scope["path"])
        down = Downstream(send, request_id)
        self.in_flight += 1
        try:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("headers %s", redact_headers(scope["headers"]))
            try:
                body = await read_body(receive, self.settings.max_body_bytes, self.settings.body_timeout)
            except _ClientGone:
                exchange.client_gone = True
                return
            except ProxyError as err:
                await self._fail(exchange, down, err)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_disconnect, receive, exchange, down, nursery.cancel_scope)
                try:
                    if chat:
                        await self.chat(scope, body, exchange, down, nursery)
                    else:
                        await self.passthrough(scope, body, exchange, down)
                except _ClientGone:  # a write to the client failed: it left
                    exchange.client_left(nursery.cancel_scope)
                except ProxyError as err:
                    await self._fail(exchange, down, err)
                except Exception as exc:  # the request boundary: the proxy keeps serving
                    log.exception("%s %s: internal error", exchange.method, exchange.path)
                    await self._fail(exchange, down,
                                     ProxyError(f"internal proxy error: {type(exc).__name__}: {exc}"))
                await down.finished.wait()  # a stream's writer may still be flushing
                nursery.cancel_scope.cancel()  # the watcher
        finally:
            self.in_flight -= 1
            self.finished_since_collect += 1
            if not self.in_flight or self.finished_since_collect >= COLLECT_EVERY:
                self._collect_due.set()
            self._log_end(exchange, down)
            REQUEST_ID.reset(token)

    async def _fail(self, exchange: Exchange, down: Downstream, err: ProxyError) -> None:
        if isinstance(err, UpstreamError):
            self.metrics.inc("kimiproxy_upstream_errors_total", kind=err.kind, status=str(err.status))
        level = logging.WARNING if err.status < 500 else logging.ERROR
        log.log(level, "%s %s failed after %.3fs: %d %s", exchange.method, exchange.path,
                time.monotonic() - exchange.started, err.status, err.message)
        try:
            await down.fail(err)
        except _ClientGone:
            exchange.client_gone = True

    def _log_end(self, exchange: Exchange, down: Downstream) -> None:
        elapsed = time.monotonic() - exchange.started
        ttfb = f"{exchange.first_byte:.3f}s" if exchange.first_byte is not None else "-"
        metrics, route = self.metrics, route_label(exchange.path)
        metrics.inc("kimiproxy_requests_total", route=route,
                    status="499" if exchange.client_gone else str(down.status))
        metrics.observe("kimiproxy_request_duration_seconds", elapsed, route=route)
        if exchange.first_byte is not None:
            metrics.observe("kimiproxy_upstream_first_byte_seconds", exchange.first_byte)
        if exchange.client_gone:
            metrics.inc("kimiproxy_client_disconnects_total",
                        upstream_closed="true" if exchange.upstream_closed else "no_upstream")
            log.warning("%s %s: client disconnected after %.3fs (upstream %s)", exchange.method,
                        exchange.path, elapsed, "closed" if exchange.upstream_closed else "not open")
        else:
            log.info("%s %s -> %s in %.3fs (upstream first byte %s, %d bytes out)", exchange.method,
                     exchange.path, down.status or "-", elapsed, ttfb, down.bytes)

    async def chat(self, scope: dict, body: bytes, exchange: Exchange, down: Downstream,
                   nursery: trio.Nursery) -> None:
        request = parse_chat_request(scope, body)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %s", exchange.method, exchange.path, summarize_request(request, len(body)))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request body %s", body.decode("utf-8", "replace"))
        settings = self.settings
        ctx = RepairContext.from_request(request, enabled=settings.repair)
        if settings.repair and canonicalize_history(request):
            log.info("repair: rewrote non-canonical tool-call ids in the history for the upstream")
            body = json_dumps_compact(request)
        url = self.upstream_url(scope["path"], scope["query_string"])
        headers = self.upstream_headers(scope["headers"], accept_encoding=False, keep_content_encoding=False)
        assert self.client is not None
        upstream_request = self.client.build_request("POST", url, content=body, headers=headers)
        if request.get("stream") is True:
            await self.stream_chat(upstream_request, ctx, exchange, down, nursery)
        else:
            await self.whole_chat(upstream_request, ctx, exchange, down)

    async def whole_chat(self, upstream_request: httpx.Request, ctx: RepairContext,
                         exchange: Exchange, down: Downstream) -> None:
        response = await self._send_upstream(upstream_request, exchange)
        try:
            data = await _read_upstream_body(response)
        finally:
            await close_upstream(response, exchange)
        if response.status_code >= 400:
            raise upstream_http_error(response.status_code, data)
        headers = response_headers(response, keep_content_encoding=False)
        completion = None
        if ctx.enabled and "json" in response.headers.get("content-type", "") and (
                MAY_NEED_REPAIR_RE.search(data) or log.isEnabledFor(logging.INFO)):
            try:
                completion = json_loads(data)
            except ValueError:
                log.warning("upstream sent invalid JSON; relayed as it came")
        if isinstance(completion, dict):
            repairs, changed = repair_completion(completion, ctx)
            if changed:
                self.report_repairs(repairs)
                data = json_dumps_compact(completion)
            if log.isEnabledFor(logging.INFO):
                log.info("response %s", _describe_completion(completion))
        headers = [(k, v) for k, v in headers if k != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode()))
        await down.start(response.status_code, headers)
        await down.end(data)

    async def stream_chat(self, upstream_request: httpx.Request, ctx: RepairContext,
                          exchange: Exchange, down: Downstream, nursery: trio.Nursery) -> None:
        writer = SSEWriter(down, self.settings.heartbeat_interval,
                           functools.partial(exchange.client_left, nursery.cancel_scope))
        nursery.start_soon(writer.run)
        response = None
        self.metrics.streams_in_flight += 1
        try:
            response = await self._send_upstream(upstream_request, exchange)
            if response.status_code >= 400:
                raise upstream_http_error(response.status_code, await _read_upstream_body(response))
            if "text/event-stream" not in response.headers.get("content-type", ""):
                data = await _read_upstream_body(response)
                raise UpstreamError("upstream answered a streaming request without an event stream: "
                                    f"{data[:200]!r}")
            if not down.started:
                await down.start(200, list(SSE_HEADERS))
            await self._relay_events(response, ctx, exchange, writer)
        finally:
            self.metrics.streams_in_flight -= 1
            await close_upstream(response, exchange)

    async def _relay_events(self, response: httpx.Response, ctx: RepairContext,
                            exchange: Exchange, writer: SSEWriter) -> None:
        decoder = SSEDecoder()
        relay = StreamRepair(ctx)
        debug = log.isEnabledFor(logging.DEBUG)
        last_read = trio.current_time()
        try:
            async for chunk in body_chunks(response):
                now = trio.current_time()
                paced, last_read = now - last_read > BURST_GAP, now
                frames = []
                for data in decoder.decode(chunk):
                    if debug:
                        log.debug("upstream event %s", data.decode("utf-8", "replace"))
                    frames += relay.feed(data)
                if frames:
                    await writer.send(b"".join(frames) if len(frames) > 1 else frames[0], paced)
        except httpx.HTTPError as exc:
            err = upstream_failure(exc, str(response.url))
            err.message = f"upstream stream broke off: {err.message}"
            frames = relay.feed_all(decoder.flush()) + relay.close()[:-1]  # no [DONE]: this stream failed
            if frames:
                writer.put(b"".join(frames))
            raise err from None
        frames = relay.feed_all(decoder.flush()) + relay.close()
        writer.close(b"".join(frames))
        if relay.skipped or decoder.oversized:
            log.warning("upstream stream: %d events not JSON, %d oversized lines dropped",
                        relay.skipped, decoder.oversized)
        if ctx.enabled:
            self.report_repairs(list(relay.choices.values()))
        if log.isEnabledFor(logging.INFO):
            for message in relay.final_messages():
                log.info("stream final message %s usage=%s", _describe_message(message),
                         json.dumps(relay.usage))

    async def passthrough(self, scope: dict, body: bytes, exchange: Exchange, down: Downstream) -> None:
        """Any other /v1 route (models, completions, embeddings...), relayed untouched, streaming or not."""
        log.info("%s %s (pass-through, %d bytes)", exchange.method, exchange.path, len(body))
        url = self.upstream_url(scope["path"], scope["query_string"])
        headers = self.upstream_headers(scope["headers"], accept_encoding=True, keep_content_encoding=True)
        assert self.client is not None
        upstream_request = self.client.build_request(scope["method"], url, content=body, headers=headers)
        response = await self._send_upstream(upstream_request, exchange)
        try:
            if response.status_code >= 400:
                raise upstream_http_error(response.status_code, await _read_upstream_body(response))
            await down.start(response.status_code,
                             response_headers(response, keep_content_encoding=True))
            try:
                async for chunk in response.aiter_raw():
                    await down.write(chunk)
            except httpx.HTTPError as exc:  # the response has begun: it can only be cut short
                raise upstream_failure(exc, str(response.url)) from None
            await down.end()
        finally:
            await close_upstream(response, exchange)

    async def _send_upstream(self, upstream_request: httpx.Request, exchange: Exchange) -> httpx.Response:
        assert self.transport is not None
        try:
            # The client's transport, not client.send(): a proxy needs none of the auth, redirect,
            # cookie and event-hook layers, and skipping them saves ~7 % of a small request's CPU.
            response = await self.transport.handle_async_request(upstream_request)
            response.request = upstream_request
        except httpx.HTTPError as exc:
            raise upstream_failure(exc, str(upstream_request.url)) from None
        exchange.first_byte = time.monotonic() - exchange.started
        return response


def body_chunks(response: httpx.Response) -> Any:
    """The response body as it arrives. kimiproxy asks for identity encoding where it reads bodies, so
    the raw bytes are the body and httpx's decoder layers can be skipped; an upstream that compresses
    anyway is decoded."""
    if response.headers.get("content-encoding", "identity").lower() in ("", "identity"):
        return response.aiter_raw()
    return response.aiter_bytes()


async def _read_upstream_body(response: httpx.Response) -> bytes:
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


def parse_chat_request(scope: dict, body: bytes) -> dict:
    """The request as JSON, with the checks that give a clear 4xx instead of an upstream 500."""
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").lower()
    if content_type and "json" not in content_type:
        raise ClientError(f"Content-Type must be application/json, not {content_type!r}", 415)
    for name, value in scope["headers"]:
        if name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise ClientError("compressed request bodies are not supported", 415)
    try:
        request = json_loads(body)
    except ValueError as exc:
        raise ClientError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ClientError(f"request body must be a JSON object, not {type(request).__name__}")
    if not isinstance(request.get("messages"), list):
        raise ClientError("'messages' must be a list of messages")
    if "stream" in request and not isinstance(request["stream"], bool) and request["stream"] is not None:
        raise ClientError("'stream' must be true or false")
    if "tools" in request and not isinstance(request["tools"], (list, type(None))):
        raise ClientError("'tools' must be a list")
    return request


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.") or host.startswith("::ffff:127.")


def _request_id(scope: dict) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if re.fullmatch(r"[\w.\-:]{1,128}", candidate):
                return candidate
    return f"{_REQUEST_ID_PREFIX}-{next(_REQUEST_COUNTER):06x}"


_REQUEST_ID_PREFIX = os.urandom(4).hex()  # per process: ids stay unique across workers
_REQUEST_COUNTER = itertools.count(1)


def _describe_message(message: dict) -> str:
    return json.dumps({
        "content": _preview(message.get("content") or ""),
        "reasoning_content": _preview(message.get("reasoning_content") or ""),
        "tool_calls": message.get("tool_calls"),
        "finish_reason": message.get("finish_reason"),
    }, ensure_ascii=False)


def _describe_completion(completion: dict) -> str:
    parts = []
    for choice in completion.get("choices") or ():
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            m = choice["message"]
            parts.append(_describe_message({
                "content": m.get("content") if isinstance(m.get("content"), str) else "",
                "reasoning_content": m.get("reasoning_content") or m.get("reasoning") or "",
                "tool_calls": m.get("tool_calls"), "finish_reason": choice.get("finish_reason")}))
    return " ".join(parts) + f" usage={json.dumps(completion.get('usage'))}"


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------

EXIT_WRONG_WORKER = 3
TRIO_REQUIRED = ("kimiproxy needs Hypercorn's trio worker: run `hypercorn kimiproxy:app -k trio` "
                 "(or `python kimiproxy.py`)")


class KimiProxyApp(QuartTrio):
    """A Quart-Trio app. The proxied routes (/v1/*, /api/chat/completions) are served as raw ASGI by
    ``Proxy``: their bodies stream both ways with no framework buffering, timeout or size limit in
    between, and a client disconnect cancels them directly. /, /health and the error pages are
    ordinary Quart routes."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(__name__)
        self.settings = settings
        self.proxy = Proxy(settings)
        # Quart's defaults would cut every response after 60 s and every body over 16 MiB: the proxied
        # routes bypass them, and these keep the Quart routes from doing it either.
        self.config["RESPONSE_TIMEOUT"] = None
        self.config["BODY_TIMEOUT"] = BODY_READ_TIMEOUT
        self.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    async def asgi_app(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            proxy = self.proxy
            if not proxy._exposure_checked:
                proxy.check_exposure(scope)
            if self.settings.api_keys and path.startswith(("/v1/", "/api/")) and not proxy.authorized(scope):
                proxy.metrics.inc("kimiproxy_requests_total", route=route_label(path), status="401")
                err = ClientError("invalid or missing API key: send Authorization: Bearer <PROXY_API_KEY>", 401)
                err.error_type = "authentication_error"
                return await Downstream(send, _request_id(scope)).send_json(401, err.body())
            if path in CHAT_PATHS and scope["method"] == "POST":
                return await self.proxy.handle(scope, receive, send, chat=True)
            if path.startswith("/v1/"):
                return await self.proxy.handle(scope, receive, send, chat=False)
        elif kind == "lifespan" and sniffio.current_async_library() != "trio":
            # Under asyncio nothing here would work. Hypercorn would log a lifespan failure with a
            # traceback and still exit 0 from its supervisor, so the worker exits at once, non-zero.
            print(f"kimiproxy: {TRIO_REQUIRED}", file=sys.stderr, flush=True)
            os._exit(EXIT_WRONG_WORKER)
        await super().asgi_app(scope, receive, send)


def create_app(settings: Settings) -> KimiProxyApp:
    app = KimiProxyApp(settings)

    @app.before_serving
    async def startup() -> None:
        setup_logging(settings)
        # A proxy allocates many short-lived objects per chunk and keeps few cycles: collecting the
        # youngest generation every GC_THRESHOLD allocations instead of CPython's 700, with the
        # start-up objects frozen out of the scans, saves measurable CPU per chunk (benchmark).
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 20, 100)
        # Each stream holds two sockets (client, upstream): 500 streams pass the usual soft limit of
        # 1024 open files. The hard limit is what the administrator allows; take all of it.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        await app.proxy.open()
        app.nursery.start_soon(app.proxy.collect_garbage)
        log.info("kimiproxy %s serving, upstream %s, repair %s, heartbeat %gs", __version__,
                 settings.upstream, "on" if settings.repair else "off", settings.heartbeat_interval)

    @app.after_serving
    async def shutdown() -> None:
        await app.proxy.close()

    @app.get("/health")
    async def health() -> Any:
        """Liveness; with ?upstream=1 also whether the upstream answers (for load balancers)."""
        if request.args.get("upstream") not in ("1", "true", "yes"):
            return jsonify({"status": "ok"})
        proxy = app.proxy
        assert proxy.client is not None
        url = f"{settings.upstream}/models"
        try:
            with trio.fail_after(HEALTH_UPSTREAM_TIMEOUT):
                response = await proxy.client.get(url, headers=proxy.upstream_headers([], False, False))
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            return jsonify({"status": "degraded", "upstream": f"unreachable: {type(exc).__name__}"}), 503
        if response.status_code >= 400:
            return jsonify({"status": "degraded", "upstream": f"HTTP {response.status_code}"}), 503
        return jsonify({"status": "ok", "upstream": "ok"})

    @app.get("/metrics")
    async def metrics() -> Any:
        return app.proxy.metrics.render(), 200, {"content-type": "text/plain; version=0.0.4; charset=utf-8"}

    @app.get("/")
    async def index() -> Any:
        return jsonify({
            "name": "kimiproxy", "version": __version__, "upstream": settings.upstream,
            "repairs": {"tool_calls": settings.repair, "think_in_content": settings.repair,
                        "history_ids": settings.repair},
            "heartbeat_interval": settings.heartbeat_interval,
            "auth": bool(settings.api_keys),
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
        return create_app(load_settings())
    except ConfigError as exc:
        raise SystemExit(f"kimiproxy: bad configuration: {exc}") from None


app = _module_app()


# ---------------------------------------------------------------------------------------------------
# main(): python kimiproxy.py
# ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import hypercorn.config

    parser = argparse.ArgumentParser(description="OpenAI-compatible proxy that repairs Kimi-K2 tool calls "
                                                 "leaked by SGLang.")
    parser.add_argument("--host", help="bind address (PROXY_HOST)")
    parser.add_argument("--port", type=int, help="port (PROXY_PORT)")
    parser.add_argument("--upstream", help="SGLang /v1 base URL (SGLANG_API_BASE)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING... (LOG_LEVEL)")
    parser.add_argument("--enable-streaming-tool-parser", dest="repair", action=argparse.BooleanOptionalAction,
                        default=None, help="the Kimi-K2 repair (ENABLE_STREAMING_TOOL_PARSER)")
    args = parser.parse_args(argv)
    overrides = {"PROXY_HOST": args.host, "PROXY_PORT": args.port, "SGLANG_API_BASE": args.upstream,
                 "LOG_LEVEL": args.log_level,
                 "ENABLE_STREAMING_TOOL_PARSER": None if args.repair is None else str(args.repair)}
    dotenv = read_dotenv([Path.cwd() / ".env", Path(__file__).resolve().parent / ".env"])
    env = {**dotenv, **os.environ, **{k: str(v) for k, v in overrides.items() if v is not None}}
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        print(f"kimiproxy: bad configuration: {exc}", file=sys.stderr)
        return 1
    setup_logging(settings)
    config = hypercorn.config.Config()
    config.bind = [f"[{settings.host}]:{settings.port}" if ":" in settings.host
                   else f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.graceful_timeout = settings.shutdown_grace
    if not settings.api_keys and not _is_loopback(settings.host):
        log.warning("binding %s without PROXY_API_KEY: anyone on the network can use the GPU",
                    settings.host)
    trio.run(_serve, create_app(settings), config)
    logging.shutdown()  # flush the log files
    return 0


async def _serve(app: KimiProxyApp, config: Any) -> None:
    """Hypercorn's trio server until SIGTERM or SIGINT; then it stops accepting, lets in-flight
    requests finish for config.graceful_timeout (SHUTDOWN_GRACE) seconds and cancels the rest,
    which closes their upstream requests."""
    import hypercorn.trio

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: no new connections; in-flight requests have %gs to finish",
                         signal.Signals(signum).name, config.graceful_timeout)
                return

    await hypercorn.trio.serve(app, config, shutdown_trigger=shutdown_trigger)
    log.info("kimiproxy stopped")


if __name__ == "__main__":
    sys.exit(main())
