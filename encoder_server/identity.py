"""Who is calling: set by the auth layer per request, read by the engine, logs and metrics."""

from contextvars import ContextVar

ANONYMOUS = "anonymous"

# Set inside the RPC handler's own context (the auth interceptor wraps the
# handler), so concurrent requests never see each other's user.
current_user: ContextVar[str] = ContextVar("flux2_current_user", default=ANONYMOUS)
