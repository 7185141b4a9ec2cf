"""What one app instance knows at run time (passed to its routers; no module globals)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chatglm_serve.server.errors import APIError, not_ready, shutting_down
from chatglm_serve.server.settings import Settings

if TYPE_CHECKING:
    from chatglm_serve.engine.async_engine import AsyncEngine


@dataclass
class ServerState:
    settings: Settings
    engine: AsyncEngine | None = None
    owns_engine: bool = False  # loaded by our lifespan (so ours to shut down)
    load_error: str | None = None
    draining: bool = False  # SIGTERM seen: refuse new work, let running streams finish
    started: int = field(default_factory=lambda: int(time.time()))

    def ready_engine(self) -> AsyncEngine:
        """The engine, or the 503 that says why there is none to use now."""
        if self.draining:
            raise shutting_down()
        if self.engine is None:
            if self.load_error:
                raise APIError(
                    503, f"The model failed to load: {self.load_error}", code="load_failed"
                )
            raise not_ready()
        return self.engine

    def adapter_names(self) -> list[str]:
        """The fine-tunes a request's `model` may name: the engine's, or (while it loads) the
        ones the settings will load."""
        if self.engine is not None:
            return self.engine.adapter_names()
        return list(self.settings.adapter_dirs())
