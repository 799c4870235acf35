"""The run folder of reid-train: what it holds, how it is checked, and how a model comes back.

    <workdir>/config.json      the run's TrainConfig (its resume options must match to resume)
    <workdir>/flags.txt        the command's flags
    <workdir>/model.json       PartLossNet.get_config(): how to rebuild the network
    <workdir>/checkpoints/     ckpt-<step>.{index,data-*} and the `checkpoint` state file
    <workdir>/checkpoints/damaged/   checkpoints found unreadable, kept aside (never deleted)

Training, reid-eval and reid-export all read a workdir through this module. Nothing is written
until `record` is called, which training does only after every check has passed.
"""

import glob
import json
import os
import re
import shutil

from reid_tf import options
from reid_tf.files import check_can_create
from reid_tf.files import check_free_space
from reid_tf.files import write_atomically
from reid_tf.train.config import TrainConfig

CHECKPOINT_PATTERN = re.compile(r"ckpt-(\d+)$")


class DamagedCheckpointError(ValueError):
    """No checkpoint of the workdir could be read."""


def check_usable(workdir):
    """Refuses, with one line, a workdir path that is a file or cannot be written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir}: is a file, not a folder.")
    check_can_create(workdir, "--workdir")


def check_config(workdir, config):
    """Refuses, in one line naming each option, a workdir that holds a run whose options a
    resume must keep (`options.Option(resume=True)`) differ from `config`'s. Writes nothing."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error}); use another --workdir.") from None
    current = json.loads(config.to_json())  # as config.json holds it (tuples as lists)
    changed = [f"--{name}={previous.get(name)!r} there, {getattr(config, name)!r} here"
               for name in options.resume_options(type(config))
               if previous.get(name) != current[name]]
    if changed:
        raise ValueError(f"workdir {workdir} holds a run with different flags ("
                         + "; ".join(changed) + "): use another --workdir or the same flags.")


def record(workdir, config, model_config=None, flags_text=None):
    """Writes config.json, flags.txt and model.json (each atomically)."""
    os.makedirs(workdir, exist_ok=True)
    write_atomically(os.path.join(workdir, "config.json"), config.to_json())
    if flags_text is not None:
        write_atomically(os.path.join(workdir, "flags.txt"), flags_text)
    if model_config is not None:
        write_atomically(os.path.join(workdir, "model.json"), json.dumps(model_config, indent=2))


def read_json(workdir, name):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; is {workdir} a reid-train workdir?")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None


def read_config(workdir):
    """The run's `TrainConfig`, typed, from its config.json (`options.read`: files written
    before an option existed still read, the option at its default)."""
    return options.read(TrainConfig, read_json(workdir, "config.json"))


def checkpoint_step(checkpoint_path):
    """The step of a reid-train checkpoint path (`.../ckpt-<step>`)."""
    match = CHECKPOINT_PATTERN.search(checkpoint_path)
    if match is None:
        raise ValueError(f"{checkpoint_path}: not a reid-train checkpoint (ckpt-<step>).")
    return int(match.group(1))


def checkpoints(directory):
    """Checkpoint prefixes in `directory`, newest step first (from the files, not the state)."""
    prefixes = {path[:-len(".index")] for path in glob.glob(os.path.join(directory, "ckpt-*.index"))}
    prefixes = [p for p in prefixes if CHECKPOINT_PATTERN.search(p)]
    return sorted(prefixes, key=checkpoint_step, reverse=True)


def _readable(prefix):
    """None if every tensor of the checkpoint reads back, else the error text."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001 - any failure to read means damaged
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def _set_aside(prefix, log):
    """Moves a damaged checkpoint's files to `<dir>/damaged/` (never deletes them)."""
    directory = os.path.dirname(prefix)
    damaged = os.path.join(directory, "damaged")
    os.makedirs(damaged, exist_ok=True)
    for path in glob.glob(glob.escape(prefix) + ".*"):
        os.replace(path, os.path.join(damaged, os.path.basename(path)))
    log(f"checkpoint {prefix} is damaged: moved to {damaged}/")


def _clean_interrupted_saves(directory, log):
    """Removes `ckpt-N_temp*` folders that an interrupted save leaves behind."""
    for path in glob.glob(os.path.join(directory, "ckpt-*_temp*")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path} (left by an interrupted save)")


def newest_readable_checkpoint(directory, log=print, repair=True):
    """The newest checkpoint of `directory` whose every tensor reads back, or None if none.

    Damaged newer checkpoints (a truncated `.data` file, a missing shard) are moved aside to
    `damaged/`, named in a log line, and the `checkpoint` state file is rewritten to the one
    kept, so TensorFlow's own `latest_checkpoint` agrees. Leftover `ckpt-N_temp` folders of an
    interrupted save are removed. With `repair=False` (a non-chief worker) nothing is moved or
    rewritten. DamagedCheckpointError if checkpoints exist but none reads.
    """
    import tensorflow as tf

    if not os.path.isdir(directory):
        return None
    if repair:
        _clean_interrupted_saves(directory, log)
    found = checkpoints(directory)
    errors = []
    for prefix in found:
        error = _readable(prefix)
        if error is None:
            if errors and repair:
                remaining = list(reversed(checkpoints(directory)))
                tf.compat.v1.train.update_checkpoint_state(
                    directory, prefix, all_model_checkpoint_paths=remaining)
                log(f"falling back to {prefix}, the newest readable checkpoint")
            return prefix
        errors.append(f"{os.path.basename(prefix)}: {error}")
        if repair:
            _set_aside(prefix, log)
    if found:
        raise DamagedCheckpointError(
            f"{directory}: no readable checkpoint ({'; '.join(errors)})"
            + (f"; the damaged files are in {os.path.join(directory, 'damaged')}/." if repair
               else "."))
    return None


