"""Loads the engine in the background and says whether it is loading, ready or failed.

The server answers ``initialize`` at once; the model loads on a worker thread. A
completion asked for before it is ready gets an empty list. Changing the model
setting or the backend reloads it. The model setting is a folder or a catalog
name (``engine.catalog``); a catalog model that has not been pulled is never
downloaded here: the shipped model loads instead and :attr:`ModelHost.missing`
says which model was wanted, so that the server can offer the download.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from dlm_lsp.remote import Endpoint
    from engine import Engine, SamplingParams
    from engine.catalog import CatalogEntry

log = logging.getLogger(__name__)


def default_model_path() -> Path:
    """The engine folder that ships with dlm-lsp."""
    from engine import default_model_path as engine_default

    return engine_default()


def model_path(model: str) -> Path:
    """A ``model`` setting -> a folder: empty for the shipped model, a catalog name, or a path.

    Raises ``ModelNotPresentError`` for a catalog model not pulled yet, ``CatalogError``
    for a malformed team catalog.
    """
    if not model:
        return default_model_path()
    from engine import catalog

    return catalog.resolve(model)


class ModelHost:
    """The current engine and its state: ``idle``, ``loading``, ``ready`` or ``error``."""

    def __init__(self, prepare: Callable[[Engine], None] | None = None) -> None:
        """``prepare`` runs on each engine loaded, before its warm-up (a server turns batching on there)."""
        self.prepare = prepare
        self.state = "idle"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.spec: str | None = None
        """The model setting the current load is for."""
        self.path: Path | None = None
        self.backend: str | None = None
        self.threads = 0
        """The threads setting the current load is for (0: the engine's default)."""
        self.missing: CatalogEntry | None = None
        """The catalog model the setting names but that is not downloaded (the shipped one runs instead)."""
        self.load_ms: float | None = None
        self.remote: Endpoint | None = None
        """The remote engine in use (the ``endpoint`` setting), instead of a model loaded here."""
        self.endpoint = ""
        self._endpoint_key: tuple[str, str, str] = ("", "", "")
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._generation = 0
        """Counts loads: a load that a newer one replaced must not touch the state."""

    def wants_reload(
        self, model: str, backend: str, endpoint: str = "", key_env: str = "", key_file: str = "", threads: int = 0
    ) -> bool:
        """Whether these settings name another model, backend, thread count or endpoint (or its key)
        than the current ones (with an endpoint, the model, backend and threads do not matter)."""
        if endpoint or self.endpoint:
            return (endpoint, key_env, key_file) != self._endpoint_key
        return model != self.spec or backend != self.backend or threads != self.threads

    def connect(self, endpoint: str, key_env: str, key_file: str,
                on_done: Callable[["ModelHost", bool], None] | None = None) -> threading.Thread:
        """Use a remote engine instead of loading a model: ``GET /v1/models`` on a thread, then
        ``ready`` (or ``error`` saying why); ``on_done`` as for :meth:`load`."""
        from dlm_lsp.remote import Endpoint, EndpointError

        with self._lock:
            self.state, self.error, self.spec, self.backend, self.missing = "loading", None, None, "remote", None
            self.endpoint, self.engine, self.remote, self.path = endpoint, None, None, None
            self._endpoint_key = (endpoint, key_env, key_file)
            self._generation += 1
            generation = self._generation
            self._loaded.clear()

        def work() -> None:
            started = time.perf_counter()
            try:
                remote = Endpoint(endpoint, key_env, key_file)
                remote.check()
            except Exception as exc:  # noqa: BLE001 - any failure is this endpoint's error state, never a dead thread
                message = str(exc) if isinstance(exc, EndpointError) else f"endpoint {endpoint!r}: {type(exc).__name__}: {exc}"
                with self._lock:
                    if self._generation == generation:
                        self.state, self.error = "error", message
                log.error("endpoint %s: %s", endpoint, message)
            else:
                with self._lock:
                    if self._generation == generation:
                        self.remote, self.state = remote, "ready"
                        self.load_ms = (time.perf_counter() - started) * 1000
            self._finish(generation, on_done)

        thread = threading.Thread(target=work, name="dlm-endpoint-check", daemon=True)
        thread.start()
        return thread

    def load(
        self,
        model: str,
        backend: str,
        on_done: Callable[["ModelHost", bool], None] | None = None,
        *,
        fallback: bool = True,
        threads: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> threading.Thread:
        """Start loading on a thread; ``on_done(host, superseded)`` runs on that thread when it ends.

        ``superseded``: a newer :meth:`load` started meanwhile; this one changed nothing.

        ``fallback``: a catalog model that is not downloaded loads the shipped model
        instead (the server, which offers the download); without it that is an error.
        ``threads``: per op (0: the engine's default for the model's size). ``progress`` hears
        what a long load says as it goes (building TensorRT engines), on the loading thread.
        """
        with self._lock:
            self.state, self.error, self.spec, self.backend, self.missing = "loading", None, model, backend, None
            self.threads = threads
            self.path, self.remote, self.endpoint, self._endpoint_key = None, None, "", ("", "", "")
            self._generation += 1
            generation = self._generation
            self._loaded.clear()

        def current() -> bool:  # called with the lock held
            return self._generation == generation

        def work() -> None:
            from engine import Engine, EngineError
            from engine.errors import ModelNotPresentError

            started = time.perf_counter()
            path: Path | None = None
            try:
                try:
                    path = model_path(model)
                except ModelNotPresentError as exc:
                    if not fallback:
                        raise
                    log.warning("%s; the shipped model runs until it is", exc)
                    path = default_model_path()
                    with self._lock:
                        if current():
                            self.missing = exc.entry  # type: ignore[assignment]
                with self._lock:
                    if current():
                        self.path = path
                engine = Engine.load(path, backend=backend, threads=threads or None, progress=progress)
                if self.prepare is not None:
                    self.prepare(engine)
                # one tiny run so the first real request does not pay for lazy initialisation
                engine.complete("", "", _warmup_params())
            except EngineError as exc:
                with self._lock:
                    if current():
                        self.state, self.error, self.engine = "error", str(exc), None
                log.error("model %s failed to load: %s", path or model, exc)
            except Exception as exc:  # noqa: BLE001 - keep the server alive, say what happened
                with self._lock:
                    if current():
                        self.state, self.error, self.engine = "error", f"{type(exc).__name__}: {exc}", None
                log.exception("model %s failed to load", path or model)
            else:
                with self._lock:
                    if current():
                        self.engine, self.state = engine, "ready"
                        self.load_ms = (time.perf_counter() - started) * 1000
                log.info("model %s ready on %s in %.0f ms", path, engine.info.backend, self.load_ms or 0)
            self._finish(generation, on_done)

        thread = threading.Thread(target=work, name="dlm-model-load", daemon=True)
        thread.start()
        return thread

    def _finish(self, generation: int, on_done: Callable[["ModelHost", bool], None] | None) -> None:
        """End a load or connect: mark it done unless a newer one replaced it (which reports for itself)."""
        with self._lock:
            superseded = self._generation != generation
            if not superseded:
                self._loaded.set()
        if on_done is not None:
            on_done(self, superseded)

    def unload(self) -> None:
        """Drop the engine; a load still running is superseded (it changes nothing and reports so)."""
        with self._lock:
            self._generation += 1
            self.state, self.engine, self.error, self.remote = "idle", None, None, None
            self._loaded.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current load finishes; True if it did within ``timeout``."""
        return self._loaded.wait(timeout)

    def load_now(self, model: str, backend: str, threads: int = 0) -> Engine | None:
        """Load and wait (the command-line tools); None when it failed, with the reason in :attr:`error`."""
        self.load(model, backend, fallback=False, threads=threads)
        self.wait()
        return self.engine if self.state == "ready" else None

    def describe(self) -> dict[str, Any]:
        """Model, family, backend, device and state for ``dlm/status``."""
        info = self.engine.info if self.engine is not None else None
        if self.endpoint:
            return {"state": self.state, "error": self.error, "model": self.remote.model if self.remote else None,
                    "endpoint": self.endpoint, "missing": None, "family": None, "backend": "remote", "device": None,
                    "precision": None, "load_ms": round(self.load_ms, 1) if self.load_ms else None}
        return {
            "state": self.state,
            "error": self.error,
            "model": str(self.path) if self.path else None,
            "missing": self.missing.name if self.missing else None,
            "family": info.family if info else None,
            "backend": info.backend if info else self.backend,
            "device": info.device if info else None,
            "precision": info.precision if info else None,
            "load_ms": round(self.load_ms, 1) if self.load_ms else None,
        }


def _warmup_params() -> SamplingParams:
    from engine import SamplingParams

    # stop_at_line_break: the line-break ids are computed now, not on the first request
    return SamplingParams(lengths=(4,), threshold=0.5, stop_at_line_break=True)
