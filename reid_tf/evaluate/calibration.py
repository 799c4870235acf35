"""Calibrated decisions: distance thresholds at a false-accept rate (FAR), fitted on labelled
identities the model never trained on, and the open-set evaluation that checks them.

    fitted = calibration.fit(query_embeddings, query, gallery_embeddings, gallery)
    calibration.threshold(fitted, "open_set", far=1e-2)   # :search's in_gallery / match
    calibration.evaluate_open_set(test_query, query, test_gallery, gallery, fitted)

The distance is the gallery's: 1 - cosine similarity of the L2-normalised embeddings. A pair is
accepted ("same person") when `distance < threshold`. Two operating points, because two
questions are asked:

- `verification` (a pair: `:verify`): the impostor pairs are every query/gallery pair of two
  identities; the threshold at FAR f is the (floor(f·n)+1)-th smallest of the n impostor
  distances, so that at most f·n of them fall below it (exactly that many without ties).
  TAR: the share of genuine pairs (same identity, another camera, as the re-ID protocol
  counts a match) below it.
- `open_set` (a search: is the query's person in the gallery at all?): each query is asked
  once as a stranger, against the gallery without its own identity; its nearest distance is
  an impostor score, and the threshold at FAR f is chosen on those scores the same way. DIR
  (detection and identification rate): the share of queries whose nearest gallery entry,
  with their identity present, is a true match and below the threshold. This FAR is per query
  and depends on the gallery's size (a larger gallery holds closer strangers): the gallery the
  thresholds were measured on is recorded.

`p_same` answers the question a search card asks: is this hit, among the query's top `TOP_K`,
the query's person? It is a logistic regression of "same person" on the distance (scikit-learn),
unweighted, on the top-`TOP_K` hits of half of the validation queries (split by identity), so
it holds at the share of same-person hits a ranked list really has. The other half's hits
measure it: a reliability table (`BINS` bins of p) and the expected calibration error; a fit
above `MAX_ECE`, on fewer than `MIN_HELD_OUT_PAIRS` held-out hits, or inverted, is not kept
(`p_same_refused` says why), and nothing shows a probability then.
"""

import json
import math

import numpy as np

from reid_tf.model.descriptors import unit_rows

FARS = (1e-1, 1e-2, 1e-3)
FORMAT = 1
DISTANCE = "1 - cosine similarity of the L2-normalised embeddings (the gallery's distance)"
KINDS = ("verification", "open_set")
TOP_K = 10  # the hits a search card shows by default (the page's k)
BINS = 10
MAX_ECE = 0.05
MIN_HELD_OUT_PAIRS = 500


def cosine_distances(queries, gallery):
    """`[Q, G]` float64: 1 - cosine similarity (what the gallery's search reports)."""
    return 1.0 - unit_rows(np.asarray(queries, np.float32)).astype(np.float64) @ \
        unit_rows(np.asarray(gallery, np.float32)).astype(np.float64).T


def _labels(split):
    return np.asarray(split.person_ids), np.asarray(split.camera_ids)


def pair_distances(distances, query_ids, query_cameras, gallery_ids, gallery_cameras):
    """`(genuine, impostor)` distances: same identity in another camera; other identities.
    Same identity and camera is neither (the re-ID protocol ignores those pairs)."""
    same = query_ids[:, None] == gallery_ids[None, :]
    same_camera = query_cameras[:, None] == gallery_cameras[None, :]
    return distances[same & ~same_camera], distances[~same]


CONFIDENCE = 0.95  # of the intervals calibration.json gives beside each measured rate


def interval(successes, trials, confidence=CONFIDENCE):
    """The exact (Clopper-Pearson) two-sided interval of a rate measured as `successes` of
    `trials`: `[low, high]`; `[0, 1]` with no trials. Pairs that share an image are not
    independent, so for pair rates it is optimistic; for per-query rates (open set) it is
    what the validation set supports."""
    from scipy.stats import beta

    if trials <= 0:
        return [0.0, 1.0]
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1,
                                                          trials - successes))
    return [low, high]


