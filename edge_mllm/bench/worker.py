"""One subject's runtime in its own process, driven over a pipe.

Runtimes in one process slow each other down: llama.cpp's OpenMP threads, ONNX Runtime's intra-op pool
and ExecuTorch's XNNPACK pthreadpool each keep their own threads (spinning between calls), so with all
three loaded llama.cpp decoded the default model 5x slower on the 2-core host than alone (20 vs 106
tok/s). A phone app loads one runtime; so does each worker. The parent still alternates requests
between workers, and only one works at a time.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from edge_mllm.errors import EdgeMLLMError

START_TIMEOUT_S = 1800  # loading an ExecuTorch program or a GGUF can take minutes on a loaded machine
_READY, _OK, _ERROR = "ready", "ok", "error"


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and its message with whitespace collapsed."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _serve(path: str | None, threads: int | None, conn) -> None:
    """The child: load, report the model config (None for bundles), then answer requests until None."""
    try:
        from edge_mllm import runtime

        rt = runtime.load(path, threads=threads)
        conn.send((_READY, getattr(getattr(rt, "model", None), "config", None)))
    except Exception as exc:  # noqa: BLE001 - any load failure goes back as one line
        conn.send((_ERROR, one_line(exc)))
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        fn, args = request
        try:
            conn.send((_OK, fn(rt, *args)))
        except Exception as exc:  # noqa: BLE001
            conn.send((_ERROR, one_line(exc)))


class RuntimeProcess:
    """``runtime.load(path, threads=threads)`` in a child process; :meth:`call` runs ``fn(runtime,
    *args)`` there (``fn`` must be a module-level function) and returns its result. ``config``: the
    model's config for model folders, None for bundles."""

    def __init__(self, path: str | None, threads: int | None = None, name: str | None = None):
        self.name = name or path or "the default model"
        ctx = mp.get_context("spawn")  # a clean interpreter: no thread pools inherited from this one
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(path, threads, child), daemon=True)
        self._process.start()
        child.close()
        try:
            self.config = self._receive(START_TIMEOUT_S, "load")
        except EdgeMLLMError:
            self.close()  # reap the child that failed to load
            raise

    def _receive(self, timeout: float | None, what: str) -> Any:
        if not self._conn.poll(timeout):
            self.close()
            raise EdgeMLLMError(f"{self.name}: no answer from its runtime process ({what})")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise EdgeMLLMError(f"{self.name}: its runtime process died ({what}, exit code "
                                f"{self._process.exitcode})") from None
        if status == _ERROR:
            raise EdgeMLLMError(f"{self.name}: {value}")
        return value

    def call(self, fn, *args) -> Any:
        """``fn(runtime, *args)`` in the child."""
        self._conn.send((fn, args))
        return self._receive(None, fn.__name__)

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()

    def __enter__(self) -> RuntimeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
