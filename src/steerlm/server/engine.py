"""The server's generation engine: one thread runs `steerlm.generation.DecodeLoop` for every request.

Requests from the asyncio handlers join the live batch at the next decoding step (continuous batching:
no waiting for a batch to finish, no fixed batch window); each choice of a request is one row. A row
that finishes leaves at once and frees its KV-cache slot for the next request in line (FIFO), so one
request asking for many tokens holds one slot and never stalls the others. A handler whose client went
away cancels its rows; they leave at the next step.

Thread hand-off: the engine thread reports tokens and completions through `loop.call_soon_threadsafe`
onto each request's asyncio queue, so handlers never block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..generation import DecodeLoop, Request, Sampler, StopStrings
from ..logging import print0


@dataclass
class Event:
    """What a handler's queue receives: a token of choice `index`, its end (`finish_reason`), or an error."""

    index: int
    token: Optional[int] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None


class Engine:
    """Owns the model's decoding. `start(...)` enqueues one request's choices and returns their rows."""

    def __init__(self, policy, *, max_rows: int, max_prompt_tokens: int, max_tokens_limit: int,
                 log_every_s: float = 30.0):
        self.policy = policy
        self.columns = int(max_prompt_tokens) + int(max_tokens_limit)
        self.max_rows = int(max_rows)
        self.inbox: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "rows": 0, "completion_tokens": 0, "steps": 0, "max_live_rows": 0,
                      "busy_s": 0.0, "errors": 0,
                      "cancelled": 0}
        self.log_every_s, self._logged = float(log_every_s), (time.time(), 0)
        self._stopping = threading.Event()
        self.pending: set = set()  # rows submitted and not yet done: what a failed step must answer
        self.gate = threading.Lock()  # held around each step (`hold`)
        self.loop = self._new_loop()
        self.thread = threading.Thread(target=self._run, name="steerlm-engine", daemon=True)
        self.thread.start()

    def _new_loop(self) -> DecodeLoop:
        p = self.policy
        return DecodeLoop(p.model, eos_ids=p.eos_ids, pad_id=p.tokenizer.pad_token_id, max_rows=self.max_rows,
                          columns=self.columns)

    def start(self, prompt_ids: Sequence[int], n: int, *, max_tokens: int, temperature: float, top_p: float,
              seed: int, stop: Sequence[str], steering, events: asyncio.Queue, aloop: asyncio.AbstractEventLoop,
              stream: bool = False) -> list[Request]:
        """n rows for one request; their ends (and with `stream` every token) arrive on `events` as `Event`s."""
        sampling = temperature > 0
        sampler = Sampler(sampling, float(temperature) if sampling else 1.0, 0, float(top_p) if sampling else 1.0,
                          int(seed), int(max_tokens))
        strings = [*self.policy.hf_stop_strings, *stop]
        stops = StopStrings(self.policy.tokenizer, strings) if strings else None
        put = lambda ev: aloop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731

        def done(r: Request, k: int) -> None:
            self.pending.discard(r)
            self.stats["completion_tokens"] += len(r.out)
            self.stats["cancelled"] += r.finish_reason == "cancelled"
            put(Event(k, finish_reason=r.finish_reason))

        rows = [Request(list(prompt_ids), int(max_tokens), sampler, key=k, stop=stops, steering=steering,
                        on_token=(lambda t, k=k: put(Event(k, token=t))) if stream else None, on_done=lambda r, k=k: done(r, k))
                for k in range(n)]
        self.inbox.put(rows)
        return rows

    @property
    def load(self) -> dict:
        return {"live_rows": len(self.loop.rows), "waiting_rows": len(self.loop.waiting) + self.inbox.qsize(),
                "engine_alive": self.thread.is_alive()}

    @contextlib.contextmanager
    def hold(self):
        """Pause decoding while inside (requests keep queueing; the next step takes them all together)."""
        with self.gate:
            yield

    def close(self) -> None:
        self._stopping.set()
        self.inbox.put([])
        self.thread.join(timeout=30)
        if not self.thread.is_alive():  # else a step is still running on the loop: leave it to the process exit
            self.loop.close()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            try:
                self._once()
            except Exception as e:  # noqa: BLE001 - every pending request gets the error, the engine serves on
                self._fail_all(f"{type(e).__name__}: {e}")

    def _once(self) -> None:
        try:  # block while idle; otherwise take what arrived since the last step
            batches = [self.inbox.get(timeout=None if self.loop.idle else 0)]
        except queue.Empty:
            batches = []
        while not self.inbox.empty():
            batches.append(self.inbox.get_nowait())
        batches = [rows for rows in batches if rows]
        self.stats["requests"] += len(batches)
        self.stats["rows"] += sum(map(len, batches))
        with self.gate:
            for rows in batches:
                for r in rows:
                    self.pending.add(r)
                    self.loop.submit(r)
            if self.loop.idle:
                return
            t0 = time.time()
            self.loop.step()
            self.stats["steps"] += 1
            self.stats["busy_s"] += time.time() - t0
            self.stats["max_live_rows"] = max(self.stats["max_live_rows"], len(self.loop.rows))
        self._log()

    def _fail_all(self, message: str) -> None:
        """A step failed: end every request the engine holds (live, waiting or just taken), start a fresh loop."""
        self.stats["errors"] += 1
        rows, self.pending = list(self.pending), set()
        print0(f"engine: a step failed, ending {len(rows)} rows: {message}")
        try:
            self.loop.close()
        except Exception:  # noqa: BLE001 - a loop that failed may fail to close; it is dropped either way
            pass
        self.loop = self._new_loop()
        for r in rows:
            r.finish_reason = "error"
            r.on_done and r.on_done(r)

    def _log(self) -> None:
        t, tokens = time.time(), self.stats["completion_tokens"]
        if t - self._logged[0] >= self.log_every_s:
            rate = (tokens - self._logged[1]) / (t - self._logged[0])
            print0(f"engine: {len(self.loop.rows)} live rows, {len(self.loop.waiting)} waiting, {rate:.1f} tokens/s "
                   f"over the last {t - self._logged[0]:.0f} s, {self.stats['requests']} requests so far")
            self._logged = (t, tokens)
