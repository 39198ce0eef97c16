"""The model catalog: open diffusion code models by name, downloaded and converted on request.

``dlm-lsp models list | pull NAME | path NAME | remove NAME`` and the ``model``
setting build on this module. An entry names a Hugging Face repository, the
family our graphs run it as, and what a user needs to choose it (size, licence,
published quality). Entries whose architecture our graphs cannot express are
listed with the reason and never downloaded.

Downloads go through ``huggingface_hub`` (its cache, ``HF_HOME``, ``HF_TOKEN``,
``HF_ENDPOINT`` mirrors and ``HF_HUB_OFFLINE`` all apply; interrupted downloads
resume), fetching only what conversion reads: config, tokenizer files and
safetensors weights. Converted engine folders live in the user cache directory
(``platformdirs``; ``DLM_LSP_CACHE`` overrides it), one per model, revision and
precision::

    <cache>/models/<name>/<commit[:12]>/<int8|int4|fp32>/manifest.json

and each manifest records the source repository, the commit and the sha256 of
every file conversion read. Teams add their own models (fine-tunes, a private
hub behind ``HF_ENDPOINT``) with a JSON file of entries named by
``DLM_LSP_CATALOG`` or found at ``<user config dir>/catalog.json``.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import re
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.errors import CatalogError, EngineError, ModelNotPresentError
from engine.families import family_names
from engine.probe import available_memory
from engine.weights import BYTES_PER_WEIGHT

log = logging.getLogger(__name__)

DOWNLOAD_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "model.safetensors.index.json",
    "*.safetensors",
)
"""The files conversion reads; nothing else of a repository is downloaded."""

PRECISIONS = ("int8", "fp32", "int4")
"""The precisions a pull can convert to (``int4``: 4-bit weights, see :mod:`engine.weights`)."""

AUTO = ("int8", "fp32")
"""What ``auto`` tries, in order: int8 when it passes validation, else fp32."""

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""Catalog names: they name folders of the model cache, so no path separators and no leading dot."""


