"""The OpenAI-compatible HTTP API on FastAPI: `POST /v1/chat/completions` (streaming or not), `GET
/v1/models`, `GET /health`. Generation runs in `Engine` (continuous batching across requests).

Every bad request gets its own 4xx with one message in OpenAI's error shape and touches nothing else:
it is refused before any of it reaches the engine. Limits (`Limits`): max_tokens, prompt tokens, n,
body size (413), requests in flight (429), and an optional API key (401).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import ConfigError
from ..steerable import PromptError
from ..steering.levels import merge as merge_specs
from ..steering.ops import SteeringSpec
from ..templates import END_OF_TURN
from .engine import Engine
from .protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                       ChunkChoice, Delta, ModelCard, ModelList, Usage, error_body)

log = logging.getLogger("steerlm.server")


@dataclass
class Limits:
    max_tokens: int = 256  # default for requests without max_tokens
    max_tokens_limit: int = 1024  # a larger max_tokens is a 400
    max_prompt_tokens: int = 2048
    max_n: int = 8
    max_concurrent: int = 64  # requests in flight; one more is a 429
    max_body_bytes: int = 1 << 20
    temperature: float = 0.0  # default for requests without temperature
    api_key: Optional[str] = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def parse_steering(obj, vectors, default_layer: int) -> Optional[SteeringSpec]:
    """A request's `steering` -> spec: by attribute name (the server's vectors) or inline vectors."""
    if obj is None:
        return None
    try:
        if "attribute" in obj:
            if vectors is None:
                raise ApiError(400, "steering: this server has no attribute vectors (start it with vectors=...)", "steering")
            return vectors.spec(obj["attribute"], int(obj.get("layer", default_layer)), float(obj.get("coefficient", 1.0)),
                                obj.get("positions", "all"))
        inline, desc = {}, {"positions": obj.get("positions", "all"), "layers": {}}
        for layer, ops in (obj.get("layers") or {}).items():
            desc["layers"][layer] = []
            for k, op in enumerate(ops):
                key = f"{layer}.{k}"
                inline[key] = torch.tensor(op["vector"], dtype=torch.float32)
                desc["layers"][layer].append({**op, "vector": key})
        return SteeringSpec.from_dict(desc, inline, "steering")
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ApiError(400, f"steering: {e}", "steering") from None


@dataclass
class Job:
    """A validated request, ready for the engine."""

    ids: list[int]
    attributes: dict
    max_tokens: int
    temperature: float
    seed: int
    stop: list[str]
    steering: Optional[SteeringSpec]


class Gate:
    """ASGI middleware in front of every route: with an API key set, a request without `Authorization: Bearer
    <key>` is a 401 (`/health` is open); a body over `max_bytes` (declared or streamed) is a 413. The body is
    read here, within the limit, and replayed to the app, so nothing downstream ever sees an oversized one."""

    def __init__(self, app, max_bytes: int, api_key: Optional[str]):
        self.app, self.max_bytes = app, max_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # ASGI: lower-case byte names
        if self.expected is not None and scope["path"] != "/health" and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await JSONResponse(error_body("missing or wrong API key (Authorization: Bearer <key>)",
                                                 "authentication_error"), 401)(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: let the app see that
                replay = [message]
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, scope, receive, send):
        await JSONResponse(error_body(f"request body over {self.max_bytes} bytes"), 413)(scope, receive, send)


class TextStream:
    """Incremental detokenization for streaming (vLLM's prefix / read offsets): a token decodes the few tokens
    since the last emitted text, not the whole answer. End-of-turn ids are not text; pad ids are held until a
    real token follows them (`finish_text` drops trailing pads)."""

    def __init__(self, tokenizer, eos_ids, pad_id: Optional[int]):
        self.tokenizer, self.eos, self.pad = tokenizer, set(eos_ids), pad_id
        self.ids: list[int] = []
        self.text, self.prefix, self.read, self.pads = "", 0, 0, 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> None:
        if token in self.eos:
            return
        if token == self.pad:
            self.pads += 1
            return
        self.ids += [self.pad] * self.pads + [token]
        self.pads = 0
        before, full = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        if len(full) > len(before) and not full.endswith("\ufffd"):  # a whole character more
            self.text += full[len(before):]
            self.prefix, self.read = self.read, len(self.ids)


def create_app(policy, engine: Engine, *, model_id: str, vectors=None, default_layer: int = 0,
               limits: Limits = Limits()) -> FastAPI:
    from ..engines.torch_engine import decoder_layers

    app = FastAPI(title="steerlm", summary="OpenAI-compatible chat completions with attribute steering")
    n_layers, hidden = len(decoder_layers(policy.model)), int(policy.model.config.hidden_size)
    created = int(time.time())
    in_flight = {"n": 0}
    holdback = max((len(s) for s in policy.stop_strings), default=0) + len(END_OF_TURN)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', '')})"), 400)
        return JSONResponse(error_body(f"{where or 'body'}: {err.get('msg')}", param=where or None), 400)

    @app.exception_handler(Exception)
    async def _bug(_request, exc: Exception):  # a bug here, not the client's: one line, logged with its traceback
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), 500)

    @app.get("/health")
    async def health():
        load = engine.load
        body = {"status": "ok" if load["engine_alive"] else "engine stopped", "in_flight": in_flight["n"], **load,
                **engine.stats}
        return JSONResponse(body, 200 if load["engine_alive"] else 503)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    def prepare(body: ChatCompletionRequest) -> Job:
        if body.model != model_id:
            raise ApiError(404, f"model {body.model!r} is not served here; this server has {model_id!r}", "model",
                           "not_found_error")
        if (why := body.unsupported()) is not None:
            raise ApiError(400, why)
        system, turns = None, []
        for k, m in enumerate(body.messages):
            if m.role in ("system", "developer"):
                if k:
                    raise ApiError(400, f"messages[{k}]: a system message is allowed only first", "messages")
                system = m.text()
            else:
                turns.append({"role": m.role, "content": m.text()})
        try:
            attributes = policy.resolve_attributes(body.attributes)
            ids = policy.prompt_ids({"system": system, "turns": turns}, attributes)
        except ConfigError as e:
            raise ApiError(400, f"attributes: {e}", "attributes") from None
        except PromptError as e:
            raise ApiError(400, f"messages: {e.message}", "messages") from None
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server takes up to {limits.max_prompt_tokens}",
                           "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.max_tokens
        if max_tokens > limits.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens_limit}",
                           "max_tokens")
        if body.n > limits.max_n:
            raise ApiError(400, f"n {body.n} is over this server's limit of {limits.max_n}", "n")
        steering = parse_steering(body.steering, vectors, default_layer)
        if getattr(policy, "level_steering", None) is not None:  # the checkpoint's vectors follow the request's explicit levels
            try:
                steering = merge_specs(steering, policy.level_steering.spec(body.attributes))
            except ConfigError as e:
                raise ApiError(400, f"steering: {e}", "steering") from None
        if steering is not None:
            try:
                steering.check(n_layers, hidden)
            except ConfigError as e:
                raise ApiError(400, f"steering: {e}", "steering") from None
        temperature = limits.temperature if body.temperature is None else body.temperature
        seed = secrets.randbits(31) if body.seed is None else body.seed
        return Job(ids, attributes, max_tokens, temperature, seed, list(body.stop or []), steering)

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        job = prepare(body)
        if in_flight["n"] >= limits.max_concurrent:
            raise ApiError(429, f"too many concurrent requests (this server takes {limits.max_concurrent})",
                           type_="rate_limit_error")
        in_flight["n"] += 1
        rows: list = []
        released = False

        def release():  # once per request, whichever path ends it
            nonlocal released
            if not released:
                released = True
                for r in rows:
                    r.cancelled = True  # no-op for finished rows; the engine drops live ones at its next step
                in_flight["n"] -= 1

        try:
            events: asyncio.Queue = asyncio.Queue()
            rows += engine.start(job.ids, body.n, max_tokens=job.max_tokens, temperature=job.temperature,
                                 top_p=body.top_p, seed=job.seed, stop=job.stop, steering=job.steering, events=events,
                                 aloop=asyncio.get_running_loop(), stream=body.stream)
        except BaseException:
            release()
            raise
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_id}

        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(job, rows, events, head, usage, release), media_type="text/event-stream")
        try:
            return await complete(job, rows, events, head, request)
        finally:
            release()

    async def complete(job: Job, rows, events: asyncio.Queue, head: dict, request: Request):
        left = len(rows)
        while left:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(error_body("client disconnected"), 499)  # nobody reads it; rows are cancelled
                continue
            if ev.finish_reason == "error":
                raise ApiError(500, "generation failed (see the server log)", type_="server_error")
            left -= ev.finish_reason is not None
        cuts = [policy.finish_text(r.out, job.stop) for r in rows]
        completion = sum(c["tokens"] for c in cuts)
        return ChatCompletion(**head, attributes=job.attributes,
                              choices=[Choice(index=k, message=AssistantMessage(content=c["text"]),
                                              finish_reason="stop" if c["stopped"] else "length")
                                       for k, c in enumerate(cuts)],
                              usage=Usage(prompt_tokens=len(job.ids), completion_tokens=completion,
                                          total_tokens=len(job.ids) + completion))

    def visible(text: str, stop: list[str]) -> str:
        """Text that is safe to send before the row ends: nothing that could still turn out to be part of a
        stop string (or the template's end of turn)."""
        hits = [p for p in (text.find(s) for s in [*policy.stop_strings, *stop]) if p >= 0]
        text = text[:min(hits)] if hits else text
        return text[:max(0, len(text) - max(holdback, max(map(len, stop), default=0)))]

    async def stream(job: Job, rows, events: asyncio.Queue, head: dict, usage: bool, release):
        def sse(choices, **extra) -> str:
            chunk = ChatCompletionChunk(**head, choices=choices, **extra)
            return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

        try:
            yield "".join(sse([ChunkChoice(index=k, delta=Delta(role="assistant", content=""))]) for k in range(len(rows)))
            sent, left, completion = [""] * len(rows), len(rows), 0
            texts = [TextStream(policy.tokenizer, policy.eos_ids, policy.tokenizer.pad_token_id) for _ in rows]
            while left:
                ev = await events.get()
                k = ev.index
                if ev.finish_reason == "error":
                    yield f"data: {json.dumps(error_body('generation failed (see the server log)', 'server_error'))}\n\n"
                    return
                if ev.token is not None:
                    texts[k].add(ev.token)
                    text = visible(texts[k].text, job.stop)
                    if len(text) > len(sent[k]):
                        yield sse([ChunkChoice(index=k, delta=Delta(content=text[len(sent[k]):]))])
                        sent[k] = text
                    continue
                left -= 1
                cut = policy.finish_text(rows[k].out, job.stop)
                completion += cut["tokens"]
                if not cut["text"].startswith(sent[k]):  # a bug: the streamed text must be a prefix of the answer
                    log.error("stream %s choice %d: sent %r is not a prefix of %r", head["id"], k, sent[k], cut["text"])
                rest = cut["text"][len(sent[k]):] if cut["text"].startswith(sent[k]) else ""
                yield sse([ChunkChoice(index=k, delta=Delta(content=rest or None),
                                       finish_reason="stop" if cut["stopped"] else "length")])
            if usage:
                yield sse([], usage=Usage(prompt_tokens=len(job.ids), completion_tokens=completion,
                                          total_tokens=len(job.ids) + completion))
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream: Starlette cancels this generator
            release()

    app.add_middleware(Gate, max_bytes=limits.max_body_bytes, api_key=limits.api_key)
    return app
