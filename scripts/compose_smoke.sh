#!/usr/bin/env bash
# End-to-end check of the Docker deployment on a machine with Docker + compose v2, for real:
#
#   1. the local base image (scripts/make_base_image.sh) unless BASE_IMAGE names one, a local
#      image holding the torch CPU wheel (pip download, from pip's own configuration), and nginx
#      built from the base (no image registry is needed);
#   2. `docker compose build` of the CPU variant (docker-compose.yml + compose.cpu.yml) from this
#      checkout, then `docker compose up --wait` until healthy, serving the embedded demo model
#      from a read-only model volume with an API key;
#      the CPU kernels compiled in the builder and imported as built by the runtime (no compiler,
#      read-only root), a --quantize 4 daemon answering on them;
#   3. from the host: openai-python streaming and non-streaming, /v1/models, 401 without the key,
#      legacy POST /, /metrics; the container runs as non-root and /models is read-only;
#   4. the `replicas` profile: 2 CPU replicas behind nginx, 20 concurrent streams through nginx all
#      complete, and each replica's /metrics shows it served some;
#   5. `docker compose down -v`, and everything this script made is removed by id/name.
#
# Needs on the host: docker (engine + compose plugin), debootstrap (unless BASE_IMAGE is given),
# python3 with openai and httpx, pip able to download torch==$TORCH_VERSION.
# Environment:
#   BASE_IMAGE       an existing local base image (python3 + venv) instead of making one
#   KEEP_BASE_IMAGE  1 = keep the base image this script made (as chatglm-serve-base:bookworm)
#   TORCH_VERSION    torch installed in the image (default: the host's torch, else 2.13.0)
#   PIP_CA_BUNDLE    CA bundle for pip in the build (default: /etc/ssl/certs/ca-certificates.crt)
#   SMOKE_TIMEOUT    seconds `up --wait` may take (default 300)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUN_ID=$$
PROJECT=chatglm-smoke-$RUN_ID
WORK=$(mktemp -d /tmp/chatglm-smoke.XXXXXX)
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-300}
API_KEY=smoke-key-$RUN_ID
SERVED_NAME=chatglm2-6b-smoke
IMAGE=chatglm-serve:smoke-$RUN_ID
NGINX_TAG=chatglm-serve-nginx:smoke-$RUN_ID
T_START=$(date +%s)

declare -a SUMMARY=() MADE_IMAGES=() CONTAINERS=()
NETWORKS=""
UP=0

