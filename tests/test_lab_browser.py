"""JupyterLab in a real browser: what a user sees of the sandbox.

A real JupyterLab server with nsprovisioner installed (its lab extension and
server extension, as pip installed them), Debian's headless Chromium driven
through its chromedriver, and two notebooks: one on a sandboxed kernel with
a memory and a pids limit, whose status item must show the network and the
limits and whose out-of-memory kill must put the reason on screen; one whose
kernel can't start, whose error must be readable (wrapped, the fix on its
own line). Screenshots of each step go to $NSPROV_SCREENSHOTS when set
(docs/img/ was made so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .conftest import require_limit, stop_process

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (scripts/setup-host.sh)"),
]
TOKEN = "lab-test-" + uuid.uuid4().hex
MEMORY_LIMIT_MIB = 256
PIDS_LIMIT = 64
T = TypeVar("T")


def kernelspec(share: Path, name: str, argv0: str, config: dict[str, Any]) -> None:
    (share / "kernels" / name).mkdir(parents=True)
    (share / "kernels" / name / "kernel.json").write_text(json.dumps({
        "argv": [argv0, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "namespace-provisioner",
                                            "config": config}}}))


def notebook(path: Path, kernel: str, *cells: str) -> None:
    path.write_text(json.dumps({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": kernel, "display_name": kernel,
                                    "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                   "outputs": [], "source": code} for i, code in enumerate(cells)]}))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The URL of a JupyterLab server with the two kernels and notebooks, and its log."""
    from nsprovisioner.sandbox import SandboxSpec

    require_limit(SandboxSpec(memory_limit=f"{MEMORY_LIMIT_MIB}M"), "memory")
    base = tmp_path_factory.mktemp("lab")
    share, root = base / "share", base / "root"
    kernelspec(share, "limited", sys.executable, {
        "memory_limit": f"{MEMORY_LIMIT_MIB}M", "pids_limit": PIDS_LIMIT, "network": "none"})
    kernelspec(share, "broken", "/nonexistent/python3", {})  # exec fails inside: ENOENT
    kernelspec(share, "degraded", sys.executable,  # starts, without the missing device
               {"strict": False, "devices": ["/dev/nsprov-lab-test-missing"]})
    root.mkdir()
    notebook(root / "limited.ipynb", "limited",
             # more threads than the pids limit lets start: RuntimeError, nobody killed
             "import threading, time\n"
             "threads = [threading.Thread(target=time.sleep, args=(30,)) for _ in range(100)]\n"
             "for t in threads:\n    t.start()",
             "hog = b'x' * (1024 * 2**20)")  # touches every page: the OOM killer
    notebook(root / "broken.ipynb", "broken", "1")
    notebook(root / "degraded.ipynb", "degraded", "1")
    # JupyterLab's "receive news?" toast would sit among the ones under test
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    for sub in ("runtime", "config", "workspaces"):
        (base / sub).mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JUPYTER_PATH": str(share), "JUPYTER_CONFIG_DIR": str(base / "config"),
           "JUPYTER_RUNTIME_DIR": str(base / "runtime"), "JUPYTER_TOKEN": TOKEN,
           "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces")}
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", f"--port={port}", "--ip=127.0.0.1",
             "--no-browser", "--allow-root", f"--ServerApp.root_dir={root}"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    log_path.read_text()[-3000:]
                time.sleep(0.3)
        yield url, log_path
    finally:
        stop_server(proc, url)


def stop_server(proc: subprocess.Popen[bytes], url: str) -> None:
    """Its kernels shut down through the API, then the server. (Once, after these
    tests, the server's own shutdown on SIGTERM stopped at "404 Kernel does not exist"
    for a kernel it still listed as pending, and the server ran on until SIGKILL:
    the kernels must not depend on that.)"""
    if proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/api/kernels?token={TOKEN}", timeout=10) as r:
                kernels = json.loads(r.read())
            for kernel in kernels:
                urllib.request.urlopen(urllib.request.Request(
                    f"{url}/api/kernels/{kernel['id']}?token={TOKEN}", method="DELETE"),
                    timeout=30).close()
        except OSError as e:  # SIGTERM still shuts the kernels down
            print(f"could not shut the kernels down through the API: {e}")
    stop_process(proc, 10)  # SIGKILL after that: its kernels are gone already


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
    """probe()'s first truthy answer; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = probe()
        except WebDriverException:
            answer = None
        if answer:
            return answer
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.25)


def shoot(driver: Any, name: str) -> None:
    where = os.environ.get("NSPROV_SCREENSHOTS")
    if where:
        time.sleep(1)  # a toast slides in: a picture of it, not of its edge
        Path(where).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(where) / f"{name}.png"))


def open_notebook(driver: Any, url: str, name: str) -> None:
    """The notebook alone: `reset` drops the tabs an earlier test left in the workspace."""
    driver.get(f"{url}/lab/tree/{name}?reset&token={TOKEN}")


def status_text(driver: Any) -> str | None:
    items = driver.find_elements(By.CSS_SELECTOR, ".nsprov-StatusItem")
    return items[0].text if items and items[0].text else None


def toasts(driver: Any) -> str:
    return "\n".join(t.text for t in driver.find_elements(By.CSS_SELECTOR, ".Toastify__toast"))


def test_status_item_and_oom_kill_reason(lab: tuple[str, Path], browser: Any) -> None:
    url, log = lab
    open_notebook(browser, url, "limited.ipynb")
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
    open_notebook(browser, url, "broken.ipynb")
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
    open_notebook(browser, url, "degraded.ipynb")
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
