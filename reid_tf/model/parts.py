"""PL-Net's part partition: K parts per image found from the feature map's own activations.

PL-Net (Yao et al., "Deep Representation Learning with Part Loss for Person Re-Identification",
arXiv 1707.00798, IEEE TIP 2019) splits each image's last feature map into K parts found from the
network's own activations and classifies identity from each part. The paper's exact clustering
recipe is not available; `ActivationPartPartition` is our reconstruction (WORKSPACE.md says why).
`part_consistency` measures whether part k means the same region in every image.
"""

import keras
import tensorflow as tf


PART_STRATEGIES = ("bands", "peaks", "activation", "stripes")


def stripe_assignment(height, num_parts):
    """Part index of each of `height` rows for K equal horizontal stripes (int32 `[height]`)."""
    return tf.constant([row * num_parts // height for row in range(height)], tf.int32)


def _grid_points(height, width):
    """(y, x) of each cell of an h x w grid, row-major (so y never decreases): `[h*w]`, `[h*w]`."""
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32),
                         indexing="ij")
    return tf.reshape(ys, [-1]), tf.reshape(xs, [-1])


def _squared_distances(ys, xs, centre_y, centre_x):
    """Cells `[P]` against centres `[B,K]` -> `[B,P,K]`."""
    return (tf.square(ys[None, :, None] - centre_y[:, None, :])
            + tf.square(xs[None, :, None] - centre_x[:, None, :]))


# The partition is written in ops that TFLite, ONNX and XLA all have, so every export format
# carries it unchanged: no segment sums with batched ids, no sorted search (LowerBound).

def peak_votes(flat):
    """Each channel's vote at the cell of its maximum, weighted by that maximum, summed per cell.

    `[B,P,C]` (non-negative) -> `[B,P]`. A one-hot contraction (a matmul), equal to the segment
    sum `unsorted_segment_sum(max, argmax)` to float rounding.
    """
    peak_cell = tf.argmax(flat, axis=1, output_type=tf.int32)  # [B,C]
    return tf.einsum("bc,bcp->bp", tf.reduce_max(flat, axis=1),
                     tf.one_hot(peak_cell, flat.shape[1], dtype=flat.dtype))


def first_at_or_above(cumulative, levels):
    """For rows of non-decreasing `cumulative [B,P]`, the first index whose value is >= each of
    `levels [B,K]`: `searchsorted(cumulative, levels, side="left")`, exactly, as a count of the
    values below each level (int32 `[B,K]`)."""
    below = tf.cast(cumulative[:, :, None] < levels[:, None, :], tf.int32)  # [B,P,K]
    return tf.reduce_sum(below, axis=1)


def weighted_kmeans(ys, xs, weights, num_parts, num_iterations):
    """Batched weighted K-means (Lloyd) over points shared by the batch, no loop over images.

    Initial centres: y at the weighted quantiles (k + 0.5) / K of the points' y, x at the
    weighted mean x. Deterministic.

    Args:
        ys, xs: float32 `[P]`, point coordinates sorted by y (e.g. a row-major grid).
        weights: float32 `[B,P]`, strictly positive.
        num_parts: K.
        num_iterations: fixed number of Lloyd steps (static, so XLA can compile it).

    Returns:
        Centre (y, x), each `[B,K]`, sorted by y (top to bottom, stable for ties).
    """
    total_weight = tf.reduce_sum(weights, axis=1, keepdims=True)
    cumulative = tf.math.cumsum(weights, axis=1) / total_weight
    levels = (tf.range(num_parts, dtype=tf.float32) + 0.5) / num_parts
    levels = tf.broadcast_to(levels, [tf.shape(weights)[0], num_parts])
    index = tf.minimum(first_at_or_above(cumulative, levels), tf.size(ys) - 1)
    centre_y = tf.gather(ys, index)
    centre_x = tf.broadcast_to(tf.reduce_sum(weights * xs, axis=1, keepdims=True) / total_weight,
                               tf.shape(centre_y))
    for _ in range(num_iterations):
        nearest = tf.argmin(_squared_distances(ys, xs, centre_y, centre_x), axis=-1)
        mass = tf.one_hot(nearest, num_parts) * weights[..., None]  # [B,P,K]
        cluster_weight = tf.reduce_sum(mass, axis=1)  # [B,K]
        kept = cluster_weight > 0  # a centre that lost every point stays where it was
        safe_weight = tf.maximum(cluster_weight, 1e-12)
        centre_y = tf.where(kept, tf.einsum("bpk,p->bk", mass, ys) / safe_weight, centre_y)
        centre_x = tf.where(kept, tf.einsum("bpk,p->bk", mass, xs) / safe_weight, centre_x)
    order = tf.argsort(centre_y, axis=1, stable=True)
    return tf.gather(centre_y, order, batch_dims=1), tf.gather(centre_x, order, batch_dims=1)


