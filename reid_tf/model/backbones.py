"""Backbones: image [B,H,W,3] in [0, 255] RGB -> last convolutional feature map [B,h,w,C].

Each backbone carries its own input normalisation (`ImageNormalization`), so every caller (the
training pipeline, evaluation, the SavedModel) feeds the same raw pixels and cannot get the
preprocessing wrong.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from reid_tf.model import normalization
from reid_tf.model import torch_import

# Per-backbone facts: how inputs are normalised, the smallest input side it accepts, and the
# layers whose stride `last_stride=1` turns to 1.
_RESNET50_LAST_STRIDE_LAYERS = ("conv5_block1_0_conv", "conv5_block1_1_conv")

BACKBONES = {
    "resnet50": {"normalization": "caffe", "min_size": 32},
    "mobilenet_v2": {"normalization": "tf", "min_size": 32},
    "torchvision_mobilenet_v2": {"normalization": "torch", "min_size": 32},
    "tiny": {"normalization": "tf", "min_size": 8},
}

# torchvision statistics, in [0, 255] units.
_TORCH_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_TORCH_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="reid_tf")
class ImageNormalization(keras.layers.Layer):
    """Maps RGB pixels in [0, 255] to the range a backbone was trained on.

    Args:
        mode: `"caffe"` (BGR, ImageNet mean subtracted; keras ResNet50), `"tf"` (scaled to
            [-1, 1]; keras MobileNetV2 and the tiny net) or `"torch"` (/255, ImageNet mean and
            std; torchvision checkpoints).

    Shapes: `[B,H,W,3] -> [B,H,W,3]`.
    """

    MODES = ("caffe", "tf", "torch")

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"ImageNormalization: mode={mode!r}; expected one of {self.MODES}.")
        self.mode = mode

    def call(self, images):
        images = tf.cast(images, self.compute_dtype)
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "torch":
            return (images - tf.constant(_TORCH_MEAN, images.dtype)) / tf.constant(
                _TORCH_STD, images.dtype
            )
        bgr = images[..., ::-1]
        return bgr - tf.constant(_CAFFE_MEAN_BGR, images.dtype)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _check_input_shape(name, input_shape):
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(
            f"input_shape={tuple(input_shape)}: expected (height, width, 3) RGB images."
        )
    min_size = BACKBONES[name]["min_size"]
    if min(input_shape[:2]) < min_size:
        raise ValueError(
            f"input_shape={tuple(input_shape)}: backbone {name!r} needs height and width of at "
            f"least {min_size} pixels."
        )


def _rebuild(net, edit_layer_config):
    """The same functional graph with edited layer configs, and the same weights; Keras's
    BatchNormalization layers become `normalization.FusedBatchNormalization` (same variables)."""
    config = net.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "BatchNormalization":
            layer.update(module="reid_tf.model.normalization", class_name="FusedBatchNormalization",
                         registered_name="reid_tf>FusedBatchNormalization")
        edit_layer_config(layer["class_name"], layer["config"])
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(net.get_weights())
    return rebuilt


def _resnet50(inputs, weights, last_stride):
    net = keras.applications.ResNet50(include_top=False, weights=weights, input_tensor=inputs)
    if last_stride == 2:
        return net

    # keras.applications has no last-stride option: stride 1 in conv5_block1 (the usual ReID
    # change, 16x8 map at 256x128); 1x1 convolutions keep their kernels whatever their stride.
    def last_stride_one(class_name, config):
        if config["name"] in _RESNET50_LAST_STRIDE_LAYERS:
            config["strides"] = (1, 1)

    return _rebuild(net, last_stride_one)


def _mobilenet_v2(inputs, weights, last_stride):
    net = keras.applications.MobileNetV2(include_top=False, weights=weights, input_tensor=inputs)
    if last_stride == 2:
        return net

    # The last stride-2 layer is block 13's depthwise conv, after an asymmetric zero pad; with
    # stride 1 it needs a symmetric pad of 1 to keep the size (16x8 map at 256x128).
    def last_stride_one(class_name, config):
        if config["name"] == "block_13_pad":
            config["padding"] = ((1, 1), (1, 1))
        elif config["name"] == "block_13_depthwise":
            config["strides"] = (1, 1)

    return _rebuild(net, last_stride_one)


# torchvision's MobileNetV2 (width 1.0): (expansion t, channels c, repeats n, first stride s).
_TORCHVISION_MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _torch_conv_bn(x, conv_key, bn_key, filters, kernel_size, stride, activation,
                   depthwise=False):
    """torchvision's Conv2d(bias=False) + BatchNorm2d(eps=1e-5) [+ ReLU6].

    Layers are named for the torch modules they hold, dots as underscores (`features_3_conv_1_0`
    is `features.3.conv.1.0`). PyTorch's padding=1 on every side: Keras's 'same' is the same at
    stride 1, and inside the convolution's kernel (no Pad op and its gradient, about 6 % of a
    training step); at stride 2 'same' pads asymmetrically and would shift every map by half a
    pixel, so those four convolutions pad 1 on every side first and then run 'valid'.
    """
    conv_name, bn_name = conv_key.replace(".", "_"), bn_key.replace(".", "_")
    padding = "same"
    if kernel_size == 3 and stride == 2:
        x = keras.layers.ZeroPadding2D(1, name=f"{conv_name}_pad")(x)
        padding = "valid"
    elif kernel_size == 3:
        # No op: holds the place of the pad layer this convolution had before, because
        # checkpoints number the network's layers (`_operations.N`) and must keep restoring.
        x = keras.layers.Identity(name=f"{conv_name}_pad")(x)
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel_size, strides=stride, padding=padding,
                                         use_bias=False, name=conv_name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel_size, strides=stride, padding=padding,
                                use_bias=False, name=conv_name)(x)
    x = normalization.FusedBatchNormalization(epsilon=1e-5, momentum=0.9, name=bn_name)(x)
    if activation:
        x = keras.layers.ReLU(6.0, name=f"{bn_name}_relu6")(x)
    return x


def _torchvision_mobilenet_v2(inputs, weights, last_stride):
    """torchvision.models.mobilenet_v2's `features`, layer for layer. `last_stride=1` sets block
    14's depthwise stride to 1 (16x8 map at 256x128)."""
    x = _torch_conv_bn(inputs, "features.0.0", "features.0.1", 32, 3, 2, activation=True)
    channels, index = 32, 1
    for expansion, out_channels, repeats, first_stride in _TORCHVISION_MOBILENET_V2_SETTINGS:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            if index == 14 and last_stride == 1:
                stride = 1
            block_input, block, part = x, f"features.{index}.conv", 0
            if expansion != 1:
                x = _torch_conv_bn(x, f"{block}.0.0", f"{block}.0.1", channels * expansion, 1, 1,
                                   activation=True)
                part = 1
            x = _torch_conv_bn(x, f"{block}.{part}.0", f"{block}.{part}.1", None, 3, stride,
                               activation=True, depthwise=True)
            x = _torch_conv_bn(x, f"{block}.{part + 1}", f"{block}.{part + 2}", out_channels, 1, 1,
                               activation=False)
            if stride == 1 and channels == out_channels:
                x = keras.layers.Add(name=f"features_{index}_add")([block_input, x])
            channels, index = out_channels, index + 1
    x = _torch_conv_bn(x, "features.18.0", "features.18.1", 1280, 1, 1, activation=True)
    net = keras.Model(inputs, x, name="torchvision_mobilenet_v2")
    if weights is not None:
        load_torchvision_weights(net, torch_import.load_state_dict(weights), str(weights))
    return net


