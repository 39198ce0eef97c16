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
