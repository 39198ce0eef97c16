"""``dlm-serve`` through real HTTP clients: the Mercury FIM API, llama.cpp's ``/infill``, health,
metrics, keys, limits and bad input (each answered in the API's error shape; the server keeps
serving everyone else)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from http_client import MercuryClient, Serve

SCRIPT = {"text": "a + b", "p": 0.95}
ARGS = ("--min-confidence", "0", "--settings", '{"tokenHealing": false}')
PREFIX, SUFFIX = "def add(a, b):\n    return ", "\n\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def serve():  # type: ignore[no-untyped-def]
    server = Serve(*ARGS, script=SCRIPT)
    yield server
    server.stop()


def test_health_models_and_status(serve: Serve):
    assert httpx.get(serve.url + "/health").json() == {"status": "ok"}
    models = httpx.get(serve.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "dlm-default"
    status = httpx.get(serve.url + "/v1/status").json()
    assert status["state"] == "ready" and status["family"] == "dream"


def test_mercury_completion_plain_and_streamed(serve: Serve):
    client = MercuryClient(serve.url)
    text, reason, usage = client.complete(PREFIX, SUFFIX)
    assert (text, reason) == ("a + b", "stop")
    assert usage["completion_tokens"] >= 3 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    streamed = client.complete(PREFIX + " ", SUFFIX, stream=True)  # another context: not the cache
    assert streamed[0] == "a + b" and streamed[1] == "stop"


def test_infill_as_llama_cpp_answers_it(serve: Serve):
    body = {"input_prefix": "def add(a, b):\n", "prompt": "    return ", "input_suffix": "\n", "n_predict": 64,
            "input_extra": [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n", "time": [1, 2]}],
            "t_max_prompt_ms": 500, "t_max_predict_ms": 250, "n_indent": 4, "cache_prompt": True,
            "samplers": ["top_k", "top_p", "infill"], "id_slot": 0, "model": ""}
    reply = httpx.post(serve.url + "/infill", content=json.dumps(body))  # no Content-Type, as some clients
    data = reply.json()
    assert data["content"] == "a + b" and data["stop"] is True and data["tokens_cached"] == 0
    assert data["timings"]["predicted_n"] >= 3 and data["timings"]["prompt_n"] > 5
    fields = ["content", "timings/prompt_n", "timings/predicted_ms", "truncated", "missing/field"]
    picked = httpx.post(serve.url + "/infill", json={**body, "prompt": "    return  ", "response_fields": fields})
    assert set(picked.json()) == {"content", "timings/prompt_n", "timings/predicted_ms", "truncated"}
    assert b'"content":"' in picked.content  # compact JSON: llama.vim matches this byte pattern


def test_warm_up_requests_answer_at_once(serve: Serve):
    reply = httpx.post(serve.url + "/infill", json={"input_extra": [{"filename": "a.py", "text": "x = 1\n"}],
                                                    "n_predict": 0, "response_fields": [""]})
    assert reply.status_code == 200 and reply.json() == {}
    assert 'dlm_requests_total{outcome="primed",route="infill"}' in httpx.get(serve.url + "/metrics").text


def test_stop_strings_cut_the_middle(serve: Serve):
    data = httpx.post(serve.url + "/infill", json={"input_prefix": "x = (", "input_suffix": ")\n", "stop": [" +"],
                                                   "n_predict": 32}).json()
    assert data["content"] == "a" and data["stop_type"] == "word"
    mercury = httpx.post(serve.url + "/v1/fim/completions", json={"prompt": "y = (", "suffix": ")\n", "stop": "+ b"}).json()
    assert mercury["choices"][0]["text"] == "a " and mercury["choices"][0]["finish_reason"] == "stop"


def test_metrics_count_requests_latency_and_forward_passes(serve: Serve):
    MercuryClient(serve.url).complete("z = ", "\n")
    text = httpx.get(serve.url + "/metrics").text
    for series in ("dlm_requests_total", "dlm_request_seconds_bucket", "dlm_forward_passes_total",
                   "dlm_tokens_per_forward_pass_bucket", "dlm_requests_in_flight"):
        assert series in text, series


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"suffix": "x"}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": -4}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "model": "/etc/passwd"}).encode(), 404, "model"),
    (json.dumps({"prompt": "x", "stop": ["s"] * 40}).encode(), 400, "stop"),
    (json.dumps({"prompt": "x" * 1_000_001}).encode(), 400, "prompt"),
])
def test_bad_mercury_requests_get_the_error_shape(serve: Serve, body: bytes, status: int, param: str | None):
    reply = httpx.post(serve.url + "/v1/fim/completions", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and error["message"] and error["param"] == param
    assert "Traceback" not in reply.text


@pytest.mark.parametrize("body", [
    {"n_predict": -5}, {"t_max_predict_ms": -2}, {"t_max_prompt_ms": 10**9}, {"input_extra": "text"},
    {"input_extra": [{"filename": "a", "text": "x" * 300_000}] * 2},
    {"input_extra": [{"filename": "a", "text": "x"}] * 65}, {"n_indent": -1}, {"id_slot": "first"},
])
def test_bad_infill_requests_get_the_error_shape(serve: Serve, body: dict):  # type: ignore[type-arg]
    reply = httpx.post(serve.url + "/infill", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == 400, reply.text


def test_a_huge_body_is_refused_before_it_is_read(serve: Serve):
    reply = httpx.post(serve.url + "/infill", content=b"x" * (9 << 20))
    assert reply.status_code == 413 and reply.json()["error"]["code"] == 413
    with socket.create_connection(("127.0.0.1", serve.port)) as sock:  # declared, never sent
        sock.sendall(b"POST /infill HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        assert b" 413 " in sock.recv(4096).split(b"\r\n")[0]
    assert httpx.get(serve.url + "/health").status_code == 200


def test_clients_that_vanish_or_dawdle_do_not_stop_the_others(serve: Serve):
    body = json.dumps({"input_prefix": "q = ", "input_suffix": "\n", "n_predict": 64}).encode()
    for _ in range(5):  # a request, then gone before the answer
        with socket.create_connection(("127.0.0.1", serve.port)) as sock:
            sock.sendall(b"POST /infill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
    slow = socket.create_connection(("127.0.0.1", serve.port))  # slow-loris: a header a byte at a time
    slow.sendall(b"POST /infill HTTP/1.1\r\nHost: x\r\n")
    try:
        started = time.monotonic()
        text, _, _ = MercuryClient(serve.url).complete("w = (", ")\n")
        assert text == "a + b" and time.monotonic() - started < 10
    finally:
        slow.close()
    assert httpx.get(serve.url + "/health").status_code == 200


def test_api_keys_are_required_when_set_and_compared_exactly():
    key = "k" * 20 + "-team"
    server = Serve(*ARGS, script=SCRIPT, env={"DLM_SERVE_API_KEYS": f"{key},{'o' * 24}"})
    try:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {key}x"}, {"Authorization": key}):
            reply = httpx.post(server.url + "/v1/fim/completions", json={"prompt": "a"}, headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # health stays open for load balancers
        text, _, _ = MercuryClient(server.url, api_key=key).complete("b = ", "\n")
        assert text == "a + b"
    finally:
        server.stop()


def test_no_keys_means_the_empty_bearer_of_llama_vim_is_fine(serve: Serve):
    body = json.dumps({"input_prefix": "k = ", "n_predict": 8}).encode()
    with socket.create_connection(("127.0.0.1", serve.port)) as sock:  # exactly what llama.vim's curl sends
        sock.sendall(b"POST /infill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer \r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        assert b" 200 " in sock.recv(4096).split(b"\r\n")[0]


def test_beyond_loopback_it_refuses_to_start_without_keys():
    server = Serve("--host", "0.0.0.0", wait=False)
    assert server.proc.wait(timeout=60) == 2
    assert "API keys" in server.stop()


def test_a_model_that_fails_to_load_is_reported_by_health():
    server = Serve("--model", "/nonexistent/model", wait=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = httpx.get(server.url + "/health", timeout=2)
                if reply.json().get("status") == "error":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert reply.status_code == 503 and "does not exist" in reply.json()["error"]["message"]
        completion = httpx.post(server.url + "/v1/fim/completions", json={"prompt": "x"})
        assert completion.status_code == 503 and completion.json()["error"]["type"] == "unavailable_error"
    finally:
        server.stop()


def _metric(text: str, name: str) -> float:
    """The value of the series ``name`` (its full name with labels) in a Prometheus exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.parametrize("batching", ["64", "0"])
