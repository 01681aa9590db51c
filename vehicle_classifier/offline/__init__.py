"""Offline jobs that stand on the model layer: batch prediction over files and folders
(batch.py, also under torchrun)."""
