"""Source distributions for the corpus: fetched from a package index and read, never built or run.

No package code ever runs. ``pip download`` would run each sdist's build backend
(``setup.py``, a PEP 517 backend) to prepare its metadata; here nothing is built:

* :func:`fetch_sdist` finds ``name==version`` in the package index's Simple API
  (``PIP_INDEX_URL`` or PyPI), asking for the PEP 691 JSON form and reading the
  PEP 503 HTML form if that is what the index serves, downloads the .tar.gz (else
  the .zip) as it is, and keeps it only if its sha256 matches the one the index
  gives; a file the index gives no sha256 for is not downloaded at all.
* :class:`open_archive` reads an archive's members in memory, never extracting
  anything. Every member is checked first: an archive with a member that would
  land outside its folder (an absolute path, ``..``, a link out) or a device or
  FIFO is refused with :class:`UnsafeArchiveError`. :func:`read_pkg_info` reads
  the ``PKG-INFO`` metadata the corpus takes each package's licence from.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import urllib.request
import zipfile
from email.parser import Parser
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urljoin, urlsplit

DEFAULT_INDEX = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"  # PEP 691
HTTP_TIMEOUT_S = 60
MAX_SDIST_BYTES = 256 << 20
PROJECT_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
# A member is read up to one byte past this, and no further: a larger file is too large for the corpus anyway.
MAX_FILE_BYTES = 200_000


class UnsafeArchiveError(ValueError):
    """An sdist member would land outside the package's folder (absolute path, ``..``, a link out) or is a device."""


def _outside(path: str) -> bool:
    """True if ``path``, relative to the archive's root, is absolute or leads out of it."""
    path = path.replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return True
    normal = posixpath.normpath(path)
    return normal == ".." or normal.startswith("../")


def _check_member(archive: Path, name: str, link_to: str | None = None) -> None:
    """Refuse a member named absolutely or with a ``..`` part, or a link to ``link_to`` (from the root) outside."""
    if _outside(name) or ".." in name.replace("\\", "/").split("/"):
        raise UnsafeArchiveError(f"{archive.name}: member {name!r} would land outside the package folder")
    if link_to is not None and _outside(link_to):
        raise UnsafeArchiveError(f"{archive.name}: link {name!r} points outside the package folder ({link_to!r})")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    return handle.read(MAX_FILE_BYTES + 1) if handle is not None else b""  # more is "too large" anyway


