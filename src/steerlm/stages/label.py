"""Stage 2: label any chat dataset with the attribute reward model.

Features and the config keys that control them:

- Input (`input`): any data-layer source list (HF hub id, local jsonl/parquet, OASST, NeMo-Aligner
  chat JSONL, canonical); labels already present are validated against the RM's schema. An input
  that carries its own `attribute_schema.json` must match the RM's (SchemaMismatchError).
- Output (`output_dir`, `output_format`): `labeled.jsonl` (or `.parquet`) of canonical
  conversations where every assistant turn gets `labels` (clipped to the scale and rounded, as
  NeMo-Aligner's annotator), `label` (the `name:value,...` string) and `scores` (raw floats). Only
  the attributes the RM was trained on are written (`keep_human_labels=true` keeps existing human
  values and fills only the missing attributes). Next to it: `attribute_schema.json`,
  `summary.json`, `manifest.json`.
- Speed (`batch_tokens`, `engine.precision`): length-sorted token-budget batches, inference mode,
  bf16 on GPU (`scoring.RewardScorer`); `batch_tokens: null` picks the device's budget (8192 on GPU,
  2048 on CPU, where big batches lose per-token throughput).
- Sharding and resume (`chunk_size`): the input is cut into chunks of conversations in input order;
  chunk c belongs to rank c mod world. Each finished chunk is committed as its own file (temp +
  rename) with a checksum in its `.done` record; a rerun skips committed chunks. Batching happens
  inside a chunk, so any number of ranks produces byte-identical chunks; rank 0 concatenates them in
  order into the final file, atomically, and removes the parts. Each `.done` record also keeps the
  chunk's counts, so `summary.json` describes the whole output after a resume too.
- Long inputs (`over_length`): error | skip | truncate_left, counted in the summary.
- A complete output is never overwritten unless `overwrite=true`.

Raises:
    FileExistsError: the output exists and overwrite=false.
    SchemaMismatchError, DataError: see above.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..checkpoint import staged_file, write_bytes_atomic, write_text_atomic
from ..data.sources import load_mixture, require_input_schemas
from ..config_check import check_config
from ..engines import torch_engine as te
from ..logging import print0
from .. import label_calibration as cal
from ..errors import ConfigError
from ..label_calibration import HUMAN
from ..scoring import RewardScorer, ScoreStats

MANIFEST = "manifest.json"
OUTPUT_FORMATS = ("jsonl", "parquet")  # the output file is named labeled.<format>
# per-chunk counts kept in its .done record, so the summary describes the whole output after a resume
CHUNK_COUNTS = ("inputs", "scored", "skipped_over_length", "truncated_left", "from_cache", "tokens", "padded_tokens")


def label_conversations(conversations: Sequence[dict], scorer: RewardScorer, *, keep_human_labels: bool = False,
                        stats: Optional[ScoreStats] = None, attributes: Optional[Sequence[str]] = None) -> list[dict]:
    """Score every assistant turn; return new conversations with labels, label strings and raw scores.

    The Python entry point of stage 2: one batched scoring call for all turns of all conversations.
    attributes: the RM-trained attributes to write (None: all of them). With keep_human_labels, a turn's
    `human_labels` lists the attributes whose values are human (calibration leaves those alone).
    """
    stats = stats if stats is not None else ScoreStats()
    requests, where = [], []
    for c, conv in enumerate(conversations):
        for k, turn in enumerate(conv["turns"]):
            if turn["role"] == "assistant":
                requests.append((conv["system"], conv["turns"][: k + 1]))
                where.append((c, k))
    seqs = [scorer.tokenize(s, t, f"{conversations[c]['id']} turn {k}", stats)
            for (s, t), (c, k) in zip(requests, where)]
    preds = scorer.score_ids(seqs, stats)
    keep = [scorer.schema.index(a) for a in (scorer.trained_attributes if attributes is None else attributes)]
    out = [{**conv, "turns": [dict(t) for t in conv["turns"]]} for conv in conversations]
    lo, hi = scorer.schema.scale_min, scorer.schema.scale_max
    for (c, k), pred in zip(where, preds):
        turn = out[c]["turns"][k]
        if pred is None:  # skipped (over-length): left unlabeled (human labels stay only if asked to), marked why
            labels = dict(turn["labels"]) if keep_human_labels and turn["labels"] else None
            turn.update({"labels": labels, "scores": None,
                         "label": scorer.schema.format_label(labels) if labels else None,
                         "label_status": "skipped_over_length"})
            continue
        scores = {scorer.schema.attributes[j]: round(float(pred[j]), 6) for j in keep}
        labels = {a: float(round(min(hi, max(lo, v)))) for a, v in scores.items()}
        if keep_human_labels and turn["labels"]:
            labels.update(turn["labels"])  # human values win; the RM fills only the missing attributes
            turn[HUMAN] = sorted(turn["labels"], key=scorer.schema.index)
        turn.pop("label_status", None)  # a relabeled row passed in as is may carry an earlier run's status
        turn.update({"labels": labels, "scores": scores, "label": scorer.schema.format_label(labels)})
    return out


def run(cfg: DictConfig) -> dict:
    if cfg.engine.get("strategy") == "megatron":  # the RM split over TP ranks; replicas share the chunks
        from ..engines.megatron.engine import distributed as megatron_distributed

        with megatron_distributed(cfg.engine) as info:
            return _run(cfg, info)
    with te.distributed(cfg.engine.device) as info:
        return _run(cfg, info)


def _run(cfg: DictConfig, info: te.DistInfo) -> dict:
    t_start = time.time()
    check_config(cfg)  # the recipes check at load time; Python callers of run() get the same checks here
    out_dir = Path(cfg.output_dir)
    output = out_dir / f"labeled.{cfg.output_format}"
    parts = out_dir / "parts"
    complete = (out_dir / MANIFEST).exists() and output.exists()
    if complete and not cfg.overwrite:
        raise FileExistsError(f"{output} is complete; pass overwrite=true to label again")
    # overwrite=true deletes nothing here: the RM and the input are checked first, and the complete output is
    # replaced only once the new one is whole (finalize), so a failed run leaves it exactly as it was
    scorer = RewardScorer(cfg.rm, device=str(info.device), precision=cfg.engine.precision,
                          batch_tokens=cfg.batch_tokens, max_length=cfg.max_length, over_length=cfg.over_length,
                          tensor_parallel=getattr(info, "tp", None), pipeline_parallel=getattr(info, "pp", 1),
                          sequence_parallel=getattr(info, "sequence_parallel", False))
    # under Megatron the TP and PP ranks of a replica score the same chunks together: one of them writes
    writer = getattr(info, "tp_rank", 0) == 0 and getattr(info, "pp_rank", 0) == 0
    cache_dir = feature_cache_dir(cfg.get("reuse_features"), cfg.rm, scorer.card)
    if cache_dir:
        print0(f"label: {scorer.reuse_features(cache_dir)} RM inputs have stored features ({cache_dir}): "
               f"scored without a forward")
    written = written_attributes(cfg, scorer)
    specs = [OmegaConf.to_container(s, resolve=True) for s in cfg.input]
    require_input_schemas(specs, scorer.schema, other_what=f"RM {cfg.rm}")  # a labeled input carries its schema
    conversations, load_stats = load_mixture(specs, scorer.schema)
    chunks = [conversations[i:i + cfg.chunk_size] for i in range(0, len(conversations), cfg.chunk_size)]
    fingerprint = run_fingerprint(cfg, scorer, conversations)
    parts.mkdir(parents=True, exist_ok=True)
    mine = [c for c in range(len(chunks)) if c % info.world_size == info.rank]
    todo = [c for c in mine if not chunk_done(parts, c, fingerprint)]
    print0(f"label: {len(conversations)} conversations in {len(chunks)} chunks; {len(mine) - len(todo)} of this "
           f"rank's {len(mine)} already committed; RM trained on {scorer.trained_attributes}")
    stats = ScoreStats()
    # closed on errors too: an open bar would be redrawn after the one-line error message
    with tqdm(total=len(todo), desc=f"label[rank {info.rank}]", disable=not info.is_main, dynamic_ncols=True) as bar:
        for c in todo:
            chunk_stats = ScoreStats()
            rows = label_conversations(chunks[c], scorer, keep_human_labels=cfg.keep_human_labels, stats=chunk_stats,
                                       attributes=written)
            if writer:
                commit_chunk(parts, c, rows, fingerprint, chunk_stats)
            stats.add(chunk_stats)
            bar.update(1)
            bar.set_postfix(rows_s=f"{stats.inputs / max(stats.seconds, 1e-9):.1f}",
                            tok_s=f"{stats.tokens / max(stats.seconds, 1e-9):.0f}")
    totals = te.all_reduce_sum([float(v) for v in stats.__dict__.values()], info.device)
    te.barrier()
    summary = None
    if info.is_main:
        total = ScoreStats(**{k: type(getattr(stats, k))(v) for k, v in zip(stats.__dict__, totals)})
        summary = finalize(out_dir, output, parts, len(chunks), fingerprint, cfg, scorer, load_stats, total,
                           t_start, info)
    te.barrier()
    return summary or {}


def written_attributes(cfg, scorer: RewardScorer) -> list[str]:
    """The RM attributes this run writes: `attributes` (each one the RM was trained on), or all trained ones."""
    if cfg.get("attributes") is None:
        return list(scorer.trained_attributes)
    chosen = list(cfg.attributes)
    bad = [a for a in chosen if a not in scorer.trained_attributes]
    if bad or not chosen:
        raise ConfigError(f"attributes: {bad or chosen} not written: the RM {cfg.rm} was trained on "
                          f"{', '.join(scorer.trained_attributes)}")
    return sorted(set(chosen), key=scorer.schema.index)


def feature_cache_dir(setting, rm: str, card: dict) -> Optional[str]:
    """reuse_features: null -> None; a dir -> it; "auto" -> the reward run's cache/ next to the RM's model/ when the
    RM's card records a frozen-backbone feature cache (else None: every turn takes a forward, as with null)."""
    if not setting:
        return None
    if str(setting) != "auto":
        return str(setting)
    auto = Path(rm).parent / "cache"
    return str(auto) if card.get("feature_fingerprint") and (auto / "features.json").exists() else None


