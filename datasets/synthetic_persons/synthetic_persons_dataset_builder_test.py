"""synthetic_persons dataset: TFDS builder test on dummy_data (see datasets/make_dummy_data.py)."""

import pytest
import tensorflow_datasets as tfds

from reid_datasets.synthetic_persons import synthetic_persons_dataset_builder

pytestmark = pytest.mark.slow  # prepares the dataset (several seconds)


class SyntheticPersonsTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = synthetic_persons_dataset_builder.Builder
    SPLITS = {"train": 160, "query": 40, "gallery": 120}
    BUILDER_CONFIG_NAMES_TO_TEST = ["small"]

if __name__ == "__main__":
    tfds.testing.test_main()
