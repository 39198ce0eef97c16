"""The VS Code extension: its declared settings match the server's, and it works in a real VS Code.

The end-to-end test runs code-server (VS Code in the browser) with the packaged
extension and the real server, driven by playwright-core in Debian's Chromium
(``editors/vscode/test/e2e.mjs``). ``editors/vscode/scripts/install-e2e.sh``
installs all of it; ``.ci/run`` calls that script, so CI always runs this test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from editor_env import FIB_SOURCE as SOURCE
from editor_env import TYPE_AT, need, screenshot_dir

from dlm_lsp.settings import Settings, rules

ROOT = Path(__file__).resolve().parents[2]
VSCODE = ROOT / "editors" / "vscode"
E2E = Path(os.environ.get("DLM_E2E_DIR", ROOT / ".e2e"))
CODE_SERVER = E2E / "node_modules" / "code-server"
VSIX = VSCODE / "dlm.vsix"
CLIENT_ONLY = {"dlm.server.path", "dlm.server.args"}



def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def test_package_json_declares_every_server_setting_with_its_default():
    manifest = json.loads((VSCODE / "package.json").read_text())
    props = manifest["contributes"]["configuration"]["properties"]
    declared = set(props) - CLIENT_ONLY
    expected = {f"dlm.{_camel(f.name)}" for f in fields(Settings)}
    assert declared == expected
    defaults = Settings()
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        value = list(value) if isinstance(value, tuple) else dict(value) if f.name == "enable" else value
        assert props[f"dlm.{_camel(f.name)}"]["default"] == value, f.name
        assert props[f"dlm.{_camel(f.name)}"].get("markdownDescription"), f.name
    for key, rule in rules().items():  # types, ranges and choices as the server validates them
        prop = props[f"dlm.{key}"]
        schema = prop["items"] if rule.kind == "lengths" else prop
        expected_type = {"string": "string", "choice": "string", "boolean": "boolean", "number": "number",
                         "integer": "integer", "lengths": "integer", "enable": "boolean"}[rule.kind]
        if rule.kind == "enable":
            schema = prop["additionalProperties"]
        assert schema["type"] == expected_type, key
        assert tuple(prop.get("enum", ())) == rule.choices, key
        low = "exclusiveMinimum" if rule.exclusive_minimum else "minimum"
        assert schema.get(low) == rule.minimum and schema.get("maximum") == rule.maximum, key
    commands = {c["command"] for c in manifest["contributes"]["commands"]}
    assert {"dlm.enable", "dlm.disable", "dlm.enableLanguage", "dlm.disableLanguage", "dlm.restartServer", "dlm.showLog"} <= commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MISSING = "code-server, Chromium or the packaged extension missing: run editors/vscode/scripts/install-e2e.sh"


def run_vscode(
    tmp_path: Path, scenario: str, text: str = SOURCE, env: dict[str, str] | None = None,
    extra: dict[str, str] | None = None, **settings: object,
) -> tuple[dict, Path, Path]:
    """Run ``e2e.mjs`` on a fresh profile with ``text`` in the edited file; returns its observations,
    the source file and settings.json. Every suggestion is shown (``minConfidence`` 0) unless asked.
    ``env`` adds to the environment of VS Code (and so of the server); ``extra`` to the driver's config."""
    installed = (CODE_SERVER / "out" / "node" / "entry.js").is_file() and VSIX.is_file()
    need(installed and shutil.which("chromium") is not None, MISSING)
    workspace, user, extensions, shots = (tmp_path / n for n in ("ws", "user", "ext", "shots"))
    for folder in (workspace, user / "User", extensions, shots):
        folder.mkdir(parents=True)
    source = workspace / ("fib.py" if text else "new.py")
    source.write_text(text)
    settings_file = user / "User" / "settings.json"
    settings_file.write_text(json.dumps({
        "dlm.server.path": str(Path(sys.executable).parent / "dlm-lsp"),
        "dlm.server.args": ["--log-file", str(tmp_path / "server.log")],
        "dlm.backend": "cpu",
        "dlm.latencyBudgetMs": 2000,
        "dlm.minConfidence": 0,
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "security.workspace.trust.enabled": False,
        "editor.inlineSuggest.enabled": True,
        "editor.quickSuggestions": {"other": False, "comments": False, "strings": False},
        "editor.suggestOnTriggerCharacters": False,
        "extensions.autoUpdate": False,
        "extensions.autoCheckUpdates": False,
        "telemetry.telemetryLevel": "off",
        **settings,
    }))
    (user / "code-server.yaml").write_text("auth: none\ncert: false\n")
    node = shutil.which("node")
    assert node, "node not found"
    entry = CODE_SERVER / "out" / "node" / "entry.js"
    subprocess.run(
        [node, str(entry), "--user-data-dir", str(user), "--extensions-dir", str(extensions), "--install-extension", str(VSIX)],
        check=True, capture_output=True, timeout=120,
    )
    config = {
        "e2eDir": str(E2E), "codeServer": str(CODE_SERVER), "workspace": str(workspace), "userDataDir": str(user),
        "extensionsDir": str(extensions), "port": _free_port(), "file": str(source), "line": TYPE_AT,
        "settingsFile": str(settings_file), "chromium": shutil.which("chromium"), "screenshots": str(shots),
        "scenario": scenario, **(extra or {}),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = subprocess.run(
        [node, str(VSCODE / "test" / "e2e.mjs"), str(tmp_path / "config.json")],
        capture_output=True, text=True, timeout=420, env={**os.environ, **(env or {})},
    )
    assert run.stdout.strip(), f"no result; stderr:\n{run.stderr[-4000:]}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "error" not in out, f"{out['error']}\nsteps: {out['steps']}\nstderr:\n{run.stderr[-4000:]}"
    return out, source, settings_file


def test_real_vscode_shows_ghost_text_accepts_with_tab_and_follows_settings(tmp_path: Path):
    out, source, settings = run_vscode(tmp_path, "complete")
    assert out["steps"] == ["workbench", "editor", "ready", "ghost", "accepted", "settings"]
    assert "codicon-check" in out["statusReady"]
    ghost = out["ghost"].replace("\xa0", " ")  # the DOM renders spaces as no-break spaces
    assert ghost.strip()
    lines = source.read_text().splitlines()
    typed = lines[TYPE_AT - 1]
    assert typed.startswith("    return ") and len(typed) > len("    return "), typed
    assert lines[:TYPE_AT - 1] == SOURCE.splitlines()[:TYPE_AT - 1]
    assert ghost.split("\n")[0].strip() in typed  # what was shown is what got inserted
    assert out["ghostWhileDisabled"] == ""
    assert out["ghostAfterReenable"].strip()
    # the server counted what the extension reported: shown, one Tab accept, one word accept
    assert "accepted 1 (+1 partly)" in out["statusMessage"], out["statusMessage"]
    assert 0 < len(out["ghostAfterWordAccept"]) < len(ghost)
    enable = json.loads(settings.read_text())["dlm.enable"]  # written by the extension's commands
    assert enable["python"] is True and enable["*"] is True


def test_real_vscode_shows_ghost_text_at_the_end_of_a_new_empty_file(tmp_path: Path):
    """No final newline after the cursor: the server's range must start at the cursor, not a line below."""
    out, source, _ = run_vscode(tmp_path, "endOfFile", text="")
    assert out["steps"] == ["workbench", "editor", "ready", "ghost", "accepted"]
    ghost = out["ghost"].replace("\xa0", " ")
    assert ghost.strip()
    lines = source.read_text().split("\n")
    assert lines[0] == "def add(a, b):"
    assert lines[1].lstrip().startswith("return ") and len(lines[1].strip()) > len("return"), lines
    assert ghost.split("\n")[0].strip() in lines[1]  # what was shown at the end of the file got inserted
    assert (tmp_path / "shots" / "ghost.png").is_file()
    if (folder := screenshot_dir()) is not None:
        shutil.copyfile(tmp_path / "shots" / "ghost.png", folder / "vscode-ghost-text.png")


def test_real_vscode_with_a_remote_dlm_serve(tmp_path: Path):
    """The extension unchanged; the endpoint setting sends completions to a dlm-serve holding the model."""
    import httpx
    from http_client import Serve

    served = Serve("--min-confidence", "0", "--budget-ms", "2000")
    try:
        out, source, _ = run_vscode(tmp_path, "endOfFile", text="", **{"dlm.endpoint": served.url})
        assert out["ghost"].strip() and source.read_text().strip()
        assert 'route="fim"' in httpx.get(served.url + "/metrics").text  # the suggestion came over HTTP
    finally:
        served.stop()


def test_missing_server_executable_shows_an_error(tmp_path: Path):
    out, _, _ = run_vscode(tmp_path, "errors", **{"dlm.server.path": str(tmp_path / "no-such-dlm-lsp")})
    assert "server not found" in out["statusError"]
    assert "was not found" in out["notifications"] and "pip install -e ." in out["notifications"] and "not on PyPI" in out["notifications"]


def test_missing_model_folder_shows_an_error(tmp_path: Path):
    out, _, _ = run_vscode(tmp_path, "errors", **{"dlm.model": str(tmp_path / "no-model")})
    assert "model failed to load" in out["statusError"] and "does not exist" in out["statusError"]
    assert "does not exist" in out["notifications"]


def test_a_model_fixed_on_disk_is_loaded_by_the_reload_command(tmp_path: Path):
    from engine import default_model_path

    target = tmp_path / "later-model"
    out, _, _ = run_vscode(tmp_path, "reload", extra={"modelFrom": str(default_model_path()), "modelTo": str(target)},
                           **{"dlm.model": str(target)})
    assert "does not exist" in out["statusError"]
    assert out["steps"][-2:] == ["error-shown", "reloaded"] and "codicon-check" in out["statusReloaded"]


def test_a_catalog_model_is_offered_downloaded_and_completes(tmp_path: Path):
    """The model setting names a catalog model not yet downloaded (a tiny one in a local hub cache, offline):
    VS Code shows the server's offer as a notification with buttons; Download pulls it and it completes."""
    pytest.importorskip("torch")
    from hub_cache import TINY_COMMIT, tiny_catalog

    env = tiny_catalog(tmp_path / "catalog")
    pulled = str(Path(env["DLM_LSP_CACHE"]) / "models" / "tiny-dream" / TINY_COMMIT[:12] / "int8")
    out, _, _ = run_vscode(
        tmp_path, "download", env=env, extra={"download": "Download tiny-dream (1 MB)", "pulledModel": pulled},
        **{"dlm.model": "tiny-dream"},
    )
    assert out["steps"] == ["workbench", "editor", "ready", "offered", "pulled", "ghost"]
    assert "tiny-dream" in out["offer"] and "demo model runs meanwhile" in out["offer"]
    assert out["buttons"][:2] == ["Download tiny-dream (1 MB)", "Not now"]
    assert pulled in out["statusMessage"]
    assert out["ghost"].strip()
