"""Syntax-aware decisions: is the cursor where a multi-line suggestion makes sense?

Multi-line when the cursor opens an empty block: on a blank line right after a
block opener (``def f():``, ``if x {``, ``for i = 1, n do``) whose body is still
empty, or at the end of such an opener line. tree-sitter (grammar packages from
PyPI) checks that the block really is empty for Python, JavaScript, TypeScript
(and their React dialects), Go, Rust, Java, C, C++ and Lua; code that does not
parse yet (a brace just typed) counts as an empty block. Other languages fall
back to indentation: the block is empty when the next non-blank line is indented
no deeper than the opener.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from typing import Any

log = logging.getLogger(__name__)

GRAMMARS: dict[str, tuple[str, str]] = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "javascriptreact": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "typescriptreact": ("tree_sitter_typescript", "language_tsx"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
    "lua": ("tree_sitter_lua", "language"),
}
EXTENSIONS = {".py": "python", ".js": "javascript", ".jsx": "javascriptreact", ".ts": "typescript",
              ".tsx": "typescriptreact", ".go": "go", ".rs": "rust", ".java": "java", ".c": "c", ".h": "c",
              ".cpp": "cpp", ".cc": "cpp", ".lua": "lua", ".rb": "ruby", ".md": "markdown"}
"""LSP language ids by file extension, for callers that have a file name and no editor to ask."""
OPENER_PATTERNS = {
    "python": re.compile(r":\s*(#.*)?$"),
    "lua": re.compile(r"(\bthen|\bdo|\belse|\bfunction\b.*\)|\brepeat)\s*(--.*)?$"),
}
DEFAULT_OPENER = re.compile(r"(\{|:)\s*(//.*)?$")
PY_BLOCK_OWNERS = {
    "function_definition", "class_definition", "if_statement", "elif_clause", "else_clause", "for_statement",
    "while_statement", "with_statement", "try_statement", "except_clause", "finally_clause", "match_statement",
    "case_clause",
}


@functools.lru_cache(maxsize=None)
def parser_for(language: str) -> Any | None:
    """A tree-sitter parser for an LSP language id, or None (no grammar installed)."""
    grammar = GRAMMARS.get(language)
    if grammar is None:
        return None
    try:
        import tree_sitter

        module = importlib.import_module(grammar[0])
        return tree_sitter.Parser(tree_sitter.Language(getattr(module, grammar[1])()))
    except (ImportError, AttributeError, ValueError) as exc:
        log.warning("no tree-sitter grammar for %s (%s); using the indentation heuristic", language, exc)
        return None


def parse_errors(parser: Any, source: str) -> int:
    """Number of ``ERROR`` and missing nodes tree-sitter finds in ``source``."""
    tree = parser.parse(source.encode("utf-8", "surrogatepass"))
    count = 0
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            count += 1
        if node.has_error:
            stack.extend(node.children)
    return count


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _is_opener(line: str, language: str) -> bool:
    return bool(OPENER_PATTERNS.get(language, DEFAULT_OPENER).search(line.rstrip()))


def wants_multiline(lines: list[str], row: int, col: int, language: str) -> bool:
    """Whether a multi-line suggestion fits at (row, col) of a document given as lines."""
    line = lines[row] if row < len(lines) else ""
    if line[col:].strip():
        return False  # text after the cursor: complete this line only
    before = line[:col]
    if before.strip():
        opener_row = row if _is_opener(before, language) else None
    else:
        prev = next((r for r in range(row - 1, -1, -1) if lines[r].strip()), None)
        opener_row = prev if prev is not None and _is_opener(lines[prev], language) else None
    if opener_row is None:
        return False
    parser = parser_for(language)
    if parser is not None:
        return _block_empty(parser, lines, opener_row, language)
    following = next((lines[r] for r in range(row + 1, len(lines)) if lines[r].strip()), None)
    return following is None or _indent(following) <= _indent(lines[opener_row])


def _named_content(node: Any) -> list[Any]:
    return [c for c in node.named_children if "comment" not in c.type]


def _block_empty(parser: Any, lines: list[str], opener_row: int, language: str) -> bool:
    tree = parser.parse("\n".join(lines).encode("utf-8"))
    text = lines[opener_row]
    code = re.sub(r"\s*(#|//|--).*$", "", text) if language != "python" else re.sub(r"\s*#.*$", "", text)
    col = len(code.rstrip().encode("utf-8")) - 1  # the opener's last character
    node = tree.root_node.descendant_for_point_range((opener_row, col), (opener_row, col))
    if language == "python":
        while node is not None and node.type not in PY_BLOCK_OWNERS:
            node = node.parent
        if node is None:
            return True  # does not parse yet: a body is what comes next
        body = node.child_by_field_name("body") or next((c for c in node.children if c.type == "block"), None)
        return body is None or not _named_content(body)
    if node is not None and node.type == "{":
        block = node.parent
        if block is None or block.type == "ERROR" or block.has_error:
            return True
        return not _named_content(block)
    # Lua-style keyword openers: the smallest statement around the opener owns the block
    while node is not None and not (node.type.endswith(("statement", "declaration", "definition")) or node.type == "ERROR"):
        node = node.parent
    if node is None or node.type == "ERROR" or node.has_error:
        return True
    body = node.child_by_field_name("body") or next((c for c in node.named_children if c.type == "block"), None)
    return body is None or not _named_content(body)
