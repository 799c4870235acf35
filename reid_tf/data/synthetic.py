"""synthetic_persons: procedurally rendered pedestrians, generated from a seed, no files needed.

Each identity is a set of attributes spread over the whole body (hair or hat, skin, upper-body
colour and pattern, sleeves, lower-body colour and length, shoes, bag or backpack, build). Each
image renders that person walking, at a random scale, position and viewpoint (front, back, left,
right: the view changes what is visible: a logo only from the front, a backpack mostly from the
back), in front of its camera's background, under that camera's illumination and colour cast,
with blur, noise and occasional occluders. Palettes are small, so one body region alone is shared
by many identities; see datasets/synthetic_persons/README.md for the distributions.
"""

import dataclasses
import io

import numpy as np
from PIL import Image

from reid_tf.data.sources import Record

PALETTE = np.array([  # clothing colours, RGB
    [200, 30, 30], [30, 60, 170], [30, 130, 50], [230, 200, 40], [240, 240, 240], [25, 25, 25],
    [120, 120, 125], [130, 70, 30], [240, 130, 30], [120, 40, 140], [100, 180, 220],
    [230, 150, 170],
], np.float32)
SKIN_TONES = np.array([[255, 220, 190], [230, 185, 150], [195, 145, 105], [150, 100, 70],
                       [100, 65, 45]], np.float32)
HAIR_COLOURS = np.array([[20, 15, 10], [70, 40, 20], [120, 80, 40], [220, 190, 110],
                         [170, 170, 170], [160, 60, 20]], np.float32)
SHOE_COLOURS = np.array([[20, 20, 20], [240, 240, 240], [110, 70, 40], [60, 60, 120],
                         [150, 150, 150]], np.float32)
PATTERNS = ("solid", "stripes", "checks", "logo")
PATTERN_PROBABILITIES = (0.4, 0.2, 0.2, 0.2)
LOWER_LENGTHS = ("trousers", "shorts", "skirt")
LOWER_PROBABILITIES = (0.6, 0.25, 0.15)
BAGS = ("none", "shoulder_bag", "backpack")
BAG_PROBABILITIES = (0.5, 0.25, 0.25)
VIEWS = ("front", "back", "left", "right")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_train_ids: int = 300
    num_test_ids: int = 300
    images_per_id: int = 12
    num_cameras: int = 4
    height: int = 128
    width: int = 64
    seed: int = 0
    jpeg_quality: int = 92  # when encoded (the TFDS builder stores JPEG)


@dataclasses.dataclass(frozen=True)
class Identity:
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    hat: object  # None or colour
    upper: np.ndarray
    pattern: str
    secondary: np.ndarray
    long_sleeves: bool
    lower: np.ndarray
    lower_length: str
    shoes: np.ndarray
    bag: str
    bag_colour: np.ndarray
    build: float
    stature: float


def _jitter(rng, colour, amount=18.0):
    return np.clip(colour + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def sample_identity(rng):
    """Draws one person's attributes (distributions documented in the dataset README)."""
    upper_index, secondary_index = rng.choice(len(PALETTE), 2, replace=False)
    return Identity(
        skin=_jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 8),
        hair=_jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 10),
        long_hair=bool(rng.random() < 0.35),
        hat=_jitter(rng, PALETTE[rng.integers(len(PALETTE))]) if rng.random() < 0.2 else None,
        upper=_jitter(rng, PALETTE[upper_index]),
        pattern=PATTERNS[rng.choice(len(PATTERNS), p=PATTERN_PROBABILITIES)],
        secondary=_jitter(rng, PALETTE[secondary_index]),
        long_sleeves=bool(rng.random() < 0.5),
        lower=_jitter(rng, PALETTE[rng.integers(len(PALETTE))]),
        lower_length=LOWER_LENGTHS[rng.choice(len(LOWER_LENGTHS), p=LOWER_PROBABILITIES)],
        shoes=_jitter(rng, SHOE_COLOURS[rng.integers(len(SHOE_COLOURS))], 10),
        bag=BAGS[rng.choice(len(BAGS), p=BAG_PROBABILITIES)],
        bag_colour=_jitter(rng, PALETTE[rng.integers(len(PALETTE))]),
        build=float(rng.uniform(0.85, 1.15)),
        stature=float(rng.uniform(0.9, 1.0)),
    )


@dataclasses.dataclass(frozen=True)
class Camera:
    floor: np.ndarray
    wall: np.ndarray
    cast: np.ndarray  # per-channel gain
    brightness: float
    texture_seed: int


