"""Native TensorRT engines: built from an engine folder's two graphs, kept beside its manifest, and loaded.

Building (:func:`build_engines`, ``dlm-convert --engine tensorrt``):

1. **Precision.** TensorRT networks are strongly typed (the only kind TensorRT 11 builds),
   so the graphs are first rewritten in half precision (:mod:`engine.halfgraph`: matrix
   products and weights in fp16 or bf16, the rest fp32, ids int32). ``auto`` picks fp16
   when the emulated fp16 graph passes validation against fp32 on real code windows and
   bf16 otherwise (an fp16 overflow gives non-finite outputs, which fail); the numbers
   are kept in the build record.
2. **Profiles.** One optimisation profile per shape bucket (:class:`Buckets`): context
   passes by window, span steps by span length and batch rows. Every shape the engine
   sends lies inside one (the tests replay real requests against them), so no request
   makes TensorRT rebuild; :func:`select_profile` takes the smallest that holds it.
3. **Caches.** The engines, a timing cache and ``build.json`` (dtype, validation, build
   time and size per graph, versions) go to ``<folder>/tensorrt/<key>/``. The key hashes
   the graphs' checksums, the dtype, the buckets, the GPU (name, compute capability,
   driver), and the TensorRT and CUDA versions: another GPU or stack gets its own engines,
   nothing stale is loaded.

Running: :func:`load_denoiser` opens the engines (and a third, tiny one that rotates cached
keys on the device) as an :class:`engine.backends.device.DeviceDenoiser`, whose
context cache stays on the GPU across denoising steps and keystrokes.

Everything here imports ``tensorrt`` and ``cuda-python`` lazily; without them (or a GPU) the
errors name what is missing. What needs no GPU (buckets, profile choice, keys, the half
graphs, the fp16/bf16 choice) is tested on the CPU; the rest by ``scripts/gpu-check.sh``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from engine.backends.base import ModelInfo
from engine.backends.tensorrt_ep import ProfileLimits, Shape, profile_shapes
from engine.errors import BackendUnavailableError, ManifestError
from engine.families import ArchConfig
from engine.manifest import CONTEXT_OUTPUTS, SPAN_OUTPUTS, Manifest
from engine.scheduler import MAX_ROWS

log = logging.getLogger(__name__)

GPU_EXTRA = "pip install -e '.[gpu]' in your dlm-lsp clone (it brings tensorrt and cuda-python)"
DTYPE_CHOICES = ("auto", "fp16", "bf16")
ENGINE_DIR = "tensorrt"
"""Where an engine folder keeps its native engines: ``<folder>/tensorrt/<key>/``."""
BUILD_RECORD = "build.json"
RUNTIME_VERSION = 1
"""The engines' layout (which graphs, their half-precision rewrite, the rotation engine); part of the key:
a change here rebuilds."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or an error naming what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"the tensorrt backend needs TensorRT's Python package: {GPU_EXTRA}") from exc
    except OSError as exc:  # the wheel is there, its libraries (or CUDA's) are not loadable
        raise BackendUnavailableError(f"TensorRT is installed but cannot load its libraries ({exc}): check the "
                                      "NVIDIA driver and that the TensorRT wheel matches the CUDA major version") from exc
    return tensorrt


def require_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6), or an error."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise BackendUnavailableError(f"the tensorrt backend needs cuda-python: {GPU_EXTRA}") from exc
    return runtime


def require_gpu() -> None:
    """An error naming what is missing unless CUDA sees an NVIDIA GPU (driver, runtime, device)."""
    cudart = require_cudart()
    try:
        count = _cuda(cudart.cudaGetDeviceCount())
    except BackendUnavailableError:
        count = 0
    except Exception as exc:  # noqa: BLE001 - cuda-python without a loadable CUDA runtime
        raise BackendUnavailableError(f"cuda-python cannot load the CUDA runtime ({exc}): install the NVIDIA driver "
                                      "and a CUDA runtime matching the gpu extra") from exc
    if not count:
        driver = "nvidia-smi finds no GPU" if shutil.which("nvidia-smi") else "no NVIDIA driver (nvidia-smi is missing)"
        raise BackendUnavailableError(f"the tensorrt backend needs an NVIDIA GPU, and CUDA sees none here ({driver}); "
                                      "use backend 'cpu' or 'auto'")


