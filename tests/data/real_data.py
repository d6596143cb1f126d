"""Where the real datasets are: ../shared/data beside the checkout (read-only), as in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
OMNIGLOT = SHARED_DATA / "omniglot"
MINIIMAGENET = SHARED_DATA / "miniimagenet"

needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").is_file(),
    reason=f"the Omniglot archives are not in {OMNIGLOT} (shared/ beside the repository)",
)
needs_miniimagenet = pytest.mark.skipif(
    not (MINIIMAGENET / "mini-imagenet.zip").is_file(),
    reason=f"mini-imagenet.zip is not in {MINIIMAGENET} (shared/ beside the repository)",
)
