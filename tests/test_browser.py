"""A person in a browser: in the Prefect UI, open finetune/on-demand, fill the custom-run form, start the
run and watch it complete; then in the MLflow UI find the new model version and its run's metrics.

Debian's chromium (`apt-get install chromium`; `make test` installs it) driven by Playwright for Python,
headless, no browser download. Screenshots go to test-artifacts/browser/ (not committed)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stack_support import ROOT, running_stack, stack_config, write_support_jsonl

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
TIMEOUT_MS = 120_000  # a shared 2-core machine: the UIs can take a while to render


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            yield page
        finally:
            context.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("browser-stack")
    cfg = stack_config(tmp)
    with running_stack(cfg):
        yield {"cfg": cfg, "tmp": tmp}


def _label(text: str) -> str:
    return f"span[contains(@class,'schema-form-property__label') and normalize-space()='{text}']"


def field(scope: Any, *labels: str) -> Any:
    """The Prefect form property at the path of labels (section, then field), its own block only.

    A section is the block labelled so that holds the next label: `Deployment` is both a field of
    Training and a section of the config."""
    for i, label in enumerate(labels):
        holds_next = f"[.//{_label(labels[i + 1])}]" if i + 1 < len(labels) else ""
        scope = scope.locator(
            f"xpath=.//{_label(label)}/ancestor::div[contains(concat(' ',@class,' '),' p-label ')][1]{holds_next}"
        ).first
    return scope


def fill(page: Any, value: str, *labels: str) -> None:
    field(page, *labels).locator("textarea, input").first.fill(value)


def choose(page: Any, value: str, *labels: str) -> None:
    field(page, *labels).locator("button.p-select-button__control").click()
    page.keyboard.press("ArrowDown")  # opens the option list
    page.locator(".p-select-option").filter(has_text=value).first.click()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def run_from_prefect_ui(page: Any, prefect_url: str, form: dict[tuple[str, ...], str], choices: dict[tuple[str, ...], str]) -> str:
    """Deployments -> finetune/on-demand -> Run -> Custom run -> fill -> Submit -> the run's page until Completed."""
    from playwright.sync_api import expect

    page.goto(f"{prefect_url}/deployments")
    page.get_by_role("link", name="on-demand").first.wait_for()
    shot(page, "01-prefect-deployments")
    row = page.locator("tr", has=page.get_by_text("finetune", exact=True)).filter(has=page.get_by_role("link", name="on-demand"))
    row.get_by_role("link", name="on-demand").click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.get_by_text("Base Model (Optional)").wait_for()
    run_name = f"browser-{uuid.uuid4().hex[:6]}"
    page.locator("xpath=//*[normalize-space()='Run Name']/ancestor::div[contains(concat(' ',@class,' '),' p-label ')][1]").locator("input").fill(run_name)
    for labels, value in form.items():
        fill(page, value, *labels)
    for labels, value in choices.items():
        choose(page, value, *labels)
    shot(page, "02-prefect-custom-run-form")
    page.get_by_role("button", name="Submit").click()
    page.get_by_role("link", name=run_name).first.click()  # the new run (the deployment's run list may show it twice)
    page.wait_for_url("**/runs/flow-run/**", wait_until="commit")
    expect(page.locator(".state-badge").first).to_have_text("Completed", timeout=600_000)
    shot(page, "03-prefect-run-completed")
    return run_name


def test_a_run_started_from_the_prefect_ui_shows_up_in_the_mlflow_ui(stack: dict[str, Any], browser_page: Any, tiny_chatml: Path) -> None:
    from playwright.sync_api import expect

    cfg, tmp, page = stack["cfg"], stack["tmp"], browser_page
    shutil.rmtree(SHOTS, ignore_errors=True)
    model_name = "browser-support"
    form = {
        ("Data (Optional)", "Train File (Optional)"): str(write_support_jsonl(tmp / "train.jsonl", 24)),
        ("Data (Optional)", "Validation File (Optional)"): str(write_support_jsonl(tmp / "validation.jsonl", 8, offset=500)),
        ("Data (Optional)", "Min Examples (Optional)"): "4",
        ("Data (Optional)", "Docs Dir (Optional)"): str(tmp / "docs"),
        ("Model (Optional)", "Base Model (Optional)"): str(tiny_chatml),
        ("Training (Optional)", "Epochs (Optional)"): "1",
        ("Training (Optional)", "Batch Size (Optional)"): "4",
        ("Training (Optional)", "Lora R (Optional)"): "4",
        ("Training (Optional)", "Lora Alpha (Optional)"): "8",
        ("Training (Optional)", "Max Seq Length (Optional)"): "128",
        ("Training (Optional)", "Output Dir (Optional)"): str(tmp / "runs"),
        ("Evaluation (Optional)", "Max New Tokens (Optional)"): "8",
        ("Registry (Optional)", "Model Name (Optional)"): model_name,
        ("Registry (Optional)", "Experiment (Optional)"): "browser",
    }
    run_from_prefect_ui(page, cfg.prefect_url, form, {("Deployment (Optional)", "Target (Optional)"): "none"})

    page.goto(f"{cfg.mlflow_url}/#/models/{model_name}")
    version = page.get_by_role("link", name="Version 1")
    expect(version).to_be_visible()
    expect(page.get_by_text("@ challenger").first).to_be_visible()
    shot(page, "04-mlflow-registered-model")
    version.click()
    source_run = page.locator("a[href*='/runs/']").first  # "Source Run" of the version
    expect(source_run).to_be_visible()
    shot(page, "05-mlflow-model-version")
    source_run.click()
    metrics = page.get_by_text("Metrics (").first
    expect(metrics).to_be_visible()
    page.get_by_placeholder("Search metrics").fill("eval_loss")  # the candidate beside base (and champion)
    for metric in ("candidate_eval_loss", "base_eval_loss"):
        expect(page.get_by_text(metric, exact=True).first).to_be_visible()
    page.get_by_text("candidate_eval_loss", exact=True).first.scroll_into_view_if_needed()
    shot(page, "06-mlflow-run-metrics")
