"""The API's request and response models, declared once (pydantic), and the OpenAPI document
generated from them and from the routes by spectree: /openapi.json, and Swagger UI at /docs
(served from the package, offline: offapi).

spectree was chosen over flask-openapi3 and apispec/flask-smorest: it decorates plain Flask
views (the app factory and Flask's own routing stay as they are), takes pydantic models, and
documents without validating where a view parses the request itself (/predict accepts three
body shapes, which no single validator models). The one thing it cannot state, a raw image
body, is added to the generated document in `openapi_document`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel
from spectree import Response, SpecTree

from .. import __version__

DOCS_PATH = "docs"  # Swagger UI at /docs, its document at /docs/openapi.json (also /openapi.json)


class Error(BaseModel):
    error: str = Field(description="What went wrong, and what to change")


class Prediction(BaseModel):
    label: str = Field(description="The predicted class")
    confidence: float = Field(ge=0, le=1, description="Probability of the predicted class")
    probabilities: dict[str, float] = Field(description="Probability of every class (calibrated: temperature "
                                                        "scaling fitted on held-out photos, the validation split "
                                                        "or out of fold)")
    in_distribution: bool | None = Field(
        None, description="false: the photo lies farther from the training photos than the threshold in "
                          "/metadata's ood (neither a car nor a bike?); null when the check is off (OOD_CHECK=off) "
                          "or the model has none")
    ood_score: float | None = Field(
        None, description="Mean cosine distance of the photo's features to its nearest training photos' (higher: "
                          "less like them)")
    attention_png: str | None = Field(
        None, description="With ?attention=1: the backbone's last-block [CLS] attention over the centre crop, "
                          "as a base64 PNG (ViT backbones; others answer 400 and /metadata says attention_maps: "
                          "false)")


class SingleAnswer(Prediction):
    """One image, however it was sent."""

    model_config = ConfigDict(extra="forbid")
    model_version: str


class FilePrediction(Prediction):
    filename: str = Field(description="The part's filename, without control or bidi characters")


class BatchAnswer(BaseModel):
    """Several multipart 'file' parts: one prediction each, in order."""

    model_config = ConfigDict(extra="forbid")
    predictions: list[FilePrediction]
    model_version: str


class PredictAnswer(RootModel[SingleAnswer | BatchAnswer]):
    pass


# What the service decodes as base64: the standard alphabet, whitespace ignored, padded to whole
# groups of four (or a data: URL whose payload is that). Stated in the document so that a
# generated request such as {"image": "0"} or {"image": "    "} is not schema-valid yet rejected.
BASE64_PATTERN = (r"^(data:[^,]*,)?\s*(([A-Za-z0-9+/]\s*){4})*"  # whole groups, then a last one (padded or not):
                  r"(([A-Za-z0-9+/]\s*){4}|([A-Za-z0-9+/]\s*){2}==|([A-Za-z0-9+/]\s*){3}=)\s*$")  # never blank


class PredictJSON(BaseModel):
    image: str = Field(min_length=4, pattern=BASE64_PATTERN,
                       description="The image file's bytes in base64 (a data: URL works too)")
    filename: str | None = Field(None, description="Echoed in errors")


class PredictForm(BaseModel):
    file: list[bytes] = Field(min_length=1, description="One image per part (several parts: a batch)")


class PredictQuery(BaseModel):
    attention: Literal["1", "true", "yes", "on", "0", "false", "no", "off", ""] = Field(
        "0", description="1: add the attention overlay to each prediction")


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    model_version: str


class Index(BaseModel):
    service: str
    model_version: str
    endpoints: list[str]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    class_names: list[str]
    model_version: str
    serving: dict


def answer(names: list[str], predictions: list, model_version: str) -> dict:
    """The JSON of the predictor's answers (model.predictor.Prediction), built once: one image,
    however it was sent, the flat answer; several, one prediction each, named. The shapes are
    SingleAnswer and BatchAnswer (the document's; tests/ validate answers against them)."""
    if len(predictions) == 1:
        return predictions[0].as_dict() | {"model_version": model_version}
    named = [{"filename": name} | p.as_dict() for name, p in zip(names, predictions)]
    return {"predictions": named, "model_version": model_version}


def metadata(predictor, config, package_version: str) -> dict:
    """/metadata: what the model is (from its artifact) and how it is served."""
    meta = predictor.metadata
    return dict(
        class_names=meta["class_names"], backbone=meta["backbone"], model_version=meta["model_version"],
        created_at=meta.get("created_at"), metrics=meta.get("metrics", {}), training=meta.get("training", {}),
        preprocessing=meta["preprocessing"], head=meta.get("head"), package_version=package_version,
        calibration=meta.get("calibration"), ood=meta.get("ood"), attention_maps=predictor.attention_available,
        serving={"device": predictor.device, "precision": predictor.precision, "runtime": predictor.runtime,
                 "model": predictor.source, "openvino_mode": predictor.openvino_mode,
                 "max_upload_bytes": config.max_upload_bytes, "max_batch_files": config.max_batch_files,
                 "max_image_pixels": config.max_image_pixels, "max_request_pixels": config.max_request_pixels,
                 "ood_check": predictor.ood_threshold is not None},
    )


def endpoints(document: dict) -> list[str]:
    """The index's list of endpoints, from the document."""
    listed = [f"{method.upper()} {path}" for path, operations in document["paths"].items() for method in operations]
    return listed + ["GET /openapi.json", "GET /docs"]


def init_app(app, docs: SpecTree, max_files: int) -> dict:
    """Serve `docs` (Swagger UI) on `app` and return its OpenAPI document, built once. Then
    each view runs as written: spectree's wrapper validates nothing here (skip_validation) but
    rebuilds every response it returns (17 us a request), and the document, once built, is
    kept (SpecTree.spec), so it no longer needs the wrappers it read the routes from."""
    docs.register(app)
    with app.app_context():  # spectree reads the routes from the current app
        document = openapi_document(docs, max_files)
    for endpoint, view in app.view_functions.items():
        if docs.get_function_metadata(view) is not None:  # one that docs.validate wrapped
            app.view_functions[endpoint] = view.__wrapped__
    return document


def make_docs(description: str) -> SpecTree:
    from offapi import OpenAPITemplate

    return SpecTree("flask", mode="strict", annotations=False, path=DOCS_PATH, title="Car vs Bike classifier",
                    version=__version__, description=description,
                    page_templates={"swagger": OpenAPITemplate.SWAGGER.value})


def errors(*statuses: int, **more) -> Response:
    """A Response declaring the error statuses (Error bodies) and `more` (HTTP_200=Model, ...)."""
    return Response(**{f"HTTP_{status}": Error for status in statuses}, **more)


def openapi_document(docs: SpecTree, max_files: int) -> dict:
    """spectree's document, with what it cannot state: the raw image body of /predict, the
    batch limit, the Prometheus text of /metrics; and without the 422 it adds to every route
    for its own validation, which these views do not use. Built once; both document routes
    serve this same dict."""
    document = docs.spec
    for operations in document["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    document["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    body = document["paths"]["/predict"]["post"]["requestBody"]["content"]
    body["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    form = document["components"]["schemas"][body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]]
    form["properties"]["file"]["maxItems"] = max_files
    return document