@dataclass(frozen=True)
class CatalogEntry:
    """One model of the catalog."""

    name: str
    repo: str
    """Hugging Face repository id."""
    family: str
    """Engine family the model runs as (``dream``, ``llada``, ``qwen3``)."""
    parameters: int
    """Parameter count, computed from the published architecture."""
    vocab_size: int
    """Embedding rows (sizes the fp32 embedding the int8 graphs keep)."""
    hidden_size: int
    tied: bool
    """Whether the LM head is the embedding."""
    licence: str
    good_for: str
    quality: str
    """Published quality, with where it was published."""
    download_bytes: int
    """Bytes of safetensors in the repository (bf16 unless noted)."""
    revision: str = "main"
    supported: bool = True
    reason: str = ""
    """Why an unsupported model cannot run here."""
    origin: str = "built-in"
    """``built-in`` or the catalog file an entry came from."""

    def graph_bytes(self, precision: str) -> int:
        """Approximate size of the engine folder at ``precision`` (both graphs share one copy of the weights).

        int8 quantises the MatMul weights (blocks and head, 1 byte each) and keeps
        the embedding table in fp32 (4 bytes); int4 stores them in 5 bits (4-bit codes
        and a float scale per 32); fp32 is 4 bytes for everything, the head's
        transposed copy of a tied embedding included. Measured for the 0.5B shape:
        1.04 GB int8 (formula: 1.04 GB), 0.85 GB int4 (0.85 GB).
        """
        emb = self.vocab_size * self.hidden_size
        return 4 * emb + int(self._matrix_bytes(precision))

    def ram_bytes(self, precision: str) -> int:
        """Approximate resident memory of a server running it.

        The span-step session keeps a prepacked copy of the matrices; the context session
        reads them from the mapped folder (an int8 model; other precisions prepack there
        too); the embedding table is mapped and only the rows in use are read; about
        500 MB go to activations, caches and the runtime. Measured for the 0.5B shape
        after a 1,024-token completion: 1.37 GB int8 (formula: 1.49 GB), 1.27 GB int4 (1.12 GB).
        """
        return int(2 * self._matrix_bytes(precision)) + 500 * 2**20

    def _matrix_bytes(self, precision: str) -> float:
        """Bytes of the MatMul weights (every block's matrices and the LM head) at ``precision``."""
        # every parameter but the embedding table; a tied head is a transposed copy of that table
        matrices = self.parameters if self.tied else self.parameters - self.vocab_size * self.hidden_size
        return BYTES_PER_WEIGHT[precision] * matrices

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``models list --json``)."""
        return asdict(self)


def _qwen2(parameters: int, vocab: int, hidden: int, tied: bool) -> dict[str, Any]:
    return dict(parameters=parameters, vocab_size=vocab, hidden_size=hidden, tied=tied)


BUILT_IN: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="open-dcoder-0.5b",
        repo="fredzzp/open-dcoder-0.5B",
        family="dream",  # a plain Qwen2 config: the family is named here, not detected
        **_qwen2(494_032_768, 151_936, 896, True),
        licence="Apache-2.0",
        good_for="laptop CPUs: the smallest open diffusion code model",
        quality="HumanEval-infilling pass@1 32.5 (77.4 with the true middle length), Open-dLLM README",
        download_bytes=988_065_536,
    ),
    CatalogEntry(
        name="coda-1.7b",
        repo="Salesforce/CoDA-v0-Instruct",
        family="qwen3",
        parameters=2_031_739_904,  # untied head, as its modelling code builds it (1.72B counting it once)
        vocab_size=151_936,
        hidden_size=2048,
        tied=False,
        licence="CC-BY-NC-4.0 (non-commercial)",
        good_for="CPUs with 8+ GB free; instruction-tuned",
        quality="HumanEval pass@1 54.3, MBPP 47.2 (CoDA README; no infilling figure published)",
        download_bytes=8_126_959_616,  # its config says float32
    ),
    CatalogEntry(
        name="dream-coder-7b",
        repo="Dream-org/Dream-Coder-v0-Base-7B",
        family="dream",
        **_qwen2(7_615_616_512, 152_064, 3584, False),
        licence="Apache-2.0",
        good_for="GPUs, or CPUs with 20+ GB free",
        quality="HumanEval-infilling pass@1 55.3, Open-dLLM README",
        download_bytes=15_231_233_024,
    ),
    CatalogEntry(
        name="diffucoder-7b",
        repo="apple/DiffuCoder-7B-Base",
        family="dream",
        **_qwen2(7_615_616_512, 152_064, 3584, False),
        licence="Apple sample-code licence (see the model card)",
        good_for="GPUs, or CPUs with 20+ GB free",
        quality="HumanEval-infilling pass@1 54.8, Open-dLLM README",
        download_bytes=15_231_233_024,
    ),
    CatalogEntry(
        name="llada-8b",
        repo="GSAI-ML/LLaDA-8B-Base",
        family="llada",
        parameters=8_015_581_184,
        vocab_size=126_464,
        hidden_size=4096,
        tied=False,
        licence="MIT",
        good_for="GPUs; general text and code",
        quality="HumanEval-infilling pass@1 48.3 (Open-dLLM README); HumanEval 35.4 (LLaDA EVAL.md)",
        download_bytes=16_031_162_368,
    ),
    CatalogEntry(
        name="llada-moe-7b",
        repo="inclusionAI/LLaDA-MoE-7B-A1B-Base",
        family="llada",
        parameters=7_000_000_000,
        vocab_size=157_184,
        hidden_size=2048,
        tied=False,
        licence="Apache-2.0",
        good_for="-",
        quality="-",
        download_bytes=14_000_000_000,
        supported=False,
        reason="mixture-of-experts MLPs: our graphs have one dense MLP per block",
    ),
    CatalogEntry(
        name="fast-dllm-v2-7b",
        repo="Efficient-Large-Model/Fast_dLLM_v2_7B",
        family="dream",
        **_qwen2(7_615_616_512, 152_064, 3584, False),
        licence="see the model card",
        good_for="-",
        quality="-",
        download_bytes=15_231_233_024,
        supported=False,
        reason="block-causal attention (blocks attend only to earlier blocks): our graphs attend bidirectionally",
    ),
    CatalogEntry(
        name="dreamon-7b",
        repo="Dream-org/DreamOn-v0-7B",
        family="dream",
        **_qwen2(7_615_616_512, 152_064, 3584, False),
        licence="Apache-2.0",
        good_for="-",
        quality="-",
        download_bytes=15_231_233_024,
        supported=False,
        reason="variable-length infilling with expand/delete tokens, which our fixed-length sampler does not run",
    ),
)


def cache_dir() -> Path:
    """Where converted models live: ``DLM_LSP_CACHE`` or the platform's user cache directory."""
    env = os.environ.get("DLM_LSP_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("dlm-lsp"))


def user_catalog_file() -> Path:
    """The team/user catalog file: ``DLM_LSP_CATALOG`` or ``<user config dir>/catalog.json``."""
    env = os.environ.get("DLM_LSP_CATALOG")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("dlm-lsp")) / "catalog.json"


