import pytest
import torch
from torch import nn

from errors import UserError
from lightning_modules import CNN, MLP
from lightning_modules.base import count_parameters


def test_table2_cnn_has_exactly_390410_parameters():
    model = CNN(channels=[32, 64, 128], kernel_size=5, padding=2, batch_norm=False, head_hidden=[64],
                num_classes=10, input_shape=(3, 32, 32))
    assert count_parameters(model)["total"] == 390_410
    assert model.net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert model.feature_shape == (128, 4, 4)


def test_convnet_12_24_48_with_batchnorm_and_64_unit_head():
    model = CNN(channels=[12, 24, 48], batch_norm=True, head_hidden=[64], num_classes=10, input_shape=(3, 32, 32))
    assert model.feature_shape == (48, 4, 4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(768, 64), (64, 10)]


def test_mlp_uses_only_linear_norm_dropout_and_activations():
    model = MLP(hidden=[64, 32], num_classes=10, input_shape=(3, 32, 32))
    allowed = (nn.Linear, nn.BatchNorm1d, nn.LayerNorm, nn.Dropout, nn.ReLU, nn.Flatten, nn.Sequential)
    assert all(isinstance(m, allowed) for m in model.net.modules())
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)


def test_residual_switch_only_removes_the_skip():
    kwargs = dict(channels=[8, 16], extra_convs=1, num_classes=10, input_shape=(3, 32, 32))
    torch.manual_seed(0)
    with_skip = CNN(residual=True, **kwargs)
    without = CNN(residual=False, **kwargs)
    without.load_state_dict(with_skip.state_dict())  # identical parameters
    with_skip.eval(), without.eval()
    x = torch.randn(2, 3, 32, 32)
    block = with_skip.net.features[0]
    h = block.conv(x)
    assert torch.allclose(with_skip.net.features[0](x), block.pool(h + block.extra(h)))
    assert torch.allclose(without.net.features[0](x), block.pool(block.extra(h)))


def test_parameter_budget_error_names_count_and_limit():
    model = CNN(channels=[32, 64], num_classes=10, input_shape=(1, 28, 28), max_params=1000)
    with pytest.raises(UserError, match=r"CNN has [\d,]+ trainable parameters, over the budget of 1,000"):
        model.check_parameter_budget()


def test_bad_hyperparameters_are_clear_errors():
    with pytest.raises(UserError, match="learning rate must be positive"):
        MLP(lr=0.0, num_classes=10)
    with pytest.raises(UserError, match="shrink"):
        CNN(channels=[8, 8, 8, 8], num_classes=10, input_shape=(1, 8, 8))


def test_channels_last_cnn_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    plain = CNN(channels=[8, 16, 32], head_hidden=[64], num_classes=10, input_shape=(1, 28, 28))
    nhwc = CNN(channels=[8, 16, 32], head_hidden=[64], num_classes=10, input_shape=(1, 28, 28), channels_last=True)
    nhwc.load_state_dict(plain.state_dict())  # copies into the NHWC parameters, keeping their layout
    conv = nhwc.net.features[1].conv[0].weight  # (16, 8, 3, 3)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(4, 1, 28, 28)
    plain(x).square().sum().backward(), nhwc(x).square().sum().backward()
    torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.grad, plain.net.features[1].conv[0].weight.grad, rtol=1e-4, atol=1e-5)


def test_compile_option_keeps_outputs_and_checkpoint_keys():
    torch.manual_seed(0)
    eager = CNN(channels=[8, 16], num_classes=10, input_shape=(1, 28, 28))
    compiled = CNN(channels=[8, 16], num_classes=10, input_shape=(1, 28, 28), compile="eager")  # dynamo, no codegen
    compiled.load_state_dict(eager.state_dict())
    compiled.setup("fit")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(compiled(x), eager(x))
    with pytest.raises(UserError, match="compile='nonsense'"):
        CNN(channels=[8], num_classes=10, input_shape=(1, 28, 28), compile="nonsense").setup("fit")


def test_compile_option_through_the_cli(tmp_path):
    import cli
    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.fast_dev_run", "true",
                    "--model.init_args.compile", "eager", "--log_dir", str(tmp_path)])
    assert run.model._net_compiled and run.trainer.state.finished


def test_compile_auto_is_inductor_on_a_gpu_and_eager_on_a_cpu(tmp_path, capsys):
    from lightning_modules.base import compile_backend
    assert compile_backend("auto", "cuda") == "inductor" and compile_backend("auto", "cpu") is None
    assert compile_backend("eager", "cpu") == "eager" and compile_backend(None, "cuda") is None
    import cli
    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.fast_dev_run", "true",
                    "--model.init_args.compile", "auto", "--log_dir", str(tmp_path)])
    assert not getattr(run.model, "_net_compiled", False) and run.trainer.state.finished  # eager on this CPU
    assert "compile=auto: eager on cpu" in capsys.readouterr().out


def test_adam_is_fused_unless_mixed_precision_clips_gradients():
    import lightning.pytorch as pl
    model = CNN(channels=[8], num_classes=10, input_shape=(1, 28, 28))
    params = list(model.parameters())
    assert model.build_optimizer(params).defaults["fused"]  # no trainer: fused
    for precision, clip, fused in (("32-true", 1.0, True), ("bf16-mixed", None, True), ("bf16-mixed", 1.0, False)):
        model.trainer = pl.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=clip, logger=False)
        assert bool(model.build_optimizer(params).defaults["fused"]) is fused, (precision, clip)
