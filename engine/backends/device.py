"""GPU runtimes with the context cache resident on the device: native TensorRT engines, and ONNX Runtime's
CUDA provider with I/O binding.

:class:`DeviceDenoiser` is the :class:`~engine.backends.base.Denoiser` of both. What crosses
the PCIe bus per call is what the sampler needs and nothing else:

* a context pass sends its ids and positions and gets back the top-k ids, probabilities
  and entropy of the span rows; its keys and values **stay on the device** (a
  :class:`DeviceCache`), as do the priors it attends to;
* a span step sends its span ids, positions and masks and gets back the top-k of its rows;
  the keys it attends to are the cache's, rotated to the step's layout **on the device**
  (a third, tiny graph, :func:`rotate_graph`) once per request and layout;
* reusing context across keystrokes (:mod:`engine.reuse`) selects and joins cache entries
  with strided device copies (:func:`index_runs`: a kept range of entries is one copy
  per layer), never through the host;
* merged span steps of several requests pad and stack their caches on the device.

The graphs run behind a runner with ONNX Runtime's ``run(None, feed)`` signature plus
``keep=`` (outputs left on the device): :class:`EngineRunner` for TensorRT engines (one
execution context per used optimisation profile, buffers for host inputs and read-back
outputs allocated once per profile, device arrays bound in place, CUDA graphs replayed for
calls whose shapes and addresses repeat: a request's span steps), :class:`OrtRunner`
for ONNX Runtime's CUDA provider (I/O binding). All GPU work of a denoiser goes through one
:class:`Device`: one stream, one lock (a captured CUDA graph must see nothing else on its
stream), and frees deferred to the next operation (a ``DeviceArray`` dropped by the garbage
collector on any thread never touches the stream itself).

The GPU calls follow TensorRT's, ONNX Runtime's and cuda-python's documented APIs and run only
on a GPU (``scripts/gpu-check.sh``); what needs none is tested on the CPU: the rotation graph
against :func:`engine.backends.onnxruntime.rotate_keys`, the copy plans and their address
arithmetic, and the host side of a call.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engine.backends.base import ModelInfo, Prior, SpanBatch, StepOutput, merge_span_rows, priors, split_output
from engine.backends.tensorrt_ep import Shape
from engine.errors import BackendUnavailableError, ManifestError
from engine.families import ArchConfig

log = logging.getLogger(__name__)

GRAPH_CACHE = 32
"""CUDA graphs a span-step runner keeps (least recently used dropped and destroyed)."""


def _cudart() -> Any:
    from engine.backends.tensorrt import require_cudart

    return require_cudart()


def _cuda(result: Any) -> Any:
    from engine.backends.tensorrt import _cuda as check

    return check(result)


def _handle(stream: Any) -> int:
    """A cuda-python stream as the integer handle TensorRT takes."""
    return int(stream) if stream is not None else 0


# --- what needs no GPU -----------------------------------------------------------------------------


def rotate_graph(arch: ArchConfig) -> Any:
    """The ONNX graph that rotates pre-rotary cached keys (L, 1, Hkv, N, D) to ``positions`` (B, N), int32,
    giving (L, B, Hkv, N, D): :func:`engine.backends.onnxruntime.rotate_keys` on the device, in fp32."""
    import onnx
    from onnx import TensorProto, helper

    from engine.backends.onnxruntime import inverse_frequencies

    L, H, D = arch.num_layers, arch.num_kv_heads, arch.head_dim
    half = D // 2
    inv_freq = inverse_frequencies(D, arch.rope_theta)

    def const(name: str, values: Any, dtype: Any = np.int64) -> Any:
        return onnx.numpy_helper.from_array(np.asarray(values, dtype), name)

    nodes = [
        helper.make_node("Cast", ["positions"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "axis_last"], ["pos_col"]),
        helper.make_node("Mul", ["pos_col", "inv_freq"], ["freqs"]),  # (B, N, D/2)
        helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),  # (B, N, D)
        helper.make_node("Cos", ["emb"], ["cos_bn"]),
        helper.make_node("Sin", ["emb"], ["sin_bn"]),
        helper.make_node("Unsqueeze", ["cos_bn", "axes_02"], ["cos"]),  # (1, B, 1, N, D)
        helper.make_node("Unsqueeze", ["sin_bn", "axes_02"], ["sin"]),
        helper.make_node("Slice", ["keys", "zero", "half", "axis_last"], ["first"]),
        helper.make_node("Slice", ["keys", "half", "full", "axis_last"], ["second"]),
        helper.make_node("Neg", ["second"], ["neg_second"]),
        helper.make_node("Concat", ["neg_second", "first"], ["rotated_half"], axis=-1),
        helper.make_node("Mul", ["keys", "cos"], ["keys_cos"]),
        helper.make_node("Mul", ["rotated_half", "sin"], ["half_sin"]),
        helper.make_node("Add", ["keys_cos", "half_sin"], ["rotated"]),
    ]
    initializers = [
        const("inv_freq", inv_freq, np.float32), const("axis_last", [-1]), const("axes_02", [0, 2]),
        const("zero", [0]), const("half", [half]), const("full", [D]),
    ]
    graph = helper.make_graph(
        nodes, "rotate_keys",
        [helper.make_tensor_value_info("keys", TensorProto.FLOAT, [L, 1, H, "entries", D]),
         helper.make_tensor_value_info("positions", TensorProto.INT32, ["rows", "entries"])],
        [helper.make_tensor_value_info("rotated", TensorProto.FLOAT, [L, "rows", H, "entries", D])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def rotate_profiles(arch: ArchConfig, window: int, rows: int) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """The rotation engine's one profile: up to ``rows`` layouts of up to ``window`` entries."""
    L, H, D = arch.num_layers, arch.num_kv_heads, arch.head_dim
    opt = min(1024, window)
    return [{"keys": ((L, 1, H, 0, D), (L, 1, H, opt, D), (L, 1, H, window, D)),
             "positions": ((1, 0), (1, opt), (rows, window))}]