log() { printf '[smoke %4ss] %s\n' "$(($(date +%s) - T_START))" "$*"; }
die() { log "FAIL: $*"; exit 1; }
timed() { # timed LABEL CMD...: run CMD, record "LABEL: N s"
    local label=$1 t0 rc=0
    shift
    t0=$(date +%s)
    "$@" || rc=$?
    SUMMARY+=("$label: $(($(date +%s) - t0)) s")
    log "$label: $(($(date +%s) - t0)) s (rc=$rc)"
    return $rc
}
to_log() { # to_log FILE CMD...: run CMD with its output in FILE
    local file=$1
    shift
    "$@" >"$file" 2>&1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# compose variables (a caller's COMPOSE_* must not change what is tested)
unset COMPOSE_FILE COMPOSE_PROFILES COMPOSE_PROJECT_NAME
dc() { docker compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$ROOT/compose.cpu.yml" "$@"; }

cleanup() {
    local rc=$?
    set +e
    if ((UP)); then
        log "cleanup: docker compose down -v"
        dc --profile replicas down -v --remove-orphans --timeout 10 >/dev/null 2>&1
    fi
    # Whatever compose left behind, by id.
    for id in "${CONTAINERS[@]}"; do
        docker rm -f "$id" >/dev/null 2>&1
    done
    for id in $NETWORKS; do
        docker network rm "$id" >/dev/null 2>&1
    done
    for name in "${MADE_IMAGES[@]}"; do
        docker rmi "$name" >/dev/null 2>&1
    done
    rm -rf "$WORK"
    if ((rc)); then log "FAILED (rc=$rc)"; fi
    exit $rc
}
trap cleanup EXIT

remember_containers() {
    local id
    for id in $(docker ps -aq --no-trunc --filter "label=com.docker.compose.project=$PROJECT"); do
        [[ " ${CONTAINERS[*]} " == *" $id "* ]] || CONTAINERS+=("$id")
    done
    NETWORKS=$(docker network ls -q --no-trunc --filter "label=com.docker.compose.project=$PROJECT")
}

command -v docker >/dev/null || die "docker is not installed (scripts/ci_docker_setup.sh)"
docker info >/dev/null 2>&1 || die "the docker engine is not running (scripts/ci_docker_setup.sh)"
docker compose version >/dev/null 2>&1 || die "docker compose v2 is not installed"
python3 -c 'import openai, httpx' 2>/dev/null || die "python3 lacks openai/httpx (pip install openai httpx)"
log "docker $(docker version --format '{{.Server.Version}}'), $(docker compose version --short), project $PROJECT"

# --- 1. images that stand in for registry pulls ---------------------------------------------
if [[ -n ${BASE_IMAGE:-} ]]; then
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "BASE_IMAGE $BASE_IMAGE does not exist"
    SUMMARY+=("base image: given ($BASE_IMAGE)")
else
    BASE_IMAGE=chatglm-serve-base:bookworm
    if ! [[ ${KEEP_BASE_IMAGE:-0} == 1 ]]; then
        BASE_IMAGE=chatglm-serve-base:smoke-$RUN_ID
        MADE_IMAGES+=("$BASE_IMAGE")
    fi
    timed "base image (debootstrap + import)" "$ROOT/scripts/make_base_image.sh" "$BASE_IMAGE" ||
        die "could not make the base image"
fi

TORCH_VERSION=${TORCH_VERSION:-$(python3 -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)}
make_wheels_image() {
    mkdir -p "$WORK/wheels"
    python3 -m pip download -q --no-deps -d "$WORK/wheels" "torch==$TORCH_VERSION" &&
        ls "$WORK"/wheels/torch-*.whl >/dev/null &&
        tar -C "$WORK/wheels" -c . | docker import - "chatglm-serve-wheels:smoke-$RUN_ID" >/dev/null &&
        rm -rf "$WORK/wheels"
}
MADE_IMAGES+=("chatglm-serve-wheels:smoke-$RUN_ID")
timed "torch $TORCH_VERSION wheel image" make_wheels_image || die "could not get the torch wheel"

MADE_IMAGES+=("$NGINX_TAG")
timed "nginx image" to_log "$WORK/nginx-build.log" docker build -f "$ROOT/deploy/nginx.Dockerfile" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$NGINX_TAG" "$ROOT/deploy" ||
    { tail -n 30 "$WORK/nginx-build.log"; die "nginx image build failed"; }

# --- 2. build and start the CPU variant ------------------------------------------------------
PORT=$(free_port)
LB_PORT=$(free_port)
export CHATGLM_IMAGE=$IMAGE BASE_IMAGE BUILDER_IMAGE=$BASE_IMAGE TORCH_VERSION TORCH_INDEX_URL='' \
    WHEELS_IMAGE=chatglm-serve-wheels:smoke-$RUN_ID NGINX_IMAGE=$NGINX_TAG \
    CHATGLM_MODEL_DIR=$WORK/models CHATGLM_MODEL=/models/demo CHATGLM_SERVED_MODEL_NAME=$SERVED_NAME \
    CHATGLM_API_KEYS=$API_KEY CHATGLM_PUBLISH=127.0.0.1:$PORT CHATGLM_LB_PUBLISH=127.0.0.1:$LB_PORT \
    CHATGLM_HEALTH_INTERVAL=2s
# pip inside the build trusts the host's CA bundle (needed behind a TLS-intercepting proxy).
if [[ -z ${PIP_CA_BUNDLE:-} && -s /etc/ssl/certs/ca-certificates.crt ]]; then
    export PIP_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
fi
unset CHATGLM_QUANTIZE CHATGLM_DEVICE CHATGLM_MAX_NUM_SEQS CHATGLM_MAX_MODEL_LEN CHATGLM_KV_CACHE_TOKENS

MADE_IMAGES+=("$IMAGE")
timed "docker compose build (CPU image)" to_log "$WORK/build.log" dc --progress plain build chatglm ||
    { tail -n 60 "$WORK/build.log"; die "docker compose build failed"; }
grep -q "no nvcc in the builder image" "$WORK/build.log" ||
    die "the build log does not say the CUDA kernels were skipped for lack of nvcc"
log "build log: $(grep -o 'chatglm-serve: no nvcc[^"]*' "$WORK/build.log" | head -n1)"
# The slow build steps (BuildKit's plain progress: "#N [stage k/n] STEP" ... "#N DONE 12.3s").
awk '/^#[0-9]+ \[/ && !($1 in name) { n = $0; sub(/^#[0-9]+ /, "", n); name[$1] = substr(n, 1, 90) }
     /^#[0-9]+ DONE [0-9.]+s$/ { t = $3; sub(/s$/, "", t); if (t + 0 >= 3) printf "    %6.1f s  %s\n", t, name[$1] }' \
    "$WORK/build.log"
log "image $IMAGE: $(docker image inspect -f '{{.Id}} {{.Size}} bytes' "$IMAGE")"

# The image on its own (docker run, no compose): the embedded demo model, the image's HEALTHCHECK.
plain_run() {
    local id port status=starting i
    port=$(free_port)
    id=$(docker run -d --read-only --tmpfs /tmp --health-interval 2s -p "127.0.0.1:$port:8000" "$IMAGE")
    CONTAINERS+=("$id")
    for i in $(seq 1 60); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
        [[ $status == starting ]] || break
        sleep 1
    done
    log "docker run $IMAGE: health $status after ~$i s"
    if [[ $status != healthy ]] || ! python3 -c '
import json, sys, urllib.request
h = json.load(urllib.request.urlopen(sys.argv[1] + "/health", timeout=10))
assert h.get("status") == "ok", h
print("plain docker run: /health", h)' "http://127.0.0.1:$port"; then
        docker logs --tail 40 "$id"
        docker rm -f "$id" >/dev/null
        return 1
    fi
    docker rm -f "$id" >/dev/null
}
timed "docker run of the image alone until healthy (demo model)" plain_run ||
    die "the image alone did not become healthy"

# The kernels: compiled in the builder stage (its log says what), imported as built by the
# runtime, which has no compiler and a read-only root. A --quantize 4 daemon runs on them.
grep -q "chatglm-serve: kernels: CPU quantized matmul: compiled" "$WORK/build.log" ||
    die "the build log does not say the CPU kernels were compiled"
grep -o 'chatglm-serve: kernels: .*' "$WORK/build.log" | sed 's/^/    build log: /'
quantized_run() {
    local id port status=starting i
    port=$(free_port)
    id=$(docker run -d --read-only --tmpfs /tmp --health-interval 2s -p "127.0.0.1:$port:8000" \
        "$IMAGE" --quantize 4)
    CONTAINERS+=("$id")
    for i in $(seq 1 90); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
        [[ $status == starting ]] || break
        sleep 1
    done
    log "docker run $IMAGE --quantize 4: health $status after ~$i s"
    if [[ $status != healthy ]]; then docker logs --tail 40 "$id"; return 1; fi
    if docker exec "$id" sh -c 'command -v g++ || command -v c++ || command -v cc'; then
        log "the runtime image has a C++ compiler"
        return 1
    fi
    docker exec "$id" python -c '
import torch
from chatglm_serve.kernels import build, cpu_decode
from chatglm_serve.model.loader import load_model_and_tokenizer
from chatglm_serve.model.quantize import QuantLinear
for mod in (build.cpu_kernels_or_none(), cpu_decode.decode_kernels_or_none()):
    assert mod is not None, "a CPU kernel did not load"
    info = build.build_info(mod)
    assert info["prebuilt"] and mod.__file__.startswith("/opt/chatglm-serve/kernels/"), info
    print("in the container: prebuilt", mod.__file__, "built", info["built_at"])
model, _ = load_model_and_tokenizer(None, torch.float32, "cpu", 4)
paths = {m.path for m in model.modules() if isinstance(m, QuantLinear)}
assert paths == {"cpu_kernel"}, paths
print("in the container: int4 demo model, every quantized linear on the CPU kernel")' || return 1
    python3 -c '
import sys, httpx
r = httpx.post(sys.argv[1] + "/v1/chat/completions", timeout=60,
               json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8})
assert r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str), r.text
print("--quantize 4 daemon answered:", r.json()["usage"])' "http://127.0.0.1:$port" || return 1
    # the log read whole first: `docker logs | grep -q` under pipefail fails when grep stops at
    # its match before docker has written the rest (SIGPIPE), which made this check flaky
    local daemon_log
    daemon_log=$(docker logs "$id" 2>&1)
    if ! grep -q "loaded prebuilt chatglm_quant_cpu" <<<"$daemon_log"; then
        docker logs --tail 40 "$id"
        log "the --quantize 4 daemon did not load the prebuilt CPU kernel"
        return 1
    fi
    docker logs "$id" 2>&1 | grep "loaded prebuilt" | sed 's/^/    daemon log: /'
    docker rm -f "$id" >/dev/null
}
timed "docker run --quantize 4 until healthy, prebuilt kernel checks" quantized_run ||
    die "the int4 daemon on the prebuilt kernels failed"

