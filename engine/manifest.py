"""The engine folder's ``manifest.json``: what the folder holds, and checksums that prove it.

An *engine folder* is what ``dlm-convert`` writes and the runtime loads: two ONNX
graphs, the tokenizer and this manifest. The manifest records the family, the
architecture, the special token ids, the graphs' interface and precision, and the
sha256 of every other file in the folder; :func:`read_manifest` verifies all of it.

The folder is data from wherever the user got it, so reading it trusts nothing in
it: every path the manifest names (and every external-data file its graphs name)
must stay inside the folder once symbolic links are resolved, the architecture
must be within sane bounds, and sizes are compared before anything is hashed. The
checksums prove that the files match the manifest (integrity); only a manifest
checksum recorded outside the folder (the catalog's, see ``expected_sha256``)
proves that the manifest is the one that was installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from engine.errors import ManifestError
from engine.families import ArchConfig, TokenIds

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 3
"""3: the span step also takes ``cache_valid`` and one context's values per row, so that the
span steps of concurrent requests run as one batch (:mod:`engine.scheduler`), and the context
pass takes ``prior_keys``/``prior_values``, context kept from the previous request of the same
document (:mod:`engine.reuse`). 2: the context
graph also returns the span's first step (``span_index`` in; top-k, entropy out) and the span
step takes keys already rotated per row (no ``cache_pos``). 1: the first release."""
OLDEST_READABLE_FORMAT = 2
"""Format 2 folders still load and serve; their span steps run one request at a time."""

SPAN_OUTPUTS = ("top_ids", "top_probs", "entropy")
CONTEXT_INPUTS = ("input_ids", "position_ids", "cache_index", "span_index", "prior_keys", "prior_values")
CONTEXT_INPUTS_V2 = CONTEXT_INPUTS[:4]
CONTEXT_OUTPUTS = ("cache_keys", "cache_values", *SPAN_OUTPUTS)
SPAN_INPUTS = ("span_ids", "span_pos", "span_valid", "cache_keys", "cache_values", "cache_valid")
SPAN_INPUTS_V2 = SPAN_INPUTS[:5]
"""The span step's inputs in format 2 (no ``cache_valid``)."""


def span_inputs(format_version: int) -> tuple[str, ...]:
    """The span step graph's inputs in a folder of ``format_version``."""
    return SPAN_INPUTS if format_version >= 3 else SPAN_INPUTS_V2


def context_inputs(format_version: int) -> tuple[str, ...]:
    """The context graph's inputs in a folder of ``format_version``."""
    return CONTEXT_INPUTS if format_version >= 3 else CONTEXT_INPUTS_V2


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
                "context": {"inputs": list(context_inputs(self.format_version)), "outputs": list(CONTEXT_OUTPUTS)},
                "span_step": {"inputs": list(span_inputs(self.format_version)), "outputs": list(SPAN_OUTPUTS)},
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
    """``<model cache>/hashes.json``: sha256 of large files by (path, size, mtime, ctime, inode)."""
    from engine.catalog import cache_dir

    return cache_dir() / "hashes.json"


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, computed once per (path, size, modification time, change time, inode) and remembered.

    Verifying an engine folder on every load hashed its graphs every time: 2 GB,
    about 8 s, for a 0.5B model. A file that is replaced or rewritten gets a new
    inode or change time, and is hashed again. The change time (ctime) is in the
    key because the modification time is not evidence: whoever can rewrite a file
    can set its mtime back (``touch -d``), while the kernel sets ctime on every
    write and every ``utime``. The cache is the user's own file; if it cannot be
    read or written, files are simply hashed.
    """
    stat = path.stat()
    if stat.st_size < CACHED_HASH_MIN_BYTES:
        return sha256_file(path)
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    cache = hash_cache_file()
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, list) and len(entry) == len(stamp) + 1 and entry[:-1] == stamp and isinstance(entry[-1], str):
        return entry[-1]
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


MANIFEST_MAX_BYTES = 16 << 20
"""A manifest is a few kB; a larger one is refused before it is read."""

GRAPH_ROLES = ("context", "span_step")

ARCH_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (2, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_layers": (1, 1024),
    "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "head_dim": (2, 1024),
    "max_positions": (2, 1 << 22),
}
"""Bounds of the manifest's integer ``arch`` fields, each far beyond any published model (the largest
dense models have 126 layers, a 16384 hidden size and 256k-token vocabularies). The graphs fix
``num_layers``, ``num_kv_heads`` and ``head_dim`` themselves; these bounds refuse absurd values before
anything is loaded, with a message that names the field."""

ARCH_FLAGS = ("qkv_bias", "tie_word_embeddings", "shifted", "qk_norm")


def _outside(path: object, what: str) -> ManifestError:
    # One message whether or not the target exists: a manifest must not be a way to probe the disk.
    return ManifestError(
        f"{what} {path!r} is not a path inside the engine folder (an absolute path, a '..' component or a "
        "symbolic link leading out of it): the folder is refused"
    )


def confined_path(root: Path, name: object, what: str) -> PurePosixPath:
    """``name`` as a normalised relative path whose real location (links resolved) is inside ``root``.

    ``root`` must be a real path (:func:`os.path.realpath`). Anything else (not a
    string, empty, absolute, with a ``..`` component, or leading out through a
    symbolic link) raises :class:`ManifestError` with the same message whether
    or not the target exists.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise _outside(name, what)
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or pure == PurePosixPath("."):
        raise _outside(name, what)
    real = Path(os.path.realpath(root / pure))
    if real == root or not real.is_relative_to(root):
        raise _outside(name, what)
    return pure


