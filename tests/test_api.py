"""The HTTP API through Flask's test client, on the tiny trained model: every endpoint, every
kind of bad input (each answered with a 4xx JSON error, after which the service still works),
and a corpus of valid but unusual images (each predicted)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from urllib3 import encode_multipart_formdata

from conftest import lying_header_jpeg, synthetic_image
from vehicle_classifier.serving.api import create_app
from vehicle_classifier.config import ServiceConfig

pytestmark = pytest.mark.integration

MAX_UPLOAD = 2 * 1024 * 1024
MAX_FILES = 4
MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    app = create_app(ServiceConfig(model_dir=tiny_model_dir, max_upload_bytes=MAX_UPLOAD,
                                   max_batch_files=MAX_FILES, max_image_pixels=MAX_PIXELS))
    app.testing = True
    return app


@pytest.fixture()
def client(app):
    return app.test_client()


# --- the corpus -----------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def car(size=(96, 72), seed=0) -> Image.Image:
    return synthetic_image("Car", np.random.default_rng(seed), size)


def bike(size=(96, 72), seed=0) -> Image.Image:
    return synthetic_image("Bike", np.random.default_rng(seed), size)


def good_jpeg() -> bytes:
    return encode(car(), "JPEG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming 10 gigapixels, with a tiny compressed body: decoding it
    would need tens of GB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1_000_000, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """Stored landscape with EXIF orientation 6 (display rotated 90° clockwise); returns the
    file and the upright image a viewer would show."""
    stored = car((120, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", exif=exif, quality=95), stored.transpose(Image.Transpose.ROTATE_270)


def animated_gif() -> bytes:
    frames = [car((80, 60)), bike((80, 60))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def rgba_png() -> bytes:
    rgba = car().convert("RGBA")
    alpha = np.full((72, 96), 255, dtype=np.uint8)
    alpha[:, :30] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return encode(rgba, "PNG")


VALID = {
    "rgb jpeg": lambda: good_jpeg(),
    "progressive jpeg": lambda: encode(car(), "JPEG", progressive=True),
    "grayscale jpeg": lambda: encode(car().convert("L"), "JPEG"),
    "cmyk jpeg": lambda: encode(car().convert("CMYK"), "JPEG"),
    "16-bit png": sixteen_bit_png,
    "palette png": lambda: encode(car().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "palette png with transparency": lambda: encode(car().convert("P"), "PNG", transparency=0),
    "rgba png": rgba_png,
    "grayscale+alpha png": lambda: encode(car().convert("LA"), "PNG"),
    "1-bit png": lambda: encode(car().convert("1"), "PNG"),
    "webp": lambda: encode(car(), "WEBP"),
    "lossless rgba webp": lambda: encode(car().convert("RGBA"), "WEBP", lossless=True),
    "animated gif": animated_gif,
    "tiff": lambda: encode(car(), "TIFF"),
    "float tiff": lambda: encode(Image.fromarray(np.random.default_rng(0).random((40, 50), dtype=np.float32)), "TIFF"),
    "bmp": lambda: encode(car(), "BMP"),
    "exif-rotated jpeg": lambda: exif_rotated_jpeg()[0],
    "1x1 png": lambda: encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
    "10000x3 png": lambda: encode(car((10000, 3)), "PNG"),
    "3x10000 png": lambda: encode(car((3, 10000)), "PNG"),
    "large 4000x3000 jpeg": lambda: encode(car().resize((4000, 3000), Image.Resampling.BILINEAR), "JPEG", quality=70),
}


def truncated_jpeg() -> bytes:
    data = encode(car((400, 300)), "JPEG")
    return data[: len(data) // 2]


def damaged_png() -> bytes:
    data = bytearray(encode(car(), "PNG"))
    data[60:80] = b"\xff" * 20  # inside IDAT: its CRC no longer matches
    return bytes(data)


def zip_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.jpg", good_jpeg())
    return buffer.getvalue()


# (name, bytes, content type of the raw body, expected status, words in the error)
BAD_IMAGES = [
    ("truncated jpeg", truncated_jpeg, "image/jpeg", 400, "damaged or truncated"),
    ("damaged png", damaged_png, "image/png", 400, "damaged or truncated"),
    ("jpeg header claiming 6000x6000", lambda: lying_header_jpeg(6000, 6000), "image/jpeg", 400, "damaged or truncated"),
    ("random bytes", lambda: np.random.default_rng(1).bytes(5000), "image/jpeg", 400, "not an image"),
    ("text sent as png", lambda: b"this is not a picture\n" * 20, "image/png", 400, "not an image"),
    ("zip archive", zip_file, "image/jpeg", 400, "not an image"),
    ("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml", 400,
     "not an image"),
    ("png bomb", png_bomb, "image/png", 400, "over the limit"),
    ("only a jpeg header", lambda: good_jpeg()[:20], "image/jpeg", 400, "not an image"),
]


def predict_raw(client, data: bytes, content_type: str = "image/jpeg", query: str = ""):
    return client.post(f"/predict{query}", data=data, content_type=content_type)


def predict_files(client, files: list[tuple[bytes, str]], query: str = "", field: str = "file"):
    data = {field: [(io.BytesIO(content), name) for content, name in files]}
    return client.post(f"/predict{query}", data=data, content_type="multipart/form-data")


def assert_prediction(answer: dict, class_names=("Bike", "Car")) -> None:
    assert answer["label"] in class_names
    assert set(answer["probabilities"]) == set(class_names)
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["confidence"] == max(answer["probabilities"].values())
    assert answer["probabilities"][answer["label"]] == answer["confidence"]


def assert_still_serving(client) -> None:
    response = predict_raw(client, good_jpeg())
    assert response.status_code == 200, response.get_json()
    assert_prediction(response.get_json())


# --- good requests --------------------------------------------------------------------------
def test_predict_multipart_single(client, app):
    response = predict_files(client, [(good_jpeg(), "car.jpg")])
    assert response.status_code == 200
    answer = response.get_json()
    assert_prediction(answer)
    assert answer["model_version"] == app.extensions["vehicle_classifier"].predictor.metadata["model_version"]
    assert "attention_png" not in answer
    timing = dict(item.split(";dur=") for item in response.headers["Server-Timing"].split(", "))
    assert list(timing) == ["read", "decode", "model", "answer"] and all(float(v) >= 0 for v in timing.values())


def test_three_request_shapes_give_the_same_answer(client):
    jpeg = good_jpeg()
    multipart = predict_files(client, [(jpeg, "car.jpg")]).get_json()
    raw = predict_raw(client, jpeg).get_json()
    as_json = client.post("/predict", json={"image": base64.b64encode(jpeg).decode()}).get_json()
    data_url = client.post("/predict", json={"image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()})
    assert multipart == raw == as_json == data_url.get_json()


def test_synthetic_classes_are_told_apart(client):
    # The tiny model is trained on these synthetic classes: its answers must follow them.
    for label, make in (("Car", car), ("Bike", bike)):
        for seed in range(3):
            answer = predict_raw(client, encode(make(seed=100 + seed), "PNG"), "image/png").get_json()
            assert answer["label"] == label


def test_batch_answers_each_file_in_order(client):
    files = [(encode(car(seed=1), "JPEG"), "a.jpg"), (encode(bike(seed=2), "PNG"), "b.png"),
             (encode(car(seed=3), "WEBP"), "c.webp")]
    response = predict_files(client, files)
    assert response.status_code == 200
    answer = response.get_json()
    assert [p["filename"] for p in answer["predictions"]] == ["a.jpg", "b.png", "c.webp"]
    assert answer["model_version"]
    for (content, _), batched in zip(files, answer["predictions"]):
        single = predict_files(client, [(content, "x")]).get_json()
        assert_prediction(batched)
        assert batched["label"] == single["label"]
        for name, p in single["probabilities"].items():
            assert batched["probabilities"][name] == pytest.approx(p, abs=2e-3)  # batched bf16 kernels differ slightly


@pytest.mark.parametrize("query", ["?attention=1", "?attention=true"])
def test_attention_overlay(client, query):
    answer = predict_raw(client, good_jpeg(), query=query).get_json()
    assert_prediction(answer)
    # Asking for the overlay does not change the answer (the map comes from a second forward).
    assert answer["probabilities"] == predict_raw(client, good_jpeg()).get_json()["probabilities"]
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["attention_png"])))
    assert overlay.format == "PNG" and overlay.size == (32, 32)  # the tiny model's input crop
    assert np.asarray(overlay).std() > 0  # a heat map, not a blank square


def test_attention_in_a_batch(client):
    answer = predict_files(client, [(good_jpeg(), "a.jpg"), (encode(bike(), "PNG"), "b.png")], "?attention=1").get_json()
    assert all("attention_png" in p for p in answer["predictions"])


@pytest.mark.parametrize("kind", sorted(VALID))
def test_unusual_valid_images_are_predicted(client, kind):
    response = predict_files(client, [(VALID[kind](), f"upload-{kind}")])
    assert response.status_code == 200, response.get_json()
    assert_prediction(response.get_json())


def test_exif_orientation_is_applied(client):
    data, upright = exif_rotated_jpeg()
    rotated_answer = predict_raw(client, data).get_json()
    upright_answer = predict_raw(client, encode(upright, "PNG"), "image/png").get_json()
    sideways_answer = predict_raw(client, encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG"), "image/png").get_json()
    # JPEG loss makes the pixels differ a little from the PNG; the rotation would change much more.
    assert rotated_answer["probabilities"]["Car"] == pytest.approx(upright_answer["probabilities"]["Car"], abs=0.02)
    assert rotated_answer["probabilities"] != sideways_answer["probabilities"]


def test_gif_first_frame_is_used(client):
    gif = animated_gif()
    first = Image.open(io.BytesIO(gif)).convert("RGB")
    assert predict_raw(client, gif, "image/gif").get_json()["probabilities"] == \
        predict_raw(client, encode(first, "PNG"), "image/png").get_json()["probabilities"]


# --- bad input ------------------------------------------------------------------------------
def assert_error(response, status: int, words: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.is_json
    body = response.get_json()
    assert list(body) == ["error"]
    assert words.lower() in body["error"].lower(), body["error"]


@pytest.mark.parametrize("name,make,content_type,status,words", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_as_raw_body(client, name, make, content_type, status, words):
    assert_error(predict_raw(client, make(), content_type), status, words)
    assert_still_serving(client)


@pytest.mark.parametrize("name,make,content_type,status,words", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_as_upload(client, name, make, content_type, status, words):
    assert_error(predict_files(client, [(make(), "photo.jpg")]), status, words)
    assert_still_serving(client)


def test_bad_file_in_a_batch_is_named(client):
    response = predict_files(client, [(good_jpeg(), "fine.jpg"), (truncated_jpeg(), "broken.jpg")])
    assert_error(response, 400, "broken.jpg: damaged or truncated")
    assert_still_serving(client)


def test_pixel_limit_is_checked_before_decoding(client):
    # 8000 x 6000 = 48 MP is over this app's 40 MP limit; a tiny GIF header is enough to say so.
    gif_header = b"GIF89a" + struct.pack("<HH", 8000, 6000) + b"\x00\x00\x00" + b"\x2c" + b"\x00" * 9 + b"\x02\x02\x44\x01\x00\x3b"
    assert_error(predict_raw(client, gif_header, "image/gif"), 400, "over the limit of 40,000,000 pixels")
    assert_still_serving(client)


def test_upload_over_the_size_limit_is_413(client):
    big = np.random.default_rng(0).bytes(MAX_UPLOAD + 1000)
    assert_error(predict_files(client, [(big, "big.jpg")]), 413, "larger than the limit of 2 MB")
    assert_error(predict_raw(client, big), 413, "larger than the limit")
    payload = json.dumps({"image": base64.b64encode(big).decode()})
    assert_error(client.post("/predict", data=payload, content_type="application/json"), 413, "larger than the limit")
    assert_still_serving(client)


def form(**fields) -> dict:
    """A multipart body as curl, browsers and requests encode it. (The test client's own encoder
    leaves out the empty line before an empty part's delimiter, which RFC 2046 allows and
    python-multipart does not read as a part.)"""
    body, content_type = encode_multipart_formdata(fields)
    return {"data": body, "content_type": content_type}


@pytest.mark.parametrize("kwargs,status,words", [
    ({}, 400, "no image in the request"),
    ({"data": b"", "content_type": "image/jpeg"}, 400, "body is empty"),
    ({"data": b"x=1", "content_type": "application/x-www-form-urlencoded"}, 415, "unsupported content type"),
    ({"data": good_jpeg(), "content_type": "text/plain"}, 415, "unsupported content type"),
    ({"data": good_jpeg(), "content_type": "application/octet-stream"}, 415, "unsupported content type"),
    ({"data": b"{not json", "content_type": "application/json"}, 400, "malformed JSON"),
    ({"data": b"", "content_type": "application/json"}, 400, "malformed JSON"),
    ({"json": ["a", "list"]}, 400, "must be an object with an \"image\" field"),
    ({"json": {"picture": "abc"}}, 400, "must be an object with an \"image\" field"),
    ({"json": {"image": 12345}}, 400, "must be a base64 string"),
    ({"json": {"image": "not base64 at all!!"}}, 400, "not valid base64"),
    ({"json": {"image": "QUJDRA"}}, 400, "not valid base64"),
    ({"json": {"image": ""}}, 400, "is empty"),
    ({"json": {"image": base64.b64encode(b"plain text, no image").decode()}}, 400, "not an image"),
    ({"data": {"image": (io.BytesIO(b"abc"), "a.jpg")}, "content_type": "multipart/form-data"}, 400,
     "no multipart field 'file' (got field: image)"),
    ({"data": {"name": "value"}, "content_type": "multipart/form-data"}, 400, "no multipart field 'file'"),
    (form(file=("empty.jpg", b"")), 400, "empty.jpg: the uploaded file is empty"),
    (form(file=("", b"")), 400, "no file was uploaded"),
], ids=["no body", "empty image body", "form urlencoded", "text/plain", "octet-stream", "malformed json",
        "empty json", "json list", "json without image", "json image not a string", "base64 garbage",
        "base64 bad padding", "base64 empty", "base64 of text", "wrong field", "no file field", "empty file",
        "no file chosen"])
def test_malformed_requests(client, kwargs, status, words):
    assert_error(client.post("/predict", **kwargs), status, words)
    assert_still_serving(client)


def test_too_many_files(client):
    files = [(good_jpeg(), f"{i}.jpg") for i in range(MAX_FILES + 1)]
    assert_error(predict_files(client, files), 400, f"{MAX_FILES + 1} files in one request; the limit is {MAX_FILES}")
    assert predict_files(client, files[:MAX_FILES]).status_code == 200


def test_bad_attention_flag(client):
    assert_error(predict_raw(client, good_jpeg(), query="?attention=maybe"), 400, "must be one of 1, true")


@pytest.mark.parametrize("method,path,status,words", [
    ("get", "/predict", 405, "GET is not allowed on /predict"),
    ("put", "/predict", 405, "PUT is not allowed"),
    ("post", "/health", 405, "POST is not allowed"),
    ("get", "/nowhere", 404, "no such endpoint: /nowhere"),
])
def test_wrong_method_or_path(client, method, path, status, words):
    assert_error(getattr(client, method)(path), status, words)


def test_a_bug_is_a_logged_json_500_and_the_service_goes_on(tiny_model_dir, caplog):
    # A genuine bug inside the predictor (simulated by breaking its forward, once it has
    # answered: warmed up) must not leak a traceback to the client, and must not take the app down.
    app = create_app(ServiceConfig(model_dir=tiny_model_dir))
    predictor = app.extensions["vehicle_classifier"].predictor
    client = app.test_client()
    assert predict_raw(client, good_jpeg()).status_code == 200
    original = predictor.forward
    predictor.forward = lambda pixels, attention: 1 / 0
    try:
        assert_error(predict_raw(client, good_jpeg()), 500, "internal error")
        assert "ZeroDivisionError" in caplog.text
        # The same bug again: one line, no second traceback (a repeated request cannot flood the log).
        assert_error(predict_raw(client, good_jpeg()), 500, "internal error")
        assert caplog.text.count("Traceback") == 1 and "seen 2 times" in caplog.text
    finally:
        predictor.forward = original
    assert_still_serving(client)


# --- the other endpoints ----------------------------------------------------------------------
def test_health_and_ready(client, app):
    assert client.get("/health").get_json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    version = app.extensions["vehicle_classifier"].predictor.metadata["model_version"]
    assert ready.get_json() == {"ready": True, "model_version": version}


def test_metadata(client, tiny_model_dir):
    meta = client.get("/metadata").get_json()
    metrics = json.loads((tiny_model_dir / "metrics.json").read_text())
    assert meta["class_names"] == ["Bike", "Car"]
    assert meta["backbone"]["name"] == "test-tiny"
    assert meta["backbone"]["architecture"] == "vit_small_patch16_224.dino"
    assert len(meta["model_version"]) == 12 and meta["created_at"]
    assert meta["metrics"]["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert "roc_auc" in meta["metrics"]["test"]
    assert meta["training"]["backbone"] == "test-tiny"
    assert meta["serving"]["max_batch_files"] == MAX_FILES
    assert meta["serving"]["precision"] in ("int8", "bf16", "fp32") and meta["serving"]["device"] == "cpu"


def test_metrics_count_requests_by_status(tiny_model_dir):
    app = create_app(ServiceConfig(model_dir=tiny_model_dir))
    client = app.test_client()
    for _ in range(3):
        predict_raw(client, good_jpeg())
    predict_raw(client, b"junk")
    client.get("/nowhere")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert 'http_requests_total{endpoint="/predict",method="POST",status="200"} 3.0' in text
    assert 'http_requests_total{endpoint="/predict",method="POST",status="400"} 1.0' in text
    assert 'http_requests_total{endpoint="unmatched",method="GET",status="404"} 1.0' in text
    assert 'http_request_duration_seconds_count{endpoint="/predict"} 4.0' in text
    assert 'http_request_duration_seconds_bucket{endpoint="/predict",le="+Inf"} 4.0' in text
    assert 'predicted_images_total{label="Car"}' in text


def test_openapi_documents_every_endpoint(client, app):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert client.get("/docs/openapi.json").get_json() == spec
    docs = client.get("/docs", follow_redirects=True)
    assert docs.status_code == 200 and b"swagger" in docs.data.lower()
    api_routes = {rule.rule for rule in app.url_map.iter_rules()
                  if rule.endpoint != "static" and not rule.rule.startswith(("/docs", "/openapi.json"))}
    assert api_routes == set(spec["paths"])
    for rule in app.url_map.iter_rules():
        if rule.rule in spec["paths"]:
            assert set(spec["paths"][rule.rule]) == {m.lower() for m in rule.methods - {"HEAD", "OPTIONS"}}
    predict = spec["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/json"}
    assert set(predict["responses"]) == {"200", "400", "408", "413", "415", "500"}
    assert all(set(op["responses"]) == {"200"} for path, ops in spec["paths"].items() if path != "/predict"
               for op in ops.values())
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert spec["components"]["schemas"][form]["properties"]["file"]["maxItems"] == MAX_FILES


def test_one_answer_matches_one_branch_of_the_documented_200(client):
    import jsonschema

    spec = client.get("/openapi.json").get_json()
    answer_ref = spec["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    branches = spec["components"]["schemas"][answer_ref["$ref"].rsplit("/", 1)[-1]]["anyOf"]
    single = predict_raw(client, good_jpeg()).get_json()
    batch = predict_files(client, [(good_jpeg(), "a.jpg"), (good_jpeg(), "b.jpg")]).get_json()
    for answer in (single, batch):
        # Each branch checked with the document's components beside it, where its $refs point.
        matches = [jsonschema.Draft202012Validator({**branch, "components": spec["components"]}).is_valid(answer)
                   for branch in branches]
        assert matches.count(True) == 1, answer


def test_index_points_to_the_endpoints(client):
    assert "POST /predict" in client.get("/").get_json()["endpoints"]


def test_importing_the_api_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, vehicle_classifier.serving.api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def raw_part(headers: str, data: bytes, boundary: str = "b0undary") -> bytes:
    return f"--{boundary}\r\n{headers}\r\n\r\n".encode("latin-1") + data + f"\r\n--{boundary}--\r\n".encode()


FILE_HEADER = 'Content-Disposition: form-data; name="file"; filename="a.jpg"'


@pytest.mark.parametrize("content_type, body, words", [
    ("multipart/form-data", raw_part(FILE_HEADER, b"x"), "without a boundary"),
    ("multipart/form-data; boundary=b0undary", b"no delimiter anywhere", "malformed multipart body"),
    ("multipart/form-data; boundary=b0undary", raw_part("\r\n".join(f"X-{i}: v" for i in range(9)) + "\r\n"
                                                         + FILE_HEADER, b"x"), "header count"),
    ("multipart/form-data; boundary=b0undary", raw_part(FILE_HEADER.replace(":", ""), b"x"), "malformed multipart"),
    ("multipart/form-data; boundary=b0undary", raw_part("Content-Type: image/jpeg", b"x"), "no multipart field 'file';"),
    ("multipart/form-data; boundary=b0undary", raw_part(FILE_HEADER, b"x")[:-14], "no multipart field 'file'"),
], ids=["no boundary", "no delimiter", "too many part headers", "header without a colon", "no disposition",
        "never closed"])
def test_malformed_multipart_bodies_get_a_400_and_log_nothing(client, caplog, content_type, body, words):
    with caplog.at_level("INFO"):
        response = client.post("/predict", data=body, content_type=content_type)
    assert_error(response, 400, words)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
