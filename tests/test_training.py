"""The training pipeline on synthetic images and a tiny random ViT: it learns, it caches, it
skips bad files, its artifact round-trips, and its writes are atomic."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_SPEC, make_dataset, sample_photos
from vehicle_classifier import config, registry
from vehicle_classifier.training import calibration
from vehicle_classifier.training.head_training import train_head
from vehicle_classifier.training.job import Job
from vehicle_classifier.training import int8 as int8_module, run as run_module
from vehicle_classifier.training.run import run_training
from vehicle_classifier.artifact import ArtifactError, load_artifact, save_artifact
from vehicle_classifier.backbone import OnCrops, create_backbone, preprocessing_for
from vehicle_classifier.data import DataError, stratified_folds, stratified_split
from vehicle_classifier.devices import autocast
from vehicle_classifier.runtime import resolve_precision
from vehicle_classifier.fileio import atomic_path
from vehicle_classifier.images import load_crop
from vehicle_classifier.model.predictor import Predictor
from vehicle_classifier.runtime import OpenVINOModel

pytestmark = pytest.mark.integration


def tiny_cfg(**kw):
    kw.setdefault("neither_dir", "")  # no 'neither' images: the counts below are the dataset's photos
    return config.TrainConfig(backbone=TINY_SPEC.name, max_epochs=60, patience=10, **kw)


def run(data, out, weights, cache, **kw):
    return run_training(Job(data, out, tiny_cfg(**kw), weights, cache, spec=TINY_SPEC))


@pytest.fixture
def backbone_calls(monkeypatch):
    """Counts images that go through the backbone (OpenVINO's float graph, on CPU; its int8 copy's
    apart, as "int8_images"), the backbones converted for it and the graphs quantized, by
    wrapping the real functions."""
    calls = {"images": 0, "int8_images": 0, "converted": 0, "quantized": 0}
    real_map = OpenVINOModel.map

    def counting(name, real):
        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return counted

    def counting_map(self, batches):
        def counted():
            for tag, batch in batches:
                calls["int8_images" if self.precision == "int8" else "images"] += len(batch)
                yield tag, batch
        return real_map(self, counted())

    monkeypatch.setattr(run_module, "exported_graph", counting("converted", run_module.exported_graph))
    monkeypatch.setattr(int8_module, "quantize", counting("quantized", int8_module.quantize))
    monkeypatch.setattr(OpenVINOModel, "map", counting_map)
    return calls


def test_training_learns_separable_classes(tiny_model_dir):
    metrics = json.loads((tiny_model_dir / config.METRICS_FILE).read_text())
    assert metrics["test"]["accuracy"] >= 0.9
    assert metrics["test"]["roc_auc"] >= 0.9
    assert metrics["test"]["count"] > 0 and metrics["val"]["count"] > 0
    for split in ("train", "val", "test"):
        assert set(metrics[split]["per_class"]) == {"Bike", "Car"}
        assert np.sum(metrics[split]["confusion_matrix"]) == metrics[split]["count"]
    best = metrics["summary"]["best_epoch"]
    history = metrics["history"]
    assert min(h["val_loss"] for h in history) == history[best - 1]["val_loss"]  # best epoch kept
    calibration = metrics["calibration"]  # by default, the temperature is fitted out of fold
    assert calibration["method"] == f"temperature scaling on {config.CALIBRATION_FOLDS}-fold out-of-fold logits of train+val"
    assert calibration["out_of_fold"]["count"] == metrics["train"]["count"] + metrics["val"]["count"]
    assert calibration["val"]["count"] == metrics["val"]["count"]
    assert calibration["test"]["count"] == metrics["test"]["count"]
    assert calibration["temperature"] > 0
    for name in (config.ARTIFACT_FILE, config.SPLIT_FILE, config.HISTORY_PLOT, config.CONFUSION_PLOT):
        assert (tiny_model_dir / name).stat().st_size > 0
    for plot in (config.HISTORY_PLOT, config.CONFUSION_PLOT):
        with Image.open(tiny_model_dir / plot) as im:
            assert im.format == "PNG" and im.size[0] > 200


def test_artifact_metadata_is_self_describing(tiny_model_dir, tiny_weights):
    meta = load_artifact(tiny_model_dir / config.ARTIFACT_FILE).metadata
    assert meta["class_names"] == ["Bike", "Car"]
    assert meta["backbone"]["architecture"] == TINY_SPEC.architecture
    assert meta["backbone"]["model_kwargs"] == TINY_SPEC.model_kwargs
    assert len(meta["backbone"]["weights_digest"]) == 64
    assert meta["preprocessing"]["input_size"] == 32
    assert meta["training"]["lr"] == config.TrainConfig().lr
    assert meta["metrics"]["test"]["accuracy"] >= 0.9
    assert meta["model_version"] and meta["created_at"] and meta["package_version"]


def test_split_is_stratified_deterministic_and_saved(tiny_model_dir, synthetic_dataset):
    split = json.loads((tiny_model_dir / config.SPLIT_FILE).read_text())
    files = split["train"] + split["val"] + split["test"]
    assert len(files) == len(set(files)) == 60  # disjoint, complete
    assert all((synthetic_dataset / f).is_file() for f in files)
    for part in ("val", "test"):
        labels = [f.split("/")[0] for f in split[part]]
        assert labels.count("Car") == labels.count("Bike")  # stratified
    labels = [0] * 50 + [1] * 30
    assert stratified_split(labels, 0.2, 0.2, seed=3) == stratified_split(labels, 0.2, 0.2, seed=3)
    assert stratified_split(labels, 0.2, 0.2, seed=3) != stratified_split(labels, 0.2, 0.2, seed=4)
    test = stratified_split(labels, 0.2, 0.2, seed=3)["test"]
    assert sum(labels[i] for i in test) == 6 and len(test) == 16


def test_rerun_hits_the_cache_and_recomputes_only_changed_files(tmp_path, tiny_weights, backbone_calls):
    data = make_dataset(tmp_path / "data", per_class=12)
    cache = tmp_path / "cache"
    run(data, tmp_path / "out1", tiny_weights, cache)
    assert backbone_calls["images"] == 24

    backbone_calls["images"] = 0
    first = run(data, tmp_path / "out2", tiny_weights, cache)
    assert backbone_calls["images"] == 0  # nothing new: the backbone never ran
    # nor was it converted or quantized again: the first run's graphs, kept in the cache (graphs.py)
    assert (backbone_calls["converted"], backbone_calls["quantized"]) == (1, 1)

    # One file changed, one added, one renamed (same content: still cached).
    with Image.open(data / "Car" / "Car_0.jpg") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "Car" / "Car_0.jpg")
    shutil.copy(data / "Bike" / "Bike_1.png", data / "Bike" / "extra.png")
    Image.new("RGB", (40, 40), (10, 20, 230)).save(data / "Bike" / "new.png")
    (data / "Car" / "Car_2.webp").rename(data / "Car" / "renamed.webp")
    backbone_calls["images"] = 0
    second = run(data, tmp_path / "out3", tiny_weights, cache)
    assert backbone_calls["images"] == 2  # the changed file and the new one
    assert second["summary"]["duplicates_dropped"] == 1  # extra.png is Bike_1.png again
    assert first["summary"]["images_found"] + 2 == second["summary"]["images_found"]


def test_the_int8_gate_runs_each_validation_photo_once_per_int8_graph(tmp_path, tiny_weights, backbone_calls):
    """The gate's features through the int8 graph are kept beside it: a rerun (train.py --force)
    runs the int8 graph on no photo; an int8 graph made again (here: its files deleted) is
    measured afresh, never on the replaced graph's features."""
    data, cache = make_dataset(tmp_path / "data", per_class=12), tmp_path / "cache"
    first = run(data, tmp_path / "out", tiny_weights, cache)
    assert backbone_calls["int8_images"] == first["int8"]["photos"] == first["val"]["count"] > 0
    backbone_calls["int8_images"] = 0
    again = run(data, tmp_path / "out", tiny_weights, cache)
    assert backbone_calls["int8_images"] == 0 and again["int8"] == first["int8"]
    for graph in cache.glob(f"*/graphs/{config.INT8_FILES[0]}"):
        graph.unlink()
    third = run(data, tmp_path / "out", tiny_weights, cache)
    assert backbone_calls["quantized"] == 2 and backbone_calls["int8_images"] == third["int8"]["photos"]


