import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_tf import model as model_lib
from reid_tf import testing
from reid_tf.model import losses
from reid_tf.train import distribute
from reid_tf.train import step as step_lib

TINY = dict(num_classes=5, backbone="tiny", image_size=(64, 32), embedding_dim=16)


def images(batch=2, seed=0):
    return tf.random.stateless_uniform([batch, 64, 32, 3], [seed, 1], 0, 255)


@pytest.mark.parametrize("num_parts", [0, 3])
def test_output_dict_keys_and_shapes(num_parts):
    net = model_lib.PartLossNet(num_parts=num_parts, **TINY)
    for training in (True, False):
        outputs = net(images(), training=training)
        assert tuple(outputs) == model_lib.OUTPUT_KEYS
        assert outputs["global_logits"].shape == (2, 5)
        assert outputs["part_logits"].shape == (2, num_parts, 5)
        assert outputs["global_embedding"].shape == (2, 16)
        assert outputs["part_embeddings"].shape == (2, num_parts, 16)
        assert outputs["part_masks"].shape == (2, 8, 4, num_parts)
        assert outputs["embedding"].shape == (2, (num_parts + 1) * 16)
        np.testing.assert_allclose(np.linalg.norm(outputs["embedding"], axis=-1), 1.0, rtol=1e-5)
        if num_parts:
            np.testing.assert_array_equal(outputs["part_masks"].numpy().sum(-1), 1.0)
        # An activation partition: its own masks are its targets, no per-cell logits.
        np.testing.assert_array_equal(outputs["part_targets"], outputs["part_masks"])
        assert outputs["part_assignment_logits"].shape == (2, 8, 4, num_parts)
        assert not np.any(outputs["part_assignment_logits"])


def test_descriptor_weighs_global_and_parts_equally():
    global_embedding = tf.constant([[3.0, 4.0]])
    part_embeddings = tf.constant([[[0.0, 10.0]]])
    got = model_lib.descriptor(global_embedding, part_embeddings).numpy()
    np.testing.assert_allclose(got, [[0.6, 0.8, 0.0, 1.0]] / np.sqrt(2), rtol=1e-6)


def test_gradients_reach_backbone_and_every_part_classifier_but_not_the_masks():
    net = model_lib.PartLossNet(num_parts=3, **TINY)
    labels = tf.constant([0, 3])
    with tf.GradientTape(persistent=True) as tape:
        outputs = net(images(), training=True)
        loss = tf.reduce_mean(losses.plnet_loss(labels, outputs)["loss"])
        mask_sum = tf.reduce_sum(outputs["part_masks"] * tf.random.uniform([2, 8, 4, 3]))
    variables = net.trainable_variables
    gradients = dict(zip([v.path for v in variables], tape.gradient(loss, variables)))
    classifier = tape.gradient(loss, net.part_head.classifier.kernel).numpy()
    for k in range(3):
        assert np.abs(classifier[k]).sum() > 0, f"part {k} classifier gets no gradient"
    first_conv = net.backbone.get_layer("tiny").get_layer("tiny_conv0").kernel
    assert np.abs(tape.gradient(loss, first_conv).numpy()).sum() > 0
    assert all(g is not None for g in gradients.values())
    assert all(g is None for g in tape.gradient(mask_sum, variables))


def test_baseline_has_no_part_branch_and_trains():
    net = model_lib.PartLossNet(num_parts=0, **TINY)
    outputs = net(images(), training=True)
    terms = losses.plnet_loss(tf.constant([1, 2]), outputs)
    np.testing.assert_array_equal(terms["part_loss"], 0.0)
    np.testing.assert_allclose(terms["loss"], terms["global_loss"])
    assert not any("part_head" in v.path for v in net.trainable_variables)


@pytest.mark.parametrize("num_parts", [0, 3])
def test_model_saves_and_reloads_with_identical_outputs(tmp_path, num_parts):
    net = model_lib.PartLossNet(num_parts=num_parts, part_strategy="activation", **TINY)
    net(images(), training=True)  # move BatchNorm statistics off their initial values
    expected = net(images(seed=1), training=False)
    net.save(tmp_path / "net.keras")
    reloaded = keras.models.load_model(tmp_path / "net.keras")
    assert reloaded.get_config() == net.get_config()
    got = reloaded(images(seed=1), training=False)
    for key in model_lib.OUTPUT_KEYS:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, err_msg=key)


def test_model_same_output_eager_and_in_tf_function():
    net = model_lib.PartLossNet(num_parts=3, **TINY)
    eager = net(images(), training=False)
    graph = tf.function(lambda x: net(x, training=False))(images())
    for key in model_lib.OUTPUT_KEYS:
        np.testing.assert_allclose(graph[key], eager[key], atol=1e-5, err_msg=key)


