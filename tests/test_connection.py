"""ConnectionOptions: its checks, from_env, and each of its settings against a
real broker: load balancing and channel options, the API key on every kind of
call, key management, a worker whose key is refused, TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from jobbroker import (
    ApiKey,
    AsyncClient,
    AuthenticationError,
    BrokerUnavailableError,
    Client,
    ConnectionOptions,
    FailedPreconditionError,
    InvalidArgumentError,
    JobRequest,
    JobState,
    PermissionDeniedError,
    ResourceExhaustedError,
    Role,
    Worker,
    task,
)
from jobbroker_server.config import Settings
from jobbroker_server.domain.keys import Role as StoredRole
from jobbroker_server.testing import BrokerThread
from tests.conftest import FAST
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

QUEUE = "conn"


@task(queue=QUEUE)
def double(payload: int) -> int:
    return payload * 2


held_entered = threading.Event()
held_gate = threading.Event()


@task(queue=QUEUE)
def held(payload: None) -> str:
    """Signal `held_entered`, then wait for `held_gate`."""
    held_entered.set()
    held_gate.wait(20)
    return "done"


# --- fixtures ---


@dataclass
class Pki:
    """A CA, the broker's certificate from it (for 127.0.0.1), a client
    certificate from it, and a client certificate from a CA nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path
    authority: trustme.CA
    folder: Path

    def server_for(self, *names: str) -> tuple[Path, Path]:
        """A broker certificate for other names than 127.0.0.1."""
        leaf = self.authority.issue_cert(*names)
        cert, key = self.folder / f"{names[0]}.pem", self.folder / f"{names[0]}.key"
        leaf.private_key_pem.write_to_path(str(key))
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, stranger = trustme.CA(), trustme.CA()
    folder = tmp_path / "pki"
    folder.mkdir()
    files: dict[str, Path] = {}
    for name, leaf in (
        ("server", ca.issue_cert("127.0.0.1", "localhost")),
        ("client", ca.issue_cert("worker@example.com")),
        ("stranger", stranger.issue_cert("worker@example.com")),
    ):
        files[f"{name}_cert"] = folder / f"{name}.pem"
        files[f"{name}_key"] = folder / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(files[f"{name}_cert"]))
        leaf.private_key_pem.write_to_path(str(files[f"{name}_key"]))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return Pki(ca=folder / "ca.pem", authority=ca, folder=folder, **files)


@pytest.fixture
def plain(tmp_path: Path) -> Settings:
    return replace(FAST, database=str(tmp_path / "broker.db"))


@dataclass
class Secured:
    """A broker started with auth on, and the secret of a key of each role."""

    broker: BrokerThread
    keys: dict[Role, str]


@pytest.fixture
def secured(plain: Settings) -> Iterator[Secured]:
    with BrokerThread(replace(plain, auth=True)) as broker:
        keys = {}
        for role in StoredRole:
            _, text = broker.run(broker.app.keys.create(role.value, role, ()))
            keys[Role(role.value)] = text
        yield Secured(broker, keys)