def test_train_py_reads_and_hashes_each_photo_once(tmp_path, tiny_weights, monkeypatch):
    """The up-to-date check hashes every photo (before torch is imported); the run goes by the
    same digests instead of hashing them again."""
    import train
    from vehicle_classifier import data as data_mod
    from vehicle_classifier.training import fingerprint, run as run_mod

    data, hashed, real = make_dataset(tmp_path / "data", per_class=4), [], data_mod.file_digest
    for module in (data_mod, fingerprint, run_mod):  # every module that hashes files, by whatever name
        monkeypatch.setattr(module, "file_digest", lambda path: hashed.append(Path(path)) or real(path))
    args = ["--data-dir", str(data), "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--weights", str(tiny_weights), "--backbone", TINY_SPEC.name, "--max-epochs", "5", "--neither-dir", ""]
    assert train.main(args) == 0
    photos = sorted(p for p in data.rglob("*") if p.is_file())
    assert sorted(p for p in hashed if p != Path(tiny_weights)) == photos  # each once, and the weights file


def test_cache_is_keyed_by_weights(tmp_path, tiny_weights, backbone_calls):
    data = make_dataset(tmp_path / "data", per_class=6)
    cache = tmp_path / "cache"
    run(data, tmp_path / "a", tiny_weights, cache)
    other = tmp_path / "other.pth"
    torch.manual_seed(99)
    torch.save(create_backbone(TINY_SPEC.architecture, TINY_SPEC.model_kwargs).state_dict(), other)
    backbone_calls["images"] = 0
    run(data, tmp_path / "b", other, cache)
    assert backbone_calls["images"] == 12  # other weights, other features