def load_torchvision_weights(net, state, source="checkpoint"):
    """Copies a torchvision state dict into a network whose layers are named for torch modules.

    Convolutions OIHW -> HWIO, depthwise [C,1,3,3] -> [3,3,C,1]; BatchNorm weight, bias,
    running_mean, running_var -> gamma, beta, moving_mean, moving_variance. Every layer must find
    its tensors with the right shapes, and every `features.*` tensor must be used; the classifier
    and `num_batches_tracked` are not part of the backbone.
    """
    used = set()

    def take(key, shape):
        if key not in state:
            raise ValueError(f"{source}: has no tensor {key!r}; is it torchvision's MobileNetV2?")
        value = np.asarray(state[key], np.float32)
        if value.shape != tuple(shape):
            raise ValueError(f"{source}: {key!r} has shape {value.shape}; expected {tuple(shape)}.")
        used.add(key)
        return value

    for layer in net.layers:
        key = layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            height, width, channels, _ = layer.kernel.shape
            layer.kernel.assign(take(f"{key}.weight", (channels, 1, height, width))
                                .transpose(2, 3, 0, 1))
        elif isinstance(layer, keras.layers.Conv2D):
            height, width, inputs, outputs = layer.kernel.shape
            layer.kernel.assign(take(f"{key}.weight", (outputs, inputs, height, width))
                                .transpose(2, 3, 1, 0))
        elif isinstance(layer, keras.layers.BatchNormalization):
            channels = tuple(layer.gamma.shape)
            layer.gamma.assign(take(f"{key}.weight", channels))
            layer.beta.assign(take(f"{key}.bias", channels))
            layer.moving_mean.assign(take(f"{key}.running_mean", channels))
            layer.moving_variance.assign(take(f"{key}.running_var", channels))
    expected = {k for k in state
                if k.startswith("features.") and not k.endswith("num_batches_tracked")}
    if expected - used:
        raise ValueError(f"{source}: tensors the Keras network has no place for: "
                         f"{sorted(expected - used)[:5]}.")


def _tiny(inputs, weights, last_stride):
    """Four 3x3 conv blocks, stride 8 (or 16 with last_stride=2): for tests and CPU demos."""
    if weights is not None:
        raise ValueError(f"weights={weights!r}: the 'tiny' backbone has no pretrained weights.")
    x = inputs
    for i, (filters, stride) in enumerate([(32, 2), (64, 2), (128, 2), (128, last_stride)]):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                                name=f"tiny_conv{i}")(x)
        x = normalization.FusedBatchNormalization(name=f"tiny_bn{i}")(x)
        x = keras.layers.ReLU(name=f"tiny_relu{i}")(x)
    return keras.Model(inputs, x, name="tiny")


