"""synthetic_persons dataset: procedurally rendered pedestrians, generated from a seed."""

import dataclasses
import io
import os

import tensorflow_datasets as tfds

from reid_datasets import reid_builder
from reid_tf.data import synthetic


class SyntheticPersonsConfig(tfds.core.BuilderConfig):
    def __init__(self, *, synthetic_config, **kwargs):
        super().__init__(**kwargs)
        self.synthetic_config = synthetic_config


class Builder(reid_builder.ReidBuilder):
    """Rendered people with attributes over the whole body; no files needed.

    `default`: 300 train and 300 disjoint test identities, 12 images each over 4 cameras, 128x64
    (3,600 train / 599 query / 3,001 gallery). `small`: 20 + 20 identities at 64x32, for tests
    and quick demos. `msmt17_size`: MSMT17's scale for the data path, 4,101 training identities
    with 31 images each (127,131 images; JPEG quality 98, about 20 KB each: 2.5 GB) and 3,060 test identities, 15
    cameras, 256x128. Any size: `Builder(config=SyntheticPersonsConfig(...))`. Images are
    rendered (and JPEG-encoded) by one worker process per core, identity by identity, so no
    split is ever held in memory.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Each image rendered from its own seed (images differ from 1.0.0); "
                              "rendered in parallel, as JPEG; msmt17_size config."}

    BUILDER_CONFIGS = [
        SyntheticPersonsConfig(name="default", synthetic_config=synthetic.SyntheticConfig(),
                               description="300 + 300 identities, 128x64"),
        SyntheticPersonsConfig(
            name="small", description="20 + 20 identities, 8 images each, 64x32",
            synthetic_config=synthetic.SyntheticConfig(num_train_ids=20, num_test_ids=20,
                                                       images_per_id=8, height=64, width=32),
        ),
        SyntheticPersonsConfig(
            name="msmt17_size", description="4,101 + 3,060 identities, 31 images each, 256x128",
            synthetic_config=synthetic.SyntheticConfig(num_train_ids=4101, num_test_ids=3060,
                                                       images_per_id=31, num_cameras=15,
                                                       height=256, width=128, jpeg_quality=98),
        ),
    ]

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download or read
        config = self.builder_config.synthetic_config
        return {split: self._generate_examples(self._encoded(config, split))
                for split in ("train", "query", "gallery")}

    @staticmethod
    def _encoded(config, split):
        """The split's records, JPEG bytes handed to TFDS as files (stored as they are)."""
        processes = os.cpu_count() if config.num_train_ids + config.num_test_ids > 100 else 1
        for record in synthetic.iter_records(config, split, encode=True, processes=processes):
            yield dataclasses.replace(record, image=io.BytesIO(record.image))

