# Regress stage: steering success on autointerp score by regularization condition, the summary of every
# claim, its plots, and the items `snakemake --report results/report.html` gathers.

REGRESS_INPUTS = EXPERIMENT.regress_inputs()
# Claim 1: the digits grid cells' match outputs (labelled by variant name) and the digits stage's verdict.
REGRESS_DIGITS_INPUTS = EXPERIMENT.digits_regress_inputs()
rule regress:
    """Regressions of steering success on interp score, per-claim tables, plots and the results summary."""
    input:
        lm=input_files(REGRESS_INPUTS),
        digits=input_files(REGRESS_DIGITS_INPUTS),
        digits_summary=[LAYOUT.digits_file("summary")] if REGRESS_DIGITS_INPUTS else [],
        judge_accuracy=LAYOUT.judge_file("accuracy"),
        claim4_markdown=[LAYOUT.claim4_file("markdown")] if CLAIM4_ACTIVE else [],
    output:
        coefficients=regress_output("coefficients"),
        summary=regress_output("summary"),
        summary_html=regress_output("summary_html"),
        steering_success=regress_output("steering_success"),
        shared_fraction=regress_output("shared_fraction"),
        autointerp=regress_output("autointerp"),
        claim4=regress_output("claim4"),
        k_robustness=regress_output("k_robustness"),
        plot_shared_fraction=regress_output("plot_shared_fraction"),
        plot_steering_success=regress_output("plot_steering_success"),
        plot_success_vs_interp=regress_output("plot_success_vs_interp"),
        plot_training_curves=regress_output("plot_training_curves"),
        plot_k_robustness=regress_output("plot_k_robustness"),
        plot_probing=regress_output("plot_probing"),
        plot_reappearance=regress_output("plot_reappearance"),
        reappearance=regress_output("reappearance"),
    params:
        layout=REGRESS_INPUTS,
        digits_layout=REGRESS_DIGITS_INPUTS,
        settings=config["regress"],
    log:
        LAYOUT.log("regress"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/regress.py"


ALL_TARGETS.extend([rules.regress.output.summary, rules.regress.output.summary_html, rules.regress.output.coefficients])
