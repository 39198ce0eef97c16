"""The CUDA runtime calls engine.backends.device makes, on host memory (a device pointer is a host address).

It stands in for the GPU so that everything around the calls (the copies' strides and offsets, the device
denoiser's cache handling, ONNX Runtime's I/O binding on CPU memory) runs and is checked on a machine
without one. Each call does what CUDA documents it to do, synchronously."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


class HostCudaRuntime:
    """cuda-python's runtime module, as far as engine.backends.device uses it, on host memory."""

    cudaStreamNonBlocking = 1  # noqa: N815 - cuda-python's names

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = cudaMemcpyDeviceToHost = cudaMemcpyDeviceToDevice = 0

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.freed = 0

    def cudaStreamCreateWithFlags(self, _flags: int) -> tuple[int, str]:  # noqa: N802
        return 0, "host stream"

    def cudaDeviceGetDefaultMemPool(self, _device: int) -> tuple[int, None]:  # noqa: N802
        return 0, None

    def cudaMallocAsync(self, size: int, _stream: Any) -> tuple[int, int]:  # noqa: N802
        block = np.zeros(size, np.uint8)
        self.blocks[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFreeAsync(self, pointer: int, _stream: Any) -> tuple[int]:  # noqa: N802
        if self.blocks.pop(pointer, None) is not None:
            self.freed += 1
        return (0,)

    def cudaMemsetAsync(self, pointer: int, value: int, count: int, _stream: Any) -> tuple[int]:  # noqa: N802
        ctypes.memset(pointer, value, count)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, _kind: Any, _stream: Any) -> tuple[int]:  # noqa: N802
        ctypes.memmove(dst, src, count)
        return (0,)

    def cudaMemcpy2DAsync(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,  # noqa: N802
                          _kind: Any, _stream: Any) -> tuple[int]:
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (0,)

    def cudaStreamSynchronize(self, _stream: Any) -> tuple[int]:  # noqa: N802
        return (0,)
