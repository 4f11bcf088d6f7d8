"""Top-1 accuracy as an `evaluate` metric module, shipped with mae_hf so it loads by path without the Hub:
`evaluate.load(mae_hf.metrics.ACCURACY_PATH)`."""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the reference label.",
            citation="",
            inputs_description="predictions: list of int class ids; references: list of int class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
