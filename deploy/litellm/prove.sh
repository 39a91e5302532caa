#!/usr/bin/env bash
# Prove, on loopback, that LiteLLM in front of several llmnode nodes routes each model to a node
# that has it and fails over when a node goes away:
#   node 1 serves "demo-a" and "shared", node 2 serves "shared" (demo backends, no GPU);
#   LiteLLM's config has the same layout as deploy/litellm/config.yaml.
# Steps: demo-a goes to node 1 only; "shared" is spread over both; node 1 is stopped; "shared"
# is still answered (node 2), demo-a falls back to "shared", and LiteLLM's GET /health names
# node 1 unhealthy. Each node's /api/models/<m>/info requests_served is the evidence.
#
# Installs litellm[proxy] into its own venv (LITELLM_VENV, default
# ${XDG_CACHE_HOME:-~/.cache}/llmnode-litellm-venv): heavy, so it is not part of default CI.
# TWISTD: the twistd that has llmnode (default: .venv/bin/twistd of this checkout, else twistd).
# Everything it starts is stopped on exit. Exits non-zero when a step fails.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
exec </dev/null

VENV=${LITELLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llmnode-litellm-venv}
if [ -z "${TWISTD:-}" ]; then
  if [ -x "$ROOT/.venv/bin/twistd" ]; then TWISTD=$ROOT/.venv/bin/twistd; else TWISTD=$(command -v twistd); fi
fi
NODE_PYTHON=$(dirname "$TWISTD")/python
WORK=$(mktemp -d /tmp/llmnode-litellm-prove.XXXXXX) || exit 1
PIDS=()
failed=0
START=$SECONDS

say() { printf '[%3ds] %s\n' "$((SECONDS - START))" "$*"; }
ok() { say "OK:   $*"; }
bad() { failed=$((failed + 1)); say "FAIL: $*"; }

stop_pid() {  # stop_pid PID: SIGTERM its process group, then SIGKILL after 15 s
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
}
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  left=$(ps -eo pid=,args= | grep -F "$WORK" | grep -v grep)
  if [ -n "$left" ]; then
    say "FAIL: processes left behind:"; echo "$left"
    failed=$((failed + 1))
  else
    say "every process started here has stopped"
  fi
  rm -rf "$WORK"
  if [ "$failed" -eq 0 ]; then say "prove.sh: PASS"; exit 0; fi
  say "prove.sh: FAIL ($failed failed steps)"
  exit 1
}
trap cleanup EXIT
trap 'bad "interrupted"; exit 130' INT TERM

# --- LiteLLM --------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/litellm" ]; then
  say "installing litellm[proxy] into $VENV (a few minutes)"
  if ! { python3 -m venv "$VENV" && timeout 1200 "$VENV/bin/pip" install -q 'litellm[proxy]'; } \
       >"$WORK/pip.log" 2>&1; then
    tail -n 20 "$WORK/pip.log"; bad "pip install litellm[proxy]"; exit 1
  fi
fi
say "litellm $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))'), llmnode from $TWISTD"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
NODE1=$(free_port); NODE2=$(free_port); PROXY=$(free_port)
B1=$(free_port); B2=$(free_port); B3=$(free_port)
MASTER_KEY=sk-prove-$RANDOM$RANDOM

# --- Two llmnode nodes -------------------------------------------------------------------------
demo_model() {  # demo_model ID PORT UPSTREAM: one demo model entry
  cat <<EOF
  $1:
    mode: "Chat"
    port: $2
    upstream_model: "$3"
    CPU:
      required_devices: ["cpu"]
      script_path: '"\$LLMNODE_PYTHON" -m llmnode.demo.backend --port "\$LLMNODE_PORT" --alarm 900'
      memory_mb: {"cpu": 64}
EOF
}
for n in 1 2; do mkdir -p "$WORK/node$n"; done
{ printf 'program:\n  host: "127.0.0.1"\n  port: %s\n  log_dir: "logs"\nLocal-Models:\n' "$NODE1"
  demo_model demo-a "$B1" demo-a@node1
  demo_model shared "$B2" shared@node1; } > "$WORK/node1/config.yaml"
{ printf 'program:\n  host: "127.0.0.1"\n  port: %s\n  log_dir: "logs"\nLocal-Models:\n' "$NODE2"
  demo_model shared "$B3" shared@node2; } > "$WORK/node2/config.yaml"

start_node() {  # start_node N PORT
  (cd "$WORK/node$1" && PYTHONPATH=$ROOT exec setsid "$TWISTD" -n --pidfile= llmnode \
     --config "$WORK/node$1/config.yaml" >"$WORK/node$1/twistd.log" 2>&1) &
  PIDS+=($!)
  eval "NODE${1}_PID=$!"
}
start_node 1 "$NODE1"
start_node 2 "$NODE2"

http() {  # http METHOD URL [JSON]: prints "STATUS BODY" (and the header LiteLLM adds)
  "$NODE_PYTHON" - "$@" <<'EOF'
import json, sys, urllib.error, urllib.request
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
headers = {"Authorization": "Bearer " + __import__("os").environ.get("KEY", "none")}
if data:
    headers["Content-Type"] = "application/json"
try:
    with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=90) as r:
        status, body, base = r.status, r.read().decode(errors="replace"), r.headers.get("x-litellm-model-api-base", "")
except urllib.error.HTTPError as e:
    status, body, base = e.code, e.read().decode(errors="replace"), ""
except Exception as e:
    status, body, base = 0, repr(e), ""
