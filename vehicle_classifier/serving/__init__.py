"""Serving: the HTTP service around the model layer (vehicle_classifier.model), and nothing else.
api.py is a Flask app factory with one blueprint; the request's body, uploads and decoding are
body.py, uploads.py and decoding.py; errors, metrics and the documented schemas sit beside them.
The schemas turn the predictor's plain answers into the API's JSON, once. Never imports training/.

On the CPU nothing here imports torch: the predictor runs the exported model through OpenVINO."""
