"""`smoltrain serve`: an OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine, and
the chat page at `/`.

Every failure a client can cause is an OpenAI-style JSON error ({"error": {"message", "type", "param",
"code"}}) with a 4xx status, checked before anything reaches the engine; the API key is compared in
constant time; bodies over the size limit are refused while they arrive, not after.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from smoltrain.post.chat.template import TEMPLATE_KWARGS, encode_prompt, end_of_turn_id
from smoltrain.serve.engine import Engine, QueueFull
from smoltrain.serve.schemas import ChatRequest, CompletionRequest
from smoltrain.serve.streams import Job

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 2**21  # 2 MiB: ~500k characters of messages, beyond any small model's context
# The page runs only its own inline script and talks only to this server (nothing from outside the machine).
PAGE_POLICY = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"


class ApiError(Exception):
    """A request the server refuses: status, message, and OpenAI's error type / param / code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by its Content-Length, or (chunked, no length)
    counted as it arrives: such a body is read here first, at most `limit` bytes, then handed on."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body must be at most {self.limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await error_response(400, "bad Content-Length")(scope, receive, send)
            if int(declared) > self.limit:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------- the app


class Server:
    """What the routes share: the model's name and context, the tokenizer, the engine, the limits."""

    def __init__(self, model, tokenizer, name: str, max_tokens: int, engine: Engine, api_key: str | None):
        base = getattr(model, "_orig_mod", model)
        self.tokenizer, self.name, self.engine = tokenizer, name, engine
        self.context = base.config.max_seq_len
        self.device = base.embed_tokens.weight.device  # where a seeded request's generator draws
        self.max_tokens = max_tokens
        self.api_key = api_key
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key is not None else b""
        self.eot = end_of_turn_id(tokenizer)
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # digests of equal length compared in constant time: the time taken tells neither how much of a
        # guessed key was right nor the key's length
        given_digest = hashlib.sha256(given.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_digest, self.key_digest):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def token_budget(self, prompt: list[int], asked: int | None) -> int:
        """max_tokens of a request: as asked, else what the context leaves (at most the server's cap)."""
        room = self.context - len(prompt)
        if room <= 0:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is {self.context} tokens",
                           param="messages", code="context_length_exceeded")
        if asked is not None and asked > self.max_tokens:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {self.max_tokens}", param="max_tokens")
        if asked is not None and asked > room:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({asked}) exceeds this model's "
                           f"context ({self.context} tokens)", param="max_tokens", code="context_length_exceeded")
        return asked if asked is not None else min(room, self.max_tokens)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def submit(self, body, prompt: list[int], stop_tokens: frozenset[int]) -> Job:
        """Queue the request's n choices in the engine (503 when the queue is full)."""
        budget = self.token_budget(prompt, body.token_limit())
        job = Job(asyncio.get_running_loop(), self.tokenizer, body.stops(), body.n)
        for index in range(body.n):
            # choice i draws from seed + i: choice 0 with a seed samples what `generate --seed` samples
            generator = None if body.seed is None else torch.Generator(self.device).manual_seed(body.seed + index)
            job.add(index, prompt=prompt, max_tokens=budget, temperature=body.temperature,
                    top_p=None if body.top_p >= 1.0 else body.top_p, stop_tokens=stop_tokens, generator=generator)
        try:
            self.engine.submit(job.sequences)
        except QueueFull as full:
            raise ApiError(503, f"the server is busy ({full}); retry later", kind="server_error",
                           code="queue_full") from None
        return job


