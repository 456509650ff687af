"""report.py on synthetic logs/<experiment>/<version>/results.json folders built in tmp_path."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import report  # noqa: E402

H100 = {"device": "NVIDIA H100 80GB HBM3", "precision": "bf16-mixed", "epochs": 10,
        "train_samples_per_epoch": 50000, "fit_seconds": 723.4}


def write_run(logs: Path, experiment: str, model: str, dataset: str, acc: float | None = None, *, seed: int = 0,
              version: str | None = None, variant: str | None = None, params: int = 1000, test: dict | None = None,
              efficiency: dict | None = None, pngs: tuple[str, ...] = ()) -> Path:
    """A results.json as a finished run writes it; `test` replaces the default best/last metrics."""
    base = experiment.removesuffix(f"-{variant}") if variant else experiment
    run_dir = logs / experiment / (version or f"2026112{seed}-113000-{seed}")
    run_dir.mkdir(parents=True)
    metrics = {"acc": acc, "precision_macro": 0.5, "recall_macro": 0.4, "f1_macro": 0.45, "loss": 1.2}
    results = {
        "experiment": experiment, "base_experiment": base, "variant": variant, "model": model, "dataset": dataset,
        "seed": seed, "run_dir": str(run_dir), "params": {"total": params, "trainable": params},
        "test": test or {"best": metrics, "last": {**metrics, "acc": acc - 0.01}},
        "efficiency": H100 if efficiency is None else efficiency, "finished_at": f"2026-11-22T11:3{seed}:00",
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    for name in pngs:
        (run_dir / name).write_bytes(b"\x89PNG\r\n")
    return run_dir


def make_report(tmp_path: Path, *options: str) -> tuple[int, str]:
    out = tmp_path / "report.md"
    code = report.main([str(tmp_path / "logs"), "--out", str(out), *options])
    return code, out.read_text() if out.exists() else ""


def table_row(text: str, *first_cells: str) -> list[str]:
    """The cells of the first table row that starts with `first_cells`."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no row starting with {first_cells} in:\n{text}")


def section(text: str, heading: str) -> str:
    """The body of `## heading` up to the next ## heading."""
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    write_run(logs, "cifar100_mlp", "MLP", "cifar100", 0.2510, params=3_700_000)
    write_run(logs, "cifar100_cnn", "CNN", "cifar100", 0.6100, params=2_100_000, pngs=("curves.png", "filters.png"))
    write_run(logs, "cifar100_cnn-no_batchnorm", "CNN", "cifar100", 0.5779, variant="no_batchnorm", params=2_090_000)
    write_run(logs, "cifar100_clip", "CLIPZeroShot", "cifar100", params=151_277_313, efficiency={"device": "cpu"},
              test={"final": {"acc": 0.6170, "top5_acc": 0.8712}})
    write_run(logs, "mnist_mlp", "MLP", "mnist", 0.9812, params=118_282)
    write_run(logs, "cifar10_resnet18-freeze_layer1-2", "ResNet18", "cifar10", 0.8901, variant="freeze_layer1-2",
              params=11_181_642, efficiency={**H100, "epochs": 3, "fit_seconds": 95.4,
                                             "trainable_params_per_stage": {"0": 5130, "2": 11181642}})
    return logs


def test_mlp_vs_cnn_per_dataset(tmp_path, logs):
    code, text = make_report(tmp_path)
    assert code == 0
    table = section(text, "MLP vs CNN")
    assert table_row(table, "cifar100", "MLP") == ["cifar100", "MLP", "cifar100_mlp", "3,700,000", "25.10%"]
    assert table_row(table, "cifar100", "CNN") == ["cifar100", "CNN", "cifar100_cnn", "2,100,000", "61.00%"]
    assert table_row(table, "mnist", "MLP")[-1] == "98.12%"
    assert table_row(table, "mnist", "CNN")[-1] == "not run"
    assert "no_batchnorm" not in table and "CLIP" not in table  # baselines of MLP/CNN models only


def test_ablation_matches_its_baseline(tmp_path, logs):
    write_run(tmp_path / "logs", "mnist_cnn-narrow", "CNN", "mnist", 0.95, variant="narrow")  # no mnist_cnn baseline
    _, text = make_report(tmp_path)
    table = section(text, "Ablations")
    assert table_row(table, "cifar100_cnn", "cifar100", "baseline")[4:] == ["61.00%", "—"]
    assert table_row(table, "cifar100_cnn", "cifar100", "no_batchnorm")[4:] == ["57.79%", "-3.21 pts"]
    assert table_row(table, "mnist_cnn", "mnist", "baseline")[4] == "not run"
    assert "freeze" not in table  # ResNet18 freeze options belong to the transfer table