@pytest.mark.slow  # trains, or runs a tool in a process
@pytest.mark.parametrize("num_parts", [0, 3])
def test_mirrored_training_on_two_cpu_replicas_decreases_loss(num_parts):
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        net = model_lib.PartLossNet(num_parts=num_parts, **TINY)
        net.build()
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(net.trainable_variables)
    batch = {"image": images(batch=8), "label": tf.constant([0, 0, 1, 1, 2, 2, 3, 3])}
    dataset = tf.data.Dataset.from_tensors(batch).unbatch().batch(8).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    step = step_lib.make_train_step(net, optimizer, strategy, global_batch_size=8)
    history = [step(iterator, tf.constant(1)) for _ in range(3)]
    totals = [float(m["loss"]) for m in history]
    assert all(np.isfinite(totals))
    assert totals[0] > totals[1] > totals[2], totals
    for m in history:
        np.testing.assert_allclose(float(m["loss"]),
                                   float(m["global_loss"]) + float(m["part_loss"]), rtol=1e-5)
        assert m["part_losses"].shape == (num_parts,)


def test_bad_arguments_name_the_argument_and_valid_values():
    with pytest.raises(ValueError, match=r"num_parts=-1.*>= 0"):
        model_lib.PartLossNet(num_parts=-1, **TINY)
    with pytest.raises(ValueError, match=r"num_parts=9.*8x4 feature grid.*0\.\.8"):
        model_lib.PartLossNet(num_parts=9, **TINY)
    with pytest.raises(ValueError, match=r"part_strategy='grid'.*'peaks', 'activation', 'stripes'"):
        model_lib.PartLossNet(part_strategy="grid", **TINY)
    with pytest.raises(ValueError, match=r"backbone='vgg'.*mobilenet_v2.*resnet50.*tiny"):
        model_lib.PartLossNet(**{**TINY, "backbone": "vgg"})
    with pytest.raises(ValueError, match=r"input_shape=\(4, 32, 3\).*'tiny'.*at least 8"):
        model_lib.PartLossNet(**{**TINY, "image_size": (4, 32)})
    with pytest.raises(ValueError, match=r"input_shape=\(16, 128, 3\).*'resnet50'.*at least 32"):
        model_lib.PartLossNet(num_classes=5, backbone="resnet50", image_size=(16, 128))


def _train_three_steps(strategy, sync_batch_norm, initial_weights):
    batches = [{"image": images(batch=8, seed=s),
                "label": tf.constant([0, 0, 1, 1, 2, 2, 3, 3])} for s in range(3)]
    weights, history = testing.train_steps(strategy, initial_weights, batches, sync_batch_norm,
                                           label_smoothing=0.1)
    return weights, [float(m["loss"]) for m in history]


@pytest.mark.slow  # trains, or runs a tool in a process
def test_two_replicas_with_synchronised_batch_norm_equal_one_device():
    """The same global batches on 1 device and on 2 replicas (4 images each, BatchNorm
    statistics synchronised): the same losses and weights after 3 SGD steps."""
    reference = model_lib.PartLossNet(num_parts=3, **TINY)
    reference.build()
    initial = reference.get_weights()
    single_weights, single_losses = _train_three_steps(tf.distribute.get_strategy(), False,
                                                       initial)
    mirrored = distribute.make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    weights, replica_losses = _train_three_steps(mirrored, True, initial)
    np.testing.assert_allclose(replica_losses, single_losses, rtol=1e-4)
    assert len(weights) == len(single_weights) > 20
    for got, expected in zip(weights, single_weights):  # incl. BatchNorm moving statistics
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    # Moving the weights at all: the comparison is not between untouched initial weights.
    assert max(np.abs(w - i).max() for w, i in zip(weights, initial)) > 1e-3


@pytest.mark.parametrize("strategy", ["bands", "peaks", "activation"])
def test_part_gradients_reach_the_backbone_only_through_pooled_features(strategy):
    """The part loss trains the backbone through the masked pooling; the masks are constants
    of the image: the same gradient as with the masks fed in as fixed inputs."""
    net = model_lib.PartLossNet(num_parts=3, part_strategy=strategy, **TINY)
    x = images(batch=4)
    labels = tf.constant([0, 1, 2, 3])
    features = net.backbone(x, training=False)

    def part_loss(features, masks=None):
        masks = net.partition(features) if masks is None else masks
        pooled = net.part_pooling([features, masks])
        _, logits = net.part_head(pooled, training=False)
        return losses.part_loss(labels, logits)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(features)
        through_layer = tf.reduce_mean(part_loss(features))
        fixed = tf.reduce_mean(part_loss(features, tf.constant(net.partition(features))))
    gradient = tape.gradient(through_layer, features)
    np.testing.assert_allclose(gradient, tape.gradient(fixed, features), atol=1e-7)
    assert float(tf.reduce_max(tf.abs(gradient))) > 0
    # ... and it reaches the backbone's weights.
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(part_loss(net.backbone(x, training=False)))
    backbone_gradients = tape.gradient(loss, net.backbone.trainable_variables)
    assert all(g is not None for g in backbone_gradients)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in backbone_gradients) > 0
    # A perturbation that changes no channel's argmax nor any relative weight leaves the masks.
    np.testing.assert_array_equal(net.partition(features), net.partition(features * 3.0))


