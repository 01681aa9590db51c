#!/usr/bin/env bash
# The main job: train a model if MODEL_DIR has none, then serve it with gunicorn on :9696.
#   DATA_DIR  image folder to train on        (default data/Car-Bike-Dataset)
#   WEIGHTS   backbone weights file, optional (default: Hugging Face cache, then a download)
#   MODEL_DIR where the model is/goes         (default models)
set -euo pipefail
cd "$(dirname "$0")/.."
export MODEL_DIR=${MODEL_DIR:-models}

if [[ ! -f "$MODEL_DIR/model.safetensors" ]]; then
    echo "no model in $MODEL_DIR/: training one first"
    .venv/bin/python train.py --data-dir "${DATA_DIR:-data/Car-Bike-Dataset}" --output-dir "$MODEL_DIR" \
        ${WEIGHTS:+--weights "$WEIGHTS"}
fi
echo "serving $MODEL_DIR/model.safetensors on http://localhost:9696 (Ctrl-C stops)"
exec .venv/bin/gunicorn --bind=0.0.0.0:9696 predict:app
