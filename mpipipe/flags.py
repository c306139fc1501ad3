"""Train flags: argparse generated from TrainConfig's fields, parsed into a validated config.

`cli` (train) and `study` (every run it launches) parse through here, so a study sees exactly
what train would, `--config run.toml` included.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from mpipipe import config as config_mod
from mpipipe.errors import ConfigError


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors are agreed on by all ranks first."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def train_parser(epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(
        prog="mpipipe train",
        description="Train a model through the pipeline.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of the keys below; flags win")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the layout (host, local rank, device, stage, replica) and "
        "the checked schedule, then exit without building the model",
    )
    for f in config_mod.fields():
        kind = f.type if isinstance(f.type, str) else str(f.type)
        conv: Any = int if kind.startswith("int") else float if kind.startswith("float") else str
        meta = f.metadata
        choices = meta.get("choices")
        default = "" if f.default is None else f" (default: {f.default})"
        if kind.startswith("bool"):  # a switch: given means True
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_const",
                           const=True, default=None, help=meta["help"])  # fmt: skip
            continue
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=conv,
            default=None,
            help=meta["help"] + default,
            metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
        )
    return p


def parse_train(argv: list[str], epilog: str | None = None) -> tuple[config_mod.TrainConfig, bool]:
    """(the config, --dry-run?) of a train command line: defaults < --config TOML < flags."""
    args = vars(train_parser(epilog).parse_args(argv))
    dry = bool(args.pop("dry_run"))
    return config_mod.build(args, args.pop("config")), dry
