"""Pictures for people: part masks over input crops, ranked lists."""

import numpy as np
import tensorflow as tf

PART_COLOURS = np.array([  # distinct, in part order (top to bottom)
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
], np.float32)

# The colours of a decision, here and on reid-serve's page (deploy/serving/ui/style.css uses the
# same values): an accepted match, a rejected candidate; without thresholds, truth colours.
MATCH_COLOURS = {"match": (26, 127, 55), "no_match": (207, 34, 46)}
QUERY_COLOUR = (90, 90, 90)


def overlay_part_masks(images, part_masks, alpha=0.45):
    """Blends each part's colour over the crop: images `[B,H,W,3]` 0..255, masks `[B,h,w,K]`.

    Returns float32 `[B,H,W,3]` in [0, 1] (for `tf.summary.image`). With K=0 the crops are
    returned unchanged.
    """
    images = tf.cast(images, tf.float32) / 255.0
    num_parts = part_masks.shape[-1]
    if not num_parts:
        return images
    masks = tf.image.resize(tf.cast(part_masks, tf.float32), tf.shape(images)[1:3],
                            method="nearest")
    colours = np.resize(PART_COLOURS, (num_parts, 3)) / 255.0
    colour = tf.einsum("bhwk,kc->bhwc", masks, tf.constant(colours, tf.float32))
    return (1 - alpha) * images + alpha * colour


def _load_image(split, index, size):
    import io

    from PIL import Image
    from PIL import ImageOps

    source = split.images[index]
    image = ImageOps.exif_transpose(
        Image.open(source if split.are_paths else io.BytesIO(source))).convert("RGB")
    return image.resize((size[1], size[0]))


def ranked_list_picture(distances_row, query, query_index, gallery, top=10, size=(128, 64),
                        threshold=None):
    """One query and its `top` nearest gallery images: uint8 [H, W, 3].

    Without `threshold`, the border marks the truth: green a true match, red a false one. With
    a calibrated `threshold` (`evaluate.calibration`), the border is the decision, in the
    page's colours (green: accepted as the same person, `distance < threshold`; red: rejected),
    and the caption says whether it is right ("=" the same person, "x" another). Person id and
    camera under each. The query's own same-camera images of the same person are left out, as
    in evaluation.
    """
    from PIL import Image, ImageDraw

    person, camera = query.person_ids[query_index], query.camera_ids[query_index]
    kept = ~((gallery.person_ids == person) & (gallery.camera_ids == camera))
    order = np.flatnonzero(kept)[np.argsort(distances_row[kept], kind="stable")][:top]
    border, caption, gap = 4, 14, 6
    cell_w, cell_h = size[1] + 2 * border, size[0] + 2 * border + caption
    canvas = Image.new("RGB", (cell_w * (len(order) + 1) + gap, cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    entries = [(query, query_index, QUERY_COLOUR, "")]
    for g in order:
        same = gallery.person_ids[g] == person
        accepted = same if threshold is None else distances_row[g] < threshold
        mark = "" if threshold is None else (" =" if same else " x")
        entries.append((gallery, g, MATCH_COLOURS["match" if accepted else "no_match"], mark))
    for slot, (split, index, colour, mark) in enumerate(entries):
        left = slot * cell_w + (gap if slot else 0)
        draw.rectangle([left, 0, left + cell_w - 1, cell_h - caption - 1], fill=colour)
        canvas.paste(_load_image(split, index, size), (left + border, border))
        draw.text((left + 2, cell_h - caption + 1),
                  f"{split.person_ids[index]}/c{split.camera_ids[index]}{mark}", fill=(0, 0, 0))
    return np.asarray(canvas)


def plot_ranked_lists(distances, query, gallery, num_queries, output_dir, top=10,
                      threshold=None):
    """PNGs of the first `num_queries` queries' ranked lists in `output_dir/ranked/`, and the
    same pictures in `output_dir/tensorboard` (`threshold`: colour the decisions, as
    `ranked_list_picture`). Returns the PNG paths."""
    import os

    from PIL import Image

    folder = os.path.join(output_dir, "ranked")
    os.makedirs(folder, exist_ok=True)
    writer = tf.summary.create_file_writer(os.path.join(output_dir, "tensorboard"))
    paths = []
    for q in range(min(num_queries, len(query))):
        picture = ranked_list_picture(np.asarray(distances[q]), query, q, gallery, top,
                                      threshold=threshold)
        stem = os.path.splitext(query.file_names[q])[0].replace("/", "_")
        path = os.path.join(folder, f"query_{q:04d}_{stem}.png")
        Image.fromarray(picture).save(path)
        paths.append(path)
        with writer.as_default(step=q):
            tf.summary.image("ranked_lists", picture[None], step=q)
    writer.flush()
    return paths
