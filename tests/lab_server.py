"""A real JupyterLab server and Debian's headless Chromium, for the browser tests
and benchmarks/lab_first_output.py.

The server is the one pip installed (nsprovisioner's lab extension and server
extension included), with its own Jupyter paths, settings and workspaces in a
temp dir, on a free loopback port, with a token. It exposes the app in the
browser (`window.jupyterapp`) so that a script can run the same commands as
the launcher's buttons. Kernels are shut down through the REST API before the
server is stopped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import stop_process
from tests.jupyter_process import start_jupyter

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
TOKEN = "lab-test-" + uuid.uuid4().hex
T = TypeVar("T")


def kernelspec(share: Path, name: str, argv0: str, config: dict[str, Any],
               provisioner: str = "namespace-provisioner") -> None:
    (share / "kernels" / name).mkdir(parents=True)
    (share / "kernels" / name / "kernel.json").write_text(json.dumps({
        "argv": [argv0, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": provisioner,
                                            "config": config}}}))


def notebook(path: Path, kernel: str, *cells: str) -> None:
    path.write_text(json.dumps({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": kernel, "display_name": kernel,
                                    "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                   "outputs": [], "source": code} for i, code in enumerate(cells)]}))


@contextmanager
def running_lab(base: Path) -> Iterator[tuple[str, Path]]:
    """JupyterLab on the kernelspecs in base/share and the files in base/root
    (the caller writes both first): its URL and its log."""
    # JupyterLab's "receive news?" toast would sit among the ones under test
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (base / "workspaces").mkdir()
    log_path = base / "server.log"
    proc, url = start_jupyter(base, TOKEN, log_path, "--LabApp.expose_app_in_browser=True",
                              app="jupyterlab", env={
                                  "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
                                  "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces")})
    try:
        yield url, log_path
    finally:
        stop_server(proc, url)


def stop_server(proc: subprocess.Popen[bytes], url: str) -> None:
    """Its kernels shut down through the API, then the server. (Once, after the
    browser tests, the server's own shutdown on SIGTERM stopped at "404 Kernel does
    not exist" for a kernel it still listed as pending, and the server ran on until
    SIGKILL: the kernels must not depend on that.)"""
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


@contextmanager
def chromium(user_data_dir: Path) -> Iterator[Any]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", f"--user-data-dir={user_data_dir}"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(180)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
    """probe()'s first truthy answer; fails naming `what` after `timeout` seconds."""
    from selenium.common.exceptions import WebDriverException

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


def open_lab(driver: Any, url: str, path: str = "") -> None:
    """JupyterLab (on a file, when given) once it is restored; `reset` drops the
    tabs an earlier test left in the workspace."""
    driver.get(f"{url}/lab{'/tree/' + path if path else ''}?reset&token={TOKEN}")
    wait_for("JupyterLab's app in the page",
             lambda: driver.execute_script("return !!window.jupyterapp"))
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.jupyterapp.restored.then(() => done(true));")


# What the launcher's notebook button does (notebook:create-new with the kernel's
# name), then what a user does once the toolbar shows the kernel: put code in the
# first cell and run it. Times in the page, from the command: until the notebook
# is open (its file made and loaded), until the session has its kernel (the
# server's POST /api/sessions returned) and until the cell's output is in the
# page. Then the same cell is run again, in the kernel now running: the time
# from run to output that no start is in ("again"). Then the notebook is saved
# (no "save changes?" dialog), its kernel shut down and its tab closed.
NEW_NOTEBOOK_SCRIPT = """
const [kernelName, code, marker, done] = arguments;
(async () => {
  const app = window.jupyterapp;
  const t0 = performance.now();
  const panel = await app.commands.execute('notebook:create-new', {kernelName});
  await panel.context.ready;
  const open = performance.now() - t0;
  app.shell.activateById(panel.id);
  panel.content.activeCellIndex = 0;
  const cell = panel.content.widgets[0];
  cell.model.sharedModel.setSource(code);
  await panel.sessionContext.ready;
  const session = performance.now() - t0;
  if (!panel.sessionContext.session?.kernel) {  // the server's error is in its log
    throw new Error(`no kernel: ${panel.sessionContext.kernelDisplayStatus}`);
  }
  const outputs = (mark) => [...panel.node.querySelectorAll('.jp-OutputArea-output')]
    .map(o => o.textContent).filter(t => t.includes(mark));
  const run = async (mark) => {
    const start = performance.now();
    const shown = new Promise(resolve => {
      const check = () => {
        if (outputs(mark).length) { observer.disconnect(); resolve(performance.now()); }
      };
      const observer = new MutationObserver(check);
      observer.observe(panel.node, {childList: true, subtree: true, characterData: true});
    });
    await app.commands.execute('notebook:run-cell');
    return [start, await shown];
  };
  const output = (await run(marker))[1] - t0;
  const text = outputs(marker).join('');
  const again = marker + '-again';  // the same cell once more, with another marker
  cell.model.sharedModel.setSource(code.replaceAll(marker, again));
  const [start, end] = await run(again);
  const kernelId = panel.sessionContext.session.kernel.id;
  const path = panel.context.path;
  await panel.context.save();
  await panel.sessionContext.shutdown();
  panel.close();
  done({open, session, output, again: end - start, text, kernelId, path});
})().catch(e => done({error: String((e && e.stack) || e)}));
"""


def new_notebook_output(driver: Any, kernel: str, code: str, marker: str) -> dict[str, Any]:
    """Open a new notebook on `kernel`, run `code` (whose output contains `marker`)
    in its first cell: {open, session, output (ms from the command), again (ms from
    run to output, in the kernel running by then), text, kernelId, path}."""
    result: dict[str, Any] = driver.execute_async_script(NEW_NOTEBOOK_SCRIPT, kernel, code,
                                                          marker)
    assert "error" not in result, f"new notebook on {kernel}: {result['error']}"
    return result