def _run_in_thread(worker: Worker) -> tuple[threading.Thread, list[BaseException]]:
    """Run the worker in a thread; the list gets what run_async raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(worker.run_async())
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


def _stopped(worker: Worker, thread: threading.Thread) -> None:
    worker.stop()
    thread.join(15)
    assert not thread.is_alive()


# --- the options themselves ---


def test_from_env_reads_every_variable(pki: Pki) -> None:
    env = {
        "BROKER_TARGET": "broker.internal:6000",
        "BROKER_API_KEY": " jbk_abc_def\n",  # as `$(cat key)` or a .env file may give it
        "BROKER_TLS": "yes",
        "BROKER_TLS_CA": str(pki.ca),
        "BROKER_CLIENT_CERT": str(pki.client_cert),
        "BROKER_CLIENT_KEY": str(pki.client_key),
        "BROKER_TLS_SERVER_NAME": "broker.test",
        "PATH": "/usr/bin",
    }
    options = ConnectionOptions.from_env(env)
    assert options == ConnectionOptions(
        target="broker.internal:6000",
        api_key="jbk_abc_def",
        tls=True,
        root_certificates=str(pki.ca),
        client_certificate=str(pki.client_cert),
        client_key=str(pki.client_key),
        server_name="broker.test",
    )
    assert options.call_metadata == (("authorization", "Bearer jbk_abc_def"),)


def test_from_env_without_variables_is_the_defaults_and_empty_ones_are_unset() -> None:
    assert ConnectionOptions.from_env({}) == ConnectionOptions()
    empty = {name: "" for name in ("BROKER_TARGET", "BROKER_API_KEY", "BROKER_TLS_CA")}
    options = ConnectionOptions.from_env(empty)
    assert options == ConnectionOptions() and options.call_metadata is None
    assert not options.uses_tls and options.target == "127.0.0.1:50051"
    assert options.timeout == timedelta(seconds=30)


def test_from_env_keywords_win_and_none_leaves_the_variable(pki: Pki) -> None:
    env = {"BROKER_TARGET": "a:1", "BROKER_API_KEY": "from-env", "BROKER_TLS": "1"}
    flags: dict[str, Any] = {"api_key": None, "tls": None, "root_certificates": None}
    options = ConnectionOptions.from_env(env, target="b:2", timeout=5, **flags)
    assert (options.target, options.api_key, options.tls) == ("b:2", "from-env", True)
    assert options.timeout == timedelta(seconds=5)
    options = ConnectionOptions.from_env(env, api_key="flag", root_certificates=str(pki.ca))
    assert (options.api_key, options.root_certificates) == ("flag", str(pki.ca))
    assert ConnectionOptions.from_env({"BROKER_TLS": "off"}, tls=True).tls


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BROKER_TLS": "maybe"}, "BROKER_TLS='maybe' is not true or false"),
        ({"BROKER_TLS_CA": "/nowhere/ca.pem"}, "BROKER_TLS_CA='/nowhere/ca.pem': cannot read"),
        ({"BROKER_CLIENT_KEY": "/nowhere/k.pem"}, "BROKER_CLIENT_KEY='/nowhere/k.pem'"),
        ({"BROKER_API_KEY": "jbk_a b"}, "api_key (BROKER_API_KEY) holds a space"),
        ({"BROKER_TLS_SERVER_NAME": "b.test"}, "needs tls (BROKER_TLS) set too"),
    ],
)
def test_from_env_names_the_variable_it_cannot_use(env: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(named)):
        ConnectionOptions.from_env(env)


def test_a_client_certificate_needs_its_key_and_the_key_its_certificate(pki: Pki) -> None:
    with pytest.raises(
        InvalidArgumentError,
        match=r"client_certificate \(BROKER_CLIENT_CERT\) "
        r"is given without client_key \(BROKER_CLIENT_KEY\)",
    ):
        ConnectionOptions(client_certificate=pki.client_cert)
    with pytest.raises(InvalidArgumentError, match=r"client_key .* without client_certificate"):
        Client("127.0.0.1:1", client_key=pki.client_key.read_bytes())
    with pytest.raises(InvalidArgumentError, match="BROKER_CLIENT_KEY"):
        ConnectionOptions.from_env({"BROKER_CLIENT_CERT": str(pki.client_cert)})


def test_an_unreadable_or_foreign_file_is_named_when_the_channel_is_made(
    pki: Pki, tmp_path: Path
) -> None:
    missing = tmp_path / "gone.pem"
    options = ConnectionOptions(root_certificates=missing)  # read when a channel is made
    with pytest.raises(InvalidArgumentError, match=f"root_certificates .*cannot read '{missing}'"):
        Client(options)
    with pytest.raises(InvalidArgumentError, match=r"client_key \(BROKER_CLIENT_KEY\): cannot"):
        AsyncClient(client_certificate=pki.client_cert, client_key=tmp_path)  # a directory
    notes = tmp_path / "notes.txt"
    notes.write_text("not a certificate")
    with pytest.raises(InvalidArgumentError, match=f"'{notes}' is not PEM"):
        Client(root_certificates=str(notes))
    with pytest.raises(InvalidArgumentError, match="the bytes given are not PEM"):
        ConnectionOptions(root_certificates=b"junk").channel()
    with pytest.raises(InvalidArgumentError, match="PEM text given as a str"):
        ConnectionOptions(root_certificates=pki.ca.read_text())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target": ""}, "target .* must be a broker address"),
        ({"api_key": ""}, "api_key .* must be a non-empty string"),
        ({"api_key": "jbk_x_y\n"}, "without a line break"),
        ({"timeout": timedelta(0)}, "timeout must be a positive timedelta"),
        ({"load_balancing": "random"}, "'random' is not one of pick_first, round_robin"),
        ({"channel_options": (("grpc.x",),)}, r"\(name, value\) pairs"),
        ({"channel_options": (("grpc.x", 1.5),)}, r"\(name, value\) pairs"),
        ({"server_name": "broker.test"}, "needs tls"),
        ({"root_certificates": 42}, "PEM bytes or a file path"),
    ],
)
def test_options_that_cannot_work_are_refused_up_front(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        ConnectionOptions(**fields)


def test_keywords_override_the_options_given_and_the_key_is_not_in_the_repr() -> None:
    base = ConnectionOptions(target="a:1", api_key="jbk_id_secret", timeout=timedelta(seconds=5))
    assert "jbk_id_secret" not in repr(base)
    channel_options = [("grpc.primary_user_agent", "jobbroker-test")]
    with Client(base, timeout=7, channel_options=channel_options) as client:
        assert client.options == replace(
            base,
            timeout=timedelta(seconds=7),
            channel_options=(("grpc.primary_user_agent", "jobbroker-test"),),
        )
    with Client("b:2", api_key=None, tls=None) as client:  # None: not given
        assert client.options == ConnectionOptions(target="b:2")
    worker = Worker([double], target=base, api_key="jbk_id_other", tls=True)
    assert worker.options == replace(base, api_key="jbk_id_other", tls=True)
    assert Worker([double]).options == ConnectionOptions()
    with pytest.raises(InvalidArgumentError, match="host:port string or ConnectionOptions"):
        Client(42)  # type: ignore[arg-type]


# --- channel settings against a real broker ---


def test_round_robin_and_channel_options_work_against_a_broker(plain: Settings) -> None:
    """The SDK's own limits stay under the caller's options: a listing of
    five 900 kB payloads passes gRPC's default 4 MiB."""
    with (
        BrokerThread(plain) as broker,
        Client(
            broker.target,
            load_balancing="round_robin",
            channel_options=(("grpc.primary_user_agent", "jobbroker-test"),),
            timeout=10,
        ) as client,
    ):
        big = b"x" * 900_000
        handles = [client.submit("t", big, queue="big") for _ in range(5)]
        assert client.get_job(handles[0].id).payload == big
        page = client.list_jobs(queue="big")
        assert len(page.jobs) == 5


