"""The subspace gate (SCS) and the mixture of steering experts (MoSE) on synthetic data with a known answer."""

from __future__ import annotations

import pytest
import torch

from steerlm.errors import ConfigError
from steerlm.steering.adaptive import (SubspaceGate, calinski_harabasz, kmeans, load_adaptive, prototypes,
                                       save_adaptive, train_router)

H = 32


def subspace_data(n=200, seed=0):
    """Prompts that need steering live near a 3-dim subspace (plus noise); the others are isotropic."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(H, 3, generator=g))[0]
    inside = torch.randn(n, 3, generator=g) * 4 @ basis.T + 0.3 * torch.randn(n, H, generator=g)
    outside = torch.randn(n, H, generator=g)
    return inside, outside, basis


def test_gate_separates_a_known_subspace_at_the_target_false_positive_rate():
    inside, outside, basis = subspace_data(seed=0)
    gate = SubspaceGate.fit(inside, outside, k=3, target_fpr=0.05)
    g = torch.Generator().manual_seed(1)  # fresh points from the same two distributions
    test_in = (torch.randn(300, 3, generator=g) * 4) @ basis.T + 0.3 * torch.randn(300, H, generator=g)
    test_out = torch.randn(300, H, generator=g)
    tpr, fpr = float(gate.decide(test_in).float().mean()), float(gate.decide(test_out).float().mean())
    assert tpr > 0.97 and fpr < 0.12  # the threshold was set for 5 % false positives on the fitting set
    r = gate.ratio(torch.cat([test_in, test_out]))
    assert float(r.min()) >= 0 and float(r.max()) <= 1 + 1e-6
    assert float(gate.ratio(gate.mean + 5 * gate.basis[:, 0])) == pytest.approx(1.0, abs=1e-5)  # in the subspace
    with pytest.raises(ConfigError, match="rank"):
        SubspaceGate.fit(inside, outside, k=0)


def test_kmeans_and_calinski_harabasz_find_three_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[8.0, 0.0], [-8.0, 0.0], [0.0, 8.0]])
    x = torch.cat([c + torch.randn(50, 2, generator=g) for c in centres])
    found, assign = kmeans(x, 3)
    assert all(torch.cdist(c[None], found).min() < 0.6 for c in centres)
    assert len(set(assign[:50].tolist())) == 1 and len(set(assign.tolist())) == 3
    scores = {k: calinski_harabasz(x, kmeans(x, k)[1], k) for k in (2, 3, 4, 5)}
    assert max(scores, key=scores.get) == 3


def test_router_learns_query_specific_vectors():
    """Two kinds of query, each with its own true shift: the router must give each kind its own vector."""
    g = torch.Generator().manual_seed(0)
    kind_dir = torch.randn(2, H, generator=g) * 3
    true_shift = torch.randn(2, H, generator=g)
    kinds = torch.randint(0, 2, (240,), generator=g)
    queries = kind_dir[kinds] + 0.5 * torch.randn(240, H, generator=g)
    deltas = true_shift[kinds] + 0.05 * torch.randn(240, H, generator=g)
    assert len(prototypes(deltas)) == 2  # CH picks the two shifts
    router, info = train_router(queries[:200], deltas[:200], epochs=400)
    assert info["k"] == 2 and info["val_mse"] < 0.05
    with torch.no_grad():
        s = router(queries[200:])
    cos = torch.nn.functional.cosine_similarity(s, true_shift[kinds[200:]], dim=-1)
    assert float(cos.min()) > 0.95


def test_gate_and_router_save_load(tmp_path):
    inside, outside, _ = subspace_data()
    gate = SubspaceGate.fit(inside, outside, k=2)
    router, _ = train_router(inside[:40], outside[:40], k=2, residual_rank=2, epochs=5)
    save_adaptive(tmp_path / "a", gate=gate, router=router, meta={"layer": 3})
    gate2, router2, meta = load_adaptive(tmp_path / "a")
    assert meta["layer"] == 3 and gate2.threshold == pytest.approx(gate.threshold)
    assert torch.equal(gate2.decide(outside), gate.decide(outside))
    with torch.no_grad():
        assert torch.allclose(router2(inside[:5]), router(inside[:5]))


def test_gated_router_specs_drive_per_prompt_generation(tiny_model_dir, tmp_path_factory):
    """Prompt activations -> gate + router -> one spec per prompt (None where the gate is closed) -> generate."""
    from steerlm.steerable import SteerableModel
    from steerlm.steering.adaptive import adaptive_specs, prompt_activations
    from test_generate import train_tiny_sft

    policy = SteerableModel.load(str(train_tiny_sft(tiny_model_dir, tmp_path_factory)), device="cpu")
    prompts = ["What is DNS?", "Write a poem about the sea.", "Why?", "Name three colors."]
    h = prompt_activations(policy, prompts, layer=1, batch_size=3)
    one = prompt_activations(policy, prompts[1:2], layer=1)
    assert h.shape == (4, policy.model.config.hidden_size) and torch.allclose(h[1], one[0], atol=1e-5)  # padding-free
    gate = SubspaceGate.fit(h[:2], h[2:], k=1)
    gate.threshold = float(gate.ratio(h).median())  # open for exactly two of the four prompts
    router, _ = train_router(h.repeat(5, 1), torch.randn(1, h.shape[1]).repeat(20, 1), k=1, epochs=3)
    specs = adaptive_specs(h, 1, 50.0, router=router, gate=gate)
    assert [s is not None for s in specs] == gate.decide(h).tolist() and sum(s is not None for s in specs) == 2
    plain = policy.generate(prompts, max_new_tokens=8)
    steered = policy.generate(prompts, max_new_tokens=8, steering=specs)
    for s, a, b in zip(specs, plain, steered):
        assert (a["text"] == b["text"]) == (s is None)
    with pytest.raises(ConfigError, match="exactly one"):
        adaptive_specs(h, 1, 1.0)
