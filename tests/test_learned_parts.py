"""The learned part assignment (issue 38): the layer against a direct computation, its teacher
loss, the model pooling with the head's soft masks at inference (and the teacher's during
induction), an inference graph without the K-means, and reid-train end to end."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from reid_tf import testing
from reid_tf.model import PartLossNet
from reid_tf.model import learned_parts
from reid_tf.model import parts
from reid_tf.train import workdir as workdir_lib


def features(seed=0, shape=(2, 8, 4, 16)):
    return tf.constant(np.abs(np.random.default_rng(seed).normal(size=shape)), tf.float32)


def test_the_layer_is_a_softmax_over_a_per_cell_dense_layer():
    layer = learned_parts.LearnedPartPartition(3, teacher="bands")
    x = features()
    layer(x)
    kernel = np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32)
    bias = np.array([0.1, -0.2, 0.3], np.float32)
    layer.classifier.set_weights([kernel, bias])
    out = layer(x)
    logits = np.einsum("bhwc,ck->bhwk", x.numpy(), kernel) + bias
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["masks"], expected, rtol=1e-5, atol=1e-6)
    # Its teacher is the activation partition itself, without gradient.
    teacher = parts.ActivationPartPartition(3, "bands")(x)
    np.testing.assert_array_equal(layer.teacher(x), teacher)
    with tf.GradientTape() as tape:
        tape.watch(x)
        taught = tf.reduce_sum(layer.teacher(x))
    assert tape.gradient(taught, x) is None
    clone = testing.check_config_round_trip(layer)
    assert clone.num_parts == 3 and clone.teacher_strategy == "bands"
    for name in ("masks", "logits"):
        graph = tf.function(lambda v: layer(v)[name])(x)
        np.testing.assert_allclose(graph, out[name], atol=1e-6)


def test_the_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="part_teacher.*bands"):
        learned_parts.LearnedPartPartition(3, teacher="peaks")
    with pytest.raises(ValueError, match="num_parts"):
        learned_parts.LearnedPartPartition(0)


def test_assignment_loss_is_the_mean_cell_cross_entropy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 2, 3)).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=(2, 4, 2))]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(targets * log_p).sum(-1).mean(axis=(1, 2))
    np.testing.assert_allclose(learned_parts.assignment_loss(targets, logits), expected,
                               rtol=1e-5)
    assert learned_parts.assignment_loss(targets[..., :0], logits[..., :0]).numpy().tolist() \
        == [0.0, 0.0]


def direct_part_embeddings(model, images, masks_of):
    """The part embeddings computed step by step from the backbone's features and the masks
    `masks_of(features)` gives: what the model must output."""
    feature_map = model.backbone(images, training=False)
    masks = masks_of(feature_map)
    pooled = np.einsum("bhwc,bhwk->bkc", feature_map.numpy(), masks) / masks.sum(
        axis=(1, 2))[..., None]
    embeddings, _ = model.part_head(tf.constant(pooled, tf.float32), training=False)
    return embeddings.numpy()


def test_inference_pools_with_the_heads_soft_masks_and_induction_with_the_teachers():
    model = PartLossNet(num_classes=5, num_parts=3, part_strategy="learned", backbone="tiny",
                        image_size=(64, 32))
    model.build()
    rng = np.random.default_rng(3)
    kernel = rng.normal(scale=0.2, size=model.partition.classifier.kernel.shape)
    model.partition.classifier.set_weights([kernel.astype(np.float32), np.zeros(3, np.float32)])
    images = tf.constant(rng.uniform(0, 255, size=(2, 64, 32, 3)), tf.float32)
    outputs = model(images, training=False)

    def head_masks(feature_map):
        return model.partition(feature_map)["masks"].numpy()

    def teacher_masks(feature_map):
        return model.partition.teacher(feature_map).numpy()

    expected = direct_part_embeddings(model, images, head_masks)
    np.testing.assert_allclose(outputs["part_embeddings"], expected, rtol=1e-4, atol=1e-5)
    # The teacher's masks give other embeddings: pooling with them at inference would fail.
    wrong = direct_part_embeddings(model, images, teacher_masks)
    assert np.abs(wrong - expected).max() > 1e-2
    np.testing.assert_allclose(outputs["part_masks"], head_masks(model.backbone(images)),
                               atol=1e-6)
    assert float(tf.reduce_max(tf.abs(tf.reduce_sum(outputs["part_masks"], -1) - 1))) < 1e-5
    # In training the targets are the teacher's parts; pooling follows `teacher_pooling`.
    # (Dropout-free tiny backbone: training mode changes only BatchNorm, so compare masks.)
    trained = model(images, training=True)
    np.testing.assert_array_equal(trained["part_targets"],
                                  teacher_masks(model.backbone(images, training=True)))
    assert sorted(trained) == sorted(outputs)
    for switch, masks_of in ((1.0, teacher_masks), (0.0, head_masks)):
        model.teacher_pooling.assign(switch)
        feature_map = model.backbone(images, training=True)
        masks = masks_of(feature_map)
        pooled = np.einsum("bhwc,bhwk->bkc", feature_map.numpy(), masks) / masks.sum(
            axis=(1, 2))[..., None]
        got = model(images, training=True)
        # The head's pre-BN features are the same Dense of the pooled features in both modes.
        direct = model.part_head.embedding(tf.constant(pooled, tf.float32)).numpy()
        np.testing.assert_allclose(got["part_features"], direct, rtol=1e-4, atol=1e-4)


def test_the_inference_graph_has_no_kmeans():
    def graph_ops(strategy):
        model = PartLossNet(num_classes=5, num_parts=3, part_strategy=strategy,
                            backbone="tiny", image_size=(64, 32))
        model.build()
        function = tf.function(lambda x: model(x, training=False)["embedding"])
        graph = function.get_concrete_function(tf.TensorSpec([None, 64, 32, 3])).graph
        return [op for op in graph.get_operations()]

    learned, bands = graph_ops("learned"), graph_ops("bands")
    # The clustering's ops live under the partition; the learned one has a Dense and a softmax.
    learned_partition = [op.type for op in learned if "partition" in op.name]
    bands_partition = [op.type for op in bands if "partition" in op.name]
    assert len(bands_partition) > 5 * len(learned_partition), (
        len(bands_partition), len(learned_partition))
    assert "Softmax" in learned_partition
    assert not [op.name for op in learned if "teacher" in op.name]


TINY = ["--dataset=synthetic_persons/small", "--backbone=tiny", "--image_height=64",
        "--image_width=32", "--embedding_dim=16", "--num_parts=3", "--identities_per_batch=4",
        "--images_per_identity=4", "--optimizer=adam", "--learning_rate=0.003",
        "--log_every=4", "--checkpoint_every=8", "--image_summary_every=0"]


@pytest.mark.slow  # trains, or runs a tool in a process
def test_reid_train_with_learned_parts_and_every_export_format(trained, tmp_path):
    workdir = tmp_path / "learned"
    result = subprocess.run(
        [sys.executable, "-m", "reid_tf.cli.train", f"--workdir={workdir}",
         f"--data_dir={trained['data_dir']}", *TINY, "--part_strategy=learned",
         "--part_teacher=stripes", "--part_induction=0.5", "--train_steps=16",
         "--image_summary_every=8"],
        capture_output=True, text=True, timeout=600, env={**os.environ,
                                                          "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assign = [float(line.split("assign ")[1].split()[0]) for line in result.stdout.splitlines()
              if line.startswith("step ") and "assign " in line]
    assert len(assign) == 4 and assign[-1] < assign[0]  # the head learns the stripes
    results = json.load(open(workdir / "results.json"))
    assert results["part_strategy"] == "learned" and 0 <= results["mAP"] <= 1
    model = PartLossNet.from_config(json.load(open(workdir / "model.json")))
    assert model.learned and model.part_teacher == "stripes"
    export = subprocess.run(
        [sys.executable, "-m", "reid_tf.cli.export", f"--workdir={workdir}",
         f"--export_dir={tmp_path / 'export'}", "--format=onnx,tflite", "--version=1"],
        capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    card = json.load(open(tmp_path / "export" / "1" / "model_card.json"))
    assert set(card["files"]) == {"model.onnx", "model.tflite", "model_fp16.tflite",
                                  "model_int8_dynamic.tflite", "model_int8.tflite"}
    float_files = card["files"]["model.onnx"], card["files"]["model.tflite"]
    assert all(f["parity_with_saved_model"]["cosine_min"] > 0.9999 for f in float_files)
    # The masks users see: TensorBoard's pictures at each image summary, and the SavedModel's
    # `part_masks` (what reid-serve returns with return_masks for the page to draw): the
    # head's soft masks, not a teacher's hard ones.
    events = event_accumulator.EventAccumulator(str(workdir / "tensorboard" / "train"),
                                                size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("train/part_masks")] == [8, 16]
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (3, 64, 32, 3)), tf.uint8)
    served = tf.saved_model.load(str(tmp_path / "export" / "1")).signatures["serving_default"](
        images=images)["part_masks"]
    trained_model, _ = workdir_lib.load_trained_model(str(workdir), log=lambda line: None)
    head = trained_model.partition(trained_model.backbone(trained_model.preprocess(images),
                                                          training=False))["masks"]
    np.testing.assert_allclose(served, head, atol=1e-5)
    assert 0.01 < float(tf.reduce_min(served)) and float(tf.reduce_max(served)) < 0.99  # soft


def test_part_consistency_reports_the_heads_own_parts_against_its_teacher():
    """experiments/part_consistency.py on a learned run: the head's masks by row and how often its
    most likely part is the teacher's. A head at even odds puts 1/K of every row in each part,
    its parts in no order, and picks part 0 everywhere (argmax of a tie), so it agrees with
    the teacher exactly where the teacher says part 0."""
    module = testing.load_script(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                              "part_consistency.py"))
    layer = learned_parts.LearnedPartPartition(4, teacher="bands")
    maps = features(seed=3, shape=(6, 8, 4, 16))
    layer(maps)
    layer.classifier.set_weights([np.zeros((16, 4), np.float32), np.zeros(4, np.float32)])
    result = module.learned_head(types.SimpleNamespace(partition=layer), maps.numpy())
    np.testing.assert_allclose(result["mass_by_row"], np.full((8, 4), 0.25), atol=1e-6)
    assert result["ordered_fraction"] == 0.0 and result["mean_iou"] == pytest.approx(1.0)
    teacher_part_zero = parts.ActivationPartPartition(4, "bands")(maps).numpy()[..., 0]
    assert 0 < teacher_part_zero.mean() < 1
    assert result["teacher_agreement"] == pytest.approx(teacher_part_zero.mean())
    assert result["teacher"] == "bands"
