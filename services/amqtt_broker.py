"""Run the embedded amqtt broker on 127.0.0.1:PORT: `python -m services.amqtt_broker PORT`.

`sdrm line` starts it as a subprocess when no mosquitto binary is found. Measured with amqtt
0.12.1, it keeps retained messages, publishes retained last wills, delivers QoS 1 and carries
4 MiB payloads. It accepts MQTT 3.1.1 only (an MQTT 5 CONNECT is rejected as "Unsupported protocol
version") and has no shared subscriptions, because it takes a `$share/...` filter literally. The
line therefore runs every service with --mqtt-version 3.1.1 and the compressor with --no-shared
on it. amqtt 0.12.1 also delivered retained messages of other topics to a new subscriber, which
the services count and drop as unmatched topics.
This module imports nothing but amqtt, so it runs in any environment where amqtt is installed.
"""

from __future__ import annotations

import asyncio
import sys


def serve(port: int) -> None:
    """Run the broker until the process is terminated."""
    from amqtt.broker import Broker

    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}}

    async def run() -> None:
        broker = Broker(config)
        await broker.start()
        while True:
            await asyncio.sleep(3600)

    asyncio.run(run())


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: python -m services.amqtt_broker PORT", file=sys.stderr)
        raise SystemExit(2)
    serve(int(sys.argv[1]))
