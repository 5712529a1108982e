"""kimiproxy's tests: the repair core (pure, table-driven, every split point, properties), then the
running proxy against a fake SGLang on a loopback port, with real sockets, httpx and the OpenAI SDK.

Run: python -m pytest -q
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

import kimiproxy as kp
from fake_sglang import SERVER_INFO, FakeSGLang, Script, USAGE, chunk, completion, sse, stream_of

# Hypothesis runs the same examples every time (a red run anyone can reproduce); every failure it
# ever found is pinned with @example. HYPOTHESIS_PROFILE=explore searches afresh.
hsettings.register_profile("ci", derandomize=True, database=None, deadline=None)
hsettings.register_profile("explore", max_examples=2000, deadline=None)
hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HERE = Path(__file__).resolve().parent
CASES = json.loads((HERE / "kimi_cases.json").read_text(encoding="utf-8"))
TEST_TIMEOUT = 60.0  # seconds: a hang is a failure
# Starting (or stopping) kimiproxy as a process takes about a second; on a loaded 2-core machine, with
# several started at once, much longer. Past this it is a hang.
PROCESS_START_LIMIT = 60.0  # seconds
# Every proxy a test starts keeps its reasoning store here, one file each: nothing is shared between
# tests, or with a kimiproxy running on this machine.
STORES = tempfile.TemporaryDirectory(prefix="kimiproxy-test-stores-")


def store_path() -> str:
    return tempfile.mktemp(suffix=".sqlite3", dir=STORES.name)


def norm(text: str | None) -> str:
    return " ".join((text or "").split())


def ctx_for(tools: list[dict], history: int = 0, enabled: bool = True) -> kp.RepairContext:
    messages = [{"role": "assistant", "tool_calls": [{"id": f"functions.x:{i}", "type": "function",
                                                      "function": {"name": "x", "arguments": "{}"}}]}
                for i in range(history)]
    return kp.RepairContext.from_request({"tools": tools, "messages": messages}, enabled=enabled)


def tool(name: str, *props: str, required: tuple[str, ...] = ()) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {p: {"type": "string"} for p in props},
        "required": list(required)}}}


# ---------------------------------------------------------------------------------------------------
# A client's view of a stream: merge deltas the way the OpenAI SDK and the Vercel AI SDK do, and check
# the shape they rely on.
# ---------------------------------------------------------------------------------------------------

def frames_to_events(frames: list[bytes]) -> list[Any]:
    decoder = kp.SSEDecoder()
    events = decoder.decode(b"".join(frames)) + decoder.flush()
    return [e if e == b"[DONE]" else json.loads(e) for e in events]


class ClientView:
    """A stream as a client folds it, event by event (the OpenAI SDK and the Vercel AI SDK merge deltas
    this way), checking what they rely on: nothing after [DONE] or after the finish chunk; a call's first
    delta carries its id, type and name; a later delta claims no other id, type or name than the one
    sent (nothing sent is taken back); and a call's arguments parse as JSON only once complete, at its
    last delta (the Vercel AI SDK ends a call as soon as they do; REPAIR.md 4.11)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict] = {}
        self.finish: str | None = None
        self.done = False
        self._parsed_at: dict[int, int] = {}  # a call's delta count when its arguments first parsed

    def add(self, event: Any) -> None:
        assert not self.done, "event after [DONE]"
        if event == b"[DONE]":
            self.done = True
            return
        for choice in event.get("choices") or []:
            assert self.finish is None, "delta after the finish chunk"
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            if delta.get("reasoning_content"):
                self.reasoning.append(delta["reasoning_content"])
            for tc in delta.get("tool_calls") or []:
                self._call_delta(tc)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def _call_delta(self, tc: dict) -> None:
        index, function = tc["index"], tc.get("function") or {}
        call = self.calls.get(index)
        if call is None:  # first delta of a call: everything a client needs
            assert tc.get("id") and tc.get("type") == "function", tc
            assert function.get("name") and isinstance(function.get("arguments"), str), tc
            call = self.calls[index] = {"id": tc["id"], "name": function["name"], "arguments": "", "deltas": 0}
        else:
            assert set(tc) <= {"index", "function", "type", "id"}, tc
            for key, sent in (("id", tc.get("id")), ("name", function.get("name"))):
                assert sent in (None, call[key]), f"a later delta claims {key} {sent!r}, {call[key]!r} was sent"
            assert tc.get("type") in (None, "function"), tc
        if function.get("arguments"):
            call["arguments"] += function["arguments"]
            call["deltas"] += 1
            if index not in self._parsed_at:
                with contextlib.suppress(ValueError):
                    json.loads(call["arguments"])
                    self._parsed_at[index] = call["deltas"]

    def message(self) -> dict:
        assert self.done, "stream did not end with [DONE]"
        for index, parsed_at in self._parsed_at.items():
            assert parsed_at == self.calls[index]["deltas"], \
                f"call {index}'s arguments parsed as JSON at delta {parsed_at} of {self.calls[index]['deltas']}"
        calls = [{k: c[k] for k in ("id", "name", "arguments")} for _, c in sorted(self.calls.items())]
        return {"content": "".join(self.content), "reasoning": "".join(self.reasoning), "tool_calls": calls,
                "finish_reason": self.finish}


def accumulate(events: list[Any]) -> dict:
    """The final message a client builds from chunk events, its checks passed (ClientView)."""
    view = ClientView()
    for event in events:
        view.add(event)
    return view.message()


def check_expected(case: dict, message: dict) -> None:
    expect = case["expect"]
    calls = message["tool_calls"]
    assert [c["name"] for c in calls] == [t["name"] for t in expect["tool_calls"]], calls
    for got, want in zip(calls, expect["tool_calls"]):
        if want["id"] is None:
            assert got["id"].startswith(f"functions.{want['name']}:"), got
        else:
            assert got["id"] == want["id"]
        assert json.loads(got["arguments"]) == want["arguments"]
    assert len({c["id"] for c in calls}) == len(calls), "ids must be unique"
    assert norm(message["content"]) == norm(expect["content"])
    for text in expect["reasoning_contains"]:
        assert norm(text) in norm(message["reasoning"])
    for text in expect["reasoning_excludes"]:
        assert norm(text) not in norm(message["reasoning"])
    assert message["finish_reason"] == expect["finish_reason"]


def upstream_chunks(upstream: dict, splits_r: list[int] = (), splits_c: list[int] = (),
                    arg_splits: list[int] | None = None) -> list[bytes]:
    """A case's upstream as SGLang streams it: reasoning deltas, content deltas cut at the given points,
    structured calls (whole, or as SGLang streams them: a first delta with the name and no arguments,
    then the arguments cut at ``arg_splits``), the finish chunk, usage, [DONE]."""
    def cut(text: str | None, points: list[int]) -> list[str]:
        if not text:
            return []
        bounds = [0, *sorted(set(p for p in points if 0 < p < len(text))), len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:])]

    calls = []
    for i, t in enumerate(upstream.get("tool_calls") or []):
        if arg_splits is None:
            calls.append({"index": i, "id": t["id"], "type": "function",
                          "function": {"name": t["name"], "arguments": t["arguments"]}})
            continue
        calls.append({"index": i, "id": t["id"], "type": "function", "function": {"name": t["name"], "arguments": ""}})
        calls += [{"index": i, "id": None, "type": "function", "function": {"name": None, "arguments": piece}}
                  for piece in cut(t["arguments"], arg_splits)]
    steps = stream_of(reasoning=cut(upstream.get("reasoning_content"), splits_r),
                      content=cut(upstream.get("content"), splits_c),
                      finish=upstream["finish_reason"], tool_calls=calls)
    if upstream.get("calls_first"):  # SGLang 0.5.2x: calls of a section in the thinking, then the content
        first = 1 + len(cut(upstream.get("reasoning_content"), splits_r))
        steps[first:first + len(calls) + len(cut(upstream.get("content"), splits_c))] = \
            steps[-len(calls) - 3:-3] + steps[first:first + len(cut(upstream.get("content"), splits_c))]
    return [s[6:-2] for s in steps]  # the data of each event


def run_stream(ctx: kp.RepairContext, events: list[bytes]) -> list[bytes]:
    relay = kp.StreamRepair(ctx)
    frames = []
    for data in events:
        frames += relay.feed(data)
    return frames + relay.close()


def run_whole(ctx: kp.RepairContext, upstream: dict) -> dict:
    message = {"role": "assistant", "content": upstream.get("content"),
               "reasoning_content": upstream.get("reasoning_content")}
    if upstream.get("tool_calls"):
        message["tool_calls"] = [{"id": t["id"], "index": i, "type": "function",
                                  "function": {"name": t["name"], "arguments": t["arguments"]}}
                                 for i, t in enumerate(upstream["tool_calls"])]
    body = {"choices": [{"index": 0, "message": message, "finish_reason": upstream["finish_reason"]}]}
    kp.repair_completion(body, ctx)
    m = body["choices"][0]["message"]
    return {"content": m.get("content") or "", "reasoning": m.get("reasoning_content") or "",
            "tool_calls": [{"id": t["id"], "name": t["function"]["name"],
                            "arguments": t["function"]["arguments"]} for t in m.get("tool_calls") or []],
            "finish_reason": body["choices"][0]["finish_reason"]}


def case_ctx(case: dict) -> kp.RepairContext:
    return ctx_for(case["request_tools"], case["history_tool_calls"])


CASE_IDS = [c["name"] for c in CASES]


# ---------------------------------------------------------------------------------------------------
# The corpus: whole, streamed, split at every point, one character at a time
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_whole_response(case: dict) -> None:
    check_expected(case, run_whole(case_ctx(case), case["upstream"]))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_stream_equals_whole(case: dict) -> None:
    streamed = accumulate(frames_to_events(run_stream(case_ctx(case), upstream_chunks(case["upstream"]))))
    check_expected(case, streamed)
    assert streamed == run_whole(case_ctx(case), case["upstream"])


def case_layouts(case: dict, pairs: bool) -> list[tuple[list[int], list[int]]]:
    """Where to cut a case's reasoning and content: one character at a time and at every single point,
    or (``pairs``) at every pair of points, for the short fixtures."""
    up = case["upstream"]
    r_len, c_len = len(up.get("reasoning_content") or ""), len(up.get("content") or "")
    if not pairs:
        return [(list(range(r_len)), list(range(c_len)))] + [([p], []) for p in range(1, r_len)] + \
            [([], [p]) for p in range(1, c_len)]
    if r_len + c_len > 200:
        return []
    text_len = max(r_len, c_len)
    return [([a, b], [a, b]) for a in range(1, text_len) for b in range(a + 1, text_len, 3)]


def check_layouts(case: dict, pairs: bool) -> None:
    reference = accumulate(frames_to_events(run_stream(case_ctx(case), upstream_chunks(case["upstream"]))))
    for splits_r, splits_c in case_layouts(case, pairs):
        frames = run_stream(case_ctx(case), upstream_chunks(case["upstream"], splits_r, splits_c))
        assert accumulate(frames_to_events(frames)) == reference, (splits_r, splits_c)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_split_at_every_point_and_per_character(case: dict) -> None:
    check_layouts(case, pairs=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_split_at_every_pair_of_points(case: dict) -> None:
    if not case_layouts(case, pairs=True):
        pytest.skip("over 200 characters: every pair of points would take minutes (every single point runs)")
    check_layouts(case, pairs=True)


def test_client_view_catches_what_clients_trip_over() -> None:
    """The checks every streamed test relies on can fail: a later delta that renames a call, arguments
    that parse as JSON before their last delta, an event after [DONE]."""
    def call(index: int, **fields: Any) -> dict:
        return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **fields}]}}]}

    first = call(0, id="functions.f:0", type="function", function={"name": "f", "arguments": ""})
    for events, words in [
        ([first, call(0, function={"name": "g", "arguments": "{}"}), b"[DONE]"], "claims name"),
        ([first, call(0, id="functions.g:0", function={"arguments": "{}"}), b"[DONE]"], "claims id"),
        ([first, call(0, function={"arguments": '{"a": 1}'}), call(0, function={"arguments": " "}), b"[DONE]"],
         "parsed as JSON at delta 1 of 2"),
        ([first, b"[DONE]", call(0, function={"arguments": "{}"})], "after [DONE]"),
    ]:
        with pytest.raises(AssertionError, match=re.escape(words)):
            accumulate(events)
    assert accumulate([first, call(0, function={"arguments": '{"a": '}), call(0, function={"arguments": "1}"}),
                       b"[DONE]"])["tool_calls"] == [{"id": "functions.f:0", "name": "f", "arguments": '{"a": 1}'}]


def test_clean_stream_passes_byte_for_byte() -> None:
    """No markup: every event leaves as the bytes that came in (what is held, a possible marker
    prefix or a possible call id at the start of a line, does not occur in these)."""
    clean = [c for c in CASES if c["name"].startswith("clean_") or c["name"] == "marker_lookalike_text_kept"]
    assert len(clean) == 3
    for case in clean:
        for splits in ([], [3, 9], [5, 11], [1, 2, 20]):
            events = upstream_chunks(case["upstream"], splits, splits)
            frames = run_stream(case_ctx(case), events)
            if case["name"] == "marker_lookalike_text_kept" and splits:
                continue  # "<|im_" cut at a chunk end is held until it is ruled out
            assert b"".join(frames) == b"".join(b"data: " + e + b"\n\n" for e in events), splits


# ---------------------------------------------------------------------------------------------------
# The failure families beyond the corpus (REPAIR.md 3), each whole, streamed split at every point and
# one character at a time
# ---------------------------------------------------------------------------------------------------

TOOLS = [tool("read_file", "path", required=("path",)), tool("exec", "command", required=("command",)),
         tool("mcp--github--create_issue", "title", "body", required=("title",)),
         tool("search", "query", required=("query",)), tool("read_file_v2", "path", "encoding"),
         tool("write_to_file", "path", "content", required=("path", "content"))]
S, E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
B, A, Z = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
# A file an agent writes that holds every marker (a chat template, a tokenizer test): it must arrive
# byte for byte (REPAIR.md 3).
MARKUP_FILE = ("{% for m in messages %}<|im_user|>user<|im_middle|>{{ m }}<|im_end|>{% endfor %}\n"
               f"<|im_assistant|>assistant<|im_middle|><think>plan</think>{S}{B}functions.x:0{A}{{}}{Z}{E}\n"
               "MARKERS = ['<|tool_call_end|>', '</think>', '<|tool_call_section_end|>']\n")
MARKUP_ARGS = json.dumps({"path": "chat_template.jinja", "content": MARKUP_FILE})

# (name, channel, upstream text, expected calls [(id, name, arguments: dict/list, or str for the exact
# text)], expected channel text)
FAMILIES = [
    ("truncated_final_markers", "content",
     f'Go.{S}{B}functions.exec:0{A}{{"command": "ls"}}{Z}<|tool_calls_section_e',
     [("functions.exec:0", "exec", {"command": "ls"})], "Go."),
    ("end_marker_without_gt", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "ls"}}<|tool_call_end|{E}',
     [("functions.exec:0", "exec", {"command": "ls"})], ""),
    ("max_tokens_cut_inside_arguments", "reasoning",
     f'Think.{S}{B}functions.read_file:0{A}{{"path": "/a/b',
     [("functions.read_file:0", "read_file", '{"path": "/a/b"}')], "Think."),
    ("max_tokens_cut_after_backslash", "content",
     f'{S}{B}functions.write_to_file:0{A}{{"path": "n.txt", "content": "line one\\nline two\\',
     [("functions.write_to_file:0", "write_to_file", {"path": "n.txt", "content": "line one\nline two"})], ""),
    ("max_tokens_cut_inside_unicode_escape", "content",
     f'{S}{B}functions.write_to_file:0{A}{{"path": "n.txt", "content": "caf\\u00',
     [("functions.write_to_file:0", "write_to_file", {"path": "n.txt", "content": "caf"})], ""),
    ("max_tokens_cut_inside_a_key", "content",
     f'{S}{B}functions.read_file_v2:0{A}{{"path": "a", "enc',
     [("functions.read_file_v2:0", "read_file_v2", '{"path": "a"}')], ""),
    ("section_end_instead_of_call_end", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "pwd"}}{E}After.',
     [("functions.exec:0", "exec", {"command": "pwd"})], "After."),
    ("no_argument_marker", "reasoning",
     f'{S}{B}functions.read_file:0 {{"path": "x"}}{Z}{E}',
     [("functions.read_file:0", "read_file", {"path": "x"})], ""),
    ("header_without_call_begin", "content",
     f'{S}functions.exec:0{A}{{"command": "id"}}{Z}{E}',
     [("functions.exec:0", "exec", {"command": "id"})], ""),
    ("header_without_call_begin_or_section", "content",
     f'Reading it.\nfunctions.read_file:0{A}{{"path": "README.md"}}{E}',
     [("functions.read_file:0", "read_file", {"path": "README.md"})], "Reading it.\n"),
    ("singular_section_spelling", "content",
     f'<|tool_call_section_begin|>{B}functions.exec:0{A}{{"command": "ls"}}{Z}<|tool_call_section_end|>',
     [("functions.exec:0", "exec", {"command": "ls"})], ""),
    ("no_dot_no_colon_id", "content",
     f'{S}{B}functionsexec5{A}{{"command": "ls"}}{Z}{E}',
     [("functions.exec:5", "exec", {"command": "ls"})], ""),
    ("no_dot_no_colon_name_ends_in_digit", "content",
     f'{S}{B}functionsread_file_v27{A}{{"path": "a"}}{Z}{E}',
     [("functions.read_file_v2:7", "read_file_v2", {"path": "a"})], ""),
    ("foreign_id_inferred_from_arguments", "reasoning",
     f'{S}{B}call00003{A}{{"query": "kimi"}}{Z}{E}',
     [("functions.search:3", "search", {"query": "kimi"})], ""),
    ("uuid_id_inferred_dialog_counter", "content",
     f'{S}{B}3f2b9c1e-aaaa-bbbb-cccc-1234567890ab{A}{{"command": "ls"}}{Z}{E}',
     [("functions.exec:4", "exec", {"command": "ls"})], ""),
    ("dot_instead_of_colon", "content",
     f'{S}{B}functions.read_file.2{A}{{"path": "a"}}{Z}{E}',
     [("functions.read_file:2", "read_file", {"path": "a"})], ""),
    ("dotted_namespace", "content",
     f'{S}{B}functions.default_api.exec:1{A}{{"command": "ls"}}{Z}{E}',
     [("functions.exec:1", "exec", {"command": "ls"})], ""),
    ("unknown_name_kept_as_written", "content",
     f'{S}{B}functions.mystery:0{A}{{"zzz": 1}}{Z}{E}',
     [("functions.mystery:0", "mystery", {"zzz": 1})], ""),
    ("double_encoded_arguments", "content",
     f'{S}{B}functions.exec:0{A}"{{\\"command\\": \\"ls\\"}}"{Z}{E}',
     [("functions.exec:0", "exec", '{"command": "ls"}')], ""),
    ("double_encoded_and_cut", "content",
     f'{S}{B}functions.read_file:0{A}"{{\\"path\\": \\"src/ma',
     [("functions.read_file:0", "read_file", '{"path": "src/ma"}')], ""),
    ("array_arguments_pass_as_written", "content",
     f'{S}{B}functions.read_file:0{A}[{{"path": "a.py"}}, {{"path": "b.py"}}]{Z}{E}',
     [("functions.read_file:0", "read_file", '[{"path": "a.py"}, {"path": "b.py"}]')], ""),
    ("empty_arguments", "content",
     f'{S}{B}functions.exec:0{A}{Z}{E}', [("functions.exec:0", "exec", "{}")], ""),
    ("broken_json_trailing_junk", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "ls"}} junk}}{Z}{E}',
     [("functions.exec:0", "exec", '{"command": "ls"}')], ""),
    ("broken_json_dangling_comma", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "ls",{Z}{E}',
     [("functions.exec:0", "exec", '{"command": "ls"}')], ""),
    ("trailing_comma_before_brace", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "ls", }}{Z}{E}',
     [("functions.exec:0", "exec", '{"command": "ls"}')], ""),
    ("raw_newlines_inside_strings_escaped", "content",
     f'{S}{B}functions.write_to_file:0{A}{{\n  "path": "a",\n  "content": "x\ny\tz"\n}}{Z}{E}',
     [("functions.write_to_file:0", "write_to_file", '{\n  "path": "a",\n  "content": "x\\ny\\tz"\n}')], ""),
    ("backslash_meant_literally", "content",
     f'{S}{B}functions.read_file:0{A}{{"path": "C:\\Users\\me"}}{Z}{E}',
     [("functions.read_file:0", "read_file", {"path": "C:\\Users\\me"})], ""),
    ("marker_text_inside_arguments", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "echo <|tool or <|im_ {{}}"}}{Z}{E}',
     [("functions.exec:0", "exec", '{"command": "echo <|tool or <|im_ {}"}')], ""),
    ("every_marker_inside_a_file_written", "content",
     f'Writing it.{S}{B}functions.write_to_file:0{A}{MARKUP_ARGS}{Z}{E}',
     [("functions.write_to_file:0", "write_to_file", MARKUP_ARGS)], "Writing it."),
    ("every_marker_inside_a_file_written_in_reasoning", "reasoning",
     f'Plan.{S}{B}functions.write_to_file:0{A}{MARKUP_ARGS}{Z}{E}',
     [("functions.write_to_file:0", "write_to_file", MARKUP_ARGS)], "Plan."),
    ("marker_in_a_string_that_never_closes_ends_the_call", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "ls{Z}{E}Done.',
     [("functions.exec:0", "exec", '{"command": "ls"}')], "Done."),
    ("marker_in_an_unclosed_string_then_the_next_call", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "a{Z}{B}functions.exec:1{A}{{"command": "b"}}{Z}{E}',
     [("functions.exec:0", "exec", '{"command": "a"}'), ("functions.exec:1", "exec", '{"command": "b"}')], ""),
    ("polluted_by_next_header", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "a"}}functions.exec:1{A}{{"command": "b"}}{Z}{E}',
     [("functions.exec:0", "exec", {"command": "a"}), ("functions.exec:1", "exec", {"command": "b"})], ""),
    ("missing_call_end_between_calls", "reasoning",
     f'{S}{B}functions.exec:0{A}{{"command": "a"}}{B}functions.exec:1{A}{{"command": "b"}}{Z}{E}',
     [("functions.exec:0", "exec", {"command": "a"}), ("functions.exec:1", "exec", {"command": "b"})], ""),
    ("identical_calls_in_one_section_all_kept", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "ls"}}{Z}{B}functions.exec:1{A}{{"command": "ls"}}{Z}{E}',
     [("functions.exec:0", "exec", {"command": "ls"}), ("functions.exec:1", "exec", {"command": "ls"})], ""),
    ("same_call_in_two_sections_once", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "ls"}}{Z}{E}Again:{S}{B}functions.exec:0{A}{{"command": "ls"}}{Z}{E}',
     [("functions.exec:0", "exec", {"command": "ls"})], "Again:"),
    ("two_sections_text_between", "content",
     f'One.{S}{B}functions.exec:0{A}{{"command": "a"}}{Z}{E}Two.{S}{B}functions.exec:1{A}{{"command": "b"}}{Z}{E}Three.',
     [("functions.exec:0", "exec", {"command": "a"}), ("functions.exec:1", "exec", {"command": "b"})],
     "One.Two.Three."),
    ("leaked_control_tokens", "content", "All done.<|im_end|>", [], "All done."),
    ("leaked_role_header_removed_whole", "content",
     "All done.<|im_end|><|im_assistant|>assistant<|im_middle|>Anything else?", [], "All done.Anything else?"),
    ("stray_end_markers", "content", f"Text{Z} more{E} end.", [], "Text more end."),
    ("duplicate_ids_made_unique", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "a"}}{Z}{B}functions.exec:0{A}{{"command": "b"}}{Z}{E}',
     [("functions.exec:0", "exec", {"command": "a"}), ("functions.exec:5", "exec", {"command": "b"})], ""),
    ("unclosed_section_then_prose", "content",
     f'{S}{B}functions.exec:0{A}{{"command": "a"}}{Z} and then the answer continues here.',
     [("functions.exec:0", "exec", {"command": "a"})], "and then the answer continues here."),
    ("hyphen_name_no_prefix", "content",
     f'{S}{B}mcp--github--create_issue:9{A}{{"title": "t"}}{Z}{E}',
     [("functions.mcp--github--create_issue:9", "mcp--github--create_issue", {"title": "t"})], ""),
    ("unrepairable_arguments_pass_raw", "content",
     f'{S}{B}functions.exec:0{A}not json at all{Z}{E}',
     [("functions.exec:0", "exec", "not json at all")], ""),
    ("a_number_passes_as_written", "content",
     f'{S}{B}functions.exec:0{A}42{Z}{E}', [("functions.exec:0", "exec", "42")], ""),
]


def family_upstream(channel: str, text: str) -> dict:
    return {"reasoning_content": text if channel == "reasoning" else "Thinking.",
            "content": text if channel == "content" else None, "tool_calls": None, "finish_reason": "stop"}


def assert_calls(got: list[dict], want: list[tuple]) -> None:
    assert [(c["id"], c["name"]) for c in got] == [(i, n) for i, n, _ in want], got
    for call, (_, _, arguments) in zip(got, want):
        if isinstance(arguments, str):
            assert call["arguments"] == arguments  # byte for byte
        else:
            assert json.loads(call["arguments"]) == arguments


