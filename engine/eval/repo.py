"""Completion problems cut from any local source tree, where a user's cursor would be.

Every file is filtered like the training corpus (:func:`engine.train.corpus.usable_text`:
no tests, no generated or data-like files, UTF-8, size limits; vendored, build and
test folders skipped). Middles, sampled deterministically from a seed:

* ``single``: the rest of one line from the cursor, the cursor standing either
  right after the line's indentation or inside its code (at least two characters
  left to complete); the line break stays in the suffix.
* ``multi``: 2-5 whole lines of the body that follows a block opener, the cursor
  after the first body line's indentation (the block is empty without them, so a
  language server asks for a multi-line suggestion there).

Comment-only and blank lines are never the start of a middle. A corpus split
(``heldout.jsonl`` from ``dlm-corpus``) can stand in for the tree. Use files you did
not train on: the point is to measure a model on code it has not seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.errors import InputError

KINDS = ("single", "multi")
OPENER = {"python": re.compile(r":\s*(#.*)?$")}
DEFAULT_OPENER = re.compile(r"(\{|:)\s*(//.*)?$")
COMMENT = re.compile(r"^\s*(#|//|--|/\*|\*)")
LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".go": "go", ".rs": "rust",
             ".java": "java", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".lua": "lua"}
MAX_MIDDLE_CHARS = 400


@dataclass(frozen=True)
class RepoProblem:
    """A document with its middle removed, the cursor where the middle was, and the middle."""

    task_id: str
    """``<relative path>:<line>:<column>`` (1-based) of the cursor, with the kind."""
    kind: str
    language: str
    text: str
    """The file without the middle."""
    offset: int
    """Cursor: character offset of the removed middle in :attr:`text`."""
    middle: str


def source_files(root: Path, suffixes: tuple[str, ...] = (".py",)) -> Iterator[tuple[str, str]]:
    """(relative path, text) of the usable source files under ``root``, in sorted order.

    ``root`` may also be a split written by ``dlm-corpus`` (``heldout.jsonl``): its files, in order.
    """
    from engine.train.corpus import Stats, _excluded, read_jsonl, usable_text

    if root.is_file() and root.suffix == ".jsonl":
        for row in read_jsonl(root):
            yield f"{row['source']}/{row['path']}", row["text"]
        return
    if not root.is_dir():
        raise InputError(f"{root} is neither a folder nor a corpus split (.jsonl)")
    stats = Stats()
    for path in sorted(root.rglob("*")):
        if path.suffix not in suffixes or not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(root)
        if _excluded(rel.parts[:-1]):
            continue
        text = usable_text(path.read_bytes(), rel.as_posix(), stats)
        if text is not None:
            yield rel.as_posix(), text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _code_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if len(line.strip()) > 3 and not COMMENT.match(line)]


def _single(lines: list[str], rng: np.random.Generator) -> tuple[int, int, int] | None:
    """(first line, cursor column, line count) of a single-line middle."""
    candidates = _code_lines(lines)[3:]
    if not candidates:
        return None
    i = int(rng.choice(candidates))
    line = lines[i].rstrip()
    start = _indent(line)
    if rng.random() < 0.5 or len(line) - start < 4:
        return i, start, 1
    return i, int(rng.integers(start + 1, len(line) - 1)), 1


def _multi(lines: list[str], language: str, rng: np.random.Generator) -> tuple[int, int, int] | None:
    """(first line, cursor column, line count) of a multi-line middle: the start of a block's body."""
    opener = OPENER.get(language, DEFAULT_OPENER)
    code = set(_code_lines(lines))
    candidates = [
        i + 1 for i in sorted(code)
        if opener.search(lines[i].rstrip()) and i + 1 in code and _indent(lines[i + 1]) > _indent(lines[i])
    ]
    if not candidates:
        return None
    i = int(rng.choice(candidates))
    count = int(rng.integers(2, 6))
    body = _indent(lines[i])
    n = 0
    while n < count and i + n < len(lines) and (not lines[i + n].strip() or _indent(lines[i + n]) >= body):
        n += 1
    while n > 1 and not lines[i + n - 1].strip():
        n -= 1
    return (i, body, n) if n >= 2 else None


def repo_problems(root: Path, kind: str, count: int, seed: int = 0, suffixes: tuple[str, ...] = (".py",)) -> list[RepoProblem]:
    """``count`` problems of ``kind`` (``single`` or ``multi``) from the source files under ``root``.

    The same root, kind, count, seed and files give the same problems. Fewer are
    returned when the tree has too few places to cut them.
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    files = list(source_files(root, suffixes))
    if not files:
        raise InputError(f"no usable source files ({', '.join(suffixes)}) under {root}")
    rng = np.random.default_rng(seed)
    problems: list[RepoProblem] = []
    seen: set[tuple[str, int, int]] = set()
    attempts = 0
    while len(problems) < count and attempts < count * 50:
        attempts += 1
        rel, text = files[int(rng.integers(0, len(files)))]
        language = LANGUAGES.get(Path(rel).suffix, "plaintext")
        lines = text.split("\n")
        cut = _single(lines, rng) if kind == "single" else _multi(lines, language, rng)
        if cut is None or (rel, cut[0], cut[1]) in seen:
            continue
        row, col, n = cut
        start = sum(len(line) + 1 for line in lines[:row]) + col
        end = sum(len(line) + 1 for line in lines[: row + n]) - 1  # the last middle line's break stays
        middle = text[start:end]
        if not middle.strip() or len(middle) > MAX_MIDDLE_CHARS:
            continue
        seen.add((rel, row, col))
        problems.append(RepoProblem(f"{kind}/{rel}:{row + 1}:{col + 1}", kind, language, text[:start] + text[end:], start, middle))
    return problems
