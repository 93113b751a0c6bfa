"""The client side of test_netns.py, run inside the client's namespace
(ip netns exec): a kelpie.Client over every broker frontend in argv[1]
(commas) with CURVE from $KELPIE_KEY/$KELPIE_SERVER_KEY, making idempotent
and plain calls and keyed and unkeyed submits until told to stop. Reads
commands on stdin, one a line: "status" prints one JSON line (the brokers
as the client sees them, the outcomes so far); "stop" ends the traffic,
waits for every ACCEPTED job's result and prints the final JSON line."""
import asyncio
import collections
import json
import os
import sys
import uuid

import kelpie

SLOW = json.dumps({"sleep": 0.05}).encode()
JOB = json.dumps({"sleep": 0.05}).encode()
# Each submitting task waits this long after a submit. The two workers run
# at most 2 x 8 slots / 0.05 s = 320 jobs/s, shared with the calls; unpaced,
# six tasks accepted ~1,000 jobs/s, so a 20 s run left a backlog that took
# longer than the final check's 60 s to drain (and read as lost jobs). About
# 100 jobs/s keep the backlog at seconds, and submits still cross every cut.
SUBMIT_GAP = 0.06


async def main():
    frontends = sys.argv[1].split(",")
    for fe in frontends:  # each broker is up and has workers before traffic starts
        async with kelpie.Client(fe, timeout=5) as one:
            await one.wait_for_service("mb", timeout=20)
    outcome = collections.defaultdict(collections.Counter)
    accepted = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with kelpie.Client(frontends, heartbeat=0.2, timeout=20) as client:
        async def traffic(kind):
            while not stop.is_set():
                try:
                    if kind == "idempotent":
                        assert await client.call("mb", "Echo", SLOW, idempotent=True) == SLOW
                    elif kind == "plain":
                        assert await client.call("mb", "Echo", SLOW) == SLOW
                    elif kind == "keyed":
                        accepted.append((await client.submit(
                            "work", JOB, idempotency_key=uuid.uuid4().hex)).id)
                    else:
                        accepted.append((await client.submit("work", JOB)).id)
                    outcome[kind]["ok"] += 1
                except kelpie.RpcError as exc:
                    outcome[kind][f"{type(exc).__name__}"] += 1
                except Exception as exc:
                    outcome[kind][f"{type(exc).__name__}: {exc}"] += 1
                if kind in ("keyed", "unkeyed"):
                    await asyncio.sleep(SUBMIT_GAP)  # after a refusal too: no busy loop

        tasks = [asyncio.create_task(traffic(k))
                 for k in ("idempotent", "plain", "keyed", "unkeyed") for _ in range(3)]
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "status" or not line:
                print(json.dumps({"brokers": client.brokers,
                                  "outcome": {k: dict(v) for k, v in outcome.items()}}),
                      flush=True)
            if line != "status":
                break
        stop.set()
        await asyncio.gather(*tasks)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from jobcheck import all_succeeded
        bad = sorted(await all_succeeded(client, accepted))
        stats = {}
        if bad:  # what each broker holds, so that a failure says why
            for fe in frontends:
                try:
                    async with kelpie.Client(fe, timeout=5) as one:
                        st = await one.stats()
                    stats[fe] = {"broker_id": st.get("broker_id"),
                                 "jobs": st.get("jobs", {}).get("queues", {}).get("work"),
                                 "workers": st.get("workers")}
                except Exception as exc:
                    stats[fe] = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"outcome": {k: dict(v) for k, v in outcome.items()},
                          "accepted": len(accepted), "bad": bad[:10], "moved": client.moved,
                          "lost": client.lanes_lost, "stats": stats}), flush=True)


asyncio.run(main())
