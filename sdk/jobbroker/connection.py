"""ConnectionOptions: everything a channel to the broker needs, in one place.

Client, AsyncClient and Worker take one, or its fields as keywords, and make
their channels from it and nothing else; the `broker` CLI builds one with
`ConnectionOptions.from_env` from its flags and the BROKER_* variables.

The API key travels as call metadata, which the clients add to every call
they start (unary calls, WaitJob, the submit stream, the lease stream): a
stream pays for it once, when it opens, and without a key a call is started
exactly as it was before keys existed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TypedDict, Unpack

import grpc

from .errors import InvalidArgumentError

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = timedelta(seconds=30)

# What the broker may send (its message limit) and take: a lease batch or a
# listing of large payloads must not pass gRPC's default of 4 MiB.
MESSAGE_LIMIT = 64 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, str | int], ...] = (
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
)

LOAD_BALANCING = ("pick_first", "round_robin")

Pem = bytes | str | os.PathLike[str]
"""PEM data as bytes, or the path of a PEM file (read when a channel is made)."""

Metadata = tuple[tuple[str, str], ...]

# Each field from_env reads, and its variable; errors name both.
ENV: dict[str, str] = {
    "target": "BROKER_TARGET",
    "api_key": "BROKER_API_KEY",
    "tls": "BROKER_TLS",
    "root_certificates": "BROKER_TLS_CA",
    "client_certificate": "BROKER_CLIENT_CERT",
    "client_key": "BROKER_CLIENT_KEY",
    "server_name": "BROKER_TLS_SERVER_NAME",
}
_PEM_FIELDS = ("root_certificates", "client_certificate", "client_key")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConnectionSettings(TypedDict, total=False):
    """ConnectionOptions' fields but `target`, as keyword arguments: they
    override the options given (None leaves a field as it is)."""

    api_key: str | None
    tls: bool | None
    root_certificates: Pem | None
    client_certificate: Pem | None
    client_key: Pem | None
    server_name: str | None
    timeout: timedelta | float | None
    load_balancing: str | None
    channel_options: Sequence[tuple[str, str | int]] | None


def _named(name: str) -> str:
    env = ENV.get(name)
    return f"{name} ({env})" if env else name


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionOptions:
    """How to reach a broker.

    target: "host:port", or any gRPC target ("dns:///broker:50051",
    "ipv4:10.0.0.1:50051,10.0.0.2:50051"). api_key: sent with every call, for
    a broker started with `--auth`.

    tls: speak TLS, trusting `root_certificates` (a CA's PEM), or gRPC's
    default roots when none is given (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else
    the Mozilla roots bundled with grpcio). `client_certificate` and
    `client_key` are for a broker that asks for one (mutual TLS); giving any
    of the three implies TLS. `server_name` is the name to expect on the
    broker's certificate, when it is not the target's host.

    timeout: how long each call may take, retries included. load_balancing:
    "pick_first" (gRPC's default) or "round_robin", across the addresses the
    target resolves to. channel_options: gRPC channel arguments, applied over
    the SDK's own (64 MiB messages each way).
    """

    target: str = DEFAULT_TARGET
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    root_certificates: Pem | None = None
    client_certificate: Pem | None = None
    client_key: Pem | None = field(default=None, repr=False)
    server_name: str | None = None
    timeout: timedelta = DEFAULT_TIMEOUT
    load_balancing: str | None = None
    channel_options: tuple[tuple[str, str | int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise InvalidArgumentError(f"{_named('target')} must be a broker address, host:port")
        _check_api_key(self.api_key)
        self._check_tls()
        if not isinstance(self.timeout, timedelta) or self.timeout <= timedelta(0):
            raise InvalidArgumentError(
                f"timeout must be a positive timedelta (got {self.timeout!r})"
            )
        if self.load_balancing is not None and self.load_balancing not in LOAD_BALANCING:
            raise InvalidArgumentError(
                f"load_balancing {self.load_balancing!r} is not one of {', '.join(LOAD_BALANCING)}"
            )
        object.__setattr__(self, "channel_options", _checked_options(self.channel_options))

    def _check_tls(self) -> None:
        for name in _PEM_FIELDS:
            _check_pem_type(name, getattr(self, name))
        if (self.client_certificate is None) != (self.client_key is None):
            given, missing = (
                ("client_certificate", "client_key")
                if self.client_key is None
                else ("client_key", "client_certificate")
            )
            raise InvalidArgumentError(
                f"{_named(given)} is given without {_named(missing)}: "
                "mutual TLS takes both, or neither"
            )
        if self.server_name is not None:
            if not isinstance(self.server_name, str) or not self.server_name.strip():
                raise InvalidArgumentError(f"{_named('server_name')} must be a host name")
            if not self.uses_tls:
                raise InvalidArgumentError(
                    f"{_named('server_name')} is the name on the broker's TLS certificate: "
                    f"it needs {_named('tls')} set too"
                )

    @property
    def uses_tls(self) -> bool:
        """True when the channel speaks TLS."""
        return self.tls or any(getattr(self, name) is not None for name in _PEM_FIELDS)

    @property
    def call_metadata(self) -> Metadata | None:
        """What every call sends along: the API key, or None without one.

        Channels from `channel()` and `aio_channel()` do not add it themselves;
        the SDK's clients pass it on each call they start."""
        if self.api_key is None:
            return None
        return (("authorization", f"Bearer {self.api_key}"),)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] = os.environ,
        *,
        target: str | None = None,
        **settings: Unpack[ConnectionSettings],
    ) -> ConnectionOptions:
        """The options the BROKER_* variables give, then the keywords that are not None.

        BROKER_TARGET, BROKER_API_KEY, BROKER_TLS (1/true/yes or 0/false/no),
        BROKER_TLS_CA, BROKER_CLIENT_CERT, BROKER_CLIENT_KEY (paths of PEM
        files), BROKER_TLS_SERVER_NAME. An empty variable counts as unset; a
        value that cannot be used is an InvalidArgumentError naming it.
        """
        found: dict[str, object] = {}
        for name, env in ENV.items():
            raw = environ.get(env, "").strip()
            if name == "tls":
                found[name] = _env_bool(env, raw)
            elif raw and name in _PEM_FIELDS:
                _check_file(env, raw)
                found[name] = raw
            elif raw:
                found[name] = raw
        overrides = {"target": target, **settings}
        found.update((name, value) for name, value in overrides.items() if value is not None)
        return cls(**_normalized(found))  # type: ignore[arg-type]  # checked in __post_init__

    def channel(self) -> grpc.Channel:
        """A new blocking channel (pass `call_metadata` on each call)."""
        credentials = self._credentials()
        options = self._channel_args()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, credentials, options=options)

    def aio_channel(self) -> grpc.aio.Channel:
        """A new grpc.aio channel (pass `call_metadata` on each call)."""
        credentials = self._credentials()
        options = self._channel_args()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem("root_certificates", self.root_certificates),
            private_key=_read_pem("client_key", self.client_key),
            certificate_chain=_read_pem("client_certificate", self.client_certificate),
        )

    def _channel_args(self) -> list[tuple[str, str | int]]:
        # A dict: a later value of a key replaces the earlier one, rather than
        # sending both and leaving gRPC to pick.
        args = dict(CHANNEL_OPTIONS)
        args.update(self.channel_options)
        if self.load_balancing is not None:
            config: dict[str, object] = {"loadBalancingConfig": [{self.load_balancing: {}}]}
            args["grpc.service_config"] = json.dumps(config)
        if self.server_name is not None:
            args["grpc.ssl_target_name_override"] = self.server_name
        return list(args.items())


