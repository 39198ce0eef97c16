"""Multi-line decisions from syntax, per language (tree-sitter grammars from PyPI)."""

from __future__ import annotations

import pytest

from dlm_lsp.syntax import GRAMMARS, parser_for, wants_multiline

CURSOR = "|"

CASES = [
    # (language, source with | at the cursor, multi-line wanted)
    ("python", "def f(x):\n    |\n", True),
    ("python", "def f(x):|", True),
    ("python", "def f(x):\n    |\n    return x\n", False),
    ("python", "class A:\n    def g(self):\n        |\n", True),
    ("python", "x = compute(|", False),
    ("python", "x = 1|\n", False),
    ("python", "if ok:  # comment\n    |\n", True),
    ("javascript", "function add(a, b) {\n  |\n}\n", True),
    ("javascript", "function add(a, b) {\n  |\n  return a + b;\n}\n", False),
    ("javascript", "const x = 1;|\n", False),
    ("typescript", "class Box {\n  |\n}\n", True),
    ("typescriptreact", "function App() {\n  |\n}\n", True),
    ("go", "func main() {\n\t|\n}\n", True),
    ("go", "func main() {\n\t|\n\tfmt.Println(1)\n}\n", False),
    ("rust", "fn main() {\n    |\n}\n", True),
    ("java", "class A {\n  void f() {\n    |\n  }\n}\n", True),
    ("c", "int main(void) {\n    |\n}\n", True),
    ("cpp", "int main() {\n    |\n    return 0;\n}\n", False),
    ("lua", "function greet(name)\n  |\nend\n", True),
    ("lua", "for i = 1, 10 do\n  |\n  print(i)\nend\n", False),
    ("lua", "local x = 1|\n", False),
    ("ruby", "def f\n  |\n", False),  # no grammar, no opener: single line
    ("kotlin", "fun main() {\n    |\n}\n", True),  # indentation heuristic
]


@pytest.mark.parametrize("language, source, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_wants_multiline(language, source, expected):
    before, after = source.split(CURSOR)
    lines = (before + after).split("\n")
    row = before.count("\n")
    col = len(before.split("\n")[-1])
    assert wants_multiline(lines, row, col, language) is expected


@pytest.mark.parametrize("language", sorted(GRAMMARS))
def test_grammars_are_installed(language):
    assert parser_for(language) is not None
