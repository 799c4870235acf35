import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_tf import testing
from reid_tf.model import heads
from reid_tf.model import normalization
from reid_tf.model import parts
from reid_tf.train import distribute

STRATEGIES = parts.PART_STRATEGIES


def assert_partition(masks, num_parts):
    masks = np.asarray(masks)
    assert masks.shape[-1] == num_parts
    assert not np.isnan(masks).any()
    assert set(np.unique(masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(masks.sum(-1), 1.0)  # every cell in exactly one part
    assert (masks.sum(axis=(1, 2)) > 0).all(), "a part is empty"


def blob_features(heights, grid=(16, 8), channels_per_blob=6, noise=0.05, seed=0):
    """A feature map with one activation blob per listed row; channel group i peaks at blob i."""
    rng = np.random.default_rng(seed)
    h, w = grid
    features = noise * rng.random((1, h, w, channels_per_blob * len(heights)), dtype=np.float32)
    for i, row in enumerate(heights):
        for c in range(i * channels_per_blob, (i + 1) * channels_per_blob):
            features[0, row, w // 2, c] = 5.0 + c * 0.01
            features[0, row, w // 2 - 1, c] = 3.0
    return tf.constant(features)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_partition_covers_every_cell_once(strategy):
    features = tf.random.uniform([3, 16, 8, 32])
    masks = parts.ActivationPartPartition(4, strategy)(features)
    assert masks.shape == (3, 16, 8, 4)
    assert_partition(masks, 4)


@pytest.mark.parametrize("strategy", ["bands", "peaks", "activation"])
def test_parts_follow_blobs_top_to_bottom(strategy):
    heights = [2, 7, 13]
    masks = np.asarray(parts.ActivationPartPartition(3, strategy)(blob_features(heights)))[0]
    rows = np.arange(16)[:, None]
    centre_rows = [(masks[..., k] * rows).sum() / masks[..., k].sum() for k in range(3)]
    assert centre_rows[0] < centre_rows[1] < centre_rows[2]
    for k, row in enumerate(heights):
        assert masks[row, 4, k] == 1.0, f"part {k} does not cover the blob at row {row}"


def side_by_side_features():
    """Two blobs on row 3 (left and right columns) and one on row 12: the case where 2-D
    clustering puts two part centres on the same row."""
    rng = np.random.default_rng(0)
    features = 0.05 * rng.random((1, 16, 8, 18), dtype=np.float32)
    for c in range(18):
        row, column = [(3, 1), (3, 6), (12, 4)][c // 6]
        features[0, row, column, c] = 5.0
    return tf.constant(features)


def test_bands_are_whole_rows_in_order_even_with_side_by_side_peaks():
    features = side_by_side_features()
    masks = np.asarray(parts.ActivationPartPartition(3, "bands")(features))[0]
    part_of_cell = masks.argmax(-1)
    # Every row belongs to one part, and parts are contiguous bands going down the image.
    np.testing.assert_array_equal(part_of_cell, part_of_cell[:, :1] * np.ones((1, 8), int))
    assert (np.diff(part_of_cell[:, 0]) >= 0).all() and set(part_of_cell[:, 0]) == {0, 1, 2}
    assert part_of_cell[12, 0] == 2 and part_of_cell[3, 0] < 2
    assert parts.part_consistency(masks[None])["ordered_fraction"] == 1.0
    # The 2-D strategy splits row 3 into a left and a right part: the promise it broke.
    peaks = np.asarray(parts.ActivationPartPartition(3, "peaks")(features))[0].argmax(-1)
    assert peaks[3, 1] != peaks[3, 6]
    assert parts.part_consistency(tf.one_hot(peaks, 3)[None])["ordered_fraction"] == 0.0


def test_part_consistency_by_hand():
    top_bottom = np.zeros([2, 4, 2, 2], np.float32)
    top_bottom[:, :2, :, 0] = 1
    top_bottom[:, 2:, :, 1] = 1
    assert parts.part_consistency(top_bottom) == {"mean_iou": 1.0, "ordered_fraction": 1.0}
    left_right = np.zeros([1, 4, 2, 2], np.float32)
    left_right[:, :, 0, 0] = 1
    left_right[:, :, 1, 1] = 1
    mixed = np.concatenate([top_bottom[:1], left_right])
    result = parts.part_consistency(mixed)
    assert result["ordered_fraction"] == 0.5
    # Mean part-0 mask: 1 at top-left, 0.5 at top-right and bottom-left, 0 at bottom-right.
    # Image 0 part 0 (top): min sum 1*2 + 0.5*2 = 3, max sum 2 + 2 + 0.5*2 = 5 -> 0.6;
    # image 1 part 0 (left): 3 / 5 as well; part 1 is the mirror image: every IoU is 0.6.
    assert result["mean_iou"] == pytest.approx(0.6)


def test_blob_order_does_not_depend_on_channel_order():
    features = blob_features([3, 12])
    shuffled = tf.gather(features, np.random.default_rng(1).permutation(12), axis=-1)
    layer = parts.ActivationPartPartition(2, "peaks")
    np.testing.assert_array_equal(layer(features), layer(shuffled))


def test_stripes_are_equal_horizontal_bands():
    masks = np.asarray(parts.ActivationPartPartition(4, "stripes")(tf.zeros([1, 8, 3, 2])))[0]
    np.testing.assert_array_equal(masks.argmax(-1), np.repeat(np.arange(4), 2)[:, None] * np.ones(3))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", ["zeros", "one_hot_cell", "k_equals_rows", "ties", "negative"])
def test_no_empty_part_on_degenerate_input(strategy, case):
    num_parts = 3
    features = np.zeros([2, 6, 4, 5], np.float32)
    if case == "one_hot_cell":
        features[:, 2, 1, :] = 1.0
    elif case == "k_equals_rows":
        num_parts = 6
        features = np.random.default_rng(0).random([2, 6, 4, 5]).astype(np.float32)
    elif case == "ties":
        features[:] = 1.0
    elif case == "negative":
        features[:] = -3.0
    masks = parts.ActivationPartPartition(num_parts, strategy)(tf.constant(features))
    assert_partition(masks, num_parts)


@pytest.mark.slow  # trains, or runs a tool in a process
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_partition_same_eager_graph_and_xla(strategy):
    layer = parts.ActivationPartPartition(4, strategy)
    masks = testing.check_call_modes(layer, tf.random.uniform([4, 16, 8, 64]), atol=0)
    assert_partition(masks, 4)


def test_partition_passes_no_gradient():
    features = tf.random.uniform([2, 16, 8, 32])
    layer = parts.ActivationPartPartition(4, "peaks")
    with tf.GradientTape() as tape:
        tape.watch(features)
        masks = layer(features * 2.0)
        target = tf.reduce_sum(masks * tf.random.uniform(masks.shape))
    assert tape.gradient(target, features) is None


def test_partition_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_parts"):
        parts.ActivationPartPartition(0)
    with pytest.raises(ValueError, match="part_strategy.*peaks"):
        parts.ActivationPartPartition(2, "kmeans")
    with pytest.raises(ValueError, match="num_parts=5.*4 rows"):
        parts.ActivationPartPartition(5, "stripes")(tf.zeros([1, 4, 2, 3]))


def test_partition_under_mirrored_strategy_matches_single_device():
    strategy = distribute.make_strategy("mirrored")
    layer = parts.ActivationPartPartition(3, "peaks")
    features = tf.random.uniform([4, 12, 6, 16])
    expected = layer(features)
    dataset = tf.data.Dataset.from_tensor_slices(features).batch(4)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    per_replica = strategy.run(tf.function(layer), args=(batch,))
    got = tf.concat(strategy.experimental_local_results(per_replica), axis=0)
    assert len(strategy.experimental_local_results(per_replica)) == 2
    np.testing.assert_array_equal(got, expected)


def test_masked_average_pooling_by_hand():
    features = np.arange(2 * 2 * 2 * 1, dtype=np.float32).reshape(2, 2, 2, 1)
    masks = np.zeros([2, 2, 2, 2], np.float32)
    masks[:, 0, :, 0] = 1  # top row -> part 0
    masks[:, 1, :, 1] = 1
    pooled = parts.MaskedAveragePooling()([features, masks])
    np.testing.assert_allclose(pooled[..., 0], [[0.5, 2.5], [4.5, 6.5]])
    # An empty part pools to zeros, not NaN.
    masks[:, :, :, 1] = 0
    masks[:, 1, :, 0] = 1
    assert not np.isnan(np.asarray(parts.MaskedAveragePooling()([features, masks]))).any()


def test_masked_pooling_gradient_is_the_per_part_average():
    features = tf.random.uniform([2, 4, 2, 3])
    masks = parts.ActivationPartPartition(2, "activation")(features)
    with tf.GradientTape() as tape:
        tape.watch(features)
        total = tf.reduce_sum(parts.MaskedAveragePooling()([features, masks]))
    gradient = tape.gradient(total, features).numpy()
    counts = masks.numpy().sum(axis=(1, 2))  # [B,K]
    expected = (masks.numpy() / counts[:, None, None, :]).sum(-1)[..., None] * np.ones(3)
    np.testing.assert_allclose(gradient, expected, rtol=1e-6)


def test_part_dense_equals_independent_dense_layers():
    layer = heads.PartDense(3, 4)
    inputs = tf.random.uniform([2, 3, 5])
    outputs = layer(inputs).numpy()
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    for k in range(3):
        np.testing.assert_allclose(outputs[:, k], inputs[:, k].numpy() @ kernel[k] + bias[k],
                                   rtol=1e-5, atol=1e-6)
    # Each part's slice is initialised by its own fan-in (5: std ~0.45), not K * fan-in.
    wide = heads.PartDense(2, 4000)
    wide.build((None, 2, 5))
    assert 0.35 < float(np.std(wide.kernel.numpy())) < 0.5


def test_classifier_block_shapes_and_independent_parts():
    block = heads.PartClassifierBlock(3, 8, 5)
    embeddings, logits = block(tf.random.uniform([4, 3, 16]), training=False)
    assert embeddings.shape == (4, 3, 8) and logits.shape == (4, 3, 5)
    assert logits.dtype == tf.float32
    with tf.GradientTape() as tape:
        _, logits = block(tf.random.uniform([4, 3, 16]), training=True)
        loss = tf.reduce_sum(logits[:, 1])  # only part 1
    gradient = tape.gradient(loss, block.classifier.kernel).numpy()
    assert np.abs(gradient[1]).sum() > 0
    np.testing.assert_array_equal(gradient[[0, 2]], 0.0)


@pytest.mark.parametrize("layer", [
    parts.ActivationPartPartition(3, "activation", num_iterations=4),
    parts.MaskedAveragePooling(),
    heads.PartDense(3, 7, use_bias=False),
    heads.PartClassifierBlock(3, 8, 5),
], ids=lambda layer: type(layer).__name__)
def test_config_round_trip(layer):
    clone = testing.check_config_round_trip(layer)
    assert type(clone) is type(layer)


def test_layers_save_and_reload_in_a_model(tmp_path):
    import keras

    features = keras.Input((8, 4, 16))
    masks = parts.ActivationPartPartition(3)(features)
    pooled = parts.MaskedAveragePooling()([features, masks])
    embeddings, logits = heads.PartClassifierBlock(3, 8, 5)(pooled)
    model = keras.Model(features, [masks, embeddings, logits])
    inputs = tf.random.uniform([2, 8, 4, 16])
    expected = model(inputs)
    model.save(tmp_path / "layers.keras")
    reloaded = keras.models.load_model(tmp_path / "layers.keras")
    for a, b in zip(expected, reloaded(inputs)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_fused_batch_norm_equals_keras_batch_norm():
    x = tf.random.stateless_normal([6, 5, 4, 3], seed=[1, 2]) * 3.0 + 1.0
    fused = normalization.FusedBatchNormalization(epsilon=1e-5, momentum=0.9)
    plain = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)
    for layer in (fused, plain):
        layer.build(x.shape)
        layer.gamma.assign([0.5, -1.5, 2.0])
        layer.beta.assign([0.1, 0.2, -0.3])
    weights = tf.reshape(tf.range(x.shape.num_elements(), dtype=tf.float32), x.shape) / 100.0
    outputs, gradients = [], []
    for layer in (fused, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.sin(y) * weights)
        outputs.append(y)
        gradients.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    for a, b in zip(*gradients):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean, plain.moving_mean, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance, plain.moving_variance, atol=1e-5)
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), atol=1e-5)
    assert float(tf.reduce_max(tf.abs(fused.moving_variance - [1.0, 1.0, 1.0]))) > 0.1  # moved
    # Cross-replica statistics take Keras's own path.
    synced = normalization.FusedBatchNormalization(synchronized=True)
    synced.build(x.shape)
    assert not synced._fusable(x, None)
    testing.check_config_round_trip(fused)


def test_clustering_fallbacks_to_stripes_are_reported_per_image():
    layer = parts.ActivationPartPartition(num_parts=4, strategy="bands")
    features = np.random.default_rng(0).uniform(size=(3, 8, 4, 16)).astype(np.float32)
    features[1:] = 0.0
    features[1, 0, 0, :] = 1.0  # every channel peaks in the top row: bands left empty
    features[2, :2] = 1.0  # only the top two rows active
    masks, fallback = layer(tf.constant(features), return_fallback=True)
    np.testing.assert_array_equal(fallback, [False, True, True])
    stripes = parts.ActivationPartPartition(num_parts=4, strategy="stripes")(features)
    np.testing.assert_array_equal(masks[1:], stripes[1:])  # what fell back is stripes
    np.testing.assert_array_equal(layer(tf.constant(features)), masks)  # default: masks only
    _, chosen = parts.ActivationPartPartition(num_parts=4, strategy="stripes")(
        features, return_fallback=True)
    assert not np.any(chosen)  # stripes by choice are no fallback


def _segment_sum_votes(flat):
    """The partition's former per-cell vote: a segment sum over batched ids (no ONNX/TFLite op)."""
    batch, cells = tf.shape(flat)[0], flat.shape[1]
    peak_cell = tf.argmax(flat, axis=1, output_type=tf.int32)
    segments = peak_cell + cells * tf.range(batch)[:, None]
    votes = tf.math.unsorted_segment_sum(tf.reduce_max(flat, axis=1), segments, batch * cells)
    return tf.reshape(votes, [batch, cells])


def _searchsorted(cumulative, levels):
    return tf.searchsorted(cumulative, levels, side="left")


def test_portable_partition_ops_equal_the_segment_sum_and_sorted_search():
    rng = np.random.default_rng(0)
    flat = tf.nn.relu(tf.constant(rng.normal(size=(6, 32, 40)), tf.float32))
    np.testing.assert_allclose(parts.peak_votes(flat), _segment_sum_votes(flat), rtol=1e-6)
    weights = tf.constant(rng.random((6, 32)) + 1e-6, tf.float32)
    cumulative = tf.math.cumsum(weights, axis=1) / tf.reduce_sum(weights, axis=1, keepdims=True)
    levels = tf.constant(np.concatenate([rng.random((6, 5)), cumulative.numpy()[:, 3:8]], 1),
                         tf.float32)  # also levels equal to a value: ties go left
    np.testing.assert_array_equal(parts.first_at_or_above(cumulative, levels),
                                  _searchsorted(cumulative, levels))


@pytest.mark.parametrize("strategy", ["bands", "peaks"])
def test_portable_partition_gives_the_masks_of_the_segment_sum_formulation(strategy,
                                                                            monkeypatch):
    features = tf.random.stateless_normal([16, 8, 4, 64], seed=[1, 2])
    layer = parts.ActivationPartPartition(4, strategy)
    masks, fallback = layer(features, return_fallback=True)
    monkeypatch.setattr(parts, "peak_votes", _segment_sum_votes)
    monkeypatch.setattr(parts, "first_at_or_above", _searchsorted)
    reference, reference_fallback = layer(features, return_fallback=True)
    np.testing.assert_array_equal(masks, reference)
    np.testing.assert_array_equal(fallback, reference_fallback)
