"""Golden cases of the post-processing filters (``tests/golden/postprocess/*.txt``).

Each case file has sections introduced by ``=== name`` lines (a section's text
ends with the line before the next header; write an extra blank line to end it
with a newline): ``filter`` (one
filter's name, or ``all`` for the whole pipeline), ``multiline``, ``before`` (the
document up to the cursor), ``after`` (from the cursor on), ``completion`` (what
the engine returned), ``expected`` (``<dropped>`` when the suggestion must be
suppressed) and optionally ``replace_suffix`` and ``language`` (default python).
The filters see the context the server builds (``build_context``), as in production.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dlm_lsp.context import build_context
from dlm_lsp.postprocess import FILTERS, Context, Suggestion, postprocess
from dlm_lsp.settings import Settings

CASES = sorted((Path(__file__).parents[1] / "golden" / "postprocess").glob("*.txt"))


def parse_case(path: Path) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("=== "):
            current = line[4:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {name: "\n".join(lines[:-1] if lines and lines[-1] == "" else lines) for name, lines in sections.items()}


def context_of(before: str, after: str, multiline: bool, language: str = "python") -> Context:
    """The filters' context as the server builds it (:func:`dlm_lsp.context.build_context`)."""
    settings = Settings(multiline="always" if multiline else "never", other_files=False)
    return build_context(before + after, len(before), language, settings).post


def test_cases_exist_for_every_filter():
    names = {parse_case(p)["filter"] for p in CASES}
    assert {name for name, _ in FILTERS} <= names


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path):
    case = parse_case(path)
    ctx = context_of(case["before"], case["after"], case["multiline"] == "true", case.get("language", "python"))
    if case["filter"] == "all":
        got = postprocess(case["completion"], ctx)
    else:
        run = dict(FILTERS)[case["filter"]]
        got = run(Suggestion(case["completion"]), ctx)
    if case["expected"] == "<dropped>":
        assert got is None
    else:
        assert got is not None, "suggestion was dropped"
        assert got.text == case["expected"]
        assert got.replace_suffix == int(case.get("replace_suffix", "0") or 0)