def test_round_robin_spreads_calls_over_the_targets_addresses(tmp_path: Path) -> None:
    one = replace(FAST, database=str(tmp_path / "one.db"))
    two = replace(FAST, database=str(tmp_path / "two.db"))
    with BrokerThread(one) as first, BrokerThread(two) as second:
        target = f"ipv4:{first.target},{second.target}"
        counts = {first.target: 0, second.target: 0}
        with Client(target, load_balancing="round_robin", timeout=10) as both:

            def spread() -> bool:
                both.submit_many([JobRequest("t", None, queue="rr")])
                for broker in (first, second):
                    with Client(broker.target, timeout=10) as alone:
                        counts[broker.target] = len(alone.list_jobs(queue="rr").jobs)
                return all(counts.values())

            wait_for(spread, what="a call on each broker")
        with Client(target, load_balancing="pick_first", timeout=10) as first_only:
            for _ in range(6):
                first_only.submit_many([JobRequest("t", None, queue="pf")])
        seen = []
        for broker in (first, second):
            with Client(broker.target, timeout=10) as alone:
                seen.append(len(alone.list_jobs(queue="pf").jobs))
        assert sorted(seen) == [0, 6]


def test_channel_options_go_over_the_sdks_own(plain: Settings) -> None:
    with BrokerThread(plain) as broker:
        small = (("grpc.max_send_message_length", 1024),)
        with Client(broker.target, channel_options=small, timeout=5) as client:
            client.submit_many([JobRequest("t", "x" * 100, queue="q")])
            with pytest.raises(ResourceExhaustedError):
                client.submit_many([JobRequest("t", "x" * 2000, queue="q")])


# --- the API key ---


