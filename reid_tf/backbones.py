"""Backbones: image [B,H,W,3] in [0, 255] RGB -> last convolutional feature map [B,h,w,C].

Each backbone carries its own input normalisation (`ImageNormalization`), so every caller (the
training pipeline, evaluation, the SavedModel) feeds the same raw pixels and cannot get the
preprocessing wrong.
"""

import keras
import tensorflow as tf

# Per-backbone facts: how inputs are normalised, the smallest input side it accepts, and the
# layers whose stride `last_stride=1` turns to 1.
_RESNET50_LAST_STRIDE_LAYERS = ("conv5_block1_0_conv", "conv5_block1_1_conv")

BACKBONES = {
    "resnet50": {"normalization": "caffe", "min_size": 32},
    "mobilenet_v2": {"normalization": "tf", "min_size": 32},
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
    """The same functional graph with edited layer configs, and the same weights."""
    config = net.get_config()
    for layer in config["layers"]:
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


def _tiny(inputs, weights, last_stride):
    """Four 3x3 conv blocks, stride 8 (or 16 with last_stride=2): for tests and CPU demos."""
    if weights is not None:
        raise ValueError(f"weights={weights!r}: the 'tiny' backbone has no pretrained weights.")
    x = inputs
    for i, (filters, stride) in enumerate([(32, 2), (64, 2), (128, 2), (128, last_stride)]):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                                name=f"tiny_conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"tiny_bn{i}")(x)
        x = keras.layers.ReLU(name=f"tiny_relu{i}")(x)
    return keras.Model(inputs, x, name="tiny")


def _synchronize_batch_norm(class_name, config):
    if class_name == "BatchNormalization":
        config["synchronized"] = True


_BUILDERS = {"resnet50": _resnet50, "mobilenet_v2": _mobilenet_v2, "tiny": _tiny}


def build_backbone(name, input_shape=(256, 128, 3), weights=None, last_stride=1,
                   sync_batch_norm=False):
    """Builds a backbone that maps raw RGB pixels to its last feature map.

    Args:
        name: one of `BACKBONES` (`"resnet50"`, `"mobilenet_v2"`, `"tiny"`).
        input_shape: `(height, width, 3)`.
        weights: `None` (random init) or `"imagenet"` (Keras's own download).
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
    if weights not in (None, "imagenet"):
        raise ValueError(f"weights={weights!r}: expected None or 'imagenet'.")
    input_shape = tuple(input_shape)
    _check_input_shape(name, input_shape)
    images = keras.Input(shape=input_shape, name="images")
    normalized = ImageNormalization(BACKBONES[name]["normalization"], name="normalization")(images)
    body = _BUILDERS[name](keras.Input(shape=input_shape), weights, last_stride)
    if sync_batch_norm:
        body = _rebuild(body, _synchronize_batch_norm)
    return keras.Model(images, body(normalized), name=f"{name}_backbone")