def sample_camera(rng):
    return Camera(
        floor=rng.uniform(60, 180, 3).astype(np.float32),
        wall=rng.uniform(60, 220, 3).astype(np.float32),
        cast=rng.uniform(0.85, 1.15, 3).astype(np.float32),
        brightness=float(rng.uniform(0.75, 1.2)),
        texture_seed=int(rng.integers(1 << 30)),
    )


class _Painter:
    """Draws in person coordinates: y from 0 (top of head) to 1 (soles), x in person heights."""

    def __init__(self, canvas, top, centre_x, person_height):
        self.canvas = canvas
        self.top, self.centre_x, self.scale = top, centre_x, person_height
        height, width = canvas.shape[:2]
        self.ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5 - top) / person_height
        self.xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5 - centre_x) / person_height

    def rect(self, y0, y1, x0, x1, colour):
        x0, x1 = min(x0, x1), max(x0, x1)
        rows = (self.ys >= y0) & (self.ys < y1)
        cols = (self.xs >= x0) & (self.xs < x1)
        self.canvas[rows & cols] = colour

    def ellipse(self, cy, cx, ry, rx, colour, mask=None):
        inside = ((self.ys - cy) / ry) ** 2 + ((self.xs - cx) / rx) ** 2 <= 1.0
        if mask is not None:
            inside &= mask
        self.canvas[inside] = colour

    def band_mask(self, y0, y1, x0, x1):
        return (self.ys >= y0) & (self.ys < y1) & (self.xs >= x0) & (self.xs < x1)


def _background(rng, camera, height, width):
    texture = np.random.default_rng(camera.texture_seed)
    horizon = int(height * texture.uniform(0.55, 0.75))
    canvas = np.empty((height, width, 3), np.float32)
    gradient = np.linspace(0.85, 1.1, horizon, dtype=np.float32)[:, None, None]
    canvas[:horizon] = camera.wall * gradient
    canvas[horizon:] = camera.floor
    for _ in range(3):  # the camera's fixed furniture: windows, doors, posts
        y0, x0 = texture.integers(0, horizon), texture.integers(0, width)
        canvas[y0:y0 + texture.integers(8, 40), x0:x0 + texture.integers(4, 24)] = (
            texture.uniform(40, 230, 3))
    # Per image: a slightly different framing of the same scene.
    return np.roll(canvas, rng.integers(-6, 7), axis=1)


@dataclasses.dataclass(frozen=True)
class _Pose:
    """How a person stands in one image: the view and the walking phase, and the widths they
    give the body and the limbs (fractions of the person's height)."""

    view: str
    phase: float

    @property
    def side(self):
        return self.view in ("left", "right")

    @property
    def facing(self):
        return -1.0 if self.view == "left" else 1.0


def render_person(identity, camera, rng, height=128, width=64):
    """One image of `identity` seen by `camera`: uint8 `[height, width, 3]`."""
    canvas = _background(rng, camera, height, width)
    person_height = height * identity.stature * rng.uniform(0.78, 0.95)
    top = rng.uniform(0.02, 0.98) * (height - person_height)
    centre_x = width / 2 + rng.uniform(-0.12, 0.12) * width
    paint = _Painter(canvas, top, centre_x, person_height)
    view = VIEWS[rng.integers(len(VIEWS))]
    pose = _Pose(view, rng.uniform(-1, 1))  # walking: legs and arms swing
    half = (0.065 if pose.side else 0.105) * identity.build
    # Backpack behind the body in side views, drawn first.
    if identity.bag == "backpack" and pose.side:
        paint.rect(0.2, 0.46, -pose.facing * (half + 0.06) - 0.03, -pose.facing * half + 0.03,
                   identity.bag_colour)
    _paint_legs(paint, identity, pose, half)
    _paint_arms_and_torso(paint, identity, pose, half)
    _paint_bags(paint, identity, pose, half)
    _paint_head(paint, identity, pose)
    return _through_the_camera(canvas, camera, rng, height, width)


def _paint_legs(paint, identity, pose, half):
    """Legs, lower clothes, shoes and hips."""
    limb, side, facing = 0.042 * identity.build, pose.side, pose.facing
    stride = 0.05 * pose.phase if side else 0.015 * pose.phase
    for leg, sign in enumerate((-1.0, 1.0)):
        x = (sign * 0.045 * identity.build) if not side else sign * stride
        swing = 0.0 if side else sign * stride
        paint.rect(0.52, 0.93, x + swing - limb / 2, x + swing + limb / 2, identity.skin)
        knee = {"trousers": 0.93, "shorts": 0.7, "skirt": 0.62}[identity.lower_length]
        paint.rect(0.52, knee, x + swing - limb / 2, x + swing + limb / 2, identity.lower)
        paint.rect(0.92, 0.975, x + swing - limb / 2 - 0.005,
                   x + swing + limb / 2 + (0.03 * facing if side else 0.005), identity.shoes)
    paint.rect(0.5, 0.57, -half * 0.95, half * 0.95, identity.lower)  # hips
    if identity.lower_length == "skirt":
        paint.rect(0.5, 0.7, -half * 1.15, half * 1.15, identity.lower)