@keras.saving.register_keras_serializable(package="reid_tf")
class ActivationPartPartition(keras.layers.Layer):
    """Splits each feature map into K parts from its own activations: hard masks, top to bottom.

    Strategies (a reconstruction of PL-Net's part generation; see WORKSPACE.md):
    - `"bands"` (default): every channel votes at the row of its maximum, weighted by that
      maximum; weighted 1-D K-means over the rows; each row joins its nearest centre. Parts are
      adaptive horizontal bands, so part k is the same body band in every image.
    - `"peaks"`: every channel votes with the (y, x) of its maximum, weighted by that maximum;
      weighted K-means on the C votes (computed as K-means on the cells, each weighted by the
      votes it received); each grid cell joins its nearest centre.
    - `"activation"`: the same K-means over all h*w cells, each weighted by its channel-summed
      activation.
    - `"stripes"`: K equal horizontal stripes (PCB-like), ignoring activations.

    Centres are sorted top to bottom. Only `"bands"` and `"stripes"` make every part a band of
    whole rows; the 2-D strategies can place two centres on the same row, side by side (see
    `part_consistency`). The assignment carries no gradient. Every cell belongs to exactly one part; an image whose
    clustering leaves a part empty (all-zero or single-peak maps, ties) falls back to stripes,
    so no part is ever empty; `call(features, return_fallback=True)` also returns which images
    did (bool `[B]`), counted in training and evaluation.

    Args:
        num_parts: K >= 1, at most the number of grid rows.
        strategy: one of `PART_STRATEGIES`.
        num_iterations: Lloyd iterations of the K-means.

    Shapes: `[B,h,w,C] -> [B,h,w,K]` (float32 one-hot masks).

    Example:
    >>> masks = ActivationPartPartition(num_parts=3)(tf.random.uniform([2, 8, 4, 16]))
    >>> masks.shape
    TensorShape([2, 8, 4, 3])
    """

    def __init__(self, num_parts, strategy="bands", num_iterations=10, **kwargs):
        kwargs.setdefault("dtype", "float32")  # clustering stays in float32 under mixed precision
        super().__init__(**kwargs)
        if not isinstance(num_parts, int) or num_parts < 1:
            raise ValueError(f"num_parts={num_parts!r}: expected an integer >= 1.")
        if strategy not in PART_STRATEGIES:
            raise ValueError(f"part_strategy={strategy!r}: expected one of {PART_STRATEGIES}.")
        if not isinstance(num_iterations, int) or num_iterations < 0:
            raise ValueError(f"num_iterations={num_iterations!r}: expected an integer >= 0.")
        self.num_parts = num_parts
        self.strategy = strategy
        self.num_iterations = num_iterations

    def build(self, input_shape):
        height = input_shape[1]
        if height is not None and self.num_parts > height:
            raise ValueError(
                f"num_parts={self.num_parts}: the feature grid has only {height} rows, so at most "
                f"{height} parts fit (parts must be non-empty)."
            )

    def call(self, features, return_fallback=False):
        masks, fallback = self._partition(features)
        return (masks, fallback) if return_fallback else masks

    def _partition(self, features):
        features = tf.stop_gradient(tf.cast(features, tf.float32))
        height, width = features.shape[1], features.shape[2]
        batch = tf.shape(features)[0]
        stripes = tf.one_hot(stripe_assignment(height, self.num_parts), self.num_parts)
        stripes = tf.broadcast_to(stripes[None, :, None, :], [batch, height, width, self.num_parts])
        if self.strategy == "stripes":
            return stripes, tf.zeros([batch], tf.bool)  # stripes by choice, not by fallback
        ys, xs = _grid_points(height, width)
        cells = height * width
        flat = tf.nn.relu(tf.reshape(features, [batch, cells, features.shape[3]]))
        if self.strategy in ("bands", "peaks"):
            # Each channel votes at its maximum with that maximum's value. K-means on the C votes
            # equals K-means on the cells with the votes summed per cell, which is much cheaper.
            weights = peak_votes(flat)
        else:
            weights = tf.reduce_sum(flat, axis=2)  # [B,h*w]
        if self.strategy == "bands":
            # 1-D: the votes of a row are summed, and rows (not cells) are clustered by y.
            weights = tf.reduce_sum(tf.reshape(weights, [batch, height, width]), axis=2)
            ys = tf.range(height, dtype=tf.float32)
            xs = tf.zeros([height])
        # Relative weights plus a floor: an all-zero map weighs its cells equally, never 0/0.
        weights = weights / tf.maximum(tf.reduce_max(weights, axis=1, keepdims=True), 1e-12)
        weights = weights + 1e-6
        centre_y, centre_x = weighted_kmeans(ys, xs, weights, self.num_parts, self.num_iterations)
        nearest = tf.argmin(_squared_distances(ys, xs, centre_y, centre_x), axis=-1)  # ties: lower k
        masks = tf.one_hot(nearest, self.num_parts)
        if self.strategy == "bands":  # [B,h,K] rows -> every cell of a row
            masks = tf.broadcast_to(masks[:, :, None, :], [batch, height, width, self.num_parts])
        masks = tf.reshape(masks, [batch, height, width, self.num_parts])
        complete = tf.reduce_all(tf.reduce_sum(masks, axis=[1, 2]) > 0, axis=-1)  # [B]
        return tf.where(complete[:, None, None, None], masks, stripes), ~complete

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.num_parts)

    def get_config(self):
        return {
            **super().get_config(),
            "num_parts": self.num_parts,
            "strategy": self.strategy,
            "num_iterations": self.num_iterations,
        }


