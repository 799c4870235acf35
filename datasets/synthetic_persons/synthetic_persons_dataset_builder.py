"""synthetic_persons dataset: procedurally rendered pedestrians, generated from a seed."""

import tensorflow_datasets as tfds

from reid_datasets import reid_builder
from reid_tf import synthetic


class SyntheticPersonsConfig(tfds.core.BuilderConfig):
    def __init__(self, *, synthetic_config, **kwargs):
        super().__init__(**kwargs)
        self.synthetic_config = synthetic_config


class Builder(reid_builder.ReidBuilder):
    """Rendered people with attributes over the whole body; no files needed.

    `default`: 300 train and 300 disjoint test identities, 12 images each over 4 cameras, 128x64
    (3,600 train / 599 query / 3,001 gallery). `small`: 20 + 20 identities at 64x32, for tests
    and quick demos. Any size: `Builder(config=SyntheticPersonsConfig(...))`.
    """

    BUILDER_CONFIGS = [
        SyntheticPersonsConfig(name="default", synthetic_config=synthetic.SyntheticConfig(),
                               description="300 + 300 identities, 128x64"),
        SyntheticPersonsConfig(
            name="small", description="20 + 20 identities, 8 images each, 64x32",
            synthetic_config=synthetic.SyntheticConfig(num_train_ids=20, num_test_ids=20,
                                                       images_per_id=8, height=64, width=32),
        ),
    ]

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download or read
        records = synthetic.generate(self.builder_config.synthetic_config)
        return {split: self._generate_examples(split_records)
                for split, split_records in records.items()}

