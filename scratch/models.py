"""Ready-made networks built from scratch layers (or, for comparison, from torch.nn)."""

import scratch


def mnist_cnn(lib=scratch):
    """The small MNIST CNN from scratch layers, or with lib=torch.nn the same network from torch's modules."""
    return lib.Sequential(
        lib.Conv2d(1, 8, 3), lib.ReLU(), lib.MaxPool2d(2),  # 28 -> 26 -> 13
        lib.Conv2d(8, 16, 3), lib.ReLU(), lib.MaxPool2d(2),  # 13 -> 11 -> 5 (the pool floors)
        lib.Flatten(), lib.Linear(16 * 5 * 5, 10),  # 16 channels * 5 * 5 = 400 features
    )  # fmt: skip
