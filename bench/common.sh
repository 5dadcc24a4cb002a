# Shared by bench/run.sh and bench/callgrind.sh (sourced, from the repository root): the output
# folder, the tools and the binary under test, free ports, and the nginx "upstream" both use.

OUT="bench/out"
mkdir -p "$OUT/tmp"
OUT="$(cd "$OUT" && pwd)"

# Install the Debian packages named (binary:package pairs) whose binary is missing, then set
# NGINX and BIN: PORTCULLIS_BIN when given (e.g. a saved earlier build), else a release build.
bench_setup() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair##*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]} (Debian packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
  if [ -n "${PORTCULLIS_BIN:-}" ]; then
    BIN="$PORTCULLIS_BIN"
  else
    echo "==> building portcullis (release)"
    cargo build --release --locked -q
    BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/portcullis"
  fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The canned chat completion the upstream answers every request with.
BODY='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Portcullis benchmark answer."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}'

# An nginx config in $OUT/NAME.conf: NAME, worker_processes, then the http-block body.
nginx_conf() {
  cat > "$OUT/$1.conf" <<NGX
worker_processes $2;
pid $OUT/$1.pid;
error_log $OUT/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $OUT/tmp; proxy_temp_path $OUT/tmp; fastcgi_temp_path $OUT/tmp;
  uwsgi_temp_path $OUT/tmp; scgi_temp_path $OUT/tmp;
$3
}
NGX
}

# The upstream: `return 200` with $BODY on 127.0.0.1:PORT. NAME, worker_processes, PORT.
upstream_conf() {
  nginx_conf "$1" "$2" "  server {
    listen 127.0.0.1:$3;
    location / { default_type application/json; return 200 '$BODY'; }
  }"
}

# nginx as the reverse proxy under comparison (keepalive upstream, proxy_buffering off) on
# 127.0.0.1:PORT in front of the upstream on UP_PORT. NAME, PORT, UP_PORT.
proxy_conf() {
  nginx_conf "$1" auto "  upstream backend { server 127.0.0.1:$3; keepalive 128; }
  server {
    listen 127.0.0.1:$2;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
    }
  }"
}

# The request every target gets: wrk's script for a POST of a small chat completion, with an
# optional extra header. FILE [HEADER VALUE]
post_lua() {
  {
    echo 'wrk.method = "POST"'
    echo 'wrk.headers["Content-Type"] = "application/json"'
    [ $# -eq 3 ] && echo "wrk.headers[\"$2\"] = \"$3\""
    echo "wrk.body = '{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"Say something short.\"}],\"max_tokens\":16}'"
  } > "$1"
}

# The Azure data-plane path every target is asked for.
PATH_Q="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"

# Wait (up to 10 s each) until every 127.0.0.1:PORT given answers a POST to $PATH_Q.
wait_answering() {
  local port
  for port in "$@"; do
    for _ in $(seq 1 100); do
      curl -fsS -o /dev/null -X POST "http://127.0.0.1:$port$PATH_Q" -d '{"model":"gpt-4o"}' && break
      sleep 0.1
    done
  done
}

JWT_SECRET="bench-jwt-secret-0123456789abcdef0123456789"

# The gateway as the bench runs it: anonymous callers allowed, an API-key store, an HS256
# issuer and a client for JWT callers, one backend. FILE, listen port, upstream port, a prefix
# for its audit and key files, extra `[server]` lines; optionally extra lines for the JWT
# client "bench" (limits), extra top-level tables (`[limits]`, `[prices]`) and the admin
# listener's address (default "": off).
gateway_conf() {
  cat > "$1" <<TOML
[server]
listen = "127.0.0.1:$2"
$5
[admin]
listen = "${8:-}"
[audit]
path = "$OUT/$4audit.log"
[store]
url = "sqlite://$OUT/$4keys.db"
key_hmac_secret = "bench-store-secret-0123456789abcdef0123456789"
[[issuers]]
name = "bench"
issuer = "https://bench.idp.invalid"
audiences = ["api://bench"]
algorithms = ["HS256"]
hmac_secret = "$JWT_SECRET"
[[clients]]
id = "anon"
anonymous = true
deployments = ["*"]
operations = ["*"]
[[clients]]
id = "bench"
jwt = [{ issuer = "bench", claims = { azp = "bench-app" } }]
deployments = ["gpt-4o"]
operations = ["chat"]
${6:-}
[[backends]]
name = "upstream"
url = "http://127.0.0.1:$3"
deployments = { "gpt-4o" = "gpt-4o" }
${7:-}
TOML
}
