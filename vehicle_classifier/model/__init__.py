"""The model layer: an artifact read once, photos in, plain answers out (predictor.py), with the
forward it runs (the exported OpenVINO graph, or torch's in torch_forward.py) and the batcher that
lets concurrent callers share one forward. No HTTP here: serving/ converts these answers once."""
