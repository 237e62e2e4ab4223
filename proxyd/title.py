"""Process titles (`ps`, `top`): what each proxyd process is doing."""

import os

# Keep /proc/PID/environ intact: the title only overwrites the argv area.
os.environ.setdefault("SPT_NOENV", "1")

import setproctitle  # noqa: E402


def set_title(text: str) -> None:
    setproctitle.setproctitle(f"proxyd: {text}")
