"""The OpenAI-compatible server: real HTTP round trips, batched concurrent requests with different specs."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from omegaconf import OmegaConf

from steerlm.steering import SteeringSpec


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from steerlm.stages.serve import build_server
    from test_generate import train_tiny_sft

    sft = train_tiny_sft(tiny_model_dir, tmp_path_factory)
    cfg = OmegaConf.create({"policy": str(sft), "vectors": None, "layer": 1, "model_id": "tiny", "host": "127.0.0.1",
                            "port": 0, "max_batch": 8, "batch_wait_ms": 300, "max_tokens": 8, "temperature": 0.0,
                            "device": "cpu", "precision": "fp32"})
    srv, batcher = build_server(cfg)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", batcher
    srv.shutdown()
    srv.server_close()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_one_chat_completion(server):
    url, _ = server
    with urllib.request.urlopen(url + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
    code, out = post(url, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                           "attributes": {"verbosity": 0}})
    assert code == 200 and out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["attributes"]["verbosity"] == 0 and out["usage"]["completion_tokens"] <= 8
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_with_different_specs_are_batched_and_equal_direct_generation(server, tiny_model_dir,
                                                                                        tmp_path_factory):
    from steerlm.stages.generate import SteerableModel
    from test_generate import train_tiny_sft

    url, batcher = server
    policy = SteerableModel.load(str(train_tiny_sft(tiny_model_dir, tmp_path_factory)), device="cpu")
    H = policy.model.config.hidden_size
    v = torch.randn(H, generator=torch.Generator().manual_seed(0))
    steering = [None, {"layers": {"1": [{"type": "add", "vector": v.tolist(), "scale": 40.0}]}},
                {"layers": {"0": [{"type": "ablation", "vector": v.tolist(), "scale": 0.0}]}}, None]
    prompts = ["What is DNS?", "Write a poem.", "Why?", "Name a color."]
    bodies = [{"messages": [{"role": "user", "content": p}], "steering": s, "attributes": {"verbosity": k % 5}}
              for k, (p, s) in enumerate(zip(prompts, steering))]
    before = dict(batcher.stats)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: post(url, b), bodies))
    assert all(code == 200 for code, _ in results)
    assert batcher.stats["batches"] - before["batches"] < 4  # at least two requests shared one generate call
    for (code, out), p, s, k in zip(results, prompts, steering, range(4)):
        spec = None if s is None else SteeringSpec.from_dict(
            {"layers": {lay: [{**op, "vector": "v"} for op in ops] for lay, ops in s["layers"].items()}}, {"v": v})
        want = policy.generate([p], [{"verbosity": k % 5}], max_new_tokens=8, steering=[spec])[0]
        assert out["choices"][0]["message"]["content"] == want["text"], k


@pytest.mark.parametrize("body, words", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "attributes": {"verbosity": 9}}, "verbosity"),
    ({"messages": [{"role": "user", "content": "hi"}], "steering": {"attribute": "verbosity"}}, "no attribute vectors"),
    ({"messages": [{"role": "user", "content": "hi"}], "steering": {"layers": {"0": [{"type": "add", "vector": [1.0, 2.0]}]}}},
     "hidden size"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body, words):
    url, _ = server
    code, out = post(url, body)
    assert code == 400 and words in out["error"]["message"]
    assert post(url, {"messages": [{"role": "user", "content": "hi"}]})[0] == 200
