"""Public sources: a dataset built from files served in its repository's public layout (on 127.0.0.1) gives the
same `data/interim/images` as the offline copy; a tampered, truncated or unreachable source gives one clear
error and writes nothing; the recipes of the derived datasets work on generated images."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import re
import shutil
import threading
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medpipe.data import download, preprocess, sources
from medpipe.data.download import DownloadError, DownloadPaths
from medpipe.data.imageset import ImageSet
from medpipe.data.preprocess import PreprocessPaths
from medpipe.data.registry import GreyThumbnailRecipe, MedmnistRecipe
from medpipe.paths import repo_root

REPO = repo_root()
MIRROR = REPO.parent / "shared" / "datasets"
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason="needs the offline copy folder ../shared/datasets")


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def manifest_line(data: bytes, path: str, member: str, member_sha256: str = "=") -> str:
    return f"{hashlib.sha256(data).hexdigest()}\t{len(data)}\t{path}\t{member}\t{member_sha256}\n"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def public(tmp_path):
    """A folder served on 127.0.0.1 in GitHub's public layout: /OWNER/NAME/COMMIT/PATH and /OWNER/NAME/archive/C.zip."""
    root = tmp_path / "public"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with the repository's registry and manifests (editable), and an empty offline copy folder."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "datasets.yaml", root / "datasets.yaml")
    shutil.copytree(REPO / "manifests", root / "manifests")
    (tmp_path / "empty-mirror").mkdir()
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("MEDPIPE_DATA_MIRROR", str(tmp_path / "empty-mirror"))
    monkeypatch.chdir(root)
    return root


def entry_source(root: Path, dataset: str) -> dict:
    return yaml.safe_load((root / "datasets.yaml").read_text())[dataset]["files"][0]["source"]


