"""The README's worked example, as an operator types it: keys, TLS, a worker.

Real processes throughout: ``broker keys create`` on the database, then
``broker serve --auth`` over TLS, a ``broker worker`` with a worker key, and
submits with a producer key; wrong keys and roles refused in one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.processes import BROKER, Process, start_broker

pytestmark = pytest.mark.timeout(120)


def _broker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BROKER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def _refused(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: error:"), done.stderr
    assert text in lines[0], lines[0]


def test_keys_tls_a_worker_and_a_producer_end_to_end(tmp_path: Path) -> None:
    database = str(tmp_path / "jobbroker.db")
    ca = trustme.CA()
    served = ca.issue_cert("localhost")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    served.cert_chain_pems[0].write_to_path(str(cert))
    served.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))

    # 1. The first admin key, made in the database before the broker runs.
    made = _broker("keys", "create", "ops", "--role", "admin", "--database", database, env={})
    assert made.returncode == 0, made.stderr
    admin = made.stdout.strip()
    assert admin.startswith("jbk_") and "shown this once" in made.stderr

    # 2. Serve with keys required, over TLS.
    proc, plain_target = start_broker(
        database, "--auth", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    worker: Process | None = None
    try:
        port = plain_target.rsplit(":", 1)[1]
        tls = {"BROKER_TARGET": f"localhost:{port}", "BROKER_TLS_CA": str(ca_file)}
        as_admin = {**tls, "BROKER_API_KEY": admin}

        # 3. A worker key and a producer key, through the broker.
        worker_key = _broker(
            "keys", "create", "sampler", "--role", "worker", "--queue", "sample", env=as_admin
        )
        assert worker_key.returncode == 0, worker_key.stderr
        producer_key = _broker(
            "keys", "create", "web", "--role", "producer", "--queue", "sample", env=as_admin
        )
        assert producer_key.returncode == 0, producer_key.stderr
        as_worker = {**tls, "BROKER_API_KEY": worker_key.stdout.strip()}
        as_producer = {**tls, "BROKER_API_KEY": producer_key.stdout.strip()}

        # 4. A worker with its key; a submit with the producer's, waited on.
        worker = Process(
            [*BROKER, "worker", "tests.sample_tasks", "--queue", "sample"],
            env=as_worker,
            cwd=Path(__file__).resolve().parent.parent,
        )
        submitted = _broker(
            "submit",
            "tests.sample_tasks.add",
            "[1, 2, 3]",
            "--queue",
            "sample",
            "--wait",
            "30",
            env=as_producer,
        )
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout.splitlines()[-1]) == 6

        # 5. Wrong keys, roles, queues and transports are refused in one line.
        nope = {**tls, "BROKER_API_KEY": "jbk_0_nope"}
        _refused(_broker("jobs", "ls", "--queue", "sample", env=nope), "API key is not valid")
        _refused(
            _broker("submit", "tests.sample_tasks.add", "[1]", "--queue", "sample", env=as_worker),
            "worker role",
        )
        _refused(
            _broker("submit", "tests.sample_tasks.add", "[1]", "--queue", "other", env=as_producer),
            "may not use queue 'other'",
        )
        _refused(_broker("dlq", "ls", env=as_producer), "producer role")
        plaintext = {"BROKER_TARGET": f"localhost:{port}", "BROKER_API_KEY": admin}
        _refused(_broker("jobs", "ls", env=plaintext), f"localhost:{port}")

        # The keys are listed without their secrets; a revoked key is refused.
        listed = _broker("keys", "ls", env=as_admin)
        assert listed.returncode == 0, listed.stderr
        assert {"ops", "sampler", "web"} <= set(listed.stdout.split())
        assert admin not in listed.stdout and as_producer["BROKER_API_KEY"] not in listed.stdout
        revoked = _broker("keys", "revoke", "web", env=as_admin)
        assert revoked.returncode == 0 and "revoked API key" in revoked.stdout
        _refused(_broker("jobs", "ls", "--queue", "sample", env=as_producer), "not valid")

        health = _broker("health", env=tls)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
    finally:
        if worker is not None:
            worker.signal(signal.SIGTERM)
            worker.wait()
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output


def test_the_keys_of_a_running_broker_are_managed_through_it(tmp_path: Path) -> None:
    database = str(tmp_path / "jobbroker.db")
    proc, _target = start_broker(database, "--auth")
    try:
        done = _broker("keys", "create", "late", "--role", "admin", "--database", database, env={})
        _refused(done, "manage keys through it")
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output
