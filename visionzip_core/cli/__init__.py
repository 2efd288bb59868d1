"""The commands (``visionzip-generate``, ``visionzip-evaluate``, ``visionzip-show-tokens``,
``visionzip-plan``, ``visionzip-check-data``): one module each with ``main(argv=None) -> int``;
``scripts/<name>.py`` and the console scripts call the same ``main``.

The three that open a model (generate, evaluate, show_tokens) open it through
:mod:`visionzip_core.cli.open_model`, so they take the same flags, apply the same defaults and
refuse the same bad folders with the same one-line errors. Nothing in the library imports this
package: it sits on top.
"""
