"""Storm and soak drivers for the real server (``scripts/storm_soak.py`` runs them at full size,
``tests/lsp/test_storm.py`` a short version).

* :func:`storm`: requests over several documents with random edits and cancellations, sent
  as fast as the client can write, without waiting for answers; then every answer is
  collected and checked, and the documents compared with the client's.
* :func:`soak`: completions one after another with random edits, sampling the server's
  resident memory and the latency, to compare the first thousand with the last.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from pathlib import Path
from typing import Any

from lsprotocol import types
from raw_lsp import RawClient

from dlm_lsp.positions import offset_at, position_at

SNIPPETS = ["x", " ", "\n", "    ", "return ", "def f(a):\n", "(", ")", "é", "\U0001f600", "self.value", "# note\n", "\r\n"]
BASE = "import os\n\n\ndef area(width, height):\n    return \n\n\nclass Shape:\n    def __init__(self):\n        self.sides = \n"


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of process ``pid`` in KiB (Linux): ``field`` of /proc/PID/status (``RssAnon``: its
    anonymous part, what is not mapped files)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Mirror:
    """The client's copy of one document, and random edits of it."""

    def __init__(self, uri: str, text: str) -> None:
        self.uri, self.text, self.version = uri, text, 1

    def random_edit(self, rng: random.Random) -> dict[str, Any]:
        """A change event (insert, delete or replace at a random place), applied to the copy."""
        a = rng.randrange(len(self.text) + 1)
        b = min(len(self.text), a + rng.choice([0, 0, 0, 1, 3, 12]))
        new = "".join(rng.choice(SNIPPETS) for _ in range(rng.choice([0, 1, 1, 2, 4])))
        start, end = position_at(self.text, a), position_at(self.text, b)
        a, b = offset_at(self.text, start), offset_at(self.text, end)  # a position between \r and \n moves
        self.text = self.text[:a] + new + self.text[b:]
        self.version += 1
        return {"range": {"start": {"line": start.line, "character": start.character},
                          "end": {"line": end.line, "character": end.character}}, "text": new}

    def random_position(self, rng: random.Random) -> types.Position:
        """A place in the current text."""
        return position_at(self.text, rng.randrange(len(self.text) + 1))

    def sha256(self) -> str:
        """What ``dlm/documentState`` reports for the same text."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


def storm(client: RawClient, *, documents: int = 10, requests: int = 1000, seed: int = 0, cancel_share: float = 0.25,
          timeout_s: float = 600.0) -> dict[str, Any]:
    """Send ``requests`` completions over ``documents`` documents, each after a random edit, some
    cancelled right away, without waiting; then collect and check every answer."""
    rng = random.Random(seed)
    before = client.status()
    mirrors = [Mirror(f"file:///storm/doc{i}.py", BASE) for i in range(documents)]
    for mirror in mirrors:
        client.open(mirror.uri, mirror.text)
    sent: dict[str, tuple[Mirror, int, types.Position]] = {}
    started = time.perf_counter()
    for n in range(requests):
        mirror = rng.choice(mirrors)
        client.change(mirror.uri, mirror.version + 1, [mirror.random_edit(rng)])
        position = mirror.random_position(rng)
        msg_id = f"storm-{n}"
        sent[msg_id] = (mirror, mirror.version, position)
        client.send({"jsonrpc": "2.0", "id": msg_id, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": mirror.uri}, "position": {"line": position.line, "character": position.character},
            "context": {"triggerKind": rng.choice([1, 2])}}})
        if rng.random() < cancel_share:
            client.notify("$/cancelRequest", {"id": rng.choice(list(sent))})
    send_s = time.perf_counter() - started
    outcome = {"items": 0, "empty": 0, "cancelled": 0, "errors": 0, "bad_ranges": 0}
    deadline = time.monotonic() + timeout_s
    for msg_id, (mirror, version, position) in sent.items():
        reply = client.reply(msg_id, timeout=max(1.0, deadline - time.monotonic()))
        if "error" in reply:
            outcome["cancelled" if reply["error"]["code"] == -32800 else "errors"] += 1
        elif reply["result"]["items"]:
            outcome["items"] += 1
            start = reply["result"]["items"][0]["range"]["start"]
            outcome["bad_ranges"] += (start["line"], start["character"]) != (position.line, position.character)
        else:
            outcome["empty"] += 1
    total_s = time.perf_counter() - started
    after_storm = {"items": 0, "empty": 0, "errors": 0}  # the server still serves each document afterwards
    for n, mirror in enumerate(mirrors):
        position = mirror.random_position(rng)
        reply = client.complete(f"after-{n}", mirror.uri, position.line, position.character, timeout=60)
        after_storm["errors" if "error" in reply else "items" if reply["result"]["items"] else "empty"] += 1
    in_step = sum(client.document_state(m.uri)["sha256"] == m.sha256() for m in mirrors)  # type: ignore[index]
    for mirror in mirrors:
        client.notify("textDocument/didClose", {"textDocument": {"uri": mirror.uri}})
    time.sleep(0.5)
    after = client.status()
    return {
        "requests": requests, "documents": documents, "answered": sum(outcome.values()) - outcome["bad_ranges"],
        **outcome, "after_storm": after_storm, "documents_in_step": in_step, "send_s": round(send_s, 2), "total_s": round(total_s, 2),
        "server_stale": after["stale"] - before["stale"], "server_cancelled": after["cancelled"] - before["cancelled"],
        "threads_before": before["threads"], "threads_after": after["threads"],
        "tasks_before": before["tasks"], "tasks_after": after["tasks"], "pending_after": after["pending_messages"],
    }


def soak(client: RawClient, pid: int, *, completions: int = 10_000, seed: int = 1, block: int = 1000) -> dict[str, Any]:
    """Completions one after another, each after a random edit; RSS and latency per ``block``."""
    rng = random.Random(seed)
    mirror = Mirror("file:///soak/doc.py", BASE * 3)
    client.open(mirror.uri, mirror.text)
    blocks: list[dict[str, float]] = []
    latencies: list[float] = []
    rss: list[int] = []
    errors = 0
    for n in range(completions):
        if len(mirror.text) > 20_000:  # keep the document the size of a real one
            mirror.text, mirror.version = BASE * 3, mirror.version + 1
            client.change(mirror.uri, mirror.version, [{"text": mirror.text}])
        client.change(mirror.uri, mirror.version + 1, [mirror.random_edit(rng)])
        position = mirror.random_position(rng)
        started = time.perf_counter()
        reply = client.complete(f"soak-{n}", mirror.uri, position.line, position.character, timeout=60)
        latencies.append((time.perf_counter() - started) * 1000)
        errors += "error" in reply
        if n % 50 == 0:
            rss.append(rss_kb(pid))
        if (n + 1) % block == 0:
            blocks.append({
                "block": (n + 1) // block, "p50_ms": round(statistics.median(latencies), 1),
                "p95_ms": round(statistics.quantiles(latencies, n=20)[-1], 1),
                "rss_mb": round(statistics.median(rss) / 1024, 1),
            })
            latencies, rss = [], []
    status = client.status()
    first, last = blocks[0], blocks[-1]
    return {
        "completions": completions, "errors": errors, "blocks": blocks,
        "rss_growth": round(last["rss_mb"] / first["rss_mb"] - 1, 4) if first["rss_mb"] else None,
        "pending_after": status["pending_messages"], "threads_after": status["threads"], "tasks_after": status["tasks"],
    }
