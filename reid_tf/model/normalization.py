"""BatchNormalization through TensorFlow's fused kernel (every backbone uses it)."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="reid_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TensorFlow's fused kernel.

    Keras 3 normalises in separate ops (moments, then `tf.nn.batch_normalization`, and their
    gradients op by op); TensorFlow's `FusedBatchNormV3` does statistics, normalisation and the
    gradient in one kernel each. Same variables, same outputs and gradients (to float rounding),
    same moving-statistics update (Keras keeps the biased batch variance; the fused kernel
    returns the unbiased one, which is corrected). Used where it applies: 4-D NHWC inputs,
    centred and scaled, no mask, renorm or cross-replica statistics; elsewhere Keras's own path.
    """

    def _fusable(self, inputs, mask):
        return (mask is None and not self.renorm and not self.synchronized and self.scale
                and self.center and len(inputs.shape) == 4 and self.axis in (-1, 3))

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)  # as Keras: statistics in float32 under mixed precision
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, epsilon=self.epsilon, data_format="NHWC",
                is_training=True)
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum
                                    + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum
                                        + variance * (1.0 - self.momentum))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, data_format="NHWC", is_training=False)
        return tf.cast(y, self.compute_dtype)