def run_fingerprint(cfg, scorer: RewardScorer, conversations: Sequence[dict]) -> str:
    """Same RM, settings and input -> same fingerprint; a committed chunk from another run is not reused."""
    h = hashlib.sha256()
    # resolved values: batching, device type and dtype decide the exact floats a chunk holds
    h.update(json.dumps([str(Path(cfg.rm).resolve()), scorer.template, scorer.max_length, cfg.over_length,
                         cfg.keep_human_labels, cfg.chunk_size, scorer.batch_tokens, scorer.device.type,
                         str(scorer.dtype), written_attributes(cfg, scorer), bool(cfg.get("reuse_features"))]).encode())
    for f in sorted(Path(cfg.rm).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for conv in conversations:
        h.update(json.dumps(conv, sort_keys=True).encode())
    return h.hexdigest()


def _chunk_paths(parts: Path, c: int) -> tuple[Path, Path]:
    return parts / f"chunk_{c:06d}.jsonl", parts / f"chunk_{c:06d}.done"


def chunk_done(parts: Path, c: int, fingerprint: str) -> bool:
    data, done = _chunk_paths(parts, c)
    if not (data.exists() and done.exists()):
        return False
    rec = json.loads(done.read_text())
    return rec["fingerprint"] == fingerprint and rec["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def commit_chunk(parts: Path, c: int, rows: list[dict], fingerprint: str, stats: Optional[ScoreStats] = None) -> None:
    data, done = _chunk_paths(parts, c)
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    write_bytes_atomic(data, blob, f"labeled chunk {c}")
    counts = {k: getattr(stats, k) for k in CHUNK_COUNTS} if stats is not None else {}
    write_text_atomic(done, json.dumps({"fingerprint": fingerprint, "rows": len(rows),
                                        "sha256": hashlib.sha256(blob).hexdigest(), "counts": counts}))


def write_rows(path: Path, rows: list[dict], output_format: str) -> None:
    """Labeled rows -> `path` as JSONL, or parquet with the turns as a JSON string column (label dicts have per-row
    keys)."""
    if output_format not in OUTPUT_FORMATS:  # config_check refuses others; the Python API lands here
        raise ConfigError(f"output_format={output_format!r}: expected one of {' | '.join(OUTPUT_FORMATS)}")
    if output_format == "jsonl":
        write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [r["id"] for r in rows], "group": [r["group"] for r in rows],
                      "system": [r["system"] for r in rows], "source": [r["source"] for r in rows],
                      "turns_json": [json.dumps(r["turns"], ensure_ascii=False) for r in rows]})
    pq.write_table(table, path)


