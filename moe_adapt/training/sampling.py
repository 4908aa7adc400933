"""Which tasks an optimisation step trains on: the task sampler.

A step is a list of micro-batches, one task each; the MI loss is computed once over all of them, so only the
tasks present in a step inform it (see `docs/pretraining.md`).

- `all_tasks`: every task in every step, `rounds` times (`[a, b, c]`, or `[a, b, c, a, b, c]` for 2 rounds).
  The MI statistics of each step cover every task: the estimate of I(T; E) is the one the loss wants.
- `proportional`: `micro_batches_per_step` tasks drawn independently with probability ∝ dataset size.
- `temperature`: probability ∝ size^(1/T) (T = 1 proportional, T → ∞ uniform).
- `round_robin`: tasks in turn, `micro_batches_per_step` per step, continuing across steps.

Sampling is a pure function of `(seed, step)`, so a resumed run draws exactly what the uninterrupted run drew.

```python
>>> s = TaskSampler(["a", "b", "c"], "round_robin", micro_batches_per_step=2)
>>> s.tasks_for_step(0), s.tasks_for_step(1)
(['a', 'b'], ['c', 'a'])
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SAMPLING_STRATEGIES = ("all_tasks", "proportional", "temperature", "round_robin")


def task_probabilities(sizes: Mapping[str, int], strategy: str, temperature: float = 1.0) -> dict[str, float]:
    """Probability of drawing each task: ∝ size (`proportional`), ∝ size^(1/temperature) (`temperature`), or
    uniform (`all_tasks`, `round_robin`: every task equally often)."""
    tasks = list(sizes)
    if strategy in ("all_tasks", "round_robin"):
        return {t: 1.0 / len(tasks) for t in tasks}
    if strategy not in ("proportional", "temperature"):
        raise ValueError(f"Unknown sampling strategy {strategy!r}; choose one of {SAMPLING_STRATEGIES}.")
    power = 1.0 if strategy == "proportional" else 1.0 / temperature
    weights = np.array([float(sizes[t]) for t in tasks]) ** power
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError(f"Task dataset sizes must be positive to sample by them; got {dict(sizes)}.")
    return dict(zip(tasks, (weights / weights.sum()).tolist()))


class TaskSampler:
    """Decides the tasks of each step. `tasks_for_step(step)` → list of task names (one per micro-batch).

    Args:
        tasks: task names, in model order.
        strategy: one of `SAMPLING_STRATEGIES`.
        sizes: training set size per task (needed by `proportional` and `temperature`).
        temperature: for `temperature`.
        micro_batches_per_step: micro-batches per step for the drawn strategies (default: number of tasks).
        rounds: for `all_tasks`, how many micro-batches of every task a step holds.
        seed: seeds the draws (with the step number).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        strategy: str = "all_tasks",
        sizes: Mapping[str, int] | None = None,
        temperature: float = 2.0,
        micro_batches_per_step: int | None = None,
        rounds: int = 1,
        seed: int = 0,
    ):
        if strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"Unknown sampling strategy {strategy!r}; choose one of {SAMPLING_STRATEGIES}.")
        self.tasks, self.strategy, self.seed = list(tasks), strategy, int(seed)
        if not self.tasks:
            raise ValueError("TaskSampler needs at least one task.")
        self.rounds = int(rounds)
        self.micro_batches_per_step = int(micro_batches_per_step or len(self.tasks))
        if strategy in ("proportional", "temperature"):
            if sizes is None or set(sizes) != set(self.tasks):
                raise ValueError(f"Sampling strategy {strategy!r} needs the dataset size of every task {self.tasks}.")
            sizes = {t: sizes[t] for t in self.tasks}
        self.probabilities = task_probabilities(sizes or dict.fromkeys(self.tasks, 1), strategy, temperature)

    def tasks_for_step(self, step: int) -> list[str]:
        if self.strategy == "all_tasks":
            return self.tasks * self.rounds
        m = self.micro_batches_per_step
        if self.strategy == "round_robin":
            return [self.tasks[(step * m + j) % len(self.tasks)] for j in range(m)]
        rng = np.random.default_rng([self.seed, int(step)])
        p = np.array([self.probabilities[t] for t in self.tasks])
        return [self.tasks[i] for i in rng.choice(len(self.tasks), size=m, p=p)]

    def micro_batches_in_step(self) -> int:
        return len(self.tasks) * self.rounds if self.strategy == "all_tasks" else self.micro_batches_per_step

    def __repr__(self) -> str:
        probs = {t: round(p, 3) for t, p in self.probabilities.items()}
        return f"TaskSampler(strategy={self.strategy!r}, micro_batches={self.micro_batches_in_step()}, p={probs})"


__all__ = ["SAMPLING_STRATEGIES", "TaskSampler", "task_probabilities"]
