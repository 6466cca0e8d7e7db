"""`llava-smoe serve` as a real process on loopback: the openai client, raw HTTP bad input, load."""

import base64
import http.server
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image

from llava_smoe.testing import save_tiny_checkpoint

openai = pytest.importorskip("openai")

MODEL = "tiny_vlm"


# -- helpers shared with the web page test ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "llava-smoe")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "llava_smoe.cli"]


def start_process(args: list[str], port: int, log_path, ready_path: str = "/health", timeout: float = 180.0,
                  env: dict[str, str] | None = None):
    """Start `llava-smoe ARGS` and wait until GET ready_path answers 200; kill it on failure."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               **(env or {}))
    log = open(log_path, "w")
    proc = subprocess.Popen([*cli(), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(f"server did not become ready in {timeout}s:\n{open(log_path).read()[-3000:]}")


def stop_process(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tiny_checkpoint(tmp_path_factory) -> str:
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / MODEL))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


RED = data_url(png_bytes(Image.new("RGB", (40, 30), (220, 20, 20))))
BLUE = data_url(png_bytes(Image.new("RGB", (24, 48), (20, 20, 220))))


def user(*parts):
    content = [{"type": "text", "text": p} if not p.startswith("data:") and "://" not in p
               else {"type": "image_url", "image_url": {"url": p}} for p in parts]
    return {"role": "user", "content": content}


# -- the server under test ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory)
    allowed = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(allowed / "green.png")
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(outside / "secret.png")
    port = free_port()
    proc = start_process(
        ["serve", checkpoint, "--port", str(port), "--device", "cpu", "--threads", "1", "--max-concurrent-requests", "1",
         "--max-images", "2", "--max-body-bytes", "200000", "--max-image-bytes", "50000",
         "--max-image-pixels", str(256 * 256), "--max-tokens-limit", "64", "--allow-file-urls", str(allowed),
         "--log-level", "warning"],
        port, tmp_path_factory.mktemp("logs") / "serve.log",
    )
    yield {"url": f"http://127.0.0.1:{port}", "allowed": allowed, "outside": outside}
    stop_process(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, body, **kwargs):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server["url"] + "/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json"}, timeout=120, **kwargs)


def test_health_and_models(server, client):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_client_plain_and_streaming_agree(client):
    messages = [user(RED, "What shape is in the image?")]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 16 and plain.usage.completion_tokens <= 20
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_is_openai_sse_ending_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def test_multi_turn_images_system_prompt_and_stop(client):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        user(RED, "What is this?"),
        {"role": "assistant", "content": "A red shape."},
        user("And this?", BLUE),
    ]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    text = first.choices[0].message.content
    assert first.usage.prompt_tokens > 2 * 16
    if len(text) > 6:
        stop = text[3:6]
        stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 stop=[stop])
        assert stopped.choices[0].message.content == text[: text.find(stop)]
        assert stopped.choices[0].finish_reason == "stop"


def test_file_urls_only_under_the_allowed_folder(server, client):
    ok = client.chat.completions.create(
        model=MODEL, messages=[user(f"file://{server['allowed'] / 'green.png'}", "Colour?")], max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    escape = f"file://{server['allowed']}/../{server['outside'].name}/secret.png"
    for url in (f"file://{server['outside'] / 'secret.png'}", escape):
        r = post(server, {"model": MODEL, "messages": [user(url, "Colour?")]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "file_url_not_allowed"


def _noise_png(side: int) -> bytes:
    return png_bytes(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))


def _msg(*parts):
    return {"model": MODEL, "messages": [user(*parts)], "max_tokens": 4}


BAD_INPUT = {
    "malformed json": ('{"model": "tiny_vlm", "messages": [', 400, "invalid_json"),
    "not an object": ("[1, 2]", 400, "invalid_json"),
    "unknown field": ({**_msg("hi"), "frobnicate": True}, 400, "unknown_parameter"),
    "bad value": ({**_msg("hi"), "temperature": "hot"}, 400, "invalid_value"),
    "no messages": ({"model": MODEL, "messages": []}, 400, "invalid_value"),
    "unknown model": ({**_msg("hi"), "model": "gpt-9"}, 404, "model_not_found"),
    "corrupt image": (_msg(data_url(png_bytes(Image.new("RGB", (40, 40)))[:60]), "hi"), 400, "invalid_image"),
    "not an image": (_msg(data_url(b"just some text, not pixels", "image/png"), "hi"), 400, "invalid_image"),
    "not base64": (_msg("data:image/png;base64,@@@@", "hi"), 400, "invalid_image"),
    "remote url": (_msg("https://example.com/cat.png", "hi"), 400, "remote_images_disabled"),
    "too many images": (_msg(RED, RED, RED, "hi"), 400, "too_many_images"),
    "image bytes": (_msg(data_url(_noise_png(140)), "hi"), 413, "image_too_large"),
    "image pixels": (_msg(data_url(png_bytes(Image.new("RGB", (300, 300)))), "hi"), 413, "image_too_large"),
    "oversize body": (_msg("x" * 300_000), 413, "request_too_large"),
    "max tokens": ({**_msg("hi"), "max_tokens": 65}, 400, "max_tokens_too_large"),
    "context length": ({**_msg("square " * 600), "max_tokens": 8}, 400, "context_length_exceeded"),
    "image token in text": (_msg("see <image> here"), 400, "invalid_request"),
    "image in assistant turn": ({"model": MODEL, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": RED}}]},
        {"role": "user", "content": "and?"}]}, 400, "invalid_request"),
    "n > 1": ({**_msg("hi"), "n": 2}, 400, "invalid_value"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_openai_shaped_4xx(server, case):
    body, status, code = BAD_INPUT[case]
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and "type" in error


def test_openai_client_raises_on_refusal(client):
    with pytest.raises(openai.BadRequestError, match="remote image URLs are disabled"):
        client.chat.completions.create(model=MODEL, messages=[user("http://10.0.0.1/x.png", "hi")])


def test_unknown_route_and_method_use_the_error_shape(server):
    r = httpx.get(server["url"] + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server["url"] + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_too_many_concurrent_requests_get_429(server):
    # A request whose body is still arriving holds the only slot (--max-concurrent-requests 1).
    body = json.dumps(_msg("hi")).encode()
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as held:
        held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:10])
        deadline = time.monotonic() + 30
        while httpx.get(server["url"] + "/health").json()["active_requests"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = post(server, _msg("hi"))
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        held.sendall(body[10:])
        response = b""
        while chunk := held.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200")
    assert post(server, _msg("hi")).status_code == 200  # the slot is free again


def test_image_url_rules_without_a_server(tmp_path):
    from llava_smoe.serve.config import ServerLimits
    from llava_smoe.serve.schema import APIError, decode_image, image_bytes_from_url

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    closed = ServerLimits()
    for url, code in [(f"file://{tmp_path / 'a.png'}", "file_urls_disabled"),
                      ("http://127.0.0.1:1/a.png", "remote_images_disabled"),
                      ("ftp://host/a.png", "invalid_image_url"),
                      ("data:image/png,notbase64", "invalid_image_url")]:
        with pytest.raises(APIError) as err:
            image_bytes_from_url(url, closed, "p")
        assert err.value.code == code and err.value.param == "p"
    opened = ServerLimits(file_url_roots=[str(tmp_path)])
    raw = image_bytes_from_url(f"file://{tmp_path / 'a.png'}", opened, "p")
    assert decode_image(raw, opened, "p").size == (8, 8)
    with pytest.raises(APIError, match="does not name an existing file"):
        image_bytes_from_url(f"file://{tmp_path / 'missing.png'}", opened, "p")


# -- who may use the server ----------------------------------------------------------------------------
KEY = "test-key-0123"


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """/red.png, /big.png (over the byte limit), /redirect (to /red.png)."""

    def do_GET(self):  # noqa: N802 - the http.server name
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/red.png")
            self.end_headers()
            return
        body = png_bytes(Image.new("RGB", (40, 30), (220, 20, 20))) if self.path == "/red.png" else b"\0" * 80_000
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    """An image server on 127.0.0.1 (a private address as far as the API is concerned)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    port = free_port()
    proc = start_process(["serve", tiny_checkpoint(tmp_path_factory), "--port", str(port), "--device", "cpu",
                          "--threads", "1", "--allow-remote-images", "--log-level", "warning"],
                         port, tmp_path_factory.mktemp("logs") / "keyed.log", env={"LLAVA_SMOE_API_KEY": KEY})
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


