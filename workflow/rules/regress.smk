# Regress stage: steering success on autointerp score by regularization condition, the summary of every
# claim, its plots, and the items `snakemake --report results/report.html` gathers.

from sae_pipeline.config import condition_label
from sae_pipeline.regress import layout_files, variant_layout

REGRESS = f"{RESULTS}/lm/regress"
# Per language-model variant: its condition label and the outputs of the stages the summary reads.
REGRESS_LAYOUT = {
    variant: variant_layout(
        RESULTS,
        variant,
        condition_label(settings),
        {"autointerp": config["autointerp"]["seed"], "steer": config["steer"]["seed"], "evaluate": config["evaluate"]["seed"]},
        sae_group_dirs("lm", variant),
    )
    for variant, settings in variants("lm").items()
}
# Claim 1: the digits grid cells' match outputs (labelled by variant name) and the digits stage's verdict.
REGRESS_DIGITS_LAYOUT = {
    variant: {
        "condition": variant,
        "match_features": f"{RESULTS}/digits/match/{variant}/features.parquet",
        "match_summary": f"{RESULTS}/digits/match/{variant}/summary.json",
    }
    for variant in (variants("digits") if "digits" in config else {})
}


rule regress:
    """Regressions of steering success on interp score, per-claim tables, plots and the results summary."""
    input:
        lm=layout_files(REGRESS_LAYOUT),
        digits=layout_files(REGRESS_DIGITS_LAYOUT),
        digits_summary=[f"{RESULTS}/digits/stability_summary.json"] if REGRESS_DIGITS_LAYOUT else [],
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
        layout=REGRESS_LAYOUT,
        digits_layout=REGRESS_DIGITS_LAYOUT,
        settings=config["regress"],
    log:
        f"{RESULTS}/logs/regress.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/regress.py"


ALL_TARGETS.extend([rules.regress.output.summary, rules.regress.output.summary_html, rules.regress.output.coefficients])
