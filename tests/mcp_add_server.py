"""A small MCP server for the tests: `add(a, b)`, the tool relaxlm's chat loop calls.

    python mcp_add_server.py              # stdio
    python mcp_add_server.py --http PORT  # streamable HTTP at http://127.0.0.1:PORT/mcp

The bounds keep a random-weight model's grammar-constrained arguments short.
"""

import sys
from typing import Annotated

from mcp.server import MCPServer
from pydantic import Field

server = MCPServer("add")

Small = Annotated[int, Field(ge=-1000, le=1000)]


@server.tool()
def add(a: Small, b: Small) -> int:
    """Add two integers."""
    return a + b


if __name__ == "__main__":
    if sys.argv[1:2] == ["--http"]:
        server.run("streamable-http", port=int(sys.argv[2]))
    else:
        server.run("stdio")
