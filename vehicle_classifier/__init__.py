"""Car vs Bike classifier: a frozen DINO ViT turns a photo into its [CLS] feature, a small MLP
head trained on those features makes the call.

Data flows one way: images -> features -> head -> artifact -> predictor -> API -> page.
"""

__version__ = "0.2.0"


class UserError(Exception):
    """An error whose message is fit to show a user as is, in one line: bad data, missing
    weights, a damaged artifact or upload. Entry points print it instead of a traceback."""
