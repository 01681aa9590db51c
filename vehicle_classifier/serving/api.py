"""The HTTP API: a Flask app factory, and a blueprint of endpoints around one Predictor.

    app = create_app()            # ServiceConfig.from_env(): MODEL_DIR, MAX_UPLOAD_MB, ...
    gunicorn predict:app

A request reads top-down: the body (body.py: whole, within a deadline) -> its images (uploads.py)
-> decoded within the pixel budgets into centre crops (decoding.py) -> the predictor's answers
(predictor.py) -> one answer schema (schemas.py) -> JSON. Every answer is JSON (Prometheus text
for /metrics), documented at /openapi.json and /docs; errors are errors.py's, metrics
monitoring.py's. The views read the service's parts from the app (`service()`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, g, jsonify, redirect

from .. import __version__
from ..config import ServiceConfig
from . import errors, schemas
from .body import receive_body
from .decoding import PixelBudget, decode_uploads, release_memory
from .monitoring import Metrics
from ..model.predictor import Predictor
from .uploads import HOW_TO_SEND, flag, max_form_parts, read_uploads

EXTENSION = "vehicle_classifier"  # app.extensions key holding the Service
# A request that decoded more pixels than this hands the freed memory back to the system
# (decoding.release_memory; ~1 ms, so not after every small photo).
RELEASE_AFTER_PIXELS = 8_000_000


@dataclass
class Service:
    """What the views need, one per app."""

    predictor: Predictor
    config: ServiceConfig
    metrics: Metrics
    budget: PixelBudget  # decoded pixels the worker holds at once, over all its request threads
    document: dict | None = None  # the OpenAPI document, built once the routes exist


def service() -> Service:
    return current_app.extensions[EXTENSION]


def create_app(config: ServiceConfig | None = None, predictor: Predictor | None = None) -> Flask:
    """The service around `predictor`, or around the model in `config.model_dir`, read once here
    (raises artifact.ArtifactError with a one-line reason when it is missing or damaged). The
    model is compiled and warmed up on first use, or before it by `predictor.warm_up()`
    (gunicorn.conf.py does, in each worker, before it takes requests)."""
    config = config or ServiceConfig.from_env()
    # warm_up=False: under gunicorn this runs in the master, which must start no threads and
    # no CUDA before it forks; each worker warms up (and on CUDA places) its own copy.
    predictor = predictor or Predictor.from_dir(
        config.model_dir, precision=config.precision, device=config.device, runtime=config.runtime,
        openvino_mode=config.openvino_mode, ood_check=config.ood_check, warm_up=False)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=config.max_upload_bytes, MAX_FORM_PARTS=max_form_parts(config.max_batch_files))
    svc = Service(predictor, config, Metrics(), PixelBudget(config.max_worker_decode_pixels))
    app.extensions[EXTENSION] = svc
    errors.init_app(app, config.max_upload_bytes)
    svc.metrics.init_app(app)
    docs = schemas.make_docs("A frozen DINO ViT backbone and a small MLP head. " + HOW_TO_SEND + ".")
    app.register_blueprint(blueprint(docs))
    svc.document = schemas.init_app(app, docs, config.max_batch_files)
    return app


def predict():
    """Classify one image, or a batch (several multipart 'file' parts)

    400: no image, a damaged or unsupported one, over the pixel limit, malformed JSON or
    base64, too many files; 408: the upload did not arrive in time; 413: over the upload
    size, the parts limit or the request's decoded-pixel budget; 415: another content type.
    """
    return _predict(service())


def index():
    """The service, its model version and its endpoints"""
    return jsonify(service="vehicle-classifier", model_version=service().predictor.metadata["model_version"],
                   endpoints=schemas.endpoints(service().document))


def health():
    """Liveness: the process answers"""
    return jsonify(status="ok")


def ready():
    """Readiness: the model is loaded (under gunicorn, also compiled and warmed up)"""
    # The app only exists once its model is loaded; a gunicorn worker takes requests only
    # after post_worker_init has warmed it up.
    return jsonify(ready=True, model_version=service().predictor.metadata["model_version"])


def metadata():
    """Classes, backbone, training metrics, model version and serving settings"""
    return jsonify(schemas.metadata(service().predictor, service().config, __version__))


def metrics():
    """Prometheus metrics (text format)"""
    exposition, mimetype = service().metrics.exposition()
    return Response(exposition, mimetype=mimetype)


def openapi():
    return jsonify(service().document)


def docs_page():
    return redirect(f"/{schemas.DOCS_PATH}/swagger/")


# (method, rule, view, what the document says of it: request models and answers by status).
ROUTES = [
    ("POST", "/predict", predict, dict(query=schemas.PredictQuery, json=schemas.PredictJSON, form=schemas.PredictForm,
                                       resp=schemas.errors(400, 408, 413, 415, 500, HTTP_200=schemas.PredictAnswer))),
    ("GET", "/", index, dict(resp=schemas.errors(HTTP_200=schemas.Index))),
    ("GET", "/health", health, dict(resp=schemas.errors(HTTP_200=schemas.Health))),
    ("GET", "/ready", ready, dict(resp=schemas.errors(HTTP_200=schemas.Ready))),
    ("GET", "/metadata", metadata, dict(resp=schemas.errors(HTTP_200=schemas.Metadata))),
    ("GET", "/metrics", metrics, dict(resp=schemas.errors(HTTP_200=None))),
    ("GET", "/openapi.json", openapi, None),  # the document itself and its page are not in it
    ("GET", "/docs", docs_page, None),
]


def blueprint(docs) -> Blueprint:
    """The endpoints, documented by `docs`: spectree documents the views its own instance
    decorated, so each app gets its blueprint and document. The views parse requests themselves
    (/predict takes three body shapes), so the document does not validate them."""
    api = Blueprint("api", __name__)
    for method, rule, view, documented in ROUTES:
        if documented is not None:
            view = docs.validate(**documented, skip_validation=True)(view)
        api.add_url_rule(rule, view_func=view, methods=[method])
    return api


def _predict(svc: Service):
    """POST /predict, top-down: body, images, crops, answers, JSON."""
    settings, predictor = svc.config, svc.predictor
    body = receive_body(settings.max_upload_bytes, settings.upload_timeout)
    attention = flag("attention")
    predictor.check_attention(attention)  # before any decoding: a CNN asked for attention costs nothing
    uploads = read_uploads(body, settings.max_batch_files)
    del body  # the uploads hold what is needed of it
    timings = [("read", time.perf_counter())]
    crops, pixels = decode_uploads(uploads, settings, svc.budget, predictor.model.preprocessing, predictor.draft_size)
    timings.append(("decode", time.perf_counter()))
    predictions = predictor.predict_crops(crops, attention=attention)
    timings.append(("model", time.perf_counter()))
    for prediction in predictions:
        svc.metrics.images.labels(prediction.label).inc()
    answer = schemas.answer([upload.name for upload in uploads], predictions, predictor.metadata["model_version"])
    response = jsonify(answer)
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
