"""The emulators' own CPU per request, for one or more copies of the code side by side.

    python -m bench.emulator_cost [--requests 4000] [--rounds 3] CODE_DIR [CODE_DIR ...]

For each code directory in turn (alternating, `--rounds` times), starts `python -m emulators`
from it as the benchmark does (`bench.infra.Emulators`), sends `--requests` requests through
the adapters (half CloudStack `listVolumes`, half the Volume Daemon's `GET /volumes/{id}`, 16
at a time), and prints the emulator process's CPU (user + system, from /proc) per request. The
emulators share the benchmark's machine with the service: what they spend, the service cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp

from adapters.cloudstack import CloudStackAdapter
from adapters.volume_daemon import VolumeDaemonAdapter
from bench.infra import Emulators, cpu_seconds, set_code_dir
from emulators.client import EmulatorControl


async def one_run(code: Path, requests: int) -> float:
    """Microseconds of the emulator's CPU per request, the emulator run from `code`."""
    set_code_dir(code)
    emu = Emulators(Path(tempfile.mkdtemp()) / "emulators.log")
    await emu.start()
    try:
        h = emu.state
        async with aiohttp.ClientSession() as http, EmulatorControl(emu.control_url) as control:
            await control.reset()
            volume = str((await control.create_volume("disk", 10, vm_id=h["appliance_vm_id"]))["id"])
            cs = CloudStackAdapter(h["cloudstack_url"], h["api_key"], h["secret_key"], session=http, timeout=30)
            daemon = VolumeDaemonAdapter(h["volume_daemon_url"], session=http, timeout=30)
            room = asyncio.Semaphore(16)

            async def call(i: int) -> None:
                async with room:
                    if i % 2:
                        await cs.list_vm_volumes(h["appliance_vm_id"])
                    else:
                        await daemon.get_volume(volume)

            began = cpu_seconds(emu.pid)
            await asyncio.gather(*(call(i) for i in range(requests)))
            return (cpu_seconds(emu.pid) - began) / requests * 1e6
    finally:
        emu.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("code", nargs="+", type=Path, help="a checkout of the project (its emulators are run)")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    for r in range(a.rounds):
        for code in a.code:
            print(f"round {r + 1}  {code}  {asyncio.run(one_run(code.resolve(), a.requests)):.0f} us of the "
                  "emulators' CPU per request", flush=True)


if __name__ == "__main__":
    main()
