"""JupyterLab in a real browser: what a user sees of the sandbox.

A real JupyterLab server with nsprovisioner installed (its lab extension and
server extension, as pip installed them), Debian's headless Chromium driven
through its chromedriver, and notebooks: one on a sandboxed kernel with a
memory and a pids limit, whose status item must show the network and the
limits and whose out-of-memory kill must put the reason on screen; one whose
kernel can't start, whose error must be readable (wrapped, the fix on its
own line); new ones on a pooled kernelspec, whose kernel must come from the
pool and be the one a fresh start gives. Screenshots of each step go to $NSPROV_SCREENSHOTS when set
(docs/img/ was made so).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import require_limit
from .lab_server import (
    CHROMEDRIVER,
    CHROMIUM,
    TOKEN,
    chromium,
    kernelspec,
    new_notebook_output,
    notebook,
    open_lab,
    running_lab,
    wait_for,
)

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (scripts/setup-host.sh)"),
]
MEMORY_LIMIT_MIB = 256
PIDS_LIMIT = 64


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The URL of a JupyterLab server with the kernels and notebooks below, and its log."""
    from nsprovisioner.sandbox import SandboxSpec

    require_limit(SandboxSpec(memory_limit=f"{MEMORY_LIMIT_MIB}M"), "memory")
    base = tmp_path_factory.mktemp("lab")
    share, root = base / "share", base / "root"
    kernelspec(share, "limited", sys.executable, {
        "memory_limit": f"{MEMORY_LIMIT_MIB}M", "pids_limit": PIDS_LIMIT, "network": "none"})
    kernelspec(share, "broken", "/nonexistent/python3", {})  # exec fails inside: ENOENT
    kernelspec(share, "degraded", sys.executable,  # starts, without the missing device
               {"strict": False, "devices": ["/dev/nsprov-lab-test-missing"]})
    kernelspec(share, "pooled", sys.executable, {"pool_size": 1})
    root.mkdir()
    notebook(root / "limited.ipynb", "limited",
             # more threads than the pids limit lets start: RuntimeError, nobody killed
             "import threading, time\n"
             "threads = [threading.Thread(target=time.sleep, args=(30,)) for _ in range(100)]\n"
             "for t in threads:\n    t.start()",
             "hog = b'x' * (1024 * 2**20)")  # touches every page: the OOM killer
    notebook(root / "broken.ipynb", "broken", "1")
    notebook(root / "degraded.ipynb", "degraded", "1")
    with running_lab(base) as (url, log):
        yield url, log


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


def shoot(driver: Any, name: str) -> None:
    where = os.environ.get("NSPROV_SCREENSHOTS")
    if where:
        time.sleep(1)  # a toast slides in: a picture of it, not of its edge
        Path(where).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(where) / f"{name}.png"))


def status_text(driver: Any) -> str | None:
    items = driver.find_elements(By.CSS_SELECTOR, ".nsprov-StatusItem")
    return items[0].text if items and items[0].text else None


def toasts(driver: Any) -> str:
    return "\n".join(t.text for t in driver.find_elements(By.CSS_SELECTOR, ".Toastify__toast"))


def test_status_item_and_oom_kill_reason(lab: tuple[str, Path], browser: Any) -> None:
    url, log = lab
    open_lab(browser, url, "limited.ipynb")
    text = wait_for("the status item with the limits", lambda: (
        (t := status_text(browser)) and "mem" in t and "pids" in t and t))
    assert text.startswith("sandboxed"), text
    assert "net: none" in text, text
    assert f"/{MEMORY_LIMIT_MIB} MiB" in text, text
    assert f"/{PIDS_LIMIT}" in text, text
    shoot(browser, "lab-status")

    threads, hog = browser.find_elements(By.CSS_SELECTOR, ".jp-Cell .cm-content")
    threads.click()
    threads.send_keys(Keys.SHIFT, Keys.ENTER)
    wait_for("the pids limit's notification",
             lambda: f"reached its pids limit ({PIDS_LIMIT})" in toasts(browser))
    assert "(limit hit)" in (status_text(browser) or "")
    shoot(browser, "lab-pids")
    hog.click()
    hog.send_keys(Keys.SHIFT, Keys.ENTER)
    reason = f"killed: out of memory (limit {MEMORY_LIMIT_MIB} MiB)"
    wait_for("the OOM kill's reason in a notification", lambda: reason in toasts(browser))
    shoot(browser, "lab-oom")
    assert reason in log.read_text()