def test_the_key_goes_with_every_kind_of_call(secured: Secured) -> None:
    """Unary calls, the submit stream, WaitJob and the lease stream, from
    the blocking client: refused without a key, served with one."""
    target = secured.broker.target
    with Client(target, timeout=5) as anonymous:
        with pytest.raises(AuthenticationError, match="API key"):
            anonymous.get_job("01a00000-0000-7000-8000-000000000000")
        with pytest.raises(AuthenticationError):
            anonymous.submit("t", 1, queue=QUEUE)
        with pytest.raises(AuthenticationError):
            anonymous.submit_many([JobRequest("t", 1, queue=QUEUE)])
        with pytest.raises(AuthenticationError):
            list(anonymous.wait_job("01a00000-0000-7000-8000-000000000000"))
        with anonymous.lease_stream([QUEUE]) as stream, pytest.raises(AuthenticationError):
            next(stream)
    producer = Client(target, api_key=secured.keys[Role.PRODUCER], timeout=5)
    worker = Client(ConnectionOptions(target=target, api_key=secured.keys[Role.WORKER]))
    with producer, worker:
        handle = producer.submit(double, 21)  # the submit stream
        [batched] = producer.submit_many([JobRequest(double, 1)])
        assert producer.get_job(handle.id).state is JobState.PENDING
        assert {j.id for j in producer.list_jobs(queue=QUEUE).jobs} == {handle.id, batched.id}
        with worker.lease_stream([QUEUE], prefetch=2) as stream:
            for _ in range(2):
                lease = next(stream)
                lease.complete(lease.payload() * 2)
        states = [job.state for job in producer.wait_job(handle.id, timeout=10)]
        assert states[-1] is JobState.SUCCEEDED
        assert handle.result(timeout=10) == 42
        with pytest.raises(PermissionDeniedError, match="worker role"):
            worker.submit(double, 1)
        with pytest.raises(PermissionDeniedError):
            producer.dlq_list()


async def _async_calls(target: str, keys: dict[Role, str]) -> None:
    async with AsyncClient(target, timeout=5) as anonymous:
        with pytest.raises(AuthenticationError):
            await anonymous.submit("t", 1, queue=QUEUE)
        with pytest.raises(AuthenticationError):
            await anonymous.list_jobs()
        with pytest.raises(AuthenticationError):
            async for _ in anonymous.wait_job("01a00000-0000-7000-8000-000000000000"):
                pass
        # Often enough that grpc.aio losing the refusal under the first
        # write (see AsyncLeaseStream._refusal) would show.
        for _ in range(10):
            with pytest.raises(AuthenticationError):
                async with anonymous.lease_stream([QUEUE]) as stream:
                    await anext(stream)
    producer = AsyncClient(target, api_key=keys[Role.PRODUCER], timeout=5)
    worker = AsyncClient(target, api_key=keys[Role.WORKER], timeout=5)
    async with producer, worker:
        handle = await producer.submit(double, 4)
        [batched] = await producer.submit_many([JobRequest(double, 5)])
        assert (await producer.get_job(batched.id)).state is JobState.PENDING
        async with worker.lease_stream([QUEUE], prefetch=2) as stream:
            for _ in range(2):
                lease = await anext(stream)
                await lease.complete(lease.payload() * 2)
        states = [job.state async for job in producer.wait_job(handle.id, timeout=10)]
        assert states[-1] is JobState.SUCCEEDED
        assert await handle.result(timeout=10) == 8


def test_the_async_client_sends_the_key_on_every_kind_of_call(secured: Secured) -> None:
    asyncio.run(_async_calls(secured.broker.target, secured.keys))


def test_keys_are_made_listed_and_revoked_through_the_sdk(secured: Secured) -> None:
    target = secured.broker.target
    with Client(target, api_key=secured.keys[Role.ADMIN], timeout=5) as admin:
        made = admin.create_api_key("ci", Role.PRODUCER, [QUEUE])
        assert made.secret not in repr(made) and made.secret.startswith(f"jbk_{made.key.id}_")
        assert (made.key.name, made.key.role, made.key.queues) == ("ci", Role.PRODUCER, (QUEUE,))
        assert made.key.created_at.tzinfo is not None and made.key.revoked_at is None
        assert made.key in admin.list_api_keys()
        with pytest.raises(FailedPreconditionError):
            admin.create_api_key("ci", Role.WORKER)
        with pytest.raises(InvalidArgumentError, match="list of queue names"):
            admin.create_api_key("other", Role.WORKER, QUEUE)
        with Client(target, api_key=made.secret, timeout=5) as ci:
            ci.submit(double, 1)
            with pytest.raises(PermissionDeniedError, match="may not use queue"):
                ci.submit("t", 1, queue="elsewhere")
            revoked = admin.revoke_api_key("ci")
            assert isinstance(revoked, ApiKey) and revoked.revoked_at is not None
            with pytest.raises(AuthenticationError, match=r"revoked|not valid"):
                ci.submit(double, 1)
        assert "ci" not in [k.name for k in admin.list_api_keys()]
        assert "ci" in [k.name for k in admin.list_api_keys(include_revoked=True)]

    async def through_async() -> None:
        async with AsyncClient(target, api_key=secured.keys[Role.ADMIN], timeout=5) as admin:
            made = await admin.create_api_key("robot", Role.WORKER)
            assert made.key.queues == () and made.key.role is Role.WORKER
            assert made.key.id in [k.id for k in await admin.list_api_keys()]
            assert (await admin.revoke_api_key(made.key.id)).revoked_at is not None

    asyncio.run(through_async())