FIELD_TYPES: dict[str, type] = {
    f.name: {"int": int, "bool": bool, "str": str}[str(f.type)] for f in fields(CatalogEntry)
}
"""The JSON type of every catalog entry key (checked in a team's catalog file)."""


def _read_user_catalog(path: Path) -> list[CatalogEntry]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{path} is not a readable JSON catalog ({exc})") from exc
    items = data.get("models") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise CatalogError(f'{path}: expected a list of models, or {{"models": [...]}}')
    known = {f.name for f in fields(CatalogEntry)}
    required = {f.name for f in fields(CatalogEntry) if f.default is MISSING and f.default_factory is MISSING}
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise CatalogError(f"{path}: model #{i + 1} is not an object")
        unknown = set(item) - known
        missing = required - set(item)
        if unknown or missing:
            raise CatalogError(
                f"{path}: model #{i + 1} ({item.get('name', '?')}): "
                + "; ".join(
                    ([f"unknown keys {', '.join(sorted(unknown))}"] if unknown else [])
                    + ([f"missing keys {', '.join(sorted(missing))}"] if missing else [])
                )
            )
        wrong = [
            key for key, kind in FIELD_TYPES.items()
            if key in item and not (isinstance(item[key], kind) and not (kind is int and isinstance(item[key], bool)))
        ]
        if wrong:
            raise CatalogError(
                f"{path}: model #{i + 1} ({item.get('name', '?')}): wrong type for "
                + ", ".join(f"{key} (expected {FIELD_TYPES[key].__name__})" for key in wrong)
            )
        name = item.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise CatalogError(
                f"{path}: model #{i + 1}: name {name!r} must be lower-case letters, digits, '.', '_' or '-' "
                "(it names a folder of the model cache)"
            )
        if item.get("family") not in family_names():
            raise CatalogError(
                f"{path}: model {name}: family {item.get('family')!r} is not one of {', '.join(family_names())}"
            )
        entries.append(CatalogEntry(**{**item, "origin": str(path)}))
    return entries


def entries() -> list[CatalogEntry]:
    """Every entry: the built-in ones, then the user's (a user entry replaces a built-in of the same name)."""
    merged = {entry.name: entry for entry in BUILT_IN}
    for entry in _read_user_catalog(user_catalog_file()):
        merged[entry.name] = entry
    return list(merged.values())


