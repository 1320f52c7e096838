"""Where the reference material lives: `../shared/reference` beside the checkout.

CI clones the project into a fresh folder with a copy of `shared/` beside it, so the path is
found relative to this file; `TCORE_REFERENCE_DIR` overrides it. The tests do not skip when the
fixture is missing: numerical agreement with the reference is the point of them.
"""
import os
from pathlib import Path

REFERENCE_DIR = Path(os.environ.get("TCORE_REFERENCE_DIR",
                                    Path(__file__).resolve().parents[2] / "shared" / "reference"))
OFFICIAL_TINY = REFERENCE_DIR / "official_tiny.pt"
