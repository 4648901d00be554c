"""Steered generation: a stage-3 model answers prompts under attribute values chosen at inference time.

    from steerlm.steerable import SteerableModel
    model = SteerableModel.load("runs/sft/model")
    out = model.generate(["Explain DNS."], attributes={"verbosity": 0})
    print(out[0]["text"], out[0]["tokens"], out[0]["stopped"])

Everything the prompt needs comes from the model's card (`steerlm_sft.json`): the template, the stop
strings, which attributes are steerable and their defaults. Attributes the caller leaves unset (or
sets to None) take the card's defaults, so the label string always lists every steerable attribute,
as in training. Values are rounded to the scale's integers, as the training label strings were.

Decoding (`steerlm.generation`): continuous batching. The live batch holds as many rows as fit
`batch_tokens` KV-cache tokens (at least `batch_size`); a row that finishes leaves at once and the next
prompt (longest first) takes its slot; prompts that share a prefix (one prompt at several attribute
levels) prefill it once. Results are returned in input order. Greedy decoding is deterministic and
gives HF `generate`'s outputs; sampling is deterministic for a given seed, whatever the batch (one
generator per prompt; the caller's RNG state is untouched) but draws differently from HF `generate`.
`backend = "hf_generate"` keeps the previous path (HF `generate` on sorted, left-padded batches of
`batch_size`): the reference for tests and scripts/bench_generate.py, and what models whose
generation_config needs HF's logits processors (repetition_penalty, ...) or whose cache is not plain
full attention (sliding windows, ...) use. A stop string that is an added token stops as an eos id; other
stop strings are matched on the decoded tail. The text is cut at the first stop string (and eos).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .attributes import AttributeSchema
from .data.readers import loads_strict
from .errors import ConfigError, DataError
from .generation import Sampler, StopStrings, generate_continuous, unsupported
from .models.policy import load_for_generation, read_card
from .models.reward_model import load_tokenizer
from .sft_template import SFTFormat, prompt_ids
from .steering.levels import LevelSteering
from .steering.levels import merge as merge_specs
from .templates import END_OF_TURN

Prompt = Union[str, Mapping]


class PromptError(ValueError):
    """A malformed prompt; `field` names the offending key (for DataError's file:line: field messages)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"field {field!r}: {message}")


def normalize_prompt(prompt: Prompt, schema: AttributeSchema) -> tuple[Optional[str], list[dict]]:
    """A str (one user turn) or {"system": str|None, "turns": [...ending with a user turn]} -> (system, turns)."""
    if isinstance(prompt, str):
        return None, [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Mapping):
        raise PromptError("prompt", f"a prompt is a string or a {{system, turns}} mapping, got {type(prompt).__name__}")
    system = prompt.get("system")
    if system is not None and not isinstance(system, str):
        raise PromptError("system", "must be a string or null")
    turns = prompt.get("turns")
    if not isinstance(turns, list) or not turns:
        raise PromptError("turns", "must be a non-empty list of {role, content}")
    out = []
    for k, t in enumerate(turns):
        if not isinstance(t, Mapping) or t.get("role") not in ("user", "assistant") or not isinstance(t.get("content"), str):
            raise PromptError("turns", f"turn {k} must be {{role: user|assistant, content: str}}")
        labels = t.get("labels")
        if labels is not None:
            try:
                labels = {a: schema.check_value(a, v) for a, v in dict(labels).items()}
            except (TypeError, ValueError) as e:
                raise PromptError("turns", f"turn {k} labels: {e}") from None
        out.append({"role": t["role"], "content": t["content"], "labels": labels})
    if out[-1]["role"] != "user":
        raise PromptError("turns", "the last turn must be a user turn (the model answers it)")
    return system, out


def resolve_attributes(card: Mapping, schema: AttributeSchema,
                       overrides: Optional[Mapping[str, Optional[float]]] = None) -> dict[str, float]:
    """The card's `default_attributes` with `overrides` on top (None = default); values are integer levels.

    Raises ConfigError (one line) for a name that is unknown or not steerable in this model, and for a
    value that is not an integer level on the schema's scale (a fractional one is refused, never rounded).
    """
    steerable = list(card["steerable_attributes"])
    out = {a: float(v) for a, v in card["default_attributes"].items()}
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in steerable:
            why = (f"unknown attribute {name!r}" if name not in schema else
                   f"attribute {name!r} is not steerable in this model (absent from its training labels)")
            raise ConfigError(f"{why}; steerable: {', '.join(steerable)}")
        if isinstance(value, bool):
            raise ConfigError(f"attribute {name!r}: value {value!r} is not a number")
        try:
            v = schema.check_value(name, value)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if v != int(v):  # the model was trained on the integer levels only: rounding would change what was asked
            raise ConfigError(f"attribute {name!r}: value {value!r} is not a level of the scale; the model was "
                              f"trained on the integer levels {schema.scale_min:g}..{schema.scale_max:g}")
        out[name] = v
    return out


@dataclass
class GenerationStats:
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0  # tokens the model produced, the stopping token(s) included
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["seconds"] = round(self.seconds, 3)
        d["tokens_per_s"] = round(self.generated_tokens / self.seconds, 1) if self.seconds else None
        return d


class SteerableModel:
    """A stage-3 policy with its tokenizer, attribute schema and card (template, steerable attributes, defaults)."""

    def __init__(self, model, tokenizer, schema: AttributeSchema, card: dict, device: torch.device):
        self.model, self.tokenizer, self.schema, self.card, self.device = model, tokenizer, schema, card, device
        self.format = SFTFormat.from_dict(card["format"])
        self.steerable = list(card["steerable_attributes"])
        self.defaults = {a: float(v) for a, v in card["default_attributes"].items()}
        self.stop_strings = self.format.resolved_stop_strings(tokenizer)
        # a stop string that is an added token (<|im_end|>, <extra_id_1> in most vocabularies) stops as an eos id:
        # no per-step string matching; the others are matched on the decoded text (StopStrings; HF's stop_strings
        # on the hf_generate path). The text is cut at any of them.
        added = tokenizer.get_added_vocab()
        self.hf_stop_strings = [s for s in self.stop_strings if s not in added]
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        eos += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_ids = sorted({*eos, *(added[s] for s in self.stop_strings if s in added)})
        self.stats = GenerationStats()
        # decoding: "continuous" (steerlm.generation) or "hf_generate" (HF generate on fixed batches: the reference)
        self.backend = "continuous"
        # the live batch: as many rows as fit `batch_tokens` KV-cache tokens (prompt + new tokens each), <= max_rows.
        # On 2 CPU cores a step is matmul-bound from ~64 rows on (SmolLM2-135M: 64 rows 226, 128 rows 263
        # tokens/s of linears alone), and its KV cache costs 46 KB a token, so ~80 rows of a 200-token budget.
        self.batch_tokens = 16384 if device.type == "cpu" else 65536
        self.max_rows = 256
        # attribute vectors applied in proportion to each request's explicit levels (steerlm.steering.levels)
        self.level_steering: Optional[LevelSteering] = None

    @classmethod
    def load(cls, path: str, device: str = "auto", precision: str = "auto") -> "SteerableModel":
        """precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."""
        if precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
        card = read_card(path)
        schema = AttributeSchema.load(path)
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
        dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and dev.type == "cuda") else torch.float32
        tokenizer = load_tokenizer(path)
        model = load_for_generation(path, dtype=dtype).to(dev).eval()
        steerable = cls(model, tokenizer, schema, card, dev)
        steerable.level_steering = LevelSteering.load(path)  # the checkpoint's own vectors (sft.level_steering)
        return steerable

    # ------------------------------------------------------------------ attributes
    def resolve_attributes(self, overrides: Optional[Mapping[str, Optional[float]]] = None) -> dict[str, float]:
        """Card defaults with `overrides` on top (None = default), checked and rounded to the scale's integers."""
        return resolve_attributes(self.card, self.schema, overrides)

    def prompt_ids(self, prompt: Prompt, attributes: Optional[Mapping[str, Optional[float]]] = None) -> list[int]:
        system, turns = normalize_prompt(prompt, self.schema)
        return prompt_ids(self.format, self.tokenizer, self.schema, system, turns, self.resolve_attributes(attributes))

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], attributes=None, *, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 batch_size: int = 16, progress: bool = True, steering=None, level_steering: bool = True) -> list[dict]:
        """-> [{text, tokens, stopped, ids, attributes}] in input order.

        attributes: None (card defaults), one mapping for all prompts, or a list with one mapping per prompt.
        tokens: generated tokens before the stop string / eos; stopped: hit a stop string or eos
        (False: ran out of max_new_tokens); ids: the sampled token ids, the stopping token(s) included.
        progress: a tqdm bar when there is more than one batch. steering: activation steering, a
        `steerlm.steering.SteeringSpec` for every prompt or a list with one (or None) per prompt.
        batch_size: the rows decoded together (hf_generate), a floor on them (continuous).
        level_steering: also apply the checkpoint's level steering (if it has one) for each prompt's explicit
        attribute levels; False: the attribute string alone.
        """
        check_options(max_new_tokens, do_sample, temperature, top_p, top_k, batch_size)
        if isinstance(prompts, (str, Mapping)):
            raise ConfigError("generate() takes a list of prompts")
        if attributes is None or isinstance(attributes, Mapping):
            per_prompt = [attributes] * len(prompts)
        else:
            per_prompt = list(attributes)
            if len(per_prompt) != len(prompts):
                raise ConfigError(f"{len(per_prompt)} attribute mappings for {len(prompts)} prompts")
        resolved = [self.resolve_attributes(a) for a in per_prompt]
        if isinstance(steering, (list, tuple)) and len(steering) != len(prompts):
            raise ConfigError(f"{len(steering)} steering specs for {len(prompts)} prompts")
        if level_steering and self.level_steering is not None:
            given = steering if isinstance(steering, (list, tuple)) else [steering] * len(prompts)
            steering = [merge_specs(g, self.level_steering.spec(a)) for g, a in zip(given, per_prompt)]
        ids = []
        for i, p in enumerate(prompts):
            try:
                system, turns = normalize_prompt(p, self.schema)
            except PromptError as e:
                raise DataError("prompts", i + 1, e.field, e.message) from None
            ids.append(prompt_ids(self.format, self.tokenizer, self.schema, system, turns, resolved[i]))
        t0 = time.time()
        reason = "backend='hf_generate'" if self.backend == "hf_generate" else unsupported(self.model, do_sample)
        with tqdm(total=len(ids), desc="generate", unit="resp", disable=len(ids) <= batch_size or not progress,
                  dynamic_ncols=True) as bar:
            if reason is None:
                sampler = Sampler(do_sample, float(temperature), int(top_k), float(top_p), int(seed), int(max_new_tokens))
                new = generate_continuous(
                    self.model, ids, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_token_id,
                    sampler=sampler, max_rows=self.live_rows(ids, max_new_tokens, batch_size), steering=steering,
                    stop=StopStrings(self.tokenizer, self.hf_stop_strings) if self.hf_stop_strings else None,
                    on_done=lambda _i: bar.update(1))
                results = [{**self.finish_text(n), "attributes": a} for n, a in zip(new, resolved)]
            else:
                results = self._generate_hf(ids, resolved, max_new_tokens, do_sample, temperature, top_p, top_k, seed,
                                            batch_size, steering, bar)
        self.stats.prompts += len(ids)
        self.stats.prompt_tokens += sum(map(len, ids))
        self.stats.seconds += time.time() - t0
        return results

    def live_rows(self, ids: Sequence[list[int]], max_new_tokens: int, batch_size: int) -> int:
        """Rows decoded together: at least batch_size, more while their KV cache fits in `batch_tokens` tokens."""
        per_row = sum(map(len, ids)) / max(1, len(ids)) + max_new_tokens
        return max(int(batch_size), min(self.max_rows, int(self.batch_tokens // per_row)))

    def _generate_hf(self, ids, resolved, max_new_tokens, do_sample, temperature, top_p, top_k, seed, batch_size,
                     steering, bar) -> list[dict]:
        """The reference path: HF `generate` on fixed, left-padded batches of `batch_size` (longest first)."""
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {"do_sample": False}
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
        results: list[Optional[dict]] = [None] * len(ids)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                specs = [steering[i] for i in batch] if isinstance(steering, (list, tuple)) else steering
                for i, new in zip(batch, self._generate_batch([ids[i] for i in batch], max_new_tokens, sampling, specs)):
                    results[i] = {**new, "attributes": resolved[i]}
                bar.update(len(batch))
        return results

    def left_padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token id lists -> (input_ids, attention_mask, width), left-padded: every row's last token is at -1."""
        pad = self.tokenizer.pad_token_id
        width = max(map(len, seqs))
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return input_ids, mask, width

    def _generate_batch(self, seqs: list[list[int]], max_new_tokens: int, sampling: dict, specs=None) -> list[dict]:
        from .steering import steer

        pad = self.tokenizer.pad_token_id
        input_ids, mask, width = self.left_padded(seqs)
        stops = dict(stop_strings=self.hf_stop_strings, tokenizer=self.tokenizer) if self.hf_stop_strings else {}
        # left-padded: every row's prompt ends at `width`; "generated" steering starts there
        with steer(self.model, specs, batch_size=len(seqs), prompt_lengths=[width] * len(seqs)):
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      eos_token_id=self.eos_ids, pad_token_id=pad, **stops, **sampling)
        return [self.finish_text(row.tolist()) for row in out[:, width:].cpu()]

    def finish_text(self, new_ids: list[int], stops: Sequence[str] = ()) -> dict:
        """Generated ids (finished rows are padded on the right) -> text up to the first eos / stop string
        (the card's, plus `stops`: a server request's own)."""
        stop_strings = [*self.stop_strings, *stops]
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        eos_at = next((k for k, t in enumerate(new_ids) if t in self.eos_ids), None)
        ids = new_ids[:eos_at] if eos_at is not None else new_ids
        while eos_at is None and ids and ids[-1] == self.tokenizer.pad_token_id:
            ids = ids[:-1]  # a row that stopped at a stop string, padded while the batch went on
        # what was sampled up to and including what stopped it (eos / stop string): RL trains on these exact ids
        sampled = new_ids[:eos_at + 1] if eos_at is not None else list(ids)
        self.stats.generated_tokens += len(ids) + (eos_at is not None)
        text = decode(ids)
        hits = [p for p in (text.find(s) for s in stop_strings) if p >= 0]
        n_tokens = len(ids)
        if hits:
            cut = min(hits)
            lo, hi = 0, len(ids)  # binary search: the most tokens whose text ends at or before the stop string
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if len(decode(ids[:mid])) <= cut else (lo, mid - 1)
            text, n_tokens = text[:cut], lo
            end = next(m for m in range(lo + 1, len(ids) + 1) if any(x in decode(ids[:m]) for x in stop_strings))
            sampled = ids[:end]
        if self.format.template == "nemo" and text.endswith(END_OF_TURN):
            text = text[:-len(END_OF_TURN)]  # NeMo writes "{response}\n<extra_id_1>"
        return {"text": text, "tokens": n_tokens, "stopped": eos_at is not None or bool(hits), "ids": sampled}


def check_options(max_new_tokens, do_sample, temperature, top_p, top_k, batch_size) -> None:
    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if do_sample and not (float(temperature) > 0 and 0 < float(top_p) <= 1 and int(top_k) >= 0):
        raise ConfigError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")


# ===== prompts files and the recipes' steering block ===========================================
def read_prompts_file(path: str, schema: AttributeSchema) -> list[Prompt]:
    """.txt: one prompt per line; .jsonl: {"prompt": str} or {"system", "turns"} per line. Blank lines are skipped."""
    p = Path(path)
    if p.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"prompts_file {path}: use a .txt (one prompt per line) or .jsonl file")
    if not p.exists():
        raise FileNotFoundError(f"prompts_file {path} does not exist")
    prompts: list[Prompt] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".txt":
            prompts.append(line)
            continue
        row = loads_strict(line, str(path), n)
        if not isinstance(row, dict):
            raise DataError(path, n, None, "a line must be a JSON object with 'prompt' or 'turns'")
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise DataError(path, n, "prompt", "must be a non-empty string")
            row = {"system": row.get("system"), "turns": [{"role": "user", "content": row["prompt"]}]}
        elif "turns" not in row:
            raise DataError(path, n, "prompt", "missing: give 'prompt' (a string) or 'turns' (a conversation)")
        try:
            normalize_prompt(row, schema)
        except PromptError as e:
            raise DataError(path, n, e.field, e.message) from None
        prompts.append(row)
    if not prompts:
        raise DataError(path, None, None, "no prompts in the file")
    return prompts


def steering_spec(cfg: DictConfig, model: SteerableModel):
    """The recipe's `steering` block as one spec for every prompt (None: no steering)."""
    from .engines.torch_engine import decoder_layers
    from .steering.vectors import spec_from_config

    block = OmegaConf.to_container(cfg.steering, resolve=True) if cfg.get("steering") is not None else None
    return spec_from_config(block, len(decoder_layers(model.model)))