def test_corrupt_and_non_image_files_are_skipped_with_a_warning(tmp_path, tiny_weights, caplog):
    data = make_dataset(tmp_path / "data", per_class=10)
    good = (data / "Car" / "Car_0.jpg").read_bytes()
    (data / "Car" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (data / "Car" / "notes.txt").write_text("not an image")
    (data / "Bike" / "empty.png").write_bytes(b"")
    (data / "Bike" / "fake.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPgarbage")
    with caplog.at_level("WARNING"):
        metrics = run(data, tmp_path / "out", tiny_weights, tmp_path / "cache")
    assert metrics["summary"]["images_skipped"] == 4
    assert metrics["summary"]["images_found"] == 24
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(skipped) == 4
    assert any("truncated.jpg" in m and ("truncated" in m or "damaged" in m) for m in skipped)
    assert any("notes.txt" in m and "not an image" in m for m in skipped)


def test_unusual_but_valid_photos_are_used(tmp_path, tiny_weights):
    data = make_dataset(tmp_path / "data", per_class=8)
    rng = np.random.default_rng(0)
    car = Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    car.convert("CMYK").save(data / "Car" / "cmyk.jpg")
    car.convert("L").save(data / "Car" / "gray.png")
    car.convert("P").save(data / "Car" / "palette.png")
    car.save(data / "Car" / "really_a_png.jpg", format="PNG")  # extension lies
    Image.fromarray((rng.integers(0, 65535, (50, 50))).astype(np.uint16)).save(data / "Bike" / "16bit.png")
    rgba = car.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(data / "Bike" / "rgba.png")
    metrics = run(data, tmp_path / "out", tiny_weights, tmp_path / "cache")
    assert metrics["summary"]["images_skipped"] == 0
    assert metrics["summary"]["images_found"] == 22


def test_artifact_round_trips_to_identical_predictions(tiny_model_dir, synthetic_dataset):
    model = load_artifact(tiny_model_dir / config.ARTIFACT_FILE)
    again = load_artifact(tiny_model_dir / config.ARTIFACT_FILE)
    images = sorted(synthetic_dataset.rglob("*.*"))[:12]
    batch = torch.from_numpy(np.stack([load_crop(p, model.preprocessing) for p in images]))
    with torch.inference_mode():
        out1 = model.head(OnCrops(model.backbone, model.preprocessing)(batch))
        out2 = again.head(OnCrops(again.backbone, again.preprocessing)(batch))
    assert torch.equal(out1, out2)

    # Saved and reloaded: the same tensors, so the very same outputs.
    resaved = tiny_model_dir.parent / "resaved.safetensors"
    save_artifact(resaved, model.backbone, model.head, {k: v for k, v in model.metadata.items()})
    third = load_artifact(resaved)
    with torch.inference_mode():
        assert torch.equal(out1, third.head(OnCrops(third.backbone, third.preprocessing)(batch)))

    # The predictor (the exported model, bf16 where available) agrees with the training-time labels.
    predictor = Predictor.from_dir(tiny_model_dir)
    labels = [p.label for p in predictor.predict([predictor.load_image(p) for p in images])]
    assert labels == [p.parent.name for p in images]


def test_damaged_artifact_is_refused_with_a_clear_message(tiny_model_dir, tmp_path):
    blob = (tiny_model_dir / config.ARTIFACT_FILE).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ArtifactError, match="damaged|not a readable"):
        load_artifact(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"hello world, not safetensors")
    with pytest.raises(ArtifactError, match="not a readable"):
        load_artifact(garbage)
    with pytest.raises(ArtifactError, match="no model artifact"):
        load_artifact(tmp_path / "missing.safetensors")


