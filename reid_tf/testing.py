"""Test helpers shared by the suite.

Keras layer checks: config round trip; eager, tf.function and XLA give the same outputs.
"""

import numpy as np
import tensorflow as tf


def check_config_round_trip(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    return clone


def check_call_modes(layer, inputs, atol=1e-5):
    """Runs `layer` eagerly, inside tf.function and with jit_compile; returns the eager output."""
    eager = layer(inputs)
    graph = tf.function(lambda x: layer(x))(inputs)
    xla = tf.function(lambda x: layer(x), jit_compile=True)(inputs)
    for other in (graph, xla):
        np.testing.assert_allclose(np.asarray(other), np.asarray(eager), atol=atol)
    return eager
