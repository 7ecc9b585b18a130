"""``python -m imaging_meta``: the ``imaging-meta`` command (what `imaging-meta results` runs its fits with)."""

from imaging_meta.commands.cli import main

if __name__ == "__main__":
    main()
