"""Atomic directories, resumable training state, `latest` pointer and pruning, shared tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from steerlm import checkpoint as ckpt
from steerlm.checkpoint import (atomic_directory, find_latest_checkpoint, load_training_state, save_hf_model,
                                save_training_state, step_dir)


def entries(path):
    return sorted(p.name for p in path.iterdir())


# ------------------------------------------------------------------ atomic directories
def test_atomic_directory_commits_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        assert tmp != final and not final.exists()
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    assert entries(tmp_path) == ["out"]  # no .tmp / .old left behind


def test_atomic_directory_leaves_no_partial_dir_when_the_body_raises(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert entries(tmp_path) == []


def test_atomic_directory_keeps_the_previous_version_on_failure_and_replaces_it_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        (tmp / "v1.txt").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            (tmp / "v2.txt").write_text("2")
            raise KeyboardInterrupt
    assert entries(final) == ["v1.txt"] and entries(tmp_path) == ["out"]
    with atomic_directory(final) as tmp:
        (tmp / "v2.txt").write_text("2")
    assert entries(final) == ["v2.txt"] and entries(tmp_path) == ["out"]


def test_atomic_directory_clears_a_stale_tmp_from_a_killed_run(tmp_path):
    stale = tmp_path / "out.tmp"
    stale.mkdir()
    (stale / "junk").write_text("from a kill -9")
    with atomic_directory(tmp_path / "out") as tmp:
        assert entries(tmp) == []
        (tmp / "ok").write_text("")
    assert entries(tmp_path / "out") == ["ok"] and entries(tmp_path) == ["out"]


# ------------------------------------------------------------------ training state
def trained_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    return model, opt


def test_training_state_round_trip_restores_tensors_state_and_rng(tmp_path):
    model, opt = trained_model_and_optimizer()
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {"epoch": 1, "batch_in_epoch": 3, "scheduler": {"last_epoch": 7, "_step_count": 8}}
    torch.manual_seed(123)
    path = save_training_state(tmp_path, 7, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                               state=state)
    draw_after_save = torch.rand(5)
    torch.rand(100)  # move the generator on
    assert path == step_dir(tmp_path, 7) == tmp_path / "checkpoints" / "step_00000007"
    assert entries(path) == ["model.safetensors", "optimizer.pt", "state.json"]

    loaded_model, loaded_opt, loaded_state = load_training_state(path)
    draw_after_load = torch.rand(5)
    torch.testing.assert_close(draw_after_load, draw_after_save, rtol=0, atol=0)

    assert loaded_state == {"step": 7, **state}
    assert loaded_model.keys() == model_state.keys()
    for k in model_state:
        torch.testing.assert_close(loaded_model[k], model_state[k], rtol=0, atol=0)
    # the optimizer state loads into a fresh optimizer and equals the original
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(loaded_model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_opt.load_state_dict(loaded_opt)
    orig = opt.state_dict()
    assert loaded_opt["param_groups"] == orig["param_groups"]
    for pid, s in orig["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(loaded_opt["state"][pid][name], s[name], rtol=0, atol=0)


def test_latest_pointer_and_keep_last_pruning(tmp_path):
    model, opt = trained_model_and_optimizer()
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        save_training_state(tmp_path, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                            state={"epoch": 0}, keep_last=2)
        assert (root / "latest").read_text() == f"step_{step:08d}"
    assert entries(root) == ["latest", "step_00000004", "step_00000006"]
    assert find_latest_checkpoint(tmp_path) == root / "step_00000006"
    save_training_state(tmp_path, 8, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                        state={}, keep_last=0)  # 0 keeps everything
    assert entries(root) == ["latest", "step_00000004", "step_00000006", "step_00000008"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, opt = trained_model_and_optimizer()
    for epoch in (0, 5):
        save_training_state(tmp_path, 3, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                            state={"epoch": epoch})
    assert entries(tmp_path / "checkpoints") == ["latest", "step_00000003"]
    assert json.loads((step_dir(tmp_path, 3) / "state.json").read_text())["epoch"] == 5


def test_find_latest_checkpoint_ignores_tmp_dirs_and_dangling_pointers(tmp_path):
    model, opt = trained_model_and_optimizer()
    assert find_latest_checkpoint(tmp_path) is None  # nothing yet
    save_training_state(tmp_path, 2, model_state=model.state_dict(), optimizer_state=opt.state_dict(), state={})
    root = tmp_path / "checkpoints"
    # a kill -9 in the middle of writing step 4 leaves a .tmp dir (even one holding a state.json)
    half = root / "step_00000004.tmp"
    half.mkdir()
    (half / "state.json").write_text('{"step": 4}')
    assert find_latest_checkpoint(tmp_path) == root / "step_00000002"
    # and a stray .tmp does not count towards keep_last when the next checkpoint prunes
    save_training_state(tmp_path, 6, model_state=model.state_dict(), optimizer_state=opt.state_dict(), state={},
                        keep_last=2)
    assert {"step_00000002", "step_00000006"} <= set(entries(root))
    assert find_latest_checkpoint(tmp_path) == root / "step_00000006"
    (root / "latest").write_text("step_00000099")  # points at nothing
    assert find_latest_checkpoint(tmp_path) is None


def test_a_failure_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained_model_and_optimizer()
    save_training_state(tmp_path, 2, model_state=model.state_dict(), optimizer_state=opt.state_dict(), state={})

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)  # model.safetensors is written, optimizer.pt fails
    with pytest.raises(OSError, match="No space"):
        save_training_state(tmp_path, 4, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                            state={})
    root = tmp_path / "checkpoints"
    assert entries(root) == ["latest", "step_00000002"]
    assert find_latest_checkpoint(tmp_path) == root / "step_00000002"


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    model, opt = trained_model_and_optimizer()
    kw = dict(model_state=model.state_dict(), optimizer_state=opt.state_dict(), state={}, keep_last=2)
    for step in (40, 50):  # an earlier, longer run in the same run_dir
        save_training_state(tmp_path, step, **kw)
    save_training_state(tmp_path, 10, **kw)  # the new run's first checkpoint
    assert find_latest_checkpoint(tmp_path) == step_dir(tmp_path, 10)


# ------------------------------------------------------------------ shared tensors
def test_tied_tensors_are_saved_under_every_name(tmp_path):
    model, opt = trained_model_and_optimizer()
    w = model.weight
    state = {"embed.weight": w, "lm_head.weight": w, "bias": model.bias}  # the same tensor twice (tied)
    path = save_training_state(tmp_path, 1, model_state=state, optimizer_state=opt.state_dict(), state={})
    back = load_file(str(path / "model.safetensors"))
    assert back.keys() == state.keys()
    torch.testing.assert_close(back["embed.weight"], w.detach(), rtol=0, atol=0)
    torch.testing.assert_close(back["lm_head.weight"], w.detach(), rtol=0, atol=0)
    assert model.weight is w and w.data_ptr() == state["lm_head.weight"].data_ptr()  # caller's tensors untouched


def test_tensors_sharing_storage_as_views_are_saved(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    state = {"w": w, "row": w[1]}  # a view into the same storage
    path = save_training_state(tmp_path, 1, model_state=state, optimizer_state={}, state={})
    back = load_file(str(path / "model.safetensors"))
    torch.testing.assert_close(back["row"], torch.tensor([3.0, 4.0, 5.0]))


def test_save_hf_model_with_tied_embeddings_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    out = save_hf_model(model, state, tmp_path / "model", extra_json={"card.json": {"x": 1}})
    assert entries(tmp_path) == ["model"]
    assert json.loads((out / "card.json").read_text()) == {"x": 1}
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(back.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