def test_failed_start_is_readable(lab: tuple[str, Path], browser: Any) -> None:
    url, log = lab
    open_lab(browser, url, "broken.ipynb")
    dialog = wait_for("the start error's dialog", lambda: [
        d for d in browser.find_elements(By.CSS_SELECTOR, ".jp-Dialog-content")
        if "Error Starting Kernel" in d.text])[0]
    message = dialog.find_element(By.CSS_SELECTOR, ".jp-Dialog-body pre")
    lines = message.text.splitlines()
    assert any("No such file or directory" in line for line in lines), lines
    # the fix on a line of its own, after the cause
    assert lines[-1].startswith("The command was not found inside the sandbox"), lines
    assert message.value_of_css_property("white-space") == "pre-wrap"
    width = browser.execute_script("return [arguments[0].scrollWidth, arguments[0].clientWidth]",
                                   message)
    assert width[0] <= width[1], f"the error scrolls sideways: {width}"
    shoot(browser, "lab-start-error")
    wait_for("the failed start's notification",
             lambda: "broken could not start in its sandbox" in toasts(browser))
    text = log.read_text()
    assert text.count("could not start in its sandbox") == 1, text[-4000:]
    assert "Traceback" not in text, text[-4000:]


def test_start_without_some_limits_warns_in_the_ui_and_in_jupyters_log(
        lab: tuple[str, Path], browser: Any) -> None:
    url, log = lab
    open_lab(browser, url, "degraded.ipynb")
    wait_for("the strict = false warning in a notification",
             lambda: "starting the sandbox without some devices" in toasts(browser))
    wait_for("the kernel running anyway", lambda: (
        (t := status_text(browser)) and t.startswith("sandboxed")))
    shoot(browser, "lab-degraded")
    # with Jupyter's prefix, in the server's log: not a bare line on stderr
    assert re.search(r"^\[W [^]]* nsprovisioner\.devices\] starting the sandbox without some "
                     r"devices: .*nsprov-lab-test-missing", log.read_text(), re.MULTILINE), \
        log.read_text()[-3000:]


def test_endpoints_are_authenticated_like_the_kernel_api(lab: tuple[str, Path]) -> None:
    url, _ = lab
    for path in ("/api/kernels", "/nsprovisioner/events", "/nsprovisioner/kernels/x"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + path, timeout=10)
        assert refused.value.code == 403, path
    with urllib.request.urlopen(f"{url}/nsprovisioner/events?token={TOKEN}", timeout=10) as r:
        assert "last" in json.loads(r.read())


def test_a_new_notebook_on_a_pooled_kernelspec_runs_in_a_waiting_kernel(
        lab: tuple[str, Path], browser: Any) -> None:
    """The launcher's way to a new notebook, as benchmarks/lab_first_output.py times
    it. The first start makes the pool (and misses it); a later one finds a kernel
    done importing and takes it: its cwd and JPY_SESSION_NAME are its notebook's,
    as for the fresh kernel."""
    from nsprovisioner.pool import waiting_on_host

    url, log = lab
    open_lab(browser, url)
    marker = "pooled-" + uuid.uuid4().hex
    code = f"import os; print({marker!r}, os.getcwd(), os.environ['JPY_SESSION_NAME'])"
    root = str(log.parent / "root")

    def run() -> tuple[bool, dict[str, Any]]:
        result = new_notebook_output(browser, "pooled", code, marker)
        _, cwd, session = result["text"].split()
        assert cwd == root, result
        assert session == os.path.join(root, result["path"]), result
        pooled = f"kernel {result['kernelId']} (pooled) came from the pool" in log.read_text()
        return pooled, result

    pooled, fresh = run()
    assert not pooled, "the first start found a pool that nothing had made"
    wait_for("a kernel waiting in the pool", lambda: sum(waiting_on_host().values()))
    # Waiting is not ready: a kernel still importing is not handed out (that start
    # is a fresh one). On a loaded machine, a few fresh starts may pass first.
    for _ in range(10):
        time.sleep(1)
        pooled, result = run()
        if pooled:
            break
    assert pooled, log.read_text()[-3000:]
    assert result["kernelId"] != fresh["kernelId"]
    print(f"first output: fresh {fresh['output']:.0f} ms, pooled {result['output']:.0f} ms")
