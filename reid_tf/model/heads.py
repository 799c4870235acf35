"""PL-Net's heads: K per-part embeddings and identity classifiers as one block (the global
branch is the same block with K=1)."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="reid_tf")
class PartDense(keras.layers.Layer):
    """K independent dense layers as one kernel `[K,Din,units]` and one einsum.

    Args:
        num_parts: K.
        units: output size of each part.
        use_bias: whether each part has a bias.
        kernel_initializer: initialiser of the `[K,Din,units]` kernel; the default scales each
            part's slice by its own fan-in (LeCun normal), as K separate Dense layers would.

    Shapes: `[B,K,Din] -> [B,K,units]`.
    """

    def __init__(self, num_parts, units, use_bias=True, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.num_parts = num_parts
        self.units = units
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal",
                                                  input_axes=[1], output_axes=[2])
        )

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(self.num_parts, input_shape[-1], self.units),
            initializer=self.kernel_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.num_parts, self.units),
                                        initializer="zeros")

    def call(self, inputs):
        outputs = tf.einsum("bkd,kdn->bkn", inputs, self.kernel)
        if self.bias is not None:
            outputs = outputs + self.bias
        return outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {
            **super().get_config(),
            "num_parts": self.num_parts,
            "units": self.units,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


@keras.saving.register_keras_serializable(package="reid_tf")
class PartClassifierBlock(keras.layers.Layer):
    """Per-part embedding and identity classifier: PartDense -> BatchNorm -> PartDense.

    The global branch of PL-Net is the same block with one part.

    Args:
        num_parts: K (1 for the global branch).
        embedding_dim: D, size of each part's embedding.
        num_classes: N, training identities.
        sync_batch_norm: BatchNorm statistics over all replicas' batches.

    Shapes: `[B,K,C] -> ([B,K,D] embeddings, [B,K,N] logits)`; logits are float32. With
    `with_features=True`, also the `[B,K,D]` features before the BatchNorm (BNNeck's input, where
    a metric loss goes): `(embeddings, logits, features)`.

    Example:
    >>> embeddings, logits = PartClassifierBlock(3, 8, 5)(tf.ones([2, 3, 16]))
    >>> logits.shape
    TensorShape([2, 3, 5])
    """

    def __init__(self, num_parts, embedding_dim, num_classes, sync_batch_norm=False, **kwargs):
        super().__init__(**kwargs)
        for name, value in [("num_parts", num_parts), ("embedding_dim", embedding_dim),
                            ("num_classes", num_classes)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1.")
        self.num_parts = num_parts
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.sync_batch_norm = sync_batch_norm

    def build(self, input_shape):
        self.embedding = PartDense(self.num_parts, self.embedding_dim, name="embedding",
                                   dtype=self.dtype_policy)
        self.embedding.build(input_shape)
        self.batch_norm = keras.layers.BatchNormalization(
            name="batch_norm", synchronized=self.sync_batch_norm, dtype=self.dtype_policy)
        self.batch_norm.build((input_shape[0], self.num_parts * self.embedding_dim))
        # Small classifier init, as in torchreid/fast-reid heads.
        self.classifier = PartDense(
            self.num_parts, self.num_classes, use_bias=False, name="classifier",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            dtype=self.dtype_policy,
        )
        self.classifier.build((input_shape[0], self.num_parts, self.embedding_dim))

    def call(self, inputs, training=None, with_features=False):
        features = self.embedding(inputs)
        flat = tf.reshape(features, [-1, self.num_parts * self.embedding_dim])
        embeddings = tf.reshape(self.batch_norm(flat, training=training),
                                [-1, self.num_parts, self.embedding_dim])
        logits = tf.cast(self.classifier(embeddings), tf.float32)
        if with_features:
            return embeddings, logits, features
        return embeddings, logits

    def compute_output_shape(self, input_shape):
        batch = input_shape[0]
        return ((batch, self.num_parts, self.embedding_dim), (batch, self.num_parts, self.num_classes))

    def get_config(self):
        return {
            **super().get_config(),
            "num_parts": self.num_parts,
            "embedding_dim": self.embedding_dim,
            "num_classes": self.num_classes,
            "sync_batch_norm": self.sync_batch_norm,
        }
