"""HTTP client of the prediction service, shared by the web page and the command-line client.

requests only: the page's environment has no torch, so nothing on this module's import path may
pull it in. Every failure becomes one `ServiceError` whose message is fit to show a user as is.
"""

from __future__ import annotations

import mimetypes
import os

import requests

from . import UserError
from .config import DEFAULT_PORT

DEFAULT_URL = f"http://localhost:{DEFAULT_PORT}"
CONNECT_TIMEOUT = 3.0  # seconds to open a connection: a live service on the network answers far sooner
INFO_TIMEOUT = 10.0  # /ready and /metadata are cheap
PREDICT_TIMEOUT = 60.0  # a batch with attention maps on a busy CPU; long enough, but a hung service still ends


class ServiceError(UserError):
    """The service could not be reached or answered an error. `status` is the HTTP status, or
    None when no answer came back (refused, timed out, not HTTP)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def unavailable(self) -> bool:
        """No service to talk to (as opposed to an answer about one photo): other requests would
        fail the same way, so callers stop instead of repeating the error."""
        return self.status is None or self.status in (502, 503, 504)


def service_url() -> str:
    """The service URL the page and the command-line client use by default."""
    return os.environ.get("PREDICT_URL") or DEFAULT_URL


def service_timeout() -> float:
    """Seconds to wait for a prediction: $PREDICT_TIMEOUT, for slow machines and impatient tests."""
    value = os.environ.get("PREDICT_TIMEOUT") or PREDICT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise ServiceError(f"PREDICT_TIMEOUT must be a positive number of seconds, not {value!r}")
    return seconds


class PredictionClient:
    def __init__(self, url: str | None = None, timeout: float | None = None):
        url = (url or service_url()).strip().rstrip("/")
        # "localhost:9696" is what people type; requests needs the scheme.
        self.url = url if "://" in url else f"http://{url}"
        self.timeout = timeout or service_timeout()
        self.info_timeout = min(INFO_TIMEOUT, self.timeout)
        self.session = requests.Session()

    # --- endpoints ----------------------------------------------------------------------------
    def ready(self) -> dict:
        """`{"ready": bool, ...}`; a 503 (still loading, or no model) is an answer, not an error."""
        return self._request("GET", "/ready", self.info_timeout, ok_statuses=(200, 503))

    def metadata(self) -> dict:
        return self._request("GET", "/metadata", self.info_timeout)

    def predict(self, image: bytes, filename: str = "image", attention: bool = False) -> dict:
        """One image: `{"label", "confidence", "probabilities", "model_version"[, "attention_png"]}`."""
        answer = self._request("POST", "/predict", self.timeout, params=_attention(attention),
                               files=[_part(filename, image)])
        return _checked(answer, attention)

    def predict_many(self, images: list[tuple[str, bytes]], attention: bool = False) -> list[dict]:
        """Several `(filename, bytes)` in one request; one prediction per image, in order."""
        if not images:
            return []
        answer = self._request("POST", "/predict", self.timeout, params=_attention(attention),
                               files=[_part(name, data) for name, data in images])
        # A single file comes back as one prediction, not as a batch.
        predictions = answer.get("predictions", [{"filename": images[0][0], **answer}])
        if not isinstance(predictions, list) or len(predictions) != len(images):
            raise ServiceError(f"the service answered {len(predictions) if isinstance(predictions, list) else 0} "
                               f"predictions for {len(images)} images")
        return [_checked(p, attention) for p in predictions]

    # --- plumbing -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, read_timeout: float, ok_statuses=(200,), **kwargs) -> dict:
        where = f"the prediction service at {self.url}"
        try:
            response = self.session.request(method, self.url + path, timeout=(CONNECT_TIMEOUT, read_timeout),
                                            **kwargs)
        except requests.exceptions.ConnectTimeout:
            raise ServiceError(f"cannot reach {where}: no connection within {CONNECT_TIMEOUT:g} s") from None
        except requests.exceptions.Timeout:
            raise ServiceError(f"{where} did not answer within {read_timeout:g} s; it may be overloaded") from None
        except requests.exceptions.ConnectionError as exc:
            raise ServiceError(f"cannot reach {where}: {_connection_reason(exc)}; is it running?") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise ServiceError(f"{self.url!r} is not a usable service URL ({exc})") from None
        except requests.exceptions.RequestException as exc:
            raise ServiceError(f"request to {where} failed: {_first_line(exc)}") from None

        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code in ok_statuses and isinstance(body, dict):
            return body
        if not isinstance(body, dict):
            status = response.status_code
            # Answers from the HTTP layer (a proxy, the server's own size limit) rather than the app.
            if status == 413:
                raise ServiceError("rejected by the service: the upload is too large (HTTP 413)", status)
            if status in (502, 503, 504):
                raise ServiceError(f"{where} is unavailable (HTTP {status} {response.reason})", status)
            kind = response.headers.get("Content-Type", "no content type").split(";")[0]
            raise ServiceError(f"{self.url} answered HTTP {response.status_code} with {kind}, not the "
                               f"prediction service's JSON; is the URL right?", response.status_code)
        message = body.get("error") or response.reason or "no reason given"
        if 400 <= response.status_code < 500:
            raise ServiceError(f"rejected by the service: {message}", response.status_code)
        raise ServiceError(f"the service failed (HTTP {response.status_code}): {message}", response.status_code)


def _attention(on: bool) -> dict:
    return {"attention": "1"} if on else {}


def _checked(prediction, attention: bool) -> dict:
    """A prediction as the page and the CLI use it; anything else is the service's fault, said so."""
    keys = ("label", "confidence", "probabilities") + (("attention_png",) if attention else ())
    if not isinstance(prediction, dict) or any(key not in prediction for key in keys):
        raise ServiceError(f"the service answered without {', '.join(keys)}; is it the prediction service?")
    return prediction


def _part(filename: str, data: bytes) -> tuple:
    return ("file", (filename, data, mimetypes.guess_type(filename)[0] or "application/octet-stream"))


def _connection_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text or "resolve" in text:
        return "host name not found"
    if "reset" in text or "aborted" in text or "remotedisconnected" in text:
        return "the connection was dropped"
    return "connection failed"


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
