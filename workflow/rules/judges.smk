# Judge accuracy: every judge the run uses (embedding, in-process language model), scored on held-out
# labelled cases, so the summary states how often its judges are right.


rule judge_accuracy:
    """Score the run's judges on the held-out labelled cases (detection, ranking, steering comparisons)."""
    input:
        lm_model=lm_judge_inputs("lm" in measured_judges()),
    output:
        accuracy=LAYOUT.judge_file("accuracy"),
    params:
        judges=measured_judges(),
        embedding_threshold=config["steer"]["embedding_threshold"],
        lm_judge=config.get("lm_judge", {}) if "lm" in measured_judges() else None,
        lm_model=lm_judge_model_param("lm" in measured_judges()),
    log:
        LAYOUT.log("judge_accuracy"),
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/judge_accuracy.py"