def edit_source(root: Path, dataset: str, **changes) -> None:
    registry = yaml.safe_load((root / "datasets.yaml").read_text())
    registry[dataset]["files"][0]["source"].update(changes)
    (root / "datasets.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))


def params_for(dataset: str, base: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"] = dataset
    params["download"].update(timeout_s=10, archive_url=base + "/{repo}/archive/{commit}.zip",
                              file_url=base + "/{repo}/{commit}/{path}")
    return params


def serve_from_mirror(root: Path, dataset: str, public_root: Path, as_rgb: bool = False) -> None:
    """Lay the offline copy's members out as the source repository's files; the manifest is rewritten for files
    whose bytes change on the way (grey PNGs served as RGB PNGs, as the busi repository stores them)."""
    source = entry_source(root, dataset)
    manifest = root / source["manifest"]
    mirror_file = yaml.safe_load((root / "datasets.yaml").read_text())[dataset]["files"][0]["name"]
    lines = []
    with zipfile.ZipFile(MIRROR / mirror_file) as archive:
        for entry in sources.read_manifest(manifest):
            data = archive.read(entry.member)
            if as_rgb and entry.path.endswith(".png"):
                with Image.open(io.BytesIO(data)) as img:
                    if img.mode == "L":
                        out = io.BytesIO()
                        img.convert("RGB").save(out, format="PNG")
                        data = out.getvalue()
            target = public_root / source["repo"] / source["commit"] / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            lines.append(manifest_line(data, entry.path, entry.member))
    manifest.write_text("".join(lines))


def interim_arrays(params: dict, workdir: Path) -> dict[str, np.ndarray]:
    download.run(params, DownloadPaths(out=workdir / "raw"))
    out = workdir / "interim" / "images"
    preprocess.run(params, PreprocessPaths(raw=workdir / "raw", out=out, report=workdir / "interim" / "report.json"))
    data = ImageSet.load(out)
    arrays = {f.name: np.asarray(getattr(data, f.name)) for f in fields(data) if getattr(data, f.name) is not None}
    return arrays, {f.name: f.read_bytes() for f in sorted(out.iterdir())}


@needs_mirror
@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["busi", "brain-mri-yes-no", "derma"])
def test_public_route_gives_the_offline_copy_route_interim_bytes(dataset, project, public, tmp_path, monkeypatch):
    public_root, base = public
    serve_from_mirror(project, dataset, public_root, as_rgb=dataset == "busi")
    params = params_for(dataset, base)
    params["image_size"] = 64
    from_public, public_bytes = interim_arrays(params, tmp_path / "public-route")
    assert not (project / "data" / ".partial").exists() or not any((project / "data" / ".partial").iterdir())

    monkeypatch.setenv("MEDPIPE_DATA_MIRROR", str(MIRROR))
    from_copy, copy_bytes = interim_arrays(params, tmp_path / "copy-route")
    assert from_public.keys() == from_copy.keys()
    for key in from_copy:
        np.testing.assert_array_equal(from_public[key], from_copy[key], err_msg=key)
    assert public_bytes == copy_bytes


def small_public_dataset(project: Path, public_root: Path, n: int = 3) -> list[str]:
    """brain-mri-yes-no reduced to a few generated files per class, served file by file and as an archive."""
    source = entry_source(project, "brain-mri-yes-no")
    rng = np.random.default_rng(0)
    lines, paths = [], []
    archive = public_root / source["repo"] / "archive" / f"{source['commit']}.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for cls in ("no", "yes"):
            for i in range(n):
                path = f"{cls}/{cls} ({i}).jpg"
                data = jpeg_bytes(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
                target = public_root / source["repo"] / source["commit"] / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                zf.writestr(f"Brain-Tumor-Detection-{source['commit']}/{path}", data)
                lines.append(manifest_line(data, path, f"brain_tumor_dataset/{path}"))
                paths.append(path)
    (project / source["manifest"]).write_text("# generated\n" + "".join(lines))
    return paths


@pytest.mark.parametrize("fetch", ["files", "archive"])
def test_both_fetch_methods_build_the_dataset_file(fetch, project, public, tmp_path):
    public_root, base = public
    paths = small_public_dataset(project, public_root)
    edit_source(project, "brain-mri-yes-no", fetch=fetch)
    out = download.run(params_for("brain-mri-yes-no", base), DownloadPaths(out=tmp_path / "raw"))
    with zipfile.ZipFile(out[0]) as archive:
        assert sorted(archive.namelist()) == sorted(f"brain_tumor_dataset/{p}" for p in paths)
        source = entry_source(project, "brain-mri-yes-no")
        served = public_root / source["repo"] / source["commit"] / paths[0]
        assert archive.read(f"brain_tumor_dataset/{paths[0]}") == served.read_bytes()


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("fetch", ["files", "archive"])
def test_a_one_byte_change_names_the_file_and_writes_nothing(fetch, project, public, tmp_path):
    public_root, base = public
    paths = small_public_dataset(project, public_root)
    source = entry_source(project, "brain-mri-yes-no")
    edit_source(project, "brain-mri-yes-no", fetch=fetch)
    served = public_root / source["repo"] / source["commit"] / paths[1]
    data = bytearray(served.read_bytes())
    data[100] ^= 1
    served.write_bytes(bytes(data))
    if fetch == "archive":
        archive = public_root / source["repo"] / "archive" / f"{source['commit']}.zip"
        with zipfile.ZipFile(archive, "a") as zf:  # a later member of the same name wins on reading
            zf.writestr(f"Brain-Tumor-Detection-{source['commit']}/{paths[1]}", bytes(data))
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=rf"source file '{re.escape(paths[1])}'.*expected sha256 [0-9a-f]{{64}} \(\d+ bytes\)"):
        download.run(params_for("brain-mri-yes-no", base), DownloadPaths(out=out))
    assert not out.exists()


def test_a_truncated_file_names_its_size(project, public, tmp_path):
    public_root, base = public
    paths = small_public_dataset(project, public_root)
    source = entry_source(project, "brain-mri-yes-no")
    served = public_root / source["repo"] / source["commit"] / paths[0]
    full = served.read_bytes()
    served.write_bytes(full[:200])
    with pytest.raises(DownloadError, match=rf"expected sha256 .* \({len(full)} bytes\), got .* \(200 bytes\)"):
        download.run(params_for("brain-mri-yes-no", base), DownloadPaths(out=tmp_path / "raw"))


def test_no_network_and_no_copy_says_both_ways(project, tmp_path):
    params = params_for("brain-mri-yes-no", "http://127.0.0.1:9")
    with pytest.raises(DownloadError) as err:
        download.run(params, DownloadPaths(out=tmp_path / "raw"))
    message = str(err.value)
    assert "brain-mri-yes-no.zip" in message and "127.0.0.1:9" in message
    assert "connect this machine to the internet" in message and "MEDPIPE_DATA_MIRROR" in message
    assert not (tmp_path / "raw").exists()


def test_verified_files_survive_an_interrupted_fetch(project, public, tmp_path):
    """A fetch stopped by a bad file keeps the files it verified: the next run asks only for the rest."""
    public_root, base = public
    paths = small_public_dataset(project, public_root)
    source = entry_source(project, "brain-mri-yes-no")
    served = public_root / source["repo"] / source["commit"] / paths[-1]
    good = served.read_bytes()
    served.write_bytes(b"not an image")
    with pytest.raises(DownloadError):
        download.run(params_for("brain-mri-yes-no", base), DownloadPaths(out=tmp_path / "raw"))
    kept = project / "data" / ".partial" / f"Brain-Tumor-Detection-{source['commit']}" / "files"
    assert (kept / paths[0]).read_bytes() == (public_root / source["repo"] / source["commit"] / paths[0]).read_bytes()
    for path in paths[:-1]:  # the verified files are no longer served: only the missing one is asked for
        (public_root / source["repo"] / source["commit"] / path).unlink()
    served.write_bytes(good)
    download.run(params_for("brain-mri-yes-no", base), DownloadPaths(out=tmp_path / "raw"))
    assert not kept.parent.exists()  # cleaned up once the dataset file is built


# -- recipes of the derived datasets, on generated images -----------------------------------------------------------
def test_grey_thumbnail_recipe_keeps_aspect_and_never_enlarges():
    rng = np.random.default_rng(1)
    recipe = GreyThumbnailRecipe(kind="grey_thumbnail_jpeg", max_side=256, quality=95)
    big = Image.open(io.BytesIO(sources.grey_thumbnail_jpeg(jpeg_bytes(rng.integers(0, 255, (300, 512, 3), np.uint8)), recipe)))
    small = Image.open(io.BytesIO(sources.grey_thumbnail_jpeg(jpeg_bytes(rng.integers(0, 255, (100, 80, 3), np.uint8)), recipe)))
    assert (big.mode, big.size, big.format) == ("L", (256, 150), "JPEG")
    assert (small.mode, small.size) == ("L", (80, 100))


def test_derived_members_are_checked_against_the_manifest(project, public, tmp_path):
    """brain-tumor-4class-like: the archive's images become grey thumbnails whose sha256 the manifest records."""
    public_root, base = public
    source = entry_source(project, "brain-tumor-4class")
    rng = np.random.default_rng(2)
    recipe = GreyThumbnailRecipe(kind="grey_thumbnail_jpeg")
    lines = []
    (public_root / source["repo"] / "archive").mkdir(parents=True)
    with zipfile.ZipFile(public_root / source["repo"] / "archive" / f"{source['commit']}.zip", "w") as zf:
        for cls in ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"):
            path = f"Training/{cls}/image(1).jpg"
            data = jpeg_bytes(rng.integers(0, 255, (300, 280, 3), np.uint8))
            zf.writestr(f"Brain-Tumor-Classification-DataSet-{source['commit']}/{path}", data)
            lines.append(manifest_line(data, path, path, hashlib.sha256(sources.grey_thumbnail_jpeg(data, recipe)).hexdigest()))
    manifest = project / source["manifest"]
    manifest.write_text("".join(lines))
    params = params_for("brain-tumor-4class", base)
    out = download.run(params, DownloadPaths(out=tmp_path / "raw"))
    with zipfile.ZipFile(out[0]) as archive:
        assert Image.open(io.BytesIO(archive.read("Training/no_tumor/image(1).jpg"))).mode == "L"
    manifest.write_text("".join(lines[:-1]) + lines[-1].rsplit("\t", 1)[0] + "\t" + "0" * 64 + "\n")
    with pytest.raises(DownloadError, match=r"member 'Training/pituitary_tumor/image\(1\).jpg'.*expected sha256 0{64}"):
        download.run(params, DownloadPaths(out=tmp_path / "raw2"))
    assert not (tmp_path / "raw2").exists()


def medmnist_images(rng, folders, per_class):
    return [(label, jpeg_bytes(rng.integers(0, 255, (int(rng.integers(200, 260)), int(rng.integers(200, 260)), 3),
                                            np.uint8)))
            for label, _ in enumerate(folders) for _ in range(per_class)]


def test_medmnist_recipe_crops_resizes_and_splits_with_the_seed():
    rng = np.random.default_rng(3)
    recipe = MedmnistRecipe(kind="medmnist_npz", folders=("a", "b", "c"), crop=200, size=28, seed=7, train=8, val=3,
                            content_sha256="0" * 64)
    images = medmnist_images(rng, recipe.folders, 5)
    arrays = sources.medmnist_arrays(images, recipe)
    assert {k: v.shape for k, v in arrays.items()} == {
        "train_images": (8, 28, 28, 3), "train_labels": (8, 1), "val_images": (3, 28, 28, 3), "val_labels": (3, 1),
        "test_images": (4, 28, 28, 3), "test_labels": (4, 1)}
    order = np.random.default_rng(7).permutation(15)
    first_train = int(np.sort(order[:8])[0])
    label, data = images[first_train]
    with Image.open(io.BytesIO(data)) as img:
        left, top = (img.width - 200) // 2, (img.height - 200) // 2
        expected = np.asarray(img.convert("RGB").crop((left, top, left + 200, top + 200)).resize((28, 28), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(arrays["train_images"][0], expected)
    assert arrays["train_labels"][0, 0] == label
    assert sources.arrays_digest(arrays) == sources.arrays_digest(sources.medmnist_arrays(images, recipe))


def test_medmnist_recipe_output_is_checked_by_content(project, public, tmp_path):
    public_root, base = public
    source = entry_source(project, "bloodmnist")
    folders = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    rng = np.random.default_rng(4)
    images = medmnist_images(rng, folders, 2)
    lines = []
    with zipfile.ZipFile(public_root / "archive.zip", "w") as zf:
        for i, (label, data) in enumerate(images):
            path = f"PBC_dataset_normal_DIB/{folders[label]}/{folders[label][:2].upper()}_{i:03d}.jpg"
            zf.writestr(f"Blood-Cell-Classification-{source['commit']}/{path}", data)
            lines.append(manifest_line(data, path, "-", "-"))
    (public_root / source["repo"] / "archive").mkdir(parents=True)
    shutil.move(public_root / "archive.zip", public_root / source["repo"] / "archive" / f"{source['commit']}.zip")
    (project / "manifests" / "bloodmnist.tsv").write_text("".join(lines))
    recipe = MedmnistRecipe(kind="medmnist_npz", folders=tuple(folders), crop=200, size=28, seed=20200101, train=10,
                            val=3, content_sha256="0" * 64)
    expected = sources.arrays_digest(sources.medmnist_arrays(images, recipe))
    edit_source(project, "bloodmnist", manifest="manifests/bloodmnist.tsv",
                recipe={**recipe.model_dump(), "folders": folders, "content_sha256": expected})
    out = download.run(params_for("bloodmnist", base), DownloadPaths(out=tmp_path / "raw"))
    with np.load(out[0]) as data:
        assert data["test_images"].shape == (3, 28, 28, 3)
    edit_source(project, "bloodmnist", recipe={**recipe.model_dump(), "folders": folders, "content_sha256": "1" * 64})
    with pytest.raises(DownloadError, match=r"bloodmnist-pbc-28.npz built by the medmnist recipe: expected content"):
        download.run(params_for("bloodmnist", base), DownloadPaths(out=tmp_path / "raw2"))
    assert not (tmp_path / "raw2").exists()


@needs_mirror
def test_committed_manifests_match_the_offline_copies():
    """Every member a manifest names as the source file's bytes is in the offline copy with those bytes."""
    registry = yaml.safe_load((REPO / "datasets.yaml").read_text())
    for name, entry in registry.items():
        for file in entry.get("files", []):
            if "source" not in file or not (MIRROR / file["name"]).is_file() or not file["name"].endswith(".zip"):
                continue
            with zipfile.ZipFile(MIRROR / file["name"]) as archive:
                members = {n: hashlib.sha256(archive.read(n)).hexdigest() for n in archive.namelist()}
            for e in sources.read_manifest(REPO / file["source"]["manifest"]):
                assert e.member in members, (name, e.member)
                expected = e.member_sha256 if e.member_sha256 not in ("=", "-") else None
                if expected:
                    assert members[e.member] == expected, (name, e.member)
