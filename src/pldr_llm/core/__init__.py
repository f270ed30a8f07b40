"""The core: a PLDR-LLM and everything that runs it, in one flat package.

Its configuration (``config``), the math (``plga``, ``layers``, ``rope``, ``model``), the caches
(``cache``), losses, the one decoding loop (``engine``, ``sampling``, ``graphs``, ``text``,
``generate``; ``fused`` for its CUDA step), the file names and safe loading (``fileio``), the
one error type (``errors``), and the transformers classes (``configuration_pldrllm``,
``modeling_pldrllm``, ``tokenization_pldrllm``, ``hf_folder``).

Why one flat folder: an exported transformers folder carries these files verbatim (see
:mod:`.code_bundle`), and transformers' loader only follows ``from .x import y`` between files of
one folder. So the modules here import each other only that way, and import nothing else from
``pldr_llm`` (``tests/test_architecture.py`` checks both). This file imports nothing, so that
importing ``pldr_llm.core.config`` (the CLI does, before torch) stays cheap.
"""
