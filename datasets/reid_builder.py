"""What every ReID TFDS builder shares: features, manual data, image checks, splits."""

import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from reid_tf.data import sources


SKIP_CORRUPT_FOLDER = "skip_corrupt"


class ReidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Yields {image (encoded), person_id (as in the files), camera_id, file_name} per split.

    Subclasses set `MANUAL_DOWNLOAD_INSTRUCTIONS` and implement `_parse(manual_dir)` returning
    `{split: [sources.Record]}`. Data is never downloaded. Pass `skip_corrupt=True` to
    `tfds.builder(...)` to leave out images that do not decode (the count is printed; that
    preparation is cached apart, under `<data_dir>/skip_corrupt/`); by default preparation fails
    with the list of bad files.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    IMAGE_FORMAT = "jpeg"  # how images given as arrays are encoded; files are stored as they are

    def __init__(self, *, skip_corrupt=False, **kwargs):
        self.skip_corrupt = skip_corrupt
        if skip_corrupt:
            # Data prepared without the bad files is another dataset: it gets its own cache
            # (<data_dir>/skip_corrupt/<name>/...), so the two never stand in for each other.
            root = (kwargs.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                    or tfds_constants.DATA_DIR)
            kwargs["data_dir"] = os.path.join(os.path.expanduser(root), SKIP_CORRUPT_FOLDER)
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3),
                                             encoding_format=self.IMAGE_FORMAT),
                "person_id": tfds.features.Scalar(dtype=np.int64),
                "camera_id": tfds.features.Scalar(dtype=np.int64),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "person_id"),
            homepage=self.HOMEPAGE,
        )

    HOMEPAGE = None

    def _parse(self, manual_dir):
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        records = sources.check_images(self._parse(str(dl_manager.manual_dir)),
                                       skip_corrupt=self.skip_corrupt)
        return {split: self._generate_examples(records[split]) for split in sources.SPLITS}

    def _generate_examples(self, records):
        for index, record in enumerate(records):
            yield f"{index:07d}_{record.file_name}", {
                "image": record.image,
                "person_id": record.person_id,
                "camera_id": record.camera_id,
                "file_name": record.file_name,
            }
