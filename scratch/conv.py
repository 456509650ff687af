"""Conv2d (im2col + one matmul) and MaxPool2d (argmax scatter) with hand-written backward passes."""

import torch
import torch.nn.functional as F

from scratch.module import Layer, accumulate_grad, pair, reset_parameters


def output_hw(x_shape, kernel_size, stride, padding, layer: str) -> tuple[int, int]:
    """(Ho, Wo), each (size + 2 * padding - kernel) // stride + 1; ValueError if the kernel does not fit."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    height, width = x_shape[-2:]
    if height + 2 * ph < kh or width + 2 * pw < kw:
        raise ValueError(f"{layer} input {tuple(x_shape)} padded by {padding} is smaller than kernel {kernel_size}")
    return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1


def im2col(x: torch.Tensor, kernel_size, stride, padding, out: torch.Tensor | None = None) -> torch.Tensor:
    """F.unfold's columns, as one copy of a strided view (faster than F.unfold on CPU), into `out` if it fits."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    batch, channels = x.shape[:2]
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))  # (B, C, H + 2ph, W + 2pw)
    windows = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw), a view: no copy yet
    out_h, out_w = windows.shape[2:4]
    shape = (batch, channels * kh * kw, out_h * out_w)
    if out is None or out.shape != shape or out.dtype != x.dtype or out.device != x.device:
        out = x.new_empty(shape)  # (B, C*kh*kw, L)
    # rows ordered (c, i, j) and columns (oh, ow), exactly F.unfold's layout; this is the one copy
    out.view(batch, channels, kh, kw, out_h, out_w).copy_(windows.permute(0, 1, 4, 5, 2, 3))
    return out  # (B, C*kh*kw, L)


def col2im(cols: torch.Tensor, x_shape, kernel_size, stride, padding) -> torch.Tensor:
    """The adjoint of im2col (what F.fold computes): sum every column entry back onto its input pixel."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    batch, channels, height, width = x_shape
    out_h, out_w = output_hw(x_shape, kernel_size, stride, padding, "col2im")
    blocks = cols.view(batch, channels, kh, kw, out_h, out_w)  # (B, C, kh, kw, Ho, Wo)
    dx = cols.new_zeros(batch, channels, height + 2 * ph, width + 2 * pw)  # (B, C, H + 2ph, W + 2pw)
    # one strided add per kernel offset (kh*kw of them, never per image); overlapping windows sum up
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw] += blocks[:, :, i, j]
    return dx[:, :, ph : ph + height, pw : pw + width]  # (B, C, H, W), a view that drops the padding


class Conv2d(Layer):
    """2-D convolution as im2col plus one matmul, with nn.Conv2d's parameter layout and initialisation."""

    param_names = ("weight", "bias")

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, *, device=None, dtype=None
    ):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = pair(kernel_size), pair(stride), pair(padding)
        kh, kw = self.kernel_size
        self.weight = torch.empty(out_channels, in_channels, kh, kw, device=device, dtype=dtype)  # (O, C, kh, kw)
        self.bias = torch.empty(out_channels, device=device, dtype=dtype)  # (O,)
        reset_parameters(self.weight, self.bias, fan_in=in_channels * kh * kw)
        # im2col buffer kept across steps: a fresh one (100+ MB for CIFAR batches) page-faults on every CPU step
        self._columns: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, ("B", self.in_channels, "H", "W"))
        out_h, out_w = output_hw(x.shape, self.kernel_size, self.stride, self.padding, "Conv2d")
        cols = im2col(x, self.kernel_size, self.stride, self.padding, out=self._columns)  # (B, C*kh*kw, L = Ho*Wo)
        self._columns = cols
        self.save(cols, x.shape)
        batch = x.shape[0]
        weight = self.weight.view(self.out_channels, -1)  # (O, C*kh*kw)
        # bias is the beta term of one batched GEMM: (O, K) @ (B, K, L) + (1, O, 1)
        y = torch.baddbmm(self.bias.view(1, -1, 1), weight.expand(batch, -1, -1), cols)  # (B, O, L)
        return y.view(batch, self.out_channels, out_h, out_w)  # (B, O, Ho, Wo)

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        cols, x_shape = self.saved()  # (B, C*kh*kw, L)
        dy = dy.reshape(dy.shape[0], self.out_channels, -1)  # (B, O, L)
        # dW = sum_b dy_b @ cols_b^T: a batched GEMM then a sum over B (the (B, O, K) partials are small)
        dweight = torch.bmm(dy, cols.transpose(1, 2)).sum(0)  # (O, C*kh*kw)
        accumulate_grad(self.weight, dweight.view_as(self.weight))  # (O, C, kh, kw)
        accumulate_grad(self.bias, dy.sum((0, 2)))  # (O,)
        weight_t = self.weight.view(self.out_channels, -1).t().expand(dy.shape[0], -1, -1)  # (B, C*kh*kw, O)
        # the columns are spent once dW is done, so their gradient overwrites them: no second big buffer
        dcols = torch.bmm(weight_t, dy, out=cols)  # (B, C*kh*kw, L)
        return col2im(dcols, x_shape, self.kernel_size, self.stride, self.padding)  # (B, C, H, W)


class MaxPool2d(Layer):
    """Max over kernel_size windows; backward sends each window's gradient to its (first) argmax."""

    def __init__(self, kernel_size, stride=None):
        self.kernel_size = pair(kernel_size)
        self.stride = self.kernel_size if stride is None else pair(stride)  # torch: stride defaults to kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, ("B", "C", "H", "W"))
        batch, channels, _, width = x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        out_h, out_w = output_hw(x.shape, self.kernel_size, self.stride, (0, 0), "MaxPool2d")
        windows = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw), a view
        # window positions outermost: on CPU, max over the first dim is faster than over a short last dim
        stacked = windows.permute(4, 5, 0, 1, 2, 3).reshape(-1, batch, channels, out_h, out_w)  # (kh*kw, B, C, Ho, Wo)
        # torch.max returns the first maximum; positions are in row-major order, the order F.max_pool2d scans
        y, arg = stacked.max(0)  # (B, C, Ho, Wo) each
        # flat index in the H*W plane of each window's max: window origin + offset of the max inside the window
        rows = torch.arange(out_h, device=x.device).view(-1, 1) * sh  # (Ho, 1)
        cols = torch.arange(out_w, device=x.device) * sw  # (Wo,)
        offsets = torch.arange(kh, device=x.device).view(-1, 1) * width + torch.arange(kw, device=x.device)  # (kh, kw)
        index = offsets.view(-1).take(arg) + rows * width + cols  # (B, C, Ho, Wo); a lookup beats // and % on int64
        self.save(index, x.shape)
        return y

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        index, x_shape = self.saved()  # (B, C, Ho, Wo)
        batch, channels, height, width = x_shape
        planes = batch * channels
        dx = dy.new_zeros(planes, height * width)  # (B*C, H*W)
        # add, not assign: with stride < kernel_size one pixel can be the max of several windows
        dx.scatter_add_(1, index.view(planes, -1), dy.reshape(planes, -1))  # (B*C, H*W)
        return dx.view(x_shape)  # (B, C, H, W)
