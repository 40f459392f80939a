import os
import sys

# the spawned workers import parallel_jobs by name
sys.path.insert(0, os.path.dirname(__file__))
