"""Data settings, partitions and tensors: the reference's Setting 1 (same_dataset_mnist,
same_dataset_cifar10), Setting 2 (different_dataset: CIFAR-10 against other data sets), and a
synthetic CIFAR-shaped setting for machines without CIFAR-10."""

from cmg.data.ood import OOD_LOADERS, load_ood_sets, parse_ood_datasets
from cmg.data.settings import (ALL_CLASSES_PARTITION, CIFAR10_CLASSES, SAME_DATASET_PARTITIONS,
                               Setting, get_setting, import_setting_modules, load_setting,
                               parse_partition, register_setting, setting_modules, setting_names)
from cmg.data.sources import load_cifar10, load_mnist, resolve_data_root
from cmg.data.synthetic import load_synthetic_cifar10
from cmg.data.split import Split, batches, make_split, random_crop_flip, to_float

register_setting(Setting("same_dataset_mnist", family="mnist", source=load_mnist,
                         partitions=SAME_DATASET_PARTITIONS))
register_setting(Setting("same_dataset_cifar10", family="cifar", source=load_cifar10,
                         partitions=SAME_DATASET_PARTITIONS, class_names=CIFAR10_CLASSES))
register_setting(Setting("synthetic_cifar10", family="cifar", source=load_synthetic_cifar10,
                         partitions=SAME_DATASET_PARTITIONS, class_names=CIFAR10_CLASSES))
register_setting(Setting("different_dataset", family="cifar", source=load_cifar10,
                         partitions=ALL_CLASSES_PARTITION, ood_from_datasets=True,
                         class_names=CIFAR10_CLASSES))

__all__ = ["ALL_CLASSES_PARTITION", "OOD_LOADERS", "SAME_DATASET_PARTITIONS", "load_ood_sets",
           "parse_ood_datasets", "Setting", "Split", "batches", "get_setting",
           "import_setting_modules", "load_cifar10", "load_mnist", "load_setting", "make_split",
           "parse_partition", "random_crop_flip",
           "register_setting", "resolve_data_root", "setting_modules", "setting_names", "to_float"]
