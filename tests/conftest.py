import sys
from pathlib import Path

# Lets tests import the shared fakes and helpers next to them as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