@pytest.mark.slow  # runs a tool in a process
def test_reid_demo_trains_a_few_steps_and_refuses_a_bad_option():
    result = testing.run_module("reid_tf.cli.demo", "--steps=5", "--height=64", "--width=32",
                                "--num_parts=3", "--num_identities=4")
    assert "PartLossNet: backbone=tiny, K=3 (bands)" in result.stdout
    losses = [float(line.split("loss ")[1].split()[0]) for line in result.stdout.splitlines()
              if line.startswith("step")]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] > 0
    refused = testing.run_module("reid_tf.cli.demo", "--steps=0", check=False)
    assert refused.returncode != 0 and "--steps=0: expected a positive integer" in refused.stderr


def _losses_under(policy, initial=None, steps=3):
    """A torchvision-layout MobileNetV2 PL-Net's losses over `steps` Adam steps on fixed
    batches, under `policy` (`train.loop.precision`); and its initial weights."""
    from reid_tf.train import loop

    with loop.precision(policy):
        keras.utils.set_random_seed(0)
        net = model_lib.PartLossNet(num_classes=4, num_parts=2, embedding_dim=16,
                                    backbone="torchvision_mobilenet_v2", image_size=(64, 32))
        net.build()
        if initial is not None:
            net.set_weights(initial)
        layers = list(net.backbone._flatten_layers(include_self=False, recursive=True))
        dtypes = {kind: {layer.compute_dtype for layer in layers if type(layer) is kind}
                  for kind in (keras.layers.DepthwiseConv2D, keras.layers.Conv2D)}
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(net.trainable_variables)
        step = step_lib.make_train_step(net, optimizer, tf.distribute.get_strategy(),
                                        global_batch_size=8)
        batch = {"image": tf.random.stateless_uniform([8, 64, 32, 3], [0, 1], 0, 255),
                 "label": tf.constant([0, 0, 1, 1, 2, 2, 3, 3])}
        batches = iter(tf.data.Dataset.from_tensors(batch).repeat())
        losses = [float(step(batches, tf.constant(1))["loss"]) for _ in range(steps)]
    return losses, dtypes, net.get_weights()


@pytest.mark.slow  # three MobileNetV2 trainings
def test_bfloat16_keeps_depthwise_convolutions_in_float32_and_tracks_float32_losses():
    """Under mixed_bfloat16 the depthwise convolutions compute in float32 (TensorFlow's CPU
    kernels run their backward 4x slower in bfloat16: benchmarks/README.md), every other
    convolution in bfloat16; the losses are finite and track float32's."""
    full, full_dtypes, _ = _losses_under("none")
    _, _, initial = _losses_under("none", steps=0)
    mixed, dtypes, _ = _losses_under("bfloat16", initial)
    assert full_dtypes[keras.layers.Conv2D] == {"float32"}
    assert dtypes[keras.layers.DepthwiseConv2D] == {"float32"}
    assert dtypes[keras.layers.Conv2D] == {"bfloat16"}
    assert all(np.isfinite(mixed)) and full[-1] < full[0]
    np.testing.assert_allclose(mixed, full, rtol=0.02)


def test_the_train_step_is_traced_once_for_any_number_of_steps():
    """The one-step graph is traced once per train step function (it was traced twice: called
    before its loop and inside it, doubling tracing and graph optimisation at start-up)."""
    traces = []

    def loss_fn(labels, outputs, gather):
        traces.append(1)  # Python runs only while tracing
        return losses.plnet_loss(labels, outputs, 1.0, 0.0, gather=gather)

    net = model_lib.PartLossNet(num_classes=4, num_parts=2, embedding_dim=16, backbone="tiny",
                                image_size=(64, 32))
    net.build()
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(net.trainable_variables)
    step = step_lib.make_train_step(net, optimizer, tf.distribute.get_strategy(),
                                    global_batch_size=8, loss_fn=loss_fn)
    batch = {"image": tf.random.stateless_uniform([8, 64, 32, 3], [0, 1], 0, 255),
             "label": tf.constant([0, 0, 1, 1, 2, 2, 3, 3])}
    batches = iter(tf.data.Dataset.from_tensors(batch).repeat())
    first = step(batches, tf.constant(3))
    step(batches, tf.constant(1))
    assert len(traces) == 1
    assert int(optimizer.iterations) == 4 and int(first["first_bad_step"]) == -1
    assert np.isfinite(float(first["loss"]))
