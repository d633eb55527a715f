"""The coordinator's open uploads, without a server: one per worker, ended when stalled, when their round
closes, or when their worker's newer session uploads."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.uploads import OpenUploads
from fedcore.errors import LateUpdate, UploadAborted, UploadInProgress, UploadStalled


def test_a_session_holds_one_upload_and_its_place_is_free_again_after_it() -> None:
    uploads = OpenUploads()
    with uploads.open("w", "s1", "r0.1-w"):
        with pytest.raises(UploadInProgress, match=r"'w' already has an upload in progress \(task 'r0\.1-w'\)"), uploads.open("w", "s1", "r0.1-w"):
            pass
        with uploads.open("other", "s2", "r0.1-other"):
            assert len(uploads) == 2
    assert len(uploads) == 0
    with uploads.open("w", "s1", "r0.1-w"):
        assert len(uploads) == 1


def test_a_newer_session_of_the_worker_takes_the_place_and_ends_the_older_stream() -> None:
    async def run() -> None:
        uploads = OpenUploads()
        with uploads.open("w", "old", "r0.1-w") as older:
            with uploads.open("w", "new", "r0.1-w"):
                with pytest.raises(UploadAborted, match="joined again"):
                    async with older.bounded():
                        await asyncio.sleep(5)
                assert len(uploads) == 1
            assert len(uploads) == 0

    asyncio.run(asyncio.wait_for(run(), 10))


def test_a_stream_without_progress_for_the_idle_time_is_cut_off_and_progress_restarts_the_clock() -> None:
    async def run() -> float:
        uploads = OpenUploads()
        loop = asyncio.get_running_loop()
        with uploads.open("w", "s", "r0.1-w") as upload:
            start = loop.time()
            with pytest.raises(UploadStalled, match="received nothing for 1 s"):
                async with upload.bounded(idle=1.0):
                    for _ in range(6):  # 1.5 s of messages 0.25 s apart: no stall
                        await asyncio.sleep(0.25)
                        upload.progress()
                    await asyncio.sleep(10)
            return loop.time() - start

    assert 2.5 <= asyncio.run(asyncio.wait_for(run(), 20)) < 5


def test_a_wait_is_not_timed_and_ends_when_the_round_closes() -> None:
    async def run() -> None:
        uploads = OpenUploads()
        open_tasks = {"r0.1-w", "r0.1-x"}
        with uploads.open("w", "s", "r0.1-w") as w, uploads.open("x", "t", "r0.1-x") as x:

            async def close_round() -> None:
                await asyncio.sleep(0.3)
                open_tasks.discard("r0.1-w")
                uploads.end_closed(lambda task_id: task_id in open_tasks)

            closer = asyncio.create_task(close_round())
            with pytest.raises(LateUpdate, match=r"'r0\.1-w': its round closed"):
                async with w.bounded():
                    await asyncio.sleep(5)
            await closer
            async with x.bounded():  # still open: its round goes on
                await asyncio.sleep(0)
            with pytest.raises(LateUpdate):  # once ended, always ended
                async with w.bounded():
                    pass

    asyncio.run(asyncio.wait_for(run(), 10))