# The model volume: the demo checkpoint copied out of the image, served as a real model dir.
cid=$(docker create "$IMAGE")
docker cp "$cid:/opt/chatglm-serve/cache/." "$WORK/cache" >/dev/null
docker rm "$cid" >/dev/null
mkdir -p "$WORK/models"
mv "$(find "$WORK/cache" -mindepth 2 -maxdepth 2 -type d -name 'demo-*' | head -n1)" "$WORK/models/demo"
chmod -R a+rX "$WORK/models"
ls "$WORK/models/demo/config.json" >/dev/null || die "no demo checkpoint in the image"

UP=1
timed "up --wait until healthy" dc up -d --wait --wait-timeout "$SMOKE_TIMEOUT" chatglm ||
    { dc logs --tail 80 chatglm; die "the daemon did not become healthy"; }
remember_containers
CID=$(dc ps -q chatglm)

# --- 3. drive it from the host ------------------------------------------------------------------
cat >"$WORK/client.py" <<'PY'
"""Client half of scripts/compose_smoke.sh: `single URL KEY NAME` or `streams URL KEY NAME N`."""
import asyncio
import sys

import httpx
import openai

mode, root, key, name = sys.argv[1:5]
client = openai.OpenAI(base_url=root + "/v1", api_key=key, timeout=120)
msgs = [{"role": "user", "content": "你好, say something"}]


