"""The engine folder's ``manifest.json``: what the folder holds, and checksums that prove it.

An *engine folder* is what ``dlm-convert`` writes and the runtime loads: two ONNX
graphs, the tokenizer and this manifest. The manifest records the family, the
architecture, the special token ids, the graphs' interface and precision, and the
sha256 of every other file in the folder; :func:`read_manifest` verifies all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ManifestError
from engine.families import ArchConfig, TokenIds

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
"""2: the context graph also returns the span's first step (``span_index`` in; top-k, entropy out)
and the span step takes keys already rotated per row (no ``cache_pos``). 1: the first release."""

SPAN_OUTPUTS = ("top_ids", "top_probs", "entropy")
CONTEXT_INPUTS = ("input_ids", "position_ids", "cache_index", "span_index")
CONTEXT_OUTPUTS = ("cache_keys", "cache_values", *SPAN_OUTPUTS)
SPAN_INPUTS = ("span_ids", "span_pos", "span_valid", "cache_keys", "cache_values")


@dataclass
class Manifest:
    """Contents of ``manifest.json``."""

    family: str
    arch: ArchConfig
    token_ids: TokenIds
    precision: str
    top_k: int
    graphs: dict[str, str] = field(default_factory=lambda: {"context": "context.onnx", "span_step": "span_step.onnx"})
    tokenizer: str = "tokenizer.json"
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "format_version": self.format_version,
            "family": self.family,
            "arch": self.arch.to_dict(),
            "token_ids": self.token_ids.to_dict(),
            "precision": self.precision,
            "top_k": self.top_k,
            "graphs": self.graphs,
            "interface": {
                "context": {"inputs": list(CONTEXT_INPUTS), "outputs": list(CONTEXT_OUTPUTS)},
                "span_step": {"inputs": list(SPAN_INPUTS), "outputs": list(SPAN_OUTPUTS)},
            },
            "tokenizer": self.tokenizer,
            "files": self.files,
            "source": self.source,
            "validation": self.validation,
        }

    def write(self, folder: Path) -> None:
        """Checksum every file in ``folder`` (but the manifest) and write ``manifest.json``."""
        self.files = {
            path.relative_to(folder).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != MANIFEST_FILE
        }
        (folder / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


CACHED_HASH_MIN_BYTES = 1 << 20
"""Files from this size on have their sha256 remembered (smaller ones hash faster than a cache lookup pays)."""


def hash_cache_file() -> Path:
    """``<model cache>/hashes.json``: sha256 of large files by (path, size, mtime, inode)."""
    from engine.catalog import cache_dir

    return cache_dir() / "hashes.json"


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, computed once per (path, size, modification time, inode) and remembered.

    Verifying an engine folder on every load hashed its graphs every time: 2 GB,
    about 8 s, for a 0.5B model. A file that is replaced or rewritten gets a new
    modification time or inode, and is hashed again. The cache is the user's own
    file; if it cannot be read or written, files are simply hashed.
    """
    stat = path.stat()
    if stat.st_size < CACHED_HASH_MIN_BYTES:
        return sha256_file(path)
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache = hash_cache_file()
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, list) and len(entry) == 4 and entry[:3] == stamp and isinstance(entry[3], str):
        return entry[3]
    digest = sha256_file(path)
    known[key] = [*stamp, digest]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known), encoding="utf-8")
        tmp.replace(cache)
    except OSError:
        pass
    return digest


def is_engine_folder(folder: str | Path) -> bool:
    """True if ``folder`` holds a ``manifest.json``."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and (by default) verify an engine folder's manifest.

    Raises :class:`ManifestError` for a missing or malformed manifest, a newer
    format, a missing file or a checksum mismatch.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"{folder} has no {MANIFEST_FILE}: not an engine folder. Convert a checkpoint first: dlm-convert SRC {folder}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        version = int(data["format_version"])
        if version > FORMAT_VERSION:
            raise ManifestError(
                f"{path} has format version {version}; this engine reads up to {FORMAT_VERSION}: upgrade dlm-lsp"
            )
        if version < FORMAT_VERSION:
            raise ManifestError(
                f"{path} has format version {version}, from an older dlm-convert; this engine reads format "
                f"{FORMAT_VERSION}: convert the checkpoint again (dlm-convert SRC {folder} --force)"
            )
        manifest = Manifest(
            family=data["family"],
            arch=ArchConfig.from_dict(data["arch"]),
            token_ids=TokenIds.from_dict(data["token_ids"]),
            precision=data["precision"],
            top_k=int(data["top_k"]),
            graphs=dict(data["graphs"]),
            tokenizer=data["tokenizer"],
            files=dict(data["files"]),
            source=dict(data.get("source", {})),
            validation=dict(data.get("validation", {})),
            format_version=version,
        )
    except ManifestError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path} is malformed ({exc!r}); re-run dlm-convert to rebuild the folder") from exc
    for required in (*manifest.graphs.values(), manifest.tokenizer):
        if required not in manifest.files:
            raise ManifestError(f"{path} does not list {required}; re-run dlm-convert")
    if verify:
        problems = []
        for name, meta in manifest.files.items():
            file = folder / name
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif file.stat().st_size != meta.get("bytes") or cached_sha256(file) != meta.get("sha256"):
                problems.append(f"{name} does not match its checksum (corrupt or modified)")
        if problems:
            raise ManifestError(
                f"engine folder {folder} failed verification: {'; '.join(problems)}. "
                "Re-run dlm-convert (or restore the folder from git/your download)"
            )
    return manifest
