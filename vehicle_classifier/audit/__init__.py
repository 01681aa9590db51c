"""The data audit: photos filed under the wrong class, the same photo twice (altered), and photos
unlike both classes, from the features training caches.

    python -m vehicle_classifier.audit --data-dir data/Car-Bike-Dataset --output-dir audit/

writes audit.json (label_issues, near_duplicates, outliers) and audit.png (the top suspects);
`train.py --exclude audit/audit.json` leaves the flagged photos out. Nothing heavy at import.
"""
