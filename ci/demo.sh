#!/usr/bin/env bash
# A local demo network: N `borg node` processes on 127.0.1.x (default ports), joined into one
# tree; shows the tree, sends a broadcast, puts a file and gets it back at another node, kills
# a branch node, shows the repaired tree and gets the file again.
#   ci/demo.sh [N]        (default 12; Ctrl-C or the end of the script stops the nodes)
set -euo pipefail
# Delivered broadcasts are logged at debug under their own target (peer-supplied text): show them.
export BORG_LOG=${BORG_LOG:-info,borg::delivered=debug}
# Storage timings of seconds, not minutes (members placeable after 1 s; see docs/STORAGE.md).
export BORG_SHARD_QUICK=${BORG_SHARD_QUICK:-1}
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
echo; echo "storage: a 5 MB file put at $(ip 1), got back at $(ip $((N - 1)))"
head -c 5000000 /dev/urandom > "$DIR/demo.bin"
"$B" id new --json | sed -n 's/.*"phrase":"\([^"]*\)".*/\1/p' > "$DIR/demo.phrase"
# Members announce themselves on the shard tree; wait until every node is placeable.
for _ in $(seq 100); do
  placeable=$("$B" status --node "$(ip 1):13340" --json 2>/dev/null | sed -n 's/^ *"placeable": \([0-9]*\).*/\1/p' | head -1)
  [ "${placeable:-0}" -ge "$N" ] && break; sleep 0.2
done
id=$("$B" put --node "$(ip 1)" "$DIR/demo.bin" --phrase-file "$DIR/demo.phrase" --json | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
echo "stored as $id"
"$B" ls --node "$(ip 3)" --phrase-file "$DIR/demo.phrase"
"$B" get --node "$(ip $((N - 1)))" "$id" -o "$DIR/demo.out" --phrase-file "$DIR/demo.phrase"
cmp "$DIR/demo.bin" "$DIR/demo.out" && echo "the file came back byte for byte"
victim=$(( N > 2 ? 2 : 1 ))
echo; echo "kill -9 of the node at $(ip "$victim"):"
kill -9 "${pids[$victim]}"; sleep 2
"$B" tree --node "$(ip 0)"
echo; echo "the file again, with node $(ip "$victim") dead:"
"$B" get --node "$(ip $((N - 2)))" "$id" -o "$DIR/demo2.out" --phrase-file "$DIR/demo.phrase"
cmp "$DIR/demo.bin" "$DIR/demo2.out" && echo "the file came back byte for byte"
echo; "$B" status --node "$(ip 0)"
