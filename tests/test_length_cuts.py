"""Length-contrast copies: cut at sentence boundaries, labeled by the training set's length quantiles."""

from steerlm.data.length_cuts import cut_points, length_bins, length_cut_copies, level_of, words

LEVELS = [0, 1, 2, 3, 4]


def conv(i: int, n_sentences: int, label: float = 2.0) -> dict:
    answer = " ".join(f"Sentence {k} of answer {i} has some words." for k in range(n_sentences))
    return {"id": f"c{i}", "system": None, "turns": [{"role": "user", "content": f"Question {i}?", "labels": None},
                                                     {"role": "assistant", "content": answer,
                                                      "labels": {"verbosity": label, "humor": 1.0}}]}


def test_cut_points_are_sentence_and_line_ends():
    text = "One two. Three four!\nFive six? Seven"
    assert [text[:e] for e in cut_points(text)] == ["One two.", "One two. Three four!", "One two. Three four!\nFive six?"]


def test_levels_are_quantile_bins_of_the_lengths():
    counts = list(range(1, 101))
    bins = length_bins(counts, LEVELS)
    assert [level_of(c, bins, LEVELS) for c in (1, 20, 21, 50, 80, 81, 100)] == [0, 0, 1, 2, 3, 4, 4]
    assert [sum(level_of(c, bins, LEVELS) == v for c in counts) for v in LEVELS] == [20] * 5


def test_copies_are_shorter_lower_levels_of_the_same_prompt():
    convs = [conv(i, n) for i, n in enumerate([1, 2, 4, 8, 16] * 4)]
    out, stats = length_cut_copies(convs, "verbosity", LEVELS, copies=2, relabel=True, seed=0)
    originals = {c["id"]: c for c in out if "#cut" not in c["id"]}
    assert len(originals) == len(convs) and stats["relabeled"] == len(convs)
    # relabeled originals: verbosity follows length exactly, other labels kept
    by_len = sorted(originals.values(), key=lambda c: words(c["turns"][-1]["content"]))
    levels = [c["turns"][-1]["labels"]["verbosity"] for c in by_len]
    assert levels == sorted(levels) and levels[0] == 0 and levels[-1] == 4
    assert all(c["turns"][-1]["labels"]["humor"] == 1.0 for c in out)
    cuts = [c for c in out if "#cut" in c["id"]]
    assert len(cuts) == stats["copies"] > 0
    for c in cuts:
        whole = originals[c["id"].split("#")[0]]
        short, full = c["turns"][-1]["content"], whole["turns"][-1]["content"]
        assert full.startswith(short) and short.endswith(".") and len(short) < len(full)
        assert c["turns"][:-1] == whole["turns"][:-1]  # the same prompt
        assert c["turns"][-1]["labels"]["verbosity"] < whole["turns"][-1]["labels"]["verbosity"]
    # a one-sentence answer has nowhere to cut
    assert not any(c["id"].startswith("c0#") for c in cuts)


def test_relabel_false_keeps_the_originals_labels():
    convs = [conv(i, n, label=3.0) for i, n in enumerate([2, 4, 8, 16, 32])]
    out, _ = length_cut_copies(convs, "verbosity", LEVELS, copies=1, relabel=False, seed=0)
    assert all(c["turns"][-1]["labels"]["verbosity"] == 3.0 for c in out if "#cut" not in c["id"])


def test_levels_come_from_answers_that_fit_and_long_answers_give_copies_that_fit():
    # answers of 1..20 sentences; the trainer takes at most 10 sentences (fits), so the top level must be
    # trained from answers that fit and from cut copies of the long ones
    convs = [conv(i, n) for i, n in enumerate(range(1, 21))]
    n_sent = lambda c: c["turns"][-1]["content"].count(".")
    fits = lambda c: n_sent(c) <= 10
    out, stats = length_cut_copies(convs, "verbosity", LEVELS, copies=1, relabel=True, seed=0, fits=fits)
    assert stats["answers_that_fit"] == 10 and stats["long_answers_cut_to_fit"] == 10
    trainable = [c for c in out if fits(c)]
    levels = {c["turns"][-1]["labels"]["verbosity"] for c in trainable}
    assert levels == set(LEVELS)  # every level, the top one included, has answers the trainer keeps
    top = [c for c in trainable if c["turns"][-1]["labels"]["verbosity"] == 4]
    assert len(top) >= 2 and all(n_sent(c) >= 9 for c in top)
    # without `fits` the bins spread over all 20 lengths: answers that fit never reach the top level
    out_all, _ = length_cut_copies(convs, "verbosity", LEVELS, copies=1, relabel=True, seed=0)
    assert not any(fits(c) and c["turns"][-1]["labels"]["verbosity"] == 4 for c in out_all)
