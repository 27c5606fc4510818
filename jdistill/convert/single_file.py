"""Single-file checkpoints in their original layouts (none recognised yet: every bare file
that is not an original DiT is refused by :func:`jdistill.convert.registry.detect_checkpoint`)."""


def detect(keys):
    """The layout of a single-file checkpoint's keys, or None."""
    return None
