"""An export format plugs in (issue 40): a toy format, one module's worth of code (a writer, a
reader, its parity floor) and one entry in `formats.FILES`, is written by the export with its
parity in the card, opened by `runtime.open_runtime` and ranks as the SavedModel does; no other
file changes."""

import base64
import json
import os

import numpy as np
import tensorflow as tf

from reid_tf import testing
from reid_tf.deploy import export as export_lib
from reid_tf.deploy import formats
from reid_tf.deploy import runtime
from reid_tf.deploy.formats import common
from reid_tf.deploy.formats import spec
from reid_tf.model import PartLossNet


def write_toy(model, path, calibration=None):
    """The frozen pixel function's GraphDef in a JSON file, with its tensor names and the
    training size."""
    concrete = common.frozen_module(model).pixels.get_concrete_function()
    outputs = {key: tensor.name for key, tensor in concrete.structured_outputs.items()}
    shapes = {key: tensor.shape.as_list() for key, tensor in concrete.structured_outputs.items()}
    with open(path, "w") as f:
        json.dump({"graph": base64.b64encode(
            concrete.graph.as_graph_def().SerializeToString()).decode(),
            "input": concrete.inputs[0].name, "outputs": outputs, "shapes": shapes,
            "image_size": list(model.image_size)}, f)
    return path


class ToyRuntime(common.PixelRuntime):
    def __init__(self, path, calibration=None):
        with open(path) as f:
            toy = json.load(f)
        graph = tf.compat.v1.GraphDef.FromString(base64.b64decode(toy["graph"]))
        imported = tf.compat.v1.wrap_function(
            lambda: tf.compat.v1.import_graph_def(graph, name=""), [])
        self.function = imported.prune(toy["input"], toy["outputs"])
        super().__init__(path, [None, None, None, 3], toy["shapes"], toy["image_size"],
                         calibration)

    def _run(self, images):
        return {key: value.numpy() for key, value in self.function(tf.constant(images)).items()}


def tiny_model():
    model = PartLossNet(num_classes=5, num_parts=3, embedding_dim=16, backbone="tiny",
                        image_size=(64, 32))
    model.build()
    return model


TOY = spec.FileFormat("model.toy", "toy", "float32", write_toy, ToyRuntime)


def test_a_toy_format_is_one_module_and_one_line_in_files(tmp_path, monkeypatch):
    monkeypatch.setitem(formats.FILES, TOY.file, TOY)  # the one registration line
    assert "toy" in formats.format_names() and formats.files_of(["toy"]) == ["model.toy"]
    model = tiny_model()
    images = testing.synthetic_images(6, (64, 32))
    path = export_lib.export_model(model, str(tmp_path), 3, ["model.toy"],
                                   parity_images=images, log=lambda line: None)

    card = json.load(open(os.path.join(path, "model_card.json")))
    entry = card["files"]["model.toy"]
    assert entry["format"] == "toy" and entry["quantization"] == "float32"
    assert entry["parity_with_saved_model"]["cosine_min"] > 0.9999
    assert entry["parity_with_saved_model"]["same_part_cells"] == 1.0
    assert entry["sha256"] == formats.file_digest(os.path.join(path, "model.toy"))

    toy = runtime.open_runtime(os.path.join(path, "model.toy"))
    saved_model = runtime.open_runtime(path)
    assert isinstance(toy, ToyRuntime) and toy.model_id == saved_model.model_id
    other = testing.synthetic_images(3, (100, 41))  # resized inside, as the SavedModel does
    np.testing.assert_allclose(toy.predict_images(other)["embedding"],
                               saved_model.predict_images(other)["embedding"], atol=1e-5)


def test_a_format_under_its_floor_is_refused_by_its_declared_floor(tmp_path, monkeypatch):
    def write_noisy(model, path, calibration=None):
        return write_toy(model, path)

    class NoisyRuntime(ToyRuntime):
        def _run(self, images):
            outputs = super()._run(images)
            noise = np.random.default_rng(0).normal(0, 0.05, outputs["embedding"].shape)
            return {**outputs, "embedding": outputs["embedding"] + noise.astype(np.float32)}

    noisy = spec.FileFormat("model_noisy.toy", "toy", "float16", write_noisy, NoisyRuntime)
    monkeypatch.setitem(formats.FILES, noisy.file, noisy)
    model = tiny_model()
    try:
        export_lib.export_model(model, str(tmp_path), 4, ["model_noisy.toy"],
                                parity_images=testing.synthetic_images(6, (64, 32)),
                                log=lambda line: None)
        raise AssertionError("exported under the floor")
    except ValueError as error:
        assert "model_noisy.toy: cosine mean with the SavedModel" in str(error)
        assert "< 0.999 on 6 images" in str(error)
    assert not os.path.exists(os.path.join(tmp_path, "4"))
