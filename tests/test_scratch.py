"""The hand-written scratch stack against finite differences and against torch's autograd."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scratch
from scratch.conv import col2im, im2col
from scratch.models import mnist_cnn
from scratch.module import pair

F64 = torch.float64
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # random inputs, but the same ones on every run


def numerical_gradient(loss_fn, tensor: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of a scalar loss_fn() for every element of tensor (perturbed in place)."""
    grad = torch.zeros_like(tensor)
    flat, grad_flat = tensor.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        original = flat[i].item()
        flat[i] = original + eps
        plus = loss_fn()
        flat[i] = original - eps
        minus = loss_fn()
        flat[i] = original
        grad_flat[i] = (plus - minus) / (2 * eps)
    return grad


def check_layer_gradients(layer, x: torch.Tensor) -> None:
    """Analytic input and parameter gradients of sum(layer(x) * r) against central differences."""
    r = torch.randn_like(layer(x))  # fixed upstream gradient dL/dy

    def loss() -> float:
        return (layer(x) * r).sum().item()

    layer(x)
    dx = layer.backward(r)
    torch.testing.assert_close(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-7)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, numerical_gradient(loss, param), rtol=1e-6, atol=1e-7, msg=name)


def torch_pair(scratch_layer, torch_layer):
    """Give scratch_layer torch_layer's parameters (float64) and return both."""
    torch_layer = torch_layer.to(F64)
    scratch_layer.load_state_dict(torch_layer.state_dict())
    return scratch_layer, torch_layer


def compare_with_autograd(ours, theirs, x: torch.Tensor) -> None:
    """Outputs, input gradient and every parameter gradient of ours against theirs with autograd."""
    x_leaf = x.clone().requires_grad_()
    expected = theirs(x_leaf)
    dy = torch.randn_like(expected)
    expected.backward(dy)
    torch.testing.assert_close(ours(x), expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.backward(dy), x_leaf.grad, rtol=1e-12, atol=1e-12)
    our_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters() if isinstance(theirs, nn.Module) else []:
        torch.testing.assert_close(our_params[name].grad, param.grad, rtol=1e-12, atol=1e-12, msg=name)


CONV_CASES = [  # in_channels, out_channels, kernel_size, stride, padding, (H, W)
    (1, 4, 3, 1, 0, (8, 8)),
    (3, 5, 3, 2, 1, (9, 7)),
    (2, 6, (3, 2), (2, 1), (1, 0), (10, 7)),
    (4, 3, 1, 1, 0, (5, 6)),  # 1x1: the im2col view is already contiguous, the copy must still happen
    (3, 2, 5, 3, 2, (11, 13)),
]
POOL_CASES = [(2, None, (2, 3, 8, 8)), (3, 2, (2, 2, 9, 7)), (2, 1, (1, 2, 5, 6)), (3, None, (1, 2, 10, 11))]


# --- finite differences (float64) -------------------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES[1:3])
def test_conv2d_numeric_gradient(case):
    in_channels, out_channels, kernel_size, stride, padding, size = case
    conv = scratch.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dtype=F64)
    check_layer_gradients(conv, torch.randn(2, in_channels, *size, dtype=F64))


def test_linear_relu_flatten_maxpool_numeric_gradients():
    check_layer_gradients(scratch.Linear(5, 3, dtype=F64), torch.randn(4, 5, dtype=F64))
    x = torch.randn(3, 7, dtype=F64)
    check_layer_gradients(scratch.ReLU(), x + 0.1 * x.sign())  # keep inputs away from the kink at 0
    check_layer_gradients(scratch.Flatten(), torch.randn(2, 3, 2, 2, dtype=F64))
    check_layer_gradients(scratch.MaxPool2d(2), torch.randn(2, 2, 4, 5, dtype=F64))  # random: no ties


def test_cross_entropy_numeric_gradient():
    logits, targets = torch.randn(4, 5, dtype=F64), torch.tensor([0, 4, 2, 2])
    criterion = scratch.CrossEntropyLoss()
    criterion(logits, targets)
    expected = numerical_gradient(lambda: criterion(logits, targets).item(), logits)
    criterion(logits, targets)
    torch.testing.assert_close(criterion.backward(), expected, rtol=1e-6, atol=1e-8)


# --- against torch with autograd (float64) ---------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_torch(case):
    in_channels, out_channels, kernel_size, stride, padding, size = case
    ours, theirs = torch_pair(
        scratch.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dtype=F64),
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
    )
    compare_with_autograd(ours, theirs, torch.randn(3, in_channels, *size, dtype=F64))


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_col2im_match_unfold_fold(case):
    in_channels, _, kernel_size, stride, padding, size = case
    x = torch.randn(2, in_channels, *size, dtype=F64)
    args = pair(kernel_size), pair(stride), pair(padding)
    cols = im2col(x, *args)
    assert torch.equal(cols, F.unfold(x, kernel_size, padding=padding, stride=stride))
    assert cols.data_ptr() != x.data_ptr()  # backward overwrites the columns, so they must never alias x
    folded = F.fold(cols, size, kernel_size, padding=padding, stride=stride)
    torch.testing.assert_close(col2im(cols, x.shape, *args), folded)


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 7)])
def test_linear_matches_torch(shape):
    ours, theirs = torch_pair(scratch.Linear(7, 3, dtype=F64), nn.Linear(7, 3))
    compare_with_autograd(ours, theirs, torch.randn(*shape, dtype=F64))


