#!/usr/bin/env python3
"""Where two scenarios' instructions per request differ, function by function.

Reads the callgrind dumps that `count-instructions.sh` keeps (KEEP_DUMPS=DIR), one
directory per scenario, and prints each function's own instructions per request
(inlined code counts where it was inlined) in the first and the second, largest
differences first; with --match, only the functions whose names the regular
expression finds, and their total.

usage: benches/callgrind-diff.py DIR_A DIR_B [--side client|server] [--match REGEX] [--top N]
"""
import argparse
import os
import re
import sys

HEADERS_ENCODE = "h2::frame::headers::Headers::encode"


def own_costs(directory, side):
    """Each function's own instructions per request in one side's dumps."""
    pids = sorted({name.split(".")[1] for name in os.listdir(directory)}, key=int)
    if not pids:
        sys.exit(f"callgrind-diff: no dumps in {directory}")
    # The client-side proxy starts first, so it has the lower pid.
    pid = pids[0] if side == "client" else pids[-1]
    costs, requests = {}, 0
    for name in os.listdir(directory):
        if name.split(".")[1] != pid:
            continue
        names, function, callee, after_call = {}, None, None, False
        with open(os.path.join(directory, name), errors="replace") as dump:
            for line in dump:
                if line.startswith(("fn=", "cfn=")):
                    kind, rest = line.rstrip("\n").split("=", 1)
                    match = re.match(r"\((\d+)\)(?: (.*))?", rest)
                    if match.group(2):
                        names[match.group(1)] = match.group(2)
                    resolved = names.get(match.group(1), "?")
                    if kind == "fn":
                        function, after_call = resolved, False
                    else:
                        callee = resolved
                elif line.startswith("calls="):
                    # The next cost line is the call's inclusive cost, not this
                    # function's own.
                    after_call = True
                    if HEADERS_ENCODE in (callee or ""):
                        requests += int(line[6:].split()[0])
                elif line[:1].isdigit() or line[:1] in ("+", "-", "*"):
                    fields = line.split()
                    if len(fields) < 2:
                        continue
                    if after_call:
                        after_call = False
                    else:
                        costs[function] = costs.get(function, 0) + int(fields[1])
    if not requests:
        sys.exit(f"callgrind-diff: no requests in {directory}")
    return {f: c / requests for f, c in costs.items()}, requests


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--side", choices=("client", "server"), default="client")
    parser.add_argument("--match", help="only functions whose names this finds")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    first, first_requests = own_costs(args.first, args.side)
    second, second_requests = own_costs(args.second, args.side)
    print(f"{args.side} side: {sum(first.values()):,.0f} instructions per request in "
          f"{args.first} ({first_requests} requests), {sum(second.values()):,.0f} in "
          f"{args.second} ({second_requests} requests)")
    functions = set(first) | set(second)
    if args.match:
        pattern = re.compile(args.match)
        functions = {f for f in functions if pattern.search(f)}
    rows = sorted(
        ((second.get(f, 0) - first.get(f, 0), f) for f in functions),
        key=lambda row: -abs(row[0]),
    )
    for difference, function in rows[: args.top]:
        print(f"{difference:+9.0f} {first.get(function, 0):9.0f} -> "
              f"{second.get(function, 0):9.0f}  {function[:110]}")
    if args.match:
        total = sum(difference for difference, _ in rows)
        print(f"{total:+9.0f} in all {len(rows)} functions matched")


if __name__ == "__main__":
    main()