def _paint_arms_and_torso(paint, identity, pose, half):
    """Arms behind the torso, swinging against the legs; the torso with its pattern."""
    limb, side = 0.042 * identity.build, pose.side
    arm_swing = -0.03 * pose.phase
    for sign in ((pose.facing,) if side else (-1.0, 1.0)):
        x = sign * (half + limb / 2) if not side else arm_swing
        paint.rect(0.18, 0.5, x - limb / 2, x + limb / 2, identity.skin)
        elbow = 0.5 if identity.long_sleeves else 0.3
        paint.rect(0.18, elbow, x - limb / 2, x + limb / 2, identity.upper)
    paint.rect(0.17, 0.52, -half, half, identity.upper)
    torso = paint.band_mask(0.17, 0.52, -half, half)
    if identity.pattern == "stripes":
        stripes = (np.floor(paint.ys / 0.04) % 2 == 0) & torso
        paint.canvas[stripes] = identity.secondary
    elif identity.pattern == "checks":
        checks = ((np.floor(paint.ys / 0.05) + np.floor(paint.xs / 0.05)) % 2 == 0) & torso
        paint.canvas[checks] = identity.secondary
    elif identity.pattern == "logo" and pose.view == "front":
        paint.ellipse(0.3, 0.0, 0.05, 0.045, identity.secondary)


def _paint_bags(paint, identity, pose, half):
    view = pose.view
    if identity.bag == "backpack":
        if view == "back":
            paint.rect(0.2, 0.46, -half * 0.85, half * 0.85, identity.bag_colour)
        elif view == "front":
            for sign in (-1.0, 1.0):
                paint.rect(0.17, 0.4, sign * half * 0.6 - 0.01, sign * half * 0.6 + 0.01,
                           identity.bag_colour)
    elif identity.bag == "shoulder_bag":
        bag_side = -1.0 if view in ("back", "left") else 1.0
        paint.rect(0.44, 0.58, bag_side * (half + 0.01), bag_side * (half + 0.08),
                   identity.bag_colour)
        if view in ("front", "back"):  # the strap across the chest or back
            paint.rect(0.17, 0.46, bag_side * half * 0.3 - 0.01, bag_side * half * 0.3 + 0.01,
                       identity.bag_colour)


def _paint_head(paint, identity, pose):
    """Neck, head, hair or hat."""
    view, side, facing = pose.view, pose.side, pose.facing
    paint.rect(0.14, 0.18, -0.025, 0.025, identity.skin)
    head_x = 0.012 * facing if side else 0.0
    paint.ellipse(0.085, head_x, 0.075, 0.055, identity.skin)
    if identity.long_hair and view != "front":
        paint.rect(0.06, 0.27, head_x - 0.06, head_x + 0.06, identity.hair)
    elif identity.long_hair:
        for sign in (-1.0, 1.0):
            paint.rect(0.06, 0.24, sign * 0.06 - 0.015, sign * 0.06 + 0.015, identity.hair)
    if view == "back":
        hair_mask = None
    elif side:  # the top and the back of the head
        hair_mask = (paint.ys < 0.06) | ((paint.xs - head_x) * facing < 0)
    else:
        hair_mask = paint.ys < 0.06
    paint.ellipse(0.083, head_x, 0.078, 0.058, identity.hair, mask=hair_mask)
    if identity.hat is not None:
        paint.rect(0.0, 0.055, head_x - 0.06, head_x + 0.06, identity.hat)
        paint.rect(0.045, 0.065, head_x - 0.075, head_x + 0.075, identity.hat)


