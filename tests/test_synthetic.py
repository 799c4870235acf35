import collections

import numpy as np
import pytest

from reid_tf.data import synthetic

SMALL = synthetic.SyntheticConfig(num_train_ids=12, num_test_ids=10, images_per_id=6,
                                  height=64, width=32, seed=3)


def test_generation_is_deterministic_and_sized():
    a, b = synthetic.generate(SMALL), synthetic.generate(SMALL)
    sizes = {s: len(r) for s, r in a.items()}
    assert sizes["train"] == 72 and sizes["query"] + sizes["gallery"] == 60
    assert 10 <= sizes["query"] <= 20
    for split in a:
        for x, y in zip(a[split], b[split]):
            assert x.file_name == y.file_name
            np.testing.assert_array_equal(x.image, y.image)
    assert a["train"][0].image.shape == (64, 32, 3) and a["train"][0].image.dtype == np.uint8
    other = synthetic.generate(synthetic.SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not np.array_equal(other["train"][0].image, a["train"][0].image)


def test_train_and_test_identities_are_disjoint_and_cross_camera():
    splits = synthetic.generate(SMALL)
    train_ids = {r.person_id for r in splits["train"]}
    test_ids = {r.person_id for r in splits["query"]}
    assert train_ids == set(range(1, 13)) and test_ids == set(range(13, 23))
    assert {r.person_id for r in splits["gallery"]} == test_ids
    for query in splits["query"]:  # every query has a true match in another camera
        assert any(g.person_id == query.person_id and g.camera_id != query.camera_id
                   for g in splits["gallery"])


def test_images_of_one_person_vary_but_resemble_each_other():
    splits = synthetic.generate(SMALL)
    by_person = collections.defaultdict(list)
    for record in splits["train"]:
        by_person[record.person_id].append(record.image.astype(np.float32))
    first = by_person[1]
    assert all(not np.array_equal(first[0], image) for image in first[1:])  # pose, view, camera
    assert np.std([image.mean() for images in by_person.values() for image in images]) > 3


@pytest.mark.parametrize("seed", [0, 1])
def test_attribute_frequencies_follow_the_documented_distributions(seed):
    rng = np.random.default_rng(seed)
    identities = [synthetic.sample_identity(rng) for _ in range(2000)]
    bag = collections.Counter(i.bag for i in identities)
    pattern = collections.Counter(i.pattern for i in identities)
    assert abs(bag["none"] / 2000 - 0.5) < 0.04 and abs(pattern["solid"] / 2000 - 0.4) < 0.04
    assert abs(sum(i.hat is not None for i in identities) / 2000 - 0.2) < 0.03
    # No single region identifies: the most common upper-body colour class is shared widely.
    upper = collections.Counter(tuple(np.round(i.upper / 60)) for i in identities)
    assert max(upper.values()) > 50