def test_clip_table_and_not_run(tmp_path, logs):
    _, text = make_report(tmp_path)
    table = section(text, "CLIP zero-shot vs from scratch")
    assert table_row(table, "cifar100") == ["cifar100", "61.70%", "87.12%", "CNN", "61.00%", "+0.70 pts",
                                            "151,277,313", "2,100,000"]
    assert table_row(table, "mnist")[1] == "not run"


def test_transfer_table_and_summary(tmp_path, logs):
    _, text = make_report(tmp_path)
    row = table_row(section(text, "Transfer learning (ResNet18)"), "cifar10_resnet18")
    assert row[2:10] == ["freeze_layer1-2", "NVIDIA H100 80GB HBM3", "bf16-mixed", "3", "50,000",
                         "5,130 (ep 0) → 11,181,642 (ep 2)", "1m 35s", "89.01%"]
    assert row[10:] == ["50.00%", "40.00%", "45.00%"]
    summary = section(text, "All runs")
    assert table_row(summary, "cifar100_clip")[5:9] == ["61.70%", "final", "—", "—"]
    assert table_row(summary, "cifar100_cnn")[5:9] == ["61.00%", "best", "61.00%", "60.00%"]


def test_seeds_are_pooled_as_mean_std_n(tmp_path):
    logs = tmp_path / "logs"
    baseline, ablated = [0.61, 0.62, 0.605], [0.57, 0.60, 0.58]
    for seed, (base_acc, ablated_acc) in enumerate(zip(baseline, ablated)):
        write_run(logs, "cifar100_cnn", "CNN", "cifar100", base_acc, seed=seed,
                  efficiency={**H100, "fit_seconds": 700.0 + 10 * seed})
        write_run(logs, "cifar100_cnn-no_batchnorm", "CNN", "cifar100", ablated_acc, seed=seed, variant="no_batchnorm")
    write_run(logs, "cifar100_mlp", "MLP", "cifar100", 0.25)
    _, text = make_report(tmp_path)

    def expected(values, unit, sign=""):
        return f"{100 * statistics.mean(values):{sign}.2f} ± {100 * statistics.stdev(values):.2f}{unit} (n=3)"

    mlp_cnn = section(text, "MLP vs CNN")
    assert table_row(mlp_cnn, "cifar100", "CNN")[-1] == expected(baseline, "%") == "61.17 ± 0.76% (n=3)"
    assert table_row(mlp_cnn, "cifar100", "MLP")[-1] == "25.00%"  # a single run reads as a plain number
    deltas = [a - b for a, b in zip(ablated, baseline)]  # paired by seed
    row = table_row(section(text, "Ablations"), "cifar100_cnn", "cifar100", "no_batchnorm")
    assert row[4:] == [expected(ablated, "%"), expected(deltas, " pts", "+")]
    summary = table_row(section(text, "All runs"), "cifar100_cnn")
    assert summary[4] == "0, 1, 2" and summary[-1].endswith("(3 runs)")


def test_same_seed_twice_keeps_the_later_run(tmp_path, capsys):
    logs = tmp_path / "logs"
    write_run(logs, "cifar100_cnn", "CNN", "cifar100", 0.50, version="old")
    later = write_run(logs, "cifar100_cnn", "CNN", "cifar100", 0.60, version="new")
    data = json.loads((later / "results.json").read_text())
    (later / "results.json").write_text(json.dumps({**data, "finished_at": "2026-12-01T00:00:00"}))
    _, text = make_report(tmp_path)
    assert table_row(section(text, "MLP vs CNN"), "cifar100", "CNN")[-1] == "60.00%"
    assert "superseded" in capsys.readouterr().err


@pytest.mark.parametrize("fit_has_results", [True, False])
def test_a_re_test_of_a_checkpoint_is_not_another_run_of_its_fit(tmp_path, capsys, fit_has_results):
    """`cli.py test --ckpt_path <fit>/checkpoints/last.ckpt` (later, same seed) replaced the fit's best-checkpoint
    result; it counts only when the fit has no results.json of its own (a stopped fit, tested by hand)."""
    logs = tmp_path / "logs"
    fit = write_run(logs, "cifar100_cnn", "CNN", "cifar100", 0.60, version="fit")
    retest = write_run(logs, "cifar100_cnn", "CNN", "cifar100", test={"final": {"acc": 0.40}}, version="retest")
    data = json.loads((retest / "results.json").read_text())
    tested = str(fit / "checkpoints" / "last.ckpt")
    (retest / "results.json").write_text(json.dumps({**data, "finished_at": "2026-12-01T00:00:00",
                                                     "tested_checkpoint": tested}))
    if not fit_has_results:
        (fit / "results.json").unlink()
    _, text = make_report(tmp_path)
    err = capsys.readouterr().err
    assert table_row(section(text, "MLP vs CNN"), "cifar100", "CNN")[-1] == ("60.00%" if fit_has_results else "40.00%")
    assert (f"re-tests {tested}; that run's own results.json counts" in err) == fit_has_results
    assert "superseded" not in err


