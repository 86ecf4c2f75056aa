import os
import sys
from pathlib import Path

# tests/ holds plain helper modules (tiny_models, served_apps) next to the test folders.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
