"""EXIF orientation (issue 39): a camera's sideways JPEG, tagged with its orientation, is turned
upright by the one decode (`data.preprocessing.decode`: training, evaluation, the SavedModel,
every runtime) and by the gallery's thumbnails, as Pillow's `ImageOps.exif_transpose` turns it.
The EXIF segments are written by hand here, both byte orders, after the start of image or
after a JFIF segment, so the parser is checked against bytes it did not write."""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from PIL import ImageOps

from reid_tf.data import preprocessing
from reid_tf.deploy.gallery import thumbnails
from reid_tf.deploy.runtime import KerasRuntime
from reid_tf.model import PartLossNet


def picture(height=24, width=16):
    """An image that no flip or rotation maps onto itself."""
    rows, columns = np.mgrid[0:height, 0:width]
    image = np.stack([rows * 10, columns * 15, (rows * columns) % 256], -1).astype(np.uint8)
    image[:6, :4] = [255, 0, 0]
    return image


def plain_jpeg(image, jfif=True):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    if not jfif:  # drop the APP0 (JFIF) segment: some cameras write EXIF straight after SOI
        assert data[2:4] == b"\xff\xe0"
        data = data[:2] + data[4 + struct.unpack(">H", data[4:6])[0]:]
    return data


def exif_segment(orientation, byte_order, extra_tags=2):
    """An APP1 segment with IFD0 holding a few tags, the orientation among them."""
    end = "<" if byte_order == "II" else ">"
    tags = [(0x010F, 2, 4, b"cam\0"), (0x0112, 3, 1, struct.pack(end + "HH", orientation, 0)),
            (0x0131, 2, 4, b"ab\0\0")][:extra_tags + 1]
    tags.sort()
    ifd = struct.pack(end + "H", len(tags)) + b"".join(
        struct.pack(end + "HHI", tag, kind, count) + value for tag, kind, count, value in tags
    ) + struct.pack(end + "I", 0)
    tiff = byte_order.encode() + struct.pack(end + "HI", 42, 8) + ifd
    body = b"Exif\0\0" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def tagged_jpeg(image, orientation, byte_order="II", jfif=True):
    data = plain_jpeg(image, jfif)
    at = 2 if not jfif else 4 + struct.unpack(">H", data[4:6])[0]
    return data[:at] + exif_segment(orientation, byte_order) + data[at:]


def upright_by_pillow(data):
    with Image.open(io.BytesIO(data)) as image:
        return ImageOps.exif_transpose(image)


@pytest.mark.parametrize("byte_order,jfif", [("II", True), ("MM", True), ("MM", False)])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_turns_each_orientation_upright_as_pillow_does(orientation, byte_order, jfif):
    image = picture()
    data = tagged_jpeg(image, orientation, byte_order, jfif)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.getexif()[0x0112] == orientation  # Pillow reads the segment we wrote
    expected = upright_by_pillow(data)
    raw = tf.io.decode_jpeg(plain_jpeg(image, jfif)).numpy()  # the same pixels, unturned
    # Pillow's turn of TensorFlow's own pixels: the decode must give exactly this.
    turned = np.asarray(ImageOps.exif_transpose(_with_orientation(raw, orientation)))
    assert turned.shape[:2] == (expected.height, expected.width)
    decoded = preprocessing.decode(tf.constant(data), turned.shape[:2]).numpy()
    np.testing.assert_array_equal(decoded, turned.astype(np.float32))
    assert int(preprocessing.exif_orientation(tf.constant(data))) == orientation


def _with_orientation(pixels, orientation):
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    return image


def test_images_without_a_readable_orientation_are_left_as_they_are():
    image = picture()
    png = tf.io.encode_png(image).numpy()
    cases = {"png": png, "jpeg without exif": plain_jpeg(image),
             "orientation 0": tagged_jpeg(image, 0), "orientation 9": tagged_jpeg(image, 9)}
    cases["exif cut short"] = tagged_jpeg(image, 6, jfif=False)[:20]
    for name, data in cases.items():
        assert int(preprocessing.exif_orientation(tf.constant(data))) == 1, name
    for data in [b"", b"\xff\xd8", b"\xff\xd8\xff\xe1\xff\xff"]:  # garbage: no error, 1
        assert int(preprocessing.exif_orientation(tf.constant(data))) == 1
    np.testing.assert_array_equal(preprocessing.decode(tf.constant(png), (24, 16)).numpy(),
                                  image.astype(np.float32))


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_sideways_camera_jpeg_embeds_as_its_upright_picture():
    """The finding: a sideways JPEG was embedded sideways. Its embedding is now the upright
    image's (the model's decode, as the SavedModel and every runtime decode)."""
    model = PartLossNet(num_classes=5, num_parts=3, embedding_dim=16, backbone="tiny",
                        image_size=(24, 16))
    model.build()
    upright = picture()
    sideways = np.rot90(upright, k=1).copy()  # as stored by a camera held on its side
    data = tagged_jpeg(sideways, 6)  # 6: turn 90 degrees clockwise to view
    reference = tf.io.decode_jpeg(plain_jpeg(sideways)).numpy()
    runtime = KerasRuntime(model)
    embedded = runtime.embed_encoded(tf.constant([data]), ["embedding"])["embedding"]
    expected = runtime.embed(np.rot90(reference, k=-1)[None].astype(np.float32),
                             ["embedding"])["embedding"]
    np.testing.assert_allclose(embedded, expected, atol=1e-6)
    wrong = runtime.embed(preprocessing.preprocess(reference[None], (24, 16)), ["embedding"])
    assert not np.allclose(embedded, wrong["embedding"], atol=1e-3)


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_format_file_turns_it_upright_too(tmp_path):
    """The .onnx/.tflite runtimes decode encoded images themselves (to run each size once)."""
    formats = pytest.importorskip("reid_tf.deploy.formats")
    pytest.importorskip("tf2onnx")
    model = PartLossNet(num_classes=5, num_parts=3, embedding_dim=16, backbone="tiny",
                        image_size=(24, 16))
    model.build()
    candidate = formats.open_file(formats.write(model, str(tmp_path), "model.onnx"))
    sideways = np.rot90(picture(), k=1).copy()
    turned = candidate.predict_encoded([tagged_jpeg(sideways, 6)])["embedding"]
    reference = tf.io.decode_jpeg(plain_jpeg(sideways)).numpy()
    expected = candidate.predict_images(np.rot90(reference, k=-1)[None].copy())["embedding"]
    np.testing.assert_allclose(turned, expected, atol=1e-6)


def test_a_thumbnail_is_upright():
    sideways = np.rot90(picture(96, 64), k=1).copy()  # 64 x 96 stored, 96 x 64 upright
    data = tagged_jpeg(sideways, 6)
    with Image.open(io.BytesIO(thumbnails.thumbnail(data, height=48))) as small:
        assert small.size == (32, 48)  # width, height: tall, as the person stands
        turned = np.asarray(small, np.float32)
    with Image.open(io.BytesIO(thumbnails.thumbnail(picture(96, 64), height=48))) as small:
        upright = np.asarray(small, np.float32)
    assert np.abs(turned - upright).mean() < 8  # JPEG twice over, not a turned picture
