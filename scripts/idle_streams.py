"""What idle lease streams cost a broker: its CPU with N streams open and
silent, and how long a fresh connection then waits for one submit.

    .venv/bin/python scripts/idle_streams.py --streams 2000

Starts a real ``broker serve`` on a fresh SQLite file on loopback, opens the
streams from this process (asyncio, 20 channels), and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2

LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def silent(subscribe: broker_pb2.WorkerMessage) -> AsyncIterator[broker_pb2.WorkerMessage]:
    yield subscribe
    await asyncio.Event().wait()  # open and silent until cancelled


async def measure(target: str, pid: int, streams: int, seconds: float) -> None:
    channels = [grpc.aio.insecure_channel(target) for _ in range(20)]
    calls = []
    for i in range(streams):
        stub = broker_pb2_grpc.BrokerStub(channels[i % len(channels)])
        sub = broker_pb2.Subscribe(queues=[f"idle{i % 50}"], prefetch=16, worker_id=f"w{i}")
        calls.append(stub.LeaseStream(silent(broker_pb2.WorkerMessage(subscribe=sub))))
    await asyncio.sleep(5)  # let them all open
    used, began = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    share = (cpu_seconds(pid) - used) / (time.monotonic() - began)
    print(f"{streams} idle streams: broker CPU {100 * share:.1f}% of a core")
    waits = []
    for _ in range(5):
        start = time.monotonic()
        async with grpc.aio.insecure_channel(target) as channel:
            spec = job_pb2.JobSpec(queue="x", task="t")
            await broker_pb2_grpc.BrokerStub(channel).Submit(
                broker_pb2.SubmitRequest(job=spec), timeout=60
            )
        waits.append(time.monotonic() - start)
    print(f"a fresh connection's submit: {min(waits) * 1000:.0f}-{max(waits) * 1000:.0f} ms")
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--uncapped", action="store_true", help="a release without --max-lease-streams"
    )
    args = parser.parse_args()
    cap = [] if args.uncapped else ["--max-lease-streams", str(args.streams + 10)]
    database = os.path.join(tempfile.mkdtemp(prefix="jobbroker-idle-"), "broker.db")
    broker = subprocess.Popen(
        [sys.executable, "-m", "jobbroker_server", "serve", "--port", "0", "--metrics-port",
         "0", "--database", database, *cap],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert broker.stdout is not None
        port = next(m.group(1) for line in broker.stdout if (m := LISTENING.search(line)))
        threading.Thread(target=broker.stdout.read, daemon=True).start()  # keep it drained
        used = cpu_seconds(broker.pid)
        time.sleep(5)
        print(f"no streams: broker CPU {100 * (cpu_seconds(broker.pid) - used) / 5:.1f}%")
        asyncio.run(measure(f"127.0.0.1:{port}", broker.pid, args.streams, args.seconds))
    finally:
        broker.terminate()
        broker.wait(20)


if __name__ == "__main__":
    main()
