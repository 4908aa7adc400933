"""Errors and warnings about individual bad samples."""

from __future__ import annotations


class BadSampleError(ValueError):
    """A sample that cannot be used: missing or unreadable file, bad box, wrong mask size, bad label.

    Attributes:
        dataset: the spec name. split: the split. sample: how to find the sample (file name, image id,
        row index). problem: what is wrong with it.
    """

    def __init__(
        self,
        dataset: str,
        split: str | None = None,
        sample: str | None = None,
        problem: str | None = None,
        more: int = 0,
    ):
        self.dataset, self.split, self.sample, self.problem, self.more = dataset, split, sample, problem, more
        if split is None:
            # Only a message: how torch's DataLoader re-raises an error from a worker process.
            super().__init__(dataset)
            return
        extra = f" ({more} more sample(s) of this split have problems too)" if more else ""
        super().__init__(
            f"dataset {dataset!r}, split {split!r}, sample {sample}: {problem}{extra}. Fix or remove the "
            f"sample, or set `skip_bad: true` in the spec of {dataset!r} to skip bad samples."
        )

    def __reduce__(self):  # keep the fields when pickled (e.g. sent back from a worker process)
        return type(self), (self.dataset, self.split, self.sample, self.problem, self.more)


class BadSampleWarning(UserWarning):
    """Emitted once per split when `skip_bad=True` skipped samples; says how many and why."""
