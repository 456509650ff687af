"""The report's tables, each built from the experiment groups; a missing experiment reads 'not run'."""
from .formatting import (MISSING, fmt_duration, fmt_number, fmt_percent, fmt_points, fmt_text, markdown_table,
                         not_run)
from .runs import CNN_MODELS, MLP_MODELS, PRETRAINED_MODELS, RunGroup, gap_values

NOT_RUN = "not run"


def is_from_scratch_baseline(group: RunGroup) -> bool:
    return group.variant is None and group.model not in PRETRAINED_MODELS


def mlp_vs_cnn(groups: list[RunGroup]) -> str:
    """MLP and CNN baselines side by side, per dataset."""
    baselines = [g for g in groups if g.variant is None and g.model in MLP_MODELS + CNN_MODELS]
    if not baselines:
        return not_run("no MLP or CNN baseline (a run without a variant)")
    rows = []
    for dataset in sorted({g.dataset for g in baselines}):
        for kind, models in (("MLP", MLP_MODELS), ("CNN", CNN_MODELS)):
            found = [g for g in baselines if g.dataset == dataset and g.model in models]
            rows += [[dataset, g.model, g.experiment, fmt_number(g.params()), fmt_percent(g.metric("acc"))]
                     for g in found] or [[dataset, kind, MISSING, MISSING, NOT_RUN]]
    return markdown_table(["Dataset", "Model", "Experiment", "Trainable params", "Test acc"], rows)


def ablation(groups: list[RunGroup]) -> str:
    """Each ablated variant against the baseline of its base experiment; Δ = variant - baseline."""
    ablated = [g for g in groups if g.variant is not None and g.model not in PRETRAINED_MODELS]
    if not ablated:
        return not_run("no ablation variant (e.g. no_batchnorm) of an MLP or CNN experiment")
    rows = []
    for dataset, base in sorted({(g.dataset, g.base_experiment) for g in ablated}):
        baseline = next((g for g in groups if g.dataset == dataset and g.base_experiment == base
                         and g.variant is None and g.model not in PRETRAINED_MODELS), None)
        if baseline is None:
            rows.append([base, dataset, "baseline", MISSING, NOT_RUN, MISSING])
        else:
            rows.append([base, dataset, "baseline", fmt_number(baseline.params()),
                         fmt_percent(baseline.metric("acc")), MISSING])
        for g in (g for g in ablated if g.dataset == dataset and g.base_experiment == base):
            delta = fmt_points(gap_values(g, baseline)) if baseline else MISSING
            rows.append([base, dataset, g.variant, fmt_number(g.params()), fmt_percent(g.metric("acc")), delta])
    return markdown_table(["Base experiment", "Dataset", "Variant", "Trainable params", "Test acc",
                           "Δ vs baseline"], rows)


def clip_vs_scratch(groups: list[RunGroup]) -> str:
    """CLIP zero-shot against the best from-scratch baseline of the same dataset; gap = CLIP - scratch."""
    clips = [g for g in groups if g.model == "CLIPZeroShot"]
    scratch = [g for g in groups if is_from_scratch_baseline(g)]
    datasets = sorted({g.dataset for g in clips + scratch})
    if not datasets:
        return not_run("no CLIP zero-shot and no from-scratch run")
    rows = []
    for dataset in datasets:
        best = max((g for g in scratch if g.dataset == dataset), key=RunGroup.mean_acc, default=None)
        best_cells = ([best.model, fmt_percent(best.metric("acc"))] if best else [MISSING, NOT_RUN])
        best_params = fmt_number(best.params()) if best else MISSING
        for clip in [g for g in clips if g.dataset == dataset] or [None]:
            if clip is None:
                rows.append([dataset, NOT_RUN, MISSING, *best_cells, MISSING, MISSING, best_params])
                continue
            gap = fmt_points(gap_values(clip, best)) if best else MISSING
            rows.append([dataset, fmt_percent(clip.metric("acc")), fmt_percent(clip.metric("top5_acc")),
                         *best_cells, gap, fmt_number(clip.params("total")), best_params])
    headers = ["Dataset", "CLIP top-1", "CLIP top-5", "Best from scratch", "Scratch acc", "Gap (CLIP − scratch)",
               "CLIP params", "Scratch params"]
    return markdown_table(headers, rows, optional=("CLIP top-5",))


