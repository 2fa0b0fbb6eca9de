"""Sub-commands of ``flux2-dit``; each module has ``add_parser(subparsers)`` and ``run(args) -> int``."""
