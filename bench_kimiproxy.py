"""bench_kimiproxy.py: what kimiproxy costs, measured against no proxy at all, side by side in one run.

    python bench_kimiproxy.py            # 3 rounds, about four minutes
    python bench_kimiproxy.py --quick    # 1 round of smaller workloads, about a minute
    python bench_kimiproxy.py --json     # machine-readable
    python bench_kimiproxy.py --baseline DIR   # also another checkout of kimiproxy, side by side
    python bench_kimiproxy.py --instructions [--baseline DIR]   # instructions (valgrind), ~1 min a checkout

It starts a fast fake SGLang (a subprocess: stdlib asyncio, pre-serialized Kimi-like chunks) and
kimiproxy exactly as the README does (``hypercorn kimiproxy:app -k trio``, repair on), then runs each
workload against the upstream directly and through the proxy, interleaved, round after round:

  fast      one stream of 20,000 chunks sent as fast as possible: chunks/s, proxy CPU per chunk
  paced     500 concurrent streams x 100 chunks 50 ms apart, like a real model: completions,
            proxy CPU per chunk, peak RSS (whole tree, and the worker alone), time to first chunk p99
  burst     as many streams of 2 chunks, all started at once: time to first chunk p99 without the
            paced load (the cost of setting up that many exchanges at once)
  latency   one stream of 200 chunks 20 ms apart, each stamped with its send time: latency added
  small     small non-streaming requests at concurrency 1 and 32: proxy CPU per request, requests/s
  body      a 5 MB request body: time added
  leave     the client leaves mid-stream: time until the upstream sees its connection closed
  core      the repair core alone, in a process of its own (so a baseline checkout runs its own
            code): Kimi-like events per second, and 1 MB of tool-call arguments one character per
            event, as markup and as structured deltas, at 100 KB and at 1 MB: the CPU per character
            stays the same when the work is linear

With --instructions it measures instead what no shared machine's noise moves: the instructions
(valgrind's callgrind, which must be installed) that ``python kimiproxy.py`` of each checkout spends
per fast-stream chunk, per paced chunk (two streams, 20 ms apart) and per small request, counted only
while the workload runs. Time also depends on caches, which instructions do not show.

The proxy's CPU time and memory are read from /proc for its whole process tree. Each figure is the
median over the rounds. Only 127.0.0.1 is contacted. Targets (issue #5) are printed beside each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXTRA_HYPERCORN_ARGS = os.environ.get("BENCH_HYPERCORN_ARGS", "").split()
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOREM = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt "
STAMP_RE = re.compile(rb"@T(\d+\.\d+)@")


# ---------------------------------------------------------------------------------------------------
# The fake upstream (runs in its own process: python bench_kimiproxy.py --upstream PORT)
# ---------------------------------------------------------------------------------------------------

def sse_chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    full = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None}
    full.update(delta)
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1735689600,
            "model": "kimi-k2-thinking",
            "choices": [] if usage else [{"index": 0, "delta": full, "logprobs": None,
                                          "finish_reason": finish, "matched_stop": None}],
            "usage": usage}
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def kimi_stream(n: int, stamp: bool) -> tuple[list, bytes]:
    """Token chunks of a Kimi-K2-Thinking turn that ends in a tool call leaked into reasoning, as
    SGLang streams it: 30 % reasoning, the leaked section in pieces, then content. With stamp, each
    chunk is a format string for the send time."""
    markup = ["<|tool_calls_section_begin|>", "<|tool_call_begin|>functions.read_file:0",
              '<|tool_call_argument_begin|>{"path": ', '"/src/main.py"}', "<|tool_call_end|>",
              "<|tool_calls_section_end|>"]
    n_markup = len(markup) if n >= 20 else 0
    n_reasoning = max(0, int(n * 0.3) - n_markup)
    chunks = []
    for i in range(n):
        text = LOREM[(i * 4) % 80:(i * 4) % 80 + 4]
        if i < n_reasoning:
            kind = "reasoning_content"
        elif i < n_reasoning + n_markup:
            kind, text = "reasoning_content", markup[i - n_reasoning]
        else:
            kind = "content"
        if stamp and kind == "content":
            chunks.append(sse_chunk({kind: "@T__STAMP__@"}))
        else:
            chunks.append(sse_chunk({kind: text}))
    tail = (sse_chunk({}, finish="stop")
            + sse_chunk({}, usage={"prompt_tokens": 12, "completion_tokens": n, "total_tokens": n + 12})
            + b"data: [DONE]\n\n")
    return chunks, tail


def framed(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1735689600, "model": "kimi-k2-thinking",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help?",
                                         "reasoning_content": "A greeting.", "tool_calls": None},
                 "logprobs": None, "finish_reason": "stop", "matched_stop": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}}).encode()


class Upstream(asyncio.Protocol):
    aborts: list = []  # (tag, wall time) of streams whose client closed before the end

    def connection_made(self, transport):  # noqa: ANN001
        self.t = transport
        self.buf = b""
        self.streaming = None

    def connection_lost(self, exc):  # noqa: ANN001
        if self.streaming is not None:
            self.streaming.cancel()
            Upstream.aborts.append((self.tag, time.time()))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1")
            length = int(re.search(r"(?i)content-length:\s*(\d+)", head).group(1)) \
                if "ontent-length" in head.lower() else 0
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4:head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length:]
            self.handle(head, body)

    def handle(self, head: str, body: bytes) -> None:
        path = head.split(" ", 2)[1]
        if path.startswith("/stats"):
            payload = json.dumps({"aborts": Upstream.aborts}).encode()
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(payload), payload))
            return
        found = re.search(r"(?i)x-bench: ([^\r\n]*)", head)
        knobs = dict(kv.split("=", 1) for kv in found.group(1).split(",") if "=" in kv) if found else {}
        if b'"stream": true' not in body and b'"stream":true' not in body:
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(COMPLETION), COMPLETION))
            return
        self.tag = knobs.get("tag", "")
        self.streaming = asyncio.ensure_future(self.stream(
            int(knobs.get("n", 100)), float(knobs.get("delay", 0)), int(knobs.get("batch", 32)),
            knobs.get("stamp") == "1"))

    async def stream(self, n: int, delay: float, batch: int, stamp: bool) -> None:
        chunks, tail = STREAMS.get((n, stamp)) or STREAMS.setdefault((n, stamp), kimi_stream(n, stamp))
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                + framed(sse_chunk({"role": "assistant", "content": ""})))
        self.t.write(head)
        loop = asyncio.get_running_loop()
        start = loop.time()
        step = batch if delay == 0 else 1
        for i in range(0, n, step):
            if delay:
                await asyncio.sleep(max(0.0, start + (i + 1) * delay - loop.time()))
            group = chunks[i:i + step]
            if stamp:
                now = b"%.6f" % time.time()
                group = [c.replace(b"__STAMP__", now) for c in group]
            self.t.write(b"".join(framed(c) for c in group))
            if not delay:
                await asyncio.sleep(0)
            if self.t.get_write_buffer_size() > 1 << 20:
                await asyncio.sleep(0.001)
        self.t.write(framed(tail) + b"0\r\n\r\n")
        self.streaming = None


STREAMS: dict = {}


def run_upstream(port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------
# The client side
# ---------------------------------------------------------------------------------------------------

def chat_request(port: int, stream: bool, knobs: str = "", body: bytes | None = None) -> bytes:
    body = body or json.dumps({"model": "kimi-k2-thinking", "stream": stream, "messages": [
        {"role": "user", "content": "Read /src/main.py"}],
        "tools": [{"type": "function", "function": {"name": "read_file", "parameters": {
            "type": "object", "properties": {"path": {"type": "string"}}}}}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer bench\r\nx-bench: {knobs}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


def messages_request(port: int, knobs: str) -> bytes:
    """The same streamed request in Anthropic's Messages protocol (POST /v1/messages, as Claude Code sends)."""
    body = json.dumps({"model": "kimi-k2-thinking", "stream": True, "max_tokens": 32000, "messages": [
        {"role": "user", "content": "Read /src/main.py"}], "tools": [{"name": "read_file", "input_schema": {
            "type": "object", "properties": {"path": {"type": "string"}}}}]}).encode()
    return (f"POST /v1/messages?beta=true HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"x-api-key: bench\r\nanthropic-version: 2023-06-01\r\nx-bench: {knobs}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


STREAM_DEADLINE = 120.0  # seconds: a stream not done by then counts as not completed
CORE_REPEATS = 5  # runs of the repair-core workload; the fastest is reported


async def one_stream(port: int, knobs: str, leave_after: int = 0, anthropic: bool = False) -> dict:
    """One streamed request (``anthropic``: by /v1/messages): time to first event, events, stamps
    latency, whether it completed."""
    try:
        return await asyncio.wait_for(_one_stream(port, knobs, leave_after, anthropic), STREAM_DEADLINE)
    except (asyncio.TimeoutError, OSError) as exc:
        return {"ttfc": None, "events": 0, "completed": False, "latencies": [], "left_at": time.time(),
                "elapsed": STREAM_DEADLINE, "error": repr(exc)}


async def _one_stream(port: int, knobs: str, leave_after: int, anthropic: bool = False) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(messages_request(port, knobs) if anthropic else chat_request(port, True, knobs))
    first = None
    events = 0
    latencies = []
    tail = b""
    done = ended = False
    while not ended:
        data = await reader.read(1 << 16)
        if not data:
            break
        now_wall = time.time()
        if first is None and b"data: " in data:
            first = time.perf_counter() - t0
        window = tail + data
        events += window.count(b"data: ") - tail.count(b"data: ")
        for m in STAMP_RE.finditer(data):
            latencies.append(now_wall - float(m.group(1)))
        ended = b"data: [DONE]" in window or b"event: message_stop" in window  # a checkout without
        done = ended and (not anthropic or b"event: message_stop" in window)  # /v1/messages relays chat
        tail = window[-24:]
        if leave_after and events >= leave_after:
            break
    left_at = time.time()
    writer.transport.abort()
    return {"ttfc": first, "events": events, "completed": done, "latencies": latencies,
            "left_at": left_at, "elapsed": time.perf_counter() - t0}


async def small_requests(port: int, concurrency: int, seconds: float) -> int:
    """Keep-alive non-streaming requests for `seconds`: how many completed."""
    request = chat_request(port, False)
    deadline = time.perf_counter() + seconds
    count = 0

    async def worker() -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the server closed a kept-alive connection: reopen
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            count += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count


async def big_body(port: int, megabytes: float) -> float:
    content = "x" * int(megabytes * 1024 * 1024)
    body = json.dumps({"model": "m", "stream": False, "messages": [{"role": "user", "content": content}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(chat_request(port, False, body=body))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    await reader.readexactly(int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1)))
    elapsed = time.perf_counter() - t0
    writer.close()
    return elapsed


# ---------------------------------------------------------------------------------------------------
# /proc: CPU seconds and memory of a process tree
# ---------------------------------------------------------------------------------------------------

def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLOCK_TICKS


def rss_mb(pids: list[int], field: str = "VmRSS") -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def start(argv: list[str], env: dict[str, str], port: int, cwd: Path = HERE) -> subprocess.Popen:
    """A server process, its output to a file: a pipe nobody reads would fill and block its logging."""
    log_file = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdout=log_file, stderr=log_file)
    try:
        wait_port(port)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"{argv} did not start; its output is in {log_file.name}") from None
    return proc


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def proxy_env(up_port: int) -> dict[str, str]:
    """kimiproxy's settings for every workload: the fake upstream, repair on, log to stderr at WARNING."""
    return {"SGLANG_API_BASE": f"http://127.0.0.1:{up_port}/v1", "ENABLE_STREAMING_TOOL_PARSER": "true",
            "ENABLE_FILE_LOGGING": "false", "LOG_LEVEL": "WARNING"}


