"""Stand-in for ``/opt/migratekit/bin/inject-virtio-drivers.sh <device-path> <job-id>``.

Run as ``python -m emulators.inject --control-url http://127.0.0.1:PORT <device> <job-id>``
(or with ``EMULATOR_CONTROL_URL`` set). It tells the emulators' control API that the drivers
were injected into the appliance volume at ``<device>`` (which "writes" to that volume),
printing virt-v2v-in-place style progress. A programmed fault makes it exit 1, or hang
"forever" (``hang``/``timeout``) so that the caller's timeout fires.
Standard library only, so that it starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

PROG = "virt-v2v-in-place"


def _post(control_url: str, body: dict[str, str]) -> tuple[int, dict[str, Any]]:
    base = control_url.rstrip("/").removesuffix("/_emulator")
    request = urllib.request.Request(
        f"{base}/_emulator/inject",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}


def _hang() -> None:
    while True:
        time.sleep(3600)


def main(argv: Sequence[str] | None = None) -> int:
    """Inject (pretend), print progress, return the exit status."""
    parser = argparse.ArgumentParser(prog="inject-virtio-drivers.sh")
    parser.add_argument("--control-url", default=os.environ.get("EMULATOR_CONTROL_URL"))
    parser.add_argument("device_path")
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    if not args.control_url:
        print(f"{PROG}: error: no --control-url (or EMULATOR_CONTROL_URL)", file=sys.stderr)
        return 1
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}] {message}", flush=True)

    progress(f"Setting up the source: -i disk {args.device_path}")
    progress("Opening the source")
    progress("Inspecting the source")
    progress("Checking for sufficient free disk space in the guest")
    progress("Converting Windows Server 2022 Standard to run on KVM")
    print("Injecting virtio-win drivers...", flush=True)
    try:
        status, answer = _post(
            args.control_url, {"device_path": args.device_path, "job_id": args.job_id}
        )
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: cannot reach the emulator at {args.control_url}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    if status == 404:
        print(
            f"{PROG}: error: libguestfs error: could not open {args.device_path}: "
            "No such device or address",
            file=sys.stderr,
        )
        return 1
    if status != 200 or not answer.get("ok"):
        if answer.get("fault") in ("hang", "timeout"):
            _hang()
        message = answer.get("message") or answer.get("error") or f"HTTP {status}"
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 1
    print("virtio-win: installed viostor, vioscsi, netkvm, balloon, qemu-ga", flush=True)
    progress("Mapping filesystem data to avoid copying unused and blank areas")
    progress("Closing the overlay")
    progress("Finishing off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
