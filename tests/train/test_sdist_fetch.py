"""Corpus sdists: fetched from a real (local) Simple API index, hash-checked, read without running package code.

The index is an HTTP server in a thread serving PEP 691 JSON (or PEP 503 HTML); the
sdist it serves would write a marker file if any of its code ran (``setup.py``, an
in-tree PEP 517 backend), as ``pip download`` did to prepare its metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from engine.train import corpus, sdist


def code(n: int = 20) -> str:
    return "".join(f"def function_{i}(value):\n    return value * {i} + {i * i}\n\n" for i in range(n))


def tarball(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """A .tar.gz of regular ``members`` and ``links`` (name -> (tarfile type, target))."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def evil_sdist(marker: Path) -> dict[str, bytes]:
    """An sdist whose every piece of code, if run, writes ``marker``."""
    write = f"open({str(marker)!r}, 'w').write('package code ran')\n"
    return {
        "evil_pkg-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: evil-pkg\nVersion: 1.0\nLicense-Expression: MIT\n",
        "evil_pkg-1.0/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "evil_pkg-1.0/backend.py": (
            write + "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
            "def prepare_metadata_for_build_wheel(directory, config_settings=None):\n    raise SystemExit(1)\n"
            "def build_wheel(directory, config_settings=None, metadata_directory=None):\n    raise SystemExit(1)\n"
        ).encode(),
        "evil_pkg-1.0/setup.py": write.encode(),
        "evil_pkg-1.0/evil_pkg/core.py": code().encode(),
    }


class Index:
    """A Simple API index on 127.0.0.1: ``listing`` (project -> files), ``blobs`` (path -> bytes)."""

    def __init__(self, html: bool = False) -> None:
        self.html = html
        self.listing: dict[str, list[dict]] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                index.requests.append((self.path, self.headers.get("Accept", "")))
                project = self.path.removeprefix("/simple/").strip("/")
                if self.path.startswith("/simple/") and project in index.listing:
                    files = index.listing[project]
                    if index.html:
                        links = "".join(f'<a href="{f["url"]}#sha256={f["hashes"].get("sha256", "")}">{f["filename"]}</a>\n' for f in files)
                        self._send(f"<!DOCTYPE html><html><body>{links}</body></html>".encode(), "text/html")
                    else:
                        body = {"meta": {"api-version": "1.0"}, "name": project, "files": files}
                        self._send(json.dumps(body).encode(), sdist.SIMPLE_JSON)
                elif self.path in index.blobs:
                    self._send(index.blobs[self.path], "application/octet-stream")
                else:
                    self.send_error(404)

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, project: str, filename: str, data: bytes, sha256: str | None = None) -> None:
        """List ``filename`` for ``project`` (relative URL, as PyPI's mirrors do), with its sha256 or the one given."""
        self.blobs[f"/files/{filename}"] = data
        digest = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
        entry = {"filename": filename, "url": f"../../files/{filename}", "hashes": {"sha256": digest} if digest else {}}
        self.listing.setdefault(project, []).append(entry)


@pytest.fixture(params=["PEP 691 JSON", "PEP 503 HTML"])
def index(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Index]:
    served = Index(html=request.param == "PEP 503 HTML")
    monkeypatch.setenv("PIP_INDEX_URL", served.url)
    yield served
    served.server.shutdown()
    served.server.server_close()


