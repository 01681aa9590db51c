"""Car vs Bike classifier: a frozen DINO ViT turns a photo into its [CLS] feature, a small MLP
head trained on those features makes the call.

Data flows one way: images -> features -> head -> artifact -> predictor -> API -> page.
"""

__version__ = "0.2.0"


class UserError(Exception):
    """An error whose message is fit to show a user as is, in one line: bad data, missing
    weights, a damaged artifact or upload. Entry points print it instead of a traceback.

    `setting`: the name of the setting the message is about (a TrainConfig field or a run's
    input, e.g. "weights", "output_dir"), worded neutrally in the message; an entry point may
    name the flag or variable that sets it (train.py leads the line with its flag)."""

    def __init__(self, message: str = "", *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting
