"""cuhk03 dataset: TFDS builder test on dummy_data (see datasets/make_dummy_data.py)."""

import pytest
import tensorflow_datasets as tfds

from reid_datasets.cuhk03 import cuhk03_dataset_builder

pytestmark = pytest.mark.slow  # prepares the dataset (several seconds)


class Cuhk03Test(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = cuhk03_dataset_builder.Builder
    SPLITS = {"train": 8, "query": 6, "gallery": 6}


if __name__ == "__main__":
    tfds.testing.test_main()
