#!/usr/bin/env bash
# Check the real thing on a GPU host: a sandboxed kernel sees its GPUs and
# nothing else (docs/troubleshooting.md, "GPUs"). The project's own tests use
# stand-in nodes; only a host with a GPU can show that the drivers work.
#
#   PYTHON=/path/to/python scripts/gpu-check.sh
#
# PYTHON (default python3) must have nsprovisioner and ipykernel installed,
# and torch (CUDA or ROCm build) for the torch checks. Run it as the user
# whose kernels will use the GPUs (not root: that is not what they run as).
# Prints PASS/FAIL/SKIP per check; exits 1 when one failed.
set -uo pipefail
PYTHON=${PYTHON:-python3}
failed=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failed=1; }
skip() { echo "SKIP $*"; }
run() { "$PYTHON" -m nsprovisioner.cli run "$@"; }
cd "$HOME"  # not a source tree, whose nsprovisioner/ would shadow the installed one

"$PYTHON" -c 'import nsprovisioner, ipykernel' 2>/dev/null \
    || { echo "$PYTHON lacks nsprovisioner or ipykernel: set PYTHON" >&2; exit 2; }
echo "== what doctor sees"
"$PYTHON" -m nsprovisioner.cli doctor | awk '/^[A-Z]+ +GPUs:/ { print; getline; if (/^ +fix:/) print }'

echo "== nvidia-smi in a sandbox"
if command -v nvidia-smi >/dev/null && [ -e /dev/nvidiactl ]; then
    host=$(nvidia-smi -L)
    count=$(grep -c '^GPU ' <<<"$host")
    inside=$(run --gpus all -- nvidia-smi -L 2>&1)
    [ "$inside" = "$host" ] && pass "--gpus all: nvidia-smi lists the host's $count GPU(s)" \
        || fail "--gpus all: nvidia-smi inside says: $inside; the host says: $host"
    inside=$(run -- nvidia-smi -L 2>&1)
    grep -q '^GPU ' <<<"$inside" && fail "--gpus none: nvidia-smi still finds: $inside" \
        || pass "--gpus none: nvidia-smi finds no GPU"
    if [ "$count" -ge 2 ]; then
        # only GPU 1, numbered 0 inside, with the host's GPU 1's UUID
        want=$(sed -n '2s/.*(UUID: \(.*\))/\1/p' <<<"$host")
        inside=$(run --gpus 1 -- nvidia-smi -L 2>&1)
        [ "$(grep -c '^GPU ' <<<"$inside")" = 1 ] && grep -q "GPU 0: .*$want" <<<"$inside" \
            && pass "--gpus 1: only the host's GPU 1 ($want), as GPU 0" \
            || fail "--gpus 1: nvidia-smi inside says: $inside"
    else
        skip "--gpus 1: one GPU only, nothing to tell apart"
    fi
else
    skip "no nvidia-smi or /dev/nvidiactl on this host"
fi
if command -v rocm-smi >/dev/null && [ -e /dev/kfd ]; then
    inside=$(run --gpus all -- rocm-smi --showid 2>&1)
    grep -q 'GPU\[0\]' <<<"$inside" && pass "--gpus all: rocm-smi sees a GPU" \
        || fail "--gpus all: rocm-smi inside says: $inside"
else
    skip "no rocm-smi or /dev/kfd on this host"
fi

echo "== torch in a sandboxed kernel"
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    skip "torch is not installed for $PYTHON"
else
    "$PYTHON" - <<'EOF' || failed=1
import asyncio, json, os, sys, tempfile, uuid
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

PROBE = """
import json, os, shutil, subprocess, torch
smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) \\
    if os.path.exists("/dev/nvidiactl") and shutil.which("nvidia-smi") else None
print(json.dumps({"available": torch.cuda.is_available(), "count": torch.cuda.device_count(),
                  "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "rocr": os.environ.get("ROCR_VISIBLE_DEVICES"),
                  "smi": smi.stdout.count("GPU ") if smi and smi.returncode == 0 else None,
                  "sum": float(torch.ones(4, device="cuda").sum())
                  if torch.cuda.is_available() else None}))
"""


async def kernel_sees(top: str, gpus: object) -> dict:
    name = f"gpu-check-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(top, "kernels", name))
    with open(os.path.join(top, "kernels", name, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                            "{connection_file}"], "display_name": name, "language": "python",
                   "metadata": {"kernel_provisioner": {
                       "provisioner_name": "namespace-provisioner",
                       "config": {"gpus": gpus}}}}, f)
    km = AsyncKernelManager(kernel_name=name, connection_file=os.path.join(
        top, f"kernel-{name}.json"), kernel_spec_manager=KernelSpecManager(
        kernel_dirs=[os.path.join(top, "kernels")]))
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    out = []
    try:
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive(PROBE, timeout=300, output_hook=lambda m: out.append(
            m["content"].get("text", "") if m["msg_type"] == "stream" else
            "\n".join(m["content"].get("traceback", []))))
        if reply["content"]["status"] != "ok":
            raise RuntimeError("".join(out))
        return json.loads("".join(out).strip().splitlines()[-1])
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def main() -> int:
    import torch
    host = torch.cuda.device_count()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check.") as top:
        for gpus, want in (("none", 0), ("all", host), ([host - 1], min(host, 1))):
            seen = await kernel_sees(top, gpus)
            ok = seen["count"] == want and seen["available"] == (want > 0) and (
                want == 0 or seen["sum"] == 4.0) and seen["smi"] in (None, want)
            print(f"{'PASS' if ok else 'FAIL'} gpus = {gpus!r}: torch.cuda.is_available() "
                  f"{seen['available']}, {seen['count']} device(s) (want {want}), "
                  f"nvidia-smi lists {seen['smi']}, CUDA_VISIBLE_DEVICES={seen['visible']}, "
                  f"ROCR_VISIBLE_DEVICES={seen['rocr']}")
            failed |= not ok
            if host == 0:
                print("SKIP the host's torch sees no GPU: nothing more to compare")
                break
    return failed


sys.exit(asyncio.run(main()))
EOF
fi
exit $failed
