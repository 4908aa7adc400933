"""Accuracy: the fraction of predictions equal to their reference class."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Classification accuracy = (number of predictions equal to the reference) / (number of samples)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids, one per sample.
    references (`list[int]`): reference class ids, one per sample.
Returns:
    accuracy (`float`): in [0, 1]; NaN when there are no samples.
Example:
    >>> acc = moe_adapt.metrics.load("accuracy")
    >>> acc.compute(predictions=[0, 1, 2, 3], references=[0, 1, 1, 3])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": float((predictions == references).mean())}