@pytest.mark.parametrize("kernel_size, stride, shape", POOL_CASES)
def test_maxpool_matches_torch(kernel_size, stride, shape):
    pool = scratch.MaxPool2d(kernel_size, stride)
    compare_with_autograd(pool, lambda x: F.max_pool2d(x, kernel_size, stride), torch.randn(*shape, dtype=F64))


@pytest.mark.parametrize("kernel_size, stride, shape", POOL_CASES)
def test_maxpool_ties_match_torch(kernel_size, stride, shape):
    """Equal values in a window: the whole gradient goes to the first max, as in F.max_pool2d."""
    x = torch.randint(0, 2, shape).to(F64)  # mostly tied windows
    x_leaf = x.clone().requires_grad_()
    dy = torch.rand_like(F.max_pool2d(x, kernel_size, stride)) + 1  # positive, so a split gradient would show
    F.max_pool2d(x_leaf, kernel_size, stride).backward(dy)
    pool = scratch.MaxPool2d(kernel_size, stride)
    pool(x)
    assert torch.equal(pool.backward(dy), x_leaf.grad)


def test_maxpool_all_equal_window_sends_gradient_to_first_position():
    pool = scratch.MaxPool2d(2)
    pool(torch.ones(1, 1, 2, 2))
    assert pool.backward(torch.full((1, 1, 1, 1), 5.0)).flatten().tolist() == [5.0, 0.0, 0.0, 0.0]


def test_relu_flatten_match_torch():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    x[0, 0, 0, :2] = 0.0  # torch's relu gradient at exactly 0 is 0
    compare_with_autograd(scratch.ReLU(), torch.relu, x)
    compare_with_autograd(scratch.Flatten(), nn.Flatten(), x)


@pytest.mark.parametrize("scale", [1.0, 1000.0])  # 1000: exp would overflow without the max shift
def test_cross_entropy_matches_torch(scale):
    logits = torch.randn(6, 4, dtype=F64) * scale
    targets = torch.tensor([0, 3, 1, 1, 2, 0])
    logits_leaf = logits.clone().requires_grad_()
    expected = F.cross_entropy(logits_leaf, targets)
    expected.backward()
    criterion = scratch.CrossEntropyLoss()
    loss = criterion(logits, targets)
    assert loss.shape == () and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(criterion.backward(), logits_leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum, weight_decay", [(0, 0), (0.9, 0), (0, 0.01), (0.9, 0.01)])
def test_sgd_matches_torch(momentum, weight_decay):
    ours = [torch.randn(3, 4, dtype=F64), torch.randn(5, dtype=F64)]
    theirs = [p.clone().requires_grad_() for p in ours]
    our_opt = scratch.SGD(ours, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    their_opt = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for step in range(4):
        our_opt.zero_grad()
        their_opt.zero_grad()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if step == 2 and i == 1:
                continue  # a parameter without a gradient is skipped, momentum buffer untouched
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        our_opt.step()
        their_opt.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-12)
    assert all(p.grad is not None for p in ours)
    our_opt.zero_grad()
    assert all(p.grad is None for p in ours)


def test_backward_accumulates_gradients():
    linear, x, dy = scratch.Linear(3, 2, dtype=F64), torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    linear(x)
    linear.backward(dy)
    first = linear.weight.grad.clone()
    linear(x)
    linear.backward(dy)
    torch.testing.assert_close(linear.weight.grad, 2 * first)


# --- initialisation, state_dict, devices -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_initialisation_draws_match_torch(dtype):
    for make_ours, make_theirs in [
        (lambda: scratch.Linear(20, 7, dtype=dtype), lambda: nn.Linear(20, 7, dtype=dtype)),
        (lambda: scratch.Conv2d(3, 8, 3, dtype=dtype), lambda: nn.Conv2d(3, 8, 3, dtype=dtype)),
    ]:
        torch.manual_seed(0)
        ours = make_ours()
        torch.manual_seed(0)
        theirs = make_theirs()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(p, q.detach()), name
            assert not p.requires_grad and p.dtype == dtype
    bound = 1 / (3 * 3 * 3) ** 0.5  # 1/sqrt(fan_in) for weight and bias
    assert ours.weight.abs().max() <= bound and ours.bias.abs().max() <= bound


def test_sequential_matches_torch_and_shares_state_dict_keys():
    theirs = mnist_cnn(nn).to(F64)
    ours = mnist_cnn(scratch).to(F64)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())  # '0.weight', '0.bias', '3.weight', ...
    theirs.load_state_dict(ours.state_dict())  # strict in torch: same keys and shapes
    assert not any(p.requires_grad for p in ours.parameters())
    x = torch.randn(4, 1, 28, 28, dtype=F64)
    assert ours(x).shape == (4, 10)
    compare_with_autograd(ours, theirs, x)