RUNNERS = {  # the README's two commands
    "hypercorn": ["-m", "hypercorn", "kimiproxy:app", "-k", "trio", "-b", "127.0.0.1:{port}"],
    "python": ["kimiproxy.py", "--host", "127.0.0.1", "--port", "{port}"],
}


class Bench:
    def __init__(self, quick: bool, runner: str = "hypercorn", baseline: Path | None = None,
                 limits: bool = False) -> None:
        self.runner = runner
        self.quick = quick
        self.fast_chunks = 20_000
        self.paced = (100, 40) if quick else (500, 100)  # streams, chunks each
        self.small_seconds = 2.0 if quick else 4.0
        self.argument_chars = 200_000 if quick else 1_000_000
        self.up_port = free_port()
        self.upstream = start([sys.executable, __file__, "--upstream", str(self.up_port)], {}, self.up_port)
        self.checkouts = {"proxy": HERE, **({"baseline": baseline} if baseline else {})}
        self.ports, self.procs = {"direct": self.up_port}, {}
        self.limits = limits
        self._files = tempfile.TemporaryDirectory(prefix="bench-config-")
        for target, checkout in self.checkouts.items():
            port = self.ports[target] = free_port()
            env = proxy_env(self.up_port)
            if limits:  # a configuration file for both; limits (never reached) for this checkout only
                env["KIMIPROXY_CONFIG"] = self.config_file(target, with_limits=target == "proxy")
                env["REASONING_STORE"] = os.path.join(self._files.name, f"{target}.sqlite3")
            self.procs[target] = start(
                [sys.executable, *[a.format(port=port) for a in RUNNERS[runner]],
                 *(EXTRA_HYPERCORN_ARGS if runner == "hypercorn" else [])], env, port, cwd=checkout)
        self.results: dict[str, dict[str, list]] = {target: {} for target in ("direct", *self.checkouts)}

    def config_file(self, target: str, with_limits: bool) -> str:
        """--limits: the one upstream as a configuration file, and for this checkout every fair-use limit
        set far above what the workloads send, so each request pays for both transactions and none is
        refused (the cost of the limits, not of refusals)."""
        doc: dict = {"upstreams": {"bench": {"url": f"http://127.0.0.1:{self.up_port}/v1", "models": []}},
                     "default_upstream": "bench"}
        if with_limits:
            doc["limits"] = {"default": {"concurrent": 100_000, "requests_per_minute": 10**9,
                                         "tokens_per_minute": 10**12, "tokens_per_day": 10**15}}
        path = os.path.join(self._files.name, f"{target}.json")
        Path(path).write_text(json.dumps(doc), encoding="utf-8")
        return path

    def close(self) -> None:
        for proc in (*self.procs.values(), self.upstream):
            proc.terminate()
            proc.wait(5)

    def record(self, target: str, name: str, value: float | None) -> None:
        self.results[target].setdefault(name, []).append(value)

    def measure(self, target: str, port: int, fn, *args):  # noqa: ANN001, ANN201
        """Run one workload; returns (its result, the proxy's CPU seconds spent meanwhile)."""
        pids = tree(self.procs[target].pid) if target in self.procs else []
        before = cpu_seconds(pids)
        result = asyncio.run(fn(port, *args))
        return result, cpu_seconds(pids) - before

    def round(self) -> None:
        for target in self.checkouts:
            self.core(target)
        for target, port in self.ports.items():
            self.fast(target, port)
            self.fast_anthropic(target, port)
            self.paced_streams(target, port)
            self.burst(target, port)
            self.latency(target, port)
            self.small(target, port)
            self.body(target, port)
            self.leave(target, port)

    def core(self, target: str) -> None:
        """The repair core of a checkout, in a process of its own (python bench_kimiproxy.py --core)."""
        out = subprocess.run([sys.executable, __file__, "--core", str(self.checkouts[target]),
                              "--chars", str(self.argument_chars)], capture_output=True, text=True, check=True)
        for name, value in json.loads(out.stdout).items():
            self.record(target, name, value)

    def fast(self, target: str, port: int) -> None:
        (r, cpu) = self.measure(target, port, lambda p: one_stream(p, f"n={self.fast_chunks},batch=32"))
        assert r["completed"], r
        self.record(target, "fast_chunks_per_s", self.fast_chunks / r["elapsed"])
        self.record(target, "fast_cpu_us_per_chunk", cpu / self.fast_chunks * 1e6 if target != "direct" else None)

    def fast_anthropic(self, target: str, port: int) -> None:
        """The fast stream asked by /v1/messages: the same upstream stream, encoded as Anthropic's events.
        Not for the bare upstream (it speaks chat completions only), nor a checkout without the route."""
        if target == "direct":
            return
        (r, cpu) = self.measure(target, port, lambda p: one_stream(p, f"n={self.fast_chunks},batch=32",
                                                                   anthropic=True))
        served = r["completed"]
        self.record(target, "anthropic_fast_chunks_per_s", self.fast_chunks / r["elapsed"] if served else None)
        self.record(target, "anthropic_fast_cpu_us_per_chunk", cpu / self.fast_chunks * 1e6 if served else None)

    def paced_streams(self, target: str, port: int) -> None:
        streams, chunks = self.paced

        async def run(p: int) -> list[dict]:
            return await asyncio.gather(*(one_stream(p, f"n={chunks},delay=0.05") for _ in range(streams)))

        pids = tree(self.procs[target].pid) if target in self.procs else []
        for pid in pids:  # reset the peak-RSS mark
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass
        results, cpu = self.measure(target, port, run)
        self.record(target, "paced_completed", sum(r["completed"] for r in results))
        self.record(target, "paced_ttfc_p99_ms", percentile([r["ttfc"] for r in results if r["ttfc"]], 99) * 1e3)
        if target != "direct":
            pids = tree(self.procs[target].pid)
            self.record(target, "paced_cpu_us_per_chunk", cpu / (streams * chunks) * 1e6)
            self.record(target, "paced_peak_rss_mb", rss_mb(pids, "VmHWM"))
            # Under hypercorn the tree is three processes; the worker (the largest) is the only one
            # running kimiproxy's code: the supervisor and multiprocessing's resource tracker never load it.
            self.record(target, "paced_peak_rss_worker_mb", max(rss_mb([pid], "VmHWM") for pid in pids))

    def burst(self, target: str, port: int) -> None:
        """As many streams as the paced workload, all started at once, of 2 chunks each: what the
        first chunks cost without the paced load, i.e. setting up that many exchanges at once."""
        streams = self.paced[0]

        async def run(p: int) -> list[dict]:
            return await asyncio.gather(*(one_stream(p, "n=2,delay=0.05") for _ in range(streams)))

        results, _ = self.measure(target, port, run)
        self.record(target, "burst_ttfc_p99_ms", percentile([r["ttfc"] for r in results if r["ttfc"]], 99) * 1e3)

    def latency(self, target: str, port: int) -> None:
        (r, _) = self.measure(target, port, lambda p: one_stream(p, "n=200,delay=0.02,stamp=1"))
        lat = r["latencies"]
        self.record(target, "latency_p50_ms", percentile(lat, 50) * 1e3)
        self.record(target, "latency_p99_ms", percentile(lat, 99) * 1e3)

    def small(self, target: str, port: int) -> None:
        for concurrency in (1, 32):
            count, cpu = self.measure(target, port, small_requests, concurrency, self.small_seconds)
            self.record(target, f"small_c{concurrency}_rps", count / self.small_seconds)
            if target != "direct":
                self.record(target, f"small_c{concurrency}_cpu_us_per_req", cpu / count * 1e6)

    def body(self, target: str, port: int) -> None:
        times = [self.measure(target, port, big_body, 5.0)[0] for _ in range(5)]
        self.record(target, "body_5mb_ms", statistics.median(times) * 1e3)

    def leave(self, target: str, port: int) -> None:
        if target == "direct":
            return
        tag = f"leave{time.time_ns()}"
        (r, _) = self.measure(target, port, lambda p: one_stream(p, f"n=1000,delay=0.05,tag={tag}", leave_after=10))
        deadline = time.time() + 3
        aborted = None
        while time.time() < deadline and aborted is None:
            stats = json.loads(_get(self.up_port, "/stats"))
            aborted = next((t for tag_, t in stats["aborts"] if tag_ == tag), None)
            time.sleep(0.01)
        self.record(target, "leave_upstream_closed_ms", (aborted - r["left_at"]) * 1e3 if aborted else None)


