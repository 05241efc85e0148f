#!/usr/bin/env bash
# Makes sure redis-server is installed and a Redis answers at TOKENSEND_REDIS_URL's host and port (default
# 127.0.0.1:6379): starts one when none answers, installing it if needed.
set -euo pipefail
url=${TOKENSEND_REDIS_URL:-redis://127.0.0.1:6379/0}
hostport=${url#*://}; hostport=${hostport#*@}; hostport=${hostport%%/*}
host=${hostport%%:*}; port=${hostport##*:}
[[ "$port" == "$host" ]] && port=6379

ping() {
  if command -v redis-cli >/dev/null; then
    [[ "$(redis-cli -h "$host" -p "$port" ping 2>/dev/null)" == "PONG" ]]
  else
    exec 3<>"/dev/tcp/$host/$port" 2>/dev/null || return 1
    printf 'PING\r\n' >&3; read -r -t 2 reply <&3; exec 3>&-
    [[ "$reply" == "+PONG"* ]]
  fi
}

# The fault tests start and stop Redis servers of their own, so the binary must be here too.
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server" >&2
  if [[ $(id -u) -eq 0 ]]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi
fi
ping && exit 0
case "$host" in 127.0.0.1|localhost|::1) ;; *) echo "Redis at $host:$port does not answer" >&2; exit 1;; esac
echo "starting redis-server on $host:$port" >&2
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "Redis did not start on $host:$port" >&2; exit 1
