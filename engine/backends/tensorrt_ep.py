"""ONNX Runtime's TensorRT provider, configured so that a session never builds an engine mid-request.

Left to itself the provider builds a TensorRT engine for the input shapes it first
sees, and builds again whenever a later input falls outside them: minutes of
stalled completions in the middle of typing, and again at every start. Here each
graph gets, before its session opens:

* **explicit profiles** (``trt_profile_min/opt/max_shapes``) covering every shape the
  engine can send it: windows of 1 to :attr:`ProfileLimits.window` positions, spans up
  to :attr:`ProfileLimits.span` rows, up to :attr:`ProfileLimits.rows` merged span rows
  (:mod:`engine.scheduler`), priors and caches from empty to a whole window; fixed
  dimensions (layers, key/value heads, head size) from the manifest. Every dynamic
  input must be listed, or the provider refuses the options. The window cap is also
  the engine's (:attr:`engine.backends.base.ModelInfo.max_window`): a longer window is
  cut as a shorter model window would be, never sent;
* **an engine cache and a timing cache** (``trt_engine_cache_*``, ``trt_timing_cache_*``)
  in the model cache, in a folder keyed by what makes an engine invalid: the graphs
  (the sha256 of every file the manifest lists), the profile limits, the GPU
  (name and compute capability), and the TensorRT and ONNX Runtime versions. Another
  GPU, driver stack or conversion gets a folder of its own; nothing stale is loaded.

Format of a profile option (ONNX Runtime's documentation, "TensorRT Execution Provider",
explicit shape range): ``name:d0xd1x...,name2:...``. Nothing here needs a GPU to be
computed, so the option strings, the cache keys and the coverage of every graph input
are tested on the CPU; that TensorRT accepts them is checked by ``scripts/gpu-check.sh``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.families import ArchConfig
from engine.manifest import Manifest
from engine.scheduler import MAX_ROWS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileLimits:
    """The largest shapes a TensorRT profile admits, and the shapes it is tuned for."""

    window: int = 4096
    """Positions of the longest window (prefix, span and suffix); the engine cuts longer ones."""
    span: int = 513
    """Rows of the longest span step: the longest middle a setting allows (512) and a shifted model's anchor."""
    rows: int = MAX_ROWS
    """Batch rows of a merged span step."""
    opt_window: int = 1024
    """The window TensorRT tunes its kernels for (the server's default window is about this)."""
    opt_span: int = 16

    def capped(self, arch: ArchConfig) -> ProfileLimits:
        """These limits within the model's own positions."""
        window = min(self.window, arch.max_positions)
        return ProfileLimits(window=window, span=min(self.span, window), rows=self.rows,
                             opt_window=min(self.opt_window, window), opt_span=min(self.opt_span, window))


Shape = tuple[int, ...]


def profile_shapes(role: str, arch: ArchConfig, limits: ProfileLimits) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per input of the ``role`` graph (``context`` or ``span_step``, format 3): its (min, opt, max) shape."""
    limits = limits.capped(arch)
    L, H, D = arch.num_layers, arch.num_kv_heads, arch.head_dim
    W, S, B = limits.window, limits.span, limits.rows
    w, s = limits.opt_window, limits.opt_span

    def kv(batch: tuple[int, int, int], length: tuple[int, int, int]) -> tuple[Shape, Shape, Shape]:
        return tuple((L, b, H, t, D) for b, t in zip(batch, length))  # type: ignore[return-value]

    if role == "context":
        ids = ((1, 1), (1, w), (1, W))
        return {
            "input_ids": ids,
            "position_ids": ids,
            "cache_index": ((0,), (w,), (W,)),
            "span_index": ((1,), (s,), (S,)),
            "prior_keys": kv((1, 1, 1), (0, w, W)),
            "prior_values": kv((1, 1, 1), (0, w, W)),
        }
    if role == "span_step":
        span = ((1, 1), (1, s), (B, S))
        return {
            "span_ids": span,
            "span_pos": span,
            "span_valid": span,
            "cache_keys": kv((1, 1, B), (0, w, W)),
            "cache_values": kv((1, 1, B), (0, w, W)),
            "cache_valid": ((1, 0), (1, w), (B, W)),
        }
    raise ValueError(f"no TensorRT profile for a graph of role {role!r}")


def profile_options(shapes: dict[str, tuple[Shape, Shape, Shape]]) -> dict[str, str]:
    """The provider's three profile options for ``shapes``."""
    def option(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in bounds[which])}" for name, bounds in shapes.items())

    return {"trt_profile_min_shapes": option(0), "trt_profile_opt_shapes": option(1), "trt_profile_max_shapes": option(2)}


def cache_key(manifest: Manifest, limits: ProfileLimits, device: dict[str, Any]) -> str:
    """A folder name for the engines of ``manifest``'s graphs under ``limits`` on ``device`` (its GPU name,
    compute capability, TensorRT and ONNX Runtime versions): 16 hex digits."""
    graphs = {name: meta.get("sha256") for name, meta in manifest.files.items()}
    identity = {"graphs": graphs, "format": manifest.format_version, "limits": asdict(limits.capped(manifest.arch)),
                "device": device}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def device_identity() -> dict[str, Any]:
    """What an engine is built for: the GPU (through torch when present, else ``nvidia-smi``), and the
    TensorRT and ONNX Runtime versions. Fields that cannot be read are None (the key still differs when
    they later can)."""
    import onnxruntime as ort

    identity: dict[str, Any] = {"onnxruntime": ort.__version__, "tensorrt": None, "gpu": None, "compute": None}
    try:
        import tensorrt

        identity["tensorrt"] = tensorrt.__version__
    except (ImportError, OSError):  # not installed, or its libraries do not load
        pass
    identity.update(_gpu())
    return identity


def _gpu() -> dict[str, Any]:
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi could not name the GPU: %s", exc)
        return {}
    fields = [f.strip() for f in out.split(",")]
    return dict(zip(("gpu", "compute", "driver"), fields)) if len(fields) == 3 else {}


def provider_options(role: str, manifest: Manifest, cache_root: Path, limits: ProfileLimits,
                     device: dict[str, Any]) -> dict[str, str]:
    """The TensorRT provider's options for the ``role`` graph of ``manifest``'s folder: its profiles and the
    caches under ``cache_root/<cache_key>`` (created). Precision stays the graphs' (fp32, TF32 where the
    GPU has it): fp16 can overflow in Qwen2-family activations, and is the native engines' business."""
    folder = cache_root / cache_key(manifest, limits, device)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        **profile_options(profile_shapes(role, manifest.arch, limits)),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(folder),
    }
