"""An MCP server for the tests whose one tool kills its process, as a crashing server does."""

import os
from typing import Annotated

from mcp.server import MCPServer
from pydantic import Field

server = MCPServer("crash")

Small = Annotated[int, Field(ge=-1000, le=1000)]


@server.tool()
def divide(a: Small, b: Small) -> float:
    """Divide a by b (in fact: exit the process without answering)."""
    os._exit(3)


if __name__ == "__main__":
    server.run("stdio")
