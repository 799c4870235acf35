"""Calibrated thresholds against a direct numpy computation on a small labelled set."""

import math
import types

import numpy as np
import pytest

from reid_tf.evaluate import calibration


def labelled(ids, cameras):
    return types.SimpleNamespace(person_ids=np.array(ids), camera_ids=np.array(cameras))


def people_set(count, scale, seed):
    """`count` people, each a direction on the sphere; 2 queries (camera 0 and 1) and 3 gallery
    images (cameras 0, 1, 1) per person, each the person's direction plus noise of `scale`."""
    rng = np.random.default_rng(seed)
    people = rng.normal(size=(count, 16))

    def images(cameras):
        ids = np.repeat(np.arange(count), len(cameras))
        cams = np.tile(cameras, count)
        return people[ids] + rng.normal(scale=scale, size=(len(ids), 16)), labelled(ids, cams)

    query_embeddings, query = images([0, 1])
    gallery_embeddings, gallery = images([0, 1, 1])
    return query_embeddings, query, gallery_embeddings, gallery


@pytest.fixture(scope="module")
def small_set():
    return people_set(12, scale=0.9, seed=3)


def direct_distances(q, g):
    d = np.empty((len(q), len(g)))
    for i in range(len(q)):
        for j in range(len(g)):
            d[i, j] = 1 - q[i] @ g[j] / (np.linalg.norm(q[i]) * np.linalg.norm(g[j]))
    return d


def direct_threshold(scores, far):
    """The largest candidate threshold whose accepted share (`score < t`) is at most far."""
    candidates = sorted(scores) + [math.inf]
    return max(t for t in candidates if np.mean([s < t for s in scores]) <= far)


def test_thresholds_and_rates_match_numpy(small_set):
    q, query, g, gallery = small_set
    fitted = calibration.fit(q, query, g, gallery, fars=(0.2, 0.05, 0.01))
    d = direct_distances(q, g)
    genuine, impostor = [], []
    for i in range(len(q)):
        for j in range(len(g)):
            if query.person_ids[i] != gallery.person_ids[j]:
                impostor.append(d[i, j])
            elif query.camera_ids[i] != gallery.camera_ids[j]:
                genuine.append(d[i, j])
    assert fitted["measured_on"]["genuine_pairs"] == len(genuine) == 24 * 2 - 12
    assert fitted["measured_on"]["impostor_pairs"] == len(impostor) == 24 * 36 - 24 * 3
    strangers, nearest, correct = [], [], []
    for i in range(len(q)):
        others = [d[i, j] for j in range(len(g)) if gallery.person_ids[j] != query.person_ids[i]]
        strangers.append(min(others))
        kept = [j for j in range(len(g)) if not (gallery.person_ids[j] == query.person_ids[i]
                                                 and gallery.camera_ids[j] == query.camera_ids[i])]
        best = min(kept, key=lambda j: d[i, j])
        nearest.append(d[i, best])
        correct.append(gallery.person_ids[best] == query.person_ids[i])
    for far, pair, point in zip((0.2, 0.05, 0.01), fitted["verification"], fitted["open_set"]):
        assert pair["far"] == point["far"] == far
        t = direct_threshold(impostor, far)
        assert pair["threshold"] == pytest.approx(t, abs=1e-6)
        assert pair["tar"] == pytest.approx(np.mean([x < t for x in genuine]))
        assert pair["measured_far"] <= far
        t = direct_threshold(strangers, far)
        assert point["threshold"] == pytest.approx(t, abs=1e-6)
        assert point["dir"] == pytest.approx(np.mean([c and n < t for c, n in
                                                      zip(correct, nearest)]))
    # 24 strangers: a FAR of 0.01 is below one query's worth, so nothing is accepted there.
    assert fitted["open_set"][2]["measured_far"] == 0 and not fitted["open_set"][2]["resolved"]
    assert fitted["verification"][2]["resolved"]
    # Stricter FAR, smaller threshold and TAR.
    assert [p["threshold"] for p in fitted["verification"]] == sorted(
        [p["threshold"] for p in fitted["verification"]], reverse=True)