def test_the_pinned_sdist_is_fetched_checked_and_read_without_running_its_code(index: Index, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    published = tarball(evil_sdist(marker))
    index.publish("evil-pkg", "evil_pkg-1.0.1.tar.gz", tarball({"evil_pkg-1.0.1/PKG-INFO": b"Name: evil-pkg\n"}))
    index.publish("evil-pkg", "evil_pkg-1.0-py3-none-any.whl", b"not the sdist")
    index.publish("evil-pkg", "evil_pkg-1.0.tar.gz", published)
    cache = tmp_path / "cache"
    archive = sdist.fetch_sdist("evil-pkg", "1.0", cache)  # the index from PIP_INDEX_URL
    assert not marker.exists(), "building the corpus ran the package's code"
    assert archive == cache / "evil_pkg-1.0.tar.gz" and archive.read_bytes() == published
    assert [p for p in cache.iterdir()] == [archive]  # nothing half-downloaded left
    assert index.requests[0][0] == "/simple/evil-pkg/" and sdist.SIMPLE_JSON in index.requests[0][1]
    stats = corpus.Stats()
    files = list(corpus.package_files("evil-pkg", "1.0", archive, stats))
    assert "evil_pkg/core.py" in [f.path for f in files] and {f.licence for f in files} == {"MIT"}  # read as text only
    assert not marker.exists()
    served = len(index.requests)
    assert sdist.fetch_sdist("Evil_Pkg", "1.0", cache) == archive  # from the cache, whatever the name's spelling
    assert len(index.requests) == served


@pytest.mark.parametrize("advertised", ["0" * 64, ""], ids=["wrong sha256", "no sha256"])
def test_an_sdist_that_does_not_match_the_index_hash_is_refused(index: Index, tmp_path: Path, advertised: str) -> None:
    index.publish("evil-pkg", "evil_pkg-1.0.tar.gz", tarball(evil_sdist(tmp_path / "marker")), sha256=advertised)
    cache = tmp_path / "cache"
    with pytest.raises(sdist.FetchError, match="sha256"):
        sdist.fetch_sdist("evil-pkg", "1.0", cache)
    assert list(cache.iterdir()) == [] if cache.exists() else True


def test_a_missing_version_or_project_is_a_reason_not_a_crash(index: Index, tmp_path: Path) -> None:
    index.publish("evil-pkg", "evil_pkg-2.0.tar.gz", b"x")
    with pytest.raises(sdist.FetchError, match="no source distribution of Evil.Pkg 1.0"):
        sdist.fetch_sdist("Evil.Pkg", "1.0", tmp_path)
    assert index.requests[-1][0] == "/simple/evil-pkg/"  # the normalised name (PEP 503)
    with pytest.raises(sdist.FetchError, match="cannot read the index page of nothing-here"):
        sdist.fetch_sdist("nothing-here", "1.0", tmp_path)


@pytest.mark.parametrize(
    "members, links",
    [
        ({"pkg-1.0/../../escaped.py": code().encode()}, None),
        ({"/tmp/escaped.py": code().encode()}, None),
        ({}, {"pkg-1.0/pkg/out.py": (tarfile.SYMTYPE, "../../../etc/passwd")}),
        ({}, {"pkg-1.0/pkg/abs.py": (tarfile.SYMTYPE, "/etc/passwd")}),
        ({}, {"pkg-1.0/pkg/hard.py": (tarfile.LNKTYPE, "/etc/passwd")}),
        ({}, {"pkg-1.0/pkg/fifo": (tarfile.FIFOTYPE, "")}),
    ],
    ids=["dot-dot", "absolute", "symlink out", "absolute symlink", "hard link out", "fifo"],
)
def test_a_tarball_with_members_outside_its_folder_is_refused(tmp_path: Path, members: dict, links: dict | None) -> None:
    archive = tmp_path / "pkg-1.0.tar.gz"
    pkg_info = {"pkg-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\nLicense-Expression: MIT\n"}
    archive.write_bytes(tarball({**pkg_info, "pkg-1.0/pkg/core.py": code().encode(), **members}, links))
    with pytest.raises(sdist.UnsafeArchiveError, match="outside the package folder|special file"):
        list(corpus.package_files("pkg", "1.0", archive, corpus.Stats()))


def test_a_zip_with_members_outside_its_folder_is_refused(tmp_path: Path) -> None:
    pkg_info = b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\nLicense-Expression: MIT\n"
    for name, target in (("pkg-1.0/../escaped.py", None), ("pkg-1.0/pkg/link.py", "../../../etc/passwd")):
        archive = tmp_path / "pkg-1.0.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("pkg-1.0/PKG-INFO", pkg_info)
            info = zipfile.ZipInfo(name)
            if target is not None:
                info.external_attr = (0o120777 << 16)  # a symbolic link
            zipped.writestr(info, target or code())
        with pytest.raises(sdist.UnsafeArchiveError, match="outside the package folder"):
            list(corpus.package_files("pkg", "1.0", archive, corpus.Stats()))


def test_links_inside_the_folder_are_left_out_not_refused(tmp_path: Path) -> None:
    archive = tmp_path / "pkg-1.0.tar.gz"
    members = {
        "pkg-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\nLicense-Expression: MIT\n",
        "pkg-1.0/pkg/core.py": code().encode(),
    }
    archive.write_bytes(tarball(members, {"pkg-1.0/pkg/alias.py": (tarfile.SYMTYPE, "core.py")}))
    assert [f.path for f in corpus.package_files("pkg", "1.0", archive, corpus.Stats())] == ["pkg/core.py"]


def test_build_records_refused_and_failed_packages(index: Index, tmp_path: Path) -> None:
    pytest.importorskip("datasketch")
    unsafe = tarball({"bad-1.0/PKG-INFO": b"Name: bad\nLicense-Expression: MIT\n", "bad-1.0/../x.py": code().encode()})
    index.publish("bad", "bad-1.0.tar.gz", unsafe)
    index.publish("tampered", "tampered-1.0.tar.gz", b"changed on the mirror", sha256="1" * 64)
    manifest = corpus.build(tmp_path / "out", [("bad", "1.0"), ("tampered", "1.0")], tmp_path / "cache", [], include_stdlib=False)
    skipped = manifest["skipped_packages"]
    assert skipped["bad"].startswith("unsafe archive, refused")
    assert skipped["tampered"].startswith("download failed") and "sha256" in skipped["tampered"]