@pytest.mark.parametrize("name,channel,text,calls,expected_text", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_failure_family(name: str, channel: str, text: str, calls: list, expected_text: str) -> None:
    up = family_upstream(channel, text)
    whole = run_whole(ctx_for(TOOLS, history=4), up)
    assert_calls(whole["tool_calls"], calls)
    channel_text = whole["content"] if channel == "content" else whole["reasoning"]
    assert norm(channel_text) == norm(expected_text)
    assert whole["finish_reason"] == ("tool_calls" if calls else "stop")
    layouts = [[p] for p in range(1, len(text))] + [list(range(len(text)))]
    for points in layouts:
        split = (points, []) if channel == "reasoning" else ([], points)
        frames = run_stream(ctx_for(TOOLS, history=4), upstream_chunks(up, *split))
        assert accumulate(frames_to_events(frames)) == whole, points


# ---------------------------------------------------------------------------------------------------
# Structured calls: the same repair as markup (REPAIR.md 4.1, 4.5, 4.6), streamed as SGLang streams
# them (a first delta with the name, then argument pieces), and whole
# ---------------------------------------------------------------------------------------------------

# (name, history, upstream {reasoning, content, tool_calls [(id, name, arguments)], finish}, expected
# calls [(id, name, arguments)], expected content, expected finish)
STRUCTURED = [
    ("clean", 0, {"tool_calls": [("functions.exec:0", "exec", '{"command": "ls"}')]},
     [("functions.exec:0", "exec", '{"command": "ls"}')], "", "tool_calls"),
    ("arguments_hold_the_next_call", 0, {"tool_calls": [(
        "functions.read_file:0", "read_file",
        f'{{"path": "/repo"}}{B}functions.read_file:1{A}{{"path": "/repo/b"}}{Z}')]},
     [("functions.read_file:0", "read_file", '{"path": "/repo"}'),
      ("functions.read_file:1", "read_file", '{"path": "/repo/b"}')], "", "tool_calls"),
    ("arguments_end_in_section_end", 0, {"tool_calls": [("functions.exec:0", "exec", f'{{"command": "ls"}}{E}')]},
     [("functions.exec:0", "exec", '{"command": "ls"}')], "", "tool_calls"),
    ("arguments_cut_at_max_tokens", 0,
     {"tool_calls": [("functions.read_file:0", "read_file", '{"path": "src/ma')], "finish": "length"},
     [("functions.read_file:0", "read_file", '{"path": "src/ma"}')], "", "length"),
    ("double_encoded", 0, {"tool_calls": [("functions.exec:0", "exec", '"{\\"command\\": \\"ls\\"}"')]},
     [("functions.exec:0", "exec", '{"command": "ls"}')], "", "tool_calls"),
    ("ids_counted_wrongly", 3, {"tool_calls": [("functions.read_file:6", "read_file", '{"path": "a"}'),
                                               ("functions.read_file:7", "read_file", '{"path": "b"}')]},
     [("functions.read_file:3", "read_file", '{"path": "a"}'), ("functions.read_file:4", "read_file", '{"path": "b"}')],
     "", "tool_calls"),
    ("foreign_ids", 1, {"tool_calls": [("call_8f3a", "exec", '{"command": "ls"}')]},
     [("functions.exec:1", "exec", '{"command": "ls"}')], "", "tool_calls"),
    ("dotted_name", 0, {"tool_calls": [("functions.default_api.exec:0", "default_api.exec", '{"command": "ls"}')]},
     [("functions.exec:0", "exec", '{"command": "ls"}')], "", "tool_calls"),
    ("same_call_as_markup_in_content_once", 0, {
        "content": f'{S}{B}functions.exec:0{A}{{"command": "ls"}}{Z}{B}functions.read_file:1{A}{{"path": "p"}}{Z}{E}',
        "tool_calls": [("functions.exec:0", "exec", '{"command":"ls"}')]},
     [("functions.exec:0", "exec", '{"command": "ls"}'), ("functions.read_file:1", "read_file", '{"path": "p"}')],
     "", "tool_calls"),
    ("marker_inside_a_string_of_structured_arguments", 0, {"tool_calls": [
        ("functions.write_to_file:0", "write_to_file", MARKUP_ARGS)]},
     [("functions.write_to_file:0", "write_to_file", MARKUP_ARGS)], "", "tool_calls"),
    ("finish_stop_with_calls", 0, {"tool_calls": [("functions.exec:0", "exec", "{}")], "finish": "stop"},
     [("functions.exec:0", "exec", "{}")], "", "tool_calls"),
]


def structured_upstream(spec: dict) -> dict:
    return {"reasoning_content": spec.get("reasoning"), "content": spec.get("content"),
            "tool_calls": [{"id": i, "name": n, "arguments": a} for i, n, a in spec["tool_calls"]],
            "finish_reason": spec.get("finish", "tool_calls"), "calls_first": spec.get("calls_first")}


@pytest.mark.parametrize("name,history,spec,calls,content,finish", STRUCTURED, ids=[s[0] for s in STRUCTURED])
def test_structured_calls_repaired(name: str, history: int, spec: dict, calls: list, content: str,
                                   finish: str) -> None:
    up = structured_upstream(spec)
    whole = run_whole(ctx_for(TOOLS, history), up)
    assert_calls(whole["tool_calls"], calls)
    assert (norm(whole["content"]), whole["finish_reason"]) == (content, finish)
    longest = max(len(a) for _, _, a in spec["tool_calls"])
    for points in [[p] for p in range(1, longest)] + [list(range(longest))]:
        frames = run_stream(ctx_for(TOOLS, history), upstream_chunks(up, arg_splits=points))
        assert accumulate(frames_to_events(frames)) == whole, points


def tool_delta(index: Any = None, call_id: Any = None, name: Any = None, arguments: Any = None) -> dict:
    delta: dict = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if index is not None:
        delta["index"] = index
    if call_id is not None:
        delta["id"] = call_id
    return delta


# Structured deltas as engines other than SGLang stream them (issue 16.3): each must give every call whole.
ENGINE_SHAPES = [
    ("two calls sharing one index, told apart by their ids",
     [tool_delta(0, "call_a", "read_file", ""), tool_delta(0, None, None, '{"path": "a.py"}'),
      tool_delta(0, "call_b", "exec", ""), tool_delta(0, None, None, '{"command": "ls"}')],
     [("read_file", {"path": "a.py"}), ("exec", {"command": "ls"})]),
    ("deltas without an index: a new id starts a new call",
     [tool_delta(None, "call_a", "read_file", '{"path": '), tool_delta(None, None, None, '"a.py"}'),
      tool_delta(None, "call_b", "exec", '{"command": "ls"}')],
     [("read_file", {"path": "a.py"}), ("exec", {"command": "ls"})]),
    ("arguments as a JSON object, not a string",
     [tool_delta(0, "call_a", "read_file", {"path": "a.py"}), tool_delta(1, "call_b", "exec", {"command": "ls"})],
     [("read_file", {"path": "a.py"}), ("exec", {"command": "ls"})]),
    ("the same id repeated on every delta is one call",
     [tool_delta(0, "call_a", "read_file", '{"path": '), tool_delta(0, "call_a", None, '"a.py"}')],
     [("read_file", {"path": "a.py"})]),
    ("a call's arguments going on after the next call began",
     [tool_delta(0, "call_a", "read_file", '{"path": '), tool_delta(1, "call_b", "exec", '{"command": '),
      tool_delta(0, None, None, '"a.py"}'), tool_delta(1, None, None, '"ls"}')],
     [("read_file", {"path": "a.py"}), ("exec", {"command": "ls"})]),
    ("the same id repeated on every delta, without an index, is one call",
     [tool_delta(None, "call_a", "read_file", '{"path": '), tool_delta(None, "call_a", None, '"a.py"}'),
      tool_delta(None, "call_b", "exec", '{"command": "ls"}')],
     [("read_file", {"path": "a.py"}), ("exec", {"command": "ls"})]),
]


@pytest.mark.parametrize("name,deltas,want", ENGINE_SHAPES, ids=[e[0] for e in ENGINE_SHAPES])
def test_structured_deltas_as_other_engines_send_them(name: str, deltas: list, want: list) -> None:
    events = [json.dumps(chunk({"role": "assistant", "content": ""})).encode()]
    events += [json.dumps(chunk({"tool_calls": [d]})).encode() for d in deltas]
    events.append(json.dumps(chunk({}, finish="tool_calls")).encode())
    message = accumulate(frames_to_events(run_stream(ctx_for(TOOLS), events)))
    assert [(c["name"], json.loads(c["arguments"])) for c in message["tool_calls"]] == want
    assert len({c["id"] for c in message["tool_calls"]}) == len(want)


@pytest.mark.edge
async def test_other_engines_structured_deltas_through_the_proxy_with_the_sdk(proxy: Running) -> None:
    for name, deltas, want in ENGINE_SHAPES:
        steps = [sse(chunk({"role": "assistant", "content": ""})), *[sse(chunk({"tool_calls": [d]})) for d in deltas],
                 sse(chunk({}, finish="tool_calls")), b"data: [DONE]\n\n"]
        proxy.upstream.script(Script(steps=steps))
        _, _, calls = await sdk_call(lambda: _turn(proxy, [{"role": "user", "content": "go"}], True))
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want, name


# Cut-offs and noise around a call's header (issue 16.5 and 16.8): resolve what can be, invent nothing.
HEADER_EDGES = [
    ("max_tokens right after the name's colon", f"Reading.{S}{B}functions.read_file:", [("read_file", "functions.read_file:0")]),
    ("a name cut off after its namespace dot", f"{S}{B}functions.exec.", [("exec", "functions.exec:0")]),
    ("a call begin with nothing after it, at the end", f"Done.{S}{B}", []),
    ("a call begin with nothing after it, before the section's end", f"Done.{S}{B}{E}", []),
    ("a call begin, then the next call", f"{S}{B}{B}functions.exec:0{A}{{\"command\": \"ls\"}}{Z}{E}",
     [("exec", "functions.exec:0")]),
]


@pytest.mark.parametrize("name,text,want", HEADER_EDGES, ids=[h[0] for h in HEADER_EDGES])
def test_header_cut_offs_resolve_what_they_can_and_invent_no_call(name: str, text: str, want: list) -> None:
    for channel in ("content", "reasoning"):
        up = family_upstream(channel, text)
        whole = run_whole(ctx_for(TOOLS), up)
        points = list(range(len(text)))
        streamed = accumulate(frames_to_events(run_stream(
            ctx_for(TOOLS), upstream_chunks(up, *((points, []) if channel == "reasoning" else ([], points))))))
        for message in (whole, streamed):
            assert [(c["name"], c["id"]) for c in message["tool_calls"]] == want, (channel, message)
            assert all(c["id"].count("functions.") == 1 and "::" not in c["id"] for c in message["tool_calls"])
            assert S not in message["content"] + message["reasoning"] and B not in message["content"]


# ---------------------------------------------------------------------------------------------------
# Thinking (REPAIR.md 8): SGLang's reasoning parser ends the reasoning at </think> (removed) or, in
# 0.5.2x, at a tool section (kept); the model's one text is read across both channels
# ---------------------------------------------------------------------------------------------------

CALL = f'{B}functions.read_file:0{A}{{"path": "a"}}{Z}'
# (name, upstream {reasoning, content, tool_calls}, reasoning that must be there, expected content, arguments)
THINKING = [
    ("section_in_thinking_more_thinking_then_answer_tool_parser_off",
     {"reasoning": "Look first. ", "content": f"{S}{CALL}{E} Then decide.</think>Reading it."},
     ["Look first.", "Then decide."], "Reading it.", {"path": "a"}),
    ("section_in_thinking_more_thinking_then_answer_structured",
     {"reasoning": "Look first. ", "tool_calls": [("functions.read_file:0", "read_file", '{"path": "a"}')],
      "content": " Then decide.</think>Reading it.", "calls_first": True},
     ["Look first.", "Then decide."], "Reading it.", {"path": "a"}),
    ("no_reasoning_parser_section_in_thinking",
     {"content": f" <think> Look first. {S}{CALL}{E} Then decide.</think>Reading it."},
     ["Look first.", "Then decide."], "Reading it.", {"path": "a"}),
    ("answer_after_a_section_after_thinking",
     {"reasoning": "Look first.", "content": f"{S}{CALL}{E}Done."}, ["Look first."], "Done.", {"path": "a"}),
    ("section_in_reasoning_then_thinking_goes_on",
     {"reasoning": f"Look first. {S}{CALL}{E} Then decide.", "content": "Reading it."},
     ["Look first.", "Then decide."], "Reading it.", {"path": "a"}),
    ("think_close_inside_arguments_cut_between_channels",  # SGLang ended the reasoning at that </think>
     {"reasoning": f'Plan. {S}{B}functions.write_to_file:0{A}{{"path": "r.md", "content": "ends at ',
      "content": f' here"}}{Z}{E} More plan.</think>Written.'},
     ["Plan.", "More plan."], "Written.", {"path": "r.md", "content": "ends at </think> here"}),
]


@pytest.mark.parametrize("name,spec,reasoning,content,arguments", THINKING, ids=[t[0] for t in THINKING])
def test_thinking_across_channels(name: str, spec: dict, reasoning: list[str], content: str,
                                  arguments: dict) -> None:
    up = structured_upstream({"tool_calls": [], **spec})
    up["finish_reason"] = "stop"
    whole = run_whole(ctx_for(TOOLS), up)
    assert [json.loads(c["arguments"]) for c in whole["tool_calls"]] == [arguments]
    assert norm(whole["content"]) == content and "</think>" not in whole["content"] + whole["reasoning"]
    for text in reasoning:
        assert text in whole["reasoning"]
    r_len, c_len = len(up["reasoning_content"] or ""), len(up["content"] or "")
    for points in [[p] for p in range(1, max(r_len, c_len))] + [list(range(max(r_len, c_len)))]:
        frames = run_stream(ctx_for(TOOLS), upstream_chunks(up, points, points))
        assert accumulate(frames_to_events(frames)) == whole, points


# ---------------------------------------------------------------------------------------------------
# Calls stream live (REPAIR.md 11): the first delta when the header is complete, the arguments as they
# are generated; only what a repair may still change is held back
# ---------------------------------------------------------------------------------------------------

def client_timeline(ctx: kp.RepairContext, events: list[bytes]) -> list[dict]:
    """What the client has after each upstream event: {index: {"id", "name", "arguments", "deltas"}}
    (ClientView's checks passed on the way)."""
    relay, view, timeline = kp.StreamRepair(ctx), ClientView(), []
    for data in events:
        for event in frames_to_events(relay.feed(data)):
            view.add(event)
        timeline.append({index: dict(call) for index, call in view.calls.items()})
    for event in frames_to_events(relay.close()):
        view.add(event)
    view.message()
    return timeline


@pytest.mark.parametrize("route", ["reasoning", "content", "structured"])
def test_calls_stream_live(route: str) -> None:
    body = "x" * 300
    arguments = json.dumps({"path": "big.txt", "content": body})
    if route == "structured":
        up = structured_upstream({"tool_calls": [("functions.write_to_file:0", "write_to_file", arguments)]})
        events = upstream_chunks(up, arg_splits=list(range(len(arguments))))
    else:
        text = f"Writing.{S}{B}functions.write_to_file:0{A}{arguments}{Z}{E}"
        up = family_upstream(route, text)
        points = list(range(len(text)))
        events = upstream_chunks(up, *((points, []) if route == "reasoning" else ([], points)))
    timeline = client_timeline(ctx_for(TOOLS), events)
    named_at = next(i for i, calls in enumerate(timeline) if calls.get(0, {}).get("name") == "write_to_file")
    complete_at = next(i for i, calls in enumerate(timeline) if calls.get(0, {}).get("arguments") == arguments)
    assert named_at < complete_at - len(body)  # the name went out before the content was generated
    half = next(i for i, calls in enumerate(timeline) if len(calls.get(0, {}).get("arguments", "")) > 150)
    assert half < complete_at - 100  # arguments flow while the model writes them
    assert timeline[-1][0]["deltas"] > 200  # in many deltas, not one (ClientView: none took anything back)


def test_a_name_that_needs_the_arguments_is_held_until_they_are_complete() -> None:
    text = f'{S}{B}call00003{A}{{"query": "kimi"}}{Z}{E}'
    events = upstream_chunks(family_upstream("content", text), [], list(range(len(text))))
    timeline = client_timeline(ctx_for(TOOLS), events)
    firsts = [calls[0] for calls in timeline if 0 in calls]
    assert firsts[0]["name"] == "search" and firsts[0]["arguments"] == '{"query": "kimi"}'


def test_text_is_held_back_only_while_it_may_be_markup() -> None:
    """Plain text goes out with each event; a possible marker prefix waits (at most LONGEST_MARKER - 1
    characters) and goes out once ruled out."""
    repair = kp.ChoiceRepair(ctx_for(TOOLS))
    out = "".join(e.text for e in repair.feed(content="Hello world, "))
    assert out == "Hello world, "
    assert [e.text for e in repair.feed(content="a <|tool_calls_sec")] == ["a "]
    assert [e.text for e in repair.feed(content="ond")] == ["<|tool_calls_second"]


# ---------------------------------------------------------------------------------------------------
# Edge rules: finish reasons, a second finish, the switch, history ids, Unicode
# ---------------------------------------------------------------------------------------------------

def test_second_finish_chunk_sends_no_call_twice() -> None:
    up = {"reasoning_content": None, "content": f'{S}{B}functions.exec:0{A}{{"command": "ls"}}{Z}{E}',
          "tool_calls": None, "finish_reason": "stop"}
    events = upstream_chunks(up)
    finish = next(e for e in events if b'"finish_reason":"stop"' in e)
    events.insert(events.index(finish) + 1, finish)
    sent = [tc["id"] for ev in frames_to_events(run_stream(ctx_for(TOOLS), events)) if ev != b"[DONE]"
            for ch in ev["choices"] for tc in (ch["delta"].get("tool_calls") or []) if tc.get("id")]
    assert sent == ["functions.exec:0"]


def test_finish_reason_follows_delivered_calls() -> None:
    up = {"reasoning_content": None, "content": "No call here.", "tool_calls": None, "finish_reason": "tool_calls"}
    assert run_whole(ctx_for(TOOLS), up)["finish_reason"] == "stop"
    up = {"reasoning_content": None, "content": f"{S}{B}functions.exec:0{A}{{}}", "tool_calls": None,
          "finish_reason": "length"}
    assert run_whole(ctx_for(TOOLS), up)["finish_reason"] == "length"


def test_repair_off_is_transparent() -> None:
    up = CASES[0]["upstream"]
    events = upstream_chunks(up, [4, 17])
    frames = run_stream(ctx_for(CASES[0]["request_tools"], enabled=False), events)
    assert b"".join(frames) == b"".join(b"data: " + e + b"\n\n" for e in events)


def test_history_ids_rewritten_for_upstream() -> None:
    request = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "exec", "arguments": "{}"}},
            {"id": "functions.read_file:1", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "ok"},
        {"role": "tool", "tool_call_id": "functions.read_file:1", "content": "ok"},
        {"role": "assistant", "tool_calls": [{"id": "toolu_9", "type": "function",
                                               "function": {"name": "search", "arguments": "{}"}},
                                              {"id": "functions.exec:0", "type": "function",
                                               "function": {"name": "exec", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_9", "content": "found"},
        {"role": "tool", "tool_call_id": "functions.exec:0", "content": "again"}]}
    msgs = request["messages"]
    edits = kp.canonicalize_history(request)
    assert [path for path, _ in edits] == [  # what is written anew for the upstream, and nothing else
        ("messages", 1, "tool_calls", 0, "id"), ("messages", 2, "tool_call_id"), ("messages", 4, "tool_calls", 0, "id"),
        ("messages", 4, "tool_calls", 1, "id"), ("messages", 5, "tool_call_id"), ("messages", 6, "tool_call_id")]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["functions.exec:0", "functions.read_file:1"]
    assert msgs[2]["tool_call_id"] == "functions.exec:0"
    assert msgs[3]["tool_call_id"] == "functions.read_file:1"
    # a canonical id that an earlier call already holds is rewritten too: two calls never share one
    assert [c["id"] for c in msgs[4]["tool_calls"]] == ["functions.search:2", "functions.exec:3"]
    assert (msgs[5]["tool_call_id"], msgs[6]["tool_call_id"]) == ("functions.search:2", "functions.exec:3")
    assert kp.canonicalize_history(request) == []  # idempotent


REASONING_SHAPES = [  # (name, the upstream's reasoning fields, the keys the client gets the repaired text under)
    ("sglang", {"reasoning_content": "LEAK"}, ["reasoning_content"]),
    ("vllm", {"reasoning": "LEAK"}, ["reasoning"]),
    ("vllm-beside-null", {"reasoning_content": None, "reasoning": "LEAK"}, ["reasoning"]),
    ("mlx-vlm-both", {"reasoning_content": "LEAK", "reasoning": "LEAK"}, ["reasoning_content", "reasoning"]),
]


@pytest.mark.edge
@pytest.mark.parametrize("name,fields,keys", REASONING_SHAPES, ids=[r[0] for r in REASONING_SHAPES])
async def test_reasoning_under_either_key_or_both_is_repaired(proxy: Running, name: str, fields: dict,
                                                              keys: list[str]) -> None:
    """Issue 16.2: every reasoning field is repaired and each key the upstream used is kept, streamed and
    whole: the call leaked into the reasoning goes out as a call, and no key shows the raw markup."""
    leak = f'Let me look.{S}{B}functions.read_file:0{A}{{"path": "a.py"}}{Z}{E}'
    shaped = {k: (leak if v == "LEAK" else v) for k, v in fields.items()}
    whole = completion(content="", reasoning=None)
    message = whole["choices"][0]["message"]
    del message["reasoning_content"]
    message.update(shaped)
    halves = [sse(chunk({k: v and v[a:b] for k, v in shaped.items()})) for a, b in ((0, 20), (20, None))]
    if "reasoning_content" not in fields:  # the fake writes SGLang's null: this server sends no such key
        halves = [h.replace(b'"reasoning_content":null,', b"") for h in halves]
    steps = [sse(chunk({"role": "assistant", "content": ""})), *halves, sse(chunk({}, finish="stop")), b"data: [DONE]\n\n"]
    proxy.upstream.script(Script(steps=steps), Script(body=whole, content_type="application/json"))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        streamed = await client.post("/v1/chat/completions", json={"messages": [], "stream": True, "tools": TOOLS})
        got = (await client.post("/v1/chat/completions", json={"messages": [], "tools": TOOLS})).json()
    assert S not in streamed.text and B not in streamed.text
    view = accumulate(frames_to_events([streamed.content]))
    assert [c["name"] for c in view["tool_calls"]] == ["read_file"] and view["finish_reason"] == "tool_calls"
    texts = {k: "" for k in keys}
    for event in frames_to_events([streamed.content]):
        for choice in (event.get("choices") or []) if event != b"[DONE]" else []:
            for k in ("reasoning_content", "reasoning"):
                if choice["delta"].get(k):
                    assert k in keys, (k, choice["delta"])
                    texts[k] += choice["delta"][k]
    assert all(norm(text) == "Let me look." for text in texts.values()), texts
    got_message = got["choices"][0]["message"]
    assert [c["function"]["name"] for c in got_message["tool_calls"]] == ["read_file"]
    for k in ("reasoning_content", "reasoning"):
        if k in keys:
            assert norm(got_message[k]) == "Let me look.", (k, got_message)
        elif k in shaped:
            assert got_message[k] is None  # kept, as the upstream sent it
    assert got["choices"][0]["finish_reason"] == "tool_calls"


def test_surrogate_pair_split_across_events_and_lone_surrogates() -> None:
    """A JavaScript client cuts strings between UTF-16 halves; an upstream may too. Nothing raises, the
    pair arrives joined, and a lone half survives as an escape."""
    halves = ["smile \ud83d", "\ude00!"]
    events = [json.dumps(chunk({"content": h})).encode() for h in halves]  # ASCII JSON: \ud83d escapes
    events += [json.dumps(chunk({}, finish="stop")).encode(), b"[DONE]"]
    got = accumulate(frames_to_events(run_stream(ctx_for(TOOLS), events)))
    assert got["content"] == "smile \U0001f600!"
    assert kp.json_dumps_compact({"a": "\ud83d"}) == b'{"a":"\\ud83d"}'


def test_content_as_a_list_of_parts_is_left_as_it_is() -> None:
    parts = [{"type": "text", "text": "Hello"}]
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": parts}, "finish_reason": "stop"}]}
    _, changed = kp.repair_completion(body, ctx_for(TOOLS))
    assert body["choices"][0]["message"]["content"] == parts and not changed


# -- corners found by review: each whole and one character at a time -----------------------------------

F_TOOL, G_TOOL = tool("f", "a", "content"), tool("g", "b")
HF = f"{B}functions.f:0{A}"
# (name, content, expected calls [(id, name, arguments as written)], expected content)
CORNERS = [
    ("literal_then_a_lone_lt", f"{HF}true<br>", [("functions.f:0", "f", "true")], ""),
    ("number_then_a_lone_lt", f'{HF}{{"a": 1<br>}}', [("functions.f:0", "f", '{"a": 1}')], ""),
    ("arguments_that_start_with_a_lone_lt", f"{HF}<br> hello", [("functions.f:0", "f", "<br> hello")], ""),
    ("a_cut_off_top_level_string_is_closed", f'{HF}"abc', [("functions.f:0", "f", '"abc"')], ""),
    ("a_string_that_only_looks_double_encoded", f'{HF}"{{hello}}"', [("functions.f:0", "f", '"{hello}"')], ""),
    ("a_long_gap_before_the_next_id", f'{HF}{{"a": 1}}{" " * 600}functions.g:1{A}{{"b": 2}}{Z}',
     [("functions.f:0", "f", '{"a": 1}'), ("functions.g:1", "g", '{"b": 2}')], ""),
    ("an_id_longer_than_an_id_is_arguments", f"{S}{B}{'x' * 600}{{\"a\":1}}{Z}{E}",
     [("functions.unknown:0", "unknown", "x" * 600 + '{"a":1}')], ""),
    ("indentation_before_an_id_at_the_start_of_a_line", f"Hi\n  functions.f:0{A}{{}}",
     [("functions.f:0", "f", "{}")], "Hi\n  "),
    ("an_id_already_sent_heads_the_call", f"See default_api.f:0{A}{{}}",
     [("functions.f:0", "f", "{}")], "See default_api.f:0"),
    ("an_undeclared_word_before_a_stray_marker", f"see step:1 {A}{{}}", [], "see step:1 {}"),
    ("think_inside_a_section_is_noise", f"{S}<think>{HF}{{}}{Z}{E}", [("functions.f:0", "f", "{}")], ""),
    ("a_lone_high_surrogate_at_the_end", "ab\ud800", [], "ab\ud800"),
    # A marker inside a key whose value then began, before the JSON broke: the marker ended the call
    # (REPAIR.md 4.3), so the key was never a key: it is not sent, and the member is dropped.
    ("a_marker_inside_a_key_ended_the_call", f'{HF}{{"ke<|im_end|>y": "v" x', [("functions.f:0", "f", "{}")],
     'y": "v" x'),
    ("a_marker_inside_a_later_key_ended_the_call", f'{HF}{{"a": 1, "ke<|im_end|>y": "v" x',
     [("functions.f:0", "f", '{"a": 1}')], 'y": "v" x'),
]


@pytest.mark.parametrize("name,content,calls,text", CORNERS, ids=[c[0] for c in CORNERS])
def test_corner(name: str, content: str, calls: list, text: str) -> None:
    for pieces in ([content], list(content)):
        repair = kp.ChoiceRepair(ctx_for([F_TOOL, G_TOOL]))
        for piece in pieces:
            repair.feed(content=piece)
        repair.finish()
        final = kp.Message.of_repair(repair)
        assert [list(c) for c in final.calls] == [list(c) for c in calls] and final.content == text, len(pieces)


def test_hostile_requests_and_responses_never_raise() -> None:
    """Deep nesting, 5,000-digit counters, a client's odd schema, choices that are not a list."""
    odd = {"type": "function", "function": {"name": "f", "parameters": {"required": [["a"]], "properties": []}}}
    for tools, content in [([F_TOOL], f"{B}call_1{A}" + "[" * 1000), ([F_TOOL], f"{B}functions.f:{'1' * 5000} {{}}"),
                           ([odd], f'{B}call_1{A}{{"a": 1}}')]:
        repair = kp.ChoiceRepair(kp.RepairContext.from_request({"tools": tools, "messages": []}))
        repair.feed(content=content)
        repair.finish()
        assert len(repair.sent) == 1
    deep = {"tools": [F_TOOL], "tool_choice": "required", "messages": []}
    repair = kp.ChoiceRepair(kp.RepairContext.from_request(deep))
    repair.feed(content="[" * 1000)
    repair.finish()
    assert kp.repair_completion({"choices": 5}, ctx_for(TOOLS)) == ([], False)
    relay = kp.StreamRepair(ctx_for(TOOLS))
    assert relay.feed(b"[" * 100_000) == [] and relay.close() == [kp.DONE_FRAME]


def test_held_text_stays_bounded() -> None:
    """Blanks after a word that may head a call, whitespace after reasoning, text when tool_choice is
    required: held only while it may still change, and never without a bound."""
    repair = kp.ChoiceRepair(ctx_for([F_TOOL]))
    sent = "".join(e.text for piece in "hi\nfunctions" + " " * 100 for e in repair.feed(content=piece))
    assert len(sent) >= len("hi\nfunctions") + 100 - kp.MAX_LINE_HEADER
    repair = kp.ChoiceRepair(ctx_for([F_TOOL]))
    repair.feed(reasoning="x")
    sent = "".join(e.text for piece in " " * 100 for e in repair.feed(content=piece))
    assert len(sent) >= 100 - kp.LONGEST_MARKER
    repair = kp.ChoiceRepair(kp.RepairContext.from_request({"tools": [F_TOOL], "tool_choice": "required",
                                                            "messages": []}))
    assert [e.text for e in repair.feed(content="Hello")] == ["Hello"]  # cannot be a JSON array of calls


# -- properties ----------------------------------------------------------------------------------------

PIECES = st.sampled_from([
    S, E, B, A, Z, "<|tool_call_section_begin|>", "<|im_end|>", "<|", "<|tool", "<|tool_call_", "|>", "<", ">",
    "functions.exec:0", "call_7", "exec", '{"command": "ls"}', '{"a": [1, {"b": "<|x"}]}', "{", "}", '"', "\\",
    '{"command": "a<|tool_call_end|>b"}', '"x</think>"', " ", "\n", "Hello", "wörld ✓", "</think>", "<think>",
])
TEXTS = st.lists(PIECES, max_size=24).map("".join)
CUTS = st.lists(st.integers(min_value=1, max_value=400), max_size=8)


def feed_in_pieces(text: str, cuts: list[int], channel: str = "content", tools: list = TOOLS) -> tuple[list, list]:
    """(events after each piece, events at the end) of a ChoiceRepair fed text cut at ``cuts``."""
    repair = kp.ChoiceRepair(ctx_for(tools))
    bounds = [0, *sorted(set(c for c in cuts if c < len(text))), len(text)]
    steps = [repair.feed(**{channel: text[a:b]}) for a, b in zip(bounds, bounds[1:]) if b > a]
    return steps, repair.finish()


def merged(events: list) -> tuple:
    text = {"reasoning": "", "content": ""}
    calls: dict[int, list] = {}
    for e in events:
        if isinstance(e, kp.Text):
            text[e.channel] += e.text
        else:
            calls.setdefault(e.index, [None, ""])
            calls[e.index][0] = calls[e.index][0] or (e.id, e.name)
            calls[e.index][1] += e.arguments
    return text["reasoning"], text["content"], calls


@hsettings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS, cuts=CUTS, channel=st.sampled_from(["content", "reasoning"]))
def test_property_chunked_equals_whole_and_nothing_is_taken_back(text: str, cuts: list[int], channel: str) -> None:
    """Any interleaving of markers, fragments, JSON and text: never raises, chunked output equals the
    whole, and every event only adds to what was sent."""
    steps, end = feed_in_pieces(text, [], channel)
    whole = merged([e for s in steps for e in s] + end)
    steps, end = feed_in_pieces(text, cuts, channel)
    assert merged([e for s in steps for e in s] + end) == whole


@hsettings(max_examples=300)
@given(text=st.text(alphabet=st.characters(blacklist_characters="<"), max_size=200), cuts=CUTS)
@example(text="\n", cuts=[])  # found by Hypothesis: leading whitespace waits for a possible <think>
def test_property_text_without_markup_is_untouched_and_held_briefly(text: str, cuts: list[int]) -> None:
    """Text with no "<" goes out as it comes. Held back, briefly, is only what may still be markup: a
    word at the start of a line that may become a call's id ("functions..." when no tools are
    declared), or leading whitespace that a <think> may follow."""
    steps, end = feed_in_pieces(text, cuts, "reasoning", tools=[])
    sent = ""
    bounds = [b for b in sorted(set(c for c in cuts if c < len(text))) + [len(text)] if b > 0]
    for step, fed in zip(steps, bounds):
        sent += "".join(e.text for e in step)
        held = text[len(sent):fed]
        assert text[:fed].startswith(sent)
        opening = not text[:fed].strip() and len(held) < kp.LONGEST_MARKER
        assert not held or opening or "\n" not in held and len(held) <= kp.MAX_LINE_HEADER and (
            held.strip() == "" or "functions".startswith(held.strip()) or held.strip().startswith("functions"))
    assert sent + "".join(e.text for e in end) == text


@hsettings(max_examples=300)
@given(prose=st.lists(st.sampled_from(["Hello ", "a <| b ", "x < y ", "wörld ", "\n", "functions.exec:0 "]),
                      max_size=10).map("".join),
       command=st.text(max_size=20))
@example(prose="", command="<|im_end|>")  # found by Hypothesis: a marker inside a string cut the call
@example(prose="", command='"</think>')
def test_property_text_outside_markup_is_never_lost(prose: str, command: str) -> None:
    args = json.dumps({"command": command})
    text = f"{prose}{S}{B}functions.exec:0{A}{args}{Z}{E}{prose}"
    message = run_whole(ctx_for(TOOLS), {"content": text, "reasoning_content": None, "tool_calls": None,
                                         "finish_reason": "stop"})
    assert message["content"] == prose + prose
    assert [c["arguments"] for c in message["tool_calls"]] == [args]


def test_sse_decoder_split_everywhere_and_oversized_lines() -> None:
    stream = b"data: {\"a\":1}\n\n: comment\n\ndata: {\"b\":2}\r\n\r\ndata: x\ndata: y\n\ndata: [DONE]\n\n"
    for p in range(len(stream)):
        d = kp.SSEDecoder()
        assert d.decode(stream[:p]) + d.decode(stream[p:]) + d.flush() == [b'{"a":1}', b'{"b":2}', b"x\ny", b"[DONE]"]
    d = kp.SSEDecoder(max_line=100)
    events = d.decode(b"data: " + b"x" * 150) + d.decode(b"y" * 200 + b"\n\ndata: {}\n\n")
    assert events == [b"{}"] and d.oversized >= 1
    for chunks, events in [  # a chunk that looks like one whole event of one line, and is not
        ([b"data: x\n", b"data: y\n\n"], [b"x\ny"]),  # the second line of an event
        ([b"data: x", b"data: y\n\n"], [b"xdata: y"]),  # the end of a line begun in the chunk before
        ([b"data: a\r\n\n"], [b"a"]),  # a line that ends in CRLF
        ([b"data: a\n: c\n\n"], [b"a"]),  # an event with a comment line
        ([b": c\n\n"], []),  # a comment alone
        ([b"data: a\nb\n"], []),  # two lines, and the event not ended yet
    ]:
        d = kp.SSEDecoder()
        assert [event for chunk in chunks for event in d.decode(chunk)] == events, chunks
    d = kp.SSEDecoder(max_line=100)  # what follows an oversized line's start is that line, whatever it looks like
    assert d.decode(b"data: " + b"x" * 150) + d.decode(b"data: z\n\n") == [] and d.oversized == 1


# ---------------------------------------------------------------------------------------------------
# The running proxy: Hypercorn's trio worker on a loopback port, in front of the fake SGLang
# ---------------------------------------------------------------------------------------------------

class Running:
    def __init__(self, upstream: FakeSGLang, base: str, app: kp.KimiProxyApp) -> None:
        self.upstream = upstream
        self.base = base
        self.app = app

    def sdk(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="sk-test-secret-123", max_retries=0,
                             timeout=20, **kw)


async def _deadline() -> None:
    await trio.sleep(TEST_TIMEOUT)
    raise TimeoutError(f"test did not finish within {TEST_TIMEOUT} s")


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeSGLang:
    nursery.start_soon(_deadline)
    return await nursery.start(FakeSGLang().serve)


async def start_proxy(nursery: trio.Nursery, upstream_url: str, **overrides: Any) -> Running:
    env = {"SGLANG_API_BASE": upstream_url, "HEARTBEAT_INTERVAL": "0", "REASONING_STORE": store_path(), **overrides}
    app = kp.create_app(kp.Settings.from_env(env))
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(serve, app, config)
    return Running(None, binds[0], app)  # type: ignore[arg-type]


@pytest.fixture
async def proxy(nursery: trio.Nursery, upstream: FakeSGLang) -> Running:
    running = await start_proxy(nursery, upstream.url)
    running.upstream = upstream
    return running


async def logged(caplog: pytest.LogCaptureFixture, words: str) -> list[logging.LogRecord]:
    """The records containing words, waiting for them: the proxy logs a stream's end after the client
    already has the whole response."""
    with trio.move_on_after(10):
        while not any(words in r.getMessage() for r in caplog.records):
            await trio.sleep(0.01)
    return [r for r in caplog.records if words in r.getMessage()]


def sdk_call(fn: Any) -> Any:
    """Run the (synchronous) OpenAI SDK in a worker thread: a real client on real sockets."""
    return trio.to_thread.run_sync(fn)


@pytest.mark.edge
async def test_openai_sdk_stream_and_whole(proxy: Running) -> None:
    proxy.upstream.script(Script(steps=stream_of(reasoning=["Thinking", " hard"], content=["Hel", "lo", "!"])))

    def streamed() -> tuple[str, str, list]:
        stream = proxy.sdk().chat.completions.create(
            model="kimi", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        content, reasoning, usage = "", "", None
        for ev in stream:
            if ev.usage:
                usage = ev.usage
            for ch in ev.choices:
                content += ch.delta.content or ""
                reasoning += getattr(ch.delta, "reasoning_content", None) or ""
        return content, reasoning, usage

    content, reasoning, usage = await sdk_call(streamed)
    assert (content, reasoning) == ("Hello!", "Thinking hard")
    assert usage.total_tokens == USAGE["total_tokens"]

    whole = await sdk_call(lambda: proxy.sdk().chat.completions.create(
        model="kimi", messages=[{"role": "user", "content": "hi"}]))
    assert whole.choices[0].message.content == "Hello!"
    seen = proxy.upstream.seen[-1]
    assert seen.headers["authorization"] == "Bearer sk-test-secret-123"


@pytest.mark.edge
async def test_alias_route_models_and_info(proxy: Running) -> None:
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/api/chat/completions", json={"model": "m", "messages": []})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello!"
        assert proxy.upstream.seen[-1].path == "/v1/chat/completions"
        health = await client.get("/health")
        assert health.status_code == 200
        info = (await client.get("/")).json()
        assert info["name"] == "kimiproxy" and "upstream" not in info  # its address is nobody's business
        assert info["repairs"]["tool_calls"] is True
        missing = await client.get("/nope")
        assert missing.status_code == 404 and "error" in missing.json()
    models = await sdk_call(lambda: proxy.sdk().models.list())
    assert [m.id for m in models.data] == ["kimi-k2-thinking"]


@pytest.mark.edge
async def test_passthrough_streams_other_routes(proxy: Running) -> None:
    body = [b'data: {"choices":[{"text":"a"}]}\n\n', 0.3, b'data: {"choices":[{"text":"b"}]}\n\n', b"data: [DONE]\n\n"]
    proxy.upstream.script(Script(steps=body))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        async with client.stream("POST", "/v1/completions?x=1", json={"prompt": "p", "stream": True}) as r:
            assert r.status_code == 200
            first_at = None
            chunks = []
            async for piece in r.aiter_bytes():
                first_at = first_at or time.monotonic()
                chunks.append(piece)
            assert time.monotonic() - first_at > 0.2  # the first chunk came before the pause
    assert b"".join(chunks) == b"".join(s for s in body if isinstance(s, bytes))
    assert proxy.upstream.seen[-1].path == "/v1/completions?x=1"


@pytest.mark.edge
async def test_stream_is_relayed_live(proxy: Running) -> None:
    """The fake holds its second token until the client has the first: a proxy that buffered would
    never let this test finish."""
    steps = stream_of(content=["one", "two"])
    client_has_one = trio.Event()
    steps.insert(2, client_has_one)
    proxy.upstream.script(Script(steps=steps))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json={"model": "m", "messages": [], "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
            texts = []
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        texts.append(choice["delta"].get("content"))
                        if choice["delta"].get("content") == "one":
                            client_has_one.set()
    assert [t for t in texts if t] == ["one", "two"]


@pytest.mark.edge
async def test_stream_longer_than_quart_response_timeout(proxy: Running) -> None:
    """Quart cuts a response after RESPONSE_TIMEOUT (60 s by default) silently. Made cheap: the
    framework's timeout is lowered to 0.3 s, and a 1.2 s stream still arrives whole."""
    proxy.app.config["RESPONSE_TIMEOUT"] = 0.3
    steps = stream_of(content=[f"t{i} " for i in range(8)])
    proxy.upstream.script(Script(steps=[x for s in steps for x in (s, 0.1)]))
    content = await sdk_call(lambda: "".join(
        ch.delta.content or "" for ev in proxy.sdk().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True) for ch in ev.choices))
    assert content == "".join(f"t{i} " for i in range(8))


@pytest.mark.edge
async def test_heartbeats_during_silent_prefill_and_a_silence_mid_stream(nursery: trio.Nursery,
                                                                         upstream: FakeSGLang) -> None:
    """SGLang sends nothing until its first token: the client gets the headers and keep-alive comments
    meanwhile (the fake stays silent until the client has seen two); and again when it falls silent
    after a token (until the client has seen one more)."""
    running = await start_proxy(nursery, upstream.url, HEARTBEAT_INTERVAL="0.2")
    two_heartbeats, third = trio.Event(), trio.Event()
    role, early, *rest = stream_of(content=["early", "late"])
    upstream.script(Script(steps=[two_heartbeats, role, early, third, *rest]))
    async with httpx.AsyncClient(base_url=running.base) as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json={"model": "m", "messages": [], "stream": True}) as r:
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if lines.count(": keep-alive") == 2:
                    two_heartbeats.set()
                if lines.count(": keep-alive") == 3:
                    third.set()
    shown = [line.strip(": ") if line.startswith(":") else json.loads(line[6:])["choices"][0]["delta"].get("content")
             for line in lines if line.startswith(":") or line.startswith("data: {")]
    assert r.status_code == 200
    assert shown == ["keep-alive", "keep-alive", "", "early", "keep-alive", "late", None], shown  # None: the finish
    assert lines[-2] == "data: [DONE]"


@pytest.mark.edge
async def test_upstream_error_after_headers_becomes_error_event(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    running = await start_proxy(nursery, upstream.url, HEARTBEAT_INTERVAL="0.2")
    upstream.script(Script(status=503, delay=1.0, body={"object": "error", "message": "overloaded", "code": 503}))

    def call() -> Exception:
        try:
            for _ in running.sdk().chat.completions.create(model="m", messages=[], stream=True):
                pass
        except Exception as exc:  # the SDK raises on an error event
            return exc
        raise AssertionError("no error raised")

    exc = await sdk_call(call)
    assert "overloaded" in str(exc)


@pytest.mark.edge
@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_mid_stream_or_during_prefill_closes_upstream(proxy: Running, stream: bool) -> None:
    """The client leaves; the upstream request is closed while SGLang still had 20 s to go (the fake
    records an abort only when its client closes before the response is complete)."""
    if stream:  # tokens flowing, the client leaves after the first one
        proxy.upstream.script(Script(steps=[*stream_of(content=["a"])[:2], *([2.0] * 10)]))
    else:  # silent prefill: nothing written to the client at all
        proxy.upstream.script(Script(body=completion(), delay=20.0, content_type="application/json"))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        with trio.move_on_after(0.5):
            async with client.stream("POST", "/v1/chat/completions",
                                     json={"model": "m", "messages": [], "stream": stream}) as r:
                async for _ in r.aiter_bytes():
                    pass
    with trio.fail_after(10):
        while proxy.upstream.seen[-1].aborted_at is None:
            await trio.sleep(0.02)
    assert not proxy.upstream.seen[-1].completed


async def asgi_stream(proxy: Running, send: Any) -> None:
    """A streamed chat request straight into the ASGI app, with ``send`` as the server's: the client
    never says it left (only a failing ``send`` can show it)."""
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "http_version": "1.1", "scheme": "http"}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await trio.sleep_forever()

    await proxy.app.asgi_app(scope, receive, send)


@pytest.mark.parametrize("pieces", [20, 200])  # fewer than STREAM_QUEUE, and more: the relay waits for room
async def test_frames_that_pile_up_during_a_write_go_out_in_the_next_one(proxy: Running, pieces: int) -> None:
    """A client slower than the model: what the relay has while a body write is under way goes out in
    the next write, whole, not one write per event (a write is an ASGI message and a syscall: a third
    of the CPU per event, benchmark); past STREAM_QUEUE pieces the relay waits, and nothing is lost or
    reordered. The first write waits until the upstream has sent everything."""
    words = [f"w{i} " for i in range(pieces)]
    proxy.upstream.script(Script(steps=stream_of(content=words)))
    bodies: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] != "http.response.body":
            return
        bodies.append(message["body"])
        if len(bodies) == 1:  # the first write is slow: the rest of the stream arrives meanwhile
            while not proxy.upstream.seen[-1].completed:
                await trio.sleep(0.01)
            await trio.sleep(0.5)  # for the relay to read what the upstream sent (a socket read away)

    with trio.fail_after(10):
        await asgi_stream(proxy, send)
    text = b"".join(bodies)
    assert re.findall(rb'"content": ?"(w\d+ )"', text) == [w.encode() for w in words]
    assert text.count(b"data: ") == len(words) + 3 and text.endswith(b"data: [DONE]\n\n")  # role, finish, [DONE]
    if pieces < kp.STREAM_QUEUE:
        assert len(bodies) == 2, [b[:80] for b in bodies]


