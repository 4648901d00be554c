"""Token choice and stopping for the continuous-batching loop (steerlm.generation): `Sampler` (greedy or HF's
temperature / top-k / top-p, one seeded stream per sequence) and `StopStrings` (multi-token stop strings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Sampler:
    """Greedy (do_sample False) or temperature / top-k / top-p sampling, HF's warper order and semantics.

    Each prompt has its own generator (seeded from `seed` and the prompt's index in the call), and a
    token costs one uniform from it: the draws do not depend on which rows share a batch.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 1
    uniforms: dict = field(default_factory=dict)

    def start(self, request: int) -> None:
        if self.do_sample:
            g = torch.Generator().manual_seed(hash((self.seed, request)) & 0x7FFF_FFFF_FFFF_FFFF)
            self.uniforms[request] = 1.0 - torch.rand(self.max_new_tokens, generator=g, dtype=torch.float64)  # (0, 1]

    def finish(self, request: int) -> None:  # a long-running server must not keep every request's draws
        self.uniforms.pop(request, None)

    def pick(self, logits: torch.Tensor, requests: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
        """logits (rows, vocab) fp32 -> token per row; steps[r]: how many tokens row r has generated so far."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits / self.temperature
        if self.top_k > 0:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:  # drop the low tail whose total probability is <= 1 - top_p; keep at least one token
            ordered, order = torch.sort(scores, descending=False)
            tail = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            tail[:, -1] = False
            scores = scores.masked_fill(tail.scatter(1, order, tail), float("-inf"))
        cdf = scores.softmax(-1).double().cumsum(-1)
        u = torch.stack([self.uniforms[q][s] for q, s in zip(requests, steps)]).to(cdf.device).unsqueeze(1)
        # inverse CDF: the first token whose cumulative probability reaches u (u > 0: never a zero-probability token)
        return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=cdf.shape[1] - 1)


class StopStrings:
    """Stop strings that are not single tokens: a row stops at the first token after which its generated
    text contains one (HF's StopStringCriteria, minus matches that start inside the prompt)."""

    def __init__(self, tokenizer, strings: Sequence[str]):
        self.tokenizer, self.strings = tokenizer, list(strings)
        # every token is at least one byte, so a stop string that ends in the newest token lies within its
        # last `window - 1` tokens; one more keeps decoders that drop a leading space away from the match
        self.window = max((len(s.encode()) for s in self.strings), default=0) + 2

    def hit(self, ids: Sequence[int]) -> bool:
        if not self.strings:
            return False
        text = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return any(s in text for s in self.strings)
