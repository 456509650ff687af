"""Every notebook runs top to bottom in a real Jupyter kernel in smoke mode (SMOKE=1), and is stored without outputs."""
import glob
import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_is_one_notebook_per_assignment_family():
    assert [os.path.basename(path) for path in NOTEBOOKS] == [
        "cifar10.ipynb", "cifar100.ipynb", "emnist.ipynb", "fashion_mnist.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{os.path.basename(path)}: cells {dirty} hold outputs; clear them before committing "
                       "(JupyterLab: Edit > Clear Outputs of All Cells)")


def _setup_cell(path) -> str:
    return next(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")


def test_the_setup_cell_outside_a_checkout_asks_for_the_repository_url_before_cloning(tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    assert len({_setup_cell(path) for path in NOTEBOOKS}) == 1  # the same first cell in every notebook
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_setup_cell(NOTEBOOKS[0]))])
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})  # a fresh Colab: no cli.py around
    with pytest.raises(CellExecutionError, match="set REPO_URL in this cell"):
        client.execute()
    assert os.listdir(tmp_path) == []  # nothing cloned, nothing installed


@pytest.mark.slow
def test_several_devices_in_a_notebook_are_one_error_not_an_empty_results_file(tmp_path):
    # Lightning picks ddp_fork there: the ranks ran in forked children and results.json came out with no tests
    from nbclient import NotebookClient

    code = (f"import os, sys\nos.chdir({ROOT!r}); sys.path.insert(0, {ROOT!r})\nimport api\n"
            "try:\n"
            f"    api.fit('configs/quickstart.yaml', **{{'trainer.devices': 2, 'trainer.accelerator': 'cpu', "
            f"'log_dir': {str(tmp_path)!r}}})\n"
            "except api.UserError as error:\n    print('UserError:', error)\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    text = "".join(output.get("text", "") for output in notebook.cells[0].outputs)
    assert "UserError: --trainer.strategy auto (ddp_fork here) runs the ranks in child processes" in text, text
    assert os.listdir(tmp_path) == []  # the run folder it had claimed is removed, and its parent


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    """nbclient starts the `python3` kernel; jupyter_client runs a kernel.json whose command is `python` with this
    interpreter (sys.executable), so the kernel sees this virtualenv's packages. A failing cell raises
    CellExecutionError with the cell's source and traceback."""
    from nbclient import NotebookClient

    monkeypatch.setenv("SMOKE", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("LOGS", str(tmp_path / "logs"))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}})  # cwd: notebooks/
    client.execute()
    runs = glob.glob(str(tmp_path / "logs" / "*" / "*" / "results.json"))
    assert runs, "the notebook wrote no results.json into LOGS"
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs), "no figure was displayed inline"
    widget = "application/vnd.jupyter.widget-view+json"  # Lightning's tqdm.auto bars, as widgets (ipywidgets)
    assert any(widget in output.get("data", {}) for output in outputs), "no progress bar rendered as a widget"
