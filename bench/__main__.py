"""``python -m bench <command>``: fusionserve's benchmarks."""

from __future__ import annotations

import argparse
import sys

from bench import (
    backbones,
    ceiling,
    compare,
    data_pipeline,
    explain,
    frontends,
    gpu_decode,
    heap,
    rollout,
    serve,
    streams,
    timeline,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="fusionserve benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    backbones.add_parser(sub)
    ceiling.add_parser(sub)
    compare.add_parser(sub)
    data_pipeline.add_parser(sub)
    explain.add_parser(sub)
    frontends.add_parser(sub)
    gpu_decode.add_parser(sub)
    heap.add_parser(sub)
    rollout.add_parser(sub)
    serve.add_parser(sub)
    streams.add_parser(sub)
    timeline.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