def test_interrupted_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous model")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a new mo")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"previous model"
    assert list(tmp_path.iterdir()) == [target]  # no temporary left behind


def test_dataset_errors_are_one_line(tmp_path, tiny_weights):
    with pytest.raises(DataError, match="not found"):
        run(tmp_path / "missing", tmp_path / "out", tiny_weights, tmp_path / "c")
    (tmp_path / "one" / "Car").mkdir(parents=True)
    with pytest.raises(DataError, match="at least two class"):
        run(tmp_path / "one", tmp_path / "out", tiny_weights, tmp_path / "c")
    data = make_dataset(tmp_path / "d", per_class=1)
    with pytest.raises(DataError, match="at least two readable"):
        run(data, tmp_path / "out", tiny_weights, tmp_path / "c")
    assert not (tmp_path / "out" / config.ARTIFACT_FILE).exists()


def test_temperature_scaling_recovers_a_known_temperature():
    # Labels drawn from softmax(z), logits handed over as 2.5 z: an overconfident head, T = 2.5.
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 2, generator=generator) * 3
    labels = torch.multinomial(z.softmax(1), 1, generator=generator)[:, 0]
    assert calibration.fit_temperature(2.5 * z, labels) == pytest.approx(2.5, rel=0.08)
    # Held-out logits without a single error: the prior keeps T near 1 instead of driving it to 0.
    right = torch.stack([-5 * torch.ones(50), 5 * torch.ones(50)], 1)
    assert 0.3 < calibration.fit_temperature(right, torch.ones(50, dtype=torch.long)) < 1


def test_out_of_fold_logits_come_from_heads_that_never_saw_the_sample():
    # Labels at random on unstructured features: a head memorises the photos it trains on and can
    # only guess on the others.
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 256, generator=generator), torch.randint(0, 2, (100,), generator=generator)
    cfg = config.TrainConfig(seed=0, max_epochs=60, patience=60)
    seen = train_head(x, y, x[:0], y[:0], 2, cfg, progress=False).head  # the same recipe, on all
    with torch.no_grad():
        assert (seen(x).argmax(1) == y).float().mean() >= 0.95
    held_out = calibration.out_of_fold_logits(x, y, 2, 60, cfg)
    assert (held_out.argmax(1) == y).float().mean() <= 0.7
    assert torch.equal(held_out, calibration.out_of_fold_logits(x, y, 2, 60, cfg))  # seeded

    labels = [0] * 23 + [1] * 12
    folds = stratified_folds(labels, 5, seed=1)
    assert folds == stratified_folds(labels, 5, seed=1) != stratified_folds(labels, 5, seed=2)
    sizes = [folds.count(f) for f in range(5)]
    assert sorted(sizes) == [7] * 5
    for label, count in ((0, 23), (1, 12)):  # each fold holds its share of every class
        per_fold = [sum(1 for f, lab in zip(folds, labels) if f == k and lab == label) for k in range(5)]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count


