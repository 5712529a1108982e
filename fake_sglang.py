"""A small fake SGLang server for kimiproxy's tests and benchmark: raw trio + h11 on a loopback port.

It speaks as SGLang 0.5 does with ``--tool-call-parser kimi_k2 --reasoning-parser kimi_k2``:
``data: {chat.completion.chunk}\\n\\n`` events whose deltas carry role/content/reasoning_content/
tool_calls (null when absent), a finish chunk, a usage chunk when asked, ``data: [DONE]``; errors as
``{"object": "error", "message": ..., "code": N}``; **no response headers until the first token**
(a long prefill is a silent connection); and it notices when its client closes the connection, as
SGLang does to abort a generation (``aborted`` records it, with the time).

A test scripts the next responses with ``FakeSGLang.script(...)``; each request takes the next
script, or the default (a short plain answer) when none is queued.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import h11
import trio

CREATED = 1735689600
MODEL = "kimi-k2-thinking"


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None,
          choices: bool = True, index: int = 0) -> dict:
    """One chat.completion.chunk shaped exactly as SGLang sends it."""
    full = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None}
    full.update(delta or {})
    body: dict[str, Any] = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk",
                            "created": CREATED, "model": MODEL}
    body["choices"] = [{"index": index, "delta": full, "logprobs": None, "finish_reason": finish,
                        "matched_stop": None}] if choices else []
    body["usage"] = usage
    return body


def sse(obj: Any) -> bytes:
    data = obj if isinstance(obj, (bytes, str)) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return b"data: " + data + b"\n\n"


USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}


def stream_of(reasoning: list[str] = (), content: list[str] = (), finish: str = "stop",
              tool_calls: list[dict] = (), usage: bool = True) -> list[Any]:
    """Steps for a streamed answer: the role chunk, reasoning deltas, content deltas, structured
    tool-call deltas, the finish chunk, usage, [DONE]."""
    steps: list[Any] = [sse(chunk({"role": "assistant", "content": ""}))]
    steps += [sse(chunk({"reasoning_content": r})) for r in reasoning]
    steps += [sse(chunk({"content": c})) for c in content]
    steps += [sse(chunk({"tool_calls": [tc]})) for tc in tool_calls]
    steps.append(sse(chunk({}, finish=finish)))
    if usage:
        steps.append(sse(chunk(choices=False, usage=USAGE)))
    steps.append(b"data: [DONE]\n\n")
    return steps


def completion(content: str | None = "Hello!", reasoning: str | None = None, finish: str = "stop",
               tool_calls: list[dict] | None = None) -> dict:
    return {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": CREATED,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                                 "reasoning_content": reasoning,
                                                 "tool_calls": tool_calls},
                         "logprobs": None, "finish_reason": finish, "matched_stop": None}],
            "usage": USAGE}


@dataclasses.dataclass
class Script:
    """What the fake answers to one request.

    steps: for a stream, bytes to write (each its own write), floats (seconds to sleep) and
    ``trio.Event``s (wait until the test sets it: order instead of time); the status line and headers
    go out with the first bytes, as SGLang's do. ``"close"`` drops the connection there. For a whole
    response, ``body`` after ``delay`` seconds.
    """
    steps: list[Any] = dataclasses.field(default_factory=list)
    status: int = 200
    body: Any = None
    delay: float = 0.0
    content_type: str = "text/event-stream"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # more response headers


@dataclasses.dataclass
class Seen:
    """One request the fake received, and how its connection ended."""
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    started: float
    aborted_at: float | None = None  # the client closed before the response was complete
    completed: bool = False

    def json(self) -> Any:
        return json.loads(self.body)


# What GET /server_info answers (0.5.2x; /get_server_info before): SGLang's launch flags at the top level.
# The default is the deployment kimiproxy recommends: reasoning parser on, no tool-call parser.
SERVER_INFO = {"version": "0.5.23", "model_path": "moonshotai/Kimi-K2-Thinking", "reasoning_parser": "kimi_k2",
               "tool_call_parser": None}


class FakeSGLang:
    def __init__(self, server_info: dict | None = SERVER_INFO) -> None:
        self.port = 0
        self.scripts: list[Script] = []
        self.seen: list[Seen] = []  # the requests, except /server_info (kimiproxy asks it on its own)
        self.server_info = server_info  # None: answer 404, as an upstream that is not SGLang
        self.info_requests = 0
        self.aborted = trio.Event()  # set at each abort (replaced after)

    def script(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024 * 1024)
        try:
            while True:
                request, body = await self._read_request(stream, conn)
                if request is None:
                    return
                seen = Seen(request.method.decode(), request.target.decode(),
                            {k.decode().lower(): v.decode("latin-1") for k, v in request.headers},
                            body, time.monotonic())
                if seen.path in ("/server_info", "/get_server_info"):
                    self.info_requests += 1
                    info = self.server_info
                    await self._play(stream, conn, Script(status=200 if info else 404, body=info or {
                        "detail": "Not Found"}, content_type="application/json"))
                else:
                    self.seen.append(seen)
                    await self._respond(stream, conn, seen)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection) -> tuple[Any, bytes]:
        request, parts = None, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return request, b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None, b""

    async def _respond(self, stream: trio.SocketStream, conn: h11.Connection, seen: Seen) -> None:
        if seen.path.endswith("/models"):
            script = Script(body={"object": "list", "data": [{"id": MODEL, "object": "model",
                                                               "created": CREATED, "owned_by": "sglang"}]},
                            content_type="application/json")
        elif self.scripts:
            script = self.scripts.pop(0)
        else:
            wants_stream = seen.body and b'"stream": true' in seen.body or b'"stream":true' in seen.body
            script = Script(steps=stream_of(content=["Hel", "lo!"])) if wants_stream else \
                Script(body=completion(), content_type="application/json")
        async with trio.open_nursery() as nursery:
            # SGLang polls for a closed client while generating: so does the fake, the whole time.
            nursery.start_soon(self._watch_close, stream, conn, seen, nursery.cancel_scope)
            try:
                await self._play(stream, conn, script)
                seen.completed = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):  # the client is gone
                self._abort(seen)
            nursery.cancel_scope.cancel()

    async def _watch_close(self, stream: trio.SocketStream, conn: h11.Connection, seen: Seen,
                           scope: trio.CancelScope) -> None:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._abort(seen)
            scope.cancel()
        else:  # the client's next request on this connection, sent as soon as it had the response (before
            conn.receive_data(data)  # this watcher was cancelled): kept for the next cycle, never dropped

    def _abort(self, seen: Seen) -> None:
        if seen.aborted_at is None and not seen.completed:
            seen.aborted_at = time.monotonic()
            self.aborted.set()
            self.aborted = trio.Event()

    async def _play(self, stream: trio.SocketStream, conn: h11.Connection, script: Script) -> None:
        headers = [("content-type", script.content_type), ("server", "fake-sglang"), *script.headers]
        if script.body is not None or script.status != 200 and not script.steps:
            await trio.sleep(script.delay)
            body = script.body
            if not isinstance(body, bytes):
                body = json.dumps(body if body is not None else
                                  {"object": "error", "message": "error", "code": script.status}).encode()
            await stream.send_all(conn.send(h11.Response(status_code=script.status, headers=headers + [
                ("content-length", str(len(body)))])) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            return
        started = False
        for step in script.steps:
            if isinstance(step, (int, float)):
                await trio.sleep(step)
                continue
            if isinstance(step, trio.Event):
                await step.wait()
                continue
            if step == "close":
                await stream.aclose()
                return
            data = b""
            if not started:  # the status line goes out with the first token, as SGLang's does
                data = conn.send(h11.Response(status_code=script.status, headers=headers))
                started = True
            await stream.send_all(data + conn.send(h11.Data(data=step)))
        if not started:
            await stream.send_all(conn.send(h11.Response(status_code=script.status, headers=headers)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


async def _main(port: int) -> None:
    fake = FakeSGLang()
    fake.port = port
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"fake SGLang on http://127.0.0.1:{port}/v1", flush=True)
    await trio.serve_listeners(fake._connection, listeners)


if __name__ == "__main__":  # a manual upstream: python fake_sglang.py 30000
    import sys
    trio.run(_main, int(sys.argv[1]) if len(sys.argv) > 1 else 30000)
