"""Live streams across instances on a three-node Redis Cluster, named by one node in REDIS_URL.

The link recognises the cluster from that one node and routes each reply's stream to the node
holding its slot (the key is hash-tagged on the message id). Streaming from another instance,
resuming from Last-Event-ID and cancelling work as on one Redis server; a node killed mid-reply
degrades the followers to the database and they come back to the cluster once it recovers.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio.cluster import RedisCluster

from gateway.fleet.link import RedisLink
from gateway.fleet.wire import stream_key
from gateway.state import GENERATIONS, REDIS, REMOTE
from tests.support.chat import DONE, RETRY, accept, complete_frames, row, stream_path, wait_finished, wire
from tests.support.common import MakeClient, User, wait_for
from tests.support.fleet import RedisServer, SteppedUpstream, read_events, without_pings
from tests.support.redis_cluster import RedisClusterNodes

pytestmark = pytest.mark.processes  # starts redis-server nodes

TEXTS = ["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "stream."]


async def pair(make_client: MakeClient, up: SteppedUpstream, redis_url: str, **env: str) -> tuple[TestClient,
                                                                                                    TestClient]:
    env = {"OPENAI_BASE_URL": up.base_url, "OPENAI_MODEL": "fake", "SWEEP_S": "1000", "REDIS_URL": redis_url,
           **env}
    return await make_client(**env), await make_client(**env)


def node_url(cluster: RedisClusterNodes, index: int) -> str:
    return f"redis://127.0.0.1:{cluster.ports[index]}/0"


async def test_any_node_names_the_cluster_and_a_single_server_stays_single(
        redis_cluster: RedisClusterNodes, private_redis: RedisServer):
    for index in range(3):
        link = RedisLink(node_url(redis_cluster, index))
        client = await link.ready()
        assert (link.cluster, type(client)) == (True, RedisCluster)
        assert sorted(n.port for n in client.get_nodes()) == sorted(redis_cluster.ports)
        await link.close()
    single = RedisLink(private_redis.url)
    await single.ready()
    assert single.cluster is False
    await single.close()


def test_a_replys_stream_key_is_hash_tagged_on_its_message_id():
    mid = uuid.UUID("6f1c2a52-3b1e-4a8e-9a55-0d9a3e7b2c10")
    assert stream_key(mid) == "gw:reply:{6f1c2a52-3b1e-4a8e-9a55-0d9a3e7b2c10}"
    # only the tag picks the slot: any key of this reply, whatever its prefix, is on the same node
    from redis.crc import key_slot

    assert key_slot(stream_key(mid).encode()) == key_slot(str(mid).encode()) == key_slot(
        f"gw:other:{{{mid}}}".encode())


async def test_a_reply_streams_live_from_b_and_resumes_through_the_cluster(
        redis_cluster: RedisClusterNodes, stepped, make_client: MakeClient, user: User, db):
    up = await stepped(TEXTS, holds=(4,))
    a, b = await pair(make_client, up, node_url(redis_cluster, 2))  # not the first node: any one will do
    mid = (await accept(a, user, "tell me"))["assistant_message_id"]
    on_a = await a.get(stream_path(mid), headers=user.headers)
    on_b = await b.get(stream_path(mid), headers=user.headers)
    head = await read_events(on_b, 1 + 3)  # retry + metadata, 3 deltas, while A still generates
    assert head[0].startswith(RETRY + f"id: {mid}:0\nevent: metadata\n".encode())
    assert (await row(db, mid))["status"] == "streaming"
    assert b.app[GENERATIONS].get(uuid.UUID(mid)) is None and list(b.app[REMOTE].feeds) == [uuid.UUID(mid)]
    assert b.app[REDIS].cluster is True
    resumed = await b.get(stream_path(mid), headers={**user.headers, "Last-Event-ID": f"{mid}:1"})
    assert await read_events(resumed, 2) == [RETRY + head[2], head[3]]

    up.release()
    body_a = without_pings(await on_a.read())
    saved = await wait_finished(db, mid)
    frames = complete_frames(saved, TEXTS)
    assert body_a == wire(frames)
    assert b"".join(head) + without_pings(await on_b.read()) == body_a
    assert without_pings(await resumed.read()) == b"".join(frames[4:]) + DONE
    cluster = RedisCluster.from_url(redis_cluster.url)
    entries = await cluster.xrange(stream_key(mid))
    assert [(i, f[b"s"]) for i, f in entries] == [(b"%d-1" % k, b"%d" % k) for k in range(len(frames))]
    assert 0 < await cluster.ttl(stream_key(mid)) <= 600
    await cluster.aclose()


async def test_cancel_on_b_stops_the_reply_generating_on_a_with_the_cluster(
        redis_cluster: RedisClusterNodes, stepped, make_client: MakeClient, user: User, db):
    up = await stepped(TEXTS, holds=(3,))
    a, b = await pair(make_client, up, redis_cluster.url)
    mid = (await accept(a, user, "stop it"))["assistant_message_id"]
    on_b = await b.get(stream_path(mid), headers=user.headers)
    await read_events(on_b, 3)  # retry + metadata, 2 deltas: through the cluster
    async with asyncio.timeout(10):
        resp = await b.post(f"/api/messages/{mid}/cancel", headers=user.headers)
        answer = await resp.json()
    assert (resp.status, answer["status"], answer["content"]) == (200, "cancelled", "".join(TEXTS[:2]))
    tail = await on_b.read()
    assert tail.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"cancelled"' in tail
    up.release()


async def test_a_node_killed_mid_reply_degrades_b_to_the_database_and_it_recovers(
        redis_cluster: RedisClusterNodes, stepped, make_client: MakeClient, user: User, db):
    up = await stepped(TEXTS, holds=(3, 6))
    a, b = await pair(make_client, up, redis_cluster.url, CHECKPOINT_S="0.05")
    mid = (await accept(a, user, "a node goes"))["assistant_message_id"]
    on_a = await a.get(stream_path(mid), headers=user.headers)
    on_b = await b.get(stream_path(mid), headers=user.headers)
    head_a, head_b = await read_events(on_a, 3), await read_events(on_b, 3)
    assert head_a == head_b

    probe = RedisCluster.from_url(redis_cluster.url)
    await probe.initialize()
    holder = probe.get_node_from_key(stream_key(mid)).port
    await probe.aclose()
    redis_cluster.kill(holder)  # the node holding the reply's stream

    async def readiness(expected: str) -> bool:
        resp = await b.get("/readyz")
        return (resp.status, await resp.json()) == (200, {"status": "ok", "redis": expected})

    await wait_for(lambda: readiness("degraded"))
    up.step(3)  # texts 3..5 go out while the cluster is down: A streams them, B reads them from the checkpoints
    more_a, more_b = await read_events(on_a, 3), await read_events(on_b, 3)
    assert more_a == more_b
    assert (await row(db, mid))["status"] == "streaming"

    redis_cluster.start(holder)  # back, empty: A's publisher rebuilds the stream, B returns to it
    redis_cluster.wait_ok()
    await wait_for(lambda: readiness("ok"), timeout=20)
    up.step(6)
    rest_a, rest_b = without_pings(await on_a.read()), without_pings(await on_b.read())
    saved = await wait_finished(db, mid)
    expected = wire(complete_frames(saved, TEXTS))
    assert b"".join(head_a + more_a) + rest_a == expected
    assert b"".join(head_b + more_b) + rest_b == expected
    cluster = RedisCluster.from_url(redis_cluster.url)
    assert await cluster.xlen(stream_key(mid)) == len(complete_frames(saved, TEXTS))
    await cluster.aclose()
