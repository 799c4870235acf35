"""market1501 dataset."""

from reid_datasets.market1501.market1501_dataset_builder import Builder  # noqa: F401 (registers)
