"""Ray Serve's request router for the replicas: its multiplex routing, made sticky per adapter key.

Serve learns which keys a replica holds from the replica's reports, which reach the routers through the controller
a few hundred milliseconds later; until then a second request for a key just loaded elsewhere would go to the replica
with the fewest keys and load it again there. This router also remembers where it sent each key itself: that replica
comes first while it still reports the key, or while the report may still be on its way (`REPORT_DELAY_S`).
Everything else (the queue-length probes, backoff, a replica full or gone) is Serve's.
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

# Longer than a replica's report of its keys takes to reach this router (Serve pushes them every 0.1 s).
REPORT_DELAY_S = 5.0


class AdapterAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, **kwargs: object) -> None:
        self._sent: dict[str, tuple[ReplicaID, float]] = {}  # key -> the replica this router last sent it to, when

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if key:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        ranks: list[list[RunningReplica]] = []
        holder = self._holder(key, by_id) if key else None
        if holder is not None:
            ranks.append([holder])
        pool = [by_id[i] for i in ids if i in by_id and (holder is None or i != holder.replica_id)]
        if pool:
            ranks.append(random.sample(pool, min(2, len(pool))))  # the power of two choices, as Serve's default
        return ranks

    def _holder(self, key: str, by_id: dict[ReplicaID, RunningReplica]) -> RunningReplica | None:
        sent = self._sent.get(key)
        if sent is None:
            return None
        replica = by_id.get(sent[0])
        if replica is None:
            return None
        if key in replica.multiplexed_model_ids or time.monotonic() - sent[1] < REPORT_DELAY_S:
            return replica
        del self._sent[key]  # evicted from that replica's LRU since
        return None

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        key = pending_request.metadata.multiplexed_model_id
        if key:
            self._sent[key] = (replica_id, time.monotonic())

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent = {k: v for k, v in self._sent.items() if v[0] != replica_id}