def test_to_converts_in_place_and_keeps_optimizer_references():
    model = scratch.Sequential(scratch.Linear(3, 2), scratch.ReLU())
    optimizer = scratch.SGD(model.parameters(), lr=0.1)
    model.to(F64)
    assert all(p.dtype == F64 for p in model.parameters())
    assert all(p is q for p, q in zip(optimizer.params, model.parameters()))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_conv_and_pool_match_torch_on_device(device):
    conv, pool = scratch.Conv2d(3, 4, 3, padding=1, device=device), scratch.MaxPool2d(2)
    theirs = nn.Conv2d(3, 4, 3, padding=1, device=device)
    conv.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8, 8, device=device)
    x_leaf = x.clone().requires_grad_()
    expected = F.max_pool2d(theirs(x_leaf), 2)
    dy = torch.randn_like(expected)
    expected.backward(dy)
    torch.testing.assert_close(pool(conv(x)), expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.backward(pool.backward(dy)), x_leaf.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


# --- shapes and errors -----------------------------------------------------------------------


def test_forward_shapes():
    x = torch.randn(2, 3, 9, 7)
    assert scratch.Conv2d(3, 5, 3, stride=2, padding=1)(x).shape == (2, 5, 5, 4)  # (9 + 2 - 3) // 2 + 1 = 5
    assert scratch.MaxPool2d(2)(x).shape == (2, 3, 4, 3)  # floor: the last odd row/column is dropped
    assert scratch.MaxPool2d(3, 2)(x).shape == (2, 3, 4, 3)
    assert scratch.Flatten()(x).shape == (2, 189)
    assert scratch.Linear(7, 4)(x).shape == (2, 3, 9, 4)


def test_shape_errors_name_expected_and_received():
    cases = [
        (scratch.Conv2d(3, 8, 3), torch.randn(4, 1, 28, 28), "Conv2d expected input (B, 3, H, W), got (4, 1, 28, 28)"),
        (scratch.Linear(784, 10), torch.randn(4, 10), "Linear expected input (*, 784), got (4, 10)"),
        (scratch.MaxPool2d(2), torch.randn(3, 8, 8), "MaxPool2d expected input (B, C, H, W), got (3, 8, 8)"),
        (scratch.Flatten(), torch.randn(5), "Flatten expected input (B, D, *), got (5,)"),
        (scratch.Conv2d(1, 2, 5), torch.randn(1, 1, 3, 3), "smaller than kernel (5, 5)"),
        (scratch.Linear(3, 2), torch.randn(1, 3, dtype=F64), "torch.float32 on cpu but the input is torch.float64"),
    ]
    for layer, x, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            layer(x)
    criterion = scratch.CrossEntropyLoss()
    with pytest.raises(ValueError, match=re.escape("expected logits (B, C) and targets (B,), got (4, 3) and (5,)")):
        criterion(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("targets must lie in [0, 2], got 0..3")):
        criterion(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="backward needs a forward first"):
        scratch.ReLU().backward(torch.ones(1))
    with pytest.raises(ValueError, match=re.escape("missing keys ['bias']")):
        scratch.Linear(3, 2).load_state_dict({"weight": torch.zeros(2, 3)})


# --- no autograd, end to end -----------------------------------------------------------------


def test_no_autograd_graph_even_with_grad_mode_and_grad_requiring_input():
    model, criterion = mnist_cnn(scratch), scratch.CrossEntropyLoss()
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    with torch.enable_grad():
        logits = model(x)
        loss = criterion(logits, torch.tensor([1, 7]))
        dx = model.backward(criterion.backward())
    for tensor in [logits, loss, dx, *(p.grad for p in model.parameters())]:
        assert not tensor.requires_grad and tensor.grad_fn is None
    assert x.grad is None


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_tiny_training_run_loss_falls(grad_mode):
    """Two classes of 8x8 images, bright top half vs bright bottom half: 50 SGD steps must learn them."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=generator)  # (N,)
    images = 0.5 * torch.randn(64, 1, 8, 8, generator=generator)  # (N, 1, 8, 8) noise
    images[labels == 0, :, :4] += 1.0
    images[labels == 1, :, 4:] += 1.0
    torch.manual_seed(0)
    # 8 -> conv3 -> 6 -> pool2 -> 3, so 4*3*3 features
    model = scratch.Sequential(
        scratch.Conv2d(1, 4, 3), scratch.ReLU(), scratch.MaxPool2d(2), scratch.Flatten(), scratch.Linear(36, 2)
    )
    criterion, optimizer = scratch.CrossEntropyLoss(), scratch.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    with grad_mode():
        for _ in range(50):
            optimizer.zero_grad()
            losses.append(criterion(model(images), labels).item())
            model.backward(criterion.backward())
            optimizer.step()
    assert losses[-1] < 0.25 * losses[0], losses
