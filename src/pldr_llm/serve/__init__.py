"""``pldr-llm serve``: an OpenAI-compatible HTTP server with continuous batching, and a
playground page that shows the deductive outputs. Needs the ``serve`` extra
(``pip install 'pldr-llm[serve]'``). See docs/serving.md.

    from pldr_llm.serve import ServeOptions, create_app, run_server
"""

from __future__ import annotations

from pldr_llm.serve.app import ServeOptions, create_app, find_chat_template, run_server

__all__ = ["ServeOptions", "create_app", "find_chat_template", "run_server"]