def test_concurrent_clients_do_not_replace_each_others_requests(batching: str):
    """Requests from one address on different connections are different clients (a shared host, a
    proxy): none stops another. The shipped model, so that requests overlap for real; with batching
    their span steps share forward passes (/metrics counts them), without it none does."""
    import concurrent.futures

    # multi-line middles: several denoising steps each, so that requests overlap in their steps
    server = Serve("--min-confidence", "0", "--max-batch-rows", batching, "--settings", '{"multiline": "always"}')

    def one(n: int) -> int:
        with httpx.Client(timeout=60) as http:  # a connection of its own
            reply = http.post(server.url + "/v1/fim/completions", json={"prompt": f"v{n} = compute(", "suffix": ")\n"})
            return reply.status_code

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(24))) == [200] * 24
        metrics = httpx.get(server.url + "/metrics").text
        assert 'outcome="cancelled"' not in metrics, [m for m in metrics.splitlines() if "cancelled" in m]
        assert 'dlm_requests_total{outcome="model",route="fim"}' in metrics or 'outcome="empty"' in metrics
        merged = _metric(metrics, "dlm_batch_requests_count")
        alone = _metric(metrics, 'dlm_batch_requests_bucket{le="1.0"}')
        if batching == "0":
            assert merged == 0
        else:  # 8 clients at once: some passes held several requests
            assert merged > 0 and alone < merged, (alone, merged)
    finally:
        server.stop()


