# Regress stage: steering success on autointerp score by regularization condition, the summary of every
# claim, its plots, and the items `snakemake --report results/report.html` gathers.

from sae_pipeline.config import condition_label


def regress_layout():
    """Per language-model variant: its condition label and the outputs of the stages the summary reads."""
    evaluate_seed = config["evaluate"]["seed"]
    layout = {}
    for variant, settings in variants("lm").items():
        evaluate_folder = f"{RESULTS}/lm/evaluate/{variant}/seed{evaluate_seed}"
        layout[variant] = {
            "condition": condition_label(settings),
            "match_summary": f"{RESULTS}/lm/match/{variant}/summary.json",
            "match_features": f"{RESULTS}/lm/match/{variant}/features.parquet",
            "autointerp_scores": f"{RESULTS}/lm/autointerp/{variant}/seed{config['autointerp']['seed']}/scores.parquet",
            "steer_rows": f"{RESULTS}/lm/steer/{variant}/seed{config['steer']['seed']}/rows.parquet",
            "evaluate_metrics": f"{evaluate_folder}/metrics.json",
            "evaluate_k_robustness": f"{evaluate_folder}/k_robustness.csv",
            "evaluate_probing": f"{evaluate_folder}/probing.csv",
            "sae_group_dirs": sae_group_dirs("lm", variant),
        }
    return layout


def layout_files(layout):
    """Every path in a regress layout (the rule's input), in a stable order."""
    files = []
    for entry in layout.values():
        for key, value in entry.items():
            if key != "condition":
                files.extend(value if isinstance(value, list) else [value])
    return files


REGRESS = f"{RESULTS}/lm/regress"


rule regress:
    """Regressions of steering success on interp score, per-claim tables, plots and the results summary."""
    input:
        layout_files(regress_layout()),
    output:
        coefficients=report(f"{REGRESS}/coefficients.csv", caption="../report/coefficients.rst", category="Claim 3: interp score predicts steering"),
        summary=f"{REGRESS}/summary.md",
        summary_html=report(f"{REGRESS}/summary.html", caption="../report/summary.rst", category="Summary"),
        steering_success=f"{REGRESS}/steering_success.csv",
        shared_fraction=f"{REGRESS}/shared_fraction.csv",
        autointerp=f"{REGRESS}/autointerp.csv",
        claim4=f"{REGRESS}/claim4.csv",
        k_robustness=f"{REGRESS}/k_robustness.csv",
        plot_shared_fraction=report(f"{REGRESS}/plots/shared_fraction.png", caption="../report/shared_fraction.rst", category="Claim 2: stability and steering"),
        plot_steering_success=report(f"{REGRESS}/plots/steering_success.png", caption="../report/steering_success.rst", category="Claim 2: stability and steering"),
        plot_success_vs_interp=report(f"{REGRESS}/plots/success_vs_interp.png", caption="../report/success_vs_interp.rst", category="Claim 3: interp score predicts steering"),
        plot_training_curves=report(f"{REGRESS}/plots/training_curves.png", caption="../report/training_curves.rst", category="Training"),
        plot_k_robustness=report(f"{REGRESS}/plots/k_robustness.png", caption="../report/k_robustness.rst", category="Claim 4: Top-k regularizers"),
        plot_probing=report(f"{REGRESS}/plots/probing.png", caption="../report/probing.rst", category="Claim 4: Top-k regularizers"),
    params:
        layout=regress_layout(),
        settings=config["regress"],
    log:
        f"{RESULTS}/logs/regress.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/regress.py"


ALL_TARGETS.extend([rules.regress.output.summary, rules.regress.output.summary_html, rules.regress.output.coefficients])