def trainable_params(group: RunGroup) -> str:
    """Trainable parameters; with staged unfreezing, the count from each stage's first epoch on."""
    stages = group.runs[0].efficiency.get("trainable_params_per_stage")
    if isinstance(stages, dict) and stages:
        try:
            ordered = sorted(stages.items(), key=lambda item: int(item[0]))
            return " → ".join(f"{int(count):,} (ep {epoch})" for epoch, count in ordered)
        except (TypeError, ValueError):
            pass  # malformed stage table: fall back to the plain count
    return fmt_number(group.params())


def transfer(groups: list[RunGroup]) -> str:
    """Every ResNet18 run (regime or freeze option = variant) with its cost and test metrics."""
    resnets = [g for g in groups if g.model == "ResNet18"]
    if not resnets:
        return not_run("no ResNet18 transfer-learning run")
    rows = [[g.base_experiment, g.dataset, g.variant or "baseline", fmt_text(g.efficiency("device")),
             fmt_text(g.efficiency("precision")), fmt_number(g.efficiency("epochs")),
             fmt_number(g.efficiency("train_samples_per_epoch")), trainable_params(g),
             fmt_duration(g.efficiency("fit_seconds")), fmt_number(g.efficiency("throughput_images_per_s")),
             fmt_number(g.efficiency("peak_memory_mb")), fmt_percent(g.metric("acc")),
             fmt_percent(g.metric("precision_macro")), fmt_percent(g.metric("recall_macro")),
             fmt_percent(g.metric("f1_macro"))] for g in resnets]
    headers = ["Experiment", "Dataset", "Variant", "Device", "Precision", "Epochs", "Samples/epoch",
               "Trainable params", "Wall-clock", "Images/s", "Peak memory (MB)", "Test acc", "Macro P", "Macro R",
               "Macro F1"]
    return markdown_table(headers, rows, optional=("Images/s", "Peak memory (MB)"))


def training_cost(groups: list[RunGroup]) -> str:
    """Hardware and wall-clock time of every run, for the reflection on GPUs."""
    if not groups:
        return not_run("no run")
    rows = [[g.experiment, fmt_text(g.efficiency("device")), fmt_text(g.efficiency("precision")),
             fmt_number(g.efficiency("epochs")), fmt_duration(g.efficiency("fit_seconds")),
             fmt_number(g.efficiency("throughput_images_per_s"))] for g in groups]
    return markdown_table(["Experiment", "Device", "Precision", "Epochs", "Wall-clock", "Images/s"], rows,
                          optional=("Images/s",))


def summary(groups: list[RunGroup]) -> str:
    """One row per experiment; 'Test acc' is the best checkpoint's, else the final, else the last (see From)."""
    rows = []
    for g in groups:
        total, trainable = fmt_number(g.params("total")), fmt_number(g.params("trainable"))
        params = total if trainable in (total, MISSING) else f"{total} ({trainable} trainable)"
        seeds = ", ".join(str(run.seed) for run in g.runs if run.seed is not None) or MISSING
        rows.append([g.experiment, g.dataset, g.model, params, seeds, fmt_percent(g.metric("acc")),
                     fmt_text(g.values(lambda run: run.source)), fmt_percent(g.values(lambda run: run.best_acc)),
                     fmt_percent(g.values(lambda run: run.last_acc)), g.run_dirs()])
    return markdown_table(["Experiment", "Dataset", "Model", "Params", "Seeds", "Test acc", "From", "Best ckpt acc",
                           "Last ckpt acc", "Run dir"], rows)


def headline(groups: list[RunGroup]) -> str:
    """'MLP 25.10%, CNN 61.00%, CLIP zero-shot 61.70%' from the best baseline of each kind."""
    parts = []
    for label, models in (("MLP", MLP_MODELS), ("CNN", CNN_MODELS), ("CLIP zero-shot", ("CLIPZeroShot",))):
        best = max((g for g in groups if g.variant is None and g.model in models), key=RunGroup.mean_acc, default=None)
        parts.append(f"{label} {fmt_percent(best.metric('acc')) if best else NOT_RUN}")
    return ", ".join(parts)
