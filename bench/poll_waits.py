"""Many waits on CloudStack async jobs, with and without the shared poller's listings, side by side.

    python -m bench.poll_waits [--waits 400] [--waves 3] [--latency 2] [--poll-interval 0.5]

`--waits` volumes each take `--waves` snapshots one after the other (starts spread over a
second), every async job taking `--latency` s in the CloudStack emulator; the adapter waits
for each as a job's step does. Run twice in one process, one after the other: with the
shared poller's listings (`batch_from` 8, the default) and with every wait polling alone
(`batch_from` out of reach). Prints, for each, the CPU seconds of this process (the adapter
and the emulator, which runs in it), the wall time, and the requests CloudStack answered by
command: what a CloudStack management server (and its API throttling) sees.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import zlib
from collections import Counter

import aiohttp

from adapters.cloudstack import CloudStackAdapter
from emulators.client import EmulatorControl
from emulators.runner import start_emulators


async def one_run(batch_from: int, waits: int, waves: int, latency: float, interval: float) -> dict[str, object]:
    handle = await start_emulators()
    try:
        async with EmulatorControl(handle.control_url) as ctl, aiohttp.ClientSession() as http:
            await ctl.reset()
            volumes = [str((await ctl.create_volume(f"d{i}", 10, vm_id=handle.appliance_vm_id))["id"])
                       for i in range(waits)]
            cs = CloudStackAdapter(handle.cloudstack_url, handle.api_key, handle.secret_key, session=http,
                                   poll_interval=interval, timeout=30, batch_from=batch_from)
            await ctl.set_latency(async_job_seconds=latency)
            cpu0, t0 = time.process_time(), time.monotonic()

            async def one(volume: str) -> None:
                for k in range(waves):
                    await asyncio.sleep(zlib.crc32(f"{volume}{k}".encode()) % 1000 / 1000)
                    started = await cs.create_snapshot(volume, f"s{k}")
                    await cs.wait_job(started.job_id, 30 + latency)

            await asyncio.gather(*(one(v) for v in volumes))
            cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
            calls = Counter(str(c["command"]) for c in await ctl.calls(api="cloudstack"))
            return {"batch_from": batch_from, "cpu_seconds": round(cpu, 2), "wall_seconds": round(wall, 1),
                    "requests": sum(calls.values()), "by_command": dict(calls)}
    finally:
        await handle.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--waits", type=int, default=400)
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--latency", type=float, default=2.0)
    p.add_argument("--poll-interval", type=float, default=0.5)
    a = p.parse_args()
    for batch_from, label in ((8, "shared poller (listings)"), (10**9, "one poll per wait")):
        r = asyncio.run(one_run(batch_from, a.waits, a.waves, a.latency, a.poll_interval))
        print(f"{label:26} CPU {r['cpu_seconds']:6.2f} s  wall {r['wall_seconds']:5.1f} s  "
              f"requests {r['requests']:6}  {r['by_command']}")


if __name__ == "__main__":
    main()
