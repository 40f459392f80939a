import sys
from pathlib import Path

# Helpers shared by all test directories (spawn_testlib) and, in spawned workers, importable by name.
sys.path.insert(0, str(Path(__file__).parent))
