"""The feature browser: records gathered from stage outputs in the stages' file formats, the site written
from them, and the site driven in headless Chromium from file:// URLs with every other request failing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sae_pipeline.browser.records import contexts_of, gather_records, page_features, steering_success
from sae_pipeline.browser.site import build_site, chunk_pages, script_literal
from sae_pipeline.browser import CHROMIUM_ARGS
from sae_pipeline.browser import DEBIAN_CHROMIUM as CHROMIUM
from sae_pipeline.features.mining import ContextSet, FeatureExamples
from sae_pipeline.layout import ResultsLayout
from sae_pipeline.settings import BrowserSettings

SEEDS = (0, 1, 2)
N_FEATURES = 12
VARIANTS = {"topk-k4-l2w0-noreg": "l2w0+noreg", "topk-k4-l2w1e-03-noreg": "l2w1e-03+noreg"}
SETTINGS = BrowserSettings(max_feature_pages=5, top_contexts=2, quantile_contexts=1, n_quantiles=2, chunk_size=2)
SHOTS = Path("/work/scratch/browser_shots")


def match_features_table() -> pd.DataFrame:
    """A reference-seed match table like the match stage's: feature f's share count is f % 4 (3 = always);
    its partner in seed s is (f + s) % N_FEATURES; feature 11 is dead (share count 0)."""
    rows = []
    for feature in range(N_FEATURES):
        share_count = 0 if feature == 11 else feature % 4
        row = {
            "seed": 0,
            "feature": feature,
            "included": feature != 11,
            "dead": feature == 11,
            "firing_frequency": 0.001 * (feature + 1),
            "share_count": share_count,
            "direct_share_count": share_count,
            "category": "dead" if feature == 11 else {0: "never", 3: "always"}.get(share_count, "sometimes"),
        }
        for seed in SEEDS[1:]:
            row |= {
                f"decoder_partner_seed{seed}": (feature + seed) % N_FEATURES,
                f"decoder_cosine_seed{seed}": 0.5 + 0.04 * feature,
                f"encoder_partner_seed{seed}": (feature + seed) % N_FEATURES,
                f"encoder_cosine_seed{seed}": 0.4 + 0.04 * feature,
                f"max_decoder_cosine_seed{seed}": 0.5 + 0.04 * feature,
                f"max_encoder_cosine_seed{seed}": 0.4 + 0.04 * feature,
            }
        row |= {"shared_seeds0-1": share_count >= 2, "shared_seeds0-2": share_count == 3, "shared_seeds1-2": False}
        rows.append(row)
    return pd.DataFrame(rows)


def write_stage_outputs(root: Path) -> ResultsLayout:
    """Match, autointerp, steer and evaluate outputs of two variants in the files and columns those stages write."""
    layout = ResultsLayout(str(root))
    for variant in VARIANTS:
        for path in (
            layout.match_file("lm", variant, "features"),
            layout.autointerp_file(variant, 0, "scores"),
            layout.steer_file(variant, 0, "rows"),
            layout.evaluate_file(variant, 0, "latents"),
        ):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        match_features_table().to_parquet(layout.match_file("lm", variant, "features"))
        summary = {
            "seeds": list(SEEDS),
            "reference_seed": 0,
            "threshold": 0.7,
            "mean_over_pairs": {"mmcs_decoder": 0.61, "fraction_shared": 0.25},
            "reference_counts": {"always": 3, "sometimes": 5, "never": 3, "dead": 1},
        }
        Path(layout.match_file("lm", variant, "summary")).write_text(json.dumps(summary))
        pd.DataFrame(
            {
                "feature": [2, 3, 7],
                "category": ["sometimes", "always", "always"],
                "share_count": pd.array([2, 3, 3], dtype="Int64"),
                "explanation": ["cats and dogs", "the word </script>", "sheep"],
                "detection_score": [0.9, 0.7, 0.55],
                "fuzzing_score": [0.8, 0.6, 0.5],
                "n_examples": [20, 20, 20],
                "tokens_spent": [0, 0, 0],
                "judge_model": ["offline"] * 3,
                "backend": ["offline"] * 3,
                "failures": ["[]"] * 3,
            }
        ).to_parquet(layout.autointerp_file(variant, 0, "scores"))
        pd.DataFrame(
            {
                "feature": [3, 3, 3, 7, 7],
                "category": ["always"] * 5,
                "share_count": pd.array([3] * 5, dtype="Int64"),
                "interp_score": [0.7] * 3 + [0.55] * 2,
                "fuzzing_score": [0.6] * 5,
                "explanation": ["x"] * 5,
                "prompt": ["In recent years,", "A common example of", "Many people", "In recent years,", "A common example of"],
                "original": ["plain text"] * 5,
                "steered": ["steered text"] * 5,
                "strength": [8.0] * 5,
                "strength_mode": ["resid_rms"] * 5,
                "embedding_score": [0.3, 0.1, 0.2, 0.0, 0.4],
                "embedding_success": pd.array([True, False, True, False, False], dtype="boolean"),
                "lm_score": [np.nan] * 5,
                "lm_success": pd.array([None] * 5, dtype="boolean"),
                "sampling_seed": [0] * 5,
                "greedy": [False] * 5,
            }
        ).to_parquet(layout.steer_file(variant, 0, "rows"))
        pd.DataFrame({"latent": range(N_FEATURES), "top_token": [f" tok{feature}" for feature in range(N_FEATURES)]}).to_parquet(
            layout.evaluate_file(variant, 0, "latents")
        )
    return layout


def fake_miner(sae_folder: str, features: list[int]) -> dict[int, dict]:
    """Contexts named after the SAE's seed and the feature: ``seed<s>f<f>`` fires at strength f + 1."""
    seed = Path(sae_folder).name
    return {
        feature: {
            "top": [
                {"tokens": ["The", f" {seed}f{feature}", " end"], "activations": [0.0, float(feature + 1), 0.25 * (feature + 1)]}
            ],
            "quantiles": [[{"tokens": ["low", f" q{feature}"], "activations": [0.0, 0.5]}], []],
            "max_activation": float(feature + 1),
            "n_firing_tokens": 10 * (feature + 1),
        }
        for feature in features
    }