@pytest.mark.edge
@pytest.mark.parametrize("fails_at", [1, 3])  # the headers' write, or a write of the body under way
async def test_a_write_to_a_client_that_has_gone_is_one_warning(proxy: Running, fails_at: int,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Hypercorn refuses a write once the client has gone (UnexpectedMessageError). When the stream's
    writer task is the one to notice, that is still an ordinary disconnect: one WARNING, no traceback
    and no internal error, counted as a disconnect, the upstream closed."""
    caplog.set_level(logging.DEBUG, logger="kimiproxy")
    # A pause after the first content chunk: the writer writes what piled up in one write, so without it a
    # slow moment could put every chunk in the first body write and leave no third write to fail.
    role_and_a, b_and_c = stream_of(content=["a", "b", "c"])[:2], stream_of(content=["a", "b", "c"])[2:4]
    proxy.upstream.script(Script(steps=[*role_and_a, 1.0, *b_and_c, *([2.0] * 10)]))
    sent = []

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) >= fails_at:
            raise RuntimeError("Unexpected message")  # as hypercorn.utils.UnexpectedMessageError

    with trio.fail_after(10):
        await asgi_stream(proxy, send)
        while proxy.upstream.seen[-1].aborted_at is None:
            await trio.sleep(0.02)
    records = [r for r in caplog.records if r.name == "kimiproxy" and r.levelno >= logging.WARNING]
    assert len(records) == 1 and re.fullmatch(r"POST /v1/chat/completions: client disconnected after [\d.]+s "
                                              r"\(upstream closed, key anonymous\)", records[0].getMessage()), \
        [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING
    assert not any(r.exc_info for r in caplog.records)
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert metrics['kimiproxy_client_disconnects_total{upstream_closed="true"}'] == 1
    assert metrics['kimiproxy_requests_total{route="/v1/chat/completions",status="499"}'] == 1


@contextlib.contextmanager
def full_collections() -> Any:
    """The times of the full (oldest-generation) garbage collections while the block runs."""
    times: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            times.append(time.monotonic())

    gc.callbacks.append(callback)
    try:
        yield times
    finally:
        gc.callbacks.remove(callback)


async def test_collector_runs_when_idle_and_every_n_requests(autojump_clock: trio.testing.MockClock) -> None:
    """Full collections happen once the proxy has been idle a while, never while a request is in
    flight, and after ``every`` requests when it never goes idle (a mock clock: no real waiting)."""
    runs: list[float] = []
    collector = kp.Collector(idle_after=1.0, every=3, collect=lambda: runs.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collector.run)
        collector.begin()
        await trio.sleep(5)
        assert runs == []  # in flight: nothing
        collector.end()
        ended = trio.current_time()
        await trio.sleep(0.5)
        collector.begin()  # busy again before the idle time passed
        await trio.sleep(2)
        assert runs == []
        collector.end()
        await trio.sleep(3)
        assert len(runs) == 1 and runs[0] - ended >= 2.5  # once, a second after the last request ended
        await trio.sleep(10)
        assert len(runs) == 1  # nothing new happened: no more
        collector.begin()  # one long request keeps the proxy busy; three short ones finish meanwhile
        for _ in range(3):
            collector.begin()
            collector.end()
            await trio.sleep(0)
        await trio.sleep(0.1)
        assert len(runs) == 2 and collector.in_flight == 1
        nursery.cancel_scope.cancel()


@pytest.mark.edge
async def test_an_app_in_a_test_process_leaves_the_process_alone(nursery: trio.Nursery,
                                                                 upstream: FakeSGLang) -> None:
    """Process-wide tuning happens only where a server process starts, not when an app is created."""
    before = gc.get_threshold(), gc.get_freeze_count()
    running = await start_proxy(nursery, upstream.url)
    async with httpx.AsyncClient(base_url=running.base) as client:
        assert (await client.get("/health")).status_code == 200
    assert (gc.get_threshold(), gc.get_freeze_count()) == before and running.app.proxy.collector is None


@pytest.mark.edge
async def test_silent_stream_disconnect_without_heartbeats(proxy: Running) -> None:
    """Hypercorn's trio worker can miss a disconnect while nothing is written (hypercorn #210): with
    heartbeats off and a silent upstream, the upstream is still closed."""
    proxy.upstream.script(Script(steps=[20.0, *stream_of(content=["never"])]))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        with trio.move_on_after(0.5):
            async with client.stream("POST", "/v1/chat/completions",
                                     json={"model": "m", "messages": [], "stream": True}) as r:
                await r.aread()
    with trio.fail_after(10):
        while proxy.upstream.seen[-1].aborted_at is None:
            await trio.sleep(0.02)
    assert not proxy.upstream.seen[-1].completed


@pytest.mark.edge
async def test_large_body_forwarded_byte_for_byte(proxy: Running) -> None:
    big = "x" * (20 * 1024 * 1024)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": big}]}).encode()
    async with httpx.AsyncClient(base_url=proxy.base, timeout=20) as client:
        r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert hashlib.sha256(proxy.upstream.seen[-1].body).digest() == hashlib.sha256(body).digest()


@pytest.mark.edge
async def test_body_over_limit_is_413(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    running = await start_proxy(nursery, upstream.url, MAX_BODY_MB="1")
    async with httpx.AsyncClient(base_url=running.base) as client:
        for _ in range(20):  # the client is still sending when the limit is passed: it must get the 413
            r = await client.post("/v1/chat/completions", content=b"x" * (8 * 1024 * 1024))
            assert r.status_code == 413 and "1 MiB" in r.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200  # still serving
    assert upstream.seen == []


@pytest.mark.edge
async def test_bad_requests_get_clear_errors(proxy: Running) -> None:
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        for body, status, words in [
            (b"{not json", 400, "not valid JSON"),
            (b"[1, 2]", 400, "JSON object"),
            (b'{"messages": "hi"}', 400, "messages"),
            (b'{"messages": [], "stream": "yes"}', 400, "stream"),
        ]:
            r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, body
            assert words in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
        r = await client.post("/v1/chat/completions", content=b"a=b",
                              headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415
    assert proxy.upstream.seen == []  # none of them reached the GPU


@pytest.mark.edge
async def test_upstream_down_is_502_and_timeout_504(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down = await start_proxy(nursery, f"http://127.0.0.1:{dead}/v1")
    slow = await start_proxy(nursery, upstream.url, FORWARD_TIMEOUT="0.5")
    upstream.script(Script(body=completion(), delay=5, content_type="application/json"))
    async with httpx.AsyncClient() as client:
        for stream in (False, True):
            r = await client.post(down.base + "/v1/chat/completions", json={"messages": [], "stream": stream})
            assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
        r = await client.post(slow.base + "/v1/chat/completions", json={"messages": []})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        r = await client.get(down.base + "/health")
        assert r.status_code == 200


@pytest.mark.edge
async def test_upstream_4xx_relayed(proxy: Running) -> None:
    proxy.upstream.script(Script(status=400, body={"object": "error", "message": "context too long", "code": 400}),
                          Script(status=400, body={"object": "error", "message": "bad tools", "code": 400}))
    with pytest.raises(openai.BadRequestError, match="context too long"):
        await sdk_call(lambda: proxy.sdk().chat.completions.create(model="m", messages=[]))
    with pytest.raises(openai.BadRequestError, match="bad tools"):
        await sdk_call(lambda: list(proxy.sdk().chat.completions.create(model="m", messages=[], stream=True)))


@pytest.mark.edge
async def test_garbage_sse_skipped_and_stream_without_done(proxy: Running) -> None:
    steps = [sse(chunk({"role": "assistant", "content": ""})), b"data: not json at all\n\n",
             b"data: \xff\xfe{bad utf8\n\n", sse(chunk({"content": "ok"})), sse(chunk({}, finish="stop"))]
    proxy.upstream.script(Script(steps=steps))  # and no [DONE]
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
    events = frames_to_events([r.content])
    assert accumulate(events)["content"] == "ok"  # [DONE] was added
    assert b"not json" not in r.content and b"\xff" not in r.content


@pytest.mark.edge
async def test_headers_forwarded_and_secrets_never_logged(nursery: trio.Nursery, upstream: FakeSGLang,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kimiproxy")
    running = await start_proxy(nursery, upstream.url, LOG_LEVEL="DEBUG")
    async with httpx.AsyncClient(base_url=running.base) as client:
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": []},
                              headers={"Authorization": "Bearer sk-very-secret", "api-key": "k-secret-2",
                                       "Cookie": "session=s3cr3t", "X-Request-ID": "req-42",
                                       "Keep-Alive": "timeout=99", "Proxy-Connection": "keep-alive",
                                       "TE": "trailers", "Trailer": "X-Sum", "X-Custom": "kept"})
    assert r.headers["x-request-id"] == "req-42"
    seen = upstream.seen[-1].headers
    assert seen["authorization"] == "Bearer sk-very-secret" and seen["x-custom"] == "kept"
    for hop in ("keep-alive", "proxy-connection", "te", "trailer"):  # hop-by-hop: the client's stay with us
        assert hop not in seen, hop
    text = caplog.text
    for secret in ("sk-very-secret", "k-secret-2", "s3cr3t"):
        assert secret not in text
    assert "[redacted]" in text
    ours = [rec for rec in caplog.records if rec.name == "kimiproxy" and "chat/completions" in rec.getMessage()]
    assert ours and all(getattr(rec, "request_id", None) == "req-42" for rec in ours)


@pytest.mark.edge
async def test_a_streamed_and_a_whole_response_log_the_same_final_message(
        proxy: Running, caplog: pytest.LogCaptureFixture) -> None:
    """One line per choice, the same line for the same message whichever way it came: here a call leaked
    into the reasoning, repaired in both."""
    caplog.set_level(logging.INFO, logger="kimiproxy")
    leak = f'Let me look.{S}{B}functions.read_file:0{A}{{"path": "a.py"}}{Z}{E}'
    proxy.upstream.script(Script(steps=stream_of(reasoning=[leak[:20], leak[20:]], content=["Hi"], finish="tool_calls")),
                          Script(body=completion(content="Hi", reasoning=leak, finish="tool_calls"),
                                 content_type="application/json"))
    lines = []
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        for stream in (True, False):
            caplog.clear()
            r = await client.post("/v1/chat/completions", json={"messages": [], "stream": stream, "tools": TOOLS})
            assert r.status_code == 200
            lines += [r.getMessage() for r in await logged(caplog, "final message")]
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert '"content": "Hi"' in lines[0] and '"finish_reason": "tool_calls"' in lines[0]
    assert '"name": "read_file", "arguments": "{\\"path\\": \\"a.py\\"}"' in lines[0]
    assert '"total_tokens": 20' in lines[0]


# -- the repair through the running proxy, with the OpenAI SDK -------------------------------------------

def _sdk_message(sdk: openai.OpenAI, case: dict, stream: bool, **extra: Any) -> dict:
    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": f"functions.x:{i}", "type": "function", "function": {"name": "x", "arguments": "{}"}}]}
        for i in range(case["history_tool_calls"])]
    kwargs = dict(model="kimi", messages=[{"role": "user", "content": "go"}, *history],
                  tools=case["request_tools"] or openai.NOT_GIVEN, **extra)
    if not stream:
        r = sdk.chat.completions.create(**kwargs)
        m = r.choices[0].message
        return {"content": m.content or "", "reasoning": getattr(m, "reasoning_content", None) or "",
                "tool_calls": [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                               for t in m.tool_calls or []], "finish_reason": r.choices[0].finish_reason}
    content, reasoning, calls, finish = "", "", {}, None
    for ev in sdk.chat.completions.create(stream=True, **kwargs):
        for ch in ev.choices:
            content += ch.delta.content or ""
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                entry["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return {"content": content, "reasoning": reasoning, "tool_calls": [calls[i] for i in sorted(calls)],
            "finish_reason": finish}


@pytest.mark.edge
async def test_corpus_end_to_end_with_openai_sdk(proxy: Running) -> None:
    """Every case through the running proxy with the OpenAI SDK: streamed (reasoning in 7-character
    deltas, content in 5) and whole; both must give the expected, and the same, calls."""
    def pieces(text: str | None, size: int) -> list[str]:
        return [text[i:i + size] for i in range(0, len(text), size)] if text else []

    for case in CASES:
        up = case["upstream"]
        calls = [{"index": i, "id": t["id"], "type": "function",
                  "function": {"name": t["name"], "arguments": t["arguments"]}}
                 for i, t in enumerate(up.get("tool_calls") or [])]
        proxy.upstream.script(
            Script(steps=stream_of(reasoning=pieces(up.get("reasoning_content"), 7),
                                   content=pieces(up.get("content"), 5),
                                   finish=up["finish_reason"], tool_calls=calls)),
            Script(body=completion(up.get("content"), up.get("reasoning_content"), up["finish_reason"],
                                   calls or None), content_type="application/json"))
        streamed = await sdk_call(lambda: _sdk_message(proxy.sdk(), case, True))
        whole = await sdk_call(lambda: _sdk_message(proxy.sdk(), case, False))
        check_expected(case, streamed)
        check_expected(case, whole)
        assert streamed["tool_calls"] == whole["tool_calls"], case["name"]
        assert norm(streamed["content"]) == norm(whole["content"])


@pytest.mark.edge
async def test_history_rewrite_reaches_upstream_only(proxy: Running) -> None:
    proxy.upstream.script(Script(body=completion(), content_type="application/json"))
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_f00", "type": "function", "function": {"name": "exec", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_f00", "content": "done"}]
    await sdk_call(lambda: proxy.sdk().chat.completions.create(model="m", messages=messages))
    sent = proxy.upstream.seen[-1].json()["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "functions.exec:0" and sent[2]["tool_call_id"] == "functions.exec:0"


@pytest.mark.edge
async def test_repair_switch_off_end_to_end(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    running = await start_proxy(nursery, upstream.url, ENABLE_STREAMING_TOOL_PARSER="false")
    raw = CASES[0]["upstream"]["reasoning_content"]
    steps = stream_of(reasoning=[raw])
    upstream.script(Script(steps=steps))
    async with httpx.AsyncClient(base_url=running.base) as client:
        r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
        info = (await client.get("/")).json()
    assert r.content == b"".join(steps)
    assert info["repairs"]["tool_calls"] is False


@pytest.mark.edge
async def test_each_repair_logged_with_request_id(proxy: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kimiproxy")
    case = next(c for c in CASES if c["name"] == "content_no_prefix_id")
    proxy.upstream.script(Script(steps=stream_of(content=[case["upstream"]["content"]])))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        await client.post("/v1/chat/completions", json={"messages": [], "stream": True, "tools": case["request_tools"]},
                          headers={"x-request-id": "rid-7"})
    lines = await logged(caplog, "repair: recovered")
    assert len(lines) == 1 and lines[0].request_id == "rid-7"
    assert "from content" in lines[0].getMessage() and "id-rewritten" in lines[0].getMessage()


@pytest.mark.edge
async def test_sglang_with_a_tool_parser_is_warned_about(nursery: trio.Nursery,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """SGLang reports its flags: with --tool-call-parser kimiproxy warns once (log, /), with the fix,
    and /health?upstream=1 shows the parsers. An upstream that is not SGLang is fine."""
    caplog.set_level(logging.WARNING, logger="kimiproxy")
    with_parser = await nursery.start(FakeSGLang(server_info={**SERVER_INFO, "tool_call_parser": "kimi_k2"}).serve)
    not_sglang = await nursery.start(FakeSGLang(server_info=None).serve)
    warned = await start_proxy(nursery, with_parser.url)
    plain = await start_proxy(nursery, not_sglang.url)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            while (info := (await client.get(warned.base + "/")).json())["upstream_parsers"] is None:
                await trio.sleep(0.02)
        assert info["upstream_parsers"] == {"tool_call_parser": "kimi_k2", "reasoning_parser": "kimi_k2"}
        assert "without --tool-call-parser" in info["warning"]
        health = (await client.get(warned.base + "/health?upstream=1")).json()
        assert health["parsers"]["tool_call_parser"] == "kimi_k2" and "without --tool-call-parser" in health["warning"]
        plain_info = (await client.get(plain.base + "/")).json()
        plain_health = await client.get(plain.base + "/health?upstream=1")
    assert plain_info["upstream_parsers"] is None and plain_info["warning"] is None
    assert plain_health.status_code == 200 and plain_health.json()["parsers"] is None
    assert [r.getMessage() for r in caplog.records].count(kp.parser_warning({"tool_call_parser": "kimi_k2"})) == 1


@pytest.mark.edge
async def test_passthrough_relays_upstream_errors_untouched(proxy: Running) -> None:
    body = b'{"detail":"embeddings are not enabled"}'
    proxy.upstream.script(Script(status=404, body=body, content_type="application/json"))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/v1/embeddings", json={"input": "x"})
    assert (r.status_code, r.content) == (404, body)


@pytest.mark.edge
async def test_done_ends_the_response_without_waiting_for_the_upstream(proxy: Running) -> None:
    """The client has its whole stream at [DONE] even while the upstream connection is still open, and
    leaving then is not a disconnect."""
    upstream_may_end = trio.Event()
    proxy.upstream.script(Script(steps=[*stream_of(content=["a"]), upstream_may_end]))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
        assert r.content.endswith(b"data: [DONE]\n\n") and not proxy.upstream.seen[-1].completed
        upstream_may_end.set()
        with trio.fail_after(10):
            while not proxy.upstream.seen[-1].completed:
                await trio.sleep(0.02)
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert metrics['kimiproxy_requests_total{route="/v1/chat/completions",status="200"}'] == 1
    assert not any(k.startswith("kimiproxy_client_disconnects_total") for k in metrics)


FORCED_ARRAY = '[{"name": "read_file", "parameters": {"path": "a.py"}}, {"name": "exec", "parameters": {"command": "ls"}}]'


@pytest.mark.edge
@pytest.mark.parametrize("text,last", [
    (FORCED_ARRAY, {"command": "ls"}),
    (FORCED_ARRAY + "<|im_end|>", {"command": "ls"}),  # a control token leaked after it (issue 16.7)
    (FORCED_ARRAY[:-5], {"command": "l"}),  # cut by max_tokens: ... "command": "l
    (FORCED_ARRAY + " Done.", {"command": "ls"}),  # text after it stays text
], ids=["whole-array", "control-token-after", "cut-off", "text-after"])
async def test_tool_choice_required_without_sglangs_tool_parser(proxy: Running, text: str, last: dict) -> None:
    """SGLang's grammar for tool_choice "required" makes the model write a JSON array of calls; without
    --tool-call-parser it arrives as content, and the client gets tool calls, streamed and whole, also
    when a control token follows the array or max_tokens cut it: never raw JSON in the answer."""
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    proxy.upstream.script(Script(steps=stream_of(reasoning=["Must call."], content=pieces)),
                          Script(body=completion(text, "Must call."), content_type="application/json"))
    for stream in (True, False):
        message = await sdk_call(lambda: _sdk_message(proxy.sdk(), {"history_tool_calls": 1, "request_tools": TOOLS},
                                                      stream, tool_choice="required"))
        assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in message["tool_calls"]] == [
            ("functions.read_file:1", "read_file", {"path": "a.py"}), ("functions.exec:2", "exec", last)], stream
        assert (message["content"].strip(), message["finish_reason"]) == ("Done." if text.endswith("Done.") else "",
                                                                          "tool_calls")


@pytest.mark.edge
async def test_lone_surrogate_in_the_history_is_forwarded(proxy: Running) -> None:
    """A JavaScript client cut a tool result mid-emoji: the history rewrite must not turn that into a 500."""
    body = ('{"messages": [{"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", '
            '"function": {"name": "exec", "arguments": "{}"}}]}, '
            '{"role": "tool", "tool_call_id": "call_1", "content": "half \\ud83d"}]}').encode()
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    sent = proxy.upstream.seen[-1].json()["messages"]
    assert sent[1]["tool_call_id"] == "functions.exec:0" and sent[1]["content"] == "half \ud83d"


# ---------------------------------------------------------------------------------------------------
# Configuration and the README's commands
# ---------------------------------------------------------------------------------------------------

def test_settings_from_env_and_bad_values() -> None:
    s = kp.Settings.from_env({"SGLANG_API_BASE": "http://gpu:30000/v1/", "FORWARD_TIMEOUT": "90",
                              "ENABLE_STREAMING_TOOL_PARSER": "false", "MAX_BODY_MB": "128"})
    assert (s.upstream, s.forward_timeout, s.repair, s.max_body_bytes) == ("http://gpu:30000/v1", 90.0, False,
                                                                            128 * 1024 * 1024)
    for env, words in [({"FORWARD_TIMEOUT": "soon"}, "not a number"), ({"SGLANG_API_BASE": "gpu:30000"}, "http"),
                       ({"ENABLE_FILE_LOGGING": "maybe"}, "boolean"), ({"PROXY_PORT": "99999"}, "port")]:
        with pytest.raises(kp.ConfigError, match=words):
            kp.Settings.from_env(env)


def test_every_setting_is_in_env_example_and_readme() -> None:
    """The variables Settings reads, .env.example sets and the README's table lists are the same, and
    .env.example, read as it is, gives the defaults."""
    read = set(re.findall(r'\b(?:text|number|flag)\("([A-Z_]+)"', Path(kp.__file__).read_text()))
    read |= set(re.findall(r'env\.get\("([A-Z_]+)"', Path(kp.__file__).read_text()))
    example = kp.read_dotenv([HERE / ".env.example"])
    readme = Path(HERE / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("##", readme.index("## Configuration") + 3)]
    listed = {name for row in table.splitlines() if row.startswith("| `")
              for name in re.findall(r"`([A-Z][A-Z_]+)`", row.split("|")[1])}
    assert read == set(example) == listed, (read ^ set(example), read ^ listed)
    assert kp.Settings.from_env(example) == kp.Settings()


def test_dotenv_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text('# comment\nexport SGLANG_API_BASE="http://box:30000/v1"\nLOG_LEVEL=DEBUG # inline\n')
    assert kp.read_dotenv([tmp_path / "missing", env_file]) == {"SGLANG_API_BASE": "http://box:30000/v1",
                                                                 "LOG_LEVEL": "DEBUG"}


def test_log_file_rotates_by_size(tmp_path: Path) -> None:
    settings = kp.Settings.from_env({"LOG_FILE": str(tmp_path / "kp.log"), "LOG_MAX_BYTES": "2048",
                                     "LOG_BACKUPS": "2"})
    handler = kp.file_handler(settings)
    logger = logging.getLogger("kimiproxy.rotation-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(200):
            logger.warning("line %d %s", i, "x" * 50)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["kp.log", "kp.log.1", "kp.log.2"]
    assert all((tmp_path / f).stat().st_size <= 2048 for f in files)
    assert "line 199" in (tmp_path / "kp.log").read_text()
    assert all((tmp_path / f).stat().st_mode & 0o077 == 0 for f in files)  # previews of prompts: the owner's


def test_the_log_file_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "kp.log").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(kp.ConfigError, match="LOG_FILE=.* cannot be opened"):
        kp.file_handler(kp.Settings.from_env({"LOG_FILE": str(tmp_path / "kp.log")}))
    assert not (tmp_path / "elsewhere").exists()


_PORTS_GIVEN: set[int] = set()


def _free_port() -> int:
    """A port nobody listens on that this run has not given out before: the kernel may give the same free
    port to two scenarios that start side by side, and the second one's health check would then reach
    the first one's proxy (seen once in 16 runs: "cannot listen on 127.0.0.1:35223: Address already in use")."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def _run(cmd: list[str], env: dict[str, str], timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=HERE, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.edge
def test_bad_configuration_stops_with_one_line() -> None:
    r = _run([sys.executable, "kimiproxy.py"], {"FORWARD_TIMEOUT": "soon"})
    assert r.returncode == 1
    assert r.stderr.strip() == "kimiproxy: bad configuration: FORWARD_TIMEOUT='soon' is not a number"
    # Under hypercorn the worker stops; the exit status is Hypercorn's own: 0.18's supervisor returns 0
    # even when its worker fails (run.py joins the dead worker twice), so only the message is ours.
    r = _run([sys.executable, "-m", "hypercorn", "kimiproxy:app", "-k", "trio", "-b", "127.0.0.1:0"],
             {"SGLANG_API_BASE": "gpu:30000"})
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("kimiproxy: bad configuration: SGLANG_API_BASE='gpu:30000' must be an "
                                     "http:// or https:// URL, like http://127.0.0.1:30000/v1")


@pytest.mark.slow
@pytest.mark.edge
def test_an_address_it_cannot_listen_on_is_one_line_and_the_bind_warning_counts_the_files_keys(tmp_path: Path) -> None:
    """A port in use, or an address that is not this machine's (192.0.2.1, a documentation address: the
    bind fails, nothing is sent), stops start-up with one line; binding beyond loopback without keys
    warns, but not when the configuration file holds the keys."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _run([sys.executable, "kimiproxy.py", "--host", "127.0.0.1", "--port", str(port)], {})
    assert r.returncode == 1 and r.stderr == f"kimiproxy: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    keyed = tmp_path / "keyed.json"
    upstreams = {"main": {"url": "http://127.0.0.1:9/v1", "models": ["kimi-k2-thinking"]}}
    keyed.write_text(json.dumps({"upstreams": upstreams, "keys": {"alice": "key-alice-1"}}))
    for config, warned in ((None, True), (keyed, False)):
        args = ["--host", "192.0.2.1", "--port", str(_free_port())] + (["--config", str(keyed)] if config else [])
        r = _run([sys.executable, "kimiproxy.py", *args], {})
        lines = r.stderr.splitlines()
        assert r.returncode == 1 and lines[-1].startswith("kimiproxy: cannot listen on 192.0.2.1:"), r.stderr
        assert ("binding 192.0.2.1 without PROXY_API_KEY" in r.stderr) is warned and len(lines) == 1 + warned, r.stderr


@pytest.mark.slow
@pytest.mark.edge
def test_asyncio_worker_refused_with_hint() -> None:
    """Without -k trio the worker stops at start-up (the run would time out if it kept serving)."""
    r = _run([sys.executable, "-m", "hypercorn", "kimiproxy:app", "-b", f"127.0.0.1:{_free_port()}"], {})
    assert "Traceback" not in r.stderr
    assert "kimiproxy needs Hypercorn's trio worker: run `hypercorn kimiproxy:app -k trio`" in r.stderr


@pytest.mark.edge
@pytest.mark.slow
async def test_readme_commands_serve_a_real_stream(upstream: FakeSGLang) -> None:
    """`hypercorn kimiproxy:app -k trio` and `python kimiproxy.py`, as the README runs them."""
    case = CASES[0]
    for args in (HYPERCORN_ARGS, PYTHON_ARGS):
        async with proxy_process(args, {"SGLANG_API_BASE": upstream.url}) as (base, _):
            upstream.script(Script(steps=stream_of(reasoning=[case["upstream"]["reasoning_content"]])))
            async with httpx.AsyncClient(base_url=base) as client:
                r = await client.post("/v1/chat/completions", json={
                    "messages": [], "stream": True, "tools": case["request_tools"]})
            check_expected(case, accumulate(frames_to_events([r.content])))


# ---------------------------------------------------------------------------------------------------
# Running in the open: access control, metrics, health, restarts, several workers
# ---------------------------------------------------------------------------------------------------

@pytest.mark.edge
async def test_api_keys_required_and_never_leaked(nursery: trio.Nursery, upstream: FakeSGLang,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kimiproxy")
    running = await start_proxy(nursery, upstream.url, PROXY_API_KEY="key-one-111, key-two-222",
                                UPSTREAM_API_KEY="upstream-key-333", LOG_LEVEL="DEBUG")
    async with httpx.AsyncClient(base_url=running.base) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-two-222"}):
            r = await client.post("/v1/chat/completions", json={"messages": []}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert "key-" not in r.text
        r = await client.get("/v1/models")
        assert r.status_code == 401
        r = await client.post("/api/chat/completions", json={"messages": []},
                              headers={"Authorization": "Bearer key-two-222"})
        assert r.status_code == 200
        assert (await client.get("/health")).status_code == 200
        metrics = (await client.get("/metrics")).text
        info = (await client.get("/")).json()
    assert len(upstream.seen) == 1 and upstream.seen[0].headers["authorization"] == "Bearer upstream-key-333"
    assert info["auth"] is True
    with pytest.raises(openai.AuthenticationError):
        await sdk_call(lambda: running.sdk().chat.completions.create(model="m", messages=[]))
    ok = openai.OpenAI(base_url=running.base + "/v1", api_key="key-one-111", max_retries=0)
    assert (await sdk_call(lambda: ok.chat.completions.create(model="m", messages=[]))).choices
    for secret in ("key-one-111", "key-two-222", "upstream-key-333"):
        assert secret not in caplog.text and secret not in metrics
        assert secret not in repr(running.app.settings)
    assert 'kimiproxy_requests_total{route="/v1/chat/completions",status="401"} 3' in metrics


def test_exposure_warning_without_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kimiproxy")
    kp.Proxy(kp.Settings()).authorise({"server": ("192.0.2.10", 8000), "headers": []})
    assert "without PROXY_API_KEY" in caplog.text
    caplog.clear()
    kp.Proxy(kp.Settings()).authorise({"server": ("127.0.0.1", 8000), "headers": []})
    keyed = kp.Proxy(kp.Settings(api_keys=(("team", "k"),)))
    keyed.authorise({"server": ("192.0.2.10", 8000), "headers": [(b"authorization", b"Bearer k")]})
    with pytest.raises(kp.ClientError):
        keyed.authorise({"server": ("192.0.2.10", 8000), "headers": []})
    assert "without PROXY_API_KEY" not in caplog.text


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.mark.edge
async def test_metrics_count_what_happened(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    running = await start_proxy(nursery, upstream.url)
    case = CASES[0]
    upstream.script(Script(steps=stream_of(reasoning=[case["upstream"]["reasoning_content"]])),
                    Script(body=completion(), content_type="application/json"),
                    Script(steps=[*stream_of(content=["a"])[:2], 10.0]))
    async with httpx.AsyncClient(base_url=running.base) as client:
        await client.post("/v1/chat/completions", json={"messages": [], "stream": True, "tools": case["request_tools"]})
        await client.post("/v1/chat/completions", json={"messages": []})
        with trio.move_on_after(0.5):
            async with client.stream("POST", "/v1/chat/completions", json={"messages": [], "stream": True}) as r:
                async for _ in r.aiter_bytes():
                    pass
        with trio.fail_after(10):
            while upstream.seen[-1].aborted_at is None:
                await trio.sleep(0.02)
        await trio.sleep(0.1)
        text = (await client.get("/metrics")).text
    m = parse_metrics(text)
    assert m['kimiproxy_requests_total{route="/v1/chat/completions",status="200"}'] == 2
    assert m['kimiproxy_requests_total{route="/v1/chat/completions",status="499"}'] == 1
    assert m['kimiproxy_client_disconnects_total{upstream_closed="true"}'] == 1
    assert m['kimiproxy_tool_calls_recovered_total{channel="reasoning_content"}'] == 1
    assert m['kimiproxy_streams_in_flight'] == 0
    assert m['kimiproxy_request_duration_seconds_count{route="/v1/chat/completions"}'] == 3
    assert m['kimiproxy_upstream_first_byte_seconds_count'] == 3
    assert "# TYPE kimiproxy_request_duration_seconds histogram" in text


@pytest.mark.edge
async def test_metrics_upstream_errors_and_health(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down = await start_proxy(nursery, f"http://127.0.0.1:{dead}/v1")
    up = await start_proxy(nursery, upstream.url)
    upstream.script(Script(status=500, body={"object": "error", "message": "boom", "code": 500}))
    async with httpx.AsyncClient() as client:
        await client.post(down.base + "/v1/chat/completions", json={"messages": []})
        await client.post(up.base + "/v1/chat/completions", json={"messages": []})
        assert (await client.get(down.base + "/health?upstream=1")).status_code == 503
        healthy = await client.get(up.base + "/health?upstream=1")
        assert healthy.status_code == 200 and healthy.json()["upstream"] == "ok"
        m_down = parse_metrics((await client.get(down.base + "/metrics")).text)
        m_up = parse_metrics((await client.get(up.base + "/metrics")).text)
    assert m_down['kimiproxy_upstream_errors_total{kind="connect",status="502"}'] == 1
    assert m_up['kimiproxy_upstream_errors_total{kind="http",status="500"}'] == 1


@contextlib.asynccontextmanager
async def proxy_process(args: list[str], env: dict[str, str]) -> Any:
    """kimiproxy as its own process, in its own process group (args: after the interpreter, "{port}"
    filled in), healthy, on a free port; yields (base URL, process) and kills the group if a test left
    it running. Its stderr goes to ``proc.log``."""
    port = _free_port()
    log_file = tempfile.TemporaryFile()
    proc = await trio.lowlevel.open_process(
        [sys.executable, *[a.format(port=port) for a in args]], cwd=HERE, stdout=subprocess.DEVNULL,
        stderr=log_file, env={**os.environ, "REASONING_STORE": store_path(), **env}, start_new_session=True)
    proc.log = log_file  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            with trio.fail_after(PROCESS_START_LIMIT):
                while True:
                    assert proc.returncode is None, "proxy exited at start-up"
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await trio.sleep(0.05)
        yield base, proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log_file.close()


HYPERCORN_ARGS = ["-m", "hypercorn", "kimiproxy:app", "-k", "trio", "-b", "127.0.0.1:{port}"]
PYTHON_ARGS = ["kimiproxy.py", "--host", "127.0.0.1", "--port", "{port}"]


def hypercorn_worker(supervisor: int) -> int:
    """The worker process Hypercorn's supervisor spawned (not multiprocessing's resource tracker)."""
    children = [int(pid) for task in Path(f"/proc/{supervisor}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return next(pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes())


# Every way a user stops kimiproxy: (runner, who gets the signal, the signal). "group" is the whole
# process group: systemd's default KillMode=control-group, `kill -TERM -- -PGID`, `timeout`, Ctrl-C.
STOPS = [
    ("hypercorn", "supervisor", signal.SIGTERM),  # docker stop
    ("hypercorn", "group", signal.SIGTERM),
    ("hypercorn", "group", signal.SIGINT),
    ("hypercorn", "worker", signal.SIGTERM),
    ("python", "process", signal.SIGTERM),
    ("python", "group", signal.SIGTERM),
    ("python", "group", signal.SIGINT),
]


async def stop_during_a_stream(runner: str, whom: str, signum: int, grace: float) -> str:
    """Start kimiproxy, stream through it, stop it while the stream runs, and let the upstream go on
    (after a pause: the signal must have arrived) for 1 s of tokens when ``grace`` allows it, else
    for 20 s. Returns what went wrong ("" if nothing)."""
    problems = []
    args = (HYPERCORN_ARGS + ["--graceful-timeout", f"{grace:g}"]) if runner == "hypercorn" else PYTHON_ARGS
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(FakeSGLang().serve)
        signalled = trio.Event()
        steps = stream_of(content=[f"w{i} " for i in range(6)])
        rest = [x for s in steps[2:] for x in (s, 0.15)] if grace > 2 else [20.0, *steps[2:]]
        fake.script(Script(steps=[*steps[:2], signalled, *rest]))
        async with proxy_process(args, {"SGLANG_API_BASE": fake.url, "SHUTDOWN_GRACE": str(grace)}) as (base, proc):
            target = {"worker": hypercorn_worker(proc.pid) if whom == "worker" else None}.get(whom, proc.pid)
            got = []
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                with contextlib.suppress(httpx.HTTPError):  # a stream cut short breaks the body
                    async with client.stream("POST", "/v1/chat/completions",
                                             json={"messages": [], "stream": True}) as r:
                        async for line in r.aiter_lines():
                            got.append(line)
                            if "w0" in line:
                                (os.killpg if whom == "group" else os.kill)(target, signum)
                                await trio.sleep(0.5)  # the signal is handled before the stream goes on
                                signalled.set()
            with trio.fail_after(PROCESS_START_LIMIT):  # a hang guard: this normally takes a second
                await proc.wait()
            proc.log.seek(0)
            stderr = proc.log.read().decode(errors="replace")[-800:]
        complete = "data: [DONE]" in got and "w5" in "".join(got)
        if proc.returncode != 0:
            problems.append(f"exit status {proc.returncode}")
        if grace > 2 and not (complete and fake.seen[-1].completed):
            problems.append(f"stream cut short: {got[-3:]}")
        if grace <= 2 and not (fake.seen[-1].aborted_at and not fake.seen[-1].completed):
            problems.append("upstream not closed after the grace")
        nursery.cancel_scope.cancel()
    return "; ".join(problems) + (f" | stderr: {stderr}" if problems else "")


@pytest.mark.slow
@pytest.mark.edge
async def test_every_way_of_stopping_lets_streams_finish() -> None:
    """SIGTERM or SIGINT, to the supervisor, the worker or the whole process group, under Hypercorn or
    python kimiproxy.py: in-flight streams finish within the grace, then the process exits 0. (The
    scenarios run side by side, each with its own fake SGLang and process group.)"""
    outcomes: dict[tuple, str] = {}

    async def one(stop: tuple) -> None:
        outcomes[stop] = await stop_during_a_stream(*stop, grace=10)

    async with trio.open_nursery() as nursery:
        for stop in STOPS:
            nursery.start_soon(one, stop)
    assert {stop: problem for stop, problem in outcomes.items() if problem} == {}


@pytest.mark.slow
@pytest.mark.edge
async def test_past_the_grace_streams_are_cut_and_upstreams_closed() -> None:
    """A stream longer than the grace is cancelled, its upstream request closed (SGLang stops
    generating), and the process still exits 0."""
    outcomes: dict[tuple, str] = {}

    async def one(stop: tuple) -> None:
        outcomes[stop] = await stop_during_a_stream(*stop, grace=1)

    async with trio.open_nursery() as nursery:
        for stop in [("hypercorn", "group", signal.SIGTERM), ("python", "process", signal.SIGTERM)]:
            nursery.start_soon(one, stop)
    assert {stop: problem for stop, problem in outcomes.items() if problem} == {}


@pytest.mark.edge
@pytest.mark.slow
async def test_several_hypercorn_workers(upstream: FakeSGLang) -> None:
    async with proxy_process(HYPERCORN_ARGS + ["-w", "2"], {"SGLANG_API_BASE": upstream.url}) as (base, _):
        results = []

        async def one(i: int) -> None:
            async with httpx.AsyncClient(base_url=base) as client:
                r = await client.post("/v1/chat/completions", json={"messages": [], "stream": i % 2 == 0})
                results.append(r.status_code == 200 and b"Hel" in r.content)

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, i)
        assert results == [True] * 20


# ---------------------------------------------------------------------------------------------------
# Hostile and broken input: a clear error or a clean pass-through, and the proxy keeps serving
# ---------------------------------------------------------------------------------------------------

@pytest.mark.edge
async def test_half_body_then_stall_is_408(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    running = await start_proxy(nursery, upstream.url, BODY_TIMEOUT="0.5")
    host, port = running.base.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          b"content-length: 1000\r\n\r\n{\"messages\": [")
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    await stream.aclose()
    assert data.startswith(b"HTTP/1.1 408") and b"BODY_TIMEOUT" in data
    assert upstream.seen == []
    async with httpx.AsyncClient(base_url=running.base) as client:
        assert (await client.post("/v1/chat/completions", json={"messages": []})).status_code == 200


@pytest.mark.edge
@pytest.mark.slow
async def test_thousands_of_idle_connections(proxy: Running) -> None:
    host, port = proxy.base.removeprefix("http://").split(":")
    idle = []
    for _ in range(1500):
        idle.append(await trio.open_tcp_stream(host, int(port)))
    try:
        async with httpx.AsyncClient(base_url=proxy.base) as client:
            r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
            assert r.status_code == 200 and b"[DONE]" in r.content
    finally:
        for s in idle:
            await s.aclose()


@pytest.mark.edge
async def test_upstream_huge_line_is_dropped_memory_bounded(proxy: Running) -> None:
    huge = b"data: {\"x\": \"" + b"y" * (20 * 1024 * 1024) + b"\"}\n\n"
    steps = stream_of(content=["before", "after"])
    proxy.upstream.script(Script(steps=[steps[0], steps[1], huge, *steps[2:]]))
    async with httpx.AsyncClient(base_url=proxy.base, timeout=20) as client:
        r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
    assert len(r.content) < 100_000
    assert accumulate(frames_to_events([r.content]))["content"] == "beforeafter"


@pytest.mark.edge
async def test_upstream_events_split_at_every_byte(proxy: Running) -> None:
    case = next(c for c in CASES if c["name"] == "reasoning_three_concatenated")
    body = b"".join(stream_of(reasoning=[case["upstream"]["reasoning_content"]]))
    proxy.upstream.script(Script(steps=[body[i:i + 1] for i in range(len(body))]))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True,
                                                              "tools": case["request_tools"]})
    check_expected(case, accumulate(frames_to_events([r.content])))


@pytest.mark.edge
async def test_upstream_without_finish_chunk_or_done(proxy: Running) -> None:
    case = CASES[0]
    steps = [sse(chunk({"role": "assistant", "content": ""})),
             sse(chunk({"reasoning_content": case["upstream"]["reasoning_content"]}))]
    proxy.upstream.script(Script(steps=steps))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True,
                                                              "tools": case["request_tools"]})
    check_expected(case, accumulate(frames_to_events([r.content])))


@pytest.mark.edge
async def test_upstream_not_sse_and_connection_dropped(proxy: Running) -> None:
    proxy.upstream.script(Script(body=completion(), content_type="application/json"))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
        assert r.status_code == 502 and "without an event stream" in r.json()["error"]["message"]
        proxy.upstream.script(Script(steps=[*stream_of(content=["partial"])[:2], "close"]))
        r = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
        events = frames_to_events([r.content])
        assert "partial" in r.text and "error" in events[-1] and "broke off" in events[-1]["error"]["message"]
        assert (await client.get("/health")).status_code == 200


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
HOSTILE_CALLS = st.lists(st.fixed_dictionaries({
    "index": st.one_of(st.integers(0, 3), JSON_VALUES), "id": JSON_VALUES,
    "function": st.one_of(JSON_VALUES, st.fixed_dictionaries({"name": JSON_VALUES, "arguments": JSON_VALUES})),
}), max_size=2)
HOSTILE_DELTAS = st.one_of(JSON_VALUES, st.fixed_dictionaries({
    "content": st.one_of(st.none(), TEXTS, JSON_VALUES),
    "reasoning_content": st.one_of(st.none(), TEXTS),
    "tool_calls": st.one_of(st.none(), JSON_VALUES, HOSTILE_CALLS),
}))
HOSTILE_CHOICES = st.lists(st.fixed_dictionaries({
    "index": st.one_of(st.integers(0, 2), JSON_VALUES),
    "delta": HOSTILE_DELTAS,
    "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "tool_calls", "length"]), JSON_VALUES),
}), max_size=2)
HOSTILE_CHUNKS = st.one_of(JSON_VALUES, st.fixed_dictionaries({"choices": st.one_of(JSON_VALUES, HOSTILE_CHOICES)}))


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(HOSTILE_CHUNKS, max_size=8))
def test_property_hostile_upstream_chunks_never_raise(chunks: list) -> None:
    relay = kp.StreamRepair(ctx_for(TOOLS))
    frames = []
    for c in chunks:
        frames += relay.feed(json.dumps(c).encode())
    frames += relay.close()
    assert frames[-1] == kp.DONE_FRAME
    for frame in frames:  # whatever came in, what goes out is well-formed SSE with JSON data
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
        if frame != kp.DONE_FRAME:
            json.loads(frame[6:])
    body = {"choices": [{"index": 0, "message": c, "finish_reason": "stop"} for c in chunks if isinstance(c, dict)]}
    kp.repair_completion(body, ctx_for(TOOLS))
    kp.json_dumps_compact(body)  # still JSON
    for choice in body["choices"]:  # every call it carries now is whole: an id, a name, arguments
        calls = choice["message"].get("tool_calls") if isinstance(choice["message"], dict) else None
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict) and "type" in call and call.get("type") == "function" and "index" in call:
                assert isinstance(call["id"], str) and isinstance(call["function"]["name"], str)
                assert isinstance(call["function"]["arguments"], str)


# ---------------------------------------------------------------------------------------------------
# Usage per key, and reasoning continuity for clients that drop it
# ---------------------------------------------------------------------------------------------------

def ask_usage(body: bytes, request: dict) -> bytes:
    return kp.rewrite_request(body, request, kp._usage_option(request))


def test_usage_asked_of_the_upstream() -> None:
    """Spliced into a body without stream_options; written anew when it has some (other options kept),
    or when the body is not UTF-8 JSON starting with the object (a splice would break it)."""
    def ask(body: bytes) -> dict:
        return json.loads(ask_usage(body, kp.json_loads(body)))

    plain = b' {"messages": [], "stream": true}'
    assert ask_usage(plain, json.loads(plain)).startswith(b' {"stream_options":{"include_usage":true},')
    assert ask(plain) == {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    assert ask(b'{"messages": [], "stream_options": {"include_usage": false, "x": 1}}')["stream_options"] == \
        {"include_usage": True, "x": 1}
    assert ask(b'{"messages": [], "stream_options": null}')["stream_options"] == {"include_usage": True}
    utf16 = json.dumps({"messages": [], "stream": True}).encode("utf-16")
    assert ask(utf16)["stream_options"] == {"include_usage": True}
    odd = b'{"messages": [], "stream_options": "yes"}'
    assert ask_usage(odd, json.loads(odd)) == odd  # SGLang says what is wrong with it


def test_api_key_names() -> None:
    keys = kp.parse_api_keys("alice:key-A1, plain-key-2 ,bob:key:with:colons,bad name:key3,")
    assert keys[0] == ("alice", "key-A1") and keys[2] == ("bob", "key:with:colons")
    assert keys[1] == ("key-" + hashlib.sha256(b"plain-key-2").hexdigest()[:8], "plain-key-2")
    assert keys[3][1] == "bad name:key3" and "key3" not in keys[3][0]  # not a name: a bare key
    assert len(keys) == 4


@pytest.mark.edge
async def test_usage_and_repairs_counted_per_key(nursery: trio.Nursery, upstream: FakeSGLang,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Tokens per key come from SGLang's usage, asked for on every stream; a client that did not ask
    for usage does not get it, one that did does."""
    caplog.set_level(logging.INFO, logger="kimiproxy")
    running = await start_proxy(nursery, upstream.url, PROXY_API_KEY="alice:key-alice-1,key-bare-2")
    bare = "key-" + hashlib.sha256(b"key-bare-2").hexdigest()[:8]
    leak = f"Let me look.{S}{B}functions.read_file:0{A}{{\"path\": \"a.py\"}}{Z}{E}"
    upstream.script(Script(steps=stream_of(reasoning=[leak])), Script(steps=stream_of(content=["hi"])),
                    Script(body=completion(), content_type="application/json"))
    async with httpx.AsyncClient(base_url=running.base) as client:
        alice, other = {"Authorization": "Bearer key-alice-1"}, {"Authorization": "Bearer key-bare-2"}
        unasked = await client.post("/v1/chat/completions", headers=alice, json={
            "messages": [{"role": "user", "content": "x"}], "stream": True, "tools": TOOLS})
        asked = await client.post("/v1/chat/completions", headers=alice, json={
            "messages": [], "stream": True, "stream_options": {"include_usage": True}})
        whole = await client.post("/v1/chat/completions", headers=other, json={"messages": []})
        await logged(caplog, f"key {bare}")  # counted with the final log line, after the client has it all
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert [s.json().get("stream_options") for s in upstream.seen] == [{"include_usage": True}] * 2 + [None]
    assert upstream.seen[0].json()["messages"] == [{"role": "user", "content": "x"}]  # the rest as it was
    usage_chunks = lambda r: [e for e in frames_to_events([r.content]) if e != b"[DONE]" and not e["choices"]]
    assert usage_chunks(unasked) == [] and accumulate(frames_to_events([unasked.content]))["tool_calls"]
    assert [c["usage"] for c in usage_chunks(asked)] == [USAGE]
    assert whole.json()["usage"] == USAGE
    assert metrics['kimiproxy_key_requests_total{key="alice"}'] == 2
    assert metrics[f'kimiproxy_key_requests_total{{key="{bare}"}}'] == 1
    assert metrics['kimiproxy_key_tokens_total{key="alice",type="prompt"}'] == 2 * USAGE["prompt_tokens"]
    assert metrics['kimiproxy_key_tokens_total{key="alice",type="completion"}'] == 2 * USAGE["completion_tokens"]
    assert metrics[f'kimiproxy_key_tokens_total{{key="{bare}",type="prompt"}}'] == USAGE["prompt_tokens"]
    assert metrics['kimiproxy_key_repairs_total{key="alice"}'] >= 1
    assert f'kimiproxy_key_repairs_total{{key="{bare}"}}' not in metrics
    ends = [r.getMessage() for r in await logged(caplog, "key alice")]
    assert len(ends) == 2 and "tokens 12+8" in ends[0]
    assert "key-alice-1" not in caplog.text and "key-bare-2" not in caplog.text


