"""Make helper modules in tests/ (e.g. ``tiny_models``) importable from every test file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
