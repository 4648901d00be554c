"""Benchmark steered GENERATION throughput: steerlm's continuous-batching loop vs HF `generate` on fixed batches.

    python scripts/bench_generate.py                   # embedded SmolLM2-135M, 5 prompts (CPU: ~9 min)
    python scripts/bench_generate.py --prompts 15 --rounds 1 --hf-batch-sizes 32 --ppo-prompts 0
                                                       # the full evaluate sweep, 225 generations (CPU: ~12 min)
    python scripts/bench_generate.py --threads 2       # on an idle machine (default 1: see below)

What is compared: one `SteerableModel` (fp32 on the CPU), the same prompts and token ids, in one process:

- continuous: `generate` as it is now (steerlm.generation: KV-cache slots refilled as rows finish, a live
  batch sized by `batch_tokens`, shared prompt prefixes prefilled once, per-row-chunk attention).
- hf_generate bs=N: `generate` with backend="hf_generate", the previous path and the way a user batches
  HF `generate`: prompts sorted by length, cut into fixed batches of N, left padded, `model.generate` per
  batch. N is swept and the speedup is taken over the fastest N: 16,32 for (a) (`--hf-batch-sizes`; 8 is
  slower on a CPU: 50 tokens/s against 73 and 85, measured) and 8,16 for (b) (`--ppo-hf-batch-sizes`; 32
  is 16 for 16 prompts, and 8 pads long prompts least).

Workloads: (a) the evaluate stage's sweep, greedy: `--prompts` HelpSteer2 prompts (first user turns, as
`steerlm.stages.evaluate.load_prompts` picks them) x 3 attributes x 5 levels given as attribute strings,
`--max-new-tokens` 128; the greedy texts must be identical across all methods (checked; exit 1 if not).
(b) PPO-style rollouts: `--ppo-prompts` 16 prompts sampled at T=1 (top_p 1, top_k 0), 64 new tokens (the
PPO stage's defaults). Sampled texts differ between the two paths (different random streams), so (b)
compares tokens/s only.

The model is the embedded SmolLM2-135M-Instruct with an SFT card written next to symlinks of its files in
a temporary directory (template hf, HelpSteer2 attributes): the card only drives the prompt rendering.

How it is measured: an untimed warm-up call per path, then `--rounds` (2) interleaved rounds: for (a)
round r holds the jobs of every R-th prompt (all 15 attribute strings of a prompt stay in one call, as in
the evaluate stage), for (b) every round is the whole rollout batch (seed r); each round runs all methods,
in an order that rotates. Seconds = wall time of the `generate` calls; tokens = generated tokens up to and
including the stop token (the `ids` each output returns), summed the same way for every method; peak RSS
= the process's resident memory sampled every 10 ms during a method's calls (the model, loaded once,
is in every number; "growth" is the rise within one call, freed heap trimmed before it); "other procs'
cores" = CPU time other processes used meanwhile.

Threads: 1 by default. On a 2-core machine shared with another job, two OpenMP threads collapse when
the other job holds a core (measured: a 64-row step of SmolLM2's linears took 3.5 s at 2 threads vs
0.28 s at 1). Both paths always run with the same thread count.

The fp32 ceiling line: tokens/s of a decoding step's matmuls alone (every linear layer and the LM head at
16..128 rows, no attention or Python): no fp32 decoder on this machine can exceed it, so it says whether a
target is reachable here at all.

Ends with ``speedup_ppo=<x>`` and ``RESULT speedup_vs_hf_generate=<x> target=3``: continuous tokens/s
over the fastest HF setting's, on workload (a).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_label import CpuMeter  # noqa: E402  (same /proc/stat accounting)

HS2 = "data/helpsteer2/helpsteer2_train_first100.jsonl"
ATTRIBUTES = ["helpfulness", "complexity", "verbosity"]
LEVELS = [0, 1, 2, 3, 4]
TARGET = 3.0


def card_model(dest: Path) -> Path:
    """The embedded model's files (symlinked) plus an SFT card and the HelpSteer2 schema."""
    from steerlm.attributes import BUILTIN_SCHEMAS
    from steerlm.models.embedded import resolve_model_path
    from steerlm.models.policy import make_card

    src = Path(resolve_model_path("embedded:smollm2-135m-instruct"))
    for f in src.iterdir():
        (dest / f.name).symlink_to(f.resolve())
    schema = BUILTIN_SCHEMAS["helpsteer2"]
    schema.save(dest)
    card = make_card(fmt={"template": "hf", "stop_strings": []}, schema=schema, steerable=list(schema.attributes),
                     defaults={"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2},
                     base_model="embedded:smollm2-135m-instruct", max_length=2048, lora=False)
    (dest / "steerlm_sft.json").write_text(json.dumps(card))
    return dest


class PeakRss:
    """The process's peak resident memory while the block runs (sampled every 10 ms), and where it started:
    freed heap is handed back to the OS first (malloc_trim), so a method does not inherit another's peak."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(model, backend: str, batch_size: int, prompts, attributes, **kw):
    model.backend = backend
    return model.generate(prompts, attributes, batch_size=batch_size, progress=False, **kw)


def measure(model, methods: dict, rounds: list, meter: CpuMeter) -> dict:
    """methods: name -> (backend, batch size); rounds: [(prompts, attributes, generate kwargs)]."""
    names = list(methods)
    acc = {m: {"tokens": 0, "seconds": 0.0, "others": 0.0, "peak": 0, "outputs": []} for m in names}
    for r, (prompts, attributes, kw) in enumerate(rounds):
        for m in names[r % len(names):] + names[:r % len(names)]:
            a = meter.snapshot()
            with PeakRss() as mem:
                outs = run(model, *methods[m], prompts, attributes, **kw)
            others, wall = meter.others(a, meter.snapshot())
            x = acc[m]
            x["tokens"] += sum(len(o["ids"]) for o in outs)
            x["seconds"] += wall
            x["others"] += others
            x["peak"] = max(x["peak"], mem.peak)
            x["grew"] = max(x.get("grew", 0), mem.peak - mem.start)
            x["outputs"].append(outs)
        print(f"  round {r + 1}/{len(rounds)}: " + ", ".join(f"{m} {acc[m]['seconds']:.0f} s" for m in names), flush=True)
    return acc


def table(title: str, acc: dict) -> None:
    header = ["method", "generations", "tokens", "seconds", "tokens/s", "peak RSS MB", "peak growth in a call MB",
              "other procs' cores"]
    cells = [[m, str(sum(len(o) for o in x["outputs"])), str(x["tokens"]), f"{x['seconds']:.1f}",
              f"{x['tokens'] / x['seconds']:.1f}", f"{x['peak'] / 2**20:.0f}", f"{x['grew'] / 2**20:.0f}",
              f"{x['others'] / x['seconds']:.2f}"] for m, x in acc.items()]
    widths = [max(len(c[j]) for c in cells + [header]) for j in range(len(header))]
    print(f"\n{title}")
    for j, c in enumerate([header] + cells):
        print("  ".join(v.ljust(w) if k == 0 else v.rjust(w) for k, (v, w) in enumerate(zip(c, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def speedup(acc: dict) -> tuple[float, str]:
    rate = {m: x["tokens"] / x["seconds"] for m, x in acc.items()}
    best = max((m for m in rate if m != "continuous"), key=rate.get)
    return rate["continuous"] / rate[best], best


def linear_ceiling(model, rows: int, reps: int = 5) -> float:
    """tokens/s of one decoding step's matmuls alone at `rows` rows (every nn.Linear, the LM head included; no
    attention, no norms, no Python): an upper bound on any fp32 decoder's throughput on this machine."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
    with torch.inference_mode():
        for m in linears:  # warm-up
            torch.nn.functional.linear(xs[m.in_features], m.weight)
        t0 = time.perf_counter()
        for _ in range(reps):
            for m in linears:
                torch.nn.functional.linear(xs[m.in_features], m.weight)
        step = (time.perf_counter() - t0) / reps
    return rows / step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5, help="(a): HelpSteer2 prompts, each x 3 attributes x 5 levels")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="(a): the evaluate stage's default")
    ap.add_argument("--hf-batch-sizes", default="16,32", help="(a): fixed batch sizes of the HF generate baseline")
    ap.add_argument("--ppo-hf-batch-sizes", default="8,16", help="(b): the same for the rollouts")
    ap.add_argument("--ppo-prompts", type=int, default=16, help="(b): rollout prompts (0: skip (b))")
    ap.add_argument("--ppo-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from steerlm.stages.evaluate import load_prompts
    from steerlm.steerable import SteerableModel

    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        model = SteerableModel.load(str(card_model(Path(tmp))), device="cpu", precision="fp32")
        pool = load_prompts([{"format": "helpsteer2", "path": str(REPO / HS2)}], model.schema,
                            max(args.prompts, args.ppo_prompts))
        prompts = pool[:args.prompts]
        lengths = [len(model.prompt_ids(p)) for p in prompts]
        print(f"bench_generate: SmolLM2-135M-Instruct (fp32, cpu, {torch.get_num_threads()} threads); (a) "
              f"{len(prompts)} prompts ({min(lengths)}-{max(lengths)} tokens) x {len(ATTRIBUTES)} attributes x "
              f"{len(LEVELS)} levels, greedy, {args.max_new_tokens} new tokens; continuous: batch_tokens="
              f"{model.batch_tokens}; HF batch sizes {sizes}", flush=True)
        for backend in ("continuous", "hf_generate"):  # warm-up (untimed)
            run(model, backend, 2, prompts[:2], None, max_new_tokens=4)
        baseline = rss()

        methods = {"continuous": ("continuous", 16), **{f"hf_generate bs={b}": ("hf_generate", b) for b in sizes}}
        rounds = []
        for r in range(max(1, min(args.rounds, len(prompts)))):
            jobs = [(a, lev, p) for a in ATTRIBUTES for lev in LEVELS for p in prompts[r::args.rounds]]
            rounds.append(([p for *_, p in jobs], [{a: lev} for a, lev, _ in jobs],
                           {"max_new_tokens": args.max_new_tokens}))
        distinct = sum(len({tuple(model.prompt_ids(p, a)) for p, a in zip(ps, at)}) for ps, at, _ in rounds)
        print(f"(a) evaluate sweep: {sum(len(r[0]) for r in rounds)} generations, {distinct} distinct prompts (a level "
              "equal to the card default renders the default label; greedy continuous decodes each distinct prompt "
              "once)", flush=True)
        sweep = measure(model, methods, rounds, meter)

        ceiling = {r: linear_ceiling(model.model, r) for r in (16, 32, 64, 128)}

        ppo = None
        if args.ppo_prompts > 0:
            n = args.ppo_prompts
            ppo_methods = {"continuous": ("continuous", 16),
                           **{f"hf_generate bs={b}": ("hf_generate", b)
                              for b in sorted({min(int(b), n) for b in args.ppo_hf_batch_sizes.split(",")})}}
            ppo_rounds = [(pool[:n], None, {"max_new_tokens": args.ppo_new_tokens, "do_sample": True, "temperature": 1.0,
                                            "top_p": 1.0, "top_k": 0, "seed": r}) for r in range(max(1, args.rounds))]
            print(f"(b) PPO-style rollouts: {n} prompts, sampled at T=1, {args.ppo_new_tokens} new tokens", flush=True)
            ppo = measure(model, ppo_methods, ppo_rounds, meter)

    table(f"(a) evaluate sweep: {sum(len(r[0]) for r in rounds)} generations, greedy", sweep)
    if ppo is not None:
        table(f"(b) PPO-style rollouts: {args.ppo_prompts} prompts x {len(ppo_rounds)} rounds, sampled", ppo)
    print(f"\nbaseline RSS (model loaded, before the first timed call): {baseline / 2**20:.0f} MB")
    texts = {m: [o["text"] for outs in x["outputs"] for o in outs] for m, x in sweep.items()}
    differ = {m: [k for k, (a, b) in enumerate(zip(texts["continuous"], t)) if a != b] for m, t in texts.items()}
    ok = not any(differ.values())
    print(f"(a) greedy texts identical across all methods: {ok}" +
          ("" if ok else "; differing generations: " + json.dumps({m: d for m, d in differ.items() if d})))
    busiest = max(x["others"] / x["seconds"] for acc in (sweep, ppo or {}) for x in acc.values())
    if busiest > 0.25:
        print(f"WARNING: other processes kept {busiest:.2f} cores busy on average during a method's calls: the "
              "machine was shared, absolute tokens/s are low (the interleaved rounds keep the ratios fair)")
    if ppo is not None:
        x, best = speedup(ppo)
        print(f"speedup_ppo={x:.2f} (over {best})")
    x, best = speedup(sweep)
    hf_rate = sweep[best]["tokens"] / sweep[best]["seconds"]
    print("fp32 ceiling, the model's linear layers alone per decoding step (no attention, no overhead): " +
          ", ".join(f"{r} rows {t:.0f} tokens/s" for r, t in ceiling.items()) +
          f"; 3x the fastest HF setting would be {3 * hf_rate:.0f} tokens/s "
          f"({3 * hf_rate / max(ceiling.values()):.2f}x the best ceiling)")
    print(f"speedup over {best}")
    print(f"RESULT speedup_vs_hf_generate={x:.2f} target={TARGET:g}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
