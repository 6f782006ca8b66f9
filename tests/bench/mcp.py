"""The MCP face against a real `sage serve` (`--only mcp`): the size of tools/list, and what a client that honours the
cache hints saves over a repeated-read run, with a change made over REST in the middle that it must not miss.

The run, for each client: `rounds` times, what an assistant re-reads while it works (tools/list, prompts/list,
resources/templates/list, resources/list, the index and `documents` documents), at 2026-07-28 over streamable HTTP.
The client that honours the hints is the MCP SDK's own (its default response cache) and listens for changes to what
it reads; the other has no cache. Halfway, a document it reads is changed over REST: every later read must see it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
from mcp import Client
from mcp.client.caching import CacheConfig
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextResourceContents

from sage_server.resources import knowledge_dir
from sage_server.text import estimate_tokens
from tests.bench.report import Target, _num
from tests.bench.servers import Running, start_sage, stop

Progress = Callable[[str], None]
TOOLS_LIST_TOKENS = 2500  # the ceiling for tools/list


@dataclass
class McpResults:
    """What the MCP measurements found."""

    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Wire:
    """Requests a client sent and bytes that crossed the wire for them (bodies, both ways); the listen stream, open
    for the whole run, is not counted."""

    calls: int = 0
    bytes: int = 0

    async def on_response(self, response: httpx2.Response) -> None:
        if response.request.headers.get("mcp-method") == "subscriptions/listen":
            return
        self.calls += 1
        self.bytes += len(response.request.content) + int(response.headers.get("content-length", "0"))


def targets(r: McpResults) -> list[Target]:
    f = r.figures.get
    return [
        Target("tools/list size (estimated tokens)", f("tools_list_tokens"), TOOLS_LIST_TOKENS, "", False),
        Target("reads that missed a change the client had heard", f("stale_reads"), 0, ""),
    ]


FIGURES = {
    "tools_list_tokens": "tools/list, estimated tokens (1 per 3.5 ASCII characters)",
    "tools_list_bytes": "tools/list, bytes of JSON",
    "rounds": "repeated-read run: rounds",
    "calls_per_round": "... reads per round (4 listings, the index, documents)",
    "calls_without_hints": "... requests, client without a cache",
    "calls_with_hints": "... requests, client honouring ttlMs and change notifications",
    "calls_saved": "... requests saved",
    "calls_saved_pct": "... requests saved (%)",
    "kb_without_hints": "... KB on the wire, client without a cache",
    "kb_with_hints": "... KB on the wire, client honouring the hints",
    "kb_saved": "... KB saved",
    "kb_saved_pct": "... KB saved (%)",
    "stale_reads": "... reads after a heard change that still saw the old text",
}


async def measure(work: Path, quick: bool, progress: Progress) -> McpResults:
    """Start `sage serve` on the bundled knowledge, then measure the tool list and the two repeated-read runs."""
    results = McpResults()
    rounds, documents = (4, 5) if quick else (20, 20)
    home = work / "home"
    home.mkdir()
    progress("mcp: sage serve on the bundled knowledge")
    running = await anyio.to_thread.run_sync(
        lambda: start_sage(home, work / "sage.db", work / "cache", knowledge_dir())
    )
    try:
        async with Client(f"{running.mcp}/mcp", cache=None) as client:
            listed = await client.session.list_tools()
            wire = json.dumps(listed.model_dump(mode="json", by_alias=True, exclude_none=True), separators=(",", ":"))
            results.figures["tools_list_tokens"] = estimate_tokens(wire)
            results.figures["tools_list_bytes"] = len(wire.encode())
            uris = [str(r.uri) for r in (await client.session.list_resources()).resources if r.uri.count("/") == 3]
        uris = uris[:documents]
        progress(f"mcp: {rounds} rounds of repeated reads, without a cache and honouring the hints")
        plain = await _run(running, uris, rounds, honour=False, results=results)
        honouring = await _run(running, uris, rounds, honour=True, results=results)
    finally:
        await anyio.to_thread.run_sync(stop, running.process)
    f = results.figures
    f["rounds"], f["calls_per_round"] = rounds, 5 + len(uris)
    f["calls_without_hints"], f["calls_with_hints"] = plain.calls, honouring.calls
    f["calls_saved"] = plain.calls - honouring.calls
    f["calls_saved_pct"] = round(100 * f["calls_saved"] / max(plain.calls, 1), 1)
    f["kb_without_hints"], f["kb_with_hints"] = round(plain.bytes / 1024, 1), round(honouring.bytes / 1024, 1)
    f["kb_saved"] = round((plain.bytes - honouring.bytes) / 1024, 1)
    f["kb_saved_pct"] = round(100 * (plain.bytes - honouring.bytes) / max(plain.bytes, 1), 1)
    return results


async def _run(running: Running, uris: list[str], rounds: int, *, honour: bool, results: McpResults) -> Wire:
    """One client's repeated-read run; a document it reads is changed over REST halfway through."""
    wire = Wire()
    changed, marker = uris[0], f"changed at {time.time_ns()}"
    http = httpx2.AsyncClient(event_hooks={"response": [wire.on_response]}, timeout=30)
    async with (
        http,
        Client(
            streamable_http_client(f"{running.mcp}/mcp", http_client=http), cache=CacheConfig() if honour else None
        ) as client,
    ):
        watched = ["knowledge://index", *uris]
        listening = client.listen(resources_list_changed=True, resource_subscriptions=watched) if honour else None
        subscription = await listening.__aenter__() if listening is not None else None
        try:
            for round_number in range(rounds):
                if round_number == rounds // 2:
                    await _change(running, changed, marker)
                    if subscription is not None:  # wait (bounded) until the change is heard
                        with anyio.fail_after(10):
                            async for event in subscription:
                                if getattr(event, "uri", None) == changed:
                                    break
                await client.list_tools()
                await client.list_prompts()
                await client.list_resource_templates()
                await client.list_resources()
                await client.read_resource("knowledge://index")
                for uri in uris:
                    content = (await client.read_resource(uri)).contents[0]
                    text = content.text if isinstance(content, TextResourceContents) else ""
                    if uri == changed and round_number >= rounds // 2 and marker not in text:
                        results.figures["stale_reads"] = results.figures.get("stale_reads", 0) + 1
        finally:
            if listening is not None:
                await listening.__aexit__(None, None, None)
    results.figures.setdefault("stale_reads", 0)
    return wire