def test_no_answer_is_shared_between_requests_with_other_limits(serve: Serve):
    """A middle cut to one token must not come back, as if complete, to a request that allows 64."""
    short = httpx.post(serve.url + "/v1/fim/completions", json={"prompt": "m = (", "suffix": ")\n", "max_tokens": 1}).json()
    assert short["choices"][0] == {"index": 0, "text": "a", "finish_reason": "length"}
    full = httpx.post(serve.url + "/v1/fim/completions", json={"prompt": "m = (", "suffix": ")\n", "max_tokens": 64}).json()
    assert full["choices"][0]["text"] == "a + b" and full["usage"]["completion_tokens"] >= 3


def test_a_warm_up_request_primes_the_next_one_of_that_client():
    """llama.vim's n_predict 0 encodes the context now; its next request (a new connection, as llama.vim
    opens one per request) reuses that encoding and computes only what changed."""
    server = Serve("--min-confidence", "0")
    body = "".join(f"def helper_{i}(value):\n    return value * {i}\n\n" for i in range(16))
    try:
        warm = httpx.post(server.url + "/infill", json={"input_prefix": body, "prompt": "def gre",
                                                         "input_suffix": "\n\nprint(1)\n", "n_predict": 0}).json()
        assert warm["content"] == "" and warm["tokens_cached"] > 100
        after = httpx.post(server.url + "/infill", json={"input_prefix": body, "prompt": "def gree",
                                                         "input_suffix": "\n\nprint(1)\n", "n_predict": 16}).json()
        metrics = httpx.get(server.url + "/metrics").text
        reused = _metric(metrics, 'dlm_context_tokens_total{kind="reused"}')
        computed = _metric(metrics, 'dlm_context_tokens_total{kind="computed"}')
        # the band recomputes 64 tokens each side of the change, the rolling refresh 1/32 of the window
        assert reused > 100 and computed < reused, (reused, computed)
        assert after["tokens_cached"] == reused  # what llama.cpp calls the tokens its cache gave back
    finally:
        server.stop()
