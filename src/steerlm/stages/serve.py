"""Serve a stage-3 model over an OpenAI-compatible API (FastAPI + uvicorn), 127.0.0.1 unless told otherwise.

    setup:  load the policy (and attribute vectors for `steering` requests by name), start the engine thread
    serve:  uvicorn runs `steerlm.server.app`; every request's choices join the engine's live batch
"""

from __future__ import annotations

import os
import socket
import threading
import time

from omegaconf import DictConfig

from ..errors import ConfigError
from ..logging import print0
from ..server.app import Limits, create_app
from ..server.engine import Engine
from ..steerable import SteerableModel


def build(cfg: DictConfig):
    """cfg -> (FastAPI app, Engine)."""
    from ..engines.torch_engine import decoder_layers
    from ..steering.vectors import AttributeVectors

    policy = SteerableModel.load(str(cfg.policy), cfg.device, cfg.precision)
    vectors = AttributeVectors.load(cfg.vectors) if cfg.vectors else None
    default_layer = len(decoder_layers(policy.model)) // 2 if cfg.layer is None else int(cfg.layer)
    lim = cfg.limits
    limits = Limits(max_tokens=int(cfg.max_tokens), max_tokens_limit=int(lim.max_tokens),
                    max_prompt_tokens=int(lim.prompt_tokens), max_n=int(lim.n), max_concurrent=int(lim.concurrent),
                    max_body_bytes=int(lim.body_bytes), temperature=float(cfg.temperature),
                    api_key=cfg.api_key or os.environ.get("STEERLM_API_KEY") or None)
    if limits.max_tokens > limits.max_tokens_limit:
        raise ConfigError(f"max_tokens={limits.max_tokens} is over limits.max_tokens={limits.max_tokens_limit}")
    engine = Engine(policy, max_rows=int(cfg.max_rows), max_prompt_tokens=limits.max_prompt_tokens,
                    max_tokens_limit=limits.max_tokens_limit)
    app = create_app(policy, engine, model_id=str(cfg.model_id or cfg.policy), vectors=vectors,
                     default_layer=default_layer, limits=limits)
    return app, engine


def start_background(cfg: DictConfig):
    """Serve on a thread (tests, notebooks): -> (base url, engine, stop()). Port 0 picks a free port."""
    import uvicorn

    sock = bind(str(cfg.host), int(cfg.port))
    app, engine = build(cfg)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited while starting")
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
        sock.close()

    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}", engine, stop


def bind(host: str, port: int) -> socket.socket:
    """The listening socket; a port in use is a one-line ConfigError (checked before the model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"port={port}: cannot listen on {host}:{port} ({e.strerror}); stop the other server "
                          f"or pick another port") from None
    return sock


def run(cfg: DictConfig) -> None:
    import uvicorn

    sock = bind(str(cfg.host), int(cfg.port))
    try:
        app, engine = build(cfg)
        if str(cfg.host) not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("STEERLM_API_KEY")):
            print0(f"warning: serving on {cfg.host} without an API key (set api_key=... or STEERLM_API_KEY)")
        print0(f"serving {cfg.policy} as {cfg.model_id or cfg.policy} on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)")
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
        finally:
            engine.close()
    finally:
        sock.close()