def check(cond, what):
    if not cond:
        sys.exit(f"client: FAIL: {what}")
    print(f"client: ok: {what}")


if mode == "single":
    ids = [m.id for m in client.models.list().data]
    check(name in ids, f"/v1/models lists {name} ({ids})")

    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0.8)
    c = r.choices[0]
    check(isinstance(c.message.content, str) and c.message.content != "", "non-streaming reply text")
    check(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason}")
    check(r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, f"usage {r.usage}")

    parts, finish = [], None
    for chunk in client.chat.completions.create(model=name, messages=msgs, max_tokens=12, stream=True):
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    check(len(parts) > 1 and "".join(parts) != "", f"streamed {len(parts)} chunks")
    check(finish in ("stop", "length"), f"stream finish_reason {finish}")

    try:
        openai.OpenAI(base_url=root + "/v1", api_key="wrong", timeout=30).models.list()
        check(False, "a wrong API key is refused")
    except openai.AuthenticationError:
        check(True, "a wrong API key is refused (401)")

    h = {"Authorization": f"Bearer {key}"}
    body = {"prompt": "你好", "history": [], "max_length": 48, "top_p": 0.7, "temperature": 0.95}
    lr = httpx.post(root + "/", json=body, headers=h, timeout=120)
    check(lr.status_code == 200, f"legacy POST / -> {lr.status_code}")
    j = lr.json()
    check(j.get("status") == 200 and isinstance(j.get("response"), str), "legacy answer fields")
    check(j["history"][-1][0] == "你好", "legacy history carries the turn")

    m = httpx.get(root + "/metrics", headers=h, timeout=30)
    check(m.status_code == 200 and "chatglm_http_requests_total" in m.text, "/metrics exposition")
