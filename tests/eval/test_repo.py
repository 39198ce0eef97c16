"""Middles cut from a source tree where a cursor would be: deterministic, faithful to the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import InputError
from engine.eval.repo import repo_problems, source_files

MODULE = '''"""A small module with blocks to complete."""

import os


def size(path):
    """Bytes in the file at path."""
    if not os.path.exists(path):
        return 0
    return os.path.getsize(path)


class Counter:
    def __init__(self, start=0):
        self.value = start
        self.history = []

    def add(self, n):
        self.value += n
        self.history.append(n)
        return self.value
'''


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "core.py").write_text(MODULE)
    (tmp_path / "pkg" / "more.py").write_text(MODULE.replace("Counter", "Tally").replace("size", "length"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helpers.py").write_text(MODULE)  # a test folder: skipped
    (tmp_path / "pkg" / "test_core.py").write_text(MODULE)  # a test file: skipped
    (tmp_path / "pkg" / "notes.txt").write_text(MODULE)  # not Python: skipped
    return tmp_path


def test_only_usable_source_files_are_read(tree: Path):
    assert [path for path, _ in source_files(tree)] == ["pkg/core.py", "pkg/more.py"]


def test_single_line_middles_are_the_rest_of_a_line(tree: Path):
    problems = repo_problems(tree, "single", 12, seed=3)
    assert len(problems) == 12
    originals = dict(source_files(tree))
    for p in problems:
        path = p.task_id.split("/", 1)[1].rsplit(":", 2)[0]
        assert p.text[: p.offset] + p.middle + p.text[p.offset :] == originals[path]  # nothing else changed
        assert "\n" not in p.middle and len(p.middle.strip()) >= 2
        line_start = p.text.rfind("\n", 0, p.offset) + 1
        line = p.text[line_start : p.offset] + p.middle
        assert p.offset - line_start >= len(line) - len(line.lstrip())  # the cursor is never inside the indentation
        assert p.text[p.offset :].startswith("\n")  # the line break stays in the suffix
        assert p.language == "python" and p.kind == "single"
    assert repo_problems(tree, "single", 12, seed=3) == problems  # deterministic
    assert repo_problems(tree, "single", 12, seed=4) != problems


def test_multi_line_middles_are_the_start_of_a_block_body(tree: Path):
    problems = repo_problems(tree, "multi", 4, seed=0)
    assert problems
    for p in problems:
        assert 2 <= p.middle.count("\n") + 1 <= 5
        opener = p.text[: p.offset].rstrip(" ").rstrip("\n").rsplit("\n", 1)[-1]
        assert opener.rstrip().endswith(":")
        assert p.text[: p.offset].endswith("\n" + " " * (len(p.text[: p.offset]) - p.text[: p.offset].rfind("\n") - 1))


def test_a_corpus_split_stands_in_for_a_tree(tmp_path: Path):
    split = tmp_path / "heldout.jsonl"
    split.write_text(json.dumps({"source": "demo", "version": "1", "licence": "MIT", "path": "m.py", "text": MODULE}) + "\n")
    problems = repo_problems(split, "single", 3, seed=0)
    assert len(problems) == 3 and all(p.task_id.startswith("single/demo/m.py:") for p in problems)


def test_bad_input_is_an_input_error(tmp_path: Path):
    with pytest.raises(InputError, match="no usable source files"):
        repo_problems(tmp_path, "single", 3)
    with pytest.raises(InputError, match="neither a folder"):
        repo_problems(tmp_path / "missing", "single", 3)
    with pytest.raises(InputError, match="kind"):
        repo_problems(tmp_path, "block", 3)
