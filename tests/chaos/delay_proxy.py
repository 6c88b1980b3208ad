#!/usr/bin/env python3
"""A TCP proxy that delays every byte by a fixed time in each direction.

  delay_proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS

Stands in for tc netem's added delay where the kernel has no netem: each
chunk read from one side is written to the other DELAY_MS after it was
read, in order, so a request and its answer each take DELAY_MS more (a
round trip 2 x DELAY_MS), while throughput is not limited. Runs until
killed; a connection that one side closes is closed on the other once
what was read before has been delivered.
"""
import asyncio
import sys
import time


def split(address):
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def pump(reader, writer, delay):
    """Copies reader to writer, each chunk `delay` seconds after its read."""
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, chunk = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if chunk is None:
                break
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.ensure_future(deliver())
    try:
        while True:
            chunk = await reader.read(1 << 16)
            queue.put_nowait((time.monotonic() + delay, chunk or None))
            if not chunk:
                break
    except (ConnectionError, OSError):
        queue.put_nowait((time.monotonic(), None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def serve(listen, target, delay):
    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pump(client_reader, server_writer, delay),
                             pump(server_reader, client_writer, delay))

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    asyncio.run(serve(split(argv[1]), split(argv[2]), float(argv[3]) / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
