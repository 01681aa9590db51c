"""The HTTP API: a Flask app factory around one Predictor.

    app = create_app()            # ServiceConfig.from_env(): MODEL_DIR, MAX_UPLOAD_MB, ...
    gunicorn --bind=0.0.0.0:9696 predict:app

Every answer is JSON (Prometheus text for /metrics); its shapes are the models in schemas.py,
documented at /openapi.json and /docs. The concerns live in their own modules: reading and
decoding uploads (uploads.py), error answers (errors.py), metrics (monitoring.py), the API's
models and document (schemas.py). Importing this module loads no model and no torch:
`create_app` does the heavy work, once.
"""

from __future__ import annotations

import base64
import time

from flask import Flask, Response, g, jsonify, redirect

from .. import __version__
from ..config import ServiceConfig
from . import schemas
from .errors import register_error_handlers
from .monitoring import Metrics
from .uploads import (HOW_TO_SEND, BadRequest, PixelBudget, decode_uploads, flag, max_form_parts, read_uploads, receive_body,
                      release_memory)

EXTENSION = "vehicle_classifier"  # app.extensions key holding the predictor, settings and metrics
# A request that decoded more pixels than this hands the freed memory back to the system
# (uploads.release_memory; ~1 ms, so not after every small photo).
RELEASE_AFTER_PIXELS = 8_000_000


def create_app(config: ServiceConfig | None = None, predictor=None) -> Flask:
    """The service around `predictor`, or around the artifact in `config.model_dir`, loaded
    once here (raises artifact.ArtifactError with a one-line reason when it is missing or
    damaged). The model is compiled and warmed up on first use, or before it by
    `predictor.warm_up()` (gunicorn.conf.py does, in each worker, before it takes requests)."""
    config = config or ServiceConfig.from_env()
    if predictor is None:
        from .predictor import Predictor  # torch is imported here, not at module import

        # warm_up=False: under gunicorn this runs in the master, which must start no threads and
        # no CUDA before it forks; each worker warms up (and on CUDA places) its own copy.
        predictor = Predictor.from_dir(config.model_dir, precision=config.precision, device=config.device,
                                       runtime=config.runtime, openvino_mode=config.openvino_mode, warm_up=False,
                                       ood_check=config.ood_check)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    app.config["MAX_FORM_PARTS"] = max_form_parts(config.max_batch_files)
    metrics = Metrics()
    app.extensions[EXTENSION] = {"predictor": predictor, "config": config, "metrics": metrics}
    metrics.track(app)
    register_error_handlers(app, config.max_upload_bytes)
    docs = schemas.make_docs("A frozen DINO ViT backbone and a small MLP head. " + HOW_TO_SEND + ".")
    _add_predict(app, docs, predictor, config, metrics)
    _add_info_endpoints(app, docs, predictor, config, metrics)
    endpoints: list[str] = []  # the index's list, taken from the document once it is built

    @app.get("/")
    @docs.validate(resp=schemas.errors(HTTP_200=schemas.Index), skip_validation=True)
    def index():
        """The service, its model version and its endpoints"""
        return jsonify(service="vehicle-classifier", model_version=predictor.metadata["model_version"],
                       endpoints=endpoints)

    docs.register(app)
    with app.app_context():  # spectree reads the routes from the current app
        document = schemas.openapi_document(docs, config.max_batch_files)
    endpoints += [f"{method.upper()} {path}" for path, operations in document["paths"].items() for method in operations]
    endpoints += ["GET /openapi.json", "GET /docs"]

    @app.get("/openapi.json")
    def openapi():
        return jsonify(document)

    @app.get("/docs")
    def docs_page():
        return redirect(f"/{schemas.DOCS_PATH}/swagger/")

    return app