def test_threshold_of_tied_scores_never_exceeds_the_far():
    scores = [0.1, 0.2, 0.2, 0.2, 0.5]
    assert calibration.far_threshold(scores, 0.2) == 0.2  # accepts 0.1 only: 1 of 5
    assert calibration.far_threshold(scores, 0.5) == 0.2  # a tie at the cut: still 1 of 5
    assert calibration.far_threshold(scores, 0.8) == 0.5
    assert calibration.far_threshold(scores, 0.999) == 0.5
    assert calibration.far_threshold([0.3], 0.5) == 0.3  # nothing accepted
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 of 100 accepted.
    assert calibration.far_threshold(np.arange(100) / 100, 0.29) == 0.29


def test_p_same_is_the_posterior_at_the_pairs_own_share():
    """Unweighted: with same-person pairs 1 in 11, p(same) is the Bayes posterior at that prior
    (exact for two normal classes of equal spread, which a logistic model represents)."""
    rng = np.random.default_rng(0)
    genuine, impostor = rng.normal(0.4, 0.1, 2000), rng.normal(0.6, 0.1, 20000)
    fitted = calibration.fit_p_same(np.concatenate([genuine, impostor]),
                                    np.arange(22000) < 2000)
    assert fitted["prior"] == pytest.approx(1 / 11)
    d = np.array([0.3, 0.4, 0.45, 0.5, 0.6])
    likelihood = lambda mean: np.exp(-(d - mean) ** 2 / (2 * 0.1 ** 2))  # noqa: E731
    posterior = likelihood(0.4) / (likelihood(0.4) + 10 * likelihood(0.6))
    np.testing.assert_allclose(calibration.p_same({"p_same": fitted}, d), posterior, atol=0.03)
    assert calibration.p_same({}, [0.2]) is None


def test_p_same_separates_distances_on_any_scale():
    """A model whose distances all lie within 0.05 still gets a sharp probability."""
    rng = np.random.default_rng(1)
    distances = np.concatenate([rng.normal(0.01, 0.002, 3000), rng.normal(0.03, 0.002, 3000)])
    fitted = calibration.fit_p_same(distances, np.arange(6000) < 3000)
    p = calibration.p_same({"p_same": fitted}, [0.005, 0.035])
    assert p[0] > 0.99 and p[1] < 0.01


@pytest.fixture(scope="module")
def large_set():
    """200 people: enough validation hits to check p_same on held-out ones."""
    return people_set(200, scale=0.7, seed=5)


def test_p_same_answers_the_cards_question_and_is_checked_on_held_out_hits(large_set):
    """Issue 39: p_same was fitted on every pair at even odds, so a card could read "No match"
    beside p(same) 1.00. It is now fitted on half of the validation queries' top-10 hits (the
    pairs a card shows, at their real share of the same person) and kept only when the other
    half's hits find it calibrated: its reliability table and ECE, against numpy here."""
    query_embeddings, query, gallery_embeddings, gallery = large_set
    fitted = calibration.fit(query_embeddings, query, gallery_embeddings, gallery)
    model = fitted["p_same"]
    assert model["top_k"] == 10 and "top 10" in model["question"]
    # The held-out half, directly: the queries of the identities not drawn first.
    identities = np.random.default_rng(0).permutation(np.unique(query.person_ids))
    held = ~np.isin(query.person_ids, identities[:100])
    d = direct_distances(query_embeddings[held], gallery_embeddings)
    distances, same = [], []
    for i, row in zip(np.flatnonzero(held), d):
        keep = [j for j in range(len(row)) if not (gallery.person_ids[j] == query.person_ids[i]
                                                     and gallery.camera_ids[j] == query.camera_ids[i])]
        for j in sorted(keep, key=lambda j: row[j])[:10]:
            distances.append(row[j])
            same.append(gallery.person_ids[j] == query.person_ids[i])
    p = 1 / (1 + np.exp(-(model["intercept"] + model["coef"] * np.array(distances))))
    assert model["held_out"]["pairs"] == len(distances) == 2000
    ece, rows = 0.0, []
    for b in range(10):
        chosen = np.minimum((p * 10).astype(int), 9) == b
        if chosen.any():
            gap = abs(p[chosen].mean() - np.mean(np.array(same)[chosen]))
            ece += chosen.sum() / len(p) * gap
            rows.append((b / 10, int(chosen.sum())))
    assert model["held_out"]["ece"] == pytest.approx(ece, abs=1e-6)
    table = model["held_out"]["reliability"]
    assert [row["pairs"] for row in table] == [pairs for _, pairs in rows]
    assert [row["p"][0] for row in table] == pytest.approx([low for low, _ in rows])
    assert model["held_out"]["ece"] <= 0.05
    # The share of the same person among ranked hits, not among all pairs (about 1 in 200).
    assert 0.1 < model["prior"] < 0.3


