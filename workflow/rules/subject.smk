# The text corpus and, for the offline default, the subject model trained on it.


rule export_corpus:
    """Write a local corpus (King James Bible from Debian's bible-kjv, or text files) as JSON lines."""
    output:
        documents=LAYOUT.corpus_documents(),
    params:
        corpus=config["corpus"],
    log:
        LAYOUT.log("export_corpus"),
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/export_corpus.py"


rule train_subject_model:
    """Train the small offline GPT-NeoX subject model and save it as a Hugging Face folder."""
    input:
        documents=corpus_documents_input(),
    output:
        model=directory(LAYOUT.subject_model()),
    params:
        corpus=config["corpus"],
        settings=config["subject_model"].get("train", {}),
    log:
        LAYOUT.log("train_subject_model"),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/train_subject_model.py"
