"""`python -m mini_m3` (and `torchrun ... -m mini_m3 train ...`): the `mini-m3` command line of cli.py."""

if __name__ == "__main__":
    from .cli import main
    raise SystemExit(main())
