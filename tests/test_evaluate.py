"""Steerability evaluation: the report's statistics on synthetic numbers (checked by hand), the input
checks, and one real CLI run on the tiny SFT model rated by a tiny stage-1 RM (both trained on the five
HelpSteer2 attributes), which must write the JSON, the samples and a PNG that agree with each other.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import HS2_SAMPLE as HS2, run_recipe, tiny_reward_overrides
from steerlm.attributes import BUILTIN_SCHEMAS
from steerlm.data.sources import load_mixture
from steerlm.errors import ConfigError
from steerlm.stages.evaluate import check_levels, choose_attributes, format_table, load_prompts, steerability_report
from test_generate import HS2_ATTRS, train_tiny_sft

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEVELS = [0, 2, 4]
N_PROMPTS = 3
N_SAMPLES = 2


def sample(attribute, level, score, tokens=10, stopped=True):
    return {"attribute": attribute, "level": level, "tokens": tokens, "stopped": stopped,
            "scores": None if score is None else {attribute: score, "other": -99.0}}


# ===== the report on synthetic numbers ===========================================================
def test_report_statistics_match_hand_computed_values():
    # requested 0,0,1,1,2,2 vs measured 1,3,2,4,60,50: the ranks of x are 1.5,1.5,3.5,3.5,5.5,5.5 and of y
    # 1,3,2,4,6,5, so Spearman = sum(dx*dy)/sqrt(sum dx^2 * sum dy^2) = 14/sqrt(16*17.5) = 14/sqrt(280).
    levels = [0, 1, 2]
    ys = [1, 3, 2, 4, 60, 50]
    samples = [sample("verbosity", lev, y, tokens=t, stopped=s) for lev, y, t, s in
               zip([0, 0, 1, 1, 2, 2], ys, [5, 7, 20, 20, 40, 30], [True, True, True, False, True, True])]
    samples += [sample("verbosity", 2, None, tokens=50),  # not scored by the RM: counts for length only
                sample("humor", 0, 0.0), sample("humor", 1, 9.0), sample("humor", 2, 4.0)]
    rep = steerability_report(samples, ["verbosity", "humor"], levels)
    v = rep["verbosity"]
    assert v["spearman"] == pytest.approx(14 / math.sqrt(280))
    # Pearson on raw values is not rank-invariant: 60 and 50 pull it up
    x, y = np.array([0, 0, 1, 1, 2, 2.]), np.array(ys, dtype=float)
    dx, dy = x - x.mean(), y - y.mean()
    assert v["pearson"] == pytest.approx(np.sum(dx * dy) / math.sqrt(np.sum(dx**2) * np.sum(dy**2)))
    assert v["pearson"] != pytest.approx(v["spearman"], abs=1e-3)
    assert v["slope"] == pytest.approx(26.5)  # sum(dx*dy)/sum(dx^2) = (19 + 17 + 40 + 30) / 4
    assert v["measured_mean"] == pytest.approx([2.0, 3.0, 55.0])
    assert v["measured_sem"] == pytest.approx([1.0, 1.0, 5.0])  # std(ddof=1)/sqrt(2) of pairs 2 apart / 10 apart
    assert v["length_mean"] == pytest.approx([6.0, 20.0, 40.0]) and v["n_per_level"] == [2, 2, 3]
    # length: 5,7 | 20,20 | 40,30,50 against 0,0,1,1,2,2,2 -> strictly grouped, Spearman of grouped ranks
    assert v["length_spearman"] == pytest.approx(
        np.corrcoef([1.5, 1.5, 3.5, 3.5, 6, 6, 6], [1, 2, 3.5, 3.5, 6, 5, 7])[0, 1])
    assert (v["n"], v["n_scored"], v["stopped_fraction"]) == (7, 6, pytest.approx(6 / 7))
    h = rep["humor"]  # other attributes' samples never leak in; one sample per level: no standard error
    assert h["measured_mean"] == [0.0, 9.0, 4.0] and h["measured_sem"] == [None, None, None]
    assert h["spearman"] == pytest.approx(0.5) and h["length_spearman"] is None  # constant length: undefined
    table = format_table(rep)
    assert "verbosity" in table and f"{14 / math.sqrt(280):.2f}" in table and "n/a" in table
    # every sample its own prompt (no prompt_id): the interval brackets the point estimate
    ci = v["rm_ci"]
    assert ci["lo"] <= v["spearman"] <= ci["hi"] and ci["n"] == 6 and v["verdict"] in ("follows", "noise")


def test_report_slope_is_ols():
    samples = [sample("verbosity", lev, 0.5 * lev + 1 + e) for lev, e in [(0, 0.1), (0, -0.1), (4, 0.2), (4, -0.2)]]
    assert steerability_report(samples, ["verbosity"], [0, 4])["verbosity"]["slope"] == pytest.approx(0.5)


def test_attribute_and_level_checks():
    assert choose_attributes(None, HS2_ATTRS, ["verbosity", "helpfulness", "quality"]) == ["helpfulness", "verbosity"]
    with pytest.raises(ConfigError, match="'quality' is not steerable"):
        choose_attributes(["quality"], HS2_ATTRS, ["quality"])
    with pytest.raises(ConfigError, match="RM was not trained on 'verbosity'"):
        choose_attributes(["verbosity"], HS2_ATTRS, ["helpfulness"])
    with pytest.raises(ConfigError, match="none of the model's steerable"):
        choose_attributes(None, HS2_ATTRS, ["quality"])
    schema = BUILTIN_SCHEMAS["steerlm9"]
    assert check_levels([0, 2.0, 4], schema) == [0, 2, 4]
    for bad in ([0, 5], [0, 1.5], [2, 2], [0, "x"]):
        with pytest.raises(ConfigError, match="levels"):
            check_levels(bad, schema)


def test_prompts_are_unique_first_user_turns():
    prompts = load_prompts([{"format": "helpsteer2", "path": HS2}], BUILTIN_SCHEMAS["steerlm9"], 1000)
    assert 1 < len(prompts) < 100  # HelpSteer2 rates several responses per prompt
    assert len({(p["system"], p["turns"][0]["content"]) for p in prompts}) == len(prompts)
    assert all(len(p["turns"]) == 1 and p["turns"][0]["role"] == "user" for p in prompts)
    assert load_prompts([{"format": "helpsteer2", "path": HS2}], BUILTIN_SCHEMAS["steerlm9"], 3) == prompts[:3]


# ===== the CLI ===================================================================================
@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("steer_eval")
    rm_overrides = tiny_reward_overrides(tiny_model_dir, base / "rm", f"data.train=[{{format: helpsteer2, path: {HS2}}}]")
    with ThreadPoolExecutor(2) as pool:  # the SFT model and the RM side by side
        sft = pool.submit(train_tiny_sft, tiny_model_dir, tmp_path_factory)
        pool.submit(run_recipe, "train_reward", *rm_overrides).result()
        sft_dir = sft.result()
    labeled = base / "labeled.jsonl"  # HelpSteer2's human labels: the activation vectors' and conditioning's data
    conversations, _ = load_mixture([{"format": "helpsteer2", "path": HS2}], BUILTIN_SCHEMAS["steerlm9"])
    labeled.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    common = [f"model.path={sft_dir}", f"rm={base / 'rm' / 'model'}", f"n_prompts={N_PROMPTS}",
              "levels=[0,2,4]", "generation.max_new_tokens=12", f"n_samples={N_SAMPLES}", "n_boot=200"]
    full = ["baselines.methods=[prompting,activation]", f"baselines.activation.labeled={labeled}",
            "baselines.activation.coefficients=[-2,-1,0,1,2]", "baselines.activation.max_per_side=8",
            "baselines.activation.max_length=2048", "conditioning.max_length=2048",
            f"conditioning.data=[{{format: canonical, path: {labeled}}}]", "conditioning.n=12"]
    jobs = {"ok": [*common, *full, f"output_dir={base / 'eval'}"],
            "not_steerable": [*common, f"output_dir={base / 'bad'}", "attributes=[quality]"]}
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(jobs, pool.map(lambda ov: run_recipe("evaluate", *ov, check=False), jobs.values())))
    return {"procs": procs, "out": base / "eval", "bad": base / "bad"}


def test_evaluate_writes_consistent_json_samples_and_png(runs):
    proc, out = runs["procs"]["ok"], runs["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "steerability.json").read_text())
    assert list(result["attributes"]) == HS2_ATTRS  # steerable and RM-trained: all five, in card order
    assert result["levels"] == LEVELS and result["n_prompts"] == N_PROMPTS and result["n_samples"] == N_SAMPLES
    assert result["generation_stats"]["tokens_per_s"] > 0 and result["peak_mem_mb"] > 0
    every = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    samples = [s for s in every if s["method"] == "ac_sft"]
    assert len(samples) == len(HS2_ATTRS) * len(LEVELS) * N_PROMPTS * N_SAMPLES
    per_prompt = len(HS2_ATTRS) * len(LEVELS) * N_PROMPTS  # baselines: one sample per (prompt, level)
    assert sum(s["method"] == "prompting" for s in every) == sum(s["method"] == "activation" for s in every) == per_prompt
    # prompting: the level in words as the system prompt; the base model has no attribute string to follow
    verbosity_0 = next(s for s in every if s["method"] == "prompting" and s["attribute"] == "verbosity" and s["level"] == 0)
    assert verbosity_0["system"] == "Answer in one short sentence." and verbosity_0["attributes"] == {}
    assert set(result["methods"]) == {"ac_sft", "prompting", "activation"}
    side = result["methods"]["ac_sft"]["side_effects"]  # requested x measured: every RM head, length, text measures
    assert set(side) == set(HS2_ATTRS) and {"tokens", "rm:verbosity", "text:words", "text:fk_grade"} <= set(side["helpfulness"])
    cell = side["verbosity"]["tokens"]
    assert cell["n"] == len(LEVELS) * N_PROMPTS * N_SAMPLES and cell["slope"]["n_clusters"] == N_PROMPTS
    cond = result["conditioning"]
    assert set(cond) == {"policy", "base"} and set(cond["policy"]["attributes"]) == set(HS2_ATTRS)
    for who in ("policy", "base"):
        m = cond[who]["attributes"]["verbosity"]
        assert m["n"] == 12 and m["strength"]["lo"] <= m["strength"]["value"] <= m["strength"]["hi"]
    defaults = result["defaults"]
    for s in samples:  # the requested attribute at its level, every other one at the card default
        assert s["attributes"] == {**defaults, s["attribute"]: float(s["level"])}
        assert set(s["scores"]) == set(HS2_ATTRS) and 0 < s["tokens"] <= 12
    for a, m in result["attributes"].items():
        assert {"spearman", "pearson", "slope", "measured_mean", "measured_sem", "length_mean", "length_spearman",
                "n", "stopped_fraction", "rm_ci", "length_ci", "verdict"} <= set(m)
        assert m["n"] == m["n_scored"] == len(LEVELS) * N_PROMPTS * N_SAMPLES and len(m["measured_mean"]) == len(LEVELS)
        assert m["rm_ci"]["n_clusters"] == N_PROMPTS  # the interval resamples prompts, not answers
        for lev, mean in zip(LEVELS, m["measured_mean"]):  # the JSON agrees with the samples it came from
            assert mean == pytest.approx(np.mean([s["scores"][a] for s in samples if s["attribute"] == a and s["level"] == lev]))
        assert m["spearman"] == pytest.approx(steerability_report(samples, [a], LEVELS, n_boot=0)[a]["spearman"])
    png = (out / "steerability.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert not list(out.glob("*.tmp"))
    assert "Spearman" in proc.stdout and "tokens/s" in proc.stdout and all(a in proc.stdout for a in HS2_ATTRS)


def test_evaluate_cli_bad_attribute_exits_2_with_one_line(runs):
    proc = runs["procs"]["not_steerable"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("steerlm: error: attributes: 'quality' is not steerable"), lines[-1]
    assert not (runs["bad"] / "steerability.json").exists()
