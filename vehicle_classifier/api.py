"""The HTTP API: a Flask app factory around one Predictor.

    app = create_app()            # ServiceConfig.from_env(): MODEL_DIR, MAX_UPLOAD_MB, ...
    gunicorn --bind=0.0.0.0:9696 predict:app

Every answer is JSON (Prometheus text for /metrics). Bad input of any kind is a 4xx with
`{"error": "<message>"}`; a 500 means a bug in this code, and is logged with its traceback.
Importing this module loads no model and no torch: `create_app` does the heavy work, once.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import socket
import threading
import time

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import UserError, __version__
from .config import ServiceConfig

log = logging.getLogger(__name__)

EXTENSION = "vehicle_classifier"  # app.extensions key holding the predictor and metrics
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
HOW_TO_SEND = ("send the image as multipart field 'file' (curl -F file=@photo.jpg), as a raw body "
               "with an image/* content type, or as JSON {\"image\": \"<base64>\"}")


class BadRequest(UserError):
    """A request the client must fix; `status` is the 4xx to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --- metrics --------------------------------------------------------------------------------
class Metrics:
    """Prometheus counters of this app. Under gunicorn, gunicorn.conf.py sets
    PROMETHEUS_MULTIPROC_DIR, the values live in files shared by all workers and /metrics
    sums them; otherwise they live in this app's own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("predicted_images", "Images classified, by predicted label",
                              ["label"], registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


# --- reading the upload ---------------------------------------------------------------------
def _receive_body(max_bytes: int, timeout: float) -> None:
    """Under gunicorn, read the whole body now, within `timeout` seconds: when the deadline
    passes, the socket's read side is shut, which ends a blocked read at once, whether the client
    trickles a byte at a time or sends nothing more. The rest of the request reads from memory.
    (Flask's test client has no socket and nothing slow to guard against.)"""
    sock = request.environ.get("gunicorn.socket")
    length = request.content_length
    if sock is None or (length is None and not request.headers.get("Transfer-Encoding")):
        return
    if length is not None and length > max_bytes:
        raise RequestEntityTooLarge()
    expired = threading.Event()

    def cut_off():
        expired.set()
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    timer = threading.Timer(timeout, cut_off)
    timer.daemon = True
    timer.start()
    try:
        body = request.environ["wsgi.input"].read(length if length is not None else max_bytes + 1)
    except (OSError, ValueError):  # the connection broke, or a malformed chunked body
        body = b""
    finally:
        timer.cancel()
    if expired.is_set():
        raise BadRequest(f"the upload did not arrive within {timeout:g} s", status=408)
    if len(body) > max_bytes:
        raise RequestEntityTooLarge()
    if length is not None and len(body) < length:
        raise BadRequest(f"the upload ended after {len(body)} of its {length} bytes")
    request.environ["wsgi.input"] = io.BytesIO(body)


def _uploads(max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every image in the request, in the three accepted shapes."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        files = request.files.getlist("file")
        if not files:
            others = sorted(request.files) or sorted(request.form)
            got = f" (got field{'s' if len(others) > 1 else ''}: {', '.join(others)})" if others else ""
            raise BadRequest(f"no multipart field 'file'{got}; " + HOW_TO_SEND)
        if len(files) > max_files:
            raise BadRequest(f"{len(files)} files in one request; the limit is {max_files}")
        uploads = []
        for i, storage in enumerate(files):
            name = storage.filename or f"file {i + 1}"
            data = storage.read()
            if not data:
                raise BadRequest(f"{name}: the uploaded file is empty" if storage.filename
                                 else "no file was uploaded in field 'file'")
            uploads.append((name, data))
        return uploads
    if mimetype == "application/json":
        body = request.get_json(silent=True)
        if body is None:
            raise BadRequest("malformed JSON body; expected {\"image\": \"<base64>\"}")
        if not isinstance(body, dict) or "image" not in body:
            raise BadRequest("JSON body must be an object with an \"image\" field holding base64 image bytes")
        return [(str(body.get("filename") or "image"), _decode_base64(body["image"]))]
    if mimetype.startswith("image/"):
        data = request.get_data(cache=False)
        if not data:
            raise BadRequest("the request body is empty; " + HOW_TO_SEND)
        return [("image", data)]
    if not mimetype and not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise BadRequest("no image in the request; " + HOW_TO_SEND)
    raise BadRequest(f"unsupported content type {mimetype or '(none)'!r}; " + HOW_TO_SEND, status=415)


def _decode_base64(value) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("\"image\" must be a base64 string")
    if value.startswith("data:") and "," in value:  # a data URL pasted from a browser
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("\"image\" is not valid base64") from None
    if not data:
        raise BadRequest("\"image\" is empty")
    return data


def _flag(name: str) -> bool:
    value = request.args.get(name, "").strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise BadRequest(f"query parameter {name!r} must be 1 or 0, not {value!r}")


# --- the app --------------------------------------------------------------------------------
def create_app(config: ServiceConfig | None = None, predictor=None) -> Flask:
    """The service around `predictor`, or around the artifact in `config.model_dir`, loaded
    once here (raises artifact.ArtifactError with a one-line reason when it is missing or
    damaged)."""
    config = config or ServiceConfig.from_env()
    if predictor is None:
        from .inference import Predictor  # torch is imported here, not at module import

        predictor = Predictor.from_dir(config.model_dir, precision=config.precision, runtime=config.runtime,
                                       openvino_mode=config.openvino_mode, warm_up=not config.prefork,
                                       max_image_pixels=config.max_image_pixels, ood_check=config.ood_check)
    from .inference import attention_overlay_png
    from .images import ImageError

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    app.config["MAX_FORM_PARTS"] = max(config.max_batch_files * 2, 16)
    metrics = Metrics()
    app.extensions[EXTENSION] = {"predictor": predictor, "config": config, "metrics": metrics}
    metadata = predictor.metadata
    model_version = metadata["model_version"]
    preprocessing = metadata["preprocessing"]

    # --- bookkeeping ----------------------------------------------------------------------
    @app.before_request
    def _start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def _count(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    # --- errors ---------------------------------------------------------------------------
    def error(message: str, status: int):
        return jsonify(error=message), status

    @app.errorhandler(BadRequest)
    def _bad_request(exc: BadRequest):
        return error(str(exc), exc.status)

    @app.errorhandler(ImageError)
    def _bad_image(exc: ImageError):
        return error(str(exc), 400)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc):
        return error(f"upload is larger than the limit of {_megabytes(config.max_upload_bytes)}", 413)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        messages = {404: f"no such endpoint: {request.path}; see /openapi.json",
                    405: f"{request.method} is not allowed on {request.path}"}
        return error(messages.get(exc.code, exc.description or exc.name), exc.code or 500)

    @app.errorhandler(Exception)
    def _bug(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error("internal error: the service failed on this request; it has been logged", 500)

    # --- endpoints ------------------------------------------------------------------------
    @app.get("/")
    def index():
        return jsonify(service="vehicle-classifier", model_version=model_version,
                       endpoints=["POST /predict", "GET /health", "GET /ready", "GET /metadata",
                                  "GET /metrics", "GET /openapi.json"])

    @app.post("/predict")
    def predict():
        _receive_body(config.max_upload_bytes, config.upload_timeout)
        attention = _flag("attention")
        if attention and not predictor.attention_available:
            raise BadRequest(f"attention maps are not available for this backbone "
                             f"({metadata['backbone'].get('architecture')}); ask without attention=1")
        uploads = _uploads(config.max_batch_files)
        timings = [("read", time.perf_counter())]
        images = []
        for name, data in uploads:
            try:
                images.append(predictor.load_image(data))
            except ImageError as exc:
                raise ImageError(f"{name}: {exc}" if len(uploads) > 1 else str(exc)) from None
        timings.append(("decode", time.perf_counter()))
        predictions = predictor.predict(images, attention=attention)
        timings.append(("model", time.perf_counter()))
        answers = []
        for (name, _), image, prediction in zip(uploads, images, predictions):
            metrics.images.labels(prediction.label).inc()
            answer = prediction.to_json()
            if attention:
                png = attention_overlay_png(image, prediction.attention, preprocessing)
                answer["attention_png"] = base64.b64encode(png).decode("ascii")
            answers.append((name, answer))
        if len(answers) == 1:  # one image, however it was sent: the flat answer
            response = jsonify(**answers[0][1], model_version=model_version)
        else:
            response = jsonify(predictions=[{"filename": name, **answer} for name, answer in answers],
                               model_version=model_version)
        timings.append(("attention" if attention else "answer", time.perf_counter()))
        # Where the time went (request parsing, decoding, the model, the rest), for browsers'
        # dev tools and the benchmark: the standard Server-Timing header, in ms.
        steps = [("read", timings[0][1] - g.started)]
        steps += [(name, end - start) for (_, start), (name, end) in zip(timings, timings[1:])]
        response.headers["Server-Timing"] = ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in steps)
        return response

    @app.get("/health")
    def health():
        return jsonify(status="ok")

    @app.get("/ready")
    def ready():
        # The app only exists once its model is loaded and has run a forward pass.
        return jsonify(ready=True, model_version=model_version)

    @app.get("/metadata")
    def get_metadata():
        return jsonify(
            class_names=metadata["class_names"],
            backbone=metadata["backbone"],
            model_version=model_version,
            created_at=metadata.get("created_at"),
            metrics=metadata.get("metrics", {}),
            training=metadata.get("training", {}),
            preprocessing=preprocessing,
            head=metadata.get("head"),
            calibration=metadata.get("calibration"),
            ood=metadata.get("ood"),
            attention_maps=predictor.attention_available,
            package_version=__version__,
            serving={"precision": predictor.precision, "runtime": predictor.runtime,
                     "openvino_mode": predictor.fast_backbone.mode if predictor.fast_backbone else None,
                     "max_upload_bytes": config.max_upload_bytes,
                     "max_batch_files": config.max_batch_files,
                     "max_image_pixels": config.max_image_pixels,
                     "ood_check": predictor.ood_threshold is not None},
        )

    @app.get("/metrics")
    def get_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST.split(";")[0])

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_spec(config, metadata["class_names"]))

    return app


