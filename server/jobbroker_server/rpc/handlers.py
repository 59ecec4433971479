"""The Broker service's method handlers: bytes in, status codes out, in one place.

Built from the service's descriptor rather than the generated registration, so
every method gets the same three guards:

- the call's API key and role are admitted (``auth.Guard``) before the method
  runs, and the method is given the caller; a call still open when its key is
  revoked ends with UNAUTHENTICATED;

- a request that does not parse reaches the method as ``Malformed``, and the
  caller gets INVALID_ARGUMENT (grpc's own deserializer failure is UNKNOWN, with
  a traceback logged per request);
- a BrokerError becomes its status code (``errors.STATUS``); any other
  exception becomes INTERNAL with a reference the log line carries, never the
  exception's text (which may hold SQL or a driver's message).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from jobbroker_server.domain.errors import BrokerError, InvalidArgument, Unauthenticated
from jobbroker_server.rpc.auth import RULES, Guard
from jobbroker_server.rpc.errors import abort

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]


class Malformed:
    """A request whose bytes are not the method's message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _deserializer(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as error:
            return Malformed(str(error))

    return parse


def _refuse(method: MethodDescriptor, request: object) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(
            f"the request is not a valid {method.input_type.full_name} message ({request.error})"
        )


async def _checked(
    method: MethodDescriptor, requests: AsyncIterator[object]
) -> AsyncIterator[object]:
    async for request in requests:
        _refuse(method, request)
        yield request


@contextlib.asynccontextmanager
async def _statuses(context: Ctx, method: MethodDescriptor, guard: Guard) -> AsyncIterator[Any]:
    """Admit the call and give its caller; end the call with the status of
    what the method raised."""
    try:
        caller = guard.admit(method.name, context)
        with guard.keys.open_call(caller):
            try:
                yield caller
            except asyncio.CancelledError:
                if not guard.keys.ended_by_revocation():
                    raise
                raise Unauthenticated("the API key of this call was revoked") from None
    except BrokerError as error:
        await abort(context, error)
    except grpc.aio.AbortError:
        raise  # the method ended the call itself
    except Exception:
        reference = uuid.uuid4().hex[:12]
        log.exception("internal error in %s (reference %s)", method.name, reference)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"the broker failed to handle {method.name}; its log has the details "
            f"under reference {reference}",
        )


def _requests(method: MethodDescriptor, request: Any) -> Any:
    """The request, or for a client stream its messages, each checked."""
    if method.client_streaming:
        return _checked(method, request)
    _refuse(method, request)
    return request


def _unary_response(method: MethodDescriptor, behaviour: Any, guard: Guard) -> Any:
    @functools.wraps(behaviour)
    async def handle(request: Any, context: Ctx) -> Any:
        async with _statuses(context, method, guard) as caller:
            return await behaviour(_requests(method, request), context, caller)

    return handle


def _stream_response(method: MethodDescriptor, behaviour: Any, guard: Guard) -> Any:
    @functools.wraps(behaviour)
    async def handle(request: Any, context: Ctx) -> AsyncIterator[Any]:
        async with _statuses(context, method, guard) as caller:
            async for reply in behaviour(_requests(method, request), context, caller):
                yield reply

    return handle


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(
    service: ServiceDescriptor, servicer: object, guard: Guard, server: grpc.aio.Server
) -> None:
    """Register ``servicer``'s method for each of ``service``'s methods, each
    called as ``method(request, context, caller)``; a method without a rule in
    ``auth.RULES`` or without a servicer method stops the broker here."""
    handlers = {}
    for method in service.methods:
        if method.name not in RULES:
            raise LookupError(f"{service.full_name}.{method.name} has no rule in rpc/auth.py")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        wrap = _stream_response if method.server_streaming else _unary_response
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            wrap(method, behaviour, guard),
            request_deserializer=_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
