"""The prediction service, served by gunicorn (settings in gunicorn.conf.py):

    gunicorn predict:app                 (the port and the rest: gunicorn.conf.py)
    python predict.py --check            the model in MODEL_DIR loads (make reload, before SIGHUP)

MODEL_DIR (default models/) holds the artifact; see vehicle_classifier/serving/api.py for the
API. A missing or damaged artifact, or a bad setting, stops the process with one line on stderr.
"""

import sys

from vehicle_classifier import UserError, config
from vehicle_classifier.serving.api import EXTENSION, create_app

try:
    app = create_app()
except (UserError, ValueError) as exc:  # ArtifactError, a bad setting (ServiceConfig.from_env), ...
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)

if __name__ == "__main__" and sys.argv[1:] == ["--check"]:
    print(f"ok: model {app.extensions[EXTENSION].predictor.metadata['model_version']} loads")
elif __name__ == "__main__":  # development server; use gunicorn for anything else
    app.extensions[EXTENSION].predictor.warm_up()  # as gunicorn.conf.py does in each worker
    app.run(host="0.0.0.0", port=config.DEFAULT_PORT)
