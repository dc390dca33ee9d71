# Claim-4 stage: the regularizer-strength sweep (workflow/configs/claim4.yaml). Only part of the run when the
# training grid sweeps a regularizer (at least two non-zero coefficients); reads every sweep variant's evaluate
# outputs on every evaluated seed. `snakemake ... claim4` runs just this and what it needs.

CLAIM4_INPUTS = EXPERIMENT.claim4_inputs()
CLAIM4_ACTIVE = bool(CLAIM4_INPUTS)
CLAIM4_PLOTS_BY_REGULARIZER = {
    regularizer: {plot: LAYOUT.claim4_plot(plot, regularizer) for plot in CLAIM4_PLOT_NAMES} for regularizer in CLAIM4_INPUTS
}


if CLAIM4_ACTIVE:

    rule claim4:
        """Per (regularizer, k, coefficient) seed means with 95% intervals, trade-off / k-robustness / probing
        figures per regularizer, and the largest harmless coefficient with the gains there."""
        input:
            evaluate=EXPERIMENT.claim4_input_files(),
        output:
            table=LAYOUT.claim4_file("table"),
            seeds=LAYOUT.claim4_file("seeds"),
            k_robustness=LAYOUT.claim4_file("k_robustness"),
            probing=LAYOUT.claim4_file("probing"),
            summary=LAYOUT.claim4_file("summary"),
            markdown=LAYOUT.claim4_file("markdown"),
            plots=[
                report(path, caption=f"../report/claim4_{plot}.rst", category="Claim 4: regularizer sweep", labels={"regularizer": regularizer, "figure": plot})
                for regularizer, paths in CLAIM4_PLOTS_BY_REGULARIZER.items()
                for plot, path in paths.items()
            ],
        params:
            layout=CLAIM4_INPUTS,
            plots=CLAIM4_PLOTS_BY_REGULARIZER,
            budgets=config["evaluate"]["probe"]["latent_budgets"],
        log:
            LAYOUT.log("claim4"),
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        conda:
            "../envs/sae-stability.yaml"
        script:
            "../scripts/claim4.py"

    ALL_TARGETS.extend([LAYOUT.claim4_file("summary"), LAYOUT.claim4_file("markdown")])
