"""``dlm-serve``: the engine behind standard fill-in-the-middle HTTP APIs.

One module per API, all on the language server's completion path
(:mod:`dlm_lsp.http.service`):

* :mod:`dlm_lsp.http.fim`: Inception's Mercury ``POST /v1/fim/completions`` (Continue,
  minuet-ai.nvim, Kilo Code) and ``GET /v1/models``;
* :mod:`dlm_lsp.http.infill`: llama.cpp's ``POST /infill`` (llama.vim, llama.vscode);
* :mod:`dlm_lsp.http.health`: ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/status``;
* :mod:`dlm_lsp.http.app`: the FastAPI application, keys, limits and error shapes;
* :mod:`dlm_lsp.http.cli`: the ``dlm-serve`` command (uvicorn);
* :mod:`dlm_lsp.http.ray_app`: the same application as Ray Serve replicas (``ray_serve.yaml``).
"""