def _add_predict(app: Flask, docs, predictor, config: ServiceConfig, metrics: Metrics) -> None:
    budget = PixelBudget(config.max_worker_decode_pixels)
    model_version = predictor.metadata["model_version"]

    @app.post("/predict")
    @docs.validate(query=schemas.PredictQuery, json=schemas.PredictJSON, form=schemas.PredictForm,
                   resp=schemas.errors(400, 408, 413, 415, 500, HTTP_200=schemas.PredictAnswer), skip_validation=True)
    def predict():
        """Classify one image, or a batch (several multipart 'file' parts)

        400: no image, a damaged or unsupported one, over the pixel limit, malformed JSON or
        base64, too many files; 408: the upload did not arrive in time; 413: over the upload
        size, the parts limit or the request's decoded-pixel budget; 415: another content type.
        """
        receive_body(config.max_upload_bytes, config.upload_timeout)
        attention = flag("attention")
        if attention and not predictor.attention_available:
            raise BadRequest(f"attention maps are not available for this backbone "
                             f"({predictor.metadata['backbone'].get('architecture')}); ask without attention=1")
        uploads = read_uploads(config.max_batch_files)
        timings = [("read", time.perf_counter())]
        decoded, pixels = decode_uploads(uploads, predictor, config, budget, keep_crops=attention)
        timings.append(("decode", time.perf_counter()))
        predictions = predictor.predict_tensors([item.tensor for item in decoded], attention=attention)
        timings.append(("model", time.perf_counter()))
        from .predictor import attention_overlay_png  # loaded with the predictor: costs nothing here

        answers = []
        for item, prediction in zip(decoded, predictions):
            metrics.images.labels(prediction.label).inc()
            answer = prediction.to_json()
            if attention:
                answer["attention_png"] = base64.b64encode(attention_overlay_png(item.crop, prediction.attention)).decode()
            answers.append({"filename": item.name, **answer})
        if len(answers) == 1:  # one image, however it was sent: the flat answer
            del answers[0]["filename"]
            response = jsonify(**answers[0], model_version=model_version)
        else:
            response = jsonify(predictions=answers, model_version=model_version)
        timings.append(("attention" if attention else "answer", time.perf_counter()))
        response.headers["Server-Timing"] = _server_timing(timings)
        if pixels > RELEASE_AFTER_PIXELS:
            release_memory()
        return response


def _server_timing(timings: list[tuple[str, float]]) -> str:
    """Where the time went (request parsing, decoding, the model, the rest), for browsers' dev
    tools and the benchmark: the standard Server-Timing header, in ms."""
    steps = [("read", timings[0][1] - g.started)]
    steps += [(name, end - start) for (_, start), (name, end) in zip(timings, timings[1:])]
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in steps)


def _add_info_endpoints(app: Flask, docs, predictor, config: ServiceConfig, metrics: Metrics) -> None:
    metadata = predictor.metadata
    model_version = metadata["model_version"]

    @app.get("/health")
    @docs.validate(resp=schemas.errors(HTTP_200=schemas.Health), skip_validation=True)
    def health():
        """Liveness: the process answers"""
        return jsonify(status="ok")

    @app.get("/ready")
    @docs.validate(resp=schemas.errors(HTTP_200=schemas.Ready), skip_validation=True)
    def ready():
        """Readiness: the model is loaded (under gunicorn, also compiled and warmed up)"""
        # The app only exists once its model is loaded; a gunicorn worker takes requests only
        # after post_worker_init has warmed it up.
        return jsonify(ready=True, model_version=model_version)

    @app.get("/metadata")
    @docs.validate(resp=schemas.errors(HTTP_200=schemas.Metadata), skip_validation=True)
    def get_metadata():
        """Classes, backbone, training metrics, model version and serving settings"""
        return jsonify(
            class_names=metadata["class_names"], backbone=metadata["backbone"], model_version=model_version,
            created_at=metadata.get("created_at"), metrics=metadata.get("metrics", {}),
            training=metadata.get("training", {}), preprocessing=metadata["preprocessing"],
            head=metadata.get("head"), package_version=__version__,
            calibration=metadata.get("calibration"), ood=metadata.get("ood"),
            attention_maps=predictor.attention_available,
            serving={"device": str(predictor.device), "precision": predictor.precision, "runtime": predictor.runtime,
                     "openvino_mode": predictor.openvino_mode, "max_upload_bytes": config.max_upload_bytes,
                     "max_batch_files": config.max_batch_files, "max_image_pixels": config.max_image_pixels,
                     "max_request_pixels": config.max_request_pixels,
                     "ood_check": predictor.ood_threshold is not None},
        )

    @app.get("/metrics")
    @docs.validate(resp=schemas.errors(HTTP_200=None), skip_validation=True)
    def get_metrics():
        """Prometheus metrics (text format)"""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST.split(";")[0])