def _turn(running: Running, messages: list, stream: bool, http: httpx.Client | None = None) -> tuple[str, str, list[dict]]:
    """One request of a tool loop through the OpenAI SDK: (content, reasoning, tool calls as the
    client would send them back); ``http``: the SDK's HTTP client (one bound to another address)."""
    client = running.sdk(**({"http_client": http} if http else {}))
    if not stream:
        message = client.chat.completions.create(model="m", messages=messages, tools=TOOLS).choices[0].message
        calls = [c.model_dump(include={"id", "type", "function"}) for c in message.tool_calls or ()]
        return message.content or "", (message.model_extra or {}).get("reasoning_content") or "", calls
    content, reasoning, calls = "", "", {}
    for chunk in client.chat.completions.create(model="m", messages=messages, tools=TOOLS, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            for tc in delta.tool_calls or ():
                call = calls.setdefault(tc.index, {"id": tc.id, "type": "function",
                                                   "function": {"name": tc.function.name, "arguments": ""}})
                call["function"]["arguments"] += tc.function.arguments or ""
    return content, reasoning, list(calls.values())


def _leaky_turn(turn: int, stream: bool) -> tuple[Script, str]:
    """SGLang's answer for one step of a tool loop: thinking, then the call leaked into the reasoning."""
    thought = f"Step {turn}: the bug may be in f{turn}.py, so I read it first."
    leak = f"{thought}{S}{B}functions.read_file:{turn}{A}{{\"path\": \"f{turn}.py\"}}{Z}{E}"
    if stream:
        return Script(steps=stream_of(reasoning=[leak[:25], leak[25:]])), thought
    return Script(body=completion(content="", reasoning=leak), content_type="application/json"), thought


def roo_id(call_id: str) -> str:
    """What Roo Code (since its PR #10649) and LiteLLM's Anthropic bridge make of a tool-call id."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", call_id)


@pytest.mark.edge
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("rewrite_ids", [False, True], ids=["ids-as-sent", "ids-rewritten"])
async def test_reasoning_restored_for_a_client_that_drops_it(proxy: Running, stream: bool, rewrite_ids: bool,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A tool loop whose client sends back content and tool calls only (and, like Roo Code, rewrites
    every id): every earlier turn's reasoning reaches SGLang again, as the client got it, turn after turn.
    The log says so, without the text."""
    caplog.set_level(logging.INFO, logger="kimiproxy")
    messages: list[dict] = [{"role": "user", "content": "fix the bug"}]
    delivered = []
    for turn in range(3):
        script, thought = _leaky_turn(turn, stream)
        proxy.upstream.script(script)
        content, reasoning, calls = await sdk_call(lambda: _turn(proxy, messages, stream))
        assert reasoning == thought and [c["function"]["name"] for c in calls] == ["read_file"]
        delivered.append(reasoning)
        if rewrite_ids:
            calls = [dict(c, id=roo_id(c["id"])) for c in calls]
        messages.append({"role": "assistant", "content": content, "tool_calls": calls})  # no reasoning
        messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": f"body of f{turn}.py"})
    proxy.upstream.script(Script(body=completion("Fixed."), content_type="application/json"))
    await sdk_call(lambda: _turn(proxy, messages, False))
    for n, seen in enumerate(proxy.upstream.seen):  # request n carries n assistant turns
        sent = [m.get("reasoning_content") for m in seen.json()["messages"] if m["role"] == "assistant"]
        assert sent == delivered[:n]
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert metrics["kimiproxy_reasoning_restored_total"] == 0 + 1 + 2 + 3
    assert metrics.get("kimiproxy_reasoning_missed_total", 0) == 0
    lines = [r.getMessage() for r in caplog.records if "reasoning: restored" in r.getMessage()]
    assert len(lines) == 3 and not any("Step" in line for line in lines)


@pytest.mark.edge
async def test_two_tasks_opening_with_the_same_call_keep_their_own_reasoning(proxy: Running) -> None:
    """Every tool loop's first call is functions.NAME:0: the same call in two tasks is told apart by
    the message it answered, so neither gets the other's reasoning."""
    call = f"{S}{B}functions.read_file:0{A}{{\"path\": \"README.md\"}}{Z}{E}"
    histories = []
    for task in ("summarise the project", "find the licence"):
        proxy.upstream.script(Script(body=completion(content="", reasoning=f"For '{task}' I start with the README."
                                                     + call), content_type="application/json"))
        messages = [{"role": "user", "content": task}]
        content, reasoning, calls = await sdk_call(lambda: _turn(proxy, messages, False))
        histories.append(messages + [{"role": "assistant", "content": content, "tool_calls": calls},
                                     {"role": "tool", "tool_call_id": calls[0]["id"], "content": "# Project"}])
    for task, history in zip(("summarise the project", "find the licence"), histories):
        proxy.upstream.script(Script(body=completion("ok"), content_type="application/json"))
        await sdk_call(lambda: _turn(proxy, history, False))
        assert proxy.upstream.seen[-1].json()["messages"][1]["reasoning_content"] == \
            f"For '{task}' I start with the README."


@pytest.mark.edge
async def test_reasoning_a_client_keeps_is_left_alone(proxy: Running) -> None:
    """A client that sends reasoning back (its own, even other than what it got) sees no change: the
    request reaches SGLang byte for byte. Turns before the last answer are not the tool loop's."""
    script, thought = _leaky_turn(0, stream=False)
    proxy.upstream.script(script)
    messages: list[dict] = [{"role": "user", "content": "fix the bug"}]
    content, reasoning, calls = await sdk_call(lambda: _turn(proxy, messages, False))
    kept = messages + [{"role": "assistant", "content": content, "tool_calls": calls, "reasoning_content": "mine"},
                       {"role": "tool", "tool_call_id": calls[0]["id"], "content": "x"}]
    answered = messages + [{"role": "assistant", "content": content, "tool_calls": calls},
                           {"role": "tool", "tool_call_id": calls[0]["id"], "content": "x"},
                           {"role": "assistant", "content": "Done."}, {"role": "user", "content": "thanks"}]
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        for history in (kept, answered):
            body = json.dumps({"model": "m", "messages": history}).encode()
            r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200 and proxy.upstream.seen[-1].body == body
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert reasoning == thought and "kimiproxy_reasoning_restored_total" not in metrics


@pytest.mark.slow
async def test_reasoning_shared_by_workers_and_processes(upstream: FakeSGLang) -> None:
    """`hypercorn -w 2` and a `python kimiproxy.py` beside it on one store: a turn delivered by one
    process has its reasoning restored by the other, both ways, for a client that rewrites every id as
    Roo Code does."""
    env = {"SGLANG_API_BASE": upstream.url, "REASONING_STORE": store_path()}
    async with proxy_process(HYPERCORN_ARGS + ["-w", "2"], env) as (hyper, _), \
            proxy_process(PYTHON_ARGS, env) as (single, _):
        messages: list[dict] = [{"role": "user", "content": "fix the bug"}]
        delivered = []
        for turn in range(4):
            base = (hyper, single)[turn % 2]
            running = Running(upstream, base, None)  # type: ignore[arg-type]
            script, thought = _leaky_turn(turn, stream=turn < 2)
            upstream.script(script)
            content, reasoning, calls = await sdk_call(lambda: _turn(running, messages, turn < 2))
            delivered.append(reasoning)
            calls = [dict(c, id=roo_id(c["id"])) for c in calls]
            messages += [{"role": "assistant", "content": content, "tool_calls": calls},
                         {"role": "tool", "tool_call_id": calls[0]["id"], "content": "x"}]
        for n, seen in enumerate(upstream.seen):
            assert [m.get("reasoning_content") for m in seen.json()["messages"] if m["role"] == "assistant"] == \
                delivered[:n]


async def test_reasoning_store_bounds(tmp_path: Path) -> None:
    now = [1e9]

    def store(**limits: str) -> kp.ReasoningStore:
        env = {"REASONING_STORE": str(tmp_path / "r.sqlite3"), **limits}
        return kp.ReasoningStore(kp.Settings.from_env(env), prune_every=1, clock=lambda: now[0])

    entries = store(REASONING_MAX_ENTRIES="3")
    for i in range(5):
        await entries.remember([(f"k{i}", f"text {i}")])
    assert await entries.recall([f"k{i}" for i in range(5)]) == {f"k{i}": f"text {i}" for i in (2, 3, 4)}
    assert (tmp_path / "r.sqlite3").stat().st_mode & 0o077 == 0  # the owner's only
    await entries.aclose()
    size = store(REASONING_MAX_MB="0.001")  # 1048 bytes: two of these texts
    for i in range(5, 8):
        await size.remember([(f"k{i}", "é" * 200)])  # 400 bytes each
    assert sorted(await size.recall([f"k{i}" for i in range(8)])) == ["k6", "k7"]
    await size.aclose()
    age = store(REASONING_MAX_HOURS="1")
    await age.remember([("old", "text")])
    now[0] += 3599
    await age.remember([("new", "text")])
    assert await age.recall(["old", "new"]) == {"old": "text", "new": "text"}
    now[0] += 2
    assert await age.recall(["old", "new"]) == {"new": "text"}
    await age.aclose()


async def test_reasoning_store_refuses_files_others_could_read(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A store file someone else could read (or a symlink, the way another user would plant one in /tmp)
    is refused; a turn SQLite cannot keep is skipped, not raised; any number of keys can be recalled."""
    caplog.set_level(logging.WARNING, logger="kimiproxy")
    readable = tmp_path / "readable.sqlite3"
    readable.write_bytes(b"")
    readable.chmod(0o644)
    link = tmp_path / "link.sqlite3"
    link.symlink_to(tmp_path / "elsewhere.sqlite3")
    for path in (readable, link):
        store = kp.ReasoningStore(kp.Settings.from_env({"REASONING_STORE": str(path)}))
        await store.remember([("k", "text")])
        assert await store.recall(["k"]) == {}
        await store.aclose()
    assert caplog.text.count("reasoning continuity is off") == 2 and not (tmp_path / "elsewhere.sqlite3").exists()
    store = kp.ReasoningStore(kp.Settings.from_env({"REASONING_STORE": str(tmp_path / "own.sqlite3")}))
    await store.remember([("lone", "half an emoji \ud83d")])
    assert "remember skipped" in caplog.text
    await store.remember([(f"k{i}", f"t{i}") for i in range(1200)])
    assert len(await store.recall(["lone"] + [f"k{i}" for i in range(1200)])) == 1200
    await store.aclose()


@pytest.mark.edge
async def test_a_store_that_cannot_be_opened_leaves_the_proxy_serving(
        nursery: trio.Nursery, upstream: FakeSGLang, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.WARNING, logger="kimiproxy")
    shared = tmp_path / "shared"  # a directory anyone may write into, like /tmp
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    running = await start_proxy(nursery, upstream.url, REASONING_STORE=str(shared / "r.sqlite3"))
    running.upstream = upstream
    script, thought = _leaky_turn(0, stream=True)
    upstream.script(script)
    _, reasoning, calls = await sdk_call(lambda: _turn(running, [{"role": "user", "content": "x"}], True))
    assert reasoning == thought and calls
    assert "reasoning continuity is off" in caplog.text


# ---------------------------------------------------------------------------------------------------
# Capture and replay
# ---------------------------------------------------------------------------------------------------

def replay_cli(*paths: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "kimiproxy.py", "replay", *map(str, paths)], {})


@pytest.mark.edge
async def test_exchanges_that_went_wrong_are_captured_and_replay(nursery: trio.Nursery, upstream: FakeSGLang,
                                                                 tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A repaired stream, a stream that broke off and a repaired whole response are captured (the
    oldest going past CAPTURE_MAX_FILES); a clean one is not. Each capture replays offline to what the
    client got; an edited one shows the difference."""
    caplog.set_level(logging.INFO, logger="kimiproxy")
    captures = tmp_path / "captures"
    running = await start_proxy(nursery, upstream.url, CAPTURE_DIR=str(captures), CAPTURE_MAX_FILES="3",
                                PROXY_API_KEY="alice:key-alice-1")
    leak = f"Let me look.{S}{B}functions.read_file:0{A}{{\"path\": \"a.py\"}}{Z}{E}"
    leaky = stream_of(reasoning=[leak[:30], leak[30:]])
    upstream.script(Script(steps=leaky), Script(steps=stream_of(content=["fine"])),
                    Script(steps=[sse(chunk({"role": "assistant", "content": "Hel"})), "close"]),
                    Script(body=completion(content=leak), content_type="application/json"),
                    Script(steps=leaky))
    async with httpx.AsyncClient(base_url=running.base, headers={"Authorization": "Bearer key-alice-1"}) as client:
        for stream in (True, True, True, False, True):
            await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "stream": stream, "tools": TOOLS})
    with trio.fail_after(10):  # a capture is written after the client has its response
        while sum("captured (" in r.getMessage() for r in caplog.records) < 4:
            await trio.sleep(0.02)
    files = sorted(captures.glob("*.json"), key=lambda f: json.loads(f.read_text())["id"])  # in request order
    docs = [json.loads(f.read_text()) for f in files]
    assert all(f.name.startswith("kimiproxy-capture-") for f in files)
    assert [(d["stream"], d["reasons"]) for d in docs] == [(True, ["upstream-broke-off"]), (False, ["repaired"]),
                                                           (True, ["repaired"])]
    assert all("key-alice-1" not in f.read_text() for f in files)
    assert docs[2]["headers"]["authorization"] != "Bearer key-alice-1"
    assert docs[2]["request"]["tools"] == TOOLS
    assert [data for _, data in docs[2]["upstream_events"]] == [step[6:-2].decode() for step in leaky]
    times = [t for t, _ in docs[2]["upstream_events"]]
    assert times == sorted(times)
    assert "functions.read_file:0" in docs[2]["client"] and S not in docs[2]["client"]
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)
    replayed = replay_cli(*files)
    assert replayed.returncode == 0 and replayed.stdout.count("same as what the client got then") == 3, replayed.stdout
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(dict(docs[1], client=json.dumps(completion(content="other")))))
    (tmp_path / "garbage.json").write_text("{not json")
    assert replay_cli(edited).returncode == 1 and '-    "content": "other"' in replay_cli(edited).stdout
    assert replay_cli(tmp_path / "garbage.json").returncode == 2


