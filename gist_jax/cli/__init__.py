"""Command-line tools for deploying a gist model: ``gist-compress`` (instructions -> a gist
cache store) and ``gist-generate`` (instruction or stored prompt id + inputs -> text). Each
module has a library function (what tests call), ``main(argv)`` for ``absl.app`` and
``run()`` (the console script)."""
