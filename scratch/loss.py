"""Cross-entropy from logits with a hand-written gradient."""

import torch


class CrossEntropyLoss:
    """Mean over the batch of -log softmax(logits)[target], computed with a stable log-sum-exp."""

    _saved: tuple | None = None

    @torch.no_grad()  # every gradient here is computed by backward below
    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(
                "CrossEntropyLoss expected logits (B, C) and targets (B,), "
                f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"CrossEntropyLoss expected integer class targets, got {targets.dtype}")
        num_classes = logits.shape[1]
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
            low, high = targets.min().item(), targets.max().item()
            raise ValueError(f"CrossEntropyLoss targets must lie in [0, {num_classes - 1}], got {low}..{high}")
        # subtracting the row max keeps exp() <= 1, so logits like 1000 do not overflow
        shifted = logits - logits.amax(1, keepdim=True)  # (B, C)
        log_probs = shifted - shifted.exp().sum(1, keepdim=True).log()  # (B, C)
        targets = targets.long().view(-1, 1)  # (B, 1)
        self._saved = (log_probs, targets)
        return -log_probs.gather(1, targets).mean()  # ()

    @torch.no_grad()
    def backward(self, dloss: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Gradient of the loss for the logits: dloss * (softmax - one_hot) / B."""
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward needs a call first (each backward frees it)")
        (log_probs, targets), self._saved = self._saved, None  # (B, C), (B, 1)
        dlogits = log_probs.exp()  # (B, C) softmax
        dlogits.scatter_add_(1, targets, dlogits.new_full(targets.shape, -1.0))  # (B, C) softmax - one_hot
        return dlogits.mul_(dloss / log_probs.shape[0])  # (B, C); the 1/B is from the mean over the batch