def test_a_worker_with_a_key_runs_jobs_and_stops_when_the_key_is_revoked(
    secured: Secured,
) -> None:
    """The broker ends a revoked key's stream with UNAUTHENTICATED: the
    worker does not reconnect, it gives up the job it held, and run_async
    raises."""
    target = secured.broker.target
    held_entered.clear()
    held_gate.clear()
    with Client(target, api_key=secured.keys[Role.ADMIN], timeout=5) as admin:
        key = admin.create_api_key("first", Role.WORKER).secret
        worker = Worker([double, held], target=target, api_key=key, concurrency=2)
        thread, raised = _run_in_thread(worker)
        try:
            assert admin.submit(double, 3).result(timeout=10) == 6
            stuck = admin.submit(held, None)
            assert held_entered.wait(10)
            admin.revoke_api_key("first")
            thread.join(15)
            assert not thread.is_alive()
        finally:
            held_gate.set()
            _stopped(worker, thread)
        assert len(raised) == 1 and isinstance(raised[0], AuthenticationError), raised
        # Not reported; leased still if the key went before its Start did.
        assert admin.get_job(stuck.id).state in (JobState.LEASED, JobState.RUNNING)


def test_a_job_given_up_by_a_revoked_worker_runs_again_once_its_lease_expires(
    secured: Secured,
) -> None:
    target = secured.broker.target
    held_entered.clear()
    held_gate.clear()
    with Client(target, api_key=secured.keys[Role.ADMIN], timeout=5) as admin:
        key = admin.create_api_key("first", Role.WORKER).secret
        worker = Worker([held], target=target, api_key=key)
        thread, raised = _run_in_thread(worker)
        try:
            stuck = admin.submit(held, None)
            assert held_entered.wait(10)
            admin.revoke_api_key("first")
            thread.join(15)
        finally:
            held_gate.set()
            _stopped(worker, thread)
        assert [type(e) for e in raised] == [AuthenticationError]
        again = Worker([held], target=target, api_key=secured.keys[Role.WORKER])
        thread, _ = _run_in_thread(again)
        try:
            assert stuck.result(timeout=6) == "done"
            history = admin.get_job(stuck.id).history
            assert [a.outcome for a in history] == ["lease_expired", "succeeded"]
        finally:
            _stopped(again, thread)


@pytest.mark.parametrize(
    ("role", "refusal"),
    [(None, AuthenticationError), (Role.PRODUCER, PermissionDeniedError)],
)
def test_a_worker_with_a_wrong_key_or_role_stops_without_reconnecting(
    secured: Secured, role: Role | None, refusal: type[Exception]
) -> None:
    key = secured.keys[role] if role else "jbk_0000000000000000_wrong"
    worker = Worker([double], target=secured.broker.target, api_key=key)
    began = time.monotonic()
    with pytest.raises(refusal):
        worker.run()
    # The first reconnect would wait at least RECONNECT_FIRST (0.5 s) x 2.
    assert time.monotonic() - began < 1.0


