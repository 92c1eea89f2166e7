"""The eight test sets from every supported source, written here as tiny files in the real formats.

Each test builds its own data under `tmp_path`; nothing is downloaded (HF_HUB_OFFLINE=1).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
import json
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import open_clip
import pytest
import scipy.io as sio
import torch
from PIL import Image

import adamerging_nb.data as data
from adamerging_nb.data import (TASKS, CacheError, cache_path, class_names, load_cache, load_test_set, normalize,
                                read_idx, relabel, templates, write_idx)
from adamerging_nb.reference import TA8

S = 224


def _img(size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _save(path, size=(30, 20), seed=0, mode="RGB"):
    """Write an image file (format from the suffix) and return it as decoded from disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _img(size, seed, mode).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    with Image.open(path) as img:
        img.load()
    return img


def _by_hand(img, size=S):
    """CLIP's eval preprocessing written out with PIL: shorter side to `size` (bicubic), center crop, RGB."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


# ----------------------------------------------------------------------------------------------- registry

def test_registry():
    assert list(TASKS) == TA8
    assert [TASKS[t].test_size for t in TA8] == [19_887, 8_041, 6_300, 2_700, 26_032, 12_630, 10_000, 1_880]
    assert TASKS["SVHN"].hf_id == "ufldl-stanford/svhn" and TASKS["SVHN"].hf_config == "cropped_digits"
    assert TASKS["MNIST"].hf_id == "ylecun/mnist"
    assert {TASKS[t].hf_id for t in ["SUN397", "Cars", "RESISC45", "EuroSAT", "GTSRB", "DTD"]} == {
        f"tanganke/{n}" for n in ["sun397", "stanford_cars", "resisc45", "eurosat", "gtsrb", "dtd"]}
    assert all(t.split == "test" for t in TASKS.values())
    assert [len(class_names(t)) for t in TA8] == [397, 196, 45, 10, 10, 43, 10, 47]
    assert [len(templates(t)) for t in TA8] == [2, 8, 18, 3, 1, 3, 1, 8]
    assert all("{c}" in tp for t in TA8 for tp in templates(t))


def test_unknown_task_lists_known():
    for f in (lambda: class_names("CIFAR10"), lambda: templates("cifar10"), lambda: load_test_set("CIFAR10")):
        with pytest.raises(KeyError, match="known tasks: SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD"):
            f()


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown source 'web'; known sources: hf, disk, folder"):
        load_test_set("DTD", "web", root="x")


# -------------------------------------------------------------------------------------------- preprocessing

def test_preprocessing_matches_pil_by_hand_and_open_clip(tmp_path):
    wide = _save(tmp_path / "wide.jpg", (300, 200), 1)  # downscaled, cropped left/right
    tall = _save(tmp_path / "tall.png", (150, 251), 2)  # upscaled: 224 x 374, crop top = round(75.0)
    gray = _save(tmp_path / "gray.png", (28, 28), 3, mode="L")
    for img in (wide, tall, gray):
        got = torch.from_numpy(data.preprocess_image(img))
        assert got.dtype == torch.uint8 and got.shape == (3, S, S)
        assert torch.equal(got, _by_hand(img))
        ref = open_clip.image_transform(S, is_train=False)(img)  # the paper's transform, with ToTensor/Normalize
        assert torch.allclose(normalize(got[None])[0], ref, atol=1e-5)


# ----------------------------------------------------------------------------------- Hugging Face sources

def _hf_dataset(n=5, seed=0):
    ims = [_img((40 + 7 * i, 30), seed + i) for i in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=47)})
    labels = [(3 * i) % 47 for i in range(n)]
    ds = datasets.Dataset.from_dict({"image": ims, "label": labels}, features=feats)
    return ds, labels


def test_disk_source_saved_dataset(tmp_path):
    ds, labels = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "DTD"))
    decoded = [ds[i]["image"] for i in range(len(ds))]  # as `datasets` stores them (PNG)
    ts = load_test_set("DTD", "disk", tmp_path, check_size=False, num_workers=2)
    assert ts.name == "DTD" and ts.images.shape == (5, 3, S, S) and ts.images.dtype == torch.uint8
    assert ts.labels.tolist() == labels and ts.labels.dtype == torch.int64
    assert ts.class_names == class_names("DTD")  # FusionBench label order
    assert torch.equal(ts.images[3], _by_hand(decoded[3]))
    # a saved DatasetDict works too, and the folder itself can be the root
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert torch.equal(load_test_set("DTD", "disk", tmp_path / "dd", check_size=False).images, ts.images)


def test_disk_source_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"DTD: no dataset saved with `save_to_disk` at .*datasets.load_dataset\('tanganke/dtd', split='test'\).save_to_disk"):
        load_test_set("DTD", "disk", tmp_path)


def test_hf_source_calls_hub_with_registry_ids(tmp_path, monkeypatch):
    ds, labels = _hf_dataset(3)
    calls = []
    import huggingface_hub.constants as hc
    monkeypatch.setattr(data, "_hub_reachable", lambda *a: True)  # pretend the hub answers
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)

    def fake_load(path, name=None, split=None, cache_dir=None):
        calls.append((path, name, split, datasets.config.HF_HUB_OFFLINE))
        return ds
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ts = load_test_set("SVHN", "hf", check_size=False, hf_cache_dir=tmp_path)
    assert calls == [("ufldl-stanford/svhn", "cropped_digits", "test", False)]
    assert ts.labels.tolist() == [0, 3, 6] and ts.class_names == [str(d) for d in range(10)]


def test_no_network_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    t0 = time.time()
    with pytest.raises(ConnectionError, match=r"GTSRB: the hub is offline \(HF_HUB_OFFLINE=1\) and tanganke/gtsrb is not in the local datasets cache"):
        load_test_set("GTSRB", "hf", hf_cache_dir=tmp_path / "hf")
    assert time.time() - t0 < 10


def test_no_network_unreachable_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    with pytest.raises(ConnectionError, match=r"MNIST: https://127.0.0.1:9 cannot be reached and ylecun/mnist is not in the local datasets cache"):
        load_test_set("MNIST", "hf", hf_cache_dir=tmp_path / "hf")
    assert time.time() - t0 < 10
    assert datasets.config.HF_HUB_OFFLINE is False  # the temporary offline switch is undone


# ---------------------------------------------------------------------------------- Task Arithmetic folders

def test_sun397_imagefolder(tmp_path):
    a = _save(tmp_path / "sun397/test/a_abbey/sun_b.jpg", (50, 40), 0)
    _save(tmp_path / "sun397/test/a_abbey/sun_a.jpg", (40, 50), 1)
    c = _save(tmp_path / "sun397/test/b_bow_window_indoor/sun_c.jpg", (224, 300), 2)
    (tmp_path / "sun397/test/a_abbey/readme.txt").write_text("not an image")
    ts = load_test_set("SUN397", "folder", tmp_path, check_size=False)
    assert ts.class_names == ["abbey", "bow window indoor"]
    assert ts.labels.tolist() == [0, 0, 1]
    assert torch.equal(ts.images[1], _by_hand(a)) and torch.equal(ts.images[2], _by_hand(c))


def test_dtd_and_eurosat_imagefolder(tmp_path):
    for i, c in enumerate(["zigzagged", "banded", "bubbly"]):
        _save(tmp_path / f"dtd/test/{c}/{c}_0001.jpg", seed=i)
    ts = load_test_set("DTD", "folder", tmp_path, check_size=False)
    assert ts.class_names == ["banded", "bubbly", "zigzagged"] and ts.labels.tolist() == [0, 1, 2]
    for i, c in enumerate(["SeaLake", "AnnualCrop", "HerbaceousVegetation"]):
        _save(tmp_path / f"EuroSAT_splits/test/{c}/{c}_{i}.jpg", (64, 64), i)
    ts = load_test_set("EuroSAT", "folder", tmp_path, check_size=False)
    assert ts.class_names == ["annual crop land", "brushland or shrubland", "lake or sea"]
    assert ts.labels.tolist() == [0, 1, 2]


def test_resisc45_split_list(tmp_path):
    base = tmp_path / "resisc45"
    for i, f in enumerate(["airplane/airplane_001.jpg", "airplane/airplane_002.jpg", "sea_ice/sea_ice_001.jpg"]):
        _save(base / "NWPU-RESISC45" / f, (256, 256), i)
    (base / "resisc45-test.txt").write_text("airplane_002.jpg\nsea_ice_001.jpg\n")
    ts = load_test_set("RESISC45", "folder", tmp_path, check_size=False)
    assert ts.class_names == ["airplane", "sea ice"] and ts.labels.tolist() == [0, 1]
    with Image.open(base / "NWPU-RESISC45/airplane/airplane_002.jpg") as img:
        assert torch.equal(ts.images[0], _by_hand(img))


def test_cars_devkit_and_folder_based(tmp_path):
    base = tmp_path / "stanford_cars"
    ims = [_save(base / "cars_test" / f"{i:05d}.jpg", (60, 40), i) for i in (1, 2, 3)]
    annos = np.array([("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 3)], dtype=[("fname", object), ("class", object)])
    (base / "devkit").mkdir()
    sio.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos})  # Task Arithmetic's place
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"], dtype=object)
    sio.savemat(base / "devkit/cars_meta.mat", {"class_names": names})
    ts = load_test_set("Cars", "folder", tmp_path, check_size=False)
    assert ts.labels.tolist() == [1, 0, 2] and ts.class_names == list(names)
    assert torch.equal(ts.images[2], _by_hand(ims[2]))
    folder_root = tmp_path / "fb"
    _save(folder_root / "stanford_cars_folder_based/test/Acura_RL_Sedan_2012/1.jpg")
    ts = load_test_set("Cars", "folder", folder_root, check_size=False)
    assert ts.class_names == ["Acura RL Sedan 2012"]


def test_gtsrb_csv(tmp_path):
    img_dir = tmp_path / "gtsrb/GTSRB/Final_Test/Images"
    ims = [_save(img_dir / f"{i:05d}.ppm", (31 + i, 29), i) for i in range(3)]
    with open(tmp_path / "gtsrb/GT-final_test.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for i, c in enumerate([16, 1, 38]):
            w.writerow([f"{i:05d}.ppm", 31 + i, 29, 5, 5, 20, 20, c])
    ts = load_test_set("GTSRB", "folder", tmp_path, check_size=False)
    assert ts.labels.tolist() == [16, 1, 38] and ts.class_names == class_names("GTSRB")
    assert torch.equal(ts.images[2], _by_hand(ims[2]))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    raw = tmp_path / "MNIST/raw"
    raw.mkdir(parents=True)
    x = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(raw / f"t10k-images-idx3-ubyte{sfx}", x)
    write_idx(raw / f"t10k-labels-idx1-ubyte{sfx}", np.array([5, 0, 4, 1]))
    ts = load_test_set("MNIST", "folder", tmp_path, check_size=False)
    assert ts.labels.tolist() == [5, 0, 4, 1] and ts.class_names == [str(d) for d in range(10)]
    assert torch.equal(ts.images[2], _by_hand(Image.fromarray(x[2])))


def test_mnist_idx_header_is_the_real_one(tmp_path):
    # the official MNIST label file starts with 0x00000801 and the image file with 0x00000803
    write_idx(tmp_path / "l", np.array([1, 2]))
    write_idx(tmp_path / "i", np.zeros((2, 28, 28), np.uint8))
    assert (tmp_path / "l").read_bytes()[:8] == bytes.fromhex("00000801 00000002")
    assert (tmp_path / "i").read_bytes()[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")
    (tmp_path / "t").write_bytes((tmp_path / "i").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "t")


def test_svhn_mat(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    sio.savemat(tmp_path / "svhn/test_32x32.mat", {"X": x, "y": np.array([[10], [3], [1]], dtype=np.uint8)})
    ts = load_test_set("SVHN", "folder", tmp_path, check_size=False)
    assert ts.labels.tolist() == [0, 3, 1]  # SVHN's 10 is the digit 0
    assert torch.equal(ts.images[1], _by_hand(Image.fromarray(x[:, :, :, 1])))


# ------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("task,expected", [
    ("SUN397", "sun397/test does not exist"), ("Cars", "stanford_cars/cars_test does not exist"),
    ("RESISC45", "resisc45/resisc45-test.txt does not exist"), ("EuroSAT", "EuroSAT_splits/test does not exist"),
    ("SVHN", "svhn/test_32x32.mat does not exist"), ("GTSRB", "gtsrb/GT-final_test.csv does not exist"),
    ("MNIST", "MNIST/raw/t10k-images-idx3-ubyte does not exist"), ("DTD", "dtd/test does not exist")])
def test_missing_folder_says_what_where_and_how(tmp_path, task, expected):
    with pytest.raises(FileNotFoundError) as e:
        load_test_set(task, "folder", tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{task}: Task Arithmetic data folder not found: {tmp_path}/") and expected in msg
    assert TASKS[task].folder_layout in msg and "task_vectors" in msg and TASKS[task].hf_id in msg


def test_folder_source_needs_root():
    with pytest.raises(ValueError, match="source='folder' needs root="):
        load_test_set("DTD", "folder")


def test_wrong_size(tmp_path):
    _save(tmp_path / "dtd/test/banded/1.jpg")
    with pytest.raises(ValueError, match=r"DTD: the test set at .*dtd/test has 1 images, expected 1,880.*check_size=False"):
        load_test_set("DTD", "folder", tmp_path)
    assert len(load_test_set("DTD", "folder", tmp_path, check_size=False)) == 1


def test_labels_out_of_range(tmp_path):
    (tmp_path / "svhn").mkdir()
    sio.savemat(tmp_path / "svhn/test_32x32.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.array([[11]])})
    with pytest.raises(ValueError, match="labels of .* span 11..11, but there are 10 classes"):
        load_test_set("SVHN", "folder", tmp_path, check_size=False)


# -------------------------------------------------------------------------------------------------- cache

def _eurosat(root, n=4):
    folders = ["Forest", "River", "AnnualCrop", "Pasture"]
    for i in range(n):
        _save(root / f"EuroSAT_splits/test/{folders[i % 4]}/{i}.jpg", (64 + i, 64), i)


def test_cache_round_trip_and_reuse(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    _eurosat(root)
    mem = load_test_set("EuroSAT", "folder", root, check_size=False)
    ts = load_test_set("EuroSAT", "folder", root, cache, check_size=False)
    path = cache_path(cache, "EuroSAT", "folder")
    assert path == cache / "EuroSAT-folder-224"
    assert sorted(p.name for p in path.iterdir()) == ["images.npy", "labels.npy", "meta.json"]
    assert sorted(p.name for p in cache.iterdir()) == ["EuroSAT-folder-224"]  # no temporary left behind
    meta = json.loads((path / "meta.json").read_text())
    assert meta["source"] == "folder" and meta["n"] == 4 and meta["image_size"] == S and meta["version"] == data.CACHE_VERSION
    assert meta["class_names"] == mem.class_names
    arr = np.load(path / "images.npy", mmap_mode="r")
    assert arr.dtype == np.uint8 and arr.shape == (4, 3, S, S)
    assert torch.equal(ts.images, mem.images) and torch.equal(ts.labels, mem.labels) and ts.class_names == mem.class_names
    # the second call reads the cache only: the JPEGs may be gone
    for p in sorted(root.rglob("*.jpg")):
        p.unlink()
    again = load_test_set("EuroSAT", "folder", root, cache, check_size=False)
    assert torch.equal(again.images, mem.images) and torch.equal(again.labels, mem.labels)
    # a cached subset still obeys the size check
    with pytest.raises(ValueError, match="has 4 images, expected 2,700"):
        load_test_set("EuroSAT", "folder", root, cache)


def test_cache_is_memory_mapped(tmp_path):
    ts = data.TestSet("DTD", torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2]), ["a", "b", "c"])
    data.save_cache(ts, tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no read-only warning leaks to the user
        back = load_cache(tmp_path / "c")
    assert torch.equal(back.images, ts.images)
    ptr, npy = back.images.data_ptr(), str((tmp_path / "c/images.npy").resolve())
    maps = [l.split() for l in Path("/proc/self/maps").read_text().splitlines()]
    assert any(l[-1] == npy and int(l[0].split("-")[0], 16) <= ptr < int(l[0].split("-")[1], 16) for l in maps), \
        "the images should be a view of a memory map of images.npy"


def _flip(f, at):
    b = bytearray(f.read_bytes()); b[at] ^= 0x01; f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["truncate", "meta", "labels", "version", "header", "class name", "label value", "pixel"])
def test_corrupt_cache_error_and_rebuild(tmp_path, damage):
    "Every damage is a CacheError that load_test_set answers by rebuilding; a changed pixel is caught with full verification."
    root, cache = tmp_path / "data", tmp_path / "cache"
    _eurosat(root)
    good = load_test_set("EuroSAT", "folder", root, cache, check_size=False)
    good_images = good.images.clone()
    del good
    path = cache_path(cache, "EuroSAT", "folder")
    if damage == "truncate":
        with open(path / "images.npy", "r+b") as f:
            f.truncate(10_000)
    elif damage == "meta":
        (path / "meta.json").write_text('{"task": "EuroSAT", "n": 4')
    elif damage == "labels":
        (path / "labels.npy").unlink()
    elif damage == "version":
        meta = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps({**meta, "version": 0}))
    elif damage == "header": _flip(path / "images.npy", 30)  # inside the header's dict literal
    elif damage == "class name":
        (path / "meta.json").write_text((path / "meta.json").read_text().replace('"forest"', '"jungle"'))
    elif damage == "label value": _flip(path / "labels.npy", -8)
    else: _flip(path / "images.npy", -1)
    verify = damage == "pixel"
    with pytest.raises(CacheError, match=f"preprocessed test set cache {path} is unusable"):
        load_cache(path, verify=verify)
    with pytest.warns(UserWarning, match=r"is unusable.*Rebuilding it from source='folder'"):
        ts = load_test_set("EuroSAT", "folder", root, cache, check_size=False, verify=verify)
    assert torch.equal(ts.images, good_images)
    load_cache(path)  # repaired


def test_relabel_folder_order_to_fusionbench_order(tmp_path):
    _eurosat(tmp_path, 4)
    ts = load_test_set("EuroSAT", "folder", tmp_path, check_size=False)
    r = relabel(ts, class_names("EuroSAT"))
    assert [r.class_names[i] for i in r.labels] == [ts.class_names[i] for i in ts.labels]
    with pytest.raises(ValueError, match="cannot relabel"):
        relabel(ts, class_names("DTD"))