def test_p_same_is_not_kept_when_held_out_hits_find_it_uncalibrated_or_too_few():
    rng = np.random.default_rng(2)

    def hits(genuine_mean, n):
        same = rng.random(n) < 0.2
        return np.where(same, rng.normal(genuine_mean, 0.1, n), rng.normal(0.6, 0.1, n)), same

    kept = calibration.held_out_p_same(hits(0.4, 2000), hits(0.4, 2000))
    assert kept["p_same"]["held_out"]["ece"] < 0.03
    # The held-out people's genuine hits lie farther: p(same) is too confident there.
    shifted = calibration.held_out_p_same(hits(0.4, 2000), hits(0.5, 2000))
    assert "p_same" not in shifted
    assert shifted["p_same_refused"].startswith("not calibrated on held-out validation hits: "
                                                 "expected calibration error 0.")
    few = calibration.held_out_p_same(hits(0.4, 400), hits(0.4, 400))
    assert "too few validation hits" in few["p_same_refused"] and "500 needed" in \
        few["p_same_refused"]


def test_threshold_lookup_names_the_fitted_rates(small_set):
    fitted = calibration.fit(*small_set, fars=(0.1, 0.01))
    assert calibration.threshold(fitted, "verification", 0.01) == \
        fitted["verification"][1]["threshold"]
    with pytest.raises(ValueError, match="FAR 0.05: not fitted; the calibration has 0.1, 0.01"):
        calibration.threshold(fitted, "verification", 0.05)
    with pytest.raises(ValueError, match="not a reid-tf calibration"):
        calibration.check({"verification": []})
    assert calibration.check(fitted) is fitted


def test_open_set_evaluation_matches_numpy(small_set):
    q, query, g, gallery = small_set
    fitted = calibration.fit(q, query, g, gallery, fars=(0.3, 0.1))
    report = calibration.evaluate_open_set(q, query, g, gallery, fitted, seed=1)
    unknown = calibration.split_unknown(query.person_ids, 1 / 3, 1)
    assert len(unknown) == 4 and report["unknown_identities"] == 4
    d = direct_distances(q, g)
    kept = [j for j in range(len(g)) if gallery.person_ids[j] not in unknown]
    assert report["gallery"] == len(kept) == 24
    for point in report["points"]:
        t = point["threshold"]
        accepted_unknown, found_known = [], []
        for i in range(len(q)):
            candidates = [j for j in kept if not (gallery.person_ids[j] == query.person_ids[i]
                                                  and gallery.camera_ids[j] == query.camera_ids[i])]
            best = min(candidates, key=lambda j: d[i, j])
            if query.person_ids[i] in unknown:
                accepted_unknown.append(d[i, best] < t)
            else:
                found_known.append(gallery.person_ids[best] == query.person_ids[i]
                                   and d[i, best] < t)
        assert point["measured_far"] == pytest.approx(np.mean(accepted_unknown))
        assert point["dir"] == pytest.approx(np.mean(found_known))
    assert report["known_queries"] == 16 and report["unknown_queries"] == 8


