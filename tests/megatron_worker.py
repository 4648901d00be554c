"""One torchrun rank of the Megatron CPU tests: build GPTModel from a tiny HF model, compare, train one step.

    torchrun --nproc_per_node 2 tests/megatron_worker.py HF_DIR OUT_JSON --tp 2 [--pp 1] [--sp] [--seq 16]

Rank 0 writes OUT_JSON: logits and hidden-state differences against HF, the training-step losses, whether
HF -> Megatron -> HF is bit-exact; the trained model is exported to OUT_JSON's stem + .hf (an HF checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import megatron_cpu  # noqa: E402

megatron_cpu.install()

from transformers import AutoModelForCausalLM  # noqa: E402

from steerlm.engines.megatron import model as mm  # noqa: E402
from steerlm.engines.megatron.grads import finish_grads  # noqa: E402


def batch(vocab: int, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded rows: ids, next-token labels and a loss mask (the padding is out of the loss)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (2, seq), generator=g)
    ids[1, 11:] = 0  # padding
    labels = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=ids.dtype)], dim=1)
    mask = torch.ones(2, seq)
    mask[:, -1] = 0
    mask[1, 10:] = 0
    mask[:, :4] = 0  # "prompt" tokens
    return ids, labels, mask


def lora_against_peft(model, hf, ids, real) -> dict:
    """The trained adapter, gathered into peft's layout and loaded onto the HF model: its logits must be
    Megatron's (collective; -> the max difference on rank 0)."""
    from megatron.core import parallel_state as ps
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from steerlm.engines.megatron.lora import lora_to_hf

    model.eval()
    with torch.no_grad():
        logits = mm.forward_logits(model, ids, gather=True)
    shards = mm.gather_shards(model, keep=lambda name: ".lora_" in name)
    if shards is None:
        return {}
    adapter = lora_to_hf(shards, model.hf_shape, ps.get_tensor_model_parallel_world_size(), 1)
    peft = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8.0, target_modules="all-linear"))
    missing = set_peft_model_state_dict(peft, {"base_model.model." + k: v for k, v in adapter.items()})
    lora_keys = [k for k in peft.state_dict() if "lora_" in k]
    with torch.no_grad():
        peft_logits = peft(input_ids=ids).logits
    return {"lora_logits_max_abs_diff": float((logits - peft_logits)[real].abs().max()),
            "lora_keys": len(adapter), "peft_lora_keys": len(lora_keys),
            "unexpected": len(getattr(missing, "unexpected_keys", [])),
            "lora_b_norm": float(sum(v.norm() ** 2 for k, v in adapter.items() if "lora_B" in k) ** 0.5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true", help="sequence parallel")
    ap.add_argument("--seq", type=int, default=16, help="row length (odd: sequence-parallel padding)")
    ap.add_argument("--lora", action="store_true", help="train a LoRA adapter (r 4) instead of the weights")
    args = ap.parse_args()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    ranks = mm.init_parallel(args.tp, args.pp)
    model = mm.build_gpt(hf.config, tp=args.tp, pp=args.pp, sequence_parallel=args.sp)
    mm.load_hf_state(model, hf.state_dict())
    if args.lora:  # B = 0: the logits below still equal HF's
        from steerlm.engines.megatron.lora import COLUMN, ROW, apply_lora

        result_lora = {"trainable": apply_lora(model, r=4, alpha=8.0, targets=[*COLUMN, *ROW])}
    result: dict = {"ranks": ranks, **(result_lora if args.lora else {})}
    exact = mm.gather_hf_state(model)
    if exact is not None:
        ref = hf.state_dict()
        result["roundtrip_keys_equal"] = sorted(exact) == sorted(k for k in ref if k in exact) and \
            all(k in exact for k in ref if not (hf.config.tie_word_embeddings and k == "lm_head.weight"))
        result["roundtrip_exact"] = all(torch.equal(exact[k], ref[k]) for k in exact)
    ids, labels, mask = batch(hf.config.vocab_size, args.seq)
    with torch.no_grad():
        hf_logits = hf(input_ids=ids).logits
        hf_hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    if args.pp == 1:
        model.eval()
        with torch.no_grad():
            logits = mm.forward_logits(model, ids, gather=True)
        real = mask.bool() | (ids != 0)  # compare where the token is real (padding rows see only the causal past)
        result["logits_max_abs_diff"] = float((logits - hf_logits)[real].abs().max())
        # one SFT-style step: masked mean of the vocab-parallel token NLL, AdamW on this rank's shards
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(2):
            nll = mm.token_nll(model, ids, labels)
            loss = (nll * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            finish_grads(model)  # q/k norms (and every norm under SP): partial gradients summed over TP
            opt.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            losses.append(float((mm.token_nll(model, ids, labels) * mask).sum() / mask.sum()))
        result["losses"] = losses
        mm.export_hf(model, Path(args.out).with_suffix(".hf"))
        if args.lora:
            result.update(lora_against_peft(model, hf, ids, real))
        # the RM path: final-norm hidden states instead of logits
        rm = mm.as_hidden_state_model(mm.build_gpt(hf.config, tp=args.tp, sequence_parallel=args.sp))
        mm.load_hf_state(rm, hf.state_dict())
        with torch.no_grad():
            hidden = mm.gpt_forward(rm.eval(), ids)
        result["hidden_max_abs_diff"] = float((hidden - hf_hidden)[real].abs().max())
    else:
        # the same two steps through Megatron's 1F1B schedule, one row per micro-batch
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        total = mask.sum()
        mbs = [{"input_ids": ids[i:i + 1], "labels": labels[i:i + 1], "mask": mask[i:i + 1]} for i in range(2)]

        def loss_fn(nll, mb):
            loss = (nll * mb["mask"]).sum() / total
            return loss, loss

        losses = []
        for k in range(3):
            opt.zero_grad()
            values = mm.pipeline_forward_backward(model, mbs, loss_fn, forward_only=k == 2)
            finish_grads(model)
            if k < 2:
                opt.step()
            losses.append(sum(values))
        result["losses"] = losses
        mm.export_hf(model, Path(args.out).with_suffix(".hf"))
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