def far_threshold(impostor, far):
    """The threshold accepting at most `far` of the impostor scores (`score < threshold`):
    the (floor(far·n)+1)-th smallest; infinity when that is all of them."""
    impostor = np.sort(np.asarray(impostor, np.float64))
    allowed = math.floor(far * len(impostor) + 1e-9)
    return float(impostor[allowed]) if allowed < len(impostor) else math.inf


def open_set_scores(distances, query_ids, query_cameras, gallery_ids, gallery_cameras):
    """Per query: `(stranger, nearest, correct)`: the nearest distance with the query's own
    identity left out of the gallery (the score of a query that is not in the gallery), and,
    with it present, the nearest distance and whether that entry is a true match. Entries of
    the query's identity in its own camera are left out, as the re-ID protocol does; a query
    without any entry left (no stranger, or nothing to find) gets NaN / False."""
    same = query_ids[:, None] == gallery_ids[None, :]
    junk = same & (query_cameras[:, None] == gallery_cameras[None, :])
    stranger = np.where(same, np.inf, distances).min(axis=1)
    kept = np.where(junk, np.inf, distances)
    nearest_index = kept.argmin(axis=1)
    nearest = kept[np.arange(len(kept)), nearest_index]
    correct = same[np.arange(len(kept)), nearest_index] & np.isfinite(nearest)
    return (np.where(np.isfinite(stranger), stranger, np.nan),
            np.where(np.isfinite(nearest), nearest, np.nan), correct)


def fit(query_embeddings, query, gallery_embeddings, gallery, fars=FARS, p_same=True,
        measured_on=None):
    """The calibration of a model (a dict, `calibration.json`'s content) from labelled
    query/gallery splits of identities it did not train on (`query`, `gallery`: `Split`s, or
    anything with `person_ids` and `camera_ids`)."""
    query_ids, query_cameras = _labels(query)
    gallery_ids, gallery_cameras = _labels(gallery)
    distances = cosine_distances(query_embeddings, gallery_embeddings)
    genuine, impostor = pair_distances(distances, query_ids, query_cameras, gallery_ids,
                                       gallery_cameras)
    if not len(genuine) or not len(impostor):
        raise ValueError(f"calibration needs pairs of the same person in two cameras and of two "
                         f"people; these splits give {len(genuine)} and {len(impostor)}.")
    stranger, nearest, correct = open_set_scores(distances, query_ids, query_cameras,
                                                 gallery_ids, gallery_cameras)
    strangers = stranger[np.isfinite(stranger)]
    verification, open_set = [], []
    for far in sorted(fars, reverse=True):
        if not 0 < far < 1:
            raise ValueError(f"FAR {far}: expected a rate in (0, 1).")
        t = far_threshold(impostor, far)
        accepted, hits = int(np.sum(impostor < t)), int(np.sum(genuine < t))
        verification.append({"far": far, "threshold": t, "tar": hits / len(genuine),
                             "measured_far": accepted / len(impostor),
                             "far_interval": interval(accepted, len(impostor)),
                             "tar_interval": interval(hits, len(genuine)),
                             "resolved": far * len(impostor) >= 1})
        t = far_threshold(strangers, far)
        found = int(np.sum(correct & (np.nan_to_num(nearest, nan=np.inf) < t)))
        accepted = int(np.sum(strangers < t))
        open_set.append({"far": far, "threshold": t, "dir": found / len(correct),
                         "measured_far": accepted / max(len(strangers), 1),
                         "far_interval": interval(accepted, len(strangers)),
                         "dir_interval": interval(found, len(correct)),
                         "resolved": far * len(strangers) >= 1})
    result = {"format": FORMAT, "distance": DISTANCE, "rule": "same person when distance < "
              "threshold", "verification": verification, "open_set": open_set,
              "measured_on": {**(measured_on or {}), "queries": len(query_ids),
                              "gallery": len(gallery_ids),
                              "identities": int(len(np.unique(query_ids))),
                              "genuine_pairs": int(len(genuine)),
                              "impostor_pairs": int(len(impostor)),
                              "stranger_queries": int(len(strangers))}}
    if p_same:
        result.update(fit_p_same_held_out(distances, query_ids, query_cameras, gallery_ids,
                                          gallery_cameras))
    return result