def resolve(target: str | ConnectionOptions, settings: ConnectionSettings) -> ConnectionOptions:
    """The options a Client, AsyncClient or Worker was given: a target or
    options, with the keyword settings over them."""
    changes = {name: value for name, value in settings.items() if value is not None}
    if isinstance(target, ConnectionOptions):
        return replace(target, **_normalized(changes)) if changes else target  # type: ignore[arg-type]
    if not isinstance(target, str):
        raise InvalidArgumentError(
            f"target must be a host:port string or ConnectionOptions (got {type(target).__name__})"
        )
    return ConnectionOptions(target=target, **_normalized(changes))  # type: ignore[arg-type]


def _normalized(values: Mapping[str, object]) -> dict[str, object]:
    out = dict(values)
    timeout = out.get("timeout")
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        out["timeout"] = timedelta(seconds=timeout)
    return out


def _check_api_key(key: str | None) -> None:
    if key is None:
        return
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"{_named('api_key')} must be a non-empty string")
    # gRPC refuses other metadata characters only when a call starts, and
    # says "metadata was invalid" without naming any.
    if not all("!" <= c <= "~" for c in key):
        raise InvalidArgumentError(
            f"{_named('api_key')} holds a space, control or non-ASCII character: "
            "is it copied whole, without a line break?"
        )


def _check_pem_type(name: str, value: object) -> None:
    if value is None or isinstance(value, bytes | os.PathLike):
        return
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"{_named(name)} must be PEM bytes or a file path (got {type(value).__name__})"
        )
    if value.lstrip().startswith("-----BEGIN"):
        raise InvalidArgumentError(
            f"{_named(name)} looks like PEM text given as a str, which is read as a path: "
            "give it as bytes"
        )
    if not value.strip():
        raise InvalidArgumentError(f"{_named(name)} must not be an empty path")


def _checked_options(options: object) -> tuple[tuple[str, str | int], ...]:
    """The channel options as a tuple of pairs (a list of lists is taken too)."""
    pairs: list[tuple[str, str | int]] = []
    for pair in options if isinstance(options, list | tuple) else [options]:
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str | int)
        ):
            raise InvalidArgumentError(
                "channel_options takes (name, value) pairs, each value a str or an int "
                f"(got {pair!r})"
            )
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _read_pem(name: str, value: Pem | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        data, what = value, "the bytes given are"
    else:
        path = os.fspath(value)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            raise InvalidArgumentError(
                f"{_named(name)}: cannot read {path!r}: {error.strerror}"
            ) from None
        what = f"{path!r} is"
    if b"-----BEGIN" not in data:
        raise InvalidArgumentError(f"{_named(name)}: {what} not PEM (no -----BEGIN line)")
    return data


def _check_file(env: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise InvalidArgumentError(f"{env}={path!r}: cannot read it: {error.strerror}") from None


def _env_bool(env: str, raw: str) -> bool:
    text = raw.lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgumentError(f"{env}={raw!r} is not true or false (1, true, yes / 0, false, no)")