def load_trained_model(workdir, log=print):
    """The network of a reid-train workdir (from `model.json`) with its newest readable
    checkpoint. Returns `(model, checkpoint_path)`. FileNotFoundError names what is missing."""
    import tensorflow as tf

    from reid_tf.model import PartLossNet

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: not a folder; is it a reid-train workdir?")
    model_config = read_json(workdir, "model.json")
    latest = newest_readable_checkpoint(os.path.join(workdir, "checkpoints"), log)
    if latest is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to restore.")
    # Synchronised BatchNorm only matters while training on several replicas.
    model = PartLossNet.from_config({**model_config, "sync_batch_norm": False})
    model.build()
    status = tf.train.Checkpoint(model=model).restore(latest)
    try:  # every weight of the network from the checkpoint (its optimizer slots are not needed)
        status.assert_existing_objects_matched()
    except AssertionError as error:
        raise ValueError(
            f"{latest} does not hold every weight of the network that {workdir}/model.json "
            f"describes (was model.json edited, or the checkpoint written by another model?): "
            f"{str(error).splitlines()[0][:300]}") from None
    status.expect_partial()
    return model, latest


def export_latest(workdir, export_dir=None, version=None, files=(), calibration_images=300,
                  parity_images=64, log=print, decisions=None):
    """Exports a workdir's newest readable checkpoint as a float32 model; returns the export's
    path and the checkpoint's. `export_dir` defaults to `<workdir>/export`, `version` to the
    checkpoint's step.

    `files`: format files beside the SavedModel (`deploy.formats.FILES`). With any, images of
    the run's training split (after its validation carve: never a test image) are drawn at
    random: `calibration_images` for full-integer quantisation and `parity_images` others on
    which each file is compared with the SavedModel. The model card gets the run's flags,
    config and, if it finished, its evaluation (results.json); the export carries the run's
    `calibration.json` (decision thresholds) when it has one, or `decisions` (another
    calibration.json's path).
    """
    from reid_tf.deploy import export
    from reid_tf.deploy import formats
    from reid_tf.evaluate import calibration as calibration_lib

    # Where it goes is checked before the model loads: one line, not a traceback after it.
    target = export_dir or os.path.join(workdir, "export")
    check_can_create(target, "--export_dir")
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    if latest:  # the SavedModel and each file hold about the checkpoint's weights
        weights = sum(os.path.getsize(p) for p in glob.glob(latest + ".data-*"))
        check_free_space(target, weights * (1 + len(files)), "--export_dir")
    model, checkpoint = load_trained_model(workdir, log)
    version = checkpoint_step(checkpoint) if version is None else version
    card = {"training": {"checkpoint": os.path.basename(checkpoint),
                         "config": read_json(workdir, "config.json")}}
    if os.path.exists(os.path.join(workdir, "flags.txt")):
        with open(os.path.join(workdir, "flags.txt")) as f:
            card["training"]["flags"] = f.read().split("\n")
    if os.path.exists(os.path.join(workdir, "results.json")):
        results = read_json(workdir, "results.json")
        card["evaluation"] = {key: value for key, value in results.items()
                              if key not in ("flags", "config")}
    calibration = parity = None
    if files:
        needs = (calibration_images if any(formats.get(name).calibrated for name in files)
                 else 0)
        images = training_images(read_config(workdir), model.image_size,
                                 needs + parity_images, log)
        calibration, parity = split_images(images, needs, parity_images, log)
    if decisions is None and os.path.exists(os.path.join(workdir, "calibration.json")):
        decisions = os.path.join(workdir, "calibration.json")
    decisions = calibration_lib.load(decisions) if decisions is not None else None
    path = export.export_model(model, export_dir or os.path.join(workdir, "export"), version,
                               files, calibration, parity, card, log, decisions)
    return path, checkpoint


def split_images(images, calibration_count, parity_count, log=print):
    """The training images an export has, split into int8 calibration and parity checks. A
    small run has fewer than asked for: the parity check keeps what the calibration leaves, or
    half of them when it would leave less (at least one), and the calibration the rest; ValueError (one line) when there are too few for both."""
    available = len(images)
    if available >= calibration_count + parity_count:
        return (images[:calibration_count],
                images[calibration_count:calibration_count + parity_count])
    if available < (2 if calibration_count else 1):
        raise ValueError(f"the run's training split has {available} image(s): too few to "
                         + ("calibrate int8 and check the files' parity" if calibration_count
                            else "check the format files' parity") + ".")
    parity = min(parity_count, max(available - calibration_count, available // 2, 1))
    calibration = images[:min(calibration_count, available - parity)]
    log(f"the run has {available} training images: {len(calibration)} calibrate int8 (asked "
        f"{calibration_count}), {parity} check the files' parity (asked {parity_count})")
    return calibration, images[available - parity:]


def training_images(config, image_size, count, log=print, seed=0):
    """`count` images of a run's training split (`config`: its `TrainConfig`), drawn at random
    without replacement, decoded and resized as in evaluation: uint8 `[n,H,W,3]`."""
    import numpy as np

    from reid_tf.data import pipeline
    from reid_tf.data import splits as splits_lib

    train = splits_lib.load_splits(
        config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir,
        skip_corrupt=config.skip_corrupt, log=log,
        validation_identities=config.validation_identities,
        validation_seed=config.validation_seed, splits=("train",))["train"]
    chosen = np.sort(np.random.default_rng(seed).permutation(len(train))[:count])
    batches = pipeline.eval_dataset(splits_lib.subset(train, chosen), image_size, 64)
    images = np.concatenate([np.round(batch["image"].numpy()) for batch in batches])
    return np.clip(images, 0, 255).astype(np.uint8)
