"""Syntax-aware decisions: is the cursor where a multi-line suggestion makes sense?

Multi-line when the cursor opens an empty block: on a blank line right after a
block opener (``def f():``, ``if x:``, ``{``) whose body is still empty, or at the
end of such an opener line. Python is parsed with tree-sitter (the
``tree-sitter-python`` grammar) to check that the block really is empty; other
languages fall back to indentation: the block is empty when the next non-blank
line is indented no deeper than the opener.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

OPENERS = {"python": (":",), "default": ("{", ":")}
PY_BLOCK_OWNERS = {
    "function_definition", "class_definition", "if_statement", "elif_clause", "else_clause", "for_statement",
    "while_statement", "with_statement", "try_statement", "except_clause", "finally_clause", "match_statement",
    "case_clause",
}


@functools.lru_cache(maxsize=None)
def _parser(language: str) -> Any | None:
    if language != "python":
        return None
    try:
        import tree_sitter
        import tree_sitter_python
    except ImportError:  # pragma: no cover - core dependencies
        log.warning("tree-sitter-python is not installed; using the indentation heuristic")
        return None
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_python.language()))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def wants_multiline(lines: list[str], row: int, col: int, language: str) -> bool:
    """Whether a multi-line suggestion fits at (row, col) of a document given as lines."""
    line = lines[row] if row < len(lines) else ""
    if line[col:].strip():
        return False  # text after the cursor: complete this line only
    before = line[:col]
    openers = OPENERS.get(language, OPENERS["default"])
    if before.strip():
        opener_row = row if before.rstrip().endswith(openers) else None
    else:
        prev = next((r for r in range(row - 1, -1, -1) if lines[r].strip()), None)
        opener_row = prev if prev is not None and lines[prev].rstrip().endswith(openers) else None
    if opener_row is None:
        return False
    parser = _parser(language)
    if parser is not None:
        return _python_block_empty(parser, lines, opener_row)
    following = next((lines[r] for r in range(row + 1, len(lines)) if lines[r].strip()), None)
    return following is None or _indent(following) <= _indent(lines[opener_row])


def _python_block_empty(parser: Any, lines: list[str], opener_row: int) -> bool:
    source = "\n".join(lines).encode("utf-8")
    tree = parser.parse(source)
    text = lines[opener_row].rstrip()
    col = len(text.encode("utf-8")) - 1  # the colon
    node = tree.root_node.descendant_for_point_range((opener_row, col), (opener_row, col))
    while node is not None and node.type not in PY_BLOCK_OWNERS:
        node = node.parent
    if node is None:
        return True  # unparsable so far (typing in progress): a body is what comes next
    body = node.child_by_field_name("body") or next((c for c in node.children if c.type == "block"), None)
    if body is None:
        return True
    return not [c for c in body.named_children if c.type != "comment"]
