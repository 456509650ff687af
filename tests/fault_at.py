"""A test-only callback that makes one rank of a fit fail mid-training (a bug, an out-of-memory error, a bad GPU).

    python cli.py fit ... --trainer.callbacks+ tests.fault_at.FaultAt --trainer.callbacks.rank 1

The other ranks of a DDP fit then stall for `stall` seconds, as NCCL ranks do in their next collective when a peer
is gone: gloo on a CPU would notice the closed connection at once and hide what a job on GPUs meets.
"""
import time

import lightning.pytorch as pl
import torch

ERRORS = {
    "bug": lambda where: RuntimeError(f"injected fault {where}"),
    # torch's own texts
    "gpu_oom": lambda where: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB of which 1.06 GiB "
        "is free. Of the allocated memory 13.9 GiB is allocated by PyTorch"),
    "host_oom": lambda where: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 10000000000000 bytes. Error code 12 (Cannot allocate memory)"),
}


class FaultAt(pl.Callback):
    def __init__(self, rank: int = 1, step: int = 2, stall: float = 600.0, error: str = "bug", predict_end: bool = False):
        assert error in ERRORS, error
        self.rank, self.step, self.stall, self.error, self.predict_end = rank, step, stall, error, predict_end

    def on_predict_end(self, trainer, pl_module):  # predict_end: fail after the last batch (no collective follows)
        if self.predict_end and trainer.global_rank == self.rank:
            time.sleep(1.0)  # rank 0 has ended by now
            raise ERRORS[self.error](f"on rank {self.rank} after predicting")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == self.rank:
            raise ERRORS[self.error](f"on rank {self.rank} at step {self.step}")
        time.sleep(self.stall)