def _cuda(result: Any) -> Any:
    """The value of a cuda-python call (which returns ``(error, *values)``), or an error naming it."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailableError(f"CUDA call failed: {err!r} (is an NVIDIA GPU visible to this process?)")
    return values[0] if len(values) == 1 else tuple(values) if values else None


# --- profiles --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buckets:
    """The shape buckets of a pair of engines: one optimisation profile each.

    Context passes are bucketed by window (a pass of up to ``w`` positions, prior included);
    span steps by (span rows, batch rows) against caches up to the largest window. Every
    profile admits everything below it, so a shape always finds one; the smallest is used
    (its kernels were tuned for shapes like it).
    """

    windows: tuple[int, ...] = (1024, 4096)
    spans: tuple[tuple[int, int], ...] = ((16, 4), (64, 16), (513, MAX_ROWS), (4096, 1))
    """(span rows, batch rows): a few candidates, many, merged requests, and one whole window (the exact mode
    and the reference decoder run the span step over the whole window with an empty cache)."""
    opt_window: int = 1024

    def limits(self, role: str, arch: ArchConfig) -> list[ProfileLimits]:
        """Each profile's limits for the ``role`` graph, smallest first, within the model's positions."""
        top = min(max(self.windows), arch.max_positions)
        windows = sorted({min(w, arch.max_positions) for w in self.windows})
        if role == "context":
            return [ProfileLimits(window=w, rows=1, opt_window=w).capped(arch)
                    for w in windows]
        if role == "span_step":
            return [ProfileLimits(window=top, span=s, rows=b, opt_window=self.opt_window, opt_span=min(16, s)).capped(arch)
                    for s, b in self.spans]
        raise ValueError(f"no TensorRT profiles for a graph of role {role!r}")

    def profiles(self, role: str, arch: ArchConfig) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
        """Each profile's (min, opt, max) shape per input of the ``role`` graph."""
        return [profile_shapes(role, arch, limits) for limits in self.limits(role, arch)]

    def describe(self, arch: ArchConfig) -> dict[str, list[dict[str, Any]]]:
        """Each graph's profile limits, as the engine key and the build record say them."""
        return {role: [asdict(lim) for lim in self.limits(role, arch)] for role in ("context", "span_step")}

    @property
    def window(self) -> int:
        """The longest window these engines run (the engine cuts longer ones)."""
        return max(self.windows)


def select_profile(profiles: Sequence[Mapping[str, tuple[Shape, Shape, Shape]]], shapes: Mapping[str, Shape]) -> int:
    """The first (smallest) profile whose bounds hold every input's shape; ValueError when none does."""
    for index, profile in enumerate(profiles):
        if all(len(shape) == len(profile[name][0])
               and all(lo <= d <= hi for d, lo, hi in zip(shape, profile[name][0], profile[name][2]))
               for name, shape in shapes.items()):
            return index
    raise ValueError(f"no TensorRT profile holds the shapes {dict(shapes)}")


# --- identity and location -------------------------------------------------------------------------


def device_identity() -> dict[str, Any]:
    """What an engine is only valid for: the GPU (name, compute capability, driver), TensorRT and CUDA."""
    from engine.backends import tensorrt_ep

    identity = {"driver": None, **tensorrt_ep.device_identity(), "cuda": None}
    del identity["onnxruntime"]  # native engines do not depend on it
    try:  # the GPU this process runs on (CUDA_VISIBLE_DEVICES honoured), not nvidia-smi's first
        props = _cuda(require_cudart().cudaGetDeviceProperties(0))
        name = props.name
        identity["gpu"] = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
        identity["compute"] = f"{props.major}.{props.minor}"
    except Exception as exc:  # noqa: BLE001 - no cuda-python or no GPU: nvidia-smi's answer stands
        log.debug("no CUDA device properties: %s", exc)
    try:
        version = _cuda(require_cudart().cudaRuntimeGetVersion())
        identity["cuda"] = f"{version // 1000}.{version % 1000 // 10}"
    except Exception as exc:  # noqa: BLE001 - no cuda-python, or no CUDA runtime for it: the field stays None
        log.debug("no CUDA runtime version: %s", exc)
    return identity


def has_bf16(device: Mapping[str, Any]) -> bool:
    """Whether the GPU multiplies in bf16 (compute capability 8.0, Ampere, and later; unknown: assumed)."""
    try:
        return float(device.get("compute") or 8.0) >= 8.0
    except ValueError:
        return True


