"""The OpenAI-compatible server, live on 127.0.0.1: the official `openai` client (streaming and not, n > 1,
stop strings), requests with different attributes and steering batched together and equal to direct
generation, and bad requests that get their own 4xx while the server keeps serving the rest."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from omegaconf import OmegaConf

from steerlm.steering import SteeringSpec

LIMITS = {"max_tokens": 200, "prompt_tokens": 512, "n": 4, "concurrent": 8, "body_bytes": 65536}


@pytest.fixture(scope="module")
def sft(tiny_model_dir, tmp_path_factory):
    from test_generate import train_tiny_sft

    return train_tiny_sft(tiny_model_dir, tmp_path_factory)


def serve(sft_dir, **changes):
    from steerlm.stages.serve import start_background

    cfg = OmegaConf.create({"policy": str(sft_dir), "vectors": None, "layer": 1, "model_id": "tiny",
                            "host": "127.0.0.1", "port": 0, "api_key": None, "max_rows": 8, "max_tokens": 8,
                            "temperature": 0.0, "limits": LIMITS, "device": "cpu", "precision": "fp32", **changes})
    return start_background(cfg)


@pytest.fixture(scope="module")
def server(sft):
    url, engine, stop = serve(sft)
    yield url, engine
    stop()


@pytest.fixture(scope="module")
def policy(sft):
    from steerlm.steerable import SteerableModel

    return SteerableModel.load(str(sft), device="cpu")


def client(url: str, **kw):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


def post(url: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(prompt: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], **kw}


def test_openai_client_plain_streaming_n_and_stop(server, policy):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    want = policy.generate(["What is DNS?"], [{"verbosity": 1}], max_new_tokens=24)[0]
    out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is DNS?"}],
                                    max_tokens=24, extra_body={"attributes": {"verbosity": 1}})
    assert out.choices[0].message.content == want["text"]
    assert out.usage.completion_tokens == want["tokens"] and out.attributes["verbosity"] == 1
    assert out.choices[0].finish_reason == ("stop" if want["stopped"] else "length")

    # streaming: the deltas add up to the same text, then usage
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is DNS?"}],
                                            max_tokens=24, stream=True, stream_options={"include_usage": True},
                                            extra_body={"attributes": {"verbosity": 1}}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want["text"] and len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1
    assert chunks[-1].usage.completion_tokens == want["tokens"]

    # n > 1 sampled: n distinct, reproducible with a seed; streamed the same per choice
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Write a poem."}], max_tokens=16, n=3,
              temperature=1.0, seed=7)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices] and len(set(texts)) > 1
    streamed = ["", "", ""]
    for ch in c.chat.completions.create(**kw, stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts

    # a stop string cuts the answer before it, streaming or not
    full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Why?"}], max_tokens=40)
    full_text = full.choices[0].message.content
    assert len(full_text) > 4
    stop = full_text[2:4]
    cut = full_text[:full_text.find(stop)]
    out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Why?"}], max_tokens=40, stop=[stop])
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    parts = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Why?"}], max_tokens=40,
                                      stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in parts if ch.choices) == cut


def test_concurrent_requests_with_different_specs_share_steps_and_equal_direct_generation(server, policy):
    url, engine = server
    H = policy.model.config.hidden_size
    v = torch.randn(H, generator=torch.Generator().manual_seed(0))
    steering = [None, {"layers": {"1": [{"type": "add", "vector": v.tolist(), "scale": 40.0}]}},
                {"layers": {"0": [{"type": "ablation", "vector": v.tolist(), "scale": 0.0}]}}, None]
    prompts = ["What is DNS?", "Write a poem.", "Why?", "Name a color."]
    bodies = [chat(p, max_tokens=30, steering=s, attributes={"verbosity": k % 5})
              for k, (p, s) in enumerate(zip(prompts, steering))]
    engine.stats["max_live_rows"] = 0
    before = engine.stats["requests"]
    with ThreadPoolExecutor(4) as pool:
        with engine.hold():  # decoding paused until all four have arrived: they start within two steps
            futures = [pool.submit(post, url, b) for b in bodies]
            while engine.stats["requests"] + engine.inbox.qsize() - before < 4:
                time.sleep(0.01)
        results = [f.result() for f in futures]
    assert all(code == 200 for code, _ in results), results
    assert engine.stats["max_live_rows"] >= 2  # requests decoded in the same steps
    for (_, out), p, s, k in zip(results, prompts, steering, range(4)):
        spec = None if s is None else SteeringSpec.from_dict(
            {"layers": {lay: [{**op, "vector": "v"} for op in ops] for lay, ops in s["layers"].items()}}, {"v": v})
        want = policy.generate([p], [{"verbosity": k % 5}], max_new_tokens=30, steering=[spec])[0]
        assert out["choices"][0]["message"]["content"] == want["text"], k


BAD = [  # (body, status, words the one message must contain)
    (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    (chat("Hi", attributes={"sarcasm": 2}), 400, "sarcasm"),
    (chat("Hi", attributes={"verbosity": 9}), 400, "verbosity"),
    (chat("Hi", temperature=-0.5), 400, "temperature"),
    (chat("Hi", max_tokens=100000), 400, "max_tokens"),
    (chat("Hi", n=50), 400, "n 50"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "Hi"}]}, 400, "user"),
    (chat("Hi", steering={"layers": {"99": [{"type": "add", "vector": [1.0], "scale": 1}]}}), 400, "steering"),
    (chat("Hi", steering={"attribute": "verbosity"}), 400, "no attribute vectors"),
    (chat("Hi", frequency_penalty=1.0), 400, "frequency_penalty"),
    ({**chat("Hi"), "model": "gpt-4o"}, 404, "gpt-4o"),
    (chat("x" * 70000), 413, "body"),
    (chat("Hi", steering={"layers": {"1": [{"type": "add", "vector": [1.0] * 64, "scale": float("nan")}]}}), 400,
     "finite"),
]


def test_bad_requests_get_their_own_4xx_while_good_ones_are_answered(server):
    url, _ = server
    good = [chat(p, max_tokens=12) for p in ("What is DNS?", "Why?", "Name a color.")]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, url, b) for b in good]
        bad = list(pool.map(lambda case: post(url, case[0]), BAD))
    for (code, out), (_, status, words) in zip(bad, BAD):
        assert code == status, (out, words)
        message = out["error"]["message"]
        assert words in message and "\n" not in message, message
    assert all(f.result()[0] == 200 for f in futures)
    code, _ = post(url, chat("Still there?"))
    assert code == 200


def test_a_chunked_body_over_the_limit_is_a_413(server):
    import http.client

    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps(chat("y" * 70000)).encode()
    conn.request("POST", "/v1/chat/completions", body=iter([body[:40000], body[40000:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    out = json.loads(resp.read())
    assert resp.status == 413 and "65536 bytes" in out["error"]["message"]
    conn.close()


def first_line(resp) -> bytes:
    while not (line := resp.readline()).strip():
        pass
    return line


def test_disconnect_cancels_generation_and_long_requests_do_not_block_short_ones(server):
    import http.client

    url, engine = server
    host, port = url.removeprefix("http://").split(":")
    before = dict(engine.stats)
    # a streaming request for many tokens; read its first event, then hang up
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat("Tell me everything.", max_tokens=200, stream=True)),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and first_line(resp).startswith(b"data: ")
    # while it runs, short requests come and go: they are admitted next to it, not after it
    t0 = time.time()
    code, out = post(url, chat("Why?", max_tokens=4))
    assert code == 200 and out["usage"]["completion_tokens"] <= 4
    conn.close()
    deadline = time.time() + 30
    while engine.load["live_rows"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.load["live_rows"] == 0
    assert engine.stats["cancelled"] == before["cancelled"] + 1  # the long request ended when its client left
    assert engine.stats["completion_tokens"] - before["completion_tokens"] < 200 + 4
    assert time.time() - t0 < 60


def test_concurrency_limit_is_a_429_and_the_server_keeps_serving(sft):
    url, engine, stop = serve(sft, limits={**LIMITS, "concurrent": 1})
    try:
        import http.client

        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat("Tell me everything.", max_tokens=200, stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first_line(resp)
        code, out = post(url, chat("Hi"))
        assert code == 429 and "concurrent" in out["error"]["message"]
        resp.read()  # the stream runs to its end
        conn.close()
        code, _ = post(url, chat("Hi"))
        assert code == 200
    finally:
        stop()


def test_api_key(sft):
    import openai

    url, _, stop = serve(sft, api_key="s3cret")
    try:
        with urllib.request.urlopen(url + "/health") as r:
            assert json.loads(r.read())["status"] == "ok"
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        out = client(url, api_key="s3cret").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
        assert out.choices[0].message.role == "assistant"
    finally:
        stop()


def test_engine_serves_requests_from_many_threads_in_order_of_arrival(server):
    """A burst larger than max_rows: every request is answered (FIFO admission into freed slots)."""
    url, _ = server
    bodies = [chat(f"Question {k}?", max_tokens=6) for k in range(12)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: post(url, b), bodies))
    assert all(code == 200 for code, _ in results)
    assert threading.active_count() < 50
