"""The training half: from an image folder to a published model, as train.py runs it.

    job.py          Job: what a run reads (image folder, weights, cache), where it writes, how
    run.py          run_training(job), top to bottom: scan -> features -> split -> head ->
                    calibrate -> "neither" -> publish, holding the output folder's lock
    fetch.py        the public data set, downloaded on a fresh clone's first run
    fingerprint.py  whether the output folder already holds this very run's result (no torch)
    exclude.py      leaving out what the data audit (vehicle_classifier.audit) flagged
    features.py     the backbone's [CLS] features, batched and cached by file content
    head_training.py  the head's loop: AdamW, early stopping, best epoch kept
    calibration.py  the temperature (fitted on validation or out-of-fold logits) and its figures
    neither.py      the "neither a car nor a bike" threshold and what it accepts and flags
    metrics.py      classification and calibration metrics, and the plots
    outputs.py      the artifact, the exported backbone, metrics.json, split.json and plots,
                    published as one set

It stands on the shared core (config, registry, data, images, backbone, extraction, devices, export,
head, artifact, runtime, ood, fileio, distributed) and never imports the serving half
(vehicle_classifier.serving).
"""
