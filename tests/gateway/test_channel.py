"""A request's channel: items wake the handler in batches; a handler waiting longer than the timeout for the next
item gets a 504 (one timer per request, re-armed while items keep coming)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bus.protocol import Data, End
from gateway.bus_client import Channel
from gateway.errors import ApiError


def test_batches_and_idle_timeout() -> None:
    async def main() -> None:
        link: Any = None
        ch = Channel("r1", "m", link)
        loop = asyncio.get_running_loop()
        # items arriving every 60 ms never trip a 100 ms idle timeout, however long the whole stream lasts
        for i in range(6):
            loop.call_later(0.06, ch.push, Data(request_id="r1", data=b"%d" % i))
            assert await ch.batch(0.1) == [Data(request_id="r1", data=b"%d" % i)]
        # two items pushed before the handler looks come as one batch
        ch.push(Data(request_id="r1", data=b"a"))
        ch.push(End(request_id="r1"))
        assert len(await ch.batch(0.1)) == 2
        # nothing for longer than the timeout: 504
        t0 = loop.time()
        with pytest.raises(ApiError) as err:
            await asyncio.wait_for(ch.batch(0.1), 2)  # (a broken timer fails here instead of hanging)
        assert err.value.status == 504 and 0.09 <= loop.time() - t0 < 0.5
        ch.close()
        assert ch._timer is None  # a closed channel leaves no timer behind

    asyncio.run(main())
