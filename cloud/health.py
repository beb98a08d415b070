"""``grpc.health.v1`` with watchers that cannot outstay their welcome.

Health stays open to peers without a token (load balancers and orchestrators probe it), so a
``Watch`` call is the cheapest stream anyone can hold on the server. Here a watch ends, with
status OK, once ``watch_s`` seconds pass: a watcher that still cares watches again, which
gRPC's own client-side health checking does by itself. Two more departures from grpcio's
stock servicer, both for the same peers:

- one condition serves every watcher of every service name, so a name nobody registered
  costs no state, and a watcher never waits on a condition the stock servicer has already
  thrown away (it dropped a name's condition when *any* of its watchers left, and the others
  then missed every later change, the drain's NOT_SERVING included);
- the statuses themselves are grpcio's: ``set`` and ``enter_graceful_shutdown`` are unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health, health_pb2


class BoundedHealth(health.aio.HealthServicer):
    """The health service, its ``Watch`` calls bounded to ``watch_s`` seconds each."""

    def __init__(self, watch_s: float) -> None:
        super().__init__()
        self.watch_s = watch_s
        self._changed = asyncio.Condition()
        self._changes = 0  # counts set() calls, so a watcher knows what it has not seen

    async def _set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None:
        async with self._changed:
            self._server_status[service] = status
            self._changes += 1
            self._changed.notify_all()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        """Send the service's status now and at each change, for at most ``watch_s``.

        The write happens outside the condition's lock, so a watcher that does not read
        cannot hold up ``set``; a change made while it writes is caught by the count.
        """
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.watch_s
        sent = None
        while True:
            seen = self._changes
            status = self._server_status.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            left = ends - loop.time()
            if left <= 0:
                return
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(self._changed_since(seen)), left)
                except TimeoutError:
                    return

    def _changed_since(self, seen: int) -> Callable[[], bool]:
        return lambda: self._changes != seen
