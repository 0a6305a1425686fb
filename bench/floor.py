"""The Python floor: spawn the workload's processes with asyncio (2 at a time, pidfd child
watcher) and commit one SQLite row (WAL, synchronous=NORMAL) at each job start and end.

usage: floor.py W1|W2|W3|W4 --db PATH
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from run import dag


def main() -> None:
    workload = sys.argv[1]
    db = sqlite3.connect(sys.argv[sys.argv.index("--db") + 1], isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, job TEXT, kind TEXT,"
        " at REAL, rc INTEGER)"
    )

    def record(job: str, kind: str, rc: int | None = None) -> None:
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO events (job, kind, at, rc) VALUES (?, ?, ?, ?)",
            (job, kind, time.time(), rc),
        )
        db.execute("COMMIT")

    async def go() -> None:
        jobs = dag(workload)
        slots = asyncio.Semaphore(2)
        done = {name: asyncio.Event() for name, _ in jobs}

        async def one(name: str, needs: list[str]) -> None:
            for need in needs:
                await done[need].wait()
            async with slots:
                record(name, "start")
                proc = await asyncio.create_subprocess_exec("true")
                rc = await proc.wait()
                record(name, "end", rc)
            done[name].set()

        await asyncio.gather(*(one(name, needs) for name, needs in jobs))

    if sys.version_info < (3, 12):
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    asyncio.run(go())
    db.close()


if __name__ == "__main__":
    main()
