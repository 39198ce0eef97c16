"""A Hugging Face hub cache on disk, in the real layout, holding checkpoints written by the tests.

No model hub is reachable from our machines, so the catalog's download path is
tested against ``huggingface_hub`` itself reading a cache laid out as it writes
one (``HF_HUB_CACHE``, usually ``~/.cache/huggingface/hub``)::

    models--ORG--NAME/
        blobs/<hash>                      # file contents, named by their hash
        refs/main                         # the commit the branch points to
        snapshots/<commit>/<file> -> ../../blobs/<hash>

Blobs of LFS files (the safetensors weights) are named by their sha256, other
files by their git blob sha1, as the hub's ETags are.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors",)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (the hub's ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def publish(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Put every file of ``folder`` into ``cache`` as revision ``main`` = ``commit`` of ``repo_id``; return the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest() if file.suffix in LFS_SUFFIXES else git_blob_sha1(data)
        (blobs / digest).write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    return snapshot


TINY_COMMIT = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00"


def catalog_entry(name: str, repo: str, family: str = "dream", **extra: object) -> dict:
    """A team-catalog entry (the JSON ``engine.catalog`` reads) for a tiny test checkpoint."""
    return {
        "name": name, "repo": repo, "family": family, "parameters": 300_000, "vocab_size": 512, "hidden_size": 128,
        "tied": True, "licence": "MIT", "good_for": "tests", "quality": "random weights", "download_bytes": 1_300_000,
        **extra,
    }


def catalog_env(hub: Path, cache: Path, catalog: Path) -> dict[str, str]:
    """The environment of a user whose Hugging Face cache is ``hub`` (offline), dlm-lsp model cache ``cache``
    and team catalog ``catalog``."""
    return {
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache.parent / "hf-home"),
        "DLM_LSP_CACHE": str(cache),
        "DLM_LSP_CATALOG": str(catalog),
    }


def tiny_catalog(root: Path) -> dict[str, str]:
    """A hub cache under ``root`` holding ``dlm-test/tiny-dream`` and a catalog naming it ``tiny-dream``.

    Returns the environment a user's process would have: the hub cache, offline,
    the dlm-lsp model cache and the catalog file. Built once per ``root``.
    """
    import json

    from engine.tiny import write_random_checkpoint

    env = catalog_env(root / "hub", root / "dlm-cache", root / "catalog.json")
    if not (root / "catalog.json").is_file():
        src = write_random_checkpoint(root / "src", init_std=0.02, hidden_size=128, intermediate_size=256, seed=2)
        publish(root / "hub", "dlm-test/tiny-dream", src, TINY_COMMIT)
        (root / "catalog.json").write_text(json.dumps([catalog_entry("tiny-dream", "dlm-test/tiny-dream")]))
    return env