def _megabytes(n: int) -> str:
    return f"{n / 1024 / 1024:g} MB"


# --- OpenAPI --------------------------------------------------------------------------------
def openapi_spec(config: ServiceConfig, class_names: list[str]) -> dict:
    error = {"$ref": "#/components/schemas/Error"}
    errors = {
        "400": {"description": "Bad input: no image, damaged or unsupported image, over the pixel limit, "
                               "malformed JSON or base64, too many files",
                "content": {"application/json": {"schema": error}}},
        "413": {"description": f"Upload over {_megabytes(config.max_upload_bytes)}",
                "content": {"application/json": {"schema": error}}},
        "415": {"description": "Unsupported content type", "content": {"application/json": {"schema": error}}},
    }
    probabilities = {"type": "object", "properties": {c: {"type": "number"} for c in class_names}}
    prediction = {
        "type": "object",
        "required": ["label", "confidence", "probabilities"],
        "properties": {
            "label": {"type": "string", "enum": class_names},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "probabilities": probabilities,
            "in_distribution": {"type": "boolean", "nullable": True,
                                "description": "false: the photo lies farther from the training photos than the "
                                               "threshold in /metadata's ood (neither a car nor a bike?); null "
                                               "when the check is off (OOD_CHECK=off) or the model has none"},
            "ood_score": {"type": "number", "nullable": True,
                          "description": "mean cosine distance of the photo's features to the nearest "
                                         "training photos' (higher: less like them)"},
            "attention_png": {"type": "string", "format": "byte",
                              "description": "with ?attention=1: the backbone's last-layer [CLS] attention "
                                             "over the centre crop, as a base64 PNG (ViT backbones; others "
                                             "answer 400, and /metadata says attention_maps: false)"},
        },
    }

    def json_ok(description, schema):
        return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "Car vs Bike classifier", "version": __version__,
                 "description": "A frozen DINO ViT backbone and a small MLP head. " + HOW_TO_SEND + "."},
        "paths": {
            "/predict": {"post": {
                "summary": "Classify one image, or a batch (several multipart 'file' parts)",
                "parameters": [{"name": "attention", "in": "query", "schema": {"type": "integer", "enum": [0, 1]},
                                "description": "1: add the attention overlay to each prediction"}],
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
                        "type": "array", "maxItems": config.max_batch_files,
                        "items": {"type": "string", "format": "binary"}}}}},
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {"type": "object", "required": ["image"],
                                                    "properties": {"image": {"type": "string", "format": "byte"}}}},
                }},
                "responses": {
                    **json_ok("One image: a prediction; several files: {predictions: [...]}", {"oneOf": [
                        {"allOf": [prediction, {"type": "object", "properties": {"model_version": {"type": "string"}}}]},
                        {"type": "object", "properties": {
                            "predictions": {"type": "array", "items": {"allOf": [prediction, {
                                "type": "object", "properties": {"filename": {"type": "string"}}}]}},
                            "model_version": {"type": "string"}}},
                    ]}),
                    **errors,
                },
            }},
            "/health": {"get": {"summary": "Liveness", "responses": json_ok("Alive", {
                "type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}})}},
            "/ready": {"get": {"summary": "Model loaded and warmed up", "responses": {
                **json_ok("Ready", {"type": "object", "properties": {"ready": {"type": "boolean"},
                                                                     "model_version": {"type": "string"}}}),
                "503": {"description": "Not ready"}}}},
            "/metadata": {"get": {"summary": "Classes, backbone, training metrics, model version",
                                  "responses": json_ok("Model metadata", {"type": "object"})}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": json_ok("OpenAPI 3 document", {"type": "object"})}},
        },
        "components": {"schemas": {"Error": {"type": "object", "required": ["error"],
                                             "properties": {"error": {"type": "string"}}}}},
    }
