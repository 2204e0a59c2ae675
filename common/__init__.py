"""Pieces every package of the project may import (train/, optim/, data/, model/) without
importing each other."""