def build_app(model, tokenizer, name: str = "smoltrain", max_tokens: int = 1024, api_key: str | None = None,
              max_batch: int = 16, max_queue: int = 64, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `model` (eval mode) through `tokenizer`'s chat template; the engine
    thread runs while the app does (its lifespan)."""
    server = Server(model, tokenizer, name, max_tokens, Engine(model, max_batch, max_queue), api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="smoltrain", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    _add_error_handlers(app)
    _add_routes(app, server)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return error_response(error.status, error.message, error.kind, error.param, error.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        return error_response(400, f"{where}: {first['msg']}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), code=str(error.status_code))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return error_response(500, "internal server error", kind="server_error")


def _add_routes(app: FastAPI, server: Server) -> None:
    page = resources.files("smoltrain.serve").joinpath("page.html").read_text(encoding="utf-8")
    authorized = [Depends(server.check_key)]

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(server.engine.running), "waiting": server.engine.waiting}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "smoltrain", "max_model_len": server.context}]}

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatRequest):
        server.check_model(body.model)
        unknown = sorted(set(body.chat_template_kwargs) - set(TEMPLATE_KWARGS))
        if unknown:
            raise ApiError(400, f"chat_template_kwargs: unknown {', '.join(unknown)} (known: {', '.join(TEMPLATE_KWARGS)})",
                           param="chat_template_kwargs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = encode_prompt(server.tokenizer, messages, **body.chat_template_kwargs)
        except Exception as e:  # the template refused the conversation (jinja raise_exception, bad kwargs)
            raise ApiError(400, f"messages: the chat template refused them ({e})", param="messages") from None
        job = server.submit(body, prompt, frozenset([server.eot]))
        return await _respond(job, body, len(prompt), "chat.completion", server.name)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest):
        server.check_model(body.model)
        prompt = list(server.tokenizer(body.prompt, add_special_tokens=False)["input_ids"])
        if not prompt:
            raise ApiError(400, "prompt: no tokens", param="prompt")
        eos = server.tokenizer.eos_token_id
        job = server.submit(body, prompt, frozenset([server.eot] + ([eos] if eos is not None else [])))
        return await _respond(job, body, len(prompt), "text_completion", server.name)


# ----------------------------------------------------------------------------- responses


async def _respond(job: Job, body, prompt_tokens: int, kind: str, name: str):
    """The whole answer as one JSON object, or (stream) server-sent events in OpenAI's chunk format."""
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": name}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_chunks(job, head, kind, prompt_tokens, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, reasons, tokens = [""] * len(job.streams), [None] * len(job.streams), 0
    try:
        async for event in job.events():
            texts[event.index] += event.text
            if event.reason is not None:
                reasons[event.index], tokens = event.reason, tokens + event.tokens
    finally:
        job.cancel()  # a client that left mid-answer frees its rows at the next step
    if "error" in reasons:
        raise ApiError(500, "generation failed", kind="server_error")
    if kind == "chat.completion":
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
    return {**head, "object": kind, "choices": choices, "usage": _usage(prompt_tokens * len(texts), tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _chunks(job: Job, head: dict, kind: str, prompt_tokens: int, usage: bool):
    chat = kind == "chat.completion"
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        return f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': [choice]})}\n\n"

    tokens = 0
    try:
        if chat:
            for index in range(len(job.streams)):
                yield chunk(index, None, None, role=True)
        async for event in job.events():
            if event.reason == "error":
                error = {"message": "generation failed", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            if event.text:
                yield chunk(event.index, event.text, None)
            if event.reason is not None:
                tokens += event.tokens
                yield chunk(event.index, None, event.reason)
        if usage:
            totals = _usage(prompt_tokens * len(job.streams), tokens)
            yield f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': [], 'usage': totals})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


# ----------------------------------------------------------------------------- entry


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", tokenizer: str | None = None, template: str | None = None, name: str | None = None,
          max_tokens: int = 1024, max_batch: int = 16, max_queue: int = 64) -> None:
    """Load a model and serve it until interrupted."""
    import uvicorn

    from smoltrain.post.chat.repl import load_chat_model

    model, chat_tokenizer = load_chat_model(model_path, device, tokenizer, template)
    name = name or Path(model_path).resolve().name
    app = build_app(model, chat_tokenizer, name=name, max_tokens=max_tokens, api_key=api_key, max_batch=max_batch,
                    max_queue=max_queue)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve: listening on %s without --api-key: anyone who can reach this port can use the model", host)
    log.info("serve: %s on http://%s:%d (chat page at /, API at /v1)", name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["ApiError", "MAX_BODY_BYTES", "build_app", "serve"]
