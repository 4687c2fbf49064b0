"""The jupyter_server extension behind nsprovisioner's JupyterLab extension.

Two read-only endpoints, authenticated and authorized like the server's own
/api/kernels (a token or the login cookie, and the "kernels" permission):

    GET /nsprovisioner/kernels/<kernel_id>   the kernel's sandbox and its usage
    GET /nsprovisioner/events?after=<id>     kills, failed starts and missing limits

The status-bar item polls the first for the notebook's kernel; the second
feeds the notifications (kernel_events.py). The extension is enabled by
etc/jupyter/jupyter_server_config.d/nsprovisioner.json, installed with the
package; the browser side is share/jupyter/labextensions/nsprovisioner-lab.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from tornado import web

from .kernel_events import events

AUTH_RESOURCE = "kernels"  # what the server's own kernel API asks permission for


class KernelSandboxHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        kernels = self.serverapp.kernel_manager if self.serverapp is not None else None
        if kernels is None or kernel_id not in kernels:
            raise web.HTTPError(404, f"no kernel {kernel_id}")
        self.finish(json.dumps(await sandbox_status(kernels.get_kernel(kernel_id))))


class KernelEventsHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            after = int(self.get_query_argument("after", "0"))
        except ValueError:
            raise web.HTTPError(400, "after must be an event id (an integer)") from None
        self.finish(json.dumps({"last": events.last_id(),
                                "events": [e.as_json() for e in events.after(after)]}))


async def sandbox_status(kernel_manager: Any) -> dict[str, Any]:
    """What the status item shows: from the provisioner's get_provisioner_info()."""
    provisioner = getattr(kernel_manager, "provisioner", None)
    if provisioner is None:  # starting, or gone
        return {"state": "no process", "sandboxed": None}
    info = await provisioner.get_provisioner_info()
    sandbox = info.get("sandbox")
    if sandbox is None:  # another provisioner (local-provisioner, ...)
        return {"state": "running", "sandboxed": False}
    usage = info.get("cgroup_usage", {})
    return {"state": "running" if provisioner.has_process else "no process",
            "sandboxed": True, **sandbox,
            "memory_bytes": usage.get("memory_bytes"), "pids": usage.get("pids"),
            "pids_limit_hits": usage.get("pids_limit_hits"),
            "cpu_seconds": usage.get("cpu_seconds")}


def _load_jupyter_server_extension(serverapp: ServerApp) -> None:
    base = url_path_join(serverapp.web_app.settings["base_url"], "nsprovisioner")
    serverapp.web_app.add_handlers(".*$", [  # type: ignore[no-untyped-call]
        (url_path_join(base, "kernels", r"(?P<kernel_id>[\w-]+)"), KernelSandboxHandler),
        (url_path_join(base, "events"), KernelEventsHandler),
    ])
    serverapp.log.info("nsprovisioner: kernel sandbox status at %s", base)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "nsprovisioner.server_extension"}]
