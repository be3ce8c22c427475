#!/usr/bin/env bash
# Two hosts on one machine with a real network between them: network namespaces kvt-pre and
# kvt-dec joined by a veth pair (10.77.0.1 / 10.77.0.2), one `kvtier serve` in each, and
# `kvtier-bench transfer --prefill --decode` run inside kvt-pre: a Llama-3.1-8B-shaped request
# (512 MiB; QUICK=1: 128 MiB) pushed and pulled byte-exact, then again with the veth rate-limited
# by `tc qdisc ... tbf rate 1gbit`. Traffic stays inside the two namespaces.
#
# Needs root (CI runs as root). If the namespaces cannot be made it says so and exits 77
# (skipped), never a silent pass. Binaries: target/release/kvtier and kvtier-bench (built first).
set -euo pipefail
cd "$(dirname "$0")/.."
KVTIER=${KVTIER:-target/release/kvtier}
BENCH=${BENCH:-target/release/kvtier-bench}
QUICK=${QUICK:-}
PRE=kvt-pre DEC=kvt-dec A=10.77.0.1 B=10.77.0.2 PORT=7070
TOKEN=netns-transfer-token
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$PRE" 2>/dev/null || true
  ip netns del "$DEC" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$KVTIER" ] && [ -x "$BENCH" ] || { echo "build first: cargo build --release -p kvtier -p kvtier-bench" >&2; exit 1; }
if ! { ip netns add "$PRE" && ip netns add "$DEC"; } 2>"$WORK/err"; then
  echo "SKIPPED: cannot create network namespaces: $(cat "$WORK/err")" >&2
  exit 77
fi
ip link add kvt-a netns "$PRE" type veth peer name kvt-b netns "$DEC"
ip -n "$PRE" addr add "$A/24" dev kvt-a
ip -n "$DEC" addr add "$B/24" dev kvt-b
for ns in "$PRE" "$DEC"; do
  ip -n "$ns" link set lo up
done
ip -n "$PRE" link set kvt-a up
ip -n "$DEC" link set kvt-b up

serve() { # ns addr peer
  local dir="$WORK/$1"
  mkdir -p "$dir"
  cat >"$dir/kvtier.toml" <<EOF
data_dir = "$dir/data"
listen = "$2:$PORT"
http = "127.0.0.1:7071"
socket = ""
token = "$TOKEN"
host_bytes = "2GiB"
disk_bytes = 0
transfer_bytes = "1GiB"
transfer_peers = ["$3:$PORT"]
EOF
  ip netns exec "$1" "$KVTIER" serve --config "$dir/kvtier.toml" >"$dir/log" 2>&1 &
  PIDS+=($!)
}
serve "$PRE" "$A" "$B"
serve "$DEC" "$B" "$A"
for i in $(seq 100); do
  ip netns exec "$PRE" bash -c "exec 3<>/dev/tcp/$A/$PORT" 2>/dev/null &&
    ip netns exec "$DEC" bash -c "exec 3<>/dev/tcp/$B/$PORT" 2>/dev/null && break
  sleep 0.1
done

run() { # label
  KVTIER_BENCH_TOKEN=$TOKEN ip netns exec "$PRE" "$BENCH" transfer ${QUICK:+--quick} \
    --prefill "$A:$PORT" --decode "$B:$PORT" --label "$1"
}
run veth
ip netns exec "$PRE" tc qdisc add dev kvt-a root tbf rate 1gbit burst 256kb latency 50ms
ip netns exec "$DEC" tc qdisc add dev kvt-b root tbf rate 1gbit burst 256kb latency 50ms
run veth-tbf-1gbit