print(status, base or "-", " ".join(body.split())[:4000])
EOF
}
wait_for() {  # wait_for URL SECONDS
  local deadline=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$deadline" ]; do
    [ "$(http GET "$1" | cut -d' ' -f1)" = 200 ] && return 0
    sleep 0.5
  done
  return 1
}
served() {  # served NODEPORT MODEL: requests_served of the model on that node
  http GET "http://127.0.0.1:$1/api/models/$2/info" | cut -d' ' -f3- \
    | "$NODE_PYTHON" -c 'import json, sys; print(json.load(sys.stdin).get("requests_served", "?"))' 2>/dev/null \
    || echo "?"
}

for n in 1 2; do
  port_var=NODE$n
  if wait_for "http://127.0.0.1:${!port_var}/api/health" 30; then
    ok "node $n (127.0.0.1:${!port_var}) is up"
  else
    tail -n 20 "$WORK/node$n/twistd.log"; bad "node $n did not come up"; exit 1
  fi
done

# --- LiteLLM in front, configured like deploy/litellm/config.yaml -------------------------------
deployment() {  # deployment GROUP NODEPORT NODENAME
  cat <<EOF
  - model_name: $1
    litellm_params:
      model: openai/$1
      api_base: http://127.0.0.1:$2/v1
      api_key: "none"
      timeout: 60
    model_info:
      id: $1@$3
EOF
}
{ echo "model_list:"
  deployment demo-a "$NODE1" node1
  deployment shared "$NODE1" node1
  deployment shared "$NODE2" node2
  cat <<EOF
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 2
  retry_after: 0
  allowed_fails: 1
  cooldown_time: 30
  fallbacks: [{"demo-a": ["shared"]}]
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  background_health_checks: false
EOF
} > "$WORK/litellm.yaml"
(cd "$WORK" && LITELLM_MASTER_KEY=$MASTER_KEY LITELLM_LOG=ERROR \
   exec setsid "$VENV/bin/litellm" --config "$WORK/litellm.yaml" --host 127.0.0.1 --port "$PROXY" \
   >"$WORK/litellm.log" 2>&1) &
PIDS+=($!)
if wait_for "http://127.0.0.1:$PROXY/health/liveliness" 180; then
  ok "LiteLLM proxy (127.0.0.1:$PROXY) is up"
else
  tail -n 30 "$WORK/litellm.log"; bad "LiteLLM did not come up"; exit 1
fi
export KEY=$MASTER_KEY

chat() {  # chat MODEL: one chat completion through LiteLLM; prints "STATUS API_BASE BODY"
  http POST "http://127.0.0.1:$PROXY/v1/chat/completions" \
    "{\"model\": \"$1\", \"messages\": [{\"role\": \"user\", \"content\": \"hi $1\"}]}"
}
summary() {  # summary ANSWER: status, the api_base LiteLLM used, the model the backend saw
  local model
  model=$(grep -oE '"model": ?"[^"]*"' <<<"$1" | head -n 1)
  echo "${1%% *}, api_base $(cut -d' ' -f2 <<<"$1"), ${model:-$(cut -d' ' -f3- <<<"$1" | cut -c1-200)}"
}

# 1. demo-a exists only on node 1.
for i in 1 2 3; do
  answer=$(chat demo-a)
  say "  demo-a #$i -> $(summary "$answer")"
done
a1=$(served "$NODE1" demo-a)
if [ "$a1" = 3 ]; then ok "demo-a: node 1 served all 3 requests"; else bad "demo-a: node 1 served $a1 of 3"; fi

# 2. shared is spread over both nodes.
count=12
statuses=
for i in $(seq "$count"); do
  answer=$(chat shared)
  statuses="$statuses ${answer%% *}"
done
s1=$(served "$NODE1" shared); s2=$(served "$NODE2" shared)
say "  shared x$count -> statuses:$statuses; node 1 served $s1, node 2 served $s2"
if [ "$((s1 + s2))" = "$count" ] && [ "$s1" -gt 0 ] && [ "$s2" -gt 0 ]; then
  ok "shared: balanced over both nodes ($s1 + $s2)"
else
  bad "shared: expected $count requests over both nodes, got $s1 + $s2"
fi

# 3. Node 1 goes away.
stop_pid "$NODE1_PID"
if [ "$(http GET "http://127.0.0.1:$NODE1/api/health" | cut -d' ' -f1)" = 0 ]; then
  ok "node 1 stopped (SIGTERM)"
else
  bad "node 1 still answers"
fi
before=$s2
all_ok=1
for i in 1 2 3 4 5 6; do
  answer=$(chat shared)
  say "  shared #$i after node 1 stopped -> $(summary "$answer")"
  [ "${answer%% *}" = 200 ] || all_ok=0
done
s2=$(served "$NODE2" shared)
if [ "$all_ok" = 1 ] && [ "$((s2 - before))" = 6 ]; then
  ok "failover: all 6 'shared' requests answered by node 2"
else
  bad "failover: node 2 served $((s2 - before)) of 6"
fi

answer=$(chat demo-a)
say "  demo-a after node 1 stopped -> $(summary "$answer")"
if [ "${answer%% *}" = 200 ] && grep -q 'shared@node2' <<<"$answer"; then
  ok "fallback: demo-a (only on node 1) answered by 'shared' on node 2"
else
  bad "fallback demo-a -> shared"
fi

# 4. LiteLLM's on-demand health check of every deployment.
health=$(http GET "http://127.0.0.1:$PROXY/health")
say "  GET /health -> $(grep -oE '"(healthy|unhealthy)_count": ?[0-9]+' <<<"$health" | tr '\n' ' ')"
if grep -qE '"healthy_count": ?1\b' <<<"$health" && grep -qE '"unhealthy_count": ?2\b' <<<"$health"; then
  ok "LiteLLM /health: node 1's two deployments unhealthy, node 2's healthy"
else
  bad "LiteLLM /health did not report node 1's deployments unhealthy"
fi
