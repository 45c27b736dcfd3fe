"""`hpc-infer report`, opened in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium loads the page from disk, finds the metrics table with
the values summary.json holds, every chart rendered, no console error, no network request."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import compose, need, sh


def graded_run(tmp_path: Path, name: str, right_every: int):
    """A run of the bundled MATH sample, n=4, its outputs written as a worker would; every
    `right_every`-th problem answered right twice. Merged by the console script."""
    from omegaconf import OmegaConf

    from hpc_infer.rundir import encode_chunk_output, read_chunk_records, read_json, write_atomic
    from hpc_infer.run.plan import plan_input, prepare

    rc = compose(
        f"output_root={tmp_path}/runs",
        "data=math_r1_zero",
        "cluster=local",
        "sampling.n=4",
        "merge.group_by=[level,type]",
        f"run_name={name}",
    )
    run, _ = prepare(rc, plan_input(rc), "/m", OmegaConf.to_yaml(OmegaConf.structured(rc)))
    for cid in range(read_json(run.manifest)["n_chunks"]):
        rows = []
        for r in read_chunk_records(run, cid):
            truth = r["fields"]["answer"]
            good = r["index"] % right_every == 0
            texts = [
                f"a </think> <answer>{truth if good else 0}</answer>",
                "b </think> <answer>1</answer>",
                "no format at all",
                f"c </think> <answer>{truth if good else 2}</answer>",
            ]
            rows.append(
                dict(
                    r,
                    text=texts[0],
                    prompt_tokens=9,
                    cached_tokens=3,  # vLLM's prefix-cache hits, as the offline engine reports them
                    output_tokens=40,
                    outputs=[
                        {"text": t, "num_tokens": 10 * (j + 1), "finish_reason": "length" if j == 2 else "stop"}
                        for j, t in enumerate(texts)
                    ],
                )
            )
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows, worker="w", started=1.0, finished=2.0 + cid))
    p = sh(tmp_path, f"hpc-infer merge {run.root}")
    assert p.returncode == 0, p.stderr
    return run


@pytest.fixture(scope="module")
def browser():
    webdriver = need("selenium.webdriver")
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chrome and driver):
        if os.environ.get("HPC_INFER_REQUIRE_SLURM") == "1":
            pytest.fail("chromium / chromium-driver missing in CI (scripts/setup.sh installs them)")
        pytest.skip("chromium / chromium-driver not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2000",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    b = webdriver.Chrome(service=Service(driver), options=opts)
    yield b
    b.quit()


def _open(browser, page: Path) -> dict:
    browser.get_log("performance")  # forget what came before
    browser.get(page.as_uri())
    requests = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requests if m.get("method") == "Network.requestWillBeSent"]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return {"urls": urls, "errors": errors}


def test_the_report_shows_what_summary_json_holds(tmp_path, browser):
    run = graded_run(tmp_path, "one", right_every=2)
    p = sh(tmp_path, f"hpc-infer report {run.root}")
    assert p.returncode == 0, p.stderr
    page = Path(p.stdout.strip())
    assert page == run.root / "report.html"
    seen = _open(browser, page)
    assert seen["errors"] == [], seen["errors"]
    assert all(u.startswith(("file:", "data:")) for u in seen["urls"]), seen["urls"]  # nothing over the network
    metrics = json.loads((run.root / "summary.json").read_text())["postprocess"]["metrics"]
    from selenium.webdriver.common.by import By

    for key in ("pass@1", "pass@2", "pass@4", "maj@4"):
        cell = browser.find_element(By.CSS_SELECTOR, f'#metrics td[data-metric="{key}"]').text
        assert cell == f"{metrics[key]['mean']:.3f} ± {metrics[key]['se']:.3f}", (key, cell)
    groups = browser.find_elements(By.CSS_SELECTOR, "#metrics tr")
    assert len(groups) == 1 + 1 + 3 + 5  # header, all, 3 levels, 5 types
    images = browser.find_elements(By.TAG_NAME, "img")
    sizes = [
        browser.execute_script(
            "return [arguments[0].complete, arguments[0].naturalWidth, arguments[0].naturalHeight]", img
        )
        for img in images
    ]
    assert len(images) == 4, sizes  # pass@1 by level, by type, the length histogram, the timeline
    assert all(ok and w >= 300 and h >= 150 for ok, w, h in sizes), sizes
    finish = browser.find_element(By.ID, "finish-reasons").text
    assert "length 20" in finish and "stop 60" in finish
    summary = json.loads((run.root / "summary.json").read_text())
    assert summary["prefix_cache"] == {"prompt_tokens": 180, "cached_tokens": 60, "hit_rate": 0.3333}
    engine = browser.find_element(By.ID, "engine").text
    assert "33.3% of 180 prompt tokens found in vLLM's prefix cache" in engine and "input order" in engine, engine
    cats = browser.find_element(By.ID, "categories").text
    assert f"format=1,answer=1 {metrics['categories']['format=1,answer=1']}" in cats
    # chunk c ran from 1.0 to 2.0 + c on its worker's clock: the last chunk is the slowest
    last = summary["chunks"] - 1
    assert [c["chunk"] for c in summary["slowest_chunks"]] == list(range(last, max(last - 5, -1), -1))
    assert summary["slowest_chunks"][0]["seconds"] == 1.0 + last
    slow = browser.find_elements(By.CSS_SELECTOR, "#slowest-chunks tr")
    assert len(slow) == 1 + len(summary["slowest_chunks"])
    assert slow[1].text.split()[:2] == [str(last), "w"], slow[1].text


def test_two_runs_side_by_side_and_a_sweep_folder(tmp_path, browser):
    a = graded_run(tmp_path, "a", right_every=2)
    b = graded_run(tmp_path, "b", right_every=4)
    sweep = tmp_path / "runs" / ".multirun" / "2026-12-03" / "10-00-00"
    sweep.mkdir(parents=True)
    (sweep / "runs.txt").write_text(f"{a.root}\n{b.root}\n")
    p = sh(tmp_path, f"hpc-infer report {sweep}")
    assert p.returncode == 0, p.stderr
    seen = _open(browser, Path(p.stdout.strip()))
    assert seen["errors"] == [] and all(u.startswith(("file:", "data:")) for u in seen["urls"])
    from selenium.webdriver.common.by import By

    rows = browser.find_elements(By.CSS_SELECTOR, "#comparison tr")
    assert [r.text.split()[0] for r in rows[1:]] == ["a", "b"]
    differ = browser.find_elements(By.CSS_SELECTOR, "#disagreements tr")
    assert len(differ) - 1 == 5  # problems right in a (every 2nd) but not in b (every 4th): 2, 6, 10, 14, 18
