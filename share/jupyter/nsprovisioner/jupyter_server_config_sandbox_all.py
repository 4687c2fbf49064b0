"""Opt-in: start every kernel of this Jupyter server in a namespace sandbox.

Kernelspecs without a `kernel_provisioner` stanza (python3, ir, bash, ...)
get namespace-provisioner instead of jupyter_client's local one; a kernelspec
that names a provisioner keeps it. Use it in one of these ways:

    jupyter server --config=<prefix>/share/jupyter/nsprovisioner/jupyter_server_config_sandbox_all.py
    jupyter lab    --config=<same path>

or copy it to a config directory as jupyter_server_config.py (JupyterHub:
into the single-user image's /etc/jupyter/). Tighten or loosen every
sandbox with c.NamespaceProvisioner.<option>; a kernelspec's
metadata.kernel_provisioner.config still wins for that kernel.
"""

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - defined by traitlets' loader

c.KernelProvisionerFactory.default_provisioner_name = "namespace-provisioner"

# Examples, all off by default:
# c.NamespaceProvisioner.memory_limit = "2G"
# c.NamespaceProvisioner.pids_limit = 512
# c.NamespaceProvisioner.network = "none"
# c.NamespaceProvisioner.env_keep = ["PATH", "HOME", "LANG", "LC_*", "TERM"]