def ranked_hits(distances, query_ids, query_cameras, gallery_ids, gallery_cameras,
                top_k=TOP_K):
    """`(distance, same)` of each query's `top_k` nearest gallery entries, flattened; entries
    of its identity in its own camera are left out, as the re-ID protocol does."""
    same = query_ids[:, None] == gallery_ids[None, :]
    junk = same & (query_cameras[:, None] == gallery_cameras[None, :])
    kept = np.where(junk, np.inf, distances)
    order = np.argsort(kept, axis=1, kind="stable")[:, :top_k]
    hits = np.take_along_axis(kept, order, 1)
    matches = np.take_along_axis(same, order, 1)
    finite = np.isfinite(hits)
    return hits[finite], matches[finite]


def fit_p_same(distances, same):
    """Logistic regression of `same` on the distance, unweighted (the classes at their own
    share): `{"kind": "logistic", "intercept", "coef", "prior"}` with
    p = 1 / (1 + exp(-(intercept + coef·d))); `prior`: the share of same-person pairs."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(distances, np.float64)
    y = np.asarray(same, bool)
    # Fitted on standardised distances (a model's distances may all lie within 0.05), then
    # written back in distance units.
    centre, scale = x.mean(), max(x.std(), 1e-12)
    model = LogisticRegression(C=1e4).fit(((x - centre) / scale)[:, None], y)
    coef = float(model.coef_[0, 0]) / scale
    return {"kind": "logistic", "intercept": float(model.intercept_[0]) - coef * centre,
            "coef": coef, "prior": float(y.mean())}


def reliability(probabilities, same, bins=BINS):
    """`(table, ece)`: per equal-width bin of p with pairs in it, `{"p": [low, high], "pairs",
    "mean_p", "share_same"}`, and the expected calibration error (the pair-weighted mean of
    |mean_p - share_same|)."""
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(same, np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        chosen = index == b
        if not chosen.any():
            continue
        mean_p, share = float(p[chosen].mean()), float(y[chosen].mean())
        table.append({"p": [b / bins, (b + 1) / bins], "pairs": int(chosen.sum()),
                      "mean_p": mean_p, "share_same": share})
        ece += chosen.sum() / len(p) * abs(mean_p - share)
    return table, float(ece)


def held_out_p_same(fit_hits, held_out_hits, top_k=TOP_K):
    """`{"p_same": ...}` fitted on `fit_hits` and measured on `held_out_hits` (each
    `(distance, same)`), or `{"p_same_refused": why}`."""
    (x, y), (held_x, held_y) = fit_hits, held_out_hits
    if len(held_x) < MIN_HELD_OUT_PAIRS or y.all() or not y.any():
        return {"p_same_refused": f"too few validation hits to fit and check it ({len(x)} to fit, "
                                  f"{len(held_x)} held out; {MIN_HELD_OUT_PAIRS} needed)"}
    fitted = fit_p_same(x, y)
    if fitted["coef"] >= 0:  # genuine hits no nearer than impostors
        return {"p_same_refused": f"inverted fit (coef {fitted['coef']:g} >= 0): on these "
                                  "validation hits the same person is not nearer"}
    table, ece = reliability(p_same({"p_same": fitted}, held_x), held_y)
    if ece > MAX_ECE:
        return {"p_same_refused": f"not calibrated on held-out validation hits: expected "
                                  f"calibration error {ece:.3f} > {MAX_ECE} on {len(held_x)}"}
    question = f"is a hit among the query's top {top_k} the query's person?"
    return {"p_same": {**fitted, "question": question, "top_k": top_k,
                       "held_out": {"pairs": int(len(held_x)), "ece": ece,
                                    "reliability": table}}}


def fit_p_same_held_out(distances, query_ids, query_cameras, gallery_ids, gallery_cameras,
                        seed=0):
    """`held_out_p_same` on the validation queries split in two by identity (seeded): the
    first half's ranked hits fit it, the second's measure it."""
    identities = np.random.default_rng(seed).permutation(np.unique(query_ids))
    first = np.isin(query_ids, identities[:len(identities) // 2])
    halves = [ranked_hits(distances[rows], query_ids[rows], query_cameras[rows], gallery_ids,
                          gallery_cameras) for rows in (first, ~first)]
    return held_out_p_same(*halves)


def p_same(calibration, distances):
    """The fitted probability of "same person" at `distances` (None without a fit)."""
    fitted = calibration.get("p_same") if calibration else None
    if fitted is None:
        return None
    z = fitted["intercept"] + fitted["coef"] * np.asarray(distances, np.float64)
    return 1.0 / (1.0 + np.exp(-z))


def fars_of(calibration, kind="open_set"):
    return [point["far"] for point in calibration[kind]]


# What a kind's FAR rests on: its validation impostor scores, named for a message.
SUPPORT = {"verification": ("impostor_pairs", "impostor pairs"),
           "open_set": ("stranger_queries", "queries")}


def fitted_point(calibration, kind, far):
    """The fitted operating point of `kind` at `far`; ValueError naming the fitted rates."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}.")
    for point in calibration[kind]:
        if math.isclose(point["far"], far, rel_tol=1e-6):
            return point
    raise ValueError(f"FAR {far}: not fitted; the calibration has "
                     f"{', '.join(f'{f:g}' for f in fars_of(calibration, kind))}.")


