"""Stand-in for the training module in launcher tests (``GIST_LAUNCH_MODULE=launch_probe``):
prints what it was started with; process 1 fails at once, the others wait until the
launcher stops them (SIGTERM), which they report."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args, rest = parser.parse_known_args()
    flags = os.environ.get("XLA_FLAGS", "")
    print(
        f"probe {args.process_id}/{args.num_processes} at {args.coordinator_address} "
        f"args={rest} xla={flags.strip()}",
        flush=True,
    )

    def stopped(signum, frame):
        print(f"probe {args.process_id} got SIGTERM", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stopped)
    if args.process_id == 1:
        sys.exit(3)
    time.sleep(60)
    print(f"probe {args.process_id} was never stopped", flush=True)


if __name__ == "__main__":
    main()