@keras.saving.register_keras_serializable(package="reid_tf")
class MaskedAveragePooling(keras.layers.Layer):
    """Average-pools a feature map over each part mask.

    Shapes: `([B,h,w,C], [B,h,w,K]) -> [B,K,C]`: `sum(mask * features) / sum(mask)` per part,
    for hard (one-hot) or soft masks. Parts are never empty (see `ActivationPartPartition`);
    an empty mask would still give zeros, not NaN.

    Example:
    >>> pooled = MaskedAveragePooling()([tf.ones([2, 8, 4, 16]), tf.ones([2, 8, 4, 1])])
    >>> pooled.shape
    TensorShape([2, 1, 16])
    """

    def call(self, inputs):
        features, masks = inputs
        masks = tf.cast(masks, features.dtype)
        sums = tf.einsum("bhwc,bhwk->bkc", features, masks)
        counts = tf.reduce_sum(masks, axis=[1, 2])[..., None]
        # Hard masks count whole cells (>= 1: parts are never empty); a soft mask (a learned
        # partition) may hold less than one cell's weight and is still an average.
        return sums / tf.maximum(counts, tf.cast(1e-6, counts.dtype))

    def compute_output_shape(self, input_shape):
        features_shape, masks_shape = input_shape
        return (features_shape[0], masks_shape[-1], features_shape[-1])


def part_consistency(masks):
    """How much part k means the same region across images: a dict of two numbers in [0, 1].

    - `mean_iou`: mean over images and parts of the soft IoU (sum of minima over sum of maxima)
      between an image's part-k mask and the population's mean part-k mask.
    - `ordered_fraction`: fraction of images whose part centroids (mean row of each part's cells)
      go down the image by at least one row from part k to part k+1, i.e. the parts are strictly
      separated top to bottom.

    Args:
        masks: `[N,h,w,K]` hard or soft part masks (numpy or tensor), K >= 1.
    """
    masks = tf.convert_to_tensor(masks, tf.float32)
    mean_mask = tf.reduce_mean(masks, axis=0, keepdims=True)
    intersection = tf.reduce_sum(tf.minimum(masks, mean_mask), axis=[1, 2])
    union = tf.reduce_sum(tf.maximum(masks, mean_mask), axis=[1, 2])
    iou = tf.reduce_mean(intersection / tf.maximum(union, 1e-12))
    rows = tf.range(masks.shape[1], dtype=tf.float32)[None, :, None]
    row_mass = tf.reduce_sum(masks, axis=2)  # [N,h,K]
    centroid = tf.reduce_sum(row_mass * rows, axis=1) / tf.maximum(
        tf.reduce_sum(row_mass, axis=1), 1e-12)  # [N,K]
    gaps = centroid[:, 1:] - centroid[:, :-1]
    ordered = tf.reduce_mean(tf.cast(tf.reduce_all(gaps >= 1.0 - 1e-6, axis=1), tf.float32))
    return {"mean_iou": float(iou), "ordered_fraction": float(ordered)}
