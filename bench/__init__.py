"""fusionserve benchmarks: ``python -m bench <command>`` (see bench/README.md)."""