def _check_arch(arch: Any, token_ids: Any, top_k: Any) -> None:
    """Types and bounds of the manifest's architecture, token ids and top-k (before anything is built from them)."""
    if not isinstance(arch, dict):
        raise ManifestError(f"arch is {type(arch).__name__}, not an object")
    problems = []
    value: Any
    for key, (low, high) in ARCH_LIMITS.items():
        value = arch.get(key)
        if type(value) is not int or not low <= value <= high:
            problems.append(f"arch.{key} = {value!r} (expected an integer in {low}..{high})")
    for key in ("rms_norm_eps", "rope_theta"):
        value = arch.get(key)
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            problems.append(f"arch.{key} = {value!r} (expected a finite number above 0)")
    for key in ARCH_FLAGS:
        if key in arch and type(arch[key]) is not bool:
            problems.append(f"arch.{key} = {arch[key]!r} (expected true or false)")
    if not problems and arch["num_heads"] % arch["num_kv_heads"]:
        problems.append(f"arch.num_heads = {arch['num_heads']} is not a multiple of arch.num_kv_heads")
    if not problems and arch["head_dim"] % 2:
        problems.append(f"arch.head_dim = {arch['head_dim']} is odd (rotary embeddings rotate pairs)")
    vocab: int = arch["vocab_size"] if type(arch.get("vocab_size")) is int else 0
    if type(top_k) is not int or not 1 <= top_k <= max(1, vocab):
        problems.append(f"top_k = {top_k!r} (expected an integer in 1..vocab_size)")
    if not isinstance(token_ids, dict):
        problems.append("token_ids is not an object")
    else:
        for key in ("mask", "eos", "pad", "bos"):
            value = token_ids.get(key)
            if key == "bos" and value is None:
                continue
            if type(value) is not int or not 0 <= value < max(vocab, 1):
                problems.append(f"token_ids.{key} = {value!r} (expected an id in 0..vocab_size-1)")
    if problems:
        raise ManifestError("; ".join(problems))


def _check_files(files: Any) -> None:
    if not isinstance(files, dict):
        raise ManifestError(f"files is {type(files).__name__}, not an object")
    for name, meta in files.items():
        if (
            not isinstance(meta, dict)
            or type(meta.get("bytes")) is not int
            or meta["bytes"] < 0
            or not isinstance(meta.get("sha256"), str)
        ):
            raise ManifestError(f"files[{name!r}] needs an integer 'bytes' and a string 'sha256'")


