"""python -m qwenvl.synth --out DIR --tasks all --n 1000 --split train|heldout --seed 0"""
import sys

from .cli import main

sys.exit(main())
