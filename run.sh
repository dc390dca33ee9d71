#!/usr/bin/env bash
# One command to set up and run: ./run.sh experiment | tests | plan | setup [extra arguments for snakemake/pytest]
#
#   experiment  set up, then run the default experiment (snakemake on every core, one GPU slot per GPU)
#   tests       set up, then run the test suite (python -m pytest -q tests)
#   plan        set up, then show the default experiment's jobs (snakemake --dry-run)
#   setup       only set up
#
# Setup: Debian packages (bible-kjv wordnet-base fortunes; apt-get as root, else the exact command is
# printed), a virtual environment .venv (no system site packages: Debian's python3 -m pip refuses to
# install into the system, PEP 668), PyTorch first (the CPU build where nvidia-smi is missing, so pip
# never pulls 3 GB of CUDA packages onto a machine without a GPU; the CUDA build otherwise), then this
# project with its extras. Each step is skipped when already done, so a second call starts at once.
#
# Environment: SAE_VENV (folder, default .venv), SAE_TORCH_VERSION (default 2.13.0),
# SAE_TORCH_CPU_INDEX (where CPU wheels come from; empty = pip's configured indexes only),
# SAE_EXTRAS (project extras, overriding the per-command default), SAE_RUN_PRINT_ONLY=1 (print the
# commands instead of running them).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${SAE_VENV:-.venv}
TORCH_VERSION=${SAE_TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${SAE_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
DEBIAN_PACKAGES=(bible-kjv wordnet-base fortunes)

run() {
    if [[ ${SAE_RUN_PRINT_ONLY:-0} == 1 ]]; then
        echo "+ $*"
    else
        "$@"
    fi
}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

gpu_count() {
    if has_gpu; then nvidia-smi -L | grep -c '^GPU'; else echo 1; fi
}

install_debian_packages() {
    local missing=()
    for package in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -eq 0 ]]; then
        run apt-get update -qq
        run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "run.sh: missing Debian packages ${missing[*]}; install them with:" >&2
        echo "    sudo apt-get install -y ${missing[*]}" >&2
        [[ ${SAE_RUN_PRINT_ONLY:-0} == 1 ]] || exit 1
    fi
}

install_python_packages() {
    local extras=$1 python="$VENV/bin/python"
    [[ -x $python ]] || run python3 -m venv "$VENV"
    if ! "$python" -c "import torch" 2>/dev/null || [[ ${SAE_RUN_PRINT_ONLY:-0} == 1 ]]; then
        if has_gpu || [[ -z $TORCH_CPU_INDEX ]]; then
            run "$python" -m pip install -q "torch==$TORCH_VERSION"
        else
            run "$python" -m pip install -q "torch==$TORCH_VERSION" --extra-index-url "$TORCH_CPU_INDEX"
        fi
    fi
    run "$python" -m pip install -q -e ".[$extras]"
}

# Extras per command: the Gemma model for the experiment; test tools and the Slurm plugin for the tests,
# plus Triton's CPU interpreter where there is no GPU (CUDA builds of torch bring their own Triton).
default_extras() {
    case $1 in
        experiment | plan) echo gemma ;;
        tests) if has_gpu; then echo test,slurm; else echo test,slurm,interpreter; fi ;;
        setup) if has_gpu; then echo gemma,test,slurm; else echo gemma,test,slurm,interpreter; fi ;;
    esac
}

command=${1:-}
case $command in
    experiment | tests | plan | setup) shift ;;
    *)
        sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac

install_debian_packages
install_python_packages "${SAE_EXTRAS:-$(default_extras "$command")}"
export PATH="$PWD/$VENV/bin:$PATH"  # the tests call snakemake by name
case $command in
    experiment) run snakemake --cores "$(nproc)" --resources gpu="$(gpu_count)" "$@" ;;
    plan) run snakemake --dry-run --cores "$(nproc)" --resources gpu="$(gpu_count)" "$@" ;;
    tests) run python -m pytest -q tests "$@" ;;
    setup) ;;
esac