def test_api_key_is_required_except_for_health(keyed_server):
    body = _msg("hi")
    assert httpx.get(keyed_server + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        r = httpx.post(keyed_server + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key" and KEY not in r.text
    assert httpx.get(keyed_server + "/v1/models").status_code == 401
    client = openai.OpenAI(base_url=keyed_server + "/v1", api_key=KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server + "/v1", api_key="nope", max_retries=0).models.list()


def test_remote_image_on_a_private_address_is_refused(keyed_server, image_host):
    r = httpx.post(keyed_server + "/v1/chat/completions", json=_msg(f"http://{image_host}/red.png", "hi"),
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "image_host_not_allowed" and "127.0.0.1" in r.json()["error"]["message"]


def test_remote_image_rules_without_a_server(image_host, monkeypatch):
    from llava_smoe.serve.config import ServerLimits
    from llava_smoe.serve.schema import APIError, decode_image, image_bytes_from_url

    def refused(url, limits, code="image_host_not_allowed"):
        with pytest.raises(APIError) as err:
            image_bytes_from_url(url, limits, "p")
        assert err.value.code == code, err.value.message
        return err.value

    public_only = ServerLimits(allow_remote_images=True, remote_image_timeout_s=5)
    for url in (f"http://{image_host}/red.png", "http://localhost:9/x.png", "http://169.254.169.254/latest/meta-data",
                "http://[::1]:9/x.png", "http://[::ffff:127.0.0.1]:9/x.png", "http://10.1.2.3/x.png",
                "http://224.0.0.1/x.png", "http://0.0.0.0:9/x.png"):
        assert refused(url, public_only).status == 403
    assert "link-local" in refused("http://169.254.169.254/", public_only).message
    refused("http://user:pw@example.com/x.png", public_only, "invalid_image_url")

    allowed = ServerLimits(allow_remote_images=True, remote_image_timeout_s=5, allowed_image_hosts=["127.0.0.1"])
    raw = image_bytes_from_url(f"http://{image_host}/red.png", allowed, "p")
    assert decode_image(raw, allowed, "p").size == (40, 30)
    assert "redirects are not followed" in refused(f"http://{image_host}/redirect", allowed, "image_fetch_failed").message
    small = ServerLimits(allow_remote_images=True, allowed_image_hosts=["127.0.0.1"], max_image_bytes=50_000)
    assert refused(f"http://{image_host}/big.png", small, "image_too_large").status == 413

    # A name is resolved once and the connection goes to the address that was checked: a second
    # lookup (which a rebinding DNS server would answer differently) never happens.
    lookups = []
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, *args, **kwargs):
        if host == "images.example":
            lookups.append(host)
            return real_getaddrinfo("127.0.0.1", *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    port = image_host.split(":")[1]
    refused(f"http://images.example:{port}/red.png", public_only)
    named = ServerLimits(allow_remote_images=True, remote_image_timeout_s=5, allowed_image_hosts=["Images.Example."])
    lookups.clear()
    assert image_bytes_from_url(f"http://images.example:{port}/red.png", named, "p") == raw
    assert lookups == ["images.example"]


def test_bind_warnings():
    from llava_smoe.serve.config import bind_warning
    from llava_smoe.serve.web import parse_auth

    assert bind_warning("127.0.0.1", False, "the API", "fix") is None
    assert bind_warning("localhost", False, "the API", "fix") is None
    assert bind_warning("0.0.0.0", True, "the API", "fix") is None
    warning = bind_warning("0.0.0.0", False, "the API", "set --api-key")
    assert warning.startswith("warning: binding 0.0.0.0 with no authentication") and "set --api-key" in warning
    assert parse_auth("ann:s3:cret") == ("ann", "s3:cret") and parse_auth(None) is None
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        parse_auth("ann")


@pytest.mark.slow
def test_load_32_concurrent_streams(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory)
    port = free_port()
    proc = start_process(["serve", checkpoint, "--port", str(port), "--device", "cpu", "--threads", "1", "--max-batch-size", "8",
                          "--max-concurrent-requests", "64", "--log-level", "warning"],
                         port, tmp_path_factory.mktemp("logs") / "load.log")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: list = [None] * 32

    def one(i):
        body = {"model": MODEL, "messages": [user(RED if i % 2 else BLUE, f"Describe picture {i}.")],
                "max_tokens": 32, "temperature": 0.8, "seed": i, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first_content = None
        with httpx.stream("POST", url, json=body, timeout=300) as r:
            events = []
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    if first_content is None and '"content": "' in line and '"content": ""' not in line:
                        first_content = time.perf_counter() - start
        results[i] = (r.status_code, events, time.perf_counter() - start, first_content)

    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.perf_counter() - t0
    finally:
        stop_process(proc)
    tokens = 0
    for status, events, _, _ in results:
        assert status == 200 and events[-1] == "data: [DONE]"
        payloads = [json.loads(e[6:]) for e in events[:-1]]
        finish = [p["choices"][0]["finish_reason"] for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
        assert finish and finish[0] in ("stop", "length")
        tokens += payloads[-1]["usage"]["completion_tokens"]
    latencies = sorted(r[2] for r in results)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    print(f"\nload: 32 streams, wall {wall:.1f}s, latency p50 {p50:.2f}s p95 {p95:.2f}s, "
          f"first token p50 {statistics.median(r[3] for r in results if r[3] is not None):.2f}s, {tokens} tokens, {tokens / wall:.1f} tokens/s")
    assert tokens > 0
