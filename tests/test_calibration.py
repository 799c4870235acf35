"""Calibrated thresholds against a direct numpy computation on a small labelled set."""

import math
import types

import numpy as np
import pytest

from reid_tf.evaluate import calibration


def labelled(ids, cameras):
    return types.SimpleNamespace(person_ids=np.array(ids), camera_ids=np.array(cameras))


@pytest.fixture(scope="module")
def small_set():
    """12 people, each a direction on the sphere; 2 queries (camera 0 and 1) and 3 gallery
    images (cameras 0, 1, 1) per person, each a noisy copy of the person's direction."""
    rng = np.random.default_rng(3)
    people = rng.normal(size=(12, 16))
    def images(cameras):
        ids = np.repeat(np.arange(12), len(cameras))
        cams = np.tile(cameras, 12)
        return people[ids] + rng.normal(scale=0.9, size=(len(ids), 16)), labelled(ids, cams)
    query_embeddings, query = images([0, 1])
    gallery_embeddings, gallery = images([0, 1, 1])
    return query_embeddings, query, gallery_embeddings, gallery


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


def test_p_same_falls_with_distance_and_crosses_half_between_the_classes():
    rng = np.random.default_rng(0)
    # Overlapping classes of equal spread, weighted equally: even odds half-way between them.
    genuine, impostor = rng.normal(0.4, 0.1, 400), rng.normal(0.6, 0.1, 4000)
    fitted = calibration.fit_p_same(genuine, impostor)
    p = calibration.p_same({"p_same": fitted}, [0.1, 0.5, 0.9])
    assert p[0] > 0.99 and p[2] < 0.01 and abs(p[1] - 0.5) < 0.05
    assert calibration.p_same({}, [0.2]) is None


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


def test_p_same_separates_distances_on_any_scale():
    """A model whose distances all lie within 0.05 still gets a sharp probability."""
    rng = np.random.default_rng(1)
    genuine, impostor = rng.normal(0.01, 0.002, 300), rng.normal(0.03, 0.002, 3000)
    p = calibration.p_same({"p_same": calibration.fit_p_same(genuine, impostor)}, [0.005, 0.035])
    assert p[0] > 0.99 and p[1] < 0.01


def test_an_inverted_p_same_fit_is_refused_at_fit_and_at_load(small_set, tmp_path):
    """A model whose validation genuine pairs lie no nearer than its impostors would get a
    p_same that rises with distance: the fit records why it has none, and a file that carries
    one is refused."""
    query_embeddings, query, gallery_embeddings, gallery = small_set
    good = calibration.fit(query_embeddings, query, gallery_embeddings, gallery)
    assert good["p_same"]["coef"] < 0 and "p_same_refused" not in good
    # Each gallery image moved to another person's direction: genuine pairs now lie far.
    shuffled = np.roll(gallery_embeddings, 3, axis=0)
    inverted = calibration.fit(query_embeddings, query, shuffled, gallery)
    assert "p_same" not in inverted and "inverted fit" in inverted["p_same_refused"]
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