def read_manifest(folder: str | Path, verify: bool = True, *, expected_sha256: str | None = None) -> Manifest:
    """Read and (by default) verify an engine folder's manifest.

    Always checked: the manifest's own size and structure, the bounds of its
    architecture, that every path it names and every external-data file its
    graphs name is inside the folder (links resolved), and, with
    ``expected_sha256`` (recorded outside the folder, by the catalog), the sha256
    of ``manifest.json`` itself. ``verify`` adds the files' sizes (all of them,
    before any file is hashed) and then their sha256.

    Raises :class:`ManifestError` for a missing or malformed manifest, a newer
    format, a path out of the folder, a missing file or a checksum mismatch.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"{folder} has no {MANIFEST_FILE}: not an engine folder. Convert a checkpoint first: dlm-convert SRC {folder}"
        )
    root = Path(os.path.realpath(folder))
    try:
        confined_path(root, MANIFEST_FILE, "the manifest")
        with path.open("rb") as handle:
            raw = handle.read(MANIFEST_MAX_BYTES + 1)
        if len(raw) > MANIFEST_MAX_BYTES:
            raise ManifestError(f"it is over {MANIFEST_MAX_BYTES >> 20} MiB; a manifest is a few kB")
        if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
            raise ManifestError(
                "its sha256 is not the one recorded when the folder was installed: it was modified since"
            )
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ManifestError("it is not a JSON object")
        version = int(data["format_version"])
        if version > FORMAT_VERSION:
            raise ManifestError(f"format version {version}; this engine reads up to {FORMAT_VERSION}: upgrade dlm-lsp")
        if version < OLDEST_READABLE_FORMAT:
            raise ManifestError(
                f"format version {version}, from an older dlm-convert; this engine reads formats "
                f"{OLDEST_READABLE_FORMAT}-{FORMAT_VERSION}: convert the checkpoint again (dlm-convert SRC {folder} --force)"
            )
        for key in ("family", "precision"):
            if not isinstance(data[key], str):
                raise ManifestError(f"{key} = {data[key]!r} is not a string")
        _check_arch(data["arch"], data["token_ids"], data["top_k"])
        _check_files(data["files"])
        graphs = data["graphs"]
        if not isinstance(graphs, dict) or sorted(graphs) != sorted(GRAPH_ROLES):
            raise ManifestError(f"graphs must name exactly {' and '.join(GRAPH_ROLES)}")
        manifest = Manifest(
            family=data["family"],
            arch=ArchConfig.from_dict(data["arch"]),
            token_ids=TokenIds.from_dict(data["token_ids"]),
            precision=data["precision"],
            top_k=data["top_k"],
            graphs={role: confined_path(root, name, f"graph {role}").as_posix() for role, name in graphs.items()},
            tokenizer=confined_path(root, data["tokenizer"], "tokenizer").as_posix(),
            files={confined_path(root, name, "file").as_posix(): meta for name, meta in data["files"].items()},
            source=dict(data.get("source", {})),
            validation=dict(data.get("validation", {})),
            format_version=version,
        )
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{path} is malformed ({exc!r}); re-run dlm-convert to rebuild the folder") from exc
    for required in (*manifest.graphs.values(), manifest.tokenizer):
        if required not in manifest.files:
            raise ManifestError(f"{path} does not list {required}; re-run dlm-convert")
    if verify:
        _verify_files(folder, manifest)
    for name in manifest.graphs.values():
        _check_external_data(root, name, manifest)
    return manifest


def _verify_files(folder: Path, manifest: Manifest) -> None:
    """Sizes of every listed file first (a stat each), then, only if all match, their sha256."""
    problems = []
    for name, meta in manifest.files.items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != meta["bytes"]:
            problems.append(f"{name} is {file.stat().st_size} bytes, the manifest says {meta['bytes']}")
    if not problems:
        problems = [
            f"{name} does not match its checksum (corrupt or modified)"
            for name, meta in manifest.files.items()
            if cached_sha256(folder / name) != meta["sha256"]
        ]
    if problems:
        raise ManifestError(
            f"engine folder {folder} failed verification: {'; '.join(problems)}. "
            "Re-run dlm-convert (or restore the folder from git/your download)"
        )


# -- the graphs' external data ---------------------------------------------------------------------------

ONNX_MESSAGE_FIELDS: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "FunctionProto": {7: "NodeProto", 11: "AttributeProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},
    "AttributeProto": {5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto",
                       22: "SparseTensorProto", 23: "SparseTensorProto"},
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
    "TensorProto": {13: "StringStringEntryProto"},
    "StringStringEntryProto": {},
}
"""The ONNX protobuf fields through which a tensor can be reached, by message (field number -> message).

