"""Paper A's published numbers, to print beside this build's.

Table 1 of paper A lists, for the CIFAR-100 and CelebA tasks with significant transfer, Δ generalization = MTL − STL
in accuracy points (the test accuracy of every task trained together minus that of the task trained alone).
"""
from __future__ import annotations

# (setting, task) -> Δ test accuracy in percentage points (paper A, Table 1)
TABLE1_DELTA_POINTS = {
    ("cifar100", "fruit_and_vegetables"): -8.81,
    ("cifar100", "large_carnivores"): -3.39,
    ("cifar100", "large_natural_outdoor_scenes"): -5.11,
    ("cifar100", "medium_mammals"): -2.89,
    ("cifar100", "fish"): +3.49,
    ("cifar100", "large_omnivores_and_herbivores"): +3.92,
    ("cifar100", "non-insect_invertebrates"): +3.53,
    ("celeba", "Blurry"): -2.73,
    ("celeba", "Eyeglasses"): -1.20,
    ("celeba", "Double_Chin"): +5.30,
    ("celeba", "Gray_Hair"): +4.75,
}
TABLE1_SCORE = "accuracy"  # the score those Δ are of


def table1_delta(setting: str, task: str) -> float | None:
    """Paper A's Δ test accuracy (points) of `task` in `setting`, or None where Table 1 gives none."""
    return TABLE1_DELTA_POINTS.get((setting, task))


def table1_tasks(setting: str) -> list[str]:
    """The tasks of `setting` that paper A's Table 1 lists, in its order."""
    return [task for (s, task) in TABLE1_DELTA_POINTS if s == setting]