def finalize(out_dir, output, parts, n_chunks, fingerprint, cfg, scorer, load_stats, total, t_start, info) -> dict:
    """Concatenate committed chunks in order into the output (atomically), then write the records."""
    missing = [c for c in range(n_chunks) if not chunk_done(parts, c, fingerprint)]
    if missing:
        raise RuntimeError(f"chunks {missing[:10]} are not committed; rerun the same command to finish them")
    target = cfg.calibration.target
    target = OmegaConf.to_container(target, resolve=True) if OmegaConf.is_config(target) else target
    calib = cal.targets(str(cfg.calibration.method), written_attributes(cfg, scorer), target, scorer.card,
                        scorer.schema.levels())
    calibration = {}
    with staged_file(output, "the labeled output") as tmp:
        if cfg.output_format == "jsonl" and not calib:  # the committed chunks are the output: concatenate their bytes
            with open(tmp, "wb") as f:
                for c in range(n_chunks):
                    f.write(_chunk_paths(parts, c)[0].read_bytes())
                f.flush()
                os.fsync(f.fileno())
        else:  # calibration needs every score of the dataset at once, parquet every row
            rows = [json.loads(line) for c in range(n_chunks)
                    for line in _chunk_paths(parts, c)[0].read_bytes().splitlines()]
            calibration = cal.calibrate(rows, calib, scorer.schema.levels(), scorer.schema.format_label)
            write_rows(tmp, rows, cfg.output_format)
        # the new output is whole: only now does an earlier complete one (overwrite=true) stop counting as complete.
        # A run cut off from here on leaves no manifest, and the same command finishes it from the committed parts
        (out_dir / MANIFEST).unlink(missing_ok=True)
    scorer.schema.save(out_dir)
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    records = [json.loads(_chunk_paths(parts, c)[1].read_text()) for c in range(n_chunks)]
    # counts over the whole output (every committed chunk, also those an earlier, interrupted run scored)
    counts = {k: sum(int(r.get("counts", {}).get(k, 0)) for r in records) for k in CHUNK_COUNTS}
    summary = {"rows": sum(r["rows"] for r in records),
               "turns_scored": counts["scored"], "skipped": {"over_length": counts["skipped_over_length"]},
               "truncated_left": counts["truncated_left"], "tokens": counts["tokens"],
               "turns_from_feature_cache": counts["from_cache"],
               "chunks": n_chunks, "turns_scored_by_this_run": total.scored,
               # per rank, over the chunks this run scored (a resumed run counts only its own work)
               "tokens_per_s_per_rank": round(total.tokens / total.seconds, 1) if total.seconds else None,
               "turns_per_s_per_rank": round(total.inputs / total.seconds, 2) if total.seconds else None,
               "padding_fraction": total.to_dict()["padding_fraction"], "wall_time_s": round(time.time() - t_start, 2),
               "peak_mem_mb": round(te.peak_memory_mb(info.device), 1), "world_size": info.world_size,
               "tensor_parallel": getattr(info, "tp", 1), "pipeline_parallel": getattr(info, "pp", 1),
               "sequence_parallel": getattr(info, "sequence_parallel", False),
               "rm": str(cfg.rm), "trained_attributes": scorer.trained_attributes,
               "written_attributes": written_attributes(cfg, scorer),
               "calibration": {"method": str(cfg.calibration.method), "attributes": calibration}, "load": load_stats}
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n", "the run summary")
    write_text_atomic(out_dir / MANIFEST, json.dumps({"output": output.name, "sha256": digest,
                                                      "fingerprint": fingerprint, "rows": summary["rows"]}) + "\n")
    shutil.rmtree(parts, ignore_errors=True)
    print0(f"labeled {summary['rows']} conversations ({counts['scored']} turns) -> {output} "
           f"[{summary['tokens_per_s_per_rank']} tok/s per rank, skipped {counts['skipped_over_length']}, "
           f"truncated {counts['truncated_left']}]")
    return summary