Every tensor of a model (initializers, node attributes, subgraphs of control-flow
nodes, functions, training graphs, sparse tensors) is reached through these; a
tensor's ``external_data`` entries name the file its data is read from. The test
suite checks this table against the ``onnx`` package's own descriptors."""

MAX_GRAPH_NESTING = 64


def external_data_locations(graph: Path) -> list[str]:
    """Every ``location`` of the external data of ``graph``'s tensors, read without loading any data.

    A minimal protobuf walk over :data:`ONNX_MESSAGE_FIELDS` (the serving path does
    not depend on the ``onnx`` package): tensor payloads are skipped, not read.
    Raises :class:`ValueError` if the file is not well-formed protobuf.
    """
    with graph.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            found: list[str] = []
            _walk(buffer, 0, len(buffer), "ModelProto", 0, found)
            return found


def _varint(buffer: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _walk(buffer: Any, pos: int, end: int, message: str, depth: int, found: list[str]) -> None:
    if depth > MAX_GRAPH_NESTING:
        raise ValueError(f"messages nested more than {MAX_GRAPH_NESTING} deep")
    fields = ONNX_MESSAGE_FIELDS[message]
    key = value = b""
    while pos < end:
        tag = buffer[pos]  # one-byte varints (most tags and lengths) without a call
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buffer, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buffer, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length = buffer[pos] if pos < end else 0x80
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(buffer, pos, end)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message")
            if message == "StringStringEntryProto":
                if number == 1:
                    key = bytes(buffer[pos : pos + length])
                elif number == 2:
                    value = bytes(buffer[pos : pos + length])
            elif number in fields:
                _walk(buffer, pos, pos + length, fields[number], depth + 1, found)
            pos += length
        else:
            raise ValueError(f"wire type {wire} (groups) is not used by ONNX")
        if pos > end:
            raise ValueError("a field runs past the end of its message")
    if message == "StringStringEntryProto" and key == b"location":
        found.append(value.decode("utf-8", errors="replace"))


def _check_external_data(root: Path, graph: str, manifest: Manifest) -> None:
    """Every external-data file of ``graph`` is inside the folder and listed (so checksummed) in the manifest.

    ONNX Runtime resolves a ``location`` against the graph's folder. It has refused
    paths out of it only since December 2025 (microsoft/onnxruntime#26776), with
    gaps closed later (sparse tensors, the TensorRT and other execution providers,
    the in-memory marker ``*/_ORT_MEM_ADDR_/*``), and ``onnxruntime>=1.20`` allows
    releases from before; so the engine checks the locations itself, whatever
    runtime reads them. Listed means checksummed: with ``verify``, a graph can only
    read bytes whose sha256 the manifest states.
    """
    real = Path(os.path.realpath(root / graph))
    if real != root / graph:
        raise ManifestError(f"graph {graph!r} is reached through a symbolic link; an engine folder holds its graphs")
    try:
        locations = external_data_locations(real)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"graph {graph} is not a readable ONNX file ({exc})") from exc
    listed = set(manifest.files)
    for location in dict.fromkeys(locations):
        if location.startswith("*") or "_ORT_MEM_ADDR_" in location:
            raise _outside(location, f"graph {graph}: external data")
        relative = PurePosixPath(graph).parent / confined_path(root, location, f"graph {graph}: external data")
        confined_path(root, relative.as_posix(), f"graph {graph}: external data")
        if relative.as_posix() not in listed:
            raise ManifestError(
                f"graph {graph} reads external data from {location!r}, which the manifest does not list "
                "(so no checksum covers it): the folder is refused"
            )
