"""Which ignored folders travel with which device call of a GPU lease.

One device call carries at most 64 MiB: the working tree plus the folders named in its
`carry`. A lease sends DALI's wheels in parts, one `.carry/pNN` per call
(scripts/carry_parts.sh), so the other folders the last step needs (small wheels, shards)
ride along in whichever calls have room left. Folders stay on the machine between calls,
so any call before the last one's `finish` will do. The first call also carries the
folder the background model steps install from (`--first`).

    python scripts/carry_plan.py --tree-bytes N --first .whl --parts .carry/p01 ... \
        --extras .whl-data .gpushards .gpuframes

prints one line per call with its folders and size, then the commands of
scripts/gpu_session.sh; exits 1, naming the folder, when something fits in no call.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

MIB = 1 << 20


def folder_bytes(path: str) -> int:
    """Bytes of the files under `path`."""
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def plan_calls(tree: int, limit: int, first: list[str], parts: list[str], extras: list[str],
               size=folder_bytes) -> list[list[str]]:
    """The folders of each call: call k carries part k (call 1 also `first`); each extra,
    largest first, goes to the call with the most room left (the later one on a tie).
    ValueError naming the folder when one fits nowhere."""
    calls = [[part] for part in parts] or [[]]
    calls[0] = first + calls[0]
    used = [tree + sum(size(folder) for folder in call) for call in calls]
    for k, call in enumerate(calls):
        if used[k] > limit:
            raise ValueError(f"call {k + 1} ({', '.join(call)}) needs {used[k] / MIB:.1f} "
                             f"MiB with the tree, over the {limit / MIB:.0f} MiB one call "
                             "carries: split the wheels in smaller parts (CARRY_PART_MIB)")
    for extra in sorted(extras, key=size, reverse=True):
        k = max(range(len(calls)), key=lambda c: (limit - used[c], c))
        if used[k] + size(extra) > limit:
            raise ValueError(f"{extra} ({size(extra) / MIB:.1f} MiB) fits in no call: the "
                             f"roomiest (call {k + 1}) has {(limit - used[k]) / MIB:.1f} MiB "
                             "left")
        calls[k].append(extra)
        used[k] += size(extra)
    return calls


def session_commands(calls: list[list[str]], finish_env: str = "",
                     background_env: str = "") -> list[str]:
    """The device command of each call (scripts/gpu_session.sh's header). A single call runs
    scripts/gpu_check.sh itself, after joining its parts if it has any."""
    finish = f"{finish_env} " if finish_env else ""
    if len(calls) == 1:
        join = ("scripts/carry_parts.sh stash && scripts/carry_parts.sh join && "
                if any(folder.startswith(".carry/") for folder in calls[0]) else "")
        return [f"{join}{finish}scripts/gpu_check.sh"]
    background = f"{background_env} " if background_env else ""
    commands = [f"scripts/carry_parts.sh stash && {background}scripts/gpu_session.sh background"]
    commands += ["scripts/carry_parts.sh stash && scripts/gpu_session.sh progress"] * (len(calls) - 2)
    commands.append("scripts/carry_parts.sh stash && scripts/carry_parts.sh join && "
                    f"{finish}scripts/gpu_session.sh finish")
    return commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree-bytes", type=int, required=True)
    parser.add_argument("--limit-mib", type=float, default=64.0)
    parser.add_argument("--margin-mib", type=float, default=1.0,
                        help="kept free in every call (the tree may grow a little)")
    parser.add_argument("--first", nargs="*", default=[])
    parser.add_argument("--parts", nargs="*", default=[])
    parser.add_argument("--extras", nargs="*", default=[])
    parser.add_argument("--finish-env", default="",
                        help="environment settings for the last call's gpu_session.sh finish")
    parser.add_argument("--background-env", default="",
                        help="environment settings for the first call's background")
    args = parser.parse_args(argv)
    missing = [f for f in args.first + args.parts + args.extras if not os.path.isdir(f)]
    if missing:
        print(f"carry_plan: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 1
    limit = int((args.limit_mib - args.margin_mib) * MIB)
    size = functools.cache(folder_bytes)      # each folder walked once
    try:
        calls = plan_calls(args.tree_bytes, limit, args.first, args.parts, args.extras, size)
    except ValueError as error:
        print(f"carry_plan: {error}", file=sys.stderr)
        return 1
    commands = session_commands(calls, args.finish_env, args.background_env)
    print(f"{len(calls)} device call(s), back to back (the tree is "
          f"{args.tree_bytes / MIB:.1f} MiB):")
    for k, (call, command) in enumerate(zip(calls, commands), start=1):
        mib = (args.tree_bytes + sum(size(f) for f in call)) / MIB
        print(f"  call {k}: carry {json.dumps(call)}  ({mib:.1f} MiB)\n          {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
