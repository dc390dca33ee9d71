# sae-stability: how stable and how steerable are SAE features, and how does weight regularization
# change both? Stages: subject model -> cache -> train -> match -> autointerp -> steer -> regress
# (plus evaluate, and the digits stability experiment). Each rule calls one function of the
# sae_pipeline package through a one-line script in workflow/scripts/; no science lives here.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


wildcard_constraints:
    experiment="lm|digits",
    variant="[A-Za-z0-9_.+-]+",
    group="seeds[0-9-]+",
    seed="[0-9]+",


include: "workflow/rules/common.smk"
include: "workflow/rules/subject.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/autointerp.smk"
include: "workflow/rules/steer.smk"
include: "workflow/rules/match.smk"
include: "workflow/rules/digits.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/judges.smk"
include: "workflow/rules/claim4.smk"
include: "workflow/rules/regress.smk"
include: "workflow/rules/browser.smk"


rule all:
    default_target: True
    input:
        ALL_TARGETS,