def is_supported(point):
    """Whether a fitted point's FAR rests on at least one expected validation false accept
    (f·n >= 1 of its n impostor scores; below that the threshold is only the nearest of them,
    whatever f is asked). Files from before the flag: supported."""
    return point.get("resolved", True) is not False


def supported_fars(calibration):
    """The FARs fitted for every kind and supported by each, in the file's order."""
    def usable(far, kind):
        return any(math.isclose(p["far"], far, rel_tol=1e-6) and is_supported(p)
                   for p in calibration[kind])

    return [far for far in fars_of(calibration, "open_set")
            if all(usable(far, kind) for kind in KINDS)]


def default_far(calibration, preferred):
    """`preferred` when every kind supports it, else the finest fitted FAR they all support;
    None when they support none."""
    supported = supported_fars(calibration)
    if any(math.isclose(far, preferred, rel_tol=1e-6) for far in supported):
        return preferred
    return min(supported) if supported else None


def threshold(calibration, kind, far, only_supported=True):
    """The fitted threshold of `kind` ("verification" or "open_set") at `far`. ValueError (one
    line) naming the fitted rates for another, and, with `only_supported`, for a FAR the
    validation set was too small to measure (`is_supported`)."""
    point = fitted_point(calibration, kind, far)
    if only_supported and not is_supported(point):
        key, noun = SUPPORT[kind]
        count = calibration.get("measured_on", {}).get(key)
        finest = f"; the finest it can measure is 1/{count} = {1 / count:.3g}" if count else ""
        usable = ", ".join(f"{f:g}" for f in supported_fars(calibration)) or "none"
        raise ValueError(
            f"FAR {far:g}: the calibration's {count or 'few'} validation {noun} cannot measure "
            f"it (under one false accept expected{finest}); its supported FARs: {usable}. "
            "Calibrate on more identities for a finer one.")
    return point["threshold"]


