"""dukemtmc_reid dataset: TFDS builder test on dummy_data (see datasets/make_dummy_data.py)."""

import tensorflow_datasets as tfds

from reid_datasets.dukemtmc_reid import dukemtmc_reid_dataset_builder


class DukemtmcReidTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = dukemtmc_reid_dataset_builder.Builder
    SPLITS = {"train": 4, "query": 1, "gallery": 2}


if __name__ == "__main__":
    tfds.testing.test_main()
