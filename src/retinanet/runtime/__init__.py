"""The process and its machine: the CPU and its thread budget (`machine`), the measured fast paths (`fastpath`), the
device a command runs on (`device`), files written safely (`outputs`) and weight downloads (`downloads`)."""