def _synchronize_batch_norm(class_name, config):
    if class_name in ("BatchNormalization", "FusedBatchNormalization"):
        config["synchronized"] = True


def _float32_depthwise(class_name, config):
    """Under a bfloat16 policy, depthwise convolutions compute in float32 (their inputs cast up,
    their outputs cast back by Keras's autocast). TensorFlow's CPU kernels (oneDNN) run the
    depthwise backward passes 4x slower in bfloat16 than in float32, which cost bfloat16
    training more than the other convolutions gain (benchmarks/README.md, `profile_train.py`;
    measured on AVX512-BF16, 2026-12-07)."""
    if class_name == "DepthwiseConv2D":
        config["dtype"] = "float32"


_BUILDERS = {"resnet50": _resnet50, "mobilenet_v2": _mobilenet_v2,
             "torchvision_mobilenet_v2": _torchvision_mobilenet_v2, "tiny": _tiny}

# Backbones that can take a torchvision checkpoint (`weights=<path>.pth`), and the layout to use.
_TORCHVISION_LAYOUT = {"mobilenet_v2": "torchvision_mobilenet_v2",
                       "torchvision_mobilenet_v2": "torchvision_mobilenet_v2"}


def is_checkpoint_path(weights):
    return isinstance(weights, (str, os.PathLike)) and str(weights) != "imagenet"


def resolve_backbone(name, weights):
    """The backbone that `weights` loads into: a torchvision checkpoint needs torchvision's layout.

    >>> resolve_backbone("mobilenet_v2", "imagenet")
    'mobilenet_v2'
    >>> resolve_backbone("mobilenet_v2", "mobilenet_v2-b0353104.pth")  # doctest: +SKIP
    'torchvision_mobilenet_v2'
    """
    if not is_checkpoint_path(weights):
        if weights not in (None, "imagenet"):
            raise ValueError(f"weights={weights!r}: expected None, 'imagenet' or a .pth path.")
        if weights == "imagenet" and name == "torchvision_mobilenet_v2":
            raise ValueError("weights='imagenet': backbone 'torchvision_mobilenet_v2' loads a "
                             "torchvision checkpoint; pass its path.")
        return name
    if name not in _TORCHVISION_LAYOUT:
        raise ValueError(
            f"weights={str(weights)!r}: torchvision checkpoints load into "
            f"{sorted(_TORCHVISION_LAYOUT)} only, not backbone {name!r} (see WORKSPACE.md: "
            f"torchvision's ResNet-50 puts the stride on a different convolution than Keras's)."
        )
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights={str(weights)!r}: no such checkpoint file.")
    return _TORCHVISION_LAYOUT[name]


def build_backbone(name, input_shape=(256, 128, 3), weights=None, last_stride=1,
                   sync_batch_norm=False):
    """Builds a backbone that maps raw RGB pixels to its last feature map.

    Args:
        name: one of `BACKBONES` (`"resnet50"`, `"mobilenet_v2"`, `"tiny"`).
        input_shape: `(height, width, 3)`.
        weights: `None` (random init), `"imagenet"` (Keras's own download), or the path of a
            torchvision checkpoint (`.pth`, read with no PyTorch and no code execution), which
            builds the network in torchvision's exact layout (`resolve_backbone`).
        last_stride: 1 or 2; 1 keeps the last stage at stride 16 (16x8 map at 256x128 for
            resnet50), as is usual in ReID.
        sync_batch_norm: BatchNorm statistics over the global batch of all replicas (and
            workers), so every replica keeps identical moving statistics.

    Returns:
        A `keras.Model` `[B,H,W,3] float in [0,255] -> [B,h,w,C]` with normalisation inside.
    """
    if name not in _BUILDERS:
        raise ValueError(f"backbone={name!r}: expected one of {sorted(_BUILDERS)}.")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride={last_stride!r}: expected 1 or 2.")
    name = resolve_backbone(name, weights)
    input_shape = tuple(input_shape)
    _check_input_shape(name, input_shape)
    images = keras.Input(shape=input_shape, name="images")
    normalized = ImageNormalization(BACKBONES[name]["normalization"], name="normalization")(images)
    body = _BUILDERS[name](keras.Input(shape=input_shape), weights, last_stride)
    edits = [_synchronize_batch_norm] if sync_batch_norm else []
    if (keras.mixed_precision.global_policy().compute_dtype == "bfloat16"
            and any(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in body.layers)):
        edits.append(_float32_depthwise)
    if edits or any(type(layer) is keras.layers.BatchNormalization for layer in body.layers):
        # (and Keras's batch norm becomes the fused one: 1.6x faster)
        body = _rebuild(body, lambda class_name, config: [edit(class_name, config)
                                                           for edit in edits])
    return keras.Model(images, body(normalized), name=f"{name}_backbone")