def check(calibration, source="calibration"):
    """Refuses a calibration this code cannot read, naming what is wrong."""
    if not isinstance(calibration, dict) or calibration.get("format") != FORMAT:
        raise ValueError(f"{source}: not a reid-tf calibration (format {FORMAT}).")
    for kind in KINDS:
        points = calibration.get(kind)
        if not isinstance(points, list) or not points or not all(
                isinstance(p, dict) and {"far", "threshold"} <= set(p) for p in points):
            raise ValueError(f"{source}: '{kind}' needs a list of {{far, threshold}} points.")
        for i, point in enumerate(points):
            for key in ("far", "threshold"):
                if not _is_number(point[key]):
                    raise ValueError(f"{source}: {kind}[{i}].{key} is {point[key]!r}; expected "
                                     "a finite number.")
    fitted = calibration.get("p_same")
    if fitted is not None:
        if not isinstance(fitted, dict) or not all(
                _is_number(fitted.get(key)) for key in ("intercept", "coef")):
            raise ValueError(f"{source}: p_same needs numbers 'intercept' and 'coef'.")
        if fitted["coef"] >= 0:  # p(same) must fall as the distance grows
            raise ValueError(f"{source}: p_same is inverted (coef {fitted['coef']:g} >= 0: "
                             "farther pairs would be likelier the same person); refit it.")
    return calibration


def check_model(calibration, model_id, source="calibration"):
    """ValueError (one line) when `calibration` names a model other than `model_id`; either
    unknown (a calibration from before the field, an in-memory model): accepted."""
    fitted_for = calibration.get("model_id")
    if fitted_for and model_id and fitted_for != model_id:
        raise ValueError(f"{source}: fitted for model {fitted_for}, but this export is model "
                         f"{model_id}; its thresholds would decide for other embeddings. Fit one "
                         "for this model: reid-eval --export=... --calibrate.")
    return calibration


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def load(path):
    with open(path) as f:
        try:
            return check(json.load(f), path)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error}).") from None


def split_unknown(person_ids, share=1 / 3, seed=0):
    """The identities taken out of the gallery for the open-set protocol: `share` of the query
    identities, drawn with `seed`."""
    identities = np.unique(person_ids)
    count = int(round(share * len(identities)))
    return set(np.random.default_rng(seed).choice(identities, count, replace=False).tolist())


def evaluate_open_set(query_embeddings, query, gallery_embeddings, gallery, calibration,
                      share=1 / 3, seed=0):
    """Open-set identification on a test split with thresholds fitted elsewhere.

    `share` of the query identities (seeded) are taken out of the gallery: their queries are
    unknown. Per fitted FAR: DIR (known queries whose nearest entry is a true match, below the
    open-set threshold), the FAR measured (unknown queries whose nearest entry is below it),
    and, at the verification threshold, the pair FAR and TAR measured on the whole test split.
    """
    query_ids, query_cameras = _labels(query)
    gallery_ids, gallery_cameras = _labels(gallery)
    unknown_ids = split_unknown(query_ids, share, seed)
    kept = ~np.isin(gallery_ids, list(unknown_ids))
    unknown = np.isin(query_ids, list(unknown_ids))
    distances = cosine_distances(query_embeddings, gallery_embeddings)
    _, nearest, correct = open_set_scores(distances[:, kept], query_ids, query_cameras,
                                          gallery_ids[kept], gallery_cameras[kept])
    nearest = np.nan_to_num(nearest, nan=np.inf)
    findable = ~unknown & np.isfinite(nearest)
    genuine, impostor = pair_distances(distances, query_ids, query_cameras, gallery_ids,
                                       gallery_cameras)
    points = []
    for point in calibration["open_set"]:
        t = point["threshold"]
        pair_t = threshold(calibration, "verification", point["far"], only_supported=False)
        points.append({
            "far": point["far"], "threshold": t,
            "dir": float(np.mean(correct[findable] & (nearest[findable] < t))),
            "measured_far": float(np.mean(nearest[unknown] < t)),
            "pair_threshold": pair_t, "pair_far": float(np.mean(impostor < pair_t)),
            "pair_tar": float(np.mean(genuine < pair_t))})
    return {"known_queries": int(findable.sum()), "unknown_queries": int(unknown.sum()),
            "unknown_identities": len(unknown_ids), "gallery": int(kept.sum()),
            "closed_set_rank1": float(np.mean(correct[findable])), "points": points}