def engine_key(manifest: Manifest, dtype: str, buckets: Buckets, device: Mapping[str, Any]) -> str:
    """16 hex digits naming the engines of ``manifest``'s graphs in ``dtype`` under ``buckets`` on ``device``."""
    identity = {
        "runtime": RUNTIME_VERSION,
        "graphs": {name: meta.get("sha256") for name, meta in sorted(manifest.files.items())},
        "format": manifest.format_version,
        "dtype": dtype,
        "buckets": buckets.describe(manifest.arch),
        "device": dict(device),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def engines_dir(folder: Path, key: str) -> Path:
    """``<folder>/tensorrt/<key>``; in the model cache when the folder is read-only (a shared team folder)."""
    if os.access(folder, os.W_OK) or (folder / ENGINE_DIR / key).is_dir():
        return folder / ENGINE_DIR / key
    return _elsewhere(folder) / key


def _elsewhere(folder: Path) -> Path:
    from engine.catalog import cache_dir

    return cache_dir() / "tensorrt-engines" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]


def built_any(folder: Path) -> bool:
    """Whether native engines were built for ``folder`` on any GPU (cheap: no TensorRT import)."""
    return any(any(root.glob(f"*/{BUILD_RECORD}")) for root in (folder / ENGINE_DIR, _elsewhere(folder)))


def find_engines(folder: Path, manifest: Manifest, device: Mapping[str, Any], buckets: Buckets | None = None,
                 dtype: str = "auto") -> Path | None:
    """The folder of engines already built for this GPU (``dtype`` ``auto``: either half type), or None."""
    buckets = buckets or Buckets()
    for half in (("fp16", "bf16") if dtype == "auto" else (dtype,)):
        key = engine_key(manifest, half, buckets, device)
        where = engines_dir(folder, key)
        if (where / BUILD_RECORD).is_file():
            if trusted(where, key):
                return where
            log.warning("TensorRT engines in %s were not built on this machine (or changed since): not loaded", where)
    return None


def _trust_record(key: str) -> Path:
    from engine.catalog import cache_dir

    return cache_dir() / "tensorrt-built" / f"{key}.json"


def trusted(where: Path, key: str) -> bool:
    """Whether the engines in ``where`` are the very files a build on this machine wrote: their sha256s, kept
    in the user's cache when built, must match. A TensorRT plan is code to run; one that arrived with a
    shared folder, or was edited there, is rebuilt rather than loaded (docs/engine.md, "What loading an
    engine folder trusts")."""
    from engine.manifest import sha256_file

    try:
        recorded = json.loads(_trust_record(key).read_text(encoding="utf-8"))
        return bool(recorded) and all(sha256_file(where / name) == digest for name, digest in recorded.items())
    except (OSError, ValueError):
        return False


# --- building --------------------------------------------------------------------------------------


def choose_dtype(folder: Path, manifest: Manifest, progress: Callable[[str], None] = lambda _m: None,
                 candidates: Sequence[str] = ("fp16", "bf16")) -> tuple[str, dict[str, Any]]:
    """The first of ``candidates`` whose emulated half graphs pass validation against the fp32 graphs on
    real code windows, and every candidate's validation summary. Runs on the CPU (ONNX Runtime)."""
    import tempfile

    from engine.backends.onnxruntime import OnnxRuntimeDenoiser
    from engine.export import code_tokens, validate
    from engine.halfgraph import write_half_folder
    from engine.tokenizer import Tokenizer

    text_ids = code_tokens(Tokenizer(folder / manifest.tokenizer), manifest.arch.vocab_size)
    reference = OnnxRuntimeDenoiser(folder, manifest, "cpu")
    reports: dict[str, Any] = {}
    for dtype in candidates:
        progress(f"checking {dtype} on the CPU (emulated half-precision graphs against fp32)")
        with tempfile.TemporaryDirectory(prefix=f"dlm-{dtype}-") as work:
            write_half_folder(folder, manifest, dtype, Path(work), emulate=True)
            report = validate(reference, OnnxRuntimeDenoiser(Path(work), manifest, "cpu"), dtype, text_ids=text_ids)
        reports[dtype] = {**report.summary(), "failures": report.failures[:5]}
        if not report.failures:
            return dtype, reports
        progress(f"{dtype} fails: {report.failures[0]}")
    raise ManifestError(f"no half precision this GPU runs keeps {folder}'s outputs within the bar ("
                        + "; ".join(f"{d}: {r['failures'][0]}" for d, r in reports.items())
                        + "): use backend tensorrt-ep, which runs the fp32 graphs")


