"""Partitions, relabelling, the validation split and data errors, on real MNIST."""

import hashlib
from pathlib import Path

import pytest
import torch

from cmg.config import DataConfig
from cmg.data import get_setting, make_split, parse_partition, random_crop_flip
from cmg.data.sources import resolve_data_root
from cmg.errors import UsageError

SPEC_TABLE = {  # the reference's partition table: partition -> (IND ids, OOD ids)
    1: ([0, 1, 2, 3, 4, 5], [6, 7, 8, 9]),
    2: ([1, 2, 3, 4, 5, 6], [0, 7, 8, 9]),
    3: ([2, 3, 4, 5, 6, 7], [0, 1, 8, 9]),
    4: ([3, 4, 5, 6, 7, 8], [0, 1, 2, 9]),
    5: ([4, 5, 6, 7, 8, 9], [0, 1, 2, 3]),
}


@pytest.mark.parametrize("name", ["same_dataset_mnist", "same_dataset_cifar10"])
def test_partitions_match_the_spec(name):
    s = get_setting(name)
    for p, (ind, ood) in SPEC_TABLE.items():
        assert list(s.ind_classes(p)) == ind and list(s.ood_classes(p)) == ood


def test_partition_parsing_and_bad_partitions():
    assert parse_partition("partition3") == 3 and parse_partition(5) == 5
    for bad in (0, 6):
        with pytest.raises(UsageError, match="partition"):
            get_setting("same_dataset_mnist").ind_classes(bad)
    with pytest.raises(UsageError):
        parse_partition("third")


def test_unknown_setting_names_the_choices():
    with pytest.raises(UsageError, match="same_dataset_mnist"):
        get_setting("imagenet")


@pytest.mark.parametrize("partition", [1, 4])
def test_split_relabels_and_keeps_validation_off_the_test_split(mnist_available, partition):
    from cmg.data.sources import load_mnist

    train_x, train_y, test_x, test_y = load_mnist(resolve_data_root())
    split = make_split("same_dataset_mnist", partition)
    ind, ood = SPEC_TABLE[partition]
    # relabelled 0..5 in the listed order: every training image of label j is of class ind[j]
    assert split.train_y.unique().tolist() == list(range(6))
    assert split.train_x.dtype == torch.uint8 and split.train_x.shape[1:] == (1, 28, 28)
    # 10% of each IND class's train images is validation, the rest training, disjoint
    for j, c in enumerate(ind):
        n_class = int((train_y == c).sum())
        n_val = int((split.val_ind_y == j).sum())
        assert n_val == round(0.1 * n_class)
        assert int((split.train_y == j).sum()) == n_class - n_val
    # test sets are the whole test split, validation OOD comes from the train split's OOD classes
    assert len(split.test_ind_x) == int(torch.isin(test_y, torch.tensor(ind)).sum())
    assert len(split.test_ood_x) == int(torch.isin(test_y, torch.tensor(ood)).sum())
    n_ood_train = int(torch.isin(train_y, torch.tensor(ood)).sum())
    assert abs(len(split.val_ood_x) - 0.1 * n_ood_train) <= 4
    # no image in two of training, validation and test, compared by content (real MNIST has
    # no duplicate images across these, so any shared image is a leak)
    flat = lambda *ts: {bytes(r) for t in ts for r in t.flatten(1).numpy()}  # noqa: E731
    train, val = flat(split.train_x), flat(split.val_ind_x, split.val_ood_x)
    test = flat(split.test_ind_x, split.test_ood_x)
    assert len(train) == len(split.train_x) and len(flat(split.val_ind_x)) == len(split.val_ind_x)
    assert (len(train & val), len(val & test), len(train & test)) == (0, 0, 0)
    # the test IND images carry the test labels, relabelled
    first = int(torch.nonzero(torch.isin(test_y, torch.tensor(ind)))[0])
    assert torch.equal(split.test_ind_x[0], test_x[first])
    assert int(split.test_ind_y[0]) == ind.index(int(test_y[first]))


def test_split_is_seeded_and_partition_independent(mnist_available):
    a = make_split("same_dataset_mnist", 1, DataConfig(eval_limit=50))
    b = make_split("same_dataset_mnist", 1, DataConfig(eval_limit=50))
    assert torch.equal(a.val_ind_x, b.val_ind_x) and torch.equal(a.test_ood_x, b.test_ood_x)
    # class 5 is IND in partitions 1 and 2: its validation images are the same in both
    p1, p2 = make_split("same_dataset_mnist", 1), make_split("same_dataset_mnist", 2)
    assert torch.equal(p1.val_ind_x[p1.val_ind_y == 5], p2.val_ind_x[p2.val_ind_y == 4])


