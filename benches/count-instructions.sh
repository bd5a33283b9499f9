#!/bin/bash
# Instructions per request in each proxy, counted by callgrind: a figure that, unlike
# CPU time, does not move with the neighbours on a shared VM, so a change of a few
# per cent shows. Runs one scenario of the mesh benchmark with both proxies under
# `valgrind --tool=callgrind` (about 50 times slower, so the request rate is low; each
# request still takes the whole path).
#
# usage: sudo benches/count-instructions.sh [SCENARIO] [SECONDS]
#   SCENARIO: a `tandem-bench --only` text naming one HTTP scenario (default "1 conn")
#   BUILD=DIR (environment): the binaries to measure (default target/production)
#   KEEP_DUMPS=DIR (environment): copy the meshed phase's dumps there, for
#   `callgrind_annotate`
# needs: valgrind, python3, a production build (see benches/README.md)
set -euo pipefail
scenario=${1:-1 conn}
seconds=${2:-8}
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-$root/target/production}
for tool in valgrind python3; do
    command -v $tool > /dev/null || { echo "count-instructions: needs $tool" >&2; exit 1; }
done
[ -x "$build/tandem-bench" ] && [ -x "$build/tandem-proxy" ] ||
    { echo "count-instructions: build first: cargo build --profile production --workspace --bins" >&2; exit 1; }

# tandem-bench starts the tandem-proxy it finds beside itself: here, a wrapper that
# runs the real one under callgrind. The proxies run as the proxy user, so the dump
# directory is open to all.
work=$(mktemp -d)
chmod 755 "$work"
trap 'pkill -KILL -f "callgrind-out-file=$work" 2> /dev/null || true; rm -rf "$work"' EXIT
mkdir -m 1777 "$work/dumps"
cp "$build/tandem-bench" "$work/"
for other in "$build"/tandem-*; do
    [ -x "$other" ] && [ ! -e "$work/$(basename "$other")" ] && [ "$(basename "$other")" != tandem-proxy ] &&
        ln -s "$other" "$work/"
done
# The bench kills the wrapper with SIGKILL; callgrind writes only at a clean exit,
# hence a dump every 2 million basic blocks while the proxy works, and the proxy as a
# child that outlives the wrapper until this script kills it.
cat > "$work/tandem-proxy" <<EOF
#!/bin/sh
valgrind --tool=callgrind --dump-every-bb=2000000 --callgrind-out-file=$work/dumps/out.%p $build/tandem-proxy "\$@" &
wait
EOF
chmod 755 "$work/tandem-proxy"

"$work/tandem-bench" --seconds "$seconds" --only "$scenario" > "$work/bench.out" 2>&1 &
bench=$!
# The meshed phase is the last; its load generator targets the meshed HTTP port, or
# a Service's address.
meshed_load="load --addr ([0-9.]+:8080|10\.96\.0\.[0-9]+:80) .*--seconds $seconds"
until pgrep -f "$meshed_load" > /dev/null; do
    kill -0 $bench 2> /dev/null || { cat "$work/bench.out" >&2; exit 1; }
    sleep 0.2
done
sleep 1
touch "$work/from"
while pgrep -f "$meshed_load" > /dev/null; do sleep 0.2; done
touch "$work/to"
wait $bench || { cat "$work/bench.out" >&2; exit 1; }
grep -E "\| meshed \|" "$work/bench.out"

# Dumps written inside the meshed phase only (after start-up and warm-up); each
# request encodes exactly one HTTP/2 HEADERS frame in each proxy (the request on the
# client side, the response on the server side), which counts the requests.
python3 - "$work" <<'EOF'
import os, re, shutil, sys
work = sys.argv[1]
start, end = (os.path.getmtime(os.path.join(work, n)) for n in ("from", "to"))
per_pid = {}
for name in os.listdir(os.path.join(work, "dumps")):
    path = os.path.join(work, "dumps", name)
    parts = name.split(".")
    if len(parts) == 3 and start <= os.path.getmtime(path) <= end:
        per_pid.setdefault(parts[1], []).append(path)
        if os.environ.get("KEEP_DUMPS"):
            os.makedirs(os.environ["KEEP_DUMPS"], exist_ok=True)
            shutil.copy(path, os.environ["KEEP_DUMPS"])

def count(path):
    """Instructions in one dump, and calls to the HEADERS encoder in it."""
    names, callee, instructions, requests = {}, None, 0, 0
    with open(path, errors="replace") as dump:
        for line in dump:
            if line.startswith("summary:"):
                instructions = int(line.split()[1])
            elif line.startswith("cfn="):
                m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
                callee = names.get(m.group(1), "") if m else line[4:]
            elif line.startswith("fn="):
                m = re.match(r"fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
            elif line.startswith("calls=") and callee is not None:
                if "h2::frame::headers::Headers::encode" in callee:
                    requests += int(line[6:].split()[0])
                callee = None
    return instructions, requests

# The client-side proxy starts first, so it has the lower pid.
for side, pid in zip(("client side", "server side"), sorted(per_pid, key=int)):
    totals = [count(p) for p in per_pid[pid]]
    instructions = sum(t[0] for t in totals)
    requests = sum(t[1] for t in totals)
    if requests:
        print(f"{side} proxy: {instructions / requests:,.0f} instructions per request "
              f"({requests} requests in {len(totals)} dumps)")
    else:
        print(f"{side} proxy: no requests in {len(totals)} dumps")
EOF
