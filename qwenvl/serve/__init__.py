"""OpenAI-compatible server: `qwenvl serve --model DIR` (cli.py), the app (app.py), the media policy
(media.py), request/response mapping (protocol.py), backends (backend.py), the web page (static/index.html).

Names are imported on first use: `qwenvl.serve.cli` (registered by the `qwenvl` command) needs neither
starlette nor uvicorn until the server actually starts.
"""
import importlib

_EXPORTS = {"create_app": "app", "ServerConfig": "app", "MediaLimits": "media", "Backend": "backend",
            "EngineBackend": "backend", "ScriptedBackend": "backend"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qwenvl.serve' has no attribute {name!r}")
