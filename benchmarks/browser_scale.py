"""Feature browser at scale: site size and build time for a synthetic experiment of 16k latents x 3 seeds.

Writes match, autointerp, steer and evaluate outputs in the stages' formats for one variant (random
numbers), gathers the records with a stand-in miner that returns contexts of the real shape (window of
``autointerp.mining`` size: 17 tokens; ``top_contexts`` + ``n_quantiles`` x ``quantile_contexts`` per
feature and per partner), and builds the site. Mining itself is not timed here: it is one streaming pass
over the cache per seed (``browser_condition`` logs it; about 10 s per seed for 2048 latents x 400k tokens
on 2 CPU cores). Prints one line per page count::

    python benchmarks/browser_scale.py --latents 16384 --pages 200 16384
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from sae_pipeline.browser.records import gather_records
from sae_pipeline.browser.site import build_site
from sae_pipeline.layout import ResultsLayout
from sae_pipeline.settings import BrowserSettings

SEEDS = (0, 1, 2)
VARIANT = "topk-k32-l2w0-noreg"
WINDOW = 17


def write_outputs(layout: ResultsLayout, n_latents: int, rng: np.random.Generator) -> None:
    """Random stage outputs of one variant: every latent in the match table, 10% explained, 1% steered (8 prompts)."""
    share = rng.integers(0, 4, n_latents)
    features = pd.DataFrame(
        {
            "seed": 0,
            "feature": np.arange(n_latents),
            "included": True,
            "dead": False,
            "firing_frequency": rng.random(n_latents) * 0.01,
            "share_count": share,
            "direct_share_count": share,
            "category": np.select([share == 3, share == 0], ["always", "never"], "sometimes"),
        }
    )
    for seed in SEEDS[1:]:
        for kind in ("decoder", "encoder"):
            features[f"{kind}_partner_seed{seed}"] = rng.integers(0, n_latents, n_latents)
            features[f"{kind}_cosine_seed{seed}"] = rng.random(n_latents)
    for low, high in ((0, 1), (0, 2), (1, 2)):
        features[f"shared_seeds{low}-{high}"] = share >= 2
    paths = {
        "match": layout.match_file("lm", VARIANT, "features"),
        "scores": layout.autointerp_file(VARIANT, 0, "scores"),
        "rows": layout.steer_file(VARIANT, 0, "rows"),
        "latents": layout.evaluate_file(VARIANT, 0, "latents"),
    }
    for path in paths.values():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    features.to_parquet(paths["match"])
    summary = {
        "seeds": list(SEEDS),
        "reference_seed": 0,
        "threshold": 0.7,
        "mean_over_pairs": {"mmcs_decoder": 0.5},
        "reference_counts": {"always": int((share == 3).sum())},
    }
    Path(layout.match_file("lm", VARIANT, "summary")).write_text(json.dumps(summary))
    explained = rng.choice(n_latents, n_latents // 10, replace=False)
    pd.DataFrame(
        {
            "feature": explained,
            "explanation": [f"explanation of {feature}" for feature in explained],
            "detection_score": rng.random(len(explained)),
            "fuzzing_score": rng.random(len(explained)),
        }
    ).to_parquet(paths["scores"])
    steered = np.repeat(explained[: n_latents // 100], 8)
    pd.DataFrame(
        {
            "feature": steered,
            "prompt": "In recent years,",
            "original": "an unsteered continuation " * 4,
            "steered": "a steered continuation " * 4,
            "strength": 100.0,
            "embedding_score": rng.random(len(steered)),
            "embedding_success": rng.random(len(steered)) > 0.5,
        }
    ).to_parquet(paths["rows"])
    pd.DataFrame({"latent": np.arange(n_latents), "top_token": " the"}).to_parquet(paths["latents"])


def stand_in_miner(settings: BrowserSettings, rng: np.random.Generator):
    """Contexts of the shape mining returns: ``top_contexts`` top and ``quantile_contexts`` per quantile, WINDOW tokens each."""

    def context() -> dict:
        return {
            "tokens": [f" tok{index}" for index in rng.integers(0, 5000, WINDOW)],
            "activations": np.round(rng.random(WINDOW) * 10, 3).tolist(),
        }

    def miner(sae_folder: str, features: list[int]) -> dict:
        return {
            feature: {
                "top": [context() for _ in range(settings.top_contexts)],
                "quantiles": [[context() for _ in range(settings.quantile_contexts)] for _ in range(settings.n_quantiles)],
                "max_activation": 10.0,
                "n_firing_tokens": 100,
            }
            for feature in features
        }

    return miner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--pages", type=int, nargs="+", default=[200, 16384])
    arguments = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        layout = ResultsLayout(f"{folder}/results")
        write_outputs(layout, arguments.latents, rng)
        inputs = {
            "variant": VARIANT,
            "condition": "l2w0+noreg",
            "match_features": layout.match_file("lm", VARIANT, "features"),
            "match_summary": layout.match_file("lm", VARIANT, "summary"),
            "autointerp_scores": layout.autointerp_file(VARIANT, 0, "scores"),
            "steer_rows": layout.steer_file(VARIANT, 0, "rows"),
            "evaluate_latents": layout.evaluate_file(VARIANT, 0, "latents"),
            "sae_dirs": {str(seed): f"{folder}/seed{seed}" for seed in SEEDS},
        }
        for pages in arguments.pages:
            settings = BrowserSettings(max_feature_pages=pages)
            started = time.perf_counter()
            records = gather_records(inputs, settings, ["embedding"], stand_in_miner(settings, rng))
            gathered = time.perf_counter()
            written = build_site([records], layout.browser_file("index"), settings)
            built = time.perf_counter()
            data = Path(layout.browser_file("data")) / VARIANT
            largest = max(path.stat().st_size for path in data.glob("chunk-*.js"))
            print(
                f"{arguments.latents} latents x {len(SEEDS)} seeds, {pages} pages: gather {gathered - started:.1f} s, site {built - gathered:.1f} s, "
                f"{written['files']} files, {written['bytes'] / 1e6:.1f} MB (list.js {(data / 'list.js').stat().st_size / 1e6:.2f} MB, "
                f"largest chunk {largest / 1e6:.2f} MB)"
            )


if __name__ == "__main__":
    main()
