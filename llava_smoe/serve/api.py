"""`llava-smoe serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

POST /v1/chat/completions (text and image_url parts, `stream: true` as server-sent events),
GET /v1/models, GET /health. Binds 127.0.0.1 unless told otherwise; with an API key, every
route but /health needs `Authorization: Bearer KEY`.
"""

# No `from __future__ import annotations`: FastAPI resolves endpoint annotations when they are defined.
import argparse
import hmac
import json
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

from llava_smoe.serve.config import (
    ServerLimits,
    add_engine_arguments,
    bind_warning,
    engine_config_from_args,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llava_smoe.inference import Engine


API_KEY_ENV = "LLAVA_SMOE_API_KEY"


def create_app(engine: "Engine", limits: ServerLimits, model_name: str, api_key: str | None = None) -> "FastAPI":
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from llava_smoe.inference import RequestError, SamplingParams, Turn
    from llava_smoe.serve.schema import (
        APIError,
        decode_image,
        error_body,
        image_bytes_from_url,
        message_parts,
        parse_request,
    )

    app = FastAPI(title="LLaVA-SMoE", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    active = {"requests": 0}  # touched only on the event loop thread

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", code="internal_error", type="server_error"),
                            status_code=500)

    if api_key:
        expected = api_key.encode()

        @app.middleware("http")
        async def _require_api_key(request: Request, call_next):
            if request.url.path == "/health":
                return await call_next(request)
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                message = "missing API key: send the header 'Authorization: Bearer KEY'"
            elif not hmac.compare_digest(token.strip().encode(), expected):
                message = "incorrect API key"
            else:
                return await call_next(request)
            return JSONResponse(error_body(message, code="invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active_requests": active["requests"],
                "decode_steps": engine.decode_steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llava-smoe"}]}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"request body is {declared} bytes, over the limit of {limits.max_body_bytes}",
                           code="request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def build_turns(req) -> list[Turn]:
        turns, num_images = [], 0
        for i, message in enumerate(req.messages):
            text, urls = message_parts(message)
            num_images += len(urls)
            if num_images > limits.max_images:
                raise APIError(400, f"too many images: this server accepts at most {limits.max_images} per request",
                               code="too_many_images", param=f"messages.{i}.content")
            images = [decode_image(image_bytes_from_url(url, limits, f"messages.{i}.{p}"), limits, f"messages.{i}.{p}")
                      for p, url in urls]
            turns.append(Turn(message.role, text, images))
        return turns

    def sampling_params(req) -> SamplingParams:
        params = req.sampling_params()
        if params.max_new_tokens is not None and params.max_new_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={params.max_new_tokens} is over this server's limit of {limits.max_tokens}",
                           code="max_tokens_too_large", param="max_tokens")
        return params

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if active["requests"] >= limits.max_concurrent_requests:
            raise APIError(429, f"too many concurrent requests (limit {limits.max_concurrent_requests}); retry later",
                           code="too_many_requests", type="rate_limit_error")
        active["requests"] += 1
        streaming = False
        try:
            body = await read_body(request)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
            req = parse_request(payload)
            if req.model != model_name:
                raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                               code="model_not_found", param="model")
            params = sampling_params(req)
            turns = await run_in_threadpool(build_turns, req)  # image decoding off the event loop
            try:
                handle = engine.submit(turns, params, loop=asyncio.get_running_loop())
            except RequestError as e:
                raise APIError(400, str(e), code=e.code, param="messages") from None
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                streaming = True
                return StreamingResponse(stream_events(handle, completion_id, include_usage),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            try:
                completion = await handle.aresult()
            except asyncio.CancelledError:
                handle.cancel()
                raise
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "finish_reason": completion.finish_reason, "logprobs": None}],
                "usage": usage(completion),
            }
        finally:
            if not streaming:
                active["requests"] -= 1

    async def stream_events(handle, completion_id: str, include_usage: bool):
        created_at = int(time.time())

        def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created_at, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for delta in handle:
                    yield chunk({"content": delta})
            except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
                yield f"data: {json.dumps(error_body(str(e), code='generation_failed', type='server_error'))}\n\n"
            else:
                completion = await handle.aresult()
                yield chunk({}, completion.finish_reason)
                if include_usage:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created_at,
                            "model": model_name, "choices": [], "usage": usage(completion)}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                handle.cancel()  # the client went away: stop generating for it
            active["requests"] -= 1

    def usage(completion) -> dict[str, int]:
        return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens}

    return app


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    defaults = ServerLimits()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="model id clients send (default: the checkpoint folder name)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}, "
                             "which keeps the key out of the process list)")
    limits = parser.add_argument_group("request limits (over a limit: a 4xx error, never truncation)")
    limits.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    limits.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes)
    limits.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    limits.add_argument("--max-images", type=int, default=defaults.max_images, help="images per request")
    limits.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens,
                        help="largest max_tokens a request may ask for")
    limits.add_argument("--max-concurrent-requests", type=int, default=defaults.max_concurrent_requests,
                        help="requests in flight before new ones get 429")
    limits.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs from public addresses (off by default)")
    limits.add_argument("--allow-private-image-host", action="append", default=[], metavar="HOST",
                        help="with --allow-remote-images, also fetch from HOST when it resolves to a loopback, "
                             "private or link-local address (repeatable)")
    limits.add_argument("--allow-file-urls", action="append", default=[], metavar="DIR",
                        help="accept file:// image URLs under DIR (repeatable; off by default)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_tokens=args.max_tokens_limit,
        max_concurrent_requests=args.max_concurrent_requests,
        allow_remote_images=args.allow_remote_images,
        allowed_image_hosts=args.allow_private_image_host,
        file_url_roots=args.allow_file_urls,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from llava_smoe.inference import Engine

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        limits = limits_from_args(args)
        engine = Engine(engine_config_from_args(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = bind_warning(args.host, api_key is not None, "the API", f"set --api-key or ${API_KEY_ENV}")
    if warning:
        print(warning, file=sys.stderr)
    app = create_app(engine, limits, args.model_name or engine.model_name, api_key=api_key)
    print(f"serving {engine.model_name} on http://{args.host}:{args.port}/v1 ({engine.device}, {engine.dtype})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    engine.close()
    return 0
