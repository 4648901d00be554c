"""Same-prompt length ordering for one RM head (steerlm.length_order): pairs, the hinge, the stage option."""

import json

import torch
from omegaconf import OmegaConf

from conftest import run_recipe
from steerlm.attributes import get_schema
from steerlm.length_order import LengthOrder, length_order_pairs
from steerlm.losses import bradley_terry, order_hinge


def test_pairs_are_same_prompt_answers_at_least_ratio_times_longer():
    s = [{"context": "p", "words": 10}, {"context": "p", "words": 16}, {"context": "p", "words": 14},
         {"context": "q", "words": 100}, {"context": "q", "words": 0}]
    assert sorted(length_order_pairs(s, 1.5)) == [(1, 0), (3, 4)]  # 14 < 1.5 x 10; never across prompts
    assert sorted(length_order_pairs(s, 1.3)) == [(1, 0), (2, 0), (3, 4)]


def _linear_forward(features: torch.Tensor, head: torch.nn.Linear):
    return lambda items, key: (head(features[[x["row"] for x in items]]), 0)


def test_hinge_orders_held_out_pairs_and_keeps_the_scale_where_bt_stretches_it():
    # length is one direction of a 16-d feature; the head must find it from same-prompt pairs alone
    g = torch.Generator().manual_seed(0)
    n = 400
    words = torch.randint(5, 400, (n,), generator=g)
    feats = torch.randn(n, 16, generator=g)
    feats[:, 3] = torch.log(words.float()) + 0.1 * torch.randn(n, generator=g)
    samples = [{"row": i, "context": f"p{i // 4}", "words": int(words[i])} for i in range(n)]
    train, val = samples[:320], samples[320:]
    schema = get_schema("steerlm9")
    cfg = OmegaConf.create({"attribute": "verbosity", "ratio": 1.5, "margin": 0.1, "weight": 1.0, "pairs_per_step": 32})
    out = {}
    for kind in ("hinge", "bt"):
        torch.manual_seed(0)
        head = torch.nn.Linear(16, len(schema.attributes))
        order = LengthOrder(cfg, schema, train, val, seed=0)
        fwd = _linear_forward(feats, head)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        before = order.metrics(head(feats[320:]).detach().numpy())["val_pair_accuracy"]
        for step in range(300):
            pairs = order.step_pairs(step)
            if kind == "hinge":
                loss = order.loss(fwd, pairs) / len(pairs)
            else:
                hi, lo = fwd([train[a] for a, _ in pairs], "x")[0], fwd([train[b] for _, b in pairs], "x")[0]
                loss = bradley_terry(hi[:, order.k], lo[:, order.k], torch.zeros(len(pairs))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        pred = head(feats[320:]).detach().numpy()
        m = order.metrics(pred)
        out[kind] = (m, float(pred[:, order.k].std()))
        assert order.val_pairs and m["val_pair_accuracy"] >= 0.95 > before
        assert m["val_spearman_words"] > 0.9
    # BT keeps widening ordered pairs; the hinge stops at the margin
    assert out["hinge"][1] < out["bt"][1] / 3
    assert float(order_hinge(torch.tensor([1.0]), torch.tensor([0.5]), 0.1)) == 0.0


def test_reward_stage_with_length_order_reports_it_and_refuses_pair_losses(tiny_model_dir, tmp_path):
    over = [f"model.path={tiny_model_dir}", "engine.precision=fp32", "model.freeze_backbone=true", "train.epochs=2",
            "train.global_batch_size=32", "eval.val_fraction=0.2", "max_length=256",
            "loss.length_order.attribute=verbosity"]
    proc = run_recipe("train_reward", *over, f"run_dir={tmp_path / 'rm'}")
    assert "length order [verbosity]:" in proc.stdout
    m = json.loads((tmp_path / "rm" / "eval_metrics.json").read_text())["length_order"]
    assert m["attribute"] == "verbosity" and m["train_pairs"] > 10 and m["val_pairs"] >= 1
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/length_order_loss" in r for r in rows)
    bad = run_recipe("train_reward", *over, f"run_dir={tmp_path / 'bt'}", "loss.type=bt", check=False)
    assert bad.returncode == 2 and "loss.length_order adds to loss.type=mse" in bad.stderr
