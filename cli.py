"""
Command-line value types the scripts share, importable before torch so that `--help` and a wrong
flag answer at once. Each names what it expected and what it found.

    python -m pytest tests/test_training.py -q -k args
"""
import argparse
import math


def lr_arg(text):
    """a positive learning rate, or 'auto' for the range test"""
    if text == 'auto':
        return text
    try:
        lr = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', found {text!r}") from None
    if not 0 < lr < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive learning rate, found {text}")
    return lr


def count(minimum):
    """a whole number >= minimum"""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}, found {n}")
        return n
    parse.__name__ = f'whole number >= {minimum}'
    return parse


def number(low, high=float('inf')):
    """a float in [low, high)"""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
        if not low <= x < high:
            bound = f">= {low}" + (f" and < {high}" if high < float('inf') else '')
            raise argparse.ArgumentTypeError(f"expected a number {bound}, found {text}")
        return x
    parse.__name__ = f'number >= {low}'
    return parse