def _through_the_camera(canvas, camera, rng, height, width):
    """An occluder now and then (a passer-by's body part, a pole, a bin), then the camera:
    illumination, colour cast, blur, noise; uint8."""
    if rng.random() < 0.15:
        occluder_width = int(rng.uniform(0.2, 0.5) * width)
        x0 = int(rng.choice([0, width - occluder_width]))
        y0 = int(rng.uniform(0.4, 0.8) * height)
        canvas[y0:, x0:x0 + occluder_width] = rng.uniform(20, 230, 3)
    canvas *= camera.cast * camera.brightness * rng.uniform(0.85, 1.15)
    if rng.random() < 0.3:
        padded = np.pad(canvas, ((1, 1), (1, 1), (0, 0)), mode="edge")
        canvas = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9
    canvas += rng.normal(0, rng.uniform(2, 8), canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def market_file_name(person_id, camera_id, index):
    return f"{person_id:04d}_c{camera_id}s1_{index:06d}_00.jpg"


def _identity_plan(config, person_id):
    """An identity's attributes and the camera (0-based) of each of its images, from the seed
    alone (no rendering)."""
    rng = np.random.default_rng([config.seed, person_id])
    identity = sample_identity(rng)
    most = min(config.num_cameras, config.images_per_id)
    seen_by = rng.choice(config.num_cameras, size=int(rng.integers(2, most + 1)), replace=False)
    camera_of_image = np.concatenate([seen_by, rng.choice(seen_by, config.images_per_id
                                                          - len(seen_by))])
    return identity, sorted(int(c) for c in camera_of_image)


def _query_positions(camera_of_image):
    """Which of a test identity's images are queries: the first image of each of up to two
    cameras, kept only if the gallery still shows the person in another camera (else it could
    never be matched)."""
    first_of_camera = {}
    for position, camera in enumerate(camera_of_image):
        first_of_camera.setdefault(camera, position)
    query = sorted(first_of_camera.values())[:2]
    for position in list(query):
        others = [c for i, c in enumerate(camera_of_image) if i not in query]
        if all(camera == camera_of_image[position] for camera in others):
            query.remove(position)
    return query


def _cameras(config):
    camera_rng = np.random.default_rng([config.seed, 1 << 20])
    return [sample_camera(camera_rng) for _ in range(config.num_cameras)]


def _split_ids(config, split):
    if split == "train":
        return range(1, config.num_train_ids + 1)
    return range(config.num_train_ids + 1, config.num_train_ids + config.num_test_ids + 1)


def _render_identity(args):
    """[Record] of one identity's images in `split` (each image from its own seed, so any
    subset renders alone); `encode`: JPEG bytes instead of arrays."""
    config, cameras, person_id, split, encode = args
    identity, camera_of_image = _identity_plan(config, person_id)
    # Image numbers follow the identity's position, as if every image were numbered in order.
    first = (person_id - 1) * config.images_per_id
    positions = range(len(camera_of_image))
    if split != "train":
        query = _query_positions(camera_of_image)
        positions = query if split == "query" else [i for i in positions if i not in query]
    records = []
    for position in positions:
        camera = camera_of_image[position]
        rng = np.random.default_rng([config.seed, person_id, position, 1])
        image = render_person(identity, cameras[camera], rng, config.height, config.width)
        if encode:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=config.jpeg_quality)
            image = buffer.getvalue()
        records.append(Record(image, person_id, camera + 1,
                              market_file_name(person_id, camera + 1, first + position + 1)))
    return records


def iter_records(config, split, encode=False, processes=1):
    """The records of one split, identity after identity, rendered as they are needed (an
    MSMT17-size set does not fit in memory as arrays); with `processes` > 1, rendered by that
    many worker processes, in the same order."""
    if config.num_cameras < 2 or config.images_per_id < 2:
        raise ValueError("synthetic_persons needs num_cameras >= 2 and images_per_id >= 2 "
                         f"(got {config.num_cameras}, {config.images_per_id}).")
    cameras = _cameras(config)
    jobs = ((config, cameras, person_id, split, encode) for person_id in _split_ids(config, split))
    if processes <= 1:
        for job in jobs:
            yield from _render_identity(job)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for records in pool.imap(_render_identity, jobs, chunksize=8):
            yield from records


def generate(config=SyntheticConfig()):
    """All splits as `{split: [Record]}` with decoded uint8 images.

    Person ids: train 1..num_train_ids, test the next num_test_ids (0 is left for distractors,
    as in Market-1501). Each test identity gives one query per camera for up to two of its
    cameras, each with a true match in another camera of the gallery; the rest of its images form
    the gallery. Cameras are 1-based.
    """
    return {split: list(iter_records(config, split)) for split in ("train", "query", "gallery")}


def write_market_folder(splits, root):
    """Writes generated splits as a Market-1501-layout folder of JPEGs (for folder-reader use)."""
    import os

    from PIL import Image

    from reid_tf.data.sources import MARKET_LAYOUT

    for split, records in splits.items():
        folder = os.path.join(root, MARKET_LAYOUT[split])
        os.makedirs(folder, exist_ok=True)
        for record in records:
            Image.fromarray(record.image).save(os.path.join(folder, record.file_name), quality=92)
    return root