def test_cifar100_layout_has_five_sections_and_a_budget(tmp_path, logs, capsys):
    code, text = make_report(tmp_path, "--layout", "cifar100")
    assert code == 0
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["## Executive Summary", "## Inductive Bias & Parameter Efficiency", "## Ablation Study",
                        "## The Paradigm Shift", "## Reflection"]
    assert "mnist" not in text and "resnet" not in text  # CIFAR-100 runs only
    assert table_row(section(text, "Ablation Study"), "cifar100_cnn", "cifar100", "no_batchnorm")[-1] == "-3.21 pts"
    assert "_Write:" in section(text, "Reflection") and "CLIP zero-shot 61.70%" in section(text, "Executive Summary")
    prompts = sum(len(line) + 2 for line in text.splitlines() if line.startswith("_Write:"))
    out = capsys.readouterr()
    assert f"characters: {len(text):,} with prompts, {len(text) - prompts:,} in headings and tables; " \
           f"{7500 - len(text) + prompts:,} of 7,500 left for prose" in out.out
    assert "warning" not in out.err


def test_cifar100_layout_without_clip_says_not_run(tmp_path):
    write_run(tmp_path / "logs", "cifar100_mlp", "MLP", "cifar100", 0.25)
    _, text = make_report(tmp_path, "--layout", "cifar100")
    assert "_Not run: no ablation variant" in section(text, "Ablation Study")
    assert table_row(section(text, "The Paradigm Shift"), "cifar100")[1] == "not run"
    assert table_row(section(text, "Inductive Bias & Parameter Efficiency"), "cifar100", "CNN")[-1] == "not run"


def test_char_limit_warning_still_exits_0(tmp_path, logs, capsys):
    code, text = make_report(tmp_path, "--layout", "cifar100", "--char-limit", "500")
    err = capsys.readouterr().err
    assert code == 0 and text.startswith("## Executive Summary")
    assert "warning: the headings and tables alone are" in err and "over the 500 limit" in err


def test_malformed_results_are_named_and_skipped(tmp_path, logs, capsys):
    (logs / "broken" / "v0").mkdir(parents=True)
    (logs / "broken" / "v0" / "results.json").write_text('{"experiment": ')
    (logs / "partial" / "v0").mkdir(parents=True)
    (logs / "partial" / "v0" / "results.json").write_text('{"experiment": "partial", "model": "MLP"}')
    code, text = make_report(tmp_path)
    err = capsys.readouterr().err
    assert code == 0 and "cifar100_mlp" in text
    assert f"skipping {logs}/broken/v0/results.json: invalid JSON" in err
    assert f"skipping {logs}/partial/v0/results.json: missing required keys: dataset, test" in err


def test_figures_are_copied_beside_the_report(tmp_path, logs, capsys):
    code, text = make_report(tmp_path, "--figures", str(tmp_path / "figures"))
    version = next((logs / "cifar100_cnn").iterdir()).name
    copied = sorted(path.name for path in (tmp_path / "figures").iterdir())
    assert code == 0 and copied == [f"cifar100_cnn_{version}_curves.png", f"cifar100_cnn_{version}_filters.png"]
    assert "copied 2 figures" in capsys.readouterr().out
    assert ".png" not in text and "![" not in text  # no images inside the Markdown


def test_existing_report_survives_a_failed_write(tmp_path, logs, monkeypatch):
    out = tmp_path / "report.md"
    out.write_text("previous report\n")
    monkeypatch.setattr(report.os, "replace", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left")))
    assert report.main([str(logs), "--out", str(out)]) == 2
    assert out.read_text() == "previous report\n"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".report.md")] == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "report.py", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("make_folder", [False, True])
def test_cli_empty_or_missing_folder_exits_2(tmp_path, make_folder):
    folder = tmp_path / "logs"
    if make_folder:
        folder.mkdir()
    result = run_cli(f"{folder}/", "--out", str(tmp_path / "report.md"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: no results.json under {folder}/ — "
                             "run python cli.py fit --config configs/quickstart.yaml first\n")
    assert not (tmp_path / "report.md").exists()


def test_cli_writes_the_report_and_a_summary(tmp_path, logs):
    result = run_cli(str(logs), "--out", str(tmp_path / "out" / "report.md"), "--layout", "cifar100")
    assert result.returncode == 0, result.stderr
    assert f"read 6 runs (6 experiments, 0 skipped) from {logs}; wrote {tmp_path}/out/report.md" in result.stdout
    assert "left for prose" in result.stdout
    assert (tmp_path / "out" / "report.md").read_text().startswith("## Executive Summary")