def _read_zipped(zipped: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with zipped.open(info) as handle:
        return handle.read(MAX_FILE_BYTES + 1)


def _tar_members(path: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Regular files of a tar sdist, after checking every member; links are checked, then left out."""
    members = tar.getmembers()
    for m in members:
        if m.issym():
            _check_member(path, m.name, posixpath.join(posixpath.dirname(m.name), m.linkname))
        elif m.islnk():
            _check_member(path, m.name, m.linkname)  # a hard link names its target from the root
        else:
            _check_member(path, m.name)
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise UnsafeArchiveError(f"{path.name}: member {m.name!r} is a device, FIFO or other special file")
    return [m for m in members if m.isfile()]


def _zip_members(path: Path, zipped: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Regular files of a zip sdist, after checking every member; symbolic links are checked, then left out."""
    files = []
    for info in zipped.infolist():
        _check_member(path, info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            with zipped.open(info) as handle:
                target = handle.read(4096).decode("utf-8", "replace")
            _check_member(path, info.filename, posixpath.join(posixpath.dirname(info.filename), target))
        elif not info.is_dir():
            files.append(info)
    return files


class open_archive:
    """Iterate ``(name, read)`` over the regular files of a .tar.gz or .zip sdist, never extracting anything.

    Every member is checked first: one that would land outside the package's folder
    on extraction raises :class:`UnsafeArchiveError`. ``read`` returns at most
    ``MAX_FILE_BYTES + 1`` bytes (a larger file is dropped as too large).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        if self.path.suffix == ".zip":
            self._zip = zipfile.ZipFile(self.path)
            zipped = self._zip
            return ((i.filename, functools.partial(_read_zipped, zipped, i)) for i in _zip_members(self.path, zipped))
        self._tar = tarfile.open(self.path)
        tar = self._tar
        return ((m.name, functools.partial(_read_member, tar, m)) for m in _tar_members(self.path, tar))

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "_zip", None) is not None:
            self._zip.close()
        if getattr(self, "_tar", None) is not None:
            self._tar.close()


def read_pkg_info(archive: Path) -> dict[str, list[str]]:
    """The fields of the sdist's top-level ``PKG-INFO`` (name -> values, in order), or {} if it has none."""
    with open_archive(archive) as members:
        for name, read in members:
            parts = name.split("/")
            if len(parts) == 2 and parts[1] == "PKG-INFO":
                message = Parser().parsestr(read().decode("utf-8", "replace"))
                meta: dict[str, list[str]] = {}
                for key, value in message.items():
                    meta.setdefault(key, []).append(value)
                return meta
    return {}


class FetchError(Exception):
    """An sdist could not be downloaded, or failed its check; the message says which and why."""


def index_url() -> str:
    """The package index: ``PIP_INDEX_URL`` when set (the index pip would use), else PyPI."""
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


class _Links(HTMLParser):
    """The ``href`` of every anchor of a PEP 503 (HTML) Simple API page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Collect anchors' targets."""
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def index_files(name: str, index: str) -> list[tuple[str, str, str]]:
    """``(filename, url, sha256)`` of every file ``index`` lists for project ``name``.

    Asks for the PEP 691 JSON form of the Simple API and reads the PEP 503 HTML form
    if that is what the index serves; ``sha256`` is "" where the index gives none.
    """
    page = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', name).lower()}/"
    request = urllib.request.Request(page, headers={"Accept": f"{SIMPLE_JSON}, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        kind = response.headers.get_content_type()
        body = response.read(64 << 20)
        page = response.geturl()
    if kind == SIMPLE_JSON or kind.endswith("+json"):
        return [
            (str(f["filename"]), urljoin(page, str(f["url"])), str((f.get("hashes") or {}).get("sha256", "")))
            for f in json.loads(body).get("files", [])
        ]
    links = _Links()
    links.feed(body.decode("utf-8", "replace"))
    files = []
    for href in links.hrefs:
        url, _, fragment = urljoin(page, href).partition("#")
        sha256 = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else ""
        files.append((unquote(urlsplit(url).path.rsplit("/", 1)[-1]), url, sha256))
    return files


def _shown(url: str) -> str:
    """``url`` without any user name or password in it, for messages."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() if "@" in parts.netloc else url


def fetch_sdist(name: str, version: str, cache: Path, index: str | None = None) -> Path:
    """The sdist (.tar.gz, else .zip) of ``name==version`` in ``cache``, downloaded from the package index if needed.

    Runs no package code: the file the index's Simple API lists is downloaded as
    it is, and kept only if its sha256 matches the index's. ``index`` defaults to
    :func:`index_url`. Raises :class:`FetchError`.
    """
    if not PROJECT_NAME.match(name) or not version:
        raise FetchError(f"{name!r}: not a project name pinned to a version (name==version)")
    stem = re.sub(r"[-_.]+", "[-_.]", name)
    pattern = re.compile(rf"^{stem}-{re.escape(version)}\.(tar\.gz|zip)$", re.IGNORECASE)
    for existing in sorted(cache.iterdir()) if cache.is_dir() else []:
        if pattern.match(existing.name):
            return existing
    index = (index or index_url()).rstrip("/")
    try:
        listed = index_files(name, index)
    except (OSError, http.client.HTTPException, ValueError, KeyError, AttributeError, TypeError) as exc:  # or malformed JSON
        raise FetchError(f"cannot read the index page of {name} at {_shown(index)}: {exc}") from exc
    sdists = sorted((f for f in listed if pattern.match(f[0])), key=lambda f: not f[0].endswith(".tar.gz"))
    if not sdists:
        raise FetchError(f"{_shown(index)} lists no source distribution of {name} {version}")
    filename, url, sha256 = sdists[0]
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise FetchError(f"{_shown(index)} gives no sha256 for {filename}: an unchecked download is refused")
    if urlsplit(url).scheme not in ("https", "http"):
        raise FetchError(f"{filename}: refusing to fetch {_shown(url)} (not http or https)")
    cache.mkdir(parents=True, exist_ok=True)
    handle, part_name = tempfile.mkstemp(dir=cache, prefix=f".{filename}.", suffix=".part")
    part = Path(part_name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > MAX_SDIST_BYTES:
                    raise FetchError(f"{filename}: larger than {MAX_SDIST_BYTES >> 20} MiB")
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256.lower():
            raise FetchError(f"{filename}: sha256 {digest.hexdigest()} is not the index's {sha256.lower()}: refused")
        part.replace(cache / filename)
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"cannot download {_shown(url)}: {exc}") from exc
    finally:
        part.unlink(missing_ok=True)
    return cache / filename