else:
    n = int(sys.argv[5])

    async def one(ac, i):
        parts, finish = [], None
        stream = await ac.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=24, stream=True
        )
        async for chunk in stream:
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
        return finish, "".join(parts)

    async def main():
        ac = openai.AsyncOpenAI(base_url=root + "/v1", api_key=key, timeout=300, max_retries=0)
        res = await asyncio.gather(*(one(ac, i) for i in range(n)))
        done = sum(1 for f, t in res if f in ("stop", "length") and t)
        check(done == n, f"{done}/{n} concurrent streams through nginx completed")

    asyncio.run(main())
PY

timed "client checks (openai stream/non-stream, legacy, metrics)" \
    python3 "$WORK/client.py" single "http://127.0.0.1:$PORT" "$API_KEY" "$SERVED_NAME" ||
    { dc logs --tail 60 chatglm; die "client checks failed"; }

uid=$(docker exec "$CID" id -u)
# Every process of the container (init, the daemon, any worker), as the host sees them.
uids=$(docker top "$CID" -eo pid,uid | awk 'NR > 1 { print $2 }' | sort -u | tr '\n' ' ')
[[ $uid != 0 && -n $uids && ! " $uids " =~ " 0 " ]] ||
    die "the container runs as root (exec uid $uid, process uids: $uids)"
log "ok: non-root (uid $uid; its processes run as uid(s) ${uids% })"
rw=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/models"}}{{.RW}}{{end}}{{end}}' "$CID")
[[ $rw == false ]] || die "/models is mounted read-write ($rw)"
if docker exec "$CID" touch /models/demo/written-by-container 2>/dev/null; then
    die "the container could write into the model volume"
fi
log "ok: /models is a read-only mount (RW=$rw; a write from inside fails)"

# --- 4. replicas behind nginx -----------------------------------------------------------------
requests_served() { # requests_served CONTAINER: chat completions answered 200, from its /metrics
    docker exec "$1" python -c '
import re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=10).read().decode()
n = 0.0
for line in text.splitlines():
    if line.startswith("chatglm_http_requests_total{") and "chat/completions" in line and "status=\"200\"" in line:
        n += float(line.rsplit(" ", 1)[1])
print(int(n))'
}
before=$(requests_served "$CID")
timed "replicas profile up --wait (2 CPU replicas + nginx)" \
    dc --profile replicas up -d --wait --wait-timeout "$SMOKE_TIMEOUT" ||
    { dc --profile replicas logs --tail 40; die "replicas did not become healthy"; }
remember_containers
RCID=$(dc --profile replicas ps -q replica-1)
[[ $(dc ps -q chatglm) == "$CID" ]] || die "the first replica was recreated by the replicas profile"
before_r=$(requests_served "$RCID")

timed "20 concurrent streams through nginx" \
    python3 "$WORK/client.py" streams "http://127.0.0.1:$LB_PORT" "$API_KEY" "$SERVED_NAME" 20 ||
    { dc --profile replicas logs --tail 40 nginx; die "streams through nginx failed"; }
a=$(($(requests_served "$CID") - before))
b=$(($(requests_served "$RCID") - before_r))
SUMMARY+=("replica split of the 20 streams: chatglm $a, replica-1 $b")
log "replica split: chatglm served $a, replica-1 served $b"
((a + b == 20)) || die "the replicas' metrics count $((a + b)) streams, not 20"
((a > 0 && b > 0)) || die "one replica served nothing"

# --- 5. down -v -------------------------------------------------------------------------------
timed "docker compose down -v" dc --profile replicas down -v --remove-orphans --timeout 20 ||
    die "docker compose down failed"
UP=0
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
[[ -z $left ]] || die "containers left after down: $left"

SUMMARY+=("total: $(($(date +%s) - T_START)) s")
log "PASSED"
printf '  %s\n' "${SUMMARY[@]}"