def find(name: str) -> CatalogEntry:
    """The entry called ``name``; an unknown name raises with the closest names suggested."""
    by_name = {entry.name: entry for entry in entries()}
    if name in by_name:
        return by_name[name]
    close = difflib.get_close_matches(name.lower(), list(by_name), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise CatalogError(f"no model called {name!r} in the catalog{hint} (dlm-lsp models list shows them all)")


def is_catalog_name(spec: str) -> bool:
    """Whether a ``model`` setting is a catalog name rather than a folder path."""
    return bool(spec) and "/" not in spec and os.sep not in spec and not spec.startswith((".", "~"))


# -- what is present -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """A converted engine folder of a catalog model."""

    name: str
    commit: str
    precision: str
    path: Path
    bytes: int


def installed(name: str) -> list[Installed]:
    """The engine folders of ``name`` in the cache, newest first."""
    root = cache_dir() / "models" / name
    found = []
    for manifest in root.glob("*/*/manifest.json"):
        folder = manifest.parent
        if folder.name not in PRECISIONS:
            continue
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        found.append((manifest.stat().st_mtime, Installed(name, folder.parent.name, folder.name, folder, size)))
    return [item for _, item in sorted(found, key=lambda pair: pair[0], reverse=True)]


def path(name: str, precision: str | None = None) -> Path:
    """The engine folder of a pulled catalog model (the newest; ``precision`` to choose one).

    Raises :class:`ModelNotPresentError` when it has not been pulled.
    """
    entry = find(name)
    here = installed(entry.name)
    current = _read_current(entry)
    if current is not None and precision in (None, current.name):
        if any(item.path == current for item in here):
            return current
    for item in here:
        if precision in (None, item.precision) and _source_repo(item.path) == entry.repo:
            return item.path
    size = size_text(entry.download_bytes)
    raise ModelNotPresentError(
        f"{entry.name} has not been downloaded yet: dlm-lsp models pull {entry.name} ({size} download)", entry
    )


def _read_current(entry: CatalogEntry) -> Path | None:
    record = cache_dir() / "models" / entry.name / CURRENT_FILE
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        if data.get("repo") != entry.repo:
            return None
        folder = record.parent / str(data["commit"]) / str(data["precision"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folder if folder.parent.parent == record.parent and folder.name in PRECISIONS else None


def _source_repo(folder: Path) -> str | None:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("source", {}).get("repo")
    except (OSError, ValueError, AttributeError):
        return None


def resolve(spec: str) -> Path:
    """A ``model`` setting -> an engine (or checkpoint) folder: a path as given, a catalog name via :func:`path`."""
    if is_catalog_name(spec) and not Path(spec).exists():
        return path(spec)
    return Path(spec).expanduser()


def remove(name: str, *, download: bool = False, progress: Callable[[str], None] = log.info) -> int:
    """Delete a model's engine folders (and, with ``download``, its files in the Hugging Face cache).

    Returns the number of bytes freed.
    """
    entry = find(name)
    root = cache_dir() / "models" / entry.name
    with _lock(entry.name):  # never under a pull of the same model
        freed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
        try:
            shutil.rmtree(root)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CatalogError(f"cannot delete {root}: {exc.strerror}") from exc
    if download:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            info = scan_cache_dir()
        except CacheNotFound:  # no Hugging Face cache at all: nothing to remove
            return freed
        for repo in info.repos:
            if repo.repo_id == entry.repo and repo.repo_type == "model":
                freed += repo.size_on_disk
                info.delete_revisions(*(rev.commit_hash for rev in repo.revisions)).execute()
                progress(f"removed the download of {entry.repo} from the Hugging Face cache")
    return freed


# -- pulling -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """One pull of a model at a time (a second process waits for the first)."""
    folder = cache_dir() / "models"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / f".{name}.lock").open("a")
    except OSError as exc:
        raise CatalogError(
            f"cannot write to the model cache {folder}: {exc.strerror}. "
            "Set DLM_LSP_CACHE to a folder you can write"
        ) from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _by_hand(entry: CatalogEntry) -> str:
    patterns = " ".join(f"--include '{p}'" for p in DOWNLOAD_PATTERNS)
    return (
        f"On a machine with access: hf download {entry.repo} {patterns}, then copy the Hugging Face cache "
        f"(~/.cache/huggingface/hub/models--{entry.repo.replace('/', '--')}) to the same place here and run "
        f"dlm-lsp models pull {entry.name} again with HF_HUB_OFFLINE=1; or download the folder anywhere and "
        f"run: dlm-convert FOLDER DEST --family {entry.family}, then set the model to DEST."
    )


def download(
    entry: CatalogEntry, revision: str | None = None, tqdm_class: Any = None
) -> Path:
    """Download (or find in the Hugging Face cache) the files conversion needs; returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            entry.repo,
            revision=revision or entry.revision,
            allow_patterns=list(DOWNLOAD_PATTERNS),
            tqdm_class=tqdm_class,
        )
    except GatedRepoError as exc:
        raise CatalogError(
            f"{entry.repo} is gated: accept its licence on huggingface.co, then log in (hf auth login) or set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CatalogError(f"{entry.repo} was not found on the hub (or needs a token: set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise CatalogError(f"{entry.repo} has no revision {revision or entry.revision!r}") from exc
    except LocalEntryNotFoundError as exc:
        raise CatalogError(
            f"cannot download {entry.name}: the hub is unreachable or downloads are off (HF_HUB_OFFLINE), "
            f"and {entry.repo} is not in the Hugging Face cache. {_by_hand(entry)}"
        ) from exc
    except HfHubHTTPError as exc:
        raise CatalogError(f"downloading {entry.repo} failed: {exc}") from exc
    except OSError as exc:
        raise _os_error(exc, "downloading", entry) from exc
    snapshot = Path(str(folder))
    from engine.checkpoint import missing_files

    missing = missing_files(snapshot)
    if missing:  # offline, the hub hands back whatever part of a snapshot the cache holds
        partial = sorted(snapshot.parent.parent.glob("blobs/*.incomplete"))
        kept = sum(f.stat().st_size for f in partial)
        resumes = f" ({size_text(kept)} of it is kept and the next download resumes from there)" if partial else ""
        raise CatalogError(
            f"the download of {entry.repo} is incomplete{resumes}: {', '.join(missing)} missing. Run dlm-lsp models "
            f"pull {entry.name} again where the hub is reachable (HF_HUB_OFFLINE unset) to finish it. {_by_hand(entry)}"
        )
    return snapshot


def verify_download(snapshot: Path) -> dict[str, str]:
    """sha256 of every downloaded file; a file whose content does not match its hub hash is removed.

    In the Hugging Face cache, a snapshot file links to a blob named after the
    file's hash: the sha256 for LFS files (the weights). A mismatch (a corrupt or
    truncated file) is deleted so that the next pull downloads it again.
    """
    from engine.manifest import sha256_file

    hashes: dict[str, str] = {}
    corrupt = []
    for file in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        relative = file.relative_to(snapshot).as_posix()
        if not any(fnmatch.fnmatch(relative, pattern) for pattern in DOWNLOAD_PATTERNS):
            continue  # another tool's download of the same revision: not what conversion reads
        digest = sha256_file(file)
        blob = file.resolve().name
        if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob) and blob != digest:
            corrupt.append(file)
        hashes[relative] = digest
    if corrupt:
        for file in corrupt:
            try:
                file.resolve().unlink()
                file.unlink()
            except OSError as exc:
                raise CatalogError(
                    f"corrupt download: {file} does not match its hub checksum, and it cannot be deleted "
                    f"({exc.strerror}): delete it by hand and pull again"
                ) from exc
        names = ", ".join(f.name for f in corrupt)
        raise CatalogError(
            f"corrupt download in {snapshot}: {names} does not match its hub checksum; the bad file was removed, "
            "run the pull again to download it afresh"
        )
    return hashes


def _existing_parent(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def size_text(n: float) -> str:
    """Bytes as a person reads them: "1.0 GB", "850 MB"."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _os_error(exc: OSError, doing: str, entry: CatalogEntry) -> CatalogError:
    if exc.errno == errno.ENOSPC:
        return CatalogError(
            f"no space left on the device while {doing} {entry.name} ({exc.filename or ''}); it needs about "
            f"{size_text(entry.download_bytes)} for the download and {size_text(conversion_space(entry, 'auto', available_memory()))} "
            "while converting. No converted folder was left half-written (huggingface_hub keeps a partial download "
            "to resume it); free space or set DLM_LSP_CACHE / HF_HOME to a larger disk"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CatalogError(
            f"no permission to write while {doing} {entry.name}: {exc.filename or exc}. "
            "Set DLM_LSP_CACHE (converted models) or HF_HOME (downloads) to a folder you can write"
        )
    return CatalogError(f"{doing} {entry.name} failed: {exc}")


def conversion_space(entry: CatalogEntry, precision: str, memory: int | None = None) -> int:
    """Disk space a conversion needs while it runs, with ``memory`` bytes of RAM available (None: unknown).

    The float32 graphs (one shared weights file) are written first, when the machine
    has the memory to validate them, then the quantised ones beside them; a model
    too large for that writes only the quantised graphs (:func:`engine.export.streams`).
    The finished folder is moved into place, not copied.
    """
    from engine.export import streams

    streamed = streams(4 * entry.parameters, memory)
    if precision == "fp32":
        return entry.graph_bytes("fp32")
    quantized = entry.graph_bytes("int8" if precision == "auto" else precision)
    return quantized if streamed else entry.graph_bytes("fp32") + quantized


CURRENT_FILE = "current.json"
"""``<cache>/models/<name>/current.json``: the folder the last pull produced, which :func:`path` returns,
and the sha256 of the ``manifest.json`` of every folder a pull produced (``manifests``, by
``<commit>/<precision>``), which loading checks (:func:`recorded_manifest_sha256`)."""


def _read_record(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / CURRENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _set_current(entry: CatalogEntry, folder: Path, manifest_sha256: str) -> None:
    """Make ``folder`` the model's current one and record the sha256 of its manifest (under the pull's lock)."""
    root = folder.parent.parent
    known = _read_record(root).get("manifests")
    manifests = {
        key: value for key, value in (known.items() if isinstance(known, dict) else ())
        if isinstance(value, str) and (root / key / "manifest.json").is_file()
    }
    manifests[f"{folder.parent.name}/{folder.name}"] = manifest_sha256
    record = {"commit": folder.parent.name, "precision": folder.name, "repo": entry.repo, "manifests": manifests}
    target = root / CURRENT_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.replace(target)


def recorded_manifest_sha256(folder: str | Path) -> tuple[str, str | None] | None:
    """For a catalog model's engine folder (``<cache>/models/<name>/<commit>/<precision>``, links resolved):
    its name and the sha256 its pull recorded for its ``manifest.json`` (None if no pull recorded one).
    None for any other folder.

    The manifest's checksums prove only that the files match the manifest; this
    record, kept outside the folder, is what lets a load refuse a folder whose
    graph was replaced and whose manifest was rewritten to match.
    """
    models = Path(os.path.realpath(cache_dir() / "models"))
    real = Path(os.path.realpath(folder))
    if not real.is_relative_to(models):
        return None
    parts = real.relative_to(models).parts
    if len(parts) != 3 or parts[2] not in PRECISIONS:
        return None
    name, commit, precision = parts
    known = _read_record(models / name).get("manifests")
    value = known.get(f"{commit}/{precision}") if isinstance(known, dict) else None
    return name, value if isinstance(value, str) else None


def pull(
    name: str,
    *,
    precision: str = "auto",
    revision: str | None = None,
    progress: Callable[[str], None] = log.info,
    tqdm_class: Any = None,
    force: bool = False,
) -> Path:
    """Download, convert and verify a catalog model; returns its engine folder.

    A second pull finds the folder and does no work. ``precision`` ``auto``
    keeps int8 when it passes validation, else fp32 (the conversion says why).
    The folder becomes the model's current one (what :func:`path` returns).
    Conversion needs the ``export`` extra: that is checked before anything is
    downloaded.
    """
    from engine.export import require_export_deps, convert
    from engine.manifest import MANIFEST_FILE, read_manifest, sha256_file

    if precision not in (*PRECISIONS, "auto"):
        raise CatalogError(f"precision {precision!r}: choose int8, int4, fp32 or auto")
    entry = find(name)
    if not entry.supported:
        raise CatalogError(f"{entry.name} cannot run here: {entry.reason}")
    require_export_deps()
    with _lock(entry.name):
        progress(f"downloading {entry.repo} ({size_text(entry.download_bytes)}) through huggingface_hub")
        snapshot = download(entry, revision, tqdm_class)
        commit = snapshot.name
        base = cache_dir() / "models" / entry.name / commit[:12]
        try:
            wanted = AUTO if precision == "auto" else (precision,)
            for done in wanted:
                if (base / done / "manifest.json").is_file() and not force:
                    recorded = recorded_manifest_sha256(base / done)
                    pinned = recorded[1] if recorded is not None else None
                    try:
                        if pinned is None:  # converted before pulls recorded their manifest, or put there by hand
                            raise EngineError("no pull recorded its manifest's checksum")
                        manifest = read_manifest(base / done, expected_sha256=pinned)
                    except EngineError as exc:
                        progress(f"the converted folder {base / done} cannot be trusted ({exc}): converting again")
                        shutil.rmtree(base / done, ignore_errors=True)
                    else:
                        if manifest.source.get("repo") == entry.repo:
                            progress(f"{entry.name} is present: {base / done}")
                            _set_current(entry, base / done, pinned)
                            return base / done
            progress("checking the downloaded files against their hub checksums")
            hashes = verify_download(snapshot)
            memory = available_memory()  # measured once: the space check and the conversion plan alike
            need = conversion_space(entry, precision, memory)
            free = shutil.disk_usage(_existing_parent(base)).free
            if free < need:
                raise CatalogError(
                    f"not enough free space to convert {entry.name}: it needs about {size_text(need)} while "
                    f"converting and {free / 1e9:.1f} GB is free in {_existing_parent(base)}. Free space or set "
                    "DLM_LSP_CACHE to a larger disk"
                )
            base.mkdir(parents=True, exist_ok=True)
            staging = base / "converting"
            source = {"catalog": entry.name, "repo": entry.repo, "revision": commit, "files_sha256": hashes}
            try:
                manifest = convert(
                    snapshot, staging, family=entry.family, precision=precision, progress=progress, force=True,
                    source=source, memory=memory,
                )
            finally:
                with contextlib.suppress(OSError):
                    base.rmdir()  # only if the conversion left nothing (it cleans up after itself)
            final = base / manifest.precision
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            _set_current(entry, final, sha256_file(final / MANIFEST_FILE))
        except OSError as exc:
            raise _os_error(exc, "converting", entry) from exc
        progress(f"{entry.name} ready: {final}")
        return final
