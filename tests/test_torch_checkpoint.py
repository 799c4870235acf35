"""torchvision checkpoints without PyTorch: the restricted reader, and the imported MobileNetV2."""

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_tf import model as model_lib
from reid_tf.model import backbones
from reid_tf.model import torch_import

WEIGHTS = os.path.join("weights", "mobilenet_v2-b0353104.pth")


class _FakeTensor:
    """Pickles as torch does: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, array, key):
        self.array, self.key = np.asarray(array), key


class _FakeStorage:
    def __init__(self, tensor):
        self.tensor = tensor


class _TorchPickler(pickle.Pickler):
    def __init__(self, file, fake_torch, legacy):
        super().__init__(file, protocol=2)
        self.fake_torch, self.legacy = fake_torch, legacy

    def reducer_override(self, obj):
        if isinstance(obj, _FakeTensor):
            strides = [s // obj.array.itemsize for s in obj.array.strides]
            return (self.fake_torch["torch._utils"]._rebuild_tensor_v2,
                    (_FakeStorage(obj), 0, obj.array.shape, strides, False, collections.OrderedDict()))
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _FakeStorage):
            obj = obj.tensor
            storage = self.fake_torch["torch"].FloatStorage if obj.array.dtype == np.float32 \
                else self.fake_torch["torch"].LongStorage
            base = obj.array.base if obj.array.base is not None else obj.array
            pid = ("storage", storage, obj.key, "cpu", base.size)
            return pid + (None,) if self.legacy else pid
        return None


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a `torch` module for pickle to name its globals (no PyTorch here)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return {"torch": torch, "torch._utils": utils}


def _tensors(state):
    tensors, storages = collections.OrderedDict(), {}
    for index, (name, array) in enumerate(state.items()):
        base = array.base if array.base is not None else array
        key = storages.setdefault(id(base), (str(index), base))[0]
        tensors[name] = _FakeTensor(array, key)
    return tensors, {key: base for key, base in storages.values()}


def save_zip(path, state, fake_torch):
    tensors, storages = _tensors(state)
    buffer = io.BytesIO()
    _TorchPickler(buffer, fake_torch, legacy=False).dump(tensors)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for key, base in storages.items():
            archive.writestr(f"archive/data/{key}", np.ascontiguousarray(base).tobytes())


def save_legacy(path, state, fake_torch):
    tensors, storages = _tensors(state)
    with open(path, "wb") as file:
        for header in (torch_import._LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(header, file, protocol=2)
        _TorchPickler(file, fake_torch, legacy=True).dump(tensors)
        pickle.dump(list(storages), file, protocol=2)
        for base in storages.values():
            file.write(struct.pack("<q", base.size) + np.ascontiguousarray(base).tobytes())


@pytest.mark.parametrize("save", [save_zip, save_legacy])
def test_both_formats_round_trip_tensors_views_and_dtypes(tmp_path, fake_torch, save):
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = collections.OrderedDict(
        [("conv.weight", matrix), ("conv.weight_t", matrix.T),  # a strided view, shared storage
         ("bn.num_batches_tracked", np.array(7, np.int64)),
         ("fc.bias", np.linspace(-1, 1, 5).astype(np.float32))])
    path = tmp_path / "model.pth"
    save(path, state, fake_torch)
    loaded = torch_import.load_state_dict(path)
    assert list(loaded) == list(state)
    for name, array in state.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path, monkeypatch,
                                                                     container):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"state_dict": _Exploit()}, protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    else:
        path.write_bytes(pickle.dumps(torch_import._LEGACY_MAGIC, protocol=2) + payload)
    with pytest.raises(torch_import.UnsafeCheckpointError,
                       match=r"evil.pth: refers to posix.system, which is not a tensor"):
        torch_import.load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_damaged_or_foreign_files_get_a_clear_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(pickle.UnpicklingError, match=r"notes.pth: not a PyTorch checkpoint"):
        torch_import.load_state_dict(path)
    path.write_bytes(pickle.dumps(torch_import._LEGACY_MAGIC, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"notes.pth: truncated"):
        torch_import.load_state_dict(path)


def test_wrong_or_missing_tensors_and_backbones_without_a_mapping_are_refused(tmp_path,
                                                                             fake_torch):
    path = tmp_path / "partial.pth"
    save_zip(path, {"features.0.0.weight": np.zeros((32, 3, 3, 3), np.float32)}, fake_torch)
    with pytest.raises(ValueError, match=r"partial.pth: has no tensor 'features.0.1.weight'"):
        backbones.build_backbone("mobilenet_v2", (64, 32, 3), weights=str(path))
    save_zip(path, {"features.0.0.weight": np.zeros((16, 3, 3, 3), np.float32)}, fake_torch)
    with pytest.raises(ValueError, match=r"'features.0.0.weight' has shape \(16, 3, 3, 3\); "
                                         r"expected \(32, 3, 3, 3\)"):
        backbones.build_backbone("mobilenet_v2", (64, 32, 3), weights=str(path))
    with pytest.raises(ValueError, match="WORKSPACE.md"):
        backbones.build_backbone("resnet50", (64, 32, 3), weights=str(path))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        backbones.build_backbone("mobilenet_v2", (64, 32, 3), weights=str(tmp_path / "x.pth"))


def test_imported_mobilenet_v2_classifies_chelsea_as_a_cat(shared_dir):
    """Not only shape-compatible: torchvision's preprocessing (shorter side 256, centre crop 224)
    and its ImageNet classifier on the imported features put scikit-image's cat photo in an
    ImageNet cat class (281 tabby ... 285 Egyptian cat)."""
    import skimage.data

    path = os.path.join(shared_dir, WEIGHTS)
    state = torch_import.load_state_dict(path)
    assert len(state) == 314
    net = backbones.build_backbone("mobilenet_v2", (224, 224, 3), weights=path, last_stride=2)
    assert net.name == "torchvision_mobilenet_v2_backbone"
    photo = skimage.data.chelsea().astype(np.float32)  # 300x451 RGB
    height, width = photo.shape[:2]
    scale = 256 / min(height, width)
    resized = tf.image.resize(photo, (round(height * scale), round(width * scale)),
                              antialias=True).numpy()
    top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
    crop = resized[None, top:top + 224, left:left + 224]
    pooled = net(crop).numpy().mean(axis=(1, 2))
    logits = pooled @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    probabilities = tf.nn.softmax(logits[0]).numpy()
    assert 281 <= probabilities.argmax() <= 285, np.argsort(-probabilities)[:5]
    assert probabilities[281:286].sum() > 0.5


@pytest.mark.slow  # trains, or runs a tool in a process
def test_last_stride_one_keeps_twice_the_rows_in_the_part_model(shared_dir):
    path = os.path.join(shared_dir, WEIGHTS)
    strided = backbones.build_backbone("mobilenet_v2", (128, 64, 3), weights=path, last_stride=2)
    kept = backbones.build_backbone("mobilenet_v2", (128, 64, 3), weights=path, last_stride=1)
    assert strided.output_shape == (None, 4, 2, 1280) and kept.output_shape == (None, 8, 4, 1280)
    images = tf.random.uniform([2, 128, 64, 3], 0, 255, seed=1)
    for a, b in zip(strided.weights, kept.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    net = model_lib.PartLossNet(num_classes=5, num_parts=3, backbone="mobilenet_v2",
                                backbone_weights=path, image_size=(128, 64), last_stride=1)
    outputs = net(images, training=False)
    assert net.backbone_name == "torchvision_mobilenet_v2"
    assert outputs["part_masks"].shape == (2, 8, 4, 3)
    # model.json rebuilds the torchvision layout (weights then come from the checkpoint).
    assert net.get_config()["backbone"] == "torchvision_mobilenet_v2"


def test_torchvision_layout_pads_like_pytorch_with_no_pad_op_at_stride_one():
    """Every 3x3 convolution of the torchvision layout gives what PyTorch's padding=1 gives (its
    input zero-padded by 1 on every side, then 'valid'), and only the stride-2 ones need a Pad op
    of their own: at stride 1 the padding is the convolution's (a Pad and its gradient cost about
    6 % of a training step)."""
    net = backbones.build_backbone("torchvision_mobilenet_v2", (64, 32, 3), weights=None,
                                   last_stride=1).get_layer("torchvision_mobilenet_v2")
    convolutions = [layer for layer in net.layers
                    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
                    and layer.kernel_size == (3, 3)]
    assert len(convolutions) == 18  # the stem and 17 depthwise
    pads = {layer.name for layer in net.layers if isinstance(layer, keras.layers.ZeroPadding2D)}
    stride_two = {layer.name for layer in convolutions if layer.strides == (2, 2)}
    assert pads == {f"{name}_pad" for name in stride_two} and len(stride_two) == 4
    probe = keras.Model(net.inputs, [layer.input for layer in convolutions]
                        + [layer.output for layer in convolutions])
    values = probe(tf.random.normal([2, 64, 32, 3], seed=3))
    for layer, given, output in zip(convolutions, values[:18], values[18:]):
        padded = tf.pad(given, [[0, 0], [1, 1], [1, 1], [0, 0]]) if layer.padding == "same" \
            else given  # the stride-2 ones get the padded map from their Pad layer
        stride = [1, *layer.strides, 1]
        expected = (tf.nn.depthwise_conv2d(padded, layer.kernel, stride, "VALID")
                    if isinstance(layer, keras.layers.DepthwiseConv2D)
                    else tf.nn.conv2d(padded, layer.kernel, stride, "VALID"))
        np.testing.assert_allclose(output.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=layer.name)
