"""Serving: a trained model folder in, answers out. The predictor (predictor.py) turns photos
into answers; the HTTP service around it is api.py (a Flask app factory and one blueprint) with
the request's body, images and decoding in body.py, uploads.py and decoding.py, its errors,
metrics and documented schemas beside them; batch.py answers folders of photos offline;
cluster.py runs the service behind nginx on one machine. Never imports training/.

On the CPU nothing here imports torch: the predictor runs the exported model (export.py)
through OpenVINO; torch_forward.py holds the paths that need torch."""
