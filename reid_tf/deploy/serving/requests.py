"""Request bodies of reid-serve: TF Serving's `instances`/`inputs` -> images, with every check
done before the model sees anything (`BadRequest` names the field)."""

import base64
import binascii
import io

import numpy as np


MAX_RESULTS = 1000


DEFAULT_MAX_IMAGE_PIXELS = 1 << 22  # 4.2 megapixels (2048 x 2048): 12 MiB decoded


class BadRequest(Exception):
    """A client error: `field` names the part of the request that is wrong."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field
        self.message = message


class Overloaded(Exception):
    """The batching queue is full (answered 503 with Retry-After)."""


class RequestTooLarge(Exception):
    """More images than the server can ever queue (answered 413, naming the limit)."""


class BodyTimeout(Exception):
    """The request body did not arrive in time (answered 408, connection closed)."""


def parse_images(body, max_batch, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """A TF Serving request body -> ("encoded", [bytes]) or ("images", uint8 [N,H,W,3]).

    Encoded images larger than `max_image_pixels` (read from the header, before any decoding:
    a small PNG can declare 20000 x 20000) are refused. Raises BadRequest naming the field for
    anything else.
    """
    if not isinstance(body, dict):
        raise BadRequest("body", "expected a JSON object with 'instances' or 'inputs'.")
    signature = body.get("signature_name")
    if signature not in (None, "", "serving_default", "serve_encoded"):
        raise BadRequest("signature_name", f"{signature!r}; expected serving_default (uint8 "
                         "arrays) or serve_encoded (b64 images).")
    if ("instances" in body) == ("inputs" in body):
        raise BadRequest("instances", "expected exactly one of 'instances' and 'inputs'.")
    field = "instances" if "instances" in body else "inputs"
    instances = body[field]
    if isinstance(instances, dict):  # columnar, named input
        if set(instances) != {"images"}:
            raise BadRequest(field, "expected the one input 'images'.")
        field, instances = f"{field}.images", instances["images"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest(field, "expected a non-empty list of images.")
    if len(instances) > max_batch:
        raise BadRequest(field, f"{len(instances)} images; at most {max_batch} per request.")
    instances = [item["images"] if isinstance(item, dict) and set(item) == {"images"} else item
                 for item in instances]
    if all(isinstance(item, dict) for item in instances):
        if signature == "serving_default":  # as TF Serving: that signature takes uint8 arrays
            raise BadRequest("signature_name", "serving_default takes uint8 arrays [H][W][3]; "
                             "b64 images go to serve_encoded.")
        encoded = [decode_b64(item, f"{field}[{i}]") for i, item in enumerate(instances)]
        for i, data in enumerate(encoded):
            check_encoded_image(data, f"{field}[{i}].b64", max_image_pixels)
        return "encoded", encoded
    if signature == "serve_encoded":
        raise BadRequest("signature_name", "serve_encoded takes {\"b64\": ...} images; uint8 "
                         "arrays go to serving_default.")
    if any(isinstance(item, dict) for item in instances):
        raise BadRequest(field, "mixes {'b64': ...} images and arrays; send one kind per request.")
    images = [uint8_image(item, f"{field}[{i}]") for i, item in enumerate(instances)]
    for i, image in enumerate(images):
        if image.shape != images[0].shape:
            raise BadRequest(f"{field}[{i}]", f"shape {list(image.shape)} differs from "
                             f"{field}[0]'s {list(images[0].shape)}; one size per request (or "
                             "send encoded images as b64).")
    return "images", np.stack(images)


def decode_b64(item, field):
    if set(item) != {"b64"} or not isinstance(item["b64"], str):
        raise BadRequest(field, "expected {\"b64\": \"<base64 of a JPEG/PNG image>\"}.")
    try:
        data = base64.b64decode(item["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}.b64", "not valid base64.") from None
    if not data:
        raise BadRequest(f"{field}.b64", "empty image.")
    return data


def check_encoded_image(data, field, max_image_pixels):
    """Refuses an encoded image that is too large or does not decode, before it can reach the
    model: the size comes from the header (Pillow reads only that), so a small file declaring a
    huge image is refused without decoding it; then TensorFlow's decoder (the export's) must
    read the whole image."""
    _check_image_header(data, field, max_image_pixels)
    import tensorflow as tf

    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.OpError:
        raise BadRequest(field, "not a decodable JPEG/PNG/BMP/GIF image.") from None


def _check_image_header(data, field, max_image_pixels):
    """Refuses an encoded image whose header declares more than `max_image_pixels`, or that has
    no image header at all, without decoding its pixels (Pillow reads only the header)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:  # Pillow's own limit, where it is still set
        raise BadRequest(field, f"{error} At most {max_image_pixels} pixels per image "
                         "(--max_image_pixels).") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for what is not an image
        raise BadRequest(field, "not a decodable JPEG/PNG/BMP/GIF image.") from None
    if width * height > max_image_pixels:
        raise BadRequest(field, f"{width}x{height} = {width * height} pixels; at most "
                         f"{max_image_pixels} per image (--max_image_pixels).")


def uint8_image(item, field):
    try:
        array = np.asarray(item)
    except ValueError:  # ragged nesting
        raise BadRequest(field, "ragged array; expected uint8 [H][W][3].") from None
    except RecursionError:
        raise BadRequest(field, "nested too deeply; expected uint8 [H][W][3].") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise BadRequest(field, f"shape {list(array.shape)}; expected [H][W][3] with H, W >= 1.")
    if array.dtype.kind not in "iu":
        raise BadRequest(field, f"values of type {array.dtype.name}; expected integers 0..255.")
    if array.min() < 0 or array.max() > 255:
        raise BadRequest(field, "values outside 0..255; expected uint8.")
    return array.astype(np.uint8)