def test_captured_exchanges_replay_as_they_were() -> None:
    """Captures taken through SGLang 0.5.23's own parser code (both kimi_k2 parsers): broken structured
    calls, double-encoded arguments, marker text inside a file's content. Today's repair gives each
    client what it got when captured."""
    captures = sorted((HERE / "captures").glob("*.json"))
    assert len(captures) >= 3
    for path in captures:
        then, now = kp.replay_capture(json.loads(path.read_text()))
        assert now == then and any(m.get("tool_calls") for m in now), path.name
    replayed = replay_cli(*captures)
    assert replayed.returncode == 0 and replayed.stdout.count("same as what the client got then") == len(captures)


# ---------------------------------------------------------------------------------------------------
# Security: what reaches the upstream, who can touch the files, what one request costs, the log
# ---------------------------------------------------------------------------------------------------

async def raw_exchange(base: str, data: bytes, local: str | None = None) -> bytes:
    """One request written to a socket exactly as given (a client library would normalise the path),
    and the whole response: read until its Content-Length is in, its last chunk, or the server closes
    (a kept-alive connection would otherwise hold the test until the server's keep-alive timeout)."""
    host, port = base.removeprefix("http://").split(":")
    sock = trio.socket.socket()
    if local:
        await sock.bind((local, 0))
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    response = b""
    with trio.fail_after(TEST_TIMEOUT / 2):
        await stream.send_all(data)
        while True:
            head, sep, body = response.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head) if sep else None
            if length and len(body) >= int(length[1]):
                break
            if sep and re.search(rb"(?im)^transfer-encoding:\s*chunked", head) and body.endswith(b"0\r\n\r\n"):
                break
            piece = await stream.receive_some(65536)
            if not piece:
                break
            response += piece
    await stream.aclose()
    return response


def raw_request(method: str, target: str | bytes, headers: dict[str, str] = {}, body: bytes = b"") -> bytes:
    target = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    headers = {"Connection": "close", **headers}  # the response then ends where the connection does
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers.items()]
    if body or method == "POST":
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> Any:
    return json.loads(response.partition(b"\r\n\r\n")[2])


# Dot segments in many spellings, with slashes and backslashes as they are written and encoded.
DOTS = ["..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2e", "%252e%252e/..", "..%00"]
SEPARATORS = ["/", "%2f", "%2F", "%5c", "%5C", "\\", "//"]
ESCAPES = [f"/v1/{dot}{sep}{route}" for dot in DOTS for sep in SEPARATORS for route in ("shutdown", "flush_cache")]
ESCAPES += ["/v1//../../shutdown", "/v1/models/../../shutdown", "/v1/./../update_weights_from_disk",
            "/v1/%2e%2e%2fshutdown", "/v1/..%2fflush_cache", "/v1/%2e%2e/flush_cache",
            "/v1/chat%2fcompletions", "/v1/models%00", "/v1/models%0d%0aX:%20y", "/v1//models", "/v1/models%C2%85",
            "/v1/models%E2%80%A8x"]