def test_an_inverted_p_same_fit_is_refused_at_fit_and_at_load(large_set, tmp_path):
    """A model whose validation genuine pairs lie no nearer than its impostors would get a
    p_same that rises with distance: the fit records why it has none, and a file that carries
    one is refused."""
    query_embeddings, query, gallery_embeddings, gallery = large_set
    good = calibration.fit(query_embeddings, query, gallery_embeddings, gallery)
    assert good["p_same"]["coef"] < 0 and "p_same_refused" not in good
    # Hits of the same person lying farther than the others': the fit would rise with distance.
    rng = np.random.default_rng(4)
    same = rng.random(3000) < 0.2
    hits = np.where(same, rng.normal(0.6, 0.1, 3000), rng.normal(0.4, 0.1, 3000)), same
    refused = calibration.held_out_p_same(hits, hits)
    assert "p_same" not in refused and "inverted fit" in refused["p_same_refused"]
    # Every gallery image pointing away from its person: no same-person hit ranks at all.
    inverted = calibration.fit(query_embeddings, query, -gallery_embeddings, gallery)
    assert "p_same" not in inverted and inverted["p_same_refused"]
    calibration.check(inverted)  # thresholds alone are still a calibration
    bad = dict(good, p_same=dict(good["p_same"], coef=-good["p_same"]["coef"]))
    with pytest.raises(ValueError, match="p_same is inverted"):
        calibration.check(bad)
    with pytest.raises(ValueError, match=r"open_set\[0\]\.threshold"):
        calibration.check(dict(good, open_set=[dict(good["open_set"][0], threshold="0.2")]))


def test_each_operating_point_carries_exact_binomial_intervals(small_set):
    from scipy.stats import binomtest

    query_embeddings, query, gallery_embeddings, gallery = small_set
    fitted = calibration.fit(query_embeddings, query, gallery_embeddings, gallery)
    counts = fitted["measured_on"]
    for point in fitted["open_set"]:
        n = counts["stranger_queries"]
        k = round(point["measured_far"] * n)
        expected = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert point["far_interval"] == pytest.approx([expected.low, expected.high])
        found = round(point["dir"] * counts["queries"])
        expected = binomtest(found, counts["queries"]).proportion_ci(0.95, method="exact")
        assert point["dir_interval"] == pytest.approx([expected.low, expected.high])
    for point in fitted["verification"]:
        n = counts["impostor_pairs"]
        k = round(point["measured_far"] * n)
        expected = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert point["far_interval"] == pytest.approx([expected.low, expected.high])
    # 24 stranger queries cannot pin a FAR of 0.001: the interval says so.
    loosest = fitted["open_set"][-1]
    assert loosest["far"] == 0.001 and loosest["far_interval"][1] > 0.1
    assert calibration.interval(0, 0) == [0.0, 1.0]


def test_a_far_the_validation_set_cannot_measure_is_refused_in_one_line(small_set):
    """Issue 39: thresholds at FARs finer than one validation false accept were served (the
    open-set table measured 4 to 18 times the asked rate at 0.001). A FAR f rests on n
    validation impostor scores; with f·n < 1 the threshold is only the nearest of them,
    whatever f is asked, so such a point is refused where a decision would use it."""
    query_embeddings, query, gallery_embeddings, gallery = small_set
    fitted = calibration.fit(query_embeddings, query, gallery_embeddings, gallery,
                             fars=(0.2, 0.05, 0.01))
    strangers = fitted["measured_on"]["stranger_queries"]
    assert strangers == 24 and 0.01 * strangers < 1 <= 0.05 * strangers
    with pytest.raises(ValueError) as refused:
        calibration.threshold(fitted, "open_set", 0.01)
    message = str(refused.value)
    assert "\n" not in message
    assert "24 validation queries" in message and "0.0417" in message  # 1/24: the finest
    assert "0.2, 0.05" in message  # what it can use instead
    assert calibration.threshold(fitted, "open_set", 0.05) == fitted["open_set"][1]["threshold"]
    # The verification pairs are many more: 0.01 is supported there.
    assert calibration.threshold(fitted, "verification", 0.01) == \
        fitted["verification"][2]["threshold"]
    # What reid-serve decides at when no --far is given: 0.01 if every kind supports it, else
    # the finest fitted FAR they all do; None when none is.
    assert calibration.default_far(fitted, 0.01) == 0.05
    assert calibration.default_far(fitted, 0.2) == 0.2
    assert calibration.default_far({**fitted, "open_set": fitted["open_set"][2:]}, 0.01) is None
    assert calibration.supported_fars(fitted) == [0.2, 0.05]
    # The open-set evaluation still reports every fitted point (its table shows what an
    # unsupported one does on test).
    report = calibration.evaluate_open_set(query_embeddings, query, gallery_embeddings,
                                           gallery, fitted)
    assert [point["far"] for point in report["points"]] == [0.2, 0.05, 0.01]