def _progress_monitor(trt: Any, progress: Callable[[str], None]) -> Any:
    """TensorRT's build progress (an ``IProgressMonitor``) as lines for ``progress``, a few per phase."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}
            self.last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                progress(f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            if now - self.last > 5:  # one line every few seconds, never a flood
                self.last = now
                progress(f"{phase_name}: {step + 1}/{self.steps.get(phase_name, '?')}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)

    return Monitor()


@dataclass
class BuildRecord:
    """What ``build.json`` says of a pair of engines."""

    key: str
    dtype: str
    device: dict[str, Any]
    buckets: dict[str, list[dict[str, Any]]]
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per role: ``engine`` file name, ``bytes``, ``build_s``."""
    validation: dict[str, Any] = field(default_factory=dict)
    window: int = 0


def build_engines(folder: Path, manifest: Manifest, dtype: str = "auto", buckets: Buckets | None = None,
                  progress: Callable[[str], None] = lambda _m: None, force: bool = False) -> Path:
    """Build (or find) the native engines of the fp32 engine folder ``folder``; returns their folder.

    The first build on a GPU takes minutes (each graph's tactics are timed); later builds of
    other buckets reuse the timing cache. Nothing is left half-written: a build goes to a
    temporary folder renamed into place when complete.
    """
    trt = require_tensorrt()
    require_gpu()
    buckets = buckets or Buckets()
    if manifest.precision != "fp32":
        raise ManifestError(
            f"engine folder {folder} is {manifest.precision}: TensorRT engines are built from fp32 graphs (ONNX "
            "Runtime's quantised ops do not run in TensorRT); convert the checkpoint with dlm-convert --precision fp32 "
            "(or models pull NAME --precision fp32), or use backend cuda")
    if manifest.format_version < 3:
        raise ManifestError(f"engine folder {folder} is of format {manifest.format_version}: TensorRT engines "
                            "need format 3 graphs; convert it again (dlm-convert)")
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    device = device_identity()
    if dtype == "auto" and not force:
        found = find_engines(folder, manifest, device, buckets)
        if found is not None:
            return found
    validation: dict[str, Any] = {}
    bf16 = has_bf16(device)
    if dtype == "bf16" and not bf16:
        raise BackendUnavailableError(f"this GPU ({device.get('gpu')}, compute capability {device.get('compute')}) "
                                      "has no bf16 matrix products (Ampere, 8.0, and later do): use --engine-dtype fp16")
    if dtype == "auto":
        dtype, validation = choose_dtype(folder, manifest, progress, ("fp16", "bf16") if bf16 else ("fp16",))
    key = engine_key(manifest, dtype, buckets, device)
    final = engines_dir(folder, key)
    if (final / BUILD_RECORD).is_file() and trusted(final, key) and not force:
        return final
    from engine.halfgraph import write_half_folder

    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(f".{key}.building-{uuid.uuid4().hex[:8]}")  # each build its own (another may run)
    work.mkdir()
    try:
        progress(f"writing {dtype} graphs")
        graphs = write_half_folder(folder, manifest, dtype, work / "onnx", int32=True)
        logger = trt.Logger(trt.Logger.WARNING)
        timing = _timing_cache_bytes(folder, device)
        record = BuildRecord(key=key, dtype=dtype, device=dict(device), validation=validation,
                             buckets=buckets.describe(manifest.arch),
                             window=min(buckets.window, manifest.arch.max_positions))
        import onnx

        from engine.backends.device import rotate_graph, rotate_profiles

        onnx.save_model(rotate_graph(manifest.arch), str(work / "onnx" / "rotate.onnx"))
        graphs["rotate"] = work / "onnx" / "rotate.onnx"
        profiles = {role: buckets.profiles(role, manifest.arch) for role in ("context", "span_step")}
        profiles["rotate"] = rotate_profiles(manifest.arch, record.window, MAX_ROWS)
        digests = {}  # the trust record: each engine's sha256, as written
        for role, onnx_path in graphs.items():
            progress(f"building the {role} engine ({len(profiles[role])} profiles)")
            started = time.perf_counter()
            plan, timing = _build_one(trt, logger, onnx_path, profiles[role], timing, progress)
            name = f"{role}.engine"
            (work / name).write_bytes(plan)
            digests[name] = hashlib.sha256(plan).hexdigest()
            record.graphs[role] = {"engine": name, "bytes": len(plan), "build_s": round(time.perf_counter() - started, 1)}
            progress(f"{role} engine: {len(plan) / 1e6:.0f} MB in {record.graphs[role]['build_s']} s")
        shutil.rmtree(work / "onnx")
        (work / "timing.cache").write_bytes(timing)
        (work / BUILD_RECORD).write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
        if (final / BUILD_RECORD).is_file() and trusted(final, key) and not force:
            return final  # another build finished first: keep its engines, drop these
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        trust = _trust_record(key)
        trust.parent.mkdir(parents=True, exist_ok=True)
        trust.write_text(json.dumps(digests, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _share_timing_cache(folder, device, final / "timing.cache")
    return final


def _timing_key(device: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: device.get(k) for k in ("gpu", "compute", "tensorrt")}, sort_keys=True)
                          .encode()).hexdigest()[:12]