@pytest.mark.edge
async def test_no_request_path_leaves_the_upstreams_v1(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    """Finding 1: every spelling of a way out of /v1 is refused before any upstream connection, in
    OpenAI's error shape, with keys and without; ordinary paths go upstream exactly as written."""
    anonymous = await start_proxy(nursery, upstream.url)
    keyed = await start_proxy(nursery, upstream.url, PROXY_API_KEY="bob:key-bob", UPSTREAM_API_KEY="admin-key")
    refused = 0
    for running, auth in ((anonymous, {}), (keyed, {"Authorization": "Bearer key-bob"})):
        for target in ESCAPES:
            for method in ("GET", "POST"):
                headers = {**auth, "Content-Type": "application/json"}
                response = await raw_exchange(running.base, raw_request(method, target, headers, b'{"messages": []}'))
                assert status_of(response) == 400, (target, response[:200])
                assert json_of(response)["error"]["type"] == "invalid_request_error"
                refused += 1
    assert refused == 2 * 2 * len(ESCAPES) and upstream.seen == []
    for target in ["/v1/models", "/v1/models/moonshotai/Kimi-K2-Thinking", "/v1/a%20b", "/v1/x?next=/../shutdown",
                   "/v1/"]:
        response = await raw_exchange(keyed.base, raw_request("GET", target, {"Authorization": "Bearer key-bob"}))
        assert status_of(response) == 200, target
        assert upstream.seen[-1].path == target  # exactly what was checked
        assert upstream.seen[-1].headers["authorization"] == "Bearer admin-key"


@pytest.mark.edge
async def test_control_characters_never_forge_a_log_line(nursery: trio.Nursery, upstream: FakeSGLang,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Finding 5: a path or a model name with CR, LF or ESC in it, with a key and without, never writes a
    line of its own or reaches a terminal: every record stays one line, the characters escaped."""
    caplog.set_level(logging.DEBUG, logger="kimiproxy")
    keyed = await start_proxy(nursery, upstream.url, PROXY_API_KEY="bob:key-bob", LOG_LEVEL="DEBUG")
    forged = "%0A2026-12-01 00:00:00,000 INFO    [-] GET /v1/models -> 200 in 0.001s (key bob)%1b[2J".replace(" ", "%20")
    for target in (f"/v1/x{forged}", f"/v1/models%0d%0a{forged}"):
        for auth in ({}, {"Authorization": "Bearer key-bob"}):
            response = await raw_exchange(keyed.base, raw_request("GET", target, auth))
            assert status_of(response) in (400, 401)
    body = json.dumps({"model": "m\n2026-12-01 forged\x1b[31m", "messages": [{"role": "user", "content": "a\nb"}]})
    async with httpx.AsyncClient(base_url=keyed.base) as client:
        r = await client.post("/v1/chat/completions", content=body, headers={
            "Authorization": "Bearer key-bob", "Content-Type": "application/json"})
        assert r.status_code == 200
    await logged(caplog, "-> 200")
    records = [r for r in caplog.records if r.name == "kimiproxy"]
    assert any("\\x0a2026-12-01" in r.getMessage() for r in records)
    assert any("2026-12-01 forged" in r.getMessage() for r in records)  # the model name, escaped
    for record in records:
        assert not re.search(r"[\x00-\x1f\x7f-\x9f]", record.getMessage()), record.getMessage()
    assert upstream.seen[-1].json()["model"] == "m\n2026-12-01 forged\x1b[31m"  # the request itself untouched


@pytest.mark.edge
async def test_hop_by_hop_and_cors_headers_stay_on_their_hop(proxy: Running) -> None:
    """Finding 9 and 10: headers the Connection header names, Expect and HTTP2-Settings go no further, in
    either direction, and an upstream's CORS headers never reach a client."""
    hop = {"Connection": "keep-alive, X-Hop-Secret, Cookie", "X-Hop-Secret": "s1", "Cookie": "c=2",
           "HTTP2-Settings": "AAMAAABkAAQAAP__", "X-Kept": "yes", "Content-Type": "application/json"}
    up = [("connection", "x-up-secret"), ("x-up-secret", "u1"), ("access-control-allow-origin", "*"),
          ("access-control-allow-credentials", "true"), ("x-up-kept", "yes")]
    for target, script in (("/v1/chat/completions", Script(body=completion(), content_type="application/json",
                                                              headers=up)),
                           ("/v1/completions", Script(body={"choices": []}, content_type="application/json",
                                                      headers=up))):
        proxy.upstream.script(script)
        response = await raw_exchange(proxy.base, raw_request("POST", target, hop, b'{"messages": [], "prompt": "p"}'))
        assert status_of(response) == 200, response
        seen = proxy.upstream.seen[-1].headers
        assert seen["x-kept"] == "yes"
        for name in ("x-hop-secret", "cookie", "http2-settings"):
            assert name not in seen, (target, name)
        head = response.partition(b"\r\n\r\n")[0].lower()
        assert b"x-up-kept: yes" in head and b"x-up-secret" not in head and b"access-control-" not in head


@pytest.mark.edge
async def test_what_a_web_page_can_send_is_refused(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    """Finding 10: a POST a page on another site may send without a preflight (no content type, a form,
    text/plain even with "json" in a parameter) is refused on every proxied route; an anonymous proxy
    answers only to its own names (no DNS rebinding), unless ALLOWED_HOSTS or keys say otherwise."""
    anonymous = await start_proxy(nursery, upstream.url)
    body = b'{"messages": [], "prompt": "p"}'
    for target in ("/v1/chat/completions", "/api/chat/completions", "/v1/completions"):
        for content_type in (None, "text/plain; charset=json", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=json", "text/json"):
            headers = {"Content-Type": content_type} if content_type else {}
            response = await raw_exchange(anonymous.base, raw_request("POST", target, headers, body))
            assert status_of(response) == 415, (target, content_type)
            assert "error" in json_of(response)
        for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            response = await raw_exchange(anonymous.base, raw_request("POST", target, {"Content-Type": content_type},
                                                                      body))
            assert status_of(response) == 200, (target, content_type)
    assert len(upstream.seen) == 9
    rebound = raw_request("GET", "/v1/models").replace(b"Host: 127.0.0.1", b"Host: attacker.example:8000")
    for target in (b"/v1/models", b"/", b"/health", b"/metrics"):
        response = await raw_exchange(anonymous.base, rebound.replace(b"/v1/models", target, 1))
        assert status_of(response) == 403 and "PROXY_API_KEY" in json_of(response)["error"]["message"], target
    for host in (b"localhost:8000", b"[::1]:8000", b"10.1.2.3", socket.gethostname().encode()):
        response = await raw_exchange(anonymous.base, rebound.replace(b"attacker.example:8000", host))
        assert status_of(response) == 200, host
    allowed = await start_proxy(nursery, upstream.url, ALLOWED_HOSTS="attacker.example")
    keyed = await start_proxy(nursery, upstream.url, PROXY_API_KEY="k")
    assert status_of(await raw_exchange(allowed.base, rebound)) == 200
    assert status_of(await raw_exchange(keyed.base, rebound.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer k\r\n\r\n"))) == 200


def test_a_key_setting_that_holds_no_key_stops_start_up() -> None:
    """Finding 11: a PROXY_API_KEY that parses to no key would turn the check off."""
    for raw in (" , ", ",", " ,, "):
        with pytest.raises(kp.ConfigError, match="holds no key"):
            kp.Settings.from_env({"PROXY_API_KEY": raw})
    with pytest.raises(kp.ConfigError, match="'alice' has a name but no key"):
        kp.Settings.from_env({"PROXY_API_KEY": "alice:, bob:key-b"})
    with pytest.raises(kp.ConfigError, match="':' alone"):
        kp.Settings.from_env({"PROXY_API_KEY": " : "})
    assert kp.Settings.from_env({"PROXY_API_KEY": ""}).api_keys == ()
    assert kp.Settings.from_env({"PROXY_API_KEY": " key-a , "}).api_keys[0][1] == "key-a"


@pytest.mark.slow
@pytest.mark.edge
def test_a_key_setting_with_no_key_stops_the_process_with_one_line() -> None:
    r = _run([sys.executable, "kimiproxy.py"], {"PROXY_API_KEY": " , "})
    assert r.returncode == 1 and r.stderr.strip().startswith("kimiproxy: bad configuration: PROXY_API_KEY")


@pytest.mark.edge
async def test_upstream_credentials_are_sent_never_shown(nursery: trio.Nursery, upstream: FakeSGLang,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: a user and password in SGLANG_API_BASE go upstream as Basic auth, and nowhere else:
    not on /, not in an error body, not in the log; no client-facing body names the upstream's address."""
    caplog.set_level(logging.DEBUG, logger="kimiproxy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with_creds = await start_proxy(nursery, upstream.url.replace("http://", "http://admin:pa%40ss-w0rd@"))
    down = await start_proxy(nursery, f"http://admin:pa%40ss-w0rd@127.0.0.1:{dead}/v1")
    async with httpx.AsyncClient() as client:
        r = await client.post(with_creds.base + "/v1/chat/completions", json={"messages": []})
        assert r.status_code == 200
        assert upstream.seen[-1].headers["authorization"] == "Basic " + base64.b64encode(b"admin:pa@ss-w0rd").decode()
        pages = [(await client.get(with_creds.base + "/")).text, (await client.get(down.base + "/")).text]
        for stream in (False, True):
            r = await client.post(down.base + "/v1/chat/completions", json={"messages": [], "stream": stream})
            assert r.status_code == 502
            pages.append(r.text)
        r = await client.get(down.base + "/v1/models")
        assert r.status_code == 502
        pages.append(r.text)
    assert "127.0.0.1" not in pages[0]  # / does not name the upstream at all
    for text in pages + [caplog.text, repr(with_creds.app.settings)]:
        assert "pa%40ss" not in text and "pa@ss" not in text and "admin:" not in text
    for text in pages[2:]:
        assert str(dead) not in text and "127.0.0.1" not in text  # the address stays in the log
    assert f"127.0.0.1:{dead}" in caplog.text
    with pytest.raises(kp.ConfigError, match="one credential"):
        kp.Settings.from_env({"SGLANG_API_BASE": "http://a:b@gpu:30000/v1", "UPSTREAM_API_KEY": "k"})


@pytest.mark.edge
async def test_upstream_protocol_errors_reach_the_client_as_a_generic_message(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 12: what a misbehaving upstream sent (here another response's bytes) goes to the log, and
    the client gets a message of kimiproxy's own."""
    caplog.set_level(logging.WARNING, logger="kimiproxy")
    leaked = b"OTHER-USERS-ANSWER-1234"

    async def garbage(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + leaked + b"\r\n\r\n")
            await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    running = await start_proxy(nursery, f"http://127.0.0.1:{port}/v1")
    nursery.start_soon(_deadline)
    async with httpx.AsyncClient(base_url=running.base) as client:
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json={"messages": [], "stream": stream})
            assert r.status_code == 502 and leaked.decode() not in r.text
            assert r.json()["error"]["message"] == "upstream connection failed"
        r = await client.get("/v1/models")
        assert r.status_code == 502 and leaked.decode() not in r.text
    assert leaked.decode() in caplog.text


@pytest.mark.edge
async def test_a_rewritten_request_keeps_every_value_it_did_not_mean_to_change(proxy: Running) -> None:
    """Finding 8: when kimiproxy rewrites a request (history ids here, and usage asked for a stream),
    only what it changed is written anew: a 30-digit seed, 1e999 and a deep nesting arrive as sent."""
    deep = "[" * 255 + "]" * 255
    history = ('[{"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": '
               '[{"id": "call_1", "type": "function", "function": {"name": "exec", "arguments": "{}"}}], '
               f'"extra": {deep}, "n": 123456789012345678901234567891}}, '
               '{"role": "tool", "tool_call_id": "call_1", "content": "ok"}]')
    for stream, encoding in (("false", "utf-8"), ("true", "utf-8"), ("true", "utf-8-sig"), ("false", "utf-16")):
        text = (f'{{"model": "m", "seed": 123456789012345678901234567890, "temperature": 1e999, '
                f'"logit_bias": {{"5": -1.50000000000000000001}}, "stream": {stream}, "messages": {history}}}')
        async with httpx.AsyncClient(base_url=proxy.base) as client:
            r = await client.post("/v1/chat/completions", content=text.encode(encoding),
                                  headers={"content-type": "application/json"})
        assert r.status_code == 200
        sent = proxy.upstream.seen[-1].body.decode(encoding)
        for kept in ('"seed": 123456789012345678901234567890', '"temperature": 1e999', '"n": 123456789012345678901234567891',
                     '{"5": -1.50000000000000000001}', '{"role": "user", "content": "go"}', deep):
            assert kept in sent, (kept, encoding)
        messages = json.loads(sent)["messages"]
        assert messages[1]["tool_calls"][0]["id"] == "functions.exec:0" == messages[2]["tool_call_id"]
        assert ('"stream_options":{"include_usage":true}' in sent) == (stream == "true")
    # nested past what the stdlib reads: sent as it came, not a 500
    deeper = text.replace(deep, "[" * 1000 + "]" * 1000).replace('"temperature": 1e999, ', "")
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        r = await client.post("/v1/chat/completions", content=deeper.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400) and "internal" not in r.text


@pytest.mark.edge
async def test_what_one_request_may_cost_is_bounded(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    """Finding 4: a body of millions of empty messages, or of short strings, is refused before it is
    parsed (they took a worker to 2 GB and froze it for 13 s); more messages than a context could hold too; bodies held at once across
    requests are capped (503 with Retry-After, the body drained first); and the proxy keeps serving."""
    plain = await start_proxy(nursery, upstream.url)
    running = await start_proxy(nursery, upstream.url, MAX_BODIES_MB="1")
    empties = b'{"messages": [' + b",".join([b"{}"] * 21_000_000) + b"]}"  # 63 MB
    many = json.dumps({"messages": [{"role": "user", "content": "x"}] * (kp.MAX_REQUEST_MESSAGES + 1)}).encode()
    async with httpx.AsyncClient(base_url=plain.base, timeout=30) as client:
        strings = b'{"messages": [{"role": "user", "content": "x"}], "x": [' + b",".join([b'"ab"'] * 12_600_000) + b"]}"
        for body, words in ((empties, "JSON values"), (strings, "JSON values"), (many, "messages")):
            r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 413 and words in r.json()["error"]["message"]
    assert upstream.seen == []
    async with httpx.AsyncClient(base_url=running.base, timeout=30) as client:
        host, port = running.base.removeprefix("http://").split(":")
        first = await trio.open_tcp_stream(host, int(port))  # holds 0.6 MiB of a 0.9 MiB body
        content = b'{"messages": [], "pad": "' + b"x" * (900 * 1024 - 27) + b'"}'
        await first.send_all(raw_request("POST", "/v1/chat/completions", {"Content-Type": "application/json"},
                                         content)[:-300 * 1024])
        await trio.sleep(0.2)  # until the proxy has read what was sent (a wait for it, not a speed limit)
        second = b'{"messages": [], "pad": "' + b"y" * (600 * 1024) + b'"}'
        for _ in range(20):
            r = await client.post("/v1/chat/completions", content=second, headers={"content-type": "application/json"})
            if r.status_code == 503:
                break
            await trio.sleep(0.1)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "MAX_BODIES_MB" in r.text
        await first.send_all(content[-300 * 1024:])
        response = b""
        with trio.fail_after(20):
            while b"}" not in response.partition(b"\r\n\r\n")[2]:
                response += await first.receive_some(65536)
        await first.aclose()
        assert status_of(response) == 200
        r = await client.post("/v1/chat/completions", content=second, headers={"content-type": "application/json"})
        assert r.status_code == 200  # what the first held was given back
    with trio.fail_after(10):  # each exchange gives its bytes back as it ends, after its response
        while running.app.proxy.bodies_held:
            await trio.sleep(0.01)
    turns = [{"role": "user", "content": "go"}] + [
        m for i in range(3000) for m in ({"role": "assistant", "tool_calls": [{"id": f"functions.f:{i}", "type": "function",
                                                                             "function": {"name": "f", "arguments": "{}"}}]},
                                         {"role": "tool", "tool_call_id": f"functions.f:{i}", "content": "x"})]
    assert len(kp.turns_without_reasoning({"messages": turns})) == kp.MAX_RESTORED_TURNS


@pytest.mark.edge
async def test_connection_close_closes_on_every_route(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    """Finding 13: the routes Quart serves closed the socket only when the client did (Hypercorn closes
    inside the app's last send, which quart_trio cancels). With a keep-alive timeout far beyond the
    test's own limit, only a real close ends these reads; keep-alive still serves a second request."""
    app = kp.create_app(kp.Settings.from_env({"SGLANG_API_BASE": upstream.url, "REASONING_STORE": store_path()}))
    config = HypercornConfig()
    config.bind, config.accesslog, config.keep_alive_timeout = ["127.0.0.1:0"], None, 3600
    base = (await nursery.start(serve, app, config))[0]
    for target in ("/health", "/metrics", "/", "/nope", "/v1/models"):
        for request in (raw_request("GET", target), b"GET " + target.encode() + b" HTTP/1.0\r\n\r\n"):
            host, port = base.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(request)
            response = b""
            with trio.fail_after(TEST_TIMEOUT / 4):
                while piece := await stream.receive_some(65536):  # b"": the server closed
                    response += piece
            await stream.aclose()
            assert status_of(response) in (200, 404), (target, response[:100])
    host, port = base.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    for _ in range(2):  # keep-alive: both answered on one connection
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = b""
        with trio.fail_after(TEST_TIMEOUT / 4):
            while b'"ok"}' not in response:
                response += await stream.receive_some(65536)
        assert status_of(response) == 200
    await stream.aclose()


ANOTHER_UID = 65534  # "nobody": a second local user, for the files it plants


def another_users(path: Path, mode: int) -> Path:
    os.chown(path, ANOTHER_UID, ANOTHER_UID, follow_symlinks=False)
    path.chmod(mode)
    return path


async def restored_after_one_turn(running: Running, local: str = "127.0.0.1") -> bool:
    """A tool loop's first turn, then the client sends it back without its reasoning: was it put back?"""
    script, thought = _leaky_turn(0, stream=True)
    running.upstream.script(script, Script(body=completion("done"), content_type="application/json"))
    http = httpx.Client(transport=httpx.HTTPTransport(local_address=local))
    messages: list[dict] = [{"role": "user", "content": "fix the bug"}]
    content, reasoning, calls = await sdk_call(lambda: _turn(running, messages, True, http))
    assert reasoning == thought
    messages += [{"role": "assistant", "content": content, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": "x"}]
    await sdk_call(lambda: _turn(running, messages, False, http))
    sent = [m.get("reasoning_content") for m in running.upstream.seen[-1].json()["messages"] if m["role"] == "assistant"]
    return sent == [thought]


@pytest.mark.edge
async def test_a_store_another_user_could_touch_is_refused(nursery: trio.Nursery, upstream: FakeSGLang,
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 2: the store's directory must be kimiproxy's own (0700, lstat), and the database, its WAL,
    shared memory and journal files too. Planted by another user (a -wal and -shm of 0666 let them read
    every turn and forge the reasoning restored into someone else's request), each is refused: continuity
    off with one warning, the proxy serving, the planted file untouched. A private directory works."""
    caplog.set_level(logging.WARNING, logger="kimiproxy")

    def layout(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir(mode=0o700)
        return directory

    cases: list[tuple[str, Path]] = []
    shared = layout("shared")
    shared.chmod(0o777)
    cases.append(("a directory anyone can write", shared / "r.sqlite3"))
    real = layout("real")
    (tmp_path / "link").symlink_to(real)
    cases.append(("a symlinked directory", tmp_path / "link" / "r.sqlite3"))
    loose = layout("loose")
    (loose / "r.sqlite3").write_bytes(b"")
    (loose / "r.sqlite3").chmod(0o644)
    cases.append(("a database others can read", loose / "r.sqlite3"))
    journal = layout("journal")
    (journal / "r.sqlite3-journal").symlink_to(tmp_path / "elsewhere")
    cases.append(("a journal that is a symlink", journal / "r.sqlite3"))
    if os.getuid() == 0:  # a second user's files can be made only by root
        for suffix in ("-wal", "-shm"):
            planted = layout("planted" + suffix)
            for planted_suffix in ("-wal", "-shm"):
                (planted / ("r.sqlite3" + planted_suffix)).touch()
                another_users(planted / ("r.sqlite3" + planted_suffix), 0o666)
            cases.append((f"a planted {suffix} of another user's", planted / "r.sqlite3"))
        owned = layout("owned")
        (owned / "r.sqlite3").touch()
        another_users(owned / "r.sqlite3", 0o600)
        cases.append(("a database of another user's", owned / "r.sqlite3"))
        theirs = another_users(layout("theirs"), 0o700)
        cases.append(("a directory of another user's", theirs / "r.sqlite3"))
    for why, path in cases:
        caplog.clear()
        before = {p: (p.lstat().st_size, p.lstat().st_uid) for p in path.parent.glob("*")}
        running = await start_proxy(nursery, upstream.url, REASONING_STORE=str(path))
        running.upstream = upstream
        assert not await restored_after_one_turn(running), why
        assert caplog.text.count("reasoning continuity is off") == 1, why
        assert {p: (p.lstat().st_size, p.lstat().st_uid) for p in path.parent.glob("*")} == before, why
    assert not (tmp_path / "elsewhere").exists()
    running = await start_proxy(nursery, upstream.url, REASONING_STORE=str(tmp_path / "new" / "r.sqlite3"))
    running.upstream = upstream
    assert await restored_after_one_turn(running)  # a directory it made itself: 0700, the files 0600
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "new").iterdir())


@pytest.mark.edge
async def test_the_default_store_is_private_and_per_instance(nursery: trio.Nursery, upstream: FakeSGLang,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 2 and 6: by default the store is in the user's cache directory, not the shared temp
    directory, in a directory of its own; two instances of one user (two ports) on it share nothing,
    even under the same key name; given one REASONING_STORE, they share (test_reasoning_shared_by_...)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert kp.default_store() == str(tmp_path / "cache" / "kimiproxy" / "reasoning.sqlite3")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kp.default_store() == str(tmp_path / "home" / ".cache" / "kimiproxy" / "reasoning.sqlite3")
    one = await start_proxy(nursery, upstream.url, REASONING_STORE="", PROXY_API_KEY="alice:sk-test-secret-123")
    other = await start_proxy(nursery, upstream.url, REASONING_STORE="", PROXY_API_KEY="alice:key-2")
    one.upstream = other.upstream = upstream
    script, thought = _leaky_turn(0, stream=True)
    upstream.script(script)
    messages: list[dict] = [{"role": "user", "content": "fix the bug"}]
    content, reasoning, calls = await sdk_call(lambda: _turn(Running(upstream, one.base, one.app), messages, True))
    messages += [{"role": "assistant", "content": content, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": "x"}]
    for running, key, restored in ((other, "key-2", False), (one, "sk-test-secret-123", True)):
        upstream.script(Script(body=completion("done"), content_type="application/json"))
        sdk = openai.OpenAI(base_url=running.base + "/v1", api_key=key, max_retries=0)
        await sdk_call(lambda: sdk.chat.completions.create(model="m", messages=messages, tools=TOOLS))
        sent = [m.get("reasoning_content") for m in upstream.seen[-1].json()["messages"] if m["role"] == "assistant"]
        assert sent == ([thought] if restored else [None]), running.base
    store = tmp_path / "home" / ".cache" / "kimiproxy"
    assert store.stat().st_mode & 0o777 == 0o700 and (store / "reasoning.sqlite3").exists()


@pytest.mark.edge
async def test_anonymous_clients_from_other_addresses_get_no_reasoning_of_each_other(
        nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    """Finding 6: without keys, a client that repeats another's task and call from another address gets
    none of its reasoning; from the same address (the only thing that tells anonymous clients apart,
    README) it is restored."""
    running = await start_proxy(nursery, upstream.url)
    running.upstream = upstream
    script, thought = _leaky_turn(0, stream=True)
    upstream.script(script)
    messages: list[dict] = [{"role": "user", "content": "fix the bug"}]
    content, reasoning, calls = await sdk_call(lambda: _turn(running, messages, True))
    messages += [{"role": "assistant", "content": content, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": "x"}]
    for local, restored in (("127.0.0.2", False), ("127.0.0.1", True)):
        http = httpx.Client(transport=httpx.HTTPTransport(local_address=local))
        upstream.script(Script(body=completion("done"), content_type="application/json"))
        await sdk_call(lambda: _turn(running, messages, False, http))
        sent = [m.get("reasoning_content") for m in upstream.seen[-1].json()["messages"] if m["role"] == "assistant"]
        assert sent == ([thought] if restored else [None]), local


@pytest.mark.edge
async def test_captures_only_where_nobody_else_can_plant_or_read(nursery: trio.Nursery, upstream: FakeSGLang,
                                                                  tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 3: CAPTURE_DIR is checked like the store (a directory others can write, or a symlink, turns
    captures off with one warning); capture names cannot be guessed from the request id; pruning touches
    only kimiproxy's own regular files, so a planted huge file or a symlink is neither counted nor followed."""
    caplog.set_level(logging.INFO, logger="kimiproxy")
    leak = f"{S}{B}functions.read_file:0{A}{{\"path\": \"a.py\"}}{Z}{E}"

    async def leaky_requests(running: Running, count: int) -> None:
        for _ in range(count):
            upstream.script(Script(steps=stream_of(reasoning=[leak])))
        async with httpx.AsyncClient(base_url=running.base) as client:
            for _ in range(count):
                r = await client.post("/v1/chat/completions", headers={"X-Request-ID": "same-id"},
                                      json={"messages": [{"role": "user", "content": "x"}], "stream": True, "tools": TOOLS})
                assert r.status_code == 200 and "functions.read_file:0" in r.text

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real").mkdir(mode=0o700)
    for refused in (shared, tmp_path / "link"):
        caplog.clear()
        running = await start_proxy(nursery, upstream.url, CAPTURE_DIR=str(refused))
        await leaky_requests(running, 2)
        with trio.fail_after(10):
            while "captures are off" not in caplog.text:
                await trio.sleep(0.02)
        assert caplog.text.count("captures are off") == 1 and list(refused.iterdir()) == []
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    outside = tmp_path / "outside.txt"
    outside.write_text("not a capture")
    (private / "kimiproxy-capture-00000000-000000-link.json").symlink_to(outside)
    planted = private / "kimiproxy-capture-00000000-000000-planted.json"
    with open(planted, "wb") as f:
        f.truncate(2 * 1024 ** 3)  # 2 GiB, sparse: past CAPTURE_MAX_MB on its own
    os.utime(planted, (0, 0))
    if os.getuid() == 0:
        another_users(planted, 0o644)
    caplog.clear()
    running = await start_proxy(nursery, upstream.url, CAPTURE_DIR=str(private), CAPTURE_MAX_FILES="2")
    await leaky_requests(running, 4)
    with trio.fail_after(10):
        while caplog.text.count("captured (") < 4:
            await trio.sleep(0.02)
    ours = sorted(p.name for p in private.iterdir() if not p.is_symlink() and p != planted)
    assert len(ours) == 2, ours
    assert all(re.fullmatch(r"kimiproxy-capture-\d{8}-\d{6}-same-id-[0-9a-f]{16}\.json", name) for name in ours)
    assert planted.stat().st_size == 2 * 1024 ** 3 and outside.read_text() == "not a capture"
    assert (private / "kimiproxy-capture-00000000-000000-link.json").is_symlink()


# ---------------------------------------------------------------------------------------------------
# The page (GET / in a browser) and its data (GET /status.json)
# ---------------------------------------------------------------------------------------------------

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
PAGE_KEYS = "admin:key-admin-0,alice:key-alice-1,bob:key-bob-2"
# A leaked call without its section wrapper: the repair says which rule it needed.
UNWRAPPED = f"Reading it.{B}functions.read_file:0{A}{{\"path\": \"a.py\"}}{Z}"


def test_the_page_for_browsers_and_json_for_everyone_else() -> None:
    assert kp.prefers_html(BROWSER_ACCEPT) and kp.prefers_html("text/html")
    assert kp.prefers_html("application/json;q=0.5, text/*")
    for accept in ("", "*/*", "application/json", "application/json, text/html;q=0.9", "text/html;q=0, */*",
                   "text/html;q=0.8, application/*", "application/json, text/html"):
        assert not kp.prefers_html(accept), accept


async def page_status(client: httpx.AsyncClient, key: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await client.get("/status.json", headers=headers, **kw)


async def status_until(client: httpx.AsyncClient, key: str | None, done: Any, what: str, limit: float = 30) -> dict:
    """/status.json until ``done(status)`` holds; a failure past ``limit`` seconds says what was awaited."""
    status: dict = {}
    with trio.move_on_after(limit):
        while True:
            response = await page_status(client, key)
            assert response.status_code == 200, response.text
            status = response.json()
            if done(status):
                return status
            await trio.sleep(0.1)
    raise AssertionError(f"status never showed {what}: {json.dumps(status)[:2000]}")


@pytest.mark.edge
async def test_the_page_is_one_offline_file_and_the_json_stays(proxy: Running) -> None:
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        page = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
        info = await client.get("/")
        asked = await client.get("/", headers={"Accept": "application/json"})
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    html = page.text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert "status.json" in html and "fetch(" in html and "setTimeout(tick, POLL)" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html) and "@import" not in html  # no CDN
    assert len(page.content) < 16_000
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["vary"] == "Accept" and info.headers["vary"] == "Accept"
    for response in (info, asked):
        assert response.headers["content-type"] == "application/json"
        assert {"name", "version", "upstream_parsers", "warning", "repairs", "heartbeat_interval", "auth",
                "reasoning_continuity", "capture"} <= set(response.json())


@pytest.mark.edge
async def test_status_shows_streams_in_flight_and_what_each_request_needed(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path) -> None:
    """A stream in flight with its key, model and count so far; the finished requests with status,
    tokens and repairs by rule; the capture the repaired one left; each key's use."""
    running = await start_proxy(nursery, upstream.url, CAPTURE_DIR=str(tmp_path / "captures"))
    gate = trio.Event()
    upstream.script(Script(steps=stream_of(reasoning=[UNWRAPPED])),
                    Script(steps=stream_of(content=["one ", "two ", "three "])[:3] + [gate] +
                           stream_of(content=["four"])[1:]))
    request = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "x"}], "stream": True,
               "tools": TOOLS}
    async with httpx.AsyncClient(base_url=running.base, timeout=30) as client:
        assert (await client.post("/v1/chat/completions", json=request)).status_code == 200
        finished = trio.Event()

        async def gated() -> None:
            await client.post("/v1/chat/completions", json=dict(request, model="kimi-gated"))
            finished.set()

        nursery.start_soon(gated)
        status = await status_until(client, None, lambda s: s["in_flight"] and s["in_flight"][0]["tokens"] == 3,
                                    "the gated stream with 3 chunks")
        flight = status["in_flight"][0]
        assert (flight["key"], flight["model"], flight["path"]) == ("anonymous", "kimi-gated", "/v1/chat/completions")
        assert flight["age"] >= 0 and "estimated" in status["tokens_note"]
        assert status["captures"] and status["captures"][0]["reasons"] == ["repaired"]
        assert status["captures"][0]["name"].startswith("kimiproxy-capture-")
        [repaired] = status["requests"]
        assert repaired["status"] == 200 and repaired["model"] == "kimi-k2-thinking"
        assert "no-section-wrapper" in repaired["repairs"] and repaired["capture"] == status["captures"][0]["name"]
        assert (repaired["prompt_tokens"], repaired["completion_tokens"]) == (12, 8)
        assert status["keys"] == [{"key": "anonymous", "requests": 1, "prompt_tokens": 12, "completion_tokens": 8,
                                   "repairs": sum(repaired["repairs"].values()), "in_flight": 1}]
        assert status["upstreams"] == [{"name": "default", "models": [], "parsers": {
            "tool_call_parser": None, "reasoning_parser": "kimi_k2"}, "warning": None}]
        gate.set()
        with trio.fail_after(10):
            await finished.wait()
        status = await status_until(client, None, lambda s: not s["in_flight"] and len(s["requests"]) == 2,
                                    "the gated stream finished")
    last = status["requests"][0]
    assert (last["model"], last["status"], last["repairs"], last["chunks"]) == ("kimi-gated", 200, {}, 7)
    assert status["keys"][0]["requests"] == 2 and status["keys"][0]["in_flight"] == 0


@pytest.mark.edge
async def test_with_keys_the_status_needs_one_and_a_key_sees_its_own(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    """The page's shell is served to anyone; its data needs a key. A key sees its own requests and use
    only; the key named admin sees everyone's."""
    running = await start_proxy(nursery, upstream.url, PROXY_API_KEY=PAGE_KEYS)
    async with httpx.AsyncClient(base_url=running.base, timeout=30) as client:
        for key in ("key-alice-1", "key-bob-2", "key-bob-2"):
            r = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "kimi", "messages": []})
            assert r.status_code == 200
        page = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
        refused = [await page_status(client), await page_status(client, "key-wrong"),
                   await client.get("/status.json", params={"key": "key-admin-0"})]
        alice, bob, admin = [(await page_status(client, k)).json() for k in ("key-alice-1", "key-bob-2", "key-admin-0")]
        anthropic_style = await client.get("/status.json", headers={"x-api-key": "key-bob-2"})
    assert page.status_code == 200 and "alice" not in page.text and "bob" not in page.text
    for r in refused:
        assert r.status_code == 401 and "error" in r.json() and "alice" not in r.text
    assert [r["key"] for r in alice["requests"]] == ["alice"] and [k["key"] for k in alice["keys"]] == ["alice"]
    assert alice["viewer"] == "key alice: its own requests"
    assert [r["key"] for r in bob["requests"]] == ["bob", "bob"] and bob["keys"][0]["requests"] == 2
    assert anthropic_style.json()["requests"] == bob["requests"]
    assert sorted(r["key"] for r in admin["requests"]) == ["alice", "bob", "bob"] and admin["viewer"] == "every key"
    assert [(k["key"], k["requests"]) for k in admin["keys"]] == [("alice", 1), ("bob", 2)]
    assert all("key-" not in json.dumps(doc) for doc in (alice, bob, admin))  # names, never keys


@contextlib.contextmanager
def log_on_failure(proc: Any) -> Any:
    try:
        yield
    except BaseException as exc:
        raise AssertionError(f"{exc!r}; the proxy's log:\n{process_log(proc)[-6000:]}") from exc


@pytest.mark.slow
async def test_status_under_hypercorn_workers_shows_the_whole_box(upstream: FakeSGLang) -> None:
    """`hypercorn -w 2`: whichever worker answers /status.json shows the requests both served, and a
    stream in flight on either."""
    async with proxy_process(HYPERCORN_ARGS + ["-w", "2"], {"SGLANG_API_BASE": upstream.url}) as (base, proc), \
            httpx.AsyncClient(base_url=base, timeout=30) as client:
        with log_on_failure(proc):
            workers: set[int] = set()
            with trio.fail_after(40):
                while len(workers) < 2:  # new connections, at once: whichever worker accepts each
                    async with httpx.AsyncClient(base_url=base, timeout=30) as fresh, trio.open_nursery() as n:
                        for _ in range(8):
                            n.start_soon(functools.partial(fresh.post, "/v1/chat/completions",
                                                           json={"model": "kimi", "messages": []}))
                    status = (await page_status(client)).json()
                    workers = {r["worker"] for r in status["requests"]}
                    await trio.sleep(0.2)
            gate = trio.Event()
            upstream.script(Script(steps=stream_of(content=["a", "b"])[:3] + [gate] + stream_of()[1:]))
            async with trio.open_nursery() as n:
                n.start_soon(functools.partial(client.post, "/v1/chat/completions", json={
                    "model": "kimi-gated", "messages": [], "stream": True}))
                await status_until(client, None, lambda s: s["in_flight"], "the stream in flight")
                # Each worker's batch reaches the file within a second: every answer shows both workers'
                # requests and the stream in flight, whoever gives it.
                await trio.sleep(kp.PAGE_FLUSH_INTERVAL * 2)
                for _ in range(6):
                    async with httpx.AsyncClient(base_url=base, timeout=30) as fresh:  # a new connection: any worker
                        status = (await page_status(fresh)).json()
                    assert {r["worker"] for r in status["requests"]} == workers, status["requests"]
                    assert min(sum(k["requests"] for k in status["keys"]), kp.PAGE_REQUESTS) == len(status["requests"])
                    assert [(f["model"], f["tokens"]) for f in status["in_flight"]] == [("kimi-gated", 3)]
                gate.set()


@pytest.mark.edge
async def test_a_page_file_nobody_else_may_touch_or_the_workers_own_view(nursery: trio.Nursery, upstream: FakeSGLang,
                                                                         tmp_path: Path) -> None:
    """The page's file sits beside the reasoning store, 0600; where it cannot be used (here the
    directory is open to others) the page shows this worker's own requests, and says so."""
    store = tmp_path / "private" / "reasoning.sqlite3"
    running = await start_proxy(nursery, upstream.url, REASONING_STORE=str(store))
    async with httpx.AsyncClient(base_url=running.base) as client:
        await client.post("/v1/chat/completions", json={"model": "kimi", "messages": []})
        status = (await page_status(client)).json()
    page_file = store.with_name("reasoning.page.sqlite3")
    assert status["shared"] and len(status["requests"]) == 1
    assert page_file.stat().st_mode & 0o077 == 0 and store.parent.stat().st_mode & 0o077 == 0
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    running = await start_proxy(nursery, upstream.url, REASONING_STORE=str(open_dir / "r.sqlite3"),
                                RESTORE_REASONING="false")
    async with httpx.AsyncClient(base_url=running.base) as client:
        await client.post("/v1/chat/completions", json={"model": "kimi", "messages": []})
        status = (await page_status(client)).json()
    assert not status["shared"] and "one worker" in status["shared_note"]
    assert [(r["model"], r["status"]) for r in status["requests"]] == [("kimi", 200)]
    assert not list(open_dir.iterdir())


# -- a real browser: Debian's chromium, driven over its DevTools pipe (no websocket client needed) -----

def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Chromium:
    """Headless chromium with --remote-debugging-pipe: DevTools messages as NUL-terminated JSON on its
    fds 3 (in) and 4 (out), one page attached."""

    def __init__(self, proc: Any, to_browser: int, from_browser: int) -> None:
        self.proc = proc
        self._out = trio.lowlevel.FdStream(to_browser)
        self._in = trio.lowlevel.FdStream(from_browser)
        self._buffer = b""
        self._ids = itertools.count(1)
        self.session: str | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, exe: str, url: str, size: tuple[int, int] = (1280, 900)) -> Any:
        profile = tempfile.TemporaryDirectory(prefix="kimiproxy-test-chromium-")
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()

        def fds() -> None:  # in the child: its DevTools pipe on 3 and 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        proc = await trio.lowlevel.open_process(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile.name}", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-default-browser-check",
             "--mute-audio", f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(3, 4),
            preexec_fn=fds)
        os.close(to_r)
        os.close(from_w)
        browser = cls(proc, to_w, from_r)
        try:
            with trio.fail_after(PROCESS_START_LIMIT):
                target = await browser.call("Target.createTarget", url=url)
                browser.session = (await browser.call("Target.attachToTarget", targetId=target["targetId"],
                                                      flatten=True))["sessionId"]
            yield browser
        finally:
            with trio.move_on_after(5):
                with contextlib.suppress(Exception):
                    await browser.call("Browser.close", page=False)
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await browser._out.aclose()
            await browser._in.aclose()
            profile.cleanup()

    async def call(self, method: str, page: bool = True, **params: Any) -> dict:
        n = next(self._ids)
        message: dict = {"id": n, "method": method, "params": params}
        if page and self.session:
            message["sessionId"] = self.session
        await self._out.send_all(json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                data = await self._in.receive_some(1 << 20)
                if not data:
                    raise EOFError("chromium closed its DevTools pipe")
                self._buffer += data
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == n:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def text(self, element: str) -> str:
        return await self.js(f"(document.getElementById({json.dumps(element)}) || {{}}).innerText || ''") or ""

    async def until(self, expression: str, what: str, limit: float = 30) -> Any:
        """Evaluate ``expression`` until it is truthy (real time: the page polls every 2 s by itself)."""
        value = None
        with trio.move_on_after(limit):
            while True:
                value = await self.js(expression)
                if value:
                    return value
                await trio.sleep(0.1)
        body = await self.text("main")
        raise AssertionError(f"the page never showed {what}; it shows:\n{body[:3000]}")


CHROMIUM = find_chromium()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="no chromium found (apt-get install chromium); CI installs it and runs this test")
async def test_the_page_in_a_real_browser(nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path) -> None:
    """Headless chromium opens the page with keys on: the form takes the admin key, then the page
    shows alice's stream in flight (key, model), the repair her leaked call needed (by rule), the
    capture it left, and, without a reload, the stream in the last requests once it ends."""
    assert CHROMIUM is not None, "CI must have chromium: .ci/run installs it"
    running = await start_proxy(nursery, upstream.url, PROXY_API_KEY=PAGE_KEYS, CAPTURE_DIR=str(tmp_path / "c"))
    gate = trio.Event()
    upstream.script(Script(steps=stream_of(reasoning=[UNWRAPPED])),
                    Script(steps=stream_of(content=["one ", "two "])[:3] + [gate] + stream_of(content=["three"])[1:]))
    alice = {"Authorization": "Bearer key-alice-1"}
    request = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "x"}], "stream": True,
               "tools": TOOLS}
    async with httpx.AsyncClient(base_url=running.base, timeout=60) as client:
        assert (await client.post("/v1/chat/completions", headers=alice, json=request)).status_code == 200
        finished = trio.Event()

        async def gated() -> None:
            await client.post("/v1/chat/completions", headers=alice, json=dict(request, model="kimi-gated-stream"))
            finished.set()

        nursery.start_soon(gated)
        async with Chromium.open(CHROMIUM, running.base + "/") as page:
            await page.until("!document.getElementById('keyform').hidden", "the key form (no key yet)")
            assert "nothing without a key" in await page.text("state") and "alice" not in await page.text("main")
            await page.js("document.getElementById('key').value = 'key-admin-0';"
                          "document.getElementById('keyform').requestSubmit(); window.notReloaded = true")
            await page.until("document.getElementById('flight').innerText.includes('kimi-gated-stream')",
                             "the gated stream in flight")
            flight = await page.text("flight")
            assert "alice" in flight and "kimi-gated-stream" in flight
            requests = await page.text("requests")
            assert "no-section-wrapper" in requests and "kimi-k2-thinking" in requests and "12 + 8" in requests
            assert "repaired" in await page.text("captures-section")
            assert "kimi_k2" in await page.text("upstreams") and "every key" in await page.text("state")
            polls = int(await page.js("document.body.dataset.updates"))
            gate.set()
            with trio.fail_after(30):
                await finished.wait()
            await page.until("document.getElementById('flight').innerText.includes('nothing in flight')",
                             "the stream ended")
            requests = await page.text("requests")
            assert "kimi-gated-stream" in requests and requests.count("alice") == 2
            assert await page.js("window.notReloaded === true")  # the same document: it updated itself
            assert int(await page.js("document.body.dataset.updates")) > polls
            keys = await page.text("keys")
            assert "alice" in keys and "bob" not in keys
            shot = await page.call("Page.captureScreenshot", format="png")
            assert base64.b64decode(shot["data"])[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------
# Anthropic's Messages API (Claude Code): the same repair, the official anthropic SDK as the client
# ---------------------------------------------------------------------------------------------------

import anthropic  # noqa: E402  (the section's own client)

SECTION_B, SECTION_E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_B, ARG_B, CALL_E = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
READ_TOOL = {"name": "Read", "description": "Read a file",
             "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}},
                              "required": ["file_path"], "additionalProperties": False}}
WRITE_TOOL = {"name": "Write", "description": "Write a file",
              "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"},
                                                                 "content": {"type": "string"}},
                               "required": ["file_path", "content"]}}
TOOL_USE_ID_RE = re.compile(r"[a-zA-Z0-9_-]+")  # Anthropic's own pattern for tool_use ids


def claude(running: Running, key: str = "sk-test-secret-123", **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=running.base, api_key=key, max_retries=0, timeout=20, **kw)


def leaked_read(path: str = "/tmp/a.txt", counter: int = 0, pieces: int = 1) -> list[str]:
    """A Read call the model wrote into its thinking, as SGLang without a tool parser streams it."""
    args = json.dumps({"file_path": path})
    cut = [args[i * len(args) // pieces:(i + 1) * len(args) // pieces] for i in range(pieces)]
    return ["Let me read it. ", f"{SECTION_B}{CALL_B}functions.Read:{counter}{ARG_B}", *cut, f"{CALL_E}{SECTION_E}"]


@pytest.mark.edge
async def test_anthropic_sdk_stream_and_whole_get_the_leaked_call_as_tool_use(proxy: Running) -> None:
    """A call leaked into the thinking reaches the anthropic SDK as a tool_use block, streamed and whole:
    thinking first, the tool_use with an id in Anthropic's pattern and its input, stop_reason tool_use,
    usage; SGLang got a chat completion request with the system prompt, the tools as functions, and
    the usage chunk asked for."""
    proxy.upstream.script(Script(steps=stream_of(reasoning=leaked_read(pieces=3))),
                          Script(body=completion(content=None, reasoning="".join(leaked_read())),
                                 content_type="application/json"))
    ask = dict(model="kimi-k2-thinking", max_tokens=32000, tools=[READ_TOOL],
               system=[{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
               messages=[{"role": "user", "content": "read /tmp/a.txt"}],
               thinking={"type": "adaptive"}, metadata={"user_id": "user-1"})

    def streamed() -> tuple[list, Any]:
        with claude(proxy).messages.stream(**ask) as stream:
            kinds = [event.type for event in stream]
            return kinds, stream.get_final_message()

    kinds, final = await sdk_call(streamed)
    whole = await sdk_call(lambda: claude(proxy).messages.create(**ask))
    for message in (final, whole):
        assert [block.type for block in message.content] == ["thinking", "tool_use"]
        assert message.content[0].thinking == "Let me read it. "
        call = message.content[1]
        assert (call.name, call.input) == ("Read", {"file_path": "/tmp/a.txt"})
        assert TOOL_USE_ID_RE.fullmatch(call.id), call.id
        assert message.stop_reason == "tool_use"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 8)
    assert final.content[1].id == whole.content[1].id
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    sent = [seen.json() for seen in proxy.upstream.seen[-2:]]
    assert [s.get("stream") for s in sent] == [True, False]
    assert sent[0]["stream_options"] == {"include_usage": True}
    for body in sent:
        assert proxy.upstream.seen[-1].path == "/v1/chat/completions"
        assert body["messages"] == [{"role": "system", "content": "You are Claude Code."},
                                    {"role": "user", "content": "read /tmp/a.txt"}]
        assert body["tools"] == [{"type": "function", "function": {
            "name": "Read", "description": "Read a file", "parameters": READ_TOOL["input_schema"]}}]
        assert (body["tool_choice"], body["max_tokens"], body["user"]) == ("auto", 32000, "user-1")


@pytest.mark.edge
async def test_anthropic_tool_use_streams_live_name_before_the_arguments(proxy: Running) -> None:
    """The tool_use block starts, with its name, while the model is still writing the arguments: the
    fake holds the rest of them until the client has seen the block start and an input_json_delta."""
    gate = trio.Event()
    read = leaked_read(path="/tmp/" + "x" * 40 + ".txt", pieces=2)
    steps = stream_of(reasoning=read)
    at = steps.index(sse(chunk({"reasoning_content": read[3]})))  # the second half of the arguments
    proxy.upstream.script(Script(steps=[*steps[:at], gate, *steps[at:]]))
    token = trio.lowlevel.current_trio_token()

    def streamed() -> list:
        seen = []
        stream = claude(proxy).messages.create(model="k", max_tokens=100, tools=[READ_TOOL], stream=True,
                                               messages=[{"role": "user", "content": "go"}])
        for event in stream:
            seen.append(event)
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta" and not gate.is_set():
                trio.from_thread.run_sync(gate.set, trio_token=token)
        return seen

    seen = await sdk_call(streamed)
    start = next(e for e in seen if e.type == "content_block_start" and e.content_block.type == "tool_use")
    assert start.content_block.name == "Read"
    pieces = [e.delta.partial_json for e in seen if e.type == "content_block_delta"
              and e.delta.type == "input_json_delta"]
    assert len(pieces) >= 2 and json.loads("".join(pieces)) == {"file_path": "/tmp/" + "x" * 40 + ".txt"}
    with pytest.raises(ValueError):
        json.loads(pieces[0])  # the first piece went out before the arguments were complete
    thinking = [e for e in seen if e.type == "content_block_delta" and e.delta.type == "signature_delta"]
    assert len(thinking) == 1  # the thinking block ends with its signature


@pytest.mark.edge
async def test_anthropic_history_goes_upstream_as_the_model_wrote_it(proxy: Running) -> None:
    """The second turn of a tool loop, as Claude Code sends it: the thinking block goes to SGLang as the
    turn's reasoning_content (never as text), the tool_use id back to the model's own canonical id, the
    tool_result a tool message with that id, a system message inside messages kept where it stands,
    redacted thinking dropped, and the file content byte for byte."""
    proxy.upstream.script(Script(body=completion(content=None, reasoning="".join(leaked_read())),
                                 content_type="application/json"))
    first = await sdk_call(lambda: claude(proxy).messages.create(
        model="k", max_tokens=100, tools=[READ_TOOL], messages=[{"role": "user", "content": "go"}]))
    thinking, call = first.content
    text = "line one\n\ttabbed \u00e9\u4e2d \"quoted\" \\ back\r\n"
    history = [{"role": "system", "content": "cwd: /work"}, {"role": "user", "content": [{"type": "text", "text": "go"}]},
               {"role": "assistant", "content": [
                   {"type": "thinking", "thinking": thinking.thinking, "signature": thinking.signature},
                   {"type": "redacted_thinking", "data": "opaque"},
                   {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": [{"type": "text", "text": text}], "is_error": False},
                                            {"type": "text", "text": "now write it"}]}]
    await sdk_call(lambda: claude(proxy).messages.create(model="k", max_tokens=100, tools=[READ_TOOL],
                                                         messages=history))
    sent = proxy.upstream.seen[-1].json()["messages"]
    assert sent == [
        {"role": "system", "content": "cwd: /work"}, {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "reasoning_content": "Let me read it. ", "tool_calls": [
            {"id": "functions.Read:0", "type": "function",
             "function": {"name": "Read", "arguments": '{"file_path": "/tmp/a.txt"}'}}]},
        {"role": "tool", "tool_call_id": "functions.Read:0", "content": text},
        {"role": "user", "content": "now write it"}]


@pytest.mark.edge
async def test_anthropic_errors_in_anthropics_shape(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    """Each failure the way the anthropic SDK reads it: its exception class, Anthropic's error type and
    status; mid-stream, an error event."""
    running = await start_proxy(nursery, upstream.url, PROXY_API_KEY="alice:key-alice-1")
    ok = dict(model="k", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    cases = [
        (lambda: claude(running, key="wrong").messages.create(**ok), anthropic.AuthenticationError, 401,
         "authentication_error"),
        (lambda: claude(running, key="key-alice-1").messages.create(model="k", messages=[{"role": "user", "content": "x"}],
                                                                    max_tokens=0), anthropic.BadRequestError, 400,
         "invalid_request_error"),
        (lambda: claude(running, key="key-alice-1").messages.create(model="k", max_tokens=5, messages=[
            {"role": "robot", "content": "x"}]), anthropic.BadRequestError, 400, "invalid_request_error"),
        (lambda: claude(running, key="key-alice-1").messages.create(**ok), anthropic.InternalServerError, 529,
         "overloaded_error"),
    ]
    upstream.script(Script(status=503, body={"object": "error", "message": "overloaded", "code": 503},
                           content_type="application/json"))
    for call, exc_type, status, kind in cases:
        with pytest.raises(exc_type) as caught:
            await sdk_call(call)
        assert caught.value.status_code == status and caught.value.body["error"]["type"] == kind, caught.value.body
    upstream.script(Script(steps=[*stream_of(reasoning=["thinking"])[:2], "close"]))

    def broken() -> tuple[list, Exception]:
        kinds = []
        try:
            for event in claude(running, key="key-alice-1").messages.create(stream=True, **ok):
                kinds.append(event.type)
        except anthropic.APIStatusError as exc:
            return kinds, exc
        raise AssertionError("no error raised")

    kinds, exc = await sdk_call(broken)
    assert kinds[0] == "message_start" and "message_stop" not in kinds
    assert "upstream stream broke off" in str(exc)
    async with httpx.AsyncClient(base_url=running.base) as client:
        raw = await client.get("/v1/messages", headers={"x-api-key": "key-alice-1"})
        assert raw.status_code == 405 and raw.json()["type"] == "error"
        form = await client.post("/v1/messages", content=b"x", headers={"x-api-key": "key-alice-1",
                                                                         "content-type": "text/plain"})
        assert form.status_code == 415 and form.json()["error"]["type"] == "invalid_request_error"
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert metrics['kimiproxy_key_requests_total{key="alice"}'] == 6  # x-api-key names the key, as Bearer does
    assert metrics['kimiproxy_requests_total{route="/v1/messages",status="529"}'] == 1


@pytest.mark.edge
async def test_anthropic_client_leaving_mid_stream_closes_upstream(proxy: Running) -> None:
    proxy.upstream.script(Script(steps=[*stream_of(reasoning=["a"])[:2], *([2.0] * 10)]))

    def leave() -> list:
        with claude(proxy).messages.stream(model="k", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s:
            for event in s:
                if event.type == "content_block_delta":
                    return [event.type]  # closes the response: the client has gone
        return []

    assert await sdk_call(leave) == ["content_block_delta"]
    with trio.fail_after(10):
        while proxy.upstream.seen[-1].aborted_at is None:
            await trio.sleep(0.02)
    assert not proxy.upstream.seen[-1].completed


@pytest.mark.edge
async def test_anthropic_pings_while_sglang_is_silent(nursery: trio.Nursery, upstream: FakeSGLang) -> None:
    running = await start_proxy(nursery, upstream.url, HEARTBEAT_INTERVAL="0.1")
    upstream.script(Script(steps=[0.6, *stream_of(content=["Hello"])]))
    async with httpx.AsyncClient(base_url=running.base) as client:
        r = await client.post("/v1/messages?beta=true", json={"model": "k", "max_tokens": 5, "stream": True,
                                                              "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    first, second = r.text.split("\n\n")[:2]  # message_start first, as Anthropic's grammar says, then pings
    assert first.startswith("event: message_start") and second + "\n\n" == kp.ANTHROPIC_PING_FRAME.decode()
    assert ": keep-alive" not in r.text
    assert upstream.seen[-1].path == "/v1/chat/completions"  # ?beta=true stays here


@pytest.mark.edge
async def test_anthropic_count_tokens_by_sglang_or_said_to_be_an_estimate(proxy: Running) -> None:
    proxy.upstream.script(Script(body={"tokens": [1, 2, 3], "count": 3, "max_model_len": 262144},
                                 content_type="application/json"),
                          Script(status=404, body={"detail": "Not Found"}, content_type="application/json"))
    ask = dict(model="k", messages=[{"role": "user", "content": "x" * 400}], tools=[READ_TOOL])
    counted = await sdk_call(lambda: claude(proxy).messages.count_tokens(**ask))
    assert counted.input_tokens == 3
    sent = proxy.upstream.seen[-1]
    assert sent.path == "/v1/tokenize" and sent.json()["messages"] == [{"role": "user", "content": "x" * 400}]
    assert sent.json()["tools"][0]["function"]["name"] == "Read"
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        estimated = (await client.post("/v1/messages/count_tokens", json=ask)).json()
    assert estimated["input_tokens"] >= 100 and estimated["estimate"].startswith("characters / 4")


def test_tool_use_ids_round_trip_and_fit_anthropics_pattern() -> None:
    for call_id in ("functions.Read:0", "functions.a.b-c_d:123456", "functions.\u00e9:1"):
        encoded = kp.tool_use_id(call_id)
        assert TOOL_USE_ID_RE.fullmatch(encoded) and kp.call_id_of(encoded) == call_id
    assert kp.tool_use_id("toolu_01AbC") != "toolu_01AbC"  # never mistaken for one of ours on the way back
    for foreign in ("toolu_01AbC", "call_1", "toolu_!!", None, "toolu_" + base64.urlsafe_b64encode(b"x:1").decode()):
        assert kp.call_id_of(foreign) == foreign


class MessagesView:
    """What an Anthropic client builds from a Messages stream, with the grammar checked on the way:
    message_start first; each content block started at the next index, its deltas of its own kind,
    stopped before the next starts (a thinking block's signature last); message_delta, then
    message_stop, last; a tool's input parses as JSON only with its last piece."""

    def __init__(self) -> None:
        self.blocks: list[dict] = []
        self.open: dict | None = None
        self.kinds: list[str] = []
        self.stop_reason: Any = None

    def feed(self, frames: list[bytes]) -> None:
        for frame in b"".join(frames).split(b"\n\n"):
            if not frame:
                continue
            head, data = frame.split(b"\n", 1)
            kind, payload = head.removeprefix(b"event: ").decode(), json.loads(data.removeprefix(b"data: "))
            assert payload["type"] == kind and (self.kinds or kind == "message_start"), (kind, self.kinds)
            assert "message_stop" not in self.kinds
            self.kinds.append(kind)
            if kind == "content_block_start":
                assert self.open is None and payload["index"] == len(self.blocks)
                self.open = dict(payload["content_block"], partial="")
                self.blocks.append(self.open)
            elif kind == "content_block_delta":
                assert self.open is not None and payload["index"] == len(self.blocks) - 1
                delta, block = payload["delta"], self.open
                assert "signature" not in block or not block["signature"], "nothing after the signature"
                if delta["type"] == "input_json_delta":
                    assert block["type"] == "tool_use"
                    with contextlib.suppress(ValueError):  # rule 4.11: complete only with its last piece
                        json.loads(block["partial"])
                        assert False, f"more input after {block['partial']!r} already parsed as JSON"
                    block["partial"] += delta["partial_json"]
                elif delta["type"] == "signature_delta":
                    assert block["type"] == "thinking"
                    block["signature"] = delta["signature"]
                else:
                    field = {"thinking_delta": "thinking", "text_delta": "text"}[delta["type"]]
                    assert block["type"] == field
                    block[field] += delta[field]
            elif kind == "content_block_stop":
                assert self.open is not None and payload["index"] == len(self.blocks) - 1
                if self.open["type"] == "thinking":
                    assert self.open["signature"], "a thinking block ends with its signature"
                if self.open["type"] == "tool_use":
                    self.open["input"] = json.loads(self.open["partial"])
                self.open = None
            elif kind == "message_delta":
                assert self.open is None
                self.stop_reason = payload["delta"]["stop_reason"]
        assert self.kinds[-2:] == ["message_delta", "message_stop"]

    def message(self) -> dict:
        """In the shape of ``run_whole``'s message (tool ids as kimiproxy gave them upstream-side)."""
        of = lambda kind: [b for b in self.blocks if b["type"] == kind]  # noqa: E731
        return {"content": "".join(b["text"] for b in of("text")), "reasoning": "".join(b["thinking"] for b in of("thinking")),
                "tool_calls": [{"id": kp.call_id_of(b["id"]), "name": b["name"], "input": b["input"]}
                               for b in of("tool_use")],
                "finish_reason": {"end_turn": "stop", "tool_use": "tool_calls", "max_tokens": "length"}[self.stop_reason]}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_as_anthropic_events_is_the_same_message(case: dict) -> None:
    """Every corpus case, streamed as SGLang does and cut at every point of its content, encoded as
    Anthropic's events: the grammar holds, and the message is the one the OpenAI side gets, but for
    whitespace between blocks, which opens no block of its own."""
    whole = run_whole(case_ctx(case), case["upstream"])
    want = dict(whole, content=whole["content"].strip(), reasoning=whole["reasoning"].strip(),
                tool_calls=[{"id": c["id"], "name": c["name"], "input": json.loads(c["arguments"])}
                            for c in whole["tool_calls"]])
    content = case["upstream"].get("content") or ""
    for cut in range(0, max(len(content), 1)):
        encoder = kp.AnthropicStream(case_ctx(case), "msg_1", "k", None)
        view = MessagesView()
        view.feed([encoder.opening()] + [f for data in upstream_chunks(case["upstream"], splits_c=[cut])
                                         for f in encoder.feed(data)] + encoder.close())
        got = view.message()
        assert dict(got, content=got["content"].strip(), reasoning=got["reasoning"].strip()) == want, cut
        for kind in ("text", "thinking"):  # what is cut is only whitespace at the ends
            assert all(b[kind].strip() for b in view.blocks if b["type"] == kind)


@pytest.mark.edge
async def test_anthropic_exchanges_are_captured_and_replay(nursery: trio.Nursery, upstream: FakeSGLang,
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An Anthropic exchange is captured as every other (the chat request kimiproxy sent, SGLang's events,
    the Anthropic events the client got) and replays offline to what the client got: streamed, whole,
    and a stream that broke off."""
    caplog.set_level(logging.INFO, logger="kimiproxy")
    captures = tmp_path / "captures"
    running = await start_proxy(nursery, upstream.url, CAPTURE_DIR=str(captures))
    upstream.script(Script(steps=stream_of(reasoning=leaked_read(pieces=2))),
                    Script(body=completion(content=None, reasoning="".join(leaked_read())),
                           content_type="application/json"),
                    Script(steps=[*stream_of(reasoning=leaked_read(pieces=2))[:3], "close"]))
    ask = dict(model="k", max_tokens=100, tools=[READ_TOOL], messages=[{"role": "user", "content": "go"}])
    async with httpx.AsyncClient(base_url=running.base) as client:
        for stream in (True, False, True):
            await client.post("/v1/messages", json=dict(ask, stream=stream))
    with trio.fail_after(10):
        while sum("captured (" in r.getMessage() for r in caplog.records) < 3:
            await trio.sleep(0.02)
    files = sorted(captures.glob("*.json"), key=lambda f: json.loads(f.read_text())["id"])
    docs = [json.loads(f.read_text()) for f in files]
    assert [(d["protocol"], d["stream"]) for d in docs] == [("anthropic", True), ("anthropic", False), ("anthropic", True)]
    assert docs[0]["request"]["tools"][0]["function"]["name"] == "Read"  # the chat request: it replays
    assert "event: content_block_start" in docs[0]["client"]
    for doc in docs:
        then, now = kp.replay_capture(doc)
        assert then == now, (then, now)
    assert "broke off" in then[-1]["error"]["message"] and then[-1]["error"]["type"] == "api_error"
    assert kp.replay_capture(docs[0])[0][0]["tool_calls"] == [
        {"id": "functions.Read:0", "name": "Read", "arguments": '{"file_path": "/tmp/a.txt"}'}]
    replayed = replay_cli(*files)
    assert replayed.returncode == 0 and replayed.stdout.count("same as what the client got then") == 3


@pytest.mark.edge
async def test_anthropic_sglang_error_event_mid_stream_is_an_error_event(proxy: Running) -> None:
    """SGLang reports a failure inside its stream as a data event of its own ({"error": {...}}): an Anthropic
    client gets it as Anthropic's error event, after what came before it, and nothing after."""
    error = {"error": {"message": "scheduler failed", "type": "InternalServerError", "code": 500}}
    proxy.upstream.script(Script(steps=[*stream_of(reasoning=["thinking"])[:2], sse(error), b"data: [DONE]\n\n"]))

    def run() -> tuple[list, Exception]:
        kinds = []
        try:
            for event in claude(proxy).messages.create(model="k", max_tokens=5, stream=True,
                                                       messages=[{"role": "user", "content": "x"}]):
                kinds.append(event.type)
        except anthropic.APIStatusError as exc:
            return kinds, exc
        raise AssertionError("no error raised")

    kinds, exc = await sdk_call(run)
    assert kinds == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop"]
    assert "scheduler failed" in str(exc) and exc.body["error"]["type"] == "api_error"


# ---------------------------------------------------------------------------------------------------
# Issue 16: ids the history holds, SGLang's own ids, repeats under ids that name nothing, calls that
# overlap, K2.5 and later (the template pre-fills <think>)
# ---------------------------------------------------------------------------------------------------

HISTORY_TWO = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": [
    {"id": "functions.exec:0", "type": "function", "function": {"name": "exec", "arguments": '{"command": "pwd"}'}},
    {"id": "functions.read_file:1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "b"}'}}]},
    {"role": "tool", "tool_call_id": "functions.exec:0", "content": "/"},
    {"role": "tool", "tool_call_id": "functions.read_file:1", "content": "b"}]
READ_A = {"id": "functions.read_file:0", "name": "read_file", "arguments": '{"path": "a"}'}
# (name, request {model, messages}, upstream {reasoning_content, content, tool_calls, finish_reason},
#  expected calls [(id, name, arguments)], expected content, reasoning that must be there)
ID_AND_THINKING_FAMILIES = [
    ("sglang's own id stays after a call recovered before it", {},
     {"reasoning_content": f'Look. {S}{B}functions.exec:0{A}{{"command": "ls"}}{Z}{E}', "tool_calls": [READ_A],
      "finish_reason": "tool_calls"},
     [("functions.exec:0", "exec", {"command": "ls"}), ("functions.read_file:0", "read_file", {"path": "a"})], "",
     ["Look."]),
    ("a foreign id's digits never give an id the history holds", {"messages": HISTORY_TWO},
     {"content": f'{S}{B}call_0{A}{{"command": "ls"}}{Z}{E}', "finish_reason": "stop"},
     [("functions.exec:2", "exec", {"command": "ls"})], "", []),
    ("the model's own id that the history holds is given anew", {"messages": HISTORY_TWO},
     {"content": f'{S}{B}functions.read_file:1{A}{{"path": "c"}}{Z}{E}', "finish_reason": "stop"},
     [("functions.read_file:2", "read_file", {"path": "c"})], "", []),
    ("a repeat as markup under an id that names nothing is still a repeat", {},
     {"content": f'{S}{B}call_0{A}{{"path": "a"}}{Z}{E}', "tool_calls": [READ_A], "finish_reason": "tool_calls"},
     [("functions.read_file:0", "read_file", {"path": "a"})], "", []),
    ("k2.5 without a reasoning parser: the answer starts inside the thinking", {"model": "moonshotai/Kimi-K2.5"},
     {"content": "Let me think about a.py.</think>It is fine.", "finish_reason": "stop"},
     [], "It is fine.", ["Let me think about a.py."]),
    ("k2.6 without a reasoning parser: a section inside the thinking", {"model": "kimi-k2.6"},
     {"content": f'I need a.py. {S}{B}functions.read_file:0{A}{{"path": "a.py"}}{Z}{E} Then edit.</think>Reading.',
      "finish_reason": "stop"},
     [("functions.read_file:0", "read_file", {"path": "a.py"})], "Reading.", ["I need a.py.", "Then edit."]),
    ("k2.5 with SGLang's reasoning parser: nothing to move", {"model": "Kimi-K2.5"},
     {"reasoning_content": "Let me think.", "content": "Hello!", "finish_reason": "stop"}, [], "Hello!",
     ["Let me think."]),
    ("k2.5 with thinking turned off: the answer is the answer",
     {"model": "Kimi-K2.5", "chat_template_kwargs": {"thinking": False}},
     {"content": "Hello, I am Kimi.", "finish_reason": "stop"}, [], "Hello, I am Kimi.", []),
    ("malformed JSON the model ended itself passes as written, never shortened", {},
     {"content": f'{S}{B}functions.exec:0{A}{{"command": "ls", "valid": fasle}}{Z}{E}', "finish_reason": "stop"},
     [("functions.exec:0", "exec", '{"command": "ls", "valid": fasle}')], "", []),
    ("a missing comma the model ended itself passes as written", {},
     {"content": f'{S}{B}functions.exec:0{A}{{"command": "ls" "cwd": "/"}}{Z}{E}', "finish_reason": "stop"},
     [("functions.exec:0", "exec", '{"command": "ls" "cwd": "/"}')], "", []),
    ("malformed JSON then cut off by max_tokens is closed as a cut-off is", {},
     {"content": f'{S}{B}functions.exec:0{A}{{"command": "ls", "valid": fasle', "finish_reason": "length"},
     [("functions.exec:0", "exec", {"command": "ls"})], "", []),
    ("an undeclared NAME:IDX heading a call at the start of a line is a call", {},
     {"content": f'Calling it.\ninvalid_tool:0{A}{{"x": 1}}{Z}\nDone.', "finish_reason": "stop"},
     [("functions.invalid_tool:0", "invalid_tool", {"x": 1})], "Calling it. invalid_tool:0 Done.", []),
]


def family_request(request: dict) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "go"}], "tools": TOOLS, **request}


def check_family(message: dict, calls: list, content: str, reasoning: list[str]) -> None:
    """``calls``: (id, name, arguments as parsed, or as the exact text when they are not JSON)."""
    got = [(c["id"], c["name"], c["arguments"] if isinstance(want[2], str) else json.loads(c["arguments"]))
           for c, want in zip(message["tool_calls"], calls)]
    assert len(message["tool_calls"]) == len(calls) and got == calls, message
    assert norm(message["content"]) == content and "</think>" not in message["content"], message
    for text in reasoning:
        assert text in message["reasoning"], message


@pytest.mark.parametrize("name,request_,upstream_,calls,content,reasoning", ID_AND_THINKING_FAMILIES,
                         ids=[f[0] for f in ID_AND_THINKING_FAMILIES])
def test_id_and_thinking_families(name: str, request_: dict, upstream_: dict, calls: list, content: str,
                                  reasoning: list[str]) -> None:
    """Whole, and streamed cut at every point of the reasoning and the content (and per character)."""
    ctx = lambda: kp.RepairContext.from_request(family_request(request_))  # noqa: E731
    whole = run_whole(ctx(), upstream_)
    check_family(whole, calls, content, reasoning)
    length = max(len(upstream_.get("reasoning_content") or ""), len(upstream_.get("content") or ""))
    for points in [[p] for p in range(1, length)] + [list(range(length))]:
        streamed = accumulate(frames_to_events(run_stream(ctx(), upstream_chunks(upstream_, points, points))))
        check_family(streamed, calls, content, reasoning)


@pytest.mark.edge
async def test_id_and_thinking_families_through_the_proxy_with_the_sdk(nursery: trio.Nursery) -> None:
    """Through the running proxy, in front of an SGLang that says it runs no reasoning parser (the
    deployment where a pre-filled <think> is kimiproxy's to read)."""
    nursery.start_soon(_deadline)
    upstream = await nursery.start(FakeSGLang({**SERVER_INFO, "reasoning_parser": None}).serve)
    proxy = await start_proxy(nursery, upstream.url)
    proxy.upstream = upstream
    async with httpx.AsyncClient(base_url=proxy.base) as client:  # the parsers known before the first request
        assert (await client.get("/health?upstream=1")).json()["parsers"]["reasoning_parser"] is None
    for name, request_, upstream_, calls, content, reasoning in ID_AND_THINKING_FAMILIES:
        for stream in (True, False):
            if stream:
                proxy.upstream.script(Script(steps=[sse(json.loads(d)) for d in upstream_chunks(upstream_)[:-1]]
                                             + [b"data: [DONE]\n\n"]))
            else:
                proxy.upstream.script(Script(body=completion(
                    content=upstream_.get("content"), reasoning=upstream_.get("reasoning_content"),
                    finish=upstream_["finish_reason"], tool_calls=[
                        {"id": c["id"], "index": i, "type": "function",
                         "function": {"name": c["name"], "arguments": c["arguments"]}}
                        for i, c in enumerate(upstream_.get("tool_calls") or ())] or None),
                    content_type="application/json"))
            ask = family_request(request_)
            extra = {"chat_template_kwargs": ask.pop("chat_template_kwargs")} if "chat_template_kwargs" in ask else {}

            def call() -> dict:
                client = proxy.sdk()
                if not stream:
                    m = client.chat.completions.create(**ask, extra_body=extra).choices[0].message
                    return {"content": m.content or "", "reasoning": (m.model_extra or {}).get("reasoning_content") or "",
                            "tool_calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                                           for c in m.tool_calls or ()]}
                out: dict = {"content": "", "reasoning": "", "tool_calls": {}}
                for ch in client.chat.completions.create(**ask, stream=True, extra_body=extra):
                    for choice in ch.choices:
                        out["content"] += choice.delta.content or ""
                        out["reasoning"] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                        for tc in choice.delta.tool_calls or ():
                            c = out["tool_calls"].setdefault(tc.index, {"id": tc.id, "name": tc.function.name,
                                                                        "arguments": ""})
                            c["arguments"] += tc.function.arguments or ""
                out["tool_calls"] = list(out["tool_calls"].values())
                return out

            check_family(await sdk_call(call), calls, content, reasoning)


def overlapping_calls_events() -> list[bytes]:
    """A structured call whose arguments go on after a call in the content began (an upstream that
    interleaves its channels)."""
    return [json.dumps(chunk(d)).encode() for d in (
        {"role": "assistant", "content": ""},
        {"tool_calls": [tool_delta(0, "functions.read_file:0", "read_file", '{"pa')]},
        {"content": f'{S}{B}functions.exec:1{A}{{"command": '},
        {"content": f'"ls"}}{Z}{E}'},
        {"tool_calls": [tool_delta(0, None, None, 'th": "a"}')]},
    )] + [json.dumps(chunk({}, finish="tool_calls")).encode(), b"[DONE]"]


def test_calls_that_overlap_go_out_one_after_another() -> None:
    """No piece of a call goes out after a later call began (the Vercel AI SDK ends a call when the
    next begins; Anthropic's content blocks come one after another): the call in the content waits
    for the structured one to end, then goes out whole."""
    frames = run_stream(ctx_for(TOOLS), overlapping_calls_events())
    indices = [tc["index"] for e in frames_to_events(frames) if isinstance(e, dict)
               for c in e.get("choices", ()) for tc in (c["delta"].get("tool_calls") or ())]
    assert indices == sorted(indices) and set(indices) == {0, 1}, indices
    message = accumulate(frames_to_events(frames))
    assert [(c["id"], json.loads(c["arguments"])) for c in message["tool_calls"]] == [
        ("functions.read_file:0", {"path": "a"}), ("functions.exec:1", {"command": "ls"})]
    encoder, view = kp.AnthropicStream(ctx_for(TOOLS), "msg_1", "k", None), MessagesView()
    view.feed([encoder.opening()] + [f for data in overlapping_calls_events() for f in encoder.feed(data)]
              + encoder.close())
    assert [(b["name"], b["input"]) for b in view.blocks if b["type"] == "tool_use"] == [
        ("read_file", {"path": "a"}), ("exec", {"command": "ls"})]


def test_a_call_that_waited_for_its_twin_goes_out_when_the_twin_ends() -> None:
    """A complete call held because an earlier call of another group with its name was incomplete (it
    may repeat it, REPAIR.md 4.9) goes out as soon as that one ends, not at the end of the text."""
    repair = kp.ChoiceRepair(ctx_for(TOOLS))
    repair.feed(content=f'{S}{B}functions.exec:0{A}{{"command": "a"}}{Z}{E}')  # sent
    assert repair.feed(content=f'{S}{B}functions.exec:1{A}{{"command": "b') == []  # may repeat exec:0
    structured = [{"index": 0, "id": "call_9", "type": "function",
                   "function": {"name": "exec", "arguments": '{"command": "c"}'}},
                  {"index": 1, "id": "call_8", "type": "function",
                   "function": {"name": "nope", "arguments": '{"x": 1}'}}]
    assert repair.feed(tool_calls=structured) == []  # complete (the next call ended it), and may repeat exec:1
    sent = repair.feed(content=f'"}}{Z}{E}')
    assert [(d.id, d.arguments) for d in sent] == [("functions.exec:1", '{"command": "b"}'),
                                                   ("functions.exec:2", '{"command": "c"}')]
    assert [d.name for d in repair.finish()] == ["nope"]


def test_a_call_whose_twin_was_dropped_goes_out_live_at_once() -> None:
    """A call held as the possible repeat of an earlier call of another group goes out live as soon
    as that one is dropped (it repeated a call before it): nothing is left for it to repeat, and it
    comes before a call that began after it, as in the whole response."""
    repair = kp.ChoiceRepair(ctx_for(TOOLS))
    structured = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "exec", "arguments": ""}}
    steps = [dict(content=f'{S}{B}functions.exec:0{A}{{"command": "a"}}{Z}'),  # the section stays open
             dict(tool_calls=[dict(structured, function={"name": "exec", "arguments": '{"command": "a'})]),
             dict(content=f'{B}functions.exec:1{A}{{"command": "b'),  # may repeat the structured exec
             dict(tool_calls=[{"index": 0, "function": {"arguments": '"}'}}]),
             dict(tool_calls=[{"index": 1, "id": "call_2", "type": "function",  # ends the structured exec
                               "function": {"name": "search", "arguments": '{"query": "q'}}]),
             dict(content=f'"}}{Z}{E}'), dict(tool_calls=[{"index": 1, "function": {"arguments": '"}'}}])]
    events = [[(d.index, d.id) for d in repair.feed(**step)] for step in steps] + [
        [(d.index, d.id) for d in repair.finish()]]
    assert events[4] == [(1, "functions.exec:1")], events  # at once, live: the structured exec was dropped
    assert events[5] == [(1, None), (2, "functions.search:2")], events  # its end, then the call that waited
    message = kp.Message.of_repair(repair)
    assert [(call[0], call[2]) for call in message.calls] == [
        ("functions.exec:0", '{"command": "a"}'), ("functions.exec:1", '{"command": "b"}'),
        ("functions.search:2", '{"query": "q"}')]

WHITESPACE_AROUND_A_SWITCH = [
    {"reasoning_content": "Plan.", "content": f"\n\n{S}{CALL}{E}", "finish_reason": "stop"},
    {"reasoning_content": "Plan.", "content": f" \n{S}{CALL}{E} more</think>Answer", "finish_reason": "stop"},
    {"reasoning_content": "Plan.", "content": "\n\nThe answer.", "finish_reason": "stop"},
    {"content": f"<think>Plan.</think> \n {S}{CALL}{E}\n\nDone.", "finish_reason": "stop"},
]


@pytest.mark.parametrize("up", WHITESPACE_AROUND_A_SWITCH, ids=range(len(WHITESPACE_AROUND_A_SWITCH)))
def test_whitespace_between_thinking_and_a_section_lands_the_same_however_chunks_fall(up: dict) -> None:
    """Rule 12 to the byte: whitespace after the reasoning, before a section, lands in one channel
    whatever the upstream's chunks (content compared exactly, not after collapsing whitespace)."""
    whole = run_whole(ctx_for(TOOLS), up)
    length = max(len(up.get("reasoning_content") or ""), len(up.get("content") or ""))
    for points in [[p] for p in range(1, length)] + [list(range(length))]:
        streamed = accumulate(frames_to_events(run_stream(ctx_for(TOOLS), upstream_chunks(up, points, points))))
        assert (streamed["reasoning"], streamed["content"]) == (whole["reasoning"], whole["content"]), points
    assert "</think>" not in whole["content"] + whole["reasoning"]
# Several upstreams: a configuration file, routing by model, per-model request fields, reloads
# ---------------------------------------------------------------------------------------------------

def config_file(tmp_path: Path, doc: Any, name: str = "kimiproxy.json") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return str(path)


def two_upstreams(big: FakeSGLang, small: FakeSGLang, **more: Any) -> dict:
    return {"upstreams": {"big": {"url": big.url, "api_key": "key-of-big", "models": ["kimi-k2-thinking"]},
                          "small": {"url": small.url, "api_key": "key-of-small", "models": ["kimi-small"]}},
            **more}


def chats(fake: FakeSGLang) -> list[Any]:
    return [seen for seen in fake.seen if seen.path == "/v1/chat/completions"]


@pytest.mark.edge
async def test_each_model_goes_to_its_own_upstream_with_either_sdk(nursery: trio.Nursery, upstream: FakeSGLang,
                                                                   tmp_path: Path) -> None:
    """Two models, two upstreams: the OpenAI SDK (streamed, whole) and the Anthropic SDK (streamed, whole,
    count_tokens) reach the upstream that serves the model, with that upstream's key; /v1/models lists
    both; an unknown model is a 404 in each protocol's shape, and reaches no upstream; /health?upstream=1
    reports each upstream."""
    small = await nursery.start(FakeSGLang().serve)
    running = await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=config_file(tmp_path, two_upstreams(upstream, small)))
    hi = [{"role": "user", "content": "hi"}]
    for model, fake, key in (("kimi-k2-thinking", upstream, "key-of-big"), ("kimi-small", small, "key-of-small")):
        other = small if fake is upstream else upstream
        before, others = len(chats(fake)), len(other.seen)

        def openai_both() -> tuple[str, str]:
            stream = running.sdk().chat.completions.create(model=model, messages=hi, stream=True)
            streamed = "".join(ev.choices[0].delta.content or "" for ev in stream if ev.choices)
            whole = running.sdk().chat.completions.create(model=model, messages=hi).choices[0].message.content
            return streamed, whole

        def anthropic_all() -> tuple[str, str, int]:
            with claude(running).messages.stream(model=model, max_tokens=50, messages=hi) as stream:
                streamed = "".join(stream.text_stream)
            whole = claude(running).messages.create(model=model, max_tokens=50, messages=hi).content[0].text
            return streamed, whole, claude(running).messages.count_tokens(model=model, messages=hi).input_tokens

        assert await sdk_call(openai_both) == ("Hello!", "Hello!")
        streamed, whole, tokens = await sdk_call(anthropic_all)
        assert (streamed, whole) == ("Hello!", "Hello!") and tokens > 0
        went = chats(fake)[before:]
        assert [seen.json()["model"] for seen in went] == [model] * 4
        assert {seen.headers["authorization"] for seen in went} == {f"Bearer {key}"}  # its own key
        assert [s.path for s in fake.seen[-1:]] == ["/v1/tokenize"]  # count_tokens, by the model's upstream
        assert len(other.seen) == others
    models = await sdk_call(lambda: running.sdk().models.list())
    assert [(m.id, m.owned_by) for m in models.data] == [("kimi-k2-thinking", "big"), ("kimi-small", "small")]
    one = await sdk_call(lambda: running.sdk().models.retrieve("kimi-small"))
    assert one.owned_by == "small"
    assert not [s for fake in (upstream, small) for s in fake.seen if "models" in s.path]  # answered by kimiproxy

    with pytest.raises(openai.NotFoundError) as openai_404:
        await sdk_call(lambda: running.sdk().chat.completions.create(model="gpt-4o", messages=hi))
    error = openai_404.value.body
    assert (error["code"], error["type"]) == (404, "invalid_request_error") and "'gpt-4o'" in error["message"]
    with pytest.raises(anthropic.NotFoundError) as anthropic_404:
        await sdk_call(lambda: claude(running).messages.create(model="claude-opus-4", max_tokens=5, messages=hi))
    assert anthropic_404.value.body["type"] == "error"
    assert anthropic_404.value.body["error"]["type"] == "not_found_error"
    assert not [s for fake in (upstream, small) for s in fake.seen if b"gpt-4o" in s.body or b"claude" in s.body]

    async with httpx.AsyncClient(base_url=running.base) as client:
        health = await client.get("/health?upstream=1")
        completions = await client.post("/v1/completions", json={"model": "kimi-small", "prompt": "p"})
    assert health.status_code == 200, health.text
    assert [(u["name"], u["status"], u["models"], u["parsers"]["reasoning_parser"])
            for u in health.json()["upstreams"]] == [("big", "ok", ["kimi-k2-thinking"], "kimi_k2"),
                                                     ("small", "ok", ["kimi-small"], "kimi_k2")]
    # Pass-through routes are not read: without a default upstream they go to the first one listed.
    assert completions.status_code == 200 and upstream.seen[-1].path == "/v1/completions"


@pytest.mark.edge
async def test_a_default_upstream_takes_the_models_no_upstream_lists(nursery: trio.Nursery, upstream: FakeSGLang,
                                                                     tmp_path: Path) -> None:
    small = await nursery.start(FakeSGLang().serve)
    doc = two_upstreams(upstream, small, default_upstream="small")
    running = await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=config_file(tmp_path, doc))
    hi = [{"role": "user", "content": "hi"}]
    whole = await sdk_call(lambda: running.sdk().chat.completions.create(model="gpt-4o", messages=hi))
    message = await sdk_call(lambda: claude(running).messages.create(model="claude-opus-4", max_tokens=5, messages=hi))
    assert whole.choices[0].message.content == "Hello!" and message.content[0].text == "Hello!"
    assert [s.json()["model"] for s in chats(small)] == ["gpt-4o", "claude-opus-4"] and not chats(upstream)
    async with httpx.AsyncClient(base_url=running.base) as client:
        await client.post("/v1/embeddings", json={"model": "kimi-k2-thinking", "input": "x"})
        assert small.seen[-1].path == "/v1/embeddings"  # pass-through: the default upstream
        health = await client.get("/health?upstream=1")
    assert health.status_code == 200
    # An upstream that does not answer makes /health?upstream=1 a 503 that says which.
    doc["upstreams"]["big"]["url"] = f"http://127.0.0.1:{_free_port()}/v1"
    down = await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=config_file(tmp_path, doc, "down.json"))
    async with httpx.AsyncClient(base_url=down.base) as client:
        health = await client.get("/health?upstream=1")
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert [(u["name"], u["status"]) for u in health.json()["upstreams"]] == [("big", "degraded"), ("small", "ok")]


@pytest.mark.edge
async def test_a_models_defaults_and_overrides_reach_the_upstream_and_are_logged(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A default fills a field the client did not send, an override replaces the one it sent; the
    request's log line says which; every other byte is the client's; a request that needs no change,
    or is for a model without fields, arrives byte for byte. For Anthropic, on the chat request."""
    caplog.set_level(logging.INFO, logger="kimiproxy")
    small = await nursery.start(FakeSGLang().serve)
    doc = two_upstreams(upstream, small, models={"kimi-k2-thinking": {
        "defaults": {"temperature": 1.0, "top_p": 0.95}, "overrides": {"max_tokens": 32000}}})
    running = await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=config_file(tmp_path, doc))
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=running.base) as client:
        edited = (b'{"model": "kimi-k2-thinking", "max_tokens": 100, "seed": 123456789012345678901234567890,\n'
                  b' "messages": [{"role": "user", "content": "hi"}]}')
        assert (await client.post("/v1/chat/completions", content=edited, headers=headers)).status_code == 200
        sent = upstream.seen[-1]
        assert {k: sent.json()[k] for k in ("temperature", "top_p", "max_tokens")} == {
            "temperature": 1.0, "top_p": 0.95, "max_tokens": 32000}
        assert b"123456789012345678901234567890" in sent.body and b'"content": "hi"}]}' in sent.body
        lines = await logged(caplog, "model 'kimi-k2-thinking': ")
        assert [r.getMessage() for r in lines] == [
            "model 'kimi-k2-thinking': defaults: temperature=1.0, top_p=0.95; overrides: max_tokens 100->32000"]

        untouched = (b'{"model":"kimi-k2-thinking",  "temperature": 0.2, "top_p": 1,\n "max_tokens": 32000, '
                     b'"messages": [{"role": "user", "content": "hi"}]}')
        other = b'{"model": "kimi-small", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}'
        for body, fake in ((untouched, upstream), (other, small)):
            assert (await client.post("/v1/chat/completions", content=body, headers=headers)).status_code == 200
            assert fake.seen[-1].body == body
    assert len(await logged(caplog, "model 'kimi-k2-thinking': ")) == 1  # nothing changed: nothing said

    await sdk_call(lambda: claude(running).messages.create(model="kimi-k2-thinking", max_tokens=100,
                                                           messages=[{"role": "user", "content": "hi"}]))
    chat = upstream.seen[-1].json()
    assert (chat["max_tokens"], chat["temperature"], chat["top_p"]) == (32000, 1.0, 0.95)
    assert len(await logged(caplog, "max_tokens 100->32000")) == 2


def test_a_configuration_file_that_does_not_validate_says_what_and_where(tmp_path: Path) -> None:
    good = {"url": "http://127.0.0.1:30000/v1", "models": ["k"]}
    for doc, said in [
        ("{nope", "line 1 column 2: not JSON"),
        ([], "the file: must be a JSON object, not list"),
        ({"upstream": {}}, "the file.upstream: unknown field"),
        ({"upstreams": {}}, "upstreams: name at least one upstream"),
        ({"upstreams": {"small": {"url": "gpu:30000", "models": ["k"]}}},
         "upstreams.small.url: must be an http(s) URL"),
        ({"upstreams": {"small": {"url": "http://[::1/v1", "models": ["k"]}}},  # httpx cannot parse it
         "upstreams.small.url: must be an http(s) URL"),
        ({"upstreams": {"small": {"url": "http://gpu:30000/v1?x=1", "models": ["k"]}}},  # nothing can follow it
         "upstreams.small.url: must be an http(s) URL"),
        ({"upstreams": {"a": {**good, "key": "x"}}}, "upstreams.a.key: unknown field"),
        ({"upstreams": {"a": {**good, "models": "k"}}}, "upstreams.a.models: must be a list of model ids"),
        ({"upstreams": {"a": {"url": good["url"]}}}, "upstreams.a.models: list the model ids it serves"),
        ({"upstreams": {"a": good, "b": good}}, "upstreams.b.models.0: 'k' is served by upstream 'a' already"),
        ({"upstreams": {"a": good}, "default_upstream": "c"}, "default_upstream: 'c' is not one of the upstreams"),
        ({"upstreams": {"a": {"url": "http://u:p@gpu/v1", "api_key": "x", "models": ["k"]}}}, "one credential"),
        ({"upstreams": {"a": good}, "models": {"z": {}}}, "models.z: no upstream lists this model"),
        ({"upstreams": {"a": good}, "models": {"k": {"defaults": {"stream": True}}}},
         "models.k.defaults.stream: kimiproxy decides this field itself"),
        ({"upstreams": {"a": good}, "models": {"k": {"defaults": {"top_p": 1}, "overrides": {"top_p": 1}}}},
         "models.k: top_p both a default and an override"),
        ({"upstreams": {"a": good}, "keys": {}}, "keys: holds no key"),
        ({"upstreams": {"a": good}, "keys": {"alice": ""}}, "keys.alice: must be a non-empty string"),
    ]:
        path = config_file(tmp_path, doc)
        with pytest.raises(kp.ConfigError) as caught:
            kp.load_config_file(path)
        assert str(caught.value).startswith(f"{path}: ") and said in str(caught.value), (said, str(caught.value))
        assert "\n" not in str(caught.value)
    missing = str(tmp_path / "missing.json")
    with pytest.raises(kp.ConfigError, match="missing.json: cannot be read"):
        kp.load_config_file(missing)
    doc = {"upstreams": {"a": {"url": "http://u:p%40ss@gpu:30000/v1/", "models": ["k"]}}, "default_upstream": "a",
           "models": {"k": {"defaults": {"temperature": 1.0}}}, "keys": {"alice": " KEY1 "}}
    config = kp.load_config_file(config_file(tmp_path, doc))
    assert (config.upstreams[0].url, config.upstreams[0].credentials) == ("http://gpu:30000/v1", "u:p@ss")
    assert config.api_keys == (("alice", "KEY1"),) and "KEY1" not in repr(config) and "p@ss" not in repr(config)


@pytest.mark.slow
@pytest.mark.edge
def test_a_configuration_file_that_does_not_validate_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"upstreams": {"small": {"url": "gpu:30000", "models": ["kimi-small"]}}})
    said = (f"kimiproxy: bad configuration: {path}: upstreams.small.url: must be an http(s) URL, like "
            "http://127.0.0.1:30000/v1")
    r = _run([sys.executable, "kimiproxy.py", "--config", path, "--port", str(_free_port())], {})
    assert (r.returncode, r.stderr.strip()) == (1, said)
    r = _run([sys.executable, "-m", "hypercorn", "kimiproxy:app", "-k", "trio", "-b", "127.0.0.1:0"],
             {"KIMIPROXY_CONFIG": path})
    assert "Traceback" not in r.stderr and r.stderr.strip().endswith(said)


async def reload_cli(path: str) -> subprocess.CompletedProcess:
    return await trio.to_thread.run_sync(lambda: _run([sys.executable, "kimiproxy.py", "reload", "--config", path], {},
                                                      timeout=PROCESS_START_LIMIT))


async def registered(path: str, count: int) -> list:
    """The registrations of the processes serving ``path``, once there are ``count`` (each worker
    registers when its start-up is done, after its SIGHUP handler is in place)."""
    with trio.fail_after(PROCESS_START_LIMIT):
        while len(found := kp.registered(path)) < count:
            await trio.sleep(0.05)
    return found


def process_log(proc: Any) -> str:
    """What a proxy_process wrote to stderr so far (pread: the child shares the file's offset)."""
    return os.pread(proc.log.fileno(), 1 << 24, 0).decode(errors="replace")


async def logged_by(proc: Any, words: str) -> list[str]:
    with trio.fail_after(PROCESS_START_LIMIT):
        while words not in process_log(proc):
            await trio.sleep(0.05)
    return [line for line in process_log(proc).splitlines() if words in line]


def test_reload_signals_only_a_live_process_it_can_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python kimiproxy.py reload` signals the pids registered for the file, and only those that name one
    running process: never a pid of 0 or below (a process group, or every process), one without a start
    time, one whose start differs (the pid was reused) or one that is gone (their files are removed), nor
    a file another user could have written."""
    run = tmp_path / "run"
    monkeypatch.setattr(kp, "run_directory", lambda: run)
    kp.private_directory(run)
    me, config = os.getpid(), str(tmp_path / "kimiproxy.json")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    start = kp.process_start(me)
    assert start
    entries = {"live": {"pid": me, "start": start, "config": config},
               "other-file": {"pid": me, "start": start, "config": config + ".other"},
               "group": {"pid": 0, "start": start, "config": config},
               "everyone": {"pid": -1, "start": start, "config": config},
               "no-start": {"pid": me, "start": "", "config": config},
               "reused": {"pid": me, "start": str(int(start) + 1), "config": config},
               "gone": {"pid": gone.pid, "start": start, "config": config},
               "not-a-pid": {"pid": str(me), "start": start, "config": config}}
    for name, entry in entries.items():
        (run / f"{name}.json").write_text(json.dumps(entry))
    planted = run / "planted.json"
    planted.write_text(json.dumps(entries["live"]))
    planted.chmod(0o666)
    found = kp.registered(config)
    assert [path.name for path, _ in found] == ["live.json"]
    left = {p.name for p in run.glob("*.json")}
    assert "reused.json" not in left and "gone.json" not in left  # a pid no longer what registered
    assert {"group.json", "everyone.json", "no-start.json", "not-a-pid.json", "planted.json"} <= left  # skipped
    assert "other-file.json" in left  # a live process serving another file: not signalled, not removed


@pytest.mark.slow
@pytest.mark.edge
async def test_a_reload_that_does_not_validate_keeps_the_running_configuration(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path) -> None:
    """python kimiproxy.py: `reload` checks the file first and signals nobody; a SIGHUP with the file
    as it is anyway is refused with one ERROR line, and requests go on as before. A good file then
    takes effect at the next reload, keys included."""
    other = await nursery.start(FakeSGLang().serve)
    doc = {"upstreams": {"main": {"url": upstream.url, "models": ["kimi-k2-thinking"]}}}
    path = config_file(tmp_path, doc)
    ask = {"model": "kimi-k2-thinking", "messages": []}
    async with proxy_process(PYTHON_ARGS + ["--config", path], {}) as (base, proc):
        await registered(path, 1)
        Path(path).write_text(json.dumps({"upstreams": {"main": {"url": "gpu:30000", "models": ["k"]}}}))
        said = f"{path}: upstreams.main.url: must be an http(s) URL, like http://127.0.0.1:30000/v1"
        refused = await reload_cli(path)
        assert (refused.returncode, refused.stderr.strip()) == (1, f"kimiproxy: bad configuration: {said}")
        os.kill(proc.pid, signal.SIGHUP)
        lines = await logged_by(proc, "configuration not reloaded")
        assert len(lines) == 1 and " ERROR " in lines[0]
        assert lines[0].endswith(f"configuration not reloaded, the running one stays: {said}")
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.post("/v1/chat/completions", json=ask)).status_code == 200
        assert len(chats(upstream)) == 1 and proc.returncode is None

        doc = {"upstreams": {"main": {"url": other.url, "models": ["kimi-k2-thinking"]}},
               "keys": {"alice": "key-alice-1"}}
        Path(path).write_text(json.dumps(doc))
        reloaded = await reload_cli(path)
        assert reloaded.returncode == 0, reloaded
        assert reloaded.stdout.strip() == (
            f"kimiproxy: pid {proc.pid}: reloaded: upstreams 1 (0 added, 0 removed, 1 changed); models 1 "
            "(0 added, 0 removed, 0 moved); model fields 0 (0 added, 0 removed, 0 changed); keys 1 (1 added, "
            "0 removed, 0 changed)")
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.post("/v1/chat/completions", json=ask)).status_code == 401
            keyed = await client.post("/v1/chat/completions", json=ask, headers={"authorization": "Bearer key-alice-1"})
        assert keyed.status_code == 200 and len(chats(other)) == 1 and len(chats(upstream)) == 1
        assert len(await logged_by(proc, "configuration reloaded from")) == 1
        assert "key-alice-1" not in process_log(proc)


@pytest.mark.slow
@pytest.mark.edge
async def test_a_reload_under_hypercorn_workers_leaves_a_stream_in_flight_on_its_upstream(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path) -> None:
    """hypercorn -w 2 and `python kimiproxy.py reload` while a stream is in flight: the stream finishes
    from the upstream it began with; new requests, in both workers, go to the new one."""
    new = await nursery.start(FakeSGLang().serve)
    doc = {"upstreams": {"main": {"url": upstream.url, "models": ["kimi-k2-thinking"]}}}
    path = config_file(tmp_path, doc)
    go_on = trio.Event()
    steps = stream_of(content=["old ", "upstream"])
    upstream.script(Script(steps=[*steps[:2], go_on, *steps[2:]]))
    ask = {"model": "kimi-k2-thinking", "messages": []}
    async with proxy_process(HYPERCORN_ARGS + ["-w", "2"], {"KIMIPROXY_CONFIG": path}) as (base, proc):
        await registered(path, 2)
        got: list[str] = []
        workers: set[str] = set()
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as stream:
                lines = stream.aiter_lines()
                async for line in lines:
                    got.append(line)
                    if "old " in line:
                        break
                doc["upstreams"]["main"]["url"] = new.url
                Path(path).write_text(json.dumps(doc))
                reloaded = await reload_cli(path)
                assert reloaded.returncode == 0, reloaded
                assert reloaded.stdout.count(": reloaded: upstreams 1 (0 added, 0 removed, 1 changed)") == 2

                async def one() -> None:  # a connection of its own: either worker may take it
                    async with httpx.AsyncClient(base_url=base, timeout=30) as fresh:
                        r = await fresh.post("/v1/chat/completions", json=ask)
                    assert r.status_code == 200
                    workers.add(r.headers["x-request-id"].rsplit("-", 1)[0])  # each process has its own prefix

                with trio.fail_after(PROCESS_START_LIMIT):
                    while len(workers) < 2:
                        async with trio.open_nursery() as batch:
                            for _ in range(8):
                                batch.start_soon(one)
                go_on.set()
                async for line in lines:
                    got.append(line)
        events = frames_to_events([(line + "\n").encode() for line in got])
        assert accumulate(events)["content"] == "old upstream"
        assert len(chats(upstream)) == 1 and upstream.seen[-1].completed
        assert len(chats(new)) >= 8 and len(workers) == 2
        assert len(await logged_by(proc, "configuration reloaded from")) == 2


def anthropic_view(ctx: kp.RepairContext, events: list[bytes]) -> MessagesView:
    encoder, view = kp.AnthropicStream(ctx, "msg_1", "k", None), MessagesView()
    view.feed([encoder.opening()] + [f for data in events for f in encoder.feed(data)] + encoder.close())
    return view


def anthropic_ctx(tools: list[dict] = TOOLS, **request: Any) -> kp.RepairContext:
    ctx = kp.RepairContext.from_request({"tools": tools, "messages": [], **request})
    ctx.objects_only = True  # as an Anthropic exchange makes it
    return ctx


def test_anthropic_text_while_a_call_streams_waits_for_its_input() -> None:
    """An upstream that sends content between two pieces of a structured call's arguments: the
    tool_use block gets all its input before the text block opens (no delta for a closed block)."""
    events = [json.dumps(chunk(d)).encode() for d in (
        {"role": "assistant", "content": ""}, {"tool_calls": [tool_delta(0, "functions.read_file:0", "read_file",
                                                                         '{"path": "a')]},
        {"content": "hello"}, {"tool_calls": [tool_delta(0, None, None, 'bc"}')]})]
    events += [json.dumps(chunk({}, finish="tool_calls")).encode(), b"[DONE]"]
    view = anthropic_view(anthropic_ctx(), events)
    assert [(b["type"], b.get("input"), b.get("text")) for b in view.blocks] == [
        ("tool_use", {"path": "abc"}, None), ("text", None, "hello")]


@pytest.mark.parametrize("arguments", ['{"command": "ls", "valid": fasle}', '"just a string"', "fasle", '{"command": "ls" "x": 1}'])
def test_anthropic_tool_input_is_always_an_object_streamed_and_whole(arguments: str) -> None:
    """Anthropic's clients parse a tool_use input as an object (the SDK raises otherwise, mid-stream):
    arguments that broke are closed as a cut-off is, and a value that is no object becomes {}, the
    same streamed and whole. (The OpenAI side passes them as written.)"""
    up = {"content": f"{S}{B}functions.exec:0{A}{arguments}{Z}{E}", "finish_reason": "stop"}
    whole = run_whole(anthropic_ctx(), up)
    assert isinstance(json.loads(whole["tool_calls"][0]["arguments"]), dict)
    for points in [[p] for p in range(1, len(up["content"]))]:
        view = anthropic_view(anthropic_ctx(), upstream_chunks(up, [], points))
        (block,) = [b for b in view.blocks if b["type"] == "tool_use"]
        assert block["input"] == json.loads(whole["tool_calls"][0]["arguments"]), points
    openai = run_whole(ctx_for(TOOLS), up)["tool_calls"][0]["arguments"]
    assert openai == arguments or json.loads(openai) == json.loads(arguments)


def test_structured_arguments_broken_at_a_literal_pass_as_written() -> None:
    up = {"tool_calls": [{"id": "functions.read_file:0", "name": "read_file", "arguments": '{"path": fasle'}],
          "finish_reason": "tool_calls"}
    assert run_whole(ctx_for(TOOLS), up)["tool_calls"][0]["arguments"] == '{"path": fasle'


def test_forced_calls_after_one_that_waits_are_all_read() -> None:
    """tool_choice required: the array's calls, read one after another, the first broken: none lost."""
    ctx = kp.RepairContext.from_request({"tools": TOOLS, "messages": [], "tool_choice": "required"})
    array = ('[{"name": "read_file", "parameters": "{\\"path\\": fasle}"}, {"name": "exec", "parameters": '
             '{"command": "ls"}}, {"name": "search", "parameters": {"query": "q"}}]')
    whole = run_whole(ctx, {"content": array, "finish_reason": "stop"})
    assert [c["name"] for c in whole["tool_calls"]] == ["read_file", "exec", "search"]
    assert [json.loads(c["arguments"]) for c in whole["tool_calls"][1:]] == [{"command": "ls"}, {"query": "q"}]


@pytest.mark.edge
async def test_k25_answer_with_sglangs_reasoning_parser_on_stays_the_answer(proxy: Running) -> None:
    """A pre-filled <think> is SGLang's to read when it runs a reasoning parser: content that came
    without reasoning (the model closed its thinking at once) is the answer, not thinking."""
    proxy.upstream.script(Script(body=completion(content="The answer is 42."), content_type="application/json"))
    async with httpx.AsyncClient(base_url=proxy.base) as client:
        assert (await client.get("/health?upstream=1")).json()["parsers"]["reasoning_parser"] == "kimi_k2"
    message = await sdk_call(lambda: proxy.sdk().chat.completions.create(
        model="moonshotai/Kimi-K2.5", messages=[{"role": "user", "content": "x"}]).choices[0].message)
    proxy.upstream.script(Script(steps=stream_of(content=["The answer ", "is 42."])))
    chunks = await sdk_call(lambda: list(proxy.sdk().chat.completions.create(
        model="moonshotai/Kimi-K2.5", messages=[{"role": "user", "content": "x"}], stream=True)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The answer is 42."
    assert message.content == "The answer is 42." and not (message.model_extra or {}).get("reasoning_content")
# ---------------------------------------------------------------------------------------------------
# Fair use: per-key limits on requests in flight, requests and tokens per minute and per day
# ---------------------------------------------------------------------------------------------------

FAIR_KEYS = {"alice": "key-alice-1", "bob": "key-bob-2", "carol": "key-carol-3", "admin": "key-admin-4"}
FAIR_ADMIN = {"Authorization": "Bearer key-admin-4"}  # / shows every key's use only to the admin key


def limited(upstream: FakeSGLang, limits: dict, keys: dict = FAIR_KEYS) -> dict:
    return {"upstreams": {"main": {"url": upstream.url, "models": ["kimi-k2-thinking"]}}, "keys": keys,
            "limits": limits}


def sdk_of(running: Running, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.base + "/v1", api_key=FAIR_KEYS[name], max_retries=0, timeout=20)


def ask_whole(running: Running, name: str) -> Any:
    return sdk_of(running, name).chat.completions.create(model="kimi-k2-thinking", messages=[
        {"role": "user", "content": "hi"}])


def refused_by(call: Any, kind: type) -> Any:
    """The exception the SDK raised for a refused request (fails when it was served)."""
    try:
        call()
    except kind as exc:
        return exc
    raise AssertionError("served, not refused")


async def settled(running: Running, name: str) -> dict:
    """The key's use on / once none of its requests is in flight: a request's tokens are counted in the
    same transaction that frees its slot, after the client already has the whole response."""
    async with httpx.AsyncClient(base_url=running.base) as client:
        with trio.fail_after(TEST_TIMEOUT / 2):
            while (use := (await client.get("/", headers=FAIR_ADMIN)).json()["fair_use"][name]["use"])["in_flight"]:
                await trio.sleep(0.01)
    return use


async def until(condition: Any, what: str) -> None:
    """Wait for ``condition()`` (no sleeps as synchronisation: a deadline, then a failure saying what)."""
    with trio.fail_after(TEST_TIMEOUT / 2):
        while not condition():
            await trio.sleep(0.01)


@pytest.mark.edge
async def test_a_key_over_its_concurrency_limit_gets_429_with_retry_after_while_another_key_streams_on(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path) -> None:
    """alice may have one request in flight and does not wait: her second gets a 429 with Retry-After,
    as the OpenAI SDK's RateLimitError (OpenAI's own error shape) and the Anthropic SDK's (rate_limit_error),
    and reaches no upstream; bob streams on meanwhile. /metrics counts the refusals, / shows the use."""
    path = config_file(tmp_path, limited(upstream, {"default": {"concurrent": 1}, "alice": {"queue_seconds": 0}}))
    running = await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=path)
    go_on = trio.Event()
    steps = stream_of(content=["held ", "stream"])
    upstream.script(Script(steps=[*steps[:2], go_on, *steps[2:]]))

    def held() -> str:
        stream = sdk_of(running, "alice").chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "hi"}], stream=True)
        return "".join(c.delta.content or "" for ev in stream for c in ev.choices)

    got: list[str] = []

    async def first() -> None:
        got.append(await sdk_call(held))

    nursery.start_soon(first)
    await until(lambda: len(upstream.seen) == 1, "alice's first request upstream")
    exc = await sdk_call(lambda: refused_by(lambda: ask_whole(running, "alice"), openai.RateLimitError))
    assert exc.status_code == 429 and exc.response.headers["retry-after"] == "1"
    assert exc.body["type"] == "requests" and exc.body["code"] == "rate_limit_exceeded"
    assert exc.body["message"] == ("rate limit: key 'alice' has 1 requests in flight, its limit is 1 (concurrent); "
                                   "retry after 1 s")
    claude_exc = await sdk_call(lambda: refused_by(lambda: claude(running, key=FAIR_KEYS["alice"]).messages.create(
        model="kimi-k2-thinking", max_tokens=10, messages=[{"role": "user", "content": "hi"}]), anthropic.RateLimitError))
    assert claude_exc.status_code == 429 and claude_exc.response.headers["retry-after"] == "1"
    assert claude_exc.body["type"] == "error" and claude_exc.body["error"]["type"] == "rate_limit_error"

    def bob_streams() -> str:
        stream = sdk_of(running, "bob").chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "hi"}], stream=True)
        return "".join(c.delta.content or "" for ev in stream for c in ev.choices)

    assert await sdk_call(bob_streams) == "Hello!"
    async with httpx.AsyncClient(base_url=running.base) as client:
        info = (await client.get("/", headers=FAIR_ADMIN)).json()["fair_use"]
        assert info["alice"]["use"]["in_flight"] == 1 and info["alice"]["limits"]["concurrent"] == 1
        assert (await client.get("/")).json()["fair_use"] is None  # without a key, nobody's use
        mine = (await client.get("/", headers={"x-api-key": FAIR_KEYS["alice"]})).json()["fair_use"]
        assert list(mine) == ["alice"]  # a key sees its own, as on the page
        page = (await client.get("/status.json", headers={"Authorization": f"Bearer {FAIR_KEYS['alice']}"})).json()
        assert [(k["key"], k["limits"]) for k in page["keys"]] == [("alice", {"concurrent": "1 / 1"})]  # the page
        assert info["alice"]["limits"]["queue_seconds"] == 0 and info["bob"]["limits"]["queue_seconds"] == 10
        assert (await settled(running, "bob"))["requests_last_minute"] == 1
        go_on.set()
        await until(lambda: got, "alice's first stream to end")
        assert got == ["held stream"]
        assert (await settled(running, "alice"))["requests_last_minute"] == 1
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert len(chats(upstream)) == 2  # the refused never reached it
    assert metrics['kimiproxy_key_refused_total{key="alice",limit="concurrent"}'] == 2
    assert metrics['kimiproxy_requests_total{route="/v1/chat/completions",status="429"}'] == 1
    assert metrics['kimiproxy_requests_total{route="/v1/messages",status="429"}'] == 1
    assert not any(k.startswith('kimiproxy_key_refused_total{key="bob"') for k in metrics)


@pytest.mark.edge
async def test_a_queued_request_is_served_when_a_slot_frees_within_queue_seconds(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Over its concurrency limit a request waits (up to queue_seconds) and goes on as soon as the key's
    request in flight ends: it is served, not refused."""
    caplog.set_level(logging.INFO, logger="kimiproxy")
    path = config_file(tmp_path, limited(upstream, {"alice": {"concurrent": 1, "queue_seconds": 30}}))
    running = await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=path)
    go_on = trio.Event()
    steps = stream_of(content=["first"])
    upstream.script(Script(steps=[*steps[:2], go_on, *steps[2:]]))
    done: list[Any] = []

    async def one(stream: bool) -> None:
        async with httpx.AsyncClient(base_url=running.base, timeout=30) as client:
            r = await client.post("/v1/chat/completions", headers={"authorization": "Bearer key-alice-1"},
                                  json={"model": "kimi-k2-thinking", "messages": [], "stream": stream})
        done.append((stream, r.status_code))

    nursery.start_soon(one, True)
    await until(lambda: len(upstream.seen) == 1, "the first request upstream")
    nursery.start_soon(one, False)
    await logged(caplog, "fair use: key alice has 1 requests in flight (concurrent): waiting up to 30s")
    assert len(upstream.seen) == 1 and not done  # the second waits, upstream has not seen it
    go_on.set()
    await until(lambda: len(done) == 2, "both requests")
    assert sorted(done) == [(False, 200), (True, 200)]
    assert upstream.seen[1].started >= upstream.seen[0].started and upstream.seen[0].completed
    async with httpx.AsyncClient(base_url=running.base) as client:
        metrics = (await client.get("/metrics")).text
    assert "kimiproxy_key_refused_total{" not in metrics


@pytest.mark.edge
async def test_requests_and_tokens_per_minute_and_per_day_are_refused_until_they_pass(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path) -> None:
    """On a clock of the test's: alice may send 2 requests a minute, bob's requests may end with 30 tokens
    a minute, carol's with 50 a day (each request: SGLang's usage, 12 + 8 tokens). Over, a 429 says how
    many seconds until the oldest counted ones leave the window; then it passes. Tokens of a request
    count when it ends, streamed or whole; / shows each key's use."""
    path = config_file(tmp_path, limited(upstream, {"alice": {"requests_per_minute": 2},
                                                    "bob": {"tokens_per_minute": 30},
                                                    "carol": {"tokens_per_day": 50}}))
    running = await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=path)
    now = [1_000_000.0]
    running.app.proxy.fair_use.clock = lambda: now[0]
    per_request = USAGE["prompt_tokens"] + USAGE["completion_tokens"]

    async def served(name: str) -> None:
        assert (await sdk_call(lambda: ask_whole(running, name))).choices
        await settled(running, name)  # its tokens counted, at the clock's time

    async def refused(name: str) -> Any:
        return await sdk_call(lambda: refused_by(lambda: ask_whole(running, name), openai.RateLimitError))

    await served("alice")
    now[0] += 10
    await served("alice")
    now[0] += 10
    exc = await refused("alice")
    assert exc.response.headers["retry-after"] == "40" and exc.body["type"] == "requests"
    assert "(requests_per_minute)" in exc.body["message"]
    now[0] += 41  # the first left the minute
    await served("alice")

    await served("bob")  # 20 tokens
    def bob_streams() -> None:
        stream = sdk_of(running, "bob").chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join(c.delta.content or "" for ev in stream for c in ev.choices) == "Hello!"
    now[0] += 5
    await sdk_call(bob_streams)  # 40 tokens: a stream's usage counts too (kimiproxy asked for it)
    await settled(running, "bob")
    exc = await refused("bob")
    assert exc.response.headers["retry-after"] == "55" and exc.body["type"] == "tokens"
    async with httpx.AsyncClient(base_url=running.base) as client:
        info = (await client.get("/", headers=FAIR_ADMIN)).json()["fair_use"]
    assert info["bob"]["use"]["tokens_last_minute"] == 2 * per_request
    assert info["alice"]["use"]["requests_last_minute"] == 2
    now[0] += 56  # the first 20 left: 20 < 30
    await served("bob")

    for _ in range(3):  # 60 tokens
        await served("carol")
    exc = await refused("carol")
    assert "(tokens_per_day)" in exc.body["message"]
    minute = int(now[0] // 60)
    assert exc.response.headers["retry-after"] == str(math.ceil((minute + 1) * 60 + 86400 - now[0]))
    now[0] += 3600
    await refused("carol")  # still the same day
    async with httpx.AsyncClient(base_url=running.base) as client:
        info = (await client.get("/", headers=FAIR_ADMIN)).json()["fair_use"]
        assert info["carol"]["use"] == {"in_flight": 0, "requests_last_minute": 0, "tokens_last_minute": 0,
                                        "tokens_last_day": 3 * per_request}
        assert info["carol"]["limits"]["tokens_per_day"] == 50 and info["carol"]["limits"]["concurrent"] is None
        now[0] += 86400
        await served("carol")
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert metrics['kimiproxy_key_refused_total{key="alice",limit="requests_per_minute"}'] == 1
    assert metrics['kimiproxy_key_refused_total{key="bob",limit="tokens_per_minute"}'] == 1
    assert metrics['kimiproxy_key_refused_total{key="carol",limit="tokens_per_day"}'] == 2


@pytest.mark.edge
async def test_without_limits_no_limits_file_is_created(nursery: trio.Nursery, upstream: FakeSGLang,
                                                        tmp_path: Path) -> None:
    """With keys and no "limits" (and without a configuration file), requests touch no limits' file, and /
    says there are no limits."""
    path = config_file(tmp_path, {"upstreams": {"main": {"url": upstream.url, "models": ["kimi-k2-thinking"]}},
                                  "keys": FAIR_KEYS})
    for running in (await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=path),
                    await start_proxy(nursery, upstream.url, PROXY_API_KEY="alice:key-alice-1")):
        for _ in range(3):
            assert (await sdk_call(lambda: ask_whole(running, "alice"))).choices
        async with httpx.AsyncClient(base_url=running.base) as client:
            assert (await client.get("/", headers=FAIR_ADMIN)).json()["fair_use"] is None
        fair_use = running.app.proxy.fair_use
        assert fair_use._db is None and not Path(fair_use.path).exists()
        assert fair_use.path.endswith(".limits.sqlite3")


def test_limits_that_do_not_validate_say_what_and_where(tmp_path: Path) -> None:
    upstreams = {"main": {"url": "http://127.0.0.1:30000/v1", "models": ["k"]}}
    for limits, said in [
        ({"alice": {"concurrent": 0}}, "limits.alice.concurrent: must be a whole number >= 1, or null for no limit"),
        ({"alice": {"tokens_per_day": "lots"}}, "limits.alice.tokens_per_day: must be a whole number >= 1"),
        ({"alice": {"requests_per_minute": 1.5}}, "limits.alice.requests_per_minute: must be a whole number"),
        ({"alice": {"queue_seconds": 1000}}, "limits.alice.queue_seconds: must be a number of seconds from 0 to 120"),
        ({"alice": {"per_hour": 1}}, "limits.alice.per_hour: unknown field (known: concurrent, "),
        ({"alice": 4}, "limits.alice: must be a JSON object, not int"),
        ([], "limits: must be a JSON object, not list"),
    ]:
        path = config_file(tmp_path, {"upstreams": upstreams, "keys": FAIR_KEYS, "limits": limits})
        with pytest.raises(kp.ConfigError) as caught:
            kp.load_config_file(path)
        assert str(caught.value).startswith(f"{path}: {said}"), caught.value
    # Names are keys' names: the file's keys, else PROXY_API_KEY's, else "anonymous" (no keys at all).
    path = config_file(tmp_path, {"upstreams": upstreams, "keys": FAIR_KEYS, "limits": {"alcie": {"concurrent": 1}}})
    with pytest.raises(kp.ConfigError) as caught:
        kp.Proxy(kp.Settings(config_file=path))
    assert str(caught.value) == (f"{path}: limits.alcie: no key has this name (the keys: alice, bob, carol, admin; or "
                                 "default, for every key)")
    path = config_file(tmp_path, {"upstreams": upstreams, "limits": {"anonymous": {"concurrent": 1}, "default": {}}})
    assert kp.Proxy(kp.Settings(config_file=path)).routing.limits == {"anonymous": kp.Limits(concurrent=1)}
    dave = kp.Settings(config_file=path, api_keys=(("dave", "k"),))  # PROXY_API_KEY's names
    with pytest.raises(kp.ConfigError, match="limits.anonymous: no key has this name"):
        kp.Proxy(dave)
    # At a reload too: refused, and the running configuration stays.
    Path(path).write_text(json.dumps({"upstreams": upstreams, "limits": {"dave": {"concurrent": 2}}}))
    keyed = kp.Proxy(dave)
    Path(path).write_text(json.dumps({"upstreams": upstreams, "limits": {"anonymous": {"concurrent": 1}}}))
    assert keyed.reload().startswith(f"refused: {path}: limits.anonymous: no key has this name (the keys: dave;")
    assert keyed.routing.limits == {"dave": kp.Limits(concurrent=2)}


@pytest.mark.slow
@pytest.mark.edge
async def test_limits_hold_across_two_workers_and_a_killed_workers_slots_are_freed(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path) -> None:
    """hypercorn -w 2 and python kimiproxy.py on one store and one file: alice may have one request in
    flight. While a stream of hers is held in one worker, each worker and the other process refuse her;
    the worker holding it is killed (SIGKILL: it frees nothing), and her next request is served."""
    path = config_file(tmp_path, limited(upstream, {"alice": {"concurrent": 1, "queue_seconds": 0}}))
    env = {"KIMIPROXY_CONFIG": path, "REASONING_STORE": store_path()}
    go_on = trio.Event()  # never set: the worker dies holding the stream
    upstream.script(Script(steps=[*stream_of(content=["held"])[:2], go_on]))
    alice = {"authorization": "Bearer key-alice-1"}
    ask = {"model": "kimi-k2-thinking", "messages": []}
    async with proxy_process(HYPERCORN_ARGS + ["-w", "2"], env) as (hyper, supervisor), \
            proxy_process(PYTHON_ARGS, env) as (single, _):
        held = httpx.AsyncClient(base_url=hyper, timeout=30)
        stream = await held.send(held.build_request("POST", "/v1/chat/completions", headers=alice,
                                                    json={**ask, "stream": True}), stream=True)
        assert stream.status_code == 200
        refusals: set[str] = set()

        async def one(base: str) -> None:  # a connection of its own: either worker may take it
            async with httpx.AsyncClient(base_url=base, timeout=30) as fresh:
                r = await fresh.post("/v1/chat/completions", headers=alice, json=ask)
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
            refusals.add(r.headers["x-request-id"].rsplit("-", 1)[0])  # each process has its own prefix

        with trio.fail_after(PROCESS_START_LIMIT):
            await one(single)
            while len(refusals) < 3:  # the python process and both workers
                async with trio.open_nursery() as batch:
                    for _ in range(6):
                        batch.start_soon(one, hyper)
        db = sqlite3.connect(kp.limits_store(env["REASONING_STORE"]))
        (owner,), = db.execute("SELECT owner FROM slots").fetchall()
        db.close()
        worker = int(owner.split(":")[0])
        assert worker in [int(p) for t in Path(f"/proc/{supervisor.pid}/task").iterdir()
                          for p in (t / "children").read_text().split()]
        os.kill(worker, signal.SIGKILL)
        with trio.fail_after(PROCESS_START_LIMIT):
            while Path(f"/proc/{worker}").exists() and "Z" not in Path(f"/proc/{worker}/stat").read_text().split()[2]:
                await trio.sleep(0.02)
        with contextlib.suppress(httpx.HTTPError):
            await stream.aclose()
        await held.aclose()
        async with httpx.AsyncClient(base_url=single, timeout=30) as client:
            served = await client.post("/v1/chat/completions", headers=alice, json=ask)
            assert served.status_code == 200 and served.json()["choices"][0]["message"]["content"] == "Hello!"
            with trio.fail_after(PROCESS_START_LIMIT):  # its slot is freed after it has the response
                while (info := (await client.get("/", headers=FAIR_ADMIN)).json()["fair_use"]["alice"]["use"])["in_flight"]:
                    await trio.sleep(0.02)
    assert info["requests_last_minute"] == 2  # the killed worker's and this one: refusals are not counted


@pytest.mark.edge
async def test_a_release_the_busy_file_refused_is_done_with_the_next_transaction(
        nursery: trio.Nursery, upstream: FakeSGLang, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds the limits file's write lock past its timeout while alice's stream ends:
    her slot is not lost for the worker's life, it is freed by the next transaction, and her next
    request is served."""
    caplog.set_level(logging.WARNING, logger="kimiproxy")
    store = str(tmp_path / "st" / "r.sqlite3")
    path = config_file(tmp_path, limited(upstream, {"default": {"concurrent": 1, "queue_seconds": 0}}))
    running = await start_proxy(nursery, upstream.url, KIMIPROXY_CONFIG=path, REASONING_STORE=store)
    go_on = trio.Event()
    steps = stream_of(content=["held ", "stream"])
    upstream.script(Script(steps=[*steps[:2], go_on, *steps[2:]]))
    alice = {"authorization": f"Bearer {FAIR_KEYS['alice']}"}
    body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(base_url=running.base, timeout=20) as client:
        statuses: list[int] = []

        async def first() -> None:
            statuses.append((await client.post("/v1/chat/completions", headers=alice, json=body)).status_code)

        nursery.start_soon(first)
        await until(lambda: upstream.seen, "alice's stream upstream")
        db = sqlite3.connect(kp.limits_store(store), isolation_level=None)
        db.execute("BEGIN IMMEDIATE")  # another worker's long write, a backup: the lock held
        go_on.set()
        await until(lambda: "release skipped" in caplog.text, "the release to give up on the lock")
        db.execute("COMMIT")
        db.close()
        await until(lambda: statuses == [200], "alice's first stream to end")
        upstream.script(Script(steps=stream_of(content=["again"])))
        again = await client.post("/v1/chat/completions", headers=alice, json=body)
    assert again.status_code == 200 and "again" in again.text