def test_training_is_reproducible(tmp_path, tiny_weights):
    data = make_dataset(tmp_path / "data", per_class=10)
    run(data, tmp_path / "a", tiny_weights, tmp_path / "cache")
    run(data, tmp_path / "b", tiny_weights, tmp_path / "cache")
    a = load_artifact(tmp_path / "a" / config.ARTIFACT_FILE)
    b = load_artifact(tmp_path / "b" / config.ARTIFACT_FILE)
    assert a.metadata["model_version"] == b.metadata["model_version"]
    assert all(torch.equal(x, y) for x, y in zip(a.head.state_dict().values(), b.head.state_dict().values()))


def test_precision_falls_back_to_fp32_without_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("vehicle_classifier.runtime.cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr("vehicle_classifier.runtime.cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("int4", cpu)


def test_bf16_features_stay_close_to_fp32_on_real_photos():
    """The fast extraction path is faithful: ViT-S/16 (random weights) on real photos."""
    photos = sample_photos("Car")[:4] + sample_photos("Bike")[:4]
    torch.manual_seed(0)
    model = create_backbone(registry.BACKBONES["dino-vits16"].architecture)
    prep = preprocessing_for(model)
    batch = torch.from_numpy(np.stack([load_crop(p, prep) for p in photos]))
    model = OnCrops(model.eval(), prep)
    with torch.inference_mode():
        fp32 = model(batch)
        with autocast(torch.device("cpu"), "bf16"):
            bf16 = model(batch).float()
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16)
    assert cosine.min() > 0.999, cosine


def test_a_flipped_weight_is_detected(tiny_model_dir, tmp_path):
    """The header is intact, the tensors load, but one byte of a weight changed: refused."""
    blob = bytearray((tiny_model_dir / config.ARTIFACT_FILE).read_bytes())
    blob[-5] ^= 0x01  # the last bytes are tensor data
    damaged = tmp_path / "flipped.safetensors"
    damaged.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(damaged)


@pytest.mark.parametrize("where", config.CALIBRATIONS)
def test_calibrate_fits_the_temperature_where_the_setting_says(where):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator)
    y = (x[:, 0] + 0.8 * torch.randn(200, generator=generator) > 0).long()  # learnable, with errors
    part = {"train": (x[:120], y[:120]), "val": (x[120:160], y[120:160]), "test": (x[160:], y[160:])}
    cfg = config.TrainConfig(calibration=where, max_epochs=30, patience=30)
    trained = train_head(*part["train"], *part["val"], 2, cfg, progress=False)
    result = calibration.calibrate(trained.head, part, trained.best_epoch, cfg)
    fitted, report = ("val" if where == "val" else "out_of_fold"), result.report
    logits, labels = (trained.head.eval()(part["val"][0]).detach(), part["val"][1]) if where == "val" else (
        calibration.out_of_fold_logits(x[:160], y[:160], 2, trained.best_epoch, cfg), y[:160])
    assert result.temperature == report["temperature"] == pytest.approx(calibration.fit_temperature(logits, labels))
    assert report[fitted]["count"] == len(labels) and report["test"]["count"] == 40
    assert ("out_of_fold" in report) == (where == "out-of-fold")
    assert report[fitted]["nll_after"] <= report[fitted]["nll_before"]  # the fit lowers what it minimises
    assert result.diagram[:8] == b"\x89PNG\r\n\x1a\n"
