#!/usr/bin/env bash
# A local demo network: N `borg node` processes on 127.0.1.x (default ports), joined into one
# tree; shows the tree, sends a broadcast, kills a branch node and shows the repaired tree.
#   ci/demo.sh [N]        (default 12; Ctrl-C or the end of the script stops the nodes)
set -euo pipefail
# Delivered broadcasts are logged at debug under their own target (peer-supplied text): show them.
export BORG_LOG=${BORG_LOG:-info,borg::delivered=debug}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
N=${1:-12}
K=${K:-3}
"$ROOT/ci/setup.sh" >/dev/null
cargo build --quiet --release -p borg
B="$ROOT/target/release/borg"
DIR=$(mktemp -d /tmp/borg-demo.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; echo "logs and keys in $DIR"; }
trap cleanup EXIT INT TERM
ip() { echo "127.0.1.$(( $1 + 2 ))"; }
wait_mon() { for _ in $(seq 100); do "$B" status --node "$(ip "$1")" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

echo "starting $N nodes (k=$K) in $DIR"
"$B" node --listen "$(ip 0)" --data "$DIR/n0" --max-children "$K" 2>"$DIR/n0.log" & pids+=($!)
wait_mon 0
for i in $(seq 1 $((N - 1))); do
  "$B" node --listen "$(ip "$i")" --join "$(ip $(( i / 2 )))" --data "$DIR/n$i" --max-children "$K" 2>"$DIR/n$i.log" & pids+=($!)
done
for _ in $(seq 100); do
  size=$("$B" status --node "$(ip 0)" --json 2>/dev/null | sed -n 's/^  "size": \([0-9]*\).*/\1/p' | head -1)
  [ "${size:-0}" -ge "$N" ] && break; sleep 0.2
done
"$B" tree --node "$(ip 0)"
for _ in $(seq 100); do
  size=$("$B" status --node "$(ip 0):13398" --json 2>/dev/null | sed -n 's/^  "size": \([0-9]*\).*/\1/p' | head -1)
  [ "${size:-0}" -ge "$N" ] && break; sleep 0.2
done
echo; echo "the node's second cell, cronoTree (network time), has its own tree (k=3):"
"$B" tree --node "$(ip 0):13398"
echo; echo "network time on node $(ip $((N - 1))):"; "$B" status --node "$(ip $((N - 1)))" | grep -E '^(time|cell) '
echo; "$B" broadcast --node "$(ip $((N - 1)))" "hello from the demo"
sleep 1
echo "nodes that logged the broadcast: $(grep -l 'hello from the demo' "$DIR"/*.log | wc -l) of $N"
victim=$(( N > 2 ? 2 : 1 ))
echo; echo "kill -9 of the node at $(ip "$victim"):"
kill -9 "${pids[$victim]}"; sleep 2
"$B" tree --node "$(ip 0)"
echo; "$B" status --node "$(ip 0)"
