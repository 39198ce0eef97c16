"""Runtimes of the denoiser interface: ONNX Runtime (serving) and the PyTorch reference."""
