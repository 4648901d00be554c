"""An OpenAI-compatible chat-completions server for a steerable model: `POST /v1/chat/completions`,
`GET /v1/models`, bound to 127.0.0.1 unless told otherwise.

Per request, on top of the OpenAI fields (`messages`, `max_tokens`, `temperature`, `top_p`, `seed`):

- `attributes`: {"verbosity": 1, ...}: the AC-SFT attribute values (unset ones: the model's defaults);
- `steering`:   {"attribute": "verbosity", "coefficient": 2, "layer": 15, "positions": "all"} with the
  server's attribute vectors, or a full spec {"positions": ..., "layers": {"15": [{"type": "add",
  "vector": [floats], "scale": 4}]}} with inline vectors.

Concurrent requests are batched: a worker thread takes what arrived within `batch_wait_ms` (up to
`max_batch`), groups it by sampling options, and runs one `generate` per group with one steering spec
per row. Bad requests get HTTP 400 with an OpenAI-style error body; nothing else is affected.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import torch
from omegaconf import DictConfig

from ..errors import ConfigError, DataError
from ..logging import print0
from ..steering.ops import SteeringSpec
from .generate import SteerableModel


class BadRequest(ValueError):
    pass


def parse_steering(obj, vectors, default_layer: int) -> Optional[SteeringSpec]:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise BadRequest("steering must be an object")
    try:
        if "attribute" in obj:
            if vectors is None:
                raise BadRequest("this server has no attribute vectors (start it with vectors=...)")
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
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise BadRequest(f"steering: {e}") from None


class Batcher:
    """Collects requests from handler threads; one worker thread runs them through the model in batches."""

    def __init__(self, policy: SteerableModel, max_batch: int, wait_s: float):
        self.policy, self.max_batch, self.wait_s = policy, max_batch, wait_s
        self.queue: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self.worker = threading.Thread(target=self._loop, daemon=True)
        self.worker.start()

    def submit(self, job: dict) -> Future:
        fut: Future = Future()
        self.queue.put((job, fut))
        return fut

    def _loop(self):
        while True:
            items = [self.queue.get()]
            deadline = time.time() + self.wait_s
            while len(items) < self.max_batch and (left := deadline - time.time()) > 0:
                try:
                    items.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            groups: dict[str, list] = {}
            for job, fut in items:
                groups.setdefault(json.dumps(job["options"], sort_keys=True), []).append((job, fut))
            for group in groups.values():
                self._run(group)

    def _run(self, group):
        jobs = [j for j, _ in group]
        try:
            outs = self.policy.generate([j["prompt"] for j in jobs], [j["attributes"] for j in jobs],
                                        steering=[j["steering"] for j in jobs], progress=False, **jobs[0]["options"])
        except Exception as e:  # noqa: BLE001 - handed to each waiting request, the server keeps running
            for _, fut in group:
                fut.set_exception(e)
            return
        self.stats["requests"] += len(group)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        for (_, fut), out in zip(group, outs):
            fut.set_result(out)


def parse_request(body: dict, policy: SteerableModel, vectors, default_layer: int, defaults: dict) -> dict:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list")
    system = None
    if msgs[0].get("role") == "system":
        system, msgs = msgs[0].get("content"), msgs[1:]
    turns = [{"role": m.get("role"), "content": m.get("content")} for m in msgs]
    if not turns or turns[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user")
    sampling = float(body.get("temperature", defaults["temperature"])) > 0
    options = {"max_new_tokens": int(body.get("max_tokens", defaults["max_tokens"])), "do_sample": sampling,
               "temperature": float(body.get("temperature", defaults["temperature"])) if sampling else 1.0,
               "top_p": float(body.get("top_p", 1.0)) if sampling else 1.0, "seed": int(body.get("seed", 0)),
               "batch_size": 64}
    attributes = body.get("attributes")
    try:
        policy.resolve_attributes(attributes)  # checked now: a bad value is this request's 400, not the batch's
    except ConfigError as e:
        raise BadRequest(str(e)) from None
    return {"prompt": {"system": system, "turns": turns}, "attributes": attributes, "options": options,
            "steering": parse_steering(body.get("steering"), vectors, default_layer)}


def make_handler(policy: SteerableModel, batcher: Batcher, vectors, model_id: str, default_layer: int, defaults: dict):
    from ..engines.torch_engine import decoder_layers

    n_layers = len(decoder_layers(policy.model))  # once, not per request
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # one line per request is noise at batch rates
            pass

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "steerlm"}]})
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                job = parse_request(body, policy, vectors, default_layer, defaults)
                if job["steering"] is not None:
                    job["steering"].check(n_layers, policy.model.config.hidden_size)
            except (BadRequest, ConfigError, DataError, json.JSONDecodeError, ValueError, TypeError) as e:
                return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            try:
                out = batcher.submit(job).result()
            except Exception as e:  # noqa: BLE001
                return self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
            prompt_tokens = len(policy.prompt_ids(job["prompt"], job["attributes"]))
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": "stop" if out["stopped"] else "length"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": out["tokens"],
                          "total_tokens": prompt_tokens + out["tokens"]},
                "attributes": out["attributes"]})
    return Handler


def build_server(cfg: DictConfig) -> tuple[ThreadingHTTPServer, Batcher]:
    from ..engines.torch_engine import decoder_layers
    from ..steering.vectors import AttributeVectors

    policy = SteerableModel.load(str(cfg.policy), cfg.device, cfg.precision)
    vectors = AttributeVectors.load(cfg.vectors) if cfg.vectors else None
    default_layer = len(decoder_layers(policy.model)) // 2 if cfg.layer is None else int(cfg.layer)
    batcher = Batcher(policy, int(cfg.max_batch), float(cfg.batch_wait_ms) / 1000)
    defaults = {"max_tokens": int(cfg.max_tokens), "temperature": float(cfg.temperature)}
    handler = make_handler(policy, batcher, vectors, str(cfg.model_id or cfg.policy), default_layer, defaults)
    return ThreadingHTTPServer((str(cfg.host), int(cfg.port)), handler), batcher


def run(cfg: DictConfig) -> None:
    server, _ = build_server(cfg)
    host, port = server.server_address[:2]
    print0(f"serving {cfg.policy} on http://{host}:{port}/v1/chat/completions (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