async def _change(running: Running, uri: str, marker: str) -> None:
    layer, doc_id = uri.removeprefix("knowledge://").split("/")
    async with httpx.AsyncClient(base_url=running.api, timeout=30) as rest:
        current = (await rest.get(f"/v1/knowledge/{doc_id}")).json()
        body = {"title": current["title"], "layer": layer, "body": f"{current['body']}\n\n{marker}\n"}
        answer = await rest.put(f"/v1/knowledge/{doc_id}", json=body)
        answer.raise_for_status()


def table(r: McpResults) -> str:
    """The MCP section of the printed table."""
    header = f"{'mcp':<9}  {'measurement':<64} {'value':>10}"
    rule = "-" * 92
    lines = [header, rule]
    lines += [f"{'':<9}  {label:<64} {_num(r.figures[key]):>10}" for key, label in FIGURES.items() if key in r.figures]
    lines.append(rule)
    for t in targets(r):
        measured = "-" if t.measured is None else f"{_num(t.measured)}{t.unit}"
        lines.append(f"{'target':<9}  {t.name:<64} {measured:>10} {'<=' + _num(t.limit):>8}  {t.verdict}")
    lines += [f"{'note':<9}  {note}" for note in r.notes]
    return "\n".join(lines)


def to_json(r: McpResults) -> dict[str, Any]:
    return {
        "figures": r.figures,
        "notes": r.notes,
        "targets": [{**asdict(t), "passed": t.passed, "verdict": t.verdict} for t in targets(r)],
    }