def core_figures(checkout: Path, chars: int) -> dict[str, float]:
    """The repair core of ``checkout`` alone, on one core, in this process (CPU time)."""
    sys.path.insert(0, str(checkout))
    import kimiproxy
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {
        "path": {}, "content": {}}}}} for name in ("read_file", "write_to_file")]
    ctx = kimiproxy.RepairContext.from_request({"tools": tools, "messages": []})
    chunks, tail = kimi_stream(20_000, False)
    events = [c[6:-2] for c in chunks] + [e[6:] for e in tail.split(b"\n\n") if e]
    out = {}
    spent = []
    for _ in range(CORE_REPEATS):
        started = time.process_time()
        relay = kimiproxy.StreamRepair(ctx)
        for data in events:
            relay.feed(data)
        relay.close()
        spent.append(time.process_time() - started)
    # The least time of several: what the code costs; the rest is other tenants of a shared machine.
    out["transformer_chunks_per_s"] = len(events) / min(spent)
    for kind in ("markup", "structured"):
        for size, n in (("small", chars // 10), ("big", chars)):
            out[f"args_{kind}_{size}_us_per_char"] = _arguments_cost(kimiproxy, ctx, kind, n) / n * 1e6
    return out


def _arguments_cost(kimiproxy, ctx, kind: str, n: int) -> float:  # noqa: ANN001
    """CPU seconds the core spends on one write_to_file call whose content is n characters, the
    arguments arriving one character per event, as markup in content or as structured deltas."""
    arguments = '{"path": "big.txt", "content": "' + "x" * n + '"}'
    if kind == "markup":
        head = [{"content": "<|tool_calls_section_begin|><|tool_call_begin|>functions.write_to_file:0"
                            "<|tool_call_argument_begin|>"}]
        before, after = b'{"choices":[{"index":0,"delta":{"content":"', b'"}}]}'
        end = [{"content": "<|tool_call_end|><|tool_calls_section_end|>"}]
    else:
        head = [{"tool_calls": [{"index": 0, "id": "functions.write_to_file:0", "type": "function",
                                 "function": {"name": "write_to_file", "arguments": ""}}]}]
        before, after = b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"', \
            b'"}}]}}]}'
        end = []
    relay = kimiproxy.StreamRepair(ctx)
    started = time.process_time()
    for delta in head:
        relay.feed(json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode())
    for ch in arguments:
        relay.feed(before + json.dumps(ch)[1:-1].encode() + after)
    for delta in end:
        relay.feed(json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode())
    relay.feed(b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
    relay.close()
    return time.process_time() - started


INSTRUCTION_WORKLOADS = [  # (label, what one unit is, knobs or None for small requests, units per stream, streams)
    ("fast stream", "chunk", "n=5000,batch=32", 5000, 2),
    ("paced streams (2 at once, 20 ms apart)", "chunk", "n=200,delay=0.02", 200, 2),
    ("small non-streaming requests, c=1, 20 s", "request", None, 0, 0),
]


def instructions(checkout: Path) -> dict[str, float]:
    """Instructions per unit of each INSTRUCTION_WORKLOADS entry: ``python kimiproxy.py`` of ``checkout``
    under callgrind, instrumented only while one workload runs (callgrind_control), one process each."""
    figures = {}
    for label, _, knobs, units, streams in INSTRUCTION_WORKLOADS:
        up_port, port = free_port(), free_port()
        upstream = start([sys.executable, __file__, "--upstream", str(up_port)], {}, up_port)
        folder = tempfile.TemporaryDirectory(prefix="bench-callgrind-")
        out = Path(folder.name) / "out"
        env = {**proxy_env(up_port), "PYTHONHASHSEED": "0"}
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                sys.executable, "kimiproxy.py", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(argv, cwd=checkout, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_port(port, timeout=120)
            asyncio.run(one_stream(port, "n=500,batch=32"))  # warm: imports, connections
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
            if knobs is None:
                count = asyncio.run(small_requests(port, 1, 20.0))
            else:
                async def run(knobs: str = knobs, streams: int = streams) -> list[dict]:
                    return await asyncio.gather(*(one_stream(port, knobs) for _ in range(streams)))
                assert all(r["completed"] for r in asyncio.run(run()))
                count = units * streams
            subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        finally:
            proc.terminate()
            proc.wait(120)
            upstream.terminate()
            upstream.wait(5)
        totals = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True, check=True).stdout
        folder.cleanup()
        figures[label] = int(re.search(r"^\s*([\d,]+)\s.*PROGRAM TOTALS", totals, re.M)[1].replace(",", "")) / count
    return figures


def report_instructions(checkouts: dict[str, Path]) -> int:
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("--instructions needs valgrind (Debian, Ubuntu: apt install valgrind)", file=sys.stderr)
        return 2
    results = {target: instructions(checkout) for target, checkout in checkouts.items()}
    print(f"kimiproxy instructions (valgrind callgrind, python kimiproxy.py); {machine()}")
    print(f"{'workload':44} {'per':>8} {'kimiproxy':>12}" + (f" {'baseline':>12} {'vs base':>8}"
                                                             if "baseline" in results else ""))
    for label, unit, *_ in INSTRUCTION_WORKLOADS:
        line = f"{label:44} {unit:>8} {results['proxy'][label]:>12,.0f}"
        if "baseline" in results:
            line += f" {results['baseline'][label]:>12,.0f} x{results['proxy'][label] / results['baseline'][label]:.3f}"
        print(line)
    return 0


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-bench: n=1\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        while len(body) < length:
            body += s.recv(65536)
        return body


# (figure, label, target, "hi"/"lo" = which way is better, compare: "ratio" | "added" | None)
FIGURES = [
    ("transformer_chunks_per_s", "repair core alone, one core: chunks/s", None, "hi", None),
    ("args_markup_small_us_per_char", "arguments 1 char/event, markup, 1/10 size: us/char", None, "lo", None),
    ("args_markup_big_us_per_char", "arguments 1 char/event, markup, full size: us/char", None, "lo", None),
    ("args_structured_small_us_per_char", "arguments 1 char/event, structured, 1/10: us/char", None, "lo", None),
    ("args_structured_big_us_per_char", "arguments 1 char/event, structured, full: us/char", None, "lo", None),
    ("fast_chunks_per_s", "fast stream: chunks/s", 60_000, "hi", "ratio"),
    ("fast_cpu_us_per_chunk", "fast stream: proxy CPU per chunk (us)", None, "lo", None),
    ("anthropic_fast_chunks_per_s", "fast stream by /v1/messages: chunks/s", None, "hi", None),
    ("anthropic_fast_cpu_us_per_chunk", "fast stream by /v1/messages: proxy CPU/chunk (us)", None, "lo", None),
    ("paced_completed", "paced streams completed", "all", "hi", None),
    ("paced_cpu_us_per_chunk", "paced: proxy CPU per chunk (us)", 190, "lo", None),
    ("paced_peak_rss_mb", "paced: proxy peak RSS (MB)", 100, "lo", None),
    ("paced_peak_rss_worker_mb", "paced: peak RSS of the worker process (MB)", None, "lo", None),
    ("paced_ttfc_p99_ms", "paced: time to first chunk p99 (ms)", 100, "lo", "added"),
    ("burst_ttfc_p99_ms", "burst of short streams: first chunk p99 (ms)", None, "lo", "added"),
    ("latency_p50_ms", "paced single stream: latency p50 (ms)", None, "lo", "added"),
    ("latency_p99_ms", "paced single stream: latency p99 (ms)", 0.5, "lo", "added"),
    ("small_c1_cpu_us_per_req", "non-stream c=1: proxy CPU per request (us)", 870, "lo", None),
    ("small_c1_rps", "non-stream c=1: requests/s", None, "hi", "ratio"),
    ("small_c32_rps", "non-stream c=32: requests/s", 750, "hi", "ratio"),
    ("small_c32_cpu_us_per_req", "non-stream c=32: proxy CPU per request (us)", None, "lo", None),
    ("body_5mb_ms", "5 MB body: time (ms)", 15, "lo", "added"),
    ("leave_upstream_closed_ms", "client leaves: upstream closed after (ms)", 50, "lo", None),
]


def report(bench: Bench, as_json: bool) -> int:
    rows = []
    baseline = "baseline" in bench.results
    for key, label, target, better, compare in FIGURES:
        direct = median(bench.results["direct"].get(key, []))
        proxy = median(bench.results["proxy"].get(key, []))
        base = median(bench.results["baseline"].get(key, [])) if baseline else None
        versus = None
        if compare == "ratio" and direct and proxy is not None:
            versus = proxy / direct
        elif compare == "added" and direct is not None and proxy is not None:
            versus = proxy - direct
        checked = versus if compare == "added" else proxy
        if target == "all":
            target = bench.paced[0]
        ok = None
        if target is not None and checked is not None:
            ok = checked >= target if better == "hi" else checked <= target
        rows.append({"figure": key, "label": label, "direct": direct, "proxy": proxy, "baseline": base,
                     "compare": compare, "versus": versus,
                     "versus_baseline": proxy / base if proxy is not None and base else None,
                     "target": target, "ok": ok})
    if as_json:
        print(json.dumps({"machine": machine(), "quick": bench.quick, "runner": bench.runner,
                          "baseline": str(bench.checkouts.get("baseline") or ""), "rows": rows,
                          "raw": bench.results}, indent=1))
        return 0
    print(f"kimiproxy benchmark ({'quick' if bench.quick else 'full'}, {bench.runner}); {machine()}")
    if baseline:
        print(f"baseline: {bench.checkouts['baseline']}")
    if bench.limits:
        print("--limits: kimiproxy with fair-use limits in its configuration file; the baseline the same file without")
    print(f"{'figure':52} {'direct':>10} {'kimiproxy':>10} {'vs direct':>10}"
          + (f" {'baseline':>10} {'vs base':>8}" if baseline else "") + f" {'target':>9}")
    for r in rows:
        versus = "" if r["versus"] is None else (f"x{r['versus']:.2f}" if r["compare"] == "ratio"
                                                 else f"+{r['versus']:.2f}")
        mark = {True: "ok", False: "MISSED", None: ""}[r["ok"]]
        target = "" if r["target"] is None else (("<=" if r["figure"] not in ("fast_chunks_per_s", "small_c32_rps",
                                                                            "paced_completed") else ">=")
                                                 + f"{r['target']:g}")
        line = f"{r['label']:52} {fmt(r['direct']):>10} {fmt(r['proxy']):>10} {versus:>10}"
        if baseline:
            ratio = "" if r["versus_baseline"] is None else f"x{r['versus_baseline']:.2f}"
            line += f" {fmt(r['baseline']):>10} {ratio:>8}"
        print(f"{line} {target:>9}  {mark}")
    return 0


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{os.cpu_count()} cores, {model}, Python {sys.version.split()[0]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of smaller workloads (~30 s)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, or 1 with --quick)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--runner", choices=sorted(RUNNERS), default="hypercorn",
                        help="start kimiproxy with hypercorn (3 processes: supervisor, resource tracker, "
                             "worker) or python kimiproxy.py (1 process)")
    parser.add_argument("--baseline", type=Path, help="another kimiproxy checkout, measured side by side")
    parser.add_argument("--limits", action="store_true",
                        help="serve through a configuration file (KIMIPROXY_CONFIG) with fair-use limits for this "
                             "checkout (none is ever reached), the same file without them for the baseline")
    parser.add_argument("--instructions", action="store_true",
                        help="instructions per chunk and per request instead (valgrind's callgrind, ~1 min a checkout)")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--chars", type=int, default=1_000_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        run_upstream(args.upstream)
        return 0
    if args.core:
        print(json.dumps(core_figures(args.core, args.chars)))
        return 0
    if args.instructions:
        return report_instructions({"proxy": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})})
    bench = Bench(args.quick, args.runner, args.baseline.resolve() if args.baseline else None, args.limits)
    try:
        for _ in range(args.rounds or (1 if args.quick else 3)):
            bench.round()
    finally:
        bench.close()
    return report(bench, args.json)


if __name__ == "__main__":
    sys.exit(main())