def test_a_worker_with_a_key_reconnects_when_the_broker_comes_back(plain: Settings) -> None:
    """UNAVAILABLE (the broker restarting) is still retried, and the new
    stream carries the key too."""
    settings = replace(plain, auth=True)
    broker = BrokerThread(settings).start()
    _, secret = broker.run(broker.app.keys.create("w", StoredRole.WORKER, ()))
    _, producer = broker.run(broker.app.keys.create("p", StoredRole.PRODUCER, ()))
    settings = replace(settings, port=broker.app.port)
    worker = Worker([double], target=broker.target, api_key=secret)
    thread, raised = _run_in_thread(worker)
    try:
        with Client(broker.target, api_key=producer, timeout=10) as client:
            assert client.submit(double, 1).result(timeout=10) == 2
            broker.stop()
            broker = BrokerThread(settings).start()
            assert client.submit(double, 2).result(timeout=20) == 4
        assert thread.is_alive() and raised == []
    finally:
        _stopped(worker, thread)
        broker.stop()


# --- TLS ---


def _tls_broker(plain: Settings, pki: Pki, **fields: Any) -> BrokerThread:
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), **fields}
    return BrokerThread(replace(plain, **tls))


def test_a_tls_client_submits_to_a_tls_broker_and_a_tls_worker_runs_it(
    plain: Settings, pki: Pki
) -> None:
    with _tls_broker(plain, pki) as broker:
        trusted = ConnectionOptions(target=broker.target, tls=True, root_certificates=pki.ca)
        worker = Worker([double], target=trusted)
        thread, raised = _run_in_thread(worker)
        try:
            # The CA as bytes, and TLS implied by giving it.
            with Client(broker.target, root_certificates=pki.ca.read_bytes()) as client:
                assert client.options.uses_tls
                assert client.submit(double, 5).result(timeout=10) == 10

            async def through_async() -> int:
                async with AsyncClient(trusted) as client:
                    handle = await client.submit(double, 6)
                    return await handle.result(timeout=10)

            assert asyncio.run(through_async()) == 12
        finally:
            _stopped(worker, thread)
        assert raised == []


def test_plaintext_to_a_tls_broker_is_refused_not_left_hanging(plain: Settings, pki: Pki) -> None:
    with _tls_broker(plain, pki) as broker:
        began = time.monotonic()
        with Client(broker.target, timeout=2) as client, pytest.raises(BrokerUnavailableError):
            client.get_job("01a00000-0000-7000-8000-000000000000")
        with Client(broker.target, timeout=2) as client, pytest.raises(BrokerUnavailableError):
            client.submit(double, 1)
        # TLS without the broker's CA: gRPC's default roots do not include it.
        with (
            Client(broker.target, tls=True, timeout=2) as client,
            pytest.raises(BrokerUnavailableError),
        ):
            client.get_job("01a00000-0000-7000-8000-000000000000")
        assert time.monotonic() - began < 15


def test_mutual_tls_takes_a_certificate_from_the_brokers_client_ca_only(
    plain: Settings, pki: Pki
) -> None:
    """With an API key as well: TLS says which machine, the key what it may do."""
    mutual = replace(plain, auth=True)
    with _tls_broker(mutual, pki, tls_client_ca=str(pki.ca)) as broker:
        _, secret = broker.run(broker.app.keys.create("p", StoredRole.PRODUCER, ()))
        trusted = ConnectionOptions(
            target=broker.target,
            root_certificates=pki.ca,
            api_key=secret,
            timeout=timedelta(seconds=2),
        )
        with Client(trusted, client_certificate=pki.client_cert, client_key=pki.client_key) as ok:
            handle = ok.submit(double, 1)
            assert ok.get_job(handle.id).state is JobState.PENDING
        with Client(trusted) as without, pytest.raises(BrokerUnavailableError):
            without.get_job(handle.id)
        stranger = replace(
            trusted, client_certificate=pki.stranger_cert, client_key=pki.stranger_key
        )
        with Client(stranger) as wrong, pytest.raises(BrokerUnavailableError):
            wrong.get_job(handle.id)


def test_server_name_is_the_name_checked_on_the_brokers_certificate(
    plain: Settings, pki: Pki
) -> None:
    cert, key = pki.server_for("broker.internal")
    with BrokerThread(replace(plain, tls_cert=str(cert), tls_key=str(key))) as broker:
        trusted = ConnectionOptions(
            target=broker.target, root_certificates=pki.ca, timeout=timedelta(seconds=2)
        )
        with Client(trusted) as by_address, pytest.raises(BrokerUnavailableError):
            by_address.submit(double, 1)
        with Client(trusted, server_name="broker.internal") as by_name:
            assert by_name.get_job(by_name.submit(double, 1).id).state is JobState.PENDING
