"""The splitserve gRPC SDK: a blocking `Client` and an asyncio `AsyncClient` with the same typed results.

    from splitserve.client import Client
    with Client("localhost:50051") as client:
        print(client.generate("Hello, my name is", max_tokens=16).text)

Streams survive dropped connections (the client resumes from the last chunk it saw), calls take a `timeout`,
and closing a stream early aborts the request on the server.
"""

from .async_client import AsyncChunkStream, AsyncClient
from .errors import (DeadlineExceeded, GenerationFailed, InvalidArgument, NotFound, Overloaded, SplitServeError,
                     Unauthenticated, Unavailable)
from .sync_client import ChunkStream, Client
from .types import Chunk, Completion, LoadInfo, ModelInfo, Usage, WorkerLoad

__all__ = ["AsyncChunkStream", "AsyncClient", "Chunk", "ChunkStream", "Client", "Completion", "DeadlineExceeded",
           "GenerationFailed", "InvalidArgument", "LoadInfo", "ModelInfo", "NotFound", "Overloaded", "SplitServeError",
           "Unauthenticated", "Unavailable", "Usage", "WorkerLoad"]
