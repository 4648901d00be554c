"""Checkpoints: HF-native model directories and resumable training state, both written atomically.

Layout of a run directory::

    run_dir/
      checkpoints/step_00000040/   model.safetensors  optimizer.pt  state.json   (training state)
      checkpoints/latest           "step_00000040"  (written last, by rename)
      model/                       HF-native: config.json model.safetensors tokenizer* attribute_schema.json

Every directory is written under a `.tmp` name and renamed when complete, so a kill -9 at any
moment leaves either the previous checkpoint or the new one, never half of one. Tensors are read
back with safetensors or `torch.load(weights_only=True)`; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import OutputError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
# a write that failed for these reasons is the environment's doing: one line naming the path, not a traceback
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def staging_dir(final: str | os.PathLike) -> Path:
    """Where `atomic_directory(final)` stages its files (other ranks may write there while it is open)."""
    return Path(final).with_name(Path(final).name + ".tmp")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success replace `final` with it."""
    final = Path(final)
    tmp = staging_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_output_error(e, final, "this directory")
        raise
    fsync_dir(tmp)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, what: Optional[str] = None) -> Iterator[Path]:
    """Yield `<path>.tmp` to write; on success rename it to `path`. On any failure the `.tmp` is removed, and a
    full disk or an unwritable directory becomes an OutputError naming `path` and `what` was being written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_output_error(e, path, what or path.name)
        raise


def _raise_output_error(e: BaseException, path, what: str) -> None:
    """A full disk or an unwritable directory: one OutputError line naming `path` (other errors: the caller re-raises)."""
    if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS and not isinstance(e, OutputError):
        raise OutputError(path, what, e) from e


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: Optional[str] = None) -> None:
    """Write to `<path>.tmp`, fsync, rename: readers see the old file or the whole new one."""
    with staged_file(path, what) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, what: Optional[str] = None) -> None:
    write_bytes_atomic(path, text.encode(), what)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights, views): clone all but the first."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.detach()
        storage = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if storage in seen else v.contiguous()
        seen.add(storage)
    return out


# ----------------------------------------------------------------------------- HF export
def save_hf_model(hf_model, state_dict: dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
                  tokenizer=None, schema=None, extra_json: Optional[dict[str, dict]] = None) -> Path:
    """`save_pretrained` (safetensors) + tokenizer + attribute schema + extra JSON files, atomically."""
    with atomic_directory(out_dir) as tmp:
        hf_model.save_pretrained(tmp, state_dict=_unshare(state_dict), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if schema is not None:
            schema.save(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return Path(out_dir)


# ----------------------------------------------------------------------------- training state
def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def save_training_state(run_dir: str | os.PathLike, step: int, *, model_state: Optional[dict[str, torch.Tensor]],
                        optimizer_state: dict, state: dict, keep_last: int = 2, files: Optional[dict] = None,
                        write_more: Optional[Callable[[Path], None]] = None) -> Path:
    """Write one resumable checkpoint, then point `latest` at it and prune old ones. `model_state` None: the
    weights are in `write_more`'s files (engine=megatron's shards); `files`: more {name: text}."""
    final = step_dir(run_dir, step)
    with atomic_directory(final) as tmp:
        if model_state is not None:
            save_file(_unshare(model_state), str(tmp / "model.safetensors"))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if write_more is not None:
            write_more(tmp)
        torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    root = Path(run_dir) / CHECKPOINTS
    write_text_atomic(root / LATEST, final.name)
    if keep_last > 0:
        # prune older checkpoints; newer-numbered ones are stale leftovers of an abandoned run
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))
        older = [p for p in done if p.name < final.name]
        stale = [p for p in done if p.name > final.name]
        for old in older[:-(keep_last - 1)] if keep_last > 1 else older:
            shutil.rmtree(old, ignore_errors=True)
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (model_state, optimizer_state, state). Restores the torch RNG as a side effect."""
    path = Path(path)
    model_state = load_file(str(path / "model.safetensors")) if (path / "model.safetensors").exists() else {}
    blob = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    torch.set_rng_state(blob["torch_rng"])
    if torch.cuda.is_available() and blob["cuda_rng"]:
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    state = json.loads((path / "state.json").read_text())
    return model_state, blob["optimizer"], state
