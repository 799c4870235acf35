"""viper dataset."""

from reid_datasets.viper.viper_dataset_builder import Builder  # noqa: F401
