"""`stddaq`: the operator's command (up, config check, watch)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from stddaq import __version__
from stddaq.config import DetectorConfig
from stddaq.errors import StddaqError
from stddaq.services.base import ArgumentParser, non_negative_int, port_number, positive_float, positive_int


def driver_url(text: str) -> str:
    """``--driver``: a websocket address (the client's own check, as one line and exit 2)."""
    from stddaq.client.record import check_driver_url

    try:
        return check_driver_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="stddaq", description="stddaq: std_daq's interface layer in Python")
    parser.add_argument("--version", action="version", version=f"stddaq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the deployment a config describes (no config: the built-in demo)")
    up.add_argument("config", nargs="?", default=None, help="detector config JSON (default: built-in demo)")
    up.add_argument("--duration", type=positive_float, default=None, help="stop after this many seconds")
    up.add_argument("--driver-port", type=port_number, default=8080,
                    help="TCP port of the writer driver's websocket (default: 8080, as upstream)")

    config = sub.add_parser("config", help="detector config tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config and print the values services derive")
    check.add_argument("file")
    config_sub.add_parser("demo", help="print the built-in demo config")

    watch = sub.add_parser("watch", help="print frame ids, rate and gaps of a live stream once per second")
    watch.add_argument("address", help="live stream address, e.g. tcp://daq-host:9100")
    watch.add_argument("--type", choices=("sub", "pull"), default="sub", help="socket type (default: sub)")
    watch.add_argument("--duration", type=positive_float, default=None, help="stop after this many seconds")
    record = sub.add_parser("record", help="record images to HDF5 files through a writer driver (std_det_driver)")
    record.add_argument("--driver", type=driver_url, required=True,
                        help="websocket of the driver, e.g. ws://localhost:8080")
    record.add_argument("--path", required=True, help="directory for the files (must exist on the driver's host)")
    record.add_argument("--n-images", type=positive_int, required=True, help="number of images to record")
    record.add_argument("--prefix", default=None, help="file name prefix (driver default: file)")
    record.add_argument("--start-id", type=non_negative_int, default=None, help="skip images with a smaller id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "up":
            from stddaq.deploy import up
            return up(args.config, args.duration, args.driver_port)
        if args.command == "watch":
            import zmq

            from stddaq.client.stream import watch
            try:
                watch(args.address, duration=args.duration, socket_type=args.type)
            except KeyboardInterrupt:
                pass
            except zmq.ZMQError as exc:
                print(f"stddaq: error: cannot connect to {args.address!r}: {exc.strerror} (a live stream address is "
                      "tcp://HOST:PORT)", file=sys.stderr)
                return 2
            except ValueError as exc:  # a tcp address libzmq would take wrongly (port 99999)
                print(f"stddaq: error: {exc}", file=sys.stderr)
                return 2
            return 0
        if args.command == "record":
            from stddaq.client.record import record_command
            return record_command(args.driver, args.path, args.n_images, args.prefix, args.start_id)
        if args.command == "config":
            if args.config_command == "demo":
                from stddaq.deploy import demo_config_text
                print(demo_config_text(), end="")
                return 0
            config = DetectorConfig.load(args.file)
            print(json.dumps(config.derived(), indent=2))
            return 0
    except StddaqError as exc:
        print(f"stddaq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
