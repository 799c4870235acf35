"""The small pictures a gallery keeps with its entries, so that a search page can show them
without the original images."""

import io

DEFAULT_HEIGHT = 128
QUALITY = 85


def thumbnail(image, height=DEFAULT_HEIGHT):
    """JPEG bytes of `image` (encoded bytes, or uint8 `[H,W,3]`) scaled to `height` pixels
    high (never up), its aspect kept, upright by its EXIF orientation; None when Pillow cannot
    read it (the entry is kept, with the page's placeholder instead)."""
    import numpy as np
    from PIL import Image
    from PIL import ImageOps

    try:
        if isinstance(image, (bytes, bytearray)):
            picture = Image.open(io.BytesIO(image))
            picture.seek(0)  # an animation's first frame
            picture = ImageOps.exif_transpose(picture).convert("RGB")
        else:
            picture = Image.fromarray(np.asarray(image, np.uint8), "RGB")
    except Exception:  # noqa: BLE001 - Pillow raises many types for what it cannot read
        return None
    if picture.height > height:
        width = max(1, round(picture.width * height / picture.height))
        picture = picture.resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def thumbnails_of(split, height=DEFAULT_HEIGHT):
    """A thumbnail per image of a `data.splits.Split` (its files or encoded bytes)."""
    thumbnails = []
    for source in split.images:
        if split.are_paths:
            with open(source, "rb") as f:
                source = f.read()
        thumbnails.append(thumbnail(bytes(source), height))
    return thumbnails