def _timing_cache(folder: Path, device: Mapping[str, Any]) -> Path:
    """Where builds on this GPU and TensorRT share their timing cache (tactic timings carry across graphs)."""
    return engines_dir(folder, "timing") / f"{_timing_key(device)}.cache"


def _timing_cache_bytes(folder: Path, device: Mapping[str, Any]) -> bytes:
    path = _timing_cache(folder, device)
    return path.read_bytes() if path.is_file() else b""


def _share_timing_cache(folder: Path, device: Mapping[str, Any], built: Path) -> None:
    path = _timing_cache(folder, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, path)


def _build_one(trt: Any, logger: Any, onnx_path: Path, profiles: Sequence[Mapping[str, tuple[Shape, Shape, Shape]]],
               timing: bytes, progress: Callable[[str], None]) -> tuple[bytes, bytes]:
    """One graph's serialized engine and the timing cache after it."""
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # TensorRT 11: always, the flag ignored
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise ManifestError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for bounds in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in bounds.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt, progress)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ManifestError(f"TensorRT could not build an engine for {onnx_path.name} (its log above says why)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _parser_error(error: Any) -> str:
    """One of the ONNX parser's errors as text: what, and at which node."""
    describe = getattr(error, "desc", None)
    node = getattr(error, "node_name", None)
    text = describe() if callable(describe) else str(error)
    return f"{text} (node {node()})" if callable(node) and node() else text


# --- loading ---------------------------------------------------------------------------------------


def load_denoiser(folder: Path, manifest: Manifest, build: bool = True,
                  progress: Callable[[str], None] | None = None) -> Any:
    """The native TensorRT denoiser of ``folder`` (:class:`engine.backends.device.DeviceDenoiser`): its engines
    for this GPU, built first when ``build``."""
    from engine.backends.device import GRAPH_CACHE, Device, DeviceDenoiser, EngineRunner

    trt = require_tensorrt()
    require_gpu()
    device = device_identity()
    where = find_engines(folder, manifest, device)
    if where is None:
        if not build:
            raise BackendUnavailableError(
                f"no TensorRT engines for this GPU in {folder}: build them with dlm-convert --engine tensorrt {folder}")
        say = progress or (lambda msg: log.warning("TensorRT: %s", msg))
        say("no engines for this GPU yet: building them (minutes, once)")
        where = build_engines(folder, manifest, progress=say)
    record = json.loads((where / BUILD_RECORD).read_text(encoding="utf-8"))
    logger = trt.Logger(trt.Logger.WARNING)
    gpu = Device()
    outputs = {"context": CONTEXT_OUTPUTS, "span_step": SPAN_OUTPUTS, "rotate": ("rotated",)}
    runners = {role: EngineRunner(where / meta["engine"], logger, gpu, outputs[role],
                                  graphs=GRAPH_CACHE if role == "span_step" else 0)
               for role, meta in record["graphs"].items()}
    info = ModelInfo(family=manifest.family, arch=manifest.arch, token_ids=manifest.token_ids,
                     precision=record["dtype"], backend="tensorrt", device="cuda:0", top_k=manifest.top_k,
                     max_window=int(record["window"]))
    return DeviceDenoiser(runners, gpu, info)
