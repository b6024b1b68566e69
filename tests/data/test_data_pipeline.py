"""Unit tests of the data stages' logic on small generated archives."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpipe import config
from medpipe.data import registry
from medpipe.data.augment import augment_and_balance, augment_one, balance_targets, build_transform
from medpipe.config import AugmentConfig, ParamsError, SplitConfig
from medpipe.data import imageset
from medpipe.data.imageset import ImageSet, concatenate
from medpipe.data.preprocess import ArchiveError, class_folder_items, read_dataset
from medpipe.data.registry import DatasetSpec, RegistryError
from medpipe.data.splitting import (cross_split_duplicates, group_images, moved_from_source_split, near_duplicate_pairs,
                                    normalization_stats, split_dataset)
from tests.conftest import make_class_zip, png_bytes
from tests.data.test_sources import MIRROR
from tests.data.test_imaging import bomb_png


def busi_like_spec(**overrides) -> DatasetSpec:
    fields = dict(
        name="tiny", reader="class_folders", classes={"benign": "benign", "malignant": "malignant", "normal": "normal"},
        files=[{"name": "tiny.zip", "checksum": "sha256:" + "0" * 64}], mask_suffix="_mask", crop="scan_area",
        image_size=32,
    )
    fields.update(overrides)
    return DatasetSpec(**fields)


def make_set(labels, hashes=None, groups=None, phashes=None, size=8, rng=None) -> ImageSet:
    rng = rng or np.random.default_rng(0)
    n = len(labels)
    return ImageSet(
        images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=tuple(f"c{i}" for i in range(max(labels) + 1)),
        source_ids=np.array([f"img{i}" for i in range(n)]),
        groups=np.array(groups if groups is not None else [""] * n),
        content_hashes=np.array(hashes if hashes is not None else [f"h{i}" for i in range(n)]),
        phashes=np.asarray(phashes if phashes is not None else rng.integers(0, 2**63, n, dtype=np.uint64),
                           dtype=np.uint64),
        source_splits=np.array([""] * n),
    )


# -- preprocess ------------------------------------------------------------------------------------------
def test_class_folders_read_with_masks_merged_and_bad_files_skipped(tmp_path):
    bad = {
        "root/benign/.DS_Store": b"\x00\x01junk",
        "root/benign/empty.jpg": b"",
        "root/benign/not_an_image.jpg": b"hello, I am text",
        "root/benign/truncated.png": png_bytes(np.full((40, 40, 3), 90, np.uint8))[:60],
        "root/benign/benign (0)_mask_1.png": png_bytes(np.pad(np.full((4, 4), 255, np.uint8), ((0, 44), (0, 44)))),
    }
    archive = make_class_zip(tmp_path / "tiny.zip", n_per_class=4, extras=bad)
    result = read_dataset(busi_like_spec(), tmp_path, size=32, workers=1)
    data = result.imageset
    assert len(data) == 12 and data.images.shape == (12, 32, 32, 3) and data.masks.shape == (12, 32, 32)
    assert data.class_counts() == {"benign": 4, "malignant": 4, "normal": 4}
    reasons = {s.member.split(":", 1)[1]: s.reason for s in result.skipped}
    assert reasons["root/benign/.DS_Store"] == "hidden file"
    assert "empty" in reasons["root/benign/empty.jpg"]
    assert "not an image" in reasons["root/benign/not_an_image.jpg"]
    assert "corrupt or truncated" in reasons["root/benign/truncated.png"]
    normal = np.array(data.class_names)[data.labels] == "normal"
    assert data.masks[normal].sum() == 0 and data.masks[~normal].sum() > 0
    # the second mask of "benign (0)" (top-left square) is OR-ed into its mask
    first = list(data.source_ids).index(f"{archive.name}:root/benign/benign (0).png")
    items, _ = class_folder_items(busi_like_spec(), archive)
    assert len(next(i for i in items if i.member.endswith("benign (0).png")).mask_members) == 2
    assert data.masks[first].sum() > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_decompression_bomb_is_skipped_with_its_reason(tmp_path, capfd, workers):
    make_class_zip(tmp_path / "tiny.zip", n_per_class=2, extras={"root/benign/bomb.png": bomb_png()})
    pil_limit = Image.MAX_IMAGE_PIXELS
    max_pixels = 48 * 48  # the good images (48 x 48) are just within the limit
    result = read_dataset(busi_like_spec(), tmp_path, size=32, workers=workers, max_pixels=max_pixels)
    assert result.imageset.class_counts() == {"benign": 2, "malignant": 2, "normal": 2}
    reasons = {s.member: s.reason for s in result.skipped}
    assert reasons == {"tiny.zip:root/benign/bomb.png": "too_large: 30000x30000 = 900000000 px > "
                                                        "preprocess.max_pixels (2304)"}
    assert "Traceback" not in capfd.readouterr().err
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # the in-process run restores PIL's global limit


def test_two_workers_give_the_same_arrays_as_one(tmp_path):
    make_class_zip(tmp_path / "tiny.zip", n_per_class=6)
    one = read_dataset(busi_like_spec(), tmp_path, size=32, workers=1).imageset
    two = read_dataset(busi_like_spec(), tmp_path, size=32, workers=2).imageset
    assert np.array_equal(one.images, two.images) and np.array_equal(one.masks, two.masks)
    assert list(one.source_ids) == list(two.source_ids)


def test_archive_member_escaping_the_folder_is_refused(tmp_path):
    make_class_zip(tmp_path / "tiny.zip", n_per_class=2, extras={"../evil/benign/x.png": b"x"})
    with pytest.raises(ArchiveError, match=r"\.\./evil/benign/x.png.* unsafe path"):
        read_dataset(busi_like_spec(), tmp_path, size=32, workers=1)


def test_metadata_groups_are_attached(tmp_path):
    make_class_zip(tmp_path / "tiny.zip", n_per_class=2, with_masks=False,
                   extras={"root/meta.csv": b"image_id,lesion_id\nbenign (0),L1\nbenign (1),L1\n"})
    spec = busi_like_spec(mask_suffix=None, metadata={"path": "root/meta.csv", "id_column": "image_id",
                                                      "group_column": "lesion_id"})
    data = read_dataset(spec, tmp_path, size=32, workers=1).imageset
    groups = dict(zip([s.rsplit("/", 1)[1] for s in data.source_ids], data.groups))
    assert groups["benign (0).png"] == groups["benign (1).png"] == "L1" and groups["normal (0).png"] == ""


def masked_set(labels) -> ImageSet:
    data = make_set(labels)
    return replace(data, masks=np.random.default_rng(1).integers(0, 2, (len(data), 8, 8), dtype=np.uint8))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_imageset_round_trip_is_byte_identical(tmp_path):
    data = masked_set([0, 1, 1, 0])
    data.save(tmp_path / "a")
    ImageSet.load(tmp_path / "a").save(tmp_path / "b")
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert sorted(folder_bytes(tmp_path / "a")) == ["images.npy", "masks.npy", "metadata.npz"]


def test_streamed_image_files_are_what_numpy_saves_for_the_whole_array(tmp_path, monkeypatch):
    data = masked_set([0, 1, 1, 0, 1, 0, 0])
    monkeypatch.setattr(imageset, "CHUNK_BYTES", 2 * 8 * 8 * 3)   # two images a chunk: four chunks
    data.save(tmp_path / "set")
    np.save(tmp_path / "whole.npy", data.images)
    assert (tmp_path / "set" / "images.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    loaded = ImageSet.load(tmp_path / "set")
    assert isinstance(loaded.images, np.memmap) and not loaded.images.flags.writeable
    assert np.array_equal(loaded.masks, data.masks) and np.array_equal(loaded.labels, data.labels)


def test_subsets_and_concatenations_of_a_stored_set_read_the_right_rows(tmp_path):
    data = masked_set([0, 1, 1, 0, 1, 0, 0])
    data.save(tmp_path / "set")
    stored = ImageSet.load(tmp_path / "set")
    pick = np.array([6, 0, 3])
    part = stored.subset(pick)
    assert isinstance(part.images, imageset.Rows)   # nothing read yet
    assert np.array_equal(np.asarray(part.images), data.images[pick])
    assert np.array_equal(part.images[1:], data.images[pick[1:]]) and np.array_equal(part.images[0], data.images[6])
    both = concatenate([stored, part]).subset(np.array([8, 1, 9]))
    assert np.array_equal(np.asarray(both.images), data.images[[0, 1, 3]])
    assert np.array_equal(np.asarray(both.masks), data.masks[[0, 1, 3]])
    assert list(both.source_ids) == list(data.source_ids[[0, 1, 3]])


def test_a_writer_that_fails_leaves_nothing(tmp_path):
    data = masked_set([0, 1])
    data.save(tmp_path / "set")
    before = folder_bytes(tmp_path / "set")
    with pytest.raises(RuntimeError, match="decode failed"):
        with imageset.ImageSetWriter(tmp_path / "set", 8, data.class_names, with_masks=True) as writer:
            writer.append(data)
            raise RuntimeError("decode failed")
    assert folder_bytes(tmp_path / "set") == before   # the old set is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]   # and no temporary folder is left


# -- split ------------------------------------------------------------------------------------------------
def test_near_duplicate_pairs_by_hamming_distance():
    hashes = np.array([0b0, 0b111, 0b1, 0b1111 << 60], dtype=np.uint64)
    pairs = {tuple(p) for p in near_duplicate_pairs(hashes, 1)}
    assert pairs == {(0, 2)}
    assert {tuple(p) for p in near_duplicate_pairs(hashes, 3)} == {(0, 1), (0, 2), (1, 2)}
    assert len(near_duplicate_pairs(hashes, -1)) == 0


def test_grouping_merges_exact_near_and_metadata_groups():
    data = make_set([0, 0, 1, 1, 0], hashes=["a", "a", "b", "c", "d"], groups=["", "", "L", "L", ""],
                    phashes=[1, 2**40, 2**50, 2**60, 3])
    grouping = group_images(data, max_distance=1)
    g = grouping.group_of
    assert g[0] == g[1] == g[4]  # exact copy (0, 1) and near duplicate (0, 4: hashes 1 and 3 differ by one bit)
    assert g[2] == g[3] and g[2] != g[0]  # the same lesion id
    assert grouping.exact_duplicate_copies == 1 and grouping.conflicting_groups == []


def test_split_is_stratified_grouped_and_seeded():
    rng = np.random.default_rng(5)
    labels = [0] * 200 + [1] * 100
    hashes = [f"h{i // 2}" for i in range(300)]  # every image has one pixel-identical copy
    data = make_set(labels, hashes=hashes, rng=rng)
    result = split_dataset(data, (0.7, 0.15, 0.15), seed=1, max_distance=-1)
    for group in np.unique(result.grouping.group_of):
        assert len(set(result.split_of[result.grouping.group_of == group])) == 1
    for label, total in ((0, 200), (1, 100)):
        share = np.bincount(result.split_of[data.labels == label], minlength=3) / total
        assert np.allclose(share, [0.7, 0.15, 0.15], atol=0.03)
    again = split_dataset(data, (0.7, 0.15, 0.15), seed=1, max_distance=-1)
    other = split_dataset(data, (0.7, 0.15, 0.15), seed=2, max_distance=-1)
    assert np.array_equal(result.split_of, again.split_of)
    assert not np.array_equal(result.split_of, other.split_of)


def test_conflicting_label_groups_are_dropped_or_kept():
    labels = [0, 1] + [0] * 20 + [1] * 20
    hashes = ["same", "same"] + [f"h{i}" for i in range(40)]
    data = make_set(labels, hashes=hashes)
    dropped = split_dataset(data, (0.7, 0.15, 0.15), 0, -1, conflicting_labels="drop")
    assert dropped.dropped == 2 and (dropped.split_of[:2] == -1).all()
    assert len(dropped.grouping.conflicting_groups) == 1
    kept = split_dataset(data, (0.7, 0.15, 0.15), 0, -1, conflicting_labels="keep")
    assert kept.dropped == 0 and kept.split_of[0] == kept.split_of[1] >= 0


def test_source_split_is_honoured_only_when_asked():
    data = make_set([0, 1] * 30)
    data = ImageSet(**{**data.__dict__, "source_splits": np.array(["train"] * 40 + ["test"] * 20)})
    honoured = split_dataset(data, (0.7, 0.15, 0.15), 0, -1, use_source_split=True)
    assert (honoured.split_of[40:] == 2).all() and set(honoured.split_of[:40]) == {0, 1}
    ignored = split_dataset(data, (0.7, 0.15, 0.15), 0, -1, use_source_split=False)
    assert (ignored.split_of[:40] == 2).any()


def test_exact_source_split_keeps_every_image_where_the_source_put_it():
    """A benchmark's official test set as published: a training image duplicating a test image stays in train
    (use_source_split=true moves it to test), a conflicting-label pair is kept, and the report lists the copies."""
    labels = [0, 1] * 30
    hashes = [f"h{i}" for i in range(60)]
    hashes[0] = hashes[50]                       # train image 0 = test image 50 (same label)
    hashes[3], hashes[55] = "x", "x"             # train image 3 (label 1) = test image 55 (label 1)
    hashes[6], hashes[52] = "y", "y"             # train image 6 (label 0) = test image 52 (label 0)
    hashes[7], hashes[53] = "z", "z"             # train image 7 (label 1) = test image 53 (label 1)
    data = make_set(labels, hashes=hashes)
    sources = np.array(["train"] * 40 + ["val"] * 8 + ["test"] * 12)
    data = ImageSet(**{**data.__dict__, "source_splits": sources})
    exact = split_dataset(data, (0.7, 0.15, 0.15), 0, -1, use_source_split="exact")
    assert exact.split_of.tolist() == [0] * 40 + [1] * 8 + [2] * 12 and exact.dropped == 0
    report = cross_split_duplicates(exact, data.source_ids)
    assert report["groups"] == 4 and report["test_images_with_a_copy_elsewhere"] == 4
    assert {"train": ["img0"], "test": ["img50"]} in report["first_groups"]
    assert moved_from_source_split(exact.split_of, sources) == {}
    grouped = split_dataset(data, (0.7, 0.15, 0.15), 0, -1, use_source_split=True)
    assert (grouped.split_of[[0, 3, 6, 7]] == 2).all()
    assert moved_from_source_split(grouped.split_of, sources) == {"train -> test": 4}
    assert cross_split_duplicates(grouped, data.source_ids)["groups"] == 0


def test_exact_source_split_carves_validation_out_of_train_only():
    data = make_set([0, 1] * 40)
    sources = np.array(["train"] * 60 + ["test"] * 20)
    data = ImageSet(**{**data.__dict__, "source_splits": sources})
    exact = split_dataset(data, (0.7, 0.15, 0.15), 0, -1, use_source_split="exact")
    assert (exact.split_of[60:] == 2).all() and set(exact.split_of[:60]) == {0, 1}
    assert 6 <= (exact.split_of == 1).sum() <= 14   # val's share of train + val: 0.15 / 0.85 of 60


def test_use_source_split_takes_true_false_or_exact():
    assert SplitConfig(use_source_split="exact").use_source_split == "exact"
    with pytest.raises(ValueError, match="use_source_split"):
        SplitConfig(use_source_split="yes")


def test_normalization_stats():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[1] = 255
    stats = normalization_stats(images, "mean_std")
    assert stats["mean"] == [0.5, 0.5, 0.5] and stats["std"] == [0.5, 0.5, 0.5]
    assert normalization_stats(images, "unit")["std"] == [1.0, 1.0, 1.0]


def test_normalization_stats_streamed_equal_the_whole_array_in_float64(tmp_path, monkeypatch):
    images = np.random.default_rng(3).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    images[:, :, :, 2] //= 3   # channels with different spreads
    monkeypatch.setattr(imageset, "CHUNK_BYTES", 7 * 8 * 8 * 3)   # an uneven last chunk
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    stats = normalization_stats(images, "mean_std")
    assert stats["mean"] == [round(float(m), 6) for m in pixels.mean(axis=0)]
    assert stats["std"] == [round(float(v), 6) for v in pixels.std(axis=0)]


# -- augment ---------------------------------------------------------------------------------------------
def test_balancing_reaches_the_majority_with_copies_of_training_images_only():
    data = make_set([0] * 10 + [1] * 3 + [2] * 5)
    out = augment_and_balance(data, AugmentConfig(), seed=0)
    assert out.class_counts() == {"c0": 10, "c1": 10, "c2": 10}
    assert np.array_equal(out.images[:18], data.images)  # the originals come first, untouched
    copies = [s.split("#aug")[0] for s in out.source_ids[18:]]
    assert set(copies) <= set(data.source_ids[10:])  # copies only of minority-class training images
    assert np.array_equal(augment_and_balance(data, AugmentConfig(), 0).images, out.images)  # seeded
    assert len(augment_and_balance(data, AugmentConfig(balance="none"), 0)) == 18
    assert list(balance_targets(np.array([10, 3, 0]), AugmentConfig(target=6))) == [10, 6, 0]


def test_geometric_augmentation_moves_mask_with_image():
    rng = np.random.default_rng(0)
    transform = build_transform(AugmentConfig(rotate_degrees=0, brightness=0, contrast=0))
    for _ in range(20):
        image = np.zeros((16, 16, 3), np.uint8)
        y, x = rng.integers(0, 12, 2)
        image[y:y + 3, x:x + 5] = 255
        mask = image[..., 0] > 0
        out_image, out_mask = augment_one(transform, image, mask.astype(np.uint8))
        assert np.array_equal(out_image[..., 0] > 0, out_mask.astype(bool))


# -- params and registry ---------------------------------------------------------------------------------
def test_split_fractions_must_sum_to_one():
    with pytest.raises(ParamsError, match="must sum to 1.*0.7 \\+ 0.2 \\+ 0.15"):
        config.load_section({"split": {"train": 0.7, "val": 0.2, "test": 0.15}}, "split", SplitConfig)


@pytest.mark.parametrize("value", [0, -1, "many"])
def test_max_pixels_must_be_a_positive_integer(value):
    assert config.load_section({}, "preprocess", config.PreprocessConfig).max_pixels == 89_478_485
    with pytest.raises(ParamsError, match=f"preprocess.max_pixels: .*got {value!r}"):
        config.load_section({"preprocess": {"max_pixels": value}}, "preprocess", config.PreprocessConfig)


def test_typo_in_params_names_the_key():
    with pytest.raises(ParamsError, match="split.sed"):
        config.load_section({"split": {"sed": 3}}, "split", SplitConfig)


def test_unknown_top_level_params_key(tmp_path):
    (tmp_path / "params.yaml").write_text("dataset: busi\ntrian: {}\n")
    with pytest.raises(ParamsError, match="trian"):
        config.load_params(tmp_path / "params.yaml")


def test_unknown_dataset_name_lists_the_registered_ones():
    with pytest.raises(RegistryError, match="unknown dataset 'bussi'.*'busi'"):
        registry.get_spec("bussi")


def test_every_registered_dataset_is_valid():
    specs = registry.load_registry()
    assert {"busi", "brain-mri-yes-no", "brain-tumor-4class", "bloodmnist", "derma", "derma-blood-6"} <= set(specs)
    assert [f.name for f in registry.source_files(specs["derma-blood-6"])] == [
        "derma-isic-3class.zip", "bloodmnist-pbc-28.npz"]


MEDMNIST_2D = ("pathmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
               "bloodmnist-official", "tissuemnist", "organamnist", "organcmnist", "organsmnist")


def test_every_single_label_medmnist_v2_dataset_is_registered_at_28_and_224_px():
    specs = registry.load_registry()
    for name in MEDMNIST_2D:
        for key, size in ((name, 28), (f"{name}-224", 224)):
            spec = specs[key]
            (file,) = spec.files
            assert spec.reader == "medmnist_npz" and spec.image_size == size and spec.benchmark_metric == "accuracy"
            assert file.algorithm == "md5" and file.urls[0].startswith("https://zenodo.org/records/10519652/files/")
            assert file.name.removesuffix(".npz") in file.urls[0] and list(spec.classes.values()) == list(
                range(len(spec.classes)))


@pytest.mark.parametrize("name", ["breastmnist", "retinamnist"])
def test_the_offline_medmnist_files_read_with_their_entries(name):
    """The mirror's official files: their MD5 is the entry's, and every label is one of its classes."""
    import hashlib

    spec = registry.get_spec(name)
    (file,) = spec.files
    path = MIRROR / file.name
    if not path.is_file():
        pytest.skip(f"no offline copy of {file.name}")
    assert hashlib.md5(path.read_bytes()).hexdigest() == file.digest
    with np.load(path) as arrays:
        labels = np.concatenate([arrays[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")])
    assert set(np.unique(labels)) == set(spec.classes.values())


def test_a_multi_label_medmnist_file_is_refused_by_name(tmp_path):
    spec = DatasetSpec(name="chest", reader="medmnist_npz", classes={"a": 0, "b": 1},
                       files=[{"name": "chest.npz", "checksum": "md5:" + "0" * 32}])
    images = np.zeros((4, 28, 28), np.uint8)
    np.savez(tmp_path / "chest.npz", **{f"{s}_images": images for s in ("train", "val", "test")},
             **{f"{s}_labels": np.zeros((4, 14), np.uint8) for s in ("train", "val", "test")})
    with pytest.raises(ArchiveError, match=r"chest.npz: train_labels has 14 labels per image"):
        read_dataset(spec, tmp_path, 28)


def test_registry_rejects_bad_checksum_format(tmp_path):
    path = tmp_path / "datasets.yaml"
    path.write_text("x:\n  reader: class_folders\n  classes: {a: a, b: b}\n  files: [{name: x.zip, checksum: abc}]\n")
    with pytest.raises(RegistryError, match="(?s)entry .x.*checksum"):
        registry.load_registry(path)



def test_split_too_small_for_the_fractions_is_a_params_error(tmp_path):
    from medpipe.data.splitting import SplitPaths, run

    make_set([0, 1, 0]).save(tmp_path / "images")
    (tmp_path / "report.json").write_text('{"skipped": []}')
    paths = SplitPaths(tmp_path / "images", tmp_path / "report.json", tmp_path / "out", tmp_path / "details.json",
                       tmp_path / "data.json")
    with pytest.raises(ParamsError, match="3 images are too few for split.train/val/test = 0.7/0.15/0.15"):
        run({"dataset": "tiny", "split": {"near_duplicate_distance": -1}}, paths)
    assert not (tmp_path / "data.json").exists()


def test_split_writes_a_small_headline_and_the_details_apart(tmp_path):
    from medpipe.data.splitting import SplitPaths, run

    make_set([0, 1] * 20).save(tmp_path / "images")
    (tmp_path / "report.json").write_text('{"skipped": [{"file": "a.txt", "reason": "not an image"}]}')
    paths = SplitPaths(tmp_path / "images", tmp_path / "report.json", tmp_path / "out", tmp_path / "details.json",
                       tmp_path / "data.json")
    parts = run({"dataset": "tiny", "split": {"near_duplicate_distance": -1}}, paths)
    headline = json.loads((tmp_path / "data.json").read_text())
    assert headline == {"train": len(parts["train"]), "val": len(parts["val"]), "test": len(parts["test"]),
                        "dropped": 0, "skipped": 1}
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["skipped"]["by_reason"] == {"not an image": 1} and details["classes"] == list(parts["train"].class_names)


def mapped_file_kb() -> int:
    """This process's resident memory that maps files (Linux: RssFile in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_reading_a_stored_set_in_chunks_keeps_no_pages_mapped(tmp_path):
    """A stage streaming a set holds one chunk: the rows it has read leave its resident memory again."""
    images = np.random.default_rng(0).integers(0, 256, (400, 128, 128, 3), dtype=np.uint8)   # 19.7 MB
    np.save(tmp_path / "images.npy", images)
    stored = np.load(tmp_path / "images.npy", mmap_mode="r")
    before = mapped_file_kb()
    rows = imageset.Rows([stored])
    assert all(np.array_equal(rows[i:i + 50], images[i:i + 50]) for i in range(0, 400, 50))
    assert mapped_file_kb() - before < 2_000
    np.asarray(stored).sum()   # the mapping read directly keeps every page it touched
    assert mapped_file_kb() - before > 15_000
