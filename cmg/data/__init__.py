"""Data settings, partitions and tensors. The two built-in settings are the reference's Setting 1."""

from cmg.data.settings import (SAME_DATASET_PARTITIONS, Setting, get_setting, parse_partition,
                               register_setting, setting_names)
from cmg.data.sources import load_cifar10, load_mnist, resolve_data_root
from cmg.data.synthetic import load_synthetic_cifar10
from cmg.data.split import Split, batches, make_split, random_crop_flip, to_float

register_setting(Setting("same_dataset_mnist", family="mnist", source=load_mnist,
                         partitions=SAME_DATASET_PARTITIONS))
register_setting(Setting("same_dataset_cifar10", family="cifar", source=load_cifar10,
                         partitions=SAME_DATASET_PARTITIONS))
register_setting(Setting("synthetic_cifar10", family="cifar", source=load_synthetic_cifar10,
                         partitions=SAME_DATASET_PARTITIONS))

__all__ = ["SAME_DATASET_PARTITIONS", "Setting", "Split", "batches", "get_setting",
           "load_cifar10", "load_mnist", "make_split", "parse_partition", "random_crop_flip",
           "register_setting", "resolve_data_root", "setting_names", "to_float"]
