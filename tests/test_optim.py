"""The one optimizer: parameter groups give the arithmetic of separate optimizers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_tf import model as model_lib
from reid_tf.model import losses
from reid_tf.train import optim


def schedule(learning_rate):
    return optim.WarmupThenDecay(learning_rate, total_steps=30, warmup_steps=5)


def trained_weights(grouped, factor, name="adam", steps=12):
    """A tiny PL-Net after `steps` steps: one grouped optimizer, or (the reference) one Keras
    optimizer for the heads and another with the scaled schedule for the backbone."""
    keras.utils.set_random_seed(0)
    net = model_lib.PartLossNet(num_classes=6, num_parts=2, backbone="tiny", embedding_dim=8,
                                image_size=(64, 32))
    net.build()
    classes = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    if grouped:
        optimizer = optim.build_optimizer(name, schedule(1e-3), 5e-4,
                                          optim.parameter_groups(net, factor))
        optimizer.build(net.trainable_variables)
        updates = [(optimizer, net.trainable_variables)]
    else:
        backbone = {id(v) for v in net.backbone.trainable_variables}
        updates = []
        for lr, variables in ((1e-3, [v for v in net.trainable_variables if id(v) not in backbone]),
                              (1e-3 * factor, net.backbone.trainable_variables)):
            reference = classes[name](**optim.OPTIMIZER_ARGUMENTS[name](schedule(lr), 5e-4))
            reference.exclude_from_weight_decay(var_names=list(optim.NO_DECAY_NAMES))
            reference.build(variables)
            updates.append((reference, variables))
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (12, 64, 32, 3)), tf.float32)
    labels = tf.constant(np.repeat(np.arange(6), 2), tf.int32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(losses.plnet_loss(labels, net(images, training=True))["loss"])
        gradients = dict(zip([id(v) for v in net.trainable_variables],
                             tape.gradient(loss, net.trainable_variables)))
        for optimizer, variables in updates:
            optimizer.apply_gradients([(gradients[id(v)], v) for v in variables])

    for _ in range(steps):
        step()
    return [v.numpy() for v in net.weights]


@pytest.mark.slow  # trains, or runs a tool in a process
@pytest.mark.parametrize("name, factor", [("adam", 0.35), ("adam", 1.0), ("sgd", 0.1)])
def test_parameter_groups_equal_separate_optimizers_with_scaled_schedules(name, factor):
    grouped = trained_weights(True, factor, name)
    reference = trained_weights(False, factor, name)
    for got, expected in zip(grouped, reference):
        np.testing.assert_array_equal(got, expected)


def test_groups_split_backbone_and_heads_and_keep_biases_and_batch_norm_undecayed():
    net = model_lib.PartLossNet(num_classes=4, num_parts=2, backbone="tiny", embedding_dim=8,
                                image_size=(64, 32))
    net.build()
    groups = {(g.learning_rate_factor, g.weight_decay_factor): g.variables
              for g in optim.parameter_groups(net, 0.1)}
    assert set(groups) == {(0.1, 1.0), (0.1, 0.0), (1.0, 1.0), (1.0, 0.0)}
    backbone = {id(v) for v in net.backbone.trainable_variables}
    assert {id(v) for v in groups[(0.1, 1.0)] + groups[(0.1, 0.0)]} == backbone
    assert all(v.name in ("gamma", "beta", "bias") for v in groups[(1.0, 0.0)] + groups[(0.1, 0.0)])
    assert sum(len(v) for v in groups.values()) == len(net.trainable_variables)