@pytest.mark.parametrize("cfg, sizes, digest", [
    (DataConfig(), (32416, 3601, 2398, 6031, 3969), "af2b074791422986"),
    (DataConfig(train_limit=6000, eval_limit=2000), (6000, 2000, 2000, 2000, 2000),
     "508cae85c3d5f5e5"),
])
def test_the_split_of_a_data_config_is_pinned(mnist_available, cfg, sizes, digest):
    """The stage-1 key hashes the data config, not the images: if the split drawn from a config
    ever changed, stored models would be reused on another split (whose validation images they
    may have trained on). So the images and labels of partition 1 are pinned by their digest;
    a deliberate change must bump tune.artifacts.FORMAT_VERSION and this digest together."""
    split = make_split("same_dataset_mnist", 1, cfg)
    parts = (split.train_x, split.train_y, split.val_ind_x, split.val_ind_y, split.val_ood_x,
             split.test_ind_x, split.test_ind_y, split.test_ood_x)
    assert (len(split.train_x), len(split.val_ind_x), len(split.val_ood_x), len(split.test_ind_x),
            len(split.test_ood_x)) == sizes
    h = hashlib.sha256()
    for t in parts:
        h.update(t.numpy().tobytes())
    assert h.hexdigest()[:16] == digest


def test_train_limit_is_class_balanced(mnist_available):
    split = make_split("same_dataset_mnist", 3, DataConfig(train_limit=120))
    assert torch.bincount(split.train_y).tolist() == [20] * 6


def test_missing_data_names_the_folder_and_the_flag(tmp_path):
    with pytest.raises(UsageError) as err:
        make_split("same_dataset_cifar10", 1, data_root=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "--download" in message and "\n" not in message


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("CMG_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root("given") == Path.cwd() / "given"
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("CMG_DATA_ROOT")
    assert resolve_data_root(None).name == "datasets"


def test_crop_flip_is_a_shifted_or_mirrored_copy():
    """Every output is the image moved by (dy, dx) within +-pad (zeros shifted in), then
    mirrored left-right or not; over a batch both happen and the shifts vary."""
    n, pad = 64, 2
    x = torch.arange(n * 3 * 8 * 8, dtype=torch.float32).view(n, 3, 8, 8) + 1  # all distinct
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=pad)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    seen = set()
    for i in range(n):
        crops = {(dy - pad, dx - pad, mirrored): crop.flip(-1) if mirrored else crop
                 for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 for crop in [padded[i, :, dy:dy + 8, dx:dx + 8]] for mirrored in (False, True)}
        matches = [move for move, crop in crops.items() if torch.equal(out[i], crop)]
        assert len(matches) == 1, f"image {i} is no shifted or mirrored copy"
        seen.add(matches[0])
    assert {m for _, _, m in seen} == {False, True}  # some mirrored, some not
    assert len({(dy, dx) for dy, dx, _ in seen}) >= 10  # of the 25 shifts, not a fixed one


def test_blind_validation_ood_holds_no_image_of_an_unseen_class():
    """`val_ood=rotated`: each validation OOD image is the validation IND image at the same
    index, turned by 90, 180 or 270 degrees; no held-out-class image reaches selection. The
    test's OOD is unchanged."""
    seen = make_split("same_dataset_mnist", 1, DataConfig(eval_limit=300))
    blind = make_split("same_dataset_mnist", 1, DataConfig(eval_limit=300, val_ood="rotated"))
    assert torch.equal(blind.val_ind_x, seen.val_ind_x)
    assert torch.equal(blind.test_ood_x, seen.test_ood_x)
    assert len(blind.val_ood_x) == len(blind.val_ind_x)
    turns = [[k for k in (1, 2, 3) if torch.equal(o, torch.rot90(i, k, dims=(-2, -1)))]
             for i, o in zip(blind.val_ind_x, blind.val_ood_x)]
    assert all(turns)  # a rotated IND image, every one
    assert {k for t in turns for k in t} == {1, 2, 3}
    unseen = {tuple(x.flatten().tolist()) for x in seen.val_ood_x}
    assert not unseen & {tuple(x.flatten().tolist()) for x in blind.val_ood_x}


def test_blind_validation_is_refused_where_ood_are_other_data_sets():
    with pytest.raises(UsageError, match="data.val_ood=rotated is for settings whose OOD"):
        make_split("different_dataset", 1, DataConfig(val_ood="rotated"))