def index_runs(index: np.ndarray) -> list[tuple[int, int, int]]:
    """``index`` as (source start, destination start, length) runs of consecutive entries: one strided
    copy each. A context kept across keystrokes is a few long runs."""
    index = np.asarray(index, np.int64)
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(index)]))
    return [(int(index[a]), int(a), int(b - a)) for a, b in zip(starts, ends)]


def host_feed(feed: Mapping[str, Any], dtypes: Mapping[str, Any]) -> dict[str, Any]:
    """A call's host inputs as the engine takes them (each in its engine dtype: ids int32), contiguous;
    device arrays pass as they are."""
    return {name: value if isinstance(value, DeviceArray) else np.ascontiguousarray(value, dtype=dtypes[name])
            for name, value in feed.items()}


def host_outputs(outputs: Sequence[Any]) -> list[Any]:
    """An engine's host outputs as the denoiser returns them (ids int64, values fp32); device arrays as they are."""
    return [o if isinstance(o, DeviceArray) else
            o.astype(np.int64) if o.dtype.kind in "iu" else o.astype(np.float32, copy=False) for o in outputs]


# --- device memory ---------------------------------------------------------------------------------


@dataclass(eq=False)
class DeviceArray:
    """A C-contiguous array in GPU memory: the :class:`Device`'s own (freed when dropped), or a view of memory
    another runtime owns (``owner``, e.g. an ONNX Runtime ``OrtValue``, kept alive with it)."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: Device | None = field(default=None, repr=False)
    owner: Any = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __del__(self) -> None:
        if self.pointer and self.device is not None and self.owner is None:
            self.device.release(self.pointer)
            self.pointer = 0


class Device:
    """One CUDA stream and everything done on it: allocation, copies, frees. ``lock`` serialises a denoiser's
    GPU work (the runners take it too); frees of dropped arrays wait for the next operation under it."""

    def __init__(self, stream: Any = None) -> None:
        self.cudart = _cudart()
        if stream is None:  # non-blocking: no implicit synchronisation with the legacy default stream
            stream = _cuda(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking))
            self._keep_pool_memory()
        self.stream = stream
        self.lock = threading.RLock()
        self._released: deque[int] = deque()

    def _keep_pool_memory(self) -> None:
        """Let the stream-ordered pool keep freed memory (by default it returns it at every synchronisation)."""
        try:
            pool = _cuda(self.cudart.cudaDeviceGetDefaultMemPool(0))
            from cuda.bindings import driver

            _cuda(self.cudart.cudaMemPoolSetAttribute(
                pool, self.cudart.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold, driver.cuuint64_t(2**64 - 1)))
        except Exception as exc:  # noqa: BLE001 - a speed setting: without it, allocations go back to the driver
            log.debug("the memory pool keeps its default release threshold: %s", exc)

    def release(self, pointer: int) -> None:
        """Free ``pointer`` at the next operation (any thread may call this; nothing touches the stream here)."""
        self._released.append(pointer)

    def _free_released(self) -> None:
        while self._released:
            self.cudart.cudaFreeAsync(self._released.popleft(), self.stream)

    def empty(self, shape: Sequence[int], dtype: Any = np.float32) -> DeviceArray:
        """An uninitialised device array (a zero-size one holds a 1-byte allocation: never a null address)."""
        dtype = np.dtype(dtype)
        size = max(1, int(np.prod(shape)) * dtype.itemsize)
        with self.lock:
            self._free_released()
            pointer = int(_cuda(self.cudart.cudaMallocAsync(size, self.stream)))  # stream-ordered pool: no sync
        return DeviceArray(pointer, tuple(int(d) for d in shape), dtype, self)

    def zeros(self, shape: Sequence[int], dtype: Any = np.float32) -> DeviceArray:
        """A device array of zeros."""
        array = self.empty(shape, dtype)
        if array.nbytes:
            with self.lock:
                _cuda(self.cudart.cudaMemsetAsync(array.pointer, 0, array.nbytes, self.stream))
        return array

    def upload(self, values: np.ndarray) -> DeviceArray:
        """A device copy of ``values``."""
        values = np.ascontiguousarray(values)
        array = self.empty(values.shape, values.dtype)
        if values.nbytes:
            with self.lock:
                _cuda(self.cudart.cudaMemcpyAsync(array.pointer, values.ctypes.data, values.nbytes,
                                                  self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        return array

    def download(self, array: DeviceArray) -> np.ndarray:
        """A host copy of ``array`` (waits for the stream)."""
        out = np.empty(array.shape, array.dtype)
        with self.lock:
            if out.nbytes:
                _cuda(self.cudart.cudaMemcpyAsync(out.ctypes.data, array.pointer, out.nbytes,
                                                  self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _cuda(self.cudart.cudaStreamSynchronize(self.stream))
        return out

    def synchronize(self) -> None:
        """Wait until everything queued on the stream is done."""
        with self.lock:
            _cuda(self.cudart.cudaStreamSynchronize(self.stream))

    def copy_entries(self, dst: DeviceArray, dst_rows: tuple[int, int], dst_start: int,
                     src: DeviceArray, src_rows: tuple[int, int], src_start: int, count: int) -> None:
        """``dst[:, r0:r1, :, dst_start:dst_start+count] = src[:, s0:s1, :, src_start:src_start+count]`` for
        (L, B, H, T, D) arrays: per layer, one strided copy of (rows x heads) lines of ``count`` entries."""
        if count <= 0:
            return
        L, bd, H, td, D = dst.shape
        _, bs, _, ts, _ = src.shape
        (r0, r1), (s0, s1) = dst_rows, src_rows
        assert r1 - r0 == s1 - s0 and src.dtype == dst.dtype
        item = dst.dtype.itemsize
        width = count * D * item
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        with self.lock:
            for layer in range(L):
                d = dst.pointer + (((layer * bd + r0) * H) * td + dst_start) * D * item
                s = src.pointer + (((layer * bs + s0) * H) * ts + src_start) * D * item
                _cuda(self.cudart.cudaMemcpy2DAsync(d, td * D * item, s, ts * D * item, width, (r1 - r0) * H, kind,
                                                    self.stream))

    def gather_entries(self, src: DeviceArray, index: np.ndarray) -> DeviceArray:
        """``src[:, :, :, index]`` of an (L, B, H, T, D) array, by runs of consecutive entries."""
        L, B, H, _, D = src.shape
        out = self.empty((L, B, H, len(index), D), src.dtype)
        for start, at, count in index_runs(index):
            self.copy_entries(out, (0, B), at, src, (0, B), start, count)
        return out

    def concat_entries(self, parts: Sequence[DeviceArray]) -> DeviceArray:
        """(L, B, H, T_i, D) arrays joined along the entries."""
        if len(parts) == 1:
            return parts[0]
        L, B, H, _, D = parts[0].shape
        out = self.empty((L, B, H, sum(p.shape[3] for p in parts), D), parts[0].dtype)
        at = 0
        for part in parts:
            self.copy_entries(out, (0, B), at, part, (0, B), 0, part.shape[3])
            at += part.shape[3]
        return out


# --- runners ---------------------------------------------------------------------------------------


class EngineRunner:
    """One TensorRT engine run like an ONNX Runtime session (``run(None, feed, keep=...)``) on the device's stream.

    Inputs may be numpy arrays (copied into the profile's buffer for that input, allocated once
    at the profile's largest shape) or :class:`DeviceArray` (bound where they are). Outputs come
    back as numpy arrays (read from the profile's buffers), or stay on the device for the names
    in ``keep``, each in a fresh array. With ``graphs`` > 0, a call whose shapes and bound
    addresses were seen before is captured as a CUDA graph right after its direct run, and
    replayed from then on.
    """

    def __init__(self, path: Path, logger: Any, device: Device, outputs: Sequence[str], graphs: int = 0) -> None:
        from engine.backends.tensorrt import require_tensorrt

        trt = require_tensorrt()
        self.trt, self.device, self.cudart = trt, device, device.cudart
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"TensorRT could not load {path} (built by another TensorRT version or "
                                          "for another GPU? rebuild it: dlm-convert --engine tensorrt --force)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = list(outputs)  # the graph's order, which the denoiser unpacks
        if sorted(self.outputs) != sorted(n for n in names if n not in self.inputs):
            raise ManifestError(f"the TensorRT engine {path} has outputs {names}, expected {self.outputs}: rebuild "
                                "it (dlm-convert --engine tensorrt --force)")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.profiles: list[dict[str, tuple[Shape, Shape, Shape]]] = []
        for p in range(self.engine.num_optimization_profiles):
            bounds = {}
            for n in self.inputs:
                low, opt, high = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, p))
                bounds[n] = (low, opt, high)
            self.profiles.append(bounds)
        self._contexts: dict[int, Any] = {}
        self._largest: dict[int, dict[str, Shape]] = {}  # per profile: each tensor's shape at the largest inputs
        self._buffers: dict[tuple[int, str], DeviceArray] = {}
        self._graphs: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._max_graphs = graphs

    def _context(self, profile: int) -> Any:
        if profile not in self._contexts:
            strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
            context = (self.engine.create_execution_context(strategy.ON_PROFILE_CHANGE) if strategy is not None
                       else self.engine.create_execution_context())  # working memory for this profile only
            if context is None:
                raise BackendUnavailableError("TensorRT could not create an execution context (out of GPU memory?)")
            if not context.set_optimization_profile_async(profile, _handle(self.device.stream)):
                raise BackendUnavailableError(f"TensorRT refused optimisation profile {profile}")
            for name in self.inputs:
                self._shape(context, name, self.profiles[profile][name][2])
            self._largest[profile] = {
                **{name: self.profiles[profile][name][2] for name in self.inputs},
                **{name: tuple(int(d) for d in context.get_tensor_shape(name)) for name in self.outputs},
            }
            self._contexts[profile] = context
        return self._contexts[profile]

    @staticmethod
    def _shape(context: Any, name: str, shape: Sequence[int]) -> None:
        if not context.set_input_shape(name, tuple(shape)):
            raise BackendUnavailableError(f"TensorRT refused the shape {tuple(shape)} for {name}")

    def _buffer(self, profile: int, name: str) -> DeviceArray:
        """The profile's buffer for ``name`` (a host input, or an output read back), at its largest shape:
        allocated once, reused by every call of the profile, so that a captured graph's addresses hold."""
        key = (profile, name)
        if key not in self._buffers:
            self._buffers[key] = self.device.empty(self._largest[profile][name], self.dtypes[name])
        return self._buffers[key]

    def run(self, _names: Any, feed: Mapping[str, Any], *_options: Any, keep: Sequence[str] = ()) -> list[Any]:
        """Outputs (in the graph's order) of one call; the signature of ``InferenceSession.run``."""
        from engine.backends.tensorrt import select_profile

        device, cudart = self.device, self.cudart
        with device.lock:
            inputs = host_feed(feed, self.dtypes)
            shapes = {name: tuple(value.shape) for name, value in inputs.items()}
            profile = select_profile(self.profiles, shapes)
            context = self._context(profile)
            bound = []
            for name, value in inputs.items():
                self._shape(context, name, value.shape)
                if isinstance(value, DeviceArray):
                    pointer = value.pointer
                else:
                    pointer = self._buffer(profile, name).pointer
                    if value.nbytes:
                        _cuda(cudart.cudaMemcpyAsync(pointer, value.ctypes.data, value.nbytes,
                                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, device.stream))
                context.set_tensor_address(name, pointer)
                bound.append((name, pointer))
            results: list[tuple[Any, int]] = []
            for name in self.outputs:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                out: DeviceArray | np.ndarray
                if name in keep:  # a fresh array the caller owns
                    out = device.empty(shape, self.dtypes[name])
                    pointer = out.pointer
                else:  # read back from the profile's buffer
                    out = np.empty(shape, self.dtypes[name])
                    pointer = self._buffer(profile, name).pointer
                context.set_tensor_address(name, pointer)
                bound.append((name, pointer))
                results.append((out, pointer))
            self._launch(context, (profile, tuple(sorted(shapes.items())), tuple(bound)))
            for out, pointer in results:
                if isinstance(out, np.ndarray) and out.nbytes:
                    _cuda(cudart.cudaMemcpyAsync(out.ctypes.data, pointer, out.nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, device.stream))
            _cuda(cudart.cudaStreamSynchronize(device.stream))
        return host_outputs([out for out, _ in results])

    def _launch(self, context: Any, key: tuple[Any, ...]) -> None:
        """Run the engine (the device lock held): the captured graph of this call, else directly. The second
        time a call comes (same shapes, same addresses), the direct run, which does TensorRT's shape-dependent
        setup, is followed by a capture of the same work, without running it, for the times after."""
        cudart, stream = self.cudart, self.device.stream
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            _cuda(cudart.cudaGraphLaunch(graph, stream))
            return
        if not context.execute_async_v3(_handle(stream)):
            raise BackendUnavailableError("TensorRT could not run the engine (its log says why)")
        if not self._max_graphs:
            return
        if key not in self._seen:
            self._seen[key] = None
            while len(self._seen) > 8 * self._max_graphs:
                self._seen.popitem(last=False)
            return
        try:
            self._graphs[key] = self._capture(context)
            while len(self._graphs) > self._max_graphs:
                _, dropped = self._graphs.popitem(last=False)
                cudart.cudaGraphExecDestroy(dropped)
        except BackendUnavailableError as exc:  # an engine that cannot be captured keeps running directly
            log.warning("CUDA graphs off for this engine: %s", exc)
            self._max_graphs = 0

    def _capture(self, context: Any) -> Any:
        """The engine's work for the current shapes and addresses, captured (not run) and instantiated."""
        cudart, stream = self.cudart, self.device.stream
        _cuda(cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        ok = False
        try:
            ok = bool(context.execute_async_v3(_handle(stream)))
        finally:
            captured = _cuda(cudart.cudaStreamEndCapture(stream))  # always ends the capture, whatever happened
        try:
            if not ok:
                raise BackendUnavailableError("execute_async_v3 failed during capture")
            return _cuda(cudart.cudaGraphInstantiate(captured, 0))
        finally:
            cudart.cudaGraphDestroy(captured)  # the instantiated graph does not need it

    def close(self) -> None:
        """Destroy the captured graphs (buffers are freed with their arrays)."""
        with self.device.lock:
            while self._graphs:
                self.cudart.cudaGraphExecDestroy(self._graphs.popitem()[1])


ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


class OrtRunner:
    """An ONNX Runtime session run through I/O binding on the ``memory`` it computes in (``cuda``: its CUDA
    provider): device arrays are bound where they are, host inputs are copied by ONNX Runtime, outputs in
    ``keep`` stay there (ONNX Runtime allocates them; the :class:`DeviceArray` views keep its ``OrtValue``
    alive), the others come back. (``memory="cpu"`` runs the same code on the CPU: the tests do.)"""

    def __init__(self, session: Any, device: Device, outputs: Sequence[str], memory: str = "cuda") -> None:
        self.session, self.device, self.outputs, self.memory = session, device, list(outputs), memory
        self.dtypes = {i.name: ORT_TYPES[i.type] for i in session.get_inputs()}

    def run(self, _names: Any, feed: Mapping[str, Any], *_options: Any, keep: Sequence[str] = ()) -> list[Any]:
        """Outputs (in the graph's order) of one call."""
        with self.device.lock:
            binding = self.session.io_binding()
            for name, value in host_feed(feed, self.dtypes).items():
                if isinstance(value, DeviceArray):
                    binding.bind_input(name, self.memory, 0, value.dtype.type, list(value.shape), value.pointer)
                else:
                    binding.bind_cpu_input(name, value)
            for name in self.outputs:
                binding.bind_output(name, self.memory if name in keep else "cpu")
            self.device.synchronize()  # our copies are done before ONNX Runtime's stream reads them
            binding.synchronize_inputs()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            results: list[Any] = []
            for name, value in zip(self.outputs, binding.get_outputs()):
                if name in keep:
                    results.append(DeviceArray(int(value.data_ptr()), tuple(value.shape()),
                                               np.dtype(ORT_TYPES[value.data_type()]), self.device, owner=value))
                else:
                    results.append(value.numpy())
        return host_outputs(results)


# --- the denoiser ----------------------------------------------------------------------------------


@dataclass
class DeviceCache:
    """A context's keys (pre-rotary) and values on the device, (L, 1, Hkv, Tc, D) fp32, and the keys rotated
    to each layout a span step asked for (once per request and layout)."""

    keys: DeviceArray
    values: DeviceArray
    rotated: dict[tuple[tuple[int, ...], bytes], DeviceArray] = field(default_factory=dict)


class DeviceDenoiser:
    """The :class:`~engine.backends.base.Denoiser` of GPU runners (``context``, ``span_step``, ``rotate``), its
    caches on the device. Every method holds the device's lock: one request's GPU work at a time, as the
    engines' shared buffers and a capturing stream need."""

    def __init__(self, runners: Mapping[str, Any], device: Device, info: ModelInfo) -> None:
        self.runners, self.device, self.info = dict(runners), device, info
        self.reuses_context = True
        self.merges_contexts = True
        arch = info.arch
        self._empty = device.zeros((arch.num_layers, 1, arch.num_kv_heads, 0, arch.head_dim))

    def encode_context(self, input_ids: np.ndarray, positions: np.ndarray, cache_index: np.ndarray,
                       span_index: np.ndarray, prior: Prior | Sequence[Prior] | None = None
                       ) -> tuple[DeviceCache, StepOutput]:
        """See :meth:`engine.backends.base.Denoiser.encode_context`; the cache stays on the device."""
        with self.device.lock:
            given = priors(prior)
            if given:
                selected = [self._prior(p) for p in given]
                prior_keys = self.device.concat_entries([k for k, _ in selected])
                prior_values = self.device.concat_entries([v for _, v in selected])
            else:
                prior_keys = prior_values = self._empty
            feed = {"input_ids": np.asarray(input_ids)[None], "position_ids": np.asarray(positions)[None],
                    "cache_index": np.asarray(cache_index), "span_index": np.asarray(span_index),
                    "prior_keys": prior_keys, "prior_values": prior_values}
            keys, values, ids, probs, entropy = self.runners["context"].run(None, feed,
                                                                            keep=("cache_keys", "cache_values"))
        return DeviceCache(keys, values), StepOutput(ids=ids, probs=probs, entropy=entropy)

    def _prior(self, prior: Prior) -> tuple[DeviceArray, DeviceArray]:
        """A prior's entries, keys rotated to its positions, and values; on the device."""
        index = np.asarray(prior.index, np.int64)
        cache: DeviceCache = prior.cache
        whole = len(index) == cache.keys.shape[3] and bool((index == np.arange(len(index))).all())
        keys = cache.keys if whole else self.device.gather_entries(cache.keys, index)
        values = cache.values if whole else self.device.gather_entries(cache.values, index)
        return self._rotate(keys, np.asarray(prior.positions)[None]), values

    def _rotate(self, keys: DeviceArray, positions: np.ndarray) -> DeviceArray:
        (rotated,) = self.runners["rotate"].run(None, {"keys": keys, "positions": positions}, keep=("rotated",))
        return rotated

    def _rotated(self, cache: DeviceCache, cache_pos: np.ndarray) -> DeviceArray:
        cache_pos = np.asarray(cache_pos, np.int64)
        layout = (cache_pos.shape, cache_pos.tobytes())
        if layout not in cache.rotated:
            cache.rotated[layout] = self._rotate(cache.keys, cache_pos)
        return cache.rotated[layout]

    def join(self, parts: Sequence[tuple[DeviceCache, np.ndarray]]) -> DeviceCache:
        """One cache of the entries ``index`` of each cache, in this order (:mod:`engine.reuse`)."""
        with self.device.lock:
            keys = self.device.concat_entries([self.device.gather_entries(c.keys, i) for c, i in parts])
            values = self.device.concat_entries([self.device.gather_entries(c.values, i) for c, i in parts])
        return DeviceCache(keys, values)

    def step(self, cache: DeviceCache, span_ids: np.ndarray, span_pos: np.ndarray, span_valid: np.ndarray,
             cache_pos: np.ndarray) -> StepOutput:
        """See :meth:`engine.backends.base.Denoiser.step`."""
        with self.device.lock:
            keys = self._rotated(cache, cache_pos)
            valid = np.ones((keys.shape[1], keys.shape[3]), np.bool_)
            return self._run_step(span_ids, span_pos, span_valid, keys, cache.values, valid)

    def step_many(self, parts: Sequence[SpanBatch]) -> list[StepOutput]:
        """Several requests' span steps as one pass: their caches padded and stacked on the device."""
        if len(parts) == 1:
            p = parts[0]
            return [self.step(p.cache, p.span_ids, p.span_pos, p.span_valid, p.cache_pos)]
        with self.device.lock:
            rotated = [self._rotated(p.cache, p.cache_pos) for p in parts]
            merged = merge_span_rows(parts, [k.shape[3] for k in rotated])
            L, _, H, _, D = rotated[0].shape
            shape = (L, len(merged.span_ids), H, merged.cache_valid.shape[1], D)
            keys, values = self.device.zeros(shape), self.device.zeros(shape)
            for part, k, rows in zip(parts, rotated, merged.rows):
                tc = k.shape[3]
                self.device.copy_entries(keys, (rows.start, rows.stop), 0, k, (0, len(part.span_ids)), 0, tc)
                for r in range(rows.start, rows.stop):  # one values row, shared by the part's rows
                    self.device.copy_entries(values, (r, r + 1), 0, part.cache.values, (0, 1), 0, tc)
            out = self._run_step(merged.span_ids, merged.span_pos, merged.span_valid, keys, values, merged.cache_valid)
        return split_output(out, merged)

    def _run_step(self, span_ids: np.ndarray, span_pos: np.ndarray, span_valid: np.ndarray, keys: DeviceArray,
                  values: DeviceArray, cache_valid: np.ndarray) -> StepOutput:
        feed = {"span_ids": span_ids, "span_pos": span_pos, "span_valid": span_valid, "cache_keys": keys,
                "cache_values": values, "cache_valid": cache_valid}
        ids, probs, entropy = self.runners["span_step"].run(None, feed)
        return StepOutput(ids=ids, probs=probs, entropy=entropy)

    def full(self, input_ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> StepOutput:
        """The span step over whole windows with an empty cache."""
        batch = np.asarray(input_ids).shape[0]
        empty = DeviceCache(self._empty, self._empty)
        return self.step(empty, input_ids, positions, valid, np.zeros((batch, 0), np.int64))


def ort_device_denoiser(folder: Path, manifest: Any, threads: int | None = None, memory: str = "cuda") -> DeviceDenoiser:
    """The folder's graphs on ONNX Runtime through I/O binding, caches on the device: its CUDA provider (the
    ``cuda`` backend when cuda-python is installed), or with ``memory="cpu"`` its CPU provider."""
    import onnxruntime as ort

    from engine.backends.onnxruntime import interface_mismatches, session_options
    from engine.manifest import CONTEXT_OUTPUTS, SPAN_OUTPUTS

    cuda = memory == "cuda"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    gpu = Device()
    sessions = {}
    for role, name in manifest.graphs.items():
        try:
            sessions[role] = ort.InferenceSession(str(folder / name), providers=providers,
                                                  sess_options=session_options(manifest, role, memory, threads))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ManifestError(f"ONNX Runtime cannot load {folder / name}: {exc}") from exc
        if providers[0] not in sessions[role].get_providers():
            raise BackendUnavailableError(f"ONNX Runtime could not start {providers[0]} for {name}")
    problems = [p for role, session in sessions.items() for p in interface_mismatches(role, session, manifest)]
    if problems:
        raise ManifestError(f"engine folder {folder}: the manifest does not describe its graphs: {'; '.join(problems)}")
    rotate = ort.InferenceSession(rotate_graph(manifest.arch).SerializeToString(), providers=providers)
    runners = {"context": OrtRunner(sessions["context"], gpu, CONTEXT_OUTPUTS, memory),
               "span_step": OrtRunner(sessions["span_step"], gpu, SPAN_OUTPUTS, memory),
               "rotate": OrtRunner(rotate, gpu, ("rotated",), memory)}
    info = ModelInfo(family=manifest.family, arch=manifest.arch, token_ids=manifest.token_ids,
                     precision=manifest.precision, backend=memory, device="cuda:0" if cuda else "cpu",
                     top_k=manifest.top_k)
    return DeviceDenoiser(runners, gpu, info)
