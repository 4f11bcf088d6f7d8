"""Labels checked before any decoding or training: class indices in range, the same class names in both splits, no
evaluation class the training split lacks (where that matters), "unlabelled" (-1 / None) only for pretraining."""

import sys

import numpy as np

from ..cli import print_once
from .sources import source_rows


def shorten(value, limit: int = 60) -> str:
    """repr of a value for an error message, cut to `limit` characters (a label column may hold image bytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_labels(dataset, column: str, split: str, class_names: list[str] | None = None,
                    allowed: set[int] | None = None, allow_unlabelled: bool = False) -> np.ndarray:
    """One split's labels as int64 (-1 for a missing one), checked: integer class indices in [0, len(class_names)) (or
    >= 0 without class names) and, with `allowed` (the training split's labels, for the evaluation split), one of
    those. A missing label (None) or -1 means "unlabelled": an error for a classifier, accepted with
    `allow_unlabelled` (pretraining). Errors name the split, the row of the first bad label and how many there are."""
    import pyarrow as pa

    array = dataset.select_columns(column).with_format("arrow")[:].column(column).combine_chunks()
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_null(array.type)):
        bad = np.flatnonzero(array.is_valid().to_numpy(zero_copy_only=False))
        if len(bad):
            raise ValueError(
                f"Split {split!r}: the label column {column!r} holds {array.type} values, not integer class indices "
                f"(row {source_rows(dataset, bad[:1])[0]}: {shorten(array[int(bad[0])].as_py())}). Pass "
                "--label_column_name with the integer label column, or store the labels as a ClassLabel column.")
    values = np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float64)  # None -> NaN
    missing = np.isnan(values)
    fractional = ~missing & (values != np.round(values))
    upper = len(class_names) if class_names else np.inf
    lowest = -1 if allow_unlabelled else 0  # -1 is "unlabelled" where that is allowed
    out_of_range = ~missing & ~fractional & ((values < lowest) | (values >= upper))
    range_text = f"[0, {upper}) (the {upper} class names of the label column)" if class_names else \
        "[0, number of classes)"
    checks = [(fractional, "are not integers", "labels are integer class indices")]
    if not allow_unlabelled:
        checks.append((missing, "are missing (None)",
                       "every image needs a label here; drop or fix those rows, or use a labelled split"))
    minus_one = bool(out_of_range.any()) and values[out_of_range][0] == -1  # the first bad label says which hint
    checks.append((out_of_range, f"lie outside {range_text}",
                   "-1 means 'unlabelled' (e.g. STL-10's unlabelled images), which only pretraining accepts; use a "
                   "labelled split" if minus_one else "fix those rows, or the class names of the label column"))
    if allowed is not None:
        unseen = ~missing & (values != -1) & ~out_of_range & ~fractional & ~np.isin(values, sorted(allowed))
        checks.append((unseen, "are classes that the training split does not have",
                       "the classifier could never predict them; use splits with the same classes"))
    for wrong, what, how in checks:
        bad = np.flatnonzero(wrong)
        if len(bad):
            first = int(bad[0])
            raise ValueError(
                f"Split {split!r}, label column {column!r}: {len(bad)} of {len(values)} labels {what}; the first "
                f"is row {source_rows(dataset, [first])[0]} ({shorten(array[first].as_py())}). "
                f"{how[0].upper()}{how[1:]}.")
    return np.where(missing, -1, values).astype(np.int64)


def class_names_of(dataset, column: str) -> list[str] | None:
    import datasets

    feature = dataset.features[column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def check_same_class_names(splits) -> None:
    """Refuse splits ((name, dataset, label column) each) whose class names differ: a label is an index into them,
    so the same label would mean different classes (image folders never differ: `list_image_folders`)."""
    named = [(name, class_names_of(dataset, column)) for name, dataset, column in splits if column]
    named = [entry for entry in named if entry[1] is not None]
    for (name, names), (other_name, other_names) in zip(named, named[1:]):
        if names != other_names:
            raise ValueError(f"The class names of split {name!r} ({names}) and split {other_name!r} ({other_names}) "
                             "differ: the same label would mean different classes. Use splits with the same "
                             "ClassLabel names.")


def check_labels(train, evaluation, column: str | None, names, allow_unlabelled: bool):
    """Validate both splits' labels (`validate_labels`) and that their class names agree. Returns (class names,
    (training labels, evaluation labels)), each column read once. A classifier refuses evaluation classes the training
    split lacks; for pretraining (`allow_unlabelled`: labels only feed its kNN monitor) they are said and become -1.
    `evaluation` None: an evaluation split without labels (pretraining only; its labels: None)."""
    if column is None:
        return None, (None, None)
    class_names = class_names_of(train, column)
    if evaluation is not None:
        check_same_class_names([(names[0], train, column), (names[1], evaluation, column)])
        class_names = class_names or class_names_of(evaluation, column)
    train_labels = validate_labels(train, column, names[0], class_names, allow_unlabelled=allow_unlabelled)
    if evaluation is None:
        return class_names, (train_labels, None)
    seen = set(train_labels.tolist()) - {-1}
    if not allow_unlabelled:
        return class_names, (train_labels, validate_labels(evaluation, column, names[1], class_names,
                                                           allowed=seen or None))
    evaluation_labels = validate_labels(evaluation, column, names[1], class_names, allow_unlabelled=True)
    unseen = set(evaluation_labels.tolist()) - {-1} - seen if seen else set()
    if unseen:
        named = [class_names[label] if class_names else label for label in sorted(unseen)[:10]]
        print_once(f"warning: the evaluation split ({names[1]}) has {len(unseen)} class(es) that the training split "
                   f"({names[0]}) lacks: {named}{' ...' if len(unseen) > 10 else ''}. Pretraining does not use labels; "
                   "the kNN monitor leaves those images out (it could never predict them).", file=sys.stderr)
        evaluation_labels = np.where(np.isin(evaluation_labels, sorted(unseen)), -1, evaluation_labels)
    return class_names, (train_labels, evaluation_labels)
