"""Metric modules for `evaluate`, loaded by path (`evaluate.load("accuracy")` would need the Hub)."""

import os

ACCURACY_PATH = os.path.join(os.path.dirname(__file__), "accuracy", "accuracy.py")


def accuracy(predictions, references) -> float:
    import evaluate  # slow to import (~9 s); only scripts that report accuracy pay for it

    return evaluate.load(ACCURACY_PATH).compute(predictions=predictions, references=references)["accuracy"]