def browser_inputs(layout: ResultsLayout, variant: str) -> dict:
    return {
        "variant": variant,
        "condition": VARIANTS[variant],
        "match_features": layout.match_file("lm", variant, "features"),
        "match_summary": layout.match_file("lm", variant, "summary"),
        "match_histogram": layout.match_file("lm", variant, "histogram"),
        "autointerp_scores": layout.autointerp_file(variant, 0, "scores"),
        "steer_rows": layout.steer_file(variant, 0, "rows"),
        "evaluate_latents": layout.evaluate_file(variant, 0, "latents"),
        "sae_dirs": {str(seed): layout.sae_dir("lm", variant, "seeds0-1-2", seed) for seed in SEEDS},
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site of two synthetic variants; returns the path of index.html."""
    root = tmp_path_factory.mktemp("browser") / "results"
    layout = write_stage_outputs(root)
    records = [gather_records(browser_inputs(layout, variant), SETTINGS, ["lm", "embedding"], fake_miner) for variant in VARIANTS]
    index = Path(layout.browser_file("index"))
    build_site(records, index, SETTINGS)
    return index


def test_steering_success_takes_the_first_judge_with_verdicts():
    rows = pd.DataFrame(
        {
            "feature": [3, 3, 3, 7],
            "lm_success": pd.array([None] * 4, dtype="boolean"),
            "embedding_success": pd.array([True, False, True, False], dtype="boolean"),
        }
    )
    rates, judge = steering_success(rows, ["lm", "embedding"])
    assert judge == "embedding" and rates == pytest.approx({3: 2 / 3, 7: 0.0})


def test_records_list_every_feature_and_give_pages_to_studied_features_first(tmp_path):
    layout = write_stage_outputs(tmp_path)
    variant = next(iter(VARIANTS))
    records = gather_records(browser_inputs(layout, variant), SETTINGS, ["lm", "embedding"], fake_miner)
    rows = {row[0]: dict(zip(records["list"]["columns"], row)) for row in records["list"]["rows"]}
    assert len(rows) == N_FEATURES
    assert (
        rows[3]["interp_score"] == 0.7
        and rows[3]["steering_success"] == pytest.approx(2 / 3, abs=1e-4)
        and rows[3]["category"] == "always"
    )
    assert rows[0]["interp_score"] is None and rows[0]["steering_success"] is None
    # explained or steered first: 7, 3 (share count 3; frequency 0.008 > 0.004), 2 (share count 2); then the
    # others by share count and frequency: 10, 6 (share count 2); the dead 11 never
    assert list(records["pages"]) == ["7", "3", "2", "10", "6"]
    page = records["pages"]["3"]
    assert page["explanation"] == "the word </script>" and page["fuzzing_score"] == 0.6 and page["top_token"] == " tok3"
    assert [(partner["seed"], partner["feature"], partner["shared"]) for partner in page["partners"]] == [
        (1, 4, True),
        (2, 5, True),
    ]
    assert (
        page["partners"][0]["decoder_cosine"] == pytest.approx(0.62)
        and page["partners"][1]["contexts"]["top"][0]["tokens"][1] == " seed2f5"
    )
    assert len(page["steering"]) == 3 and page["steering"][0]["judges"]["embedding"] == {"score": 0.3, "success": True}


def test_page_order_skips_dead_latents_and_caps_the_count():
    table = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3],
            "category": ["dead", "never", "always", "never"],
            "share_count": [0, 0, 3, 0],
            "firing_frequency": [0.0, 0.2, 0.01, 0.3],
            "interp_score": [None, None, None, 0.5],
            "steering_success": [None] * 4,
        }
    )
    assert page_features(table, 3) == [3, 2, 1]
    assert page_features(table, 1) == [3]


def test_contexts_of_shows_top_contexts_and_one_draw_per_quantile():
    sequences = np.arange(40, dtype=np.int64).reshape(4, 10)
    sampled = ContextSet(
        np.array([0, 1, 2, 3]), np.array([2, 2, 2, 2]), np.array([[0, 1, 0], [0, 2, 0], [0, 3, 0], [0, 4, 0]], dtype=np.float32)
    )
    top = ContextSet(np.array([3, 2, 1]), np.array([0, 4, 4]), np.array([[0, 9, 1], [0, 8, 0], [7, 0, 0]], dtype=np.float32))
    examples = FeatureExamples(
        5, top, sampled, ContextSet(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.float32)), 11, 9.0
    )
    shown = contexts_of(examples, sequences, lambda token: f"<{token}>", SETTINGS, 0)
    # top context of doc 3 starts at 0: slot 0 is BOS and dropped, so tokens 31, 32 with activations 9, 1
    assert shown["top"] == [
        {"tokens": ["<31>", "<32>"], "activations": [9.0, 1.0]},
        {"tokens": ["<24>", "<25>", "<26>"], "activations": [0.0, 8.0, 0.0]},
    ]
    assert len(shown["quantiles"]) == 2 and [len(part) for part in shown["quantiles"]] == [1, 1]
    low, high = (max(part[0]["activations"]) for part in shown["quantiles"])
    assert low in (1.0, 2.0) and high in (3.0, 4.0)
    assert shown["max_activation"] == 9.0 and shown["n_firing_tokens"] == 11


def test_site_files_chunks_and_safe_literals(site):
    data = site.parent / "data"
    assert sorted(path.name for path in (data / "topk-k4-l2w0-noreg").iterdir()) == [
        "chunk-0.js",
        "chunk-1.js",
        "chunk-2.js",
        "list.js",
    ]
    assert [list(chunk) for chunk in chunk_pages({"a": 1, "b": 2, "c": 3}, 2)] == [["a", "b"], ["c"]]
    assert "</script>" not in (data / "topk-k4-l2w0-noreg" / "chunk-0.js").read_text()
    assert script_literal("</script>") == '"<\\/script>"'
    assert (site.parent / "feature.html").exists()


# ----------------------------------------------------------------------------------------------
# In headless Chromium


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class GuardedPage:
    """A page that records console errors, page errors and every request that is not a file:// URL (aborted)."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.network: list[str] = []
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on(
            "request",
            lambda request: None if request.url.startswith(("file://", "data:", "about:")) else self.network.append(request.url),
        )
        self.page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://") else route.abort())

    def check_clean(self):
        assert self.errors == [] and self.network == []


def shown_ids(page) -> list[int]:
    return [
        int(value) for value in page.locator("#features tbody tr").evaluate_all("rows => rows.map(row => row.dataset.feature)")
    ]


def test_index_loads_searches_and_sorts_offline(site, browser):
    guarded = GuardedPage(browser)
    page = guarded.page
    page.goto(site.as_uri())
    page.wait_for_selector("#features tbody tr")
    assert page.locator("#figures").inner_text().count("mmcs_decoder") == 1
    # default order: share count descending, ties by id: 3, 7 (3); 2, 6, 10 (2); ...
    assert shown_ids(page)[:5] == [3, 7, 2, 6, 10] and len(shown_ids(page)) == N_FEATURES
    page.fill("#search", "sheep")
    assert shown_ids(page) == [7]
    page.fill("#search", "always")
    assert sorted(shown_ids(page)) == [3, 7]
    page.fill("#search", "")
    page.click("th[data-column=firing_frequency]")  # first click on a number column sorts descending
    assert shown_ids(page)[:3] == [11, 10, 9]
    page.click("th[data-column=firing_frequency]")
    assert shown_ids(page)[:3] == [0, 1, 2]
    page.select_option("#variant", "topk-k4-l2w1e-03-noreg")
    page.wait_for_function("document.querySelector('h2').textContent.includes('l2w1e-03')")
    assert len(shown_ids(page)) == N_FEATURES
    guarded.check_clean()
    page.close()


def test_feature_page_shows_highlighted_contexts_and_partners_offline(site, browser):
    guarded = GuardedPage(browser)
    page = guarded.page
    page.goto(site.as_uri())
    page.wait_for_selector("#features tbody tr")
    page.click("#features a >> text='3'")
    page.wait_for_selector(".partner")
    assert "feature.html" in page.url
    own = page.locator("#own")
    assert "the word </script>" in own.inner_text()
    active = own.locator(".tok.active")
    assert active.count() == 3  # top context: two firing tokens; quantile context: one
    strongest = active.first.evaluate("span => getComputedStyle(span).backgroundColor")
    weaker = active.nth(1).evaluate("span => getComputedStyle(span).backgroundColor")
    assert strongest == "rgb(255, 120, 0)" and weaker.startswith("rgba(255, 120, 0, 0.")  # strength 4 of 4, then 1 of 4
    partners = page.locator(".partner")
    assert partners.count() == 2
    assert "partner 4" in partners.nth(0).inner_text() and "seed1f4" in partners.nth(0).inner_text()
    assert "seed2f5" in partners.nth(1).inner_text() and "0.620" in partners.nth(0).inner_text()
    assert page.locator("#steering tr").count() == 1 + 3
    guarded.check_clean()
    page.close()


def test_screenshots_of_the_synthetic_site(site, browser):
    """Screenshots for the closing note (written only where /work/scratch exists)."""
    if not SHOTS.parent.exists():
        pytest.skip("no /work/scratch")
    SHOTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(site.as_uri())
    page.wait_for_selector("#features tbody tr")
    page.screenshot(path=str(SHOTS / "synthetic_index.png"), full_page=True)
    page.goto(f"{site.parent.as_uri()}/feature.html?v=topk-k4-l2w0-noreg&f=3")
    page.wait_for_selector(".partner")
    page.screenshot(path=str(SHOTS / "synthetic_feature.png"), full_page=True)
    page.close()
    assert (SHOTS / "synthetic_feature.png").stat().st_size > 0
